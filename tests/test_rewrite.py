"""Tests of relaymail.rewrite: identity, header allowlist, text parts, transport rules, case inputs."""

from __future__ import annotations

import base64
import hashlib
import html
import quopri
import re
from email.header import decode_header, make_header
from email.utils import getaddresses

import pytest
from helpers_mail import (
    BUYER_ADDRESS,
    BUYER_ALIAS,
    COLLEAGUE_ADDRESS,
    SELLER_ADDRESS,
    SELLER_ALIAS,
    case_input,
    corpus_folders,
    corpus_messages,
    header_block,
    header_lines,
    header_problems,
    parse_default,
    strict_qp_errors,
    text_parts,
    transport_problems,
)

from relaymail import mime
from relaymail.headers import parse_headers
from relaymail.rewrite import RewriteError, RewriteSpec, format_from, format_unstructured, rewrite

BUSINESS = "Artesanías Ñandú S.A. de C.V."
LONG_BUSINESS = "Artesanías y Textiles Ñandú de Oaxaca, S.A. de C.V."
SELLER_BANNER = "Mensaje de Artesanías Ñandú S.A. de C.V. por Marketplace"
BUYER_BANNER = "Pedidos de este comprador: 402-7781"
RELAY_ID = "mkt.20240313.d5e3a2@marketplace.example"


def seller_spec(**overrides) -> RewriteSpec:
    """Return a seller-to-buyer spec: From shows the business name at the seller alias."""
    values = dict(
        from_name=BUSINESS,
        from_address=SELLER_ALIAS,
        to_address=BUYER_ADDRESS,
        message_id=RELAY_ID,
        in_reply_to=[],
        references=[],
        banner=SELLER_BANNER,
        sender_addresses=[SELLER_ADDRESS],
    )
    values.update(overrides)
    return RewriteSpec(**values)


def buyer_spec(**overrides) -> RewriteSpec:
    """Return a buyer-to-seller spec: From shows the buyer's name at the buyer alias."""
    values = dict(
        from_name="Juan Pérez",
        from_address=BUYER_ALIAS,
        to_address=SELLER_ADDRESS,
        message_id=RELAY_ID,
        in_reply_to=["mkt.20240311.c4d2f1@marketplace.example"],
        references=["mkt.20240311.c4d2f1@marketplace.example"],
        banner=BUYER_BANNER,
        sender_addresses=[BUYER_ADDRESS],
    )
    values.update(overrides)
    return RewriteSpec(**values)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def simple_message(body: bytes, content_type: str = "text/plain; charset=utf-8", encoding: str = "8bit", extra: str = "") -> bytes:
    head = (
        f"From: Ventas <{SELLER_ADDRESS}>\r\nTo: {BUYER_ALIAS}\r\nSubject: hola\r\n"
        f"Date: Mon, 11 Mar 2024 10:00:00 -0600\r\nMessage-ID: <a1@mail.example.com>\r\nMIME-Version: 1.0\r\n"
        f"Content-Type: {content_type}\r\nContent-Transfer-Encoding: {encoding}\r\n{extra}\r\n"
    )
    return head.encode("ascii") + body


def decoded_parts(data: bytes) -> list[tuple[str, bytes]]:
    """Return (content type, decoded bytes) for each text part, read with policy.default."""
    return [(part.get_content_type(), part.get_payload(decode=True)) for part in text_parts(parse_default(data))]


def input_part(raw: bytes, content_type: str) -> bytes:
    """Return the decoded bytes of the first input part of `content_type`."""
    for part in mime.parse(raw).walk():
        if part.content_type == content_type and not part.children:
            return part.decoded_payload()
    raise AssertionError(f"no {content_type} part in the input")


def html_snippet(banner: str) -> bytes:
    escaped = html.escape(banner, quote=False)
    return ("<div>" + "".join(c if ord(c) < 128 else f"&#{ord(c)};" for c in escaped) + "</div>").encode("ascii")


def leaks(data: bytes, forbidden: list[str]) -> list[str]:
    """Return where any forbidden address shows: raw bytes, %40 form, decoded headers, decoded text parts."""
    found = []
    lowered = data.lower()
    message = parse_default(data)
    headers = " ".join(str(value) for _name, value in message.items()).lower()
    texts = [
        payload.decode(part.get_content_charset() or "utf-8", "replace").lower()
        for part in text_parts(message)
        if (payload := part.get_payload(decode=True)) is not None
    ]
    for address in forbidden:
        address = address.lower()
        if address.encode() in lowered:
            found.append(f"{address} in raw bytes")
        if address.replace("@", "%40").encode() in lowered:
            found.append(f"{address} in %40 form")
        if address in headers:
            found.append(f"{address} in decoded headers")
        if any(address in text for text in texts):
            found.append(f"{address} in decoded text")
    return found


