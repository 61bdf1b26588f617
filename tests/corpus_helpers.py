"""Helpers of the corpus replay: pick files, prepare them for SMTP, send them, inspect the output.

The corpus is a folder of about 2,500 e-mail files copied byte for byte from the test
data of 16 public projects (mail parsers, MTAs, bounce handlers, spam filters, a fuzzer),
one subfolder per project. Nothing here modifies those files; every change is made on a
copy in memory.

Parsing of the output uses only the standard library's `email` package (compat32), so a
check never depends on relaymail's own MIME code, which is what is under test.
"""

from __future__ import annotations

import email
import email.errors
import email.header
import email.message
import email.policy
import hashlib
import html
import queue
import re
import smtplib
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from email.utils import getaddresses
from pathlib import Path

# Folders sent whole as buyer-to-seller mail. mimekit/ is included apart from its mbox
# files (mimekit/messages is the part with the most MIME variety).
FORWARD_FOLDERS = (
    "cpython-test-email",
    "mikel-mail",
    "zbateson-mail-mime-parser",
    "james-mime4j",
    "stalwart-mail-parser",
    "spamassassin",
    "flanker",
    "mimekit",
    "haraka",
    "nodemailer-mailparser",
    "spamscope-mail-parser",
)
GO_FUZZ_FOLDER = "go-fuzz-corpus-mail"
# Every GO_FUZZ_STRIDE-th go-fuzz file in name order: the files are fuzzer-minimised header
# garbage, so a deterministic slice covers the same ground as all 648 of them.
GO_FUZZ_STRIDE = 8

# Bounce and auto-reply folders replayed with a null envelope sender.
BOUNCE_FOLDERS = (
    "sisimai-set-of-emails/maildir/dos",
    "flufl-bounce",
    "perl-bounceparser",
    "php-bounce-handler",
)

# mbox files hold many messages each, so they are not one message's DATA. The raw TNEF
# payloads (mimekit-tnef/) are not messages either and are in no folder above.
MBOX_FILES = ("spamassassin/nice.mbox",)
MBOX_FOLDERS = ("mimekit/mbox",)

# compat32's test for a header line: a field name of printable ASCII other than ':' and
# space, then ':'. A line that is neither such a field, a continuation line nor an mbox
# "From " line ends the header block, and the body starts there.
_FIELD_LINE = re.compile(rb"[\x21-\x39\x3b-\x7e]*:")
_FROM_FIELD_LINE = re.compile(rb"from:", re.IGNORECASE)

_LINE_BREAK = re.compile(r"\r\n|\n|\r")

MAX_LINE_OCTETS = 998  # RFC 5322 section 2.1.1, without the CRLF
TEXT_TYPES = ("text/plain", "text/html")


# --- choosing files -----------------------------------------------------------


def _message_files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file())


def _is_mbox(corpus: Path, path: Path) -> bool:
    relative = path.relative_to(corpus).as_posix()
    return relative in MBOX_FILES or any(relative.startswith(folder + "/") for folder in MBOX_FOLDERS)


def forward_files(corpus: Path) -> list[Path]:
    """Return the files of the buyer-to-seller replay, in a fixed order."""
    chosen: list[Path] = []
    for name in FORWARD_FOLDERS:
        chosen.extend(path for path in _message_files(corpus / name) if not _is_mbox(corpus, path))
    chosen.extend(_message_files(corpus / GO_FUZZ_FOLDER)[::GO_FUZZ_STRIDE])
    return chosen


def bounce_files(corpus: Path) -> list[Path]:
    """Return the files of the null-sender replay, in a fixed order."""
    chosen: list[Path] = []
    for name in BOUNCE_FOLDERS:
        chosen.extend(_message_files(corpus / name))
    return chosen


# --- preparing a file as SMTP DATA -------------------------------------------


def to_crlf(data: bytes) -> bytes:
    """Return `data` with every CRLF, bare LF and bare CR made a CRLF, ending in CRLF.

    SMTP allows no other line ending, and relaymail rejects a bare CR or LF in DATA with
    554 5.5.2 on purpose (SMTP smuggling). Sent unchanged, most corpus files would test
    only that rejection.
    """
    lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    return b"".join(line + b"\r\n" for line in lines)


