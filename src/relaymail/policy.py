"""Buyer-seller messaging policy: a `PolicyInput` in, a `Verdict` out.

`decide(inp, config)` is pure: it reads no database, no clock (`inp.now` is the
time) and no network. The one file it may read is the pattern catalog, once per
process, and only when the caller passes no `PatternSet` (see `load_patterns`).
The receive path has already checked sender authorization and DMARC before it
calls `decide`, and it computes the counters and flags in `PolicyInput`.

Order of the seller-to-buyer rules (the first rule that decides, decides):
 1. automatic_cap     an automatic message when one already passed in this pair
                      and direction within [policy] automatic_window_s -> suppress
 2. daily_limit       5 x average daily orders + 600 reached -> defer 450 4.7.1
 3. attachment_type,  a disallowed type -> reject 554 5.7.1; over
    attachment_size   max_attachment_bytes in all -> reject 552 5.3.4
 4. thread_reply      the opt-out does not apply
 5. critical          [Importante]/[Important] in the Subject, a recent order and
                      no not-critical pattern: the opt-out does not apply
 6. opt_out           the buyer declined unsolicited messages -> block
 7. content.emails, content.phones, content.links   "block" mode -> block;
                      "redact" and "flag" matches ride along on the verdict
 8. default           deliver

Why this order differs from the plain numbering of the rules:
- The automatic cap comes first because suppressing is the only outcome that
  ends an autoresponder loop without sending anything. A deferred loop message
  would be retried for days, and an automatic thread reply would otherwise be
  delivered by rule 4 every time.
- Attachment rules come before the opt-out and content rules, and they apply to
  thread replies and critical messages as well. A rejection is given in the
  SMTP session, so the seller's own mail server reports at once what to fix,
  and relaymail sends no notice. Exempting thread replies would let any reply
  carry an executable.
- Thread replies and critical messages are exempt from the opt-out only.
  Content rules still apply to them, because a reply is the easiest place to
  share contact details, and "block" blocks whatever the opt-out.
- Type is checked before total size, because a disallowed file has to go
  whatever its size. Naming it first saves the seller a second attempt.

Buyer-to-seller messages get only the automatic cap. Everything else is
delivered, and it needs a response unless it is automatic.

Limits:
- Phone numbers are found by a digit-count heuristic (10 to 15 digits, or 8
  to 15 after "+"), so long reference numbers can count as phones and spelled-out
  numbers are missed. Obfuscated addresses ("ventas arroba example punto com")
  are not found.
- Attachment types are judged from the first bytes (`SNIFF_BYTES`), and the
  bytes must match the name: a .jpg file holding PNG bytes is rejected, even
  though both types are allowed. A ZIP whose first entry looks like an Office
  part passes as .docx or .xlsx, and any OLE2 file passes as .doc or .xls.
"""

from __future__ import annotations

import codecs
import functools
import re
import tomllib
import unicodedata
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from importlib import resources
from pathlib import Path
from zoneinfo import ZoneInfo

from .config import ContentSection, PolicySection
from .errors import ConfigError

SELLER_TO_BUYER = "seller_to_buyer"
BUYER_TO_SELLER = "buyer_to_seller"
DIRECTIONS = (SELLER_TO_BUYER, BUYER_TO_SELLER)

# Daily limit: DAILY_LIMIT_PER_ORDER x average daily orders + DAILY_LIMIT_BASE.
DAILY_LIMIT_PER_ORDER = 5
DAILY_LIMIT_BASE = 600

# How many leading bytes of each attachment the caller should pass as `head`.
SNIFF_BYTES = 4096

# Values of Precedence that mark a message as automatic (RFC 3834 section 3.1.8).
AUTOMATIC_PRECEDENCE = ("bulk", "junk", "list")

CRITICAL_TAG = re.compile(r"\[(?:importante|important)\]", re.IGNORECASE)


