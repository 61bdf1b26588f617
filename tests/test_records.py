"""relaymail.records and its CLI commands, on a migrated SQLite file.

Messages are written straight into the archive with chosen arrival times, so
the filters and the response-time arithmetic (over a weekend) can be checked
to the second. The CLI runs in this process (`cli_main`), and once as
`python -m relaymail` (`cli`).
"""

from __future__ import annotations

import base64
import email
import email.policy
import mailbox
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import func, select

from relaymail import provision, records
from relaymail.errors import InputError, NotFoundError
from relaymail.models import Delivery, DeliveryAttempt, Message, ThreadId
from relaymail.provision import ConflictError

from conftest import DOMAIN, write_config

UTC = timezone.utc
# Friday 8 March 2024, 18:00 UTC; the weekend follows.
FRIDAY_EVENING = datetime(2024, 3, 8, 18, 0, tzinfo=UTC)
MONDAY_NOON = datetime(2024, 3, 11, 12, 0, tzinfo=UTC)


# --- fixtures and helpers -------------------------------------------------------


@pytest.fixture
def config_file(tmp_path: Path, database_url: str) -> Path:
    """Replace conftest's configuration: each test runs on SQLite, then on PostgreSQL when available."""
    return write_config(tmp_path / "relaymail.toml", database_url)


class Cast:
    """Seller S1 with buyers B1 and B2 (two pairs), seller S2 with B1 (a third pair)."""

    def __init__(self, pairs: dict[str, provision.PairAliases]):
        self.pairs = pairs

    def pair_id(self, name: str) -> int:
        return self.pairs[name].pair_id


@pytest.fixture
async def cast(store) -> Cast:
    async with store.session() as session:
        await provision.add_seller(session, "S1", "Tienda Ñandú", "soporte@tienda.example", domain=DOMAIN, senders=["ventas@tienda.example"])
        await provision.add_seller(session, "S2", "Otra Tienda", "ayuda@otra.example", domain=DOMAIN, locale="en")
        await provision.add_buyer(session, "B1", "ana@mail.example", domain=DOMAIN, name="Ana")
        await provision.add_buyer(session, "B2", "luis@mail.example", domain=DOMAIN)
        pairs = {
            "B1-S1": await provision.show_pair(session, "B1", "S1", DOMAIN),
            "B2-S1": await provision.show_pair(session, "B2", "S1", DOMAIN),
            "B1-S2": await provision.show_pair(session, "B1", "S2", DOMAIN),
        }
        await provision.add_order(session, "O-1", "B1", "S1", "shipped", FRIDAY_EVENING - timedelta(days=3))
        await provision.add_order(session, "O-2", "B1", "S1", "pending", FRIDAY_EVENING - timedelta(days=1))
        await session.commit()
    return Cast(pairs)


_counter = 0


def raw_message(subject: str, sender: str = "ana@mail.example", body: str = "Hola.") -> bytes:
    global _counter
    _counter += 1
    return (
        f"From: <{sender}>\r\nTo: alias@{DOMAIN}\r\nSubject: {subject}\r\n"
        f"Message-ID: <r{_counter}@client.test>\r\nDate: Fri, 08 Mar 2024 12:00:00 -0600\r\n"
        f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n"
    ).encode()


async def add_message(
    store,
    cast: Cast,
    pair: str,
    direction: str,
    received_at: datetime,
    *,
    status: str = "delivered",
    needs_response: bool | None = None,
    automatic: bool = False,
    order_id: str | None = None,
    subject: str = "Pregunta",
    rule: str = "",
    reason: str = "",
    delivered: bool = True,
) -> str:
    """Archive one message of `pair` at `received_at`; return its queue id."""
    global _counter
    _counter += 1
    queue_id = f"{_counter:012X}"
    aliases = cast.pairs[pair]
    if needs_response is None:
        needs_response = direction == "buyer_to_seller" and not automatic
    sender = "ana@mail.example" if direction == "buyer_to_seller" else "ventas@tienda.example"
    raw = raw_message(subject, sender)
    async with store.session() as session:
        message = Message(
            queue_id=queue_id,
            direction=direction,
            pair_id=aliases.pair_id,
            seller_id=aliases.seller_id,
            buyer_id=aliases.buyer_id,
            order_id=order_id,
            envelope_sender=sender,
            header_from=sender,
            recipient_alias=aliases.seller_alias if direction == "buyer_to_seller" else aliases.buyer_alias,
            subject=subject,
            status=status,
            rule=rule,
            reason=reason,
            automatic=automatic,
            needs_response=needs_response,
            raw=raw,
            delivered_raw=raw.replace(sender.encode(), b"alias@" + DOMAIN.encode()) if delivered else None,
            size_bytes=len(raw),
            received_at=received_at,
        )
        session.add(message)
        await session.commit()
    return queue_id