# --- From ------------------------------------------------------------------------


# Names that plain atoms can keep apart, so that both parsers decode them exactly.
FROM_NAMES = [
    "Comprador",
    "Juan Pérez",
    BUSINESS,
    LONG_BUSINESS,
    'Acme "Best", Inc.',
    "ventas@example.com",
    "Ventas <ventas@example.com>",
    "=?utf-8?q?Evil?= <evil@example.org>",
    "O'Brien-Smith",
    "Tienda " * 30,
    "Tienda Ñandú " * 12,
    "(comentario) ; : \\ [x]",
    "",
]


@pytest.mark.parametrize("name", FROM_NAMES)
def test_from_name_both_parsers(name):
    field = format_from(name, SELLER_ALIAS)
    value = field[len(b"From:") :].decode("ascii").replace("\r\n", "")
    compat_pairs = getaddresses([value])
    default_from = parse_default(field + b"\r\n")["From"]

    assert field.isascii()
    assert max(map(len, field.split(b"\r\n"))) <= 78
    assert all(len(word) <= 75 for word in re.findall(r"=\?[^?]+\?[qb]\?[^?]*\?=", value))
    assert len(compat_pairs) == 1
    assert compat_pairs[0][1] == SELLER_ALIAS
    assert str(make_header(decode_header(compat_pairs[0][0]))) == name
    assert len(default_from.addresses) == 1
    assert default_from.addresses[0].addr_spec == SELLER_ALIAS
    assert default_from.addresses[0].display_name == name


def test_from_long_name_without_plain_words():
    """One encoded-word cannot hold this name, and no plain word can separate the pieces.

    RFC 2047 readers (here compat32's decode_header) decode it exactly. Python 3.11.7's
    policy.default shows a space between adjacent encoded-words of a display name, so
    only the spaces differ there.
    """
    name = "中文商店名称有限公司" * 6
    field = format_from(name, SELLER_ALIAS)
    pairs = getaddresses([field[len(b"From:") :].decode("ascii").replace("\r\n", "")])
    default_from = parse_default(field + b"\r\n")["From"]

    assert len(pairs) == 1
    assert str(make_header(decode_header(pairs[0][0]))) == name
    assert len(default_from.addresses) == 1
    assert default_from.addresses[0].display_name.replace(" ", "") == name


def test_from_name_with_double_spaces():
    """RFC 2047 readers keep every space; Python 3.11.7's policy.default collapses runs of them."""
    name = "  espacios  dobles "
    field = format_from(name, SELLER_ALIAS)
    pairs = getaddresses([field[len(b"From:") :].decode("ascii").replace("\r\n", "")])

    assert len(pairs) == 1
    assert str(make_header(decode_header(pairs[0][0]))) == name
    assert parse_default(field + b"\r\n")["From"].addresses[0].display_name == " espacios dobles "


@pytest.mark.parametrize("name", ["a\rb", "a\nb", "a\x00b", "a\u2028b", "a\x85b", "a\tb"])
def test_from_name_control_rejected(name):
    with pytest.raises(ValueError, match="control character"):
        rewrite(simple_message(b"hola\r\n"), seller_spec(from_name=name))


@pytest.mark.parametrize(
    "overrides",
    [
        {"from_address": "no es una direccion"},
        {"from_address": "alias@localhost"},
        {"to_address": "juan perez@example.net"},
        {"to_address": "juañ@example.net"},
        {"message_id": "<a@b>"},
        {"message_id": "a b@marketplace.example"},
        {"references": ["ok@x.example", "bad id@x.example"]},
        {"in_reply_to": [""]},
        {"banner": "dos\r\nlineas"},
        {"received": "from x\r\nX-Evil: 1"},
        {"received": "from ñ"},
    ],
)
def test_invalid_spec_values_rejected(overrides):
    with pytest.raises(ValueError):
        rewrite(simple_message(b"hola\r\n"), seller_spec(**overrides))


# --- case 01: business name with a comma ------------------------------------------------


