"""Tests of relaymail.headers: the From rule, message ids, Subject decoding, auto-reply marks."""

from __future__ import annotations

import random

import pytest
from helpers_mail import SELLER_ADDRESS, case_input, corpus_folders, corpus_messages

from relaymail.headers import (
    decode_words,
    decoding_codecs,
    exact_codec,
    judge_from,
    parse_headers,
    split_fields,
    split_msgids,
)


def message(*header_lines: str, body: str = "Hola\r\n") -> bytes:
    return ("\r\n".join(header_lines) + "\r\n\r\n" + body).encode("utf-8")


# --- From ------------------------------------------------------------------------

FROM_CASES = [
    # (raw value, expected address, expected error)
    ("ventas@example.com", "ventas@example.com", None),
    ("<Ventas@Example.COM>", "ventas@example.com", None),
    ("Ventas <ventas@example.com>", "ventas@example.com", None),
    ('"Artesanías, S.A." <ventas@example.com>', "ventas@example.com", None),
    ("=?utf-8?q?Artesan=C3=ADas_=C3=91and=C3=BA?= <ventas@example.com>", "ventas@example.com", None),
    ("J. Smith <j.smith@example.com>", "j.smith@example.com", None),
    ("Artesanías Ñandú <ventas@example.com>", "ventas@example.com", None),
    ('"ventas@example.com" <otro@example.org>', "otro@example.org", None),
    ("(Ventas) ventas@example.com", "ventas@example.com", None),
    ("ventas@example.com, rosa.martinez@example.com", None, "holds several mailboxes"),
    ("a@example.com, b@example.org, c@example.net", None, "holds several mailboxes"),
    # CVE-2023-27043 forms: getaddresses and the header registry see different mailboxes.
    ("alice@example.org)<bob@example.org>", None, "cannot be parsed"),
    ("bob@example.org <alice@example.org>", None, "cannot be parsed"),
    ("alice@example.org@bob.example.org", None, "cannot be parsed"),
    ('"alice@example.org <bob@example.org>', None, "cannot be parsed"),
    ("alice@example.org (comment <bob@example.org>", None, "cannot be parsed"),
    ("ventas@example.com (ventas@example.org)", None, "cannot be parsed"),
    ("Smith, John <j@example.com>", None, "cannot be parsed"),
    ('"', None, "cannot be parsed"),
    ("", None, "cannot be parsed"),
    ("undisclosed-recipients:;", None, "cannot be parsed"),
    ("Ventas: ventas@example.com;", None, "cannot be parsed"),
    ("ventas@localhost", None, "cannot be parsed"),
    ("@example.com", None, "cannot be parsed"),
    ("ventas.@example.com", None, "cannot be parsed"),
    ("ventas..x@example.com", None, "cannot be parsed"),
    ('"ventas"@example.com', None, "cannot be parsed"),
    ("ventas@[192.0.2.1]", None, "cannot be parsed"),
    ("ventas@-example.com", None, "cannot be parsed"),
    ("ventas@example..com", None, "cannot be parsed"),
    ("Ventas", None, "cannot be parsed"),
]


@pytest.mark.parametrize("value, address, error", FROM_CASES)
def test_from_judgement_table(value, address, error):
    parsed = parse_headers(message(f"From: {value}", "To: x@marketplace.example"))

    assert parsed.from_address == address
    assert parsed.from_error == error


def test_from_missing():
    parsed = parse_headers(message("To: x@marketplace.example", "Subject: hola"))

    assert parsed.from_address is None
    assert parsed.from_error == "missing"


def test_from_twice():
    parsed = parse_headers(message("From: a@example.com", "From: a@example.com"))

    assert parsed.from_address is None
    assert parsed.from_error == "appears more than once"


def test_from_raw_invalid_utf8_rejected():
    raw = b"From: \"Artesan\xeda <ventas@example.com>\r\nTo: x@marketplace.example\r\n\r\nHola\r\n"

    parsed = parse_headers(raw)

    assert parsed.from_address is None
    assert parsed.from_error == "cannot be parsed"


def test_from_folded_value():
    parsed = parse_headers(message("From: =?utf-8?q?Artesan=C3=ADas?=\r\n <ventas@example.com>"))

    assert parsed.from_address == "ventas@example.com"


def test_from_too_long_rejected():
    parsed = parse_headers(message("From: " + "=?utf-8?Q?a?= " * 400 + "<ventas@example.com>"))

    assert parsed.from_error == "cannot be parsed"


