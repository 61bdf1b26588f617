"""The records commands of `relaymail`: the archive, seller actions, response times, purge.

    relaymail messages list [FILTERS] [--limit N] [--offset N]
    relaymail messages show QUEUE_ID [--raw [received|delivered]]
    relaymail messages no-response-needed QUEUE_ID
    relaymail messages report QUEUE_ID --reason spam|abuse|other [--note TEXT]
    relaymail messages export [FILTERS] --output FILE.mbox [--version received|delivered]
    relaymail orders --alias ADDR
    relaymail stats response-time --seller ID [--days 7|30|90]
    relaymail archive purge [--dry-run]

FILTERS are --seller ID, --pair ID, --alias ADDR, --order ID,
--filter needs-response|sent|blocked, --since DATE and --until DATE.

`register` adds them to the parser of relaymail.cli, whose conventions they
follow: --config and --json on every command, key=value lines otherwise, exit
status 2 for invalid input and 1 for a missing record or a failure.
relaymail.records does the work.
"""

from __future__ import annotations

import argparse
import base64
import shlex
import sys
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from . import cli as base
from . import provision, records
from .config import Config
from .errors import RelaymailError
from .models import utcnow
from .store import Store


# --- output ----------------------------------------------------------------


def _line(record: dict[str, Any]) -> str:
    """Return one `key=value` line; values with spaces or quotes are shell-quoted."""
    parts = []
    for key, value in record.items():
        text = base._human_value(value)
        parts.append(f"{key}={shlex.quote(text) if text else ''}")
    return " ".join(parts)