def test_case01_from_one_mailbox():
    out = rewrite(case_input("01-from-name-comma-refold"), seller_spec(from_name=LONG_BUSINESS))
    from_values = header_lines(out, "From")
    pairs = getaddresses([from_values[0].decode("ascii")])
    parsed = parse_default(out)["From"]

    assert len(from_values) == 1
    assert len(pairs) == 1
    assert pairs[0][1] == SELLER_ALIAS
    assert str(make_header(decode_header(pairs[0][0]))) == LONG_BUSINESS
    assert len(parsed.addresses) == 1
    assert parsed.addresses[0].display_name == LONG_BUSINESS
    assert parsed.addresses[0].addr_spec == SELLER_ALIAS


def test_case01_no_bare_comma_in_from():
    out = rewrite(case_input("01-from-name-comma-refold"), seller_spec(from_name=LONG_BUSINESS))
    before_address = header_lines(out, "From")[0].split(b"<", 1)[0]

    assert b"," not in before_address
    assert b"Ventas" not in before_address


def test_case01_body_banner_and_flowed():
    raw = case_input("01-from-name-comma-refold")
    original = input_part(raw, "text/plain")

    out = rewrite(raw, seller_spec(from_name=LONG_BUSINESS))
    message = parse_default(out)
    decoded = message.get_payload(decode=True)

    assert message.get_param("format") == "flowed"
    assert decoded == SELLER_BANNER.encode("utf-8") + b"\r\n" + original
    assert not decoded.split(b"\r\n", 1)[0].endswith(b" ")


def test_case01_no_seller_address():
    out = rewrite(case_input("01-from-name-comma-refold"), seller_spec(from_name=LONG_BUSINESS))

    assert leaks(out, [SELLER_ADDRESS]) == []
    assert transport_problems(out) == []


# --- case 03: broken From ----------------------------------------------------------------


def test_case03_rewrite_rebuilds_headers():
    raw = case_input("03-malformed-from-unterminated-quote")

    out = rewrite(raw, seller_spec())
    message = parse_default(out)

    assert parse_headers(raw).from_address is None
    assert leaks(out, [SELLER_ADDRESS]) == []
    assert header_lines(out, "Cc") == []
    assert str(message["Subject"]) == "Factura electrónica del pedido 402-7781"
    assert header_block(out).isascii()


# --- case 05: header allowlist -------------------------------------------------------------

CASE05_DROPPED = [
    "Return-Path",
    "Authentication-Results",
    "DKIM-Signature",
    "Sender",
    "Reply-To",
    "Cc",
    "Disposition-Notification-To",
    "Return-Receipt-To",
    "X-Confirm-Reading-To",
    "Errors-To",
    "X-Original-Sender",
    "List-Unsubscribe",
    "Autocrypt",
    "X-Mailer",
]


def case05_output() -> bytes:
    spec = seller_spec(
        in_reply_to=["9f1e2d3c@mail.example.net"],
        references=["9f1e2d3c@mail.example.net"],
        received="from mx.marketplace.example by mx.marketplace.example with ESMTP id q1; Mon, 11 Mar 2024 16:15:03 +0000",
    )
    return rewrite(case_input("05-header-leak-sender-receipts"), spec)


@pytest.mark.parametrize("name", CASE05_DROPPED)
def test_case05_header_dropped(name):
    assert header_lines(case05_output(), name) == []


def test_case05_only_our_received():
    received = header_lines(case05_output(), "Received")

    assert received == [b"from mx.marketplace.example by mx.marketplace.example with ESMTP id q1; Mon, 11 Mar 2024 16:15:03 +0000"]
    assert header_block(case05_output()).startswith(b"Received: ")


def test_case05_no_forbidden_address():
    forbidden = [SELLER_ADDRESS, COLLEAGUE_ADDRESS, "ventas+baja@example.com"]

    assert leaks(case05_output(), forbidden) == []


def test_case05_kept_and_written_headers():
    out = case05_output()

    assert header_lines(out, "To") == [BUYER_ADDRESS.encode()]
    assert header_lines(out, "Subject") == [b"Re: Cambio de talla del pedido 402-7781"]
    assert header_lines(out, "Date") == [b"Mon, 11 Mar 2024 10:15:01 -0600"]
    assert header_lines(out, "MIME-Version") == [b"1.0"]
    assert header_lines(out, "Message-ID") == [f"<{RELAY_ID}>".encode()]
    assert header_lines(out, "In-Reply-To") == [b"<9f1e2d3c@mail.example.net>"]
    assert header_lines(out, "References") == [b"<9f1e2d3c@mail.example.net>"]
    assert parse_default(out).get_content_type() == "multipart/alternative"


