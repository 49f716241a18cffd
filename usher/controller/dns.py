"""The dns provider: forward, reverse and round-robin records for every VM.

Each VM with an address has an A (or AAAA) record at its FQDN and a PTR
record at its reverse name; a VM started with ``--rr`` also has an A record
at its cluster's FQDN, the round-robin name all members share. What usher
wants published is derived from the VMs themselves (their name, address and
``rr`` flag are in SQL), so the database is the one source of truth.

:class:`DnsProvider` takes part in the task like the other providers:
``reserve`` (on the event loop, no ``await``) checks the naming rules (a VM
may not take a cluster's round-robin name, and ``--rr`` may not claim a name
a VM holds), computes the VM's records and marks their names dirty; an
outbox row naming them is written in the same transaction as the VM's row
(and another with its removal), as DESIGN section 5 asks for writes to other
systems. The writer loop (:meth:`DnsProvider.run`) sends every dirty name at
once, one update per zone, so a burst of starts costs a few messages; a name
goes out only once the transactions of the VMs that dirtied it have committed
(``commit``), so records never show a VM that SQL does not have. It deletes
the outbox rows it has covered, in the background.

Should the server not answer, the names stay dirty and the writer retries
with growing delays. With ``dns_down = "refuse"`` a start then fails (before
the VM is booted, with everything released); with ``"queue"`` the VM starts
and ``list`` shows its DNS as ``pending`` until the server is back.

Records are compared with what the server holds (:meth:`DnsBackend.converge`)
at start-up, after the server was unreachable, and every
``dns_converge_interval_s``: missing records are added and stale usher-owned
ones removed; a name that holds records usher does not own (no owner marker)
is never touched and is logged as a conflict.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterable
from typing import Any

from sqlalchemy import Table, delete, func, select
from sqlalchemy.orm import Session

from usher.config import ControllerConfig
from usher.controller.db import Database
from usher.controller.models import Outbox
from usher.controller.providers import Placement, Provider, Row
from usher.controller.state import Registry, VmRec
from usher.dns import ChangeSet, DnsBackend, Record, Zones, vm_records, with_markers
from usher.errors import (
    Conflict,
    DnsError,
    DnsUnavailable,
    InvalidOption,
    NoCapacity,
    UsherError,
)

log = logging.getLogger(__name__)

OUTBOX_KIND = "dns"
MAX_RETRY_S = 30.0
OUTBOX_CLEAN_S = 1.0
"""Covered outbox rows are deleted at most this often (two DB jobs per write
round would cost a busy controller more than the rows)."""
_OUTBOX: Table = Outbox.__table__  # type: ignore[assignment]


class DnsProvider(Provider):
    """Keeps each VM's DNS records; see the module docstring."""

    name = "dns"

    def __init__(self, config: ControllerConfig, zones: Zones, backend: DnsBackend,
                 reg: Registry, db: Database) -> None:
        self.config = config
        self.zones = zones
        self.backend = backend
        self.site_id = config.site_domain
        self._reg = reg
        self._db = db
        self._by_vm: dict[str, list[Record]] = {}  # uuid -> its records
        self._want: dict[str, set[Record]] = {}  # name -> records wanted there
        self._rr_members: dict[str, set[str]] = {}  # round-robin FQDN -> member uuids
        self._applied: dict[str, set[Record]] = {}  # name -> what the server holds (ours)
        self._dirty: set[str] = set()  # names to write
        self._held: set[str] = set()  # names to write once their VMs are committed
        self._inflight: set[str] = set()
        # Names of reserved VMs whose transaction has not committed yet (with
        # how many such VMs each), and those VMs: written only once committed.
        self._unready: dict[str, int] = {}
        self._uncommitted: set[str] = set()
        self._foreign: set[str] = set()  # names that hold records usher does not own
        # Starts waiting for their records (dns_down = "refuse"), by name: a
        # write looks only at the waiters of the names it wrote.
        self._waiters: dict[str, set[_Waiter]] = {}
        self._wake = asyncio.Event()
        self.down: str | None = None  # why the last write failed, while it keeps failing
        self._synced_once = False
        # Outbox rows handed out, and how many of them are known deleted. It
        # starts at one so that the first write round deletes what a previous
        # run left. (A row handed out just before a high-water read but
        # queued after it waits for the next clean; it only costs a replay.)
        self._rows_made = 1
        self._rows_cleaned = 0
        self._next_clean = 0.0

    # ------------------------------------------------------------ loading
    def load(self, vms: Iterable[VmRec]) -> None:
        """Take the records of the VMs known at start-up (all names are checked later)."""
        for vm in vms:
            try:
                self._add(vm)
            except UsherError as exc:
                log.warning("no DNS records for %s: %s", vm.name, exc.message)

    # ------------------------------------------------------------ provider
    def reserve(self, placement: Placement) -> None:
        vm = placement.vm
        members = self._rr_members.get(vm.name)
        if members:
            raise Conflict(f"{vm.name} is the round-robin name of its cluster "
                           f"({len(members)} member(s)); choose another name")
        if placement.rr:
            members = self._rr_members.get(vm.cluster, set())
            if len(members) >= self.config.dns_rr_max_members:
                raise NoCapacity(f"the round-robin name {vm.cluster} has {len(members)} "
                                 f"members, the most allowed (dns_rr_max_members); start "
                                 f"without --rr or destroy a member",
                                 details={"short": "rr_members"})
            if vm.cluster in self._reg.by_name:
                raise Conflict(f"VM {vm.cluster} holds that name: it cannot also be the "
                               f"round-robin name of cluster {vm.cluster}; destroy it or "
                               f"start without --rr")
            if vm.ip is None:
                raise InvalidOption("--rr needs an address and the VM gets none: the site has "
                                    "no default IP range; name one with --ip_range")
        if vm.ip is None:
            return
        if self.down is not None and self.config.dns_down == "refuse":
            raise DnsUnavailable(f"DNS is not being written ({self.down}); starts are refused "
                                 f"until it is back (dns_down = refuse)")
        self._add(vm, committed=False)

    def commit(self, vm: VmRec) -> None:
        """The VM's row is in SQL: its names may be written."""
        if self._settle_uncommitted(vm):
            self._wake.set()

    def _settle_uncommitted(self, vm: VmRec) -> bool:
        """Count ``vm`` as committed (or gone); True if it had not been."""
        if vm.uuid not in self._uncommitted:
            return False
        self._uncommitted.discard(vm.uuid)
        for name in {r.name for r in self._by_vm.get(vm.uuid, ())}:
            left = self._unready.get(name, 0) - 1
            if left > 0:
                self._unready[name] = left
                continue
            self._unready.pop(name, None)
            if name in self._held:
                self._held.discard(name)
                self._dirty.add(name)
        return True

    def rows(self, vm: VmRec) -> list[tuple[Table, Row]]:
        return self._outbox_rows(vm)

    def removal_rows(self, vm: VmRec) -> list[tuple[Table, Row]]:
        return self._outbox_rows(vm)

    def release(self, vm: VmRec) -> None:
        self._settle_uncommitted(vm)  # a start undone before its commit
        records = self._by_vm.pop(vm.uuid, None)
        if records is None:
            return
        for rec in records:
            want = self._want.get(rec.name)
            if want is not None:
                want.discard(rec)
                if not want:
                    del self._want[rec.name]
            self._mark(rec.name)
        if vm.rr:
            members = self._rr_members.get(vm.cluster)
            if members is not None:
                members.discard(vm.uuid)
                if not members:
                    del self._rr_members[vm.cluster]

    def _add(self, vm: VmRec, *, committed: bool = True) -> None:
        if vm.ip is None or vm.uuid in self._by_vm:
            return
        records = vm_records(vm.name, vm.ip, rr_name=vm.cluster if vm.rr else None)
        for rec in records:
            if self.zones.zone_of(rec.name) is None:
                raise DnsError(f"no DNS zone holds {rec.name}: add its zone to dns_zones in "
                               f"the controller config (or restart the controller after "
                               f"adding an IP range)")
        self._by_vm[vm.uuid] = records
        if not committed:
            self._uncommitted.add(vm.uuid)
            for name in {r.name for r in records}:
                self._unready[name] = self._unready.get(name, 0) + 1
        for rec in records:
            self._want.setdefault(rec.name, set()).add(rec)
            self._mark(rec.name)
        if vm.rr:
            self._rr_members.setdefault(vm.cluster, set()).add(vm.uuid)

    def _outbox_rows(self, vm: VmRec) -> list[tuple[Table, Row]]:
        records = self._by_vm.get(vm.uuid)
        if not records:
            return []
        now = time.time()
        self._rows_made += 1
        names = sorted({r.name for r in records})
        return [(_OUTBOX, dict(kind=OUTBOX_KIND, payload=json.dumps(names).encode(),
                               created=now, attempts=0, next_try=now, done=False,
                               last_error=""))]

    def _mark(self, name: str) -> None:
        if name in self._unready:
            self._held.add(name)
            self._dirty.discard(name)
        else:
            self._dirty.add(name)
            self._wake.set()

    def _busy(self, name: str) -> bool:
        return name in self._dirty or name in self._held or name in self._inflight

    # ------------------------------------------------------------ status
    def state_of(self, vm: VmRec) -> str:
        """``""`` (no records), ``"pending"`` (not on the server yet) or ``"ok"``."""
        records = self._by_vm.get(vm.uuid)
        if not records:
            return ""
        for rec in records:
            if self._busy(rec.name) or rec.name in self._foreign:
                return "pending"
        return "ok" if self._synced_once else "pending"

    def pending(self) -> int:
        """How many names wait to be written."""
        return len(self._dirty | self._held | self._inflight)

    async def records_written(self, vm: VmRec) -> None:
        """With ``dns_down = "refuse"``: wait until ``vm``'s records are on the server.

        With ``"queue"``, return at once (the records follow when they can).

        Raises:
            DnsUnavailable: the write failed or did not finish within
                ``dns_timeout_s`` (plus one retry delay).
        """
        if self.config.dns_down != "refuse":
            return
        names = frozenset(r.name for r in self._by_vm.get(vm.uuid, ()))
        # Membership per name: in a burst the dirty and held sets hold
        # hundreds of names, and a union of them per start cost O(burst).
        if not names or self._synced_once and not any(self._busy(n) for n in names):
            return
        waiter = _Waiter(names, asyncio.get_running_loop().create_future())
        for name in names:
            self._waiters.setdefault(name, set()).add(waiter)
        try:
            # The future is this call's own (the writer skips done ones), so
            # a timeout may cancel it: no wait_for task, no shield, per start.
            async with asyncio.timeout(self.config.dns_timeout_s + self.config.outbox_retry_s):
                await waiter.fut
        except TimeoutError:
            raise DnsUnavailable(f"the DNS records of {vm.name} were not written within "
                                 f"{self.config.dns_timeout_s:g} s") from None
        finally:
            self._forget_waiter(waiter)

    def _forget_waiter(self, waiter: _Waiter) -> None:
        for name in waiter.names:
            waiting = self._waiters.get(name)
            if waiting is not None:
                waiting.discard(waiter)
                if not waiting:
                    del self._waiters[name]

    def _notify(self, error: str | None, written: Iterable[str] | None = None) -> None:
        """Wake the starts whose records are all on the server now (those waiting
        for ``written``, or every one), or fail them all with ``error``."""
        if written is None or error is not None:
            candidates = {w for waiting in self._waiters.values() for w in waiting}
        else:
            candidates = {w for n in written for w in self._waiters.get(n, ())}
        for waiter in candidates:
            if waiter.fut.done():
                self._forget_waiter(waiter)
            elif error is not None:
                waiter.fut.set_exception(
                    DnsUnavailable(f"DNS records could not be written: {error}"))
                self._forget_waiter(waiter)
            elif self._synced_once and not any(self._busy(n) for n in waiter.names):
                waiter.fut.set_result(None)
                self._forget_waiter(waiter)

    # ------------------------------------------------------------ writer
    async def run(self) -> None:
        """The writer loop: converge, then write dirty names as they come; never returns."""
        failures = 0
        converge_at = 0.0  # at once
        while True:
            try:
                written: set[str] | None = set()  # None: every name may have changed
                if time.monotonic() >= converge_at:
                    await self.converge()
                    converge_at = time.monotonic() + self.config.dns_converge_interval_s
                    written = None
                elif self._dirty:
                    written = await self._write_dirty()
                elif self._clean_due():
                    # Idle: nothing ready is dirty, so every row written so far is covered.
                    self._clean_in_background(self._start_clean())
                if self.down is not None:
                    log.info("DNS is written again")
                    written = None
                self.down, failures = None, 0
                self._notify(None, written)
            except UsherError as exc:
                failures += 1
                self.down = exc.message
                self._notify(exc.message)
                converge_at = 0.0  # the server may have lost records: compare when back
                delay = min(MAX_RETRY_S, self.config.outbox_retry_s * 2 ** (failures - 1))
                log.warning("DNS write failed (%d pending names), retrying in %.1f s: %s",
                            self.pending(), delay, exc.message)
                await asyncio.sleep(delay)
                continue
            except Exception:
                log.exception("DNS writer failed; retrying")
                await asyncio.sleep(MAX_RETRY_S)
                continue
            if not self._dirty:
                self._wake.clear()
                wake_at = converge_at
                if self._rows_made > self._rows_cleaned:
                    wake_at = min(wake_at, self._next_clean)
                timeout = max(0.0, wake_at - time.monotonic())
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout)
                except TimeoutError:
                    pass

    async def _write_dirty(self) -> set[str]:
        """Write the dirty names (those whose VMs are committed); the names written."""
        covered = self._start_clean() if self._clean_due() else None
        names, self._dirty = self._dirty, set()
        names -= self._foreign
        self._inflight = names
        changes = ChangeSet()
        wanted: dict[str, set[Record]] = {}
        for name in names:
            want = self._wanted_at(name)
            have = self._applied.get(name, set())
            changes.adds |= want - have
            changes.deletes |= have - want
            wanted[name] = want
        try:
            if changes:
                await self._timed(self.backend.apply(changes))
        except BaseException:
            self._dirty |= names
            raise
        finally:
            self._inflight = set()
        for name, want in wanted.items():
            if want:
                self._applied[name] = want
            else:
                self._applied.pop(name, None)
        if covered is not None:
            self._clean_in_background(covered)
        return names

    def _wanted_at(self, name: str) -> set[Record]:
        want = self._want.get(name)
        if not want:
            return set()
        # The records' names are canonical: with_markers adds the marker
        # without parsing the name again (owner_marker would, per write).
        return with_markers(want, self.site_id)

    async def converge(self) -> None:
        """Bring the server in line with what usher wants (see the module docstring).

        Raises:
            DnsUnavailable, DnsError: as :meth:`DnsBackend.converge`.
        """
        covered = self._start_clean() if self._clean_due() else None
        names, self._dirty = self._dirty, set()  # held names wait for their commits
        self._inflight = names
        desired: set[Record] = set()
        wanted: dict[str, set[Record]] = {}
        for name in self._want:
            if name in self._unready:
                # A VM of it is not in SQL yet: leave the name as last written
                # (a round-robin name keeps its other members) until it is.
                applied = self._applied.get(name)
                if applied:
                    wanted[name] = set(applied)
                    desired |= applied
                continue
            wanted[name] = self._wanted_at(name)
            desired |= wanted[name]
        try:
            report = await self._timed(self.backend.converge(desired, self.site_id),
                                       factor=4)
        except BaseException:
            self._dirty |= names
            raise
        finally:
            self._inflight = set()
        self._foreign = set(report.conflicts)
        self._applied = {n: w for n, w in wanted.items() if n not in self._foreign}
        # Names dirtied while the transfer ran are written next, against this state.
        self._synced_once = True
        for name in report.conflicts:
            log.warning("DNS name %s holds records usher does not own; left alone", name)
        if report.changed:
            log.info("DNS converged: %d records added, %d removed", report.added,
                     report.removed)
        if covered is not None:
            self._clean_in_background(covered)

    async def _timed(self, coro: Any, factor: float = 1) -> Any:
        try:
            return await asyncio.wait_for(coro, self.config.dns_timeout_s * factor)
        except TimeoutError:
            raise DnsUnavailable(f"the DNS server did not finish within "
                                 f"{self.config.dns_timeout_s * factor:g} s") from None

    def _clean_due(self) -> bool:
        # Not while a VM waits for its commit: its outbox row may be in SQL
        # (seen by the high-water read) before its names can be taken.
        return (self._rows_made > self._rows_cleaned and not self._uncommitted
                and time.monotonic() >= self._next_clean)

    def _start_clean(self) -> tuple[asyncio.Future[int | None], int]:
        """Queue the outbox high-water read; call it before taking the dirty names."""
        covered = self._db.submit(_max_outbox_id)
        covered.add_done_callback(_log_failure)
        return covered, self._rows_made

    def _clean_in_background(self, started: tuple[asyncio.Future[int | None], int]) -> None:
        """Delete the outbox rows a write covered without waiting for it: the
        read may wait behind the starts' own transactions, and the next write
        must not."""
        self._next_clean = time.monotonic() + OUTBOX_CLEAN_S  # one at a time
        cleaning = asyncio.ensure_future(self._clean(started))
        cleaning.add_done_callback(_log_failure)

    async def _clean(self, started: tuple[asyncio.Future[int | None], int]) -> None:
        """Delete the outbox rows up to what ``started``'s read found (see _max_outbox_id)."""
        covered, made = started
        high = await covered
        self._next_clean = time.monotonic() + OUTBOX_CLEAN_S
        self._rows_cleaned = max(self._rows_cleaned, made)
        if high is None:
            return

        def forget(session: Session) -> None:
            session.execute(delete(_OUTBOX).where(_OUTBOX.c.kind == OUTBOX_KIND,
                                                  _OUTBOX.c.id <= high))

        fut = asyncio.ensure_future(self._db.run(forget))
        fut.add_done_callback(_log_failure)


def _max_outbox_id(session: Session) -> int | None:
    # Queued before the dirty names are taken, when no VM waited for its
    # commit (the DB thread runs jobs in order): a row this read sees was
    # committed, and its names marked and ready, before they were taken, so
    # this write covers it.
    value = session.execute(select(func.max(_OUTBOX.c.id))
                            .where(_OUTBOX.c.kind == OUTBOX_KIND)).scalar()
    return int(value) if value is not None else None


class _Waiter:
    """A start waiting for its records: the names it needs and the future to set."""

    __slots__ = ("names", "fut")

    def __init__(self, names: frozenset[str], fut: asyncio.Future[None]) -> None:
        self.names = names
        self.fut = fut


def _log_failure(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("DNS outbox clean-up failed: %s", fut.exception())
