"""Queue commands: listing, show, flush, hold, release, delete and requeue.

Most tests write messages and delivery rows straight into a migrated SQLite
database, then act through relaymail.queue_admin or through the CLI in this
process (`cli_main`). The last tests run the real relay and queue manager
(tests/relayenv.py) to show that a held delivery is never attempted.
"""

from __future__ import annotations

import json
import secrets
from datetime import timedelta
from pathlib import Path

import pytest
from relayenv import BUYER, SELLER_ALIAS, RelayEnv
from sqlalchemy import select

from relaymail import bounce, db, queue_admin
from relaymail.errors import InputError, NotFoundError
from relaymail.models import Delivery, DeliveryAttempt, Message, utcnow
from relaymail.queue import claim_due
from relaymail.store import Store

pytestmark = pytest.mark.asyncio

BODY_MARKER = "SECRET-BODY-TEXT-7f3a"
SECRET = "0123456789abcdef0123456789abcdef"


async def add_message(
    store: Store,
    states: list[str],
    status: str = "queued",
    attempts: int = 0,
    next_attempt_in_s: int = 0,
    claimed: bool = False,
    envelope_sender: str = "",
) -> tuple[str, list[int]]:
    """Insert a message with one delivery per state; return its queue id and delivery ids."""
    queue_id = secrets.token_hex(6).upper()
    now = utcnow()
    async with store.session() as session:
        message = Message(
            queue_id=queue_id,
            direction="buyer_to_seller",
            status=status,
            subject="Pregunta",
            header_from=BUYER,
            recipient_alias=SELLER_ALIAS,
            raw=f"Subject: Pregunta\r\n\r\n{BODY_MARKER} received\r\n".encode(),
            delivered_raw=f"Subject: Pregunta\r\n\r\n{BODY_MARKER} delivered\r\n".encode(),
            size_bytes=40,
        )
        session.add(message)
        await session.flush()
        deliveries = []
        for index, state in enumerate(states):
            delivery = Delivery(
                message_id=message.id,
                recipient=f"rcpt{index}@example.com",
                envelope_sender=envelope_sender,
                state=state,
                attempts=attempts,
                next_attempt_at=now + timedelta(seconds=next_attempt_in_s),
                claimed_by="node-a:1:abc" if claimed else None,
                claimed_until=now + timedelta(seconds=300) if claimed else None,
                created_at=now - timedelta(days=6),
                finished_at=now if state in ("sent", "bounced") else None,
            )
            session.add(delivery)
            deliveries.append(delivery)
        await session.flush()
        for delivery in deliveries:
            for number in range(attempts):
                session.add(
                    DeliveryAttempt(
                        delivery_id=delivery.id,
                        started_at=now - timedelta(minutes=10 - number),
                        finished_at=now - timedelta(minutes=10 - number),
                        result="deferred",
                        host="127.0.0.1:2526",
                        reply_code=451,
                        reply_text="127.0.0.1:2526 said: 451 4.3.0 try later",
                    )
                )
        await session.commit()
        return queue_id, [d.id for d in deliveries]


async def delivery(store: Store, delivery_id: int) -> Delivery:
    async with store.session() as session:
        return await session.get(Delivery, delivery_id)


async def message_status(store: Store, queue_id: str) -> str:
    async with store.session() as session:
        return await session.scalar(select(Message.status).where(Message.queue_id == queue_id))


@pytest.fixture
async def any_store(database_url: str):
    """An open Store on a migrated database: SQLite, then PostgreSQL when configured."""
    await db.upgrade(database_url)
    opened = Store(database_url)
    try:
        yield opened
    finally:
        await opened.close()


# --- ids --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ident", "expected"),
    [
        ("3F2A9C0B1D4E", ("queue", "3F2A9C0B1D4E")),
        ("3f2a9c0b1d4e", ("queue", "3F2A9C0B1D4E")),
        ("42", ("delivery", 42)),
        ("delivery:42", ("delivery", 42)),
        (" 7 ", ("delivery", 7)),
    ],
)
async def test_parse_ident(ident, expected):
    assert queue_admin.parse_ident(ident) == expected


@pytest.mark.parametrize("ident", ["", "0", "-3", "3F2A9C0B1D4", "3F2A9C0B1D4EX", "XYZ", "delivery:", "١٢"])
async def test_parse_ident_invalid(ident):
    with pytest.raises(InputError) as error:
        queue_admin.parse_ident(ident)

    assert repr(ident) in str(error.value)