@dataclass(frozen=True)
class Attachment:
    """One attachment as the MIME walker found it."""

    filename: str  # decoded; "" when the part has none
    content_type: str  # as declared, lower-case "type/subtype"
    decoded_size: int  # bytes after Content-Transfer-Encoding decoding
    # The first decoded bytes: SNIFF_BYTES of them, or the whole file.
    # NOTE: with fewer than 64 bytes, BMP files, .docx and .xlsx fail the check.
    head: bytes


@dataclass(frozen=True)
class PolicyInput:
    """Everything `decide` needs about one message for one recipient."""

    direction: str  # SELLER_TO_BUYER or BUYER_TO_SELLER
    subject: str  # decoded
    text: str  # decoded text of the text parts, joined
    envelope_sender: str  # "" for the null sender
    auto_submitted: str | None  # the Auto-Submitted value, None when absent
    precedence: str | None
    looks_automatic: bool  # e.g. an out-of-office reply recognized by header parsing
    thread_reply: bool  # In-Reply-To/References names a message the buyer sent in this pair
    buyer_opted_out: bool
    has_recent_order: bool  # an order with this seller within [policy] critical_order_days
    sent_today: int  # the seller's counted seller-to-buyer messages since local midnight
    orders_last_30_days: int  # the seller's orders over [policy] order_window_days
    automatic_passed_recently: bool  # within [policy] automatic_window_s, this pair and direction
    attachments: tuple[Attachment, ...]
    now: datetime  # aware
    # Addresses and links at this domain (or its subdomains) are never content findings.
    marketplace_domain: str = ""
    # The sender's real addresses. Rewriting replaces them with the sender's
    # alias, so they are never content findings.
    replaced_addresses: tuple[str, ...] = ()


@dataclass(frozen=True)
class Finding:
    """A content-rule match: an address, phone number or link in the Subject or text.

    `start` and `end` index the string named by `location`. `text` is the match
    itself, so a Finding may hold an address: archive it, never log it.
    """

    kind: str  # "emails" | "phones" | "links", as the [policy.content] keys
    action: str  # "flag" | "redact" | "block"
    location: str  # "subject" | "text"
    start: int
    end: int
    text: str


@dataclass(frozen=True)
class Verdict:
    """The outcome of `decide` for one message and one recipient.

    `rule` names the rule that decided. For a delivered message it is the rule
    that let it through: "thread_reply", "critical" or "default".
    `reason_key` picks the blocked notice's explanation (see relaymail.notice).
    `redactions` are the findings in "redact" mode that rewriting must replace.
    `findings` are all findings, for the archive.
    """

    action: str  # "deliver" | "block" | "reject" | "defer" | "suppress"
    rule: str
    reason: str  # English, for the archive and logs. It never contains an address.
    reply: str | None = None  # the full SMTP reply for reject and defer
    automatic: bool = False
    critical: bool = False
    thread_reply: bool = False
    needs_response: bool = False
    strip_subject_tag: bool = False
    reason_key: str = ""
    redactions: tuple[Finding, ...] = ()
    findings: tuple[Finding, ...] = ()


@dataclass(frozen=True)
class PatternCategory:
    """A kind of message that is not critical, such as a review request."""

    name: str
    description: str
    patterns: tuple[re.Pattern[str], ...] = field(repr=False)


@dataclass(frozen=True)
class PatternSet:
    """The not-critical categories, built-in ones first."""

    categories: tuple[PatternCategory, ...]

    def match(self, subject: str, text: str) -> PatternCategory | None:
        """Return the first category with a pattern found in the Subject or text."""
        folded = [fold_text(subject), fold_text(text)]
        for category in self.categories:
            for pattern in category.patterns:
                if any(pattern.search(value) for value in folded):
                    return category
        return None


# --- the decision ---------------------------------------------------------


