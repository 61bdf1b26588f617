"""Queue inspection and manual actions, shared by the CLI and an HTTP API.

Every function takes an open Store and commits its own work:

    list_queue(store, include_final, state)   delivery rows as dicts, oldest first
    show(store, ident)                        one message: metadata, deliveries, attempts
    raw_message(store, ident, version)        the bytes received or the bytes queued for delivery
    flush(store, ident=None)                  queued rows due now (all of them, or one message's)
    hold(store, ident)                        queued -> held: never attempted until released
    release(store, ident)                     held -> queued and due now; the crash counter restarts
    delete(store, ident)                      queued or held -> deleted: never attempted again
    requeue(store, ident, bounce_secret)      sent, bounced or deleted -> queued and due now

`ident` is a queue id (the 12 hex digits of `Message.queue_id`, any case) or a
delivery id (a number, or `delivery:N` as the log writes it). A queue id acts on
every delivery of the message; a delivery id on that one row.

Deleting (decision): relaymail never removes a delivery row, because the
archive keeps every message and attempt for disputes. `delete` sets the row's
state to "deleted", which the queue manager never claims, and the message
status becomes "deleted" once none of its deliveries is pending or final in
another way. Sent rows are never deleted. `requeue` can undo a delete.

A row that a relay has claimed (an attempt may be in progress) is not deleted
and not requeued: the action fails and names the claim, and the operator tries
again once the attempt has ended. `hold` and `release` do apply to such a row.
When a held row's attempt ends with "deferred", the row stays held. When it
ends "sent" or "bounced", the attempt's result wins over the hold.

Raises InputError for an ident or state of the wrong form, NotFoundError for an
unknown one, and QueueStateError when no delivery named is in a state the
action applies to.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from . import bounce
from .errors import InputError, NotFoundError, StoreError
from .models import Delivery, DeliveryAttempt, DeliveryState, Message, MessageStatus, utcnow
from .store import Store

# The models' enums have no value for an operator's delete; these strings fill the same columns.
DELIVERY_DELETED = "deleted"
MESSAGE_DELETED = "deleted"

PENDING_STATES = (DeliveryState.QUEUED.value, DeliveryState.HELD.value)
FINAL_STATES = (DeliveryState.SENT.value, DeliveryState.BOUNCED.value, DELIVERY_DELETED)
ALL_STATES = PENDING_STATES + FINAL_STATES
# Message statuses that follow from the deliveries' states; other statuses (blocked, rejected...) are left alone.
DELIVERY_STATUSES = (
    MessageStatus.QUEUED.value,
    MessageStatus.DELIVERED.value,
    MessageStatus.BOUNCED.value,
    MessageStatus.HELD.value,
    MESSAGE_DELETED,
)

QUEUE_ID_LENGTH = 12
HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


class QueueStateError(StoreError):
    """The deliveries named are in no state that the requested action applies to."""


@dataclass(frozen=True)
class Target:
    """The message an ident names, and the delivery ids that an action covers."""

    ident: str
    message_id: int
    queue_id: str
    delivery_ids: list[int]


@dataclass
class ActionResult:
    """The outcome of hold, release, delete, requeue or flush."""

    action: str
    ident: str
    queue_ids: list[str] = field(default_factory=list)
    changed: list[int] = field(default_factory=list)  # delivery ids
    unchanged: list[dict[str, Any]] = field(default_factory=list)  # {"delivery_id", "state", "reason"}

    def as_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "id": self.ident,
            "queue_ids": self.queue_ids,
            "changed": len(self.changed),
            "changed_deliveries": self.changed,
            "unchanged": self.unchanged,
        }


# --- idents ---------------------------------------------------------------------


def parse_ident(ident: str) -> tuple[str, str | int]:
    """Return ("queue", QUEUE_ID) or ("delivery", N) for an ident; raise InputError otherwise."""
    value = ident.strip()
    if len(value) == QUEUE_ID_LENGTH and set(value) <= HEX_DIGITS:
        return "queue", value.upper()

    number = value.removeprefix("delivery:")
    if number.isascii() and number.isdigit() and int(number) > 0:
        return "delivery", int(number)
    raise InputError(
        f"invalid id {ident!r}: expected a queue id (12 hex digits, as in \"queued as 3F2A9C0B1D4E\") "
        "or a delivery id (a number, or delivery:N as in the log)"
    )


async def resolve(session: AsyncSession, ident: str) -> Target:
    """Return the message and deliveries that `ident` names; raise NotFoundError if none."""
    kind, value = parse_ident(ident)
    if kind == "queue":
        message = await session.scalar(select(Message).where(Message.queue_id == value))
        if message is None:
            raise NotFoundError(f"queue id {value} not found")
        ids = list(await session.scalars(select(Delivery.id).where(Delivery.message_id == message.id).order_by(Delivery.id)))
        return Target(ident, message.id, message.queue_id, ids)

    row = (
        await session.execute(
            select(Delivery.id, Message.id, Message.queue_id)
            .join(Message, Message.id == Delivery.message_id)
            .where(Delivery.id == value)
        )
    ).first()
    if row is None:
        raise NotFoundError(f"delivery {value} not found")
    delivery_id, message_id, queue_id = row
    return Target(ident, message_id, queue_id, [delivery_id])


def check_state(state: str) -> str:
    """Return `state` lower-cased if it is a delivery state; raise InputError otherwise."""
    lowered = state.strip().lower()
    if lowered not in ALL_STATES:
        raise InputError(f"invalid state {state!r}: expected one of {', '.join(ALL_STATES)}")
    return lowered


# --- inspection -----------------------------------------------------------------


async def list_queue(store: Store, include_final: bool = False, state: str | None = None) -> list[dict[str, Any]]:
    """Return delivery rows, oldest first: pending ones, every one with `include_final`, or those in `state`."""
    query = (
        select(Delivery, Message.queue_id, Message.direction)
        .join(Message, Message.id == Delivery.message_id)
        .order_by(Delivery.created_at, Delivery.id)
    )
    if state is not None:
        query = query.where(Delivery.state == check_state(state))
    elif not include_final:
        query = query.where(Delivery.state.in_(PENDING_STATES))

    async with store.session() as session:
        rows = await session.execute(query)
        return [_delivery_summary(delivery, queue_id, direction) for delivery, queue_id, direction in rows]


def _delivery_summary(delivery: Delivery, queue_id: str, direction: str) -> dict[str, Any]:
    return {
        "delivery_id": delivery.id,
        "queue_id": queue_id,
        "direction": direction,
        "state": delivery.state,
        "recipient": delivery.recipient,
        "attempts": delivery.attempts,
        "crashes": delivery.crashes,
        "next_attempt_at": delivery.next_attempt_at,
        "last_error": delivery.last_error,
        "created_at": delivery.created_at,
    }


async def show(store: Store, ident: str) -> dict[str, Any]:
    """Return a message's metadata, its deliveries and their attempts; never its bytes."""
    async with store.session() as session:
        target = await resolve(session, ident)
        message = await session.get(Message, target.message_id)
        deliveries = list(
            await session.scalars(select(Delivery).where(Delivery.message_id == message.id).order_by(Delivery.id))
        )
        attempts = list(
            await session.scalars(
                select(DeliveryAttempt)
                .where(DeliveryAttempt.delivery_id.in_([d.id for d in deliveries]))
                .order_by(DeliveryAttempt.started_at, DeliveryAttempt.id)
            )
        )

    by_delivery: dict[int, list[dict[str, Any]]] = {d.id: [] for d in deliveries}
    for attempt in attempts:
        by_delivery[attempt.delivery_id].append(
            {
                "started_at": attempt.started_at,
                "finished_at": attempt.finished_at,
                "result": attempt.result,
                "host": attempt.host,
                "reply_code": attempt.reply_code,
                "reply_text": attempt.reply_text,
            }
        )

    return {
        "queue_id": message.queue_id,
        "direction": message.direction,
        "status": message.status,
        "received_at": message.received_at,
        "finished_at": message.finished_at,
        "size_bytes": message.size_bytes,
        "delivered_size_bytes": len(message.delivered_raw) if message.delivered_raw is not None else None,
        "client_address": message.client_address,
        "envelope_sender": message.envelope_sender,
        "header_from": message.header_from,
        "recipient_alias": message.recipient_alias,
        "subject": message.subject,
        "original_message_id": message.original_message_id,
        "relay_message_id": message.relay_message_id,
        "pair_id": message.pair_id,
        "seller_id": message.seller_id,
        "buyer_id": message.buyer_id,
        "order_id": message.order_id,
        "parent_id": message.parent_id,
        "rule": message.rule,
        "reason": message.reason,
        "deliveries": [
            {
                "delivery_id": d.id,
                "recipient": d.recipient,
                "envelope_sender": d.envelope_sender,
                "state": d.state,
                "attempts": d.attempts,
                "crashes": d.crashes,
                "next_attempt_at": d.next_attempt_at,
                "claimed_by": d.claimed_by,
                "claimed_until": d.claimed_until,
                "last_error": d.last_error,
                "created_at": d.created_at,
                "finished_at": d.finished_at,
                "attempt_log": by_delivery[d.id],
            }
            for d in deliveries
        ],
    }


