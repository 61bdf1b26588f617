"""Configuration: one TOML file, loaded with tomllib and checked at start.

`load(path)` returns a `Config` or raises `ConfigError` whose message names the
key, the value found and what is expected. Unknown sections and keys are errors
too, so a typo never silently falls back to a default. Relative paths (the
SQLite file, the Maildir) are resolved against the directory of the file.

The path comes from `--config PATH`, else from the RELAYMAIL_CONFIG environment
variable (see `resolve_path`).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import ssl
import tomllib
import urllib.parse
import zoneinfo
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

ENV_VAR = "RELAYMAIL_CONFIG"


@dataclass(frozen=True)
class RelaySection:
    domain: str = ""
    hostname: str = ""
    operators_address: str = ""
    notice_address: str = ""
    bounce_secret: str = ""


@dataclass(frozen=True)
class SmtpSection:
    listen: str = "127.0.0.1:2525"
    max_message_bytes: int = 15 * 1024 * 1024
    max_recipients: int = 50
    max_received_headers: int = 100
    max_line_bytes: int = 1024 * 1024
    command_timeout_s: float = 300.0
    max_connections: int = 500
    max_connections_per_client: int = 50
    unknown_recipients_before_delay: int = 3
    unknown_recipients_before_disconnect: int = 10
    unknown_recipient_delay_s: float = 2.0
    tls_cert_path: str = ""
    tls_key_path: str = ""


@dataclass(frozen=True)
class DatabaseSection:
    url: str = "sqlite+aiosqlite:///relaymail.sqlite3"


@dataclass(frozen=True)
class DeliverySection:
    transport: str = "maildir"
    maildir: str = "maildir"
    smarthost: str = ""
    smarthost_starttls: bool = False
    smarthost_username: str = ""
    smarthost_password: str = ""
    mx_port: int = 25
    dns_nameservers: list[str] = field(default_factory=list)
    tls: str = "opportunistic"
    # Recipient domain (or ".domain" for its subdomains) to a TLS mode, for the mx transport.
    tls_policies: dict[str, str] = field(default_factory=dict)
    tls_ca_file: str = ""
    max_connections_per_destination: int = 10
    connection_idle_s: float = 10.0
    workers: int = 20
    poll_interval_s: float = 1.0
    connect_timeout_s: float = 30.0
    dns_timeout_s: float = 10.0
    data_timeout_s: float = 600.0
    min_backoff_s: int = 300
    max_backoff_s: int = 3600
    max_queue_lifetime_s: int = 432000
    max_crashes: int = 3
    lease_s: int = 300


@dataclass(frozen=True)
class LogSection:
    level: str = "INFO"


# Signed when present in the message. From is also signed once more than it
# occurs ("oversigned"), so a From header added later breaks the signature.
DKIM_DEFAULT_HEADERS = (
    "From", "To", "Subject", "Date", "Message-ID", "In-Reply-To", "References",
    "MIME-Version", "Content-Type", "Content-Transfer-Encoding", "Auto-Submitted",
)


@dataclass(frozen=True)
class DkimSection:
    """`[dkim]`: DKIM signing of outgoing mail (relaymail.dkim), off while `selector` is empty.

    `domain` defaults to `[relay] domain`. `private_key_path` is read when the
    relay starts, not when the file is loaded, so other commands keep working
    for users who cannot read the key.
    """

    selector: str = ""
    private_key_path: str = ""
    domain: str = ""
    headers: list[str] = field(default_factory=lambda: list(DKIM_DEFAULT_HEADERS))


@dataclass(frozen=True)
class ContentSection:
    """`[policy.content]`: what to do with contact details in seller-to-buyer text.

    Each of `emails`, `phones` and `links` is "off", "flag" (archive the
    finding), "redact" (replace the match with a placeholder) or "block".
    Links to a domain in `links_allowlist`, or to a subdomain of one, are
    never findings.
    """

    emails: str = "off"
    phones: str = "off"
    links: str = "off"
    links_allowlist: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PolicySection:
    """`[policy]`: the seller-to-buyer rules and the automatic-message cap.

    `extra_patterns_path` names a TOML file of not-critical patterns that are
    added to the built-in ones (same format as relaymail/data/critical_patterns.toml).
    `allowed_attachment_types` takes kinds from `ATTACHMENT_KINDS`.
    """

    timezone: str = "America/Mexico_City"
    order_window_days: int = 30
    critical_order_days: int = 90
    automatic_window_s: int = 86400
    max_attachment_bytes: int = 10_000_000
    allowed_attachment_types: list[str] = field(
        default_factory=lambda: list(ATTACHMENT_KINDS)
    )
    extra_patterns_path: str = ""
    content: ContentSection = field(default_factory=ContentSection)


@dataclass(frozen=True)
class HttpSection:
    """`[http]`: the HTTP server inside `relaymail serve`.

    It serves the back-office API under /api/v1 (bearer `api_token`; empty
    turns the API off), /healthz, /metrics and the one-click pages that the
    links in sellers' messages open. `public_url` is the base of those links
    as sellers reach it. `link_secret` signs them; empty leaves the links out
    of messages. A link expires `link_ttl_s` seconds after it was made.
    """

    enabled: bool = True
    listen: str = "127.0.0.1:8025"
    public_url: str = "http://127.0.0.1:8025"
    api_token: str = ""
    link_secret: str = ""
    link_ttl_s: int = 30 * 86400


@dataclass(frozen=True)
class ArchiveSection:
    """`[archive]`: how long messages are kept; `relaymail archive purge` removes older ones."""

    retention_days: int = 730


@dataclass(frozen=True)
class Config:
    relay: RelaySection
    smtp: SmtpSection
    database: DatabaseSection
    delivery: DeliverySection
    log: LogSection
    policy: PolicySection = field(default_factory=PolicySection)
    dkim: DkimSection = field(default_factory=DkimSection)
    http: HttpSection = field(default_factory=HttpSection)
    archive: ArchiveSection = field(default_factory=ArchiveSection)
    path: Path | None = None

    @property
    def listen_host(self) -> str:
        return split_host_port(self.smtp.listen, "smtp.listen")[0]

    @property
    def listen_port(self) -> int:
        return split_host_port(self.smtp.listen, "smtp.listen")[1]

    @property
    def bounce_domain(self) -> str:
        return self.relay.domain


SECTIONS: dict[str, type] = {
    "relay": RelaySection,
    "smtp": SmtpSection,
    "database": DatabaseSection,
    "delivery": DeliverySection,
    "log": LogSection,
    "policy": PolicySection,
    "dkim": DkimSection,
    "http": HttpSection,
    "archive": ArchiveSection,
}

TRANSPORTS = ("maildir", "smarthost", "mx")
TLS_MODES = ("opportunistic", "required", "verify", "none")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
CONTENT_MODES = ("off", "flag", "redact", "block")
# Attachment kinds that [policy] allowed_attachment_types accepts. The default
# allows all of them, and relaymail.policy sniffs each one from its bytes.
ATTACHMENT_KINDS = ("pdf", "jpeg", "png", "gif", "tiff", "bmp", "text", "csv", "word", "excel")


def resolve_path(cli_value: str | None) -> Path:
    """Return the configuration path from the option, else from RELAYMAIL_CONFIG."""
    value = cli_value or os.environ.get(ENV_VAR)
    if not value:
        raise ConfigError(
            f"no configuration file given: pass --config PATH or set {ENV_VAR} "
            "(config.example.toml is a working example)"
        )
    return Path(value)


def load(path: Path) -> Config:
    """Read, check and return the configuration in `path`."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from None
    return from_dict(data, base_dir=path.resolve().parent, path=path)