def decide(inp: PolicyInput, config: PolicySection, patterns: PatternSet | None = None) -> Verdict:
    """Apply the rules in the order of the module docstring and return the verdict.

    `patterns` defaults to the built-in catalog plus `config.extra_patterns_path`,
    loaded once per process. To pick up a changed file, pass the set loaded at
    start or reload. Raises ValueError for an unknown direction or a naive `now`.
    """
    if inp.direction not in DIRECTIONS:
        raise ValueError(f"direction {inp.direction!r}: expected one of {', '.join(DIRECTIONS)}")
    if inp.now.tzinfo is None:
        raise ValueError("PolicyInput.now is a naive datetime; expected an aware one")

    automatic = is_automatic(inp.envelope_sender, inp.auto_submitted, inp.precedence, inp.looks_automatic)
    if automatic and inp.automatic_passed_recently:
        hours = config.automatic_window_s / 3600
        return Verdict(
            action="suppress",
            rule="automatic_cap",
            reason=f"an automatic message already passed in this pair and direction within {hours:g} hours",
            automatic=True,
            thread_reply=inp.thread_reply,
        )

    if inp.direction == BUYER_TO_SELLER:
        return Verdict(
            action="deliver",
            rule="default",
            reason="buyer-to-seller messages have no opt-out rules",
            automatic=automatic,
            needs_response=not automatic,
        )

    if patterns is None:
        patterns = _cached_patterns(config.extra_patterns_path)
    return _decide_seller_to_buyer(inp, config, patterns, automatic)


def _decide_seller_to_buyer(
    inp: PolicyInput, config: PolicySection, patterns: PatternSet, automatic: bool
) -> Verdict:
    tagged = has_critical_tag(inp.subject)
    flags = {"automatic": automatic, "thread_reply": inp.thread_reply, "strip_subject_tag": tagged}

    limit = daily_limit(inp.orders_last_30_days, config.order_window_days)
    if inp.sent_today >= limit:
        return _defer_daily_limit(inp, config, limit, flags)

    rejected = check_attachments(inp.attachments, config)
    if rejected is not None:
        return Verdict(**rejected, **flags)

    critical, demoted_key, demoted_reason = _judge_critical(inp, config, patterns, tagged)
    flags["critical"] = critical

    findings = _find_all(inp, config.content)
    if inp.buyer_opted_out and not inp.thread_reply and not critical:
        reason = "the buyer declined unsolicited messages, and this is neither a thread reply nor a critical message"
        if demoted_reason:
            reason += f"; {demoted_reason}"
        return Verdict(
            action="block", rule="opt_out", reason=reason,
            reason_key=demoted_key or "opt_out", findings=findings, **flags,
        )

    blocking = next((finding for finding in findings if finding.action == "block"), None)
    if blocking is not None:
        return Verdict(
            action="block",
            rule=f"content.{blocking.kind}",
            reason=f"the {blocking.location} contains {_KIND_PHRASES[blocking.kind]}, and [policy.content] {blocking.kind} is \"block\"",
            reason_key=f"content_{blocking.kind}",
            findings=findings,
            **flags,
        )

    return Verdict(
        action="deliver",
        rule=_delivery_rule(inp.thread_reply, critical),
        reason=_delivery_reason(inp.thread_reply, critical, inp.buyer_opted_out),
        redactions=tuple(finding for finding in findings if finding.action == "redact"),
        findings=findings,
        **flags,
    )


def _judge_critical(
    inp: PolicyInput, config: PolicySection, patterns: PatternSet, tagged: bool
) -> tuple[bool, str, str]:
    """Return (critical, reason_key, reason) where the key and reason explain an ignored tag."""
    if not tagged:
        return False, "", ""

    if not inp.has_recent_order:
        return False, "opt_out_tag_no_order", (
            f"the critical tag does not count because the buyer has no order from this seller "
            f"in the last {config.critical_order_days} days"
        )

    category = patterns.match(inp.subject, inp.text)
    if category is not None:
        return False, "opt_out_tag_not_critical", (
            f"the critical tag does not count because the message matches the not-critical "
            f"category {category.name} ({category.description})"
        )

    return True, "", ""


def _delivery_rule(thread_reply: bool, critical: bool) -> str:
    if thread_reply:
        return "thread_reply"
    if critical:
        return "critical"
    return "default"


def _delivery_reason(thread_reply: bool, critical: bool, opted_out: bool) -> str:
    if thread_reply:
        return "a reply in a thread the buyer started is delivered whatever the opt-out"
    if critical and opted_out:
        return "a critical message is delivered although the buyer declined unsolicited messages"
    return "no rule stopped the message"


