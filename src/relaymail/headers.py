"""Header parsing of raw messages: header fields, the sender's From, threading ids, auto-reply marks.

`parse_headers(raw)` reads only the header block of a message as received over SMTP and
returns the values the relay decides on (`ParsedHeaders`). It never raises: a From that
cannot be used gives `from_address=None` and a short English reason in `from_error`.

The From rule (RFC 5322 section 3.6.2): exactly one From field holding exactly one
mailbox, with a non-empty dot-atom local part and a domain of at least two labels. Two
parsers judge the value and must agree: `email.utils.getaddresses` (compat32) and the
`email.headerregistry` address parser of `policy.default`. Python 3.11.7's getaddresses
splits crafted values such as `alice@example.org)<bob@example.org>` into different
mailboxes than the header registry does (CVE-2023-27043), so any disagreement, any
invalid-syntax defect, or an '@' in the raw value that neither the mailbox nor the display
name accounts for makes the From "cannot be parsed". A display name is never searched
for an address.

Also here, because the MIME walker and the rewriter share them:
- `split_fields`: the header block of a message or MIME part cut into raw fields, with
  the same line rules as compat32's feed parser (a line that is neither a field, a
  continuation nor "From " ends the block and starts the body);
- `decode_words`: RFC 2047 encoded-words decoded leniently, never raising;
- `decoding_codecs` and `exact_codec`: charset labels mapped to Python codecs, with
  misspellings and supersets (gb2312 read as gb18030, iso-8859-1 as windows-1252).

Line breaks may be CRLF, LF or a bare CR: the SMTP path only delivers CRLF, but stored
and test messages use all three.
"""

from __future__ import annotations

import binascii
import codecs
import functools
import re
from dataclasses import dataclass, field
from email import errors as email_errors
from email.headerregistry import HeaderRegistry
from email.utils import getaddresses

# A From value longer than this is not judged. Real ones are far shorter, and the
# policy.default parser is slow and deeply recursive on long crafted values.
MAX_FROM_CHARS = 2000
# The same bound on the raw bytes, checked first so that the judgement cache never
# keeps a large value (UTF-8 and folding make the bytes longer than the characters).
MAX_FROM_BYTES = 4 * MAX_FROM_CHARS

# Subject prefixes that out-of-office and other automatic replies use (compared in lower case).
AUTO_REPLY_SUBJECT_PREFIXES = (
    "auto-reply",
    "autoreply",
    "automatic reply",
    "respuesta automática",
    "respuesta automatica",
    "out of office",
    "fuera de la oficina",
)

_LINE_BREAK = re.compile(rb"\r\n|\n|\r")
# compat32's rule for a header line: a possibly empty run of printable characters other
# than ':' and space, then ':'.
_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]*:")
_FOLDING = re.compile(r"\r\n|\n|\r")
_MSGID = re.compile(r"<([^<>]*)>")
_MSGID_CHARS = re.compile(r"[\x21-\x3b\x3d\x3f-\x7e]+")  # printable ASCII without '<' and '>'
_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([QqBb])\?(.*?)\?=")
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\u0080-\U0010ffff-]+"
_DOT_ATOM = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*")
_DOMAIN_LABEL = re.compile(r"[A-Za-z0-9\u0080-\U0010ffff](?:[A-Za-z0-9\u0080-\U0010ffff-]*[A-Za-z0-9\u0080-\U0010ffff])?")
_FIRST_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True, slots=True)
class HeaderField:
    """One header field as it appears in the message: name, colon, value and folded lines."""

    name: str
    key: str  # the name in lower case, for matching
    raw: bytes  # the whole field, including the line break that ends its last line

    def value_bytes(self) -> bytes:
        """Return the bytes after the colon, without the final line break."""
        value = self.raw[len(self.name) + 1 :]
        return value.rstrip(b"\r\n")

    def value(self) -> str:
        """Return the unfolded value as text, with raw 8-bit bytes decoded (see `decode_bytes`)."""
        return unfold(decode_bytes(self.value_bytes())).strip()


@dataclass
class ParsedHeaders:
    """The header values that receive and policy decide on."""

    from_address: str | None  # addr-spec of the one mailbox in the one From field, lower-cased
    from_error: str | None  # why from_address is None: "missing", "appears more than once", ...
    message_id: str | None  # without angle brackets
    in_reply_to: list[str] = field(default_factory=list)  # msg-ids without angle brackets
    references: list[str] = field(default_factory=list)
    subject: str = ""  # RFC 2047 decoded, without CR or LF
    auto_submitted: str | None = None  # lower-cased value
    precedence: str | None = None  # lower-cased value
    received_count: int = 0
    looks_automatic: bool = False
    header_end: int = 0  # offset of the first body byte in raw


