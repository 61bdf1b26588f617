"""A MIME walker on bytes: a message split into a tree of parts without decoding any body.

`parse(raw)` returns the root `Part`. Every part keeps offsets into the one `raw`
buffer, so a caller can copy any part it does not change byte for byte, and no
base64 body is decoded unless someone calls `Part.decoded_payload()`. Content-Type and
Content-Disposition parameters are read with compat32's `email.message.Message`, which
handles RFC 2231 values and their continuations. Filenames written as an RFC 2047
encoded-word inside quotes are decoded too.

Multipart bodies are split at their boundary delimiter lines (RFC 2046 section 5.1.1).
As in compat32's feed parser, a delimiter line is "--boundary", optionally "--", then
only spaces or tabs; the line break before it belongs to the delimiter. A message/rfc822
part gets the embedded message as its one child. Nothing here raises on malformed
input; such a part becomes an opaque leaf and a note goes into `Part.defects`:
- a multipart with no boundary parameter, no delimiter line, or a transfer encoding
  other than 7bit, 8bit or binary;
- a part nested deeper than `MAX_DEPTH`, or a multipart whose parts would pass the
  `MAX_PARTS` total.
A missing closing delimiter is accepted: the last part runs to the end of its parent.

`iter_attachments(raw)` lists what the attachment policy judges: every leaf that is not
a text part, and every message/rfc822 part as one attachment (its contents are not
listed).

Limits: uuencoded or BinHex data inside a text part is not recognised. RFC 2046 lets
readers match only the start of a delimiter line, so a client may split a part where a
line starts with the boundary and goes on with other text; the walker does not split
there (as compat32 does not) and records a defect. An inner boundary that is the outer
one plus "--" ends the outer multipart early, as in compat32.
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass, field
from email.message import Message
from email.utils import collapse_rfc2231_value
from typing import Iterator

from .headers import (
    HeaderField,
    decode_base64_lenient,
    decode_bytes,
    decode_words,
    first_token,
    split_fields,
    unfold,
)

MAX_DEPTH = 30
MAX_PARTS = 1000

IDENTITY_ENCODINGS = frozenset({"7bit", "8bit", "binary"})
TEXT_TYPES = frozenset({"text/plain", "text/html"})
# Containers whose contents are protected by a signature or encryption.
SEALED_TYPES = frozenset({"multipart/signed", "multipart/encrypted"})
# Types that RFC 2046 (and RFC 1847 for multipart) allows only in 7bit, 8bit or binary.
NO_BASE64_TYPES = frozenset({"message/rfc822", "message/partial", "message/external-body"})

_B64_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 2045 token: no tspecials
_CONTENT_FIELDS = frozenset({"content-type", "content-transfer-encoding", "content-disposition"})
_CONTENT_TYPE = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+/[!#$%&'*+.^_`|~0-9a-z-]+")


@dataclass(eq=False)
class Part:
    """One MIME part (or the whole message), as offsets into the raw message."""

    source: bytes
    start: int
    headers_end: int
    body_start: int
    end: int
    depth: int
    fields: list[HeaderField]
    content_type: str = "text/plain"  # lower-cased type/subtype
    params: list[tuple[str, str]] = field(default_factory=list)  # Content-Type parameters, names lower-cased
    charset: str | None = None  # lower-cased charset parameter
    transfer_encoding: str = "7bit"  # lower-cased first token of Content-Transfer-Encoding
    disposition: str | None = None  # "inline", "attachment" or another lower-cased token
    filename: str | None = None  # decoded, control characters removed
    boundary: str | None = None
    children: list[Part] = field(default_factory=list)
    delimiters: list[tuple[int, int]] = field(default_factory=list)  # offsets of the delimiter before each child
    close_delimiter: tuple[int, int] | None = None
    defects: list[str] = field(default_factory=list)

    @property
    def raw(self) -> bytes:
        """The part's bytes: header fields, separator line and body."""
        return self.source[self.start : self.end]

    @property
    def raw_headers(self) -> bytes:
        """The header fields, without the empty line that ends them."""
        return self.source[self.start : self.headers_end]

    @property
    def raw_body(self) -> bytes:
        return self.source[self.body_start : self.end]

    @property
    def is_multipart(self) -> bool:
        """True when the body was split at boundary delimiters into `children`."""
        return bool(self.delimiters)

    @property
    def is_message(self) -> bool:
        """True for a message/rfc822 part whose embedded message is `children[0]`."""
        return self.content_type == "message/rfc822" and bool(self.children)

    @property
    def preamble(self) -> bytes:
        if not self.delimiters:
            return b""
        return self.source[self.body_start : self.delimiters[0][0]]

    @property
    def epilogue(self) -> bytes:
        if self.close_delimiter is None:
            return b""
        return self.source[self.close_delimiter[1] : self.end]

    def param(self, name: str) -> str | None:
        """Return a Content-Type parameter by lower-case name, or None."""
        for key, value in self.params:
            if key == name:
                return value
        return None

    def is_text_part(self) -> bool:
        """True for text/plain or text/html without `Content-Disposition: attachment`."""
        return self.content_type in TEXT_TYPES and self.disposition != "attachment"

    def walk(self) -> Iterator[Part]:
        """Yield this part and every part below it, depth first, in message order."""
        yield self
        for child in self.children:
            yield from child.walk()

    def decoded_payload(self) -> bytes:
        """Return the body with its Content-Transfer-Encoding removed.

        Quoted-printable line breaks are read as CRLF whatever the raw line endings.
        Unknown encodings, and 7bit, 8bit and binary, return the raw body.
        """
        body = self.raw_body
        if self.transfer_encoding == "base64":
            decoded = decode_base64_lenient(body)
            return decoded if decoded is not None else b""
        if self.transfer_encoding == "quoted-printable":
            return binascii.a2b_qp(to_crlf(body))
        return body

    def reassemble(self) -> bytes:
        """Rebuild the part from its pieces; equals `raw` (used to check the split)."""
        head = self.source[self.start : self.body_start]
        if self.is_multipart:
            pieces = [head, self.preamble]
            for (delimiter_start, delimiter_end), child in zip(self.delimiters, self.children):
                pieces.append(self.source[delimiter_start:delimiter_end])
                pieces.append(child.reassemble())
            if self.close_delimiter is not None:
                pieces.append(self.source[self.close_delimiter[0] : self.close_delimiter[1]])
                pieces.append(self.epilogue)
            return b"".join(pieces)
        if self.is_message:
            return head + self.children[0].reassemble()
        return self.raw