def header_block_end(data: bytes) -> int:
    """Return the offset just after the last line of the top-level header block of CRLF `data`.

    The rules are compat32's: the block ends at an empty line or at the first line that is
    neither a field, a continuation line nor an mbox "From " line.
    """
    pos = 0
    while pos < len(data):
        line_end = data.find(b"\r\n", pos)
        line_end = len(data) if line_end < 0 else line_end
        line = data[pos:line_end]
        if not line:
            return pos
        is_header_line = line[:1] in (b" ", b"\t") or _FIELD_LINE.match(line) or line.startswith(b"From ")
        if not is_header_line:
            return pos
        pos = line_end + 2
    return len(data)


def replace_from(data: bytes, from_field: bytes) -> bytes:
    """Remove every top-level From field of CRLF `data` and add `from_field` (a CRLF-ended line).

    The new field goes at the end of the header block, so a continuation line that begins
    the block can never join it.
    """
    end = header_block_end(data)
    header_lines = data[:end].split(b"\r\n")[:-1]  # data[:end] ends with CRLF or is empty
    kept: list[bytes] = []
    in_from = False
    for line in header_lines:
        if line[:1] in (b" ", b"\t"):
            if not in_from:
                kept.append(line)
            continue
        in_from = bool(_FROM_FIELD_LINE.match(line))
        if not in_from:
            kept.append(line)
    header = b"".join(line + b"\r\n" for line in kept)
    return header + from_field + data[end:]


# --- sending ------------------------------------------------------------------


@dataclass
class Reply:
    """The relay's reply to one message, or how the session failed."""

    code: int  # the final reply code; 0 when the connection dropped or timed out
    text: str
    stage: str  # "MAIL", "RCPT", "DATA" or "connection"
    seconds: float = 0.0

    @property
    def queue_id(self) -> str | None:
        if self.code == 250 and self.stage == "DATA" and "queued as " in self.text:
            return self.text.rsplit(" ", 1)[-1]
        return None


@dataclass
class Job:
    name: str
    sender: str
    recipient: str
    data: bytes


@dataclass
class BatchResult:
    replies: dict[str, Reply] = field(default_factory=dict)
    unsent: list[str] = field(default_factory=list)  # left over when the time budget ran out


def _open_client(port: int, timeout_s: float) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", port, timeout=timeout_s)
    client.ehlo("corpus.client.test")
    return client


def _send_one(client: smtplib.SMTP, job: Job) -> Reply:
    code, text = client.mail(job.sender)
    if code != 250:
        client.rset()
        return Reply(code, text.decode(errors="replace"), "MAIL")
    code, text = client.rcpt(job.recipient)
    if code not in (250, 251):
        client.rset()
        return Reply(code, text.decode(errors="replace"), "RCPT")
    try:
        code, text = client.data(job.data)
    except smtplib.SMTPDataError as exc:  # the DATA command itself was refused
        return Reply(exc.smtp_code, exc.smtp_error.decode(errors="replace"), "DATA")
    return Reply(code, text.decode(errors="replace"), "DATA")


