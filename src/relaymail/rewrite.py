"""Rewriting of a message for its recipient: identity, headers and text parts.

`rewrite(raw, spec)` returns the bytes to deliver. It is pure (no I/O) and follows
the relay's rewriting rules:

Headers. From, To, Message-ID, In-Reply-To and References are written from `spec`;
MIME-Version is always "1.0"; an optional Received field from `spec` goes on top. Of
the sender's fields only this allowlist survives, each taken from its first occurrence:
- Subject: decoded, sender addresses replaced by the alias, "[Importante]" and
  "[Important]" removed when asked, then re-encoded (RFC 2047, UTF-8, words of at most
  75 characters);
- Date: copied when it is ASCII and parses, else the current time;
- Content-Type, Content-Transfer-Encoding, Content-Disposition: copied when 7-bit with
  lines of at most 998 octets, else rebuilt from the parsed values (RFC 2231 for
  non-ASCII parameters); Content-Language: reduced to its language tags;
- Auto-Submitted, Precedence, Importance, Priority, X-Priority, X-MSMail-Priority,
  Sensitivity: reduced to their first keyword, so no comment or parameter can carry an
  address; X-Auto-Response-Suppress: reduced to its keywords (it requests that
  Exchange send no automatic reply, which helps stop auto-reply loops).
Everything else is dropped: Received, Return-Path, Sender, Reply-To, Cc, Bcc, DKIM and
ARC signatures, List-*, Resent-*, X-* and the rest. Thread-Topic and Thread-Index are
dropped too, because they repeat the sender's subject and conversation outside the
rewriting rules. Values that go into new fields have CR and LF removed, so an encoded
line break can never become a header line (CVE-2024-6923).

Text parts (text/plain and text/html that are not attachments, outside
multipart/signed, multipart/encrypted and message/rfc822) are decoded, so addresses
split by quoted-printable soft breaks are whole again; the sender's addresses are
replaced by the alias (also when written with HTML character references such as &#64;
or &commat;, or percent-encoded), and the banner line goes first: in
text/plain as its own line ending with a hard line break, in text/html as a <div> right
after the <body> tag. A changed text part keeps its charset when the charset can encode
it, else becomes UTF-8; HTML gets the banner as ASCII character references, so it
never changes charset for the banner. It is re-encoded as base64 when it was base64 or
is mostly non-ASCII, else as quoted-printable with CRLF soft breaks and lines of at
most 76 characters. A text part whose charset cannot be decoded even with the fallbacks
of `headers.decoding_codecs` keeps its bytes: only the addresses are replaced, on the
ASCII bytes, and it gets no banner.

Transport (every output line ends in CRLF and has at most 998 octets). Parts that need
no change are copied byte for byte. In a part that does need a transport fix:
- a bare CR or LF becomes CRLF in header fields, in base64 and quoted-printable bodies
  (their line breaks are not content), and in 7bit/8bit/binary bodies of text/*,
  message/* and multipart/* parts; any other 7bit/8bit/binary body with a bare CR or LF
  is re-encoded as base64, so its decoded bytes stay the same;
- a body line over 998 octets makes the part re-encoded with the same decoded bytes:
  quoted-printable for text/*, base64 for anything else. A multipart or message part
  that is too deeply nested or broken to open, and has such lines, is relabelled
  application/octet-stream so that base64 is legal;
- a header field line over 998 octets is refolded at white space; Content-Type and
  Content-Disposition that cannot be refolded are rebuilt; other such fields are dropped;
- a boundary longer than 70 characters (the RFC 2046 limit) is replaced.
These fixes also apply inside signed parts, where they break the signature; senders
that follow RFC 1847 never need them. Bodies declared 8bit and raw 8-bit bytes in the
header fields of MIME parts pass unchanged, so the next hop must accept 8BITMIME.

Raises ValueError when `spec` holds an invalid value (a name with control characters,
an address that is not an ASCII addr-spec, a msg-id with spaces); callers validate
earlier. Raises RewriteError when the result would still contain one of
`spec.sender_addresses`, outside attachments (a signed text part, a part header, a
preamble), or, as a last guard, when the output would break the transport rules.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import functools
import hashlib
import html
import re
from dataclasses import dataclass, field
from typing import Callable
from email.utils import formatdate, parsedate_to_datetime

from . import mime
from .errors import MessageError
from .headers import (
    HeaderField,
    decode_base64_lenient,
    decode_bytes,
    decode_words,
    decoded_subject,
    decoding_codecs,
    exact_codec,
    first_field,
    first_token,
    unfold,
)
from .mime import Part, format_content_field, to_crlf

MAX_LINE_OCTETS = 998
FOLD_AT = 78
MAX_BOUNDARY_CHARS = 70

KEYWORD_FIELDS = {
    "auto-submitted": "Auto-Submitted",
    "precedence": "Precedence",
    "importance": "Importance",
    "priority": "Priority",
    "x-priority": "X-Priority",
    "x-msmail-priority": "X-MSMail-Priority",
    "sensitivity": "Sensitivity",
}

_ADDR_SPEC = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)+"
)
_MSGID = re.compile(r"[\x21-\x3b\x3d\x3f-\x7e]+")  # printable ASCII without '<' and '>'
# A display-name word written as a plain atom: atext without '=' and '?', so it can
# never look like an encoded-word, and short enough for one line.
_PLAIN_WORD = re.compile(r"[A-Za-z0-9!#$%&'*+/^_`{|}~-]{1,60}")
_PHRASE_WORD_MAX = FOLD_AT - len("From: ")  # so "From: " plus one encoded-word fits in 78
_Q_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!*+-/")
_SUBJECT_TAG = re.compile(r"\s*\[(?:importante|important)\]", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# Unicode categories Cc (C0 and C1 controls), Zl and Zp: nothing that a header line may hold.
_LINE_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_FOLD_POINT = re.compile(r"(?<=[^ \t])(?=[ \t])")
_FOLD_POINT_BYTES = re.compile(rb"(?<=[^ \t])(?=[ \t])")
_LANGUAGE_TAG = re.compile(r"[A-Za-z]{1,8}(?:-[A-Za-z0-9]{1,8})*")
_KEYWORD = re.compile(r"[A-Za-z0-9-]+")
_BODY_TAG = re.compile(r"<body\b[^>]*>", re.IGNORECASE)
_HEAD_END = re.compile(r"</head\s*>", re.IGNORECASE)
_HTML_TAG = re.compile(r"<html\b[^>]*>", re.IGNORECASE)
_DOCTYPE = re.compile(r"\s*<!doctype[^>]*>", re.IGNORECASE)
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
_ASCII_BYTES = bytes(range(128))

# Modes of the part walk: text parts may change; only a leak check (signed or
# encrypted content); nothing checked (inside an attachment such as message/rfc822).
_MODIFY, _SEALED, _ATTACHED = "modify", "sealed", "attached"


class RewriteError(MessageError):
    """The message cannot be rewritten without revealing a sender address or breaking the transport rules."""


@dataclass
class RewriteSpec:
    """The identity, threading and added line that one rewritten message shows its recipient."""

    from_name: str  # display name for From: a business name, or the buyer's name or "Comprador"
    from_address: str  # the alias shown in From; also replaces the sender's real addresses
    to_address: str  # the recipient's own real address
    message_id: str  # new Message-ID without angle brackets, at the marketplace domain
    in_reply_to: list[str]  # already mapped, without angle brackets; empty drops the field
    references: list[str]
    banner: str | None  # one plain-text line added at the top of every text part
    sender_addresses: list[str]  # the sender's real addresses, replaced by from_address
    received: str | None = None  # value of a Received field added on top, already formatted
    strip_subject_tags: bool = False  # remove "[Importante]" and "[Important]" from Subject
    # (label, ASCII URL) pairs shown under the banner: the seller's one-click links.
    banner_links: list[tuple[str, str]] = field(default_factory=list)
    # Applied to the decoded Subject and text parts after the address replacement: the
    # content rules' "redact" action (contact details replaced by a placeholder).
    redact: Callable[[str], str] | None = None


@dataclass
class _Content:
    """A part's new body, with replacement fields when its type or encoding changed."""

    body: bytes
    content_type: bytes | None = None
    transfer_encoding: bytes | None = None


