"""Publishing through a backend, checked with dig: the contract on both, named's specifics.

The tests taking ``world`` are the backend contract and run twice: against a
real BIND 9 through :class:`~usher.dns.rfc2136.Rfc2136Backend` (TSIG-signed
UPDATE and AXFR) and against the embedded server through
:class:`~usher.dns.embedded.EmbeddedBackend`. The rest are about RFC 2136
against named: keys, unreachable servers, batching and a restart of named.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import dns.asyncquery
import dns.message
import dns.rcode
import dns.update
import pytest

from usher.dns.named import Named, free_port
from usher.dns.records import ChangeSet, Record, Zones, owner_marker, vm_records, with_markers
from usher.dns.rfc2136 import Rfc2136Backend, parse_key_file
from usher.errors import ConfigError, DnsError, DnsUnavailable

from .conftest import LOOPBACK, WAIT_S, ZONES, DnsWorld, dig_short, rfc2136_backend

SITE = "site1"
RR = "bluefish.usher.test"


async def serial(port: int, zone: str) -> int:
    """The SOA serial named serves for ``zone``: one more per UPDATE message it took."""
    response = await dns.asyncquery.udp(dns.message.make_query(zone, "SOA"), LOOPBACK,
                                        timeout=WAIT_S, port=port)
    return int(response.answer[0][0].serial)


# ------------------------------------------------------------------ the contract
async def test_apply_publishes_forward_reverse_and_round_robin(world: DnsWorld) -> None:
    web = vm_records("web.bluefish.usher.test", "10.1.2.3", rr_name=RR)
    db = vm_records("db.bluefish.usher.test", "10.1.2.4", rr_name=RR)
    six = vm_records("six.bluefish.usher.test", "fd00::6")
    await world.backend.apply(ChangeSet(adds=with_markers(web + db + six, SITE)))

    assert await dig_short(world.port, "web.bluefish.usher.test") == {"10.1.2.3"}
    assert await dig_short(world.port, "-x", "10.1.2.3") == {"web.bluefish.usher.test."}
    assert await dig_short(world.port, RR) == {"10.1.2.3", "10.1.2.4"}
    assert await dig_short(world.port, "six.bluefish.usher.test", "AAAA") == {"fd00::6"}
    assert await dig_short(world.port, "-x", "fd00::6") == {"six.bluefish.usher.test."}
    assert await dig_short(world.port, "web.bluefish.usher.test", "TXT") == \
        {'"heritage=usher,site=site1"'}

    await world.backend.apply(ChangeSet(deletes=with_markers(web, SITE) - {owner_marker(RR, SITE)}))
    assert await dig_short(world.port, "web.bluefish.usher.test") == set()
    assert await dig_short(world.port, "-x", "10.1.2.3") == set()
    assert await dig_short(world.port, RR) == {"10.1.2.4"}
    assert await world.backend.read("usher.test.") >= {r for r in db if r.rdtype == "A"}
    assert await world.backend.read("10.in-addr.arpa.") >= {db[1]}


async def test_apply_is_idempotent(world: DnsWorld) -> None:
    records = with_markers(vm_records("web.usher.test", "10.1.2.3"), SITE)
    await world.backend.apply(ChangeSet(adds=records))
    await world.backend.apply(ChangeSet(adds=records))
    assert await world.backend.read("usher.test.") >= {r for r in records
                                                       if r.name == "web.usher.test."}
    await world.backend.apply(ChangeSet(deletes=records))
    await world.backend.apply(ChangeSet(deletes=records))
    assert not any(r.name == "web.usher.test." for r in await world.backend.read("usher.test."))


async def test_apply_outside_every_zone_sends_nothing(world: DnsWorld) -> None:
    records = {Record("web.usher.test", "A", "10.1.2.3"), Record("web.example.com", "A",
                                                                "10.1.2.3")}
    with pytest.raises(DnsError, match="web.example.com. A 10.1.2.3 is outside every DNS zone"):
        await world.backend.apply(ChangeSet(adds=records))
    assert await dig_short(world.port, "web.usher.test") == set()


async def test_read_returns_managed_types_and_read_all_the_rest(world: DnsWorld) -> None:
    mail = {Record("mail.usher.test", "A", "10.0.0.25"),
            Record("mail.usher.test", "TXT", '"v=spf1 -all"')}
    # The embedded server holds only the types usher publishes.
    mx = {Record("mail.usher.test", "MX", "10 mx.example.net")} if world.kind == "named" \
        else set()
    await world.hand_add(mail | mx)
    read = await world.backend.read("usher.test.")
    assert mail <= read
    assert all(r.rdtype in {"A", "AAAA", "PTR", "TXT"} for r in read)
    everything = await world.backend.read_all("usher.test.")
    assert mail | mx <= everything
    assert not any(r.rdtype in ("SOA", "NS") for r in everything)
    with pytest.raises(DnsError, match="example.com"):
        await world.backend.read("example.com.")


async def test_converge_adds_removes_and_leaves_hand_made_records(world: DnsWorld) -> None:
    backend = world.backend
    # Left by an earlier run of usher: ours, but no VM has it any more.
    stale = vm_records("gone.usher.test", "10.1.2.9")
    await backend.apply(ChangeSet(adds=with_markers(stale, SITE)))
    # Made by hand: one unrelated, one where usher wants a VM, one of another site.
    await world.hand_add({Record("printer.usher.test", "A", "10.0.0.50"),
                          Record("taken.usher.test", "A", "10.0.0.51"),
                          Record("other.usher.test", "A", "10.0.0.52"),
                          owner_marker("other.usher.test", "site2")})
    desired = set(vm_records("web.usher.test", "10.1.2.3", rr_name=RR)
                  + vm_records("taken.usher.test", "10.1.2.4")
                  + vm_records("six.usher.test", "fd00::6"))

    report = await backend.converge(desired, SITE)

    # web: A, PTR, rr A and 3 markers; six: AAAA, PTR, 2 markers; taken: only its PTR
    # (free name) and marker; the forward name is someone else's.
    assert (report.added, report.removed) == (12, 4)
    assert report.conflicts == ("taken.usher.test.",)
    assert await dig_short(world.port, "web.usher.test") == {"10.1.2.3"}
    assert await dig_short(world.port, RR) == {"10.1.2.3"}
    assert await dig_short(world.port, "-x", "fd00::6") == {"six.usher.test."}
    assert await dig_short(world.port, "gone.usher.test", "ANY") == set()
    assert await dig_short(world.port, "-x", "10.1.2.9") == set()
    assert await dig_short(world.port, "printer.usher.test") == {"10.0.0.50"}
    assert await dig_short(world.port, "taken.usher.test") == {"10.0.0.51"}
    assert await dig_short(world.port, "other.usher.test") == {"10.0.0.52"}

    again = await backend.converge(desired, SITE)
    assert (again.added, again.removed, again.conflicts) == (0, 0, ("taken.usher.test.",))

    emptied = await backend.converge(set(), SITE)
    assert (emptied.added, emptied.conflicts) == (0, ())
    assert await dig_short(world.port, "web.usher.test") == set()
    assert await dig_short(world.port, "printer.usher.test") == {"10.0.0.50"}
    assert await dig_short(world.port, "taken.usher.test") == {"10.0.0.51"}


async def test_converge_refuses_out_of_zone_records_before_changing_anything(
        world: DnsWorld) -> None:
    await world.backend.apply(ChangeSet(adds=with_markers(vm_records("old.usher.test",
                                                                     "10.1.2.8"), SITE)))
    desired = set(vm_records("web.usher.test", "192.168.0.3"))
    with pytest.raises(DnsError, match="reverse zone"):
        await world.backend.converge(desired, SITE)
    assert await dig_short(world.port, "old.usher.test") == {"10.1.2.8"}


# ------------------------------------------------------------------ named only
async def test_unsigned_update_is_refused(rfc2136: Rfc2136Backend) -> None:
    message = dns.update.UpdateMessage("usher.test.")
    message.add("intruder.usher.test.", 60, "A", "10.6.6.6")
    response = await dns.asyncquery.tcp(message, LOOPBACK, timeout=WAIT_S, port=rfc2136.port)
    assert response.rcode() == dns.rcode.REFUSED
    assert await dig_short(rfc2136.port, "intruder.usher.test") == set()


@pytest.mark.parametrize(("change", "error"), [
    ({"key_secret": "c2VjcmV0IG9mIHRoZSB3cm9uZyBzb3J0IGF0IGFsbCE="}, "BADSIG"),
    ({"key_name": "no-such-key"}, "BADKEY"),
])
async def test_wrongly_keyed_update_and_transfer_are_refused(
        named: Named, rfc2136: Rfc2136Backend, change: dict[str, str], error: str) -> None:
    backend = rfc2136_backend(named, **change)
    with pytest.raises(DnsError, match=error) as err:
        await backend.apply(ChangeSet(adds={Record("web.usher.test", "A", "10.1.2.3")}))
    assert not isinstance(err.value, DnsUnavailable)
    assert "usher.test." in err.value.message
    with pytest.raises(DnsError, match=error):
        await backend.read("usher.test.")
    assert await dig_short(named.port, "web.usher.test") == set()


async def test_update_outside_the_servers_zones_names_zone_and_rcode(
        named: Named, rfc2136: Rfc2136Backend) -> None:
    # usher is configured for a zone named does not serve.
    backend = rfc2136_backend(named, zones=Zones(["elsewhere.test."]))
    with pytest.raises(DnsError, match=r"zone elsewhere\.test\. with NOTAUTH") as err:
        await backend.apply(ChangeSet(adds={Record("web.elsewhere.test", "A", "10.1.2.3")}))
    assert err.value.details == {"zone": "elsewhere.test.", "rcode": "NOTAUTH"}


async def test_server_down_is_unavailable() -> None:
    backend = Rfc2136Backend(LOOPBACK, free_port(), Zones(ZONES), "k", "c2VjcmV0",
                             timeout_s=1.0)
    started = time.monotonic()
    with pytest.raises(DnsUnavailable, match="cannot reach"):
        await backend.apply(ChangeSet(adds={Record("web.usher.test", "A", "10.1.2.3")}))
    with pytest.raises(DnsUnavailable):
        await backend.read("usher.test.")
    assert time.monotonic() - started < 1.0


@contextlib.asynccontextmanager
async def silent_server() -> AsyncIterator[int]:
    """A TCP server on loopback that accepts connections and never answers."""
    held: list[asyncio.StreamWriter] = []

    async def accept(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, LOOPBACK, 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        for writer in held:
            writer.close()
        server.close()


async def test_server_that_never_answers_times_out() -> None:
    async with silent_server() as port:
        backend = Rfc2136Backend(LOOPBACK, port, Zones(ZONES), "k", "c2VjcmV0", timeout_s=0.3,
                                 xfr_lifetime_s=0.3)
        started = time.monotonic()
        with pytest.raises(DnsUnavailable, match=r"did not answer an UPDATE .* within 0.3 s"):
            await backend.apply(ChangeSet(adds={Record("web.usher.test", "A", "10.1.2.3")}))
        with pytest.raises(DnsUnavailable, match="AXFR"):
            await backend.read("usher.test.")
        assert time.monotonic() - started < 1.5


async def test_500_vms_are_one_update_per_zone(named: Named, rfc2136: Rfc2136Backend) -> None:
    records: list[Record] = []
    for i in range(500):
        records += vm_records(f"vm{i}.usher.test", f"10.5.{i // 250}.{i % 250 + 1}")
    before = {zone: await serial(named.port, zone) for zone in ZONES}
    started = time.monotonic()
    await rfc2136.apply(ChangeSet(adds=with_markers(records, SITE)))
    elapsed = time.monotonic() - started
    # 1000 records per zone (500 A or PTR, 500 markers): one message each.
    assert rfc2136.updates_sent == 2
    assert await serial(named.port, "usher.test.") == before["usher.test."] + 1
    assert await serial(named.port, "10.in-addr.arpa.") == before["10.in-addr.arpa."] + 1
    assert elapsed < 2.0, f"500 VMs took {elapsed:.2f} s"
    assert await dig_short(named.port, "vm499.usher.test") == {"10.5.1.250"}
    assert len(await rfc2136.read("usher.test.")) >= 1000


async def test_large_changes_are_split_into_bounded_messages(
        named: Named, rfc2136: Rfc2136Backend) -> None:
    backend = rfc2136_backend(named, max_records_per_message=50)
    records = [Record(f"vm{i}.usher.test", "A", f"10.6.0.{i + 1}") for i in range(120)]
    before = await serial(named.port, "usher.test.")
    await backend.apply(ChangeSet(adds=with_markers(records, SITE)))
    assert backend.updates_sent == 5  # 240 records in messages of at most 50
    assert await serial(named.port, "usher.test.") == before + 5
    assert await dig_short(named.port, "vm119.usher.test") == {"10.6.0.120"}


async def test_a_change_beyond_64_kib_goes_in_several_messages(
        named: Named, rfc2136: Rfc2136Backend) -> None:
    # 1,000 records of ~90 bytes: more than one TCP DNS message can hold.
    records = [Record(f"a-rather-long-vm-name-number-{i}.seuss.usher.test", "TXT",
                      f'"{"x" * 40}"') for i in range(1000)]
    await rfc2136.apply(ChangeSet(adds=set(records)))
    assert rfc2136.updates_sent == 2
    assert await dig_short(named.port, "a-rather-long-vm-name-number-999.seuss.usher.test",
                           "TXT") == {f'"{"x" * 40}"'}


async def test_converge_after_named_restarts(tmp_path: Path) -> None:
    server = Named(tmp_path / "named", ZONES)
    server.start()
    try:
        backend = rfc2136_backend(server)
        first = set(vm_records("web.usher.test", "10.1.2.3") + vm_records("db.usher.test",
                                                                          "10.1.2.4"))
        assert (await backend.converge(first, SITE)).added == 8
        await asyncio.to_thread(server.stop)
        assert (tmp_path / "named" / "usher.test.db.jnl").exists()
        await asyncio.to_thread(server.start)

        assert await dig_short(server.port, "db.usher.test") == {"10.1.2.4"}
        second = set(vm_records("web.usher.test", "10.1.2.3"))
        report = await backend.converge(second, SITE)
        assert (report.added, report.removed, report.conflicts) == (0, 4, ())
        assert await dig_short(server.port, "db.usher.test") == set()
        assert await dig_short(server.port, "-x", "10.1.2.3") == {"web.usher.test."}
    finally:
        server.stop()
    assert server.pid is None


async def test_updates_keep_one_connection_per_zone_and_outlive_its_loss(
        tmp_path: Path) -> None:
    server = Named(tmp_path / "named", ZONES)
    server.start()
    try:
        backend = rfc2136_backend(server)
        for i in range(5):
            await backend.apply(ChangeSet(adds=set(vm_records(f"vm{i}.usher.test",
                                                              f"10.1.3.{i + 1}"))))
        assert (backend.updates_sent, backend.connections_made) == (10, 2)
        # named's restart closes both connections: the next UPDATEs reconnect.
        await asyncio.to_thread(server.stop)
        await asyncio.to_thread(server.start)
        await backend.apply(ChangeSet(adds=set(vm_records("vm9.usher.test", "10.1.3.9"))))
        assert (backend.updates_sent, backend.connections_made) == (12, 4)
        assert await dig_short(server.port, "vm9.usher.test") == {"10.1.3.9"}
        assert await dig_short(server.port, "-x", "10.1.3.9") == {"vm9.usher.test."}
        await backend.close()
        with pytest.raises(DnsError, match="closed"):
            await backend.apply(ChangeSet(adds=set(vm_records("vm8.usher.test", "10.1.3.8"))))
    finally:
        server.stop()


# ------------------------------------------------------------------ configuration
def test_parse_key_file_reads_tsig_keygen_output(named: Named, tmp_path: Path) -> None:
    assert parse_key_file(named.key_file) == (named.key_name, "hmac-sha256", named.key_secret)
    commented = tmp_path / "k.conf"
    commented.write_text('# made by hand\nkey "site-key" {\n  // HMAC\n  algorithm HMAC-SHA512;'
                         '\n  secret "c2VjcmV0"; /* base64 */\n};\n')
    assert parse_key_file(commented) == ("site-key", "hmac-sha512", "c2VjcmV0")
    # base64 has "/": a secret holding "//" is no comment.
    slashes = tmp_path / "slashes.key"
    slashes.write_text('key "k" {\n\talgorithm hmac-sha256;\n\tsecret "ab//cd/*ef#gh==";\n};\n')
    assert parse_key_file(slashes) == ("k", "hmac-sha256", "ab//cd/*ef#gh==")
    (tmp_path / "empty.conf").write_text("options { };\n")
    with pytest.raises(ConfigError, match="no 'key"):
        parse_key_file(tmp_path / "empty.conf")
    with pytest.raises(ConfigError, match="cannot read"):
        parse_key_file(tmp_path / "missing.conf")


def test_backend_checks_its_configuration() -> None:
    with pytest.raises(ConfigError, match="IP address"):
        Rfc2136Backend("dns.example", 53, Zones(ZONES), "k", "c2VjcmV0")
    with pytest.raises(ConfigError, match="not usable"):
        Rfc2136Backend(LOOPBACK, 53, Zones(ZONES), "k", "not base64!")
    with pytest.raises(ConfigError, match="not usable|not supported"):
        Rfc2136Backend(LOOPBACK, 53, Zones(ZONES), "k", "c2VjcmV0", key_algorithm="hmac-rot13")


async def test_an_rrset_over_binds_limit_fails_the_whole_message(
        named: Named, rfc2136: Rfc2136Backend) -> None:
    # BIND's max-records-per-type (100 by default) bounds a round-robin set.
    members = [Record(RR, "A", f"10.7.0.{i}") for i in range(1, 102)]
    web = Record("web.usher.test", "A", "10.1.2.3")
    with pytest.raises(DnsError, match="SERVFAIL.*max-records-per-type"):
        await rfc2136.apply(ChangeSet(adds={*members, web}))
    assert await dig_short(named.port, "web.usher.test") == set()
    await rfc2136.apply(ChangeSet(adds={*members[:100], web}))
    assert len(await dig_short(named.port, "+tcp", RR)) == 100