async def raw_message(store: Store, ident: str, version: str = "delivered") -> bytes:
    """Return the bytes queued for delivery ("delivered") or the bytes received ("received")."""
    if version not in ("delivered", "received"):
        raise InputError(f"invalid version {version!r}: expected \"delivered\" or \"received\"")
    async with store.session() as session:
        target = await resolve(session, ident)
        message = await session.get(Message, target.message_id)
        if version == "received":
            return message.raw
        if message.delivered_raw is None:
            raise NotFoundError(
                f"queue id {message.queue_id} has no delivered version (status {message.status}); "
                "use the received version"
            )
        return message.delivered_raw


# --- actions --------------------------------------------------------------------


def _unclaimed(now: datetime):
    return or_(Delivery.claimed_until.is_(None), Delivery.claimed_until < now)


async def flush(store: Store, ident: str | None = None) -> int:
    """Make queued rows due now (every one, or those of `ident`); return how many changed.

    Rows with a live claim are left alone, because their attempt is in progress
    and clearing the claim would let a second worker send them too.
    """
    now = utcnow()
    async with store.session() as session:
        condition = and_(Delivery.state == DeliveryState.QUEUED.value, _unclaimed(now))
        if ident is not None:
            target = await resolve(session, ident)
            condition = and_(condition, Delivery.id.in_(target.delivery_ids))
        result = await session.execute(update(Delivery).where(condition).values(next_attempt_at=now))
        await session.commit()
        return result.rowcount or 0