class _LineCheck:
    """Offsets in the raw message that break the transport rules (bare CR or LF, lines over 998 octets)."""

    def __init__(self, source: bytes):
        self.bad: list[tuple[int, int]] = []
        self.starts: list[int] = []
        if transport_clean(source):
            return

        line_start = 0
        for match in _LINE_BREAK.finditer(source):
            if match.start() - line_start > MAX_LINE_OCTETS:
                self.bad.append((line_start, match.start()))
            if match.group() != b"\r\n":
                self.bad.append((match.start(), match.end()))
            line_start = match.end()
        if len(source) - line_start > MAX_LINE_OCTETS:
            self.bad.append((line_start, len(source)))
        self.starts = [start for start, _end in self.bad]

    def is_clean(self, start: int, end: int) -> bool:
        """Return True when source[start:end] touches no bad line or line break."""
        if not self.bad or start >= end:
            return True
        # The intervals are disjoint and sorted, so only the last one starting before
        # `end` can reach into the span.
        index = bisect.bisect_left(self.starts, end)
        return index == 0 or self.bad[index - 1][1] <= start


class _Context:
    """State shared by one rewrite: the source, the spec, and what the leak check must read."""

    def __init__(self, source: bytes, spec: RewriteSpec):
        self.source = source
        self.spec = spec
        self.lines = _LineCheck(source)
        addresses = tuple(sorted({a.strip().lower() for a in spec.sender_addresses if a and a.strip()}))
        self.addresses = addresses
        self.text_pattern = _address_pattern(addresses) if addresses else None
        self.bytes_pattern = _address_pattern_bytes(addresses) if addresses else None
        # The recipient may see their own address; everything else of the sender's is a leak.
        self.leak_forms = [
            form
            for address in addresses
            if address != spec.to_address.lower()
            for form in (address, address.replace("@", "%40"))
        ]
        self.checked: list[tuple[str, str | bytes]] = []

    def is_clean(self, start: int, end: int) -> bool:
        return self.lines.is_clean(start, end)

    def replace_text(self, text: str) -> str:
        if self.text_pattern is not None and _may_hold_address(text):
            text = self.text_pattern.sub(self.spec.from_address, text)
        if self.spec.redact is not None:
            text = self.spec.redact(text)
        return text

    def replace_bytes(self, data: bytes) -> bytes:
        if self.bytes_pattern is None:
            return data
        return self.bytes_pattern.sub(self.spec.from_address.encode("ascii"), data)

    def record(self, where: str, material: str | bytes) -> None:
        """Queue text for the leak check."""
        if self.leak_forms:
            self.checked.append((where, material))


