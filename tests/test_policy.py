"""Tests of relaymail.policy and the [policy] configuration section."""

from __future__ import annotations

import dataclasses
import io
import struct
import zipfile
import zlib
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from relaymail import config as config_module
from relaymail.config import ContentSection, PolicySection
from relaymail.errors import ConfigError
from relaymail.policy import (
    BUYER_TO_SELLER,
    SELLER_TO_BUYER,
    Attachment,
    PolicyInput,
    apply_redactions,
    daily_limit,
    day_start,
    decide,
    find_contact_details,
    has_critical_tag,
    is_automatic,
    load_patterns,
    next_reset,
    remove_critical_tag,
    sniff_format,
)

MEXICO_CITY = ZoneInfo("America/Mexico_City")
# 12:00 in Mexico City (UTC-6 all year since the end of DST in 2022).
NOW = datetime(2024, 3, 11, 18, 0, tzinfo=timezone.utc)
DEFAULT_CONFIG = PolicySection()
PATTERNS = load_patterns()


# --- real file bytes ----------------------------------------------------------


def make_png() -> bytes:
    """Return a valid 1x1 RGB PNG file."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00\xff\x00\x00")
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def make_pdf() -> bytes:
    """Return a small valid PDF file with one empty page and a correct xref table."""
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] >>",
    ]
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n%s\nendobj\n" % (number, body))
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    for offset in offsets:
        out.write(b"%010d 00000 n \n" % offset)
    out.write(b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref))
    return out.getvalue()


def make_bmp() -> bytes:
    """Return a valid 1x1 24-bit BMP file."""
    pixel_row = b"\x00\x00\xff\x00"  # one BGR pixel padded to 4 bytes
    dib = struct.pack("<IiiHHIIiiII", 40, 1, 1, 1, 24, 0, len(pixel_row), 2835, 2835, 0, 0)
    size = 14 + len(dib) + len(pixel_row)
    return b"BM" + struct.pack("<IHHI", size, 0, 0, 14 + len(dib)) + dib + pixel_row


def make_zip(first_entry: str) -> bytes:
    """Return a ZIP archive whose first entry is `first_entry`."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(first_entry, "<Types/>")
        archive.writestr("docProps/core.xml", "<coreProperties/>")
    return buffer.getvalue()


# The start of a Windows executable: "MZ", then the DOS header with NUL bytes.
EXE = b"MZ\x90\x00\x03\x00\x00\x00\x04\x00\x00\x00\xff\xff\x00\x00" + b"\x00" * 48
OLE2 = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 504
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
PDF = make_pdf()
PNG = make_png()
BMP = make_bmp()


def attachment(filename: str, content_type: str, data: bytes, size: int | None = None) -> Attachment:
    return Attachment(filename, content_type, len(data) if size is None else size, data[:4096])


def make_input(**overrides) -> PolicyInput:
    values = dict(
        direction=SELLER_TO_BUYER,
        subject="Pregunta sobre su pedido",
        text="Buenas tardes, tenemos una pregunta.",
        envelope_sender="ventas@example.com",
        auto_submitted=None,
        precedence=None,
        looks_automatic=False,
        thread_reply=False,
        buyer_opted_out=False,
        has_recent_order=True,
        sent_today=0,
        orders_last_30_days=0,
        automatic_passed_recently=False,
        attachments=(),
        now=NOW,
        marketplace_domain="marketplace.example",
        replaced_addresses=("ventas@example.com",),
    )
    values.update(overrides)
    return PolicyInput(**values)


def with_content(**content) -> PolicySection:
    return dataclasses.replace(DEFAULT_CONFIG, content=ContentSection(**content))


# --- rules and their order ------------------------------------------------------

OVER_LIMIT = {"sent_today": 600}
OPTED_OUT = {"buyer_opted_out": True}
REPEAT_AUTOMATIC = {"auto_submitted": "auto-replied", "automatic_passed_recently": True}
BAD_ATTACHMENT = {"attachments": (attachment("factura.pdf", "application/pdf", EXE),)}
TAGGED = {"subject": "[Importante] Programación de la entrega"}
EMAIL_IN_TEXT = {"text": "Escríbanos a otra.cuenta@example.org"}

