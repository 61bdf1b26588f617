"""`relaymail serve`: the SMTP listener and the queue manager on one event loop.

`Relay` starts both on the running loop (tests use it directly); `run(config)`
is the blocking entry point of the CLI. With the database, the listener and
the queue manager sharing one asyncio loop, nothing here starts a thread except
the short file and parsing jobs sent to `asyncio.to_thread`.

Signals: SIGTERM and SIGINT stop accepting connections, let open sessions
finish for at most `SHUTDOWN_GRACE_S`, let delivery attempts in progress end,
and exit 0 with the queue intact. SIGHUP reloads the configuration file and
applies the log level (other changes need a restart, and the log line states this).
When started by systemd with `Type=notify`, READY=1 is sent once the listener
accepts connections.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import socket
import ssl
import threading
import time

from aiosmtpd.smtp import SMTP

from . import config as config_module
from . import log as log_module
from .config import Config
from .deliver import Transport, make_transport
from .errors import ConfigError
from .http import HttpServer, start_http
from .log import fields
from .queue import QueueManager
from .receive import RelayHandler
from .store import Store

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 30.0
EXIT_GRACE_S = 5.0


# A MAIL or RCPT path of the common form <dot-atom@domain>, optionally followed
# by parameters. Such paths skip aiosmtpd's general address parser, which
# builds a typing.Protocol class on every call (aiosmtpd 1.4.6) and took about
# 8% of the relay's CPU time under load in a py-spy profile. Anything else
# goes to that parser.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_PATH = re.compile(
    rf"<(?P<address>{_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>(?:[ \t]+(?P<rest>[^(\s].*)?)?",
    re.ASCII | re.DOTALL,
)


class RelaySMTP(SMTP):
    """aiosmtpd's protocol with relaymail's connection limits and a fast path for plain addresses."""

    relay: "Relay"

    def _getaddr(self, arg: str):
        match = _PLAIN_PATH.fullmatch(arg.lstrip())
        if match is None:
            return super()._getaddr(arg)

        address = match["address"]
        if self.local_part_limit and len(address.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return address, match["rest"] or ""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        host = peer[0] if isinstance(peer, tuple) else str(peer)
        self._relay_client = host
        refusal = self.relay.admit(host)
        if refusal:
            log.warning(fields(event="connection_refused", client=host, reason=refusal))
            transport.write(f"421 4.7.0 {refusal}; try again later\r\n".encode())
            transport.close()

    def connection_lost(self, exc) -> None:
        self.relay.release(getattr(self, "_relay_client", ""))
        super().connection_lost(exc)


class Relay:
    """The listener, the handler and the queue manager of one relay process."""

    def __init__(self, config: Config, transport: Transport | None = None, run_queue: bool = True):
        self.config = config
        self.store = Store(config.database.url)
        self.transport = transport or make_transport(config)
        self.queue = QueueManager(config, self.store, self.transport)
        self.handler = RelayHandler(
            config, self.store, on_queued=self.queue.notify, queue=self.queue if run_queue else None
        )
        self.run_queue = run_queue
        self.server: asyncio.AbstractServer | None = None
        self.queue_task: asyncio.Task | None = None
        self.http: HttpServer | None = None
        self.connections: dict[str, int] = {}
        self.port: int = 0

    def admit(self, client: str) -> str | None:
        """Count a new connection; return why it is refused, or None."""
        total = sum(self.connections.values())
        self.connections[client] = self.connections.get(client, 0) + 1
        if total >= self.config.smtp.max_connections:
            return "Too many connections"
        if self.connections[client] > self.config.smtp.max_connections_per_client:
            return "Too many connections from your address"
        return None

    def release(self, client: str) -> None:
        count = self.connections.get(client, 0) - 1
        if count > 0:
            self.connections[client] = count
        else:
            self.connections.pop(client, None)

    def _protocol(self) -> RelaySMTP:
        smtp_config = self.config.smtp
        cls = type("BoundRelaySMTP", (RelaySMTP,), {"relay": self, "line_length_limit": smtp_config.max_line_bytes})
        return cls(
            self.handler,
            data_size_limit=smtp_config.max_message_bytes,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=self.config.relay.hostname,
            ident="relaymail",
            tls_context=self._tls_context(),
            timeout=smtp_config.command_timeout_s,
        )

    def _tls_context(self) -> ssl.SSLContext | None:
        smtp_config = self.config.smtp
        if not smtp_config.tls_cert_path:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(smtp_config.tls_cert_path, smtp_config.tls_key_path)
        return context

    async def start(self) -> None:
        """Listen on [smtp] listen and start the queue manager."""
        loop = asyncio.get_running_loop()
        host, port = self.config.listen_host, self.config.listen_port
        self.server = await loop.create_server(self._protocol, host=host, port=port)
        self.port = self.server.sockets[0].getsockname()[1]
        self.http = await start_http(self.config, self.store)
        if self.run_queue:
            self.queue_task = asyncio.create_task(self.queue.run(), name="queue-manager")
        log.info(fields(event="listening", address=f"{host}:{self.port}", domain=self.config.relay.domain))

    async def stop(self, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        """Stop accepting, wait for sessions and deliveries, then close the database."""
        if self.server is not None:
            self.server.close()
            await _wait_for_sessions(self, grace_s)
        await self.queue.stop(timeout_s=grace_s)
        if self.queue_task is not None:
            self.queue_task.cancel()
            await asyncio.gather(self.queue_task, return_exceptions=True)
        await self.transport.close()
        if self.http is not None:
            await self.http.stop()
        await self.store.close()
        log.info(fields(event="stopped"))

    async def __aenter__(self) -> "Relay":
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.stop(grace_s=5.0)


async def _wait_for_sessions(relay: Relay, grace_s: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace_s
    while relay.connections and loop.time() < deadline:
        await asyncio.sleep(0.1)
    if relay.connections:
        log.warning(fields(event="shutdown", open_sessions=sum(relay.connections.values()), status="closing open sessions"))


def notify_systemd(state: str) -> None:
    """Send `state` to systemd's notification socket when NOTIFY_SOCKET is set."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(state.encode())