async def set_fields(store, queue_id: str, **values) -> None:
    async with store.session() as session:
        message = await session.scalar(select(Message).where(Message.queue_id == queue_id))
        for key, value in values.items():
            setattr(message, key, value)
        await session.commit()


async def listed(store, **criteria) -> list[str]:
    async with store.session() as session:
        found = await records.list_messages(session, records.MessageQuery(**criteria))
    return [message.queue_id for message in found]


# --- input checks --------------------------------------------------------------


@pytest.mark.parametrize("value", ["", "12345", "3F2A9C01B7DEX", "3F2A9C01B7DG", "3F2A 9C01B7D"])
def test_queue_id_invalid(value):
    with pytest.raises(InputError, match="expected 12 hexadecimal digits"):
        records.parse_queue_id(value)


def test_queue_id_upper_cased():
    assert records.parse_queue_id(" 3f2a9c01b7de ") == "3F2A9C01B7DE"


@pytest.mark.parametrize("value", ["spam", "Abuse", " other "])
def test_report_reason_valid(value):
    assert records.normalize_reason(value) == value.strip().lower()


def test_report_reason_invalid():
    with pytest.raises(InputError, match="expected one of spam, abuse, other"):
        records.normalize_reason("rude")


def test_note_rules():
    assert records.normalize_note("  ") is None
    assert records.normalize_note("línea 1\nlínea 2") == "línea 1\nlínea 2"
    with pytest.raises(InputError, match="U\\+0007"):
        records.normalize_note("bell\x07")
    with pytest.raises(InputError, match="at most 2000"):
        records.normalize_note("x" * 2001)


@pytest.mark.parametrize("value", [0, 1, 14, "x", None])
def test_window_days_invalid(value):
    with pytest.raises(InputError, match="expected one of 7, 30, 90"):
        records.normalize_days(value)


# --- filters ---------------------------------------------------------------------


async def test_needs_response_filter(store, cast):
    start = FRIDAY_EVENING
    answered = await add_message(store, cast, "B1-S1", "buyer_to_seller", start)
    await add_message(store, cast, "B1-S1", "seller_to_buyer", start + timedelta(hours=1))
    after_reply = await add_message(store, cast, "B1-S1", "buyer_to_seller", start + timedelta(hours=2))
    marked = await add_message(store, cast, "B2-S1", "buyer_to_seller", start)
    reported = await add_message(store, cast, "B2-S1", "buyer_to_seller", start + timedelta(minutes=1))
    automatic = await add_message(store, cast, "B2-S1", "buyer_to_seller", start + timedelta(minutes=2), automatic=True)
    other_seller = await add_message(store, cast, "B1-S2", "buyer_to_seller", start)
    await set_fields(store, marked, no_response_needed_at=start + timedelta(hours=3))
    await set_fields(store, reported, reported_at=start + timedelta(hours=3), report_reason="spam")

    found = await listed(store, seller_id="S1", kind="needs-response")

    assert found == [after_reply]
    assert answered not in found
    assert automatic not in found
    assert other_seller not in found


async def test_blocked_or_automatic_reply_is_no_reply(store, cast):
    question = await add_message(store, cast, "B1-S1", "buyer_to_seller", FRIDAY_EVENING)
    await add_message(store, cast, "B1-S1", "seller_to_buyer", FRIDAY_EVENING + timedelta(hours=1), status="blocked", rule="opt_out")
    await add_message(store, cast, "B1-S1", "seller_to_buyer", FRIDAY_EVENING + timedelta(hours=2), automatic=True)
    await add_message(store, cast, "B1-S1", "seller_to_buyer", FRIDAY_EVENING + timedelta(hours=3), status="rejected", rule="sender")

    assert await listed(store, seller_id="S1", kind="needs-response") == [question]