@dataclass(frozen=True)
class AttachmentInfo:
    """One attachment, with what the attachment policy reads of it."""

    filename: str | None
    content_type: str
    decoded_size: int  # bytes after removing the Content-Transfer-Encoding
    head_bytes: bytes  # the first 16 decoded bytes, for type sniffing


def to_crlf(data: bytes) -> bytes:
    """Return `data` with every bare CR and bare LF turned into CRLF."""
    if data.count(b"\n") == data.count(b"\r\n") == data.count(b"\r"):
        return data
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


# --- parsing -----------------------------------------------------------------


def parse(raw: bytes, max_depth: int = MAX_DEPTH) -> Part:
    """Split `raw` (a whole message) into a tree of parts. Never raises."""
    counter = [0]
    return _parse_part(raw, 0, len(raw), 0, "text/plain", counter, max_depth)


def _parse_part(
    source: bytes, start: int, end: int, depth: int, default_type: str, counter: list[int], max_depth: int
) -> Part:
    fields, headers_end, body_start = split_fields(source, start, end)
    part = Part(source, start, headers_end, body_start, end, depth, fields)
    _read_content_fields(part, default_type)
    counter[0] += 1

    if part.content_type.startswith("multipart/"):
        if _can_open(part, counter, max_depth):
            _split_multipart(part, counter, max_depth)
    elif part.content_type == "message/rfc822":
        if _can_open(part, counter, max_depth):
            child = _parse_part(source, body_start, end, depth + 1, "text/plain", counter, max_depth)
            part.children.append(child)
    return part


def _can_open(part: Part, counter: list[int], max_depth: int) -> bool:
    if part.depth >= max_depth:
        part.defects.append(f"nested deeper than {max_depth} levels; kept as one opaque part")
        return False
    if counter[0] >= MAX_PARTS:
        part.defects.append(f"more than {MAX_PARTS} parts; the rest is kept as opaque parts")
        return False
    if part.transfer_encoding not in IDENTITY_ENCODINGS:
        part.defects.append(f"container with transfer encoding {part.transfer_encoding!r}; kept as one opaque part")
        return False
    return True