def from_dict(data: dict[str, Any], base_dir: Path, path: Path | None = None) -> Config:
    """Build and check a Config from parsed TOML data."""
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(
            f"unknown section [{unknown[0]}]: expected one of {', '.join(SECTIONS)}"
        )

    sections = {}
    for name, cls in SECTIONS.items():
        raw = data.get(name, {})
        if not isinstance(raw, dict):
            raise ConfigError(f"{name}: expected a table [{name}], got {raw!r}")
        sections[name] = _build_section(name, cls, raw)

    config = Config(**sections, path=path)
    config = _resolve_paths(config, base_dir)
    config = _resolve_dkim(config, base_dir)
    _check(config)
    check_dkim(config.dkim)
    return config


def _build_section(name: str, cls: type, raw: dict[str, Any]) -> Any:
    known = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(
                f"{name}.{key}: unknown key; expected one of {', '.join(sorted(known))}"
            )

        # A field whose type is itself a section is a sub-table such as [policy.content].
        nested = _nested_section_type(known[key])
        if nested is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"{name}.{key}: expected a table [{name}.{key}], got {value!r}")
            values[key] = _build_section(f"{name}.{key}", nested, value)
            continue

        values[key] = _coerce(f"{name}.{key}", value, known[key])
    return cls(**values)


