"""Tests of relaymail.notice: the blocked notice and when it may be sent."""

from __future__ import annotations

import email
import re
from datetime import datetime, timezone
from email import policy as email_policy

import pytest

from relaymail.notice import REASONS, build_blocked_notice, should_send_notice

BUYER_ALIAS = "t969vz2jn3bdsy7@marketplace.example"
BUYER_REAL_ADDRESS = "juan.perez@example.net"
NOW = datetime(2024, 3, 11, 16, 17, 5, tzinfo=timezone.utc)
# The blocked message's headers as rewritten for the buyer.
REWRITTEN_HEADERS = (
    "From: =?utf-8?q?Artesan=C3=ADas_=C3=91and=C3=BA?= <k7m2q9x4zr1c8nw@marketplace.example>\r\n"
    "To: t969vz2jn3bdsy7@marketplace.example\r\n"
    "Subject: =?utf-8?q?Nuevos_productos_de_temporada?=\r\n"
    "Message-ID: <mkt.20240311.d9e8f7@marketplace.example>\r\n"
)


def build(**overrides) -> bytes:
    values = dict(
        seller_locale="es-MX",
        notice_from="avisos@marketplace.example",
        to_address="ventas@example.com",
        domain="marketplace.example",
        message_id="<notice.20240311.a1b2c3@marketplace.example>",
        original_subject="Nuevos productos de temporada",
        original_date="Mon, 11 Mar 2024 16:16:02 +0000",
        buyer_alias=BUYER_ALIAS,
        order_id="402-7781",
        rule="opt_out",
        reason_key="opt_out",
        now=NOW,
        hostname="mx.marketplace.example",
    )
    values.update(overrides)
    return build_blocked_notice(**values)


def parse(raw: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(raw, policy=email_policy.default)


def human_text(raw: bytes) -> str:
    """Return the decoded human-readable part with each run of white space as one space."""
    return " ".join(parse(raw).get_payload()[0].get_content().split())


def test_report_structure():
    message = parse(build(rewritten_headers=REWRITTEN_HEADERS))
    parts = message.get_payload()

    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert [part.get_content_type() for part in parts] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]


def test_headers_part_only_when_given():
    parts = parse(build()).get_payload()
    assert [part.get_content_type() for part in parts] == ["text/plain", "message/delivery-status"]


def test_delivery_status_fields():
    status = parse(build()).get_payload()[1]
    per_message, per_recipient = status.get_payload()

    assert per_message["Reporting-MTA"] == "dns; mx.marketplace.example"
    assert per_message["Arrival-Date"] == "Mon, 11 Mar 2024 16:17:05 +0000"
    assert per_recipient["Final-Recipient"] == f"rfc822; {BUYER_ALIAS}"
    assert per_recipient["Action"] == "failed"
    assert per_recipient["Status"] == "5.7.1"
    assert per_recipient["Diagnostic-Code"] == "X-Relaymail; blocked by policy rule opt_out"


def test_reporting_mta_defaults_to_domain():
    status = parse(build(hostname="")).get_payload()[1]
    assert status.get_payload()[0]["Reporting-MTA"] == "dns; marketplace.example"


def test_top_level_headers():
    message = parse(build())

    assert message["From"] == "avisos@marketplace.example"
    assert message["To"] == "ventas@example.com"
    assert message["Subject"] == "Mensaje no entregado: Nuevos productos de temporada"
    assert message["Date"] == "Mon, 11 Mar 2024 16:17:05 +0000"
    assert message["Message-ID"] == "<notice.20240311.a1b2c3@marketplace.example>"
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["MIME-Version"] == "1.0"
    assert len(message.get_all("From")) == 1


def test_message_id_generated_when_empty():
    message_id = parse(build(message_id=""))["Message-ID"]
    assert re.fullmatch(r"<[^<>@\s]+@marketplace\.example>", message_id)


def test_threads_under_seller_message():
    message = parse(build(original_message_id="<abc123@mail.example.com>"))
    assert message["In-Reply-To"] == "<abc123@mail.example.com>"
    assert message["References"] == "<abc123@mail.example.com>"


def test_spanish_text():
    text = human_text(build(order_id="402-7781"))

    assert "Su mensaje para el comprador t969vz2jn3bdsy7@marketplace.example se" in text
    assert "Asunto: Nuevos productos de temporada" in text
    assert "Fecha: Mon, 11 Mar 2024 16:16:02 +0000" in text
    assert "Pedido: 402-7781" in text
    assert "Motivo del bloqueo" in text
    assert "decidió no recibir mensajes no solicitados" in text
    assert "¿Qué puede hacer?" in text
    assert "hilo de mensajes" in text
    assert "[Importante] en" in text
    assert parse(build()).get_payload()[0]["Content-Language"] == "es-MX"


