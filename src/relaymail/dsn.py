"""Delivery status notifications (RFC 3464) to the sender of a message that failed for good.

`queue_dsn` adds a DSN for a bounced delivery to the caller's transaction: a
new Message (direction "notice", rule "dsn", parent_id = the failed message)
and its Delivery, sent with the null envelope sender to the original sender's
real address: the seller's From address (`messages.header_from`) for a seller's
message, the buyer's address for a buyer's. `should_send_dsn` allows one only
for a buyer's or a seller's own message. So there is none for a message with
the null sender, for an automatic one (Auto-Submitted other than "no",
Precedence bulk, an out-of-office reply...), for a notice or DSN, and for mail
to the operators' address, because anyone may write there and a DSN would be
backscatter.

`build_dsn` returns the DSN's bytes: `multipart/report; report-type=delivery-status`
with `Auto-Submitted: auto-replied`, in the sender's locale (the seller's for a
seller, the buyer's for a buyer), and these parts:
 1. text/plain: which message, why it was not delivered, the remote server's
    error text, and what the sender can do;
 2. message/delivery-status: `Action: failed`, the enhanced status code, and the
    other party's alias as `Final-Recipient`;
 3. text/rfc822-headers: From, To, Subject, Date and Message-ID of the sender's
    own message, as the sender wrote them.

Privacy (the same rule as the rewriting): the other party appears only as its
alias. The remote server's text goes through `scrub`, which puts the alias in
place of the other party's real addresses and removes every other address,
host name and IP address, since they would reveal the other party's provider
and hosts. No Remote-MTA field is written, for the same reason.
"""

from __future__ import annotations

import functools
import logging
import re
import secrets
import textwrap
from dataclasses import dataclass
from datetime import datetime
from email import policy as email_policy
from email.message import EmailMessage, Message as EmailMessageBase
from email.utils import format_datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from . import dkim
from .config import Config
from .errors import MessageError
from .headers import first_field, first_token, parse_headers, split_fields
from .i18n import N_, resolve_locale, translations
from .log import fields
from .models import Buyer, Delivery, Direction, Message, MessageStatus, Pair, Seller, SellerSender, SenderState
from .notice import bullet_item, fill_paragraph, shorten

log = logging.getLogger(__name__)

DSN_RULE = "dsn"

# Generator policy: CRLF, RFC 2047 for non-ASCII header text, folding at 78.
DSN_POLICY = email_policy.SMTP

# Width of the human-readable part's paragraphs, in characters.
TEXT_WIDTH = 72
# Maximum length, in characters, of the original Subject quoted in the DSN's Subject.
MAX_QUOTED_SUBJECT = 120
# Maximum length, in characters, of the remote server's text quoted in the DSN.
MAX_DIAGNOSTIC = 600

# Shorter local parts are not replaced on their own: "info" or "a" would match ordinary words.
MIN_SCRUBBED_LOCAL_PART = 3

# Header fields of the sender's own message returned in the third part.
RETURNED_FIELDS = ("from", "to", "subject", "date", "message-id")

# Reasons for a failed delivery, by kind of status, and advice to the sender.
REASON_ADDRESS = N_("The recipient's e-mail address does not exist or no longer receives mail.")
REASON_MAILBOX_FULL = N_("The recipient's mailbox is full.")
REASON_TOO_LARGE = N_("The message is too large for the recipient's mail server.")
REASON_REJECTED = N_("The recipient's mail server rejected the message.")
REASON_EXPIRED = N_(
    "The recipient's mail server could not be reached or did not accept the message in the "
    "time allowed, so delivery was stopped."
)
ADVICE_ADDRESS = N_("Sending the message again will not help, because the address does not receive mail.")
ADVICE_LATER = N_("You can send the message again later.")
ADVICE_SMALLER = N_("Make the message smaller, for example by removing attachments, and send it again.")
ADVICE_REJECTED = N_(
    "Check the content of your message and send it again. If it is rejected again, contact support."
)

_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]+")
_DELIVERY_REPLY = re.compile(r"^\S+ (?:replied|said:) (?P<reply>[2-5]\d\d\b.*?)(?: to [A-Z][A-Z ]*)?$", re.S)
_ENHANCED_STATUS = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.]*\d)")
_EMAIL = re.compile(r"[\w.!#$%&'*+/=?^`{|}~-]+@[\w-]+(?:\.[\w-]+)+")
_IPV4 = re.compile(r"(?<![\w.])\d{1,3}(?:\.\d{1,3}){3}(?![\w.])")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_HOST = re.compile(r"(?<![\w.@-])(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}(?![\w-])")