def send_batch(port: int, jobs: list[Job], connections: int, timeout_s: float, budget_s: float) -> BatchResult:
    """Send `jobs` over `connections` concurrent SMTP sessions to 127.0.0.1:`port`.

    Blocking: call it on a worker thread while the relay runs on the event loop.
    Each session sends message after message. A dropped connection or a timeout
    (`timeout_s` per socket operation) records the message with code 0, and the session
    reconnects for the next one. No new message starts after `budget_s`.
    """
    pending: queue.Queue[Job] = queue.Queue()
    for job in jobs:
        pending.put(job)
    result = BatchResult()
    lock = threading.Lock()
    deadline = time.monotonic() + budget_s

    def work() -> None:
        client: smtplib.SMTP | None = None
        while True:
            try:
                job = pending.get_nowait()
            except queue.Empty:
                break
            if time.monotonic() > deadline:
                with lock:
                    result.unsent.append(job.name)
                continue
            started = time.monotonic()
            try:
                if client is None:
                    client = _open_client(port, timeout_s)
                reply = _send_one(client, job)
            except (smtplib.SMTPException, OSError, socket.timeout) as exc:
                reply = Reply(0, f"{type(exc).__name__}: {exc}", "connection")
                try:
                    if client is not None:
                        client.close()
                finally:
                    client = None
            reply.seconds = time.monotonic() - started
            with lock:
                result.replies[job.name] = reply
        if client is not None:
            try:
                client.quit()
            except (smtplib.SMTPException, OSError):
                client.close()

    threads = [threading.Thread(target=work, name=f"corpus-smtp-{index}") for index in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return result


# --- inspecting the output ----------------------------------------------------


class UnfoldingCompat32(email.policy.Compat32):
    """compat32 that unfolds a header value (RFC 5322 section 2.2.3) before reading it.

    Plain compat32 reads parameters from the folded value, so it finds no boundary in
    `boundary="simple\r\n boundary"` (folded inside the quotes) and treats the whole
    multipart body as one leaf. policy.default unfolds, but finds no boundary with an
    unquoted '=' (`boundary=----=_NextPart...`, common from Outlook), which compat32
    reads, and it parsed the most deeply nested corpus message ten times slower. Messages are
    written out unchanged: the generator writes the stored values, not the ones read.
    """

    def header_fetch_parse(self, name, value):
        # Trailing white space is stripped too: compat32 ignores a Content-Transfer-Encoding
        # of "quoted-printable " and would not decode the part.
        return super().header_fetch_parse(name, _LINE_BREAK.sub("", value).strip())


READ_POLICY = UnfoldingCompat32()


def parse(data: bytes) -> email.message.Message:
    return email.message_from_bytes(data, policy=READ_POLICY)


def wire_problems(data: bytes) -> list[str]:
    """Return what breaks RFC 5322 line rules in `data`: stray CR or LF, lines over 998 octets."""
    problems = []
    if not data.count(b"\n") == data.count(b"\r\n") == data.count(b"\r"):
        problems.append("a bare CR or LF")
    longest = max((len(line) for line in data.split(b"\r\n")), default=0)
    if longest > MAX_LINE_OCTETS:
        problems.append(f"a line of {longest} octets")
    return problems


def is_attachment(part: email.message.Message) -> bool:
    """Return True for a leaf part that must pass unchanged: not text/plain or text/html, or
    text/plain or text/html with Content-Disposition attachment."""
    if part.get_content_type() not in TEXT_TYPES:
        return True
    return (part.get_content_disposition() or "") == "attachment"


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _serialised(item) -> bytes:
    if isinstance(item, email.message.Message):
        return item.as_bytes(policy=email.policy.compat32)
    if isinstance(item, bytes):
        return item
    return str(item).encode("utf-8", "surrogateescape")


def attachment_digests(root: email.message.Message) -> Counter:
    """Return the multiset of sha256 digests of what must pass unchanged in a parsed message.

    Counted: the decoded payload of every leaf attachment (see `is_attachment`), the
    content of every message/* part as compat32's generator writes it, and each child of
    a multipart/signed or multipart/encrypted part written the same way. Both sides of a
    comparison go through the same parser and generator, so equal input bytes give equal
    digests.
    """
    digests: Counter = Counter()
    for part in root.walk():
        content_type = part.get_content_type()
        if content_type.startswith("message/") and part.is_multipart():
            payload = part.get_payload()
            try:
                digests["message:" + _digest(b"".join(_serialised(item) for item in payload))] += 1
            except Exception as exc:  # noqa: BLE001 - compat32's generator fails on some broken input
                digests[f"message:unserialisable {type(exc).__name__}"] += 1
            continue
        if content_type in ("multipart/signed", "multipart/encrypted") and part.is_multipart():
            for child in part.get_payload():
                try:
                    digests["signed:" + _digest(_serialised(child))] += 1
                except Exception as exc:  # noqa: BLE001 - as above
                    digests[f"signed:unserialisable {type(exc).__name__}"] += 1
            continue
        if part.is_multipart() or not is_attachment(part):
            continue
        payload = part.get_payload(decode=True)
        digests["leaf:" + _digest(payload if isinstance(payload, bytes) else _serialised(payload))] += 1
    return digests


def attachment_changes(original: bytes, delivered: bytes) -> list[str]:
    """Return how the attachments, embedded messages and signed parts of `delivered` differ
    from those of `original`; empty when they are the same multiset."""
    before = attachment_digests(parse(original))
    after = attachment_digests(parse(delivered))
    if before == after:
        return []
    return [f"lost {dict(before - after)}", f"gained {dict(after - before)}"]


def _decode_chunk(chunk: bytes | str, charset: str | None) -> str:
    if isinstance(chunk, str):
        return chunk
    try:
        return chunk.decode(charset or "ascii", errors="replace")
    except LookupError:
        return chunk.decode("latin-1")


def decode_header_text(value) -> str:
    """Return a header value with its RFC 2047 encoded-words decoded, never raising."""
    text = str(value)
    try:
        chunks = email.header.decode_header(text)
    except Exception:  # noqa: BLE001 - a broken encoded-word leaves the raw text to search
        return text
    return "".join(_decode_chunk(chunk, charset) for chunk, charset in chunks)


def _part_text(part: email.message.Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    charset = part.get_content_charset() or "us-ascii"
    text = _decode_chunk(payload, charset)
    if part.get_content_subtype() == "html":
        text += "\n" + html.unescape(text)
    return text


def address_leaks(data: bytes, address: str) -> list[str]:
    """Return where `address` (case-insensitive) occurs in `data`.

    Looked at: the raw bytes, also with '@' as %40; and in every part, each header
    decoded, the filename, the decoded payload of a leaf part, and the decoded text of a
    text part, with HTML entities resolved as well.
    """
    needle = address.lower()
    found = []
    lowered = data.lower()
    if needle.encode() in lowered:
        found.append("raw bytes")
    if needle.replace("@", "%40").encode() in lowered:
        found.append("raw bytes, %40 form")

    for index, part in enumerate(parse(data).walk()):
        for name, value in part.items():
            if needle in decode_header_text(value).lower():
                found.append(f"part {index} header {name}")
        try:
            filename = part.get_filename()
        except Exception:  # noqa: BLE001 - a broken RFC 2231 parameter
            filename = None
        if filename and needle in str(filename).lower():
            found.append(f"part {index} filename")
        if part.is_multipart():
            continue
        payload = part.get_payload(decode=True)
        if isinstance(payload, bytes) and needle.encode() in payload.lower():
            found.append(f"part {index} decoded payload")
        if part.get_content_maintype() == "text" and needle in _part_text(part).lower():
            found.append(f"part {index} decoded text")
    return found


def _plain_texts(data: bytes, strict: bool) -> list[str]:
    """Return the text of each text/plain part that is not an attachment, with LF line breaks.

    With `strict`, a part whose bytes do not decode in its declared charset (US-ASCII when
    none is declared) is left out. Without it, undecodable bytes become U+FFFD.
    """
    texts = []
    for part in parse(data).walk():
        if part.is_multipart() or part.get_content_type() != "text/plain" or is_attachment(part):
            continue
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            continue
        charset = part.get_content_charset() or "us-ascii"
        try:
            text = payload.decode(charset, errors="strict" if strict else "replace")
        except (UnicodeDecodeError, LookupError):
            continue
        texts.append(text.replace("\r\n", "\n"))
    return texts


_BOUNDARY_DEFECTS = (email.errors.StartBoundaryNotFoundDefect, email.errors.CloseBoundaryNotFoundDefect)


def has_boundary_defects(data: bytes) -> bool:
    """Return True if compat32 reports a missing start or close boundary anywhere in `data`."""
    return any(
        isinstance(defect, _BOUNDARY_DEFECTS) for part in parse(data).walk() for defect in part.defects
    )


_C1_CONTROLS = re.compile("[\x80-\x9f]")


def text_losses(original: bytes, delivered: bytes) -> list[str]:
    """Return the start of each text/plain text of `original` that no text/plain part of
    `delivered` contains.

    Only texts that decode cleanly in their declared charset are compared, because the
    relay may decode the others with a superset or a corrected charset name. Texts with C1
    control characters are left out for the same reason: their ISO-8859-1 label is read
    as windows-1252, where those bytes are letters and punctuation. A message whose
    boundaries compat32 finds broken is not compared at all: compat32 itself misplaces
    text there (it reads the epilogue after "--b\r\n--b--" as the empty part's content).
    """
    if has_boundary_defects(original):
        return []
    delivered_texts = _plain_texts(delivered, strict=False)
    losses = []
    for text in _plain_texts(original, strict=True):
        core = text.strip()
        if not core or _C1_CONTROLS.search(core):
            continue
        if not any(core in candidate for candidate in delivered_texts):
            losses.append(repr(core[:60]))
    return losses


# Subject starts that mark an out-of-office or other automatic reply, in lower case.
AUTO_REPLY_SUBJECTS = ("auto:", "auto-reply", "autoreply", "automatic reply", "out of office", "respuesta automática")


def automatic_marks(data: bytes) -> list[str]:
    """Return the top-level header fields that mark `data` as an automatic message.

    These are the marks of relaymail's definition apart from the null sender. They are
    Auto-Submitted other than "no" and Precedence bulk, junk or list, each read from its
    first field and first word. X-Autoreply or X-Autorespond other than "no" and a
    Subject that starts like an out-of-office reply count too.
    """
    header = parse(data[: header_block_end(data)] + b"\r\n")
    marks = []
    auto_submitted = header.get("Auto-Submitted")
    if auto_submitted is not None and str(auto_submitted).split(";")[0].strip().lower() != "no":
        marks.append(f"Auto-Submitted: {auto_submitted}")
    precedence = str(header.get("Precedence", "")).split()
    if precedence and precedence[0].lower() in ("bulk", "junk", "list"):
        marks.append(f"Precedence: {precedence[0]}")
    for name in ("X-Autoreply", "X-Autorespond"):
        value = header.get(name)
        if value is not None and str(value).lower() != "no":
            marks.append(f"{name}: {value}")
    subject = decode_header_text(header.get("Subject", "")).strip().lower()
    if subject.startswith(AUTO_REPLY_SUBJECTS):
        marks.append(f"Subject: {subject[:40]}")
    return marks


def header_marks_automatic(data: bytes) -> bool:
    """Return True if Auto-Submitted or Precedence marks `data` automatic (the unambiguous marks)."""
    return any(mark.startswith(("Auto-Submitted", "Precedence")) for mark in automatic_marks(data))


def _undo_surrogates(text: str) -> str:
    # message_from_bytes keeps raw 8-bit header bytes (RFC 6532 UTF-8) as surrogates.
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def from_problems(data: bytes, expected_address: str, expected_name: str) -> list[str]:
    """Return how the From header of `data` differs from one mailbox `expected_name <expected_address>`."""
    header_end = data.find(b"\r\n\r\n")
    header_block = data if header_end < 0 else data[: header_end + 2]
    default = email.message_from_bytes(header_block + b"\r\n", policy=email.policy.default)
    fields = default.get_all("From") or []
    if len(fields) != 1:
        return [f"{len(fields)} From fields"]

    problems = []
    mailboxes = fields[0].addresses
    if len(mailboxes) != 1:
        problems.append(f"{len(mailboxes)} mailboxes in From (policy.default)")
    elif mailboxes[0].addr_spec.lower() != expected_address.lower():
        problems.append(f"From address {mailboxes[0].addr_spec!r}")
    elif _undo_surrogates(mailboxes[0].display_name) != expected_name:
        problems.append(f"From display name {mailboxes[0].display_name!r}")

    compat_pairs = getaddresses([str(parse(header_block + b"\r\n")["From"])])
    if [pair[1].lower() for pair in compat_pairs] != [expected_address.lower()]:
        problems.append(f"From mailboxes {compat_pairs!r} (compat32 getaddresses)")
    return problems


def message_id_of(data: bytes) -> str | None:
    """Return the top-level Message-ID without angle brackets, or None."""
    value = parse(data).get("Message-ID")
    if value is None:
        return None
    return str(value).strip().strip("<>")
