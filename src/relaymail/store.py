"""Database access: the async engine and the queries of the mail path.

`Store` wraps one SQLAlchemy async engine. On SQLite it turns on WAL mode with
`synchronous=FULL`, so a committed transaction is on disk before `commit()`
returns; that is what lets the receive path reply 250 only after the message
and its deliveries are durable. On PostgreSQL a commit is durable by default
(`synchronous_commit=on`).

Functions here take an `AsyncSession` and never commit on their own, except
`Store` methods named for a whole unit of work.

Raises StoreError (or NotFoundError) for expected failures; SQLAlchemy errors
from an unreachable database propagate.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
import string
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import AsyncIterator

from typing import Callable, TypeVar

from sqlalchemy import bindparam, event, func, insert, or_, select, text, true
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session

from .db import sqlite_path
from .errors import NotFoundError
from .store_sqlite import SqliteUnits, ensure_wal_mode
from .models import Buyer, Delivery, Message, Order, Pair, Seller, SellerSender, SenderState, ThreadId

T = TypeVar("T")

ALIAS_ALPHABET = string.ascii_lowercase + string.digits
ALIAS_LENGTH = 15


class Store:
    """The async engines and session factories of one database.

    `session()` gives a session for reads and for writes that must be durable
    when `commit()` returns (the receive path). `writing()` serialises writers:
    SQLite allows one writer at a time, and waiting on an asyncio lock is much
    cheaper than SQLite's busy handler, which sleeps up to 100 ms between
    retries. `writing(durable=False)` is for queue bookkeeping (claims, attempt
    records) that a crash may lose without losing mail: on SQLite it uses a
    second engine with `synchronous=NORMAL`, which survives a process crash but
    not a power loss; on PostgreSQL it turns `synchronous_commit` off for that
    transaction. A lost record means at most a repeated delivery attempt.
    `run()` on SQLite ignores `durable`: its write units share group commits
    with `synchronous=FULL` (see store_sqlite).
    """

    def __init__(self, url: str, echo: bool = False):
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self.engine: AsyncEngine = _create_engine(url, echo, synchronous="FULL")
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        if self.is_sqlite:
            self.relaxed_engine = _create_engine(url, echo, synchronous="NORMAL")
            self.relaxed_sessions = async_sessionmaker(self.relaxed_engine, expire_on_commit=False)
        else:
            self.relaxed_engine = self.engine
            self.relaxed_sessions = self.sessions
        self._write_lock = asyncio.Lock()
        self._units: SqliteUnits | None = None
        if self.is_sqlite:
            sync_url = make_url(url).set(drivername="sqlite+pysqlite")
            path = sqlite_path(url)
            if path is not None and path.exists():
                # Before any connection of this process exists, so that no
                # two of them race to change the journal mode.
                ensure_wal_mode(path)
            self._units = SqliteUnits(sync_url, self._write_lock, _sqlite_pragmas)

    async def run(self, unit: Callable[[Session], T], *, write: bool = False, durable: bool = True) -> T:
        """Run `unit(session)`, a synchronous unit of work, in one round trip; return its result.

        The mail path's queries go through here, so that a message costs a few
        hand-offs to the database rather than one per statement. On SQLite a
        read unit runs at once on the event loop and a write unit joins a
        group commit (see store_sqlite); every SQLite write unit is committed
        with `synchronous=FULL`. On PostgreSQL the unit runs through
        `AsyncSession.run_sync` on the asyncpg connection. A write unit is
        committed before this returns (durable or not, as for `writing()`).
        Units return plain data, because their session is closed afterwards.
        On SQLite a read unit gets a store_sqlite.ReadView, whose `connection()`
        is the cheapest way to run Core statements.
        """
        if not self.is_sqlite:
            context = self.writing(durable) if write else self.session()
            async with context as session:
                result = await session.run_sync(unit)
                if write:
                    await session.commit()
                return result

        if write:
            return await self._units.write(unit)
        return self._units.read(unit)

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        async with self.sessions() as session:
            yield session

    @asynccontextmanager
    async def write_lock(self) -> AsyncIterator[None]:
        """Hold the SQLite writer lock (a no-op on PostgreSQL, whose writers do not block each other)."""
        if not self.is_sqlite:
            yield
            return
        async with self._write_lock:
            yield

    @asynccontextmanager
    async def writing(self, durable: bool = True) -> AsyncIterator[AsyncSession]:
        """Yield a session for one write transaction, holding the writer lock; the caller commits."""
        factory = self.sessions if durable else self.relaxed_sessions
        async with self.write_lock():
            async with factory() as session:
                if not durable and not self.is_sqlite:
                    await session.execute(text("SET LOCAL synchronous_commit TO OFF"))
                yield session

    async def close(self) -> None:
        await self.engine.dispose()
        if self.relaxed_engine is not self.engine:
            await self.relaxed_engine.dispose()
        if self._units is not None:
            await self._units.close()


def _create_engine(url: str, echo: bool, synchronous: str) -> AsyncEngine:
    kwargs: dict = {"echo": echo}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 30}
    else:
        kwargs["pool_size"] = 10
        kwargs["max_overflow"] = 10
        kwargs["pool_pre_ping"] = True
    engine = create_async_engine(url, **kwargs)
    if url.startswith("sqlite"):
        event.listen(engine.sync_engine, "connect", functools.partial(_sqlite_pragmas, synchronous=synchronous))
    return engine


def _sqlite_pragmas(dbapi_connection, connection_record, synchronous: str = "FULL") -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=30000")
    # Changing the journal mode fails at once with "database is locked" while
    # another connection writes, so it is set only when needed. WAL mode stays
    # set in the file, and ensure_wal_mode() sets it before the relay starts.
    cursor.execute("PRAGMA journal_mode")
    if cursor.fetchone()[0].lower() != "wal":
        cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA synchronous={synchronous}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


# --- aliases ---------------------------------------------------------------


def new_alias() -> str:
    """Return a fresh alias local part: 15 characters of [a-z0-9] from `secrets`."""
    return "".join(secrets.choice(ALIAS_ALPHABET) for _ in range(ALIAS_LENGTH))


def is_alias_form(local_part: str) -> bool:
    """Return True if `local_part` has the alias form (15 characters of [a-z0-9])."""
    return len(local_part) == ALIAS_LENGTH and all(c in ALIAS_ALPHABET for c in local_part)


@dataclass(frozen=True)
class AliasMatch:
    """The pair behind an alias and which of its two aliases was named."""

    pair: Pair
    role: str  # "buyer_alias" (seller writes to the buyer) or "seller_alias"


async def find_alias(session: AsyncSession, local_part: str) -> AliasMatch | None:
    """Return the pair whose buyer or seller alias is `local_part` (any case), else None."""
    return await session.run_sync(lookup_alias, local_part)


@dataclass(frozen=True)
class PairRef:
    """The ids of a pair, for code that needs no more of it."""

    id: int
    buyer_id: str
    seller_id: str


def lookup_alias_ref(session: Session, local_part: str) -> AliasMatch | None:
    """Like `lookup_alias`, with a PairRef in place of the Pair: one indexed query, no relationships."""
    local_part = local_part.lower()
    if not is_alias_form(local_part):
        return None
    row = session.connection().execute(_PAIR_BY_ALIAS, {"alias": local_part}).first()
    if row is None:
        return None
    role = "buyer_alias" if row.buyer_alias == local_part else "seller_alias"
    return AliasMatch(PairRef(row.id, row.buyer_id, row.seller_id), role)


def lookup_alias(session: Session, local_part: str) -> AliasMatch | None:
    """Synchronous `find_alias`, for Store.run."""
    local_part = local_part.lower()
    if not is_alias_form(local_part):
        return None
    pair = session.scalar(select(Pair).where(Pair.buyer_alias == local_part))
    if pair is not None:
        return AliasMatch(pair, "buyer_alias")
    pair = session.scalar(select(Pair).where(Pair.seller_alias == local_part))
    if pair is not None:
        return AliasMatch(pair, "seller_alias")
    return None


# --- sellers and senders ---------------------------------------------------


async def sender_sellers(session: AsyncSession, address: str) -> dict[str, str]:
    """Return {seller_id: state} for every seller that lists `address` as a sender."""
    rows = await session.execute(
        select(SellerSender.seller_id, SellerSender.state).where(SellerSender.address == address.lower())
    )
    return {seller_id: state for seller_id, state in rows}


async def get_seller(session: AsyncSession, seller_id: str) -> Seller:
    seller = await session.get(Seller, seller_id)
    if seller is None:
        raise NotFoundError(f"seller {seller_id!r} not found")
    return seller


async def get_buyer(session: AsyncSession, buyer_id: str) -> Buyer:
    buyer = await session.get(Buyer, buyer_id)
    if buyer is None:
        raise NotFoundError(f"buyer {buyer_id!r} not found")
    return buyer


# --- policy facts ------------------------------------------------------------


@dataclass(frozen=True)
class PolicyFacts:
    """The counters and look-ups the policy needs for one message."""

    thread_reply: bool
    has_recent_order: bool
    sent_today: int
    orders_last_30_days: int
    automatic_passed_recently: bool


COUNTED_STATUSES = ("queued", "delivered", "bounced", "held")


# --- units of work of the mail path (synchronous, run through Store.run) -------


@dataclass(frozen=True)
class PartyView:
    """The records of a pair that the receive path reads, as plain values."""

    pair_id: int
    buyer_alias: str
    seller_alias: str
    buyer_id: str
    seller_id: str
    buyer_email: str
    buyer_name: str | None
    buyer_locale: str
    buyer_opted_out: bool
    business_name: str
    support_email: str
    seller_locale: str
    block_notice: bool


@dataclass(frozen=True)
class MessageContext:
    """Everything the receive path needs from the database to judge and rewrite one message."""

    party: PartyView
    sender_states: dict[str, str]  # seller id -> sender state, for the header From address
    facts: PolicyFacts
    order_ids: list[str]  # the pair's orders, most recent first
    seller_addresses: list[str]  # approved senders and the support address
    in_reply_to: list[str]  # mapped to the ids the recipient received
    references: list[str]


def load_message_context(
    session: Session, pair_id: int, direction: str, sender: str, in_reply_to: list[str], references: list[str], policy_config, now
) -> MessageContext:
    """Read the pair, the sender's standing and the policy counters in one transaction."""
    connection = session.connection()
    party = PartyView(*connection.execute(_PARTY, {"pair_id": pair_id}).one())
    pair = PairRef(id=party.pair_id, buyer_id=party.buyer_id, seller_id=party.seller_id)

    seller_to_buyer = direction == "seller_to_buyer"
    sender_side = "seller" if seller_to_buyer else "buyer"
    states = {}
    addresses: list[str] = []
    if seller_to_buyer:
        rows = connection.execute(_SENDER_STATES, {"sender": sender})
        states = {seller_id: state for seller_id, state in rows}
        approved = connection.execute(_APPROVED_SENDERS, {"seller_id": party.seller_id}).scalars()
        addresses = sorted(set(approved) | {party.support_email.lower()})

    order_ids = list(connection.execute(_RECENT_ORDER_IDS, {"buyer_id": pair.buyer_id, "seller_id": pair.seller_id}).scalars())
    return MessageContext(
        party=party,
        sender_states=states,
        facts=_policy_facts(connection, pair, direction, in_reply_to + references, policy_config, now),
        order_ids=order_ids,
        seller_addresses=addresses,
        in_reply_to=_map_ids(connection, pair.id, sender_side, in_reply_to),
        references=_map_ids(connection, pair.id, sender_side, references),
    )


