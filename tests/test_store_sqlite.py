"""The SQLite group commit (store_sqlite.SqliteUnits), on a real migrated SQLite file.

Write units that arrive together share one transaction. A unit that raises is
rolled back alone and its caller gets the exception, while the others are committed.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading

import pytest
from sqlalchemy import select, text

from relaymail import store_sqlite
from relaymail.models import Seller


def _insert_seller(seller_id: str):
    def unit(session):
        session.execute(
            text(
                "INSERT INTO sellers (id, business_name, support_email, locale, block_notice, created_at) "
                "VALUES (:id, 'Shop', 'help@shop.example', 'es-MX', 1, '2026-01-01 00:00:00')"
            ),
            {"id": seller_id},
        )
        return seller_id

    return unit


def _failing_unit(session):
    session.execute(text("INSERT INTO sellers (id) VALUES (NULL)"))
    raise AssertionError("not reached: the insert above violates NOT NULL")


def _seller_ids(path: str) -> list[str]:
    with sqlite3.connect(path) as db:
        return sorted(row[0] for row in db.execute("SELECT id FROM sellers"))


def _database_path(store) -> str:
    return store.url.split("///", 1)[1]


async def test_concurrent_units_share_commit(store, monkeypatch):
    commits = []
    original = store_sqlite.SqliteUnits._commit

    async def counting_commit(self, batch, savepoints):
        commits.append((len(batch), savepoints))
        return await original(self, batch, savepoints)

    monkeypatch.setattr(store_sqlite.SqliteUnits, "_commit", counting_commit)

    results = await asyncio.gather(*(store.run(_insert_seller(f"s{n}"), write=True) for n in range(10)))

    assert results == [f"s{n}" for n in range(10)]
    assert _seller_ids(_database_path(store)) == sorted(f"s{n}" for n in range(10))
    assert sum(size for size, _ in commits) == 10
    assert len(commits) < 10, commits


async def test_failing_unit_rolled_back_alone(store):
    units = [_insert_seller("before"), _failing_unit, _insert_seller("after")]

    results = await asyncio.gather(*(store.run(unit, write=True) for unit in units), return_exceptions=True)

    assert results[0] == "before"
    assert results[2] == "after"
    assert not isinstance(results[1], AssertionError), "the unit should fail on the insert, not after it"
    assert isinstance(results[1], Exception)
    assert _seller_ids(_database_path(store)) == ["after", "before"]


async def test_read_unit_sees_committed_write(store):
    await store.run(_insert_seller("visible"), write=True)

    count = store._units.read(lambda session: session.execute(text("SELECT count(*) FROM sellers")).scalar())

    assert count == 1


async def test_cancelled_caller_keeps_batch(store):
    first = asyncio.ensure_future(store.run(_insert_seller("kept"), write=True))
    second = asyncio.ensure_future(store.run(_insert_seller("cancelled"), write=True))
    await asyncio.sleep(0)
    second.cancel()

    assert await first == "kept"
    with pytest.raises(asyncio.CancelledError):
        await second
    assert "kept" in _seller_ids(_database_path(store))


async def test_batch_waits_for_locked_database(store):
    path = _database_path(store)
    await store.run(_insert_seller("first"), write=True)  # the relay's first connection turns on WAL mode
    other = sqlite3.connect(path, timeout=30, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    pending = asyncio.ensure_future(store.run(_insert_seller("waited"), write=True))

    # The event loop keeps running while the helper thread waits for the lock.
    await asyncio.sleep(0.3)
    assert not pending.done()
    other.execute("COMMIT")
    other.close()

    assert await asyncio.wait_for(pending, 10) == "waited"


async def test_read_unit_can_use_orm(store):
    await store.run(_insert_seller("orm"), write=True)

    seller = await store.run(lambda session: session.scalar(select(Seller).where(Seller.id == "orm")))

    assert isinstance(seller, Seller)
    assert seller.business_name == "Shop"


async def test_failed_read_unit_leaves_reader_usable(store):
    with pytest.raises(Exception):
        await store.run(lambda session: session.connection().execute(text("SELECT * FROM no_such_table")))

    count = await store.run(lambda session: session.connection().execute(text("SELECT count(*) FROM sellers")).scalar())

    assert count == 0


def test_ensure_wal_mode_waits_for_writer(tmp_path):
    path = tmp_path / "rollback.sqlite3"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("CREATE TABLE t (x INTEGER)")
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO t VALUES (1)")
    timer = threading.Timer(0.3, lambda: other.execute("COMMIT"))
    timer.start()

    store_sqlite.ensure_wal_mode(path, timeout_s=10)

    timer.join()
    other.close()
    with sqlite3.connect(path) as check:
        assert check.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_db_upgrade_leaves_wal_mode(migrated_db):
    path = migrated_db.database.url.split("///", 1)[1]

    with sqlite3.connect(path) as check:
        mode = check.execute("PRAGMA journal_mode").fetchone()[0]

    assert mode == "wal"