def test_from_huge_value_rejected():
    parsed = parse_headers(message("From: " + "a" * 20000 + "@example.com"))

    assert parsed.from_error == "cannot be parsed"


def test_judge_from_takes_raw_bytes():
    assert judge_from(b" Ventas <ventas@example.com>") == ("ventas@example.com", None)


def test_case03_unterminated_quote():
    parsed = parse_headers(case_input("03-malformed-from-unterminated-quote"))

    assert parsed.from_address is None
    assert parsed.from_error == "cannot be parsed"
    assert parsed.subject == "Factura electrónica del pedido 402-7781"
    assert parsed.received_count == 1


@pytest.mark.parametrize(
    "case",
    [
        "01-from-name-comma-refold",
        "05-header-leak-sender-receipts",
        "07-qp-soft-breaks-reencode",
        "12-auto-reply-loop",
        "17-long-line-over-998",
    ],
)
def test_case_from_is_seller(case):
    parsed = parse_headers(case_input(case))

    assert parsed.from_address == SELLER_ADDRESS
    assert parsed.from_error is None


# --- header block and ids ------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, header_end",
    [
        (b"From: a@example.com\r\n\r\nbody", 23),
        (b"From: a@example.com\n\nbody", 21),
        (b"From: a@example.com\r\rbody", 21),
        (b"From: a@example.com\r\n", 21),
        (b"From: a@example.com", 19),
        (b"\r\nbody", 2),
        (b"From: a@example.com\r\nthis line has no colon\r\n", 21),
        (b"From a@example.com Mon Jan  1 00:00:00 2024\nFrom: a@example.com\n\nx", 65),
    ],
)
def test_header_end_table(raw, header_end):
    assert parse_headers(raw).header_end == header_end


def test_split_fields_keeps_raw_folding():
    raw = b"Subject: a\r\n b\r\nX-Y: z\r\n\r\nbody"

    fields, headers_end, body_start = split_fields(raw)

    assert [item.name for item in fields] == ["Subject", "X-Y"]
    assert fields[0].raw == b"Subject: a\r\n b\r\n"
    assert fields[0].value() == "a b"
    assert headers_end == 24
    assert body_start == 26


def test_split_fields_skips_leading_continuation():
    fields, _end, _body = split_fields(b"   \r\nFrom: a@example.com\r\n\r\n")

    assert [item.key for item in fields] == ["from"]


@pytest.mark.parametrize(
    "value, ids",
    [
        ("<a@example.com>", ["a@example.com"]),
        ("<a@example.com> <b@example.org>", ["a@example.com", "b@example.org"]),
        ("<a@example.com>\r\n\t<b@example.org>", ["a@example.com", "b@example.org"]),
        ("<a@example.com> <a@example.com>", ["a@example.com"]),
        ("a@example.com", ["a@example.com"]),
        ("<a@exa\r\n mple.com>", ["a@example.com"]),
        ("<a@example.com> (from ventas@example.com)", ["a@example.com"]),
        ("<>", []),
        ("<a é@example.com>", []),
        ("no ids here", []),
    ],
)
def test_split_msgids_table(value, ids):
    assert split_msgids(value) == ids


def test_threading_ids_parsed():
    parsed = parse_headers(case_input("05-header-leak-sender-receipts"))

    assert parsed.message_id == "4b7d2c1e-93aa-4f0e-8c55-1d2e3f4a5b6c@mail.example.com"
    assert parsed.in_reply_to == ["mkt.20240311.b7c1e0@marketplace.example"]
    assert parsed.references == ["mkt.20240311.b7c1e0@marketplace.example"]


# --- Subject and encoded-words ---------------------------------------------------------


@pytest.mark.parametrize(
    "value, text",
    [
        ("plain subject", "plain subject"),
        ("=?utf-8?q?Env=C3=ADo?= listo", "Envío listo"),
        ("=?utf-8?q?a?= =?utf-8?q?b?=", "ab"),
        ("=?utf-8?q?a?=\r\n =?utf-8?q?_b?=", "a b"),
        ("=?utf-8?b?w6E=?= y =?iso-8859-1?q?=E1?=", "á y á"),
        # One character split across two words.
        ("=?utf-8?q?=C3?= =?utf-8?q?=B1?=", "ñ"),
        ("=?gb2312?b?1tDOxA==?=", "中文"),
        ("=?x-unknown?q?abc?=", "abc"),
        ("=?utf-8?b?!!!?=", "=?utf-8?b?!!!?="),
        ("=?utf-8*es?q?hola?=", "hola"),
    ],
)
def test_decode_words_table(value, text):
    assert decode_words(value) == text