def _policy_facts(connection, pair: PairRef, direction: str, named_ids: list[str], policy_config, now) -> PolicyFacts:
    from . import policy

    automatic_passed = connection.execute(
        _AUTOMATIC_PASSED,
        {"pair_id": pair.id, "direction": direction, "since": now - timedelta(seconds=policy_config.automatic_window_s)},
    ).scalar()
    if direction != "seller_to_buyer":
        # Only the automatic-message cap applies to buyer-to-seller mail.
        return PolicyFacts(False, False, 0, 0, bool(automatic_passed))

    thread_reply = bool(named_ids) and bool(
        connection.execute(_BUYER_THREAD_IDS_NAMED, {"pair_id": pair.id, "ids": named_ids}).scalar()
    )
    has_recent_order = bool(
        connection.execute(
            _PAIR_ORDERS_SINCE,
            {
                "buyer_id": pair.buyer_id,
                "seller_id": pair.seller_id,
                "since": now - timedelta(days=policy_config.critical_order_days),
            },
        ).scalar()
    )
    sent_today = connection.execute(
        _SELLER_SENT_SINCE,
        {"seller_id": pair.seller_id, "since": policy.day_start(now, policy_config.timezone)},
    ).scalar()
    orders_recent = connection.execute(
        _SELLER_ORDERS_SINCE,
        {"seller_id": pair.seller_id, "since": now - timedelta(days=policy_config.order_window_days)},
    ).scalar()
    return PolicyFacts(
        thread_reply=thread_reply,
        has_recent_order=has_recent_order,
        sent_today=int(sent_today or 0),
        orders_last_30_days=int(orders_recent or 0),
        automatic_passed_recently=bool(automatic_passed),
    )


