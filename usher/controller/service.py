"""The VM service: every verb, its state rules, and the tasks that carry it out.

A mutation goes through four phases, in this order:

1. **validate** the whole batch (names, permissions, the verb against each
   VM's state, options, and what a new VM boots from: see
   :mod:`usher.controller.images`) and let ``*_request`` policies refuse or amend it
   (an amended request is validated again). Nothing has changed yet.
2. **decide**, on the event loop without an ``await``: reserve placement for
   new VMs, mark every VM busy with its task. Atomic, so concurrent requests
   see each other's decisions.
3. **journal** the decision in one SQL transaction: VM rows (UUID, MAC, host
   fixed here), task rows, and the reply under the caller's request id. If
   the commit fails, the in-memory decision is undone and the caller gets the
   error: nothing was dispatched.
4. **dispatch**: each task runs in the background under its deadline; node
   calls are idempotent by UUID so a task re-run after a controller restart
   is harmless. Completion updates SQL, then memory, then pushes to the user.

The state rules (DESIGN section 3) are the tables :data:`ALLOWED` and
:data:`NOOP`; any other (verb, state) pair is an error naming the state.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid as uuidlib
from collections.abc import Callable
from typing import Any

import msgspec
from sqlalchemy import Table, delete, insert, select, update
from sqlalchemy.orm import Session

from usher import failpoints
from usher.controller.auth import Identity
from usher.controller.context import Context
from usher.controller.events import EventData
from usher.controller.images import encode_boot
from usher.controller.migration import Migrations, has_disk, shares_store
from usher.controller.models import RequestRecord, Task, Transition, Vm
from usher.controller.providers import Placement, Row
from usher.controller.state import BootRecord, TaskRec, VmRec
from usher.errors import (
    Conflict,
    ConnectionClosed,
    HostUnavailable,
    InvalidOption,
    InvalidState,
    PermissionDenied,
    TaskNotFound,
    TimedOut,
    Unavailable,
    UsherError,
    VmNotFound,
)
from usher.names import VmName, expand_batch, resolve_vm_name
from usher.protocol import frames
from usher.protocol.ops import (
    MAX_CONSOLE_LINES,
    Accepted,
    ActionArgs,
    ConsoleArgs,
    ConsoleText,
    DefineArgs,
    DomainMsg,
    DomainSpecMsg,
    ForgetArgs,
    ListArgs,
    MigrateArgs,
    StartArgs,
    StartOptions,
    TaskInfo,
    TaskListArgs,
    TaskWaitArgs,
    VmConsoleArgs,
    VmInfo,
    VmOpArgs,
)

log = logging.getLogger(__name__)

ALLOWED: dict[str, frozenset[str]] = {
    "start": frozenset({"stopped", "hibernated", "crashed", "error"}),
    "shutdown": frozenset({"running"}),
    "reboot": frozenset({"running"}),
    "cycle": frozenset({"running", "paused", "crashed"}),
    "destroy": frozenset({"pending", "starting", "running", "paused", "shutting_down", "stopped",
                          "hibernated", "migrating", "crashed", "error"}),
    "pause": frozenset({"running"}),
    "resume": frozenset({"paused"}),
    "hibernate": frozenset({"running", "paused"}),
    "migrate": frozenset({"running", "paused", "stopped"}),
}
"""Verb -> VM states it acts on."""

NOOP: dict[str, frozenset[str]] = {
    "start": frozenset({"running", "starting"}),
    "pause": frozenset({"paused"}),
    "resume": frozenset({"running"}),
}
"""Verb -> VM states in which it succeeds at once doing nothing."""

TRANSIENT = {"start": "starting", "shutdown": "shutting_down", "migrate": "migrating"}
"""State a VM shows while a task of this verb runs."""

GOAL = {"start": "running", "shutdown": "stopped", "reboot": "running", "cycle": "running",
        "pause": "paused", "resume": "running", "hibernate": "hibernated"}
"""State a task's VM has when the task succeeded (for settling after a restart)."""

REQUEST_MEMORY_S = 24 * 3600.0
CLEANUP_TIMEOUT_S = 10.0  # undoing a refused create must not hold its task for long


def _mac() -> str:
    return "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))


def _now() -> float:
    return time.time()


