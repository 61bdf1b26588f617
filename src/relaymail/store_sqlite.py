"""Units of work on SQLite: reads on the event loop, writes with group commit.

`Store.run` hands SQLite units here. A unit is a synchronous function of a
`Session` that runs a few statements and returns plain data.

- A read unit runs at once on the calling thread (the event loop). In WAL
  mode a reader does not wait for a writer, and an indexed query takes
  microseconds, so a hand-off to a thread would cost more than the query.
  NOTE: a reader does wait while another connection recovers the WAL after
  a crash, and the event loop then waits with it, up to the busy timeout.
- A write unit joins a batch. One task runs the batch: it opens the write
  transaction (`BEGIN IMMEDIATE`) and later commits it on a helper thread,
  because those two steps can wait for another process or for the disk. It
  runs the units' statements on the event loop and commits them together.
  If a unit raises, the batch is rolled back and run again with one
  savepoint per unit, so only that unit is rolled back and its caller gets
  the exception.

The commit is durable (`synchronous=FULL`) before any caller of the batch
resumes, so one fsync covers every message of the batch. Units that arrive
while a batch commits wait for the next batch. On a quiet relay a batch
contains one unit; under load it contains many.

Keeping the statements on the event loop matters in CPython: a helper thread
that runs Python code competes for the GIL with the event loop. The helper
thread here only waits inside SQLite, with the GIL released.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

from sqlalchemy import create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from .log import fields

T = TypeVar("T")

log = logging.getLogger(__name__)

# Upper bound on the units of one write transaction, so one batch cannot
# hold the writer lock for long.
MAX_BATCH_UNITS = 64


class SqliteUnits:
    """The runner of the units of work of one SQLite database (see the module docstring)."""

    def __init__(self, url, write_lock: asyncio.Lock, pragmas: Callable):
        self._write_lock = write_lock
        self._read_engine = _sync_engine(url, pragmas, explicit_begin=False)
        self._write_engine = _sync_engine(url, pragmas, explicit_begin=True)
        self._read_view: ReadView | None = None
        self._write_sessions = sessionmaker(self._write_engine, expire_on_commit=False)
        self._helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relaymail-db-commit")
        self._pending: list[tuple[Callable[[Session], object], asyncio.Future]] = []
        self._batcher: asyncio.Task | None = None

    def read(self, unit: Callable[[Session], T]) -> T:
        """Run a read unit now, on this thread, on the reading connection."""
        if self._read_view is None:
            connection = self._read_engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            self._read_view = ReadView(connection)
        try:
            result = unit(self._read_view)
        except Exception:
            # Start over with a new connection, in case the error left this one unusable.
            self._read_view.close()
            self._read_view = None
            raise
        self._read_view.finish()
        return result

    async def write(self, unit: Callable[[Session], T]) -> T:
        """Run a write unit in the next batch; return its result once the batch is committed."""
        future = asyncio.get_running_loop().create_future()
        self._pending.append((unit, future))
        if self._batcher is None:
            self._batcher = asyncio.create_task(self._run_batches(), name="relaymail-db-batches")
        return await future

    async def close(self) -> None:
        """Wait for the batches in progress, then close the engines and the helper thread."""
        if self._batcher is not None:
            await asyncio.shield(self._batcher)
        self._helper.shutdown(wait=True)
        if self._read_view is not None:
            self._read_view.close()
        self._read_engine.dispose()
        self._write_engine.dispose()

    async def _run_batches(self) -> None:
        try:
            while self._pending:
                batch = self._pending[:MAX_BATCH_UNITS]
                del self._pending[:MAX_BATCH_UNITS]
                await self._run_batch(batch)
        finally:
            self._batcher = None

    async def _run_batch(self, batch: list[tuple[Callable[[Session], object], asyncio.Future]]) -> None:
        live = [(unit, future) for unit, future in batch if not future.cancelled()]
        async with self._write_lock:
            try:
                try:
                    outcomes = await self._commit(live, savepoints=False)
                except _UnitFailed:
                    # Rare: run the batch again with one savepoint per unit, so
                    # only the failing unit is rolled back.
                    outcomes = await self._commit(live, savepoints=True)
            except Exception as exc:  # noqa: BLE001 - every caller of the batch gets the error
                log.warning(fields(event="write_batch_failed", units=len(live), error=type(exc).__name__))
                outcomes = [(future, exc, None) for _unit, future in live]
            except asyncio.CancelledError:
                for _unit, future in live:
                    future.cancel()
                raise

        for future, error, value in outcomes:
            if future.done():
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(value)

    async def _commit(self, batch, savepoints: bool) -> list[tuple[asyncio.Future, BaseException | None, object]]:
        """Run the units in one transaction and commit it; return (future, error, value) per unit.

        Without `savepoints`, the first unit that raises rolls the whole
        transaction back and raises _UnitFailed, and the caller retries.
        """
        loop = asyncio.get_running_loop()
        session = self._write_sessions()
        try:
            # BEGIN IMMEDIATE takes SQLite's write lock, which another
            # process (the CLI) may hold for a moment.
            await loop.run_in_executor(self._helper, session.connection)

            outcomes = []
            for unit, future in batch:
                if savepoints:
                    outcomes.append(_run_in_savepoint(session, unit, future))
                    continue
                try:
                    outcomes.append((future, None, unit(session)))
                except Exception as exc:  # noqa: BLE001 - retried unit by unit
                    raise _UnitFailed() from exc

            await loop.run_in_executor(self._helper, session.commit)
            return outcomes
        finally:
            session.close()


class ReadView:
    """A stand-in for the Session of a read unit, on one long-lived connection.

    `connection()` returns that connection, in autocommit mode, so each
    statement reads the latest commit and no transaction stays open between
    units. Any other Session attribute comes from a real Session on the same
    connection, created on first use and closed by `finish()`. The mail
    path's read units use only `connection()`, because creating and closing
    a Session per unit cost more than the unit's queries.
    """

    def __init__(self, connection):
        self._connection = connection
        self._session: Session | None = None

    def connection(self):
        return self._connection

    def __getattr__(self, name: str):
        if self._session is None:
            self._session = Session(bind=self._connection, expire_on_commit=False)
        return getattr(self._session, name)

    def finish(self) -> None:
        """Close the Session that a unit used, if any."""
        if self._session is not None:
            session, self._session = self._session, None
            session.close()

    def close(self) -> None:
        self.finish()
        self._connection.close()


class _UnitFailed(Exception):
    """A unit of a batch without savepoints raised; the batch is rolled back."""


def _run_in_savepoint(session: Session, unit: Callable[[Session], object], future: asyncio.Future):
    """Run one unit inside a savepoint; return (future, error, value)."""
    try:
        with session.begin_nested():
            value = unit(session)
    except Exception as exc:  # noqa: BLE001 - the unit's caller gets its own error
        return future, exc, None
    return future, None, value


def ensure_wal_mode(path, timeout_s: float = 30.0) -> None:
    """Switch the SQLite file at `path` to WAL mode, waiting while other connections write.

    WAL mode stays set in the file. SQLite returns "database is locked" at
    once, without its busy handler, when the mode cannot change because
    another connection is in a transaction, so this retries until
    `timeout_s` has passed.
    """
    deadline = time.monotonic() + timeout_s
    with contextlib.closing(sqlite3.connect(path, timeout=timeout_s)) as connection:
        if connection.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal":
            return
        while True:
            try:
                mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.02)
                continue
            if mode.lower() != "wal":
                log.warning(fields(event="journal_mode", path=str(path), mode=mode, status="WAL mode not available"))
            return


def _sync_engine(url, pragmas: Callable, explicit_begin: bool):
    """Create a pysqlite engine; with `explicit_begin`, transactions start with BEGIN IMMEDIATE.

    Python's sqlite3 module starts transactions implicitly and mishandles
    savepoints, so the write engine turns that off and emits BEGIN itself, as
    SQLAlchemy's documentation for pysqlite recommends.
    """
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, pool_size=4, max_overflow=4)
    event.listen(engine, "connect", functools.partial(_on_connect, pragmas=pragmas, explicit_begin=explicit_begin))
    if explicit_begin:
        event.listen(engine, "begin", _begin_immediate)
    return engine


def _on_connect(dbapi_connection, connection_record, pragmas: Callable, explicit_begin: bool) -> None:
    if explicit_begin:
        dbapi_connection.isolation_level = None
    pragmas(dbapi_connection, connection_record)


def _begin_immediate(connection) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")
