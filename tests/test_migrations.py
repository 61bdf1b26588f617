"""Alembic migrations: the upgraded schema equals models.Base.metadata, on SQLite and PostgreSQL.

The PostgreSQL cases run only when RELAYMAIL_TEST_POSTGRES_URL is set (see conftest.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from relaymail import db
from relaymail.errors import StoreError
from relaymail.models import Base
from relaymail.store import Store

from conftest import run_coroutine, write_config


async def schema_differences(url: str) -> list:
    """Return Alembic's list of differences between the database and the models."""
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(
                lambda sync: compare_metadata(
                    MigrationContext.configure(sync, opts={"compare_type": True}), Base.metadata
                )
            )
    finally:
        await engine.dispose()


async def table_names(url: str) -> set[str]:
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            return set(await connection.run_sync(lambda sync: inspect(sync).get_table_names()))
    finally:
        await engine.dispose()


# --- the scripts -----------------------------------------------------------


def test_scripts_form_one_linear_history():
    script = ScriptDirectory.from_config(db.alembic_config())
    revisions = list(script.walk_revisions())

    assert script.get_heads() == [db.head_revision()]
    assert revisions[-1].revision == "0001"
    assert revisions[-1].down_revision is None
    for newer, older in zip(revisions, revisions[1:]):
        assert newer.down_revision == older.revision


def test_scripts_ship_with_package():
    versions = db.MIGRATIONS_DIR / "versions"

    assert (db.MIGRATIONS_DIR / "env.py").is_file()
    assert (db.MIGRATIONS_DIR / "script.py.mako").is_file()
    assert (versions / "0001_initial.py").is_file()


# --- upgrade and downgrade, on SQLite and PostgreSQL -------------------------


async def test_upgrade_matches_models(database_url):
    result = await db.upgrade(database_url)

    assert result.previous is None
    assert result.current == db.head_revision()
    assert await schema_differences(database_url) == []


async def test_comparison_detects_missing_index(database_url):
    # The check above must be able to fail: drop one index and expect a difference.
    await db.upgrade(database_url)
    engine = create_async_engine(database_url, poolclass=NullPool)
    async with engine.begin() as connection:
        await connection.execute(text("DROP INDEX ix_buyers_email"))
    await engine.dispose()

    differences = await schema_differences(database_url)

    assert [d[0] for d in differences] == ["add_index"]
    assert differences[0][1].name == "ix_buyers_email"


async def test_upgrade_twice_is_noop(database_url):
    await db.upgrade(database_url)

    result = await db.upgrade(database_url)

    assert result.previous == db.head_revision()
    assert result.current == db.head_revision()


async def test_current_revision_before_and_after(database_url):
    assert await db.current_revision(database_url) is None

    await db.upgrade(database_url)

    assert await db.current_revision(database_url) == db.head_revision()


async def test_downgrade_to_base_and_back(database_url):
    await db.upgrade(database_url)

    result = await db.downgrade(database_url, "base")

    assert result.current is None
    assert await table_names(database_url) == {"alembic_version"}

    await db.upgrade(database_url)
    assert await schema_differences(database_url) == []


async def test_require_head_rejects_empty_database(database_url):
    store = Store(database_url)
    try:
        with pytest.raises(StoreError, match="has no relaymail schema: run `relaymail db upgrade`"):
            await db.require_head(store.engine)

        await db.upgrade(database_url)
        await db.require_head(store.engine)
    finally:
        await store.close()


async def test_require_head_rejects_unknown_revision(database_url):
    await db.upgrade(database_url)
    engine = create_async_engine(database_url, poolclass=NullPool)
    async with engine.begin() as connection:
        await connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))

    try:
        with pytest.raises(StoreError, match="at revision 9999, which this relaymail version does not know"):
            await db.require_head(engine)
    finally:
        await engine.dispose()