async def test_reply_in_other_pair_does_not_answer(store, cast):
    question = await add_message(store, cast, "B1-S1", "buyer_to_seller", FRIDAY_EVENING)
    await add_message(store, cast, "B2-S1", "seller_to_buyer", FRIDAY_EVENING + timedelta(hours=1))

    assert await listed(store, seller_id="S1", kind="needs-response") == [question]


async def test_sent_filter_lists_every_outcome(store, cast):
    delivered = await add_message(store, cast, "B1-S1", "seller_to_buyer", FRIDAY_EVENING)
    blocked = await add_message(
        store, cast, "B1-S1", "seller_to_buyer", FRIDAY_EVENING + timedelta(minutes=1),
        status="blocked", rule="opt_out", reason="buyer declined unsolicited messages", delivered=False,
    )
    bounced = await add_message(store, cast, "B2-S1", "seller_to_buyer", FRIDAY_EVENING + timedelta(minutes=2), status="bounced")
    await add_message(store, cast, "B1-S1", "buyer_to_seller", FRIDAY_EVENING + timedelta(minutes=3))
    async with store.session() as session:
        message = await session.scalar(select(Message).where(Message.queue_id == bounced))
        session.add(Delivery(message_id=message.id, recipient="luis@mail.example", state="bounced", last_error="550 5.1.1 mailbox unknown"))
        await session.commit()

    async with store.session() as session:
        found = await records.list_messages(session, records.MessageQuery(seller_id="S1", kind="sent"))
        summaries = {m.queue_id: records.message_summary(m) for m in found}

    assert list(summaries) == [bounced, blocked, delivered]
    assert summaries[delivered]["status"] == "delivered"
    assert summaries[blocked]["status"] == "blocked"
    assert summaries[blocked]["rule"] == "opt_out"
    assert summaries[blocked]["reason"] == "buyer declined unsolicited messages"
    assert summaries[bounced]["status"] == "bounced"
    assert summaries[bounced]["delivery_error"] == "550 5.1.1 mailbox unknown"
    assert "raw" not in summaries[bounced]


async def test_blocked_filter(store, cast):
    await add_message(store, cast, "B1-S1", "seller_to_buyer", FRIDAY_EVENING)
    blocked = await add_message(store, cast, "B1-S1", "seller_to_buyer", FRIDAY_EVENING, status="blocked", delivered=False)

    assert await listed(store, kind="blocked") == [blocked]


async def test_alias_filter_either_alias(store, cast):
    first = await add_message(store, cast, "B1-S1", "buyer_to_seller", FRIDAY_EVENING)
    second = await add_message(store, cast, "B1-S1", "seller_to_buyer", FRIDAY_EVENING + timedelta(hours=1))
    await add_message(store, cast, "B2-S1", "buyer_to_seller", FRIDAY_EVENING)
    pair = cast.pairs["B1-S1"]

    for alias in (pair.buyer_alias, pair.seller_alias):
        local = provision.parse_alias(alias.upper(), DOMAIN, "alias")
        assert await listed(store, alias=local) == [second, first]
    assert await listed(store, pair_id=pair.pair_id) == [second, first]


async def test_order_and_date_filters(store, cast):
    early = await add_message(store, cast, "B1-S1", "buyer_to_seller", FRIDAY_EVENING, order_id="O-1")
    late = await add_message(store, cast, "B1-S1", "buyer_to_seller", FRIDAY_EVENING + timedelta(days=1), order_id="O-2")

    assert await listed(store, order_id="O-1") == [early]
    assert await listed(store, since=FRIDAY_EVENING + timedelta(hours=1)) == [late]
    assert await listed(store, until=FRIDAY_EVENING + timedelta(days=1)) == [early]
    assert await listed(store, seller_id="S1", limit=1) == [late]
    assert await listed(store, seller_id="S1", limit=1, offset=1) == [early]


@pytest.mark.parametrize(
    ("criteria", "message"),
    [
        ({"seller_id": "nobody"}, "seller 'nobody' not found"),
        ({"alias": "zzzzzzzzzzzzzzz"}, "alias 'zzzzzzzzzzzzzzz' not found"),
        ({"order_id": "O-404"}, "order 'O-404' not found"),
        ({"pair_id": 999}, "pair 999 not found"),
    ],
)
async def test_unknown_criteria_not_found(store, cast, criteria, message):
    with pytest.raises(NotFoundError, match=message):
        await listed(store, **criteria)


# --- one message and seller actions ------------------------------------------------