def test_case05_parts_keep_text():
    raw = case_input("05-header-leak-sender-receipts")
    plain = input_part(raw, "text/plain")
    html_in = input_part(raw, "text/html")

    parts = decoded_parts(case05_output())

    assert parts[0] == ("text/plain", SELLER_BANNER.encode() + b"\r\n" + plain)
    assert parts[1][0] == "text/html"
    assert parts[1][1].replace(html_snippet(SELLER_BANNER), b"", 1) == html_in


# --- case 07: quoted-printable re-encoding ---------------------------------------------------


def case07_part_bodies(out: bytes) -> list[bytes]:
    boundary = b"----=_Part_88213_1907745155.1710354600000"
    pieces = out.split(b"\r\n--" + boundary)[1:-1]
    return [piece.split(b"\r\n\r\n", 1)[1] for piece in pieces]


def test_case07_input_hashes():
    raw = case_input("07-qp-soft-breaks-reencode")

    assert sha256(input_part(raw, "text/plain")).startswith("035a632dafe542c0")
    assert sha256(input_part(raw, "text/html")).startswith("cf75051ddfde7c24")


def test_case07_qp_lines():
    out = rewrite(case_input("07-qp-soft-breaks-reencode"), seller_spec())
    message = parse_default(out)

    assert transport_problems(out) == []
    assert b"=\n" not in out.replace(b"=\r\n", b"")
    for part in text_parts(message):
        assert part["Content-Transfer-Encoding"] == "quoted-printable"
    for body in case07_part_bodies(out):
        lines = body.split(b"\r\n")
        assert max(map(len, lines)) <= 76
        assert not any(line.endswith((b" ", b"\t")) for line in lines)
        assert strict_qp_errors(body) == []


def test_case07_decoded_text_contiguous():
    raw = case_input("07-qp-soft-breaks-reencode")
    plain = input_part(raw, "text/plain")
    html_in = input_part(raw, "text/html")

    out = rewrite(raw, seller_spec())
    plain_out, html_out = [quopri.decodestring(body) for body in case07_part_bodies(out)]

    assert plain_out == SELLER_BANNER.encode() + b"\r\n" + plain
    assert b"tienda.  \r\n" in plain_out
    assert html_out.replace(html_snippet(SELLER_BANNER), b"", 1) == html_in
    body_tag = re.search(rb"<body[^>]*>", html_out)
    assert html_out[body_tag.end() :].startswith(html_snippet(SELLER_BANNER))


# --- case 12: auto-reply ---------------------------------------------------------------------


def case12_output() -> bytes:
    spec = seller_spec(in_reply_to=["Q1.buyer@mail.example.net"], references=["Q1.buyer@mail.example.net"])
    return rewrite(case_input("12-auto-reply-loop"), spec)


def test_case12_alias_replaces_address():
    (part,) = decoded_parts(case12_output())

    assert SELLER_ALIAS.encode() in part[1]
    assert leaks(case12_output(), [SELLER_ADDRESS]) == []


def test_case12_loop_headers():
    out = case12_output()

    assert header_lines(out, "X-MS-Exchange-Inbox-Rules-Loop") == []
    assert header_lines(out, "X-MS-Exchange-Generated-Message-Source") == []
    assert header_lines(out, "Thread-Topic") == []
    assert header_lines(out, "Auto-Submitted") == [b"auto-replied"]
    assert header_lines(out, "X-Auto-Response-Suppress") == [b"All"]
    assert parse_headers(out).looks_automatic


# --- case 14: attachments, buyer to seller ---------------------------------------------------


def case14_output() -> bytes:
    return rewrite(case_input("14-attachments-encoded-filenames"), buyer_spec())


def test_case14_same_parts_in_order():
    raw = case_input("14-attachments-encoded-filenames")

    types_in = [part.get_content_type() for part in parse_default(raw).walk()]
    types_out = [part.get_content_type() for part in parse_default(case14_output()).walk()]

    assert types_out == types_in


def test_case14_attachment_bytes():
    parts = {part.get_content_type(): part for part in parse_default(case14_output()).walk()}

    assert sha256(parts["application/pdf"].get_payload(decode=True)) == (
        "50802129dd36a5009ee23bc6b83276bb73adb09b7ac805b2c56c0a9a83a8f28e"
    )
    assert sha256(parts["text/csv"].get_payload(decode=True)) == (
        "8991c6a714d626efa5dde12b5affee6b441a3772cbc687508a3a71677eaa850f"
    )


