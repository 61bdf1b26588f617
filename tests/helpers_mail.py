"""Shared helpers for the header, MIME and rewrite tests: case inputs, corpus files, transport checks.

The case inputs and the corpus live outside the repository, in the shared folder next
to it. Tests that need them skip when that folder is absent.
"""

from __future__ import annotations

import codecs
import re
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
CASES = SHARED / "cases"
CORPUS = SHARED / "corpus"

BUYER_ALIAS = "t969vz2jn3bdsy7@marketplace.example"  # the address the seller writes to for the buyer
SELLER_ALIAS = "k7m2q9x4zr1c8nw@marketplace.example"  # the address the buyer writes to for the seller
BUYER_ADDRESS = "juan.perez@example.net"
SELLER_ADDRESS = "ventas@example.com"
COLLEAGUE_ADDRESS = "rosa.martinez@example.com"

_STRICT_QP_ESCAPE = re.compile(rb"=(?![0-9A-F]{2}|\r\n)")
_ENCODED_WORD = re.compile(r"=\?[^?\s]+\?[QqBb]\?[^?\s]*\?=")


def case_input(name: str) -> bytes:
    """Return the input.eml of a case folder, skipping the test when the shared cases are absent."""
    path = CASES / name / "input.eml"
    if not path.is_file():
        pytest.skip(f"shared case input {path} not found (the shared folder sits next to the repository)")
    return path.read_bytes()


def corpus_folders() -> list[str]:
    """Return the corpus folder names, or [] when the shared corpus is absent."""
    if not CORPUS.is_dir():
        return []
    return sorted(p.name for p in CORPUS.iterdir() if p.is_dir() and p.name not in ("LICENSES", "mimekit-tnef"))


def corpus_messages(folder: str) -> list[Path]:
    """Return the message files of one corpus folder: no licences, manifests, mbox files or TNEF payloads."""
    files = []
    for path in sorted((CORPUS / folder).rglob("*")):
        if not path.is_file() or path.name == "MANIFEST.md":
            continue
        if "mbox" in path.name or path.parent.name == "mbox" or path.suffix == ".tnef":
            continue
        files.append(path)
    return files


def transport_problems(data: bytes) -> list[str]:
    """Return what breaks the SMTP transport rules: bare CR or LF, lines over 998 octets."""
    problems = []
    if not data.count(b"\n") == data.count(b"\r\n") == data.count(b"\r"):
        problems.append("bare CR or LF")
    longest = max(map(len, data.split(b"\r\n")))
    if longest > 998:
        problems.append(f"line of {longest} octets")
    return problems


def header_problems(data: bytes) -> list[str]:
    """Return what breaks the 7-bit header rule: 8-bit bytes, encoded-words over 75 characters or in unknown charsets."""
    block = header_block(data)
    problems = []
    if not block.isascii():
        problems.append("8-bit bytes in the header")
    for word in _ENCODED_WORD.findall(block.decode("ascii", "replace")):
        if len(word) > 75:
            problems.append(f"encoded-word of {len(word)} characters")
        charset = word[2:].split("?", 1)[0].split("*", 1)[0]
        try:
            codecs.lookup(charset)
        except LookupError:
            problems.append(f"encoded-word in unknown charset {charset!r}")
    return problems


def parse_default(data: bytes) -> EmailMessage:
    """Parse with policy.default, the parser a strict receiving client resembles."""
    return BytesParser(policy=policy.default).parsebytes(data)


def header_block(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[0] + b"\r\n"


def header_lines(data: bytes, name: str) -> list[bytes]:
    """Return the unfolded values of every top-level field called `name`."""
    unfolded = re.sub(rb"\r\n[ \t]", b" ", header_block(data))
    prefix = name.lower().encode("ascii") + b":"
    return [line[len(prefix) :].strip() for line in unfolded.split(b"\r\n") if line.lower().startswith(prefix)]


def text_parts(message: EmailMessage) -> list[EmailMessage]:
    """Return the text/plain and text/html parts that are not attachments, outside message/rfc822."""
    found = []
    for part in _walk_outside_messages(message):
        if part.get_content_type() in ("text/plain", "text/html") and part.get_content_disposition() != "attachment":
            found.append(part)
    return found


def _walk_outside_messages(part: EmailMessage):
    yield part
    if part.get_content_type() == "message/rfc822":
        return
    if part.is_multipart():
        for child in part.get_payload():
            yield from _walk_outside_messages(child)


def strict_qp_errors(body: bytes) -> list[bytes]:
    """Return each '=' not followed by two upper-case hex digits or CRLF."""
    return [match.group(0) for match in _STRICT_QP_ESCAPE.finditer(body)]