def _emit_list(args: argparse.Namespace, name: str, items: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> None:
    """Print `items` as {"count": N, name: [...]} with --json, else one line per item and a count line."""
    if getattr(args, "json", False):
        base.emit(args, {**(extra or {}), "count": len(items), name: items})
        return
    for key, value in (extra or {}).items():
        print(f"{key}={base._human_value(value)}")
    for item in items:
        print(_line(item))
    print(f"count={len(items)}")


# --- messages --------------------------------------------------------------


def _message_query(args: argparse.Namespace, config: Config, paged: bool) -> records.MessageQuery:
    alias = None
    if args.alias is not None:
        alias = provision.parse_alias(args.alias, config.relay.domain, "alias")
    if args.order is not None:
        provision.validate_id(args.order, "order id")
    if args.seller is not None:
        provision.validate_id(args.seller, "seller id")
    return records.MessageQuery(
        seller_id=args.seller,
        pair_id=args.pair,
        alias=alias,
        order_id=args.order,
        kind=records.normalize_filter(args.filter),
        since=provision.parse_datetime(args.since, "since date") if args.since else None,
        until=provision.parse_datetime(args.until, "until date") if args.until else None,
        limit=args.limit if paged else None,
        offset=args.offset if paged else 0,
    )


def cmd_messages_list(args: argparse.Namespace, config: Config) -> int:
    query = _message_query(args, config, paged=True)

    async def action(session: AsyncSession) -> list[dict[str, Any]]:
        return [records.message_summary(m) for m in await records.list_messages(session, query)]

    _emit_list(args, "messages", base.run_in_session(config, action))
    return 0


def cmd_messages_show(args: argparse.Namespace, config: Config) -> int:
    queue_id = records.parse_queue_id(args.queue_id)

    async def action(session: AsyncSession) -> dict[str, Any]:
        return await records.message_detail(session, queue_id)

    detail = base.run_in_session(config, action)
    if args.raw is not None:
        return _print_raw(detail, args.raw)
    if getattr(args, "json", False):
        base.emit(args, detail)
        return 0

    deliveries = detail.pop("deliveries")
    detail.pop("raw_base64")
    detail.pop("delivered_raw_base64")
    base.emit(args, detail)
    for number, delivery in enumerate(deliveries, 1):
        attempts = delivery.pop("attempts")
        print(_line({"delivery": number, **delivery}))
        for attempt in attempts:
            print(_line({"delivery": number, **{f"attempt_{k}": v for k, v in attempt.items()}}))
    return 0


def _print_raw(detail: dict[str, Any], version: str) -> int:
    """Write one version of the message bytes to stdout unchanged."""
    encoded = detail["raw_base64"] if version == "received" else detail["delivered_raw_base64"]
    if encoded is None:
        raise RelaymailError(f"message {detail['queue_id']} has no delivered version: it was {detail['status']}")
    data = base64.b64decode(encoded)
    stream = getattr(sys.stdout, "buffer", None)
    if stream is None:
        # stdout replaced by a text stream (tests): show the bytes as text.
        sys.stdout.write(data.decode("utf-8", errors="replace"))
        return 0
    sys.stdout.flush()
    stream.write(data)
    stream.flush()
    return 0


def cmd_messages_no_response(args: argparse.Namespace, config: Config) -> int:
    queue_id = records.parse_queue_id(args.queue_id)

    async def action(session: AsyncSession) -> dict[str, Any]:
        message, changed = await records.mark_no_response_needed(session, queue_id)
        return records.action_record(message, changed)

    base.emit(args, base.run_in_session(config, action))
    return 0


def cmd_messages_report(args: argparse.Namespace, config: Config) -> int:
    queue_id = records.parse_queue_id(args.queue_id)
    reason = records.normalize_reason(args.reason)
    note = records.normalize_note(args.note)

    async def action(session: AsyncSession) -> dict[str, Any]:
        message, changed = await records.report_message(session, queue_id, reason, note)
        return records.action_record(message, changed)

    base.emit(args, base.run_in_session(config, action))
    return 0


def cmd_messages_export(args: argparse.Namespace, config: Config) -> int:
    query = _message_query(args, config, paged=False)
    path = Path(args.output)

    async def action(store: Store) -> records.ExportResult:
        return await records.export_mbox(store, query, path, args.version)

    result = base.run_with_store(config, action)
    base.emit(args, dict(result.__dict__))
    return 0


# --- orders, stats, archive ------------------------------------------------


def cmd_orders(args: argparse.Namespace, config: Config) -> int:
    alias = provision.parse_alias(args.alias, config.relay.domain, "alias")

    async def action(session: AsyncSession) -> dict[str, Any]:
        return await records.alias_orders(session, alias, config.relay.domain)

    result = base.run_in_session(config, action)
    if getattr(args, "json", False):
        base.emit(args, result)
        return 0
    orders = result.pop("orders")
    _emit_list(args, "orders", orders, extra=result)
    return 0


def cmd_stats_response_time(args: argparse.Namespace, config: Config) -> int:
    provision.validate_id(args.seller, "seller id")
    windows = [args.days] if args.days is not None else list(records.RESPONSE_WINDOWS_DAYS)
    now = utcnow()

    async def action(session: AsyncSession) -> list[dict[str, Any]]:
        return [(await records.response_time(session, args.seller, days, now)).as_dict() for days in windows]

    figures = base.run_in_session(config, action)
    for window in figures:
        window.pop("seller_id")
    _emit_list(args, "windows", figures, extra={"seller_id": args.seller})
    return 0


def cmd_archive_purge(args: argparse.Namespace, config: Config) -> int:
    retention_days = config.archive.retention_days

    async def action(store: Store) -> records.PurgeResult:
        return await records.purge(store, retention_days, dry_run=args.dry_run)

    result = base.run_with_store(config, action)
    base.emit(args, {"retention_days": retention_days, **result.__dict__})
    return 0


# --- parser ----------------------------------------------------------------


def _add_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seller", metavar="ID", help="messages of this seller")
    parser.add_argument("--pair", metavar="ID", type=int, help="messages of this pair (its numeric id)")
    parser.add_argument(
        "--alias",
        metavar="ADDR",
        help="messages of the pair behind this alias (buyer or seller alias, with or without @domain)",
    )
    parser.add_argument(
        "--order", metavar="ID", help="messages attributed to this order (the pair's latest order when they arrived)"
    )
    parser.add_argument(
        "--filter",
        choices=records.FILTERS,
        help="needs-response: buyer messages still awaiting the seller's reply; sent: the seller's "
        "messages to buyers with what became of them; blocked: messages blocked by policy",
    )
    parser.add_argument(
        "--since", metavar="DATE", help="received at or after DATE (ISO 8601; UTC unless an offset is given)"
    )
    parser.add_argument("--until", metavar="DATE", help="received before DATE (exclusive; same form)")


def _whole_number(minimum: int):
    """Return an argparse type that accepts whole numbers of at least `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid number {text!r}: expected a whole number >= {minimum}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"invalid number {text!r}: expected a whole number >= {minimum}")
        return value

    return parse


def register(commands: argparse._SubParsersAction, with_json: argparse.ArgumentParser) -> None:
    """Add the messages, orders, stats and archive commands to relaymail's parser."""
    _add_messages_commands(commands, with_json)

    orders = commands.add_parser(
        "orders",
        parents=[with_json],
        help="list the orders of the pair behind an alias",
        description="Print the pair behind an alias (buyer or seller alias) and its orders, most recent first.",
    )
    orders.add_argument("--alias", required=True, metavar="ADDR", help="an alias, with or without @domain")
    orders.set_defaults(handler=cmd_orders)

    stats = commands.add_parser("stats", help="response-time figures of sellers")
    stats_commands = stats.add_subparsers(dest="stats_command", metavar="COMMAND", required=True)
    response = stats_commands.add_parser(
        "response-time",
        parents=[with_json],
        help="a seller's response times over the last 7, 30 or 90 days",
        description=(
            "For buyer messages that need a response, received in the window: how many, how many "
            "were answered, the share not answered within 24 hours (an unanswered message older "
            "than 24 hours counts as not answered; nights and weekends count), and the average time "
            "to the seller's first reply in the pair. Without --days, prints all three windows."
        ),
    )
    response.add_argument("--seller", required=True, metavar="ID", help="seller id")
    response.add_argument("--days", type=int, choices=records.RESPONSE_WINDOWS_DAYS, help="window in days")
    response.set_defaults(handler=cmd_stats_response_time)

    archive = commands.add_parser("archive", help="maintain the message archive")
    archive_commands = archive.add_subparsers(dest="archive_command", metavar="COMMAND", required=True)
    purge = archive_commands.add_parser(
        "purge",
        parents=[with_json],
        help="remove messages older than [archive] retention_days",
        description=(
            "Remove messages received more than [archive] retention_days days ago (default 730), "
            "with their deliveries, delivery attempts and Message-ID map entries. Messages with a "
            "delivery still in the queue are kept. Prints how many messages and bytes were removed."
        ),
    )
    purge.add_argument("--dry-run", action="store_true", help="count what would be removed, remove nothing")
    purge.set_defaults(handler=cmd_archive_purge)


def _add_messages_commands(commands: argparse._SubParsersAction, with_json: argparse.ArgumentParser) -> None:
    messages = commands.add_parser("messages", help="list, show, mark, report and export archived messages")
    message_commands = messages.add_subparsers(dest="messages_command", metavar="COMMAND", required=True)

    listing = message_commands.add_parser(
        "list", parents=[with_json], help="list archived messages, newest first", description="List archived messages, newest first."
    )
    _add_filters(listing)
    listing.add_argument("--limit", type=_whole_number(1), default=100, metavar="N", help="print at most N messages (default 100)")
    listing.add_argument("--offset", type=_whole_number(0), default=0, metavar="N", help="skip the first N messages (default 0)")
    listing.set_defaults(handler=cmd_messages_list)

    show = message_commands.add_parser(
        "show",
        parents=[with_json],
        help="print a message's record, deliveries and attempts",
        description=(
            "Print a message's record, its deliveries and their attempts. With --json, both versions "
            "of the bytes are included in base64 (raw_base64, delivered_raw_base64). With --raw, only "
            "the bytes are printed, as received (the default) or as delivered."
        ),
    )
    show.add_argument("queue_id", metavar="QUEUE_ID", help="the message's 12-digit hexadecimal queue id")
    show.add_argument(
        "--raw", nargs="?", const="received", choices=records.MBOX_VERSIONS, help="print the bytes of this version only"
    )
    show.set_defaults(handler=cmd_messages_show)

    no_response = message_commands.add_parser(
        "no-response-needed",
        parents=[with_json],
        help="mark a buyer's message as needing no response",
        description="Mark a buyer's message to a seller as needing no response: it leaves the response-time figures.",
    )
    no_response.add_argument("queue_id", metavar="QUEUE_ID", help="the message's queue id")
    no_response.set_defaults(handler=cmd_messages_no_response)

    report = message_commands.add_parser(
        "report",
        parents=[with_json],
        help="record a seller's report of a buyer's message",
        description=(
            "Record a seller's report of a buyer's message. A reported message needs no response and "
            "stays in the archive. Reporting again replaces the reason and note."
        ),
    )
    report.add_argument("queue_id", metavar="QUEUE_ID", help="the message's queue id")
    report.add_argument("--reason", required=True, choices=records.REPORT_REASONS, help="why it is reported")
    report.add_argument("--note", help=f"free text for the dispute team (at most {records.MAX_NOTE_CHARS} characters)")
    report.set_defaults(handler=cmd_messages_report)

    export = message_commands.add_parser(
        "export",
        parents=[with_json],
        help="write archived messages to an mbox file",
        description=(
            "Write the messages matching the filters to a new mbox file, oldest first, with LF line "
            "endings and X-Relaymail-Queue-Id, X-Relaymail-Direction and X-Relaymail-Status fields "
            "added on top. --version received (the default) exports the bytes as the relay received "
            "them; delivered exports them as rewritten for the recipient and leaves out messages "
            "that were not delivered."
        ),
    )
    _add_filters(export)
    export.add_argument("--output", required=True, metavar="FILE", help="the mbox file to create (must not exist)")
    export.add_argument("--version", choices=records.MBOX_VERSIONS, default="received", help="which bytes to export")
    export.set_defaults(handler=cmd_messages_export)