async def test_detail_has_both_versions_and_attempts(store, cast):
    queue_id = await add_message(store, cast, "B1-S1", "buyer_to_seller", FRIDAY_EVENING)
    async with store.session() as session:
        message = await session.scalar(select(Message).where(Message.queue_id == queue_id))
        delivery = Delivery(message_id=message.id, recipient="soporte@tienda.example", state="sent")
        session.add(delivery)
        await session.flush()
        session.add(DeliveryAttempt(delivery_id=delivery.id, result="deferred", host="mx.test", reply_code=451, reply_text="try later", started_at=FRIDAY_EVENING))
        session.add(DeliveryAttempt(delivery_id=delivery.id, result="sent", host="mx.test", reply_code=250, reply_text="ok", started_at=FRIDAY_EVENING + timedelta(minutes=5)))
        await session.commit()
        raw, delivered_raw = message.raw, message.delivered_raw

    async with store.session() as session:
        detail = await records.message_detail(session, queue_id.lower())

    assert detail["queue_id"] == queue_id
    assert base64.b64decode(detail["raw_base64"]) == raw
    assert base64.b64decode(detail["delivered_raw_base64"]) == delivered_raw
    assert detail["header_from"] == "ana@mail.example"
    assert [a["result"] for a in detail["deliveries"][0]["attempts"]] == ["deferred", "sent"]
    assert detail["deliveries"][0]["attempts"][0]["reply_code"] == 451


async def test_detail_unknown_message(store, cast):
    async with store.session() as session:
        with pytest.raises(NotFoundError, match="message 000000000000 not found"):
            await records.message_detail(session, "000000000000")


async def test_no_response_needed_keeps_first_time(store, cast):
    queue_id = await add_message(store, cast, "B1-S1", "buyer_to_seller", FRIDAY_EVENING)
    first = FRIDAY_EVENING + timedelta(hours=1)

    async with store.session() as session:
        message, changed = await records.mark_no_response_needed(session, queue_id, now=first)
        await session.commit()
    assert changed is True
    async with store.session() as session:
        message, changed = await records.mark_no_response_needed(session, queue_id, now=first + timedelta(hours=1))
        await session.commit()

    assert changed is False
    assert message.no_response_needed_at == first
    assert await listed(store, kind="needs-response") == []


async def test_report_replaces_reason_keeps_time(store, cast):
    queue_id = await add_message(store, cast, "B1-S1", "buyer_to_seller", FRIDAY_EVENING)
    first = FRIDAY_EVENING + timedelta(hours=1)

    async with store.session() as session:
        message, changed = await records.report_message(session, queue_id, "spam", None, now=first)
        await session.commit()
    assert changed is True
    async with store.session() as session:
        message, changed = await records.report_message(session, queue_id, "Abuse", " insultos ", now=first + timedelta(hours=2))
        await session.commit()

    assert changed is True
    assert message.reported_at == first
    assert message.report_reason == "abuse"
    assert message.report_note == "insultos"
    assert await listed(store, kind="needs-response") == []


@pytest.mark.parametrize("direction", ["seller_to_buyer", "notice"])
async def test_actions_only_on_buyer_messages(store, cast, direction):
    queue_id = await add_message(store, cast, "B1-S1", direction, FRIDAY_EVENING)

    async with store.session() as session:
        with pytest.raises(ConflictError, match="only a buyer's message to a seller"):
            await records.mark_no_response_needed(session, queue_id)
        with pytest.raises(ConflictError, match="only a buyer's message to a seller"):
            await records.report_message(session, queue_id, "spam")


async def test_alias_orders_most_recent_first(store, cast):
    pair = cast.pairs["B1-S1"]
    local = provision.parse_alias(pair.buyer_alias, DOMAIN, "alias")

    async with store.session() as session:
        result = await records.alias_orders(session, local, DOMAIN)

    assert result["alias_role"] == "buyer_alias"
    assert result["buyer_id"] == "B1"
    assert result["seller_id"] == "S1"
    assert [order["id"] for order in result["orders"]] == ["O-2", "O-1"]


# --- response times --------------------------------------------------------------


