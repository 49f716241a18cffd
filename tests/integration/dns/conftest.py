"""A real named and the embedded server for the DNS tests, checked with the real dig.

The session-scoped :func:`named` fixture runs :class:`~usher.dns.named.Named`
(BIND 9) for the zones :data:`ZONES`; the function-scoped :func:`rfc2136`
fixture hands each test an :class:`~usher.dns.rfc2136.Rfc2136Backend` on it
and afterwards deletes every record the test left (whatever is not in the
zones as named first loaded them). :func:`embedded` runs a fresh
:class:`~usher.dns.embedded.EmbeddedDns` per test.

:func:`world` is either of the two behind one face (:class:`DnsWorld`), so the
backend contract tests run once per backend. Every query goes to 127.0.0.1;
:func:`dig` runs the real ``dig`` there, with a time limit.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

import dns.asyncquery
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.tsig
import dns.update
import pytest

from usher.dns.backend import DnsBackend
from usher.dns.embedded import EmbeddedBackend, EmbeddedDns, ZoneStore
from usher.dns.named import Named
from usher.dns.records import ChangeSet, Record, Zones
from usher.dns.rfc2136 import Rfc2136Backend

ZONES = ["usher.test.", "10.in-addr.arpa.", "d.f.ip6.arpa."]
"""A forward zone, the IPv4 reverse zone of 10/8 and the IPv6 one of fd00::/8."""
LOOPBACK = "127.0.0.1"
WAIT_S = 5.0
"""Upper bound of every wait in these tests; a healthy run takes far less."""


# ------------------------------------------------------------------ dig
async def dig(port: int, *args: str) -> str:
    """The output of ``dig @127.0.0.1 -p PORT ARGS`` (stdout and stderr)."""
    proc = await asyncio.create_subprocess_exec(
        "dig", f"@{LOOPBACK}", "-p", str(port), "+time=2", "+tries=1", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), WAIT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return out.decode()


async def dig_short(port: int, *args: str) -> set[str]:
    """The answers of ``dig +short``, as a set of lines."""
    return {line for line in (await dig(port, "+short", *args)).splitlines() if line}


def status(output: str) -> str:
    """The response code in dig's header line (``NOERROR``, ``NXDOMAIN`` ...)."""
    match = re.search(r"status: (\w+)", output)
    assert match, output
    return match.group(1)


def flags(output: str) -> set[str]:
    """The header flags dig printed (``qr``, ``aa``, ``tc`` ...)."""
    match = re.search(r";; flags: ([a-z ]*);", output)
    assert match, output
    return set(match.group(1).split())


def section(output: str, name: str) -> list[str]:
    """The record lines of one section (``ANSWER``, ``AUTHORITY`` ...) of dig's output."""
    match = re.search(rf";; {name} SECTION:\n(.*?)(?:\n\n|\Z)", output, re.DOTALL)
    return match.group(1).splitlines() if match else []


# ------------------------------------------------------------------ named
@pytest.fixture(scope="session")
def named(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Named]:
    server = Named(tmp_path_factory.mktemp("named"), ZONES)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def rfc2136_backend(server: Named, **kwargs: object) -> Rfc2136Backend:
    """A backend on ``server`` with its key; ``kwargs`` override the defaults."""
    options: dict[str, object] = {
        "server": LOOPBACK, "port": server.port, "zones": Zones(server.zones),
        "key_name": server.key_name, "key_secret": server.key_secret,
        "key_algorithm": server.key_algorithm, "timeout_s": 2.0}
    options.update(kwargs)
    return Rfc2136Backend(**options)  # type: ignore[arg-type]


async def signed_update(server: Named, zone: str, records: set[Record], *,
                        delete: bool = False) -> None:
    """Add (or delete) ``records`` as another tool would: a bare dnspython UPDATE, no marker."""
    key = dns.tsig.Key(server.key_name, server.key_secret, server.key_algorithm)
    message = dns.update.UpdateMessage(zone, keyring=key)
    for record in records:
        rdata = dns.rdata.from_text(dns.rdataclass.IN, record.rdtype, record.value,
                                    origin=dns.name.root, relativize=False)
        if delete:
            message.delete(record.name, rdata)
        else:
            message.add(record.name, 300, rdata)
    response = await dns.asyncquery.tcp(message, LOOPBACK, timeout=WAIT_S, port=server.port)
    assert response.rcode() == dns.rcode.NOERROR, dns.rcode.to_text(response.rcode())


@pytest.fixture
async def rfc2136(named: Named) -> AsyncIterator[Rfc2136Backend]:
    backend = rfc2136_backend(named)
    baseline = {zone: await backend.read_all(zone) for zone in ZONES}
    try:
        yield backend
    finally:
        await backend.close()
        cleaner = rfc2136_backend(named)  # the test's own may be broken or closed
        try:
            for zone in ZONES:
                left = await cleaner.read_all(zone) - baseline[zone]
                if left:  # in messages that fit, however many there are
                    await cleaner.apply(ChangeSet(deletes=left))
        finally:
            await cleaner.close()


# ------------------------------------------------------------------ embedded
@dataclass
class Embedded:
    """A started embedded server, its store and its backend."""

    store: ZoneStore
    server: EmbeddedDns
    backend: EmbeddedBackend

    @property
    def port(self) -> int:
        return self.server.port


@pytest.fixture
async def embedded() -> AsyncIterator[Embedded]:
    store = ZoneStore(ZONES)
    server = EmbeddedDns(store, LOOPBACK, 0)
    await server.start()
    try:
        yield Embedded(store=store, server=server, backend=EmbeddedBackend(store))
    finally:
        await server.stop()


# ------------------------------------------------------------------ both
@dataclass
class DnsWorld:
    """A backend, the port dig asks, and a way to add records behind usher's back."""

    kind: str
    backend: DnsBackend
    port: int
    hand_add: Callable[[set[Record]], Awaitable[None]]


@pytest.fixture(params=["named", "embedded"])
def world(request: pytest.FixtureRequest) -> Iterator[DnsWorld]:
    # A plain fixture: it picks async fixtures by name, which pytest-asyncio
    # sets up on the test's loop; an async one would be inside that loop already.
    if request.param == "named":
        server: Named = request.getfixturevalue("named")
        backend: Rfc2136Backend = request.getfixturevalue("rfc2136")

        async def hand_add_named(records: set[Record]) -> None:
            for zone, group in ChangeSet(adds=records).group_by_zone(backend.zones).items():
                await signed_update(server, zone, group.adds)

        yield DnsWorld("named", backend, server.port, hand_add_named)
    else:
        running: Embedded = request.getfixturevalue("embedded")

        async def hand_add_embedded(records: set[Record]) -> None:
            running.store.apply(ChangeSet(adds=records))

        yield DnsWorld("embedded", running.backend, running.port, hand_add_embedded)