async def hold(store: Store, ident: str) -> ActionResult:
    """Move queued rows to "held"; the queue manager never claims held rows."""
    return await _transition(
        store, ident, "hold",
        from_states=(DeliveryState.QUEUED.value,),
        to_state=DeliveryState.HELD.value,
        values=lambda now: {},
        require_unclaimed=False,
    )


async def release(store: Store, ident: str) -> ActionResult:
    """Move held rows back to "queued", due now, with the crash counter at zero."""
    return await _transition(
        store, ident, "release",
        from_states=(DeliveryState.HELD.value,),
        to_state=DeliveryState.QUEUED.value,
        values=lambda now: {"next_attempt_at": now, "crashes": 0},
        require_unclaimed=False,
    )


async def delete(store: Store, ident: str) -> ActionResult:
    """Move queued or held rows to "deleted": kept in the archive, never attempted again."""
    return await _transition(
        store, ident, "delete",
        from_states=PENDING_STATES,
        to_state=DELIVERY_DELETED,
        values=lambda now: {"finished_at": now},
        require_unclaimed=True,
    )


async def requeue(store: Store, ident: str, bounce_secret: str | None = None) -> ActionResult:
    """Queue sent, bounced or deleted rows again, due now, with attempts and crashes at zero.

    The row's queue lifetime starts again: `created_at` becomes now. Earlier
    attempt records are kept. With `bounce_secret`, a bounce address used as
    the envelope sender is minted again, because the old one may have expired.
    """

    def values(now: datetime) -> dict[str, Any]:
        return {
            "next_attempt_at": now,
            "attempts": 0,
            "crashes": 0,
            "last_error": "",
            "finished_at": None,
            "created_at": now,
        }

    async def renew(session: AsyncSession, delivery_ids: list[int]) -> None:
        if bounce_secret:
            await _renew_bounce_addresses(session, delivery_ids, bounce_secret)

    return await _transition(
        store, ident, "requeue",
        from_states=FINAL_STATES,
        to_state=DeliveryState.QUEUED.value,
        values=values,
        require_unclaimed=True,
        on_changed=renew,
    )