@dataclass(frozen=True)
class Failure:
    """A permanent failure of one delivery: the status and the remote server's text."""

    status: str  # enhanced status code, "5.1.1"
    diagnostic: str  # the remote server's reply or the report's Diagnostic-Code, not yet scrubbed
    diagnostic_type: str = "smtp"  # RFC 3464 diagnostic-type; "X-Relaymail" for relaymail's own reasons
    hard: bool = True  # False when the queue lifetime ran out after temporary failures


def failure_of(code: int | None, text: str, host: str | None, *, hard: bool, expired: bool) -> Failure:
    """Describe a failed attempt as a Failure: `text` is DeliveryError.text, `code` its SMTP reply code."""
    # relaymail.deliver words a reply as "<host> replied <code> <text> to <command>".
    match = _DELIVERY_REPLY.match(text)
    reply = match.group("reply") if match else text

    status = status_of_reply(code, reply)
    if expired and not hard:
        status = status if status.startswith("4") else "4.4.7"
        return Failure(status, reply, "smtp" if code else "X-Relaymail", hard=False)
    if not status:
        # No reply code: relaymail's own verdict on the recipient's domain (see relaymail.deliver).
        if "null MX" in reply:
            status = "5.1.10"
        elif "NXDOMAIN" in reply or "no MX, A or AAAA" in reply:
            status = "5.1.2"
        else:
            status = "5.4.4"
    return Failure(status, reply, "smtp" if code else "X-Relaymail", hard=True)


def status_of_reply(code: int | None, text: str) -> str:
    """Return the enhanced status code in an SMTP reply, else "X.0.0" from its basic code, else ""."""
    match = _ENHANCED_STATUS.search(text)
    if match and (code is None or str(code)[0] == match.group(1)):
        return f"{match.group(1)}.{int(match.group(2))}.{int(match.group(3))}"
    if code and 400 <= code < 600:
        return f"{code // 100}.0.0"
    return ""


def should_send_dsn(message: Message) -> bool:
    """Return True when a failed `message` may get a DSN (see the module docstring for the rules)."""
    if message.direction not in (Direction.SELLER_TO_BUYER.value, Direction.BUYER_TO_SELLER.value):
        return False
    if message.envelope_sender.strip() in ("", "<>"):
        return False
    if message.automatic:
        return False
    auto_submitted = parse_headers(message.raw or b"").auto_submitted
    if auto_submitted is not None and (first_token(auto_submitted) or "").lower() != "no":
        return False
    return True


def scrub(text: str, real_addresses: list[str], alias: str, own_domain: str) -> str:
    """Return `text` with the other party's real addresses replaced by `alias`.

    The local parts of those addresses (at least MIN_SCRUBBED_LOCAL_PART
    characters) are replaced too, and every other e-mail address, IP address
    and host name becomes a placeholder, except names in `own_domain`.
    Matching is case-insensitive and also finds a URL-encoded address.
    """
    placeholder = "\x00alias\x00"
    addresses = sorted({a.lower() for a in real_addresses if a}, key=len, reverse=True)
    for address in addresses:
        for form in (address, address.replace("@", "%40")):
            text = re.sub(re.escape(form), placeholder, text, flags=re.IGNORECASE)
    # Some servers quote only the local part ("unknown user: juan.perez").
    for local in sorted({a.rpartition("@")[0] for a in addresses}, key=len, reverse=True):
        if len(local) >= MIN_SCRUBBED_LOCAL_PART:
            text = re.sub(rf"(?<![\w.+-]){re.escape(local)}(?![\w+-]|\.\w)", placeholder, text, flags=re.IGNORECASE)

    own = own_domain.lower()

    def keep_own(match: re.Match, replacement: str) -> str:
        value = match.group(0).lower()
        return match.group(0) if value == own or value.endswith("." + own) or value.endswith("@" + own) else replacement

    text = _EMAIL.sub(lambda m: keep_own(m, "[address removed]"), text)
    text = _IPV4.sub("[IP address removed]", text)
    text = _IPV6.sub(lambda m: "[IP address removed]" if _looks_like_ipv6(m.group(0)) else m.group(0), text)
    text = _HOST.sub(lambda m: keep_own(m, "[host removed]"), text)
    return text.replace(placeholder, alias)