def _nested_section_type(spec: dataclasses.Field) -> type | None:
    if spec.default_factory is dataclasses.MISSING:
        return None
    default = spec.default_factory()
    return type(default) if dataclasses.is_dataclass(default) else None


def _coerce(key: str, value: Any, spec: dataclasses.Field) -> Any:
    default = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()
    expected = type(default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if expected is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key} = {value!r}: expected a list of strings")
        return value
    if expected is dict:
        # An unquoted dotted key (example.com = "x") parses as a nested table, so
        # it fails here too, and the message shows how to quote it.
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise ConfigError(
                f"{key} = {value!r}: expected a table of strings, for example "
                '{ "name" = "value" }; quote keys that contain dots'
            )
        return dict(value)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(f"{key} = {value!r}: expected a {_type_name(expected)}")
    if expected in (int, float) and value < 0:
        raise ConfigError(f"{key} = {value!r}: expected a number >= 0")
    return value


def _type_name(expected: type) -> str:
    return {str: "string", int: "whole number", float: "number", bool: "boolean (true or false)"}.get(
        expected, expected.__name__
    )


def _resolve_paths(config: Config, base_dir: Path) -> Config:
    url = config.database.url
    prefix = "sqlite+aiosqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and ":memory:" not in url:
        url = prefix + str(base_dir / url[len(prefix):])

    maildir = config.delivery.maildir
    if maildir and not os.path.isabs(maildir):
        maildir = str(base_dir / maildir)

    tls_ca_file = config.delivery.tls_ca_file
    if tls_ca_file and not os.path.isabs(tls_ca_file):
        tls_ca_file = str(base_dir / tls_ca_file)

    patterns_path = config.policy.extra_patterns_path
    if patterns_path and not os.path.isabs(patterns_path):
        patterns_path = str(base_dir / patterns_path)

    return dataclasses.replace(
        config,
        database=dataclasses.replace(config.database, url=url),
        delivery=dataclasses.replace(config.delivery, maildir=maildir, tls_ca_file=tls_ca_file),
        policy=dataclasses.replace(config.policy, extra_patterns_path=patterns_path),
    )


def _resolve_dkim(config: Config, base_dir: Path) -> Config:
    dkim = config.dkim
    key_path = dkim.private_key_path
    if key_path and not os.path.isabs(key_path):
        key_path = str(base_dir / key_path)
    domain = dkim.domain or config.relay.domain
    return dataclasses.replace(config, dkim=dataclasses.replace(dkim, private_key_path=key_path, domain=domain))


# RFC 6376 section 5.4.1 advises against signing these, and dkimpy refuses to.
DKIM_UNSIGNABLE_HEADERS = ("return-path", "received", "comments", "keywords", "bcc", "resent-bcc", "dkim-signature")


