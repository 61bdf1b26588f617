"""The queue manager: schedules due deliveries and records every attempt.

A delivery row is due when its state is "queued", `next_attempt_at` has passed
and no live claim is on it. `claim_due` marks due rows as claimed by this
process until a lease expires, in one transaction: `FOR UPDATE SKIP LOCKED` on
PostgreSQL, so several relay processes sharing one database never claim the
same row; a single UPDATE on SQLite, whose writers are serialised anyway. On
start, a SQLite relay releases every claim (only one process can use the file);
on PostgreSQL, claims of a dead process expire after `[delivery] lease_s`.

Each attempt ends in one of:
    sent       the row is final (state "sent")
    deferred   a temporary failure: retried after min_backoff_s * 2**(attempts-1),
               capped at max_backoff_s, until max_queue_lifetime_s has passed
               since the row was created; then it becomes a bounce
    bounced    a permanent failure (state "bounced"): a DSN goes to the original
               sender in the same transaction (relaymail.dsn), and a hard failure
               counts against the recipient address (relaymail.bounce)
    crashed    the delivery code raised an unexpected exception: retried like a
               deferral, and after `[delivery] max_crashes` crashes the row is
               held for a human (state "held"), never retried forever nor lost

A report arriving later at the bounce address can still turn a "sent" row into
a bounced one: `record_late_bounce`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import secrets
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, bindparam, exists, insert, or_, select, update
from sqlalchemy.orm import Session

from . import bounce, dsn
from .config import Config
from .deliver import Transport
from .errors import DeliveryError, HardDeliveryError
from .log import fields, set_queue_id
from .models import AttemptResult, Delivery, DeliveryAttempt, DeliveryState, Message, MessageStatus, utcnow
from .store import Store

log = logging.getLogger(__name__)


CLAIM_BATCH_WAIT_S = 0.005


def node_id() -> str:
    """Return an id for this relay process, used to mark claimed rows."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def backoff_s(attempts: int, min_backoff_s: int, max_backoff_s: int) -> int:
    """Return the wait before the next attempt after `attempts` failed ones."""
    if attempts <= 0:
        return 0
    return min(max_backoff_s, min_backoff_s * 2 ** min(attempts - 1, 30))


@dataclass(frozen=True)
class Claimed:
    delivery_id: int
    queue_id: str


@dataclass(frozen=True)
class Loaded:
    """A claimed row's envelope and bytes, when the caller has them already."""

    sender: str
    recipient: str
    created_at: datetime
    data: bytes