def _read_content_fields(part: Part, default_type: str) -> None:
    """Fill the part's content type, parameters, encoding, disposition and filename."""
    message = Message()
    for item in part.fields:
        if item.key in _CONTENT_FIELDS and item.key not in message:
            message[item.key] = unfold(decode_bytes(item.value_bytes()))
    if not message.keys():
        part.content_type = default_type
        return

    try:
        type_params = _params_of(message, "content-type")
        disposition_params = _params_of(message, "content-disposition")
    except Exception as exc:
        # compat32's parameter code is lenient but not hardened against every crafted
        # value; a part whose headers break it is kept as opaque bytes.
        part.content_type = "application/octet-stream"
        part.defects.append(f"unreadable content fields ({type(exc).__name__})")
        return

    part.content_type = _clean_content_type(type_params[0][0] if type_params else "", default_type)
    part.params = type_params[1:]
    part.transfer_encoding = (first_token(message.get("content-transfer-encoding", "")) or "7bit").lower()
    if disposition_params:
        part.disposition = first_token(disposition_params[0][0].lower())

    charset = part.param("charset")
    part.charset = charset.strip().strip("\"'").lower() if charset else None
    if part.content_type.startswith("multipart/"):
        boundary = part.param("boundary")
        part.boundary = boundary.rstrip() if boundary else None
    filename = dict(disposition_params[1:]).get("filename") or part.param("name")
    part.filename = _clean_filename(filename)


def _params_of(message: Message, header: str) -> list[tuple[str, str]]:
    """Return [(value, ""), (name, value), ...] for one field, with RFC 2231 values decoded.

    Parameter names that are not RFC 2045 tokens are dropped, so none can carry a line
    break into a field the rewriter rebuilds.
    """
    params = message.get_params(failobj=[], header=header) or []
    if not params:
        return []
    collected = [(params[0][0].strip(), "")]
    for key, value in params[1:]:
        key = key.strip().lower()
        if _TOKEN.fullmatch(key):
            collected.append((key, collapse_rfc2231_value(value).strip()))
    return collected


def _clean_content_type(value: str, default_type: str) -> str:
    """Return the type/subtype at the start of `value`, or `default_type` (RFC 2045 section 5.2)."""
    match = _CONTENT_TYPE.match(value.lower())
    return match.group(0) if match else default_type


def _clean_filename(filename: str | None) -> str | None:
    if filename is None:
        return None
    if "=?" in filename:
        filename = decode_words(filename)
    filename = _CONTROL_CHARS.sub("", filename).strip()
    return filename or None


def _split_multipart(part: Part, counter: list[int], max_depth: int) -> None:
    if not part.boundary:
        part.defects.append("multipart without a boundary parameter; kept as one opaque part")
        return
    try:
        marker = b"--" + part.boundary.encode("ascii")
    except UnicodeEncodeError:
        part.defects.append("boundary with non-ASCII characters; kept as one opaque part")
        return

    delimiters, loose_line_seen = _find_delimiters(part.source, marker, part.body_start, part.end)
    if not delimiters or delimiters[0][2]:
        part.defects.append("no delimiter line for the boundary; kept as one opaque part")
        return
    if counter[0] + len(delimiters) > MAX_PARTS:
        part.defects.append(f"more than {MAX_PARTS} parts; kept as one opaque part")
        return
    if loose_line_seen:
        # RFC 2046 lets readers match only the start of a delimiter line, so some mail
        # clients split here where this walker (and compat32) does not.
        part.defects.append("a line starts with the boundary but has more text after it")

    child_default = "message/rfc822" if part.content_type == "multipart/digest" else "text/plain"
    for index, (line_start, line_end, is_close) in enumerate(delimiters):
        if is_close:
            part.close_delimiter = (line_start, line_end)
            break
        next_start = delimiters[index + 1][0] if index + 1 < len(delimiters) else part.end
        part.delimiters.append((line_start, line_end))
        child = _parse_part(part.source, line_end, next_start, part.depth + 1, child_default, counter, max_depth)
        part.children.append(child)

    if part.close_delimiter is None:
        part.defects.append("no closing delimiter; the last part runs to the end")