async def test_unknown_ids_not_found(any_store):
    with pytest.raises(NotFoundError, match="queue id ABCDEF012345 not found"):
        await queue_admin.show(any_store, "abcdef012345")
    with pytest.raises(NotFoundError, match="delivery 999 not found"):
        await queue_admin.hold(any_store, "999")


# --- list -----------------------------------------------------------------------------


async def test_list_pending_by_default(any_store):
    queued, _ = await add_message(any_store, ["queued"])
    held, _ = await add_message(any_store, ["held"], status="held")
    await add_message(any_store, ["sent"], status="delivered")

    listed = await queue_admin.list_queue(any_store)

    assert [row["queue_id"] for row in listed] == [queued, held]
    assert listed[0]["recipient"] == "rcpt0@example.com"


async def test_list_all_and_state(any_store):
    await add_message(any_store, ["queued"])
    bounced, _ = await add_message(any_store, ["bounced"], status="bounced")
    await add_message(any_store, ["sent"], status="delivered")

    everything = await queue_admin.list_queue(any_store, include_final=True)
    only_bounced = await queue_admin.list_queue(any_store, state="BOUNCED")

    assert sorted(row["state"] for row in everything) == ["bounced", "queued", "sent"]
    assert [row["queue_id"] for row in only_bounced] == [bounced]


async def test_list_cli(store, cli_main):
    queue_id, _ = await add_message(store, ["queued"])
    await add_message(store, ["sent"], status="delivered")

    listed = cli_main("queue", "list", "--json")
    everything = cli_main("queue", "list", "--all", "--json")
    human = cli_main("queue", "list")

    assert listed.rc == 0, listed.stderr
    assert listed.json()["count"] == 1
    assert listed.json()["deliveries"][0]["queue_id"] == queue_id
    assert everything.json()["count"] == 2
    assert human.stdout.splitlines()[-1] == "count=1"
    assert f"queue_id={queue_id}" in human.stdout


async def test_list_invalid_state(migrated_db, cli_main):
    result = cli_main("queue", "list", "--state", "lost")

    assert result.rc == 2
    assert "invalid state 'lost'" in result.stderr
    assert "queued, held, sent, bounced, deleted" in result.stderr


# --- show -------------------------------------------------------------------------------


async def test_show_attempts_and_states(any_store):
    queue_id, (first, second) = await add_message(any_store, ["queued", "sent"], attempts=2)

    shown = await queue_admin.show(any_store, queue_id.lower())

    assert shown["queue_id"] == queue_id
    assert shown["status"] == "queued"
    assert [d["state"] for d in shown["deliveries"]] == ["queued", "sent"]
    attempts = shown["deliveries"][0]["attempt_log"]
    assert len(attempts) == 2
    assert attempts[0]["host"] == "127.0.0.1:2526"
    assert attempts[0]["reply_code"] == 451
    assert attempts[0]["result"] == "deferred"
    assert attempts[0]["started_at"] < attempts[1]["started_at"]


async def test_show_by_delivery_id(any_store):
    queue_id, (delivery_id,) = await add_message(any_store, ["queued"])

    assert (await queue_admin.show(any_store, str(delivery_id)))["queue_id"] == queue_id
    assert (await queue_admin.show(any_store, f"delivery:{delivery_id}"))["queue_id"] == queue_id


async def test_show_cli_never_prints_body(store, cli_main):
    queue_id, _ = await add_message(store, ["queued"], attempts=1)

    human = cli_main("queue", "show", queue_id)
    as_json = cli_main("queue", "show", queue_id, "--json")

    assert human.rc == 0, human.stderr
    assert as_json.rc == 0, as_json.stderr
    assert BODY_MARKER not in human.stdout
    assert BODY_MARKER not in as_json.stdout
    assert f"queue_id={queue_id}" in human.stdout
    assert any(line.startswith("delivery: delivery_id=") for line in human.stdout.splitlines())
    assert any(line.startswith("attempt: delivery_id=") for line in human.stdout.splitlines())
    assert as_json.json()["deliveries"][0]["attempt_log"][0]["reply_text"].endswith("try later")


async def test_show_raw(store, cli):
    # A subprocess, because --raw writes bytes to the real stdout.
    queue_id, _ = await add_message(store, ["queued"])

    delivered = cli("queue", "show", queue_id, "--raw")
    received = cli("queue", "show", queue_id, "--raw", "received")

    assert delivered.rc == 0, delivered.stderr
    assert delivered.stdout == f"Subject: Pregunta\n\n{BODY_MARKER} delivered\n"
    assert received.stdout == f"Subject: Pregunta\n\n{BODY_MARKER} received\n"