def _map_ids(connection, pair_id: int, sender_side: str, ids: list[str]) -> list[str]:
    """Map Message-IDs named by the sender to the ids under which the recipient received them.

    `sender_side` is "buyer" or "seller". An id the relay issued for the other
    side's message becomes that message's original id; an original id of the
    sender's own message becomes the relay id the recipient received; a relay
    id of the sender's own side is kept. Unknown ids are dropped; order is kept.
    """
    if not ids:
        return []
    by_relay = {row.relay_id: row for row in connection.execute(_THREAD_IDS_BY_RELAY, {"pair_id": pair_id, "ids": ids})}
    by_original = {
        row.original_id: row
        for row in connection.execute(_THREAD_IDS_BY_ORIGINAL, {"pair_id": pair_id, "origin": sender_side, "ids": ids})
    }
    mapped: list[str] = []
    for msgid in ids:
        known = None
        row = by_relay.get(msgid)
        if row is not None:
            known = row.relay_id if row.origin == sender_side else (row.original_id or None)
        elif msgid in by_original:
            known = by_original[msgid].relay_id
        if known and known not in mapped:
            mapped.append(known)
    return mapped


def save_accepted(session: Session, message, thread_id=None, recipients=(), notice=None, claim=None) -> list[int]:
    """Insert an archived message with its thread id and delivery rows; return the delivery row ids.

    `message`, `thread_id` and the notice's message are new ORM objects; their
    column values are inserted with Core statements (cheaper than a flush) and
    `message.id` is set. `recipients` are (recipient, envelope sender) pairs.
    `notice`, when given, is a (Message, recipient) pair for a notice about
    this message, sent with the null sender. `claim`, a (node, claimed_until)
    pair, inserts the recipients' rows already claimed by that queue manager,
    which then delivers them without a claim transaction.
    """
    connection = session.connection()
    message_id = insert_new(connection, message)
    if thread_id is not None:
        thread_id.message_id = message_id
        insert_new(connection, thread_id)

    claimed_by, claimed_until = claim or (None, None)
    delivery_ids = [
        _insert_delivery(connection, message_id, recipient, sender, message.received_at, claimed_by, claimed_until)
        for recipient, sender in recipients
    ]

    if notice is not None:
        notice_row, notice_recipient = notice
        notice_row.parent_id = message_id
        notice_id = insert_new(connection, notice_row)
        _insert_delivery(connection, notice_id, notice_recipient, "", message.received_at, None, None)
    return delivery_ids


