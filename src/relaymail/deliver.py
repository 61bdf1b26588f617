"""Transports: hand one message to one recipient, or raise a DeliveryError.

`Transport.send(sender, recipient, data)` returns a `SendResult` on success and
raises `SoftDeliveryError` (retry later) or `HardDeliveryError` (bounce). The
kind of failure is decided here, from the reply code or the exception type,
never by matching reply text elsewhere. Delivery never interprets content: the
bytes are the final rewritten message for that recipient.

Transports:
    maildir     a local Maildir; each message is written to tmp/, fsynced and
                renamed into new/ (the Maildir protocol), then the directory is fsynced.
    smarthost   one SMTP next hop (host:port), STARTTLS as configured, optional
                AUTH; connections are reused through a small pool.
    mx          MX lookup with dnspython, then A/AAAA when there is no MX
                (RFC 5321 section 5.1); a null MX (RFC 7505) and NXDOMAIN are
                permanent, SERVFAIL and timeouts temporary; hosts are tried in
                preference order and the next one on a connection failure.

Limits: no per-destination connection limit yet; the mx transport opens a new
connection for every message.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib
import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from .config import Config, split_host_port
from .errors import HardDeliveryError, SoftDeliveryError
from .log import fields

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SendResult:
    host: str
    code: int
    text: str


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


# --- SMTP -------------------------------------------------------------------


def _tls_options(mode: str) -> dict:
    """Map [delivery] tls to aiosmtplib options."""
    if mode == "none":
        return {"start_tls": False}
    if mode == "required":
        return {"start_tls": True, "validate_certs": False}
    if mode == "verify":
        return {"start_tls": True, "validate_certs": True}
    return {"start_tls": None, "validate_certs": False}  # opportunistic


def _classify(exc: BaseException, host: str) -> Exception:
    """Turn an aiosmtplib or socket error into a Soft- or HardDeliveryError."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused) and exc.recipients:
        first = exc.recipients[0]
        return _by_code(first.code, first.message, host)
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return _by_code(exc.code, exc.message, host)
    if isinstance(exc, (aiosmtplib.SMTPConnectError, aiosmtplib.SMTPTimeoutError, aiosmtplib.SMTPServerDisconnected)):
        return SoftDeliveryError(f"connection to {host} failed: {exc}", host=host)
    if isinstance(exc, (OSError, asyncio.TimeoutError, ssl.SSLError, aiosmtplib.SMTPException)):
        return SoftDeliveryError(f"connection to {host} failed: {exc}", host=host)
    return exc if isinstance(exc, Exception) else SoftDeliveryError(str(exc), host=host)


def _by_code(code: int, text: str, host: str) -> Exception:
    text = " ".join(str(text).split())
    if 500 <= code < 600:
        return HardDeliveryError(f"{host} said: {code} {text}", code=code, host=host)
    return SoftDeliveryError(f"{host} said: {code} {text}", code=code, host=host)


class SmtpConnectionPool:
    """Idle SMTP connections to one next hop, reused for later messages."""

    def __init__(self, host: str, port: int, options: dict, max_idle: int = 10):
        self.host = host
        self.port = port
        self.options = options
        self.max_idle = max_idle
        self._idle: list[aiosmtplib.SMTP] = []

    async def acquire(self) -> aiosmtplib.SMTP:
        while self._idle:
            client = self._idle.pop()
            if client.is_connected:
                return client
        client = aiosmtplib.SMTP(hostname=self.host, port=self.port, **self.options)
        await client.connect()
        return client

    async def release(self, client: aiosmtplib.SMTP, reusable: bool) -> None:
        if reusable and client.is_connected and len(self._idle) < self.max_idle:
            self._idle.append(client)
            return
        await _quietly_close(client)

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for client in idle:
            await _quietly_close(client)


async def _quietly_close(client: aiosmtplib.SMTP) -> None:
    try:
        if client.is_connected:
            await asyncio.wait_for(client.quit(), timeout=5)
    except Exception:  # noqa: BLE001 - closing a broken connection may fail in any way
        client.close()


async def smtp_send(pool: SmtpConnectionPool, sender: str, recipient: str, data: bytes) -> SendResult:
    """Send over a pooled connection; raise a classified DeliveryError on failure."""
    label = f"{pool.host}:{pool.port}"
    try:
        client = await pool.acquire()
    except Exception as exc:  # noqa: BLE001 - classified below
        raise _classify(exc, label) from exc

    reusable = False
    try:
        errors, text = await client.sendmail(sender, [recipient], data)
        if errors:
            code, message = next(iter(errors.values()))
            raise _by_code(code, message, label)
        reusable = True
        return SendResult(host=label, code=250, text=" ".join(str(text).split()))
    except aiosmtplib.SMTPResponseException as exc:
        # The connection survives a refused message: reset it for the next one.
        reusable = await _reset(client)
        raise _classify(exc, label) from exc
    except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError) as exc:
        raise _classify(exc, label) from exc
    finally:
        await pool.release(client, reusable)