async def test_show_raw_with_json_rejected(store, cli_main):
    queue_id, _ = await add_message(store, ["queued"])
    result = cli_main("queue", "show", queue_id, "--raw", "--json")

    assert result.rc == 2
    assert "--raw" in result.stderr


async def test_show_cli_errors(migrated_db, cli_main):
    unknown = cli_main("queue", "show", "ABCDEF012345")
    invalid = cli_main("queue", "show", "not-an-id")

    assert unknown.rc == 1
    assert "queue id ABCDEF012345 not found" in unknown.stderr
    assert invalid.rc == 2
    assert "invalid id 'not-an-id'" in invalid.stderr


# --- flush --------------------------------------------------------------------------------


async def test_flush_makes_queued_due(any_store):
    _, (later,) = await add_message(any_store, ["queued"], next_attempt_in_s=3600)
    _, (held,) = await add_message(any_store, ["held"], status="held", next_attempt_in_s=3600)

    changed = await queue_admin.flush(any_store)

    assert changed == 1
    assert (await delivery(any_store, later)).next_attempt_at <= utcnow()
    assert (await delivery(any_store, held)).next_attempt_at > utcnow()
    assert (await delivery(any_store, held)).state == "held"


async def test_flush_keeps_live_claims(any_store):
    _, (claimed,) = await add_message(any_store, ["queued"], next_attempt_in_s=3600, claimed=True)

    changed = await queue_admin.flush(any_store)

    assert changed == 0
    assert (await delivery(any_store, claimed)).claimed_by == "node-a:1:abc"


async def test_flush_one_message(store, cli_main):
    queue_id, (chosen,) = await add_message(store, ["queued"], next_attempt_in_s=3600)
    _, (other,) = await add_message(store, ["queued"], next_attempt_in_s=3600)

    result = cli_main("queue", "flush", queue_id, "--json")

    assert result.rc == 0, result.stderr
    assert result.json() == {"made_due": 1}
    assert (await delivery(store, chosen)).next_attempt_at <= utcnow()
    assert (await delivery(store, other)).next_attempt_at > utcnow()


# --- hold and release -------------------------------------------------------------------------


async def test_hold_is_never_claimed(any_store):
    queue_id, (delivery_id,) = await add_message(any_store, ["queued"])

    result = await queue_admin.hold(any_store, queue_id)
    claimed = await claim_due(any_store, "node-b", 10, 60)

    assert result.changed == [delivery_id]
    assert (await delivery(any_store, delivery_id)).state == "held"
    assert await message_status(any_store, queue_id) == "held"
    assert claimed == []


async def test_hold_twice_is_unchanged(any_store):
    queue_id, (delivery_id,) = await add_message(any_store, ["queued"])
    await queue_admin.hold(any_store, queue_id)

    again = await queue_admin.hold(any_store, queue_id)

    assert again.changed == []
    assert again.unchanged == [{"delivery_id": delivery_id, "state": "held", "reason": "already held"}]


async def test_hold_sent_is_refused(store, cli_main):
    queue_id, (delivery_id,) = await add_message(store, ["sent"], status="delivered")

    result = cli_main("queue", "hold", queue_id)

    assert result.rc == 1
    assert f"cannot hold {queue_id}" in result.stderr
    assert f"delivery {delivery_id}: state is sent; expected queued" in result.stderr


async def test_release_resets_crashes(any_store):
    queue_id, (delivery_id,) = await add_message(any_store, ["held"], status="held", next_attempt_in_s=3600)
    async with any_store.session() as session:
        (await session.get(Delivery, delivery_id)).crashes = 3
        await session.commit()

    result = await queue_admin.release(any_store, str(delivery_id))
    released = await delivery(any_store, delivery_id)
    claimed = await claim_due(any_store, "node-b", 10, 60)

    assert result.changed == [delivery_id]
    assert released.state == "queued"
    assert released.crashes == 0
    assert released.next_attempt_at <= utcnow()
    assert await message_status(any_store, queue_id) == "queued"
    assert [item.delivery_id for item in claimed] == [delivery_id]


async def test_release_queued_is_unchanged(any_store):
    queue_id, _ = await add_message(any_store, ["queued"])

    result = await queue_admin.release(any_store, queue_id)

    assert result.changed == []
    assert result.unchanged[0]["reason"] == "already queued"


async def test_release_bounced_is_refused(any_store):
    queue_id, _ = await add_message(any_store, ["bounced"], status="bounced")

    with pytest.raises(queue_admin.QueueStateError, match="state is bounced; expected held"):
        await queue_admin.release(any_store, queue_id)


