"""The SMTP transports against a loopback DNS server and SMTP servers on 127.0.0.0/8.

Every mx test points [delivery] dns_nameservers at `DnsServer` on 127.0.0.1, so
no test resolves or connects to a real domain. MX hosts resolve to 127.0.0.2
and 127.0.0.3 (Linux routes all of 127.0.0.0/8 to the loopback interface), and
the servers listen there on one shared port, because [delivery] mx_port applies
to every MX host.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import socket
import ssl
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

import pytest
from aiosmtpd.smtp import SMTP
from dnsserver import DnsServer

from relaymail import config as relaymail_config
from relaymail.deliver import MxTransport, SendResult, Transport, is_connectable, make_transport
from relaymail.errors import ConfigError, HardDeliveryError, SoftDeliveryError


MX1 = "127.0.0.2"
MX2 = "127.0.0.3"
SENDER = "bounce+token@marketplace.example"
RELAY_HOSTNAME = "relay.marketplace.example"
MESSAGE = b"From: a@marketplace.example\r\nTo: b@example.test\r\nSubject: test\r\n\r\nHello.\r\n"
TLS_HOST = "mx.tls.test"


# --- loopback servers ---------------------------------------------------------


@dataclass
class SinkMessage:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    tls: bool


@dataclass
class SinkHandler:
    """aiosmtpd handler whose replies and delays a test sets."""

    messages: list[SinkMessage] = field(default_factory=list)
    rcpt_reply: str | None = None  # when set, RCPT TO gets this reply
    data_reply: str | None = None  # when set, DATA gets this reply
    data_delay_s: float = 0.0
    in_data: int = 0
    max_in_data: int = 0

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.rcpt_reply:
            return self.rcpt_reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.in_data += 1
        self.max_in_data = max(self.max_in_data, self.in_data)
        try:
            if self.data_delay_s:
                await asyncio.sleep(self.data_delay_s)
            if self.data_reply:
                return self.data_reply
            self.messages.append(
                SinkMessage(envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content, session.ssl is not None)
            )
            return "250 2.0.0 queued"
        finally:
            self.in_data -= 1


class Sink:
    """An aiosmtpd server on one loopback address, with optional STARTTLS."""

    def __init__(self, host: str, port: int, tls_context: ssl.SSLContext | None = None, size_limit: int | None = None):
        self.host = host
        self.port = port
        self.tls_context = tls_context
        self.size_limit = size_limit
        self.handler = SinkHandler()
        self.connections = 0
        self.closed_connections = 0
        self.server: asyncio.AbstractServer | None = None

    @property
    def messages(self) -> list[SinkMessage]:
        return self.handler.messages

    async def start(self) -> "Sink":
        sink = self

        class CountingSMTP(SMTP):
            def connection_made(self, transport):
                # STARTTLS calls this again on the same object; count the TCP connection once.
                if self._original_transport is None and self.transport is None:
                    sink.connections += 1
                super().connection_made(transport)

            def connection_lost(self, error):
                if self._original_transport is None or self.transport is not None:
                    sink.closed_connections += 1
                super().connection_lost(error)

        def factory():
            return CountingSMTP(
                self.handler,
                hostname="sink.test",
                tls_context=self.tls_context,
                data_size_limit=self.size_limit,
                enable_SMTPUTF8=True,
            )

        self.server = await asyncio.get_running_loop().create_server(factory, host=self.host, port=self.port)
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


ScriptHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class ScriptedServer:
    """A raw TCP server that runs `script` for each connection (for misbehaving SMTP servers)."""

    def __init__(self, host: str, port: int, script: ScriptHandler):
        self.host = host
        self.port = port
        self.script = script
        self.connections = 0
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> "ScriptedServer":
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.script(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(serve, self.host, self.port)
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def answer_commands(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, until: bytes | tuple[bytes, ...], starttls: bool = False
) -> bytes:
    """Reply 250 to EHLO, MAIL and RCPT until a command starting with `until` arrives; return that command.

    With `starttls`, EHLO offers STARTTLS.
    """
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("client closed the connection")
        if line.upper().startswith(until):
            return line
        if line.upper().startswith(b"EHLO"):
            writer.write(b"250-scripted.test\r\n" + (b"250-STARTTLS\r\n" if starttls else b"") + b"250 8BITMIME\r\n")
        else:
            writer.write(b"250 OK\r\n")
        await writer.drain()


def starttls_failing_server(starttls_reply: bytes, delivered: list[bytes]) -> ScriptHandler:
    """Return a script that offers STARTTLS, answers it with `starttls_reply` and accepts plaintext mail.

    After a reply starting with 220 the script sends bytes that are no TLS
    record and closes, so the client's handshake fails. Each accepted message
    is appended to `delivered`.
    """

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 scripted.test ESMTP\r\n")
        command = await answer_commands(reader, writer, until=(b"STARTTLS", b"DATA"), starttls=True)
        if command.upper().startswith(b"STARTTLS"):
            writer.write(starttls_reply)
            if starttls_reply.startswith(b"220"):
                writer.write(b"this is not a TLS record\r\n" * 4)
                await writer.drain()
                return
            await writer.drain()
            await answer_commands(reader, writer, until=b"DATA", starttls=True)
        writer.write(b"354 go ahead\r\n")
        await writer.drain()
        delivered.append(await reader.readuntil(b"\r\n.\r\n"))
        writer.write(b"250 2.0.0 queued\r\n")
        await writer.drain()
        await answer_commands(reader, writer, until=b"QUIT")
        writer.write(b"221 bye\r\n")
        await writer.drain()

    return script


def free_port(*hosts: str) -> int:
    """Return a TCP port that was free a moment ago on every one of `hosts`."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind((hosts[0], 0))
            port = first.getsockname()[1]
            others = []
            try:
                for host in hosts[1:]:
                    other = socket.socket()
                    others.append(other)
                    other.bind((host, port))
                return port
            except OSError:
                continue
            finally:
                for other in others:
                    other.close()
    raise RuntimeError(f"no port is free on all of {hosts}")