def test_case14_filenames():
    names = [part.get_filename() for part in parse_default(case14_output()).walk() if part.get_filename()]

    assert names == ["Factura Ñandú A-0042.pdf", "Guía de tallas Otoño-Invierno 2024.csv", "aviso-paqueteria.eml"]


def test_case14_attachments_byte_identical():
    raw = case_input("14-attachments-encoded-filenames")
    out = case14_output()

    for part in mime.parse(raw).children[1:]:
        assert part.raw in out


def test_case14_forwarded_message_intact():
    raw = case_input("14-attachments-encoded-filenames")
    forwarded_in = parse_default(raw).get_payload()[3].get_payload(0)
    forwarded_out = parse_default(case14_output()).get_payload()[3].get_payload(0)

    for name in ("From", "Subject", "Message-ID"):
        assert str(forwarded_out[name]) == str(forwarded_in[name])
    assert forwarded_out.get_payload(decode=True) == forwarded_in.get_payload(decode=True)
    assert case14_output().count(b"\r\n.Esta l=C3=ADnea") == 1


def test_case14_order_line_and_no_buyer_address():
    raw = case_input("14-attachments-encoded-filenames")
    plain = input_part(raw, "text/plain")
    out = case14_output()

    parts = decoded_parts(out)

    assert parts[0] == ("text/plain", BUYER_BANNER.encode() + b"\r\n" + plain)
    assert parts[1][1].startswith(b"<html><body>" + html_snippet(BUYER_BANNER))
    assert leaks(out, [BUYER_ADDRESS]) == []
    assert header_lines(out, "To") == [SELLER_ADDRESS.encode()]


# --- case 17: a 2048-octet HTML line ------------------------------------------------------------


def test_case17_html_reencoded():
    raw = case_input("17-long-line-over-998")
    html_in = input_part(raw, "text/html")

    out = rewrite(raw, seller_spec())
    message = parse_default(out)
    html_part = [part for part in message.walk() if part.get_content_type() == "text/html"][0]
    html_out = html_part.get_payload(decode=True)

    assert sha256(html_in).startswith("9ff5af018f930323")
    assert transport_problems(out) == []
    assert html_part["Content-Transfer-Encoding"] in ("quoted-printable", "base64")
    assert html_out.replace(html_snippet(SELLER_BANNER), b"", 1) == html_in
    assert html_out.index(html_snippet(SELLER_BANNER)) == html_in.index(b"<body>") + len(b"<body>")


@pytest.mark.parametrize(
    "case",
    [
        "01-from-name-comma-refold",
        "03-malformed-from-unterminated-quote",
        "05-header-leak-sender-receipts",
        "07-qp-soft-breaks-reencode",
        "12-auto-reply-loop",
        "17-long-line-over-998",
    ],
)
def test_case_outputs_transport_and_headers(case):
    out = rewrite(case_input(case), seller_spec(from_name=LONG_BUSINESS))

    assert transport_problems(out) == []
    assert header_problems(out) == []
    assert len(header_lines(out, "From")) == 1
    assert leaks(out, [SELLER_ADDRESS, COLLEAGUE_ADDRESS]) == []


# --- subject -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "subject, strip, expected",
    [
        ("[Importante] Entrega del pedido", True, "Entrega del pedido"),
        ("Re: [IMPORTANT] Entrega", True, "Re: Entrega"),
        ("Entrega [importante]", True, "Entrega"),
        ("[Importante] Entrega", False, "[Importante] Entrega"),
        ("Importante: sin corchetes", True, "Importante: sin corchetes"),
        ("Escriba a ventas@example.com", False, f"Escriba a {SELLER_ALIAS}"),
        ("=?utf-8?q?VENTAS=40example.com_responde?=", False, f"{SELLER_ALIAS} responde"),
        ("=?utf-8?q?a=0D=0AX-Evil=3A_1?=", False, "aX-Evil: 1"),
    ],
)
def test_subject_table(subject, strip, expected):
    raw = simple_message(b"hola\r\n").replace(b"Subject: hola", f"Subject: {subject}".encode())

    out = rewrite(raw, seller_spec(strip_subject_tags=strip))

    assert str(parse_default(out)["Subject"]) == expected
    assert header_lines(out, "X-Evil") == []


@pytest.mark.parametrize(
    "text",
    ["", "hola", "Pedido 402-7781: envío", "=?utf-8?q?not-a-word?=", "palabra " * 40, "ñ" * 200, "x" * 1500],
)
def test_format_unstructured_round_trip(text):
    field = format_unstructured("Subject", text)

    assert field.isascii()
    assert max(map(len, field.split(b"\r\n"))) <= 998
    assert str(parse_default(field + b"\r\n")["Subject"]) == text.strip()


