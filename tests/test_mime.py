"""Tests of relaymail.mime: the part tree, byte-exact pieces, broken MIME, attachments."""

from __future__ import annotations

import base64
import hashlib

import pytest
from helpers_mail import CORPUS, case_input, corpus_folders, corpus_messages

from relaymail import mime
from relaymail.mime import format_content_field, iter_attachments, parse

PDF_SHA256 = "50802129dd36a5009ee23bc6b83276bb73adb09b7ac805b2c56c0a9a83a8f28e"
CSV_SHA256 = "8991c6a714d626efa5dde12b5affee6b441a3772cbc687508a3a71677eaa850f"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def multipart(boundary: str, *parts: str, close: bool = True, preamble: str = "", epilogue: str = "") -> bytes:
    body = preamble + "".join(f"\r\n--{boundary}\r\n{part}" for part in parts)
    if close:
        body += f"\r\n--{boundary}--\r\n" + epilogue
    header = f'From: a@example.com\r\nContent-Type: multipart/mixed; boundary="{boundary}"\r\n\r\n'
    return (header + body).encode("utf-8")


# --- the case 14 tree ---------------------------------------------------------------


def test_case14_tree_shape():
    root = parse(case_input("14-attachments-encoded-filenames"))

    types = [part.content_type for part in root.walk()]

    assert types == [
        "multipart/mixed",
        "multipart/alternative",
        "text/plain",
        "text/html",
        "application/pdf",
        "text/csv",
        "message/rfc822",
        "text/plain",
    ]


def test_case14_part_details():
    root = parse(case_input("14-attachments-encoded-filenames"))
    alternative, pdf, csv, forwarded = root.children

    assert [part.charset for part in alternative.children] == ["utf-8", "utf-8"]
    assert alternative.children[0].is_text_part()
    assert pdf.filename == "Factura Ñandú A-0042.pdf"
    assert pdf.transfer_encoding == "base64"
    assert pdf.disposition == "attachment"
    assert csv.filename == "Guía de tallas Otoño-Invierno 2024.csv"
    assert not csv.is_text_part()
    assert forwarded.filename == "aviso-paqueteria.eml"
    assert forwarded.is_message
    assert forwarded.children[0].raw.startswith(b"From: =?utf-8?q?Paqueter=C3=ADa_Veloz?=")


def test_case14_payloads():
    root = parse(case_input("14-attachments-encoded-filenames"))
    _alternative, pdf, csv, _forwarded = root.children

    assert sha256(pdf.decoded_payload()) == PDF_SHA256
    assert sha256(csv.decoded_payload()) == CSV_SHA256


def test_case14_attachments():
    attachments = iter_attachments(case_input("14-attachments-encoded-filenames"))

    assert [a.filename for a in attachments] == [
        "Factura Ñandú A-0042.pdf",
        "Guía de tallas Otoño-Invierno 2024.csv",
        "aviso-paqueteria.eml",
    ]
    assert [a.content_type for a in attachments] == ["application/pdf", "text/csv", "message/rfc822"]
    assert [a.decoded_size for a in attachments[:2]] == [1802, 123]
    assert attachments[0].head_bytes.startswith(b"%PDF-1.4")
    assert attachments[1].head_bytes.startswith(b"\xef\xbb\xbf")
    assert all(len(a.head_bytes) == 16 for a in attachments)


def test_case07_decoded_payload_hashes():
    root = parse(case_input("07-qp-soft-breaks-reencode"))
    plain, html = root.children

    assert sha256(plain.decoded_payload()).startswith("035a632dafe542c0")
    assert sha256(html.decoded_payload()).startswith("cf75051ddfde7c24")


# --- structure and exact pieces ------------------------------------------------------------


def test_pieces_reassemble_exactly():
    raw = multipart("b1", "Content-Type: text/plain\r\n\r\nuno", "\r\nsin cabecera", preamble="pre", epilogue="post\r\n")

    root = parse(raw)

    assert root.reassemble() == raw
    assert root.preamble == b"pre"
    assert root.epilogue == b"post\r\n"
    assert [child.raw for child in root.children] == [b"Content-Type: text/plain\r\n\r\nuno", b"\r\nsin cabecera"]


def test_missing_close_runs_to_end():
    raw = multipart("b1", "Content-Type: text/plain\r\n\r\nuno", "Content-Type: text/html\r\n\r\n<p>dos", close=False)

    root = parse(raw)

    assert [child.content_type for child in root.children] == ["text/plain", "text/html"]
    assert root.children[1].raw_body == b"<p>dos"
    assert root.close_delimiter is None
    assert "no closing delimiter" in root.defects[0]
    assert root.reassemble() == raw


