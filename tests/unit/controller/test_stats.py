"""Accounting in the controller: rates from samples, and the bounded series in SQL.

The collector runs against a real SQLite database (migrated to head) and a
real registry; only the node links are a stand-in that answers ``node.stats``
with given counters (the real round trip is tests/integration/test_stats.py).
Time is the collector's injectable clock.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import func, select

from usher.config import ControllerConfig
from usher.controller import db as dbmod
from usher.controller import stats as stats_module
from usher.controller.models import Vm, VmStat
from usher.controller.state import HostRec, Registry, VmRec
from usher.controller.stats import (
    _PRUNE,
    StatsCollector,
    memory_in_use,
    rates_between,
    rates_over,
)
from usher.errors import ConfigError, InvalidOption, TimedOut
from usher.protocol.ops import DomainStatsMsg, StatsReply, StatsSample

GIB = 1024 ** 3


def sample(t: float, cpu_s: float = 0.0, **kw: Any) -> StatsSample:
    return StatsSample(time=t, cpu_ns=int(cpu_s * 1e9), **kw)


# ------------------------------------------------------------------ rates
def test_rates_between_two_samples() -> None:
    a = sample(100.0, 10.0, memory_kib=4096, disk_rd=1000, disk_wr=0, net_rx=50, net_tx=5)
    b = sample(160.0, 40.0, memory_kib=4096, rss_kib=3000, disk_rd=61000, disk_wr=6000,
               net_rx=650, net_tx=65)
    r = rates_between(a, b)
    assert r is not None
    assert r.interval_s == 60.0
    assert r.cpu_pct == pytest.approx(50.0)  # 30 s of CPU in 60 s: half a host CPU
    assert (r.disk_rd_bps, r.disk_wr_bps, r.net_rx_bps, r.net_tx_bps) == (1000, 100, 10, 1)
    assert r.mem_kib == 3000  # the host memory it holds, where known


def test_more_than_one_cpu_and_memory_without_rss() -> None:
    r = rates_between(sample(0.0, 0.0), sample(10.0, 25.0, memory_kib=2048))
    assert r is not None and r.cpu_pct == pytest.approx(250.0)  # 2.5 host CPUs busy
    assert r.mem_kib == 2048 == memory_in_use(sample(0, memory_kib=2048))


def test_a_counter_that_went_down_was_restarted() -> None:
    # The VM booted again between the samples: its counters start from zero,
    # so what it shows now is all it did since.
    r = rates_between(sample(0.0, 500.0, disk_rd=10**9), sample(10.0, 2.0, disk_rd=4096))
    assert r is not None and r.cpu_pct == pytest.approx(20.0) and r.disk_rd_bps == 409.6


def test_no_rates_without_time_or_a_second_sample() -> None:
    assert rates_between(sample(5.0, 1.0), sample(5.0, 2.0)) is None
    assert rates_between(sample(6.0, 1.0), sample(5.0, 2.0)) is None
    assert rates_over([]) is None and rates_over([sample(1.0)]) is None


def test_rates_over_a_series_sum_each_interval() -> None:
    # Runs at 100 % for 60 s, reboots (counters reset) and runs at 50 % for 60 s;
    # the stretch before the reboot's first sample is all that is lost.
    series = [sample(0.0, 0.0), sample(60.0, 60.0), sample(120.0, 30.0),
              sample(180.0, 60.0)]
    r = rates_over(series)
    assert r is not None and r.interval_s == 180.0
    assert r.cpu_pct == pytest.approx((60 + 30 + 30) / 180 * 100)


# --------------------------------------------------------------- collector
class Nodes:
    """Node links that answer ``node.stats`` from ``replies[host]``."""

    def __init__(self) -> None:
        self.replies: dict[str, list[DomainStatsMsg]] = {}
        self.broken: set[str] = set()

    def connected(self, host: str) -> bool:
        return host in self.replies

    async def call(self, host: str, op: str, args: Any, timeout: float | None = None) -> Any:
        assert op == "node.stats"
        if host in self.broken:
            raise TimedOut(f"node.stats on node {host} got no answer in time")
        return StatsReply(domains=self.replies[host])


class Site:
    """A registry with hosts and VMs, their rows in SQL, and a clock."""

    def __init__(self, db: dbmod.Database, keep: int) -> None:
        self.db = db
        self.now = 1000.0
        self.reg = Registry()
        self.nodes = Nodes()
        self.config = ControllerConfig(stats_keep=keep, stats_interval_s=60.0)
        self.cpu: dict[str, float] = {}

    def ctx(self) -> Any:
        return SimpleNamespace(config=self.config, db=self.db, reg=self.reg, nodes=self.nodes)

    def collector(self) -> StatsCollector:
        return StatsCollector(self.ctx(), clock=lambda: self.now)

    async def add_vm(self, name: str, host: str) -> VmRec:
        if host not in self.reg.hosts:
            self.reg.add_host(HostRec(name=host, state="up", disabled=False, hypervisor="fake",
                                      cpus=8, memory_mib=8192, connected=True))
            self.nodes.replies[host] = []
        uuid = f"00000000-0000-4000-8000-{len(self.reg.vms) + 1:012d}"
        vm = VmRec(uuid=uuid, name=f"{name}.seuss.usher.test", cluster="seuss.usher.test",
                   owner="seuss", host=host, state="running", memory_mib=256, vcpus=1,
                   mac=f"52:54:00:00:00:{len(self.reg.vms) + 1:02x}")
        self.reg.add_vm(vm)
        await self.db.run(lambda s: s.add(Vm(
            uuid=vm.uuid, name=vm.name, cluster=vm.cluster, owner=vm.owner, host=host,
            state=vm.state, memory_mib=256, vcpus=1, mac=vm.mac, since=0.0, created=0.0)))
        self.nodes.replies[host].append(DomainStatsMsg(uuid=uuid))
        return vm

    def tick(self, seconds: float = 60.0, busy: float = 0.5) -> None:
        """Let ``seconds`` pass with every VM keeping ``busy`` of a CPU busy."""
        self.now += seconds
        for host, domains in self.nodes.replies.items():
            self.nodes.replies[host] = [
                DomainStatsMsg(uuid=d.uuid, cpu_ns=d.cpu_ns + int(seconds * busy * 1e9),
                               memory_kib=262144, disk_rd_bytes=d.disk_rd_bytes + 4096)
                for d in domains]

    async def rows(self, uuid: str) -> list[float]:
        """The times of the VM's samples in SQL, oldest first."""
        return await self.db.run(lambda s: list(s.scalars(
            select(VmStat.time).where(VmStat.vm_uuid == uuid).order_by(VmStat.time))))


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[dbmod.Database]:
    url = f"sqlite:///{tmp_path / 'u.db'}"
    dbmod.upgrade(url)
    database = dbmod.Database(dbmod.make_engine(url))
    yield database
    database.close()


