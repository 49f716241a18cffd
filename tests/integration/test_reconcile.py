"""Domain events and periodic reconciliation against an in-process controller."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

from sqlalchemy import select

from tests.integration.conftest import RunningController, write_site
from usher.client import AsyncClient
from usher.controller.app import Controller
from usher.controller.models import Transition
from usher.lnm.drivers.base import DomainSpec


async def _state(client: AsyncClient, name: str, want: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        vms = {v.name.split(".")[0]: v for v in await client.list_vms()}
        if vms[name].state == want:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{name} never became {want}; is {vms[name].state}")


async def test_events_and_periodic_reconciliation(controller: RunningController) -> None:
    agent = await controller.start_node("h1.usher.test")
    driver = agent.driver
    client = await controller.client()
    try:
        await client.wait_all(await client.start(["ev1", "ev2"], ram=64), 10)
        uuid = {v.name.split(".")[0]: v.uuid for v in await client.list_vms()}

        # Someone pauses a guest behind usher's back: the lifecycle event says so.
        await asyncio.to_thread(driver.pause, uuid["ev1"])
        await _state(client, "ev1", "paused")

        # An event that never arrives (node manager busy, event lost): the
        # periodic inventory comparison catches the difference.
        driver.set_event_callback(None)
        await asyncio.to_thread(driver.power_off, uuid["ev2"])
        await asyncio.to_thread(driver.define, DomainSpec(
            uuid="99999999-0000-4000-8000-000000000001", name="manual.example.org",
            memory_mib=512, vcpus=1, mac="52:54:00:99:99:99", owner="someone",
            task_id="none"))
        await asyncio.to_thread(driver.start, "99999999-0000-4000-8000-000000000001")
        driver.set_event_callback(agent._on_event)
        await asyncio.sleep(0.05)
        assert {v.name.split(".")[0]: v.state for v in await client.list_vms()}["ev2"] == \
            "running"
        await controller.ctrl.hosts.reconcile_all()
        await _state(client, "ev2", "stopped")
        # The hand-made domain is counted against the host but never shown to users.
        assert "manual.example.org" not in {v.name for v in await client.list_vms()}
        [host] = await client.list_hosts()
        assert host.used_memory_mib == 64 + 64 + 512

        causes = await controller.ctrl.ctx.db.run(lambda s: [
            (t.vm_name.split(".")[0], t.new, t.cause)
            for t in s.scalars(select(Transition).order_by(Transition.id))])
        assert any(c[0] == "ev1" and c[1] == "paused" and "domain event" in c[2]
                   for c in causes)
        assert any(c[0] == "ev2" and c[1] == "stopped" and "reconciled" in c[2]
                   for c in causes)
    finally:
        await client.close()



async def test_kwargfil_drops_options_the_site_does_not_accept(tmp_path: Path) -> None:
    cfg, pki = write_site(tmp_path)
    cfg = dataclasses.replace(cfg, kwargfil={"start": {"accept": ["ram"]}})
    ctrl = Controller(cfg)
    host, port = await ctrl.start()
    running = RunningController(cfg=cfg, ctrl=ctrl, host=host, port=port, pki=pki,
                                tmp=tmp_path)
    try:
        await running.start_node("h1.usher.test", cpus=8)
        client = await running.client()
        try:
            await client.wait_all(await client.start(["kw"], ram=48, vcpus=4), 10)
            [vm] = await client.list_vms()
            assert (vm.memory_mib, vm.vcpus) == (48, cfg.default_vcpus)  # --vcpus dropped
        finally:
            await client.close()
    finally:
        await running.close()