RULE_CASES = [
    # (case id, input overrides, config, expected action, expected rule)
    ("nothing applies", {}, DEFAULT_CONFIG, "deliver", "default"),
    ("opted out", OPTED_OUT, DEFAULT_CONFIG, "block", "opt_out"),
    ("opted out, thread reply", {**OPTED_OUT, "thread_reply": True}, DEFAULT_CONFIG, "deliver", "thread_reply"),
    ("opted out, critical", {**OPTED_OUT, **TAGGED}, DEFAULT_CONFIG, "deliver", "critical"),
    ("opted out, tag, no order", {**OPTED_OUT, **TAGGED, "has_recent_order": False}, DEFAULT_CONFIG, "block", "opt_out"),
    ("opted out, tag, not critical", {**OPTED_OUT, "subject": "[Importante] Confirmación de envío"},
     DEFAULT_CONFIG, "block", "opt_out"),
    ("opted out, tag without brackets", {**OPTED_OUT, "subject": "Importante: entrega"}, DEFAULT_CONFIG, "block", "opt_out"),
    ("limit beats thread reply", {**OVER_LIMIT, "thread_reply": True}, DEFAULT_CONFIG, "defer", "daily_limit"),
    ("limit beats opt-out", {**OVER_LIMIT, **OPTED_OUT}, DEFAULT_CONFIG, "defer", "daily_limit"),
    ("limit beats attachments", {**OVER_LIMIT, **BAD_ATTACHMENT}, DEFAULT_CONFIG, "defer", "daily_limit"),
    ("cap beats limit", {**OVER_LIMIT, **REPEAT_AUTOMATIC}, DEFAULT_CONFIG, "suppress", "automatic_cap"),
    ("cap beats thread reply", {**REPEAT_AUTOMATIC, "thread_reply": True}, DEFAULT_CONFIG, "suppress", "automatic_cap"),
    ("cap beats attachments", {**REPEAT_AUTOMATIC, **BAD_ATTACHMENT}, DEFAULT_CONFIG, "suppress", "automatic_cap"),
    ("first automatic thread reply", {"auto_submitted": "auto-replied", "thread_reply": True},
     DEFAULT_CONFIG, "deliver", "thread_reply"),
    ("automatic, opted out", {"envelope_sender": "", **OPTED_OUT}, DEFAULT_CONFIG, "block", "opt_out"),
    ("attachment beats opt-out", {**BAD_ATTACHMENT, **OPTED_OUT}, DEFAULT_CONFIG, "reject", "attachment_type"),
    ("attachment beats thread reply", {**BAD_ATTACHMENT, "thread_reply": True}, DEFAULT_CONFIG, "reject", "attachment_type"),
    ("attachment beats critical", {**BAD_ATTACHMENT, **TAGGED}, DEFAULT_CONFIG, "reject", "attachment_type"),
    ("attachment beats content block", {**BAD_ATTACHMENT, **EMAIL_IN_TEXT}, with_content(emails="block"),
     "reject", "attachment_type"),
    ("content block on thread reply", {**EMAIL_IN_TEXT, "thread_reply": True}, with_content(emails="block"),
     "block", "content.emails"),
    ("content block on critical", {**EMAIL_IN_TEXT, **TAGGED, **OPTED_OUT}, with_content(emails="block"),
     "block", "content.emails"),
    ("opt-out before content block", {**EMAIL_IN_TEXT, **OPTED_OUT}, with_content(emails="block"), "block", "opt_out"),
    ("content redact delivers", EMAIL_IN_TEXT, with_content(emails="redact"), "deliver", "default"),
    ("content flag delivers", EMAIL_IN_TEXT, with_content(emails="flag"), "deliver", "default"),
    ("content off", EMAIL_IN_TEXT, DEFAULT_CONFIG, "deliver", "default"),
    ("phone block", {"text": "Llámenos al +52 951 555 0142"}, with_content(phones="block"), "block", "content.phones"),
    ("link block", {"text": "Vea https://tienda.example.org/oferta"}, with_content(links="block"), "block", "content.links"),
    ("allowlisted link", {"text": "Vea https://tienda.example.org/oferta"},
     with_content(links="block", links_allowlist=["example.org"]), "deliver", "default"),
    ("buyer ignores opt-out and limits", {"direction": BUYER_TO_SELLER, **OPTED_OUT, **OVER_LIMIT, **BAD_ATTACHMENT},
     with_content(emails="block"), "deliver", "default"),
    ("buyer automatic repeat", {"direction": BUYER_TO_SELLER, **REPEAT_AUTOMATIC}, DEFAULT_CONFIG,
     "suppress", "automatic_cap"),
]


@pytest.mark.parametrize(
    "overrides, config, action, rule",
    [case[1:] for case in RULE_CASES],
    ids=[case[0] for case in RULE_CASES],
)
def test_rule_order(overrides, config, action, rule):
    verdict = decide(make_input(**overrides), config, PATTERNS)
    assert verdict.action == action
    assert verdict.rule == rule


def test_verdict_flags_for_critical_delivery():
    verdict = decide(make_input(**OPTED_OUT, **TAGGED), DEFAULT_CONFIG, PATTERNS)
    assert verdict.critical is True
    assert verdict.strip_subject_tag is True
    assert verdict.thread_reply is False
    assert verdict.needs_response is False
    assert verdict.reply is None


