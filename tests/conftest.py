"""Shared fixtures: configuration files, migrated databases, the CLI in a subprocess, PostgreSQL.

    shared_dir      the project's shared/ directory beside the repository (skips if absent)
    config_file     a valid relaymail.toml in tmp_path: SQLite file and Maildir in tmp_path,
                    SMTP on 127.0.0.1 and a free port
    migrated_db     the Config of `config_file`, with its database upgraded to the newest revision
    store           an open Store on `migrated_db`, closed afterwards
    cli             run `python -m relaymail ARGS...` with RELAYMAIL_CONFIG set to `config_file`;
                    returns CliResult(rc, stdout, stderr)
    cli_main        the same through relaymail.cli.main in this process (no interpreter
                    start, so about ten times faster); use `cli` where the process matters
    postgres_url    a fresh, empty PostgreSQL database, dropped afterwards; skips unless
                    RELAYMAIL_TEST_POSTGRES_URL is set
    database_url    parametrized: an empty SQLite file, then `postgres_url`

RELAYMAIL_TEST_POSTGRES_URL is an asyncpg URL of a database that this user may
connect to, for example postgresql+asyncpg://postgres@127.0.0.1:5432/test. The
user needs the CREATEDB privilege: each test gets its own database, created and
dropped through that URL. Tests that use PostgreSQL get the `postgres` mark.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import json
import logging
import os
import secrets
import socket
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator, NamedTuple, TypeVar
from unittest import mock

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from relaymail import cli as relaymail_cli
from relaymail import config as relaymail_config
from relaymail import db
from relaymail.store import Store

POSTGRES_ENV_VAR = "RELAYMAIL_TEST_POSTGRES_URL"
DOMAIN = "marketplace.example"
CLI_TIMEOUT_S = 60

T = TypeVar("T")


def run_coroutine(factory: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion in a new event loop on a worker thread.

    Sync fixtures use this so they also work for async tests, whose event loop
    is already set up on the main thread.
    """
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as executor:
        return executor.submit(lambda: asyncio.run(factory())).result()


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_config(path: Path, database_url: str | None = None, extra: str = "") -> Path:
    """Write a valid relaymail configuration to `path` and return `path`.

    The database is `relay.sqlite3` beside the file unless `database_url` is
    given; `extra` is appended verbatim (more sections).
    """
    url = database_url or "sqlite+aiosqlite:///relay.sqlite3"
    path.write_text(
        f"""\
[relay]
domain = "{DOMAIN}"
hostname = "mx.{DOMAIN}"
operators_address = "operators@ops.example"
bounce_secret = "{secrets.token_hex(16)}"

[smtp]
listen = "127.0.0.1:{free_port()}"

[database]
url = "{url}"

[delivery]
transport = "maildir"
maildir = "maildir"

[log]
level = "INFO"
{extra}""",
        encoding="utf-8",
    )
    return path


@pytest.fixture
def shared_dir() -> Path:
    path = Path(__file__).resolve().parents[2] / "shared"
    if not path.is_dir():
        pytest.skip(f"shared directory {path} not found")
    return path


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    return write_config(tmp_path / "relaymail.toml")


@pytest.fixture
def migrated_db(config_file: Path) -> relaymail_config.Config:
    config = relaymail_config.load(config_file)
    run_coroutine(lambda: db.upgrade(config.database.url))
    return config


@pytest.fixture
async def store(migrated_db: relaymail_config.Config):
    opened = Store(migrated_db.database.url)
    try:
        yield opened
    finally:
        await opened.close()


class CliResult(NamedTuple):
    rc: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        """Return stdout parsed as JSON."""
        return json.loads(self.stdout)


@pytest.fixture
def cli(config_file: Path) -> Callable[..., CliResult]:
    """Return a function that runs the relaymail CLI in a subprocess.

    `config` (default: `config_file`) is passed through RELAYMAIL_CONFIG;
    None leaves the variable unset. `env` adds environment variables.
    """

    def run(*args: str, config: Path | None = config_file, env: dict[str, str] | None = None) -> CliResult:
        environment = {k: v for k, v in os.environ.items() if k != relaymail_config.ENV_VAR}
        if config is not None:
            environment[relaymail_config.ENV_VAR] = str(config)
        environment.update(env or {})
        completed = subprocess.run(
            [sys.executable, "-m", "relaymail", *args],
            capture_output=True,
            text=True,
            env=environment,
            timeout=CLI_TIMEOUT_S,
        )
        return CliResult(completed.returncode, completed.stdout, completed.stderr)

    return run


@pytest.fixture
def cli_main(config_file: Path) -> Callable[..., CliResult]:
    """Return a function like the one of `cli` that calls relaymail.cli.main in this process.

    main() runs on a worker thread, so its asyncio.run never meets the event
    loop of an async test. The logging setup that main() changes is restored.
    """

    def run(*args: str, config: Path | None = config_file, env: dict[str, str] | None = None) -> CliResult:
        environment = {relaymail_config.ENV_VAR: str(config)} if config is not None else {}
        environment.update(env or {})
        stdout, stderr = io.StringIO(), io.StringIO()
        root = logging.getLogger()
        saved_handlers, saved_level = root.handlers[:], root.level
        alembic_logger = logging.getLogger("alembic")
        saved_alembic_level = alembic_logger.level

        try:
            with mock.patch.dict(os.environ, environment), redirect_stdout(stdout), redirect_stderr(stderr):
                if config is None:
                    os.environ.pop(relaymail_config.ENV_VAR, None)
                with concurrent.futures.ThreadPoolExecutor(max_workers=1) as executor:
                    rc = executor.submit(relaymail_cli.main, list(args)).result()
        finally:
            root.handlers[:] = saved_handlers
            root.setLevel(saved_level)
            alembic_logger.setLevel(saved_alembic_level)

        return CliResult(rc, stdout.getvalue(), stderr.getvalue())

    return run


async def _run_admin_statement(base_url: str, statement: str) -> None:
    # CREATE and DROP DATABASE cannot run inside a transaction.
    engine = create_async_engine(base_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            await connection.execute(text(statement))
    finally:
        await engine.dispose()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    base_url = os.environ.get(POSTGRES_ENV_VAR)
    if not base_url:
        pytest.skip(f"{POSTGRES_ENV_VAR} is not set")

    name = f"relaymail_test_{secrets.token_hex(6)}"
    run_coroutine(lambda: _run_admin_statement(base_url, f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(base_url).set(database=name).render_as_string(hide_password=False)
    finally:
        # FORCE (PostgreSQL 13 and later) ends sessions that a failed test left open.
        run_coroutine(
            lambda: _run_admin_statement(base_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        )


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'relay.sqlite3'}"
    return request.getfixturevalue("postgres_url")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        callspec = getattr(item, "callspec", None)
        uses_postgres = "postgres_url" in fixtures or (
            callspec is not None and callspec.params.get("database_url") == "postgresql"
        )
        if uses_postgres:
            item.add_marker(pytest.mark.postgres)
