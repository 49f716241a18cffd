"""Accounting: every VM's CPU time, memory, disk and network bytes, as bounded time series.

Every ``stats_interval_s`` the :class:`StatsCollector` asks each connected
host for the counters of usher's domains (``node.stats``: one hypervisor call
on the host), all hosts at once and each under ``stats_timeout_s``, so a slow
host costs only its own samples of the round (and is not asked again until
it has answered). The samples of a round go to
the ``vm_stats`` table in one transaction of the database's group commit: one
multi-row INSERT, and a DELETE of each VM's oldest rows beyond ``stats_keep``.
That DELETE reaches its rows through the (vm_uuid, time) index and knows how
many to drop from a count of each VM's rows held in memory (read once per VM
from SQL, after a restart), so bounding the table costs no scan. The rows go
with the VM when it is destroyed: the collector is a provider whose
``vm_tables`` name ``vm_stats``.

Counters are cumulative since the VM's current boot, as libvirt reports them;
rates are derived here, in the controller (:func:`rates_between`,
:func:`rates_over`): the increase of a counter over the time between two
samples, where a counter that went down was restarted (a new boot, a
migration, a restore) and counts from zero. CPU % is CPU time per elapsed
time, 100 being one host CPU kept busy (as ``top`` counts). Sample times are
the controller's clock when the host's reply arrived.

The newest sample of each VM and the rates over its last interval are kept in
memory: ``list -l`` shows them (:meth:`StatsCollector.annotate`) without SQL.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Table, bindparam, delete, func, insert, select
from sqlalchemy.orm import Session

from usher.controller.context import Context
from usher.controller.models import Vm, VmStat
from usher.controller.providers import Placement, Provider, Row
from usher.controller.state import VmRec
from usher.errors import ConfigError, InvalidOption, UsherError
from usher.protocol.ops import (
    DEFAULT_STATS_SAMPLES,
    DomainStatsMsg,
    Empty,
    StatsReply,
    StatsSample,
    VmInfo,
    VmRates,
    VmStats,
)

log = logging.getLogger(__name__)

VM_STATS: Table = VmStat.__table__  # type: ignore[assignment]
_VMS: Table = Vm.__table__  # type: ignore[assignment]

MAX_REPLY_SAMPLES = 20_000
"""Most samples one ``vm.stats`` reply carries in all (about 2.5 MB, inside the
frame limit); asking for many VMs gives fewer samples of each (at least two)."""

FRESH_INTERVALS = 2.5
"""``list -l`` shows a VM's latest rates while its newest sample is younger
than this many intervals: a host that stopped reporting shows none."""

_IN_CHUNK = 500  # UUIDs per IN (...) list, well inside every database's limit


def memory_in_use(sample: StatsSample) -> int:
    """KiB the VM uses: the host memory its process holds where known, else the guest's."""
    return sample.rss_kib if sample.rss_kib is not None else sample.memory_kib


def _increase(old: int, new: int) -> int:
    # A counter that went down started again from zero (a new QEMU process).
    return new - old if new >= old else new


def rates_between(a: StatsSample, b: StatsSample) -> VmRates | None:
    """The VM's use from sample ``a`` to the later sample ``b``; None if no time passed."""
    return rates_over([a, b])


def rates_over(samples: Sequence[StatsSample]) -> VmRates | None:
    """The VM's average use over ``samples`` (oldest first), first to last.

    Each counter's increases are summed pair by pair, so a restart in the
    middle loses only the part of its interval before the restart. None with
    fewer than two samples or no time between the first and the last.
    """
    if len(samples) < 2:
        return None
    elapsed = samples[-1].time - samples[0].time
    if elapsed <= 0:
        return None
    cpu = rd = wr = rx = tx = 0
    for a, b in zip(samples, samples[1:], strict=False):
        cpu += _increase(a.cpu_ns, b.cpu_ns)
        rd += _increase(a.disk_rd, b.disk_rd)
        wr += _increase(a.disk_wr, b.disk_wr)
        rx += _increase(a.net_rx, b.net_rx)
        tx += _increase(a.net_tx, b.net_tx)
    return VmRates(interval_s=elapsed, cpu_pct=cpu / (elapsed * 1e9) * 100,
                   mem_kib=memory_in_use(samples[-1]), disk_rd_bps=rd / elapsed,
                   disk_wr_bps=wr / elapsed, net_rx_bps=rx / elapsed, net_tx_bps=tx / elapsed)


