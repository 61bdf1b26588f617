"""The `relaymail` command: provisioning, schema migrations, and the server and queue entry points.

    relaymail serve
    relaymail seller add --id ID --name NAME --support-email ADDR [--sender ADDR]...
    relaymail seller sender add|block --seller ID ADDR
    relaymail buyer add --id ID --email ADDR [--name NAME] [--locale L] [--opt-out]
    relaymail buyer opt-out|opt-in ID
    relaymail pair show --buyer ID --seller ID [--buyer-alias A --seller-alias A]
    relaymail order add --id ID --buyer ID --seller ID --status STATUS [--placed-at DATE]
    relaymail queue list|show|flush|hold|release|delete|requeue   (relaymail.cli_queue)
    relaymail dkim keygen|record                                  (relaymail.cli_dkim)
    relaymail messages list|show|no-response-needed|report|export (relaymail.cli_records)
    relaymail orders --alias ADDR | stats response-time | archive purge   (relaymail.cli_records)
    relaymail db upgrade|current|revision

Every command reads the configuration from `--config PATH`, else from the file
named by RELAYMAIL_CONFIG. Commands that print data print `key=value` lines, or
one JSON object with `--json`. relaymail.provision checks the values and does
the work. This module parses arguments, opens the database, commits and prints.

Commands that use the database first check that its schema is at the newest
migration, and ask for `relaymail db upgrade` otherwise.

Exit status: 0 on success, 2 for invalid arguments, input or configuration,
1 for a missing record, a conflict with stored data or a runtime failure (an
unreachable database, say). Errors are printed as `relaymail: error: MESSAGE`
on stderr, without a traceback. An unexpected exception prints its type and
message only, unless RELAYMAIL_DEBUG=1 is set.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import sys
import traceback
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from enum import Enum
from types import ModuleType
from typing import Any, AsyncIterator, NoReturn, TypeVar

from alembic.util import CommandError as AlembicCommandError
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession

from . import config as config_module
from . import cli_dkim, cli_queue, cli_records, db, log, provision
from .config import Config
from .errors import ConfigError, InputError, RelaymailError, StoreError
from .models import ORDER_STATUSES, Buyer, Order, Seller, SellerSender
from .store import Store

PROG = "relaymail"
EXIT_FAILURE = 1
EXIT_USAGE = 2

T = TypeVar("T")


class UsageError(Exception):
    """Invalid command-line arguments, raised by the parser instead of exiting."""


class ArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser that raises UsageError, so `main` prints every error one way."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}\n{self.format_usage().rstrip()}")


# --- output ----------------------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Enum):
        return value.value
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def _human_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Enum):
        return str(value.value)
    return str(value)


def emit(args: argparse.Namespace, record: dict[str, Any]) -> None:
    """Print `record` as one JSON object with --json, else as key=value lines."""
    if getattr(args, "json", False):
        print(json.dumps(record, default=_json_default, sort_keys=False))
        return
    for key, value in record.items():
        print(f"{key}={_human_value(value)}")


def seller_record(seller: Seller, created: bool | None = None) -> dict[str, Any]:
    record: dict[str, Any] = {
        "id": seller.id,
        "business_name": seller.business_name,
        "support_email": seller.support_email,
        "locale": seller.locale,
        "block_notice": seller.block_notice,
        "senders": [
            {"address": sender.address, "state": sender.state}
            for sender in sorted(seller.senders, key=lambda s: s.address)
        ],
    }
    if created is not None:
        record["created"] = created
    return record


def sender_record(seller_id: str, sender: SellerSender, created: bool) -> dict[str, Any]:
    return {"seller_id": seller_id, "address": sender.address, "state": sender.state, "created": created}


def buyer_record(buyer: Buyer, created: bool | None = None) -> dict[str, Any]:
    record: dict[str, Any] = {
        "id": buyer.id,
        "email": buyer.email,
        "name": buyer.name,
        "locale": buyer.locale,
        "opted_out": buyer.opted_out,
    }
    if created is not None:
        record["created"] = created
    return record


def order_record(order: Order, created: bool) -> dict[str, Any]:
    return {
        "id": order.id,
        "buyer_id": order.buyer_id,
        "seller_id": order.seller_id,
        "status": order.status,
        "placed_at": order.placed_at,
        "created": created,
    }


def _print_seller(args: argparse.Namespace, record: dict[str, Any]) -> None:
    if getattr(args, "json", False):
        emit(args, record)
        return
    # One line per key; the senders as address:state pairs on one line.
    senders = ",".join(f"{s['address']}:{s['state']}" for s in record["senders"])
    emit(args, {**record, "senders": senders})


# --- database access -------------------------------------------------------


@asynccontextmanager
async def open_store(config: Config) -> AsyncIterator[Store]:
    """Open the configured database after checking that its schema is current.

    Database errors inside the block become StoreError naming the database
    (its URL without the password).
    """
    url = config.database.url
    path = db.sqlite_path(url)
    if path is not None and not path.exists():
        raise StoreError(
            f"database file {path} not found: create it with `relaymail db upgrade`, "
            "or check database.url in the configuration"
        )

    store = Store(url)
    try:
        async with _database_errors(url):
            await db.require_head(store.engine)
            yield store
    finally:
        await store.close()


@asynccontextmanager
async def _database_errors(url: str) -> AsyncIterator[None]:
    try:
        yield
    except DBAPIError as exc:
        raise StoreError(f"database {db.safe_url(url)}: {exc.orig}") from exc
    except SQLAlchemyError as exc:
        raise StoreError(f"database {db.safe_url(url)}: {exc}") from exc
    except OSError as exc:
        raise StoreError(f"cannot connect to database {db.safe_url(url)}: {exc}") from exc
    except AlembicCommandError as exc:
        raise StoreError(f"migration on database {db.safe_url(url)} failed: {exc}") from exc


def run_in_session(config: Config, action: Callable[[AsyncSession], Awaitable[T]]) -> T:
    """Run `action` in one session and commit; roll back if it raises."""

    async def run() -> T:
        async with open_store(config) as store:
            async with store.session() as session:
                result = await action(session)
                await session.commit()
                return result

    return asyncio.run(run())


def run_with_store(config: Config, action: Callable[[Store], Awaitable[T]]) -> T:
    """Run `action` with the open Store; it manages its own sessions."""

    async def run() -> T:
        async with open_store(config) as store:
            return await action(store)

    return asyncio.run(run())


def run_database(config: Config, action: Callable[[str], Awaitable[T]]) -> T:
    """Run a relaymail.db coroutine on the configured URL, naming the database on failure."""
    url = config.database.url

    async def run() -> T:
        async with _database_errors(url):
            return await action(url)

    return asyncio.run(run())


# --- seller ----------------------------------------------------------------


def cmd_seller_add(args: argparse.Namespace, config: Config) -> int:
    async def action(session: AsyncSession) -> dict[str, Any]:
        seller, created = await provision.add_seller(
            session,
            args.id,
            args.name,
            args.support_email,
            domain=config.relay.domain,
            senders=args.sender,
            locale=args.locale,
            block_notice=args.block_notice,
        )
        return seller_record(seller, created)

    _print_seller(args, run_in_session(config, action))
    return 0


def cmd_sender_add(args: argparse.Namespace, config: Config) -> int:
    async def action(session: AsyncSession) -> dict[str, Any]:
        sender, created = await provision.add_sender(
            session, args.seller, args.address, domain=config.relay.domain
        )
        return sender_record(args.seller, sender, created)

    emit(args, run_in_session(config, action))
    return 0


def cmd_sender_block(args: argparse.Namespace, config: Config) -> int:
    async def action(session: AsyncSession) -> dict[str, Any]:
        sender, created = await provision.block_sender(session, args.seller, args.address)
        return sender_record(args.seller, sender, created)

    emit(args, run_in_session(config, action))
    return 0


# --- buyer -----------------------------------------------------------------


def cmd_buyer_add(args: argparse.Namespace, config: Config) -> int:
    async def action(session: AsyncSession) -> dict[str, Any]:
        buyer, created = await provision.add_buyer(
            session,
            args.id,
            args.email,
            domain=config.relay.domain,
            name=args.name,
            locale=args.locale,
            opted_out=args.opt_out,
        )
        return buyer_record(buyer, created)

    emit(args, run_in_session(config, action))
    return 0


def cmd_buyer_opt_out(args: argparse.Namespace, config: Config) -> int:
    async def action(session: AsyncSession) -> dict[str, Any]:
        buyer = await provision.set_opt_out(session, args.id, args.opted_out)
        return buyer_record(buyer)

    emit(args, run_in_session(config, action))
    return 0


# --- pair and order --------------------------------------------------------


def cmd_pair_show(args: argparse.Namespace, config: Config) -> int:
    async def action(session: AsyncSession) -> dict[str, Any]:
        aliases = await provision.show_pair(
            session,
            args.buyer,
            args.seller,
            config.relay.domain,
            buyer_alias=args.buyer_alias,
            seller_alias=args.seller_alias,
        )
        return {
            "buyer_alias": aliases.buyer_alias,
            "seller_alias": aliases.seller_alias,
            "buyer_id": aliases.buyer_id,
            "seller_id": aliases.seller_id,
            "pair_id": aliases.pair_id,
            "created": aliases.created,
        }

    emit(args, run_in_session(config, action))
    return 0


def cmd_order_add(args: argparse.Namespace, config: Config) -> int:
    placed_at = None
    if args.placed_at is not None:
        placed_at = provision.parse_datetime(args.placed_at, "placed-at date")

    async def action(session: AsyncSession) -> dict[str, Any]:
        order, created = await provision.add_order(
            session, args.id, args.buyer, args.seller, args.status, placed_at
        )
        return order_record(order, created)

    emit(args, run_in_session(config, action))
    return 0


# --- db --------------------------------------------------------------------


def cmd_db_upgrade(args: argparse.Namespace, config: Config) -> int:
    result = run_database(config, db.upgrade)
    emit(args, {"previous": result.previous, "current": result.current})
    return 0


def cmd_db_current(args: argparse.Namespace, config: Config) -> int:
    current = run_database(config, db.current_revision)
    head = db.head_revision()
    emit(args, {"current": current, "head": head, "up_to_date": current == head})
    return 0


def cmd_db_revision(args: argparse.Namespace, config: Config) -> int:
    async def action(url: str):
        return await db.write_revision(url, args.message, autogenerate=not args.empty)

    path = run_database(config, action)
    emit(args, {"path": str(path)})
    return 0


# --- server, written elsewhere -------------------------------------------


def _import_stage(module_name: str) -> ModuleType:
    """Import a module of the mail path only when its command runs."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        raise RelaymailError(f"{module_name} is missing from this installation") from None