def _find_delimiters(
    source: bytes, marker: bytes, start: int, end: int
) -> tuple[list[tuple[int, int, bool]], bool]:
    """Return the delimiter lines in source[start:end], and whether a line only starts like one.

    Each delimiter is (line_start, line_end, is_close). line_start includes the line
    break before the delimiter, which belongs to it (RFC 2046 section 5.1.1); line_end
    is after the delimiter's own line break. The search stops after the closing
    delimiter.
    """
    found: list[tuple[int, int, bool]] = []
    loose_line_seen = False
    previous_end = start
    pos = start
    while True:
        index = source.find(marker, pos, end)
        if index < 0:
            return found, loose_line_seen

        if index == start:
            line_start = index
        elif source[index - 1] == 0x0A:
            line_start = index - 2 if index - 2 >= start and source[index - 2] == 0x0D else index - 1
        elif source[index - 1] == 0x0D:
            line_start = index - 1
        else:
            pos = index + 1
            continue
        line_start = max(line_start, previous_end)

        cursor = index + len(marker)
        is_close = source.startswith(b"--", cursor, end)
        if is_close:
            cursor += 2
        while cursor < end and source[cursor] in (0x20, 0x09):
            cursor += 1
        if cursor == end:
            line_end = end
        elif source.startswith(b"\r\n", cursor, end):
            line_end = cursor + 2
        elif source[cursor] in (0x0D, 0x0A):
            line_end = cursor + 1
        else:
            loose_line_seen = True
            pos = index + 1
            continue

        found.append((line_start, line_end, is_close))
        if is_close:
            return found, loose_line_seen
        previous_end = line_end
        pos = line_end


# --- attachments -------------------------------------------------------------


def iter_attachments(raw: bytes) -> list[AttachmentInfo]:
    """Return the attachments of a message, in message order.

    An attachment is every part that is not a container and not a text part (text/plain
    or text/html without `Content-Disposition: attachment`), and every message/rfc822
    part, whose contents are not listed separately. Parts inside multipart/signed count
    like any others, including the signature part. Never raises.
    """
    root = parse(raw)
    found: list[AttachmentInfo] = []
    _collect_attachments(root, found)
    return found


def _collect_attachments(part: Part, found: list[AttachmentInfo]) -> None:
    if part.is_multipart:
        for child in part.children:
            _collect_attachments(child, found)
        return
    if part.is_text_part():
        return
    size, head = _decoded_size_and_head(part)
    found.append(AttachmentInfo(part.filename, part.content_type, size, head))


def _decoded_size_and_head(part: Part) -> tuple[int, bytes]:
    """Return the decoded size and first 16 decoded bytes; base64 is sized without decoding it all."""
    if part.transfer_encoding == "base64":
        compact = part.raw_body.translate(None, b" \t\r\n")
        unpadded = compact.rstrip(b"=")
        padding = len(compact) - len(unpadded)
        well_formed = (
            len(compact) % 4 == 0 and padding <= 2 and b"=" not in unpadded and not compact.translate(None, _B64_CHARS)
        )
        if well_formed:
            size = len(compact) // 4 * 3 - padding
            head = decode_base64_lenient(compact[:24]) or b""
            return size, head[:16]
    decoded = part.decoded_payload()
    return len(decoded), decoded[:16]


# --- writing -----------------------------------------------------------------

_ATTRIBUTE_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!#$&+-.^_`|~")
_PARAM_CHUNK = 50  # characters of an RFC 2231 value per folded line, which then stays under 78


def format_content_field(name: str, value: str, params: list[tuple[str, str]]) -> bytes:
    """Return a Content-Type or Content-Disposition field, 7-bit and folded, ending in CRLF.

    Each parameter goes on its own folded line. A value that is printable ASCII is
    written as a token or a quoted-string; any other value, or one too long for a line,
    is written in RFC 2231 form (UTF-8, percent-encoded, split into continuations).
    """
    lines = [f"{name}: {value}"]
    for key, param_value in params:
        lines.extend(_format_param(key, param_value))
    return (";\r\n\t".join(lines) + "\r\n").encode("ascii")


def _format_param(key: str, value: str) -> list[str]:
    if value.isascii() and value.isprintable() and len(value) <= 900:
        if _TOKEN.fullmatch(value):
            return [f"{key}={value}"]
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return [f'{key}="{escaped}"']

    pieces = [_percent_encode(char) for char in value]
    if sum(map(len, pieces)) <= _PARAM_CHUNK:
        return [f"{key}*=utf-8''{''.join(pieces)}"]

    # Continuations split between characters, never inside one: some readers decode
    # each segment on its own.
    chunks = [""]
    for piece in pieces:
        if chunks[-1] and len(chunks[-1]) + len(piece) > _PARAM_CHUNK:
            chunks.append("")
        chunks[-1] += piece
    lines = [f"{key}*0*=utf-8''{chunks[0]}"]
    lines.extend(f"{key}*{index}*={chunk}" for index, chunk in enumerate(chunks[1:], start=1))
    return lines


def _percent_encode(char: str) -> str:
    return "".join(chr(byte) if byte in _ATTRIBUTE_CHARS else f"%{byte:02X}" for byte in char.encode("utf-8", "replace"))