def check_dkim(dkim: DkimSection) -> None:
    """Raise ConfigError unless the [dkim] values are valid (the key file is read later)."""
    if bool(dkim.selector) != bool(dkim.private_key_path):
        missing = "private_key_path" if dkim.selector else "selector"
        raise ConfigError(
            f"dkim.{missing}: expected both dkim.selector and dkim.private_key_path, or neither "
            "(signing is off without them); create a key with `relaymail dkim keygen`"
        )
    if dkim.selector and not is_selector(dkim.selector):
        raise ConfigError(
            f"dkim.selector = {dkim.selector!r}: expected one or more DNS labels of letters, "
            "digits and \"-\" separated by dots, for example \"mail2024\""
        )
    if not _is_domain_name(dkim.domain):
        raise ConfigError(f"dkim.domain = {dkim.domain!r}: expected a domain name such as \"marketplace.example\"")

    names = [name.lower() for name in dkim.headers]
    if "from" not in names:
        raise ConfigError(f"dkim.headers = {dkim.headers!r}: expected a list that includes \"From\" (RFC 6376 requires it)")
    for name in dkim.headers:
        if not name or any(not 33 <= ord(ch) <= 126 or ch == ":" for ch in name):
            raise ConfigError(f"dkim.headers: {name!r} is not a header field name")
        if name.lower() in DKIM_UNSIGNABLE_HEADERS:
            raise ConfigError(
                f"dkim.headers: {name!r} must not be signed; leave out {', '.join(DKIM_UNSIGNABLE_HEADERS)}"
            )


def is_selector(value: str) -> bool:
    """Return True if `value` has the form of a DKIM selector: dot-separated DNS labels."""
    return all(
        label and len(label) <= 63 and all(ch.isascii() and (ch.isalnum() or ch == "-") for ch in label)
        for label in value.split(".")
    )


def _check(config: Config) -> None:
    relay, smtp, delivery = config.relay, config.smtp, config.delivery

    if not relay.domain or "." not in relay.domain or "@" in relay.domain:
        raise ConfigError(
            f"relay.domain = {relay.domain!r}: expected the marketplace domain, "
            "for example \"marketplace.example\""
        )
    if not relay.hostname:
        raise ConfigError(
            f"relay.hostname = {relay.hostname!r}: expected this host's name, "
            f"for example \"mx.{relay.domain}\""
        )
    if len(relay.bounce_secret) < 16:
        raise ConfigError(
            "relay.bounce_secret: expected a random string of at least 16 characters "
            "(it signs bounce addresses); generate one with: python3 -c "
            "\"import secrets; print(secrets.token_hex(32))\""
        )
    for key in ("operators_address", "notice_address"):
        value = getattr(relay, key)
        if value and "@" not in value:
            raise ConfigError(f"relay.{key} = {value!r}: expected an e-mail address")

    split_host_port(smtp.listen, "smtp.listen")
    if smtp.max_message_bytes < 1024:
        raise ConfigError(f"smtp.max_message_bytes = {smtp.max_message_bytes}: expected at least 1024")
    if smtp.max_line_bytes < 1001:
        raise ConfigError(f"smtp.max_line_bytes = {smtp.max_line_bytes}: expected at least 1001")
    if not 1 <= smtp.max_recipients <= 1000:
        raise ConfigError(f"smtp.max_recipients = {smtp.max_recipients}: expected 1 to 1000")
    if bool(smtp.tls_cert_path) != bool(smtp.tls_key_path):
        raise ConfigError("smtp.tls_cert_path and smtp.tls_key_path: expected both or neither")

    url = config.database.url
    if not (url.startswith("sqlite+aiosqlite://") or url.startswith("postgresql+asyncpg://")):
        raise ConfigError(
            f"database.url = {url!r}: expected an SQLAlchemy async URL starting with "
            "\"sqlite+aiosqlite://\" or \"postgresql+asyncpg://\""
        )

    if delivery.transport not in TRANSPORTS:
        raise ConfigError(
            f"delivery.transport = {delivery.transport!r}: expected one of {', '.join(TRANSPORTS)}"
        )
    if delivery.transport == "maildir" and not delivery.maildir:
        raise ConfigError("delivery.maildir: expected a directory path when transport is \"maildir\"")
    if delivery.transport == "smarthost":
        split_host_port(delivery.smarthost, "delivery.smarthost")
    if delivery.tls not in TLS_MODES:
        raise ConfigError(f"delivery.tls = {delivery.tls!r}: expected one of {', '.join(TLS_MODES)}")
    _check_tls_policies(delivery.tls_policies)
    if delivery.tls_ca_file:
        _check_ca_file(delivery.tls_ca_file)
    for server in delivery.dns_nameservers:
        parse_nameserver(server)
    if not 1 <= delivery.mx_port <= 65535:
        raise ConfigError(f"delivery.mx_port = {delivery.mx_port}: expected a port from 1 to 65535")
    if delivery.max_connections_per_destination < 1:
        raise ConfigError(
            f"delivery.max_connections_per_destination = {delivery.max_connections_per_destination}: "
            "expected at least 1"
        )
    for key in ("connect_timeout_s", "dns_timeout_s", "data_timeout_s"):
        if getattr(delivery, key) <= 0:
            raise ConfigError(f"delivery.{key} = {getattr(delivery, key)}: expected a number of seconds > 0")
    if delivery.workers < 1:
        raise ConfigError(f"delivery.workers = {delivery.workers}: expected at least 1")
    if delivery.max_backoff_s < delivery.min_backoff_s:
        raise ConfigError(
            f"delivery.max_backoff_s = {delivery.max_backoff_s}: expected at least "
            f"delivery.min_backoff_s ({delivery.min_backoff_s})"
        )

    if config.log.level.upper() not in LOG_LEVELS:
        raise ConfigError(f"log.level = {config.log.level!r}: expected one of {', '.join(LOG_LEVELS)}")

    check_policy(config.policy)
    check_http(config.http)
    check_archive(config.archive)