async def test_response_time_over_weekend(store, cast):
    # Friday 18:00, answered Monday 09:00: 63 hours, nights and weekend included.
    await add_message(store, cast, "B1-S1", "buyer_to_seller", FRIDAY_EVENING)
    await add_message(store, cast, "B1-S1", "seller_to_buyer", datetime(2024, 3, 11, 9, 0, tzinfo=UTC))
    # Saturday 10:00, answered Saturday 12:00: 2 hours.
    await add_message(store, cast, "B2-S1", "buyer_to_seller", datetime(2024, 3, 9, 10, 0, tzinfo=UTC))
    await add_message(store, cast, "B2-S1", "seller_to_buyer", datetime(2024, 3, 9, 12, 0, tzinfo=UTC))
    # Sunday 08:00 after the Saturday reply, never answered: 28 hours old at Monday noon.
    await add_message(store, cast, "B2-S1", "buyer_to_seller", datetime(2024, 3, 10, 8, 0, tzinfo=UTC))
    # Monday 11:00, unanswered for 1 hour: pending.
    await add_message(store, cast, "B1-S1", "buyer_to_seller", datetime(2024, 3, 11, 11, 0, tzinfo=UTC))
    # Left out: marked, reported, automatic, another seller's, and one older than 7 days.
    marked = await add_message(store, cast, "B1-S1", "buyer_to_seller", datetime(2024, 3, 9, 9, 0, tzinfo=UTC))
    await set_fields(store, marked, no_response_needed_at=MONDAY_NOON)
    reported = await add_message(store, cast, "B2-S1", "buyer_to_seller", datetime(2024, 3, 9, 9, 0, tzinfo=UTC))
    await set_fields(store, reported, reported_at=MONDAY_NOON, report_reason="spam")
    await add_message(store, cast, "B2-S1", "buyer_to_seller", datetime(2024, 3, 9, 9, 30, tzinfo=UTC), automatic=True)
    await add_message(store, cast, "B1-S2", "buyer_to_seller", datetime(2024, 3, 9, 9, 0, tzinfo=UTC))
    await add_message(store, cast, "B1-S1", "buyer_to_seller", MONDAY_NOON - timedelta(days=8))

    async with store.session() as session:
        week = await records.response_time(session, "S1", 7, now=MONDAY_NOON)
        month = await records.response_time(session, "S1", 30, now=MONDAY_NOON)

    assert week.messages == 4
    assert week.answered == 2
    assert week.answered_within_24h == 1
    assert week.not_answered_within_24h == 2
    assert week.pending == 1
    assert week.share_not_answered_within_24h == pytest.approx(2 / 3)
    assert week.average_response_s == pytest.approx((63 + 2) / 2 * 3600)
    assert week.since == MONDAY_NOON - timedelta(days=7)
    # The 8-day-old message was answered by the Friday-to-Monday reply (11 days later).
    assert month.messages == 5
    assert month.answered == 3
    assert month.not_answered_within_24h == 3


async def test_response_time_ignores_future_replies(store, cast):
    await add_message(store, cast, "B1-S1", "buyer_to_seller", FRIDAY_EVENING)
    await add_message(store, cast, "B1-S1", "seller_to_buyer", FRIDAY_EVENING + timedelta(hours=30))

    async with store.session() as session:
        then = await records.response_time(session, "S1", 7, now=FRIDAY_EVENING + timedelta(hours=20))
        later = await records.response_time(session, "S1", 7, now=FRIDAY_EVENING + timedelta(hours=40))

    assert (then.answered, then.pending, then.share_not_answered_within_24h) == (0, 1, None)
    assert (later.answered, later.not_answered_within_24h) == (1, 1)
    assert later.average_response_s == 30 * 3600


async def test_response_time_unknown_seller(store, cast):
    async with store.session() as session:
        with pytest.raises(NotFoundError, match="seller 'S9' not found"):
            await records.response_time(session, "S9", 7)


def test_compute_stats_exactly_24h_is_within():
    received = FRIDAY_EVENING
    stats = records.compute_response_stats(
        "S1", 7, received - timedelta(days=7), received + timedelta(days=2),
        [(received, received + timedelta(hours=24)), (received, received + timedelta(hours=24, seconds=1))],
    )

    assert stats.answered_within_24h == 1
    assert stats.not_answered_within_24h == 1
    assert stats.share_not_answered_within_24h == 0.5


def test_first_reply_after_is_strict():
    times = [FRIDAY_EVENING, FRIDAY_EVENING + timedelta(hours=1)]

    assert records.first_reply_after(times, FRIDAY_EVENING) == times[1]
    assert records.first_reply_after(times, FRIDAY_EVENING - timedelta(seconds=1)) == times[0]
    assert records.first_reply_after(times, times[1]) is None