async def serve(config: Config) -> None:
    """Run the relay until SIGTERM or SIGINT."""
    relay = Relay(config)
    await relay.start()
    notify_systemd("READY=1")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reload, config)

    await stop.wait()
    notify_systemd("STOPPING=1")
    log.info(fields(event="shutdown", status="stopping (signal)"))
    await relay.stop()


def _reload(config: Config) -> None:
    if config.path is None:
        return
    try:
        fresh = config_module.load(config.path)
    except ConfigError as exc:
        log.error(fields(event="reload_failed", error=str(exc), status="keeping the running configuration"))
        return
    logging.getLogger().setLevel(fresh.log.level.upper())
    log.info(fields(event="reload", log_level=fresh.log.level, status="log level applied; restart to apply other changes"))


def run(config: Config) -> None:
    """Configure logging and run the relay; return when it has stopped."""
    log_module.configure(config.log.level)
    asyncio.run(serve(config))
    _end_leftover_threads(EXIT_GRACE_S)


def _end_leftover_threads(grace_s: float) -> None:
    """Exit even if a database driver thread outlived the shutdown.

    A session cancelled in the middle of a query (a client that disconnects
    during shutdown, say) can leave an aiosqlite connection checked out, and
    its non-daemon thread would keep the process alive after `stopped`. Every
    commit is on disk by then, so exiting loses nothing.
    """
    deadline = time.monotonic() + grace_s
    for thread in threading.enumerate():
        if thread is threading.main_thread() or thread.daemon:
            continue
        thread.join(timeout=max(0.0, deadline - time.monotonic()))

    leftovers = [t.name for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if leftovers:
        log.warning(fields(event="exit", threads=",".join(leftovers), status="exiting without them"))
        logging.shutdown()
        os._exit(0)