def check_policy(policy: PolicySection) -> None:
    """Raise ConfigError unless every [policy] and [policy.content] value is valid.

    This also reads and compiles the extra patterns file, so a broken pattern
    is reported at start (or reload) instead of on the first message.
    """
    try:
        zoneinfo.ZoneInfo(policy.timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            f"policy.timezone = {policy.timezone!r}: expected an IANA time zone name, "
            "for example \"America/Mexico_City\""
        ) from None

    for key in ("order_window_days", "critical_order_days", "automatic_window_s"):
        if getattr(policy, key) < 1:
            raise ConfigError(f"policy.{key} = {getattr(policy, key)}: expected at least 1")

    for kind in policy.allowed_attachment_types:
        if kind not in ATTACHMENT_KINDS:
            raise ConfigError(
                f"policy.allowed_attachment_types: {kind!r} is not a known type; "
                f"expected any of {', '.join(ATTACHMENT_KINDS)}"
            )

    content = policy.content
    for key in ("emails", "phones", "links"):
        mode = getattr(content, key)
        if mode not in CONTENT_MODES:
            raise ConfigError(
                f"policy.content.{key} = {mode!r}: expected one of {', '.join(CONTENT_MODES)}"
            )
    for domain in content.links_allowlist:
        if not _is_domain_name(domain):
            raise ConfigError(
                f"policy.content.links_allowlist: {domain!r} is not a domain name; "
                "expected a bare name such as \"example.com\" (no scheme, path or \"@\")"
            )

    if policy.extra_patterns_path:
        # Imported here because relaymail.policy imports this module.
        from .policy import load_patterns

        try:
            load_patterns(policy.extra_patterns_path)
        except ConfigError as exc:
            raise ConfigError(f"policy.extra_patterns_path = {policy.extra_patterns_path!r}: {exc}") from None


def _is_domain_name(value: str, min_labels: int = 2) -> bool:
    labels = value.rstrip(".").split(".")
    if len(labels) < min_labels:
        return False
    return all(
        label and len(label) <= 63 and not label.startswith("-") and not label.endswith("-")
        and all(ch.isalnum() or ch == "-" for ch in label)
        for label in labels
    )