def test_blocked_reason_keys():
    plain = decide(make_input(**OPTED_OUT), DEFAULT_CONFIG, PATTERNS)
    no_order = decide(make_input(**OPTED_OUT, **TAGGED, has_recent_order=False), DEFAULT_CONFIG, PATTERNS)
    not_critical = decide(
        make_input(**OPTED_OUT, subject="[Important] Your order has been shipped"), DEFAULT_CONFIG, PATTERNS
    )
    content = decide(make_input(text="Vea www.otra-tienda.example.org"), with_content(links="block"), PATTERNS)

    assert plain.reason_key == "opt_out"
    assert no_order.reason_key == "opt_out_tag_no_order"
    assert "90 days" in no_order.reason
    assert not_critical.reason_key == "opt_out_tag_not_critical"
    assert "confirmation" in not_critical.reason
    assert not_critical.critical is False
    assert content.reason_key == "content_links"


def test_tag_removal_flag():
    tagged_not_critical = decide(make_input(subject="[IMPORTANT] Out of stock"), DEFAULT_CONFIG, PATTERNS)
    untagged = decide(make_input(), DEFAULT_CONFIG, PATTERNS)

    assert tagged_not_critical.action == "deliver"
    assert tagged_not_critical.critical is False
    assert tagged_not_critical.strip_subject_tag is True
    assert untagged.strip_subject_tag is False


def test_reasons_hold_no_addresses():
    inputs = [
        make_input(**OPTED_OUT),
        make_input(**EMAIL_IN_TEXT),
        make_input(**BAD_ATTACHMENT),
        make_input(**OVER_LIMIT),
    ]
    for inp in inputs:
        verdict = decide(inp, with_content(emails="block"), PATTERNS)
        assert "@" not in verdict.reason


def test_unknown_direction_raises():
    with pytest.raises(ValueError, match="direction"):
        decide(make_input(direction="sideways"), DEFAULT_CONFIG, PATTERNS)


def test_naive_now_raises():
    with pytest.raises(ValueError, match="naive"):
        decide(make_input(now=datetime(2024, 3, 11, 12, 0)), DEFAULT_CONFIG, PATTERNS)


def test_decide_loads_default_patterns():
    verdict = decide(make_input(**OPTED_OUT, subject="[Importante] Deje su reseña"), DEFAULT_CONFIG)
    assert verdict.reason_key == "opt_out_tag_not_critical"


# --- automatic messages ---------------------------------------------------------

AUTOMATIC_CASES = [
    # (envelope sender, Auto-Submitted, Precedence, looks automatic, expected)
    ("", None, None, False, True),
    ("<>", None, None, False, True),
    ("ventas@example.com", None, None, False, False),
    ("ventas@example.com", "no", None, False, False),
    ("ventas@example.com", " No ", None, False, False),
    ("ventas@example.com", "auto-replied", None, False, True),
    ("ventas@example.com", "auto-generated; owner-email=\"x@example.com\"", None, False, True),
    ("ventas@example.com", None, "Bulk", False, True),
    ("ventas@example.com", None, "list", False, True),
    ("ventas@example.com", None, "junk", False, True),
    ("ventas@example.com", None, "first-class", False, False),
    ("ventas@example.com", None, None, True, True),
]


@pytest.mark.parametrize("sender, auto_submitted, precedence, looks_automatic, expected", AUTOMATIC_CASES)
def test_is_automatic(sender, auto_submitted, precedence, looks_automatic, expected):
    assert is_automatic(sender, auto_submitted, precedence, looks_automatic) is expected


def test_buyer_message_needs_response_unless_automatic():
    question = decide(make_input(direction=BUYER_TO_SELLER), DEFAULT_CONFIG, PATTERNS)
    out_of_office = decide(make_input(direction=BUYER_TO_SELLER, looks_automatic=True), DEFAULT_CONFIG, PATTERNS)

    assert question.needs_response is True
    assert question.automatic is False
    assert out_of_office.needs_response is False
    assert out_of_office.automatic is True


@pytest.mark.parametrize("sender", ["", "ventas@example.com"])
def test_seller_auto_reply_loop(sender):
    """An out-of-office answer to a buyer's question: the first passes, the next is suppressed."""
    first = make_input(
        envelope_sender=sender,
        auto_submitted="auto-replied",
        subject="Respuesta automática: Pregunta sobre el pedido 402-7781",
        text="Para urgencias escriba a ventas@example.com o llame al +52 951 555 0142.",
        thread_reply=True,
    )
    again = dataclasses.replace(first, automatic_passed_recently=True)

    first_verdict = decide(first, DEFAULT_CONFIG, PATTERNS)
    again_verdict = decide(again, DEFAULT_CONFIG, PATTERNS)

    assert first_verdict.action == "deliver"
    assert first_verdict.rule == "thread_reply"
    assert first_verdict.automatic is True
    assert again_verdict.action == "suppress"
    assert again_verdict.rule == "automatic_cap"
    assert again_verdict.reply is None