def test_missing_boundary_parameter_is_leaf():
    raw = b"Content-Type: multipart/mixed\r\n\r\n--x\r\n\r\nhola\r\n--x--\r\n"

    root = parse(raw)

    assert root.children == []
    assert root.content_type == "multipart/mixed"
    assert "boundary" in root.defects[0]


def test_no_delimiter_line_is_leaf():
    raw = b'Content-Type: multipart/mixed; boundary="x"\r\n\r\nno parts at all\r\n'

    root = parse(raw)

    assert root.children == []
    assert root.defects


def test_delimiter_with_trailing_text_not_split():
    raw = b'Content-Type: multipart/mixed; boundary="x"\r\n\r\n--x\r\n\r\nuno\r\n--x junk\r\n\r\ndos\r\n--x--\r\n'

    root = parse(raw)

    assert len(root.children) == 1
    assert any("more text" in defect for defect in root.defects)


def test_transport_padding_accepted():
    raw = b'Content-Type: multipart/mixed; boundary="x"\r\n\r\n--x  \t\r\n\r\nuno\r\n--x-- \r\n'

    root = parse(raw)

    assert [child.raw_body for child in root.children] == [b"uno"]


def test_empty_part_between_delimiters():
    raw = b'Content-Type: multipart/mixed; boundary="x"\r\n\r\n--x\r\n--x\r\n\r\ndos\r\n--x--\r\n'

    root = parse(raw)

    assert len(root.children) == 2
    assert root.children[0].raw == b""
    assert root.reassemble() == raw


@pytest.mark.parametrize("line_break", [b"\n", b"\r"])
def test_other_line_breaks(line_break):
    raw = (
        b'Content-Type: multipart/mixed; boundary="x"\r\n\r\n--x\r\nContent-Type: text/plain\r\n\r\nuno\r\n--x--\r\n'
    ).replace(b"\r\n", line_break)

    root = parse(raw)

    assert [child.content_type for child in root.children] == ["text/plain"]
    assert root.children[0].raw_body == b"uno"
    assert root.reassemble() == raw


def test_multipart_with_base64_encoding_is_leaf():
    raw = b'Content-Type: multipart/mixed; boundary="x"\r\nContent-Transfer-Encoding: base64\r\n\r\n--x\r\n\r\nuno\r\n--x--\r\n'

    root = parse(raw)

    assert root.children == []


def test_digest_children_default_to_message():
    raw = b'Content-Type: multipart/digest; boundary="x"\r\n\r\n--x\r\n\r\nFrom: a@example.com\r\n\r\nhola\r\n--x--\r\n'

    root = parse(raw)

    assert root.children[0].content_type == "message/rfc822"
    assert root.children[0].is_message


def test_depth_is_bounded():
    depth = 60
    raw = b"".join(
        f'Content-Type: multipart/mixed; boundary="b{level}"\r\n\r\n--b{level}\r\n'.encode() for level in range(depth)
    )
    raw += b"Content-Type: text/plain\r\n\r\nfondo\r\n"

    root = parse(raw)

    deepest = max(part.depth for part in root.walk())
    assert deepest == mime.MAX_DEPTH
    assert any("nested deeper" in defect for part in root.walk() for defect in part.defects)
    assert root.reassemble() == raw


def test_part_count_is_bounded():
    raw = multipart("x", *["Content-Type: text/plain\r\n\r\nparte"] * (mime.MAX_PARTS + 5))

    root = parse(raw)

    assert root.children == []
    assert any(str(mime.MAX_PARTS) in defect for defect in root.defects)


@pytest.mark.parametrize(
    "content_type, expected",
    [
        ("text/PLAIN; charset=UTF-8", ("text/plain", "utf-8")),
        ('text/plain; charset="iso-8859-1"', ("text/plain", "iso-8859-1")),
        ("text/plain;\r\n\tcharset*=utf-8''utf-8", ("text/plain", "utf-8")),
        ("text", ("text/plain", None)),
        ("text/plain\r\n   charset=utf-8", ("text/plain", None)),
        ("", ("text/plain", None)),
    ],
)
def test_content_type_table(content_type, expected):
    raw = f"Content-Type: {content_type}\r\n\r\nhola".encode()

    root = parse(raw)

    assert (root.content_type, root.charset) == expected


