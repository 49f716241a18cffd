"""The embedded DNS server answers as an authoritative server must, checked with dig.

Everything goes over real sockets on 127.0.0.1: dig over UDP and TCP for the
answers, hand-made datagrams and TCP streams for the abuse cases (garbage,
idle and oversized connections, too many of them).
"""

from __future__ import annotations

import asyncio
import socket
import struct

import dns.flags
import dns.message
import dns.rcode
import pytest

from usher.dns.embedded import EmbeddedBackend, EmbeddedDns, ZoneStore
from usher.dns.records import ChangeSet, Record, vm_records, with_markers
from usher.errors import DnsError, DnsUnavailable

from .conftest import LOOPBACK, WAIT_S, ZONES, Embedded, dig, dig_short, flags, section, status

SITE = "site1"
RR = "bluefish.usher.test"


async def publish(running: Embedded, *records: list[Record]) -> None:
    await running.backend.apply(ChangeSet(adds=with_markers(sum(records, []), SITE)))


@pytest.fixture
async def populated(embedded: Embedded) -> Embedded:
    await publish(embedded,
                  vm_records("web.bluefish.usher.test", "10.1.2.3", rr_name=RR),
                  vm_records("db.bluefish.usher.test", "10.1.2.4", rr_name=RR),
                  vm_records("six.usher.test", "fd00::6"),
                  [Record("many.usher.test", "A", f"10.9.0.{i}") for i in range(1, 101)])
    return embedded


# ------------------------------------------------------------------ answers
@pytest.mark.parametrize("transport", ["+notcp", "+tcp"])
async def test_forward_reverse_and_round_robin(populated: Embedded, transport: str) -> None:
    port = populated.port
    assert await dig_short(port, transport, "web.bluefish.usher.test") == {"10.1.2.3"}
    assert await dig_short(port, transport, "WEB.Bluefish.usher.test") == {"10.1.2.3"}
    assert await dig_short(port, transport, "-x", "10.1.2.3") == {"web.bluefish.usher.test."}
    assert await dig_short(port, transport, RR) == {"10.1.2.3", "10.1.2.4"}
    assert await dig_short(port, transport, "six.usher.test", "AAAA") == {"fd00::6"}
    assert await dig_short(port, transport, "-x", "fd00::6") == {"six.usher.test."}
    out = await dig(port, transport, "web.bluefish.usher.test")
    assert status(out) == "NOERROR" and "aa" in flags(out) and "ra" not in flags(out)


@pytest.mark.parametrize("transport", ["+notcp", "+tcp"])
async def test_nxdomain_nodata_and_empty_non_terminals(populated: Embedded,
                                                      transport: str) -> None:
    port = populated.port
    missing = await dig(port, transport, "nobody.usher.test")
    assert status(missing) == "NXDOMAIN" and "aa" in flags(missing)
    assert section(missing, "AUTHORITY")[0].split()[3] == "SOA"
    nodata = await dig(port, transport, "web.bluefish.usher.test", "AAAA")
    assert status(nodata) == "NOERROR" and section(nodata, "ANSWER") == []
    assert section(nodata, "AUTHORITY")[0].split()[3] == "SOA"
    # bluefish.usher.test has records; 3.2.1.10.in-addr.arpa's parents have none
    # of their own but names below them: empty non-terminals are NODATA too.
    for name in ("2.1.10.in-addr.arpa", "1.10.in-addr.arpa"):
        ent = await dig(port, transport, name, "PTR")
        assert status(ent) == "NOERROR" and section(ent, "ANSWER") == [], name
    assert status(await dig(port, transport, "9.2.1.10.in-addr.arpa", "PTR")) == "NXDOMAIN"


async def test_names_outside_every_zone_are_refused(populated: Embedded) -> None:
    for name in ("example.com", "test", "in-addr.arpa", "."):
        out = await dig(populated.port, name, "A")
        assert status(out) == "REFUSED" and "aa" not in flags(out), name
    assert status(await dig(populated.port, "version.bind", "TXT", "CH")) == "REFUSED"


async def test_soa_and_ns_at_the_apex(populated: Embedded) -> None:
    port = populated.port
    soa = (await dig_short(port, "usher.test", "SOA")).pop().split()
    assert soa[:2] == ["ns.usher.test.", "hostmaster.usher.test."]
    assert await dig_short(port, "usher.test", "NS") == {"ns.usher.test."}
    assert await dig_short(port, "10.in-addr.arpa", "SOA") != set()
    before = int(soa[2])
    await publish(populated, vm_records("new.usher.test", "10.1.2.9"))
    after = int((await dig_short(port, "usher.test", "SOA")).pop().split()[2])
    assert after == before + 1 == populated.store.serial("usher.test.")


