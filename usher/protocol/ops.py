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
    cpu_pct: float | None = None  # CPU use over the last stats interval (100: one host CPU)
    mem_kib: int | None = None  # memory it uses at the last stats sample (see VmRates)


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
    shared_store: str = ""  # the shared filesystem its image store is on ("": its own)


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
    migrating: bool = False  # an outgoing migration of it runs on this host


class HostFactsMsg(_S):
    hostname: str
    cpus: int
    memory_mib: int
    hypervisor: str
    live_migration: bool = False
    managed_save: bool = False
    vlans: list[int] = []  # VLAN ids the host's bridge carries
    migration_uri: str = ""  # libvirt URI other hosts' libvirtd reach this one at ("": none)
    migration_address: str = ""  # where migration data goes: tcp://IP ("": libvirt's choice)
    shared_store: str = ""  # the shared filesystem its image store is on ("": its own)
    store_id: str = ""  # which filesystem that really is (the id file in the store)


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


MAX_CONSOLE_INPUT = 4096


class VmConsoleOpenArgs(_S):
    name: str  # one VM


class ConsoleSessionMsg(_S):
    session: str  # the session's id: console pushes and input carry it
    name: str  # the VM's FQDN


class ConsoleOpenArgs(_S):
    uuid: str
    session: str


class ConsoleInputArgs(_S):
    session: str
    data: bytes  # keystrokes for the guest's serial console (at most MAX_CONSOLE_INPUT)


class ConsoleCloseArgs(_S):
    session: str


class ConsoleDataMsg(_S):
    """Output of an attached serial console; ``eof`` ends the session."""

    session: str
    data: bytes = b""
    eof: bool = False
    reason: str = ""  # why it ended, with eof


class Inventory(_S):
    domains: list[DomainMsg]


# --------------------------------------------------------------- accounting
DEFAULT_STATS_SAMPLES = 60


class DomainStatsMsg(_S):
    """A domain's counters as its hypervisor reports them (see usher.lnm.drivers.base)."""

    uuid: str
    cpu_ns: int = 0  # CPU time since it booted
    memory_kib: int = 0  # memory the guest has (the balloon's size)
    rss_kib: int | None = None  # host memory its process holds, where the host knows it
    disk_rd_bytes: int = 0  # cumulative since it booted, like every byte count
    disk_wr_bytes: int = 0
    net_rx_bytes: int = 0  # received by the guest
    net_tx_bytes: int = 0  # sent by the guest


class StatsReply(_S):
    domains: list[DomainStatsMsg]  # usher's domains on the host (inactive ones: zeros)


class VmStatsArgs(_S):
    names: list[str] = []  # patterns, as for vm.list; empty: every VM the caller may see
    all_users: bool = False  # site admin: everyone's VMs
    samples: int | None = None  # newest per VM, 1 to stats_keep; nil: 60 (all if fewer kept)


class StatsSample(_S):
    """One sample of a VM's counters, as the controller stored it."""

    time: float  # when the controller received it (Unix time)
    cpu_ns: int = 0
    memory_kib: int = 0
    rss_kib: int | None = None
    disk_rd: int = 0  # bytes, cumulative since the VM's boot
    disk_wr: int = 0
    net_rx: int = 0
    net_tx: int = 0


class VmRates(_S):
    """Use between two samples: counter increase over elapsed time.

    A counter that went down was restarted (the VM booted again, moved or
    was restored) and counts from zero. ``mem_kib`` is the later sample's
    memory in use: the host memory its process holds where known, else the
    memory the guest has.
    """

    interval_s: float  # time between the two samples
    cpu_pct: float = 0.0  # CPU time per elapsed time; 100 is one host CPU kept busy
    mem_kib: int = 0
    disk_rd_bps: float = 0.0  # bytes per second
    disk_wr_bps: float = 0.0
    net_rx_bps: float = 0.0
    net_tx_bps: float = 0.0


class VmStats(_S):
    name: str  # FQDN
    uuid: str
    state: str
    host: str | None = None
    samples: list[StatsSample] = []  # the newest ones, oldest first
    rates: VmRates | None = None  # over the last interval (the newest two samples)
    average: VmRates | None = None  # over all of ``samples``, first to last


# ---------------------------------------------------------- live migration
class DiskSizeMsg(_S):
    bytes: int  # virtual size of the VM's disk (its overlay) on this host


class IncomingArgs(_S):
    spec: DomainSpecMsg  # the VM as the controller knows it (its boot names the artifacts)
    disk_bytes: int = 0  # virtual size of the empty overlay to make (0: the VM has no disk)
    shared: bool = False  # the disk is on a store both hosts share: check it is there, make none