def _looks_like_ipv6(value: str) -> bool:
    # A time of day ("10:00:00") has two colons; an IPv6 address has "::" or at least five.
    return len(value) > 2 and ("::" in value or value.count(":") >= 5)


def reason_of(status: str, hard: bool) -> tuple[str, tuple[str, ...]]:
    """Return the untranslated reason and advice for a failure with `status`."""
    if not hard:
        return REASON_EXPIRED, (ADVICE_LATER,)
    if status.startswith(("5.1.", "5.2.1", "5.4.4")):
        return REASON_ADDRESS, (ADVICE_ADDRESS,)
    if status.startswith("5.2.2"):
        return REASON_MAILBOX_FULL, (ADVICE_LATER,)
    if status.startswith(("5.3.4", "5.2.3")):
        return REASON_TOO_LARGE, (ADVICE_SMALLER,)
    if status.startswith("4.4.7"):
        return REASON_EXPIRED, (ADVICE_LATER,)
    return REASON_REJECTED, (ADVICE_REJECTED,)


# --- building ---------------------------------------------------------------------


@dataclass(frozen=True)
class DsnSpec:
    """The content of one DSN. Addresses and names must be printable ASCII, except `other_party_name`."""

    locale: str | None
    sender_role: str  # "seller" (the DSN names the buyer) or "buyer" (it names the seller)
    notice_from: str
    to_address: str
    domain: str
    hostname: str
    message_id: str
    final_recipient: str  # the other party's alias, with the domain
    other_party_name: str  # the seller's business name for a buyer's DSN, else ""
    original_subject: str
    original_date: str | None
    original_message_id: str | None
    order_id: str | None
    failure: Failure  # with the diagnostic already scrubbed
    arrival_date: datetime
    last_attempt_date: datetime
    now: datetime
    returned_headers: bytes = b""


def build_dsn(spec: DsnSpec) -> bytes:
    """Build the DSN of `spec` and return its bytes (CRLF line endings, 7-bit headers).

    Raises ValueError when an address or the alias cannot go in a header
    (non-ASCII or control characters).
    """
    for name in ("notice_from", "to_address", "final_recipient", "hostname"):
        _check_header_value(name, getattr(spec, name))

    locale = resolve_locale(spec.locale)
    gettext = translations(locale).gettext
    subject = _one_line(spec.original_subject)

    report = EmailMessage(policy=DSN_POLICY)
    report["From"] = spec.notice_from
    report["To"] = spec.to_address
    report["Subject"] = gettext("Message not delivered: {subject}").format(
        subject=shorten(subject, MAX_QUOTED_SUBJECT) or gettext("(no subject)")
    )
    report["Date"] = format_datetime(spec.now)
    report["Message-ID"] = f"<{spec.message_id}>"
    original_id = (spec.original_message_id or "").strip().strip("<>")
    if original_id and _is_header_safe(original_id):
        report["In-Reply-To"] = f"<{original_id}>"
        report["References"] = f"<{original_id}>"
    report["Auto-Submitted"] = "auto-replied"
    # Asks Microsoft Exchange and Outlook not to send automatic replies.
    report["X-Auto-Response-Suppress"] = "All"
    report["MIME-Version"] = "1.0"
    report["Content-Type"] = "multipart/report; report-type=delivery-status"

    report.attach(_human_part(gettext, locale, spec, subject))
    report.attach(_status_part(spec))
    if spec.returned_headers:
        report.attach(_headers_part(spec.returned_headers))
    return report.as_bytes(policy=DSN_POLICY)