async def test_large_udp_answer_is_truncated_and_dig_retries_over_tcp(
        populated: Embedded) -> None:
    port = populated.port
    out = await dig(port, "many.usher.test")
    assert "Truncated, retrying in TCP mode" in out
    assert len(section(out, "ANSWER")) == 100
    ignored = await dig(port, "+ignore", "many.usher.test")
    assert "tc" in flags(ignored) and section(ignored, "ANSWER") == []
    # Without EDNS the limit is 512 bytes: fewer records already truncate.
    await publish(populated, [Record("forty.usher.test", "A", f"10.8.0.{i}")
                              for i in range(1, 41)])
    assert "tc" in flags(await dig(port, "+ignore", "+noedns", "forty.usher.test"))
    assert "tc" not in flags(await dig(port, "+ignore", "forty.usher.test"))


async def test_edns_payload_the_client_offers_is_honoured(embedded: Embedded) -> None:
    store = embedded.store
    big = EmbeddedDns(store, LOOPBACK, 0, max_udp_payload=4096)
    await big.start()
    try:
        await publish(embedded, [Record("many.usher.test", "A", f"10.9.0.{i}")
                                 for i in range(1, 101)])
        assert "tc" not in flags(await dig(big.port, "+ignore", "+bufsize=4096",
                                           "many.usher.test"))
        assert "tc" in flags(await dig(big.port, "+ignore", "+bufsize=1232",
                                       "many.usher.test"))
    finally:
        await big.stop()


async def test_zone_transfer_is_refused_unless_allowed(populated: Embedded) -> None:
    assert "Transfer failed" in await dig(populated.port, "usher.test", "AXFR")
    server = EmbeddedDns(populated.store, LOOPBACK, 0, allow_axfr=True)
    await server.start()
    try:
        out = await dig(server.port, "+nocmd", "+nostats", "usher.test", "AXFR")
        records = [line.split() for line in out.splitlines()
                   if line and not line.startswith(";")]
        assert records[0][3] == records[-1][3] == "SOA"
        assert ["usher.test.", "60", "IN", "NS", "ns.usher.test."] in records
        assert sum(r[3] == "A" for r in records) == 104  # many, web, db and the rr pair
        assert len(records) == 2 + 1 + 104 + 1 + 5  # SOA twice, NS, A, AAAA, markers
        # A name that is not a zone apex: NOTAUTH, and dig says the transfer failed.
        assert "Transfer failed" in await dig(server.port, "web.usher.test", "AXFR")
    finally:
        await server.stop()


# ------------------------------------------------------------------ the backend
async def test_backend_changes_are_seen_by_dig(embedded: Embedded) -> None:
    records = with_markers(vm_records("web.usher.test", "10.1.2.3"), SITE)
    await embedded.backend.apply(ChangeSet(adds=records))
    assert await dig_short(embedded.port, "web.usher.test") == {"10.1.2.3"}
    assert await embedded.backend.read("usher.test.") == \
        {r for r in records if r.name == "web.usher.test."}
    await embedded.backend.apply(ChangeSet(deletes=records))
    assert status(await dig(embedded.port, "web.usher.test")) == "NXDOMAIN"
    assert status(await dig(embedded.port, "3.2.1.10.in-addr.arpa", "PTR")) == "NXDOMAIN"
    assert status(await dig(embedded.port, "2.1.10.in-addr.arpa", "PTR")) == "NXDOMAIN"


async def test_store_changes_are_all_or_nothing(embedded: Embedded) -> None:
    serial = embedded.store.serial("usher.test.")
    bad = ChangeSet(adds={Record("web.usher.test", "A", "10.1.2.3"),
                          Record("alias.usher.test", "CNAME", "web.usher.test")})
    with pytest.raises(DnsError, match="only A, AAAA, PTR and TXT"):
        await embedded.backend.apply(bad)
    assert embedded.store.records("usher.test.") == set()
    assert embedded.store.serial("usher.test.") == serial
    await embedded.backend.apply(ChangeSet(deletes={Record("no.usher.test", "A", "10.0.0.1")}))
    assert embedded.store.serial("usher.test.") == serial  # nothing changed, no new serial