class VmService:
    """Client-facing VM verbs and the task machinery behind them."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.reg = ctx.reg
        self._replies: dict[tuple[str, str], bytes] = {}
        self._in_flight: dict[tuple[str, str], asyncio.Future[bytes]] = {}
        self._runners: dict[str, asyncio.Task[None]] = {}
        self.migrations = Migrations(self)

    # ================================================================ queries
    def _visible(self, identity: Identity, vm: VmRec) -> bool:
        return identity.site_admin or vm.owner == identity.user

    def list_vms(self, identity: Identity, args: ListArgs) -> list[VmInfo]:
        site = self.ctx.config.site_domain
        if args.names:
            wanted = [self._resolve(identity, n) for n in
                      expand_batch(args.names, cap=self.ctx.config.batch_cap)]
            out = []
            for name in wanted:
                vm = self.reg.by_name.get(name.fqdn)
                if vm is None or not self._visible(identity, vm):
                    raise VmNotFound(f"no VM named {name.relative_to(identity.user, site)}")
                out.append(self._vm_info(vm))
            return out
        if identity.site_admin and args.all_users:
            vms = list(self.reg.vms.values())
        else:
            vms = list(self.reg.by_owner.get(identity.user, {}).values())
        vms.sort(key=lambda v: v.name)
        return [self._vm_info(vm) for vm in vms]

    def _vm_info(self, vm: VmRec) -> VmInfo:
        info = vm.info()
        if self.ctx.dns is not None:
            info.dns = self.ctx.dns.state_of(vm)
        if self.ctx.stats is not None:
            self.ctx.stats.annotate(info)
        return info

    def complete_vms(self, identity: Identity, prefix: str) -> list[str]:
        suffix = f".{identity.user}.{self.ctx.config.site_domain}"
        names = []
        for vm in self.reg.by_owner.get(identity.user, {}).values():
            short = vm.name[: -len(suffix)] if vm.name.endswith(suffix) else vm.name
            if short.startswith(prefix):
                names.append(short)
        return sorted(names)[:500]

    def list_tasks(self, identity: Identity, args: TaskListArgs) -> list[TaskInfo]:
        if args.ids:
            out = []
            for tid in args.ids:
                task = self.reg.tasks.get(tid)
                if task is not None and (task.user == identity.user or identity.site_admin):
                    out.append(task.info())
            return out
        mine = [t for t in self.reg.tasks.values()
                if t.user == identity.user and (t.active or not args.active_only)]
        mine.sort(key=lambda t: t.created, reverse=True)
        return [t.info() for t in mine[: max(1, min(args.limit, 1000))]]

    async def wait_task(self, identity: Identity, args: TaskWaitArgs) -> TaskInfo:
        task = self.reg.tasks.get(args.id)
        if task is None or not (task.user == identity.user or identity.site_admin):
            raise TaskNotFound(f"no task {args.id} of yours; see 'tasks'")
        if task.active:
            if task.done_event is None:
                task.done_event = asyncio.Event()
            try:
                await asyncio.wait_for(task.done_event.wait(), max(0.0, args.timeout_s))
            except TimeoutError:
                raise TimedOut(f"task {args.id} still running after {args.timeout_s:g} s") \
                    from None
        return task.info()

    # ============================================================ idempotency
    async def idempotent(self, identity: Identity, op: str, request_id: str,
                         make: Callable[[], Any]) -> Any:
        """Run mutation ``make`` once per (caller, request id); repeats get its reply."""
        key = (identity.user, request_id)
        cached = self._replies.get(key)
        if cached is not None:
            return msgspec.Raw(cached)
        pending = self._in_flight.get(key)
        if pending is not None:
            return msgspec.Raw(await asyncio.shield(pending))
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._in_flight[key] = fut
        try:
            result = await make()
            blob = frames.encode(result)
            fut.set_result(blob)
            self._replies[key] = blob
            return result
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: no "never retrieved" warning
            raise
        finally:
            del self._in_flight[key]

    def load_replies(self, session: Session) -> None:
        cutoff = _now() - REQUEST_MEMORY_S
        session.execute(delete(RequestRecord).where(RequestRecord.created < cutoff))
        for rec in session.scalars(select(RequestRecord)):
            self._replies[(rec.user, rec.request_id)] = rec.reply

    # ============================================================== validate
    def _resolve(self, identity: Identity, name: str) -> VmName:
        return resolve_vm_name(name, user=identity.user, site=self.ctx.config.site_domain,
                               site_admin=identity.site_admin)

    def _names(self, identity: Identity, patterns: list[str]) -> list[VmName]:
        if not patterns:
            raise InvalidOption("name at least one VM")
        return [self._resolve(identity, n)
                for n in expand_batch(patterns, cap=self.ctx.config.batch_cap)]

    async def console_tail(self, identity: Identity, args: VmConsoleArgs) -> ConsoleText:
        """The last lines the VM printed on its serial console, from its host.

        Raises:
            VmNotFound: no such VM the caller may see.
            InvalidOption: not one VM, or ``lines`` out of range.
            HostUnavailable: the VM's host is not connected (or it has none).
        """
        if not 1 <= args.lines <= MAX_CONSOLE_LINES:
            raise InvalidOption(f"--tail takes 1 to {MAX_CONSOLE_LINES} lines, not {args.lines}")
        vm, host = self.console_host(identity, args.name)
        reply: ConsoleText = await self.ctx.nodes.call(
            host, "node.console", ConsoleArgs(uuid=vm.uuid, lines=args.lines))
        return reply

    def console_host(self, identity: Identity, name: str) -> tuple[VmRec, str]:
        """The one VM ``name`` names and the connected host its console is on.

        Raises:
            as :meth:`one_vm`, and HostUnavailable: the VM's host is not connected.
        """
        vm = self.one_vm(identity, name)
        if vm.host is None or not self.ctx.nodes.connected(vm.host):
            raise HostUnavailable(f"{self._short(identity, vm.name)} has no connected VMM "
                                  f"({vm.state}); its console is on its host")
        return vm, vm.host

    def one_vm(self, identity: Identity, name: str) -> VmRec:
        """The one VM ``name`` names, if the caller may see it.

        Raises:
            InvalidOption: the name is a batch of several VMs.
            VmNotFound, PermissionDenied, InvalidName: as for any VM name.
        """
        names = self._names(identity, [name])
        if len(names) != 1:
            raise InvalidOption("console shows one VM at a time; name one")
        return self._existing(identity, names[0])

    def _existing(self, identity: Identity, name: VmName) -> VmRec:
        vm = self.reg.by_name.get(name.fqdn)
        if vm is None or not self._visible(identity, vm):
            raise VmNotFound(f"no VM named {self._short(identity, name.fqdn)}; see 'list'")
        return vm

    def _short(self, identity: Identity, fqdn: str) -> str:
        suffix = f".{identity.user}.{self.ctx.config.site_domain}"
        return fqdn[: -len(suffix)] if fqdn.endswith(suffix) else fqdn

    def _check_state(self, identity: Identity, op: str, vm: VmRec, force: bool = False) -> bool:
        """True if ``op`` acts on ``vm``, False if it is a no-op; else raises."""
        if vm.task is not None:
            running = self.reg.tasks.get(vm.task)
            if op == "start" and running is not None and running.op == "start":
                return False
            what = f"{running.op} task {running.id}" if running else "a task"
            raise Conflict(f"{self._short(identity, vm.name)} is busy with {what}; "
                           f"wait for it ('wait {vm.task}')")
        if op == "destroy" and vm.state == "unknown":
            if force:
                return True
            raise InvalidState(f"{self._short(identity, vm.name)} is unknown (its VMM "
                               f"{vm.host} is lost); use 'destroy --force' to forget it")
        if vm.state in NOOP.get(op, ()):
            return False
        if vm.state not in ALLOWED[op]:
            raise InvalidState(f"cannot {op} {self._short(identity, vm.name)}: it is "
                               f"{vm.state}", details={"state": vm.state})
        return True

    def _options(self, identity: Identity, options: StartOptions
                 ) -> tuple[StartOptions, BootRecord | None]:
        """Check a start's options; returns them with the boot they resolve to."""
        cfg = self.ctx.config
        if options.ram is not None and not 16 <= options.ram <= cfg.max_ram_mib:
            raise InvalidOption(f"--ram {options.ram} is out of range; "
                                f"give 16 to {cfg.max_ram_mib} MiB")
        if options.vcpus is not None and not 1 <= options.vcpus <= cfg.max_vcpus:
            raise InvalidOption(f"--vcpus {options.vcpus} is out of range; "
                                f"give 1 to {cfg.max_vcpus}")
        if options.vmm is not None and options.vmm not in self.reg.hosts:
            raise InvalidOption(f"no VMM named {options.vmm}; see 'vmm_list'")
        return options, self.ctx.images.resolve(options, site_admin=identity.site_admin)

    async def _policy(self, identity: Identity, op: str, names: list[VmName],
                      options: dict[str, Any]) -> dict[str, Any]:
        """Fire ``request`` and ``<op>_request``; returns the amended options."""
        for event in ("request", f"{op}_request"):
            if self.ctx.bus.has_handlers(event):
                options = await self.ctx.bus.request(EventData(
                    name=event, user=identity.user, subject=names[0].fqdn if names else None,
                    data={"op": op, "names": [n.fqdn for n in names], "options": options,
                          "site_admin": identity.site_admin}))
        return options

    # ================================================================= start
    async def start(self, identity: Identity, args: StartArgs, request_id: str) -> Accepted:
        names = self._names(identity, args.names)
        options, boot = self._options(identity, args.options)
        raw = msgspec.structs.asdict(options)
        amended = await self._policy(identity, "start", names, raw)
        if amended != raw:
            try:
                options = msgspec.convert(amended, StartOptions)
            except msgspec.ValidationError as exc:
                raise InvalidOption(f"a policy amended start into something invalid: {exc}") \
                    from None
            options, boot = self._options(identity, options)
            names = self._names(identity, [n.fqdn + "." for n in names])
        return await self._start_decided(identity, names, options, boot, request_id)

    async def _start_decided(self, identity: Identity, names: list[VmName],
                             options: StartOptions, boot: BootRecord | None,
                             request_id: str) -> Accepted:
        cfg = self.ctx.config
        # Range access lists may name directory groups: the owners' groups are
        # read (cached) before the decision, which must not await.
        groups: dict[str, frozenset[str]] = {}
        ipam, directory = self.ctx.ipam, self.ctx.directory
        if ipam is not None and directory is not None:
            for owner in {n.owner or identity.user for n in names}:
                if ipam.needs_groups(options.ip_range, owner):
                    groups[owner] = await directory.groups_of(owner)
        plan: list[tuple[VmName, VmRec | None, bool]] = []  # (name, existing, acts)
        seen: set[str] = set()
        for name in names:
            if name.fqdn in seen:
                continue
            seen.add(name.fqdn)
            vm = self.reg.by_name.get(name.fqdn)
            if vm is not None:
                if not self._visible(identity, vm):
                    raise PermissionDenied(f"{name.fqdn} belongs to another user")
                plan.append((name, vm, self._check_state(identity, "start", vm)))
            else:
                if not identity.usher:
                    raise PermissionDenied(f"{identity.user} may not create VMs; ask the "
                                           f"site admin to make you an usher user")
                plan.append((name, None, True))
        # ---- decide (no await from here until the journal write)
        now = _now()
        new_vms: list[VmRec] = []
        tasks: list[TaskRec] = []
        fresh: list[TaskRec] = []
        try:
            for name, vm, acts in plan:
                if vm is None:
                    vm = VmRec(uuid=str(uuidlib.uuid4()), name=name.fqdn, cluster=name.cluster,
                               owner=name.owner or identity.user, host=None, state="pending",
                               memory_mib=options.ram or cfg.default_ram_mib,
                               vcpus=options.vcpus or cfg.default_vcpus, mac=self._unique_mac(),
                               since=now, reason="", rr=options.rr, boot=boot)
                    self.reg.add_vm(vm)
                    new_vms.append(vm)
                    self.ctx.providers.reserve(Placement(vm=vm, vmm=options.vmm,
                                                        ip_range=options.ip_range,
                                                        ip=options.ip, rr=options.rr,
                                                        groups=groups.get(vm.owner,
                                                                          frozenset())))
                    task = self._new_task("start", identity, vm, now, created_vm=True)
                elif not acts:
                    existing = self.reg.tasks.get(vm.task) if vm.task else None
                    if existing is not None:
                        tasks.append(existing)
                        continue
                    task = self._noop_task("start", identity, vm, now)
                else:
                    task = self._new_task("start", identity, vm, now)
                tasks.append(task)
                fresh.append(task)
        except BaseException:
            self._undo(fresh, new_vms, [])
            raise
        return await self._journal_and_dispatch(identity, "start", request_id, tasks, fresh,
                                                new_vms=new_vms)

    def _unique_mac(self) -> str:
        # 2^24 addresses under the 52:54:00 prefix: a random draw almost always
        # hits a free one; the bound only matters on a nearly full site.
        for _ in range(64):
            mac = _mac()
            if mac not in self.reg.macs:
                return mac
        raise Conflict("could not find a free MAC address; the site has too many VMs")

    # ======================================================= the other verbs
    async def act(self, identity: Identity, op: str, args: VmOpArgs | MigrateArgs,
                  request_id: str) -> Accepted:
        names = self._names(identity, args.names)
        force = getattr(args, "force", False)
        vmm = getattr(args, "vmm", None)
        amended = await self._policy(identity, op, names, {"force": force, "vmm": vmm})
        force, vmm = bool(amended.get("force", force)), amended.get("vmm", vmm)
        plan: list[tuple[VmRec, bool]] = []
        seen: set[str] = set()
        for name in names:
            vm = self._existing(identity, name)
            if vm.uuid in seen:
                continue
            seen.add(vm.uuid)
            plan.append((vm, self._check_state(identity, op, vm, force)))
        if op == "migrate" and vmm is not None and vmm not in self.reg.hosts:
            raise InvalidOption(f"no VMM named {vmm}; see 'vmm_list'")
        now = _now()
        tasks: list[TaskRec] = []
        held: list[tuple[VmRec, str]] = []
        try:
            for vm, acts in plan:
                if not acts:
                    tasks.append(self._noop_task(op, identity, vm, now))
                    continue
                task = self._new_task(op, identity, vm, now)
                tasks.append(task)
                if op == "migrate":
                    if vmm is not None and vmm == vm.host:
                        raise InvalidOption(f"{self._short(identity, vm.name)} is already "
                                            f"on {vmm}")
                    chosen = self.ctx.placement.choose(
                        vm, vmm, exclude={vm.host or ""},
                        prefer=self.migrations.prefers(vm))
                    self.migrations.check(vm, chosen.name)
                    self.reg.hold(chosen.name, vm)
                    held.append((vm, chosen.name))
                    task.target = chosen.name
                    task.step = "was_" + vm.state
        except BaseException:
            self._undo(tasks, [], held)
            raise
        return await self._journal_and_dispatch(identity, op, request_id, tasks, tasks,
                                                held=held)

    # ============================================================ tasks core
    def _new_task(self, op: str, identity: Identity, vm: VmRec, now: float, *,
                  created_vm: bool = False) -> TaskRec:
        task = TaskRec(id=str(uuidlib.uuid4()), op=op, user=identity.user, vm_uuid=vm.uuid,
                       vm_name=vm.name, state="running", created=now,
                       deadline=now + self.ctx.config.task_deadline_s, host=vm.host,
                       created_vm=created_vm, vm_state=vm.state)
        vm.task = task.id
        self.reg.add_task(task)
        return task

    def _noop_task(self, op: str, identity: Identity, vm: VmRec, now: float) -> TaskRec:
        task = TaskRec(id=str(uuidlib.uuid4()), op=op, user=identity.user, vm_uuid=vm.uuid,
                       vm_name=vm.name, state="done", created=now, deadline=now,
                       host=vm.host, message=f"already {vm.state}", vm_state=vm.state,
                       finished=now)
        self.reg.add_task(task)
        return task

    def _undo(self, fresh: list[TaskRec], new_vms: list[VmRec],
              held: list[tuple[VmRec, str]]) -> None:
        """Take back a decision that was not journaled: nothing of it remains."""
        for vm, target in held:
            self.reg.unhold(target, vm)
        for vm in new_vms:
            self.ctx.providers.release(vm)
            self.reg.remove_vm(vm)
        for task in fresh:
            self._forget_task(task)

    def _forget_task(self, task: TaskRec) -> None:
        self.reg.tasks.pop(task.id, None)
        if task.vm_uuid is not None:
            vm = self.reg.vms.get(task.vm_uuid)
            if vm is not None and vm.task == task.id:
                vm.task = None

    async def _journal_and_dispatch(
        self, identity: Identity, op: str, request_id: str, tasks: list[TaskRec],
        fresh: list[TaskRec], *, new_vms: list[VmRec] | None = None,
        held: list[tuple[VmRec, str]] | None = None,
    ) -> Accepted:
        """Journal the decided tasks (``fresh``: made by this request) and run them.

        ``tasks`` is the reply: it may also name another caller's running
        start task that this request joined, which is neither written nor
        launched again here.
        """
        new_vms, held = new_vms or [], held or []
        user, now = identity.user, _now()
        created = {vm.uuid for vm in new_vms}
        transitions = [transition_row(vm, "new", vm.state, f"{op} by {user}", now)
                       for vm in new_vms]
        # The state a VM shows while its task runs is journaled with the task.
        previous: list[tuple[VmRec, str]] = []
        for task in fresh:
            vm = self.reg.vms.get(task.vm_uuid or "")
            transient = TRANSIENT.get(task.op)
            if task.active and vm is not None and transient and vm.state != transient:
                previous.append((vm, vm.state))
                old = self.reg.set_state(vm, transient, "")
                if vm.uuid not in created:
                    transitions.append(transition_row(vm, old, transient,
                                                       f"{op} task {task.id}", now))
        accepted = Accepted(tasks=[t.info() for t in tasks])
        vm_rows = [_vm_row(vm) for vm in new_vms]
        task_rows = [_task_row(t) for t in fresh]
        provided: dict[Table, list[Row]] = {}  # leases and the like, with their VM
        for vm in new_vms:
            for table, row in self.ctx.providers.rows(vm):
                provided.setdefault(table, []).append(row)
        reply = frames.encode(accepted)

        request = dict(user=user, request_id=request_id, op=op, reply=reply, created=now)

        def write(session: Session) -> None:
            insert_rows(session, _VMS, vm_rows)
            for table, rows in provided.items():
                insert_rows(session, table, rows)
            insert_rows(session, _TASKS, task_rows)
            insert_rows(session, TRANSITIONS, transitions)
            insert_rows(session, _REQUESTS, [request])

        def undo() -> None:
            for vm, state in previous:
                self.reg.set_state(vm, state, vm.reason)
            self._undo(fresh, new_vms, held)

        journal = self.ctx.db.submit(write)
        try:
            await asyncio.shield(journal)
        except asyncio.CancelledError:
            # The caller left (its connection closed) but the write goes on and
            # may commit: its outcome, not the caller's leaving, decides. Undone
            # here, a committed VM's address could be handed out again.
            journal.add_done_callback(lambda done: self._journaled(
                done, op, user, fresh, new_vms, undo, (user, request_id, reply)))
            raise
        except BaseException:
            undo()
            raise
        failpoints.hit(f"{op}.committed")
        self._dispatch(op, user, fresh, new_vms)
        return accepted

    def _journaled(self, done: asyncio.Future[None], op: str, user: str, fresh: list[TaskRec],
                   new_vms: list[VmRec], undo: Callable[[], None],
                   request: tuple[str, str, bytes]) -> None:
        """The journal write of a request whose caller left has ended: go on as
        if it had stayed; a retry of its request id gets the journaled reply."""
        if done.cancelled() or done.exception() is not None:
            undo()
            return
        self._replies[request[:2]] = request[2]
        self._dispatch(op, user, fresh, new_vms)

    def _dispatch(self, op: str, user: str, fresh: list[TaskRec],
                  new_vms: list[VmRec]) -> None:
        """Run the tasks of a journaled request and tell the providers its VMs exist."""
        for task in fresh:
            if task.active:
                self._launch(task)
            if not task.active:
                self.ctx.fire(op, user=user, subject=task.vm_name, task=task.id, noop=True)
        # After the launches: the tasks' node calls go out before the providers'
        # own work (the DNS writer's) that this wakes.
        for vm in new_vms:
            self.ctx.providers.commit(vm)

    def _launch(self, task: TaskRec, *, settle: bool = False) -> None:
        runner = asyncio.create_task(self._run(task, settle), name=f"task:{task.id}")
        self._runners[task.id] = runner
        runner.add_done_callback(lambda _t: self._runners.pop(task.id, None))

    async def _run(self, task: TaskRec, settle: bool) -> None:
        vm = self.reg.vms.get(task.vm_uuid or "")
        if vm is None:
            await self._finish(task, "error", "the VM is gone", None)
            return
        previous = task.vm_state or vm.state  # the state when the task was made
        transient = TRANSIENT.get(task.op)
        if transient and vm.state != transient and not settle:
            self._set_state(vm, transient, f"{task.op} task {task.id}")
        try:
            async with asyncio.timeout(max(0.0, task.deadline - _now())):
                if settle:
                    await self._wait_host(task)
                await self._execute(task, vm, previous)
        except TimeoutError:
            msg = (f"did not finish within {self.ctx.config.task_deadline_s:g} s "
                   f"(VMM {task.host} did not answer in time)")
            await self._fail(task, vm, previous, msg, unreachable=True)
        except UsherError as exc:
            await self._fail(task, vm, previous, exc.message,
                             unreachable=isinstance(exc, Unavailable | ConnectionClosed))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("task %s (%s %s) crashed", task.id, task.op, task.vm_name)
            await self._fail(task, vm, previous, f"internal error: {exc}")

    async def _wait_host(self, task: TaskRec) -> None:
        for host in filter(None, (task.host, task.target)):
            if not await self.ctx.nodes.wait_connected(host, task.deadline - _now()):
                raise HostUnavailable(f"VMM {host} did not come back")

    def _spec(self, vm: VmRec, task: TaskRec) -> DomainSpecMsg:
        prefix = gateway = None
        if vm.ip is not None and self.ctx.ipam is not None:
            prefix, gateway = self.ctx.ipam.network_of(vm.uuid)
        return DomainSpecMsg(uuid=vm.uuid, name=vm.name, memory_mib=vm.memory_mib,
                             vcpus=vm.vcpus, mac=vm.mac, owner=vm.owner, task_id=task.id,
                             ip=vm.ip, ip_prefix=prefix, gateway=gateway,
                             boot=vm.boot.boot if vm.boot is not None else None)

    async def _execute(self, task: TaskRec, vm: VmRec, previous: str) -> None:
        nodes, op = self.ctx.nodes, task.op
        host = vm.host
        assert host is not None or op == "destroy"
        if op == "start":
            if task.created_vm and self.ctx.directory is not None:
                # The directory provider: the cluster's branch, its creator an admin.
                outcome = await self.ctx.directory.ensure_cluster(vm.cluster, vm.owner, task.id)
                if outcome != "exists":
                    self._progress(task, f"directory branch of {vm.cluster}: {outcome}")
            # The DNS write and the boot overlap; should the records fail
            # (dns_down = refuse), the task fails and the new VM is undone.
            records = asyncio.ensure_future(self.ctx.dns.records_written(vm)) \
                if task.created_vm and self.ctx.dns is not None else None
            try:
                failpoints.hit("start.dispatch")
                spec = self._spec(vm, task)
                # Fetching a new image may take the node manager longer than a
                # plain node call: such a define may use the task's whole time.
                dom: DomainMsg = await nodes.call(
                    host or "", "node.define", DefineArgs(spec=spec),
                    timeout=max(1.0, task.deadline - _now()) if spec.boot else None)
                failpoints.hit("start.node_done")
                if records is not None:
                    await records
            finally:
                if records is not None and not records.done():
                    records.cancel()
            await self._succeed(task, vm, dom.state)
        elif op == "destroy":
            if vm.state != "unknown" and host is not None:
                await nodes.call(host, "node.undefine", ForgetArgs(uuid=vm.uuid))
            await self._destroyed(task, vm)
        elif op == "migrate":
            await self.migrations.run(task, vm)
        else:
            timeout = self.ctx.config.shutdown_timeout_s
            dom = await nodes.call(host, "node.action",  # type: ignore[arg-type]
                                   ActionArgs(uuid=vm.uuid, action=_ACTION[op],  # type: ignore[arg-type]
                                              timeout_s=timeout),
                                   timeout=timeout + 30 if op == "shutdown" else None)
            await self._succeed(task, vm, dom.state)

    async def _cold_migrate(self, task: TaskRec, vm: VmRec) -> None:
        """Move a VM by defining it on the target and undefining it on the source.

        A VM with a disk moves so only between hosts of one shared store
        (:func:`~usher.controller.migration.migration_kind`): the target's
        define finds the disk in place and the source's undefine leaves it.
        Every step is idempotent, so a re-run after a controller restart
        resumes where it stopped.
        """
        source, target = vm.host, task.target
        assert source is not None and target is not None
        was = task.step.removeprefix("was_")
        nodes = self.ctx.nodes
        source_rec, target_rec = self.reg.hosts.get(source), self.reg.hosts.get(target)
        shared = (has_disk(vm) and source_rec is not None and target_rec is not None
                  and shares_store(source_rec, target_rec))
        self._progress(task, f"cold migration {source} -> {target}" + (
            "" if was == "stopped" else ": these VMMs cannot migrate it live"))
        if was != "stopped":
            await nodes.call(source, "node.action", ActionArgs(uuid=vm.uuid, action="power_off"))
        spec = self._spec(vm, task)
        # The target fetches the VM's image files first if it has none yet.
        await nodes.call(target, "node.define", DefineArgs(spec=spec, start=False),
                         timeout=max(1.0, task.deadline - _now()) if spec.boot else None)
        await nodes.call(source, "node.undefine", ForgetArgs(uuid=vm.uuid, keep_disk=shared))
        self.reg.unhold(target, vm)
        self.reg.move_vm(vm, target)
        task.host = target
        state = "stopped"
        if was != "stopped":
            dom: DomainMsg = await nodes.call(target, "node.action",
                                              ActionArgs(uuid=vm.uuid, action="start"))
            state = dom.state
        task.message = f"cold migration {source} -> {target}" + (
            " (the VM was restarted)" if was != "stopped" else "") + (
            f", its disk on shared store {source_rec.shared_store}"
            if shared and source_rec is not None else "")
        await self._succeed(task, vm, state)

    def _progress(self, task: TaskRec, text: str) -> None:
        task.progress = text
        self.ctx.sessions.push_task(task)

    def _set_state(self, vm: VmRec, state: str, cause: str, reason: str = "") -> None:
        old = self.reg.set_state(vm, state, reason)
        if old != state:
            row = transition_row(vm, old, state, cause, _now())
            self.ctx.db_background(lambda s: insert_rows(s, TRANSITIONS, [row]))
            self.ctx.fire("state_change", user=vm.owner, subject=vm.name, old=old, new=state,
                          cause=cause)

    async def _succeed(self, task: TaskRec, vm: VmRec, state: str) -> None:
        old = vm.state
        self.reg.set_state(vm, state, "")
        vm.task = None
        task.vm_state = state
        message = task.message or f"{vm.state}"
        trans = transition_row(vm, old, state, f"{task.op} task {task.id}", _now()) \
            if old != state else None
        await self._finish(task, "done", message, vm, trans)
        if task.op == "start" and task.created_vm:
            self.ctx.fire("register", user=vm.owner, subject=vm.name, host=vm.host)
        self.ctx.fire(task.op, user=task.user, subject=vm.name, task=task.id, state=state)

    async def _fail(self, task: TaskRec, vm: VmRec, previous: str, message: str, *,
                    unreachable: bool = False) -> None:
        vm.task = None
        self.ctx.fire(f"{task.op}_failure", user=task.user, subject=vm.name, task=task.id,
                      error=message)
        if task.created_vm and task.op == "start" and unreachable:
            # The host did not answer: the domain may exist there or not. Keep
            # the VM registered in error (its reservation with it); the host's
            # next inventory settles it, and destroy removes it for good.
            vm.reason = f"start failed: {message}; destroy it or start it again"
            self._set_state(vm, "error", f"{task.op} task {task.id} failed", vm.reason)
            task.vm_state = vm.state
            await self._finish(task, "error", message, vm)
            return
        if task.created_vm and task.op == "start":
            # The host refused: undefine whatever it may have made
            # (idempotent), release, unregister. Nothing of the VM remains.
            if vm.host is not None and self.ctx.nodes.connected(vm.host):
                try:
                    await self.ctx.nodes.call(vm.host, "node.undefine",
                                              ForgetArgs(uuid=vm.uuid), timeout=CLEANUP_TIMEOUT_S)
                except UsherError as exc:
                    log.warning("cleanup of failed start %s: %s", vm.name, exc.message)
                    vm.reason = f"start failed: {message}"
                    self._set_state(vm, "error", f"{task.op} task {task.id} failed", vm.reason)
                    await self._finish(task, "error", message, vm)
                    return
            await self._remove_vm(vm)
            await self._finish(task, "error", message, None)
            return
        if task.op == "migrate" and task.target is not None:
            self.reg.unhold(task.target, vm)
        back = previous if vm.state in TRANSIENT.values() else vm.state
        if vm.state != "unknown":
            self._set_state(vm, back, f"{task.op} task {task.id} failed",
                            f"{task.op} failed: {message}")
        task.vm_state = vm.state
        await self._finish(task, "error", message, vm)

    async def _destroyed(self, task: TaskRec, vm: VmRec) -> None:
        await self._remove_vm(vm, task)
        task.vm_state = None
        await self._finish(task, "done", "destroyed", None)
        self.ctx.fire("unregister", user=vm.owner, subject=vm.name)
        self.ctx.fire("destroy", user=task.user, subject=vm.name, task=task.id)

    async def _remove_vm(self, vm: VmRec, task: TaskRec | None = None) -> None:
        row = transition_row(vm, vm.state, "destroyed",
                              f"destroy task {task.id}" if task else "failed start", _now())
        uuid = vm.uuid
        vm_tables = self.ctx.providers.vm_tables
        extra = self.ctx.providers.removal_rows(vm)

        def write(session: Session) -> None:
            session.execute(delete(_VMS).where(_VMS.c.uuid == uuid))
            for table in vm_tables:
                session.execute(delete(table).where(table.c.vm_uuid == uuid))
            insert_rows(session, TRANSITIONS, [row])
            for table, r in extra:
                insert_rows(session, table, [r])

        await self.ctx.db.run(write)
        self.ctx.providers.release(vm)
        self.reg.remove_vm(vm)

    async def _finish(self, task: TaskRec, state: str, message: str, vm: VmRec | None,
                      transition: Row | None = None) -> None:
        """End a task: memory, then pushes; the journal write follows in the
        background (group-committed). Should the controller die before it
        lands, the task is still open in SQL and is settled from the host's
        inventory after the restart, so it is never lost, only re-checked."""
        task.state, task.message, task.finished = state, message, _now()
        task.progress = ""
        t_values: dict[Any, Any] = dict(
            state=task.state, message=task.message, finished=task.finished,
            vm_state=task.vm_state, host=task.host, step=task.step)
        vm_values = _vm_values(vm) if vm is not None else None
        tid, vid = task.id, vm.uuid if vm is not None else None

        def write(session: Session) -> None:
            session.execute(update(_TASKS).where(_TASKS.c.id == tid).values(t_values))
            if vm_values is not None:
                session.execute(update(_VMS).where(_VMS.c.uuid == vid).values(vm_values))
            if transition is not None:
                insert_rows(session, TRANSITIONS, [transition])

        self.ctx.db_background(write)
        self.reg.finish_task(task)
        self.ctx.sessions.push_task(task)
        if vm is not None:
            self.ctx.sessions.push_vm(vm)

    # ============================================================ recovery
    def settle(self, task: TaskRec, domains: dict[str, DomainMsg] | None) -> None:
        """Settle a task left unfinished by a controller restart.

        Called when the task's host has registered (``domains`` is its
        inventory) or when the task's deadline passed (``domains`` None).
        A task whose goal the host already shows is done; otherwise it runs
        again, which is safe because node calls are idempotent by UUID.
        """
        if task.id in self._runners or not task.active:
            return
        vm = self.reg.vms.get(task.vm_uuid or "")
        if vm is None:
            self.reg.finish_task(task)
            return
        if domains is not None and task.op in GOAL:
            dom = domains.get(vm.uuid)
            if dom is not None and dom.state == GOAL[task.op] and task.op != "migrate":
                task.message = "settled after a controller restart"
                self._launch_coro(task, self._succeed(task, vm, dom.state))
                return
        if domains is not None and task.op == "destroy" and vm.uuid not in domains:
            self._launch_coro(task, self._destroyed(task, vm))
            return
        self._launch(task, settle=True)

    def _launch_coro(self, task: TaskRec, coro: Any) -> None:
        runner = asyncio.create_task(coro, name=f"settle:{task.id}")
        self._runners[task.id] = runner
        runner.add_done_callback(lambda _t: self._runners.pop(task.id, None))

    def running(self, task_id: str) -> bool:
        return task_id in self._runners

    async def stop(self) -> None:
        for runner in list(self._runners.values()):
            runner.cancel()
        if self._runners:
            await asyncio.wait(list(self._runners.values()), timeout=5)