# --- export ----------------------------------------------------------------------


async def test_mbox_export_reads_back(store, cast, tmp_path: Path):
    queue_ids = [
        await add_message(store, cast, "B1-S1", "buyer_to_seller", FRIDAY_EVENING + timedelta(minutes=i), subject=f"Pregunta {i}")
        for i in range(3)
    ]
    blocked = await add_message(store, cast, "B1-S1", "seller_to_buyer", FRIDAY_EVENING + timedelta(minutes=5), status="blocked", delivered=False)
    async with store.session() as session:
        originals = {
            m.queue_id: m for m in await session.scalars(select(Message).where(Message.queue_id.in_(queue_ids + [blocked])))
        }

    result = await records.export_mbox(store, records.MessageQuery(seller_id="S1"), tmp_path / "all.mbox")
    box = mailbox.mbox(str(tmp_path / "all.mbox"), create=False)
    entries = list(box)
    box.close()

    assert result.messages == 4
    assert result.skipped == 0
    assert result.bytes == sum(len(m.raw) for m in originals.values())
    assert [entry["X-Relaymail-Queue-Id"] for entry in entries] == queue_ids + [blocked]
    for entry in entries:
        original = originals[entry["X-Relaymail-Queue-Id"]]
        expected = email.message_from_bytes(original.raw, policy=email.policy.default)
        assert entry["Subject"] == expected["Subject"]
        assert entry["Message-ID"] == expected["Message-ID"]
        assert entry.get_payload() == expected.get_payload().replace("\r\n", "\n")
        assert entry.get_from().startswith(original.envelope_sender + " ")
    assert entries[3]["X-Relaymail-Status"] == "blocked"


async def test_mbox_export_delivered_skips_undelivered(store, cast, tmp_path: Path):
    delivered = await add_message(store, cast, "B1-S1", "seller_to_buyer", FRIDAY_EVENING)
    await add_message(store, cast, "B1-S1", "seller_to_buyer", FRIDAY_EVENING, status="blocked", delivered=False)

    result = await records.export_mbox(store, records.MessageQuery(kind="sent"), tmp_path / "out.mbox", "delivered")
    box = mailbox.mbox(str(tmp_path / "out.mbox"), create=False)
    entries = list(box)
    box.close()

    assert (result.messages, result.skipped) == (1, 1)
    assert entries[0]["X-Relaymail-Queue-Id"] == delivered
    assert "ventas@tienda.example" not in entries[0].as_string()
    assert entries[0].get_from().startswith("MAILER-DAEMON ")


async def test_mbox_export_refuses_existing_file(store, cast, tmp_path: Path):
    path = tmp_path / "old.mbox"
    path.write_text("From x\n")

    with pytest.raises(InputError, match="exists and is not empty"):
        await records.export_mbox(store, records.MessageQuery(), path)


# --- purge -----------------------------------------------------------------------


async def test_purge_removes_old_records(store, cast):
    now = datetime(2026, 3, 8, tzinfo=UTC)
    old = await add_message(store, cast, "B1-S1", "buyer_to_seller", now - timedelta(days=731))
    old_queued = await add_message(store, cast, "B1-S1", "buyer_to_seller", now - timedelta(days=800))
    recent = await add_message(store, cast, "B1-S1", "buyer_to_seller", now - timedelta(days=729))
    notice = await add_message(store, cast, "B1-S1", "notice", now - timedelta(days=10))
    async with store.session() as session:
        rows = {m.queue_id: m for m in await session.scalars(select(Message))}
        delivery = Delivery(message_id=rows[old].id, recipient="soporte@tienda.example", state="sent")
        session.add(delivery)
        session.add(Delivery(message_id=rows[old_queued].id, recipient="soporte@tienda.example", state="queued"))
        await session.flush()
        session.add(DeliveryAttempt(delivery_id=delivery.id, result="sent"))
        session.add(ThreadId(pair_id=cast.pair_id("B1-S1"), origin="buyer", relay_id="x1@" + DOMAIN, message_id=rows[old].id))
        rows[notice].parent_id = rows[old].id
        await session.commit()
        old_bytes = len(rows[old].raw) + len(rows[old].delivered_raw)

    dry = await records.purge(store, 730, now=now, dry_run=True)
    result = await records.purge(store, 730, now=now)

    assert (dry.messages, dry.bytes, dry.dry_run) == (1, old_bytes, True)
    assert (result.messages, result.bytes) == (1, old_bytes)
    async with store.session() as session:
        remaining = set(await session.scalars(select(Message.queue_id)))
        assert remaining == {old_queued, recent, notice}
        assert await session.scalar(select(func.count()).select_from(DeliveryAttempt)) == 0
        assert await session.scalar(select(func.count()).select_from(ThreadId)) == 0
        assert await session.scalar(select(Message.parent_id).where(Message.queue_id == notice)) is None
        assert await session.scalar(select(func.count()).select_from(Delivery)) == 1