# --- daily limit ------------------------------------------------------------------

@pytest.mark.parametrize(
    "orders, window, expected",
    [
        (0, 30, 600),
        (5, 30, 600),  # 25 // 30 = 0
        (6, 30, 601),  # 30 // 30 = 1
        (7, 30, 601),  # 35 // 30 = 1, rounded down
        (30, 30, 605),
        (3000, 30, 1100),
        (10, 7, 607),  # 50 // 7 = 7
    ],
)
def test_daily_limit_formula(orders, window, expected):
    assert daily_limit(orders, window) == expected


def test_daily_limit_invalid_values():
    with pytest.raises(ValueError, match="window_days"):
        daily_limit(10, 0)
    with pytest.raises(ValueError, match="orders_last_30_days"):
        daily_limit(-1, 30)


def test_600th_passes_601st_deferred():
    last_allowed = decide(make_input(sent_today=599), DEFAULT_CONFIG, PATTERNS)
    over = decide(make_input(sent_today=600), DEFAULT_CONFIG, PATTERNS)

    assert last_allowed.action == "deliver"
    assert over.action == "defer"
    assert over.reply == (
        "450 4.7.1 Daily limit of 600 messages reached; "
        "it resets at 2024-03-12 00:00 America/Mexico_City (06:00 UTC)"
    )


def test_limit_grows_with_orders():
    verdict = decide(make_input(sent_today=600, orders_last_30_days=60), DEFAULT_CONFIG, PATTERNS)
    assert verdict.action == "deliver"

    verdict = decide(make_input(sent_today=610, orders_last_30_days=60), DEFAULT_CONFIG, PATTERNS)
    assert verdict.action == "defer"
    assert "Daily limit of 610 messages" in verdict.reply


def test_limit_reply_in_other_timezone():
    tokyo = dataclasses.replace(DEFAULT_CONFIG, timezone="Asia/Tokyo")
    verdict = decide(make_input(sent_today=600), tokyo, PATTERNS)
    # 18:00 UTC on 11 March is 03:00 on 12 March in Tokyo.
    assert verdict.reply.endswith("resets at 2024-03-13 00:00 Asia/Tokyo (15:00 UTC)")


# --- day boundaries ---------------------------------------------------------------

def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=timezone.utc)


def test_mexico_city_day_boundary():
    before_midnight = utc(2024, 3, 12, 5, 59, 59)
    at_midnight = utc(2024, 3, 12, 6, 0, 0)

    assert day_start(before_midnight, "America/Mexico_City") == utc(2024, 3, 11, 6, 0)
    assert day_start(at_midnight, "America/Mexico_City") == utc(2024, 3, 12, 6, 0)
    assert next_reset(before_midnight, "America/Mexico_City") == utc(2024, 3, 12, 6, 0)
    assert next_reset(at_midnight, "America/Mexico_City") == utc(2024, 3, 13, 6, 0)


def test_mexico_city_has_no_dst_since_2022():
    summer_2024 = day_start(utc(2024, 7, 1, 12), "America/Mexico_City")
    summer_2021 = day_start(utc(2021, 7, 1, 12), "America/Mexico_City")

    assert summer_2024 == utc(2024, 7, 1, 6)
    assert summer_2021 == utc(2021, 7, 1, 5)  # daylight saving time still applied then


def test_day_start_is_utc_local_midnight():
    start = day_start(NOW, MEXICO_CITY)
    local = start.astimezone(MEXICO_CITY)

    assert start.utcoffset() == timedelta(0)
    assert (local.year, local.month, local.day, local.hour, local.minute) == (2024, 3, 11, 0, 0)


def test_new_york_dst_day_has_23_hours():
    during_change = utc(2024, 3, 10, 12)
    start = day_start(during_change, "America/New_York")
    reset = next_reset(during_change, "America/New_York")

    assert start == utc(2024, 3, 10, 5)  # 00:00 EST
    assert reset == utc(2024, 3, 11, 4)  # 00:00 EDT
    assert reset - start == timedelta(hours=23)


def test_skipped_midnight_starts_at_first_valid_time():
    # Cuba moves its clocks from 00:00 to 01:00 on the second Sunday of March.
    start = day_start(utc(2024, 3, 10, 12), "America/Havana")
    assert start == utc(2024, 3, 10, 5)
    assert start.astimezone(ZoneInfo("America/Havana")).hour == 1