# --- automatic messages -----------------------------------------------------


def is_automatic(
    envelope_sender: str, auto_submitted: str | None, precedence: str | None, looks_automatic: bool
) -> bool:
    """Return True for the null sender, Auto-Submitted other than "no", Precedence bulk/junk/list,
    or a message that header parsing recognized as automatic (an out-of-office reply, say)."""
    if envelope_sender.strip() in ("", "<>"):
        return True

    if auto_submitted is not None:
        # The value may carry parameters: "auto-replied; owner-email=..." (RFC 3834 section 5).
        keyword = auto_submitted.split(";", 1)[0].strip().lower()
        if keyword != "no":
            return True

    if precedence is not None and precedence.strip().lower() in AUTOMATIC_PRECEDENCE:
        return True

    return looks_automatic


# --- daily limit ------------------------------------------------------------


def daily_limit(orders_last_30_days: int, window_days: int) -> int:
    """Return the seller's daily message limit: 5 x average daily orders + 600.

    The average is `orders_last_30_days / window_days` and the product is rounded
    down, in integer arithmetic: 7 orders over 30 days give 600 + 35 // 30 = 601.
    Raises ValueError for a negative count or a window under one day.
    """
    if orders_last_30_days < 0:
        raise ValueError(f"orders_last_30_days = {orders_last_30_days}: expected a count >= 0")
    if window_days < 1:
        raise ValueError(f"window_days = {window_days}: expected at least 1")
    return DAILY_LIMIT_BASE + (DAILY_LIMIT_PER_ORDER * orders_last_30_days) // window_days


def day_start(now: datetime, tz: str | ZoneInfo) -> datetime:
    """Return the first instant of `now`'s local day in `tz`, as an aware UTC datetime.

    The result is in UTC because Python compares and subtracts two datetimes
    of the same zone by wall-clock time, which is wrong across a DST change.
    Where a DST change skips local midnight (as in America/Havana), the day
    starts at the first local time that exists, such as 01:00.
    """
    zone = _zone(tz)
    local_date = now.astimezone(zone).date()
    return _local_midnight_utc(local_date.year, local_date.month, local_date.day, zone)


def next_reset(now: datetime, tz: str | ZoneInfo) -> datetime:
    """Return the first instant of the next local day in `tz`, when the daily count resets, in UTC."""
    zone = _zone(tz)
    tomorrow = now.astimezone(zone).date() + timedelta(days=1)
    return _local_midnight_utc(tomorrow.year, tomorrow.month, tomorrow.day, zone)


def _local_midnight_utc(year: int, month: int, day: int, zone: ZoneInfo) -> datetime:
    # fold=0 takes the offset in force before a transition, so a skipped
    # 00:00 maps to the instant at which the first valid local time begins.
    return datetime(year, month, day, tzinfo=zone).astimezone(timezone.utc)


def _zone(tz: str | ZoneInfo) -> ZoneInfo:
    return tz if isinstance(tz, ZoneInfo) else ZoneInfo(tz)


def _defer_daily_limit(inp: PolicyInput, config: PolicySection, limit: int, flags: dict) -> Verdict:
    reset_utc = next_reset(inp.now, config.timezone)
    reset_local = reset_utc.astimezone(_zone(config.timezone))
    when = f"{reset_local:%Y-%m-%d %H:%M} {config.timezone} ({reset_utc:%H:%M} UTC)"
    return Verdict(
        action="defer",
        rule="daily_limit",
        reason=f"the seller reached the daily limit of {limit} messages ({inp.sent_today} counted today); it resets at {when}",
        reply=f"450 4.7.1 Daily limit of {limit} messages reached; it resets at {when}",
        **flags,
    )


# --- critical tag and not-critical patterns ---------------------------------


def has_critical_tag(subject: str) -> bool:
    """Return True when the Subject contains [Importante] or [Important] in any letter case."""
    return CRITICAL_TAG.search(subject) is not None