# --- header block ----------------------------------------------------------


def split_fields(data: bytes, start: int = 0, end: int | None = None) -> tuple[list[HeaderField], int, int]:
    """Cut the header block that begins at `start` into fields.

    Returns (fields, headers_end, body_start). `headers_end` is the offset just after
    the last header line. `body_start` is the offset of the first body byte, after the
    empty separator line when there is one. A continuation line before any field and a
    "From " line (mbox envelope) are skipped, as compat32 does. A line that is neither a
    field nor a continuation ends the block with no separator: the body starts there.
    """
    if end is None:
        end = len(data)
    fields: list[HeaderField] = []
    field_start: int | None = None
    pos = start

    while pos < end:
        match = _LINE_BREAK.search(data, pos, end)
        content_end = match.start() if match else end
        line_end = match.end() if match else end

        if content_end == pos:
            _close_field(data, field_start, pos, fields)
            return fields, pos, line_end

        first_byte = data[pos]
        if first_byte in (0x20, 0x09):
            pass  # a continuation line belongs to the open field, if any
        elif _FIELD_NAME.match(data, pos, content_end):
            _close_field(data, field_start, pos, fields)
            field_start = pos
        elif data.startswith(b"From ", pos, content_end):
            _close_field(data, field_start, pos, fields)
            field_start = None
        else:
            _close_field(data, field_start, pos, fields)
            return fields, pos, pos

        pos = line_end

    _close_field(data, field_start, end, fields)
    return fields, end, end


def _close_field(data: bytes, field_start: int | None, field_end: int, fields: list[HeaderField]) -> None:
    if field_start is None:
        return
    raw = data[field_start:field_end]
    name = raw[: raw.index(b":")].decode("ascii")
    fields.append(HeaderField(name, name.lower(), raw))


def first_field(fields: list[HeaderField], key: str) -> HeaderField | None:
    """Return the first field named `key` (lower case), or None."""
    for item in fields:
        if item.key == key:
            return item
    return None


def decode_bytes(value: bytes) -> str:
    """Decode raw header bytes: ASCII, else UTF-8, else windows-1252, else Latin-1.

    Raw 8-bit header bytes are not MIME; UTF-8 (RFC 6532) is by far the most common
    source, and Latin-1 decodes anything, so this never raises.
    """
    try:
        return value.decode("ascii")
    except UnicodeDecodeError:
        pass
    for codec in ("utf-8", "cp1252"):
        try:
            return value.decode(codec)
        except UnicodeDecodeError:
            continue
    return value.decode("latin-1")


def unfold(value: str) -> str:
    """Remove the line breaks of folding (RFC 5322 section 2.2.3), keeping the white space after them."""
    return _FOLDING.sub("", value)


# --- RFC 2047 encoded-words --------------------------------------------------


def decode_words(value: str) -> str:
    """Decode the RFC 2047 encoded-words in an unfolded header value.

    White space between two encoded-words is dropped, as RFC 2047 section 6.2 requires.
    Adjacent words in the same charset are joined before decoding, so a character whose
    bytes were split between two words survives. A word in an unknown charset is read
    as UTF-8 with replacement characters; a word that is not valid base64 or Q stays as
    written. Never raises.
    """
    if "=?" not in value:
        return value

    pieces: list[str] = []
    pending_bytes = b""
    pending_charset: str | None = None
    pos = 0
    for match in _ENCODED_WORD.finditer(value):
        between = value[pos : match.start()]
        word = _decode_word_bytes(match.group(2), match.group(3))
        charset = match.group(1).split("*", 1)[0].lower()

        if between.strip(" \t\r\n") or pending_charset is None or word is None:
            pieces.append(_flush_word(pending_bytes, pending_charset))
            pending_bytes, pending_charset = b"", None
            pieces.append(between)
        elif charset != pending_charset:
            pieces.append(_flush_word(pending_bytes, pending_charset))
            pending_bytes, pending_charset = b"", None

        if word is None:
            pieces.append(match.group(0))
        else:
            pending_bytes += word
            pending_charset = charset
        pos = match.end()

    pieces.append(_flush_word(pending_bytes, pending_charset))
    pieces.append(value[pos:])
    return "".join(pieces)