def test_english_text():
    raw = build(seller_locale="en-US")
    text = human_text(raw)

    assert parse(raw)["Subject"] == "Message not delivered: Nuevos productos de temporada"
    assert "Your message to the buyer t969vz2jn3bdsy7@marketplace.example was blocked" in text
    assert "Why it was blocked" in text
    assert "What you can do" in text
    assert "reply in the buyer's original thread" in text
    assert "[Important] in the Subject" in text
    assert parse(raw).get_payload()[0]["Content-Language"] == "en"


def test_order_and_date_optional():
    text = human_text(build(order_id=None, original_date=None, original_subject=""))

    assert "Pedido:" not in text
    assert "Fecha: (sin fecha)" in text
    assert "Asunto: (sin asunto)" in text


@pytest.mark.parametrize(
    "reason_key, expected",
    [
        ("opt_out_tag_not_critical", "confirmaciones de pedido, envío, entrega o reembolso"),
        ("opt_out_tag_no_order", "solo se toma en cuenta cuando el comprador tiene un pedido reciente"),
        ("content_emails", "Elimine la dirección de correo electrónico"),
        ("content_phones", "Elimine el número de teléfono"),
        ("content_links", "Elimine el enlace"),
        ("something_new", "no cumple con las reglas de mensajería"),
    ],
)
def test_reason_texts(reason_key, expected):
    assert expected in human_text(build(reason_key=reason_key))


def test_every_reason_key_renders_in_every_locale():
    for reason_key in REASONS:
        for locale in ("es-MX", "en"):
            assert "5.7.1" in build(reason_key=reason_key, seller_locale=locale).decode("ascii")


def test_wire_format():
    raw = build(
        original_subject="Artesanías Ñandú — " + "muy " * 400 + "largo",
        rewritten_headers=REWRITTEN_HEADERS,
    )

    assert raw.isascii()
    assert re.search(rb"(?<!\r)\n", raw) is None, "bare LF"
    assert re.search(rb"\r(?!\n)", raw) is None, "bare CR"
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    for word in re.findall(rb"=\?[^?]+\?[bBqQ]\?[^?]*\?=", raw):
        assert len(word) <= 75


def test_long_subject_shortened_in_notice_subject():
    subject = parse(build(original_subject="x" * 500))["Subject"]
    assert subject == "Mensaje no entregado: " + "x" * 119 + "\u2026"


def test_line_breaks_in_subject_cannot_add_headers():
    raw = build(original_subject="Hola\r\nBcc: otro@example.org")
    message = parse(raw)

    assert message["Bcc"] is None
    assert message["Subject"] == "Mensaje no entregado: Hola Bcc: otro@example.org"


@pytest.mark.parametrize(
    "field, value",
    [
        ("buyer_alias", "t969vz2jn3bdsy7@marketplace.example\r\nBcc: x@example.org"),
        ("to_address", "ventas@example.com\nBcc: x@example.org"),
        ("notice_from", ""),
        ("message_id", "<a@b>\r\nX: y"),
    ],
)
def test_unsafe_header_values_raise(field, value):
    with pytest.raises(ValueError, match=field):
        build(**{field: value})


def test_non_ascii_rewritten_headers_are_encoded():
    raw = build(rewritten_headers="Subject: Reseña\r\n".encode("utf-8"))
    part = parse(raw).get_payload()[2]

    assert raw.isascii()
    assert part["Content-Transfer-Encoding"] == "quoted-printable"
    assert part.get_content().splitlines() == ["Subject: Reseña"]


def test_no_real_buyer_address():
    raw = build(rewritten_headers=REWRITTEN_HEADERS, reason_key="opt_out_tag_not_critical")
    message = parse(raw)

    assert BUYER_REAL_ADDRESS not in raw.decode("ascii").lower()
    assert "juan.perez%40example.net" not in raw.decode("ascii").lower()
    for part in message.walk():
        if part.get_content_maintype() == "text":
            assert BUYER_REAL_ADDRESS not in part.get_content().lower()
    for name, value in message.items():
        assert BUYER_REAL_ADDRESS not in str(value).lower(), name


@pytest.mark.parametrize(
    "sender, auto_submitted, wants, automatic, expected",
    [
        ("ventas@example.com", None, True, False, True),
        ("ventas@example.com", None, False, False, False),
        ("", None, True, False, False),
        ("<>", None, True, False, False),
        ("ventas@example.com", "auto-replied", True, False, False),
        ("ventas@example.com", "no", True, False, False),
        ("ventas@example.com", None, True, True, False),
    ],
)
def test_should_send_notice(sender, auto_submitted, wants, automatic, expected):
    assert should_send_notice(sender, auto_submitted, wants, automatic=automatic) is expected


@pytest.mark.parametrize("sender", ["", "ventas@example.com"])
def test_no_notice_for_auto_reply(sender):
    """A seller's out-of-office reply never gets a notice, whatever its envelope sender."""
    assert should_send_notice(sender, "auto-replied", True) is False