async def _transition(
    store: Store,
    ident: str,
    action: str,
    from_states,
    to_state: str,
    values,
    require_unclaimed: bool,
    on_changed=None,
) -> ActionResult:
    """Move the rows `ident` names from `from_states` to `to_state`, one conditional UPDATE per row.

    Each UPDATE repeats the state (and claim) condition, so a relay that
    changes a row between the read and the write makes that row "unchanged"
    instead of being overwritten.
    """
    now = utcnow()
    result = ActionResult(action=action, ident=ident)
    async with store.session() as session:
        target = await resolve(session, ident)
        result.queue_ids = [target.queue_id]
        if not target.delivery_ids:
            raise QueueStateError(f"queue id {target.queue_id} has no deliveries (it was blocked, rejected or only archived)")

        for delivery_id in target.delivery_ids:
            condition = and_(Delivery.id == delivery_id, Delivery.state.in_(from_states))
            if require_unclaimed:
                condition = and_(condition, _unclaimed(now))
            changed = await session.execute(
                update(Delivery).where(condition).values(state=to_state, **values(now))
            )
            if changed.rowcount:
                result.changed.append(delivery_id)
                continue
            delivery = await session.get(Delivery, delivery_id)
            await session.refresh(delivery)
            result.unchanged.append(_unchanged(delivery, from_states, to_state, now))

        if result.changed:
            if on_changed is not None:
                await on_changed(session, result.changed)
            await refresh_message_status(session, target.message_id)
        await session.commit()

    if not result.changed and any(item["reason"] != "already " + to_state for item in result.unchanged):
        raise QueueStateError(_refusal(action, ident, result.unchanged))
    return result


def _unchanged(delivery: Delivery, from_states, to_state: str, now: datetime) -> dict[str, Any]:
    if delivery.state == to_state:
        reason = "already " + to_state
    elif delivery.state not in from_states:
        reason = f"state is {delivery.state}; expected {' or '.join(from_states)}"
    elif delivery.claimed_until is not None and delivery.claimed_until >= now:
        reason = (
            f"claimed by relay {delivery.claimed_by} until {delivery.claimed_until.isoformat()} "
            "(an attempt may be in progress); try again when it has ended"
        )
    else:
        reason = "changed by the relay meanwhile; try again"
    return {"delivery_id": delivery.id, "state": delivery.state, "reason": reason}


def _refusal(action: str, ident: str, unchanged: list[dict[str, Any]]) -> str:
    details = "; ".join(f"delivery {item['delivery_id']}: {item['reason']}" for item in unchanged)
    return f"cannot {action} {ident}: {details}"


async def _renew_bounce_addresses(session: AsyncSession, delivery_ids: list[int], secret: str) -> None:
    rows = await session.execute(
        select(Delivery, Message.queue_id)
        .join(Message, Message.id == Delivery.message_id)
        .where(Delivery.id.in_(delivery_ids))
    )
    for delivery, queue_id in rows:
        local, _, domain = delivery.envelope_sender.rpartition("@")
        # now_s=0 accepts an expired address too, because only its index is needed here.
        token = bounce.verify_bounce_address(secret, local, now_s=0) if local else None
        if token is None:
            continue
        delivery.envelope_sender = bounce.make_bounce_address(secret, domain, queue_id, token.index)


async def refresh_message_status(session: AsyncSession, message_id: int) -> None:
    """Set a message's status from its deliveries' states, unless a policy verdict set it.

    Any queued row makes it "queued", else any held row "held", else any
    bounced row "bounced", else any sent row "delivered", else "deleted".
    """
    message = await session.get(Message, message_id)
    if message is None or message.status not in DELIVERY_STATUSES:
        return
    states = set(await session.scalars(select(Delivery.state).where(Delivery.message_id == message_id)))
    if not states:
        return

    if DeliveryState.QUEUED.value in states:
        status, finished = MessageStatus.QUEUED.value, False
    elif DeliveryState.HELD.value in states:
        status, finished = MessageStatus.HELD.value, False
    elif DeliveryState.BOUNCED.value in states:
        status, finished = MessageStatus.BOUNCED.value, True
    elif DeliveryState.SENT.value in states:
        status, finished = MessageStatus.DELIVERED.value, True
    else:
        status, finished = MESSAGE_DELETED, True

    message.status = status
    if not finished:
        message.finished_at = None
    elif message.finished_at is None:
        message.finished_at = utcnow()


__all__ = [
    "ActionResult",
    "QueueStateError",
    "check_state",
    "delete",
    "flush",
    "hold",
    "list_queue",
    "parse_ident",
    "raw_message",
    "release",
    "requeue",
    "resolve",
    "show",
]
