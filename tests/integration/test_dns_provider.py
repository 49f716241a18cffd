"""The dns provider through a real in-process controller, checked with the real dig.

Two backends: the embedded server (what ``usher demo`` runs) and RFC 2136
updates to a real BIND named with TSIG. Every query goes to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import dns.asyncquery
import dns.rdata
import dns.rdataclass
import dns.tsig
import dns.update
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tests.integration.conftest import MakeController, RunningController
from tests.integration.dns.conftest import dig_short as dig
from usher.controller import ipam
from usher.controller.models import Lease, Outbox, Vm
from usher.dns import ChangeSet, Named, Rfc2136Backend, Zones
from usher.errors import Conflict, InvalidOption, NoCapacity

SITE_ZONES = ["usher.test", "10.in-addr.arpa"]
WAIT_S = 5.0


def lab_range(session: Session) -> None:
    ipam.add_range(session, "lab", "10.77.0.0/24", default=True)


async def eventually(check: object, what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if await check():  # type: ignore[operator]
            return
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def count(controller: RunningController, table: type) -> int:
    db = controller.ctrl.ctx.db
    return db.run_sync(lambda s: s.execute(select(func.count()).select_from(table)).scalar())


# ================================================================ embedded
async def test_embedded_forward_reverse_and_round_robin(make_controller: MakeController) -> None:
    controller = await make_controller(setup=lab_range, dns="embedded",
                                       dns_listen="127.0.0.1:0")
    server = controller.ctrl.dns_server
    assert server is not None
    port = server.port
    await controller.start_node("h1.usher.test")
    client = await controller.client()
    try:
        await client.wait_all(await client.start(["redfish.sneetch"], ram=64), WAIT_S)
        await client.wait_all(await client.start(["{1..2}.web"], ram=64, rr=True), WAIT_S)
        vms = {v.name: v for v in await client.list_vms()}
        red = vms["redfish.sneetch.seuss.usher.test"]
        assert red.ip is not None and red.dns == "ok"
        # In the records the moment the start is done (dns_down = refuse waits).
        assert await dig(port, "redfish.sneetch.seuss.usher.test") == {red.ip}
        assert await dig(port, "-x", red.ip) == {"redfish.sneetch.seuss.usher.test."}
        members = {vms[f"{i}.web.seuss.usher.test"].ip for i in (1, 2)}
        assert await dig(port, "web.seuss.usher.test") == members
        assert await dig(port, "+tcp", "web.seuss.usher.test") == members

        await client.wait_all(await client.destroy(["1.web", "redfish.sneetch"]), WAIT_S)

        async def gone() -> bool:
            return (await dig(port, "redfish.sneetch.seuss.usher.test") == set()
                    and await dig(port, "-x", red.ip or "") == set()
                    and len(await dig(port, "web.seuss.usher.test")) == 1)
        await eventually(gone, "records of destroyed VMs to go")

        async def no_outbox() -> bool:  # every outbox entry was written, then dropped
            return count(controller, Outbox) == 0
        await eventually(no_outbox, "the outbox to empty")
    finally:
        await client.close()


async def test_round_robin_names_and_vm_names_never_collide(
        make_controller: MakeController) -> None:
    controller = await make_controller(setup=lab_range, dns="embedded",
                                       dns_listen="127.0.0.1:0")
    await controller.start_node("h1.usher.test")
    client = await controller.client()
    try:
        await client.wait_all(await client.start(["a.pool"], ram=64, rr=True), WAIT_S)
        with pytest.raises(Conflict, match="round-robin name"):
            await client.start(["pool"], ram=64)
        await client.wait_all(await client.start(["lone"], ram=64), WAIT_S)
        with pytest.raises(Conflict, match="holds that name"):
            await client.start(["x.lone"], ram=64, rr=True)
        # Nothing of the refused starts remains: no VM, no lease.
        names = {v.name for v in await client.list_vms()}
        assert names == {"a.pool.seuss.usher.test", "lone.seuss.usher.test"}
        assert count(controller, Lease) == 2
    finally:
        await client.close()


async def test_round_robin_membership_is_capped(make_controller: MakeController) -> None:
    controller = await make_controller(setup=lab_range, dns="embedded",
                                       dns_listen="127.0.0.1:0", dns_rr_max_members=3)
    await controller.start_node("h1.usher.test")
    client = await controller.client()
    try:
        await client.wait_all(await client.start(["{1..3}.pool"], ram=64, rr=True), WAIT_S)
        with pytest.raises(NoCapacity, match="round-robin name pool.seuss.usher.test has 3"):
            await client.start(["4.pool"], ram=64, rr=True)
        await client.wait_all(await client.start(["4.pool"], ram=64), WAIT_S)  # a plain one
    finally:
        await client.close()


async def test_rr_without_an_address_is_refused(make_controller: MakeController) -> None:
    controller = await make_controller(dns="embedded", dns_listen="127.0.0.1:0")
    await controller.start_node("h1.usher.test")
    client = await controller.client()
    try:
        with pytest.raises(InvalidOption, match="--rr needs an address"):
            await client.start(["a.pool"], ram=64, rr=True)
        await client.wait_all(await client.start(["plain"], ram=64), WAIT_S)
        [vm] = await client.list_vms()
        assert vm.ip is None and vm.dns == ""
    finally:
        await client.close()


# ================================================================== BIND
@pytest.fixture(scope="module")
def named(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Named]:
    server = Named(tmp_path_factory.mktemp("named"), SITE_ZONES)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def bind(named: Named) -> AsyncIterator[Named]:
    """The module's named, running, with nothing left of earlier tests' records."""
    if named.pid is None:
        named.start()
    yield named
    if named.pid is None:
        named.start()
    await wipe(named)


def bind_settings(named: Named, **more: object) -> dict[str, object]:
    return dict(dns="rfc2136", dns_server=f"127.0.0.1:{named.port}",
                dns_key_file=str(named.key_file), dns_zones=SITE_ZONES, dns_timeout_s=1.0,
                outbox_retry_s=0.1, **more)


async def send(named: Named, zone: str, build: object) -> None:
    keyring = {dns.name.from_text(named.key_name): dns.tsig.Key(
        named.key_name, named.key_secret, named.key_algorithm)}
    update = dns.update.UpdateMessage(zone, keyring=keyring)
    build(update)  # type: ignore[operator]
    reply = await dns.asyncquery.tcp(update, "127.0.0.1", port=named.port, timeout=WAIT_S)
    assert reply.rcode() == 0, reply


async def wipe(named: Named) -> None:
    """Delete every record the tests made: all of seuss.usher.test and 10.77.0.0/24."""
    backend = Rfc2136Backend("127.0.0.1", named.port, Zones(SITE_ZONES), named.key_name,
                             named.key_secret, named.key_algorithm, WAIT_S)
    try:
        left = ChangeSet()
        for zone in SITE_ZONES:
            left.deletes |= {r for r in await backend.read_all(zone + ".")
                             if r.name.endswith(".seuss.usher.test.")
                             or r.name.endswith(".77.10.in-addr.arpa.")}
        await backend.apply(left)
    finally:
        await backend.close()


def restart_without_journals(named: Named) -> None:
    named.stop()
    for journal in Path(named.directory).glob("*.jnl"):
        journal.unlink()
    named.start()


async def test_bind_records_follow_the_vms(make_controller: MakeController, bind: Named) -> None:
    controller = await make_controller(setup=lab_range, **bind_settings(bind))
    await controller.start_node("h1.usher.test")
    client = await controller.client()
    try:
        tasks = await client.start(["{1..20}.farm"], ram=64, rr=True)
        await client.wait_all(tasks, WAIT_S)
        vms = await client.list_vms()
        assert {v.dns for v in vms} == {"ok"}
        one = next(v for v in vms if v.name == "7.farm.seuss.usher.test")
        assert await dig(bind.port, one.name) == {one.ip}
        assert await dig(bind.port, "-x", one.ip or "") == {one.name + "."}
        assert await dig(bind.port, "farm.seuss.usher.test") == {v.ip for v in vms}
        assert await dig(bind.port, "TXT", one.name) == {'"heritage=usher,site=usher.test"'}
        await client.wait_all(await client.destroy(["{1..20}.farm"]), WAIT_S)

        async def gone() -> bool:
            return await dig(bind.port, "farm.seuss.usher.test") == set() and \
                await dig(bind.port, "-x", one.ip or "") == set()
        await eventually(gone, "records of destroyed VMs to go")
    finally:
        await client.close()


async def test_bind_down_refuses_starts_and_loses_nothing(
        make_controller: MakeController, bind: Named) -> None:
    controller = await make_controller(setup=lab_range, **bind_settings(bind))
    await controller.start_node("h1.usher.test")
    client = await controller.client()
    try:
        await client.wait_all(await client.start(["before"], ram=64), WAIT_S)
        await asyncio.to_thread(bind.stop)
        [task] = await client.wait_all(await client.start(["during"], ram=64), 3 * WAIT_S)
        assert task.state == "error" and "DNS" in task.message, task
        # Refused whole: no VM row, no lease, no domain on the host.
        assert [v.name for v in await client.list_vms()] == ["before.seuss.usher.test"]
        assert count(controller, Vm) == 1 and count(controller, Lease) == 1
        assert len(controller.ctrl.ctx.reg.vms) == 1
        await asyncio.to_thread(bind.start)
        provider = controller.ctrl.ctx.dns
        assert provider is not None

        async def back() -> bool:
            return provider.down is None
        await eventually(back, "DNS to be written again", timeout=3 * WAIT_S)
        await client.wait_all(await client.start(["after"], ram=64), WAIT_S)
        [after] = await client.list_vms(["after"])
        assert await dig(bind.port, after.name) == {after.ip}
    finally:
        await client.close()


async def test_bind_down_queues_records_when_asked(make_controller: MakeController,
                                                   bind: Named) -> None:
    controller = await make_controller(setup=lab_range, **bind_settings(bind, dns_down="queue"))
    await controller.start_node("h1.usher.test")
    client = await controller.client()
    try:
        await asyncio.to_thread(bind.stop)
        [task] = await client.wait_all(await client.start(["queued"], ram=64), WAIT_S)
        assert task.state == "done"
        [vm] = await client.list_vms(["queued"])
        assert vm.state == "running" and vm.dns == "pending"
        assert count(controller, Outbox) == 1
        await asyncio.to_thread(bind.start)

        async def written() -> bool:
            [v] = await client.list_vms(["queued"])
            return v.dns == "ok"
        await eventually(written, "queued records to be written", timeout=3 * WAIT_S)
        assert await dig(bind.port, vm.name) == {vm.ip}
    finally:
        await client.close()


async def test_restart_converges_and_leaves_foreign_records_alone(
        make_controller: MakeController, bind: Named) -> None:
    settings = bind_settings(bind)
    first = await make_controller(setup=lab_range, **settings)
    await first.start_node("h1.usher.test")
    client = await first.client()
    try:
        await client.wait_all(await client.start(["{1..3}.app"], ram=64), WAIT_S)
        vms = {v.name.split(".")[0]: v for v in await client.list_vms()}
    finally:
        await client.close()
    await first.close()

    # While the controller is down: one of its records is lost, a stale
    # usher-owned name appears (a VM destroyed in a restored backup), and an
    # admin adds a record by hand, at a name usher does not own.
    marker = '"heritage=usher,site=usher.test"'

    def damage(update: dns.update.UpdateMessage) -> None:
        update.delete(vms["1"].name + ".", "A")
        update.add("stale.seuss.usher.test.", 60, "A", "10.77.0.200")
        update.add("stale.seuss.usher.test.", 60, "TXT", marker)
        update.add("printer.seuss.usher.test.", 60, "A", "10.77.0.250")
    await send(bind, "usher.test", damage)

    second = await make_controller(**settings)
    provider = second.ctrl.ctx.dns
    assert provider is not None

    async def converged() -> bool:
        return await dig(bind.port, vms["1"].name) == {vms["1"].ip}
    await eventually(converged, "the lost record to come back")
    assert await dig(bind.port, "stale.seuss.usher.test") == set()
    assert await dig(bind.port, "printer.seuss.usher.test") == {"10.77.0.250"}
    assert await dig(bind.port, vms["2"].name) == {vms["2"].ip}


async def test_named_losing_its_zone_is_repaired(make_controller: MakeController,
                                                 bind: Named) -> None:
    controller = await make_controller(setup=lab_range,
                                       **bind_settings(bind, dns_converge_interval_s=0.3))
    await controller.start_node("h1.usher.test")
    client = await controller.client()
    try:
        await client.wait_all(await client.start(["keep"], ram=64), WAIT_S)
        [vm] = await client.list_vms()
        # named restarted from its zone files without the journal: the
        # dynamic records are gone.
        # (The controller may repair it before dig can see it gone: no check
        # of the gap, only of the repair.)
        await asyncio.to_thread(restart_without_journals, bind)

        async def back() -> bool:
            return await dig(bind.port, vm.name) == {vm.ip}
        await eventually(back, "records to be written again", timeout=3 * WAIT_S)
    finally:
        await client.close()