def remove_critical_tag(subject: str) -> str:
    """Return the Subject without its critical tags, a colon right after a tag, and doubled spaces."""
    without = re.sub(r"\[(?:importante|important)\]:?", " ", subject, flags=re.IGNORECASE)
    return re.sub(r"[ \t]{2,}", " ", without).strip()


def fold_text(text: str) -> str:
    """Return `text` without accents, with straight apostrophes and single spaces.

    Pattern matching uses this on both sides, so "Reseña" and "RESENA" match
    the pattern "resena". Letter case is handled by re.IGNORECASE.
    """
    decomposed = unicodedata.normalize("NFKD", text)
    stripped = "".join(ch for ch in decomposed if unicodedata.category(ch) != "Mn")
    straight = stripped.translate(_TYPOGRAPHIC_APOSTROPHES)
    return re.sub(r"\s+", " ", straight)


_TYPOGRAPHIC_APOSTROPHES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u02bc": "'"})


def load_patterns(extra_path: str | Path = "") -> PatternSet:
    """Read the built-in not-critical patterns, add those of `extra_path`, and compile them.

    An extra category with a built-in name adds its patterns to that category.
    Raises ConfigError naming the file, the category and the pattern when the
    file cannot be read or a pattern does not compile.
    """
    builtin = resources.files("relaymail").joinpath("data/critical_patterns.toml").read_text("utf-8")
    merged: dict[str, tuple[str, list[str]]] = {}
    _merge_categories(merged, _parse_pattern_file(builtin, "relaymail/data/critical_patterns.toml"))

    if extra_path:
        path = Path(extra_path)
        try:
            extra = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read patterns file {path}: {exc}") from None
        _merge_categories(merged, _parse_pattern_file(extra, str(path)))

    categories = [
        PatternCategory(name, description, tuple(_compile(name, source, origin) for source, origin in sources))
        for name, (description, sources) in merged.items()
    ]
    return PatternSet(tuple(categories))


@functools.lru_cache(maxsize=8)
def _cached_patterns(extra_path: str) -> PatternSet:
    return load_patterns(extra_path)


def _parse_pattern_file(text: str, origin: str) -> list[tuple[str, str, list[tuple[str, str]]]]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"patterns file {origin} is not valid TOML: {exc}") from None

    categories = data.get("category")
    if not isinstance(categories, list) or set(data) != {"category"}:
        raise ConfigError(f"patterns file {origin}: expected only [[category]] tables")

    parsed = []
    for index, table in enumerate(categories, start=1):
        name = table.get("name")
        patterns = table.get("patterns")
        description = table.get("description", "")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"patterns file {origin}: category {index} needs a name (a string)")
        if not isinstance(patterns, list) or not all(isinstance(p, str) and p for p in patterns):
            raise ConfigError(f"patterns file {origin}: category {name!r} needs patterns (a list of non-empty strings)")
        if not isinstance(description, str):
            raise ConfigError(f"patterns file {origin}: category {name!r} has a description that is not a string")
        parsed.append((name, description, [(p, origin) for p in patterns]))
    return parsed


def _merge_categories(merged: dict[str, tuple[str, list[tuple[str, str]]]], parsed: list) -> None:
    for name, description, sources in parsed:
        if name in merged:
            old_description, old_sources = merged[name]
            merged[name] = (old_description or description, old_sources + sources)
        else:
            merged[name] = (description or name, list(sources))


def _compile(category: str, source: str, origin: str) -> re.Pattern[str]:
    try:
        return re.compile(fold_text(source), re.IGNORECASE)
    except re.error as exc:
        raise ConfigError(f"patterns file {origin}: category {category!r}: invalid pattern {source!r}: {exc}") from None


# --- content rules ----------------------------------------------------------

_KIND_PHRASES = {"emails": "an e-mail address", "phones": "a phone number", "links": "a link"}

EMAIL_PATTERN = re.compile(r"[\w.!#$%&'*+/=?^`{|}~-]+@(?:\w(?:[\w-]*\w)?\.)+\w(?:[\w-]*\w)?")
# Candidate phone numbers: digits with spaces, dots, hyphens or parentheses
# between them; `_is_phone` then checks the digit count.
PHONE_PATTERN = re.compile(r"(?<![\w+])(?:\+[ \u00a0]?|\()?\d[\d \u00a0().-]{5,24}\d(?!\w)")
LINK_PATTERN = re.compile(r"\b(?:(?:https?|ftp)://|www\.)[^\s<>\"'()\[\]{}]+", re.IGNORECASE)