_TASKS: Table = Task.__table__  # type: ignore[assignment]
_VMS: Table = Vm.__table__  # type: ignore[assignment]
TRANSITIONS: Table = Transition.__table__  # type: ignore[assignment]
_REQUESTS: Table = RequestRecord.__table__  # type: ignore[assignment]
_ACTION = {"shutdown": "shutdown", "reboot": "reboot", "cycle": "cycle", "pause": "pause",
           "resume": "resume", "hibernate": "hibernate", "start": "start"}


def _vm_values(vm: VmRec) -> dict[Any, Any]:
    return dict(host=vm.host, state=vm.state, since=vm.since, started=vm.started,
                reason=vm.reason, ip=vm.ip)


# Rows are plain dicts (providers.Row) for Core INSERTs: the hot path skips the
# ORM's unit of work.

def _vm_row(vm: VmRec) -> Row:
    return dict(uuid=vm.uuid, name=vm.name, cluster=vm.cluster, owner=vm.owner, host=vm.host,
                state=vm.state, memory_mib=vm.memory_mib, vcpus=vm.vcpus, mac=vm.mac, ip=vm.ip,
                since=vm.since, started=vm.started, reason=vm.reason, rr=vm.rr,
                created=vm.since, boot=encode_boot(vm.boot))


def _task_row(t: TaskRec) -> Row:
    return dict(id=t.id, op=t.op, user=t.user, vm_uuid=t.vm_uuid, vm_name=t.vm_name,
                state=t.state, step=t.step, host=t.host, target=t.target,
                created_vm=t.created_vm, message=t.message, vm_state=t.vm_state,
                created=t.created, deadline=t.deadline, finished=t.finished)


def transition_row(vm: VmRec, old: str, new: str, cause: str, now: float) -> Row:
    return dict(vm_uuid=vm.uuid, vm_name=vm.name, time=now, old=old, new=new, cause=cause)


def insert_rows(session: Session, table: Table, rows: list[Row]) -> None:
    """Core INSERT of plain-dict rows (none: nothing)."""
    if rows:
        session.execute(insert(table), rows)
