"""Parse what arrives at a bounce address: DSNs, other bounces, feedback reports, auto-replies.

`parse(raw)` returns a `Report` and never raises. Readers are tried in this order:

    feedback    an ARF report (RFC 5965: multipart/report; report-type=feedback-report,
                or a message/feedback-report part), or a Hotmail-style complaint
    dsn         an RFC 3464 report: each message/delivery-status (or RFC 6533
                message/global-delivery-status) part read field by field, also
                when its blocks lack blank lines or the Content-Type is wrong
    bounce      a non-standard bounce: qmail, Yahoo, Postfix and Exim without DSN,
                old Sendmail, Microsoft Exchange, SMTP32 and a "simple" last resort
                that looks for an address near a status code or a failure phrase
    auto_reply  an RFC 3834 automatic reply or a vacation message
    unknown     none of the above; `problem` says why

Non-standard bounces are read from their human-readable text only: text parts
outside any returned message, cut where a returned copy of the original starts.
A status is taken, in this order, from an enhanced status code (RFC 3463, "5.1.1")
near the recipient, a basic SMTP reply code ("550"), or a known phrase ("user
unknown" gives 5.1.1). The phrases are English, plus a few common German, French,
Spanish and Polish ones.

Limits: a report is read up to `MAX_TEXT_CHARS` characters of text. The readers
recognise layouts seen in real bounces; an unusual layout may yield a status with
no recipient address (the caller still knows the delivery from the bounce token).
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field

from . import mime
from .headers import HeaderField, decode_words, decoding_codecs, first_field, first_token, split_fields

# Text beyond this many characters is not searched, which bounds the time spent on one report.
MAX_TEXT_CHARS = 256 * 1024
# How many levels of reports forwarded inside message/rfc822 parts are opened.
MAX_WRAPPED_DEPTH = 2
# Recipients read from one report; a real bounce about one delivery names a few.
MAX_RECIPIENTS = 50

KIND_FEEDBACK = "feedback"
KIND_DSN = "dsn"
KIND_BOUNCE = "bounce"
KIND_AUTO_REPLY = "auto_reply"
KIND_UNKNOWN = "unknown"

ACTIONS = ("failed", "delayed", "delivered", "relayed", "expanded")
DSN_TYPES = ("message/delivery-status", "message/global-delivery-status")
FEEDBACK_TYPES = ("message/feedback-report",)
RETURNED_TYPES = ("message/rfc822", "message/global", "text/rfc822-headers", "message/rfc822-headers")

# Local parts and display names of the senders of bounces.
DAEMON_LOCAL_PARTS = frozenset(
    {"mailer-daemon", "mailer_daemon", "mailerdaemon", "mail-daemon", "postmaster", "mmdf", "mdaemon", "mail.daemon"}
)


@dataclass(frozen=True)
class RecipientStatus:
    """The status that a report gives for one recipient.

    `address` is lower-cased, or "" when the report names no recipient. `action` is
    an RFC 3464 action ("failed", "delayed", ...) or "". `status` is an enhanced
    status code such as "5.1.1", or "". `diagnostic` is one line of the remote
    server's text, as the report gives it.
    """

    address: str
    action: str
    status: str
    diagnostic: str = ""
    remote_mta: str = ""

    @property
    def failed(self) -> bool:
        """True when delivery to this recipient failed for good (a hard bounce)."""
        return self.action == "failed"

    @property
    def delayed(self) -> bool:
        return self.action == "delayed"


@dataclass(frozen=True)
class Report:
    """One parsed report. `format` names the reader that recognised it."""

    kind: str
    format: str = ""
    recipients: tuple[RecipientStatus, ...] = ()
    reporting_mta: str = ""
    feedback_type: str = ""  # the ARF Feedback-Type ("abuse", "fraud", ...)
    problem: str = ""  # why the report was not recognised, for the records

    @property
    def is_bounce(self) -> bool:
        """True for a DSN or another bounce (not a feedback report or an auto-reply)."""
        return self.kind in (KIND_DSN, KIND_BOUNCE)

    def recipient_for(self, address: str) -> RecipientStatus | None:
        """Return the status of `address`, else the first failed one, else the first one; None if empty."""
        key = address.strip().lower()
        for recipient in self.recipients:
            if key and recipient.address == key:
                return recipient
        for recipient in self.recipients:
            if recipient.failed:
                return recipient
        return self.recipients[0] if self.recipients else None


def parse(raw: bytes) -> Report:
    """Parse a report that arrived at a bounce address. Never raises."""
    try:
        return _parse(raw)
    except Exception as exc:  # noqa: BLE001 - crafted input must never escape as an exception
        return Report(KIND_UNKNOWN, problem=f"the report could not be parsed ({type(exc).__name__})")


def _parse(raw: bytes) -> Report:
    if not raw or not raw.strip():
        return Report(KIND_UNKNOWN, problem="empty message")

    return _read_report(mime.parse(raw), depth=0)


def _read_report(root: mime.Part, depth: int) -> Report:
    top = _Fields(root.fields)
    visible = list(_visible_parts(root))

    feedback = _read_feedback(root, top, visible)
    if feedback is not None:
        return feedback

    dsn = _read_delivery_status(visible)
    if dsn is not None:
        return dsn

    # Some gateways forward the real report as an attached message/rfc822.
    if depth < MAX_WRAPPED_DEPTH:
        for part in visible:
            if part.is_message and part.children[0].content_type == "multipart/report":
                wrapped = _read_report(part.children[0], depth + 1)
                if wrapped.kind != KIND_UNKNOWN:
                    return wrapped

    text = _report_text(visible)
    bounce = _read_bounce(text, top, strict=not _has_bounce_signal(top, text))
    if bounce is not None:
        return bounce
    if _is_auto_reply(top):
        return Report(KIND_AUTO_REPLY, format="rfc3834")
    return Report(KIND_UNKNOWN, problem="no delivery status, feedback report or bounce text found")


# --- header access -------------------------------------------------------------


class _Fields:
    """Lookup of decoded header values by lower-case name."""

    def __init__(self, fields: list[HeaderField]):
        self.fields = fields

    def get(self, key: str) -> str:
        found = first_field(self.fields, key)
        return decode_words(found.value()) if found is not None else ""

    def all(self, key: str) -> list[str]:
        return [decode_words(item.value()) for item in self.fields if item.key == key]


def _visible_parts(root: mime.Part):
    """Yield the parts of the report itself, never those inside a returned message."""
    stack = [root]
    while stack:
        part = stack.pop()
        yield part
        if part.content_type in RETURNED_TYPES or part.is_message:
            continue
        stack.extend(reversed(part.children))


# --- feedback reports -----------------------------------------------------------

_COMPLAINT_SUBJECT = re.compile(r"complaint about message from|abuse report|feedback report", re.I)


def _read_feedback(root: mime.Part, top: _Fields, visible: list[mime.Part]) -> Report | None:
    report_type = (root.param("report-type") or "").strip().strip('"').lower()
    feedback_parts = [part for part in visible if part.content_type in FEEDBACK_TYPES]
    if report_type != "feedback-report" and not feedback_parts:
        return _read_hotmail_complaint(root, top)

    recipients: list[RecipientStatus] = []
    feedback_type = ""
    for part in feedback_parts:
        fields = _status_fields(_decode_text(part.decoded_payload(), part.charset))
        for key, value in fields:
            if key == "feedback-type" and not feedback_type:
                feedback_type = (first_token(value) or "").lower()
            elif key in ("original-rcpt-to", "removal-recipient"):
                address = _address_of(value)
                if address and len(recipients) < MAX_RECIPIENTS:
                    recipients.append(RecipientStatus(address, "", ""))
    return Report(KIND_FEEDBACK, format="arf", recipients=tuple(_unique(recipients)), feedback_type=feedback_type or "abuse")


def _read_hotmail_complaint(root: mime.Part, top: _Fields) -> Report | None:
    # Hotmail's complaint loop wraps the complained-about message with the recipient in
    # X-HmXmrOriginalRecipient, without an ARF part.
    if not _COMPLAINT_SUBJECT.search(top.get("subject")):
        return None
    for part in root.walk():
        if part.is_message:
            inner = _Fields(part.children[0].fields)
            address = _address_of(inner.get("x-hmxmroriginalrecipient"))
            if address:
                return Report(KIND_FEEDBACK, format="hotmail", recipients=(RecipientStatus(address, "", ""),), feedback_type="abuse")
    return None


# --- RFC 3464 delivery status -----------------------------------------------------

_FIELD_LINE = re.compile(r"^([A-Za-z][A-Za-z0-9-]*)[ \t]*:[ \t]*(.*)$")
_ENHANCED = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.]*\d)")
_RECIPIENT_FIELDS = frozenset(
    {
        "final-recipient", "original-recipient", "action", "status", "diagnostic-code", "remote-mta",
        "last-attempt-date", "final-log-id", "will-retry-until", "x-actual-recipient",
    }
)
_MESSAGE_FIELDS = frozenset({"reporting-mta", "arrival-date", "received-from-mta", "original-envelope-id", "dsn-gateway"})


def _read_delivery_status(visible: list[mime.Part]) -> Report | None:
    texts = [_decode_text(part.decoded_payload(), part.charset or "utf-8") for part in visible if part.content_type in DSN_TYPES]
    label = "rfc3464"
    if not texts:
        # Some MTAs put the delivery-status fields in a text part; read them when both
        # a recipient field and an Action or Status field are there.
        texts = [text for text in _text_parts(visible) if _looks_like_status_fields(text)]
        label = "rfc3464-text"

    recipients: list[RecipientStatus] = []
    reporting_mta = ""
    for text in texts:
        found, mta = _status_recipients(text)
        recipients.extend(found)
        reporting_mta = reporting_mta or mta
    recipients = [item for item in recipients if item.action or item.status]
    if not recipients:
        return None
    return Report(KIND_DSN, format=label, recipients=tuple(_unique(recipients)), reporting_mta=reporting_mta)


def _looks_like_status_fields(text: str) -> bool:
    lowered = text.lower()
    has_recipient = "\nfinal-recipient:" in lowered or lowered.startswith("final-recipient:") or "\noriginal-recipient:" in lowered
    return has_recipient and ("\naction:" in lowered or "\nstatus:" in lowered)


def _status_fields(text: str) -> list[tuple[str, str]]:
    """Return (lower-case name, value) of each field line; a blank line gives ("", "")."""
    fields: list[tuple[str, str]] = []
    for line in text.split("\n"):
        if not line.strip():
            fields.append(("", ""))
            continue
        if line[0] in " \t" and fields and fields[-1][0]:
            key, value = fields[-1]
            fields[-1] = (key, f"{value} {line.strip()}")
            continue
        match = _FIELD_LINE.match(line)
        if match:
            fields.append((match.group(1).lower(), match.group(2).strip()))
    return fields


def _status_recipients(text: str) -> tuple[list[RecipientStatus], str]:
    """Read the per-recipient blocks of a delivery-status body; return them and the Reporting-MTA.

    A new recipient starts at a blank line or when a field repeats, so blocks
    that lack the blank line between them are still separated.
    """
    recipients: list[RecipientStatus] = []
    reporting_mta = ""
    current: dict[str, str] = {}

    def close() -> None:
        has_recipient_fields = current.get("final-recipient") or current.get("original-recipient") or current.get("status")
        if has_recipient_fields and len(recipients) < MAX_RECIPIENTS:
            recipients.append(_recipient_of(current, reporting_mta))
        current.clear()

    for key, value in _status_fields(text):
        if not key:
            close()
        elif key in _MESSAGE_FIELDS:
            if key == "reporting-mta" and not reporting_mta:
                reporting_mta = _after_type(value)
        elif key in _RECIPIENT_FIELDS:
            if key in current:
                close()
            current[key] = value
    close()
    return recipients, reporting_mta


def _recipient_of(block: dict[str, str], reporting_mta: str) -> RecipientStatus:
    address = _address_of(_after_type(block.get("final-recipient", "")))
    address = address or _address_of(_after_type(block.get("x-actual-recipient", "")))
    address = address or _address_of(_after_type(block.get("original-recipient", "")))
    diagnostic = _after_type(block.get("diagnostic-code", ""))

    status = _status_code(block.get("status", ""))
    detailed = _status_code(diagnostic)
    if status.endswith(".0.0") and detailed[:1] == status[:1] and not detailed.endswith(".0.0"):
        status = detailed  # a generic Status with a precise code in the diagnostic
    if not status:
        status = detailed or _basic_status(diagnostic)

    action = (first_token(block.get("action", "")) or "").lower()
    if action not in ACTIONS:
        action = {"5": "failed", "4": "delayed", "2": "delivered"}.get(status[:1], "")
    remote = _after_type(block.get("remote-mta", "")) or reporting_mta
    return RecipientStatus(address, action, status, _one_line(diagnostic), remote)


def _after_type(value: str) -> str:
    """Return the text after the "type;" prefix of a DSN field ("rfc822; a@b" gives "a@b")."""
    head, separator, rest = value.partition(";")
    if separator and re.fullmatch(r"\s*[A-Za-z0-9.+-]+\s*", head):
        return rest.strip()
    return value.strip()


def _status_code(value: str) -> str:
    match = _ENHANCED.search(value)
    return f"{match.group(1)}.{int(match.group(2))}.{int(match.group(3))}" if match else ""


# --- the text of a bounce ----------------------------------------------------------

_ORIGINAL_MARKERS = re.compile(
    r"^[ \t]*(?:"
    r"(?<!-)-+.{0,20}(?:original message|returned message|undelivered message|unsent message|message header|"
    r"header of the original|copy of the message|copy of your message|below this line|original headers)"
    r"|(?:-+[ \t]*)?(?:the )?original message (?:follows|headers)"
    r"|original message(?: headers)?:"
    r"|(?:return-path|received|dkim-signature|x-original-to|delivered-to):"
    r"|content-type:[ \t]*message/rfc822"
    r")",
    re.I | re.M,
)
_HTML_DROP = re.compile(r"<(script|style|head)\b", re.I)
_HTML_BREAK = re.compile(r"<\s*(?:br|/p|/div|/tr|/li|/h\d)\b[^<>@]*>", re.I)
_HTML_TAG = re.compile(r"</?[A-Za-z][^<>@]*>")
_HEADER_START = re.compile(r"^(?:return-path|received|from|to|subject|date|message-id|x-[\w-]+|mime-version):", re.I)


def _text_parts(visible: list[mime.Part]):
    """Yield the decoded text of each text part (and of each multipart that could not be split)."""
    for part in visible:
        # A multipart whose boundary matched no line is read as text, so its parts are not lost.
        opaque_multipart = part.content_type.startswith("multipart/") and not part.is_multipart
        is_text = part.content_type.startswith("text/") and part.content_type not in RETURNED_TYPES
        if part.is_multipart or not (is_text or opaque_multipart):
            continue
        text = _decode_text(part.decoded_payload(), part.charset)
        if part.content_type == "text/html":
            text = _strip_html(text)
        yield text


def _report_text(visible: list[mime.Part]) -> str:
    """Return the human-readable text of a bounce, without the returned original message."""
    pieces: list[str] = []
    size = 0
    for text in _text_parts(visible):
        if _starts_with_headers(text):
            continue  # a returned message pasted as a text part
        text = _cut_original(text)
        pieces.append(text)
        size += len(text)
        if size >= MAX_TEXT_CHARS:
            break
    return "\n\n".join(pieces)[:MAX_TEXT_CHARS]


def _cut_original(text: str) -> str:
    # A marker within the first few lines is a banner of the report itself, not a copy.
    for match in _ORIGINAL_MARKERS.finditer(text):
        if text.count("\n", 0, match.start()) >= 2:
            return text[: match.start()]
    return text


def _starts_with_headers(text: str) -> bool:
    lines = [line for line in text.lstrip().split("\n", 8)[:8] if line.strip()]
    if not lines or not _HEADER_START.match(lines[0]):
        return False
    return sum(1 for line in lines if _HEADER_START.match(line)) >= 3


def _strip_html(text: str) -> str:
    text = _drop_html_elements(text)
    text = _HTML_BREAK.sub("\n", text)
    text = _HTML_TAG.sub(" ", text)
    return html.unescape(text)


def _drop_html_elements(text: str) -> str:
    """Remove script, style and head elements; an unclosed one runs to the end of the text."""
    pieces = []
    position = 0
    lowered = text.lower()
    while True:
        match = _HTML_DROP.search(text, position)
        if match is None:
            pieces.append(text[position:])
            return " ".join(pieces)
        pieces.append(text[position : match.start()])
        end = lowered.find(f"</{match.group(1).lower()}", match.end())
        if end < 0:
            return " ".join(pieces)
        position = end


def _decode_text(payload: bytes, charset: str | None) -> str:
    payload = payload[: MAX_TEXT_CHARS * 4]  # a character takes at most 4 bytes in the codecs used
    text = None
    for codec in decoding_codecs(charset):
        try:
            text = payload.decode(codec)
            break
        except (UnicodeDecodeError, LookupError):
            continue
    if text is None:
        text = payload.decode("utf-8", errors="replace")
    return text[:MAX_TEXT_CHARS].replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")


# --- non-standard bounces ------------------------------------------------------------

_BOUNCE_SUBJECT = re.compile(
    r"undeliver|undelivered|not delivered|delivery (?:status|failure|failed|notification|problem|report|error)|"
    r"returned mail|returned to sender|failure notice|mail delivery|could not be delivered|non[- ]?deliver|"
    r"delivery has failed|unable to deliver|mail system error|rejected|bounce|warning: could not send|"
    r"fehlgeschlagen|unzustellbar|nicht zugestellt|non remis|no se ha podido|no entregado|nie dostarczono",
    re.I,
)
_BOUNCE_FROM = re.compile(r"mailer[-_ ]?daemon|postmaster|mail delivery|delivery subsystem|mail administrator", re.I)
_BOUNCE_PHRASES = re.compile(
    r"qmail-send program|postfix program|mail delivery software|could not be delivered|"
    r"permanent fatal errors|did not reach the following recipient|delivery has failed to these recipients|"
    r"unable to deliver|wasn't able to deliver|was not able to deliver|delivery to the following recipient|"
    r"could not deliver|permanent error|undeliverable|returned to sender|delivery failed|"
    r"message could not be sent|following address(?:es)? failed|not delivered to|cannot be delivered|"
    r"not (?:yet )?been delivered|encountered delivery problems",
    re.I,
)


def _has_bounce_signal(top: _Fields, text: str) -> bool:
    if _BOUNCE_FROM.search(top.get("from")) or _BOUNCE_SUBJECT.search(top.get("subject")):
        return True
    if top.get("x-failed-recipients"):
        return True
    return bool(_BOUNCE_PHRASES.search(text[:20000]))


_AUTO_REPLY_SUBJECT = re.compile(
    r"^\s*(?:auto:|auto[- ]?reply|auto[- ]?respon|automatic reply|abwesenheit|absence|vacation|away\b|on leave)|"
    r"automatische antwort|automatisch antwoord|r[ée]ponse automatique|respuesta autom[áa]tica|"
    r"automatyczna odpowied|odpowied[źz] automatyczna|autosvar|out of (?:the )?office|fuera de la oficina",
    re.I,
)


def _is_auto_reply(top: _Fields) -> bool:
    auto_submitted = (first_token(top.get("auto-submitted")) or "").lower()
    if auto_submitted == "auto-replied":
        return True
    for key in ("x-autoreply", "x-autorespond", "x-autoresponder", "x-vacation"):
        if top.get(key):
            return True
    # A bounce address receives no list mail, so bulk or junk precedence marks an automatic reply.
    if (first_token(top.get("precedence")) or "").lower() in ("auto_reply", "bulk", "junk"):
        return True
    return bool(_AUTO_REPLY_SUBJECT.search(top.get("subject")))


# An address as bounces write it, with a dotted domain (the "<address>:" reader also takes "user@host").
_ADDRESS = re.compile(
    r"(?<![\w.%+=/!#$&'*^`{|}~-])([\w.%+=/!#$&'*^`{|}~-]{1,64}@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
    r"[A-Za-z]{2,63})(?![\w-])"
)
_ANGLE_RECIPIENT = re.compile(r"^\s*<([^<>\s@]{1,64}@[^<>\s]{1,255})>(?:\s*\([^)]*\))?\s*:(.*)$")
_EXIM_HEADING = re.compile(
    r"following address(?:\(es\)|es)? failed|address(?:es)? to which the message has not yet been delivered", re.I
)
_SECTION_STARTS = (
    ("exim", _EXIM_HEADING),
    ("list", re.compile(r"could not be delivered to one or more|message could not be delivered to", re.I)),
    ("sendmail", re.compile(r"(?<!-)-+[ \t]*the following addresses had (?:permanent|transient)[\w -]* errors", re.I)),
    ("microsoft", re.compile(r"did not reach the following recipient|delivery has failed to these recipients", re.I)),
    ("list", re.compile(
        r"following recipients did not receive|could not be delivered to the following recipient|"
        r"delivery to the following recipient", re.I)),
)
_BASIC_CODE = re.compile(
    r"(?:^[ \t]*|(?:said:|<<<|#|\(|\[|error:?|reply:?|code:?|\bsmtp;|returned)\s{0,20})['\"]?([45][0-5]\d)(?=[\s\-).,:'\"]|$)",
    re.I | re.M,
)
_DELAY_WORDS = re.compile(
    r"has not (?:yet )?been delivered|not yet been delivered|will (?:continue to |keep )?(?:be )?retr|"
    r"will keep trying|still trying|delivery (?:is )?delayed|delayed delivery|warning: message|"
    r"transient non-fatal|temporarily deferred|you do not need to resend",
    re.I,
)
_FINAL_WORDS = re.compile(
    r"permanent|giving up|given up|i'm not going to try again|too long in (?:the )?queue|"
    r"in the queue too long|fatal error|failed permanently|will not (?:try|be retried)|could not be delivered",
    re.I,
)

# Phrases that give a status when the report has no code, and refine a basic reply code.
_PHRASE_STATUS = (
    (re.compile(r"too many hops|mail loop|loops back|message looping", re.I), "5.4.6"),
    (re.compile(
        r"user unknown|unknown user|no such (?:user|mailbox|recipient|address|account|person)|"
        r"(?:does|do) ?n[o']t exist|not a valid (?:user|recipient|mailbox|address)|"
        r"invalid (?:recipient|mailbox|address|user)|recipient (?:name )?(?:is )?not recognized|"
        r"unknown (?:recipient|local[- ]part|address|mailbox|alias)|mailbox (?:is )?(?:unavailable|not found)|"
        r"(?:address|user|recipient) (?:rejected|not found|unknown)|addressee unknown|user not found|"
        r"no mailbox|not our customer|doesn't have an? .{1,40} account|recipnotfound|user not known|"
        r"invalid (?:final delivery )?userid|no longer valid|address is wrong|"
        r"unbekannt|inconnu|desconocido|nie istnieje|no existe|n'existe pas|existiert nicht",
        re.I), "5.1.1"),
    (re.compile(
        r"account (?:has been |is )?(?:disabled|inactive|deactivated|closed|expired|suspended|locked)|"
        r"mailbox (?:is )?(?:disabled|inactive)|deactivated|not active", re.I), "5.2.1"),
    (re.compile(r"host unknown|unknown host|domain (?:not found|does not exist)|no such domain|unrouteable|"
                r"name service error|host not found|no mx|domain name not found", re.I), "5.1.2"),
    (re.compile(r"could not find a gateway|no route to|unable to route", re.I), "5.4.4"),
    (re.compile(r"quota|mail ?box (?:is )?full|over (?:the )?(?:storage )?limit|exceeded storage|"
                r"insufficient (?:disk )?space|mailbox size limit|exceeds allowed size|mail ?box space", re.I), "5.2.2"),
    (re.compile(r"too (?:large|big)|size limit|exceeds (?:the )?(?:maximum|size)|message size", re.I), "5.3.4"),
    (re.compile(r"spam|blocked|black ?list|block ?list|policy|not authori[sz]ed|relay(?:ing)? (?:access )?denied|"
                r"access denied|virus|rejected for", re.I), "5.7.1"),
    (re.compile(r"too long in (?:the )?queue|in the queue too long|retry time|could not be delivered for|"
                r"delivery time expired|expired", re.I), "4.4.7"),
    (re.compile(r"connection (?:timed out|refused)|establish an smtp connection|no answer|unreachable", re.I), "4.4.1"),
    (re.compile(r"permanent|fatal error|undeliverable|delivery failed|failed permanently|could not be delivered|"
                r"cannot be delivered|unable to deliver|wasn't able to deliver|not delivered|not been delivered|"
                r"encountered (?:an error|delivery problems)|was aborted", re.I), "5.0.0"),
    (_DELAY_WORDS, "4.0.0"),
)


def _read_bounce(text: str, top: _Fields, strict: bool) -> Report | None:
    """Read a non-standard bounce. `strict` (no bounce signal) requires a code and an address."""
    if not text.strip() and not top.get("x-failed-recipients"):
        return None
    excluded = _header_addresses(top)
    blocks, label = _recipient_blocks(text, top, excluded)
    lowered = text.lower()

    recipients: list[RecipientStatus] = []
    judge = _Judge(text)
    for address, context in blocks:
        contexts = [context] + _other_contexts(text, judge.lowered, address, context)
        recipients.append(judge(address, contexts))
    if not recipients:
        label = "simple"
        recipients = _simple_recipients(text, excluded, judge, bounce_signal=not strict)

    if strict:
        recipients = [item for item in recipients if item.address and _has_code(item)]
    if not recipients:
        if strict:
            return None
        # A bounce that names no usable recipient: keep its status for the delivery the token names.
        status, diagnostic = judge.text_status
        if not status:
            return None
        recipients = [RecipientStatus("", _action_for(status, lowered), status, diagnostic)]

    if label == "qmail":
        label = "yahoo" if "yahoo" in lowered[:3000] or "yahoo" in top.get("from").lower() else "qmail"
        if "postfix" in lowered[:3000]:
            label = "postfix"
    elif label == "simple" and "smtp32" in lowered:
        label = "smtp32"
    return Report(KIND_BOUNCE, format=label, recipients=tuple(_unique(recipients)))


def _has_code(item: RecipientStatus) -> bool:
    return bool(item.status) and item.status != "5.0.0"


def _header_addresses(top: _Fields) -> set[str]:
    found: set[str] = set()
    for key in ("from", "to", "cc", "sender", "return-path", "reply-to", "errors-to"):
        for value in top.all(key):
            found.update(match.lower() for match in _ADDRESS.findall(value))
    return found


def _recipient_blocks(text: str, top: _Fields, excluded: set[str]) -> tuple[list[tuple[str, str]], str]:
    """Return (address, context) pairs that a known layout names, and that layout's name."""
    angle = _angle_blocks(text)
    if angle:
        return angle, "exim" if _EXIM_HEADING.search(text) else "qmail"
    for label, start in _SECTION_STARTS:
        match = start.search(text)
        if match:
            blocks = _section_blocks(text[match.end():], excluded)
            if blocks:
                return blocks, label
    failed_header = top.get("x-failed-recipients")
    if failed_header:
        addresses = _ADDRESS.findall(failed_header)[:MAX_RECIPIENTS]
        return [(_clean_address(address), text) for address in addresses], "exim"
    return [], ""


