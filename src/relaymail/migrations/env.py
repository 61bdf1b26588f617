"""Alembic environment for relaymail's schema.

Alembic runs this file for every command. Two ways in:

- `relaymail.db` (what `relaymail db upgrade` uses) opens an async engine,
  enters `AsyncConnection.run_sync` and passes the resulting synchronous
  connection as `config.attributes["connection"]`. The migration runs on it,
  inside the caller's transaction.
- Any other caller (the `alembic` API without a connection) passes the database
  URL as `config.attributes["url"]`, or a relaymail configuration file through
  RELAYMAIL_CONFIG. This file then opens its own async engine and runs the
  migration in a new event loop, so it must not be called from inside one.

The URL is a relaymail one, `sqlite+aiosqlite://` or `postgresql+asyncpg://`.
On SQLite, migrations use batch mode (`render_as_batch`) because SQLite's
ALTER TABLE cannot change or drop most columns and constraints.

Offline mode (`--sql`) is not supported: it raises RuntimeError.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from relaymail import config as relaymail_config
from relaymail.models import Base

target_metadata = Base.metadata


def run_migrations(connection: Connection) -> None:
    """Run the pending migrations on a synchronous connection."""
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_migrations_with_new_engine(url: str) -> None:
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(run_migrations)
    finally:
        await engine.dispose()


def database_url() -> str:
    """Return the URL from the Alembic attributes, else from RELAYMAIL_CONFIG."""
    url = context.config.attributes.get("url")
    if url:
        return url
    path = relaymail_config.resolve_path(None)
    return relaymail_config.load(path).database.url


def main() -> None:
    if context.is_offline_mode():
        raise RuntimeError("relaymail migrations do not support offline mode (--sql)")

    connection = context.config.attributes.get("connection")
    if connection is not None:
        run_migrations(connection)
    else:
        asyncio.run(run_migrations_with_new_engine(database_url()))


main()