# --- CLI -------------------------------------------------------------------------


async def test_cli_messages_list_json(store, cast, cli_main):
    question = await add_message(store, cast, "B1-S1", "buyer_to_seller", FRIDAY_EVENING, subject="¿Llega el lunes?")
    alias = cast.pairs["B1-S1"].seller_alias

    result = cli_main("messages", "list", "--seller", "S1", "--alias", alias, "--filter", "needs-response", "--json")

    assert result.rc == 0, result.stderr
    data = result.json()
    assert data["count"] == 1
    assert data["messages"][0]["queue_id"] == question
    assert data["messages"][0]["subject"] == "¿Llega el lunes?"
    assert data["messages"][0]["received_at"] == FRIDAY_EVENING.isoformat()


async def test_cli_messages_list_human(store, cast, cli_main):
    question = await add_message(store, cast, "B1-S1", "buyer_to_seller", FRIDAY_EVENING, subject="Dos palabras")

    result = cli_main("messages", "list", "--since", "2024-03-08", "--until", "2024-03-09")

    assert result.rc == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"queue_id={question} ")
    assert "subject='Dos palabras'" in lines[0]
    assert lines[-1] == "count=1"


async def test_cli_messages_list_subprocess(store, cast, cli):
    await add_message(store, cast, "B1-S1", "seller_to_buyer", FRIDAY_EVENING, status="blocked", delivered=False)

    result = cli("messages", "list", "--filter", "blocked", "--json")

    assert result.rc == 0, result.stderr
    assert result.json()["count"] == 1


async def test_cli_messages_show(store, cast, cli_main):
    queue_id = await add_message(store, cast, "B1-S1", "buyer_to_seller", FRIDAY_EVENING)

    shown = cli_main("messages", "show", queue_id.lower(), "--json")
    raw = cli_main("messages", "show", queue_id, "--raw")
    delivered = cli_main("messages", "show", queue_id, "--raw", "delivered")
    human = cli_main("messages", "show", queue_id)

    assert shown.rc == 0, shown.stderr
    data = shown.json()
    assert base64.b64decode(data["raw_base64"]).decode() == raw.stdout
    assert base64.b64decode(data["delivered_raw_base64"]).decode() == delivered.stdout
    assert "ana@mail.example" in raw.stdout
    assert "ana@mail.example" not in delivered.stdout
    assert f"queue_id={queue_id}" in human.stdout.splitlines()
    assert "raw_base64" not in human.stdout


async def test_cli_show_raw_undelivered_fails(store, cast, cli_main):
    queue_id = await add_message(store, cast, "B1-S1", "seller_to_buyer", FRIDAY_EVENING, status="blocked", delivered=False)

    result = cli_main("messages", "show", queue_id, "--raw", "delivered")

    assert result.rc == 1
    assert result.stderr == f"relaymail: error: message {queue_id} has no delivered version: it was blocked\n"


async def test_cli_actions(store, cast, cli_main):
    queue_id = await add_message(store, cast, "B1-S1", "buyer_to_seller", FRIDAY_EVENING)

    marked = cli_main("messages", "no-response-needed", queue_id, "--json")
    reported = cli_main("messages", "report", queue_id, "--reason", "abuse", "--note", "Insultos", "--json")

    assert marked.rc == 0, marked.stderr
    assert marked.json()["changed"] is True
    assert marked.json()["no_response_needed_at"] is not None
    assert reported.rc == 0, reported.stderr
    assert reported.json()["report_reason"] == "abuse"
    assert reported.json()["report_note"] == "Insultos"


