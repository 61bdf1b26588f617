"""A relay on 127.0.0.1 with the cases' cast provisioned, and a sink behind it.

`RelayEnv` runs relaymail's SMTP listener and queue manager on the test's own
event loop (no thread, no second loop), delivering through the smarthost
transport to an in-process aiosmtpd `Sink`. The cast is the one of the case
files: seller S1 with approved sender ventas@example.com, buyer B1
juan.perez@example.net, their pair with the aliases the inputs name, order
402-7781, and the two relay Message-IDs the conversation already has.
"""

from __future__ import annotations

import asyncio
import secrets
import smtplib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from relaymail import config as relaymail_config
from relaymail import db, provision
from relaymail.models import Message, ThreadId
from relaymail.server import Relay
from sqlalchemy import select

from conftest import free_port
from sink import Sink

DOMAIN = "marketplace.example"
BUYER_ALIAS = f"t969vz2jn3bdsy7@{DOMAIN}"
SELLER_ALIAS = f"k7m2q9x4zr1c8nw@{DOMAIN}"
BUYER = "juan.perez@example.net"
SELLER = "ventas@example.com"
BUSINESS = "Artesanías Ñandú S.A. de C.V."
BUYER_MESSAGE_ID = f"mkt.20240311.b7c1e0@{DOMAIN}"  # a buyer message as the seller received it
SELLER_MESSAGE_ID = f"mkt.20240311.c4d2f1@{DOMAIN}"  # a seller message as the buyer received it


def write_relay_config(directory: Path, sink_port: int, database_url: str | None = None, extra: str = "") -> Path:
    """Write a config delivering to the sink on `sink_port`, with short retry times."""
    url = database_url or f"sqlite+aiosqlite:///{directory / 'relay.sqlite3'}"
    path = directory / "relaymail.toml"
    path.write_text(
        f"""\
[relay]
domain = "{DOMAIN}"
hostname = "mx.{DOMAIN}"
operators_address = "operators@ops.example"
bounce_secret = "{secrets.token_hex(16)}"

[smtp]
listen = "127.0.0.1:{free_port()}"
unknown_recipient_delay_s = 0.05

[database]
url = "{url}"

[delivery]
transport = "smarthost"
smarthost = "127.0.0.1:{sink_port}"
tls = "none"
poll_interval_s = 0.1
min_backoff_s = 1
max_backoff_s = 2
connect_timeout_s = 5
{extra}""",
        encoding="utf-8",
    )
    if "[http]" not in extra:
        # The HTTP server of `relaymail serve` would otherwise take the fixed default port.
        with path.open("a", encoding="utf-8") as config_file:
            config_file.write(f'\n[http]\nlisten = "127.0.0.1:{free_port()}"\n')
    return path


@dataclass
class SendOutcome:
    code: int
    text: str


class RelayEnv:
    """The relay, its sink and the provisioned cast."""

    def __init__(self, directory: Path, database_url: str | None = None, extra: str = ""):
        self.directory = directory
        self.database_url = database_url
        self.extra = extra
        self.sink = Sink()
        self.relay: Relay | None = None
        self.config: relaymail_config.Config | None = None

    async def start(self, provision_cast: bool = True, run_queue: bool = True) -> "RelayEnv":
        await self.sink.start()
        path = write_relay_config(self.directory, self.sink.port, self.database_url, self.extra)
        self.config = relaymail_config.load(path)
        await db.upgrade(self.config.database.url)
        self.relay = Relay(self.config, run_queue=run_queue)
        if provision_cast:
            await self.provision_cast()
        await self.relay.start()
        return self

    async def restart(self, run_queue: bool = True) -> None:
        """Stop the relay and start a new one on the same database and port."""
        await self.relay.stop(grace_s=2.0)
        self.relay = Relay(self.config, run_queue=run_queue)
        await self.relay.start()

    async def stop(self) -> None:
        if self.relay is not None:
            await self.relay.stop(grace_s=2.0)
        await self.sink.stop()

    @property
    def port(self) -> int:
        return self.relay.port

    async def provision_cast(self, business_name: str = BUSINESS, opted_out: bool = False, block_notice: bool = True) -> None:
        async with self.relay.store.session() as session:
            await provision.add_seller(
                session, "S1", business_name, SELLER, domain=DOMAIN, senders=[SELLER], block_notice=block_notice
            )
            await provision.add_buyer(session, "B1", BUYER, name="Juan Pérez", domain=DOMAIN, opted_out=opted_out)
            pair = await provision.show_pair(session, "B1", "S1", DOMAIN, buyer_alias=BUYER_ALIAS, seller_alias=SELLER_ALIAS)
            await provision.add_order(session, "402-7781", "B1", "S1", "shipped", placed_at=datetime.now(timezone.utc))
            session.add(ThreadId(pair_id=pair.pair_id, origin="buyer", relay_id=BUYER_MESSAGE_ID, original_id="q0@example.net"))
            session.add(ThreadId(pair_id=pair.pair_id, origin="seller", relay_id=SELLER_MESSAGE_ID, original_id="s0@mail.example.com"))
            await session.commit()

    async def send(self, sender: str, recipients: list[str], data: bytes) -> SendOutcome:
        """Send with smtplib (on a worker thread); return the reply to DATA or the refusal."""
        return await asyncio.to_thread(self._send_blocking, sender, recipients, data)

    def _send_blocking(self, sender: str, recipients: list[str], data: bytes) -> SendOutcome:
        with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as client:
            client.ehlo("client.test")
            code, text = client.mail(sender)
            if code != 250:
                return SendOutcome(code, text.decode())
            for recipient in recipients:
                code, text = client.rcpt(recipient)
                if code not in (250, 251):
                    return SendOutcome(code, text.decode())
            code, text = client.data(data)
            return SendOutcome(code, text.decode())

    async def messages(self) -> list[Message]:
        async with self.relay.store.session() as session:
            return list(await session.scalars(select(Message).order_by(Message.id)))

    async def wait_idle(self, timeout_s: float = 10.0) -> None:
        """Wait until no delivery is queued and due within the next second."""
        from relaymail.queue import list_deliveries

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            pending = await list_deliveries(self.relay.store)
            if not pending:
                return
            await asyncio.sleep(0.05)


def read_case(shared: Path, name: str) -> bytes:
    """Return a case input with CRLF line endings, as a client would send it."""
    data = (shared / "cases" / name / "input.eml").read_bytes()
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