def _check_tls_policies(policies: dict[str, str]) -> None:
    for domain, mode in policies.items():
        # ".gov" (every domain under a top-level domain) is valid; a bare "gov" is not.
        if not _is_domain_name(domain.removeprefix("."), min_labels=1 if domain.startswith(".") else 2):
            raise ConfigError(
                f"delivery.tls_policies: {domain!r} is not a domain name; expected \"example.com\" "
                "(that domain only) or \".example.com\" (its subdomains)"
            )
        if mode not in TLS_MODES:
            raise ConfigError(
                f"delivery.tls_policies: {domain!r} = {mode!r}: expected one of {', '.join(TLS_MODES)}"
            )


def _check_ca_file(path: str) -> None:
    try:
        ssl.create_default_context(cafile=path)
    except FileNotFoundError:
        raise ConfigError(
            f"delivery.tls_ca_file = {path!r}: file not found; expected a PEM file of CA "
            "certificates, or \"\" for the system CA store"
        ) from None
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"delivery.tls_ca_file = {path!r}: cannot load CA certificates from it: {exc}"
        ) from None


def parse_nameserver(value: str) -> tuple[str, int]:
    """Split a [delivery] dns_nameservers entry into (ip, port); the port defaults to 53.

    Accepted forms: "192.0.2.1", "192.0.2.1:5353", "2001:db8::1" and "[2001:db8::1]:5353".
    """
    host, port = value, "53"
    if value.startswith("["):
        host, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            host = ""
        port = rest[1:] if rest else "53"
    elif value.count(":") == 1:
        host, port = value.split(":")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(
            f"delivery.dns_nameservers: {value!r} is not an IP address; expected \"ip\", \"ip:port\" "
            "or \"[ipv6]:port\""
        ) from None
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"delivery.dns_nameservers: {value!r} has an invalid port; expected 1 to 65535")
    return host, int(port)


def split_host_port(value: str, key: str) -> tuple[str, int]:
    """Split "host:port" (or "[v6]:port"); raise ConfigError naming `key` if invalid."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"{key} = {value!r}: expected \"host:port\", for example \"127.0.0.1:2525\"")
    return host, int(port)


MIN_SECRET_CHARS = 16


def check_http(http: HttpSection) -> None:
    """Raise ConfigError unless every [http] value is valid.

    Port 0 in `listen` takes a free port from the system (for tests).
    """
    host, _, port = http.listen.rpartition(":")
    if not host.strip("[]") or not port.isdigit() or int(port) > 65535:
        raise ConfigError(
            f"http.listen = {http.listen!r}: expected \"host:port\", for example \"127.0.0.1:8025\""
        )

    parsed = urllib.parse.urlsplit(http.public_url)
    # The URL goes into text and HTML parts of messages as it is, so it must be plain ASCII
    # without spaces, quotes or angle brackets (an IDN host goes in its xn-- form).
    plain = all(33 <= ord(char) < 127 and char not in "\"'<>" for char in http.public_url)
    if not plain or parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.query or parsed.fragment:
        raise ConfigError(
            f"http.public_url = {http.public_url!r}: expected the server's base URL as sellers "
            "reach it, for example \"https://relay.marketplace.example\" (ASCII, no query or fragment)"
        )

    for key in ("api_token", "link_secret"):
        value = getattr(http, key)
        if value and len(value) < MIN_SECRET_CHARS:
            raise ConfigError(
                f"http.{key}: expected empty (off) or a random string of at least "
                f"{MIN_SECRET_CHARS} characters; generate one with: python3 -c "
                "\"import secrets; print(secrets.token_hex(32))\""
            )
    if http.link_ttl_s < 60:
        raise ConfigError(f"http.link_ttl_s = {http.link_ttl_s}: expected at least 60 seconds")


def check_archive(archive: ArchiveSection) -> None:
    """Raise ConfigError unless every [archive] value is valid."""
    if archive.retention_days < 1:
        raise ConfigError(f"archive.retention_days = {archive.retention_days}: expected at least 1")
