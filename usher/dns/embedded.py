"""An authoritative DNS server inside usher's own process, for sites without one.

A site that runs no DNS server of its own can let usher answer for its zones:
:class:`ZoneStore` holds the zones in memory (an SOA and NS at each apex made
from configuration, the serial bumped on every change), :class:`EmbeddedDns`
serves them over UDP and TCP on the event loop, and :class:`EmbeddedBackend`
is the :class:`~usher.dns.backend.DnsBackend` that changes the store, so the
controller publishes records the same way whichever backend it has.

The server is authoritative only: no recursion, no delegation, no CNAME or
wildcards (usher publishes A, AAAA, PTR and TXT). It answers as RFC 1034 and
RFC 2308 say: AA on every in-zone answer; NODATA (NOERROR, no answer, the SOA
in authority) for a name that exists without the type asked, empty
non-terminals included; NXDOMAIN with the SOA for a missing name; REFUSED
outside its zones; FORMERR for what it cannot parse. UDP answers larger than
512 bytes, or than the EDNS payload the client offers, go out empty with TC
set, so the client retries over TCP. Zone transfers (AXFR, TCP only) are off
unless enabled.

Answering costs a dict lookup for a name that exists (a few more, one per
label, to place a missing name in its zone) and one message rendering. A
change costs dict updates keyed by the records' canonical text: a name's
rrsets, and a zone's SOA with its new serial, are built when next read, so a
burst of starts that changes the zones a thousand times between two queries
builds them once. Every TCP read and write has a time limit, connections are
bounded in number and in queries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, NamedTuple, cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from usher.dns.backend import DnsBackend
from usher.dns.records import ChangeSet, Record, Zones, canonical_name, to_rdata
from usher.errors import DnsError, DnsUnavailable

__all__ = ["EmbeddedBackend", "EmbeddedDns", "Lookup", "ZoneStore"]

log = logging.getLogger(__name__)

STORE_TYPES = frozenset({"A", "AAAA", "PTR", "TXT"})
"""The types a :class:`ZoneStore` holds besides its own SOA and NS."""

_IN = dns.rdataclass.IN
_SOA = dns.rdatatype.SOA
_NS = dns.rdatatype.NS
_HEADER = struct.Struct("!HHHHHH")
_LENGTH = struct.Struct("!H")
_AXFR_RECORDS_PER_MESSAGE = 200


# ================================================================== the store
Key = tuple[bytes, ...]
"""A name's labels in lower case, the store's key: names that compare equal
have equal keys, and hashing one costs no dnspython Name."""


@dataclass(eq=False)
class _Zone:
    origin: dns.name.Name
    key: Key
    text: str
    serial: int
    soa: dns.rrset.RRset
    negative_soa: dns.rrset.RRset
    """The SOA for NXDOMAIN and NODATA, its TTL the negative TTL (RFC 2308)."""
    ns: dns.rrset.RRset
    ns_name: dns.name.Name
    names: set[Key] = field(default_factory=set)
    soa_serial: int = -1
    """The serial :attr:`soa` was built for: it is rebuilt when next read, not
    per change (hashing an SOA rdata costs dnspython 40 us, and a burst of
    starts changes the zones hundreds of times between two queries)."""


@dataclass(eq=False)
class _Node:
    zone: _Zone
    text: str
    """The canonical name (a Record's) the node was made for."""
    labels: Key
    apex: bool = False
    """The zone's apex: its SOA and NS come from the zone and it never goes."""
    values: dict[str, dict[str, None]] = field(default_factory=dict)
    """The records here: canonical values (a Record's) by type name, in the
    order added. A change compares strings; dnspython objects are made when
    the node is next read, not per change (hashing a PTR rdata renders it:
    40 us)."""
    rrsets: dict[dns.rdatatype.RdataType, dns.rrset.RRset] | None = None
    """:attr:`values` as rrsets, built when first read after a change."""
    _name: dns.name.Name | None = None

    @property
    def name(self) -> dns.name.Name:
        if self._name is None:
            self._name = dns.name.Name(self.labels)
        return self._name


class Lookup(NamedTuple):
    """The answer to one question, before it becomes a message."""

    rcode: dns.rcode.Rcode
    answer: list[dns.rrset.RRset]
    authority: list[dns.rrset.RRset]
    additional: list[dns.rrset.RRset]
    authoritative: bool


_REFUSED = Lookup(dns.rcode.REFUSED, [], [], [], False)


class ZoneStore:
    """The zones the embedded server answers for, in memory.

    Each zone gets an SOA (primary ``primary_ns``, default ``ns.<zone>``;
    mailbox ``hostmaster.<zone>``; the given timers) and an NS record naming
    the primary. The serial starts at ``serial`` (default: the current Unix
    time, so a restarted process moves forward) and goes up by one for each
    :meth:`apply` that changes the zone. The store holds A, AAAA, PTR and TXT
    records with TTL ``ttl``. It is not thread-safe: use it from the event loop.

    Raises:
        DnsError: a zone origin is not a valid name.
    """

    def __init__(self, zones: Iterable[str] | Zones, *, ttl: int = 60,
                 primary_ns: str | None = None, refresh: int = 3600, retry: int = 600,
                 expire: int = 86400, minimum: int = 60, serial: int | None = None) -> None:
        self.zones = zones if isinstance(zones, Zones) else Zones(zones)
        self.ttl = ttl
        self._timers = (refresh, retry, expire, minimum)
        self._zones: dict[Key, _Zone] = {}
        self._zones_by_text: dict[str, _Zone] = {}
        self._nodes: dict[Key, _Node] = {}
        # The same nodes by canonical name text (a Record's name): a change
        # finds its node without parsing the name (11 us each in dnspython).
        self._nodes_by_text: dict[str, _Node] = {}
        # Names with no records of their own but records below them (empty
        # non-terminals), with how many names below hold them up.
        self._ent: dict[Key, int] = {}
        start = int(time.time()) if serial is None else serial
        for text in self.zones:
            origin = dns.name.from_text(text)
            ns_name = dns.name.from_text(canonical_name(primary_ns or f"ns.{text}"))
            ns = dns.rrset.from_rdata(origin, ttl, dns.rdata.from_text(_IN, _NS, ns_name.to_text()))
            zone = _Zone(origin=origin, key=_key(origin), text=text,
                         serial=start & 0xFFFFFFFF, soa=ns, negative_soa=ns, ns=ns,
                         ns_name=ns_name)
            self._zones[zone.key] = self._zones_by_text[text] = zone
            apex = _Node(zone, text, origin.labels, apex=True, _name=origin)
            self._nodes[zone.key] = self._nodes_by_text[text] = apex
            zone.names.add(zone.key)
            self._fresh(zone)

    def _fresh(self, zone: _Zone) -> _Zone:
        """``zone`` with its SOA rrsets built for its current serial (see :class:`_Zone`)."""
        if zone.soa_serial == zone.serial:
            return zone
        refresh, retry, expire, minimum = self._timers
        if zone.soa.rdtype == _SOA:
            # A new serial on the existing record: parsing text per change
            # cost half a millisecond per zone.
            rdata = zone.soa[0].replace(serial=zone.serial)
        else:
            rdata = dns.rdata.from_text(
                _IN, _SOA, f"{zone.ns_name} hostmaster.{zone.text} {zone.serial} {refresh}"
                           f" {retry} {expire} {minimum}")
        zone.soa = dns.rrset.from_rdata(zone.origin, self.ttl, rdata)
        zone.negative_soa = dns.rrset.from_rdata(zone.origin, min(self.ttl, minimum), rdata)
        zone.soa_serial = zone.serial
        return zone

    def _rrsets(self, node: _Node) -> dict[dns.rdatatype.RdataType, dns.rrset.RRset]:
        """The rrsets at ``node`` as answers carry them (the apex's SOA and NS first)."""
        if node.rrsets is None:
            node.rrsets = {
                dns.rdatatype.from_text(rdtype): dns.rrset.from_rdata_list(
                    node.name, self.ttl, [to_rdata(rdtype, value) for value in values])
                for rdtype, values in node.values.items()}
        if node.apex:
            zone = self._fresh(node.zone)
            return {_SOA: zone.soa, _NS: zone.ns, **node.rrsets}
        return node.rrsets

    def serial(self, zone: str) -> int:
        """The current SOA serial of ``zone``.

        Raises:
            DnsError: ``zone`` is not one of the store's zones.
        """
        return self._zone(zone).serial

    def _zone(self, zone: str) -> _Zone:
        found = self._zones_by_text.get(canonical_name(zone))
        if found is None:
            raise DnsError(f"zone {zone} is not served here ({', '.join(self.zones)})")
        return found

    # ------------------------------------------------------------ changes
    def apply(self, changes: ChangeSet) -> None:
        """Make ``changes``: deletes first, then adds; all or nothing.

        Idempotent like every backend. Each zone whose records changed gets a
        new serial.

        Raises:
            DnsError: a record is outside every zone or of a type other than
                A, AAAA, PTR and TXT (nothing is changed then).
        """
        grouped = changes.group_by_zone(self.zones)
        steps: list[tuple[bool, _Zone, Record]] = []
        for zone_text, group in grouped.items():
            zone = self._zones_by_text[zone_text]
            for adding, records in ((False, group.deletes), (True, group.adds)):
                for record in records:
                    if record.rdtype not in STORE_TYPES:
                        raise DnsError(f"the embedded DNS server holds only A, AAAA, PTR and"
                                       f" TXT records, not {record}")
                    steps.append((adding, zone, record))
        touched: set[_Zone] = set()
        for adding, zone, record in steps:
            if self._add(zone, record) if adding else self._delete(record):
                touched.add(zone)
        for zone in touched:
            zone.serial = (zone.serial + 1) & 0xFFFFFFFF

    def _add(self, zone: _Zone, record: Record) -> bool:
        node = self._nodes_by_text.get(record.name)
        if node is None:
            labels = _labels(record.name)
            node = _Node(zone, record.name, labels)
            key = _lower(labels)
            self._nodes[key] = self._nodes_by_text[record.name] = node
            zone.names.add(key)
            self._count_ancestors(zone, key, +1)
        values = node.values.setdefault(record.rdtype, {})
        if record.value in values:
            return False
        values[record.value] = None
        node.rrsets = None
        return True

    def _delete(self, record: Record) -> bool:
        node = self._nodes_by_text.get(record.name)
        values = node.values.get(record.rdtype) if node is not None else None
        if node is None or values is None or record.value not in values:
            return False
        del values[record.value]
        if not values:
            del node.values[record.rdtype]
        node.rrsets = None
        if not node.values and not node.apex:
            key = _lower(node.labels)
            del self._nodes[key]
            del self._nodes_by_text[record.name]
            node.zone.names.discard(key)
            self._count_ancestors(node.zone, key, -1)
        return True

    def _count_ancestors(self, zone: _Zone, key: Key, delta: int) -> None:
        # The ancestors strictly between the name and its zone's apex.
        for cut in range(1, len(key) - len(zone.key)):
            parent = key[cut:]
            count = self._ent.get(parent, 0) + delta
            if count > 0:
                self._ent[parent] = count
            else:
                self._ent.pop(parent, None)

    # ------------------------------------------------------------ reading
    def records(self, zone: str) -> set[Record]:
        """Every record of ``zone`` except the apex SOA and NS.

        Raises:
            DnsError: ``zone`` is not one of the store's zones.
        """
        found = self._zone(zone)
        result: set[Record] = set()
        for key in found.names:
            node = self._nodes[key]
            for rdtype, values in node.values.items():
                result.update(Record.from_rdata(node.name, to_rdata(rdtype, value))
                              for value in values)
        return result

    def _zone_of(self, key: Key) -> _Zone | None:
        # One dict lookup per label, innermost first: the longest suffix wins.
        for cut in range(len(key)):
            zone = self._zones.get(key[cut:])
            if zone is not None:
                return zone
        return None

    def lookup(self, qname: dns.name.Name, qtype: dns.rdatatype.RdataType) -> Lookup:
        """The answer to ``qname``/``qtype`` (class IN), as RFC 1034 4.3.2 says for us."""
        key = _key(qname)
        node = self._nodes.get(key)
        if node is not None:
            zone = self._fresh(node.zone)
            rrsets = self._rrsets(node)
            if qtype == dns.rdatatype.ANY:
                answer = list(rrsets.values())
            else:
                rrset = rrsets.get(qtype)
                answer = [rrset] if rrset is not None else []
            if not answer:
                return Lookup(dns.rcode.NOERROR, [], [zone.negative_soa], [], True)
            additional: list[dns.rrset.RRset] = []
            if qtype == _NS and node.apex:
                glue = self._nodes.get(_key(zone.ns_name))
                if glue is not None:
                    additional = [r for t, r in self._rrsets(glue).items()
                                  if t in (dns.rdatatype.A, dns.rdatatype.AAAA)]
            return Lookup(dns.rcode.NOERROR, answer, [], additional, True)
        zone_ = self._zone_of(key)
        if zone_ is None:
            return _REFUSED
        rcode = dns.rcode.NOERROR if key in self._ent else dns.rcode.NXDOMAIN
        return Lookup(rcode, [], [self._fresh(zone_).negative_soa], [], True)

    def transfer(self, origin: dns.name.Name) -> list[dns.rrset.RRset] | None:
        """The records of the zone at ``origin`` as an AXFR sends them, SOA first and last.

        Each rrset holds one record and is a copy, so the result stays valid
        while the zone changes. None if ``origin`` is not a zone apex here.
        """
        zone = self._zones.get(_key(origin))
        if zone is None:
            return None
        self._fresh(zone)
        body: list[dns.rrset.RRset] = []
        for key in zone.names:
            node = self._nodes[key]
            for rdtype, rrset in self._rrsets(node).items():
                if node.apex and rdtype == _SOA:
                    continue
                body.extend(dns.rrset.from_rdata(node.name, rrset.ttl, rd) for rd in rrset)
        soa = zone.soa.copy()
        return [soa, *body, soa]


def _key(name: dns.name.Name) -> Key:
    """The store's key of ``name``."""
    return _lower(name.labels)


def _lower(labels: Key) -> Key:
    return tuple(label.lower() for label in labels)


def _labels(text: str) -> Key:
    """The labels of canonical name ``text`` (absolute, lower case), as dnspython's.

    Without escapes a canonical name is plain ASCII labels between dots: split,
    not parsed (11 us in dnspython); with them, dnspython decodes the escapes.
    """
    if "\\" in text or text == ".":
        return dns.name.from_text(text).labels
    return tuple(label.encode() for label in text.split("."))


# ================================================================== the server
def _header_reply(wire: bytes, rcode: int) -> bytes:
    """A bare reply (no sections) to the query in ``wire``, for what we cannot parse."""
    (qid, flags) = struct.unpack_from("!HH", wire)
    keep = flags & (0x7800 | dns.flags.RD)  # opcode and RD, as RFC 1035 echoes them
    return _HEADER.pack(qid, dns.flags.QR | keep | (rcode & 0xF), 0, 0, 0, 0)


class EmbeddedDns:
    """The authoritative server for a :class:`ZoneStore`, on UDP and TCP at ``host``:``port``.

    ``port`` 0 picks a free port (the same for UDP and TCP); read
    :attr:`port` after :meth:`start`. ``max_udp_payload`` caps the UDP
    answer size whatever the client offers (1232 avoids IP fragmentation).
    TCP connections beyond ``max_tcp_connections`` are closed at once; a
    connection is closed after ``tcp_idle_timeout_s`` without a complete
    query, after ``max_tcp_queries`` queries, or on a query longer than
    ``max_tcp_message`` bytes. AXFR is answered (over TCP) only with
    ``allow_axfr``; otherwise REFUSED.
    """

    def __init__(self, store: ZoneStore, host: str = "127.0.0.1", port: int = 0, *,
                 max_udp_payload: int = 1232, max_tcp_connections: int = 64,
                 tcp_idle_timeout_s: float = 10.0, max_tcp_queries: int = 1000,
                 max_tcp_message: int = 16384, allow_axfr: bool = False) -> None:
        self.store = store
        self.host = host
        self._requested_port = port
        self._port: int | None = None
        self.max_udp_payload = max(512, min(max_udp_payload, 65535))
        self.max_tcp_connections = max_tcp_connections
        self.tcp_idle_timeout_s = tcp_idle_timeout_s
        self.max_tcp_queries = max_tcp_queries
        self.max_tcp_message = max_tcp_message
        self.allow_axfr = allow_axfr
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}

    @property
    def port(self) -> int:
        """The port the server listens on (UDP and TCP).

        Raises:
            DnsError: the server is not started.
        """
        if self._port is None:
            raise DnsError("the embedded DNS server is not started")
        return self._port

    # ------------------------------------------------------------ lifetime
    async def start(self) -> int:
        """Listen on UDP and TCP; return the port. Does nothing more if started.

        Raises:
            DnsUnavailable: the address cannot be bound (in use, not local).
        """
        if self._port is not None:
            return self._port
        loop = asyncio.get_running_loop()
        # With port 0 the kernel picks the UDP port and TCP must get the same
        # one; another process may hold it for TCP, so try a few times.
        attempts = 1 if self._requested_port else 20
        error: OSError | None = None
        for _ in range(attempts):
            try:
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: _UdpProtocol(self), local_addr=(self.host, self._requested_port))
            except OSError as exc:
                raise DnsUnavailable(f"cannot listen on UDP {self.host} port"
                                     f" {self._requested_port}: {exc.strerror}") from None
            port = int(transport.get_extra_info("sockname")[1])
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, self.host, port,
                                                       reuse_address=True)
            except OSError as exc:
                transport.close()
                error = exc
                continue
            self._udp = transport
            self._port = port
            log.info("embedded DNS serving %s on %s port %d", ", ".join(self.store.zones),
                     self.host, port)
            return port
        assert error is not None
        raise DnsUnavailable(f"cannot listen on TCP {self.host}: {error.strerror}")

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop listening and close every connection, within ``timeout`` seconds. Safe twice."""
        udp, self._udp = self._udp, None
        tcp, self._tcp = self._tcp, None
        self._port = None
        if udp is not None:
            udp.close()
        if tcp is not None:
            tcp.close()
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        if tcp is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(tcp.wait_closed(), timeout)

    async def __aenter__(self) -> EmbeddedDns:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    # ------------------------------------------------------------ answering
    def answer(self, wire: bytes, *, tcp: bool) -> list[bytes]:
        """The reply messages to the query in ``wire``: none (ignore it), one, or an AXFR's.

        Never raises for what a client sends: garbage gets FORMERR, or no
        answer when even the header is missing or the message is a response.
        """
        if len(wire) < _HEADER.size or wire[2] & 0x80:
            # Too short to echo an ID, or a response: answering one could
            # start a loop between two servers.
            return []
        try:
            query = dns.message.from_wire(wire)
        except dns.message.UnknownTSIGKey:
            return [_header_reply(wire, dns.rcode.NOTAUTH)]
        except Exception:
            return [_header_reply(wire, dns.rcode.FORMERR)]
        if query.opcode() != dns.opcode.QUERY:
            return [_header_reply(wire, dns.rcode.NOTIMP)]
        if len(query.question) != 1:
            return [_header_reply(wire, dns.rcode.FORMERR)]
        question = query.question[0]
        response = dns.message.make_response(query, our_payload=self.max_udp_payload)
        if query.edns > 0:
            response.set_rcode(dns.rcode.BADVERS)
            return [response.to_wire()]
        qtype = question.rdtype
        if question.rdclass not in (_IN, dns.rdataclass.ANY):
            response.set_rcode(dns.rcode.REFUSED)
            return [response.to_wire()]
        if qtype == dns.rdatatype.AXFR:
            return self._transfer(query, response, tcp=tcp)
        if dns.rdatatype.is_metatype(qtype) and qtype != dns.rdatatype.ANY:
            response.set_rcode(dns.rcode.NOTIMP)  # IXFR, MAILA, ... and OPT/TSIG as questions
            return [response.to_wire()]
        found = self.store.lookup(question.name, qtype)
        response.set_rcode(found.rcode)
        if found.authoritative:
            response.flags |= dns.flags.AA
        response.answer = found.answer
        response.authority = found.authority
        response.additional = found.additional
        if tcp:
            return [response.to_wire(max_size=65535)]
        limit = max(512, min(query.payload, self.max_udp_payload)) if query.edns >= 0 else 512
        try:
            return [response.to_wire(max_size=limit)]
        except dns.exception.TooBig:
            # RFC 2181 9: no partial rrsets; an empty answer with TC sends the
            # client to TCP, where it gets everything.
            response.answer, response.authority, response.additional = [], [], []
            response.flags |= dns.flags.TC
            return [response.to_wire(max_size=limit)]

    def _transfer(self, query: dns.message.Message, response: dns.message.Message, *,
                  tcp: bool) -> list[bytes]:
        if not tcp or not self.allow_axfr:
            response.set_rcode(dns.rcode.REFUSED)
            return [response.to_wire()]
        rrsets = self.store.transfer(query.question[0].name)
        if rrsets is None:
            response.set_rcode(dns.rcode.NOTAUTH)  # RFC 5936 2.2.1: not a zone of ours
            return [response.to_wire()]
        messages: list[bytes] = []
        start, step = 0, _AXFR_RECORDS_PER_MESSAGE
        # Each pass sends records or halves the step: bounded by records + log2(step).
        while start < len(rrsets):
            part = dns.message.make_response(query, our_payload=self.max_udp_payload)
            if messages:
                part.question = []  # RFC 5936 2.2.1: only the first message needs it
            part.flags |= dns.flags.AA
            part.answer = rrsets[start:start + step]
            try:
                messages.append(part.to_wire(max_size=65535))
            except dns.exception.TooBig:
                if step == 1:
                    raise
                step //= 2
                continue
            start += step
        return messages

    async def _serve_tcp(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is None or len(self._connections) >= self.max_tcp_connections:
            log.debug("DNS TCP connection from %s refused: %d open",
                      writer.get_extra_info("peername"), len(self._connections))
            writer.close()
            return
        self._connections[task] = writer
        try:
            for _ in range(self.max_tcp_queries):
                try:
                    async with asyncio.timeout(self.tcp_idle_timeout_s):
                        (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
                        if length > self.max_tcp_message:
                            log.debug("DNS TCP query of %d bytes from %s: closing", length,
                                      writer.get_extra_info("peername"))
                            return
                        wire = await reader.readexactly(length)
                except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                    return
                replies = self.answer(wire, tcp=True)
                if not replies:
                    return
                for reply in replies:
                    writer.write(_LENGTH.pack(len(reply)) + reply)
                try:
                    async with asyncio.timeout(self.tcp_idle_timeout_s):
                        await writer.drain()
                except (TimeoutError, ConnectionError):
                    return
        except Exception:
            log.exception("DNS TCP connection from %s failed",
                          writer.get_extra_info("peername"))
        finally:
            del self._connections[task]
            writer.close()


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: EmbeddedDns) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        if self.transport is None or not addr[1]:
            return  # source port 0 cannot be answered
        try:
            replies = self.server.answer(data, tcp=False)
        except Exception:
            log.exception("DNS query from %s failed", addr[0])
            return
        for reply in replies:
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        # An ICMP error for an earlier answer (the client went away): not ours to fix.
        log.debug("DNS UDP error: %s", exc)


# ================================================================== the backend
class EmbeddedBackend(DnsBackend):
    """The :class:`~usher.dns.backend.DnsBackend` of the embedded server: it changes the store.

    Nothing here waits on the network, so :class:`~usher.errors.DnsUnavailable`
    is never raised; :class:`~usher.errors.DnsError` is, for records outside
    every zone or of types the store does not hold.
    """

    def __init__(self, store: ZoneStore) -> None:
        self.store = store
        self.zones = store.zones

    async def apply(self, changes: ChangeSet) -> None:
        """See :meth:`DnsBackend.apply`; here all zones change at once or none does."""
        self.store.apply(changes)

    async def read_all(self, zone: str) -> set[Record]:
        """See :meth:`DnsBackend.read_all`."""
        return self.store.records(zone)

    async def close(self) -> None:
        """Nothing to release: the server, not the backend, owns the sockets."""