def sample_of(msg: DomainStatsMsg, when: float) -> StatsSample:
    return StatsSample(time=when, cpu_ns=msg.cpu_ns, memory_kib=msg.memory_kib,
                       rss_kib=msg.rss_kib, disk_rd=msg.disk_rd_bytes, disk_wr=msg.disk_wr_bytes,
                       net_rx=msg.net_rx_bytes, net_tx=msg.net_tx_bytes)


def _row(uuid: str, s: StatsSample) -> Row:
    return dict(vm_uuid=uuid, time=s.time, cpu_ns=s.cpu_ns, memory_kib=s.memory_kib,
                rss_kib=s.rss_kib, disk_rd=s.disk_rd, disk_wr=s.disk_wr, net_rx=s.net_rx,
                net_tx=s.net_tx)


_SAMPLE_COLUMNS = (VM_STATS.c.time, VM_STATS.c.cpu_ns, VM_STATS.c.memory_kib,
                   VM_STATS.c.rss_kib, VM_STATS.c.disk_rd, VM_STATS.c.disk_wr,
                   VM_STATS.c.net_rx, VM_STATS.c.net_tx)


def _sample_from_row(r: Any) -> StatsSample:
    return StatsSample(time=r.time, cpu_ns=r.cpu_ns, memory_kib=r.memory_kib,
                       rss_kib=r.rss_kib, disk_rd=r.disk_rd, disk_wr=r.disk_wr,
                       net_rx=r.net_rx, net_tx=r.net_tx)


def _newest(uuid: str, limit: int) -> Any:
    """The newest ``limit`` samples of a VM, newest first (through the index)."""
    return (select(*_SAMPLE_COLUMNS).where(VM_STATS.c.vm_uuid == uuid)
            .order_by(VM_STATS.c.time.desc(), VM_STATS.c.id.desc()).limit(limit))


# Drop a VM's ``n`` oldest samples; run for many VMs at once (executemany).
_PRUNE = delete(VM_STATS).where(VM_STATS.c.id.in_(
    select(VM_STATS.c.id).where(VM_STATS.c.vm_uuid == bindparam("u"))
    .order_by(VM_STATS.c.time, VM_STATS.c.id).limit(bindparam("n"))))


def _chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for i in range(0, len(items), _IN_CHUNK):
        yield items[i:i + _IN_CHUNK]


@dataclass(slots=True)
class _Stored:
    """What a round's transaction did: row counts and, for VMs new to memory,
    their newest sample before the round (for rates after a restart)."""

    counts: dict[str, int]
    previous: dict[str, StatsSample]


@dataclass(slots=True)
class Latest:
    """A VM's newest sample and its rates over the interval before it."""

    sample: StatsSample
    rates: VmRates | None