async def test_each_round_stores_one_sample_per_vm_and_keeps_the_newest(
        db: dbmod.Database) -> None:
    site = Site(db, keep=3)
    a, b = await site.add_vm("a", "h1"), await site.add_vm("b", "h2")
    stats = site.collector()
    for _ in range(5):
        site.tick()
        assert await stats.collect() == 2
    assert await site.rows(a.uuid) == [1180.0, 1240.0, 1300.0]  # the newest 3 of 5
    assert len(await site.rows(b.uuid)) == 3
    latest = stats.latest[a.uuid]
    assert latest.sample.time == 1300.0 and latest.rates is not None
    assert latest.rates.cpu_pct == pytest.approx(50.0)
    assert latest.rates.disk_rd_bps == pytest.approx(4096 / 60)


async def test_after_a_restart_the_series_continues_and_stays_bounded(
        db: dbmod.Database) -> None:
    site = Site(db, keep=4)
    a = await site.add_vm("a", "h1")
    first = site.collector()
    for _ in range(3):
        site.tick()
        await first.collect()
    # A new controller: counts and the previous sample come from SQL.
    again = site.collector()
    site.tick()
    await again.collect()
    assert again.latest[a.uuid].rates is not None  # against the sample stored before
    site.tick()
    await again.collect()
    assert len(await site.rows(a.uuid)) == 4
    # A smaller stats_keep trims the series at the next round.
    site.config.stats_keep = 2
    third = site.collector()
    site.tick()
    await third.collect()
    assert await site.rows(a.uuid) == [1300.0, 1360.0]


