"""Bounce addresses, the reports that arrive at them, and addresses that keep bouncing.

A bounce address is `bounce+<queue id>.<index>.<expiry day>.<mac>@<domain>`,
all lower case because remote MTAs may fold the case of local parts. The mac
is a truncated HMAC-SHA256 over the other fields with `[relay] bounce_secret`,
so only relaymail can mint one; `verify_bounce_address` returns the delivery it
names, or None when the token is malformed, forged or expired. `<index>` is the
position of the delivery among its message's deliveries, in row id order.

The database functions are synchronous units of work for `Store.run` (or
`AsyncSession.run_sync`); none of them commits. `apply_report` archives a report
that arrived at a bounce address, stores what `relaymail.reports.parse` read
from it (`record_report`) against the delivery the token names, and handles a
late bounce: a failed recipient status in a DSN or another bounce about a
delivery already marked "sent" bounces that delivery and queues the DSN to the
original sender (relaymail.queue.record_late_bounce). Nothing in a report is
ever forwarded to the other party.

An address whose deliveries fail hard `UNDELIVERABLE_AFTER` times within
`UNDELIVERABLE_WINDOW` is marked undeliverable (`record_hard_bounce`,
`is_undeliverable`, `undeliverable_addresses` for the CLI). Only statuses about
the address or its mailbox count (`counts_against_address`): a message rejected
as spam or as too large says nothing about the address.
NOTE: the limits are module constants until [delivery] gets keys for them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from .models import BounceReport, Delivery, DeliveryState, Message, UndeliverableAddress, utcnow
from .reports import Report

if TYPE_CHECKING:
    from .config import Config
    from .queue import BounceEffects

BOUNCE_PREFIX = "bounce+"
TOKEN_LIFETIME_DAYS = 14
MAC_BYTES = 10

# Hard bounces within the window after which an address is marked undeliverable.
UNDELIVERABLE_AFTER = 3
UNDELIVERABLE_WINDOW = timedelta(days=30)

# Enhanced status codes (RFC 3463) that count against an address: its mailbox or
# domain (5.1.x), the mailbox's state (5.2.x), and routing to it (5.4.4). "5.0.0"
# counts too, because many servers reject an unknown user with a bare 550.
ADDRESS_STATUS_PREFIXES = ("5.0.", "5.1.", "5.2.", "5.4.4")

EFFECT_LATE_BOUNCE = "late_bounce"
EFFECT_RECORDED = "recorded"
EFFECT_NO_DELIVERY = "no_delivery"


@dataclass(frozen=True)
class BounceToken:
    queue_id: str
    index: int
    expires_day: int


def make_bounce_address(secret: str, domain: str, queue_id: str, index: int, now_s: float | None = None) -> str:
    """Return the bounce address for recipient `index` of message `queue_id`."""
    today = int((now_s if now_s is not None else time.time()) // 86400)
    payload = f"{queue_id.lower()}.{index}.{today + TOKEN_LIFETIME_DAYS}"
    return f"{BOUNCE_PREFIX}{payload}.{_mac(secret, payload)}@{domain}"


def is_bounce_local_part(local_part: str) -> bool:
    return local_part.lower().startswith(BOUNCE_PREFIX)


def verify_bounce_address(secret: str, local_part: str, now_s: float | None = None) -> BounceToken | None:
    """Return the token in a bounce address local part, or None if invalid or expired."""
    local_part = local_part.lower()
    if not local_part.startswith(BOUNCE_PREFIX):
        return None

    fields = local_part[len(BOUNCE_PREFIX):].split(".")
    if len(fields) != 4:
        return None
    queue_id, index, expires, mac = fields
    if not (queue_id.isalnum() and index.isdigit() and expires.isdigit()):
        return None

    payload = f"{queue_id}.{index}.{expires}"
    if not hmac.compare_digest(mac, _mac(secret, payload)):
        return None

    today = int((now_s if now_s is not None else time.time()) // 86400)
    if int(expires) < today:
        return None
    return BounceToken(queue_id=queue_id.upper(), index=int(index), expires_day=int(expires))


def _mac(secret: str, payload: str) -> str:
    digest = hmac.new(secret.encode(), payload.encode(), hashlib.sha256).digest()[:MAC_BYTES]
    return base64.b32encode(digest).decode().lower()


# --- reports at bounce addresses ------------------------------------------------


def apply_report(session: Session, config: Config, token: BounceToken, report: Report, archived: Message) -> tuple[BounceReport, BounceEffects | None]:
    """Archive `archived` (the report as received), record `report` and apply a late bounce.

    Returns the BounceReport row and, for a late bounce, what bouncing the
    delivery caused (relaymail.queue.BounceEffects). The caller commits, holding
    the writer lock.
    """
    from . import dsn, queue  # both import this module

    delivery = delivery_for_token(session, token)
    parent = session.get(Message, delivery.message_id) if delivery is not None else session.scalar(
        select(Message).where(Message.queue_id == token.queue_id.upper())
    )
    if parent is not None:
        archived.parent_id = parent.id
        archived.pair_id = parent.pair_id
        archived.seller_id = parent.seller_id
        archived.buyer_id = parent.buyer_id
    session.add(archived)
    session.flush()

    row = record_report(session, report, archived, delivery)
    if row.effect != EFFECT_LATE_BOUNCE:
        return row, None
    # A report's "failed" with a 4.x.x status means the remote side gave up after temporary errors.
    failure = dsn.Failure(row.status or "5.0.0", row.diagnostic, "smtp", hard=not row.status.startswith("4"))
    return row, queue.record_late_bounce(session, config, delivery, failure, row.reporting_mta)



def delivery_for_token(session: Session, token: BounceToken) -> Delivery | None:
    """Return the delivery a bounce token names, or None when its message or row is gone."""
    message_id = session.scalar(select(Message.id).where(Message.queue_id == token.queue_id.upper()))
    if message_id is None:
        return None
    query = select(Delivery).where(Delivery.message_id == message_id).order_by(Delivery.id).offset(token.index).limit(1)
    return session.scalar(query)


def record_report(session: Session, report: Report, archived: Message, delivery: Delivery | None) -> BounceReport:
    """Add the BounceReport row of `report`, archived as `archived` (flushed), about `delivery`.

    The row's `effect` is EFFECT_LATE_BOUNCE when the report is a bounce whose
    status for the delivery's recipient (else its first failed one) is "failed"
    and the delivery is "sent". Delayed notices, feedback reports, automatic
    replies and reports about queued, held or bounced deliveries are recorded
    only.
    """
    recipient = report.recipient_for(delivery.recipient if delivery is not None else "")
    row = BounceReport(
        message_id=archived.id,
        delivery_id=delivery.id if delivery is not None else None,
        kind=report.kind,
        format=_text(report.format, 32),
        action=_text(recipient.action, 16) if recipient else "",
        status=_text(recipient.status, 16) if recipient else "",
        recipient=_text(recipient.address, 320) if recipient else "",
        diagnostic=_text(recipient.diagnostic if recipient else report.problem, 2000),
        reporting_mta=_text(recipient.remote_mta if recipient and recipient.remote_mta else report.reporting_mta, 255),
        feedback_type=_text(report.feedback_type, 32),
        effect=EFFECT_RECORDED,
        created_at=utcnow(),
    )
    if delivery is None:
        row.effect = EFFECT_NO_DELIVERY
    elif report.is_bounce and recipient is not None and recipient.failed and delivery.state == DeliveryState.SENT.value:
        row.effect = EFFECT_LATE_BOUNCE
    session.add(row)
    session.flush()
    return row


def _text(value: str, limit: int) -> str:
    # PostgreSQL text columns cannot hold NUL; reports are untrusted input.
    return value.replace("\x00", "")[:limit]


# --- undeliverable addresses -----------------------------------------------------


def counts_against_address(status: str) -> bool:
    """Return True when a hard bounce with `status` shows that the address itself cannot receive mail."""
    return status.startswith(ADDRESS_STATUS_PREFIXES)


def record_hard_bounce(session: Session, address: str, status: str, diagnostic: str, now: datetime | None = None) -> bool:
    """Count a hard bounce of `address` when its status counts; return True if the address just became undeliverable.

    Concurrent first bounces of one address are safe: the row is created with
    INSERT ... ON CONFLICT DO NOTHING, then locked (FOR UPDATE on PostgreSQL).
    """
    if not counts_against_address(status):
        return False
    now = now or utcnow()
    key = address.strip().lower()[:320]
    _ensure_row(session, key, now)
    row = session.scalar(
        select(UndeliverableAddress).where(UndeliverableAddress.address == key).with_for_update()
    )
    if row.hard_bounces == 0 or now - row.window_started_at > UNDELIVERABLE_WINDOW:
        row.hard_bounces = 0
        row.window_started_at = now
    row.hard_bounces += 1
    row.last_bounce_at = now
    row.last_status = status[:16]
    row.last_diagnostic = _text(diagnostic, 2000)

    became = row.undeliverable_since is None and row.hard_bounces >= UNDELIVERABLE_AFTER
    if became:
        row.undeliverable_since = now
    session.flush()
    return became


def _ensure_row(session: Session, key: str, now: datetime) -> None:
    values = {
        "address": key,
        "hard_bounces": 0,
        "window_started_at": now,
        "last_bounce_at": now,
        "last_status": "",
        "last_diagnostic": "",
    }
    dialect = session.get_bind().dialect.name
    insert = postgresql_insert if dialect == "postgresql" else sqlite_insert
    session.execute(insert(UndeliverableAddress).values(**values).on_conflict_do_nothing())


def is_undeliverable(session: Session, address: str) -> bool:
    """Return True when `address` (any case) is marked undeliverable."""
    since = session.scalar(
        select(UndeliverableAddress.undeliverable_since).where(UndeliverableAddress.address == address.strip().lower())
    )
    return since is not None


async def undeliverable_addresses(store, include_counting: bool = False) -> list[dict]:
    """Return the addresses marked undeliverable, most recent bounce first.

    With `include_counting`, addresses that bounced but are not marked yet are
    listed too. `store` is a relaymail.store.Store.
    """
    query = select(UndeliverableAddress).order_by(UndeliverableAddress.last_bounce_at.desc(), UndeliverableAddress.address)
    if not include_counting:
        query = query.where(UndeliverableAddress.undeliverable_since.is_not(None))
    async with store.session() as session:
        rows = list(await session.scalars(query))
    return [
        {
            "address": row.address,
            "undeliverable": row.undeliverable_since is not None,
            "undeliverable_since": row.undeliverable_since.isoformat() if row.undeliverable_since else None,
            "hard_bounces": row.hard_bounces,
            "window_started_at": row.window_started_at.isoformat(),
            "last_bounce_at": row.last_bounce_at.isoformat(),
            "last_status": row.last_status,
            "last_diagnostic": row.last_diagnostic,
        }
        for row in rows
    ]


async def clear_undeliverable(store, address: str) -> bool:
    """Forget the bounces of `address` (any case); return False when none were recorded."""
    async with store.writing() as session:
        row = await session.get(UndeliverableAddress, address.strip().lower())
        if row is None:
            return False
        await session.delete(row)
        await session.commit()
    return True