def find_contact_details(
    text: str,
    content: ContentSection,
    *,
    location: str = "text",
    marketplace_domain: str = "",
    replaced_addresses: tuple[str, ...] = (),
) -> tuple[Finding, ...]:
    """Return the findings in `text` for every content rule that is not "off", in text order.

    Addresses in `replaced_addresses`, and addresses and links at the
    marketplace domain or a domain in `content.links_allowlist`, are skipped.
    """
    findings: list[Finding] = []
    own = {address.lower() for address in replaced_addresses}

    if content.emails != "off":
        for match in EMAIL_PATTERN.finditer(text):
            address = match.group().lower()
            domain = address.rsplit("@", 1)[1]
            if address in own or _domain_within(domain, [marketplace_domain]):
                continue
            findings.append(Finding("emails", content.emails, location, match.start(), match.end(), match.group()))

    if content.phones != "off":
        for match in PHONE_PATTERN.finditer(text):
            if _is_phone(match.group()):
                findings.append(Finding("phones", content.phones, location, match.start(), match.end(), match.group()))

    if content.links != "off":
        allowed = [marketplace_domain, *content.links_allowlist]
        for match in LINK_PATTERN.finditer(text):
            link = match.group().rstrip(".,;:!?")
            if _domain_within(_link_host(link), allowed):
                continue
            findings.append(Finding("links", content.links, location, match.start(), match.start() + len(link), link))

    return tuple(sorted(findings, key=lambda finding: (finding.start, finding.end)))


def apply_redactions(text: str, findings: tuple[Finding, ...], placeholder: dict[str, str]) -> str:
    """Replace each "redact" finding of `text` with `placeholder[finding.kind]`.

    The findings must come from `find_contact_details` on this same string.
    Where matches overlap (an address inside a link), the earlier one wins.
    Rewriting calls this once per decoded text part, with placeholders from
    `relaymail.i18n.redaction_placeholder` in the recipient's locale.
    """
    pieces = []
    position = 0
    for finding in sorted(findings, key=lambda f: f.start):
        if finding.action != "redact" or finding.start < position:
            continue
        pieces.append(text[position:finding.start])
        pieces.append(placeholder[finding.kind])
        position = finding.end
    pieces.append(text[position:])
    return "".join(pieces)


def _find_all(inp: PolicyInput, content: ContentSection) -> tuple[Finding, ...]:
    options = {"marketplace_domain": inp.marketplace_domain, "replaced_addresses": inp.replaced_addresses}
    in_subject = find_contact_details(inp.subject, content, location="subject", **options)
    in_text = find_contact_details(inp.text, content, location="text", **options)
    return in_subject + in_text


def _is_phone(candidate: str) -> bool:
    digits = sum(ch.isdigit() for ch in candidate)
    if candidate.startswith("+"):
        return 8 <= digits <= 15
    return 10 <= digits <= 15


def _link_host(link: str) -> str:
    rest = re.sub(r"^(?:https?|ftp)://", "", link, flags=re.IGNORECASE)
    authority = re.split(r"[/?#\\]", rest, maxsplit=1)[0]
    host = authority.rsplit("@", 1)[-1]
    return host.split(":", 1)[0].rstrip(".").lower()


def _domain_within(domain: str, allowed: list[str]) -> bool:
    domain = domain.rstrip(".").lower()
    for entry in allowed:
        entry = entry.rstrip(".").lower()
        if entry and (domain == entry or domain.endswith("." + entry)):
            return True
    return False


# --- attachments --------------------------------------------------------------

# Display names for the reply that lists the allowed types.
KIND_NAMES = {
    "pdf": "PDF",
    "jpeg": "JPEG",
    "png": "PNG",
    "gif": "GIF",
    "tiff": "TIFF",
    "bmp": "BMP",
    "text": "plain text (.txt)",
    "csv": "CSV",
    "word": "Word (.doc, .docx)",
    "excel": "Excel (.xls, .xlsx)",
}