# --- entry point ---------------------------------------------------------------


def rewrite(raw: bytes, spec: RewriteSpec) -> bytes:
    """Return `raw` rewritten for the recipient as the module docstring describes.

    Raises ValueError for an invalid `spec` and RewriteError when the result would
    reveal a sender address or break the transport rules.
    """
    _validate_spec(spec)
    context = _Context(raw, spec)
    root = mime.parse(raw)

    content = _render_content(root, context, _MODIFY)
    body = content.body if content is not None else raw[root.body_start : root.end]
    header_block = b"".join(_top_fields(root, content, context))

    output = header_block + b"\r\n" + body
    if not output.endswith(b"\r\n"):
        output += b"\r\n"

    _check_leaks(context, _without_to_field(header_block))
    _check_transport(output, header_block)
    return output


def _validate_spec(spec: RewriteSpec) -> None:
    _validate_line("from_name", spec.from_name)
    if not _ADDR_SPEC.fullmatch(spec.from_address or ""):
        raise ValueError(f"from_address {spec.from_address!r} is not an ASCII addr-spec with a dotted domain")
    if not _ADDR_SPEC.fullmatch(spec.to_address or ""):
        raise ValueError("to_address is not an ASCII addr-spec with a dotted domain")
    for name, ids in (("message_id", [spec.message_id]), ("in_reply_to", spec.in_reply_to), ("references", spec.references)):
        for msgid in ids:
            if not msgid or len(msgid) > 900 or not _MSGID.fullmatch(msgid):
                raise ValueError(f"{name}: {msgid!r} is not a msg-id (printable ASCII without '<', '>' or spaces)")
    if spec.banner is not None:
        _validate_line("banner", spec.banner)
    for label, url in spec.banner_links:
        _validate_line("banner link label", label)
        if not url.isascii() or _LINE_CONTROL.search(url) or " " in url or '"' in url:
            raise ValueError("banner link URL must be ASCII without spaces, quotes or controls")
    if spec.received is not None:
        _validate_line("received", spec.received)
        if not spec.received.isascii():
            raise ValueError("received must be ASCII")


def _validate_line(name: str, value: str) -> None:
    match = _LINE_CONTROL.search(value)
    if match:
        raise ValueError(
            f"{name} contains the control character U+{ord(match.group()):04X}; remove line breaks and controls"
        )


# --- parts ---------------------------------------------------------------------


def _render_part(part: Part, context: _Context, mode: str) -> bytes | None:
    """Return a non-root part's new bytes, or None when its raw bytes can be sent as they are."""
    if mode != _ATTACHED and (part.is_multipart or part.is_text_part()):
        context.record("the header of a MIME part", part.raw_headers)
    content = _render_content(part, context, mode)
    if content is None and context.is_clean(part.start, part.body_start):
        return None

    if content is None:
        content = _Content(context.source[part.body_start : part.end])
    return b"".join(_part_fields(part, content)) + b"\r\n" + content.body


def _render_content(part: Part, context: _Context, mode: str) -> _Content | None:
    """Return the part's new body and fields, or None when body and content fields stay as they are."""
    if part.is_multipart:
        return _render_multipart(part, context, mode)
    if part.is_message:
        return _render_message(part, context)
    if part.is_text_part() and mode == _MODIFY:
        return _render_text(part, context)
    if part.is_text_part() and mode == _SEALED:
        context.record("a signed or encrypted text part", _decode_for_check(part))
    return _render_leaf(part, context)


def _render_multipart(part: Part, context: _Context, mode: str) -> _Content | None:
    child_mode = _SEALED if mode == _MODIFY and part.content_type in mime.SEALED_TYPES else mode
    rendered = [_render_part(child, context, child_mode) for child in part.children]
    children_unchanged = all(item is None for item in rendered)
    children = [
        item if item is not None else context.source[child.start : child.end]
        for item, child in zip(rendered, part.children)
    ]

    spans = list(part.delimiters)
    if part.close_delimiter is not None:
        spans.append(part.close_delimiter)
    needs_new_boundary = len(part.boundary or "") > MAX_BOUNDARY_CHARS or not all(
        _lines_fit(to_crlf(context.source[start:end])) for start, end in spans
    )

    preamble = _filler(part.preamble, context, mode)
    epilogue = _filler(part.epilogue, context, mode)
    own_clean = context.is_clean(part.body_start, spans[0][0]) and all(context.is_clean(s, e) for s, e in spans)
    if part.close_delimiter is not None:
        own_clean = own_clean and context.is_clean(part.close_delimiter[1], part.end)
    if (
        children_unchanged
        and own_clean
        and not needs_new_boundary
        and preamble == part.preamble
        and epilogue == part.epilogue
    ):
        return None

    boundary = _fresh_boundary(part, [preamble, epilogue, *children]) if needs_new_boundary else None
    pieces = [preamble]
    for (start, end), child_bytes in zip(part.delimiters, children):
        pieces.append(_delimiter(context.source[start:end], boundary, close=False))
        pieces.append(child_bytes)
    if part.close_delimiter is not None:
        start, end = part.close_delimiter
        pieces.append(_delimiter(context.source[start:end], boundary, close=True))
        pieces.append(epilogue)

    content = _Content(b"".join(pieces))
    if boundary is not None:
        params = [(key, boundary if key == "boundary" else value) for key, value in part.params]
        content.content_type = format_content_field("Content-Type", part.content_type, params)
    return content


