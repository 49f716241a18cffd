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
once, one update per zone, so a burst of starts costs a few messages, once
the transactions that dirtied them have committed; it deletes the outbox rows
it has covered.

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
        self._dirty: set[str] = set()
        self._inflight: set[str] = set()
        self._foreign: set[str] = set()  # names that hold records usher does not own
        self._waiters: list[tuple[frozenset[str], asyncio.Future[None]]] = []
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
        self._add(vm)

    def rows(self, vm: VmRec) -> list[tuple[Table, Row]]:
        return self._outbox_rows(vm)

    def removal_rows(self, vm: VmRec) -> list[tuple[Table, Row]]:
        return self._outbox_rows(vm)

    def release(self, vm: VmRec) -> None:
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

    def _add(self, vm: VmRec) -> None:
        if vm.ip is None or vm.uuid in self._by_vm:
            return
        records = vm_records(vm.name, vm.ip, rr_name=vm.cluster if vm.rr else None)
        for rec in records:
            if self.zones.zone_of(rec.name) is None:
                raise DnsError(f"no DNS zone holds {rec.name}: add its zone to dns_zones in "
                               f"the controller config (or restart the controller after "
                               f"adding an IP range)")
        self._by_vm[vm.uuid] = records
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
        self._dirty.add(name)
        self._wake.set()

    # ------------------------------------------------------------ status
    def state_of(self, vm: VmRec) -> str:
        """``""`` (no records), ``"pending"`` (not on the server yet) or ``"ok"``."""
        records = self._by_vm.get(vm.uuid)
        if not records:
            return ""
        for rec in records:
            if rec.name in self._dirty or rec.name in self._inflight or \
                    rec.name in self._foreign:
                return "pending"
        return "ok" if self._synced_once else "pending"

    def pending(self) -> int:
        """How many names wait to be written."""
        return len(self._dirty | self._inflight)

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
        # Membership per name: in a burst the dirty and in-flight sets hold
        # hundreds of names, and a union of them per start cost O(burst).
        busy = any(n in self._dirty or n in self._inflight for n in names)
        if not names or not busy and self._synced_once:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (names, fut)
        self._waiters.append(entry)
        try:
            # The future is this call's own (the writer skips done ones), so
            # a timeout may cancel it: no wait_for task, no shield, per start.
            async with asyncio.timeout(self.config.dns_timeout_s + self.config.outbox_retry_s):
                await fut
        except TimeoutError:
            raise DnsUnavailable(f"the DNS records of {vm.name} were not written within "
                                 f"{self.config.dns_timeout_s:g} s") from None
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)

    def _notify(self, error: str | None) -> None:
        busy = self._dirty | self._inflight
        keep = []
        for names, fut in self._waiters:
            if fut.done():
                continue
            if self._synced_once and not (names & busy):
                fut.set_result(None)
            elif error is not None:
                fut.set_exception(DnsUnavailable(f"DNS records could not be written: {error}"))
            else:
                keep.append((names, fut))
        self._waiters = keep

    # ------------------------------------------------------------ writer
    async def run(self) -> None:
        """The writer loop: converge, then write dirty names as they come; never returns."""
        failures = 0
        converge_at = 0.0  # at once
        while True:
            try:
                if time.monotonic() >= converge_at:
                    await self.converge()
                    converge_at = time.monotonic() + self.config.dns_converge_interval_s
                elif self._dirty:
                    await self._after_commits()
                    await self._write_dirty()
                elif self._clean_due():
                    # Idle: nothing is dirty, so every row written so far is covered.
                    await self._clean(self._start_clean())
                if self.down is not None:
                    log.info("DNS is written again")
                self.down, failures = None, 0
                self._notify(None)
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

    async def _after_commits(self) -> None:
        """Wait until the transactions queued so far (the VM rows and outbox rows
        behind the dirty names) have committed.

        Records then go out only for VMs that exist in SQL, as the outbox
        pattern has it, and the write leaves the database thread the CPU while
        it journals the start: on a busy controller, building and signing
        updates beside the journal write delayed every start by the update's
        cost (the VM's boot, which follows the commit, covers the write instead).
        A job queued now lands in the transaction of those before it (the
        thread group-commits), so this costs no transaction of its own.
        """
        try:
            await self._db.submit(_nothing)
        except Exception:  # the write matters more than its place in line
            log.exception("waiting for the database before a DNS write failed")
        # The commit also released the starts' tasks: let them send their
        # node calls before the updates are built (half a millisecond of
        # CPU for an RFC 2136 round), so the boot is not queued behind it.
        await asyncio.sleep(0)

    async def _write_dirty(self) -> None:
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
        await self._clean(covered)

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
        names, self._dirty = self._dirty, set()
        self._inflight = names
        desired: set[Record] = set()
        wanted: dict[str, set[Record]] = {}
        for name in self._want:
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
        await self._clean(covered)

    async def _timed(self, coro: Any, factor: float = 1) -> Any:
        try:
            return await asyncio.wait_for(coro, self.config.dns_timeout_s * factor)
        except TimeoutError:
            raise DnsUnavailable(f"the DNS server did not finish within "
                                 f"{self.config.dns_timeout_s * factor:g} s") from None

    def _clean_due(self) -> bool:
        return self._rows_made > self._rows_cleaned and time.monotonic() >= self._next_clean

    def _start_clean(self) -> tuple[asyncio.Future[int | None], int]:
        """Queue the outbox high-water read; call it before taking the dirty names."""
        covered = self._db.submit(_max_outbox_id)
        covered.add_done_callback(_log_failure)
        return covered, self._rows_made

    async def _clean(self, started: tuple[asyncio.Future[int | None], int] | None) -> None:
        """After a successful write: delete the outbox rows it covered, in the background."""
        if started is None:
            return
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
    # Queued before the dirty names are taken (the DB thread runs jobs in
    # order): a row this read sees was queued after its names were marked,
    # so they are in the names taken, and this write covers the row.
    value = session.execute(select(func.max(_OUTBOX.c.id))
                            .where(_OUTBOX.c.kind == OUTBOX_KIND)).scalar()
    return int(value) if value is not None else None


def _nothing(session: Session) -> None:
    """A job that only marks its place in the database thread's queue."""


def _log_failure(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("DNS outbox clean-up failed: %s", fut.exception())
