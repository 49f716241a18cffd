"""A host whose hypervisor daemon dies and comes back, against an in-process controller.

The fake driver's daemon "dies" (:meth:`FakeDriver.lose_hypervisor`) while its
guest runs on: the node manager hangs up with the reason, the controller
marks the host lost and the VM unknown; once the daemon is back the node
manager reopens it, registers again and the inventory reconciles the VM.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import pytest
from sqlalchemy import select

from tests.integration.conftest import WAIT_S, MakeController
from usher.controller.models import Transition
from usher.errors import HypervisorError, NotConnected
from usher.lnm.drivers.base import DomainState
from usher.lnm.drivers.fake import FakeDriver

HOST = "h1.usher.test"
LOST_AFTER_S = 0.5


async def _until(check: Callable[[], Awaitable[object]], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    last: object = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{what} not within {WAIT_S} s (last: {last!r})")


async def test_lost_hypervisor_makes_the_host_lost_then_reconciles(
        make_controller: MakeController, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    controller = await make_controller(host_lost_after_s=LOST_AFTER_S)
    agent = await controller.start_node(HOST)
    driver = agent.driver
    assert isinstance(driver, FakeDriver)
    client = await controller.client()

    async def host_state() -> str:
        [host] = await client.list_hosts()
        return host.state

    async def vm_state() -> str:
        [vm] = await client.list_vms(["g1"])
        return vm.state

    try:
        await client.wait_all(await client.start(["g1"], ram=64), WAIT_S)
        [vm] = await client.list_vms(["g1"])
        assert vm.state == "running"

        driver.lose_hypervisor("libvirtd exited (test)")
        with pytest.raises(NotConnected):
            driver.list_domains()
        await _until(lambda: _eq(host_state, "lost"), "host lost")
        await _until(lambda: _eq(vm_state, "unknown"), "VM unknown")
        assert not agent.registered.is_set()
        assert "hypervisor connection lost: libvirtd exited (test)" in caplog.text
        # The node manager keeps trying, logging each attempt; the daemon stays down.
        await _until(lambda: _true("hypervisor still unavailable (attempt 2" in caplog.text),
                     "a logged retry")
        with pytest.raises(HypervisorError):
            driver.open()

        driver.restore_hypervisor()
        await _until(lambda: _eq(host_state, "up"), "host up again")
        await _until(lambda: _eq(vm_state, "running"), "VM reconciled")
        assert agent.registered.is_set()
        # The guest ran on throughout: nothing restarted or stopped it.
        assert driver.get_domain(vm.uuid).state is DomainState.RUNNING
        causes = await controller.ctrl.ctx.db.run(lambda s: [
            (t.new, t.cause) for t in s.scalars(select(Transition).order_by(Transition.id))
            if t.vm_name.startswith("g1.")])
        assert causes[-2][0] == "unknown" and "lost" in causes[-2][1], causes
        assert causes[-1][0] == "running", causes
    finally:
        await client.close()


async def _eq(get: Callable[[], Awaitable[str]], want: str) -> bool:
    return await get() == want


async def _true(value: bool) -> bool:
    return value
