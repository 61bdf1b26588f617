"""An aiosmtpd sink on 127.0.0.1 that records what arrives, for end-to-end tests."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiosmtpd.smtp import SMTP


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes


@dataclass
class SinkHandler:
    messages: list[Received] = field(default_factory=list)
    # When set, DATA is answered with this reply instead of 250.
    reply: str | None = None
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle_DATA(self, server, session, envelope):
        if self.reply:
            return self.reply
        self.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        self.arrived.set()
        return "250 2.0.0 OK"


class Sink:
    """A downstream SMTP server on the running loop."""

    def __init__(self):
        self.handler = SinkHandler()
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    @property
    def messages(self) -> list[Received]:
        return self.handler.messages

    async def start(self) -> "Sink":
        loop = asyncio.get_running_loop()
        factory = lambda: SMTP(self.handler, decode_data=False, enable_SMTPUTF8=True, hostname="sink.test")  # noqa: E731
        self.server = await loop.create_server(factory, host="127.0.0.1", port=0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def wait_for(self, count: int, timeout_s: float = 10.0) -> list[Received]:
        """Wait until `count` messages arrived; return them (fewer after the timeout)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while len(self.messages) < count and loop.time() < deadline:
            self.handler.arrived.clear()
            try:
                await asyncio.wait_for(self.handler.arrived.wait(), timeout=max(0.01, deadline - loop.time()))
            except asyncio.TimeoutError:
                break
        return list(self.messages)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
