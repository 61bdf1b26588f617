"""A DNS server on 127.0.0.1 for delivery tests, answering from a dict of records.

Records are keyed by (name, type) and written in zone-file text, for example
{("example.test", "MX"): ["10 mx1.example.test."], ("mx1.example.test", "A"): ["127.0.0.2"]}.
Names match case-insensitively, with or without the final dot. A name with no
record of any type gets NXDOMAIN; a name that has records of other types gets
an empty NOERROR answer (NODATA). Every answer is authoritative, and negative
answers carry an SOA record. Records go out in the order given (dnspython
shuffles them by default), so a test sees the client's own ordering.

Per-name switches, each a set of names:
    servfail    answered with SERVFAIL
    nxdomain    answered with NXDOMAIN even if the name has records
    silent      never answered, so the resolver times out
`truncate_udp = True` sets the TC flag on every UDP answer, which makes the
resolver repeat the query over TCP. UDP and TCP listen on the same port.

`queries` lists (name, type, "udp" or "tcp") for every query received, so a test
can check which lookups went through this server.
"""

from __future__ import annotations

import asyncio
import struct

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

TTL = 60
SOA_TEXT = "ns.test. hostmaster.test. 1 3600 600 86400 60"


def _key(name: str) -> str:
    return name.rstrip(".").lower()


class DnsServer:
    """An authoritative-looking DNS server on the running event loop."""

    def __init__(self, records: dict[tuple[str, str], list[str]] | None = None, host: str = "127.0.0.1"):
        self.host = host
        self.port = 0
        self.records: dict[tuple[str, str], list[str]] = {}
        for (name, rdtype), values in (records or {}).items():
            self.add(name, rdtype, values)
        self.servfail: set[str] = set()
        self.nxdomain: set[str] = set()
        self.silent: set[str] = set()
        self.truncate_udp = False
        self.queries: list[tuple[str, str, str]] = []
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.AbstractServer | None = None
        self._tcp_writers: set[asyncio.StreamWriter] = set()

    def add(self, name: str, rdtype: str, values: list[str]) -> None:
        """Set the records of one (name, type), replacing any that were there."""
        self.records[(_key(name), rdtype.upper())] = list(values)

    @property
    def nameserver(self) -> str:
        """The "ip:port" entry for [delivery] dns_nameservers."""
        return f"{self.host}:{self.port}"

    async def start(self) -> "DnsServer":
        loop = asyncio.get_running_loop()
        # Bind UDP on a free port, then TCP on the same one; retry if TCP's is taken.
        for _ in range(20):
            udp, _protocol = await loop.create_datagram_endpoint(
                lambda: _UdpProtocol(self), local_addr=(self.host, 0)
            )
            port = udp.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, self.host, port)
            except OSError:
                udp.close()
                continue
            self._udp, self.port = udp, port
            return self
        raise RuntimeError(f"no port on {self.host} is free for both UDP and TCP")

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
        for writer in list(self._tcp_writers):
            writer.close()
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()

    def answer(self, wire: bytes, transport: str) -> bytes | None:
        """Return the response to one query in wire format, or None to send nothing."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        if not query.question:
            return None

        question = query.question[0]
        name = _key(question.name.to_text())
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((name, rdtype, transport))
        if name in self.silent:
            return None

        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if name in self.servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire(want_shuffle=False)

        exists = any(key_name == name for key_name, _type in self.records)
        values = self.records.get((name, rdtype))
        if name in self.nxdomain or not exists:
            response.set_rcode(dns.rcode.NXDOMAIN)
            response.authority.append(self._soa())
        elif values:
            response.answer.append(
                dns.rrset.from_text_list(question.name, TTL, dns.rdataclass.IN, question.rdtype, values)
            )
        else:
            response.authority.append(self._soa())

        if transport == "udp" and self.truncate_udp:
            response.flags |= dns.flags.TC
            response.answer.clear()
            response.authority.clear()
        return response.to_wire(want_shuffle=False)

    def _soa(self) -> dns.rrset.RRset:
        return dns.rrset.from_text("test.", TTL, dns.rdataclass.IN, dns.rdatatype.SOA, SOA_TEXT)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # DNS over TCP: each message is preceded by its length as two bytes (RFC 1035 4.2.2).
        self._tcp_writers.add(writer)
        try:
            while True:
                header = await reader.readexactly(2)
                (length,) = struct.unpack("!H", header)
                reply = self.answer(await reader.readexactly(length), "tcp")
                if reply is not None:
                    writer.write(struct.pack("!H", len(reply)) + reply)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._tcp_writers.discard(writer)
            writer.close()


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer):
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        reply = self.server.answer(data, "udp")
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)
