"""Records for sellers and the dispute team: archive queries, seller actions, response times, purge.

The CLI (relaymail.cli_records) and the HTTP API (relaymail.http) call these
functions. Those that take an AsyncSession flush but never commit, like
relaymail.provision; those that take a Store (export, purge) commit their own
batches.

    MessageQuery / list_messages    messages by seller, pair, alias, order, date and filter
    message_detail                  metadata, deliveries with their attempts, both versions of the bytes
    mark_no_response_needed         the seller's "no response needed" on a buyer message
    report_message                  the seller's report (spam, abuse, other) on a buyer message
    alias_orders                    the orders of the pair behind an alias
    response_time                   the response-time figures of a seller over 7, 30 or 90 days
    export_mbox                     messages into an mbox file (Python's mailbox module)
    purge                           remove messages older than the retention period

Definitions (decisions where the rules leave room):
- A reply is a seller-to-buyer message in the same pair, received after the buyer's
  message, that is not automatic and was accepted for delivery (queued, delivered,
  bounced or held). Blocked, suppressed and rejected messages never reached the
  buyer, so they are not replies.
- A message needs a response while it is a buyer-to-seller message marked
  `needs_response` (not automatic), accepted for delivery, not marked "no response
  needed", not reported, and no reply followed it. Reported messages need no answer.
- "sent" lists the seller-to-buyer messages of every status (delivered, queued,
  blocked, suppressed, bounced, rejected after DATA), each with its rule and reason.
- "blocked" lists messages with status "blocked".
- Response time of a message is the time from its arrival to the first reply after
  it in the pair, in wall-clock time: nights, weekends and holidays count. Only
  messages that need a response (as above, answered or not) enter the figures.

Raises InputError for an invalid value (queue id, filter, reason, note),
NotFoundError for an unknown message, seller, alias or order, and
provision.ConflictError for an action that does not apply to the message.
"""

from __future__ import annotations

import base64
import bisect
import mailbox
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Iterable

from sqlalchemy import Select, delete, exists, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased, defer

from .errors import InputError, NotFoundError
from .models import (
    Delivery,
    DeliveryAttempt,
    DeliveryState,
    Direction,
    Message,
    MessageStatus,
    Order,
    Pair,
    Seller,
    ThreadId,
    utcnow,
)
from .provision import ConflictError
from .store import Store, find_alias, get_seller

FILTER_NEEDS_RESPONSE = "needs-response"
FILTER_SENT = "sent"
FILTER_BLOCKED = "blocked"
FILTERS = (FILTER_NEEDS_RESPONSE, FILTER_SENT, FILTER_BLOCKED)

REPORT_REASONS = ("spam", "abuse", "other")
MAX_NOTE_CHARS = 2000

RESPONSE_WINDOWS_DAYS = (7, 30, 90)
ANSWER_WITHIN = timedelta(hours=24)

# Messages accepted for delivery: only these can be answered or count as a reply.
ACCEPTED_STATUSES = (
    MessageStatus.QUEUED.value,
    MessageStatus.DELIVERED.value,
    MessageStatus.BOUNCED.value,
    MessageStatus.HELD.value,
)

MBOX_VERSIONS = ("received", "delivered")
EXPORT_BATCH = 50
PURGE_BATCH = 500

_QUEUE_ID_RE = re.compile(r"[0-9A-Fa-f]{12}")


# --- input checks ----------------------------------------------------------


def parse_queue_id(value: str) -> str:
    """Return the queue id upper-cased, or raise InputError unless it is 12 hexadecimal digits."""
    text = value.strip()
    if not _QUEUE_ID_RE.fullmatch(text):
        raise InputError(f"invalid queue id {value!r}: expected 12 hexadecimal digits, for example 3F2A9C01B7DE")
    return text.upper()


def normalize_filter(value: str | None) -> str | None:
    """Return the message filter, or raise InputError listing the valid ones."""
    if value is None or value == "":
        return None
    text = value.strip().lower().replace("_", "-")
    if text not in FILTERS:
        raise InputError(f"invalid filter {value!r}: expected one of {', '.join(FILTERS)}")
    return text


def normalize_reason(value: str) -> str:
    """Return the report reason lower-cased, or raise InputError listing the valid ones."""
    text = value.strip().lower()
    if text not in REPORT_REASONS:
        raise InputError(f"invalid report reason {value!r}: expected one of {', '.join(REPORT_REASONS)}")
    return text