async def test_only_the_vms_own_host_speaks_for_it(db: dbmod.Database) -> None:
    site = Site(db, keep=10)
    a = await site.add_vm("a", "h1")
    await site.add_vm("b", "h2")
    # h2 also reports a's UUID (the far side of a live migration) and a stranger.
    site.nodes.replies["h2"] += [DomainStatsMsg(uuid=a.uuid, cpu_ns=1),
                                 DomainStatsMsg(uuid="f0000000-0000-4000-8000-000000000009")]
    stats = site.collector()
    site.tick()
    assert await stats.collect() == 2
    assert len(await site.rows(a.uuid)) == 1
    assert stats.latest[a.uuid].sample.cpu_ns > 1


async def test_a_vm_destroyed_during_a_round_leaves_no_rows(db: dbmod.Database) -> None:
    site = Site(db, keep=10)
    a = await site.add_vm("a", "h1")
    stats = site.collector()
    # Its row left SQL (destroy committed) while its host's answer was on the way.
    await db.run(lambda s: s.query(Vm).filter(Vm.uuid == a.uuid).delete())
    site.tick()
    await stats.collect()
    assert await site.rows(a.uuid) == [] and a.uuid not in stats.latest


async def test_a_host_that_fails_costs_only_its_samples(db: dbmod.Database) -> None:
    site = Site(db, keep=10)
    a, b = await site.add_vm("a", "h1"), await site.add_vm("b", "h2")
    site.nodes.broken.add("h2")
    stats = site.collector()
    site.tick()
    assert await stats.collect() == 1
    assert len(await site.rows(a.uuid)) == 1 and await site.rows(b.uuid) == []
    assert stats.rounds == 1


async def test_a_host_still_answering_is_not_asked_again(db: dbmod.Database) -> None:
    site = Site(db, keep=10)
    a, b = await site.add_vm("a", "h1"), await site.add_vm("b", "h2")
    site.config.stats_timeout_s = 0.05
    answer = asyncio.Event()
    calls: list[str] = []
    quick = site.nodes.call

    async def call(host: str, op: str, args: Any, timeout: float | None = None) -> Any:
        calls.append(host)
        if host == "h2":
            await answer.wait()  # a wedged hypervisor
        return await quick(host, op, args, timeout)

    site.nodes.call = call  # type: ignore[method-assign]
    stats = site.collector()
    for _ in range(3):
        site.tick()
        assert await stats.collect() == 1  # h1's VM only, each round
    assert calls.count("h2") == 1, "one call in flight per host, not one per round"
    answer.set()
    await asyncio.sleep(0)
    site.tick()
    assert await stats.collect() == 2  # it answered the old call: asked again
    assert calls.count("h2") == 2
    assert len(await site.rows(a.uuid)) == 4 and len(await site.rows(b.uuid)) == 1


@pytest.mark.parametrize("settings", [{"stats_keep": 1}, {"stats_timeout_s": 0.0}])
def test_settings_that_cannot_work_stop_the_controller(settings: dict[str, Any]) -> None:
    ctx = SimpleNamespace(config=ControllerConfig(**settings))
    with pytest.raises(ConfigError, match=next(iter(settings))):
        StatsCollector(ctx)  # type: ignore[arg-type]


async def test_release_forgets_the_vm(db: dbmod.Database) -> None:
    site = Site(db, keep=10)
    a = await site.add_vm("a", "h1")
    stats = site.collector()
    site.tick()
    await stats.collect()
    assert a.uuid in stats.latest
    stats.release(a)
    assert a.uuid not in stats.latest
    stats.release(a)  # idempotent


