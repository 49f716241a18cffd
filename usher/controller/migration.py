"""Moving VMs between hosts: live by libvirt, a stopped VM's disk with it, or cold.

Part of the VM service (:class:`~usher.controller.service.VmService` runs the
``migrate`` task through :meth:`Migrations.run`), kept in a module of its own.

How a VM moves is policy (:func:`migration_kind`):

* **live**: a running or paused VM, when both hosts can migrate live and the
  target says where its libvirtd is reached (``migration_uri``). The target
  prepares (fetches the VM's boot artifacts into its image store and makes an
  empty overlay of the disk's size), the source's libvirtd migrates the VM to
  the target's peer to peer, copying the overlay's blocks, and the source
  deletes its copy; the target then takes the VM over (its DHCP entry).
* **disk**: a stopped VM with a disk between such hosts moves the same way,
  started paused on the source so it never runs, and is powered off on the
  target. Its overlay arrives block for block.
* **cold**: everything else without a disk: power off, define on the target,
  undefine on the source, boot again (``VmService._cold_migrate``). A VM with a
  disk that libvirt cannot move is refused when the request is validated: a
  cold move would leave its disk behind.

Hosts whose node managers name the same ``shared_store`` keep their image
stores on one shared filesystem (:func:`shares_store`): between them a disk
never moves. A running VM migrates live without copying it (the target only
checks that it sees the disk), and a stopped one, or any VM that libvirt
cannot move, moves cold, its disk left where it is.

The VM keeps its name, address and DNS records: none of them depends on its
host. When a step fails, the VM stays on the source in its state and the task
ends in error naming the step; the target is cleaned (``node.forget_vm``) only
once the source is known to still have the VM, so a VM that arrived after all
(an abort that came too late) is recorded on the target instead, never
destroyed. A re-run after a controller restart first waits for a transfer
that the source still runs (its inventory marks the VM ``migrating``), then
finds a VM that arrived meanwhile and only records it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from usher.controller.state import HostRec, TaskRec, VmRec
from usher.errors import (
    Conflict,
    HostUnavailable,
    HypervisorError,
    InvalidState,
    MigrationUnsupported,
    TimedOut,
    UsherError,
)
from usher.protocol.ops import (
    Accepted,
    ActionArgs,
    DiskSizeMsg,
    DomainMsg,
    Empty,
    ForgetArgs,
    IncomingArgs,
    Inventory,
    MigrationProgressMsg,
    NodeMigrateArgs,
    UuidArgs,
    VmOpArgs,
)

if TYPE_CHECKING:
    from usher.controller.auth import Identity
    from usher.controller.service import VmService

log = logging.getLogger(__name__)

LIVE, DISK, COLD = "live", "disk", "cold"

MARGIN_S = 30.0
"""Of a task's remaining time, what the transfer leaves for the rest: an abort
at the transfer's timeout to unwind (about a second; libvirt allows 15 s) and
the target to be cleaned. A quarter of the remaining time at most."""

LOOKUP_TIMEOUT_S = 10.0  # asking a host what it runs, or cleaning it after a failure
EARLIER_TRANSFER_POLL_S = 0.5  # how often a re-run asks whether the last run's transfer ended


def has_disk(vm: VmRec) -> bool:
    return vm.boot is not None and vm.boot.boot.disk is not None


def shares_store(source: HostRec, target: HostRec) -> bool:
    """Policy: both hosts keep their image stores on one shared filesystem.

    They name the same shared store and see the same store there (its id
    file): a host that names it but has not mounted it does not share it.
    """
    return (bool(source.shared_store) and source.shared_store == target.shared_store
            and bool(source.store_id) and source.store_id == target.store_id)


def migration_kind(state: str, disk: bool, source: HostRec, target: HostRec) -> str:
    """Policy: how a VM in ``state`` (with a ``disk`` or not) moves; see the module docstring.

    Raises:
        MigrationUnsupported: the VM has a disk that libvirt cannot move
            between these hosts (a cold move would leave it behind).
    """
    if (disk and source.store_id and source.store_id == target.store_id
            and not shares_store(source, target)):
        # Copying the disk would make the target's empty overlay over the VM's own.
        raise MigrationUnsupported(
            f"VMMs {source.name} and {target.name} have the same image store, but do not "
            f"both name it as their shared_store: set the same shared_store in both node "
            f"managers' configs (see docs/operations.md)",
            details={"source": source.name, "target": target.name})
    why_not = _why_no_libvirt_move(source, target)
    if why_not is None and state in ("running", "paused"):
        return LIVE
    if not disk or shares_store(source, target):
        return COLD
    if why_not is None and state == "stopped":
        return DISK
    raise MigrationUnsupported(
        f"cannot move the disk of a {state} VM from {source.name} to {target.name}: "
        f"{why_not or 'only a running, paused or stopped VM moves'}",
        details={"source": source.name, "target": target.name})


def target_rank(state: str, disk: bool, source: HostRec | None) -> Callable[[HostRec], int]:
    """Placement preference for moving a VM in ``state`` (with a ``disk`` or not)
    off ``source``: higher is better; 0 for a target the move would be refused for.

    A running VM prefers to stay running (live, with no copy where the store is
    shared) over a cold restart; a stopped VM with a disk prefers a shared store
    (nothing moves) over copying its disk.
    """
    running = state in ("running", "paused")

    def rank(target: HostRec) -> int:
        if source is None:
            return 0
        try:
            kind = migration_kind(state, disk, source, target)
        except MigrationUnsupported:
            return 0
        if kind == LIVE:
            return 3 if disk and shares_store(source, target) else 2
        if kind == DISK:
            return 1
        return 2 if disk and not running else 1  # cold: nothing moves, or a restart
    return rank


def _why_no_libvirt_move(source: HostRec, target: HostRec) -> str | None:
    for host in (source, target):
        if not host.live_migration:
            return f"VMM {host.name} cannot migrate live ({host.hypervisor})"
    if not target.migration_uri:
        return f"VMM {target.name} has no migration_uri (see docs/operations.md)"
    return None


def uses_tls(migration_uri: str) -> bool:
    """Policy: migration data is encrypted when libvirt's own link is TLS."""
    return urlsplit(migration_uri).scheme.endswith("+tls")


