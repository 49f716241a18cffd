"""Accounting through a real controller: node managers on the fake driver report
their VMs' counters, the controller keeps a bounded series per VM, and
``vm.stats`` and ``list -l`` (``vm.list``) show them.

The fake driver's guests keep a quarter of their vCPU busy and move bytes at
fixed rates (see usher.lnm.drivers.fake), so the rates are known; sampling
runs every 0.2 s here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import func, select

from tests.integration.conftest import (
    OTHER_PASSWORD,
    OTHER_USER,
    MakeController,
    RunningController,
)
from usher.client import AsyncClient
from usher.controller.models import VmStat
from usher.controller.stats import StatsCollector
from usher.errors import InvalidOption, PermissionDenied, VmNotFound
from usher.lnm.drivers.base import DomainStats
from usher.lnm.drivers.fake import FAKE_CPU_LOAD, FAKE_NET_RX_BPS

INTERVAL_S = 0.2
KEEP = 5


@pytest.fixture
async def site(make_controller: MakeController) -> RunningController:
    return await make_controller(stats_interval_s=INTERVAL_S, stats_keep=KEEP,
                                 stats_timeout_s=0.5)


@pytest.fixture
async def client(site: RunningController) -> AsyncIterator[AsyncClient]:
    c = await site.client()
    yield c
    await c.close()


def collector(site: RunningController) -> StatsCollector:
    stats = site.ctrl.ctx.stats
    assert stats is not None
    return stats


async def rounds(site: RunningController, n: int) -> None:
    """Wait for ``n`` more sampling rounds."""
    stats = collector(site)
    await stats.wait_rounds(stats.rounds + n, timeout=5 + n * INTERVAL_S * 3)


async def rows(site: RunningController, uuid: str | None = None) -> int:
    def count(session: Any) -> int:
        query = select(func.count()).select_from(VmStat)
        if uuid is not None:
            query = query.where(VmStat.vm_uuid == uuid)
        return int(session.scalar(query))
    return await site.ctrl.ctx.db.run(count)


async def test_samples_accumulate_bounded_and_show_in_stats_and_list(
        site: RunningController, client: AsyncClient) -> None:
    await site.start_node("h1.usher.test")
    await client.wait_all(await client.start(["a", "b"], ram=64), 5)
    [a, b] = await client.list_vms(["a", "b"])
    await rounds(site, 3)
    assert 2 <= await rows(site, a.uuid) <= KEEP

    [sa] = await client.vm_stats(["a"])
    assert 2 <= len(sa.samples) <= KEEP
    assert [s.time for s in sa.samples] == sorted(s.time for s in sa.samples)
    assert all(x.cpu_ns <= y.cpu_ns for x, y in zip(sa.samples, sa.samples[1:], strict=False))
    assert sa.samples[-1].memory_kib == 64 * 1024 and sa.samples[-1].rss_kib == 32 * 1024
    assert sa.rates is not None and sa.average is not None
    # A fake guest keeps a quarter of its one vCPU busy; the sample times are
    # the controller's, so allow for scheduling around a 0.2 s interval.
    assert 0.4 * FAKE_CPU_LOAD * 100 < sa.rates.cpu_pct < 2 * FAKE_CPU_LOAD * 100
    assert 0.4 * FAKE_NET_RX_BPS < sa.average.net_rx_bps < 2 * FAKE_NET_RX_BPS
    assert sa.rates.mem_kib == 32 * 1024

    listed = {v.name.split(".")[0]: v for v in await client.list_vms()}
    assert listed["a"].cpu_pct is not None and listed["a"].cpu_pct > 0
    assert listed["a"].mem_kib == 32 * 1024

    # Bounded: however long it runs, at most stats_keep samples per VM.
    await rounds(site, KEEP + 2)
    assert await rows(site, a.uuid) == KEEP and await rows(site, b.uuid) == KEEP
    assert len((await client.vm_stats(["a"], samples=KEEP))[0].samples) == KEEP
    assert len((await client.vm_stats(["a"], samples=2))[0].samples) == 2
    with pytest.raises(InvalidOption, match=f"1 to {KEEP}"):
        await client.vm_stats(["a"], samples=KEEP + 1)

    # Paused: the CPU stands still but the memory is held; stopped: no figures.
    await client.wait_all(await client.pause(["a"]), 5)
    await client.wait_all(await client.shutdown(["b"]), 5)
    await rounds(site, 2)
    listed = {v.name.split(".")[0]: v for v in await client.list_vms()}
    assert listed["a"].state == "paused" and listed["a"].cpu_pct == 0.0
    assert listed["a"].mem_kib == 32 * 1024
    assert (listed["b"].cpu_pct, listed["b"].mem_kib) == (None, None)
    [sb] = await client.vm_stats(["b"])
    assert sb.samples[-1].cpu_ns == 0 and sb.samples[-1].memory_kib == 0  # zeros while off

    # Destroyed: its samples go with it, and no round brings them back.
    await client.wait_all(await client.destroy(["a"]), 5)
    assert await rows(site, a.uuid) == 0
    await rounds(site, 2)
    assert await rows(site, a.uuid) == 0 and a.uuid not in collector(site).latest
    assert await rows(site) == KEEP  # b's: a stopped VM is sampled too (zeros), bounded
    with pytest.raises(VmNotFound):
        await client.vm_stats(["a"])


async def test_other_users_vms_are_not_theirs_to_see(site: RunningController,
                                                     client: AsyncClient) -> None:
    await site.start_node("h1.usher.test")
    await client.wait_all(await client.start(["mine"], ram=64), 5)
    other = await site.client(OTHER_USER, OTHER_PASSWORD)
    try:
        await rounds(site, 2)
        assert await other.vm_stats() == []
        with pytest.raises(PermissionDenied):  # as list: another user's domain
            await other.vm_stats(["mine.seuss.usher.test"])
        with pytest.raises(VmNotFound):
            await other.vm_stats(["mine"])
        [mine] = await client.vm_stats()
        assert mine.name == "mine.seuss.usher.test" and mine.samples
    finally:
        await other.close()


async def test_a_slow_host_does_not_hold_up_the_others(site: RunningController,
                                                       client: AsyncClient) -> None:
    await site.start_node("h1.usher.test")
    slow_node = await site.start_node("h2.usher.test")
    await client.wait_all(await client.start(["fast"], ram=64, vmm="h1.usher.test"), 5)
    await client.wait_all(await client.start(["slow"], ram=64, vmm="h2.usher.test"), 5)
    [fast, slow] = await client.list_vms(["fast", "slow"])
    real = slow_node.driver.domain_stats

    def wedged(uuids: Any = None) -> list[DomainStats]:
        time.sleep(1.0)  # a hypervisor that hangs longer than stats_timeout_s
        return real(uuids)

    slow_node.driver.domain_stats = wedged  # type: ignore[method-assign]
    await rounds(site, 1)  # a round that may have asked before the wedge
    before = await rows(site, fast.uuid), await rows(site, slow.uuid)
    started = asyncio.get_running_loop().time()
    await rounds(site, 2)
    elapsed = asyncio.get_running_loop().time() - started
    assert await rows(site, fast.uuid) >= min(KEEP, before[0] + 2)
    assert await rows(site, slow.uuid) <= before[1] + 1
    assert elapsed < 2 * (INTERVAL_S + 0.5) + 1.0  # each round waits 0.5 s at most
