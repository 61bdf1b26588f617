"""Test messages and the asyncio SMTP load client used by scripts/bench.

The client speaks plain SMTP over asyncio streams (EHLO, MAIL, RCPT, DATA,
QUIT, no pipelining, no TLS), so the same code loads the sink, Postfix and
relaymail. Each message's accept latency runs from writing MAIL FROM to
reading the reply after the final "." of DATA.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from email.utils import formatdate

# Fixed-width marker in every template, replaced by the message's sequence
# number so each message gets its own Message-ID without changing its size.
SEQUENCE_MARKER = b"SEQ00000000"
SEQUENCE_WIDTH = len(SEQUENCE_MARKER) - 3

WORDS = (
    "order parcel delivery invoice refund colour size warranty tracking "
    "courier package damaged replacement question answer thanks please "
    "arrive tomorrow monday address apartment receipt payment number item"
).split()

MAX_ERROR_SAMPLES = 5


@dataclass(frozen=True)
class Envelope:
    """One sender, one recipient and a message template with SEQUENCE_MARKER."""

    mail_from: str
    rcpt_to: str
    template: bytes


@dataclass
class LoadResult:
    """Counts and per-message accept latencies (seconds) of one load run."""

    attempted: int = 0
    accepted: int = 0
    rejected: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)
    started: float = 0.0
    finished: float = 0.0
    time_bounded: bool = False

    @property
    def duration(self) -> float:
        return max(self.finished - self.started, 1e-9)

    def note_error(self, text: str) -> None:
        if len(self.error_samples) < MAX_ERROR_SAMPLES:
            self.error_samples.append(text)


def parse_size(text: str) -> int:
    """Convert "2k", "100k", "1m" or a plain byte count to bytes (k = 1024)."""
    value = text.strip().lower()
    multiplier = 1
    if value.endswith("k"):
        multiplier, value = 1024, value[:-1]
    elif value.endswith("m"):
        multiplier, value = 1024 * 1024, value[:-1]
    if not value.isdigit() or int(value) == 0:
        raise ValueError(f"invalid message size {text!r}: expected for example 2k or 100k")
    return int(value) * multiplier


def _filler_text(rng: random.Random, length: int) -> str:
    lines, line, total = [], [], 0
    while total < length:
        word = rng.choice(WORDS)
        line.append(word)
        total += len(word) + 1
        if sum(len(w) + 1 for w in line) > 70:
            lines.append(" ".join(line))
            line = []
    if line:
        lines.append(" ".join(line))
    return "\n".join(lines)[:length] + "\n"


def _build(mail_from: str, rcpt_to: str, text_bytes: int, attachment_bytes: int, seed: int) -> bytes:
    rng = random.Random(seed)
    message = EmailMessage(policy=SMTP_POLICY)
    message["From"] = mail_from
    message["To"] = rcpt_to
    message["Subject"] = "Question about order 4711"
    message["Date"] = formatdate(localtime=False)
    message["Message-ID"] = f"<bench.{SEQUENCE_MARKER.decode()}@{mail_from.rpartition('@')[2]}>"
    message.set_content(_filler_text(rng, max(text_bytes, 1)))
    if attachment_bytes > 0:
        payload = rng.randbytes(attachment_bytes)
        message.add_attachment(payload, maintype="application", subtype="pdf", filename="invoice.pdf")
    return message.as_bytes()


def build_template(mail_from: str, rcpt_to: str, size: int, seed: int = 1) -> bytes:
    """Build a message of about `size` bytes (within 2 %), dot-stuffed, ending in CRLF.

    Messages under 8 KiB are plain text. Larger ones are multipart/mixed with
    1 KiB of text and a base64 attachment filling the rest.
    """
    if size < 8 * 1024:
        overhead = len(_build(mail_from, rcpt_to, 1, 0, seed))
        data = _build(mail_from, rcpt_to, max(size - overhead, 1), 0, seed)
    else:
        text = 1024
        overhead = len(_build(mail_from, rcpt_to, text, 1, seed))
        # base64 turns 57 raw bytes into a 76-character line plus CRLF.
        raw = max((size - overhead) * 57 // 78, 1)
        data = _build(mail_from, rcpt_to, text, raw, seed)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    if data.startswith(b"."):
        data = b"." + data
    return data.replace(b"\r\n.", b"\r\n..")


def percentile(sorted_values: list[float], fraction: float) -> float | None:
    """Return the nearest-rank percentile of an ascending list, or None if empty."""
    if not sorted_values:
        return None
    rank = max(1, min(len(sorted_values), round(fraction * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


class _Dispenser:
    """Hands out message numbers until the count or the deadline is reached."""

    def __init__(self, total: int, deadline: float, result: LoadResult):
        self.next_index = 0
        self.total = total
        self.deadline = deadline
        self.result = result

    def take(self) -> int | None:
        if self.next_index >= self.total:
            return None
        if time.monotonic() >= self.deadline:
            self.result.time_bounded = True
            return None
        index = self.next_index
        self.next_index += 1
        return index


class SmtpReplyError(Exception):
    """A reply with an unexpected code at a point where the session cannot go on."""


async def _read_reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    lines = []
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed by the server")
        lines.append(line)
        if len(line) < 4 or line[3:4] != b"-":
            break
    last = lines[-1]
    if not last[:3].isdigit():
        raise SmtpReplyError(f"invalid SMTP reply {last[:80]!r}")
    return int(last[:3]), b"".join(lines)


async def _command(reader, writer, line: bytes) -> tuple[int, bytes]:
    writer.write(line)
    return await _read_reply(reader)


async def _send_one(reader, writer, envelope: Envelope, data: bytes, result: LoadResult) -> None:
    """Send one transaction and record it as accepted, rejected or raise on a broken session."""
    started = time.perf_counter()
    code, reply = await _command(reader, writer, b"MAIL FROM:<%s>\r\n" % envelope.mail_from.encode())
    if code != 250:
        result.rejected += 1
        result.note_error(f"MAIL FROM rejected: {reply[:120]!r}")
        await _command(reader, writer, b"RSET\r\n")
        return
    code, reply = await _command(reader, writer, b"RCPT TO:<%s>\r\n" % envelope.rcpt_to.encode())
    if code not in (250, 251):
        result.rejected += 1
        result.note_error(f"RCPT TO rejected: {reply[:120]!r}")
        await _command(reader, writer, b"RSET\r\n")
        return
    code, reply = await _command(reader, writer, b"DATA\r\n")
    if code != 354:
        raise SmtpReplyError(f"DATA rejected: {reply[:120]!r}")
    writer.write(data)
    writer.write(b".\r\n")
    code, reply = await _read_reply(reader)
    elapsed = time.perf_counter() - started
    if code == 250:
        result.accepted += 1
        result.latencies.append(elapsed)
    else:
        result.rejected += 1
        result.note_error(f"message rejected after DATA: {reply[:120]!r}")


async def _client(
    host: str,
    port: int,
    envelopes: list[Envelope],
    per_session: int,
    reply_timeout: float,
    dispenser: _Dispenser,
    result: LoadResult,
) -> None:
    max_errors = max(20, dispenser.total // 10)
    while result.errors < max_errors:
        index = dispenser.take()
        if index is None:
            return
        writer = None
        try:
            async with asyncio.timeout(reply_timeout):
                reader, writer = await asyncio.open_connection(host, port)
                code, reply = await _read_reply(reader)
                if code != 220:
                    raise SmtpReplyError(f"greeting rejected: {reply[:120]!r}")
                code, reply = await _command(reader, writer, b"EHLO client.bench.example\r\n")
                if code != 250:
                    raise SmtpReplyError(f"EHLO rejected: {reply[:120]!r}")
            sent = 0
            while index is not None:
                envelope = envelopes[index % len(envelopes)]
                data = envelope.template.replace(
                    SEQUENCE_MARKER, b"SEQ" + b"%0*d" % (SEQUENCE_WIDTH, index), 1
                )
                result.attempted += 1
                async with asyncio.timeout(reply_timeout):
                    await _send_one(reader, writer, envelope, data, result)
                sent += 1
                index = dispenser.take() if sent < per_session else None
            async with asyncio.timeout(reply_timeout):
                await _command(reader, writer, b"QUIT\r\n")
        except (OSError, ConnectionError, TimeoutError, SmtpReplyError) as exc:
            result.errors += 1
            result.note_error(f"{type(exc).__name__}: {exc}")
        finally:
            if writer is not None:
                writer.close()
                try:
                    await writer.wait_closed()
                except (OSError, ConnectionError):
                    pass


async def run_load(
    host: str,
    port: int,
    envelopes: list[Envelope],
    total: int,
    clients: int,
    per_session: int,
    time_limit: float,
    reply_timeout: float = 60.0,
) -> LoadResult:
    """Send `total` messages over `clients` concurrent sessions, stopping at `time_limit` seconds.

    Each session sends up to `per_session` messages, then QUITs and the
    client reconnects. A message whose session breaks counts as an error and
    is not retried. All clients stop once the run has max(20, total/10) errors.
    """
    result = LoadResult()
    result.started = time.monotonic()
    dispenser = _Dispenser(total, result.started + time_limit, result)
    tasks = [
        _client(host, port, envelopes, per_session, reply_timeout, dispenser, result)
        for _ in range(clients)
    ]
    await asyncio.gather(*tasks)
    result.finished = time.monotonic()
    result.latencies.sort()
    return result