# --- critical tag and not-critical patterns ----------------------------------------

@pytest.mark.parametrize(
    "subject, expected",
    [
        ("[Importante] Entrega", True),
        ("[IMPORTANTE] Entrega", True),
        ("Re: [important] delivery", True),
        ("Pedido 402-7781 [Important]", True),
        ("Importante: entrega", False),
        ("(Importante) entrega", False),
        ("[Importantes] entrega", False),
        ("[ Importante ] entrega", False),
    ],
)
def test_critical_tag(subject, expected):
    assert has_critical_tag(subject) is expected


@pytest.mark.parametrize(
    "subject, expected",
    [
        ("[Importante] Programación de la entrega", "Programación de la entrega"),
        ("Re: [IMPORTANT] Delivery", "Re: Delivery"),
        ("Pedido 402-7781 [Importante]: dirección", "Pedido 402-7781 dirección"),
        ("Sin etiqueta", "Sin etiqueta"),
    ],
)
def test_remove_critical_tag(subject, expected):
    assert remove_critical_tag(subject) == expected


NOT_CRITICAL_CASES = [
    # (subject, text, category)
    ("[Importante] ¿Nos deja una reseña?", "", "review_request"),
    ("[IMPORTANTE] RESEÑA DE SU COMPRA", "", "review_request"),
    ("[importante] Su opinión", "Por favor califique su compra en la tienda.", "review_request"),
    ("[Important] Quick question", "Please leave us a review when you can.", "review_request"),
    ("[Importante] Confirmación de envío", "", "confirmation"),
    ("[Importante] CONFIRMACION DE ENVIO", "", "confirmation"),
    ("[Importante] Buenas noticias", "Su pedido ya fue enviado.", "confirmation"),
    ("[Important] Your order has been shipped", "", "confirmation"),
    ("[Important] Update", "We\u2019ve shipped your order.", "confirmation"),
    ("[Importante] Manual de usuario", "", "proactive_support"),
    ("[Importante] Consejos de uso para su nueva cafetera", "", "proactive_support"),
    ("[Important] FAQ for your new blender", "", "proactive_support"),
    ("[Importante] Retraso en su envío", "", "delay_or_stock"),
    ("[Importante] Producto agotado", "", "delay_or_stock"),
    ("[Important] Item out of stock", "", "delay_or_stock"),
    ("[Importante] Código de descuento", "", "other_offers"),
    ("[Importante] Novedades", "También le podría interesar esta lámpara.", "other_offers"),
    ("[Important] News", "You might also like our new collection.", "other_offers"),
]


@pytest.mark.parametrize("subject, text, category", NOT_CRITICAL_CASES)
def test_not_critical_patterns(subject, text, category):
    assert PATTERNS.match(subject, text).name == category

    verdict = decide(make_input(**OPTED_OUT, subject=subject, text=text), DEFAULT_CONFIG, PATTERNS)
    assert verdict.action == "block"
    assert verdict.reason_key == "opt_out_tag_not_critical"


CRITICAL_CASES = [
    ("[Importante] Personalización de su taza", "¿Qué nombre desea que grabemos en la taza?"),
    ("[Importante] Programación de la entrega", "¿Qué día le conviene recibir su pedido?"),
    ("[Importante] Problema con la dirección de envío", "A la dirección le falta el número exterior."),
    ("[Importante] Problema con su pedido", "El color que eligió ya no se fabrica en esa talla; ¿acepta otro?"),
    ("[Important] Delivery scheduling", "When can we deliver your order?"),
    ("[Important] Problem with your shipping address", "The postal code does not match the city."),
]


@pytest.mark.parametrize("subject, text", CRITICAL_CASES)
def test_critical_messages_pass_opt_out(subject, text):
    assert PATTERNS.match(subject, text) is None

    verdict = decide(make_input(**OPTED_OUT, subject=subject, text=text), DEFAULT_CONFIG, PATTERNS)
    assert verdict.action == "deliver"
    assert verdict.rule == "critical"
    assert verdict.critical is True


def test_extra_patterns_file(tmp_path):
    extra = tmp_path / "patterns.toml"
    extra.write_text(
        "[[category]]\n"
        "name = \"raffle\"\n"
        "description = \"a raffle invitation\"\n"
        "patterns = ['\\bsorteo\\b']\n"
        "\n"
        "[[category]]\n"
        "name = \"review_request\"\n"
        "patterns = ['\\bdenos cinco estrellas\\b']\n",
        encoding="utf-8",
    )
    patterns = load_patterns(extra)

    assert patterns.match("[Importante] Participe en nuestro SORTEO", "").name == "raffle"
    assert patterns.match("[Importante] Denos cinco estrellas", "").name == "review_request"
    assert patterns.match("[Importante] Reseña", "").name == "review_request"