def normalize_note(value: str | None) -> str | None:
    """Return the report note trimmed (None when empty), or raise InputError.

    Line breaks and tabs are allowed; other control characters are not.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if len(text) > MAX_NOTE_CHARS:
        raise InputError(f"report note has {len(text)} characters: expected at most {MAX_NOTE_CHARS}")
    for char in text:
        if char not in "\n\r\t" and (ord(char) < 32 or ord(char) == 127):
            raise InputError(
                f"report note contains the control character U+{ord(char):04X}: expected plain text"
            )
    return text


def normalize_days(value: int | str) -> int:
    """Return the response-time window in days, or raise InputError unless it is 7, 30 or 90."""
    try:
        days = int(value)
    except (TypeError, ValueError):
        days = -1
    if days not in RESPONSE_WINDOWS_DAYS:
        raise InputError(
            f"invalid window {value!r}: expected one of {', '.join(map(str, RESPONSE_WINDOWS_DAYS))} days"
        )
    return days


# --- listing ---------------------------------------------------------------


@dataclass(frozen=True)
class MessageQuery:
    """Criteria of the messages to list or export; every criterion given must hold.

    `alias` is an alias local part (either of a pair's two aliases) and selects
    the pair's messages. `order_id` selects the messages the relay attributed to
    that order when they arrived (the pair's most recent order at the time).
    `since` is inclusive and `until` exclusive, both aware datetimes.
    """

    seller_id: str | None = None
    pair_id: int | None = None
    alias: str | None = None
    order_id: str | None = None
    kind: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    limit: int | None = None
    offset: int = 0


def _reply_exists(message: type[Message] | Any) -> Any:
    """Return the SQL condition "a reply to `message` exists in its pair"."""
    reply = aliased(Message)
    return exists().where(
        reply.pair_id == message.pair_id,
        reply.direction == Direction.SELLER_TO_BUYER.value,
        reply.automatic.is_(False),
        reply.status.in_(ACCEPTED_STATUSES),
        reply.received_at > message.received_at,
    )


def _awaiting_response_conditions() -> list[Any]:
    """Conditions of a buyer message that enters the response-time figures, answered or not."""
    return [
        Message.direction == Direction.BUYER_TO_SELLER.value,
        Message.needs_response.is_(True),
        Message.automatic.is_(False),
        Message.status.in_(ACCEPTED_STATUSES),
        Message.no_response_needed_at.is_(None),
        Message.reported_at.is_(None),
    ]


async def _conditions(session: AsyncSession, query: MessageQuery) -> list[Any]:
    """Return the WHERE conditions of `query`; raise NotFoundError for an unknown seller, alias or order."""
    conditions: list[Any] = []
    if query.seller_id is not None:
        await get_seller(session, query.seller_id)
        conditions.append(Message.seller_id == query.seller_id)
    if query.pair_id is not None:
        if await session.get(Pair, query.pair_id) is None:
            raise NotFoundError(f"pair {query.pair_id} not found")
        conditions.append(Message.pair_id == query.pair_id)
    if query.alias is not None:
        match = await find_alias(session, query.alias)
        if match is None:
            raise NotFoundError(f"alias {query.alias!r} not found")
        conditions.append(Message.pair_id == match.pair.id)
    if query.order_id is not None:
        if await session.get(Order, query.order_id) is None:
            raise NotFoundError(f"order {query.order_id!r} not found")
        conditions.append(Message.order_id == query.order_id)
    if query.since is not None:
        conditions.append(Message.received_at >= query.since)
    if query.until is not None:
        conditions.append(Message.received_at < query.until)

    if query.kind == FILTER_NEEDS_RESPONSE:
        conditions.extend(_awaiting_response_conditions())
        conditions.append(~_reply_exists(Message))
    elif query.kind == FILTER_SENT:
        conditions.append(Message.direction == Direction.SELLER_TO_BUYER.value)
    elif query.kind == FILTER_BLOCKED:
        conditions.append(Message.status == MessageStatus.BLOCKED.value)
    return conditions


async def _select(session: AsyncSession, query: MessageQuery) -> Select:
    conditions = await _conditions(session, query)
    return select(Message).where(*conditions)


async def list_messages(session: AsyncSession, query: MessageQuery) -> list[Message]:
    """Return the messages matching `query`, newest first, without their bytes loaded."""
    statement = (
        (await _select(session, query))
        .options(defer(Message.raw), defer(Message.delivered_raw))
        .order_by(Message.received_at.desc(), Message.id.desc())
        .offset(query.offset)
    )
    if query.limit is not None:
        statement = statement.limit(query.limit)
    return list(await session.scalars(statement))


def _delivery_error(message: Message) -> str:
    """Return the last error of the message's deliveries that failed or are retrying, else ""."""
    for delivery in message.deliveries:
        if delivery.last_error and delivery.state != DeliveryState.SENT.value:
            return delivery.last_error
    return ""


def message_summary(message: Message) -> dict[str, Any]:
    """Return the listing fields of a message: no bytes and no real address."""
    return {
        "queue_id": message.queue_id,
        "received_at": message.received_at,
        "direction": message.direction,
        "status": message.status,
        "rule": message.rule,
        "reason": message.reason,
        "delivery_error": _delivery_error(message),
        "seller_id": message.seller_id,
        "buyer_id": message.buyer_id,
        "pair_id": message.pair_id,
        "order_id": message.order_id,
        "recipient_alias": message.recipient_alias,
        "subject": message.subject,
        "needs_response": message.needs_response,
        "no_response_needed_at": message.no_response_needed_at,
        "reported_at": message.reported_at,
        "report_reason": message.report_reason,
        "automatic": message.automatic,
        "critical": message.critical,
        "thread_reply": message.thread_reply,
        "size_bytes": message.size_bytes,
        "finished_at": message.finished_at,
    }


# --- one message -----------------------------------------------------------


async def get_message(session: AsyncSession, queue_id: str) -> Message:
    """Return the message with `queue_id`; raise InputError or NotFoundError."""
    queue_id = parse_queue_id(queue_id)
    message = await session.scalar(select(Message).where(Message.queue_id == queue_id))
    if message is None:
        raise NotFoundError(f"message {queue_id} not found")
    return message


async def message_detail(session: AsyncSession, queue_id: str) -> dict[str, Any]:
    """Return everything the archive stores about a message, for the dispute team.

    Adds to `message_summary` the envelope, the From address, the Message-IDs,
    the report note, the deliveries with their attempts (oldest first), and
    both versions of the bytes in base64 (`raw_base64`, `delivered_raw_base64`,
    the latter None when nothing was delivered).
    """
    message = await get_message(session, queue_id)
    delivery_ids = [delivery.id for delivery in message.deliveries]
    attempts_by_delivery: dict[int, list[dict[str, Any]]] = {delivery_id: [] for delivery_id in delivery_ids}
    if delivery_ids:
        attempts = await session.scalars(
            select(DeliveryAttempt)
            .where(DeliveryAttempt.delivery_id.in_(delivery_ids))
            .order_by(DeliveryAttempt.started_at, DeliveryAttempt.id)
        )
        for attempt in attempts:
            attempts_by_delivery[attempt.delivery_id].append(
                {
                    "started_at": attempt.started_at,
                    "finished_at": attempt.finished_at,
                    "result": attempt.result,
                    "host": attempt.host,
                    "reply_code": attempt.reply_code,
                    "reply_text": attempt.reply_text,
                }
            )

    parent_queue_id = None
    if message.parent_id is not None:
        parent_queue_id = await session.scalar(select(Message.queue_id).where(Message.id == message.parent_id))

    return {
        **message_summary(message),
        "envelope_sender": message.envelope_sender,
        "header_from": message.header_from,
        "client_address": message.client_address,
        "original_message_id": message.original_message_id,
        "relay_message_id": message.relay_message_id,
        "parent_queue_id": parent_queue_id,
        "report_note": message.report_note,
        "findings": message.findings,
        "deliveries": [
            {
                "recipient": delivery.recipient,
                "envelope_sender": delivery.envelope_sender,
                "state": delivery.state,
                "attempts": attempts_by_delivery[delivery.id],
                "last_error": delivery.last_error,
                "created_at": delivery.created_at,
                "finished_at": delivery.finished_at,
            }
            for delivery in sorted(message.deliveries, key=lambda d: d.id)
        ],
        "raw_base64": base64.b64encode(message.raw).decode(),
        "delivered_raw_base64": (
            base64.b64encode(message.delivered_raw).decode() if message.delivered_raw is not None else None
        ),
    }


# --- seller actions --------------------------------------------------------


def _require_buyer_message(message: Message, action: str) -> None:
    if message.direction != Direction.BUYER_TO_SELLER.value:
        raise ConflictError(
            f"message {message.queue_id} is a {message.direction} message: only a buyer's message "
            f"to a seller can be {action}"
        )


async def mark_no_response_needed(
    session: AsyncSession, queue_id: str, now: datetime | None = None
) -> tuple[Message, bool]:
    """Mark a buyer message "no response needed"; return it and whether this call changed it.

    A message already marked keeps the time of the first mark.
    """
    message = await get_message(session, queue_id)
    _require_buyer_message(message, "marked as needing no response")
    if message.no_response_needed_at is not None:
        return message, False
    message.no_response_needed_at = now or utcnow()
    await session.flush()
    return message, True


async def report_message(
    session: AsyncSession,
    queue_id: str,
    reason: str,
    note: str | None = None,
    now: datetime | None = None,
) -> tuple[Message, bool]:
    """Record the seller's report of a buyer message; return it and whether this call changed it.

    A second report replaces the reason and note and keeps the time of the first.
    """
    reason = normalize_reason(reason)
    note = normalize_note(note)
    message = await get_message(session, queue_id)
    _require_buyer_message(message, "reported")

    changed = (
        message.reported_at is None or message.report_reason != reason or message.report_note != note
    )
    if message.reported_at is None:
        message.reported_at = now or utcnow()
    message.report_reason = reason
    message.report_note = note
    await session.flush()
    return message, changed


def action_record(message: Message, changed: bool) -> dict[str, Any]:
    """Return what the CLI and the API print after a seller action."""
    return {
        "queue_id": message.queue_id,
        "no_response_needed_at": message.no_response_needed_at,
        "reported_at": message.reported_at,
        "report_reason": message.report_reason,
        "report_note": message.report_note,
        "changed": changed,
    }


# --- orders behind an alias ------------------------------------------------


async def alias_orders(session: AsyncSession, alias: str, domain: str) -> dict[str, Any]:
    """Return the pair behind an alias (either of its two) and its orders, most recent first.

    `alias` is the local part, already checked with provision.parse_alias.
    """
    match = await find_alias(session, alias)
    if match is None:
        raise NotFoundError(f"alias {alias}@{domain} not found")
    pair = match.pair
    orders = await session.scalars(
        select(Order)
        .where(Order.buyer_id == pair.buyer_id, Order.seller_id == pair.seller_id)
        .order_by(Order.placed_at.desc(), Order.id.desc())
    )
    return {
        "alias": f"{alias}@{domain}",
        "alias_role": match.role,
        "pair_id": pair.id,
        "buyer_id": pair.buyer_id,
        "seller_id": pair.seller_id,
        "buyer_alias": f"{pair.buyer_alias}@{domain}",
        "seller_alias": f"{pair.seller_alias}@{domain}",
        "orders": [
            {"id": order.id, "status": order.status, "placed_at": order.placed_at} for order in orders
        ],
    }


# --- response times --------------------------------------------------------


@dataclass(frozen=True)
class ResponseStats:
    """Response-time figures of one seller over one window.

    `messages` counts the buyer messages of the window that need (or needed) a
    response. `answered_within_24h` and `not_answered_within_24h` count only
    decided ones: answered, or unanswered for more than 24 hours; the rest are
    `pending`. `share_not_answered_within_24h` is not_answered_within_24h over
    the decided messages (None when there are none). `average_response_s` is
    the mean time to the first reply of the answered messages, in seconds.
    """

    seller_id: str
    days: int
    since: datetime
    until: datetime
    messages: int
    answered: int
    answered_within_24h: int
    not_answered_within_24h: int
    pending: int
    share_not_answered_within_24h: float | None
    average_response_s: float | None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def first_reply_after(reply_times: list[datetime], received_at: datetime) -> datetime | None:
    """Return the first time in sorted `reply_times` strictly after `received_at`, else None."""
    index = bisect.bisect_right(reply_times, received_at)
    return reply_times[index] if index < len(reply_times) else None


def compute_response_stats(
    seller_id: str,
    days: int,
    since: datetime,
    now: datetime,
    items: Iterable[tuple[datetime, datetime | None]],
) -> ResponseStats:
    """Return the figures for (received_at, first_reply_at or None) pairs, as seen at `now`."""
    count = answered = within = late = pending = 0
    total_response_s = 0.0
    for received_at, replied_at in items:
        count += 1
        if replied_at is not None:
            answered += 1
            response = replied_at - received_at
            total_response_s += response.total_seconds()
            if response <= ANSWER_WITHIN:
                within += 1
            else:
                late += 1
        elif now - received_at > ANSWER_WITHIN:
            late += 1
        else:
            pending += 1

    decided = within + late
    return ResponseStats(
        seller_id=seller_id,
        days=days,
        since=since,
        until=now,
        messages=count,
        answered=answered,
        answered_within_24h=within,
        not_answered_within_24h=late,
        pending=pending,
        share_not_answered_within_24h=(late / decided) if decided else None,
        average_response_s=(total_response_s / answered) if answered else None,
    )


async def response_time(
    session: AsyncSession, seller_id: str, days: int, now: datetime | None = None
) -> ResponseStats:
    """Return the seller's response-time figures for buyer messages received in the last `days` days.

    Replies received after `now` are not counted, so figures for a past `now`
    are what they were then. Raises NotFoundError for an unknown seller.
    """
    days = normalize_days(days)
    now = now or utcnow()
    since = now - timedelta(days=days)
    await get_seller(session, seller_id)

    rows = await session.execute(
        select(Message.pair_id, Message.received_at)
        .where(
            Message.seller_id == seller_id,
            Message.received_at >= since,
            Message.received_at <= now,
            *_awaiting_response_conditions(),
        )
        .order_by(Message.received_at)
    )
    awaiting = list(rows)

    reply_times: dict[int, list[datetime]] = {}
    pair_ids = sorted({pair_id for pair_id, _ in awaiting if pair_id is not None})
    if pair_ids:
        replies = await session.execute(
            select(Message.pair_id, Message.received_at)
            .where(
                Message.pair_id.in_(pair_ids),
                Message.direction == Direction.SELLER_TO_BUYER.value,
                Message.automatic.is_(False),
                Message.status.in_(ACCEPTED_STATUSES),
                Message.received_at > since,
                Message.received_at <= now,
            )
            .order_by(Message.received_at)
        )
        for pair_id, received_at in replies:
            reply_times.setdefault(pair_id, []).append(received_at)

    items = [
        (received_at, first_reply_after(reply_times.get(pair_id, []), received_at))
        for pair_id, received_at in awaiting
    ]
    return compute_response_stats(seller_id, days, since, now, items)


# --- mbox export -----------------------------------------------------------


@dataclass(frozen=True)
class ExportResult:
    """Counts of an export: messages written, messages left out (no delivered bytes), bytes of message data."""

    path: str
    version: str
    messages: int
    skipped: int
    bytes: int


def mbox_message(message: Message, version: str) -> mailbox.mboxMessage | None:
    """Return the mbox entry of a message, or None when `version` is "delivered" and nothing was.

    The bytes get CRLF line endings turned into LF (the mbox convention) and
    three trace fields on top: X-Relaymail-Queue-Id, X-Relaymail-Direction and
    X-Relaymail-Status. The From_ line names the envelope sender of the
    received message, or MAILER-DAEMON for a null sender and for delivered
    bytes (whose envelope sender is a bounce address), and the arrival time.
    """
    if version == "delivered":
        data = message.delivered_raw
        if data is None:
            return None
        sender = "MAILER-DAEMON"
    else:
        data = message.raw
        sender = message.envelope_sender or "MAILER-DAEMON"

    trace = (
        f"X-Relaymail-Queue-Id: {message.queue_id}\n"
        f"X-Relaymail-Direction: {message.direction}\n"
        f"X-Relaymail-Status: {message.status}\n"
    ).encode()
    entry = mailbox.mboxMessage(trace + data.replace(b"\r\n", b"\n"))
    entry.set_from(sender, message.received_at.utctimetuple())
    return entry


async def export_mbox(store: Store, query: MessageQuery, path: Path, version: str = "received") -> ExportResult:
    """Write the messages matching `query` to a new mbox file at `path`, oldest first.

    `version` is "received" (the bytes as the relay received them, the default
    for disputes) or "delivered" (the bytes as rewritten for the recipient).
    With "delivered", messages that were not delivered are left out and counted
    in `skipped`. Raises InputError
    for another version or when `path` exists and is not empty, so an export
    never appends to an older one. `query.limit` and `query.offset` are ignored.

    NOTE: the file is written with blocking calls on the running loop; this
    suits the CLI, not a server.
    """
    if version not in MBOX_VERSIONS:
        raise InputError(f"invalid version {version!r}: expected one of {', '.join(MBOX_VERSIONS)}")
    if path.exists() and path.stat().st_size > 0:
        raise InputError(f"output file {path} exists and is not empty: remove it or choose another path")

    async with store.session() as session:
        statement = (await _select(session, query)).with_only_columns(Message.id)
        ids = list(await session.scalars(statement.order_by(Message.received_at, Message.id)))

    box = mailbox.mbox(str(path), create=True)
    box.lock()
    written = skipped = size = 0
    try:
        for start in range(0, len(ids), EXPORT_BATCH):
            async with store.session() as session:
                batch = await session.scalars(
                    select(Message)
                    .where(Message.id.in_(ids[start : start + EXPORT_BATCH]))
                    .order_by(Message.received_at, Message.id)
                )
                for message in batch:
                    entry = mbox_message(message, version)
                    if entry is None:
                        skipped += 1
                        continue
                    box.add(entry)
                    written += 1
                    size += len(message.delivered_raw if version == "delivered" else message.raw)
        box.flush()
    finally:
        box.unlock()
        box.close()
    return ExportResult(path=str(path), version=version, messages=written, skipped=skipped, bytes=size)


# --- purge -----------------------------------------------------------------


@dataclass(frozen=True)
class PurgeResult:
    """Counts of a purge: messages removed (or that would be, with `dry_run`) and their stored bytes."""

    cutoff: datetime
    messages: int
    bytes: int
    dry_run: bool


def _purgeable(cutoff: datetime) -> list[Any]:
    # A message with a delivery still in the queue (queued, or held for a human) is kept.
    in_queue = exists().where(
        Delivery.message_id == Message.id,
        Delivery.state.in_([DeliveryState.QUEUED.value, DeliveryState.HELD.value]),
    )
    return [Message.received_at < cutoff, ~in_queue]


def _stored_bytes() -> Any:
    return func.coalesce(func.sum(func.length(Message.raw) + func.coalesce(func.length(Message.delivered_raw), 0)), 0)


async def purge(store: Store, retention_days: int, now: datetime | None = None, dry_run: bool = False) -> PurgeResult:
    """Remove messages received more than `retention_days` days ago, with their deliveries,
    delivery attempts and Message-ID map entries, in batches of PURGE_BATCH, each committed.

    Messages that still have a delivery in the queue are kept. Notices and
    reports that named a removed message keep their own row, with
    `parent_queue_id` then unknown. With `dry_run`, counts and removes nothing.
    """
    if retention_days < 1:
        raise InputError(f"invalid retention {retention_days} days: expected at least 1")
    cutoff = (now or utcnow()) - timedelta(days=retention_days)
    conditions = _purgeable(cutoff)

    if dry_run:
        async with store.session() as session:
            row = (await session.execute(select(func.count(Message.id), _stored_bytes()).where(*conditions))).one()
        return PurgeResult(cutoff=cutoff, messages=int(row[0]), bytes=int(row[1]), dry_run=True)

    removed = removed_bytes = 0
    while True:
        async with store.session() as session:
            ids = list(await session.scalars(select(Message.id).where(*conditions).order_by(Message.id).limit(PURGE_BATCH)))
            if not ids:
                break
            batch_bytes = await session.scalar(select(_stored_bytes()).where(Message.id.in_(ids)))
            await _delete_messages(session, ids)
            await session.commit()
        removed += len(ids)
        removed_bytes += int(batch_bytes or 0)
    return PurgeResult(cutoff=cutoff, messages=removed, bytes=removed_bytes, dry_run=False)


async def _delete_messages(session: AsyncSession, ids: list[int]) -> None:
    # Explicit deletes in dependency order, so the result does not depend on
    # the database enforcing the foreign keys' ON DELETE actions.
    delivery_ids = select(Delivery.id).where(Delivery.message_id.in_(ids))
    await session.execute(delete(DeliveryAttempt).where(DeliveryAttempt.delivery_id.in_(delivery_ids)))
    await session.execute(delete(Delivery).where(Delivery.message_id.in_(ids)))
    await session.execute(delete(ThreadId).where(ThreadId.message_id.in_(ids)))
    await session.execute(update(Message).where(Message.parent_id.in_(ids)).values(parent_id=None))
    await session.execute(delete(Message).where(Message.id.in_(ids)))


# --- seller lookup for the pages -------------------------------------------


async def message_seller(session: AsyncSession, message: Message) -> Seller | None:
    """Return the seller of a message, or None when it has none."""
    if message.seller_id is None:
        return None
    return await session.get(Seller, message.seller_id)

