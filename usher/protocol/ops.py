"""Every operation of the usher protocol, declared once.

Each :class:`Op` names who may call it (``client`` → controller, ``node`` →
controller, or ``controller`` → node), its argument and result schemas, its
timeout class, whether it mutates (and so is idempotent by request id), and
the protocol version that introduced it. The controller and the node manager
dispatch by this table; ``docs/protocol.md`` is checked against it by a test.

Pushes are declared the same way in :data:`PUSHES`. Schemas are plain
msgspec structs: dumb data, no behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import msgspec

Caller = Literal["client", "node", "controller"]

# Timeout classes (seconds) for the caller's wait on a reply. Mutations only
# wait for acceptance (the task runs on), so they are short; node calls wrap a
# hypervisor operation, which may take long on a real host.
TIMEOUTS = {"fast": 10.0, "node": 60.0, "wait": 3600.0}


class _S(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=True):
    """Base of argument and result schemas: unknown fields are an error."""


# --------------------------------------------------------------- shared data
class StartOptions(_S):
    """Options of ``start`` for a new VM (ignored for an existing one)."""

    ram: int | None = None  # MiB
    vcpus: int | None = None
    vmm: str | None = None  # pin to this host
    ip_range: str | None = None  # take the address from this IP range (else the default)
    ip: str | None = None  # this address of the range (else the lowest free one)
    rr: bool = False  # also a member of the round-robin name of the VM's cluster
    image: str | None = None  # a registered image: its disk (an overlay on it), kernel, initrd
    kernel: str | None = None  # boot the kernel (and initrd) of this registered image
    initrd: str | None = None  # with the initrd of this registered image
    kernel_parms: str | None = None  # appended to the kernel command line
    fs_uri: str | None = None  # nfs://SERVER/EXPORT as the root file system (kernel boot);
    # site admins may give a disk URL with #sha256=HEX[&format=qcow2|raw] instead


class ArtifactMsg(_S):
    """A file a node manager fetches into its image store (see usher.lnm.images)."""

    url: str
    sha256: str
    format: str = "raw"  # qcow2 or raw (disks); raw for kernels and initrds


class BootMsg(_S):
    """What a VM boots from: a disk (an overlay is made on it) and/or a kernel."""

    disk: ArtifactMsg | None = None
    kernel: ArtifactMsg | None = None
    initrd: ArtifactMsg | None = None
    cmdline: str = ""  # kernel command line (the node manager adds the VM's address)


class ImageInfo(_S):
    """A registered image, as users see it (``image.list``)."""

    name: str
    disk_format: str | None = None  # None: no disk (kernel boot only)
    kernel: bool = False  # has a kernel for direct boot
    initrd: bool = False
    cmdline: str = ""
    description: str = ""


class TaskInfo(_S):
    id: str
    op: str
    vm: str  # VM FQDN (or host name for host operations)
    state: str  # queued | running | done | error
    user: str
    message: str = ""
    progress: str = ""
    created: float = 0.0
    finished: float | None = None
    vm_state: str | None = None  # VM state when the task ended


class VmInfo(_S):
    name: str  # FQDN
    uuid: str
    state: str
    owner: str
    cluster: str
    host: str | None
    memory_mib: int
    vcpus: int
    mac: str
    ip: str | None = None
    since: float = 0.0  # when it entered its current state
    started: float | None = None  # boot time of the current run (uptime)
    reason: str = ""  # why it is in this state (hold reason, error)
    rr: bool = False  # a member of its cluster's round-robin name
    dns: str = ""  # "" (no records), "ok", or "pending" (waiting for the DNS server)
    image: str = ""  # the registered image it was made from (start --image), if any


class HostInfo(_S):
    name: str
    state: str  # up | disabled | lost
    hypervisor: str
    cpus: int
    memory_mib: int
    used_memory_mib: int
    used_vcpus: int
    vm_count: int
    live_migration: bool = False
    last_seen: float = 0.0
    connected: bool = False  # its node manager is connected now
    vlans: list[int] = []  # VLAN ids the host carries


# --------------------------------------------------------- client operations
class Empty(_S):
    pass


class StartArgs(_S):
    names: list[str]
    options: StartOptions = msgspec.field(default_factory=StartOptions)


class VmOpArgs(_S):
    names: list[str]
    force: bool = False  # destroy --force on a lost host


class MigrateArgs(_S):
    names: list[str]
    vmm: str | None = None


class Accepted(_S):
    """A mutation was accepted: one task per VM, already running."""

    tasks: list[TaskInfo]


class ListArgs(_S):
    names: list[str] = []  # patterns; empty: every VM the caller may see
    all_users: bool = False  # site admin: everyone's VMs


class HostArgs(_S):
    name: str


class TaskListArgs(_S):
    ids: list[str] = []
    limit: int = 50
    active_only: bool = False


class TaskWaitArgs(_S):
    id: str
    timeout_s: float = 600.0


class WhoAmI(_S):
    user: str
    domain: str
    site: str
    site_admin: bool
    usher_user: bool


class CompleteArgs(_S):
    kind: Literal["vm", "host", "image"]
    prefix: str = ""


# ----------------------------------------------------------- node operations
class DomainSpecMsg(_S):
    uuid: str
    name: str
    memory_mib: int
    vcpus: int
    mac: str
    owner: str
    task_id: str
    ip: str | None = None  # the VM's leased address, which the node manager hands it
    ip_prefix: int | None = None  # prefix length of its range
    gateway: str | None = None
    boot: BootMsg | None = None  # None: no disk, no kernel (a fake host's VM)


class DomainMsg(_S):
    uuid: str
    name: str
    state: str
    memory_mib: int
    vcpus: int
    owner: str | None = None
    task_id: str | None = None
    mac: str | None = None


class HostFactsMsg(_S):
    hostname: str
    cpus: int
    memory_mib: int
    hypervisor: str
    live_migration: bool = False
    managed_save: bool = False
    vlans: list[int] = []  # VLAN ids the host's bridge carries


class RegisterArgs(_S):
    facts: HostFactsMsg
    domains: list[DomainMsg]


class RegisterReply(_S):
    host: str
    heartbeat_s: float


class DefineArgs(_S):
    spec: DomainSpecMsg
    start: bool = True


class ActionArgs(_S):
    uuid: str
    action: Literal["start", "shutdown", "reboot", "power_off", "cycle", "pause",
                    "resume", "hibernate"]
    timeout_s: float = 60.0


class UuidArgs(_S):
    uuid: str


MAX_CONSOLE_LINES = 1000


class ConsoleArgs(_S):
    uuid: str
    lines: int = 50  # the last this many lines (1 to MAX_CONSOLE_LINES)


class VmConsoleArgs(_S):
    name: str  # one VM, relative to the caller's domain or an FQDN
    lines: int = 50


class ConsoleText(_S):
    text: str  # what the serial console printed last, decoded as UTF-8 (bad bytes replaced)
    lines: int  # how many lines ``text`` holds


class Inventory(_S):
    domains: list[DomainMsg]


# ------------------------------------------------------------------- pushes
class DomainEventMsg(_S):
    uuid: str
    name: str
    state: str
    reason: str = ""


class VmStateMsg(_S):
    name: str
    state: str
    host: str | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Op:
    """One operation: its name, caller, schemas and behaviour on the wire."""

    name: str
    caller: Caller
    args: type[Any]
    result: Any
    doc: str
    timeout: str = "fast"
    mutation: bool = False
    since: int = 1
    admin_only: bool = False

    @property
    def timeout_s(self) -> float:
        return TIMEOUTS[self.timeout]


@dataclass(frozen=True, slots=True)
class PushSpec:
    topic: str
    sender: Caller
    body: Any
    doc: str
    since: int = 1


_VM_VERBS = {
    "vm.shutdown": "Graceful ACPI shutdown of running VMs; they stay registered.",
    "vm.reboot": "Graceful reboot of running VMs.",
    "vm.cycle": "Hard power off and boot again on the same host.",
    "vm.destroy": "Power off, undefine and unregister VMs; `force` forgets VMs "
                  "left `unknown` on a lost host.",
    "vm.pause": "Suspend running VMs in memory.",
    "vm.resume": "Resume paused VMs.",
    "vm.hibernate": "Save VMs to disk (managed save); `vm.start` restores them.",
}

OPS: dict[str, Op] = {
    op.name: op
    for op in [
        Op("vm.start", "client", StartArgs, Accepted, mutation=True,
           doc="Start VMs, creating the ones that do not exist yet."),
        *(Op(name, "client", VmOpArgs, Accepted, mutation=True, doc=doc)
          for name, doc in _VM_VERBS.items()),
        Op("vm.migrate", "client", MigrateArgs, Accepted, mutation=True,
           doc="Move VMs to the named host or the scheduler's choice: live where "
               "the driver can, else cold (define on target, undefine on source)."),
        Op("vm.list", "client", ListArgs, list[VmInfo],
           doc="VMs the caller may see, optionally filtered by name patterns."),
        Op("host.list", "client", Empty, list[HostInfo], doc="Hosts and their capacity."),
        Op("host.disable", "client", HostArgs, HostInfo, mutation=True, admin_only=True,
           doc="Stop placing new VMs on a host (site admin)."),
        Op("host.enable", "client", HostArgs, HostInfo, mutation=True, admin_only=True,
           doc="Place VMs on a disabled host again (site admin)."),
        Op("host.remove", "client", HostArgs, HostInfo, mutation=True, admin_only=True,
           doc="Forget an empty host (site admin)."),
        Op("vm.console", "client", VmConsoleArgs, ConsoleText, timeout="node",
           doc="The last lines a VM printed on its serial console (`console NAME --tail N`)."),
        Op("image.list", "client", Empty, list[ImageInfo],
           doc="The registered images users may start VMs from (`start --image`)."),
        Op("task.list", "client", TaskListArgs, list[TaskInfo],
           doc="The caller's recent and running tasks, newest first."),
        Op("task.wait", "client", TaskWaitArgs, TaskInfo, timeout="wait",
           doc="Wait until a task ends (or the timeout passes) and return it."),
        Op("session.whoami", "client", Empty, WhoAmI, doc="Who the session is."),
        Op("session.complete", "client", CompleteArgs, list[str],
           doc="Names for tab completion: the caller's VMs, the hosts or the images."),
        Op("node.register", "node", RegisterArgs, RegisterReply, mutation=True,
           doc="A node manager reports its host facts and full domain inventory; "
               "the controller reconciles."),
        Op("node.define", "controller", DefineArgs, DomainMsg, timeout="node",
           doc="Define (and boot) a domain; idempotent by UUID."),
        Op("node.action", "controller", ActionArgs, DomainMsg, timeout="node",
           doc="Run a lifecycle action on a domain; a repeat is harmless."),
        Op("node.undefine", "controller", UuidArgs, Empty, timeout="node",
           doc="Power off and undefine a domain; a missing domain succeeds."),
        Op("node.console", "controller", ConsoleArgs, ConsoleText, timeout="node",
           doc="The last lines a domain printed on its serial console (its console log)."),
        Op("node.inventory", "controller", Empty, Inventory, timeout="node",
           doc="Every domain on the host, usher's or not."),
    ]
}

PUSHES: dict[str, PushSpec] = {
    p.topic: p
    for p in [
        PushSpec("task", "controller", TaskInfo,
                 "A task of the caller changed: progress or completion."),
        PushSpec("vm", "controller", VmStateMsg,
                 "A VM of the caller changed state for a reason of its own "
                 "(the guest powered off, its host was lost, ...)."),
        PushSpec("domain", "node", DomainEventMsg,
                 "A lifecycle event of a domain on the node's host."),
    ]
}