# Filename extension -> (kind, the format its bytes must have).
EXTENSIONS = {
    ".pdf": ("pdf", "pdf"),
    ".jpg": ("jpeg", "jpeg"),
    ".jpeg": ("jpeg", "jpeg"),
    ".jpe": ("jpeg", "jpeg"),
    ".jfif": ("jpeg", "jpeg"),
    ".png": ("png", "png"),
    ".gif": ("gif", "gif"),
    ".tif": ("tiff", "tiff"),
    ".tiff": ("tiff", "tiff"),
    ".bmp": ("bmp", "bmp"),
    ".txt": ("text", "text"),
    ".text": ("text", "text"),
    ".csv": ("csv", "text"),
    ".doc": ("word", "ole2"),
    ".docx": ("word", "docx"),
    ".xls": ("excel", "ole2"),
    ".xlsx": ("excel", "xlsx"),
}

# Declared type -> extension, for attachments that have no filename.
CONTENT_TYPE_EXTENSIONS = {
    "application/pdf": ".pdf",
    "image/jpeg": ".jpg",
    "image/pjpeg": ".jpg",
    "image/png": ".png",
    "image/gif": ".gif",
    "image/tiff": ".tif",
    "image/bmp": ".bmp",
    "image/x-ms-bmp": ".bmp",
    "text/plain": ".txt",
    "text/csv": ".csv",
    "application/msword": ".doc",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": ".docx",
    "application/vnd.ms-excel": ".xls",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet": ".xlsx",
}

_MAGIC = (
    (b"%PDF-", "pdf"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),  # BigTIFF
    (b"MM\x00+", "tiff"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "ole2"),  # .doc, .xls (and other OLE2 files)
    (b"PK\x03\x04", "zip"),
    (b"MZ", "executable"),
    (b"\x7fELF", "executable"),
    (b"\xcf\xfa\xed\xfe", "executable"),  # Mach-O, 64-bit
    (b"Rar!\x1a\x07", "archive"),
    (b"7z\xbc\xaf\x27\x1c", "archive"),
    (b"\x1f\x8b", "archive"),  # gzip
)

# Sizes of the BMP DIB header that follows the 14-byte file header.
_BMP_DIB_SIZES = (12, 40, 52, 56, 64, 108, 124)

# First entries that an Office Open XML package starts with. The checks add
# "word/" for .docx and "xl/" for .xlsx.
_OOXML_FIRST_ENTRIES = ("[Content_Types].xml", "_rels/", "docProps/", "customXml/")


def sniff_format(head: bytes, complete: bool = False) -> str | None:
    """Return the format of a file from its first bytes, or None when unknown.

    Formats: pdf, jpeg, png, gif, tiff, bmp, ole2, zip, executable, archive,
    text. Pass `complete=True` when `head` is the whole file, so that a
    multi-byte sequence cut at its end is an error instead of a truncation.
    """
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    if _is_bmp(head):
        return "bmp"
    if _is_text(head, complete):
        return "text"
    return None


def check_attachments(attachments: tuple[Attachment, ...], config: PolicySection) -> dict | None:
    """Return the verdict fields of a type or size rejection, or None when every attachment passes."""
    allowed = list(config.allowed_attachment_types)
    allowed_names = ", ".join(KIND_NAMES[kind] for kind in allowed)

    for index, attachment in enumerate(attachments, start=1):
        problem = _attachment_problem(attachment, allowed)
        if problem is not None:
            return {
                "action": "reject",
                "rule": "attachment_type",
                "reason": f"attachment {index} of {len(attachments)} is not allowed: {problem}",
                "reply": f"554 5.7.1 Attachment {_reply_name(attachment)} is not an allowed type. Allowed types: {allowed_names}",
            }

    total = sum(attachment.decoded_size for attachment in attachments)
    if total > config.max_attachment_bytes:
        largest = max(attachments, key=lambda attachment: attachment.decoded_size)
        limit = config.max_attachment_bytes
        return {
            "action": "reject",
            "rule": "attachment_size",
            "reason": f"attachments total {total} bytes, over the limit of {limit} bytes",
            "reply": (
                f"552 5.3.4 Attachments total {total:,} bytes, over the limit of {limit:,} bytes "
                f"per message; the largest is {_reply_name(largest)} ({largest.decoded_size:,} bytes)"
            ),
        }

    return None


