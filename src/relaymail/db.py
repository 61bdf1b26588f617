"""Schema migrations: Alembic driven from Python, without an alembic.ini.

The migration scripts live in `relaymail/migrations` (installed with the
package). Every function here takes the SQLAlchemy async URL from the relaymail
configuration (`database.url`), opens its own engine, and closes it before
returning. They are coroutines, so the CLI runs them with `asyncio.run` and
async code awaits them; Alembic itself runs inside `AsyncConnection.run_sync`.

    upgrade(url)            apply every pending migration; return the revisions before and after
    downgrade(url, rev)     revert migrations down to `rev` ("base": no tables)
    current_revision(url)   return the revision the database is at, or None
    head_revision()         return the newest revision shipped with this package
    require_head(engine)    raise StoreError unless the database is at the head revision
    write_revision(...)     write a new migration script (for developers, in a source checkout)

On SQLite, migrations run on a connection without `PRAGMA foreign_keys=ON`.
Batch mode rebuilds a table by copying it and dropping the old one. With
foreign keys on, SQLite runs an implicit DELETE FROM before DROP TABLE, which
fires the ON DELETE CASCADE actions of the tables that refer to it (SQLite's
DROP TABLE documentation). `upgrade` creates the directory of a SQLite file
if needed; the other functions never create a database.

Raises StoreError for a database at an unknown or older revision; errors from
an unreachable database (SQLAlchemy's DBAPIError, OSError) propagate.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from .errors import StoreError
from .store_sqlite import ensure_wal_mode

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


@dataclass(frozen=True)
class UpgradeResult:
    """The database revision before and after an upgrade (None: no schema)."""

    previous: str | None
    current: str | None


def alembic_config(url: str | None = None) -> AlembicConfig:
    """Return an Alembic configuration for relaymail's migrations.

    The URL goes into `attributes`, not into the ini options, because
    ConfigParser would treat a `%` in a password as interpolation.
    """
    # quiet: Alembic would print "Generating ..." to stdout, mixed into the CLI's output.
    cfg = AlembicConfig(cmd_opts=argparse.Namespace(quiet=True))
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("path_separator", "os")
    if url is not None:
        cfg.attributes["url"] = url
    return cfg


def head_revision() -> str:
    """Return the newest revision shipped with this package."""
    script = ScriptDirectory.from_config(alembic_config())
    heads = script.get_heads()
    if len(heads) != 1:
        raise StoreError(f"relaymail migrations have {len(heads)} heads, expected 1: {heads}")
    return heads[0]


def sqlite_path(url: str) -> Path | None:
    """Return the file of a SQLite URL, or None for other databases and :memory:."""
    parsed = make_url(url)
    if not parsed.drivername.startswith("sqlite"):
        return None
    if not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def safe_url(url: str) -> str:
    """Return the URL with any password masked, for messages."""
    return make_url(url).render_as_string(hide_password=True)


def _engine(url: str) -> AsyncEngine:
    # NullPool: each call is short and must leave no connection open behind it.
    return create_async_engine(url, poolclass=NullPool)


def _heads(connection: Connection) -> str | None:
    heads = MigrationContext.configure(connection).get_current_heads()
    return ",".join(heads) if heads else None


async def current_revision(url: str) -> str | None:
    """Return the revision the database is at, or None if it has no relaymail schema.

    A SQLite file that does not exist counts as no schema and is not created.
    """
    path = sqlite_path(url)
    if path is not None and not path.exists():
        return None

    engine = _engine(url)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(_heads)
    finally:
        await engine.dispose()


async def upgrade(url: str, revision: str = "head") -> UpgradeResult:
    """Apply the migrations up to `revision` (default: the newest) in one transaction.

    On PostgreSQL the DDL is transactional, so a failed upgrade leaves the
    database at its previous revision. On SQLite each DDL statement commits
    on its own, so a failure there can leave part of one migration applied.
    """
    path = sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    result = await _migrate(url, command.upgrade, revision)
    if path is not None:
        # The relay's connections expect WAL mode; setting it here, while
        # nothing else uses the file, avoids a race between them.
        ensure_wal_mode(path)
    return result


async def downgrade(url: str, revision: str) -> UpgradeResult:
    """Revert the migrations down to `revision` ("base" removes every table)."""
    return await _migrate(url, command.downgrade, revision)


async def _migrate(
    url: str, alembic_command: Callable[[AlembicConfig, str], None], revision: str
) -> UpgradeResult:
    cfg = alembic_config(url)

    def run(connection: Connection) -> UpgradeResult:
        previous = _heads(connection)
        cfg.attributes["connection"] = connection
        alembic_command(cfg, revision)
        return UpgradeResult(previous=previous, current=_heads(connection))

    engine = _engine(url)
    try:
        async with engine.begin() as connection:
            return await connection.run_sync(run)
    finally:
        await engine.dispose()


async def require_head(engine: AsyncEngine) -> None:
    """Raise StoreError unless the database behind `engine` is at the head revision."""
    async with engine.connect() as connection:
        current = await connection.run_sync(_heads)

    expected = head_revision()
    if current == expected:
        return

    database = safe_url(str(engine.url))
    if current is None:
        raise StoreError(f"database {database} has no relaymail schema: run `relaymail db upgrade`")
    if current not in _known_revisions():
        raise StoreError(
            f"database {database} is at revision {current}, which this relaymail version "
            f"does not know (its newest is {expected}): install the relaymail version that "
            "migrated it, or a newer one"
        )
    raise StoreError(
        f"database {database} is at revision {current}, this relaymail expects {expected}: "
        "run `relaymail db upgrade`"
    )


def _known_revisions() -> set[str]:
    script = ScriptDirectory.from_config(alembic_config())
    return {script_revision.revision for script_revision in script.walk_revisions()}


async def write_revision(url: str, message: str, autogenerate: bool = True) -> Path:
    """Write a new migration script into the package's versions directory.

    With `autogenerate`, Alembic compares `models.Base.metadata` with the
    database at `url`, which must be at the head revision. The new revision id
    is the head's number plus one, zero-padded to four digits. Returns the path
    of the new script, which needs a review by hand before it is committed.
    """
    head = head_revision()
    if not head.isdigit():
        raise StoreError(
            f"head revision {head!r} is not a number, so the next revision id cannot be derived"
        )
    rev_id = f"{int(head) + 1:04d}"
    cfg = alembic_config(url)

    def run(connection: Connection) -> Path:
        cfg.attributes["connection"] = connection
        script = command.revision(cfg, message=message, autogenerate=autogenerate, rev_id=rev_id)
        return Path(script.path)

    engine = _engine(url)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(run)
    finally:
        await engine.dispose()