def test_extra_patterns_invalid_regex(tmp_path):
    extra = tmp_path / "patterns.toml"
    extra.write_text("[[category]]\nname = \"broken\"\npatterns = ['(sin cerrar']\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="broken.*invalid pattern"):
        load_patterns(extra)


def test_extra_patterns_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read patterns file"):
        load_patterns(tmp_path / "missing.toml")


# --- content rules ------------------------------------------------------------------

CONTENT_ALL = ContentSection(emails="flag", phones="flag", links="flag")


def found(text: str, content: ContentSection = CONTENT_ALL, **options) -> list[tuple[str, str]]:
    return [(finding.kind, finding.text) for finding in find_contact_details(text, content, **options)]


def test_email_findings():
    options = {"marketplace_domain": "marketplace.example", "replaced_addresses": ("ventas@example.com",)}
    text = "Escriba a Otra.Cuenta@example.org, no a ventas@example.com ni a t969vz2jn3bdsy7@marketplace.example."

    assert found(text, **options) == [("emails", "Otra.Cuenta@example.org")]
    assert found("VENTAS@EXAMPLE.COM", **options) == []


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Llame al +52 951 555 0142.", ["+52 951 555 0142"]),
        ("Tel. (951) 555-0142", ["(951) 555-0142"]),
        ("WhatsApp 9515550142", ["9515550142"]),
        ("Call +1 212 555 0100", ["+1 212 555 0100"]),
        ("Pedido 402-7781", []),
        ("Fecha 2024-03-11", []),
        ("Pedido 402-1234567-1234567", []),
        ("Precio 1.234.567", []),
    ],
)
def test_phone_findings(text, expected):
    assert [value for kind, value in found(text) if kind == "phones"] == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Vea https://tienda.example.org/oferta.", ["https://tienda.example.org/oferta"]),
        ("Vea www.tienda.example.org", ["www.tienda.example.org"]),
        ('<a href="http://otra.example.net/x">aquí</a>', ["http://otra.example.net/x"]),
        ("Vea https://shop.example.com/a", []),
        ("Vea https://example.com/a", []),
        ("Vea https://example.com.evil.example.org/", ["https://example.com.evil.example.org/"]),
        ("Vea https://example.com@evil.example.org/", ["https://example.com@evil.example.org/"]),
        ("Vea https://marketplace.example/orden/1", []),
    ],
)
def test_link_findings(text, expected):
    content = ContentSection(links="flag", links_allowlist=["example.com"])
    links = [value for kind, value in found(text, content, marketplace_domain="marketplace.example") if kind == "links"]
    assert links == expected


def test_redactions_apply_placeholders():
    content = ContentSection(emails="redact", phones="redact", links="flag")
    text = "Correo otra@example.org, teléfono +52 951 555 0142, sitio https://example.org"
    findings = find_contact_details(text, content)
    placeholders = {"emails": "[correo]", "phones": "[teléfono]", "links": "[enlace]"}

    redacted = apply_redactions(text, findings, placeholders)

    assert redacted == "Correo [correo], teléfono [teléfono], sitio https://example.org"


def test_overlapping_redactions_keep_first():
    content = ContentSection(emails="redact", links="redact")
    text = "https://x.example.org/?to=a@b.example.org fin"
    findings = find_contact_details(text, content)
    redacted = apply_redactions(text, findings, {"emails": "[E]", "links": "[L]"})

    assert redacted == "[L] fin"


def test_verdict_carries_redactions_and_findings():
    config = with_content(emails="redact", links="flag")
    inp = make_input(subject="Contacto otra@example.org", text="Vea https://example.org")

    verdict = decide(inp, config, PATTERNS)

    assert verdict.action == "deliver"
    assert [(f.kind, f.location) for f in verdict.redactions] == [("emails", "subject")]
    assert [(f.kind, f.location) for f in verdict.findings] == [("emails", "subject"), ("links", "text")]


# --- attachments ----------------------------------------------------------------------

@pytest.mark.parametrize(
    "data, expected",
    [
        (PDF, "pdf"),
        (PNG, "png"),
        (JPEG, "jpeg"),
        (b"GIF89a\x01\x00\x01\x00", "gif"),
        (b"II*\x00\x08\x00\x00\x00", "tiff"),
        (BMP, "bmp"),
        (OLE2, "ole2"),
        (make_zip("[Content_Types].xml"), "zip"),
        (EXE, "executable"),
        (b"\x7fELF\x02\x01\x01", "executable"),
        ("Talla,Pecho\r\nCH,90\n".encode("utf-8-sig"), "text"),
        ("línea en latin-1\r\n".encode("latin-1"), "text"),
        ("texto UTF-16".encode("utf-16"), "text"),
        (b"\x00\x01\x02\x03binario", None),
    ],
)
def test_sniff_format(data, expected):
    assert sniff_format(data, complete=True) == expected