def _angle_blocks(text: str) -> list[tuple[str, str]]:
    """Read "<address>: explanation" blocks (qmail, Yahoo, Postfix without DSN)."""
    blocks: list[tuple[str, str]] = []
    lines = text.split("\n")
    index = 0
    while index < len(lines):
        match = _ANGLE_RECIPIENT.match(lines[index])
        if not match:
            index += 1
            continue
        context = [match.group(2)]
        index += 1
        while index < len(lines) and lines[index].strip() and not _ANGLE_RECIPIENT.match(lines[index]):
            context.append(lines[index])
            index += 1
        blocks.append((_clean_address(match.group(1)), "\n".join(context)))
        if len(blocks) >= MAX_RECIPIENTS:
            break
    return blocks


def _section_blocks(section: str, excluded: set[str]) -> list[tuple[str, str]]:
    """Read the recipients listed after a heading: each address line and the lines under it."""
    blocks: list[tuple[str, str]] = []
    lines = section.split("\n")[:200]
    seen_any = False
    for index, line in enumerate(lines):
        stripped = line.strip()
        if not stripped:
            if seen_any and index + 1 < len(lines) and not lines[index + 1].strip():
                break  # two blank lines end the list
            continue
        if stripped.startswith("-----") and seen_any:
            break
        addresses = [a for a in map(_clean_address, _ADDRESS.findall(stripped)) if a not in excluded]
        if not addresses or not _is_address_line(stripped):
            continue
        seen_any = True
        context = [stripped]
        for following in lines[index + 1 : index + 12]:
            if not following.strip() or _is_address_line(following.strip()):
                break
            context.append(following)
        blocks.append((addresses[0], "\n".join(context)))
        if len(blocks) >= MAX_RECIPIENTS:
            break
    return blocks