# --- text parts -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "written",
    [
        "ventas@example.com",
        "VENTAS@Example.COM",
        "ventas&#64;example.com",
        "ventas&#x40;example&#46;com",
        "ventas&commat;example&period;com",
        "&#118;entas@example.com",
        "mailto:ventas%40example.com",
    ],
)
def test_obfuscated_address_replaced(written):
    body = f"<html><body><p>Escriba a {written} hoy</p></body></html>".encode()
    raw = simple_message(body, content_type="text/html; charset=utf-8")

    out = rewrite(raw, seller_spec())
    (part,) = decoded_parts(out)

    assert SELLER_ALIAS.encode() in part[1]
    assert leaks(out, [SELLER_ADDRESS]) == []


def test_address_split_by_soft_break_replaced():
    raw = simple_message(b"Escriba a vent=\r\nas@exam=\r\nple.com hoy\r\n", encoding="quoted-printable")

    out = rewrite(raw, seller_spec(banner=None))

    assert decoded_parts(out)[0][1] == f"Escriba a {SELLER_ALIAS} hoy\r\n".encode()


def test_unchanged_text_part_is_copied():
    raw = simple_message(b"Hola, sin direcciones.\r\n")

    out = rewrite(raw, seller_spec(banner=None))

    assert out.endswith(b"\r\n\r\nHola, sin direcciones.\r\n")
    assert header_lines(out, "Content-Transfer-Encoding") == [b"8bit"]


@pytest.mark.parametrize(
    "label, body, out_charset, banner_added",
    [
        ("iso-8859-1", "Envío listo".encode("latin-1"), "iso-8859-1", True),
        ("us-ascii", b"Hello", "utf-8", True),
        ("us-ascii", "Envío".encode("utf-8"), "utf-8", True),
        ("gb2312", "中文𠀀".encode("gb18030"), "utf-8", True),
        ("uft-8", "Envío".encode("utf-8"), "utf-8", True),
        ("x-unknown-label", b"Caf\xe9 \xff ventas@example.com", "x-unknown-label", False),
        ("windows-1252", "Envío €".encode("cp1252"), "windows-1252", True),
    ],
)
def test_charset_table(label, body, out_charset, banner_added):
    raw = simple_message(body + b"\r\n", content_type=f"text/plain; charset={label}")

    out = rewrite(raw, seller_spec())
    part = text_parts(parse_default(out))[0]
    decoded = part.get_payload(decode=True)

    assert part.get_content_charset() == out_charset
    assert decoded.startswith(b"Mensaje de Artesan") is banner_added
    assert SELLER_ADDRESS.encode() not in decoded
    assert transport_problems(out) == []


def test_undecodable_text_keeps_bytes():
    raw = simple_message(b"Caf\xe9 \xff ventas@example.com\r\n", content_type="text/plain; charset=x-unknown-label")

    out = rewrite(raw, seller_spec())

    assert decoded_parts(out)[0][1] == b"Caf\xe9 \xff " + SELLER_ALIAS.encode() + b"\r\n"


def test_html_keeps_charset_for_banner():
    body = "<html><body><p>Envío</p></body></html>".encode("latin-1")
    raw = simple_message(body, content_type="text/html; charset=iso-8859-1")

    out = rewrite(raw, seller_spec())
    part = text_parts(parse_default(out))[0]

    assert part.get_content_charset() == "iso-8859-1"
    assert part.get_payload(decode=True) == b"<html><body>" + html_snippet(SELLER_BANNER) + "<p>Envío</p></body></html>".encode("latin-1")


@pytest.mark.parametrize(
    "document, expected_prefix",
    [
        ("<html><head></head><p>x</p></html>", "<html><head></head><div>"),
        ("<html lang=es><p>x</p></html>", "<html lang=es><div>"),
        ("<!DOCTYPE html><p>x</p>", "<!DOCTYPE html><div>"),
        ("<p>x</p>", "<div>"),
        ("<BODY BGCOLOR=white><p>x</p>", "<BODY BGCOLOR=white><div>"),
    ],
)
def test_html_banner_position(document, expected_prefix):
    raw = simple_message(document.encode(), content_type="text/html; charset=utf-8")

    (part,) = decoded_parts(rewrite(raw, seller_spec(banner="Aviso")))

    assert part[1].decode().startswith(expected_prefix + "Aviso</div>")