def insert_new(connection, row) -> int:
    """Insert the column values set on a new ORM object with a Core INSERT; set and return its id.

    Columns left unset get their column defaults, as in a flush. The object
    stays outside any session.
    """
    table = row.__table__
    values = {column.key: row.__dict__[column.key] for column in table.columns if column.key in row.__dict__}
    new_id = connection.execute(_INSERTS[table.name], values).inserted_primary_key[0]
    row.id = new_id
    return new_id


def _insert_delivery(connection, message_id, recipient, sender, due_at, claimed_by, claimed_until) -> int:
    values = {
        "message_id": message_id,
        "recipient": recipient,
        "envelope_sender": sender,
        "next_attempt_at": due_at,
        "claimed_by": claimed_by,
        "claimed_until": claimed_until,
    }
    return connection.execute(_INSERTS["deliveries"], values).inserted_primary_key[0]


# --- statements of the mail path, built once --------------------------------
#
# Building a statement costs more Python time than running it on SQLite, so
# the units above run these prebuilt ones with bound parameters, on the Core
# connection (no ORM identity map or flush).

_PAIR_BY_ALIAS = select(Pair.id, Pair.buyer_id, Pair.seller_id, Pair.buyer_alias).where(
    or_(Pair.buyer_alias == bindparam("alias"), Pair.seller_alias == bindparam("alias"))
)
_PARTY = (
    select(
        Pair.id, Pair.buyer_alias, Pair.seller_alias, Pair.buyer_id, Pair.seller_id,
        Buyer.email, Buyer.name, Buyer.locale, Buyer.opted_out,
        Seller.business_name, Seller.support_email, Seller.locale, Seller.block_notice,
    )
    .join(Buyer, Buyer.id == Pair.buyer_id)
    .join(Seller, Seller.id == Pair.seller_id)
    .where(Pair.id == bindparam("pair_id"))
)
_SENDER_STATES = select(SellerSender.seller_id, SellerSender.state).where(SellerSender.address == bindparam("sender"))
_APPROVED_SENDERS = select(SellerSender.address).where(
    SellerSender.seller_id == bindparam("seller_id"), SellerSender.state == SenderState.APPROVED.value
)
_RECENT_ORDER_IDS = (
    select(Order.id)
    .where(Order.buyer_id == bindparam("buyer_id"), Order.seller_id == bindparam("seller_id"))
    .order_by(Order.placed_at.desc(), Order.id.desc())
    .limit(5)
)
_AUTOMATIC_PASSED = (
    select(func.count())
    .select_from(Message)
    .where(
        Message.pair_id == bindparam("pair_id"),
        Message.direction == bindparam("direction"),
        Message.automatic == true(),  # "= 1" on SQLite, which matches the partial index
        Message.status.in_(COUNTED_STATUSES),
        Message.received_at >= bindparam("since"),
    )
)
_BUYER_THREAD_IDS_NAMED = (
    select(func.count())
    .select_from(ThreadId)
    .where(
        ThreadId.pair_id == bindparam("pair_id"),
        ThreadId.origin == "buyer",
        ThreadId.relay_id.in_(bindparam("ids", expanding=True)),
    )
)
_PAIR_ORDERS_SINCE = (
    select(func.count())
    .select_from(Order)
    .where(
        Order.buyer_id == bindparam("buyer_id"),
        Order.seller_id == bindparam("seller_id"),
        Order.placed_at >= bindparam("since"),
    )
)
_SELLER_SENT_SINCE = (
    select(func.count())
    .select_from(Message)
    .where(
        Message.seller_id == bindparam("seller_id"),
        Message.direction == "seller_to_buyer",
        Message.status.in_(COUNTED_STATUSES),
        Message.received_at >= bindparam("since"),
    )
)
_SELLER_ORDERS_SINCE = (
    select(func.count())
    .select_from(Order)
    .where(Order.seller_id == bindparam("seller_id"), Order.placed_at >= bindparam("since"))
)
_THREAD_ID_COLUMNS = (ThreadId.relay_id, ThreadId.original_id, ThreadId.origin)
_THREAD_IDS_BY_RELAY = select(*_THREAD_ID_COLUMNS).where(
    ThreadId.pair_id == bindparam("pair_id"), ThreadId.relay_id.in_(bindparam("ids", expanding=True))
)
_THREAD_IDS_BY_ORIGINAL = select(*_THREAD_ID_COLUMNS).where(
    ThreadId.pair_id == bindparam("pair_id"),
    ThreadId.origin == bindparam("origin"),
    ThreadId.original_id.in_(bindparam("ids", expanding=True)),
)
_INSERTS = {table.name: insert(table) for table in (Message.__table__, Delivery.__table__, ThreadId.__table__)}