def _is_address_line(line: str) -> bool:
    """True for a line that lists a recipient: it starts with the address or is mostly the address."""
    match = _ADDRESS.search(line)
    if not match:
        return False
    before = line[: match.start()].strip().lower()
    if before in ("", "<", "rfc822;", "to:", "recipient:", "address:") or before.endswith(("smtp=", "mailto:", "(", "<")):
        return True
    return len(line) - len(match.group(0)) < 40 and not re.search(r"said|error|host|while", before)


def _other_contexts(text: str, lowered: str, address: str, skip: str) -> list[str]:
    """Return the lines around other mentions of `address` (a transcript, a diagnostic section)."""
    contexts = []
    start = 0
    for _ in range(10):
        index = lowered.find(address, start)
        if index < 0:
            break
        line_start = lowered.rfind("\n", 0, index) + 1
        line_end = lowered.find("\n", index)
        line_end = len(text) if line_end < 0 else line_end
        next_end = lowered.find("\n", line_end + 1)
        window = text[line_start : len(text) if next_end < 0 else next_end]
        if window not in skip:
            contexts.append(window)
        start = index + len(address)
    return contexts


def _simple_recipients(text: str, excluded: set[str], judge: "_Judge", bounce_signal: bool) -> list[RecipientStatus]:
    """Last resort: addresses near a line that carries a code or a failure phrase.

    With `bounce_signal`, an address alone on its line counts even with no code near it.
    """
    lines = text.split("\n")
    scored: dict[str, tuple[int, str]] = {}
    for index, line in enumerate(lines[:2000]):
        addresses = [_clean_address(a) for a in _ADDRESS.findall(line)]
        addresses = [a for a in addresses if a not in excluded and a.split("@")[0] not in DAEMON_LOCAL_PARTS]
        if not addresses:
            continue
        window = "\n".join(lines[max(0, index - 3) : index + 5])
        score = _evidence_score(window)
        for address in addresses:
            if score > scored.get(address, (-1, ""))[0]:
                scored[address] = (score, window)
    if not scored:
        return []
    best = max(score for score, _ in scored.values())
    if best == 0:
        if not bounce_signal:
            return []
        lone = [a for a, (_, window) in scored.items() if any(line.strip().strip("<>") == a for line in window.lower().split("\n"))]
        return [judge(address, [scored[address][1]]) for address in lone[:3]]
    chosen = [(address, window) for address, (score, window) in scored.items() if score == best][:5]
    return [judge(address, [window]) for address, window in chosen]