def _filler(data: bytes, context: _Context, mode: str) -> bytes:
    """Return a preamble or epilogue fit to send: CRLF line breaks, no address, no over-long line.

    MIME readers ignore these texts, so one with an over-long line is dropped whole.
    """
    if not data:
        return data
    if mode == _MODIFY:
        data = context.replace_bytes(data)
    if mode != _ATTACHED:
        context.record("a multipart preamble or epilogue", data)
    data = to_crlf(data)
    return data if _lines_fit(data) else b""


def _delimiter(raw: bytes, boundary: str | None, close: bool) -> bytes:
    if boundary is None:
        return to_crlf(raw)
    lead = b"\r\n" if raw[:1] in (b"\r", b"\n") else b""
    trail = b"\r\n" if raw.endswith((b"\r", b"\n")) else b""
    return lead + b"--" + boundary.encode("ascii") + (b"--" if close else b"") + trail


def _fresh_boundary(part: Part, pieces: list[bytes]) -> str:
    """Return a boundary that occurs in none of `pieces` (the part's new preamble, epilogue and children)."""
    digest = hashlib.sha256(part.raw_body).hexdigest()
    for attempt in range(1000):
        candidate = f"=_relaymail_{digest[:24]}_{attempt}"
        marker = b"--" + candidate.encode("ascii")
        if not any(marker in piece for piece in pieces):
            return candidate
    raise RewriteError("no unused MIME boundary found for a multipart part")


def _render_message(part: Part, context: _Context) -> _Content | None:
    rendered = _render_part(part.children[0], context, _ATTACHED)
    return _Content(rendered) if rendered is not None else None


def _render_leaf(part: Part, context: _Context) -> _Content | None:
    """Apply only the transport fixes to a part whose content must not change."""
    if context.is_clean(part.body_start, part.end):
        return None

    body = part.raw_body
    encoding = part.transfer_encoding
    major = part.content_type.split("/", 1)[0]
    normalized = to_crlf(body)
    line_breaks_are_transport = encoding in ("base64", "quoted-printable") or major in ("text", "message", "multipart")
    if _lines_fit(normalized) and line_breaks_are_transport:
        return _Content(normalized)

    if encoding in ("base64", "quoted-printable"):
        data = part.decoded_payload()
    elif major == "text":
        data = normalized
    else:
        data = body

    content = _Content(b"")
    if major == "text" and encoding != "base64":
        content.body, content.transfer_encoding = _encode_quoted_printable(data)
        return content

    content.body, content.transfer_encoding = _encode_base64(data)
    if major == "multipart" or part.content_type in mime.NO_BASE64_TYPES:
        content.content_type = format_content_field("Content-Type", "application/octet-stream", [])
    return content


# --- text parts ----------------------------------------------------------------


def _render_text(part: Part, context: _Context) -> _Content | None:
    data, was_base64 = _transport_decode(part)
    text, _codec = _decode_text(data, part.charset)
    if text is None:
        return _render_undecodable_text(part, context, data, was_base64)

    new_text = context.replace_text(text)
    if context.spec.banner and context.spec.banner.strip():
        new_text = _add_banner(new_text, part, context.spec.banner, context.spec.banner_links)
    context.record("a text part", new_text)
    if new_text == text and context.is_clean(part.body_start, part.end):
        return None

    encoded, charset_changed = _encode_text(new_text, part.charset)
    content = _Content(b"")
    if _prefer_base64(encoded, was_base64):
        content.body, content.transfer_encoding = _encode_base64(encoded)
    else:
        content.body, content.transfer_encoding = _encode_quoted_printable(encoded)
    if charset_changed:
        params = [(key, value) for key, value in part.params if key != "charset"]
        params.insert(0, ("charset", "utf-8"))
        content.content_type = format_content_field("Content-Type", part.content_type, params)
    return content


def _transport_decode(part: Part) -> tuple[bytes, bool]:
    """Return the part's decoded bytes, with transport line breaks made CRLF, and whether it was base64."""
    if part.transfer_encoding == "base64":
        return decode_base64_lenient(part.raw_body) or b"", True
    if part.transfer_encoding == "quoted-printable":
        return binascii.a2b_qp(to_crlf(part.raw_body)), False
    return to_crlf(part.raw_body), False


def _decode_text(data: bytes, charset: str | None) -> tuple[str | None, str | None]:
    for codec in decoding_codecs(charset):
        try:
            return data.decode(codec), codec
        except UnicodeDecodeError:
            continue
    return None, None


def _decode_for_check(part: Part) -> str:
    data, _was_base64 = _transport_decode(part)
    return data.decode(decoding_codecs(part.charset)[0], "replace")


