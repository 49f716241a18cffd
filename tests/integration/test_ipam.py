"""IP leases through a real in-process controller: concurrent starts, exhaustion, release."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from sqlalchemy import func, select

from tests.integration.conftest import RunningController
from usher.controller import db as dbmod
from usher.controller import ipam
from usher.controller.auth import Identity
from usher.controller.models import Lease
from usher.errors import NoCapacity
from usher.protocol.ops import StartArgs, TaskInfo


def _leases(controller: RunningController) -> dict[str, str]:
    db = dbmod.Database(dbmod.make_engine(controller.cfg.database_url))
    try:
        return db.run_sync(lambda s: {lease.vm_uuid: lease.address
                                      for lease in s.scalars(select(Lease))})
    finally:
        db.close()


async def test_concurrent_starts_share_a_range_without_duplicates(
        controller: RunningController) -> None:
    # The range is written the way 'usher-controller range add' does, then the
    # controller reloads it (what SIGHUP does).
    db = controller.ctrl.ctx.db
    await db.run(lambda s: ipam.add_range(s, "lab", "10.77.0.0/26", default=True))
    await controller.ctrl.reload_ranges()
    await controller.start_node("h1.usher.test", cpus=64, memory_mib=1 << 20)
    client = await controller.client()
    try:
        results = await asyncio.gather(
            *(client.start([f"v{i}"], ram=64) for i in range(100)), return_exceptions=True)
        ok = [r for r in results if isinstance(r, list)]
        failed = [r for r in results if not isinstance(r, list)]
        assert len(ok) == 61, failed[:3]
        assert all(isinstance(e, NoCapacity) and "IP range lab" in e.message for e in failed)
        tasks: list[TaskInfo] = [t for r in ok for t in r]
        await client.wait_all(tasks, 10)
        vms = {v.name.split(".")[0]: v for v in await client.list_vms()}
        addresses = [v.ip for v in vms.values()]
        assert len(vms) == 61 and len(set(addresses)) == 61
        assert "10.77.0.1" not in addresses and None not in addresses
        leases = _leases(controller)
        assert leases == {v.uuid: v.ip for v in vms.values()}  # none for a failed start

        victim = sorted(vms.values(), key=lambda v: v.name)[0]
        await client.wait_all(await client.destroy([victim.name + "."]), 10)
        assert victim.uuid not in _leases(controller)
        await client.wait_all(await client.start(["again"], ram=64), 10)
        [again] = await client.list_vms(["again"])
        assert again.ip == victim.ip
    finally:
        await client.close()


async def test_requested_address_and_count(controller: RunningController) -> None:
    db = controller.ctrl.ctx.db
    await db.run(lambda s: ipam.add_range(s, "lab", "10.78.0.0/24"))
    await controller.ctrl.reload_ranges()
    await controller.start_node("h1.usher.test")
    client = await controller.client()
    try:
        await client.wait_all(await client.start(["pinned"], ram=64, ip_range="lab",
                                                 ip="10.78.0.42"), 10)
        await client.wait_all(await client.start(["plain"], ram=64), 10)
        vms = {v.name.split(".")[0]: v.ip for v in await client.list_vms()}
        assert vms == {"pinned": "10.78.0.42", "plain": None}  # no default range
        count = await db.run(lambda s: s.scalar(select(func.count()).select_from(Lease)))
        assert count == 1
    finally:
        await client.close()


async def test_vlan_ranges_are_placed_on_hosts_that_carry_the_vlan(
        controller: RunningController) -> None:
    db = controller.ctrl.ctx.db
    await db.run(lambda s: ipam.add_range(s, "plain", "10.79.0.0/24", default=True))
    await db.run(lambda s: ipam.add_range(s, "v30", "10.80.0.0/24", vlan=30))
    await db.run(lambda s: ipam.add_range(s, "v40", "10.81.0.0/24", vlan=40))
    await controller.ctrl.reload_ranges()
    # The big host has more free memory, so only the VLAN can send VMs elsewhere.
    await controller.start_node("big.usher.test", cpus=64, memory_mib=1 << 20)
    await controller.start_node("tagged.usher.test", vlans=[30])
    client = await controller.client()
    try:
        await client.wait_all(await client.start(["{1..3}.t"], ram=64, ip_range="v30"), 10)
        await client.wait_all(await client.start(["p"], ram=64), 10)
        hosts = {v.name.split(".")[0]: v.host for v in await client.list_vms()}
        assert hosts == {"1": "tagged.usher.test", "2": "tagged.usher.test",
                         "3": "tagged.usher.test", "p": "big.usher.test"}
        with pytest.raises(NoCapacity, match="no VMM that is up carries VLAN 40"):
            await client.start(["x"], ram=64, ip_range="v40")
        with pytest.raises(NoCapacity, match="does not carry VLAN 30"):
            await client.start(["y"], ram=64, ip_range="v30", vmm="big.usher.test")
        assert _leases(controller).keys() == {v.uuid for v in await client.list_vms()}
        # Migration keeps to the VLAN too: no other host carries 30.
        with pytest.raises(NoCapacity, match="VLAN 30"):
            await client.migrate(["1.t"])
        [info] = [h for h in await client.list_hosts() if h.name == "tagged.usher.test"]
        assert info.vlans == [30]
    finally:
        await client.close()


async def test_a_start_whose_caller_leaves_mid_journal_keeps_its_address(
        controller: RunningController) -> None:
    # The caller's request is cancelled (its connection closed) while the
    # journal write waits in the database thread; the write still commits, so
    # the VM must go on, and its address must never be handed out again.
    db = controller.ctrl.ctx.db
    await db.run(lambda s: ipam.add_range(s, "lab", "10.78.0.0/28", default=True))
    await controller.ctrl.reload_ranges()
    await controller.start_node("h1.usher.test")
    service = controller.ctrl.vms
    seuss = Identity(user="seuss", site_admin=False, usher=True)
    release = threading.Event()
    blocked = db.submit(lambda _session: release.wait(10))  # holds the DB thread
    call = asyncio.create_task(service.idempotent(
        seuss, "start", "req-left", lambda: service.start(seuss, StartArgs(names=["left"]),
                                                          "req-left")))
    await asyncio.sleep(0.2)
    call.cancel()
    release.set()
    await blocked
    with pytest.raises(asyncio.CancelledError):
        await call
    client = await controller.client()
    try:
        [vm] = await _wait_listed(client, "left")
        assert vm.ip is not None and _leases(controller) == {vm.uuid: vm.ip}
        tasks = await client.start(["other"], ram=64)
        await client.wait_all(tasks, 10)
        [other] = await client.list_vms(["other"])
        assert other.ip != vm.ip
        # A retry of the request gets the journaled reply: its start task, no new VM.
        [again] = await client.start(["left"], ram=64, request_id="req-left")
        assert again.op == "start" and again.vm == vm.name
        assert len(await client.list_vms()) == 2
    finally:
        await client.close()


async def _wait_listed(client: Any, name: str) -> list[Any]:
    for _ in range(200):
        found = [v for v in await client.list_vms([name]) if v.state == "running"]
        if found:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name} never ran")