def _evidence_score(window: str) -> int:
    """Rate how clearly `window` reports a failure: 3 for an enhanced code, 2 a basic code, 1 a phrase."""
    if _ENHANCED.search(window):
        return 3
    if _BASIC_CODE.search(window):
        return 2
    if _phrase_status(window):
        return 1
    return 0


class _Judge:
    """Turn the text around a recipient into its status, falling back on the whole report's."""

    def __init__(self, text: str):
        self.text = text
        self.lowered = text.lower()
        self._text_status: tuple[str, str] | None = None

    @property
    def text_status(self) -> tuple[str, str]:
        if self._text_status is None:
            self._text_status = _status_of([self.text])
        return self._text_status

    def __call__(self, address: str, contexts: list[str]) -> RecipientStatus:
        status, diagnostic = _status_of(contexts)
        if not status:
            status = self.text_status[0]
        status = status or "5.0.0"
        action = _action_for(status, " ".join(contexts + [self.text[:5000]]))
        return RecipientStatus(address, action, status, diagnostic)


def _status_of(contexts: list[str]) -> tuple[str, str]:
    """Return (status, diagnostic line) from the first context that has a code or a phrase."""
    for context in contexts:
        code = _status_code(context)
        if code.startswith(("4", "5")):
            return code, _diagnostic_line(context, _ENHANCED)
    for context in contexts:
        basic = _basic_status(context)
        if basic:
            return basic, _diagnostic_line(context, _BASIC_CODE)
    for context in contexts:
        phrase = _phrase_status(context)
        if phrase:
            return phrase, _one_line(context)
    return "", ""