def _render_undecodable_text(part: Part, context: _Context, data: bytes, was_base64: bool) -> _Content | None:
    """Replace addresses on the ASCII bytes of a text part whose charset is unusable; no banner."""
    new_data = context.replace_bytes(data)
    context.record("a text part in an unknown charset", new_data)
    if new_data == data and context.is_clean(part.body_start, part.end):
        return None
    content = _Content(b"")
    if was_base64:
        content.body, content.transfer_encoding = _encode_base64(new_data)
    else:
        content.body, content.transfer_encoding = _encode_quoted_printable(new_data)
    return content


def _encode_text(text: str, charset: str | None) -> tuple[bytes, bool]:
    """Encode in the part's own charset when it can hold the text, else UTF-8; return (bytes, changed)."""
    codec = exact_codec(charset) if charset else "ascii"
    if codec is not None and _ascii_compatible(codec):
        try:
            return text.encode(codec), False
        except UnicodeEncodeError:
            pass
    return text.encode("utf-8", "surrogateescape"), True


@functools.lru_cache(maxsize=64)
def _ascii_compatible(codec: str) -> bool:
    """Return True when the codec writes ASCII (line breaks and '=' included) as ASCII bytes."""
    probe = "\r\n azAZ09=<>+-./@&;"
    try:
        return probe.encode(codec) == probe.encode("ascii")
    except (UnicodeError, LookupError):
        return False


def _add_banner(text: str, part: Part, banner: str, links: list[tuple[str, str]] = ()) -> str:
    banner = banner.strip()
    if part.content_type == "text/html":
        return _add_html_banner(text, banner, links)

    lines = [banner] + [f"{label.strip()}: {url}" for label, url in links]
    # A flowed line that starts with a space, ">" or "From " must be space-stuffed (RFC 3676).
    if part.param("format") == "flowed":
        lines = [" " + line if line.startswith((">", "From ")) else line for line in lines]
    newline = "\n" if "\n" in text and "\r\n" not in text else "\r\n"
    return newline.join(lines) + newline + text


def _ascii_html(text: str) -> str:
    escaped = html.escape(text, quote=False)
    return "".join(char if ord(char) < 128 else f"&#{ord(char)};" for char in escaped)


def _add_html_banner(text: str, banner: str, links: list[tuple[str, str]] = ()) -> str:
    """Insert the banner as a <div> after <body>, else after </head> or <html>, else first."""
    anchors = " &middot; ".join(
        f'<a href="{html.escape(url, quote=True)}">{_ascii_html(label.strip())}</a>' for label, url in links
    )
    snippet = "<div>" + _ascii_html(banner) + ("<br>" + anchors if anchors else "") + "</div>"
    for pattern in (_BODY_TAG, _HEAD_END, _HTML_TAG):
        match = pattern.search(text)
        if match:
            return text[: match.end()] + snippet + text[match.end() :]
    match = _DOCTYPE.match(text)
    position = match.end() if match else 0
    return text[:position] + snippet + text[position:]


def _prefer_base64(data: bytes, was_base64: bool) -> bool:
    """Base64 when the part was base64 or more than a third of its bytes are 8-bit."""
    if was_base64:
        return True
    eight_bit = len(data.translate(None, _ASCII_BYTES))
    return eight_bit * 3 > len(data)


def _encode_quoted_printable(data: bytes) -> tuple[bytes, bytes]:
    """Return (body, field): quoted-printable with CRLF line breaks and lines of at most 76 characters.

    CRLF in `data` becomes a hard line break; a lone CR or LF is escaped (=0D, =0A), so
    the decoded bytes equal `data`. binascii.b2a_qp uses "=\\n" soft breaks when its
    input has no CRLF, so each line is encoded on its own and the soft breaks are
    turned into "=\\r\\n". Data that does not end in CRLF gets a final soft break, so
    the body ends in CRLF without adding a line break to the decoded text.
    """
    lines = data.split(b"\r\n")
    encoded = b"\r\n".join(binascii.b2a_qp(line, istext=False).replace(b"\n", b"\r\n") for line in lines)
    if encoded and not encoded.endswith(b"\r\n"):
        encoded += b"=\r\n"
    return encoded, b"Content-Transfer-Encoding: quoted-printable\r\n"


def _encode_base64(data: bytes) -> tuple[bytes, bytes]:
    body = base64.encodebytes(data).replace(b"\n", b"\r\n")
    return body, b"Content-Transfer-Encoding: base64\r\n"


# --- part header fields ----------------------------------------------------------


def _part_fields(part: Part, content: _Content) -> list[bytes]:
    """Return the header fields of a non-root part, with the content's replacements applied."""
    fields: list[bytes] = []
    type_written = encoding_written = False
    for item in part.fields:
        if item.key == "content-type" and content.content_type is not None:
            if not type_written:
                fields.append(content.content_type)
                type_written = True
            continue
        if item.key == "content-transfer-encoding" and content.transfer_encoding is not None:
            if not encoding_written:
                fields.append(content.transfer_encoding)
                encoding_written = True
            continue
        safe = _safe_field(item, part)
        if safe is not None:
            fields.append(safe)

    if content.content_type is not None and not type_written:
        fields.append(content.content_type)
    if content.transfer_encoding is not None and not encoding_written:
        fields.append(content.transfer_encoding)
    return fields