@pytest.mark.parametrize(
    "disposition, filename",
    [
        ('attachment; filename="=?utf-8?B?VEVTVC5jc3Y=?="', "TEST.csv"),
        ("attachment; filename*=utf-8''Gu%C3%ADa.csv", "Guía.csv"),
        ("attachment; filename*0*=utf-8''Gu%C3%ADa%20; filename*1*=de.csv", "Guía de.csv"),
        ('attachment; filename="a\\"b.txt"', 'a"b.txt'),
        ('attachment; filename="=?utf-8?q?a=0D=0Ab.txt?="', "ab.txt"),
        ("inline", None),
    ],
)
def test_filename_table(disposition, filename):
    raw = f"Content-Type: application/octet-stream\r\nContent-Disposition: {disposition}\r\n\r\nx".encode()

    root = parse(raw)

    assert root.filename == filename


def test_raw_utf8_filename():
    raw = 'Content-Type: application/pdf\r\nContent-Disposition: attachment; filename="Año.pdf"\r\n\r\nx'.encode()

    assert parse(raw).filename == "Año.pdf"


@pytest.mark.parametrize(
    "encoding, body, decoded",
    [
        ("base64", b"aG9s\r\nYQ==", b"hola"),
        ("base64", b"aG9sYQ", b"hola"),
        ("base64", b"aG9s*YQ==", b"hola"),
        ("quoted-printable", b"ho=\r\nla=3D", b"hola="),
        ("quoted-printable", b"ho=\nla\nx", b"hola\r\nx"),
        ("8bit", b"tal cual\n", b"tal cual\n"),
        ("x-unknown", b"tal cual", b"tal cual"),
    ],
)
def test_decoded_payload_table(encoding, body, decoded):
    raw = f"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: {encoding}\r\n\r\n".encode() + body

    assert parse(raw).decoded_payload() == decoded


def test_attachment_size_without_full_decode():
    payload = bytes(range(256)) * 400
    encoded = base64.encodebytes(payload).replace(b"\n", b"\r\n")
    raw = b"Content-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n" + encoded

    (info,) = iter_attachments(raw)

    assert info.decoded_size == len(payload)
    assert info.head_bytes == payload[:16]


def test_text_parts_are_not_attachments():
    raw = multipart(
        "x",
        "Content-Type: text/plain\r\n\r\nhola",
        "Content-Type: text/html\r\nContent-Disposition: inline\r\n\r\n<p>hola</p>",
        "Content-Type: text/plain\r\nContent-Disposition: attachment; filename=a.txt\r\n\r\nadjunto",
    )

    attachments = iter_attachments(raw)

    assert [(a.filename, a.content_type, a.decoded_size) for a in attachments] == [("a.txt", "text/plain", 7)]


# --- format_content_field ---------------------------------------------------------------


@pytest.mark.parametrize(
    "params, expected",
    [
        ([("charset", "utf-8")], b"Content-Type: text/plain;\r\n\tcharset=utf-8\r\n"),
        ([("name", "a b.txt")], b'Content-Type: text/plain;\r\n\tname="a b.txt"\r\n'),
        ([("name", 'a"b')], b'Content-Type: text/plain;\r\n\tname="a\\"b"\r\n'),
        ([("name", "Año.pdf")], b"Content-Type: text/plain;\r\n\tname*=utf-8''A%C3%B1o.pdf\r\n"),
        ([("name", "a\r\nb")], b"Content-Type: text/plain;\r\n\tname*=utf-8''a%0D%0Ab\r\n"),
    ],
)
def test_format_content_field_table(params, expected):
    assert format_content_field("Content-Type", "text/plain", params) == expected


def test_format_content_field_continuations_round_trip():
    name = "Guía de tallas " * 20 + ".csv"
    field = format_content_field("Content-Disposition", "attachment", [("filename", name)])
    raw = field + b"Content-Type: text/csv\r\n\r\nx"

    assert max(map(len, field.split(b"\r\n"))) <= 78
    assert field.isascii()
    assert parse(raw).filename == name.strip()


# --- corpus ----------------------------------------------------------------------------


def test_corpus_deep_files_bounded():
    for name in ("flanker/enclosed-endless.eml", "mimekit/messages/stack-overflow.txt"):
        path = CORPUS / name
        if not path.is_file():
            pytest.skip(f"shared corpus file {path} not found")
        raw = path.read_bytes()

        root = parse(raw)

        assert max(part.depth for part in root.walk()) <= mime.MAX_DEPTH
        assert sum(1 for _ in root.walk()) <= mime.MAX_PARTS
        assert root.reassemble() == raw


@pytest.mark.parametrize("folder", corpus_folders() or [pytest.param("absent", marks=pytest.mark.skip("shared corpus not found"))])
def test_corpus_pieces_reassemble(folder):
    for path in corpus_messages(folder):
        raw = path.read_bytes()

        root = parse(raw)
        iter_attachments(raw)

        assert root.reassemble() == raw, path
