"""`relaymail dkim ...`: DKIM key commands of the CLI (the work is in relaymail.dkim).

    relaymail dkim keygen --selector S [--bits 2048] --output KEYFILE [--force]
    relaymail dkim record

`keygen` writes a new RSA private key (mode 0600) and prints the DNS TXT
record to publish. `record` prints the record of the key that [dkim] names.
The domain is [dkim] domain, which defaults to [relay] domain.

The handlers import relaymail.dkim themselves, because dkimpy and cryptography
would add about 0.2 s to every other command's start.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from . import cli as cli_module
from .config import Config, is_selector
from .errors import ConfigError, InputError


def register(commands: argparse._SubParsersAction, with_json: argparse.ArgumentParser) -> None:
    """Add the `dkim` command and its subcommands to `commands`."""
    group = commands.add_parser("dkim", help="create the DKIM signing key and print its DNS record")
    dkim_commands = group.add_subparsers(dest="dkim_command", metavar="COMMAND", required=True)

    keygen = dkim_commands.add_parser(
        "keygen",
        parents=[with_json],
        help="write a new RSA private key and print the DNS TXT record to publish",
        description=(
            "Write a new RSA private key (PEM, mode 0600) and print the TXT record that "
            "publishes its public key at SELECTOR._domainkey.DOMAIN, DOMAIN being [dkim] "
            "domain (default: [relay] domain). Publish the record, then set [dkim] "
            "selector and private_key_path and restart the relay."
        ),
    )
    keygen.add_argument("--selector", required=True, help="DKIM selector, for example mail2024")
    keygen.add_argument(
        "--bits",
        type=int,
        default=2048,
        help="key size in bits: 1024, 2048, 3072 or 4096 (default 2048)",
    )
    keygen.add_argument("--output", required=True, metavar="KEYFILE", help="where to write the private key")
    keygen.add_argument("--force", action="store_true", help="replace KEYFILE if it exists")
    keygen.set_defaults(handler=cmd_keygen)

    record = dkim_commands.add_parser(
        "record",
        parents=[with_json],
        help="print the DNS TXT record of the configured key",
        description="Read [dkim] private_key_path and print the TXT record that publishes its public key.",
    )
    record.set_defaults(handler=cmd_record)


def cmd_keygen(args: argparse.Namespace, config: Config) -> int:
    from . import dkim

    if not is_selector(args.selector):
        raise InputError(
            f"invalid selector {args.selector!r}: expected DNS labels of letters, digits and \"-\" "
            "separated by dots, for example mail2024"
        )

    output = Path(args.output)
    key = dkim.generate_key(args.bits)
    dkim.write_key(output, key, replace=args.force)
    record = dkim.dns_record(args.selector, config.dkim.domain, key)
    _print_record(args, record, {"key_path": str(output.resolve()), "bits": args.bits})
    return 0


def cmd_record(args: argparse.Namespace, config: Config) -> int:
    from . import dkim

    signer = dkim.Signer.from_config(config)
    if signer is None:
        raise ConfigError("dkim.selector: empty, so signing is off; set [dkim] selector and private_key_path")
    _print_record(args, signer.dns_record(), {"key_path": config.dkim.private_key_path})
    return 0


def _print_record(args: argparse.Namespace, record, extra: dict[str, Any]) -> None:
    selector, _, domain = record.name.partition("._domainkey.")
    result = {
        **extra,
        "selector": selector,
        "domain": domain,
        "name": record.name,
        "type": "TXT",
        "value": record.value,
    }
    if getattr(args, "json", False):
        cli_module.emit(args, {**result, "strings": record.strings, "record": record.zone_line})
        return
    cli_module.emit(args, {**result, "record": record.zone_line})
