"""A real DNS server for tests: UDP and TCP on 127.0.0.1, a random free port, on the test's event loop.

Messages are parsed and rendered by dnspython (``dns.message.from_wire`` / ``make_response``), so clients
talk to it exactly as to a real authoritative server. Usage::

    async with DnsTestServer() as dns_server:
        dns_server.add("example.org", "MX", "10 mx1.example.org.", ttl=300)
        dns_server.add("mx1.example.org", "A", "203.0.113.7")
        dns_server.add("example.org", "SOA", "ns.example.org. host.example.org. 1 3600 600 86400 60")
        dns_server.behave("broken.example", "servfail")
        resolver = MxResolver(nameservers=[dns_server.nameserver], timeout=0.5)
        ...
        assert dns_server.query_count("example.org", "MX") == 1

Zone data: :meth:`add` takes a name, a type (A, AAAA, MX, CNAME, TXT, SOA, NS, … anything dnspython parses)
and the record's text (names in it are absolute whether or not they end with a dot), with a TTL. Adding
twice to one (name, type) makes an RRset of several records; :meth:`add_many` adds a list at once (a huge
answer). :meth:`add_cname_loop` makes names point at each other in a circle. :meth:`clear` forgets all.

Answers: a name with the queried type gets it; a CNAME is followed inside the zone data and every step
is put in the answer (so a loop is served as it stands — the client must notice); a name that exists
without the type gets NOERROR/no data; any other name NXDOMAIN. Negative answers carry the SOA of the
closest enclosing name that has one (none if there is none), as RFC 2308 expects for negative caching.

Behaviours, per name (and optionally per type), set with :meth:`behave`:

- ``"nxdomain"``, ``"servfail"``, ``"refused"`` — that rcode;
- ``"timeout"`` — never answer (UDP dropped, TCP left waiting);
- ``"truncate"`` — over UDP answer with TC set and no records, so the client retries over TCP, where
  the real answer is given.

Answers larger than the client's UDP payload size (512 without EDNS) are truncated the same way, as real
servers do; so a huge RRset exercises the TCP fall-back by itself.

Counting: every query is counted per (name, type) — :meth:`query_count` — and per transport
(``udp_queries`` / ``tcp_queries``), so tests can check caching and TCP fall-back.

Invariants: binds 127.0.0.1 only; :meth:`stop` closes the sockets and every TCP connection it accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from types import TracebackType
from typing import Literal, cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

Behaviour = Literal["nxdomain", "servfail", "refused", "timeout", "truncate"]
_BEHAVIOURS = ("nxdomain", "servfail", "refused", "timeout", "truncate")
_MAX_CHAIN_SERVED = 32  # stop following CNAMEs here (a loop is served as two or so steps anyway)


def _name(text: str) -> dns.name.Name:
    return dns.name.from_text(text if text.endswith(".") else text + ".")


def _key_text(name: dns.name.Name) -> str:
    return str(name.to_text(omit_final_dot=True)).lower()


class DnsTestServer:
    """An authoritative-style DNS server over UDP and TCP for tests; see the module docstring."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.udp_queries = 0
        self.tcp_queries = 0
        self._records: dict[dns.name.Name, dict[int, dns.rrset.RRset]] = {}
        self._behaviours: dict[tuple[dns.name.Name, int | None], Behaviour] = {}
        self._arrivals: dict[tuple[str, str], list[float]] = {}   # wall-clock time of every query
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tcp_writers: set[asyncio.StreamWriter] = set()
        self._tcp_tasks: set[asyncio.Task[None]] = set()

    # -- life cycle -------------------------------------------------------------------------------

    @property
    def nameserver(self) -> str:
        """``"127.0.0.1:PORT"``, the form MxResolver's ``nameservers`` takes."""
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(20):  # UDP picks the port; TCP must get the same one, which may be taken
            transport, _protocol = await loop.create_datagram_endpoint(
                lambda: _UdpProtocol(self), local_addr=(self.host, 0))
            port = transport.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, self.host, port)
            except OSError:
                transport.close()
                continue
            self._udp, self.port = transport, port
            return
        raise RuntimeError("no port free for both UDP and TCP on " + self.host)

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            for writer in list(self._tcp_writers):
                writer.close()
            # Python 3.11's wait_closed() does not wait for the connection handlers; we do.
            await asyncio.gather(*self._tcp_tasks, return_exceptions=True)
            await self._tcp.wait_closed()
            self._tcp = None

    async def __aenter__(self) -> DnsTestServer:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    # -- zone data and behaviours -----------------------------------------------------------------

    def add(self, name: str, rdtype: str, value: str, ttl: int = 300) -> None:
        """Add one record; the RRset's TTL becomes ``ttl`` (the last one given wins, as in a zone)."""
        self.add_many(name, rdtype, [value], ttl)

    def add_many(self, name: str, rdtype: str, values: list[str], ttl: int = 300) -> None:
        owner = _name(name)
        kind = dns.rdatatype.from_text(rdtype)
        by_type = self._records.setdefault(owner, {})
        rrset = by_type.get(kind)
        if rrset is None:
            rrset = by_type[kind] = dns.rrset.RRset(owner, dns.rdataclass.IN, kind)
        for value in values:
            rrset.add(dns.rdata.from_text(dns.rdataclass.IN, kind, value, origin=dns.name.root,
                                          relativize=False))
        rrset.ttl = ttl

    def add_cname_loop(self, *names: str, ttl: int = 300) -> None:
        """``names[0]`` → ``names[1]`` → … → ``names[0]`` (one name makes it point at itself)."""
        for here, there in zip(names, (*names[1:], names[0]), strict=True):
            self.add(here, "CNAME", there if there.endswith(".") else there + ".", ttl)

    def behave(self, name: str, behaviour: Behaviour, rdtype: str | None = None) -> None:
        """Script the answer for ``name`` (every type, or only ``rdtype``)."""
        if behaviour not in _BEHAVIOURS:
            raise ValueError(f"unknown behaviour {behaviour!r}; known: {', '.join(_BEHAVIOURS)}")
        kind = None if rdtype is None else int(dns.rdatatype.from_text(rdtype))
        self._behaviours[(_name(name), kind)] = behaviour

    def clear(self) -> None:
        self._records.clear()
        self._behaviours.clear()

    def query_count(self, name: str, rdtype: str) -> int:
        """How many queries for (name, type) arrived, over both transports."""
        return len(self._arrivals.get((_key_text(_name(name)), rdtype.upper()), ()))

    def queries_between(self, name: str, rdtype: str, start: float, end: float) -> int:
        """How many queries for (name, type) arrived between two wall-clock (``time.time()``) instants."""
        key = (_key_text(_name(name)), rdtype.upper())
        return sum(1 for at in self._arrivals.get(key, ()) if start <= at <= end)

    def reset_counts(self) -> None:
        self._arrivals.clear()
        self.udp_queries = self.tcp_queries = 0

    # -- answering --------------------------------------------------------------------------------

    def answer(self, wire: bytes, over_tcp: bool) -> bytes | None:
        """The response to one query in wire format, or None to stay silent."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None  # not a DNS query: a real server would drop it too
        if len(query.question) != 1 or query.flags & dns.flags.QR:
            return None
        question = query.question[0]
        self._count(question.name, question.rdtype, over_tcp)
        behaviour = (self._behaviours.get((question.name, int(question.rdtype)))
                     or self._behaviours.get((question.name, None)))
        if behaviour == "timeout":
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if behaviour == "truncate" and not over_tcp:
            response.flags |= dns.flags.TC
            return bytes(response.to_wire())
        if behaviour in ("servfail", "refused"):
            response.set_rcode(dns.rcode.SERVFAIL if behaviour == "servfail" else dns.rcode.REFUSED)
            return bytes(response.to_wire())
        self._fill(response, question.name, question.rdtype, force_nx=behaviour == "nxdomain")
        return self._render(query, response, over_tcp)

    def _count(self, name: dns.name.Name, rdtype: int, over_tcp: bool) -> None:
        key = (_key_text(name), dns.rdatatype.to_text(dns.rdatatype.RdataType.make(rdtype)))
        self._arrivals.setdefault(key, []).append(time.time())
        if over_tcp:
            self.tcp_queries += 1
        else:
            self.udp_queries += 1

    def _fill(self, response: dns.message.Message, qname: dns.name.Name, rdtype: int,
              force_nx: bool) -> None:
        if force_nx or qname not in self._records:
            response.set_rcode(dns.rcode.NXDOMAIN)
            self._add_soa(response, qname)
            return
        current, seen = qname, set()
        for _ in range(_MAX_CHAIN_SERVED):
            by_type = self._records.get(current, {})
            if rdtype in by_type:
                response.answer.append(by_type[rdtype])
                return
            cname = by_type.get(dns.rdatatype.CNAME)
            if cname is None or rdtype == dns.rdatatype.CNAME:
                break
            response.answer.append(cname)
            seen.add(current)
            current = cname[0].target
            if current in seen:
                return  # a loop: every step is in the answer already
        self._add_soa(response, current)  # no data (possibly at the end of a chain)

    def _add_soa(self, response: dns.message.Message, name: dns.name.Name) -> None:
        while True:
            soa = self._records.get(name, {}).get(dns.rdatatype.SOA)
            if soa is not None:
                response.authority.append(soa)
                return
            try:
                name = name.parent()
            except dns.name.NoParent:
                return

    def _render(self, query: dns.message.Message, response: dns.message.Message, over_tcp: bool) -> bytes:
        limit = 65535 if over_tcp else max(512, query.payload if query.edns >= 0 else 512)
        try:
            return bytes(response.to_wire(max_size=limit))
        except dns.exception.TooBig:
            truncated = dns.message.make_response(query)
            truncated.flags |= dns.flags.TC | dns.flags.AA
            return bytes(truncated.to_wire())

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._tcp_writers.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self._tcp_tasks.add(task)
        try:
            while True:
                header = await reader.readexactly(2)
                wire = await reader.readexactly(struct.unpack("!H", header)[0])
                reply = self.answer(wire, over_tcp=True)
                if reply is not None:
                    writer.write(struct.pack("!H", len(reply)) + reply)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._tcp_writers.discard(writer)
            if task is not None:
                self._tcp_tasks.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: DnsTestServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        reply = self.server.answer(data, over_tcp=False)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)