@pytest.mark.parametrize(
    ("args", "rc", "fragment"),
    [
        (("messages", "show", "xyz"), 2, "invalid queue id 'xyz'"),
        (("messages", "show", "00000000000A"), 1, "message 00000000000A not found"),
        (("messages", "report", "00000000000A", "--reason", "rude"), 2, "invalid choice: 'rude'"),
        (("messages", "list", "--alias", "nobody@else.example"), 2, "expected an address at the marketplace domain"),
        (("messages", "list", "--since", "yesterday"), 2, "invalid since date 'yesterday'"),
        (("messages", "list", "--seller", "S9"), 1, "seller 'S9' not found"),
        (("stats", "response-time", "--seller", "S1", "--days", "14"), 2, "invalid choice: 14"),
        (("orders", "--alias", "zzzzzzzzzzzzzzz"), 1, f"alias zzzzzzzzzzzzzzz@{DOMAIN} not found"),
    ],
)
async def test_cli_errors(store, cast, cli_main, args, rc, fragment):
    result = cli_main(*args)

    assert result.rc == rc, (result.stdout, result.stderr)
    assert result.stderr.startswith("relaymail: error: ")
    assert fragment in result.stderr


async def test_cli_action_on_seller_message_fails(store, cast, cli_main):
    queue_id = await add_message(store, cast, "B1-S1", "seller_to_buyer", FRIDAY_EVENING)

    result = cli_main("messages", "no-response-needed", queue_id)

    assert result.rc == 1
    assert "only a buyer's message to a seller can be marked" in result.stderr


async def test_cli_export(store, cast, cli_main, tmp_path: Path):
    for minute in range(2):
        await add_message(store, cast, "B1-S1", "buyer_to_seller", FRIDAY_EVENING + timedelta(minutes=minute))
    path = tmp_path / "export.mbox"

    result = cli_main("messages", "export", "--seller", "S1", "--output", str(path), "--json")

    assert result.rc == 0, result.stderr
    assert result.json()["messages"] == 2
    assert result.json()["version"] == "received"
    box = mailbox.mbox(str(path), create=False)
    assert len(box) == 2
    box.close()


async def test_cli_orders(store, cast, cli_main):
    alias = cast.pairs["B1-S1"].seller_alias

    as_json = cli_main("orders", "--alias", alias, "--json")
    human = cli_main("orders", "--alias", alias)

    assert as_json.rc == 0, as_json.stderr
    assert [order["id"] for order in as_json.json()["orders"]] == ["O-2", "O-1"]
    assert human.stdout.splitlines()[-1] == "count=2"
    assert "alias_role=seller_alias" in human.stdout.splitlines()


async def test_cli_stats_response_time(store, cast, cli_main):
    now = datetime.now(UTC)
    await add_message(store, cast, "B1-S1", "buyer_to_seller", now - timedelta(days=10))
    await add_message(store, cast, "B1-S1", "seller_to_buyer", now - timedelta(days=10) + timedelta(hours=2))

    every = cli_main("stats", "response-time", "--seller", "S1", "--json")
    one = cli_main("stats", "response-time", "--seller", "S1", "--days", "30")

    assert every.rc == 0, every.stderr
    windows = every.json()["windows"]
    assert [w["days"] for w in windows] == [7, 30, 90]
    assert [w["messages"] for w in windows] == [0, 1, 1]
    assert len({w["until"] for w in windows}) == 1
    assert windows[1]["average_response_s"] == 7200
    assert windows[1]["share_not_answered_within_24h"] == 0
    assert one.rc == 0, one.stderr
    assert one.stdout.splitlines()[0] == "seller_id=S1"
    assert "days=30 " in one.stdout


async def test_cli_archive_purge(store, cast, cli_main):
    await add_message(store, cast, "B1-S1", "buyer_to_seller", datetime.now(UTC) - timedelta(days=800))
    await add_message(store, cast, "B1-S1", "buyer_to_seller", datetime.now(UTC))

    dry = cli_main("archive", "purge", "--dry-run", "--json")
    done = cli_main("archive", "purge", "--json")
    again = cli_main("archive", "purge")

    assert dry.rc == 0, dry.stderr
    assert dry.json()["messages"] == 1
    assert dry.json()["dry_run"] is True
    assert done.json()["messages"] == 1
    assert done.json()["bytes"] > 0
    assert done.json()["retention_days"] == 730
    assert "messages=0" in again.stdout.splitlines()
    assert await listed(store) != []