class QueueManager:
    """Delivers due rows through one transport, with bounded concurrency."""

    def __init__(self, config: Config, store: Store, transport: Transport):
        self.config = config
        self.store = store
        self.transport = transport
        self.node = node_id()
        self.wake = asyncio.Event()
        self._stopping = False
        self._tasks: set[asyncio.Task] = set()
        self._reserved = 0
        self._running = False
        # True while due rows may be waiting for a free slot. A finished delivery
        # wakes the manager only then, so that the usual hand-over of a message
        # stored already claimed costs no claim query.
        self._backlog = True

    def notify(self) -> None:
        """Wake the manager: new rows may be due now."""
        self._backlog = True
        self.wake.set()

    def reserve(self) -> bool:
        """Reserve a delivery slot for a message about to be stored; False when none is free.

        The receive path stores such a message's rows already claimed by this node
        and passes them to `start`, which saves the claim transaction and the read
        of the bytes. Every reservation ends in `start` or `cancel_reservation`.
        """
        if not self._running or self._stopping:
            return False
        if len(self._tasks) + self._reserved >= self.config.delivery.workers:
            return False
        self._reserved += 1
        return True

    def cancel_reservation(self) -> None:
        self._reserved -= 1

    def start(self, item: Claimed, loaded: Loaded) -> None:
        """Deliver a row that was stored claimed by this node, in a reserved slot."""
        self._reserved -= 1
        self._spawn(item, loaded)

    def _spawn(self, item: Claimed, loaded: Loaded | None = None) -> None:
        task = asyncio.create_task(self._deliver(item, loaded))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    async def run(self) -> None:
        """Deliver due rows until `stop()` is called."""
        if self.store.is_sqlite:
            await release_all_claims(self.store)
        self._running = True
        log.info(fields(event="queue_start", node=self.node, transport=self.transport.name))

        while not self._stopping:
            free = self.config.delivery.workers - len(self._tasks) - self._reserved
            claimed = []
            if free > 0:
                # Cleared before the query, so a notify() during it sets it again.
                self._backlog = False
                claimed = await self._claim(free)
                if len(claimed) == free:
                    self._backlog = True
            for item in claimed:
                self._spawn(item)

            if claimed and len(claimed) == free:
                await asyncio.sleep(0)
                continue
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), timeout=self.config.delivery.poll_interval_s)
            except asyncio.TimeoutError:
                continue
            # Let messages accepted at about the same time share one claim transaction.
            await asyncio.sleep(CLAIM_BATCH_WAIT_S)

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if self._backlog:
            self.wake.set()

    async def _claim(self, limit: int) -> list[Claimed]:
        try:
            return await claim_due(self.store, self.node, limit, self.config.delivery.lease_s)
        except Exception as exc:  # noqa: BLE001 - a database hiccup must not stop the queue
            log.warning(fields(event="claim_failed", error=repr(exc)))
            await asyncio.sleep(self.config.delivery.poll_interval_s)
            return []

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Stop claiming rows and wait for attempts in progress, at most `timeout_s`."""
        self._stopping = True
        self.wake.set()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)

    async def _deliver(self, item: Claimed, loaded: Loaded | None = None) -> None:
        set_queue_id(item.queue_id)
        try:
            await deliver_one(self.config, self.store, self.transport, item.delivery_id, loaded)
        except Exception:  # noqa: BLE001 - the catch-all boundary of the queue manager
            log.exception(fields(event="delivery_crashed", delivery=item.delivery_id))
            await record_crash(self.config, self.store, item.delivery_id)


async def release_all_claims(store: Store) -> None:
    async with store.writing(durable=False) as session:
        await session.execute(
            update(Delivery)
            .where(Delivery.claimed_by.is_not(None))
            .values(claimed_by=None, claimed_until=None)
        )
        await session.commit()


async def claim_due(store: Store, node: str, limit: int, lease_s: int) -> list[Claimed]:
    """Claim up to `limit` due rows for `node`; return them with their queue ids."""
    unit = functools.partial(_claim_unit, node=node, limit=limit, lease_s=lease_s, skip_locked=not store.is_sqlite)
    return await store.run(unit, write=True, durable=False)


def _claim_unit(session: Session, node: str, limit: int, lease_s: int, skip_locked: bool) -> list[Claimed]:
    now = utcnow()
    due = and_(
        Delivery.state == DeliveryState.QUEUED.value,
        Delivery.next_attempt_at <= now,
        or_(Delivery.claimed_until.is_(None), Delivery.claimed_until < now),
    )
    query = select(Delivery.id).where(due).order_by(Delivery.next_attempt_at).limit(limit)
    if skip_locked:
        query = query.with_for_update(skip_locked=True)
    ids = list(session.scalars(query))
    if not ids:
        return []

    session.execute(
        update(Delivery)
        .where(Delivery.id.in_(ids), due)
        .values(claimed_by=node, claimed_until=now + timedelta(seconds=lease_s))
    )
    rows = session.execute(
        select(Delivery.id, Message.queue_id)
        .join(Message, Message.id == Delivery.message_id)
        .where(Delivery.id.in_(ids), Delivery.claimed_by == node)
    )
    return [Claimed(delivery_id, queue_id) for delivery_id, queue_id in rows]


def _load_delivery(session: Session, delivery_id: int):
    return session.connection().execute(
        select(Delivery.envelope_sender, Delivery.recipient, Delivery.created_at, Message.delivered_raw)
        .join(Message, Message.id == Delivery.message_id)
        .where(Delivery.id == delivery_id)
    ).one()


async def deliver_one(config: Config, store: Store, transport: Transport, delivery_id: int, loaded: Loaded | None = None) -> str:
    """Make one attempt for a claimed row and record it; return the AttemptResult value."""
    if loaded is None:
        row = await store.run(functools.partial(_load_delivery, delivery_id=delivery_id))
        loaded = Loaded(row.envelope_sender, row.recipient, row.created_at, row.delivered_raw or b"")
    sender, recipient, created_at, data = loaded.sender, loaded.recipient, loaded.created_at, loaded.data
    recipient_ref = f"delivery:{delivery_id}"

    started = utcnow()
    try:
        result = await transport.send(sender, recipient, data)
    except DeliveryError as exc:
        return await _record_failure(config, store, delivery_id, exc, started, created_at, recipient_ref)

    await _record(config, store, delivery_id, started, AttemptResult.SENT, result.host, result.code, result.text)
    log.info(fields(to=recipient_ref, relay=result.host, delay=_delay(created_at), status=f"sent ({result.code} {result.text[:120]})"))
    return AttemptResult.SENT.value


async def _record_failure(config, store, delivery_id, exc, started, created_at, recipient_ref) -> str:
    age_s = (utcnow() - created_at).total_seconds()
    expired = age_s >= config.delivery.max_queue_lifetime_s
    hard = isinstance(exc, HardDeliveryError)
    permanent = hard or expired
    result = AttemptResult.BOUNCED if permanent else AttemptResult.DEFERRED
    text = exc.text if not (expired and not hard) else f"queue lifetime expired; last error: {exc.text}"
    failure = dsn.failure_of(exc.code, exc.text, exc.host, hard=hard, expired=expired) if permanent else None

    await _record(config, store, delivery_id, started, result, exc.host or "", exc.code, text, failure)
    log.info(fields(to=recipient_ref, relay=exc.host or "none", delay=_delay(created_at), status=f"{result.value} ({text[:200]})"))
    return result.value


async def _record(
    config: Config,
    store: Store,
    delivery_id: int,
    started: datetime,
    result: AttemptResult,
    host: str,
    code: int | None,
    text: str,
    failure: dsn.Failure | None = None,
) -> None:
    """Store one attempt and move the row (and its message) to the next state.

    A bounce with its `failure` also queues the DSN and counts the bounce
    against the address, in the same transaction.
    """
    unit = functools.partial(
        _record_unit,
        delivery_id=delivery_id,
        started=started,
        result=result,
        host=host,
        code=code,
        text=text,
        min_backoff_s=config.delivery.min_backoff_s,
        max_backoff_s=config.delivery.max_backoff_s,
        failure=failure,
        config=config,
    )
    effects = await store.run(unit, write=True, durable=False)
    if effects is not None:
        effects.log(delivery_id)


def _record_unit(
    session: Session,
    delivery_id: int,
    started: datetime,
    result: AttemptResult,
    host: str,
    code: int | None,
    text: str,
    min_backoff_s: int,
    max_backoff_s: int,
    failure: dsn.Failure | None = None,
    config: Config | None = None,
) -> BounceEffects | None:
    now = utcnow()
    if result is not AttemptResult.BOUNCED:
        _record_progress(session.connection(), delivery_id, started, now, result, host, code, text, min_backoff_s, max_backoff_s)
        return None

    delivery = session.get(Delivery, delivery_id)
    delivery.attempts += 1
    delivery.claimed_by = None
    delivery.claimed_until = None
    delivery.last_error = text
    delivery.state = DeliveryState.BOUNCED.value
    delivery.finished_at = now
    session.add(DeliveryAttempt(delivery_id=delivery_id, started_at=started, finished_at=now, result=result.value, host=host, reply_code=code, reply_text=text[:2000]))
    session.flush()
    _update_message_status(session.connection(), delivery.message_id)
    if failure is not None and config is not None:
        return _after_bounce(session, config, delivery, failure, now)
    return None


def _record_progress(connection, delivery_id, started, now, result, host, code, text, min_backoff_s, max_backoff_s) -> None:
    """Record a sent or deferred attempt with prebuilt Core statements (the common case, kept cheap)."""
    attempt = {
        "delivery_id": delivery_id,
        "started_at": started,
        "finished_at": now,
        "result": result.value,
        "host": host,
        "reply_code": code,
        "reply_text": text[:2000],
    }
    connection.execute(_INSERT_ATTEMPT, attempt)

    if result is AttemptResult.SENT:
        connection.execute(_MARK_SENT, {"delivery_id": delivery_id, "done_at": now})
        if connection.execute(_FINISH_DELIVERED, {"delivery_id": delivery_id, "done_at": now}).rowcount == 0:
            # Another delivery of the message is queued, held or bounced.
            message_id = connection.execute(_MESSAGE_OF, {"delivery_id": delivery_id}).scalar_one()
            _update_message_status(connection, message_id)
        return

    # A deferred delivery stays queued, and so does its message.
    attempts = connection.execute(_ATTEMPTS_OF, {"delivery_id": delivery_id}).scalar_one() + 1
    wait_s = backoff_s(attempts, min_backoff_s, max_backoff_s)
    deferred = {"delivery_id": delivery_id, "new_attempts": attempts, "error": text, "due_at": now + timedelta(seconds=wait_s)}
    connection.execute(_MARK_DEFERRED, deferred)


@dataclass(frozen=True)
class BounceEffects:
    """Side effects of a bounce besides the state change: a DSN, an address marked undeliverable."""

    dsn_queue_id: str | None
    undeliverable: bool

    def log(self, delivery_id: int) -> None:
        if self.dsn_queue_id:
            log.info(fields(event="dsn_queued", delivery=delivery_id, dsn=self.dsn_queue_id))
        if self.undeliverable:
            log.warning(fields(event="undeliverable", delivery=delivery_id, status="recipient marked undeliverable"))


def record_late_bounce(session: Session, config: Config, delivery: Delivery, failure: dsn.Failure, reporting_mta: str) -> BounceEffects:
    """Turn a "sent" delivery into a bounced one after a report that it failed.

    Adds a "bounced" attempt naming the reporting MTA, then queues the DSN and
    counts the bounce as `_record` does. A synchronous unit of work: the caller
    commits, in a transaction that holds the writer lock (Store.run with write=True).
    """
    now = utcnow()
    delivery.state = DeliveryState.BOUNCED.value
    delivery.finished_at = now
    delivery.last_error = f"bounce report: {failure.status} {failure.diagnostic}"[:2000]
    session.add(
        DeliveryAttempt(
            delivery_id=delivery.id,
            started_at=now,
            finished_at=now,
            result=AttemptResult.BOUNCED.value,
            host=reporting_mta[:255],
            reply_text=delivery.last_error,
        )
    )
    session.flush()
    _update_message_status(session.connection(), delivery.message_id)
    return _after_bounce(session, config, delivery, failure, now)


def _after_bounce(session: Session, config: Config, delivery: Delivery, failure: dsn.Failure, now: datetime) -> BounceEffects:
    undeliverable = failure.hard and bounce.record_hard_bounce(session, delivery.recipient, failure.status, failure.diagnostic, now)
    notice = dsn.queue_dsn(session, config, delivery, failure, now)
    return BounceEffects(notice.queue_id if notice is not None else None, undeliverable)


def _update_message_status(connection, message_id: int) -> None:
    """Give the message its final status once none of its deliveries is queued."""
    states = set(connection.execute(_STATES_OF_MESSAGE, {"message_id": message_id}).scalars())
    if states & {DeliveryState.QUEUED.value}:
        return
    if DeliveryState.HELD.value in states:
        status, finished = MessageStatus.HELD.value, None
    elif DeliveryState.BOUNCED.value in states:
        status, finished = MessageStatus.BOUNCED.value, utcnow()
    else:
        status, finished = MessageStatus.DELIVERED.value, utcnow()
    connection.execute(_SET_MESSAGE_STATUS, {"message_id": message_id, "new_status": status, "done_at": finished})


# Prebuilt statements of the attempt records (see store.py for why).
_DELIVERIES = Delivery.__table__
_ATTEMPTS_OF = select(_DELIVERIES.c.attempts).where(_DELIVERIES.c.id == bindparam("delivery_id"))
_MESSAGE_OF = select(_DELIVERIES.c.message_id).where(_DELIVERIES.c.id == bindparam("delivery_id"))
_MARK_SENT = (
    update(_DELIVERIES)
    .where(_DELIVERIES.c.id == bindparam("delivery_id"))
    .values(
        attempts=_DELIVERIES.c.attempts + 1,
        claimed_by=None,
        claimed_until=None,
        state=DeliveryState.SENT.value,
        last_error="",
        finished_at=bindparam("done_at", type_=_DELIVERIES.c.finished_at.type),
    )
)
_MARK_DEFERRED = (
    update(_DELIVERIES)
    .where(_DELIVERIES.c.id == bindparam("delivery_id"))
    .values(
        attempts=bindparam("new_attempts"),
        claimed_by=None,
        claimed_until=None,
        last_error=bindparam("error"),
        next_attempt_at=bindparam("due_at", type_=_DELIVERIES.c.next_attempt_at.type),
    )
)
_UNFINISHED_STATES = (DeliveryState.QUEUED.value, DeliveryState.HELD.value, DeliveryState.BOUNCED.value)
_SIBLINGS = _DELIVERIES.alias("sibling")
# Mark the message of a delivery delivered when none of its deliveries is still
# queued, held or bounced (the rules of _update_message_status, in one statement).
_FINISH_DELIVERED = (
    update(Message.__table__)
    .where(Message.__table__.c.id == _MESSAGE_OF.scalar_subquery())
    .where(
        ~exists().where(_SIBLINGS.c.message_id == Message.__table__.c.id, _SIBLINGS.c.state.in_(_UNFINISHED_STATES))
    )
    .values(
        status=MessageStatus.DELIVERED.value,
        finished_at=bindparam("done_at", type_=Message.__table__.c.finished_at.type),
    )
)
_INSERT_ATTEMPT = insert(DeliveryAttempt.__table__)
_STATES_OF_MESSAGE = select(_DELIVERIES.c.state).where(_DELIVERIES.c.message_id == bindparam("message_id"))
_SET_MESSAGE_STATUS = (
    update(Message.__table__)
    .where(Message.__table__.c.id == bindparam("message_id"))
    .values(
        status=bindparam("new_status"),
        finished_at=bindparam("done_at", type_=Message.__table__.c.finished_at.type),
    )
)


async def record_crash(config: Config, store: Store, delivery_id: int) -> None:
    """Count a crash of the delivery code; hold the row after too many."""
    unit = functools.partial(_crash_unit, delivery_id=delivery_id, config=config)
    held = await store.run(unit, write=True, durable=False)
    if held:
        log.error(fields(event="held", delivery=delivery_id, status="held (waits for a human: relaymail queue release)"))


def _crash_unit(session: Session, delivery_id: int, config: Config) -> bool:
    now = utcnow()
    delivery = session.get(Delivery, delivery_id)
    if delivery is None:
        return False
    delivery.crashes += 1
    delivery.claimed_by = None
    delivery.claimed_until = None
    delivery.last_error = "the delivery code crashed; see the log"
    held = delivery.crashes >= config.delivery.max_crashes
    if held:
        delivery.state = DeliveryState.HELD.value
    else:
        wait_s = backoff_s(delivery.crashes, config.delivery.min_backoff_s, config.delivery.max_backoff_s)
        delivery.next_attempt_at = now + timedelta(seconds=wait_s)
    session.add(DeliveryAttempt(delivery_id=delivery_id, started_at=now, finished_at=now, result=AttemptResult.CRASHED.value, reply_text="crash"))
    session.flush()
    _update_message_status(session.connection(), delivery.message_id)
    return held


def _delay(created_at: datetime) -> str:
    return f"{(utcnow() - created_at).total_seconds():.2f}"


# --- commands ---------------------------------------------------------------


async def list_deliveries(store: Store, include_final: bool = False) -> list[dict]:
    """Return queue rows as dicts, oldest first; only pending ones unless `include_final`."""
    query = (
        select(Delivery, Message.queue_id, Message.direction)
        .join(Message, Message.id == Delivery.message_id)
        .order_by(Delivery.created_at, Delivery.id)
    )
    if not include_final:
        query = query.where(Delivery.state.in_([DeliveryState.QUEUED.value, DeliveryState.HELD.value]))
    async with store.session() as session:
        rows = await session.execute(query)
        return [
            {
                "delivery_id": delivery.id,
                "queue_id": queue_id,
                "direction": direction,
                "state": delivery.state,
                "attempts": delivery.attempts,
                "next_attempt_at": delivery.next_attempt_at.isoformat(),
                "last_error": delivery.last_error,
                "created_at": delivery.created_at.isoformat(),
            }
            for delivery, queue_id, direction in rows
        ]


async def flush(store: Store) -> int:
    """Make every queued row due now; return how many rows changed."""
    async with store.writing() as session:
        result = await session.execute(
            update(Delivery)
            .where(Delivery.state == DeliveryState.QUEUED.value)
            .values(next_attempt_at=utcnow(), claimed_by=None, claimed_until=None)
        )
        await session.commit()
        return result.rowcount or 0