def _again(exc: UsherError, message: str) -> UsherError:
    """``exc`` with another message: its class (and so its code) and details stay."""
    return type(exc)(message, details=exc.details)


class Migrations:
    """The ``migrate`` task's moves, their progress and their abort."""

    def __init__(self, vms: VmService) -> None:
        self.vms = vms
        self.ctx = vms.ctx
        self.reg = vms.reg
        self._kinds: dict[str, str] = {}  # task id -> how its VM moves, while it runs
        self._transfers: dict[str, str] = {}  # task id -> source host, while libvirt moves
        self._aborts: set[str] = set()  # task ids whose caller asked to abort

    # ============================================================ validate
    def prefers(self, vm: VmRec) -> Callable[[HostRec], int]:
        """How the scheduler ranks targets for ``vm`` (see :func:`target_rank`)."""
        return target_rank(vm.state, has_disk(vm), self.reg.hosts.get(vm.host or ""))

    def check(self, vm: VmRec, target: str) -> None:
        """Refuse, when it is asked for, a move that would leave the VM's disk behind."""
        source_rec, target_rec = self.reg.hosts.get(vm.host or ""), self.reg.hosts.get(target)
        if source_rec is not None and target_rec is not None:
            migration_kind(vm.state, has_disk(vm), source_rec, target_rec)

    # =============================================================== run
    async def run(self, task: TaskRec, vm: VmRec) -> None:
        """Carry out a ``migrate`` task (on the VM service's task runner)."""
        source, target = self.reg.hosts.get(vm.host or ""), self.reg.hosts.get(task.target or "")
        if source is None or target is None:
            raise HostUnavailable(f"VMM {vm.host if source is None else task.target} is gone")
        was = task.step.removeprefix("was_")
        kind = migration_kind(was, has_disk(vm), source, target)
        self._kinds[task.id] = kind
        try:
            if kind == COLD:
                await self.vms._cold_migrate(task, vm)
            else:
                await self._by_libvirt(task, vm, source, target, stopped=kind == DISK)
        finally:
            self._kinds.pop(task.id, None)
            self._aborts.discard(task.id)

    async def _by_libvirt(self, task: TaskRec, vm: VmRec, source: HostRec, target: HostRec,
                          *, stopped: bool) -> None:
        src, dst = source.name, target.name
        nodes = self.ctx.nodes
        what = f"{'cold' if stopped else 'live'} migration {src} -> {dst}"
        started = time.monotonic()
        spec = self.vms._spec(vm, task)
        disk = spec.boot is not None and spec.boot.disk is not None
        shared = disk and shares_store(source, target)  # then the disk stays where it is
        try:
            await self._await_earlier_transfer(task, vm, src, what)
            arrived = await self._arrived(vm, src, dst)
        except UsherError as exc:
            raise _again(exc, f"{what} failed while asking {dst} what it runs: "
                              f"{exc.message}") from exc
        if not arrived:
            step = f"while preparing {dst}"
            try:
                size = 0
                if disk and not shared:
                    reply: DiskSizeMsg = await nodes.call(src, "node.disk_size",
                                                          UuidArgs(uuid=vm.uuid))
                    size = reply.bytes
                self.vms._progress(task, f"{what}: preparing {dst}")
                await nodes.call(dst, "node.prepare_incoming",
                                 IncomingArgs(spec=spec, disk_bytes=size, shared=shared),
                                 timeout=max(1.0, task.deadline - time.time()))
                step = ""
                if task.id in self._aborts:
                    raise HypervisorError("aborted before the transfer started",
                                          details={"aborted": True})
                remaining = task.deadline - time.time()
                margin = min(MARGIN_S, remaining / 4)
                args = NodeMigrateArgs(uuid=vm.uuid, target_uri=target.migration_uri,
                                       migrate_uri=target.migration_address or None,
                                       tls=uses_tls(target.migration_uri),
                                       copy_storage=disk and not shared, keep_disk=shared,
                                       stopped=stopped, timeout_s=max(1.0, remaining - margin))
                doing = "moving its disk" if stopped else "connecting"
                self.vms._progress(task, f"{what}: {doing}")
                self._transfers[task.id] = src
                try:
                    await nodes.call(src, "node.migrate", args,
                                     timeout=max(1.0, remaining - margin / 2))
                finally:
                    self._transfers.pop(task.id, None)
            except UsherError as exc:
                if not await self._settle_failure(vm, src, dst, keep_disk=shared):
                    raise _again(exc, f"{what} failed{' ' + step if step else ''}: "
                                      f"{exc.message}") from exc
                log.warning("%s of %s failed (%s), but the VM arrived", what, vm.name,
                            exc.message)
                arrived = True
        if arrived:
            # The source's copy of the disk and its console log are stale now
            # (on a shared store they are the target's, and stay).
            await self._forget(src, vm, keep_disk=shared)
        # From here on the VM is the target's, whatever else happens.
        self.reg.unhold(dst, vm)
        self.reg.move_vm(vm, dst)
        task.host = dst
        self.vms._progress(task, f"{what}: taking it over on {dst}")
        try:
            if stopped:
                await nodes.call(dst, "node.action", ActionArgs(uuid=vm.uuid, action="power_off"))
            dom: DomainMsg = await nodes.call(dst, "node.finish_incoming", UuidArgs(uuid=vm.uuid))
        except UsherError as exc:
            raise _again(exc, f"{what}: the VM is on {dst} now, but taking it over there "
                              f"failed: {exc.message}") from exc
        task.message = f"{what} ({time.monotonic() - started:.1f} s)" + (
            ", its disk with it" if stopped and disk else "") + (
            f", its disk on shared store {source.shared_store}" if shared else "")
        await self.vms._succeed(task, vm, dom.state)

    async def _await_earlier_transfer(self, task: TaskRec, vm: VmRec, src: str,
                                      what: str) -> None:
        """Wait while the source still runs a transfer of the VM that an earlier run
        of the task started (a controller restart came in between), at most
        until the task's deadline: it ends with the VM on one host or the other."""
        first = True
        while True:
            inv: Inventory = await self.ctx.nodes.call(src, "node.inventory", Empty(),
                                                       timeout=LOOKUP_TIMEOUT_S)
            if not any(d.uuid == vm.uuid and d.migrating for d in inv.domains):
                return
            if time.time() >= task.deadline:
                raise TimedOut(f"{src} still migrates {vm.name} (a transfer started before a "
                               f"controller restart)", details={"uuid": vm.uuid})
            if first:
                log.info("%s: %s still migrates %s (since before a controller restart); "
                         "waiting for it", what, src, vm.name)
                self.vms._progress(task, f"{what}: waiting for the transfer started before "
                                         f"the controller restarted")
                first = False
            await asyncio.sleep(EARLIER_TRANSFER_POLL_S)

    async def _domains(self, host: str) -> set[str] | None:
        """UUIDs of the domains on ``host``; None when it cannot be asked."""
        try:
            inv: Inventory = await self.ctx.nodes.call(host, "node.inventory", Empty(),
                                                       timeout=LOOKUP_TIMEOUT_S)
        except UsherError as exc:
            log.warning("cannot list the domains of %s: %s", host, exc.message)
            return None
        return {d.uuid for d in inv.domains}

    async def _arrived(self, vm: VmRec, src: str, dst: str) -> bool:
        """True if the VM is on the target and no longer on the source (a re-run)."""
        inv: Inventory = await self.ctx.nodes.call(dst, "node.inventory", Empty(),
                                                   timeout=LOOKUP_TIMEOUT_S)
        on_target = {d.uuid for d in inv.domains}
        if vm.uuid not in on_target:
            return False
        on_source = await self._domains(src)
        return on_source is not None and vm.uuid not in on_source

    async def _settle_failure(self, vm: VmRec, src: str, dst: str, *, keep_disk: bool) -> bool:
        """After a failed step: True if the VM arrived on the target after all.

        Otherwise, if the source still has it, the target is cleaned (a
        half-arrived domain, the prepared disk unless ``keep_disk``: the
        source's own on a shared store); if not even that is known, nothing is
        touched and the hosts' next inventories tell.
        """
        on_source = await self._domains(src)
        on_target = await self._domains(dst)
        if on_source is not None and vm.uuid not in on_source and on_target is not None \
                and vm.uuid in on_target:
            return True
        if on_source is not None and vm.uuid in on_source:
            await self._forget(dst, vm, keep_disk=keep_disk)
        else:
            log.warning("after a failed migration of %s its whereabouts are unknown "
                        "(%s: %s, %s: %s); nothing cleaned", vm.name, src,
                        _seen(vm, on_source), dst, _seen(vm, on_target))
        return False

    async def _forget(self, host: str, vm: VmRec, *, keep_disk: bool) -> None:
        try:
            await self.ctx.nodes.call(host, "node.forget_vm",
                                      ForgetArgs(uuid=vm.uuid, keep_disk=keep_disk),
                                      timeout=LOOKUP_TIMEOUT_S)
        except UsherError as exc:
            log.warning("cleaning %s of %s after its migration: %s", host, vm.name,
                        exc.message)

    # ============================================================ progress
    def progress(self, host: str, msg: MigrationProgressMsg) -> None:
        """A ``migration`` push from ``host``: shown as the task's progress."""
        vm = self.reg.vms.get(msg.uuid)
        if vm is None or vm.task is None or vm.host != host:
            return
        task = self.reg.tasks.get(vm.task)
        kind = self._kinds.get(vm.task)
        if task is None or not task.active or kind not in (LIVE, DISK):
            return
        self.vms._progress(task, f"{'cold' if kind == DISK else 'live'} migration {host} -> "
                                 f"{task.target}: {msg.phase} {msg.percent:.0f}%")

    # =============================================================== abort
    async def abort(self, identity: Identity, args: VmOpArgs, _request_id: str) -> Accepted:
        """Abort the migrations of the named VMs; returns their migrate tasks.

        A migration not yet transferring is stopped before it starts; one
        transferring is aborted on its source (the task then ends in error,
        the VM where it was); one finishing on the target completes.

        Raises:
            InvalidState: a VM is not migrating.
            Conflict: a VM migrates cold (its steps are quick and not undone).
        """
        tasks: list[TaskRec] = []
        for name in self.vms._names(identity, args.names):
            vm = self.vms._existing(identity, name)
            task = self.reg.tasks.get(vm.task) if vm.task else None
            short = self.vms._short(identity, vm.name)
            if task is None or task.op != "migrate" or not task.active:
                raise InvalidState(f"{short} is not migrating", details={"state": vm.state})
            if self._kinds.get(task.id) == COLD:
                raise Conflict(f"{short} migrates cold, which cannot be aborted; wait for it")
            tasks.append(task)
        for task in tasks:
            self._aborts.add(task.id)
            source = self._transfers.get(task.id)
            if source is not None and task.vm_uuid is not None:
                try:
                    await self.ctx.nodes.call(source, "node.abort_migration",
                                              UuidArgs(uuid=task.vm_uuid))
                except UsherError as exc:
                    log.warning("aborting the migration of %s: %s", task.vm_name, exc.message)
        return Accepted(tasks=[t.info() for t in tasks])


def _seen(vm: VmRec, domains: set[str] | None) -> str:
    if domains is None:
        return "unreachable"
    return "has it" if vm.uuid in domains else "has not"