def _basic_status(text: str) -> str:
    """Map a basic reply code ("550") to an enhanced status, refined by the phrases around it."""
    match = _BASIC_CODE.search(text)
    if not match:
        return ""
    status_class = match.group(1)[0]
    phrase = _phrase_status(text)
    if phrase and phrase not in ("5.0.0", "4.4.7", "4.4.1"):
        return f"{status_class}{phrase[1:]}"
    return f"{status_class}.0.0"


def _phrase_status(text: str) -> str:
    text = " ".join(text.split())  # phrases may be broken across lines
    for pattern, status in _PHRASE_STATUS:
        if pattern.search(text):
            return status
    return ""


def _action_for(status: str, text: str) -> str:
    text = " ".join(text.split())
    if status.startswith("4") and _DELAY_WORDS.search(text) and not _FINAL_WORDS.search(text):
        return "delayed"
    if not status.startswith(("4", "5")) and _DELAY_WORDS.search(text):
        return "delayed"
    return "failed"


def _diagnostic_line(context: str, pattern: re.Pattern) -> str:
    for line in context.split("\n"):
        if pattern.search(line):
            return _one_line(line)
    return _one_line(context)


# --- small helpers ------------------------------------------------------------------


def _address_of(value: str) -> str:
    value = value.strip()
    match = _ADDRESS.search(value)
    if match:
        return _clean_address(match.group(1))
    bare = value.strip("<> \t\"'").lower()
    return bare if "@" in bare and " " not in bare else ""


def _clean_address(address: str) -> str:
    """Lower-case an address found in text, without an X.400 "SMTP=" or a "mailto:" prefix."""
    address = address.lower().rstrip(".")
    local, _, domain = address.rpartition("@")
    local = local.lstrip("'`")
    for prefix in ("smtp=", "rfc822=", "mailto:"):
        if local.startswith(prefix):
            local = local[len(prefix):]
    return f"{local}@{domain}"


def _one_line(text: str, limit: int = 500) -> str:
    return " ".join(text.split())[:limit]


def _unique(recipients: list[RecipientStatus]) -> list[RecipientStatus]:
    """Drop repeats of an address, keeping the first one that has a status."""
    by_address: dict[str, RecipientStatus] = {}
    anonymous: list[RecipientStatus] = []
    for item in recipients:
        if not item.address:
            anonymous.append(item)
            continue
        previous = by_address.get(item.address)
        if previous is None or (not previous.status and item.status):
            by_address[item.address] = item
    return list(by_address.values()) + (anonymous if not by_address else [])
