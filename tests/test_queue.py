"""The queue on SQLite and PostgreSQL: durability, claiming by one node, backoff, crashes."""

from __future__ import annotations

import asyncio
import email
from datetime import timedelta
from pathlib import Path

import pytest
from relayenv import BUYER, SELLER, SELLER_ALIAS, RelayEnv
from sqlalchemy import select, update

from relaymail.models import Delivery, DeliveryAttempt, Message, utcnow
from relaymail.queue import backoff_s, claim_due, deliver_one, flush, list_deliveries, record_crash
from relaymail.store import Store

def message(body: str) -> bytes:
    return (
        f"From: Juan <{BUYER}>\r\nTo: {SELLER_ALIAS}\r\nSubject: {body}\r\n"
        f"Message-ID: <{body}@client.test>\r\n\r\n{body}\r\n"
    ).encode()


@pytest.fixture
async def env(tmp_path: Path, database_url: str):
    relay_env = await RelayEnv(tmp_path, database_url=database_url).start(run_queue=False)
    try:
        yield relay_env
    finally:
        await relay_env.stop()


async def accept(env: RelayEnv, count: int) -> list[str]:
    queue_ids = []
    for index in range(count):
        outcome = await env.send(BUYER, [SELLER_ALIAS], message(f"m{index}"))
        assert outcome.code == 250
        queue_ids.append(outcome.text.rsplit(" ", 1)[-1])
    return queue_ids


def test_backoff_doubles_to_cap():
    waits = [backoff_s(attempts, 300, 3600) for attempts in range(1, 7)]

    assert waits == [300, 600, 1200, 2400, 3600, 3600]


async def test_accepted_messages_survive_restart(env: RelayEnv):
    queue_ids = await accept(env, 3)

    await env.restart(run_queue=True)
    received = await env.sink.wait_for(3)

    assert len(received) == 3
    subjects = sorted(email.message_from_bytes(r.data)["Subject"] for r in received)
    assert subjects == ["m0", "m1", "m2"]
    await env.wait_idle()
    async with env.relay.store.session() as session:
        statuses = list(await session.scalars(select(Message.status).where(Message.queue_id.in_(queue_ids))))
    assert statuses == ["delivered"] * 3


async def test_two_nodes_never_claim_same_row(env: RelayEnv):
    await accept(env, 12)
    store = env.relay.store

    claims: dict[str, set[int]] = {"node-a": set(), "node-b": set()}
    for _ in range(6):
        first, second = await asyncio.gather(
            claim_due(store, "node-a", 5, 300),
            claim_due(store, "node-b", 5, 300),
        )
        claims["node-a"] |= {c.delivery_id for c in first}
        claims["node-b"] |= {c.delivery_id for c in second}

    assert not claims["node-a"] & claims["node-b"]
    assert len(claims["node-a"] | claims["node-b"]) == 12


async def test_claimed_row_not_due_until_lease_expires(env: RelayEnv):
    await accept(env, 1)
    store = env.relay.store

    claimed = await claim_due(store, "node-a", 5, 300)
    again = await claim_due(store, "node-b", 5, 300)
    async with store.session() as session:
        await session.execute(update(Delivery).values(claimed_until=utcnow() - timedelta(seconds=1)))
        await session.commit()
    after_expiry = await claim_due(store, "node-b", 5, 300)

    assert len(claimed) == 1
    assert again == []
    assert [c.delivery_id for c in after_expiry] == [claimed[0].delivery_id]


async def test_soft_failure_schedules_backoff(env: RelayEnv):
    await accept(env, 1)
    env.sink.handler.reply = "451 4.3.0 busy"
    store = env.relay.store
    claimed = await claim_due(store, "node-a", 1, 300)

    result = await deliver_one(env.config, store, env.relay.transport, claimed[0].delivery_id)

    assert result == "deferred"
    async with store.session() as session:
        delivery = await session.get(Delivery, claimed[0].delivery_id)
    assert delivery.state == "queued"
    assert delivery.attempts == 1
    assert delivery.claimed_by is None
    assert delivery.next_attempt_at > utcnow()
    assert "451" in delivery.last_error


async def test_expired_lifetime_bounces(env: RelayEnv):
    await accept(env, 1)
    env.sink.handler.reply = "451 4.3.0 busy"
    store = env.relay.store
    async with store.session() as session:
        await session.execute(update(Delivery).values(created_at=utcnow() - timedelta(days=6)))
        await session.commit()
    claimed = await claim_due(store, "node-a", 1, 300)

    result = await deliver_one(env.config, store, env.relay.transport, claimed[0].delivery_id)

    assert result == "bounced"
    async with store.session() as session:
        delivery = await session.get(Delivery, claimed[0].delivery_id)
    assert delivery.state == "bounced"
    assert "lifetime" in delivery.last_error


async def test_crashing_delivery_held_not_lost(env: RelayEnv):
    await accept(env, 1)
    store = env.relay.store
    claimed = await claim_due(store, "node-a", 1, 300)
    delivery_id = claimed[0].delivery_id

    for _ in range(env.config.delivery.max_crashes):
        await record_crash(env.config, store, delivery_id)

    async with store.session() as session:
        delivery = await session.get(Delivery, delivery_id)
        attempts = list(await session.scalars(select(DeliveryAttempt.result).where(DeliveryAttempt.delivery_id == delivery_id)))
        message_row = await session.get(Message, delivery.message_id)
    assert delivery.state == "held"
    assert attempts == ["crashed"] * env.config.delivery.max_crashes
    assert message_row.status == "held"
    assert message_row.delivered_raw


async def test_flush_makes_rows_due(env: RelayEnv):
    await accept(env, 2)
    store = env.relay.store
    async with store.session() as session:
        await session.execute(update(Delivery).values(next_attempt_at=utcnow() + timedelta(hours=1)))
        await session.commit()

    before = await claim_due(store, "node-a", 5, 300)
    changed = await flush(store)
    after = await claim_due(store, "node-a", 5, 300)

    assert before == []
    assert changed == 2
    assert len(after) == 2


async def test_list_shows_pending_rows(env: RelayEnv):
    queue_ids = await accept(env, 2)

    rows = await list_deliveries(env.relay.store)

    assert sorted(r["queue_id"] for r in rows) == sorted(queue_ids)
    assert all(r["state"] == "queued" for r in rows)
    assert all("@" not in str(r.get("recipient", "")) for r in rows)