# --- certificates -------------------------------------------------------------


@dataclass(frozen=True)
class CertificateFiles:
    ca_file: Path
    cert_file: Path
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context


@pytest.fixture(scope="session")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> CertificateFiles:
    """A test CA and a server certificate it signed, for mx.tls.test and 127.0.0.1 (made with openssl)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is not installed; it makes the test certificates")
    directory = tmp_path_factory.mktemp("tls")
    ca_key, ca_file = directory / "ca.key", directory / "ca.pem"
    key_file, csr_file, cert_file = directory / "server.key", directory / "server.csr", directory / "server.pem"
    extensions = directory / "server.ext"
    extensions.write_text(
        f"subjectAltName=DNS:{TLS_HOST},IP:127.0.0.1\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\n"
        "authorityKeyIdentifier=keyid\n"
        "subjectKeyIdentifier=hash\n"
    )
    new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    commands = [
        [openssl, "req", "-x509", *new_key, "-keyout", ca_key, "-out", ca_file, "-days", "2",
         "-subj", "/CN=relaymail test CA",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign"],
        [openssl, "req", "-new", *new_key, "-keyout", key_file, "-out", csr_file, "-subj", f"/CN={TLS_HOST}"],
        [openssl, "x509", "-req", "-in", csr_file, "-CA", ca_file, "-CAkey", ca_key,
         "-set_serial", str(secrets.randbits(63)), "-days", "2", "-extfile", extensions, "-out", cert_file],
    ]
    for command in commands:
        subprocess.run([str(part) for part in command], check=True, capture_output=True, timeout=60)
    return CertificateFiles(ca_file, cert_file, key_file)


# --- fixtures -----------------------------------------------------------------


@pytest.fixture
async def dns_server():
    server = await DnsServer().start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
def mx_port() -> int:
    return free_port("127.0.0.1", MX1, MX2)


@pytest.fixture
async def servers():
    """Start Sink or ScriptedServer objects; all are stopped after the test."""
    started = []

    async def start(server):
        started.append(await server.start())
        return server

    try:
        yield start
    finally:
        for server in started:
            await server.stop()


def make_config(tmp_path: Path, delivery: dict) -> relaymail_config.Config:
    data = {
        "relay": {"domain": "marketplace.example", "hostname": RELAY_HOSTNAME, "bounce_secret": secrets.token_hex(16)},
        "delivery": delivery,
    }
    return relaymail_config.from_dict(data, base_dir=tmp_path)


@pytest.fixture
async def transport_for(tmp_path: Path, dns_server: DnsServer, mx_port: int):
    """Return a function making an mx transport that uses only `dns_server`; all are closed after the test."""
    opened: list[Transport] = []

    def make(**delivery) -> Transport:
        settings = {
            "transport": "mx",
            "dns_nameservers": [dns_server.nameserver],
            "mx_port": mx_port,
            "tls": "none",
            "connect_timeout_s": 5,
            "dns_timeout_s": 2,
            **delivery,
        }
        transport = make_transport(make_config(tmp_path, settings))
        opened.append(transport)
        return transport

    try:
        yield make
    finally:
        for transport in opened:
            await transport.close()


def add_two_mx(dns_server: DnsServer, domain: str = "example.test") -> None:
    # Listed worst first: the transport must sort by preference itself.
    dns_server.add(domain, "MX", ["20 mx2.example.test.", "10 mx1.example.test."])
    dns_server.add("mx1.example.test", "A", [MX1])
    dns_server.add("mx2.example.test", "A", [MX2])


# --- MX lookup and host order -------------------------------------------------


async def test_mx_uses_best_preference(transport_for, dns_server, mx_port, servers):
    add_two_mx(dns_server)
    first = await servers(Sink(MX1, mx_port))
    second = await servers(Sink(MX2, mx_port))

    result = await transport_for().send(SENDER, "user@example.test", MESSAGE)

    assert result.host == f"mx1.example.test[{MX1}]:{mx_port}"
    assert result.code == 250
    assert len(first.messages) == 1
    assert first.messages[0].rcpt_tos == ["user@example.test"]
    assert first.messages[0].mail_from == SENDER
    assert first.messages[0].data == MESSAGE
    assert second.messages == []


async def test_mx_lookups_use_configured_server(transport_for, dns_server, mx_port, servers):
    add_two_mx(dns_server)
    await servers(Sink(MX1, mx_port))

    await transport_for().send(SENDER, "user@example.test", MESSAGE)

    queried = {(name, rdtype) for name, rdtype, _transport in dns_server.queries}
    assert ("example.test", "MX") in queried
    assert ("mx1.example.test", "A") in queried


async def test_mx_next_host_on_refused_connection(transport_for, dns_server, mx_port, servers):
    add_two_mx(dns_server)
    second = await servers(Sink(MX2, mx_port))

    result = await transport_for().send(SENDER, "user@example.test", MESSAGE)

    assert result.host == f"mx2.example.test[{MX2}]:{mx_port}"
    assert len(second.messages) == 1


async def test_mx_next_host_on_4xx_greeting(transport_for, dns_server, mx_port, servers):
    async def busy(reader, writer):
        writer.write(b"421 4.3.2 too busy, try later\r\n")
        await writer.drain()

    add_two_mx(dns_server)
    busy_server = await servers(ScriptedServer(MX1, mx_port, busy))
    second = await servers(Sink(MX2, mx_port))

    result = await transport_for().send(SENDER, "user@example.test", MESSAGE)

    assert busy_server.connections == 1
    assert result.host.startswith("mx2.example.test")
    assert len(second.messages) == 1


async def test_mx_all_hosts_down_is_soft(transport_for, dns_server):
    add_two_mx(dns_server)

    with pytest.raises(SoftDeliveryError) as caught:
        await transport_for().send(SENDER, "user@example.test", MESSAGE)

    assert not isinstance(caught.value, HardDeliveryError)
    assert "mx1.example.test" in caught.value.text
    assert "mx2.example.test" in caught.value.text


async def test_mx_equal_preference_is_shuffled(transport_for, dns_server):
    dns_server.add("example.test", "MX", ["10 a.example.test.", "10 b.example.test.", "5 first.example.test."])
    transport = transport_for()
    assert isinstance(transport, MxTransport)

    orders = set()
    for _ in range(40):
        hosts = await transport.resolver.hosts("example.test")
        orders.add(tuple(host.name for host in hosts))

    assert orders == {
        ("first.example.test", "a.example.test", "b.example.test"),
        ("first.example.test", "b.example.test", "a.example.test"),
    }


async def test_no_mx_falls_back_to_a(transport_for, dns_server, mx_port, servers):
    dns_server.add("plain.test", "A", [MX1])
    sink = await servers(Sink(MX1, mx_port))

    result = await transport_for().send(SENDER, "user@plain.test", MESSAGE)

    assert result.host == f"plain.test[{MX1}]:{mx_port}"
    assert len(sink.messages) == 1
    queried = [(name, rdtype) for name, rdtype, _transport in dns_server.queries]
    assert queried.index(("plain.test", "MX")) < queried.index(("plain.test", "A"))


async def test_no_mx_no_address_is_hard(transport_for, dns_server):
    dns_server.add("textonly.test", "TXT", ['"v=spf1 -all"'])

    with pytest.raises(HardDeliveryError) as caught:
        await transport_for().send(SENDER, "user@textonly.test", MESSAGE)

    assert "no MX record" in caught.value.text


async def test_null_mx_is_hard(transport_for, dns_server):
    dns_server.add("nomail.test", "MX", ["0 ."])

    with pytest.raises(HardDeliveryError) as caught:
        await transport_for().send(SENDER, "user@nomail.test", MESSAGE)

    assert "null MX" in caught.value.text


async def test_nxdomain_is_hard(transport_for, dns_server):
    with pytest.raises(HardDeliveryError) as caught:
        await transport_for().send(SENDER, "user@missing.test", MESSAGE)

    assert "NXDOMAIN" in caught.value.text


async def test_servfail_is_soft(transport_for, dns_server):
    add_two_mx(dns_server)
    dns_server.servfail.add("example.test")

    with pytest.raises(SoftDeliveryError) as caught:
        await transport_for().send(SENDER, "user@example.test", MESSAGE)

    assert not isinstance(caught.value, HardDeliveryError)
    assert "SERVFAIL" in caught.value.text


async def test_dns_timeout_is_soft(transport_for, dns_server):
    add_two_mx(dns_server)
    dns_server.silent.add("example.test")
    transport = transport_for(dns_timeout_s=0.5)

    with pytest.raises(SoftDeliveryError) as caught:
        await asyncio.wait_for(transport.send(SENDER, "user@example.test", MESSAGE), timeout=10)

    assert not isinstance(caught.value, HardDeliveryError)
    assert "timed out" in caught.value.text or "lifetime expired" in caught.value.text


async def test_mx_host_servfail_is_soft(transport_for, dns_server):
    add_two_mx(dns_server)
    dns_server.servfail.update({"mx1.example.test", "mx2.example.test"})

    with pytest.raises(SoftDeliveryError) as caught:
        await transport_for().send(SENDER, "user@example.test", MESSAGE)

    assert not isinstance(caught.value, HardDeliveryError)


async def test_mx_hosts_without_address_is_hard(transport_for, dns_server):
    dns_server.add("example.test", "MX", ["10 gone.example.test."])

    with pytest.raises(HardDeliveryError) as caught:
        await transport_for().send(SENDER, "user@example.test", MESSAGE)

    assert "no MX host of example.test has a usable address" in caught.value.text


async def test_unspecified_address_is_skipped(transport_for, dns_server, caplog):
    dns_server.add("example.test", "MX", ["10 zero.example.test.", "20 zero6.example.test."])
    dns_server.add("zero.example.test", "A", ["0.0.0.0"])
    dns_server.add("zero6.example.test", "AAAA", ["::"])

    with caplog.at_level("WARNING", logger="relaymail.deliver"):
        with pytest.raises(HardDeliveryError) as caught:
            await transport_for().send(SENDER, "user@example.test", MESSAGE)

    assert "usable address" in caught.value.text
    skipped = [record.getMessage() for record in caplog.records if "mx_address_skipped" in record.getMessage()]
    assert len(skipped) == 2
    assert "addresses=0.0.0.0" in skipped[0]
    assert "addresses=::" in skipped[1]


async def test_own_hostname_mx_is_dropped(transport_for, dns_server, mx_port, servers):
    dns_server.add("example.test", "MX", ["5 mx1.example.test.", f"10 {RELAY_HOSTNAME}.", "20 mx2.example.test."])
    dns_server.add("mx1.example.test", "A", [MX1])
    dns_server.add("mx2.example.test", "A", [MX2])
    transport = transport_for()

    hosts = await transport.resolver.hosts("example.test")

    assert [host.name for host in hosts] == ["mx1.example.test"]


async def test_own_hostname_best_mx_is_hard(transport_for, dns_server):
    dns_server.add("example.test", "MX", [f"10 {RELAY_HOSTNAME}.", "20 mx2.example.test."])

    with pytest.raises(HardDeliveryError) as caught:
        await transport_for().send(SENDER, "user@example.test", MESSAGE)

    assert "loops back" in caught.value.text


async def test_truncated_udp_retries_tcp(transport_for, dns_server, mx_port, servers):
    add_two_mx(dns_server)
    dns_server.truncate_udp = True
    sink = await servers(Sink(MX1, mx_port))

    await transport_for().send(SENDER, "user@example.test", MESSAGE)

    assert len(sink.messages) == 1
    assert ("example.test", "MX", "tcp") in dns_server.queries


async def test_address_literal_delivers(transport_for, dns_server, mx_port, servers):
    sink = await servers(Sink(MX1, mx_port))

    result = await transport_for().send(SENDER, f"user@[{MX1}]", MESSAGE)

    assert result.host == f"{MX1}:{mx_port}"
    assert len(sink.messages) == 1
    assert dns_server.queries == []


async def test_recipient_without_domain_is_hard(transport_for):
    with pytest.raises(HardDeliveryError):
        await transport_for().send(SENDER, "user", MESSAGE)


# --- replies from the next hop ------------------------------------------------


async def test_4xx_data_reply_is_soft(transport_for, dns_server, mx_port, servers):
    add_two_mx(dns_server)
    sink = await servers(Sink(MX1, mx_port))
    sink.handler.data_reply = "451 4.3.0 try again later"

    with pytest.raises(SoftDeliveryError) as caught:
        await transport_for().send(SENDER, "user@example.test", MESSAGE)

    assert not isinstance(caught.value, HardDeliveryError)
    assert caught.value.code == 451
    assert caught.value.host == f"mx1.example.test[{MX1}]:{mx_port}"
    assert "to DATA" in caught.value.text


async def test_5xx_rcpt_reply_is_hard(transport_for, dns_server, mx_port, servers):
    add_two_mx(dns_server)
    sink = await servers(Sink(MX1, mx_port))
    second = await servers(Sink(MX2, mx_port))
    sink.handler.rcpt_reply = "550 5.1.1 no such user"

    with pytest.raises(HardDeliveryError) as caught:
        await transport_for().send(SENDER, "user@example.test", MESSAGE)

    assert caught.value.code == 550
    assert "5.1.1 no such user" in caught.value.text
    assert "to RCPT TO" in caught.value.text
    assert second.messages == []


async def test_421_reply_tries_next_host(transport_for, dns_server, mx_port, servers):
    add_two_mx(dns_server)
    closing_server = await servers(Sink(MX1, mx_port))
    closing_server.handler.rcpt_reply = "421 4.3.2 shutting down"
    second = await servers(Sink(MX2, mx_port))

    result = await transport_for().send(SENDER, "user@example.test", MESSAGE)

    assert result.host.startswith("mx2.example.test")
    assert len(second.messages) == 1


async def test_connection_dropped_mid_data_is_soft(transport_for, dns_server, mx_port, servers):
    async def drop_in_data(reader, writer):
        writer.write(b"220 scripted.test ESMTP\r\n")
        await answer_commands(reader, writer, until=b"DATA")
        writer.write(b"354 go ahead\r\n")
        await writer.drain()
        await reader.read(10)

    dns_server.add("example.test", "MX", ["10 mx1.example.test."])
    dns_server.add("mx1.example.test", "A", [MX1])
    await servers(ScriptedServer(MX1, mx_port, drop_in_data))

    with pytest.raises(SoftDeliveryError) as caught:
        await transport_for().send(SENDER, "user@example.test", MESSAGE)

    assert not isinstance(caught.value, HardDeliveryError)
    assert "DATA" in caught.value.text


async def test_null_sender_is_sent_as_empty_path(transport_for, dns_server, mx_port, servers):
    add_two_mx(dns_server)
    sink = await servers(Sink(MX1, mx_port))

    await transport_for().send("", "user@example.test", MESSAGE)

    assert sink.messages[0].mail_from == "<>"


async def test_message_over_size_limit_is_hard(transport_for, dns_server, mx_port, servers):
    add_two_mx(dns_server)
    sink = await servers(Sink(MX1, mx_port, size_limit=len(MESSAGE) - 1))

    with pytest.raises(HardDeliveryError) as caught:
        await transport_for().send(SENDER, "user@example.test", MESSAGE)

    assert "SIZE" in caught.value.text
    assert sink.messages == []


# --- TLS ----------------------------------------------------------------------


def add_tls_mx(dns_server: DnsServer, domain: str = "tls.test") -> None:
    dns_server.add(domain, "MX", [f"10 {TLS_HOST}."])
    dns_server.add(TLS_HOST, "A", [MX1])


async def test_opportunistic_tls_encrypts(transport_for, dns_server, mx_port, servers, certificates):
    add_tls_mx(dns_server)
    sink = await servers(Sink(MX1, mx_port, tls_context=certificates.server_context()))

    result = await transport_for(tls="opportunistic").send(SENDER, "user@tls.test", MESSAGE)

    assert sink.messages[0].tls is True
    assert result.tls.startswith("TLS")


async def test_opportunistic_without_starttls_is_plain(transport_for, dns_server, mx_port, servers):
    add_tls_mx(dns_server)
    sink = await servers(Sink(MX1, mx_port))

    result = await transport_for(tls="opportunistic").send(SENDER, "user@tls.test", MESSAGE)

    assert sink.messages[0].tls is False
    assert result.tls == ""


async def test_tls_none_never_starttls(transport_for, dns_server, mx_port, servers, certificates):
    add_tls_mx(dns_server)
    sink = await servers(Sink(MX1, mx_port, tls_context=certificates.server_context()))

    await transport_for(tls="none").send(SENDER, "user@tls.test", MESSAGE)

    assert sink.messages[0].tls is False


async def test_verify_with_ca_file_delivers(transport_for, dns_server, mx_port, servers, certificates):
    add_tls_mx(dns_server)
    sink = await servers(Sink(MX1, mx_port, tls_context=certificates.server_context()))

    transport = transport_for(tls="verify", tls_ca_file=str(certificates.ca_file))
    await transport.send(SENDER, "user@tls.test", MESSAGE)

    assert sink.messages[0].tls is True


async def test_verify_without_ca_file_is_soft(transport_for, dns_server, mx_port, servers, certificates):
    add_tls_mx(dns_server)
    sink = await servers(Sink(MX1, mx_port, tls_context=certificates.server_context()))

    with pytest.raises(SoftDeliveryError) as caught:
        await transport_for(tls="verify").send(SENDER, "user@tls.test", MESSAGE)

    assert not isinstance(caught.value, HardDeliveryError)
    assert "certificate" in caught.value.text.lower()
    assert sink.messages == []


async def test_verify_wrong_host_name_is_soft(transport_for, dns_server, mx_port, servers, certificates):
    dns_server.add("other.test", "MX", ["10 mx.other.test."])
    dns_server.add("mx.other.test", "A", [MX1])
    sink = await servers(Sink(MX1, mx_port, tls_context=certificates.server_context()))

    transport = transport_for(tls="verify", tls_ca_file=str(certificates.ca_file))
    with pytest.raises(SoftDeliveryError) as caught:
        await transport.send(SENDER, "user@other.test", MESSAGE)

    assert not isinstance(caught.value, HardDeliveryError)
    assert sink.messages == []


async def test_required_without_starttls_is_soft(transport_for, dns_server, mx_port, servers):
    add_tls_mx(dns_server)
    sink = await servers(Sink(MX1, mx_port))

    with pytest.raises(SoftDeliveryError) as caught:
        await transport_for(tls="required").send(SENDER, "user@tls.test", MESSAGE)

    assert not isinstance(caught.value, HardDeliveryError)
    assert "STARTTLS" in caught.value.text
    assert sink.messages == []


async def test_opportunistic_handshake_failure_falls_back(transport_for, dns_server, mx_port, servers):
    add_tls_mx(dns_server)
    delivered: list[bytes] = []
    scripted = await servers(ScriptedServer(MX1, mx_port, starttls_failing_server(b"220 2.0.0 ready\r\n", delivered)))

    result = await transport_for(tls="opportunistic").send(SENDER, "user@tls.test", MESSAGE)

    assert scripted.connections == 2
    assert len(delivered) == 1
    assert result.tls == ""


async def test_opportunistic_starttls_refused_continues(transport_for, dns_server, mx_port, servers):
    add_tls_mx(dns_server)
    delivered: list[bytes] = []
    no_tls_script = starttls_failing_server(b"454 4.7.0 TLS not available\r\n", delivered)
    scripted = await servers(ScriptedServer(MX1, mx_port, no_tls_script))

    await transport_for(tls="opportunistic").send(SENDER, "user@tls.test", MESSAGE)

    assert scripted.connections == 1
    assert len(delivered) == 1


async def test_required_starttls_refused_is_soft(transport_for, dns_server, mx_port, servers):
    add_tls_mx(dns_server)
    delivered: list[bytes] = []
    no_tls_script = starttls_failing_server(b"454 4.7.0 TLS not available\r\n", delivered)
    await servers(ScriptedServer(MX1, mx_port, no_tls_script))

    with pytest.raises(SoftDeliveryError) as caught:
        await transport_for(tls="required").send(SENDER, "user@tls.test", MESSAGE)

    assert not isinstance(caught.value, HardDeliveryError)
    assert caught.value.code == 454
    assert delivered == []


async def test_tls_policy_overrides_default(transport_for, dns_server, mx_port, servers):
    add_tls_mx(dns_server, "strict.test")
    add_tls_mx(dns_server, "relaxed.test")
    add_tls_mx(dns_server, "sub.strict2.test")
    sink = await servers(Sink(MX1, mx_port))
    transport = transport_for(tls="opportunistic", tls_policies={"strict.test": "required", ".strict2.test": "required"})

    await transport.send(SENDER, "user@relaxed.test", MESSAGE)
    with pytest.raises(SoftDeliveryError):
        await transport.send(SENDER, "user@strict.test", MESSAGE)
    with pytest.raises(SoftDeliveryError):
        await transport.send(SENDER, "user@sub.strict2.test", MESSAGE)

    assert [message.rcpt_tos for message in sink.messages] == [["user@relaxed.test"]]


async def test_tls_policy_lookup_order(transport_for):
    transport = transport_for(
        tls="opportunistic",
        tls_policies={"example.test": "verify", ".example.test": "required", ".test": "none"},
    )

    assert transport.tls_mode("example.test") == "verify"
    assert transport.tls_mode("a.example.test") == "required"
    assert transport.tls_mode("other.test") == "none"
    assert transport.tls_mode("example.org") == "opportunistic"


# --- connection reuse and limits ----------------------------------------------


async def test_connection_is_reused(transport_for, dns_server, mx_port, servers):
    add_two_mx(dns_server)
    sink = await servers(Sink(MX1, mx_port))
    transport = transport_for()

    for number in range(3):
        await transport.send(SENDER, f"user{number}@example.test", MESSAGE)

    assert len(sink.messages) == 3
    assert sink.connections == 1


async def test_idle_connection_is_closed(transport_for, dns_server, mx_port, servers):
    add_two_mx(dns_server)
    sink = await servers(Sink(MX1, mx_port))
    transport = transport_for(connection_idle_s=0.2)

    await transport.send(SENDER, "user@example.test", MESSAGE)
    for _ in range(50):
        if sink.closed_connections:
            break
        await asyncio.sleep(0.05)

    assert sink.closed_connections == 1
    assert transport._pools == {}


async def test_stale_connection_is_replaced(transport_for, dns_server, mx_port, servers):
    async def one_message_per_connection(reader, writer):
        # Accept one message, then drop the connection at the next MAIL FROM.
        writer.write(b"220 scripted.test ESMTP\r\n")
        await answer_commands(reader, writer, until=b"DATA")
        writer.write(b"354 go ahead\r\n")
        await writer.drain()
        await reader.readuntil(b"\r\n.\r\n")
        writer.write(b"250 2.0.0 queued\r\n")
        await writer.drain()
        await answer_commands(reader, writer, until=b"MAIL")

    dns_server.add("example.test", "MX", ["10 mx1.example.test."])
    dns_server.add("mx1.example.test", "A", [MX1])
    scripted = await servers(ScriptedServer(MX1, mx_port, one_message_per_connection))
    transport = transport_for()

    await transport.send(SENDER, "first@example.test", MESSAGE)
    second = await transport.send(SENDER, "second@example.test", MESSAGE)

    assert second.code == 250
    assert scripted.connections == 2


async def test_connection_limit_per_destination(transport_for, dns_server, mx_port, servers):
    add_two_mx(dns_server)
    sink = await servers(Sink(MX1, mx_port))
    sink.handler.data_delay_s = 0.3
    transport = transport_for(max_connections_per_destination=2)

    sends = [transport.send(SENDER, f"user{number}@example.test", MESSAGE) for number in range(5)]
    results = await asyncio.wait_for(asyncio.gather(*sends), timeout=20)

    assert all(result.code == 250 for result in results)
    assert sink.handler.max_in_data == 2
    assert sink.connections == 2


async def test_slow_destination_does_not_block_others(transport_for, dns_server, mx_port, servers):
    dns_server.add("slow.test", "MX", ["10 mx.slow.test."])
    dns_server.add("mx.slow.test", "A", [MX1])
    dns_server.add("fast.test", "MX", ["10 mx.fast.test."])
    dns_server.add("mx.fast.test", "A", [MX2])
    slow = await servers(Sink(MX1, mx_port))
    slow.handler.data_delay_s = 5.0
    fast = await servers(Sink(MX2, mx_port))
    transport = transport_for(max_connections_per_destination=2)
    loop = asyncio.get_running_loop()

    started = loop.time()
    slow_sends = [asyncio.ensure_future(transport.send(SENDER, f"s{n}@slow.test", MESSAGE)) for n in range(2)]
    fast_results = await asyncio.wait_for(
        asyncio.gather(*(transport.send(SENDER, f"f{n}@fast.test", MESSAGE) for n in range(4))), timeout=10
    )
    fast_elapsed = loop.time() - started

    assert all(result.code == 250 for result in fast_results)
    assert fast_elapsed < 2.5
    assert not any(send.done() for send in slow_sends)

    slow_results = await asyncio.wait_for(asyncio.gather(*slow_sends), timeout=20)
    assert all(result.code == 250 for result in slow_results)
    assert len(slow.messages) == 2
    assert len(fast.messages) == 4


async def test_close_quits_idle_connections(transport_for, dns_server, mx_port, servers):
    add_two_mx(dns_server)
    sink = await servers(Sink(MX1, mx_port))
    transport = transport_for()

    await transport.send(SENDER, "user@example.test", MESSAGE)
    await transport.close()
    for _ in range(50):
        if sink.closed_connections:
            break
        await asyncio.sleep(0.05)

    assert sink.closed_connections == 1


# --- smarthost ----------------------------------------------------------------


def smarthost_config(tmp_path: Path, port: int, **delivery) -> relaymail_config.Config:
    settings = {"transport": "smarthost", "smarthost": f"127.0.0.1:{port}", "connect_timeout_s": 5, **delivery}
    return make_config(tmp_path, settings)


async def test_smarthost_verify_delivers(tmp_path, servers, certificates):
    port = free_port("127.0.0.1")
    sink = await servers(Sink("127.0.0.1", port, tls_context=certificates.server_context()))
    transport = make_transport(smarthost_config(tmp_path, port, tls="verify", tls_ca_file=str(certificates.ca_file)))
    try:
        result = await transport.send(SENDER, "user@example.test", MESSAGE)
    finally:
        await transport.close()

    assert isinstance(result, SendResult)
    assert result.host == f"127.0.0.1:{port}"
    assert sink.messages[0].tls is True


async def test_smarthost_starttls_required_is_soft(tmp_path, servers):
    port = free_port("127.0.0.1")
    sink = await servers(Sink("127.0.0.1", port))
    transport = make_transport(smarthost_config(tmp_path, port, smarthost_starttls=True))
    try:
        with pytest.raises(SoftDeliveryError) as caught:
            await transport.send(SENDER, "user@example.test", MESSAGE)
    finally:
        await transport.close()

    assert not isinstance(caught.value, HardDeliveryError)
    assert sink.messages == []


# --- configuration --------------------------------------------------------------


def test_config_tls_policies_table(tmp_path):
    path = tmp_path / "relaymail.toml"
    path.write_text(
        f"""\
