"""The controller's in-memory view of VMs, hosts and tasks.

The controller is the only writer of cluster state, so it keeps every VM and
host in memory and decides on that view: a check and the reservation that
follows it happen without an ``await`` in between, which makes them atomic on
the event loop (two clients starting the same new name cannot both win). SQL
is the durable journal: a decision is committed there before anything is
dispatched, and the view is rebuilt from it at start-up.

Host capacity in use is derived from the VMs placed on the host plus the
domains on it that usher does not own, never stored, so it cannot leak.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

import msgspec

from usher.protocol.ops import BootMsg, HostInfo, TaskInfo, VmInfo

VM_STATES = ("pending", "starting", "running", "paused", "shutting_down", "stopped",
             "hibernated", "migrating", "crashed", "unknown", "error")


class BootRecord(msgspec.Struct, omit_defaults=True):
    """What a VM was started with: the start options as given and the boot they
    resolved to (see usher.controller.images), kept as JSON in ``vms.boot``."""

    boot: BootMsg
    image: str | None = None
    kernel: str | None = None
    initrd: str | None = None
    kernel_parms: str | None = None
    fs_uri: str | None = None


@dataclass(slots=True, eq=False)
class VmRec:
    uuid: str
    name: str
    cluster: str
    owner: str
    host: str | None
    state: str
    memory_mib: int
    vcpus: int
    mac: str
    ip: str | None = None
    since: float = 0.0
    started: float | None = None
    reason: str = ""
    rr: bool = False  # a member of its cluster's round-robin DNS name
    vlan: int | None = None  # VLAN of its IP range: only hosts carrying it may run it
    task: str | None = None  # id of the task operating on it now
    boot: BootRecord | None = None  # what it boots from, fixed when it was made

    def info(self) -> VmInfo:
        return VmInfo(name=self.name, uuid=self.uuid, state=self.state, owner=self.owner,
                      cluster=self.cluster, host=self.host, memory_mib=self.memory_mib,
                      vcpus=self.vcpus, mac=self.mac, ip=self.ip, since=self.since,
                      started=self.started, reason=self.reason, rr=self.rr,
                      image=(self.boot.image or "") if self.boot is not None else "")


@dataclass(slots=True, eq=False)
class HostRec:
    name: str
    state: str  # up | disabled | lost
    disabled: bool
    hypervisor: str
    cpus: int
    memory_mib: int
    live_migration: bool = False
    managed_save: bool = False
    last_seen: float = 0.0
    connected: bool = False
    used_memory_mib: int = 0
    used_vcpus: int = 0
    vm_count: int = 0
    foreign_memory_mib: int = 0  # domains on the host that usher did not place
    foreign: list[str] = field(default_factory=list)
    vlans: list[int] = field(default_factory=list)  # as its node manager declares
    migration_uri: str = ""  # where other hosts' libvirtd reach its libvirtd ("": nowhere)
    migration_address: str = ""  # where migration data to it goes ("": libvirt's choice)
    shared_store: str = ""  # the shared filesystem its image store is on ("": its own)
    store_id: str = ""  # the id file in that store: the same on every host that mounts it

    @property
    def free_memory_mib(self) -> int:
        return self.memory_mib - self.used_memory_mib - self.foreign_memory_mib

    def info(self) -> HostInfo:
        return HostInfo(name=self.name, state=self.state, hypervisor=self.hypervisor,
                        cpus=self.cpus, memory_mib=self.memory_mib,
                        used_memory_mib=self.used_memory_mib + self.foreign_memory_mib,
                        used_vcpus=self.used_vcpus, vm_count=self.vm_count,
                        live_migration=self.live_migration, last_seen=self.last_seen,
                        connected=self.connected, vlans=list(self.vlans),
                        shared_store=self.shared_store)


@dataclass(slots=True, eq=False)
class TaskRec:
    id: str
    op: str
    user: str
    vm_uuid: str | None
    vm_name: str
    state: str  # running | done | error
    created: float
    deadline: float
    step: str = ""
    host: str | None = None
    target: str | None = None
    created_vm: bool = False
    message: str = ""
    progress: str = ""
    vm_state: str | None = None
    finished: float | None = None
    done_event: asyncio.Event | None = None

    @property
    def active(self) -> bool:
        return self.state == "running"

    def info(self) -> TaskInfo:
        return TaskInfo(id=self.id, op=self.op, vm=self.vm_name, state=self.state,
                        user=self.user, message=self.message, progress=self.progress,
                        created=self.created, finished=self.finished, vm_state=self.vm_state)


class Registry:
    """Every VM, host and recent task, indexed for the service layer."""

    RECENT_TASKS = 20_000

    def __init__(self) -> None:
        self.vms: dict[str, VmRec] = {}  # by uuid
        self.by_name: dict[str, VmRec] = {}
        self.macs: set[str] = set()
        self.by_owner: dict[str, dict[str, VmRec]] = {}
        self.hosts: dict[str, HostRec] = {}
        self.tasks: dict[str, TaskRec] = {}
        self.holds: dict[str, str] = {}  # vm uuid -> host also charged (move target)
        self._finished: deque[str] = deque()

    # ------------------------------------------------------------------ VMs
    def add_vm(self, vm: VmRec) -> None:
        self.vms[vm.uuid] = vm
        self.by_name[vm.name] = vm
        self.macs.add(vm.mac)
        self.by_owner.setdefault(vm.owner, {})[vm.uuid] = vm
        if vm.host is not None:
            self._charge(vm.host, vm, +1)

    def remove_vm(self, vm: VmRec) -> None:
        self.vms.pop(vm.uuid, None)
        self.macs.discard(vm.mac)
        if self.by_name.get(vm.name) is vm:
            del self.by_name[vm.name]
        owned = self.by_owner.get(vm.owner)
        if owned is not None:
            owned.pop(vm.uuid, None)
        if vm.host is not None:
            self._charge(vm.host, vm, -1)

    def move_vm(self, vm: VmRec, host: str | None) -> None:
        if vm.host is not None:
            self._charge(vm.host, vm, -1)
        vm.host = host
        if host is not None:
            self._charge(host, vm, +1)

    def hold(self, host_name: str, vm: VmRec) -> None:
        """Charge ``vm``'s size to a second host too (the target of a move)."""
        self._charge(host_name, vm, +1)
        self.holds[vm.uuid] = host_name

    def unhold(self, host_name: str, vm: VmRec) -> None:
        if self.holds.get(vm.uuid) == host_name:
            del self.holds[vm.uuid]
            self._charge(host_name, vm, -1)

    def _charge(self, host_name: str, vm: VmRec, sign: int) -> None:
        host = self.hosts.get(host_name)
        if host is None:
            return
        host.used_memory_mib += sign * vm.memory_mib
        host.used_vcpus += sign * vm.vcpus
        host.vm_count += sign

    def set_state(self, vm: VmRec, state: str, reason: str = "") -> str:
        """Change a VM's state in memory; returns the old state."""
        old = vm.state
        now = time.time()
        if state != old:
            vm.since = now
            if state == "running" and old not in ("paused", "running"):
                vm.started = now
            elif state not in ("running", "paused", "migrating", "shutting_down"):
                vm.started = None
        vm.state = state
        vm.reason = reason
        return old

    # ---------------------------------------------------------------- hosts
    def add_host(self, host: HostRec) -> None:
        self.hosts[host.name] = host
        host.used_memory_mib = host.used_vcpus = host.vm_count = 0
        for vm in self.vms.values():
            if vm.host == host.name:
                self._charge(host.name, vm, +1)
            if self.holds.get(vm.uuid) == host.name:
                self._charge(host.name, vm, +1)

    def vms_on(self, host: str) -> list[VmRec]:
        return [vm for vm in self.vms.values() if vm.host == host]

    # ---------------------------------------------------------------- tasks
    def add_task(self, task: TaskRec) -> None:
        self.tasks[task.id] = task
        if not task.active:
            self._remember(task)

    def finish_task(self, task: TaskRec) -> None:
        self._remember(task)
        if task.done_event is not None:
            task.done_event.set()

    def _remember(self, task: TaskRec) -> None:
        self._finished.append(task.id)
        while len(self._finished) > self.RECENT_TASKS:
            old = self.tasks.get(self._finished.popleft())
            if old is not None and not old.active:
                del self.tasks[old.id]
