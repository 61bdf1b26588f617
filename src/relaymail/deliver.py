"""Transports: hand one message to one recipient, or raise a DeliveryError.

`Transport.send(sender, recipient, data)` returns a `SendResult` on success and
raises `SoftDeliveryError` (retry later) or `HardDeliveryError` (bounce). The
kind of failure is decided here, from the reply code or the exception type,
never by matching reply text elsewhere. Delivery never interprets content: the
bytes are the final rewritten message for that recipient.

Transports:
    maildir     a local Maildir; each message is written to tmp/, fsynced and
                renamed into new/ (the Maildir protocol), then the directory is fsynced.
    smarthost   one SMTP next hop ([delivery] smarthost, "host:port"), optional AUTH.
    mx          the SMTP servers named by the recipient domain's MX records.

SMTP delivery (smarthost and mx):
    Connections are pooled per next hop, that is per (host, port, TLS mode). A
    connection is reused for the next message to the same next hop and closed
    after `connection_idle_s` unused. At most `max_connections_per_destination`
    connections to one next hop are open at a time; further messages to it wait
    for one. Pools are independent, so within the transport a slow or failing
    next hop delays only its own messages. The queue's `workers` limit is
    shared by all next hops, though.

    TLS modes ([delivery] tls, and tls_policies per recipient domain for mx):
    none           never STARTTLS.
    opportunistic  STARTTLS when the server offers it, certificate not checked;
                   if the TLS handshake fails, the message goes over a new
                   plaintext connection.
    required       STARTTLS must be offered and succeed, certificate not checked.
    verify         as required, and the certificate must chain to tls_ca_file
                   (else the system CA store) and match the next hop's name: the
                   MX host name as found in DNS, or the smarthost host.
    A next hop that does not satisfy "required" or "verify" is a temporary
    failure, so the message is retried and never sent in plaintext.

    A 5xx reply to MAIL FROM, RCPT TO or DATA is permanent and a 4xx reply is
    temporary. A host that cannot be used at all is a temporary failure, and
    the mx transport then tries the next address or MX host. Such failures are
    a refused or timed-out connection, a 4xx or 5xx greeting, rejected EHLO and
    HELO, an unmet TLS mode, a lost connection and a 421 reply at any stage.

MX resolution (RFC 5321 section 5.1, RFC 7505) makes every lookup through one
dnspython resolver. When [delivery] dns_nameservers is set, that resolver
queries only those servers, never the system's.
    Hosts are tried best preference first, in random order within one
    preference. With no MX record the domain itself is the only host.
    Each host's addresses are looked up as A, then AAAA. A null MX ("0 .") and
    NXDOMAIN are permanent; SERVFAIL, refused queries and timeouts are temporary.
    MX hosts named [relay] hostname are dropped with all of equal or worse
    preference, as RFC 5321 requires. A host under another name that resolves
    to this relay's own address is not detected.
    Addresses that cannot name a remote host are never connected to:
    unspecified (0.0.0.0/8, ::), multicast and the IPv4 reserved range
    240.0.0.0/4, which holds the broadcast address. Loopback addresses are
    allowed, because the tests deliver to servers on 127.0.0.0/8.
    At most MAX_CONNECTION_ATTEMPTS connections are opened per delivery
    attempt, not counting the plaintext reconnect of opportunistic TLS.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import random
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import aiosmtplib
import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.resolver

from .config import TLS_MODES, Config, parse_nameserver, split_host_port
from .errors import HardDeliveryError, SoftDeliveryError
from .log import fields

log = logging.getLogger(__name__)

# Connections one mx delivery attempt may open, over all MX hosts and addresses.
# It bounds how long one attempt keeps a queue worker busy (this many connect
# timeouts at most); a message whose hosts all fail within it is retried later.
# NOTE: the value is a judgment call, not derived from measurements.
MAX_CONNECTION_ATTEMPTS = 5
QUIT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class SendResult:
    """The next hop's acceptance of one message.

    `tls` is the TLS version and cipher of the connection, for example
    "TLSv1.3 TLS_AES_256_GCM_SHA384", or "" when the message went in plaintext.
    """

    host: str
    code: int
    text: str
    tls: str = ""


class Transport:
    name = "transport"

    async def send(self, sender: str, recipient: str, data: bytes) -> SendResult:
        raise NotImplementedError

    async def close(self) -> None:
        return None


# --- maildir ----------------------------------------------------------------


class MaildirTransport(Transport):
    """Deliver into one local Maildir (for trying relaymail out and for tests)."""

    name = "maildir"

    def __init__(self, path: str):
        self.path = Path(path)
        self._counter = 0
        for sub in ("tmp", "new", "cur"):
            (self.path / sub).mkdir(parents=True, exist_ok=True)

    async def send(self, sender: str, recipient: str, data: bytes) -> SendResult:
        self._counter += 1
        name = f"{time.time():.6f}.P{os.getpid()}Q{self._counter}.{socket.gethostname()}"
        prefix = f"Return-Path: <{sender}>\r\nDelivered-To: {recipient}\r\n".encode()
        try:
            await asyncio.to_thread(self._write, name, prefix + data)
        except OSError as exc:
            raise SoftDeliveryError(f"cannot write to Maildir {self.path}: {exc}", host="maildir") from exc
        return SendResult(host="maildir", code=250, text=f"delivered to Maildir as {name}")

    def _write(self, name: str, data: bytes) -> None:
        tmp = self.path / "tmp" / name
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.rename(tmp, self.path / "new" / name)
        directory = os.open(self.path / "new", os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


# --- SMTP errors --------------------------------------------------------------


class HostUnusableError(SoftDeliveryError):
    """This next hop (one address or one MX host) cannot take the message now; another may.

    `no_address` is set when DNS returns no usable address for the host. A
    domain whose MX hosts all lack addresses is a permanent failure.
    """

    def __init__(self, text: str, code: int | None = None, host: str | None = None, no_address: bool = False):
        super().__init__(text, code=code, host=host)
        self.no_address = no_address


class _StaleConnectionError(Exception):
    """A reused connection turned out to be closed before MAIL FROM was accepted."""


def _reply_error(code: int, text: str, host: str, command: str) -> SoftDeliveryError | HardDeliveryError:
    text = " ".join(str(text).split())
    message = f"{host} replied {code} {text} to {command}"
    if 500 <= code < 600:
        return HardDeliveryError(message, code=code, host=host)
    return SoftDeliveryError(message, code=code, host=host)


def _host_error(exc: BaseException, host: str, doing: str) -> HostUnusableError:
    """Turn a connection-level failure while `doing` something into a HostUnusableError."""
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        text = " ".join(str(exc.message).split())
        return HostUnusableError(f"{host} replied {exc.code} {text} to {doing}", code=exc.code, host=host)
    if isinstance(exc, (aiosmtplib.SMTPTimeoutError, asyncio.TimeoutError)):
        return HostUnusableError(f"{host} timed out during {doing}", host=host)
    if isinstance(exc, aiosmtplib.SMTPServerDisconnected):
        return HostUnusableError(f"{host} closed the connection during {doing}", host=host)
    detail = " ".join(str(exc).split()) or type(exc).__name__
    return HostUnusableError(f"{doing} with {host} failed: {detail}", host=host)


# --- TLS ----------------------------------------------------------------------


def make_tls_context(mode: str, ca_file: str = "") -> ssl.SSLContext | None:
    """Return the client TLS context of a [delivery] tls mode (None for "none")."""
    if mode == "none":
        return None
    if mode == "verify":
        # With a cafile, only that file is trusted; without one, the system CA store.
        return ssl.create_default_context(cafile=ca_file or None)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _tls_description(client: aiosmtplib.SMTP) -> str:
    ssl_object = client.get_transport_info("ssl_object")
    if ssl_object is None:
        return ""
    cipher = ssl_object.cipher()
    return f"{ssl_object.version()} {cipher[0]}" if cipher else str(ssl_object.version())


# --- SMTP sessions and pools --------------------------------------------------


@dataclass(frozen=True)
class SmtpSettings:
    """Settings shared by every SMTP connection of one transport."""

    local_hostname: str
    connect_timeout_s: float
    data_timeout_s: float
    idle_s: float
    max_connections: int
    tls_contexts: dict[str, ssl.SSLContext | None]
    username: str = ""
    password: str = ""


class SmtpConnection:
    """One SMTP session after EHLO (and STARTTLS and AUTH when they apply), ready for MAIL FROM."""

    def __init__(self, client: aiosmtplib.SMTP, label: str):
        self.client = client
        self.label = label
        self.tls = _tls_description(client)
        self.idle_timer: asyncio.TimerHandle | None = None


class ConnectionBudget:
    """The number of connections one delivery attempt may still open."""

    def __init__(self, limit: int):
        self.limit = limit
        self.remaining = limit

    def take(self, host: str) -> None:
        if self.remaining <= 0:
            raise HostUnusableError(
                f"not trying {host}: this attempt already opened {self.limit} connections", host=host
            )
        self.remaining -= 1


AddressLookup = Callable[[], Awaitable[list[str]]]


class SmtpPool:
    """Connections to one next hop (host, port, TLS mode), reused and limited in number.

    At most `settings.max_connections` connections are open at a time: each
    `send` holds one slot of the semaphore, and idle connections only come from
    finished sends, so idle plus busy connections never exceed the limit.
    """

    def __init__(self, host: str, port: int, tls_mode: str, settings: SmtpSettings, on_unused: Callable[[], None]):
        self.host = host
        self.port = port
        self.tls_mode = tls_mode
        self.settings = settings
        self._on_unused = on_unused
        self._slots = asyncio.Semaphore(settings.max_connections)
        self._idle: list[SmtpConnection] = []
        self._users = 0
        self._closing: set[asyncio.Task] = set()
        self._closed = False

    @property
    def unused(self) -> bool:
        return self._users == 0 and not self._idle

    async def send(
        self, sender: str, recipient: str, data: bytes, addresses: AddressLookup, budget: ConnectionBudget
    ) -> SendResult:
        """Send one message over an idle or a new connection.

        `addresses` is called only when a new connection is needed; the
        addresses are tried in order. Raises HostUnusableError when no
        connection could be used, else a DeliveryError classified by reply code.
        """
        self._users += 1
        try:
            async with self._slots:
                connection = self._take_idle()
                if connection is not None:
                    try:
                        return await self._transact(connection, sender, recipient, data, reused=True)
                    except _StaleConnectionError:
                        log.debug(fields(event="smtp_stale_connection", host=connection.label))
                connection = await self._open(await addresses(), budget)
                return await self._transact(connection, sender, recipient, data, reused=False)
        finally:
            self._users -= 1
            if self.unused:
                self._on_unused()

    async def close(self) -> None:
        """Close idle connections (QUIT) and every connection released from now on."""
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            self._cancel_timer(connection)
        await asyncio.gather(*(_quit(c.client) for c in idle), *self._closing, return_exceptions=True)

    # --- opening ---

    async def _open(self, addresses: list[str], budget: ConnectionBudget) -> SmtpConnection:
        if not addresses:
            raise HostUnusableError(f"{self.host} has no usable address", host=self.host, no_address=True)
        for index, address in enumerate(addresses):
            budget.take(self.host)
            try:
                return await self._connect(address, try_tls=self.tls_mode != "none")
            except HostUnusableError as exc:
                if index == len(addresses) - 1:
                    raise
                # The caller logs the last failure; earlier ones are logged here.
                log.info(fields(event="smtp_address_failed", host=exc.host, error=exc.text))
        raise AssertionError("unreachable: the loop returns or raises")

    def _label(self, address: str) -> str:
        return f"{self.host}:{self.port}" if address == self.host else f"{self.host}[{address}]:{self.port}"

    async def _connect(self, address: str, try_tls: bool) -> SmtpConnection:
        label = self._label(address)
        client = aiosmtplib.SMTP(
            hostname=address,
            port=self.port,
            local_hostname=self.settings.local_hostname,
            timeout=self.settings.connect_timeout_s,
            start_tls=False,
        )
        doing = "the connection"
        try:
            await client.connect()
            doing = "EHLO"
            await _hello(client)
            if try_tls:
                doing = "STARTTLS"
                if not await self._start_tls(client, label):
                    # The handshake failed and the connection is gone: opportunistic
                    # TLS then sends in plaintext over a new connection.
                    client.close()
                    return await self._connect(address, try_tls=False)
            if self.settings.username:
                doing = "AUTH"
                await client.login(self.settings.username, self.settings.password)
        except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError) as exc:
            client.close()
            raise _host_error(exc, label, doing) from exc
        except BaseException:
            # HostUnusableError from the TLS policy, or cancellation: never leave the socket open.
            client.close()
            raise
        log.debug(fields(event="smtp_connected", host=label, tls=_tls_description(client) or "none"))
        return SmtpConnection(client, label)

    async def _start_tls(self, client: aiosmtplib.SMTP, label: str) -> bool:
        """Run STARTTLS as the TLS mode demands; return False when opportunistic TLS must reconnect."""
        enforced = self.tls_mode in ("required", "verify")
        if not client.supports_extension("starttls"):
            if enforced:
                raise HostUnusableError(
                    f"{label} does not offer STARTTLS, which TLS mode {self.tls_mode!r} requires", host=label
                )
            return True

        try:
            await client.starttls(server_hostname=self.host, tls_context=self.settings.tls_contexts[self.tls_mode])
        except aiosmtplib.SMTPResponseException as exc:
            # A refused STARTTLS command leaves the plaintext session usable.
            if enforced:
                raise _host_error(exc, label, "STARTTLS") from exc
            log.warning(fields(event="tls_refused", host=label, code=exc.code, status="sending in plaintext"))
            return True
        except (ssl.SSLError, ssl.CertificateError, OSError, aiosmtplib.SMTPException, asyncio.TimeoutError) as exc:
            if enforced:
                raise _host_error(exc, label, "the TLS handshake") from exc
            log.warning(fields(event="tls_failed", host=label, error=str(exc), status="retrying in plaintext"))
            return False

        await _hello(client)
        return True

    # --- sending ---

    async def _transact(
        self, connection: SmtpConnection, sender: str, recipient: str, data: bytes, reused: bool
    ) -> SendResult:
        client, label = connection.client, connection.label
        try:
            mail_options, encoding = _mail_options(client, label, sender, recipient, data)
        except HardDeliveryError:
            self._release(connection)
            raise

        command = "MAIL FROM"
        try:
            await client.mail(sender, options=mail_options, encoding=encoding)
            command = "RCPT TO"
            await client.rcpt(recipient, encoding=encoding)
            command = "DATA"
            reply = await client.data(data, timeout=self.settings.data_timeout_s)
        except aiosmtplib.SMTPResponseException as exc:
            if exc.code == 421:
                # 421: the server is closing the connection; another host may work.
                self._discard(connection)
                raise _host_error(exc, label, command) from exc
            await self._reset_and_release(connection)
            raise _reply_error(exc.code, exc.message, label, command) from exc
        except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError) as exc:
            self._discard(connection)
            if reused and command == "MAIL FROM" and isinstance(exc, ConnectionError):
                raise _StaleConnectionError() from exc
            raise _host_error(exc, label, command) from exc
        except ValueError as exc:
            # aiosmtplib rejects an address it cannot quote before sending anything.
            self._discard(connection)
            raise HardDeliveryError(f"cannot send {command} to {label}: {exc}", host=label) from exc
        except BaseException:
            self._discard(connection)
            raise

        self._release(connection)
        return SendResult(host=label, code=reply.code, text=" ".join(reply.message.split()), tls=connection.tls)

    # --- idle connections ---

    def _take_idle(self) -> SmtpConnection | None:
        while self._idle:
            connection = self._idle.pop()
            self._cancel_timer(connection)
            if connection.client.is_connected:
                return connection
        return None

    def _release(self, connection: SmtpConnection) -> None:
        if self._closed or not connection.client.is_connected:
            self._retire(connection)
            return
        loop = asyncio.get_running_loop()
        connection.idle_timer = loop.call_later(self.settings.idle_s, self._expire, connection)
        self._idle.append(connection)

    async def _reset_and_release(self, connection: SmtpConnection) -> None:
        try:
            await asyncio.wait_for(connection.client.rset(), timeout=self.settings.connect_timeout_s)
        except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError):
            self._discard(connection)
            return
        self._release(connection)

    def _expire(self, connection: SmtpConnection) -> None:
        if connection in self._idle:
            self._idle.remove(connection)
            self._retire(connection)
            if self.unused:
                self._on_unused()

    def _retire(self, connection: SmtpConnection) -> None:
        """Close a connection that is between transactions: QUIT in the background."""
        self._cancel_timer(connection)
        if not connection.client.is_connected:
            connection.client.close()
            return
        task = asyncio.get_running_loop().create_task(_quit(connection.client))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _discard(self, connection: SmtpConnection) -> None:
        """Close a broken connection, or one in the middle of a command, without QUIT."""
        self._cancel_timer(connection)
        connection.client.close()

    @staticmethod
    def _cancel_timer(connection: SmtpConnection) -> None:
        if connection.idle_timer is not None:
            connection.idle_timer.cancel()
            connection.idle_timer = None


async def _hello(client: aiosmtplib.SMTP) -> None:
    """Send EHLO, and HELO if the server rejects EHLO (RFC 5321 section 3.2)."""
    try:
        await client.ehlo()
    except aiosmtplib.SMTPHeloError:
        if not client.is_connected:
            raise
        await client.helo()


def _mail_options(client: aiosmtplib.SMTP, label: str, sender: str, recipient: str, data: bytes) -> tuple[list[str], str]:
    """Return the MAIL FROM parameters and the address encoding for this message and server."""
    options: list[str] = []
    encoding = "ascii"

    if client.supports_extension("size"):
        limit = client.esmtp_extensions.get("size", "")
        if limit.isdigit() and 0 < int(limit) < len(data):
            raise HardDeliveryError(
                f"{label} accepts messages of at most {limit} bytes (SIZE); this one has {len(data)}",
                host=label,
            )
        options.append(f"SIZE={len(data)}")

    # NOTE: an 8-bit body goes as it is to a server without 8BITMIME, because
    # delivery never converts content; such servers are rare today.
    if client.supports_extension("8bitmime") and not data.isascii():
        options.append("BODY=8BITMIME")

    if not (sender.isascii() and recipient.isascii()):
        if not client.supports_extension("smtputf8"):
            raise HardDeliveryError(
                f"{label} does not support SMTPUTF8, which this non-ASCII address requires (RFC 6531)",
                host=label,
            )
        options.append("SMTPUTF8")
        encoding = "utf-8"
    return options, encoding


async def _quit(client: aiosmtplib.SMTP) -> None:
    try:
        if client.is_connected:
            await asyncio.wait_for(client.quit(), timeout=QUIT_TIMEOUT_S)
    except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError):
        pass
    finally:
        client.close()


class _PooledSmtpTransport(Transport):
    """Base of the SMTP transports: one SmtpPool per next hop, dropped when it has no connection left."""

    def __init__(self, config: Config, username: str = "", password: str = ""):
        delivery = config.delivery
        self.settings = SmtpSettings(
            local_hostname=config.relay.hostname,
            connect_timeout_s=delivery.connect_timeout_s,
            data_timeout_s=delivery.data_timeout_s,
            idle_s=delivery.connection_idle_s,
            max_connections=delivery.max_connections_per_destination,
            tls_contexts={mode: make_tls_context(mode, delivery.tls_ca_file) for mode in TLS_MODES},
            username=username,
            password=password,
        )
        self._pools: dict[tuple[str, int, str], SmtpPool] = {}

    def pool(self, host: str, port: int, tls_mode: str) -> SmtpPool:
        key = (host, port, tls_mode)
        pool = self._pools.get(key)
        if pool is None:
            pool = SmtpPool(host, port, tls_mode, self.settings, on_unused=lambda: self._forget(key))
            self._pools[key] = pool
        return pool

    def _forget(self, key: tuple[str, int, str]) -> None:
        pool = self._pools.get(key)
        if pool is not None and pool.unused:
            del self._pools[key]

    async def close(self) -> None:
        pools, self._pools = list(self._pools.values()), {}
        await asyncio.gather(*(pool.close() for pool in pools))


# --- smarthost ----------------------------------------------------------------


class SmarthostTransport(_PooledSmtpTransport):
    """Every message goes to [delivery] smarthost; its host name is resolved by the system resolver."""

    name = "smarthost"

    def __init__(self, config: Config):
        delivery = config.delivery
        super().__init__(config, delivery.smarthost_username, delivery.smarthost_password)
        self.host, self.port = split_host_port(delivery.smarthost, "delivery.smarthost")
        self.tls_mode = delivery.tls
        if delivery.smarthost_starttls and self.tls_mode in ("none", "opportunistic"):
            self.tls_mode = "required"

    async def send(self, sender: str, recipient: str, data: bytes) -> SendResult:
        pool = self.pool(self.host, self.port, self.tls_mode)
        budget = ConnectionBudget(1)
        return await pool.send(sender, recipient, data, _fixed_addresses([self.host]), budget)


def _fixed_addresses(addresses: list[str]) -> AddressLookup:
    async def lookup() -> list[str]:
        return addresses

    return lookup


# --- MX -----------------------------------------------------------------------


_IPV4_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")


def is_connectable(address: str) -> bool:
    """Return False for addresses that name no remote host (see the module docstring)."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified or ip.is_multicast:
        return False
    if isinstance(ip, ipaddress.IPv4Address) and (ip in _IPV4_THIS_NETWORK or ip.is_reserved):
        return False
    return True