async def test_hold_release_cli_json(store, cli_main):
    queue_id, (delivery_id,) = await add_message(store, ["queued"])

    held = cli_main("queue", "hold", queue_id, "--json")
    released = cli_main("queue", "release", queue_id, "--json")

    assert held.rc == 0, held.stderr
    assert held.json() == {
        "action": "hold",
        "id": queue_id,
        "queue_ids": [queue_id],
        "changed": 1,
        "changed_deliveries": [delivery_id],
        "unchanged": [],
    }
    assert released.json()["changed_deliveries"] == [delivery_id]


# --- delete ---------------------------------------------------------------------------------------


async def test_delete_keeps_archive(any_store):
    queue_id, (delivery_id,) = await add_message(any_store, ["queued"], attempts=2)

    result = await queue_admin.delete(any_store, queue_id)
    deleted = await delivery(any_store, delivery_id)
    shown = await queue_admin.show(any_store, queue_id)

    assert result.changed == [delivery_id]
    assert deleted.state == "deleted"
    assert deleted.finished_at is not None
    assert shown["status"] == "deleted"
    assert len(shown["deliveries"][0]["attempt_log"]) == 2
    assert await claim_due(any_store, "node-b", 10, 60) == []
    assert await queue_admin.list_queue(any_store) == []


async def test_delete_never_touches_sent(any_store):
    queue_id, (sent, queued) = await add_message(any_store, ["sent", "queued"])

    result = await queue_admin.delete(any_store, queue_id)

    assert result.changed == [queued]
    assert result.unchanged[0]["delivery_id"] == sent
    assert (await delivery(any_store, sent)).state == "sent"
    assert await message_status(any_store, queue_id) == "delivered"


async def test_delete_sent_is_refused(store, cli_main):
    queue_id, _ = await add_message(store, ["sent"], status="delivered")

    result = cli_main("queue", "delete", queue_id)

    assert result.rc == 1
    assert "state is sent; expected queued or held" in result.stderr
    assert await message_status(store, queue_id) == "delivered"


async def test_delete_claimed_is_refused(any_store):
    queue_id, (delivery_id,) = await add_message(any_store, ["queued"], claimed=True)

    with pytest.raises(queue_admin.QueueStateError, match="claimed by relay node-a:1:abc"):
        await queue_admin.delete(any_store, queue_id)

    assert (await delivery(any_store, delivery_id)).state == "queued"


async def test_delete_held(any_store):
    queue_id, (delivery_id,) = await add_message(any_store, ["held"], status="held")

    await queue_admin.delete(any_store, str(delivery_id))

    assert (await delivery(any_store, delivery_id)).state == "deleted"
    assert await message_status(any_store, queue_id) == "deleted"


async def test_action_on_message_without_deliveries(any_store):
    queue_id, _ = await add_message(any_store, [], status="blocked")

    with pytest.raises(queue_admin.QueueStateError, match="has no deliveries"):
        await queue_admin.delete(any_store, queue_id)

    assert await message_status(any_store, queue_id) == "blocked"


# --- requeue ---------------------------------------------------------------------------------------


async def test_requeue_bounced(any_store):
    queue_id, (delivery_id,) = await add_message(any_store, ["bounced"], status="bounced", attempts=3)
    before = utcnow()

    result = await queue_admin.requeue(any_store, queue_id)
    requeued = await delivery(any_store, delivery_id)
    shown = await queue_admin.show(any_store, queue_id)

    assert result.changed == [delivery_id]
    assert requeued.state == "queued"
    assert requeued.attempts == 0
    assert requeued.finished_at is None
    assert requeued.created_at >= before
    assert requeued.next_attempt_at <= utcnow()
    assert shown["status"] == "queued"
    assert shown["finished_at"] is None
    assert len(shown["deliveries"][0]["attempt_log"]) == 3


async def test_requeue_sent_and_deleted(any_store):
    sent_id, (sent,) = await add_message(any_store, ["sent"], status="delivered")
    deleted_id, (deleted,) = await add_message(any_store, ["queued"])
    await queue_admin.delete(any_store, deleted_id)

    await queue_admin.requeue(any_store, sent_id)
    await queue_admin.requeue(any_store, deleted_id)

    assert (await delivery(any_store, sent)).state == "queued"
    assert (await delivery(any_store, deleted)).state == "queued"
    assert await message_status(any_store, deleted_id) == "queued"


async def test_requeue_queued_is_unchanged(any_store):
    queue_id, _ = await add_message(any_store, ["queued"])

    result = await queue_admin.requeue(any_store, queue_id)

    assert result.changed == []
    assert result.unchanged[0]["reason"] == "already queued"