def _attachment_problem(attachment: Attachment, allowed: list[str]) -> str | None:
    """Return why the attachment is not allowed, in English without its name, or None."""
    declared = attachment.content_type.lower()
    if declared.split("/", 1)[0] in ("message", "multipart"):
        return f"declared {declared}, which is never an allowed type"

    extension = _extension(attachment.filename) or CONTENT_TYPE_EXTENSIONS.get(declared, "")
    if extension not in EXTENSIONS:
        return f"the name or declared type ({declared or 'none'}) is not of an allowed type"

    kind, expected = EXTENSIONS[extension]
    if kind not in allowed:
        return f"{KIND_NAMES[kind]} is not in [policy] allowed_attachment_types"

    complete = attachment.decoded_size <= len(attachment.head)
    found = sniff_format(attachment.head, complete)
    if not _format_matches(expected, found, attachment.head):
        return f"the name says {extension} but the bytes are {found or 'of an unknown format'}"

    return None


def _format_matches(expected: str, found: str | None, head: bytes) -> bool:
    if expected in ("docx", "xlsx"):
        return found == "zip" and _is_ooxml(head, "word/" if expected == "docx" else "xl/")
    return found == expected


def _extension(filename: str) -> str:
    # Windows ignores trailing dots and spaces, so "x.exe." is an .exe.
    name = filename.strip().rstrip(". ")
    dot = name.rfind(".")
    return name[dot:].lower() if dot > 0 else ""


def _is_bmp(head: bytes) -> bool:
    if len(head) < 18 or not head.startswith(b"BM"):
        return False
    return int.from_bytes(head[14:18], "little") in _BMP_DIB_SIZES


def _is_ooxml(head: bytes, app_folder: str) -> bool:
    # ZIP local file header: the name length is at offset 26, the name at 30.
    if len(head) < 30:
        return False
    name_length = int.from_bytes(head[26:28], "little")
    first_entry = head[30:30 + name_length].decode("cp437", errors="replace")
    return first_entry.startswith(_OOXML_FIRST_ENTRIES + (app_folder,))


def _is_text(head: bytes, complete: bool) -> bool:
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return _decodes(head, "utf-16", complete)
    if b"\x00" in head:
        return False
    # Control characters other than tab, line feed, form feed, carriage
    # return and the DOS end-of-file mark do not occur in text files.
    if re.search(rb"[\x01-\x08\x0b\x0e-\x19\x1b-\x1f]", head):
        return False
    # Text that is not UTF-8 is taken as a single-byte charset (Windows-1252, say).
    return True


def _decodes(data: bytes, encoding: str, complete: bool) -> bool:
    decoder = codecs.getincrementaldecoder(encoding)()
    try:
        decoder.decode(data, final=complete)
    except UnicodeDecodeError:
        return False
    return True


def _reply_name(attachment: Attachment) -> str:
    """Return the attachment's name, quoted and reduced to printable ASCII, for an SMTP reply."""
    if not attachment.filename:
        return f"of type {_printable_ascii(attachment.content_type) or 'unknown'} (no filename)"
    return f'"{_printable_ascii(attachment.filename)}"'


def _printable_ascii(value: str) -> str:
    # Accents are dropped ("Guía" -> "Guia"), other non-ASCII characters and
    # controls become "?", so the value cannot break the reply line.
    decomposed = unicodedata.normalize("NFKD", value)
    without_accents = "".join(ch for ch in decomposed if unicodedata.category(ch) != "Mn")
    printable = "".join(ch if " " <= ch <= "~" else "?" for ch in without_accents).replace('"', "'")
    if len(printable) > 80:
        printable = printable[:77] + "..."
    return printable