def cmd_serve(args: argparse.Namespace, config: Config) -> int:
    server = _import_stage("relaymail.server")
    status = server.run(config)
    return status if isinstance(status, int) else 0


# --- parser ----------------------------------------------------------------


def build_parser() -> ArgumentParser:
    """Return the parser of the whole command tree; each leaf sets `handler`."""
    # SUPPRESS keeps a subcommand from resetting a --config given before it.
    with_config = ArgumentParser(add_help=False)
    with_config.add_argument(
        "--config",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help=f"configuration file (TOML); default: the file named by {config_module.ENV_VAR}",
    )
    with_json = ArgumentParser(add_help=False, parents=[with_config])
    with_json.add_argument("--json", action="store_true", help="print the result as one JSON object")

    parser = ArgumentParser(
        prog=PROG, description="Privacy-preserving SMTP relay for marketplace buyer-seller mail."
    )
    parser.add_argument(
        "--config",
        metavar="PATH",
        help=f"configuration file (TOML); default: the file named by {config_module.ENV_VAR}",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = commands.add_parser(
        "serve", parents=[with_config], help="run the SMTP listener, the delivery queue and the HTTP server"
    )
    serve.set_defaults(handler=cmd_serve)

    _add_seller_commands(commands, with_json)
    _add_buyer_commands(commands, with_json)
    _add_pair_and_order_commands(commands, with_json)
    cli_queue.register(commands, with_json)
    cli_dkim.register(commands, with_json)
    cli_records.register(commands, with_json)
    _add_db_commands(commands, with_json)
    return parser


def _add_seller_commands(commands: argparse._SubParsersAction, with_json: ArgumentParser) -> None:
    seller = commands.add_parser("seller", help="create sellers and manage their sender addresses")
    seller_commands = seller.add_subparsers(dest="seller_command", metavar="COMMAND", required=True)

    add = seller_commands.add_parser(
        "add",
        parents=[with_json],
        help="create a seller, or update the seller with this id",
        description=(
            "Create a seller, or update the seller with this id. Buyers' messages are "
            "delivered to the support address. The support address is not an approved "
            "sender: to let the seller write to buyers from it, pass it with --sender too. "
            "--sender approves addresses and keeps the other listed senders as they are."
        ),
    )
    add.add_argument("--id", required=True, help="the marketplace's seller id (1-64 characters)")
    add.add_argument("--name", required=True, help="business name shown to buyers (1-200 characters)")
    add.add_argument(
        "--support-email",
        required=True,
        metavar="ADDR",
        help="customer-service address where buyers' messages are delivered",
    )
    add.add_argument(
        "--sender",
        action="append",
        default=[],
        metavar="ADDR",
        help="approve this address to send to buyers (repeatable)",
    )
    add.add_argument("--locale", help="language of notices, ll or ll-CC (new sellers: es-MX)")
    add.add_argument(
        "--block-notice",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="send a notice when a message is blocked (new sellers: on)",
    )
    add.set_defaults(handler=cmd_seller_add)

    sender = seller_commands.add_parser("sender", help="approve or block a sender address")
    sender_commands = sender.add_subparsers(dest="sender_command", metavar="COMMAND", required=True)
    for name, handler, text in (
        ("add", cmd_sender_add, "approve an address to send to buyers (re-approves a blocked one)"),
        ("block", cmd_sender_block, "block an address from sending to buyers"),
    ):
        command = sender_commands.add_parser(name, parents=[with_json], help=text, description=text)
        command.add_argument("--seller", required=True, metavar="ID", help="seller id")
        command.add_argument("address", metavar="ADDR", help="sender e-mail address")
        command.set_defaults(handler=handler)


def _add_buyer_commands(commands: argparse._SubParsersAction, with_json: ArgumentParser) -> None:
    buyer = commands.add_parser("buyer", help="create buyers and record their opt-out")
    buyer_commands = buyer.add_subparsers(dest="buyer_command", metavar="COMMAND", required=True)

    add = buyer_commands.add_parser(
        "add",
        parents=[with_json],
        help="create a buyer, or update the buyer with this id",
        description=(
            "Create a buyer, or update the buyer with this id. Options left out keep "
            "the stored values, or the defaults for a new buyer."
        ),
    )
    add.add_argument("--id", required=True, help="the marketplace's buyer id (1-64 characters)")
    add.add_argument("--email", required=True, metavar="ADDR", help="the buyer's real address")
    add.add_argument("--name", help="display name shown to sellers (1-200 characters)")
    add.add_argument("--locale", help="language of added text, ll or ll-CC (new buyers: es-MX)")
    add.add_argument(
        "--opt-out",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the buyer declined unsolicited messages from sellers (new buyers: no)",
    )
    add.set_defaults(handler=cmd_buyer_add)

    for name, opted_out, text in (
        ("opt-out", True, "record that the buyer declined unsolicited messages from sellers"),
        ("opt-in", False, "record that the buyer accepts unsolicited messages from sellers"),
    ):
        command = buyer_commands.add_parser(name, parents=[with_json], help=text, description=text)
        command.add_argument("id", metavar="ID", help="buyer id")
        command.set_defaults(handler=cmd_buyer_opt_out, opted_out=opted_out)


def _add_pair_and_order_commands(
    commands: argparse._SubParsersAction, with_json: ArgumentParser
) -> None:
    pair = commands.add_parser("pair", help="show a buyer-seller pair's aliases")
    pair_commands = pair.add_subparsers(dest="pair_command", metavar="COMMAND", required=True)
    show = pair_commands.add_parser(
        "show",
        parents=[with_json],
        help="print a pair's two aliases, creating the pair if needed",
        description=(
            "Print the buyer alias (the seller writes to it to reach the buyer) and the "
            "seller alias (the buyer writes to it to reach the seller). A missing pair is "
            "created with fresh random aliases, or with the aliases given by --buyer-alias "
            "and --seller-alias (both or neither) when migrating from another system. "
            "Aliases never change once created."
        ),
    )
    show.add_argument("--buyer", required=True, metavar="ID", help="buyer id")
    show.add_argument("--seller", required=True, metavar="ID", help="seller id")
    show.add_argument(
        "--buyer-alias",
        metavar="ALIAS",
        help="import this buyer alias: 15 characters of a-z and 0-9, optionally @ the relay domain",
    )
    show.add_argument("--seller-alias", metavar="ALIAS", help="import this seller alias (same form)")
    show.set_defaults(handler=cmd_pair_show)

    order = commands.add_parser("order", help="record the marketplace's orders")
    order_commands = order.add_subparsers(dest="order_command", metavar="COMMAND", required=True)
    add = order_commands.add_parser(
        "add",
        parents=[with_json],
        help="create an order, or update the status of the order with this id",
        description="Create an order, or update the status (and date, if given) of the order with this id.",
    )
    add.add_argument("--id", required=True, help="the marketplace's order id (1-64 characters)")
    add.add_argument("--buyer", required=True, metavar="ID", help="buyer id")
    add.add_argument("--seller", required=True, metavar="ID", help="seller id")
    add.add_argument("--status", required=True, help=f"one of: {', '.join(ORDER_STATUSES)}")
    add.add_argument(
        "--placed-at",
        metavar="DATE",
        help="when the order was placed: ISO 8601 date or date and time, UTC unless an "
        "offset is given (new orders: now)",
    )
    add.set_defaults(handler=cmd_order_add)


def _add_db_commands(commands: argparse._SubParsersAction, with_json: ArgumentParser) -> None:
    database = commands.add_parser("db", help="create or upgrade the database schema")
    db_commands = database.add_subparsers(dest="db_command", metavar="COMMAND", required=True)

    upgrade = db_commands.add_parser(
        "upgrade",
        parents=[with_json],
        help="apply every pending migration (creates a SQLite file if missing)",
    )
    upgrade.set_defaults(handler=cmd_db_upgrade, migration_logs=True)

    current = db_commands.add_parser(
        "current", parents=[with_json], help="print the database's revision and the newest one"
    )
    current.set_defaults(handler=cmd_db_current)

    revision = db_commands.add_parser(
        "revision",
        parents=[with_json],
        help="write a new migration script (developers, in a source checkout)",
        description=(
            "Compare the models with a database at the newest revision and write the "
            "differences as a new script in relaymail/migrations/versions. Review it by hand."
        ),
    )
    revision.add_argument("--message", "-m", required=True, help="one-line summary of the change")
    revision.add_argument(
        "--empty", action="store_true", help="write an empty script instead of comparing"
    )
    revision.set_defaults(handler=cmd_db_revision, migration_logs=True)


# --- entry point -----------------------------------------------------------


def _fail(message: str, status: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return status


def _load_config(args: argparse.Namespace) -> Config:
    path = config_module.resolve_path(getattr(args, "config", None))
    return config_module.load(path)


def _configure_logging(args: argparse.Namespace, config: Config) -> None:
    log.configure(config.log.level)
    # Alembic logs two INFO lines whenever it reads the schema revision. Keep them
    # only for the commands that migrate, where it also logs each migration it runs.
    alembic_logger = logging.getLogger("alembic")
    if getattr(args, "migration_logs", False):
        alembic_logger.setLevel(logging.NOTSET)
    else:
        alembic_logger.setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """Run one command; return its exit status."""
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        return _fail(str(exc), EXIT_USAGE)

    try:
        config = _load_config(args)
        _configure_logging(args, config)
        return args.handler(args, config)
    except (ConfigError, InputError) as exc:
        return _fail(str(exc), EXIT_USAGE)
    except RelaymailError as exc:
        return _fail(str(exc), EXIT_FAILURE)
    except BrokenPipeError:
        # The reader of stdout went away (`relaymail queue list | head`): stop quietly, as cat does.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
    except OSError as exc:
        # For example a listen address already in use, from `serve`.
        return _fail(str(exc), EXIT_FAILURE)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as exc:
        if os.environ.get("RELAYMAIL_DEBUG") == "1":
            traceback.print_exc()
        return _fail(
            f"unexpected {type(exc).__name__}: {exc} (set RELAYMAIL_DEBUG=1 for the traceback)",
            EXIT_FAILURE,
        )


if __name__ == "__main__":
    sys.exit(main())