async def test_requeue_renews_bounce_address(any_store):
    expired = bounce.make_bounce_address(SECRET, "marketplace.example", "AAAAAAAAAAAA", 0, now_s=0)
    queue_id, (delivery_id,) = await add_message(any_store, ["bounced"], status="bounced", envelope_sender=expired)

    await queue_admin.requeue(any_store, queue_id, bounce_secret=SECRET)
    renewed = (await delivery(any_store, delivery_id)).envelope_sender
    token = bounce.verify_bounce_address(SECRET, renewed.partition("@")[0])

    assert bounce.verify_bounce_address(SECRET, expired.partition("@")[0]) is None
    assert renewed != expired
    assert renewed.endswith("@marketplace.example")
    assert token is not None
    assert token.queue_id == queue_id
    assert token.index == 0


async def test_requeue_keeps_null_sender(any_store):
    queue_id, (delivery_id,) = await add_message(any_store, ["bounced"], status="bounced", envelope_sender="")

    await queue_admin.requeue(any_store, queue_id, bounce_secret=SECRET)

    assert (await delivery(any_store, delivery_id)).envelope_sender == ""


async def test_requeue_cli_human(store, cli_main):
    queue_id, (delivery_id,) = await add_message(store, ["bounced"], status="bounced")

    result = cli_main("queue", "requeue", queue_id)
    lines = dict(line.split("=", 1) for line in result.stdout.splitlines())

    assert result.rc == 0, result.stderr
    assert lines["action"] == "requeue"
    assert lines["changed"] == "1"
    assert lines["changed_deliveries"] == str(delivery_id)


# --- with the real relay ----------------------------------------------------------------------------


def buyer_message(marker: str) -> bytes:
    return (
        f"From: Juan <{BUYER}>\r\nTo: {SELLER_ALIAS}\r\nSubject: Pregunta {marker}\r\n"
        f"Date: Mon, 11 Mar 2024 10:00:00 -0600\r\nMessage-ID: <{marker}@example.net>\r\n"
        f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nmarker {marker}\r\n"
    ).encode()


@pytest.fixture
async def relay_env(tmp_path: Path):
    directory = tmp_path / "relay"
    directory.mkdir()
    env = await RelayEnv(directory).start(run_queue=False)
    try:
        yield env
    finally:
        await env.stop()


async def test_relay_skips_held_until_release(relay_env: RelayEnv, cli_main):
    outcome = await relay_env.send(BUYER, [SELLER_ALIAS], buyer_message("held-1"))
    queue_id = outcome.text.rsplit(" ", 1)[-1]
    config_path = relay_env.config.path

    held = cli_main("queue", "hold", queue_id, "--json", config=config_path)
    await relay_env.restart(run_queue=True)
    await relay_env.sink.wait_for(1, timeout_s=1.5)
    listed = cli_main("queue", "list", "--state", "held", "--json", config=config_path)

    assert outcome.code == 250
    assert held.rc == 0, held.stderr
    assert relay_env.sink.messages == []
    assert [row["queue_id"] for row in listed.json()["deliveries"]] == [queue_id]

    released = cli_main("queue", "release", queue_id, config=config_path)
    arrived = await relay_env.sink.wait_for(1, timeout_s=10)
    await relay_env.wait_idle()
    shown = json.loads(cli_main("queue", "show", queue_id, "--json", config=config_path).stdout)

    assert released.rc == 0, released.stderr
    assert len(arrived) == 1
    assert b"marker held-1" in arrived[0].data
    assert shown["status"] == "delivered"
    assert shown["deliveries"][0]["attempt_log"][0]["result"] == "sent"
    assert shown["deliveries"][0]["attempt_log"][0]["reply_code"] == 250


async def test_relay_never_sends_deleted(relay_env: RelayEnv, cli_main):
    outcome = await relay_env.send(BUYER, [SELLER_ALIAS], buyer_message("deleted-1"))
    kept = await relay_env.send(BUYER, [SELLER_ALIAS], buyer_message("kept-1"))
    queue_id = outcome.text.rsplit(" ", 1)[-1]

    deleted = cli_main("queue", "delete", queue_id, config=relay_env.config.path)
    await relay_env.restart(run_queue=True)
    arrived = await relay_env.sink.wait_for(2, timeout_s=2)

    assert deleted.rc == 0, deleted.stderr
    assert kept.code == 250
    assert [b"marker kept-1" in item.data for item in arrived] == [True]