def _safe_field(item: HeaderField, part: Part) -> bytes | None:
    """Return the field with CRLF line breaks and lines of at most 998 octets, or None to drop it."""
    data = to_crlf(item.raw)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    if _lines_fit(data):
        return data

    refolded = _fold_bytes(data[:-2].replace(b"\r\n", b""), MAX_LINE_OCTETS)
    if refolded is not None:
        return refolded + b"\r\n"
    if item.key == "content-type":
        return format_content_field("Content-Type", part.content_type, part.params)
    if item.key == "content-disposition":
        params = [("filename", part.filename)] if part.filename else []
        return format_content_field("Content-Disposition", part.disposition or "attachment", params)
    return None


def _lines_fit(data: bytes) -> bool:
    return max(map(len, data.split(b"\r\n"))) <= MAX_LINE_OCTETS


def _fold_bytes(line: bytes, limit: int) -> bytes | None:
    """Fold one unfolded field at white space into lines of at most `limit` octets; None if impossible."""
    pieces = _FOLD_POINT_BYTES.split(line)
    lines: list[bytes] = []
    current = b""
    for piece in pieces:
        if current and len(current) + len(piece) > limit:
            lines.append(current)
            current = piece
        else:
            current += piece
    lines.append(current)
    if any(len(folded) > limit for folded in lines):
        return None
    return b"\r\n".join(lines)


# --- top-level header ------------------------------------------------------------


def _top_fields(root: Part, content: _Content | None, context: _Context) -> list[bytes]:
    spec = context.spec
    fields: list[bytes] = []
    if spec.received:
        fields.append(_fold_text_field("Received", spec.received))
    fields.append(format_from(spec.from_name, spec.from_address))
    fields.append(f"To: {spec.to_address}\r\n".encode("ascii"))

    subject_field = first_field(root.fields, "subject")
    if subject_field is not None:
        fields.append(_subject_field(subject_field, context))
    fields.append(_date_field(first_field(root.fields, "date")))
    fields.append(f"Message-ID: <{spec.message_id}>\r\n".encode("ascii"))
    if spec.in_reply_to:
        fields.append(_msgids_field("In-Reply-To", spec.in_reply_to))
    if spec.references:
        fields.append(_msgids_field("References", spec.references))
    fields.append(b"MIME-Version: 1.0\r\n")

    fields.extend(_root_content_fields(root, content))
    fields.extend(_keyword_fields(root.fields))
    return fields


@functools.lru_cache(maxsize=1024)
def format_from(name: str, address: str) -> bytes:
    """Return a From field with one mailbox whose display name decodes to exactly `name`.

    Words made only of letters, digits and a few safe symbols are written as plain
    atoms. Every other run of words, spaces included, becomes UTF-8 encoded-words. Their
    Q encoding allows only the characters RFC 2047 section 5 permits in a phrase, so a
    comma, quote or '@' in the name can never split the field into two mailboxes.
    Folding happens only at the spaces between tokens, which the name has anyway.

    Plain atoms also keep encoded-words apart: Python 3.11.7's policy.default turns the
    white space between two adjacent encoded-words of a display name into a space,
    where RFC 2047 section 6.2 says to drop it. A run with no plain word in it that is
    too long for one encoded-word still needs adjacent words, and there the two
    readings differ (see `_phrase_tokens`). That parser also collapses runs of spaces
    in a display name, which RFC 2047 readers keep.

    Raises ValueError for a name with control characters or an address that is not an
    ASCII addr-spec.
    """
    _validate_line("from_name", name)
    if not _ADDR_SPEC.fullmatch(address):
        raise ValueError(f"from_address {address!r} is not an ASCII addr-spec with a dotted domain")
    if not name:
        return f"From: {address}\r\n".encode("ascii")

    lines = ["From:"]
    for token in _phrase_tokens(name) + [f"<{address}>"]:
        if lines[-1] != "From:" and len(lines[-1]) + 1 + len(token) > FOLD_AT:
            lines.append(" " + token)
        else:
            lines[-1] += " " + token
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


def _phrase_tokens(name: str) -> list[str]:
    """Split a display name into plain atoms and encoded-words, joined by single spaces when written.

    A plain atom must sit between single spaces, so the words next to a double,
    leading or trailing space are encoded together with it ("_" keeps each space).
    NOTE: a run of non-plain words longer than one encoded-word (about 20 CJK
    characters) is split into adjacent encoded-words. RFC 2047 readers decode it
    exactly; Python 3.11.7's policy.default shows a space at each split.
    """
    words = name.split(" ")
    plain = [bool(_PLAIN_WORD.fullmatch(word)) for word in words]
    for index, word in enumerate(words):
        if not word:
            for neighbour in (index - 1, index + 1):
                if 0 <= neighbour < len(words):
                    plain[neighbour] = False

    tokens: list[str] = []
    run: list[str] = []
    for word, is_plain in zip(words, plain):
        if not is_plain:
            run.append(word)
            continue
        if run:
            tokens.extend(_encoded_words(" ".join(run), _PHRASE_WORD_MAX, _PHRASE_WORD_MAX))
            run = []
        tokens.append(word)
    if run:
        tokens.extend(_encoded_words(" ".join(run), _PHRASE_WORD_MAX, _PHRASE_WORD_MAX))
    return tokens