def test_subject_encoded_line_break_removed():
    parsed = parse_headers(message("Subject: =?utf-8?q?a=0D=0AX-Evil=3A_1?="))

    assert parsed.subject == "aX-Evil: 1"


def test_subject_raw_utf8_decoded():
    raw = "Subject: Factura electrónica\r\n\r\n".encode("utf-8")

    assert parse_headers(raw).subject == "Factura electrónica"


@pytest.mark.parametrize(
    "label, first_codec",
    [
        ("gb2312", "gb18030"),
        ("GB2312", "gb18030"),
        ('"utf-8"', "utf-8"),
        ("uft-8", "utf-8"),
        ("us-ascii", "utf-8"),
        (None, "utf-8"),
        ("iso-8859-1", "cp1252"),
        ("ks_c_5601-1987", "cp949"),
        ("shift_jis", "cp932"),
        ("x-no-such-charset", "utf-8"),
        ("unicode_escape", "utf-8"),
    ],
)
def test_decoding_codecs_table(label, first_codec):
    assert decoding_codecs(label)[0] == first_codec


@pytest.mark.parametrize(
    "label, codec",
    [("utf-8", "utf-8"), ("iso-8859-1", "iso8859-1"), ("uft-8", None), ("base64", None), ("idna", None), ("", None)],
)
def test_exact_codec_table(label, codec):
    assert exact_codec(label) == codec


# --- automatic messages ------------------------------------------------------------------


@pytest.mark.parametrize(
    "lines, automatic",
    [
        (["Subject: hola"], False),
        (["Auto-Submitted: auto-replied"], True),
        (["Auto-Submitted: no"], False),
        (["Auto-Submitted: No (manual)"], False),
        (["Auto-Submitted: auto-generated; owner=x"], True),
        (["Precedence: bulk"], True),
        (["Precedence: list"], True),
        (["Precedence: junk"], True),
        (["Precedence: first-class"], False),
        (["X-Autoreply: yes"], True),
        (["X-Autorespond: vacation"], True),
        (["Subject: Respuesta automática: Pedido"], True),
        (["Subject: =?utf-8?q?Respuesta_autom=C3=A1tica=3A_x?="], True),
        (["Subject: Out of Office: back Monday"], True),
        (["Subject: Fuera de la oficina"], True),
        (["Subject: Auto-Reply: x"], True),
        (["Subject: Automatic reply: x"], True),
        (["Subject: Re: Out of office question"], False),
    ],
)
def test_looks_automatic_table(lines, automatic):
    parsed = parse_headers(message("From: a@example.com", *lines))

    assert parsed.looks_automatic is automatic


def test_case12_auto_reply_fields():
    parsed = parse_headers(case_input("12-auto-reply-loop"))

    assert parsed.auto_submitted == "auto-replied"
    assert parsed.looks_automatic
    assert parsed.subject.startswith("Respuesta automática:")


def test_received_count():
    parsed = parse_headers(message("Received: a", "Received: b", "received: c", "From: a@example.com"))

    assert parsed.received_count == 3


# --- robustness ---------------------------------------------------------------------------


def test_random_bytes_never_raise():
    rng = random.Random(20240311)
    alphabet = b'From:<>@"()\\,;: \t\r\n=?qQbB\x80\xc3\xff\x00abc.'
    for _ in range(3000):
        length = rng.randrange(0, 200)
        raw = b"From: " + bytes(rng.choice(alphabet) for _ in range(length))

        parsed = parse_headers(raw)

        assert (parsed.from_address is None) == (parsed.from_error is not None)


@pytest.mark.parametrize("folder", corpus_folders() or [pytest.param("absent", marks=pytest.mark.skip("shared corpus not found"))])
def test_corpus_never_raises(folder):
    for path in corpus_messages(folder):
        raw = path.read_bytes()

        parsed = parse_headers(raw)

        assert 0 <= parsed.header_end <= len(raw), path
        assert "\r" not in parsed.subject and "\n" not in parsed.subject, path
        assert (parsed.from_address is None) == (parsed.from_error is not None), path