def test_base64_text_stays_base64_with_lf():
    text = "línea uno\nlínea dos\n".encode("utf-8")
    raw = simple_message(base64.encodebytes(text).replace(b"\n", b"\r\n"), encoding="base64")

    out = rewrite(raw, seller_spec(banner="Aviso"))
    part = text_parts(parse_default(out))[0]

    assert part["Content-Transfer-Encoding"] == "base64"
    assert part.get_payload(decode=True) == b"Aviso\n" + text


def test_text_attachment_untouched():
    csv_part = "Content-Type: text/csv\r\nContent-Disposition: attachment; filename=a.csv\r\n\r\nventas@example.com,1\r\n"
    raw = simple_message(
        f"--b\r\nContent-Type: text/plain\r\n\r\nhola\r\n--b\r\n{csv_part}--b--\r\n".encode(),
        content_type='multipart/mixed; boundary="b"',
        encoding="7bit",
    )

    out = rewrite(raw, seller_spec())

    assert csv_part.encode() in out


def test_forwarded_message_untouched():
    inner = "From: ventas@example.com\r\nSubject: viejo\r\n\r\nEscriba a ventas@example.com\r\n"
    raw = simple_message(
        f"--b\r\nContent-Type: text/plain\r\n\r\nhola\r\n--b\r\nContent-Type: message/rfc822\r\n\r\n{inner}--b--\r\n".encode(),
        content_type='multipart/mixed; boundary="b"',
        encoding="7bit",
    )

    out = rewrite(raw, seller_spec())

    assert inner.encode() in out


# --- signed and encrypted ------------------------------------------------------------------


def signed_message(signed_text: str) -> bytes:
    signed_part = f"Content-Type: text/plain; charset=utf-8\r\n\r\n{signed_text}"
    body = (
        f"--s\r\n{signed_part}\r\n--s\r\nContent-Type: application/pgp-signature\r\n\r\n"
        "-----BEGIN PGP SIGNATURE-----\r\nAAAA\r\n-----END PGP SIGNATURE-----\r\n--s--\r\n"
    )
    return simple_message(
        body.encode(),
        content_type='multipart/signed; boundary="s"; protocol="application/pgp-signature"; micalg=pgp-sha256',
        encoding="7bit",
    )


def test_signed_part_untouched():
    raw = signed_message("Texto firmado.")

    out = rewrite(raw, seller_spec())

    assert mime.parse(raw).raw_body in out
    assert SELLER_BANNER.encode() not in out


def test_signed_part_with_address_raises():
    with pytest.raises(RewriteError, match="signed or encrypted text part"):
        rewrite(signed_message("Escriba a ventas@example.com"), seller_spec())


def test_pkcs7_mime_untouched():
    payload = base64.encodebytes(b"\x30\x82" + bytes(200)).replace(b"\n", b"\r\n")
    raw = simple_message(payload, content_type='application/pkcs7-mime; smime-type=enveloped-data; name="smime.p7m"', encoding="base64")

    out = rewrite(raw, seller_spec())

    assert out.endswith(b"\r\n\r\n" + payload)


# --- transport fixes ------------------------------------------------------------------------


def test_long_line_binary_part_base64():
    data = b"\x00\x01" + b"x" * 3000 + b"\n\xff"
    raw = simple_message(
        b"--b\r\nContent-Type: text/plain\r\n\r\nhola\r\n--b\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\n" + data + b"\r\n--b--\r\n",
        content_type='multipart/mixed; boundary="b"',
        encoding="7bit",
    )

    out = rewrite(raw, seller_spec())
    attachment = [part for part in parse_default(out).walk() if part.get_content_type() == "application/octet-stream"][0]

    assert transport_problems(out) == []
    assert attachment["Content-Transfer-Encoding"] == "base64"
    assert attachment.get_payload(decode=True) == data


def test_bare_lf_message_normalised():
    raw = simple_message(b"uno\ndos\n").replace(b"\r\n", b"\n")

    out = rewrite(raw, seller_spec(banner=None))

    assert transport_problems(out) == []
    assert decoded_parts(out)[0][1] == b"uno\r\ndos\r\n"


def test_long_boundary_replaced():
    boundary = "b" * 100
    raw = simple_message(
        f"--{boundary}\r\nContent-Type: text/plain\r\n\r\nhola\r\n--{boundary}--\r\n".encode(),
        content_type=f'multipart/mixed; boundary="{boundary}"',
        encoding="7bit",
    )

    out = rewrite(raw, seller_spec())
    message = parse_default(out)

    assert len(message.get_boundary()) <= 70
    assert decoded_parts(out)[0][1] == SELLER_BANNER.encode() + b"\r\nhola"