async def test_write_revision_finds_no_changes(tmp_path, monkeypatch):
    # Work on a copy of the scripts, so the package's versions directory stays untouched.
    scripts = tmp_path / "migrations"
    shutil.copytree(db.MIGRATIONS_DIR, scripts, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(db, "MIGRATIONS_DIR", scripts)
    url = f"sqlite+aiosqlite:///{tmp_path / 'relay.sqlite3'}"
    await db.upgrade(url)

    head = db.head_revision()
    path = await db.write_revision(url, "nothing changed")

    source = path.read_text()
    assert path.parent == scripts / "versions"
    following = f"{int(head) + 1:04d}"
    assert path.name == f"{following}_nothing_changed.py"
    assert f"revision: str = '{following}'" in source
    assert f"down_revision: str | None = '{head}'" in source
    assert "op." not in source


def test_alembic_api_with_url(tmp_path):
    # Alembic's own API, without a connection from relaymail.db: env.py opens its own engine.
    url = f"sqlite+aiosqlite:///{tmp_path / 'relay.sqlite3'}"

    command.upgrade(db.alembic_config(url), "head")

    assert run_coroutine(lambda: db.current_revision(url)) == db.head_revision()


def test_alembic_api_with_config_file(migrated_db, config_file, monkeypatch):
    monkeypatch.setenv("RELAYMAIL_CONFIG", str(config_file))
    url = migrated_db.database.url

    command.downgrade(db.alembic_config(), "base")

    assert run_coroutine(lambda: db.current_revision(url)) is None


# --- SQLite files -----------------------------------------------------------


async def test_current_revision_leaves_missing_file_alone(tmp_path):
    path = tmp_path / "absent.sqlite3"

    assert await db.current_revision(f"sqlite+aiosqlite:///{path}") is None
    assert not path.exists()


async def test_upgrade_creates_sqlite_directory(tmp_path):
    path = tmp_path / "var" / "lib" / "relay.sqlite3"

    await db.upgrade(f"sqlite+aiosqlite:///{path}")

    assert path.is_file()


def test_sqlite_path_of_urls(tmp_path):
    assert db.sqlite_path(f"sqlite+aiosqlite:///{tmp_path}/a.db") == tmp_path / "a.db"
    assert db.sqlite_path("sqlite+aiosqlite:///:memory:") is None
    assert db.sqlite_path("postgresql+asyncpg://u@127.0.0.1/x") is None


def test_safe_url_hides_password():
    shown = db.safe_url("postgresql+asyncpg://relay:s3cr%40t@127.0.0.1:5432/relay")

    assert "s3cr" not in shown
    assert shown == "postgresql+asyncpg://relay:***@127.0.0.1:5432/relay"


# --- the db commands ---------------------------------------------------------


def test_db_current_then_upgrade_cli(cli):
    before = cli("db", "current", "--json")
    upgraded = cli("db", "upgrade", "--json")
    after = cli("db", "current", "--json")

    assert before.rc == 0, before.stderr
    head = db.head_revision()
    assert before.json() == {"current": None, "head": head, "up_to_date": False}
    assert upgraded.rc == 0, upgraded.stderr
    assert upgraded.json() == {"previous": None, "current": head}
    assert "Running upgrade  -> 0001" in upgraded.stderr
    assert after.json() == {"current": head, "head": head, "up_to_date": True}


def test_db_upgrade_human_output(cli, config_file):
    result = cli("db", "upgrade", "--config", str(config_file), config=None)

    assert result.rc == 0, result.stderr
    assert result.stdout.splitlines() == ["previous=", f"current={db.head_revision()}"]


def test_db_upgrade_cli_on_postgres(cli, tmp_path, postgres_url):
    config = write_config(tmp_path / "pg.toml", database_url=postgres_url)

    upgraded = cli("db", "upgrade", "--json", config=config)
    current = cli("db", "current", "--json", config=config)

    assert upgraded.rc == 0, upgraded.stderr
    assert upgraded.json()["current"] == db.head_revision()
    assert current.json()["up_to_date"] is True


def test_command_on_unmigrated_database_fails(cli, config_file):
    database = Path(config_file).parent / "relay.sqlite3"
    database.touch()

    result = cli("buyer", "opt-out", "b1")

    assert result.rc == 1
    assert "has no relaymail schema: run `relaymail db upgrade`" in result.stderr
    assert "Traceback" not in result.stderr


def test_command_on_missing_database_file_fails(cli, config_file):
    database = Path(config_file).parent / "relay.sqlite3"

    result = cli("buyer", "opt-out", "b1")

    assert result.rc == 1
    assert f"database file {database} not found" in result.stderr
    assert not database.exists()


def test_unreachable_database_reports_error(cli, tmp_path):
    # Port 1 on the loopback interface: nothing listens there, so the connection is refused.
    config = write_config(
        tmp_path / "down.toml", database_url="postgresql+asyncpg://relay:pw@127.0.0.1:1/relay"
    )

    result = cli("db", "current", config=config)

    assert result.rc == 1
    assert result.stderr.startswith("relaymail: error: cannot connect to database ")
    assert "relay:***@127.0.0.1:1/relay" in result.stderr
    assert "pw@" not in result.stderr
    assert "Traceback" not in result.stderr