def normalize_domain(domain: str) -> str:
    """Return `domain` in lower-case ASCII (IDNA A-labels), without the final dot.

    Raises HardDeliveryError when it is not a valid domain name.
    """
    try:
        name = dns.name.from_text(domain.rstrip(".") + ".")
    except dns.exception.DNSException as exc:
        raise HardDeliveryError(f"recipient domain {domain!r} is not a valid domain name: {exc}") from None
    return name.to_text(omit_final_dot=True).lower()


@dataclass(frozen=True)
class MxHost:
    """One host to try: an MX exchange, the domain itself, or the IP address of an address literal."""

    name: str
    preference: int
    literal_address: str = ""


class MxResolver:
    """DNS lookups of the mx transport, all through one dnspython resolver."""

    def __init__(self, nameservers: list[str], timeout_s: float, own_hostname: str = ""):
        self.resolver = dns.asyncresolver.Resolver(configure=not nameservers)
        if nameservers:
            self.resolver.nameservers = [
                dns.nameserver.Do53Nameserver(*parse_nameserver(value)) for value in nameservers
            ]
        self.resolver.lifetime = timeout_s
        self.own_hostname = own_hostname.rstrip(".").lower()

    async def hosts(self, domain: str) -> list[MxHost]:
        """Return the hosts to try for `domain` (normalized), best first.

        Raises HardDeliveryError for NXDOMAIN, a null MX and an MX list that
        loops back to this relay; SoftDeliveryError for a failed lookup.
        """
        if domain.startswith("[") and domain.endswith("]"):
            address = _address_literal(domain)
            return [MxHost(address, 0, literal_address=address)]

        try:
            answer = await self.resolver.resolve(domain + ".", "MX", search=False)
        except dns.resolver.NXDOMAIN:
            raise HardDeliveryError(f"domain {domain} does not exist (DNS NXDOMAIN)") from None
        except dns.resolver.NoAnswer:
            # No MX record: the domain itself is the host (RFC 5321 section 5.1).
            return [MxHost(domain, 0)]
        except dns.exception.DNSException as exc:
            raise SoftDeliveryError(f"DNS lookup of MX for {domain} failed: {exc}") from None

        hosts = [
            MxHost(record.exchange.to_text(omit_final_dot=True).lower(), record.preference)
            for record in answer
            if record.exchange != dns.name.root
        ]
        if not hosts:
            raise HardDeliveryError(f"domain {domain} accepts no mail (null MX, RFC 7505)")
        return self._drop_own_host(domain, _order_by_preference(hosts))

    def _drop_own_host(self, domain: str, hosts: list[MxHost]) -> list[MxHost]:
        own = [host.preference for host in hosts if host.name == self.own_hostname]
        if not own:
            return hosts
        better = [host for host in hosts if host.preference < min(own)]
        if not better:
            raise HardDeliveryError(
                f"mail for {domain} loops back to this relay: its best MX host is {self.own_hostname}"
            )
        return better

    async def addresses(self, host: MxHost) -> list[str]:
        """Return the connectable addresses of `host`: IPv4 first, then IPv6.

        Raises HostUnusableError when a lookup fails temporarily.
        """
        if host.literal_address:
            found = [host.literal_address]
        else:
            found = []
            for rdtype in ("A", "AAAA"):
                found += await self._lookup_addresses(host.name, rdtype)
        usable = [address for address in found if is_connectable(address)]
        skipped = sorted(set(found) - set(usable))
        if skipped:
            log.warning(fields(event="mx_address_skipped", host=host.name, addresses=" ".join(skipped)))
        return usable

    async def _lookup_addresses(self, name: str, rdtype: str) -> list[str]:
        try:
            answer = await self.resolver.resolve(name + ".", rdtype, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.exception.DNSException as exc:
            raise HostUnusableError(f"DNS lookup of {rdtype} for {name} failed: {exc}", host=name) from None
        return [record.to_text() for record in answer]


def _order_by_preference(hosts: list[MxHost]) -> list[MxHost]:
    ordered: list[MxHost] = []
    hosts = sorted(hosts, key=lambda host: host.preference)
    for _preference, group in groupby(hosts, key=lambda host: host.preference):
        same = list(group)
        random.shuffle(same)
        ordered += same
    return ordered


def _address_literal(domain: str) -> str:
    """Return the IP address of an address literal such as [192.0.2.1] or [IPv6:2001:db8::1]."""
    inner = domain[1:-1]
    if inner.lower().startswith("ipv6:"):
        inner = inner[5:]
    try:
        return str(ipaddress.ip_address(inner))
    except ValueError:
        raise HardDeliveryError(f"recipient domain {domain} is not a valid address literal") from None


class MxTransport(_PooledSmtpTransport):
    """Deliver to the MX hosts of the recipient's domain."""

    name = "mx"

    def __init__(self, config: Config):
        super().__init__(config)
        delivery = config.delivery
        self.port = delivery.mx_port
        self.default_tls = delivery.tls
        self.tls_policies: dict[str, str] = {}
        self.subdomain_tls_policies: dict[str, str] = {}
        for key, mode in delivery.tls_policies.items():
            if key.startswith("."):
                self.subdomain_tls_policies[normalize_domain(key[1:])] = mode
            else:
                self.tls_policies[normalize_domain(key)] = mode
        self.resolver = MxResolver(delivery.dns_nameservers, delivery.dns_timeout_s, config.relay.hostname)

    def tls_mode(self, domain: str) -> str:
        """Return the TLS mode for a normalized recipient domain.

        An exact entry wins; else the nearest ".parent" entry; else [delivery] tls.
        """
        if domain in self.tls_policies:
            return self.tls_policies[domain]
        labels = domain.split(".")
        for start in range(1, len(labels)):
            parent = ".".join(labels[start:])
            if parent in self.subdomain_tls_policies:
                return self.subdomain_tls_policies[parent]
        return self.default_tls

    async def send(self, sender: str, recipient: str, data: bytes) -> SendResult:
        local_part, at, domain = recipient.rpartition("@")
        if not at or not local_part or not domain:
            raise HardDeliveryError(f"recipient {recipient!r} has no domain")
        if not domain.startswith("["):
            domain = normalize_domain(domain)
        tls_mode = self.tls_mode(domain)
        hosts = await self.resolver.hosts(domain)

        budget = ConnectionBudget(MAX_CONNECTION_ATTEMPTS)
        failures: list[HostUnusableError] = []
        for host in hosts:
            pool = self.pool(host.name, self.port, tls_mode)
            try:
                return await pool.send(sender, recipient, data, self._address_lookup(host), budget)
            except HostUnusableError as exc:
                failures.append(exc)
                log.info(fields(event="mx_host_failed", domain=domain, host=exc.host or host.name, error=exc.text))
        raise _all_hosts_failed(domain, hosts, failures)

    def _address_lookup(self, host: MxHost) -> AddressLookup:
        async def lookup() -> list[str]:
            return await self.resolver.addresses(host)

        return lookup


def _all_hosts_failed(domain: str, hosts: list[MxHost], failures: list[HostUnusableError]) -> Exception:
    if failures and all(failure.no_address for failure in failures):
        if len(hosts) == 1 and hosts[0].name == domain:
            return HardDeliveryError(f"domain {domain} has no MX record and no usable A or AAAA record")
        return HardDeliveryError(f"no MX host of {domain} has a usable address (A or AAAA record)")
    last = failures[-1]
    tried = ", ".join(host.name for host in hosts)
    return SoftDeliveryError(
        f"no MX host of {domain} took the message ({tried}); last error: {last.text}",
        code=last.code,
        host=last.host,
    )


def make_transport(config: Config) -> Transport:
    """Return the transport named by [delivery] transport."""
    kind = config.delivery.transport
    if kind == "maildir":
        return MaildirTransport(config.delivery.maildir)
    if kind == "smarthost":
        return SmarthostTransport(config)
    return MxTransport(config)