async def test_annotate_gives_list_l_fresh_figures_of_running_vms(
        db: dbmod.Database) -> None:
    site = Site(db, keep=10)
    a = await site.add_vm("a", "h1")
    stats = site.collector()
    for _ in range(2):
        site.tick()
        await stats.collect()
    info = a.info()
    stats.annotate(info)
    assert (info.cpu_pct, info.mem_kib) == (50.0, 262144)
    stopped = a.info()
    stopped.state = "stopped"  # before the next round has seen it stop
    stats.annotate(stopped)
    assert stopped.cpu_pct is None and stopped.mem_kib is None
    site.now += 60 * 3  # its host went quiet: the figures are stale
    stale = a.info()
    stats.annotate(stale)
    assert stale.cpu_pct is None and stale.mem_kib is None


async def test_query_returns_the_newest_samples_oldest_first(db: dbmod.Database) -> None:
    site = Site(db, keep=5)
    a, b = await site.add_vm("a", "h1"), await site.add_vm("b", "h1")
    stats = site.collector()
    for busy in (0.5, 0.5, 0.5, 1.0):
        site.tick(busy=busy)
        await stats.collect()
    [sa, sb] = await stats.query([a.info(), b.info()], 3)
    assert [s.time for s in sa.samples] == [1120.0, 1180.0, 1240.0]
    assert sa.rates is not None and sa.rates.cpu_pct == pytest.approx(100.0)  # last interval
    assert sa.average is not None and sa.average.cpu_pct == pytest.approx(75.0)
    assert (sb.name, len(sb.samples)) == (b.name, 3)
    [one] = await stats.query([a.info()], 1)
    assert len(one.samples) == 1 and one.average is None and one.rates is not None
    for bad in (0, 6):
        with pytest.raises(InvalidOption, match="1 to 5"):
            await stats.query([a.info()], bad)
    assert await stats.query([], 3) == []


async def test_many_vms_get_fewer_samples_each(db: dbmod.Database,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    site = Site(db, keep=1440)
    vms = [await site.add_vm(f"v{i}", "h1") for i in range(4)]
    stats = site.collector()
    for _ in range(4):
        site.tick()
        await stats.collect()
    monkeypatch.setattr(stats_module, "MAX_REPLY_SAMPLES", 9)
    reply = await stats.query([vm.info() for vm in vms], 60)
    assert [len(v.samples) for v in reply] == [2, 2, 2, 2]  # at least two each
    reply = await stats.query([vm.info() for vm in vms[:3]], 60)
    assert [len(v.samples) for v in reply] == [3, 3, 3]  # 9 in all


async def test_pruning_stays_cheap_with_a_long_series(db: dbmod.Database) -> None:
    # One round with a thousand VMs at their bound: one insert, one delete per
    # VM through the index; no scan of the table.
    site = Site(db, keep=20)
    vms = [await site.add_vm(f"v{i}", "h1") for i in range(1000)]
    stats = site.collector()
    for _ in range(21):
        site.tick()
        await stats.collect()
    started = time.monotonic()
    site.tick()
    await stats.collect()
    elapsed = time.monotonic() - started
    counts = await db.run(lambda s: s.execute(
        select(VmStat.vm_uuid, func.count()).group_by(VmStat.vm_uuid)).all())
    assert {n for _, n in counts} == {20} and len(counts) == len(vms)
    assert elapsed < 2.0, f"a round of 1000 VMs took {elapsed:.2f} s"
    compiled = _PRUNE.compile(bind=db.engine)
    params = compiled.construct_params({"u": vms[0].uuid, "n": 1})
    plan = await db.run(lambda s: s.connection().exec_driver_sql(
        f"EXPLAIN QUERY PLAN {compiled}",
        tuple(params[name] for name in compiled.positiontup or ())).all())
    assert any("ix_vm_stats_vm_uuid_time" in str(row) for row in plan), plan
    assert not any(str(row).endswith("SCAN vm_stats')") for row in plan), plan