class ForgetArgs(_S):
    uuid: str
    keep_disk: bool = False  # the disk and console log are on a shared store: leave them


class NodeMigrateArgs(_S):
    uuid: str
    target_uri: str  # the target's libvirt URI, as this host's libvirtd reaches it
    migrate_uri: str | None = None  # where the data goes (default: the target's choice)
    tls: bool = False  # encrypt the migration data too (QEMU's TLS, site-CA certificates)
    copy_storage: bool = True  # copy the VM's disk into the target's prepared overlay
    keep_disk: bool = False  # the disk and console log are on a store the target shares
    stopped: bool = False  # a stopped VM moving its disk: started paused, never run
    timeout_s: float = 300.0  # aborted after this long; the VM stays here


class MigrationProgressMsg(_S):
    uuid: str
    phase: str  # connect to target | prepare | copy storage | migrate memory | finish on target
    percent: float = 0.0  # of that phase


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
        Op("vm.migrate_abort", "client", VmOpArgs, Accepted, mutation=True,
           doc="Abort the running migrations of VMs; they stay where they are. "
               "Returns the migrate tasks, which end in error."),
        Op("vm.stats", "client", VmStatsArgs, list[VmStats],
           doc="Recent resource samples of VMs with their rates (CPU %, bytes/s), "
               "by name patterns as `vm.list`."),
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
        Op("vm.console_open", "client", VmConsoleOpenArgs, ConsoleSessionMsg, timeout="node",
           doc="Attach to a VM's serial console: its output arrives as `console` pushes "
               "until `vm.console_close` or the end of the session (`eof`)."),
        Op("vm.console_input", "client", ConsoleInputArgs, Empty, timeout="node",
           doc="Send keystrokes to an attached console."),
        Op("vm.console_close", "client", ConsoleCloseArgs, Empty, timeout="node",
           doc="Detach from a console (closing the connection detaches too)."),
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
        Op("node.undefine", "controller", ForgetArgs, Empty, timeout="node",
           doc="Power off and undefine a domain, and delete its disk and console log "
               "unless `keep_disk` (a cold move between hosts of one shared store); a "
               "missing domain succeeds."),
        Op("node.disk_size", "controller", UuidArgs, DiskSizeMsg, timeout="node",
           doc="The virtual size of a VM's disk here (before a live migration)."),
        Op("node.prepare_incoming", "controller", IncomingArgs, Empty, timeout="node",
           doc="Make ready for a VM arriving by migration: fetch its boot artifacts, make "
               "its empty disk (with `shared`: check that its disk is in this host's "
               "store); idempotent by UUID (refused if the domain is here)."),
        Op("node.migrate", "controller", NodeMigrateArgs, Empty, timeout="wait",
           doc="Move a domain live to another host's libvirtd (peer to peer), then delete "
               "its disk and console log here; progress goes up as `migration` pushes."),
        Op("node.abort_migration", "controller", UuidArgs, Empty, timeout="node",
           doc="Abort a domain's outgoing migration; none running: no-op."),
        Op("node.finish_incoming", "controller", UuidArgs, DomainMsg, timeout="node",
           doc="Take over a domain that arrived by migration (its DHCP entry); returns it."),
        Op("node.forget_vm", "controller", ForgetArgs, Empty, timeout="node",
           doc="Remove what this host keeps of a VM that runs on another host: a "
               "half-arrived domain, its disk and console log (unless `keep_disk`: "
               "a store both hosts share)."),
        Op("node.console", "controller", ConsoleArgs, ConsoleText, timeout="node",
           doc="The last lines a domain printed on its serial console (its console log)."),
        Op("node.console_open", "controller", ConsoleOpenArgs, Empty, timeout="node",
           doc="Open a domain's serial console; its output goes up as `node_console` pushes."),
        Op("node.console_input", "controller", ConsoleInputArgs, Empty, timeout="node",
           doc="Write to an open console."),
        Op("node.console_close", "controller", ConsoleCloseArgs, Empty, timeout="node",
           doc="Close a console (idempotent)."),
        Op("node.inventory", "controller", Empty, Inventory, timeout="node",
           doc="Every domain on the host, usher's or not."),
        Op("node.stats", "controller", Empty, StatsReply, timeout="node",
           doc="The resource counters of usher's domains on the host (CPU time, memory, "
               "disk and network bytes), read in one hypervisor call."),
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
        PushSpec("migration", "node", MigrationProgressMsg,
                 "How far an outgoing migration got (phase, percent), a few times a second."),
        PushSpec("node_console", "node", ConsoleDataMsg,
                 "Output of a console the controller opened on the node (and its end)."),
        PushSpec("console", "controller", ConsoleDataMsg,
                 "Output of a console the client attached to (and its end)."),
    ]
}