def check(*attachments: Attachment, config: PolicySection = DEFAULT_CONFIG):
    return decide(make_input(attachments=attachments), config, PATTERNS)


@pytest.mark.parametrize(
    "item",
    [
        attachment("Factura.PDF", "application/pdf", PDF),
        attachment("foto.png", "image/png", PNG),
        attachment("foto.jpeg", "image/jpeg", JPEG),
        attachment("plano.bmp", "image/bmp", BMP),
        attachment("escaneo.tif", "image/tiff", b"MM\x00*\x00\x00\x00\x08"),
        attachment("animacion.gif", "image/gif", b"GIF87a\x01\x00\x01\x00"),
        attachment("notas.txt", "text/plain", b"Notas del pedido\r\n"),
        attachment("pedido.doc", "application/msword", OLE2),
        attachment("cotizacion.xls", "application/vnd.ms-excel", OLE2),
        attachment("contrato.docx", "application/octet-stream", make_zip("[Content_Types].xml")),
        attachment("tallas.xlsx", "application/octet-stream", make_zip("xl/workbook.xml")),
        attachment("", "image/png", PNG),  # an inline image without a filename
    ],
    ids=lambda item: item.filename or item.content_type,
)
def test_allowed_attachments_pass(item):
    assert check(item).action == "deliver"


@pytest.mark.parametrize(
    "item",
    [
        attachment("factura.pdf", "application/pdf", EXE),
        attachment("factura.pdf.exe", "application/octet-stream", EXE),
        attachment("factura.exe.", "application/pdf", EXE),
        attachment("foto.jpg", "image/jpeg", PNG),
        attachment("notas.txt", "text/plain", EXE),
        attachment("contrato.docx", "application/octet-stream", make_zip("payload.exe")),
        attachment("tallas.xlsx", "application/octet-stream", make_zip("word/document.xml")),
        attachment("paquete.zip", "application/zip", make_zip("a.txt")),
        attachment("", "application/octet-stream", PDF),
        attachment("reenvio.txt", "message/rfc822", b"From: a@example.org\r\nSubject: x\r\n\r\nhola\r\n"),
    ],
    ids=lambda item: item.filename or item.content_type,
)
def test_disallowed_attachments_rejected(item):
    verdict = check(item)
    assert verdict.action == "reject"
    assert verdict.rule == "attachment_type"
    assert verdict.reply.startswith("554 5.7.1 ")


def test_type_reply_names_attachment_and_types():
    verdict = check(attachment("factura.pdf", "application/pdf", EXE))
    assert verdict.reply == (
        '554 5.7.1 Attachment "factura.pdf" is not an allowed type. Allowed types: PDF, JPEG, PNG, '
        "GIF, TIFF, BMP, plain text (.txt), CSV, Word (.doc, .docx), Excel (.xls, .xlsx)"
    )
    assert "factura" not in verdict.reason


def test_unnamed_attachment_reply():
    verdict = check(attachment("", "application/octet-stream", PDF))
    assert 'Attachment of type application/octet-stream (no filename)' in verdict.reply


def test_reply_name_is_one_ascii_line():
    verdict = check(attachment('Guía "final"\r\n.exe', "application/octet-stream", EXE))
    reply = verdict.reply
    assert reply.isascii()
    assert "\r" not in reply
    assert "\n" not in reply
    assert "Guia 'final'??.exe" in reply
    assert len(reply) < 512


def test_size_limit():
    at_limit = check(attachment("grande.pdf", "application/pdf", PDF, size=10_000_000))
    over = check(
        attachment("grande.pdf", "application/pdf", PDF, size=9_000_000),
        attachment("foto.png", "image/png", PNG, size=1_000_001),
    )

    assert at_limit.action == "deliver"
    assert over.action == "reject"
    assert over.rule == "attachment_size"
    assert over.reply == (
        "552 5.3.4 Attachments total 10,000,001 bytes, over the limit of 10,000,000 bytes per message; "
        'the largest is "grande.pdf" (9,000,000 bytes)'
    )


def test_type_checked_before_size():
    verdict = check(attachment("programa.exe", "application/octet-stream", EXE, size=20_000_000))
    assert verdict.rule == "attachment_type"