def _human_part(gettext, locale: str, spec: DsnSpec, subject: str) -> EmailMessage:
    if spec.sender_role == "seller":
        intro = gettext("Your message to the buyer {buyer} could not be delivered.").format(buyer=spec.final_recipient)
        party_line = gettext("Buyer: {buyer}").format(buyer=spec.final_recipient)
    else:
        seller = f"{_one_line(spec.other_party_name)} <{spec.final_recipient}>" if spec.other_party_name else spec.final_recipient
        intro = gettext("Your message to the seller {seller} could not be delivered.").format(seller=seller)
        party_line = gettext("Seller: {seller}").format(seller=seller)

    lines = [fill_paragraph(intro), ""]
    lines.append(gettext("The message"))
    lines.append("  " + gettext("Subject: {subject}").format(subject=subject or gettext("(no subject)")))
    date = _one_line(spec.original_date or "") or gettext("(no date)")
    lines.append("  " + gettext("Date: {date}").format(date=date))
    lines.append("  " + party_line)
    if spec.order_id:
        lines.append("  " + gettext("Order: {order}").format(order=_one_line(spec.order_id)))
    lines.append("")

    reason, advice = reason_of(spec.failure.status, spec.failure.hard)
    lines.append(gettext("Why it was not delivered"))
    lines.extend([fill_paragraph(gettext(reason)), ""])
    diagnostic = _one_line(spec.failure.diagnostic)
    if diagnostic:
        lines.append(gettext("Error reported by the recipient's mail server:"))
        lines.append(textwrap.fill(shorten(diagnostic, MAX_DIAGNOSTIC), TEXT_WIDTH, initial_indent="  ",
                                   subsequent_indent="  ", break_long_words=True, break_on_hyphens=False))
        lines.append("")

    lines.append(gettext("What you can do"))
    lines.extend(bullet_item(gettext(item)) for item in advice)
    lines.append("")
    lines.append(fill_paragraph(gettext("This is an automatic notice. Please do not reply to it.")))

    part = EmailMessage(policy=DSN_POLICY)
    part.set_content("\n".join(lines) + "\n", charset="utf-8", cte="quoted-printable")
    del part["MIME-Version"]  # set_content adds one, but only the top level needs it
    part["Content-Language"] = locale.replace("_", "-")
    return part


def _status_part(spec: DsnSpec) -> EmailMessageBase:
    per_message = EmailMessageBase(policy=DSN_POLICY)
    per_message["Reporting-MTA"] = f"dns; {spec.hostname}"
    per_message["Arrival-Date"] = format_datetime(spec.arrival_date)

    per_recipient = EmailMessageBase(policy=DSN_POLICY)
    per_recipient["Final-Recipient"] = f"rfc822; {spec.final_recipient}"
    per_recipient["Action"] = "failed"
    per_recipient["Status"] = spec.failure.status
    diagnostic = _ascii_line(spec.failure.diagnostic)[:MAX_DIAGNOSTIC]
    if diagnostic:
        diagnostic_type = re.sub(r"[^A-Za-z0-9-]", "", spec.failure.diagnostic_type) or "X-Relaymail"
        per_recipient["Diagnostic-Code"] = f"{diagnostic_type}; {diagnostic}"
    per_recipient["Last-Attempt-Date"] = format_datetime(spec.last_attempt_date)

    part = EmailMessageBase(policy=DSN_POLICY)
    part["Content-Type"] = "message/delivery-status"
    part.set_payload([per_message, per_recipient])
    return part


def _headers_part(headers: bytes) -> EmailMessage:
    text = headers.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")
    seven_bit = text.isascii() and all(len(line) <= 998 for line in text.split("\n"))
    part = EmailMessage(policy=DSN_POLICY)
    part.set_content(text, subtype="rfc822-headers", charset="utf-8", cte="7bit" if seven_bit else "quoted-printable")
    del part["MIME-Version"]
    return part


def returned_headers(raw: bytes) -> bytes:
    """Return the From, To, Subject, Date and Message-ID fields of `raw`, as written."""
    fields_, _, _ = split_fields(raw)
    kept = [item.raw for item in fields_ if item.key in RETURNED_FIELDS]
    return b"".join(line if line.endswith(b"\n") else line + b"\r\n" for line in kept)


def _check_header_value(name: str, value: str) -> None:
    if not value or not _is_header_safe(value):
        raise ValueError(f"{name} = {value!r}: expected printable ASCII with no line breaks")


def _is_header_safe(value: str) -> bool:
    return value.isascii() and _CONTROL_CHARACTERS.search(value) is None


def _one_line(value: str) -> str:
    return " ".join(_CONTROL_CHARACTERS.sub(" ", value).split())


def _ascii_line(value: str) -> str:
    return _one_line(value).encode("ascii", errors="replace").decode("ascii")


# --- queueing ---------------------------------------------------------------------


