"""The blocked notice: what a seller receives when the policy blocks a message.

`build_blocked_notice` returns the notice as bytes ready to queue, with the
envelope sender `<>`. It is a `multipart/report; report-type=delivery-status`
message (RFC 6522, RFC 3464) in the seller's locale:
 1. text/plain, quoted-printable: which message (Subject, Date, buyer alias,
    order), why it was blocked, and what the seller can do about it;
 2. message/delivery-status: `Action: failed`, `Status: 5.7.1`, and the buyer
    alias as `Final-Recipient`;
 3. text/rfc822-headers, only when the caller passes the blocked message's
    rewritten headers.
The top-level headers carry `Auto-Submitted: auto-replied` (RFC 3834), so a
well-behaved autoresponder does not reply to the notice.

The output uses CRLF line endings, 7-bit headers (non-ASCII text is RFC 2047
encoded) and no line over 998 octets. Raises ValueError when an address or
the buyer alias contains characters that cannot go in a header.

Privacy: the notice contains only what the caller passes. The buyer appears
only as the buyer alias, and `rewritten_headers` must be the headers as
rewritten for the buyer, never the received ones.

`should_send_notice` decides whether a notice may be sent at all.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable
from datetime import datetime
from email import policy as email_policy
from email.message import EmailMessage, Message
from email.utils import format_datetime, make_msgid

from .i18n import N_, resolve_locale, translations

# Generator policy: CRLF, RFC 2047 for non-ASCII header text, folding at 78.
NOTICE_POLICY = email_policy.SMTP

# Maximum length, in characters, of the original Subject quoted in the notice's Subject.
MAX_QUOTED_SUBJECT = 120

# Width of the human-readable part's paragraphs, in characters.
TEXT_WIDTH = 72

# Explanations of why a message was blocked, by `Verdict.reason_key`.
OPT_OUT_REASON = N_(
    "The buyer chose not to receive unsolicited messages from sellers. They receive only replies "
    "to messages they sent and messages that are necessary to complete an order."
)
REASONS = {
    "opt_out": (OPT_OUT_REASON,),
    "opt_out_tag_not_critical": (
        OPT_OUT_REASON,
        N_(
            "Your message is tagged [Important], but its content is of a kind that is not "
            "considered necessary to complete an order:"
        ),
    ),
    "opt_out_tag_no_order": (
        OPT_OUT_REASON,
        N_(
            "The [Important] tag counts only when the buyer has a recent order with you, "
            "and this buyer has none."
        ),
    ),
    "content_emails": (
        N_("Your message contains an e-mail address. Contact details cannot be shared with buyers."),
    ),
    "content_phones": (
        N_("Your message contains a phone number. Contact details cannot be shared with buyers."),
    ),
    "content_links": (N_("Your message contains a link to a website that is not allowed."),),
}
GENERIC_REASON = N_("Your message does not meet the buyer-seller messaging rules.")

# The kinds of message that are not critical, listed under the second reason above.
NOT_CRITICAL_KINDS = (
    N_("requests for feedback or reviews"),
    N_("order, shipping, delivery or refund confirmations"),
    N_(
        "proactive customer service, such as product manuals, usage tips, answers to "
        "frequently asked questions or troubleshooting"
    ),
    N_("notices of delays or of products out of stock, and offers of other products"),
)

REPLY_IN_THREAD = N_(
    "If the buyer wrote to you first, reply in the buyer's original thread instead of starting "
    "a new conversation, and keep the buyer's message quoted in your reply."
)
RESEND_AS_CRITICAL = N_(
    "If your message is necessary to complete the order (questions about customizing the "
    "product, scheduling the delivery, a problem with the shipping address, or an unexpected "
    "problem with an order that is not complete yet), send it again with [Important] in the Subject."
)
NO_CONFIRMATIONS = N_(
    "You do not need to send order, shipping or delivery confirmations, because the buyer "
    "already receives them."
)
ADVICE = {
    "opt_out": (REPLY_IN_THREAD, RESEND_AS_CRITICAL),
    "opt_out_tag_not_critical": (REPLY_IN_THREAD, RESEND_AS_CRITICAL, NO_CONFIRMATIONS),
    "opt_out_tag_no_order": (REPLY_IN_THREAD,),
    "content_emails": (N_("Remove the e-mail address and send the message again."),),
    "content_phones": (N_("Remove the phone number and send the message again."),),
    "content_links": (N_("Remove the link and send the message again."),),
}
GENERIC_ADVICE = (REPLY_IN_THREAD, RESEND_AS_CRITICAL)

_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]+")


def should_send_notice(
    envelope_sender: str,
    auto_submitted: str | None,
    seller_wants_notice: bool,
    *,
    automatic: bool = False,
) -> bool:
    """Return True when a blocked notice may go to the sender of a blocked message.

    Never for the null sender, never for a message with an Auto-Submitted
    header of any value ("no" included), and never when the seller turned
    notices off. `automatic` (`Verdict.automatic`) also stops it, which covers
    Precedence: bulk and recognized out-of-office replies.
    """
    if envelope_sender.strip() in ("", "<>"):
        return False
    if auto_submitted is not None:
        return False
    if automatic:
        return False
    return seller_wants_notice


def build_blocked_notice(
    *,
    seller_locale: str | None,
    notice_from: str,
    to_address: str,
    domain: str,
    message_id: str,
    original_subject: str,
    original_date: str | None,
    buyer_alias: str,
    order_id: str | None,
    rule: str,
    reason_key: str,
    now: datetime,
    hostname: str = "",
    arrival_date: datetime | None = None,
    original_message_id: str | None = None,
    rewritten_headers: str | bytes | None = None,
) -> bytes:
    """Build the blocked notice for one blocked message and return its bytes.

    `message_id` is the notice's own Message-ID. When it is empty, one is
    made at `domain`. `hostname` (default `domain`) names this host as the
    Reporting-MTA, and `arrival_date` (default `now`) is when the blocked
    message arrived. `original_message_id`, the seller's own id for the
    blocked message, becomes In-Reply-To so the notice threads under it.
    `reason_key` is `Verdict.reason_key`. An unknown key gets a generic explanation.
    """
    _check_header_value("buyer_alias", buyer_alias)
    _check_header_value("notice_from", notice_from)
    _check_header_value("to_address", to_address)
    _check_header_value("hostname", hostname or domain)

    locale = resolve_locale(seller_locale)
    gettext = translations(locale).gettext
    subject = _one_line(original_subject)

    report = EmailMessage(policy=NOTICE_POLICY)
    report["From"] = notice_from
    report["To"] = to_address
    report["Subject"] = gettext("Message not delivered: {subject}").format(
        subject=shorten(subject, MAX_QUOTED_SUBJECT) or gettext("(no subject)")
    )
    report["Date"] = format_datetime(now)
    report["Message-ID"] = _message_id(message_id, domain)
    if original_message_id and _is_header_safe(original_message_id):
        # Callers pass ids without angle brackets, as the archive stores them.
        msgid = "<" + original_message_id.strip().strip("<>") + ">"
        report["In-Reply-To"] = msgid
        report["References"] = msgid
    report["Auto-Submitted"] = "auto-replied"
    # Asks Microsoft Exchange and Outlook not to send automatic replies.
    report["X-Auto-Response-Suppress"] = "All"
    report["MIME-Version"] = "1.0"
    report["Content-Type"] = "multipart/report; report-type=delivery-status"

    human = _human_part(
        gettext, locale, subject, original_date, buyer_alias, order_id, reason_key
    )
    report.attach(human)
    report.attach(_status_part(hostname or domain, arrival_date or now, buyer_alias, rule))
    if rewritten_headers is not None:
        report.attach(_headers_part(rewritten_headers))

    return report.as_bytes(policy=NOTICE_POLICY)


def _human_part(
    gettext: Callable[[str], str],
    locale: str,
    subject: str,
    original_date: str | None,
    buyer_alias: str,
    order_id: str | None,
    reason_key: str,
) -> EmailMessage:
    intro = gettext("Your message to the buyer {buyer} was blocked and not delivered.")
    lines = [fill_paragraph(intro.format(buyer=buyer_alias)), ""]

    lines.append(gettext("The message"))
    lines.append("  " + gettext("Subject: {subject}").format(subject=subject or gettext("(no subject)")))
    date = _one_line(original_date or "") or gettext("(no date)")
    lines.append("  " + gettext("Date: {date}").format(date=date))
    lines.append("  " + gettext("Buyer: {buyer}").format(buyer=buyer_alias))
    if order_id:
        lines.append("  " + gettext("Order: {order}").format(order=_one_line(order_id)))
    lines.append("")

    lines.append(gettext("Why it was blocked"))
    for paragraph in REASONS.get(reason_key, (GENERIC_REASON,)):
        lines.extend([fill_paragraph(gettext(paragraph)), ""])
    if reason_key == "opt_out_tag_not_critical":
        lines.extend(bullet_item(gettext(kind)) for kind in NOT_CRITICAL_KINDS)
        lines.append("")

    lines.append(gettext("What you can do"))
    for advice in ADVICE.get(reason_key, GENERIC_ADVICE):
        lines.append(bullet_item(gettext(advice)))
    lines.append("")

    lines.append(fill_paragraph(gettext("This is an automatic notice. Please do not reply to it.")))

    part = EmailMessage(policy=NOTICE_POLICY)
    part.set_content("\n".join(lines) + "\n", charset="utf-8", cte="quoted-printable")
    del part["MIME-Version"]  # set_content adds one, but only the top level needs it
    part["Content-Language"] = locale.replace("_", "-")
    return part


def _status_part(reporting_mta: str, arrival_date: datetime, buyer_alias: str, rule: str) -> Message:
    per_message = Message(policy=NOTICE_POLICY)
    per_message["Reporting-MTA"] = f"dns; {reporting_mta}"
    per_message["Arrival-Date"] = format_datetime(arrival_date)

    per_recipient = Message(policy=NOTICE_POLICY)
    per_recipient["Final-Recipient"] = f"rfc822; {buyer_alias}"
    per_recipient["Action"] = "failed"
    per_recipient["Status"] = "5.7.1"
    # RFC 3464 leaves names starting with "X-" for private diagnostic types.
    safe_rule = re.sub(r"[^A-Za-z0-9._-]", "_", rule)
    per_recipient["Diagnostic-Code"] = f"X-Relaymail; blocked by policy rule {safe_rule}"

    part = Message(policy=NOTICE_POLICY)
    part["Content-Type"] = "message/delivery-status"
    part.set_payload([per_message, per_recipient])
    return part


def _headers_part(headers: str | bytes) -> EmailMessage:
    text = headers.decode("utf-8", errors="replace") if isinstance(headers, bytes) else headers
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    seven_bit = text.isascii() and all(len(line) <= 998 for line in text.split("\n"))

    part = EmailMessage(policy=NOTICE_POLICY)
    part.set_content(text, subtype="rfc822-headers", charset="utf-8",
                     cte="7bit" if seven_bit else "quoted-printable")
    del part["MIME-Version"]
    return part


def _message_id(message_id: str, domain: str) -> str:
    if not message_id.strip():
        return make_msgid(domain=domain)
    _check_header_value("message_id", message_id)
    value = message_id.strip()
    return value if value.startswith("<") else f"<{value}>"


def _check_header_value(name: str, value: str) -> None:
    if not value or not _is_header_safe(value):
        raise ValueError(f"{name} = {value!r}: expected printable ASCII with no line breaks")


def _is_header_safe(value: str) -> bool:
    return value.isascii() and _CONTROL_CHARACTERS.search(value) is None


def _one_line(value: str) -> str:
    return _CONTROL_CHARACTERS.sub(" ", value).strip()


def shorten(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - 1].rstrip() + "\u2026"


def fill_paragraph(paragraph: str) -> str:
    return textwrap.fill(paragraph, TEXT_WIDTH, break_long_words=False, break_on_hyphens=False)


def bullet_item(item: str) -> str:
    return textwrap.fill(item, TEXT_WIDTH, initial_indent="- ", subsequent_indent="  ",
                         break_long_words=False, break_on_hyphens=False)