def _decode_word_bytes(encoding: str, text: str) -> bytes | None:
    data = text.encode("ascii", "replace")
    if encoding in "Qq":
        return binascii.a2b_qp(data, header=True)
    decoded = decode_base64_lenient(data)
    return decoded if decoded or not data else None


def _flush_word(data: bytes, charset: str | None) -> str:
    if charset is None:
        return ""
    for codec in decoding_codecs(charset):
        try:
            return data.decode(codec)
        except UnicodeDecodeError:
            continue
    return data.decode("utf-8", "replace")


def decode_base64_lenient(data: bytes) -> bytes | None:
    """Decode base64, ignoring characters outside the alphabet and fixing missing padding.

    Returns None when nothing decodable remains.
    """
    try:
        return binascii.a2b_base64(data)
    except binascii.Error:
        pass
    alphabet_only = re.sub(rb"[^A-Za-z0-9+/]", b"", data)
    usable = len(alphabet_only) - len(alphabet_only) % 4
    remainder = alphabet_only[usable:]
    if len(remainder) >= 2:
        alphabet_only = alphabet_only[:usable] + remainder + b"=" * (4 - len(remainder))
    else:
        alphabet_only = alphabet_only[:usable]
    try:
        return binascii.a2b_base64(alphabet_only)
    except binascii.Error:
        return None


# --- charset labels ----------------------------------------------------------

# Labels read with a superset codec, because mailers often send the superset's
# characters under the smaller label (the same choices as the WHATWG Encoding Standard).
_SUPERSETS = {
    "us-ascii": "utf-8",
    "ascii": "utf-8",
    "ansi_x3.4-1968": "utf-8",
    "iso-8859-1": "cp1252",
    "iso8859-1": "cp1252",
    "iso_8859-1": "cp1252",
    "latin1": "cp1252",
    "latin-1": "cp1252",
    "l1": "cp1252",
    "iso-8859-9": "cp1254",
    "iso-8859-11": "cp874",
    "tis-620": "cp874",
    "gb2312": "gb18030",
    "gb_2312-80": "gb18030",
    "csgb2312": "gb18030",
    "euc-cn": "gb18030",
    "gbk": "gb18030",
    "x-gbk": "gb18030",
    "cp936": "gb18030",
    "big5": "big5hkscs",
    "euc-kr": "cp949",
    "ks_c_5601-1987": "cp949",
    "ks_c_5601": "cp949",
    "shift_jis": "cp932",
    "shift-jis": "cp932",
    "sjis": "cp932",
    "x-sjis": "cp932",
    "ms_kanji": "cp932",
    "iso-2022-jp": "iso2022_jp_2",
}

# Misspellings seen in real mail, compared after removing '-', '_', '.' and spaces.
_SPELLINGS = {
    "utf8": "utf-8",
    "uft8": "utf-8",
    "utf": "utf-8",
    "xutf8": "utf-8",
    "unicode11utf8": "utf-8",
    "usascii": "utf-8",
    "iso88591": "cp1252",
    "latin1": "cp1252",
    "iso885915": "iso8859-15",
    "windows1252": "cp1252",
    "win1252": "cp1252",
    "gb2312": "gb18030",
}

# Codecs that Python's registry finds for a label but that are not charsets, named with
# '_' (codecs.lookup writes some of them with '-').
_NOT_CHARSETS = {"idna", "punycode", "raw_unicode_escape", "unicode_escape", "undefined", "mbcs", "oem", "rot_13"}


def clean_charset_label(label: str | None) -> str:
    """Return a charset label lower-cased, without quotes, spaces or a trailing ';'."""
    if not label:
        return ""
    return label.strip().strip("\"';").strip().lower()


@functools.lru_cache(maxsize=256)
def exact_codec(label: str | None) -> str | None:
    """Return the Python codec that implements exactly the charset `label`, or None.

    None for an empty, unknown or misspelled label and for registry entries that are not
    charsets (idna, unicode_escape, ...).
    """
    label = clean_charset_label(label)
    if not label:
        return None
    try:
        info = codecs.lookup(label)
    except (LookupError, ValueError):
        return None
    if not getattr(info, "_is_text_encoding", True) or info.name.replace("-", "_") in _NOT_CHARSETS:
        return None
    return info.name


