"""`relaymail queue ...`: the queue commands of the CLI (the work is in relaymail.queue_admin).

    relaymail queue list [--all] [--state S]
    relaymail queue show ID [--raw [received|delivered]]
    relaymail queue flush [ID]
    relaymail queue hold|release|delete|requeue ID

ID is a queue id (12 hex digits, from "queued as ..." or the log) or a
delivery id (a number, or delivery:N). Output, errors and exit status follow
relaymail.cli: key=value lines or one JSON object with --json.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from . import cli as cli_module
from . import bounce, queue_admin
from .config import Config
from .errors import InputError, NotFoundError

ID_HELP = "a queue id (12 hex digits) or a delivery id (a number, or delivery:N as in the log)"


def register(commands: argparse._SubParsersAction, with_json: argparse.ArgumentParser) -> None:
    """Add the `queue` command and its subcommands to `commands`."""
    queue = commands.add_parser("queue", help="inspect the delivery queue and act on queued messages")
    queue_commands = queue.add_subparsers(dest="queue_command", metavar="COMMAND", required=True)

    listing = queue_commands.add_parser(
        "list",
        parents=[with_json],
        help="list deliveries: queued and held ones unless --all or --state is given",
    )
    listing.add_argument("--all", action="store_true", help="include sent, bounced and deleted deliveries")
    listing.add_argument(
        "--state", metavar="STATE", help=f"only deliveries in this state: {', '.join(queue_admin.ALL_STATES)}"
    )
    listing.set_defaults(handler=cmd_list)

    show = queue_commands.add_parser(
        "show",
        parents=[with_json],
        help="print a message's metadata, deliveries and attempts (never its text unless --raw)",
        description=(
            "Print a message's metadata, each delivery's recipient and state, and every "
            "attempt with its time, host and reply. The message text is printed only "
            "with --raw, and then alone: the bytes queued for delivery, or with "
            "--raw received the bytes as the relay received them."
        ),
    )
    show.add_argument("id", metavar="ID", help=ID_HELP)
    show.add_argument(
        "--raw",
        nargs="?",
        const="delivered",
        choices=("delivered", "received"),
        help="print the message bytes instead (default: the delivered version)",
    )
    show.set_defaults(handler=cmd_show)

    flush = queue_commands.add_parser(
        "flush",
        parents=[with_json],
        help="make queued deliveries due now (all of them, or those of ID)",
        description=(
            "Make queued deliveries due now, so the running relay attempts them within "
            "[delivery] poll_interval_s. Held deliveries stay held: use release."
        ),
    )
    flush.add_argument("id", metavar="ID", nargs="?", help=ID_HELP)
    flush.set_defaults(handler=cmd_flush)

    for name, text in (
        ("hold", "hold queued deliveries: never attempted until released"),
        ("release", "queue held deliveries again, due now, and reset their crash counter"),
        (
            "delete",
            "stop queued or held deliveries for good (the archive keeps the message, "
            "with state \"deleted\"; sent deliveries are never deleted)",
        ),
        (
            "requeue",
            "queue a sent, bounced or deleted delivery again, due now, with its attempt "
            "count and queue lifetime restarted",
        ),
    ):
        command = queue_commands.add_parser(name, parents=[with_json], help=text, description=text[0].upper() + text[1:] + ".")
        command.add_argument("id", metavar="ID", help=ID_HELP)
        command.set_defaults(handler=cmd_action, action=name)

    _register_undeliverable(queue_commands, with_json)


def _register_undeliverable(queue_commands, with_json) -> None:
    listing = queue_commands.add_parser(
        "undeliverable",
        parents=[with_json],
        help="list recipient addresses marked undeliverable after repeated hard bounces",
        description="List recipient addresses marked undeliverable after repeated hard bounces.",
    )
    listing.add_argument("--all", action="store_true", help="also list addresses that bounced but are not marked yet")
    listing.set_defaults(handler=cmd_undeliverable)

    clear = queue_commands.add_parser(
        "undeliverable-clear",
        parents=[with_json],
        help="forget the recorded bounces of an address",
        description="Forget the recorded bounces of an address, so it is no longer marked undeliverable.",
    )
    clear.add_argument("address", metavar="ADDRESS", help="the recipient address")
    clear.set_defaults(handler=cmd_undeliverable_clear)


def cmd_undeliverable(args: argparse.Namespace, config: Config) -> int:
    rows = cli_module.run_with_store(config, lambda store: bounce.undeliverable_addresses(store, include_counting=args.all))
    if getattr(args, "json", False):
        cli_module.emit(args, {"count": len(rows), "addresses": rows})
        return 0
    for row in rows:
        print(_line(row))
    print(f"count={len(rows)}")
    return 0


def cmd_undeliverable_clear(args: argparse.Namespace, config: Config) -> int:
    cleared = cli_module.run_with_store(config, lambda store: bounce.clear_undeliverable(store, args.address))
    if not cleared:
        raise NotFoundError(f"no bounces are recorded for {args.address!r}")
    cli_module.emit(args, {"address": args.address.strip().lower(), "cleared": True})
    return 0


def cmd_list(args: argparse.Namespace, config: Config) -> int:
    state = queue_admin.check_state(args.state) if args.state else None

    async def action(store) -> list[dict[str, Any]]:
        return await queue_admin.list_queue(store, include_final=args.all, state=state)

    deliveries = cli_module.run_with_store(config, action)
    if getattr(args, "json", False):
        cli_module.emit(args, {"count": len(deliveries), "deliveries": deliveries})
        return 0
    for delivery in deliveries:
        print(_line(delivery))
    print(f"count={len(deliveries)}")
    return 0


def cmd_show(args: argparse.Namespace, config: Config) -> int:
    if args.raw is not None:
        if getattr(args, "json", False):
            raise InputError("--raw prints the message bytes alone and cannot be combined with --json")
        data = cli_module.run_with_store(config, lambda store: queue_admin.raw_message(store, args.id, args.raw))
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return 0

    record = cli_module.run_with_store(config, lambda store: queue_admin.show(store, args.id))
    if getattr(args, "json", False):
        cli_module.emit(args, record)
        return 0

    deliveries = record.pop("deliveries")
    cli_module.emit(args, record)
    for delivery in deliveries:
        attempts = delivery.pop("attempt_log")
        print("delivery: " + _line(delivery))
        for attempt in attempts:
            print("attempt: " + _line({"delivery_id": delivery["delivery_id"], **attempt}))
    return 0


def cmd_flush(args: argparse.Namespace, config: Config) -> int:
    count = cli_module.run_with_store(config, lambda store: queue_admin.flush(store, args.id))
    cli_module.emit(args, {"made_due": count})
    return 0


def cmd_action(args: argparse.Namespace, config: Config) -> int:
    async def action(store):
        if args.action == "hold":
            return await queue_admin.hold(store, args.id)
        if args.action == "release":
            return await queue_admin.release(store, args.id)
        if args.action == "delete":
            return await queue_admin.delete(store, args.id)
        return await queue_admin.requeue(store, args.id, bounce_secret=config.relay.bounce_secret)

    result = cli_module.run_with_store(config, action).as_dict()
    if getattr(args, "json", False):
        cli_module.emit(args, result)
        return 0

    unchanged = result.pop("unchanged")
    result["changed_deliveries"] = ",".join(str(i) for i in result["changed_deliveries"])
    result["queue_ids"] = ",".join(result["queue_ids"])
    cli_module.emit(args, result)
    for item in unchanged:
        print("unchanged: " + _line(item))
    return 0


def _line(record: dict[str, Any]) -> str:
    return " ".join(f"{key}={cli_module._human_value(value)}" for key, value in record.items())