# ------------------------------------------------------------------ abuse
async def udp_exchange(port: int, payload: bytes, timeout: float = 0.5) -> bytes | None:
    """Send one datagram to the server; its reply, or None if none came in ``timeout``."""
    loop = asyncio.get_running_loop()
    received: asyncio.Future[bytes] = loop.create_future()

    class Catch(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            if not received.done():
                received.set_result(data)

    transport, _ = await loop.create_datagram_endpoint(Catch, remote_addr=(LOOPBACK, port))
    try:
        transport.sendto(payload)
        return await asyncio.wait_for(received, timeout)
    except TimeoutError:
        return None
    finally:
        transport.close()


async def test_garbage_gets_formerr_or_silence_and_the_server_lives(populated: Embedded) -> None:
    port = populated.port
    reply = await udp_exchange(port, b"\x12\x34" + bytes(range(40)))
    assert reply is not None
    answer = dns.message.from_wire(reply)
    assert answer.id == 0x1234 and answer.rcode() == dns.rcode.FORMERR
    assert await udp_exchange(port, b"\x00\x01\x02", timeout=0.2) is None
    response = dns.message.make_response(dns.message.make_query("web.usher.test", "A"))
    assert await udp_exchange(port, response.to_wire(), timeout=0.2) is None
    assert await dig_short(port, "web.bluefish.usher.test") == {"10.1.2.3"}
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    writer.write(struct.pack("!H", 42) + b"\x12\x34" + bytes(range(40)))
    await writer.drain()
    (length,) = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), WAIT_S))
    assert dns.message.from_wire(await reader.readexactly(length)).rcode() == dns.rcode.FORMERR
    writer.close()
    assert await dig_short(port, "+tcp", "web.bluefish.usher.test") == {"10.1.2.3"}


async def tcp_query(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    name: str) -> dns.message.Message:
    wire = dns.message.make_query(name, "A").to_wire()
    writer.write(struct.pack("!H", len(wire)) + wire)
    await writer.drain()
    (length,) = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), WAIT_S))
    return dns.message.from_wire(await reader.readexactly(length))


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    return await asyncio.wait_for(reader.read(1), WAIT_S) == b""


async def test_tcp_serves_several_queries_then_closes_when_idle(populated: Embedded) -> None:
    server = EmbeddedDns(populated.store, LOOPBACK, 0, tcp_idle_timeout_s=0.2)
    await server.start()
    try:
        reader, writer = await asyncio.open_connection(LOOPBACK, server.port)
        for name in ("web.bluefish.usher.test", "db.bluefish.usher.test", RR):
            response = await tcp_query(reader, writer, name)
            assert response.flags & dns.flags.AA and response.answer, name
        assert await closed_by_server(reader)
        writer.close()
    finally:
        await server.stop()


async def test_tcp_oversized_queries_and_extra_connections_are_cut(
        populated: Embedded) -> None:
    server = EmbeddedDns(populated.store, LOOPBACK, 0, max_tcp_connections=2,
                         max_tcp_message=512)
    await server.start()
    try:
        reader, writer = await asyncio.open_connection(LOOPBACK, server.port)
        writer.write(struct.pack("!H", 4000) + b"\0" * 4000)
        assert await closed_by_server(reader)
        writer.close()

        held = [await asyncio.open_connection(LOOPBACK, server.port) for _ in range(2)]
        for r, w in held:  # both served: they count against the limit
            assert (await tcp_query(r, w, "web.bluefish.usher.test")).answer
        extra_reader, extra_writer = await asyncio.open_connection(LOOPBACK, server.port)
        assert await closed_by_server(extra_reader)
        extra_writer.close()
        held[0][1].close()
        await asyncio.sleep(0.05)
        reader, writer = await asyncio.open_connection(LOOPBACK, server.port)
        assert (await tcp_query(reader, writer, "web.bluefish.usher.test")).answer
        writer.close()
        held[1][1].close()
    finally:
        await server.stop()


async def test_stop_closes_open_connections_and_frees_the_port(populated: Embedded) -> None:
    server = EmbeddedDns(populated.store, LOOPBACK, 0)
    port = await server.start()
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    await tcp_query(reader, writer, "web.bluefish.usher.test")
    await server.stop()
    assert await closed_by_server(reader)
    writer.close()
    with pytest.raises(DnsError, match="not started"):
        _ = server.port
    again = EmbeddedDns(populated.store, LOOPBACK, port)
    assert await again.start() == port
    await again.stop()


async def test_a_port_in_use_is_unavailable(embedded: Embedded) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind((LOOPBACK, 0))
        server = EmbeddedDns(ZoneStore(ZONES), LOOPBACK, taken.getsockname()[1])
        with pytest.raises(DnsUnavailable, match="cannot listen"):
            await server.start()


def test_backend_never_touches_the_network() -> None:
    backend = EmbeddedBackend(ZoneStore(ZONES))
    assert backend.zones.origins == sorted(ZONES)