class StatsCollector(Provider):
    """Samples every VM's counters from its host and keeps them; see the module docstring.

    As a provider it reserves nothing: it only names ``vm_stats`` among the
    tables whose rows go with a destroyed VM, and forgets the VM's memory on
    release.
    """

    name = "stats"
    vm_tables = (VM_STATS,)

    def __init__(self, ctx: Context, clock: Callable[[], float] = time.time) -> None:
        """Raises ConfigError: ``stats_keep`` below 2 (rates need two samples) or a
        ``stats_timeout_s`` that is not positive."""
        cfg = ctx.config
        if cfg.stats_keep < 2:
            raise ConfigError(f"stats_keep = {cfg.stats_keep}: keep at least 2 samples per VM "
                              f"(rates are computed between two)")
        if cfg.stats_timeout_s <= 0:
            raise ConfigError(f"stats_timeout_s = {cfg.stats_timeout_s:g}: give a time in "
                              f"seconds above 0")
        self.ctx = ctx
        self._clock = clock
        self.latest: dict[str, Latest] = {}  # by VM uuid
        self._counts: dict[str, int] = {}  # rows in vm_stats by VM uuid, where known
        self.rounds = 0  # rounds completed (tests wait on it)
        self._asking: dict[str, asyncio.Future[Any]] = {}  # host -> its node.stats call
        self._round_done = asyncio.Event()

    # ------------------------------------------------------------- provider
    def reserve(self, placement: Placement) -> None:
        """Nothing to reserve: samples come once the VM runs."""

    def release(self, vm: VmRec) -> None:
        self.latest.pop(vm.uuid, None)
        self._counts.pop(vm.uuid, None)

    # ------------------------------------------------------------ sampling
    async def run(self) -> None:
        """Take a round every ``stats_interval_s`` until cancelled (0: never).

        A round that takes longer than the interval delays the next instead
        of overlapping it; the ticks it missed are skipped.
        """
        interval = self.ctx.config.stats_interval_s
        if interval <= 0:
            log.info("accounting is off (stats_interval_s = %g)", interval)
            return
        loop = asyncio.get_running_loop()
        due = loop.time() + interval
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            due = max(due + interval, loop.time())
            try:
                await self.collect()
            except Exception:
                log.exception("accounting round failed; the next one runs in %g s", interval)

    async def collect(self) -> int:
        """One round: ask every connected host, store the samples; returns how many.

        Raises:
            Unavailable: the database could not take the round's samples.
        """
        hosts = [name for name in self.ctx.reg.hosts if self.ctx.nodes.connected(name)]
        replies = await asyncio.gather(*(self._ask(host) for host in hosts))
        batch: list[tuple[str, StatsSample]] = []
        for host, reply in zip(hosts, replies, strict=True):
            if reply is None:
                continue
            when, domains = reply
            for msg in domains:
                vm = self.ctx.reg.vms.get(msg.uuid)
                # Only the VM's own host speaks for it: the far side of a live
                # migration holds a copy too.
                if vm is not None and vm.host == host:
                    batch.append((vm.uuid, sample_of(msg, when)))
        if batch:
            known = {uuid: self._counts[uuid] for uuid, _ in batch if uuid in self._counts}
            stored = await self.ctx.db.run(self._store(batch, known, self.ctx.config.stats_keep))
            self._remember(batch, stored)
        self.rounds += 1
        self._round_done.set()
        self._round_done = asyncio.Event()
        log.debug("accounting round: %d samples from %d hosts", len(batch), len(hosts))
        return len(batch)

    async def wait_rounds(self, n: int, timeout: float) -> None:
        """Wait until ``n`` rounds have completed in all (for tests and tools).

        Raises:
            TimeoutError: not within ``timeout`` seconds.
        """
        async with asyncio.timeout(timeout):
            while self.rounds < n:
                await self._round_done.wait()

    async def _ask(self, host: str) -> tuple[float, list[DomainStatsMsg]] | None:
        """The host's counters and when they came; None if it failed or took too long.

        The round waits ``stats_timeout_s`` for the answer, but the call runs
        on (under the node call timeout) and the host is not asked again
        until it has answered: a wedged hypervisor gets one call, not one
        per round piling up behind it.
        """
        call = self._asking.get(host)
        if call is not None:
            log.warning("no resource counters from %s this round: it has not answered the "
                        "last round's yet", host)
            return None
        call = asyncio.ensure_future(self.ctx.nodes.call(host, "node.stats", Empty()))
        self._asking[host] = call
        call.add_done_callback(lambda done: self._answered(host, done))
        finished, _ = await asyncio.wait({call}, timeout=self.ctx.config.stats_timeout_s)
        if not finished:
            log.warning("no resource counters from %s this round: no answer within %g s",
                        host, self.ctx.config.stats_timeout_s)
            return None
        try:
            reply: StatsReply = call.result()
        except UsherError as exc:
            log.warning("no resource counters from %s this round: %s", host, exc.message)
            return None
        return self._clock(), reply.domains

    def _answered(self, host: str, call: asyncio.Future[Any]) -> None:
        if self._asking.get(host) is call:
            del self._asking[host]
        if not call.cancelled():
            call.exception()  # retrieved here; a late failure is logged by _ask or dropped

    @staticmethod
    def _store(batch: list[tuple[str, StatsSample]], known: dict[str, int],
               keep: int) -> Callable[[Session], _Stored]:
        """The round's transaction: insert, then drop what exceeds ``keep`` per VM.

        Pure in its inputs (``known`` is a copy), so the group commit may run
        it again after a failed batch.
        """
        def job(session: Session) -> _Stored:
            uuids = list(dict.fromkeys(uuid for uuid, _ in batch))
            # A VM destroyed while its host answered is gone from SQL: its
            # sample must not outlive it.
            live = {u for chunk in _chunks(uuids) for u in session.scalars(
                select(_VMS.c.uuid).where(_VMS.c.uuid.in_(chunk)))}
            rows = [(u, s) for u, s in batch if u in live]
            counts = {u: known[u] for u in live if u in known}
            unknown = [u for u in uuids if u in live and u not in known]
            previous: dict[str, StatsSample] = {}
            for chunk in _chunks(unknown):
                counts.update({u: 0 for u in chunk})
                counts.update({u: n for u, n in session.execute(
                    select(VM_STATS.c.vm_uuid, func.count()).where(
                        VM_STATS.c.vm_uuid.in_(chunk)).group_by(VM_STATS.c.vm_uuid))})
            for u in unknown:
                if counts[u]:
                    newest = session.execute(_newest(u, 1)).first()
                    if newest is not None:
                        previous[u] = _sample_from_row(newest)
            if rows:
                session.execute(insert(VM_STATS), [_row(u, s) for u, s in rows])
            prune = []
            for u, _ in rows:
                counts[u] += 1
                if counts[u] > keep:
                    prune.append({"u": u, "n": counts[u] - keep})
                    counts[u] = keep
            if prune:
                session.execute(_PRUNE, prune)
            return _Stored(counts=counts, previous=previous)

        return job

    def _remember(self, batch: list[tuple[str, StatsSample]], stored: _Stored) -> None:
        for uuid, sample in batch:
            if uuid not in self.ctx.reg.vms or uuid not in stored.counts:
                continue  # destroyed meanwhile
            self._counts[uuid] = stored.counts[uuid]
            before = self.latest.get(uuid)
            prev = before.sample if before is not None else stored.previous.get(uuid)
            rates = rates_between(prev, sample) if prev is not None else None
            self.latest[uuid] = Latest(sample=sample, rates=rates)

    # -------------------------------------------------------------- reading
    def annotate(self, info: VmInfo) -> None:
        """Give ``info`` (``list -l``) the VM's CPU % and memory in use, if fresh.

        Only for a running or paused VM whose newest sample is recent: a
        stopped VM uses nothing, and a VM whose host went quiet has no
        current figures.
        """
        latest = self.latest.get(info.uuid)
        if latest is None or info.state not in ("running", "paused"):
            return
        interval = self.ctx.config.stats_interval_s
        if self._clock() - latest.sample.time > FRESH_INTERVALS * interval:
            return
        info.mem_kib = memory_in_use(latest.sample)
        if latest.rates is not None:
            info.cpu_pct = round(latest.rates.cpu_pct, 1)

    async def query(self, vms: Sequence[VmInfo], samples: int | None) -> list[VmStats]:
        """``vm.stats``: the newest ``samples`` samples of each of ``vms`` with their rates.

        ``samples`` None: :data:`DEFAULT_STATS_SAMPLES`, or ``stats_keep`` if fewer.

        ``rates`` is over the VM's last interval (the newest two samples, as
        ``list -l`` shows it), ``average`` over the samples returned. With
        many VMs each gets fewer samples (at least two) so that the reply
        holds at most :data:`MAX_REPLY_SAMPLES`.

        Raises:
            InvalidOption: ``samples`` is not between 1 and ``stats_keep``.
        """
        keep = self.ctx.config.stats_keep
        if samples is None:
            samples = max(1, min(DEFAULT_STATS_SAMPLES, keep))
        if not 1 <= samples <= keep:
            raise InvalidOption(f"--samples takes 1 to {keep} (the samples kept per VM), "
                                f"not {samples}")
        per_vm = min(samples, max(2, MAX_REPLY_SAMPLES // max(1, len(vms))))
        uuids = [vm.uuid for vm in vms]

        def read(session: Session) -> dict[str, list[StatsSample]]:
            return {u: [_sample_from_row(r) for r in reversed(
                session.execute(_newest(u, per_vm)).all())] for u in uuids}

        found = await self.ctx.db.run(read) if uuids else {}
        out = []
        for vm in vms:
            series = found.get(vm.uuid, [])
            latest = self.latest.get(vm.uuid)
            rates = latest.rates if latest is not None else None
            if rates is None and len(series) >= 2:
                rates = rates_between(series[-2], series[-1])
            out.append(VmStats(name=vm.name, uuid=vm.uuid, state=vm.state, host=vm.host,
                               samples=series, rates=rates, average=rates_over(series)))
        return out