def format_unstructured(name: str, text: str) -> bytes:
    """Return an unstructured field (such as Subject) that decodes to `text`, 7-bit and folded.

    CR, LF and other control characters become spaces, and leading and trailing white
    space is removed. Printable ASCII without "=?" is folded at white space; anything
    else is written as UTF-8 encoded-words.
    """
    text = _CONTROL.sub(" ", text).replace("\t", " ").strip()
    if not text:
        return f"{name}:\r\n".encode("ascii")
    if text.isascii() and "=?" not in text:
        folded = _fold_text(f"{name}: {text}", FOLD_AT)
        if all(len(line) <= MAX_LINE_OCTETS for line in folded.split("\r\n")):
            return (folded + "\r\n").encode("ascii")

    words = _encoded_words(text, first_room=FOLD_AT - len(name) - 2)
    lines = [f"{name}: {words[0]}"] + [" " + word for word in words[1:]]
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


def _encoded_words(text: str, first_room: int, room_after: int = 75) -> list[str]:
    """Split `text` into UTF-8 encoded-words of at most 75 characters, never splitting a character.

    White space between encoded-words is ignored when decoding, so spaces are encoded
    inside the words. B encoding is used when most characters are non-ASCII.
    """
    non_ascii = sum(1 for char in text if ord(char) > 127)
    use_base64 = non_ascii * 2 > len(text)
    prefix = "=?utf-8?b?" if use_base64 else "=?utf-8?q?"
    overhead = len(prefix) + 2
    room = max(min(75, first_room), 24) - overhead

    words: list[str] = []
    current: list[str] = []  # characters for B, encoded pieces for Q
    size = 0  # raw UTF-8 bytes for B, encoded characters for Q
    for char in text:
        piece = char if use_base64 else _q_piece(char)
        piece_size = len(char.encode("utf-8", "replace")) if use_base64 else len(piece)
        new_size = size + piece_size
        encoded_size = 4 * ((new_size + 2) // 3) if use_base64 else new_size
        if current and encoded_size > room:
            words.append(_finish_word(prefix, current, use_base64))
            current, new_size = [], piece_size
            room = min(75, room_after) - overhead
        current.append(piece)
        size = new_size
    if current:
        words.append(_finish_word(prefix, current, use_base64))
    return words


def _q_piece(char: str) -> str:
    if char in _Q_SAFE:
        return char
    if char == " ":
        return "_"
    return "".join(f"={byte:02X}" for byte in char.encode("utf-8", "replace"))


def _finish_word(prefix: str, pieces: list[str], use_base64: bool) -> str:
    payload = "".join(pieces)
    if use_base64:
        payload = base64.b64encode(payload.encode("utf-8", "replace")).decode("ascii")
    return f"{prefix}{payload}?="


def _fold_text(line: str, limit: int) -> str:
    """Fold a field at white space into lines of `limit` characters where words allow."""
    pieces = _FOLD_POINT.split(line)
    lines: list[str] = []
    current = ""
    for piece in pieces:
        if current and len(current) + len(piece) > limit:
            lines.append(current)
            current = piece
        else:
            current += piece
    lines.append(current)
    return "\r\n".join(lines)


def _fold_text_field(name: str, value: str) -> bytes:
    folded = _fold_text(f"{name}: {value}", FOLD_AT)
    if any(len(line) > MAX_LINE_OCTETS for line in folded.split("\r\n")):
        raise ValueError(f"{name.lower()} has a word longer than {MAX_LINE_OCTETS} octets")
    return (folded + "\r\n").encode("ascii")


def _subject_field(subject_field: HeaderField, context: _Context) -> bytes:
    text = context.replace_text(decoded_subject(subject_field))
    if context.spec.strip_subject_tags:
        text = _SUBJECT_TAG.sub("", text).strip()
    return format_unstructured("Subject", text)


def _date_field(date_field: HeaderField | None) -> bytes:
    if date_field is not None:
        value = " ".join(date_field.value().split())
        if value.isascii() and len(value) <= 200 and _parses_as_date(value):
            return f"Date: {value}\r\n".encode("ascii")
    return f"Date: {formatdate(usegmt=True)}\r\n".encode("ascii")


def _parses_as_date(value: str) -> bool:
    try:
        parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return False
    return True


def _msgids_field(name: str, ids: list[str]) -> bytes:
    lines = [f"{name}:"]
    for msgid in ids:
        token = f" <{msgid}>"
        if len(lines[-1]) + len(token) > FOLD_AT and lines[-1] != f"{name}:":
            lines.append(token)
        else:
            lines[-1] += token
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


def _root_content_fields(root: Part, content: _Content | None) -> list[bytes]:
    fields: list[bytes] = []

    if content is not None and content.content_type is not None:
        fields.append(content.content_type)
    else:
        type_field = first_field(root.fields, "content-type")
        if type_field is not None:
            fields.append(
                _usable_raw(type_field) or format_content_field("Content-Type", root.content_type, root.params)
            )

    if content is not None and content.transfer_encoding is not None:
        fields.append(content.transfer_encoding)
    elif first_field(root.fields, "content-transfer-encoding") is not None:
        fields.append(f"Content-Transfer-Encoding: {root.transfer_encoding}\r\n".encode("ascii", "replace"))

    disposition_field = first_field(root.fields, "content-disposition")
    if disposition_field is not None and root.disposition:
        params = [("filename", root.filename)] if root.filename else []
        fields.append(
            _usable_raw(disposition_field) or format_content_field("Content-Disposition", root.disposition, params)
        )

    language_field = first_field(root.fields, "content-language")
    if language_field is not None:
        tags = _LANGUAGE_TAG.findall(language_field.value())[:10]
        if tags:
            fields.append(f"Content-Language: {', '.join(tags)}\r\n".encode("ascii"))
    return fields


def _usable_raw(item: HeaderField) -> bytes | None:
    """Return the field's raw bytes with CRLF line breaks when 7-bit with lines of at most 998 octets."""
    data = to_crlf(item.raw)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    if data.isascii() and _lines_fit(data):
        return data
    return None


def _keyword_fields(fields: list[HeaderField]) -> list[bytes]:
    out: list[bytes] = []
    for key, name in KEYWORD_FIELDS.items():
        item = first_field(fields, key)
        token = first_token(item.value()) if item is not None else None
        if token and token.isascii():
            out.append(f"{name}: {token[:64]}\r\n".encode("ascii"))

    suppress = first_field(fields, "x-auto-response-suppress")
    if suppress is not None:
        keywords = [word for word in _KEYWORD.findall(suppress.value()) if word.isascii()][:10]
        if keywords:
            out.append(f"X-Auto-Response-Suppress: {', '.join(keywords)}\r\n".encode("ascii"))
    return out


# --- address replacement -----------------------------------------------------------

# Named HTML character references that mail tools use to hide addresses.
_NAMED_REFERENCES = {"@": ("&commat;",), ".": ("&period;",), "-": ("&hyphen;", "&dash;"), "_": ("&lowbar;",), "+": ("&plus;",)}


def _may_hold_address(text: str) -> bool:
    """Cheap pre-check: an address needs an '@', written plainly, as a reference ('&') or percent-encoded."""
    return "@" in text or "&" in text or "%" in text


def _char_pattern(char: str) -> str:
    """Return a regex for one address character, plain, as an HTML character reference, or percent-encoded."""
    options = [re.escape(char)]
    for code in sorted({ord(char), ord(char.lower()), ord(char.upper())}):
        options.append(f"&#0*{code}(?![0-9]);?")
        options.append(f"&#x0*{code:x}(?![0-9a-f]);?")
        if code < 128:
            options.append(f"%{code:02x}")
    options.extend(re.escape(reference) for reference in _NAMED_REFERENCES.get(char, ()))
    return "(?:" + "|".join(options) + ")"


def _address_regex(addresses: tuple[str, ...]) -> str:
    ordered = sorted(addresses, key=len, reverse=True)
    return "|".join("".join(_char_pattern(char) for char in address) for address in ordered)


@functools.lru_cache(maxsize=128)
def _address_pattern(addresses: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile(_address_regex(addresses), re.IGNORECASE)


@functools.lru_cache(maxsize=128)
def _address_pattern_bytes(addresses: tuple[str, ...]) -> re.Pattern[bytes]:
    ascii_only = tuple(address for address in addresses if address.isascii())
    if not ascii_only:
        return re.compile(rb"(?!)")
    return re.compile(_address_regex(ascii_only).encode("ascii"), re.IGNORECASE)


# --- final checks ---------------------------------------------------------------------


def _check_leaks(context: _Context, header_block: bytes) -> None:
    """Raise RewriteError when a sender address is left anywhere the recipient reads."""
    if not context.leak_forms:
        return
    header_text = header_block.decode("ascii", "replace")
    pieces: list[tuple[str, str | bytes]] = [
        ("the message header", header_text),
        ("the message header", decode_words(unfold(header_text))),
    ]
    pieces.extend(context.checked)

    for where, material in pieces:
        if isinstance(material, bytes):
            material = decode_bytes(material)
            material = material + "\n" + decode_words(unfold(material))
        lowered = material.lower()
        for form in context.leak_forms:
            if form in lowered:
                raise RewriteError(
                    f"a sender address would remain in {where}, which the relay may not change; "
                    "the sender must remove it from that part and send the message again"
                )


def _without_to_field(header_block: bytes) -> bytes:
    """Return the header block without the To field, which holds the recipient's own address.

    A sender address can be a substring of the recipient's address, and showing the
    recipient their own address reveals nothing.
    """
    lines = header_block.split(b"\r\n")
    return b"\r\n".join(line for line in lines if not line.lower().startswith(b"to:"))


def _check_transport(output: bytes, header_block: bytes) -> None:
    """Raise RewriteError unless every line ends in CRLF, fits 998 octets, and the header is 7-bit."""
    if not header_block.isascii():
        raise RewriteError("the rewritten header is not 7-bit")
    if not transport_clean(output):
        raise RewriteError(
            f"the rewritten message has a bare CR or LF, or a line over {MAX_LINE_OCTETS} octets"
        )


def transport_clean(data: bytes) -> bool:
    """Return True when every line break in `data` is CRLF and no line exceeds 998 octets."""
    lines = data.split(b"\r\n")
    line_breaks = len(lines) - 1
    if data.count(b"\n") != line_breaks or data.count(b"\r") != line_breaks:
        return False
    return max(map(len, lines)) <= MAX_LINE_OCTETS