def queue_dsn(session: Session, config: Config, delivery: Delivery, failure: Failure, now: datetime) -> Message | None:
    """Add a DSN for the bounced `delivery` to the session's transaction; return its Message or None.

    Returns None when `should_send_dsn` forbids one, when the message's pair
    is gone, or when a DSN about this message already exists. It also returns
    None, with a log line, when an address cannot go in a header. This is a
    synchronous unit of work for Store.run, and the caller commits.
    """
    from .receive import new_queue_id  # receive imports the queue path; imported here to avoid a cycle

    message = session.get(Message, delivery.message_id)
    if message is None or not should_send_dsn(message) or message.pair_id is None:
        return None
    existing = session.scalar(
        select(Message.id).where(Message.parent_id == message.id, Message.rule == DSN_RULE).limit(1)
    )
    if existing is not None:
        return None

    pair = session.get(Pair, message.pair_id)
    if pair is None:
        return None
    buyer = session.get(Buyer, pair.buyer_id)
    seller = session.get(Seller, pair.seller_id)
    domain = config.relay.domain.lower()

    if message.direction == Direction.SELLER_TO_BUYER.value:
        role, locale, to_address = "seller", seller.locale, message.header_from
        final_recipient, other_name = f"{pair.buyer_alias}@{domain}", ""
        real_addresses = [buyer.email, delivery.recipient]
    else:
        role, locale, to_address = "buyer", buyer.locale, buyer.email
        final_recipient, other_name = f"{pair.seller_alias}@{domain}", seller.business_name
        real_addresses = [seller.support_email, delivery.recipient, *_approved_senders(session, seller.id)]
    if not to_address:
        return None

    dsn_id = new_queue_id()
    notice_from = config.relay.notice_address or f"notices@{domain}"
    scrubbed = Failure(
        failure.status,
        scrub(failure.diagnostic, real_addresses, final_recipient, domain),
        failure.diagnostic_type,
        failure.hard,
    )
    raw_headers = message.raw or b""
    fields_, _, _ = split_fields(raw_headers)
    date_field = first_field(fields_, "date")
    spec = DsnSpec(
        locale=locale,
        sender_role=role,
        notice_from=notice_from,
        to_address=to_address,
        domain=domain,
        hostname=config.relay.hostname,
        message_id=f"{dsn_id.lower()}.{secrets.token_hex(6)}@{domain}",
        final_recipient=final_recipient,
        other_party_name=other_name,
        original_subject=message.subject,
        original_date=date_field.value()[:200] if date_field else None,
        original_message_id=message.original_message_id,
        order_id=message.order_id,
        failure=scrubbed,
        arrival_date=message.received_at,
        last_attempt_date=now,
        now=now,
        returned_headers=returned_headers(raw_headers),
    )
    try:
        data = _sign(config, build_dsn(spec))
    except ValueError as exc:
        log.warning(fields(event="dsn_skipped", delivery=delivery.id, reason=str(exc)[:200]))
        return None

    row = Message(
        queue_id=dsn_id,
        direction=Direction.NOTICE.value,
        pair_id=pair.id,
        seller_id=pair.seller_id,
        buyer_id=pair.buyer_id,
        parent_id=message.id,
        envelope_sender="",
        header_from=notice_from,
        recipient_alias=final_recipient,
        subject="delivery status notification",
        rule=DSN_RULE,
        reason=f"delivery {delivery.id} failed with status {failure.status}",
        status=MessageStatus.QUEUED.value,
        raw=data,
        delivered_raw=data,
        size_bytes=len(data),
        received_at=now,
    )
    session.add(row)
    session.flush()
    session.add(Delivery(message_id=row.id, recipient=to_address, envelope_sender="", next_attempt_at=now))
    session.flush()
    return row


def _approved_senders(session: Session, seller_id: str) -> list[str]:
    rows = session.scalars(
        select(SellerSender.address).where(
            SellerSender.seller_id == seller_id, SellerSender.state == SenderState.APPROVED.value
        )
    )
    return list(rows)


def _sign(config: Config, data: bytes) -> bytes:
    """Add a DKIM-Signature when [dkim] is configured; an unsignable DSN goes out unsigned (logged)."""
    signer = _signer(config.dkim.selector, config.dkim.domain, config.dkim.private_key_path, tuple(config.dkim.headers))
    if signer is None:
        return data
    try:
        return signer.sign(data)
    except MessageError as exc:
        log.warning(fields(event="dsn_unsigned", error=str(exc)[:200]))
        return data


@functools.lru_cache(maxsize=4)
def _signer(selector: str, domain: str, private_key_path: str, headers: tuple[str, ...]) -> dkim.Signer | None:
    if not selector:
        return None
    key = dkim.load_private_key(Path(private_key_path), "dkim.private_key_path")
    return dkim.Signer(selector, domain, dkim.private_key_pem(key), headers)