[relay]
domain = "marketplace.example"
hostname = "{RELAY_HOSTNAME}"
bounce_secret = "{secrets.token_hex(16)}"

[delivery]
transport = "mx"
dns_nameservers = ["127.0.0.1:5353", "[::1]:5353"]
tls_policies = {{ "example.com" = "verify", ".example.net" = "none" }}
""",
        encoding="utf-8",
    )

    config = relaymail_config.load(path)

    assert config.delivery.tls_policies == {"example.com": "verify", ".example.net": "none"}
    assert config.delivery.max_connections_per_destination == 10


@pytest.mark.parametrize(
    ("delivery", "message"),
    [
        ({"tls_policies": {"example": {"com": "verify"}}}, "quote keys that contain dots"),
        ({"tls_policies": {"example.com": "strict"}}, "expected one of"),
        ({"tls_policies": {"not a domain": "verify"}}, "not a domain name"),
        ({"tls_ca_file": "missing.pem"}, "file not found"),
        ({"dns_nameservers": ["resolver.example"]}, "not an IP address"),
        ({"dns_nameservers": ["127.0.0.1:99999"]}, "invalid port"),
        ({"max_connections_per_destination": 0}, "expected at least 1"),
        ({"dns_timeout_s": 0}, "expected a number of seconds > 0"),
    ],
)
def test_config_rejects_invalid_delivery(tmp_path, delivery, message):
    with pytest.raises(ConfigError) as caught:
        make_config(tmp_path, {"transport": "mx", **delivery})

    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("address", "connectable"),
    [
        ("0.0.0.0", False),
        ("0.1.2.3", False),
        ("::", False),
        ("::ffff:0.0.0.0", False),
        ("224.0.0.1", False),
        ("ff02::1", False),
        ("255.255.255.255", False),
        ("127.0.0.1", True),
        ("::1", True),
        ("192.0.2.1", True),
        ("2001:db8::1", True),
    ],
)
def test_is_connectable(address, connectable):
    assert is_connectable(address) is connectable