def test_long_header_line_refolded():
    long_value = " ".join(["palabra"] * 300)
    raw = simple_message(
        f"--b\r\nContent-Type: text/plain\r\nContent-Description: {long_value}\r\n\r\nhola\r\n--b--\r\n".encode(),
        content_type='multipart/mixed; boundary="b"',
        encoding="7bit",
    )

    out = rewrite(raw, seller_spec())

    assert transport_problems(out) == []
    assert str(parse_default(out).get_payload(0)["Content-Description"]) == long_value


def test_attachment_not_decoded(monkeypatch):
    payload = base64.encodebytes(bytes(range(256)) * 300).replace(b"\n", b"\r\n")
    raw = simple_message(
        b"--b\r\nContent-Type: text/plain\r\n\r\nhola\r\n--b\r\nContent-Type: application/pdf\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + payload + b"--b--\r\n",
        content_type='multipart/mixed; boundary="b"',
        encoding="7bit",
    )

    def refuse(part):
        raise AssertionError(f"decoded_payload called for {part.content_type}")

    monkeypatch.setattr(mime.Part, "decoded_payload", refuse)
    out = rewrite(raw, seller_spec())

    assert payload in out


# --- top-level header details ----------------------------------------------------------------


def test_date_added_when_missing_or_invalid():
    without = simple_message(b"hola\r\n").replace(b"Date: Mon, 11 Mar 2024 10:00:00 -0600\r\n", b"")
    garbage = simple_message(b"hola\r\n").replace(b"Mon, 11 Mar 2024 10:00:00 -0600", b"ayer por la tarde")

    for raw in (without, garbage):
        dates = header_lines(rewrite(raw, seller_spec()), "Date")
        assert len(dates) == 1
        assert dates[0].endswith(b"GMT")


def test_keyword_fields_reduced():
    extra = "Auto-Submitted: auto-replied; owner-email=ventas@example.com\r\nX-Priority: 1 (Highest)\r\nImportance: High\r\n"
    raw = simple_message(b"hola\r\n", extra=extra)

    out = rewrite(raw, seller_spec())

    assert header_lines(out, "Auto-Submitted") == [b"auto-replied"]
    assert header_lines(out, "X-Priority") == [b"1"]
    assert header_lines(out, "Importance") == [b"High"]
    assert leaks(out, [SELLER_ADDRESS]) == []


def test_threading_fields():
    ids = [f"id{n}.abcdefghij@marketplace.example" for n in range(6)]

    out = rewrite(simple_message(b"hola\r\n"), seller_spec(in_reply_to=[], references=ids))

    assert header_lines(out, "In-Reply-To") == []
    assert header_lines(out, "References") == [b" ".join(f"<{i}>".encode() for i in ids)]
    assert max(map(len, header_block(out).split(b"\r\n"))) <= 78


def test_recipient_own_address_not_a_leak():
    raw = simple_message(b"Copia para juan.perez@example.net\r\n")

    out = rewrite(raw, seller_spec(sender_addresses=[SELLER_ADDRESS, BUYER_ADDRESS]))

    assert header_lines(out, "To") == [BUYER_ADDRESS.encode()]


# --- corpus ---------------------------------------------------------------------------------


@pytest.mark.parametrize("folder", corpus_folders() or [pytest.param("absent", marks=pytest.mark.skip("shared corpus not found"))])
def test_corpus_rewrite_transport_clean(folder):
    """Every corpus message rewrites to CRLF lines of at most 998 octets, or raises RewriteError."""
    for path in corpus_messages(folder):
        raw = path.read_bytes()
        sender = parse_headers(raw).from_address or SELLER_ADDRESS

        try:
            out = rewrite(raw, seller_spec(sender_addresses=[sender]))
        except RewriteError:
            continue

        assert transport_problems(out) == [], path
        assert header_problems(out) == [], path
        assert len(header_lines(out, "From")) == 1, path


def test_sender_address_inside_recipient_address():
    out = rewrite(simple_message(b"hola\r\n"), seller_spec(to_address="mventas@example.com"))

    assert header_lines(out, "To") == [b"mventas@example.com"]


def test_empty_banner_adds_nothing():
    out = rewrite(simple_message(b"hola\r\n"), seller_spec(banner=""))

    assert out.endswith(b"\r\n\r\nhola\r\n")