async def _reset(client: aiosmtplib.SMTP) -> bool:
    try:
        await asyncio.wait_for(client.rset(), timeout=10)
        return True
    except Exception:  # noqa: BLE001 - a failed RSET just means the connection is not reused
        return False


class SmarthostTransport(Transport):
    name = "smarthost"

    def __init__(self, config: Config):
        delivery = config.delivery
        host, port = split_host_port(delivery.smarthost, "delivery.smarthost")
        options = _tls_options("required" if delivery.smarthost_starttls else delivery.tls)
        options.update(local_hostname=config.relay.hostname, timeout=delivery.connect_timeout_s)
        if delivery.smarthost_username:
            options.update(username=delivery.smarthost_username, password=delivery.smarthost_password)
        self.pool = SmtpConnectionPool(host, port, options, max_idle=delivery.workers)

    async def send(self, sender: str, recipient: str, data: bytes) -> SendResult:
        return await smtp_send(self.pool, sender, recipient, data)

    async def close(self) -> None:
        await self.pool.close()


# --- MX ---------------------------------------------------------------------


class MxTransport(Transport):
    name = "mx"

    def __init__(self, config: Config):
        delivery = config.delivery
        self.port = delivery.mx_port
        self.options = _tls_options(delivery.tls)
        self.options.update(local_hostname=config.relay.hostname, timeout=delivery.connect_timeout_s)
        self.resolver = dns.asyncresolver.Resolver(configure=not delivery.dns_nameservers)
        if delivery.dns_nameservers:
            self.resolver.nameservers = [_nameserver(value) for value in delivery.dns_nameservers]
        self.resolver.lifetime = delivery.connect_timeout_s

    async def send(self, sender: str, recipient: str, data: bytes) -> SendResult:
        domain = recipient.rpartition("@")[2]
        hosts = await self.lookup(domain)
        last_error: Exception | None = None
        for host in hosts:
            pool = SmtpConnectionPool(host, self.port, self.options, max_idle=0)
            try:
                return await smtp_send(pool, sender, recipient, data)
            except SoftDeliveryError as exc:
                if exc.code is not None:
                    raise
                last_error = exc
                log.info(fields(event="mx_next_host", host=host, error=exc.text))
        raise last_error or SoftDeliveryError(f"no MX host of {domain} accepted a connection")

    async def lookup(self, domain: str) -> list[str]:
        """Return the hosts to try for `domain`, best preference first."""
        try:
            answer = await self.resolver.resolve(domain, "MX")
        except dns.resolver.NXDOMAIN:
            raise HardDeliveryError(f"domain {domain} does not exist (NXDOMAIN)") from None
        except dns.resolver.NoAnswer:
            return await self._address_fallback(domain)
        except (dns.resolver.NoNameservers, dns.exception.Timeout, dns.resolver.LifetimeTimeout) as exc:
            raise SoftDeliveryError(f"DNS lookup of MX {domain} failed: {exc}") from None

        records = sorted(answer, key=lambda r: r.preference)
        hosts = [str(r.exchange).rstrip(".") for r in records]
        if len(hosts) == 1 and hosts[0] == "":
            raise HardDeliveryError(f"domain {domain} accepts no mail (null MX, RFC 7505)")
        return [host for host in hosts if host]

    async def _address_fallback(self, domain: str) -> list[str]:
        for rdtype in ("A", "AAAA"):
            try:
                await self.resolver.resolve(domain, rdtype)
                return [domain]
            except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
                continue
            except (dns.resolver.NoNameservers, dns.exception.Timeout) as exc:
                raise SoftDeliveryError(f"DNS lookup of {rdtype} {domain} failed: {exc}") from None
        raise HardDeliveryError(f"domain {domain} has no MX, A or AAAA record")


def _nameserver(value: str) -> str:
    # dnspython takes "ip" or a nameserver URL; "ip:port" becomes a Do53 nameserver.
    if value.count(":") == 1:
        host, port = value.split(":")
        return dns.nameserver.Do53Nameserver(host, int(port))
    return value


def make_transport(config: Config) -> Transport:
    """Return the transport named by [delivery] transport."""
    kind = config.delivery.transport
    if kind == "maildir":
        return MaildirTransport(config.delivery.maildir)
    if kind == "smarthost":
        return SmarthostTransport(config)
    return MxTransport(config)