@functools.lru_cache(maxsize=256)
def decoding_codecs(label: str | None) -> tuple[str, ...]:
    """Return the codecs to try, in order, to decode text labelled `label`.

    The superset of the label (or the codec of its corrected spelling) comes first,
    then the exact codec, then UTF-8. A charset that is not ASCII-compatible (UTF-16,
    UTF-32) gets its own codec only. A missing label means US-ASCII, read as UTF-8.
    """
    label = clean_charset_label(label)
    candidates: list[str] = []

    exact = exact_codec(label)
    if exact and not _ascii_compatible(exact):
        # UTF-16 and UTF-32 text read as UTF-8 would come out as text broken by NUL characters.
        return (exact,)

    superset = _SUPERSETS.get(label) or _SPELLINGS.get(re.sub(r"[-_. ]", "", label))
    if superset:
        candidates.append(superset)
    if exact:
        candidates.append(exact)
    if superset == "cp1252":
        candidates.append("latin-1")  # windows-1252 leaves five bytes undefined
    candidates.append("utf-8")

    ordered: list[str] = []
    for name in candidates:
        codec = codecs.lookup(name).name
        if codec not in ordered:
            ordered.append(codec)
    return tuple(ordered)


@functools.lru_cache(maxsize=64)
def _ascii_compatible(codec: str) -> bool:
    try:
        return "ascii text\n".encode(codec) == b"ascii text\n"
    except (LookupError, UnicodeError):
        return False


# --- message ids -------------------------------------------------------------


def split_msgids(value: str) -> list[str]:
    """Return the msg-ids in a Message-ID, In-Reply-To or References value, without brackets.

    Ids are taken from <...>; white space inside them (from folding) is removed. When
    the value has no angle brackets at all, each white-space separated word containing
    '@' counts as an id. Ids with characters outside printable ASCII are dropped, and so
    are duplicates (first occurrence kept).
    """
    value = unfold(value)
    found = _MSGID.findall(value)
    if not found and "<" not in value:
        found = [word for word in value.split() if "@" in word]

    ids: list[str] = []
    for candidate in found:
        candidate = "".join(candidate.split())
        if not candidate or len(candidate) > 900 or not _MSGID_CHARS.fullmatch(candidate):
            continue
        if candidate not in ids:
            ids.append(candidate)
    return ids


# --- From ----------------------------------------------------------------------


_REGISTRY = HeaderRegistry()
_ALLOWED_DEFECTS = (email_errors.ObsoleteHeaderDefect, email_errors.NonASCIILocalPartDefect)


def judge_from(value: bytes) -> tuple[str | None, str | None]:
    """Return (address, None) for a usable From value, else (None, reason).

    `value` is the raw field value after the colon. Raw 8-bit bytes must be valid UTF-8
    (RFC 6532). See the module docstring for the rule and the two parsers.
    """
    if len(value) > MAX_FROM_BYTES:
        return None, "cannot be parsed"
    return _judge_from_value(value)


@functools.lru_cache(maxsize=4096)
def _judge_from_value(value: bytes) -> tuple[str | None, str | None]:
    """Return `judge_from`'s result for a value of at most MAX_FROM_BYTES.

    Results are cached by value, because the policy.default parser costs about 0.1 ms a
    call (measured on the case inputs) and one sender's From rarely changes.
    """
    try:
        text = unfold(value.decode("utf-8")).strip()
    except UnicodeDecodeError:
        return None, "cannot be parsed"
    if not text or len(text) > MAX_FROM_CHARS:
        return None, "cannot be parsed"

    compat_pairs = _compat_pairs(text)
    registry_addresses = _registry_addresses(text)
    if compat_pairs is None or registry_addresses is None:
        return None, "cannot be parsed"

    compat_specs = [addr.lower() for name, addr in compat_pairs]
    registry_specs = [address.addr_spec.lower() for address in registry_addresses]
    if compat_specs != registry_specs or not registry_specs:
        return None, "cannot be parsed"
    if len(registry_specs) > 1:
        if all(_valid_mailbox(a.username, a.domain) for a in registry_addresses):
            return None, "holds several mailboxes"
        return None, "cannot be parsed"

    mailbox = registry_addresses[0]
    if not _valid_mailbox(mailbox.username, mailbox.domain):
        return None, "cannot be parsed"

    # Each '@' in the raw value must be the mailbox's own or inside the display name.
    # One more means that a parser skipped part of the value.
    explained = 1 + mailbox.display_name.count("@")
    if text.count("@") > explained:
        return None, "cannot be parsed"
    return registry_specs[0], None