def test_allowed_types_configurable():
    only_pdf = dataclasses.replace(DEFAULT_CONFIG, allowed_attachment_types=["pdf"])
    verdict = check(attachment("foto.png", "image/png", PNG), config=only_pdf)

    assert verdict.action == "reject"
    assert verdict.reply.endswith("Allowed types: PDF")


# The seller-to-buyer variant of the encoded-filenames case: a PDF invoice, a
# CSV size chart and a forwarded carrier notice (message/rfc822).
INVOICE = attachment("Factura Ñandú A-0042.pdf", "application/pdf", PDF[:1802], size=1802)
SIZE_CHART = attachment(
    "Guía de tallas Otoño-Invierno 2024.csv",
    "text/csv",
    '\ufeffTalla,Pecho (cm),"Cintura, cm"\r\nCH,86-90,70\nM,94-98,78 \r\n'.encode("utf-8"),
    size=123,
)
CARRIER_NOTICE = attachment(
    "aviso-paqueteria.eml",
    "message/rfc822",
    b"From: avisos@paqueteria.example.org\r\nSubject: Aviso de entrega\r\n\r\n.Esta linea\r\n",
)


def test_forwarded_eml_rejected_for_buyer():
    verdict = check(INVOICE, SIZE_CHART, CARRIER_NOTICE)
    assert verdict.action == "reject"
    assert verdict.rule == "attachment_type"
    assert verdict.reply.startswith('554 5.7.1 Attachment "aviso-paqueteria.eml" is not an allowed type.')
    assert "PDF" in verdict.reply and "CSV" in verdict.reply


def test_invoice_and_size_chart_pass():
    assert check(INVOICE).action == "deliver"
    assert check(INVOICE, SIZE_CHART).action == "deliver"


def test_buyer_attachments_not_checked():
    inp = make_input(direction=BUYER_TO_SELLER, attachments=(INVOICE, SIZE_CHART, CARRIER_NOTICE))
    assert decide(inp, DEFAULT_CONFIG, PATTERNS).action == "deliver"


# --- [policy] configuration ----------------------------------------------------------

BASE_CONFIG = {
    "relay": {
        "domain": "marketplace.example",
        "hostname": "mx.marketplace.example",
        "bounce_secret": "0123456789abcdef0123456789abcdef",
    },
}


def load_config(policy: dict, base_dir: Path):
    return config_module.from_dict({**BASE_CONFIG, "policy": policy}, base_dir=base_dir)


def test_policy_defaults(tmp_path):
    policy = config_module.from_dict(BASE_CONFIG, base_dir=tmp_path).policy
    assert policy.timezone == "America/Mexico_City"
    assert policy.order_window_days == 30
    assert policy.critical_order_days == 90
    assert policy.automatic_window_s == 86400
    assert policy.max_attachment_bytes == 10_000_000
    assert policy.content == ContentSection()


def test_policy_content_table(tmp_path):
    extra = tmp_path / "patterns.toml"
    extra.write_text("[[category]]\nname = \"raffle\"\npatterns = ['sorteo']\n", encoding="utf-8")

    policy = load_config(
        {
            "timezone": "Europe/Madrid",
            "extra_patterns_path": "patterns.toml",
            "content": {"emails": "redact", "links": "block", "links_allowlist": ["example.com"]},
        },
        base_dir=tmp_path,
    ).policy

    assert policy.timezone == "Europe/Madrid"
    assert policy.extra_patterns_path == str(extra)
    assert policy.content.emails == "redact"
    assert policy.content.phones == "off"
    assert policy.content.links_allowlist == ["example.com"]


@pytest.mark.parametrize(
    "policy, message",
    [
        ({"timezone": "Mars/Olympus"}, "policy.timezone = 'Mars/Olympus': expected an IANA time zone"),
        ({"order_window_days": 0}, "policy.order_window_days = 0: expected at least 1"),
        ({"max_attachment_bytes": "10 MB"}, "policy.max_attachment_bytes = '10 MB': expected a whole number"),
        ({"allowed_attachment_types": ["pdf", "exe"]}, "policy.allowed_attachment_types: 'exe' is not a known type"),
        ({"colour": "red"}, "policy.colour: unknown key"),
        ({"content": {"emails": "hide"}}, "policy.content.emails = 'hide': expected one of off, flag, redact, block"),
        ({"content": {"faxes": "block"}}, "policy.content.faxes: unknown key"),
        ({"content": "block"}, "policy.content: expected a table"),
        ({"content": {"links_allowlist": ["https://example.com"]}}, "is not a domain name"),
        ({"extra_patterns_path": "missing.toml"}, "policy.extra_patterns_path = .*cannot read patterns file"),
    ],
)
def test_policy_config_errors(policy, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        load_config(policy, base_dir=tmp_path)