def _compat_pairs(text: str) -> list[tuple[str, str]] | None:
    """Parse with compat32's getaddresses; None if it raises."""
    try:
        return getaddresses([text])
    except Exception:
        # getaddresses has no documented exceptions, but it is not hardened against
        # crafted input; treat any failure like a disagreement.
        return None


def _registry_addresses(text: str) -> list | None:
    """Parse with policy.default's header registry; None on any error or invalid-syntax defect."""
    try:
        header = _REGISTRY("from", text)
        groups = header.groups
        addresses = list(header.addresses)
        defects = header.defects
    except Exception:
        # The registry parser raises IndexError, ValueError, RecursionError and others
        # on crafted values; every one of them means "cannot be parsed".
        return None
    if any(group.display_name is not None for group in groups):
        return None  # RFC 5322 does not allow group syntax in From
    if any(not isinstance(defect, _ALLOWED_DEFECTS) for defect in defects):
        return None
    return addresses


def _valid_mailbox(local_part: str, domain: str) -> bool:
    if not local_part or not _DOT_ATOM.fullmatch(local_part):
        return False
    labels = domain.split(".")
    if len(labels) < 2:
        return False
    return all(_DOMAIN_LABEL.fullmatch(label) for label in labels)


# --- parse_headers ------------------------------------------------------------


def parse_headers(raw: bytes) -> ParsedHeaders:
    """Parse the header block of `raw` and return the values the relay decides on. Never raises."""
    fields, _headers_end, body_start = split_fields(raw)

    from_fields = [item for item in fields if item.key == "from"]
    if not from_fields:
        from_address, from_error = None, "missing"
    elif len(from_fields) > 1:
        from_address, from_error = None, "appears more than once"
    else:
        from_address, from_error = judge_from(from_fields[0].value_bytes())

    message_id = None
    message_id_field = first_field(fields, "message-id")
    if message_id_field is not None:
        ids = split_msgids(message_id_field.value())
        message_id = ids[0] if ids else None

    in_reply_to = _msgids_of(first_field(fields, "in-reply-to"))
    references = _msgids_of(first_field(fields, "references"))
    subject = decoded_subject(first_field(fields, "subject"))
    auto_submitted = _lower_value(first_field(fields, "auto-submitted"))
    precedence = _lower_value(first_field(fields, "precedence"))
    received_count = sum(1 for item in fields if item.key == "received")

    parsed = ParsedHeaders(
        from_address=from_address,
        from_error=from_error,
        message_id=message_id,
        in_reply_to=in_reply_to,
        references=references,
        subject=subject,
        auto_submitted=auto_submitted,
        precedence=precedence,
        received_count=received_count,
        header_end=body_start,
    )
    parsed.looks_automatic = _looks_automatic(parsed, fields)
    return parsed


def decoded_subject(subject_field: HeaderField | None) -> str:
    """Return a Subject field's text: RFC 2047 decoded, without CR or LF, stripped; "" when absent."""
    if subject_field is None:
        return ""
    text = decode_words(subject_field.value())
    return _FOLDING.sub("", text).strip()


def _msgids_of(item: HeaderField | None) -> list[str]:
    return split_msgids(item.value()) if item is not None else []


def _lower_value(item: HeaderField | None) -> str | None:
    return item.value().lower() if item is not None else None


def first_token(value: str | None) -> str | None:
    """Return the first token of a keyword value ("auto-replied; x=y" gives "auto-replied"), or None."""
    if not value:
        return None
    match = _FIRST_TOKEN.match(value.strip())
    return match.group(0) if match else None


def _looks_automatic(parsed: ParsedHeaders, fields: list[HeaderField]) -> bool:
    auto_submitted = first_token(parsed.auto_submitted)
    if parsed.auto_submitted is not None and (auto_submitted or "").lower() != "no":
        return True
    if (first_token(parsed.precedence) or "").lower() in ("bulk", "junk", "list"):
        return True
    for key in ("x-autoreply", "x-autorespond"):
        marker = first_field(fields, key)
        if marker is not None and marker.value().lower() != "no":
            return True
    subject = parsed.subject.lower()
    return subject.startswith(AUTO_REPLY_SUBJECT_PREFIXES)
