"""The hypervisor driver interface and the plain data it speaks.

Every hypervisor the node manager can drive implements :class:`HypervisorDriver`.
The contract stated in its docstrings is checked by one test suite run against
every driver (``tests/contract/test_drivers.py``); the in-memory
:class:`~usher.lnm.drivers.fake.FakeDriver` is its executable description.

Rules every driver follows:

* Domains are named by their UUID string (canonical, lower case). Hypervisor
  handles and numeric IDs never leave the driver.
* Drivers are synchronous. The node manager calls them from one worker thread
  with its own timeouts; the only other thread that may touch a driver is the
  one delivering lifecycle events, so drivers guard their state with a lock.
* Drivers never call up. State changes are pushed through the callback given to
  :meth:`HypervisorDriver.set_event_callback` as :class:`DomainEvent` values;
  the loss of the hypervisor connection (its daemon died) through the one given
  to :meth:`HypervisorDriver.set_lost_callback`.
* Failures are usher errors: :class:`~usher.errors.DomainNotFound`,
  :class:`~usher.errors.DomainExists`, :class:`~usher.errors.InvalidState`
  (the verb does not fit the domain's state; ``details['state']`` names it),
  :class:`~usher.errors.TimedOut`, :class:`~usher.errors.NotConnected` (the
  driver is not open, or its connection was lost), :class:`~usher.errors.MigrationUnsupported` and
  :class:`~usher.errors.HypervisorError` for anything else the hypervisor
  refuses.
* Live migration (:meth:`HypervisorDriver.migrate_live`) is the one verb that
  runs for long; :meth:`HypervisorDriver.abort_migration` may be called from
  another thread while it runs and never waits for it. The node manager runs
  migrations in threads of their own, beside the worker thread, so a driver
  holds its lock only for the checks before the transfer and the tidying after.
"""

from __future__ import annotations

import abc
import enum
import ipaddress
import re
import uuid as uuidlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar

from usher.errors import InvalidRequest, InvalidState, MigrationUnsupported


class DomainState(enum.StrEnum):
    """What a domain is doing, as usher sees it."""

    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    CRASHED = "crashed"          # stopped because the guest crashed
    HIBERNATED = "hibernated"    # stopped with a saved memory image (managed save)
    SHUTTING_DOWN = "shutting_down"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class DomainSpec:
    """Everything a driver needs to define a VM; built by the controller.

    New fields get defaults so that older callers keep working.
    """

    uuid: str               # canonical lower-case UUID; becomes the hypervisor's domain UUID
    name: str               # the VM's FQDN; becomes the hypervisor's domain name
    memory_mib: int
    vcpus: int
    mac: str                # "52:54:00:xx:xx:xx"
    owner: str              # usher user name
    task_id: str            # the task that created the VM
    ip: str | None = None   # leased address: a DHCP host entry / kernel command line
    ip_prefix: int | None = None
    gateway: str | None = None
    disk: str | None = None         # the VM's disk: a qcow2 overlay in the host's image store
    kernel: str | None = None       # direct kernel boot: local paths, from the image store
    initrd: str | None = None
    cmdline: str = ""               # the kernel command line as it goes to the guest
    console_log: str | None = None  # the serial console's output is also kept here


@dataclass(frozen=True, slots=True)
class DomainInfo:
    """A domain as the hypervisor reports it now."""

    uuid: str
    name: str
    state: DomainState
    memory_mib: int
    vcpus: int
    owner: str | None       # None: usher did not define this domain
    task_id: str | None
    mac: str | None


@dataclass(frozen=True, slots=True)
class HostFacts:
    """The size and identity of the host a driver runs on."""

    hostname: str
    cpus: int
    memory_mib: int
    hypervisor: str         # the libvirt URI, or "fake"


@dataclass(frozen=True, slots=True)
class DomainStats:
    """What a domain has used, as the hypervisor counts it now.

    The counters (``cpu_ns`` and the byte counts) are cumulative and never
    go down while the domain lives in one process; they start again from
    zero when it boots or is restored (a new QEMU process), so a consumer
    computing rates treats a counter that went down as restarted. A paused
    domain's counters stand still. An inactive domain (stopped, crashed,
    hibernated) reports zeros throughout, memory too: it holds none.
    """

    uuid: str
    cpu_ns: int = 0             # CPU time of all its vCPUs, ns
    memory_kib: int = 0         # memory the guest has now (the balloon's current size)
    rss_kib: int | None = None  # host memory its process holds; None: not known
    disk_rd_bytes: int = 0      # read from all its disks
    disk_wr_bytes: int = 0      # written to all its disks
    net_rx_bytes: int = 0       # received by the guest, all interfaces
    net_tx_bytes: int = 0       # sent by the guest, all interfaces


@dataclass(frozen=True, slots=True)
class DriverCapabilities:
    """What a driver can do beyond the mandatory verbs."""

    live_migration: bool
    managed_save: bool      # hibernate() works
    acpi: bool              # shutdown() asks the guest; without it the guest cannot be asked


@dataclass(frozen=True, slots=True)
class DomainEvent:
    """A lifecycle change of one domain, pushed up through the event callback.

    ``reason`` is short text ``"<event>/<detail>"``, e.g. ``"started/booted"``,
    ``"suspended/paused"``, ``"stopped/destroyed"``, ``"stopped/saved"``. A reason
    starting with ``"undefined/"`` means the domain no longer exists (its
    ``state`` is then STOPPED); ``"defined/"`` means it was just defined or
    redefined.
    """

    uuid: str
    name: str
    state: DomainState
    reason: str


EventCallback = Callable[[DomainEvent], None]

LostCallback = Callable[[str], None]
"""``lost(reason)``: the hypervisor connection broke (see
:meth:`HypervisorDriver.set_lost_callback`)."""


class MigrationPhase(enum.StrEnum):
    """How far a live migration got; the values read well in error messages."""

    CONNECT = "connect to target"       # reaching the target's hypervisor
    PREPARE = "prepare"                 # checks on both sides, the target's empty domain
    COPY_STORAGE = "copy storage"       # the disk's blocks (copy_storage only)
    MIGRATE_MEMORY = "migrate memory"   # guest memory, the guest still running here
    FINISH = "finish on target"         # guest stopped here, resumed there

    @property
    def order(self) -> int:
        """Position in a migration: phases only move forward."""
        return list(MigrationPhase).index(self)


ProgressCallback = Callable[[MigrationPhase, float], None]
"""``progress(phase, percent)`` during a live migration; percent of that phase, 0-100."""

_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


def check_spec(spec: DomainSpec) -> None:
    """Reject a spec no hypervisor could take, the same way in every driver.

    Raises:
        InvalidRequest: the UUID is not canonical lower case, the MAC is not
            lower-case colon hex, or memory or vCPUs are not positive.
    """
    try:
        canonical = str(uuidlib.UUID(spec.uuid))
    except ValueError:
        canonical = ""
    if canonical != spec.uuid:
        raise InvalidRequest(f"domain UUID {spec.uuid!r} is not a canonical lower-case UUID")
    if not _MAC_RE.match(spec.mac):
        raise InvalidRequest(f"MAC address {spec.mac!r} is not lower-case colon hex")
    if spec.memory_mib <= 0 or spec.vcpus <= 0:
        raise InvalidRequest(
            f"domain {spec.name} needs positive memory and vCPUs "
            f"(got {spec.memory_mib} MiB, {spec.vcpus} vCPUs)")
    if spec.ip is not None:
        try:
            addr = ipaddress.ip_address(spec.ip)
            if spec.ip_prefix is not None:
                ipaddress.ip_network(f"{addr}/{spec.ip_prefix}", strict=False)
            if spec.gateway is not None:
                ipaddress.ip_address(spec.gateway)
        except ValueError as exc:
            raise InvalidRequest(f"domain {spec.name}: bad address: {exc}") from None


def invalid_state(verb: str, uuid: str, name: str, state: DomainState) -> InvalidState:
    """The error for ``verb`` refused because the domain is in ``state``."""
    return InvalidState(
        f"cannot {verb} domain {name}: it is {state.value}",
        details={"uuid": uuid, "name": name, "state": state.value},
    )


class ConsoleStream(abc.ABC):
    """An attached serial console (see :meth:`HypervisorDriver.open_console`)."""

    @abc.abstractmethod
    def write(self, data: bytes) -> None:
        """Send keystrokes to the guest; writing to a closed console is a no-op."""

    @abc.abstractmethod
    def close(self) -> None:
        """Detach; idempotent. ``on_end`` is not called for it."""


class HypervisorDriver(abc.ABC):
    """One hypervisor connection on one host.

    Every method except :meth:`open`, :meth:`close`, :meth:`set_event_callback`
    and :meth:`set_lost_callback` raises :class:`~usher.errors.NotConnected` while
    the driver is not open or its connection is lost, and
    :class:`~usher.errors.HypervisorError` (with the hypervisor's message)
    when the hypervisor fails in a way not named below. Methods taking a
    UUID raise :class:`~usher.errors.DomainNotFound` when no domain has it
    (except :meth:`undefine`, which succeeds).

    A verb that does not fit the domain's current state raises
    :class:`~usher.errors.InvalidState` whose message and ``details['state']``
    name that state. A verb whose goal already holds is a no-op that returns
    the domain as it is (idempotency lets the controller retry after a lost
    reply). Every state-changing verb returns the domain as it is after the
    change and emits the events listed in its docstring.
    """

    name: ClassVar[str]
    capabilities: DriverCapabilities

    @abc.abstractmethod
    def open(self) -> None:
        """Connect to the hypervisor. Calling it while open does nothing.

        Raises:
            HypervisorError: the hypervisor cannot be reached.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Drop the connection and stop delivering events; idempotent.

        Domains keep running: closing a driver never changes the host.
        """

    @abc.abstractmethod
    def set_event_callback(self, cb: EventCallback | None) -> None:
        """Deliver lifecycle events to ``cb`` from now on (None: stop delivering).

        The callback may run on another thread than the caller's (the event
        loop's); it must be quick and must not raise. It may be set before or
        after :meth:`open`.

        Raises:
            HypervisorError: the hypervisor cannot deliver events (for libvirt:
                no event loop implementation is registered).
        """

    def set_lost_callback(self, cb: LostCallback | None) -> None:  # noqa: B027 - optional
        """Call ``cb(reason)`` once each time the open connection is lost (None: stop).

        Lost means broken by the hypervisor's side (its daemon exited or
        stopped answering), never closed by :meth:`close`. From then on every
        method that needs the hypervisor raises
        :class:`~usher.errors.NotConnected` at once (none waits for the dead
        peer) until the caller closes and opens the driver again. Domains are
        not touched: a guest may well outlive its daemon. Like the event
        callback, ``cb`` may run on another thread and must be quick and must
        not raise.

        The default does nothing, for drivers whose hypervisor cannot be
        lost (it lives in this process).
        """

    @abc.abstractmethod
    def host_facts(self) -> HostFacts:
        """The host's name and total size (not what is free)."""

    @abc.abstractmethod
    def list_domains(self) -> list[DomainInfo]:
        """Every domain on the host, including ones usher did not define.

        A domain that disappears while being listed is left out.
        """

    @abc.abstractmethod
    def get_domain(self, uuid: str) -> DomainInfo:
        """The domain with this UUID.

        Raises:
            DomainNotFound: no such domain.
        """

    @abc.abstractmethod
    def define(self, spec: DomainSpec) -> DomainInfo:
        """Define (not start) a persistent domain; idempotent by UUID.

        A domain that already has ``spec.uuid`` is returned as it is, never
        redefined. Emits ``STOPPED "defined/added"`` for a new domain.

        Raises:
            InvalidRequest: the spec is malformed (see :func:`check_spec`).
            DomainExists: another domain (other UUID) already has ``spec.name``.
        """

    @abc.abstractmethod
    def start(self, uuid: str, *, wait_address: bool = True) -> DomainInfo:
        """Boot a stopped or crashed domain, or restore a hibernated one.

        Running: no-op. Emits ``RUNNING "started/booted"`` (or
        ``"started/restored"``). Returns once the domain runs and, with
        ``wait_address``, once the delivery of its address that :meth:`define`
        began (a DHCP host entry) is in place; without, the caller must call
        :meth:`address_ready` before anyone relies on the VM.

        Raises:
            InvalidState: the domain is paused (use :meth:`resume`) or shutting down.
            HypervisorError: (``wait_address``) the address could not be delivered.
        """

    @abc.abstractmethod
    def address_ready(self, uuid: str) -> None:
        """Wait until the delivery of the domain's address that :meth:`define`
        began is in place; at once if none is pending. Any thread may call it,
        it takes no lock the hypervisor's other calls need.

        Raises:
            HypervisorError: the address could not be delivered (in time).
        """

    @abc.abstractmethod
    def shutdown(self, uuid: str, timeout_s: float) -> DomainInfo:
        """Ask the guest to power off (ACPI) and wait until it is stopped.

        Stopped, crashed or hibernated: no-op (a hibernated domain keeps its
        saved image). Emits ``STOPPED "stopped/shutdown"``.

        Raises:
            TimedOut: the guest did not stop within ``timeout_s``; it is left
                running (the caller may :meth:`power_off` it).
            InvalidState: the domain is paused (a paused guest cannot act on ACPI).
        """

    @abc.abstractmethod
    def reboot(self, uuid: str) -> DomainInfo:
        """Ask the guest to reboot; returns at once, the domain stays running.

        No lifecycle event is emitted: the domain never leaves RUNNING.

        Raises:
            InvalidState: the domain is not running.
        """

    @abc.abstractmethod
    def power_off(self, uuid: str) -> DomainInfo:
        """Stop the domain at once, like pulling the plug.

        Stopped, crashed or hibernated: no-op. Emits ``STOPPED "stopped/destroyed"``.
        """

    @abc.abstractmethod
    def pause(self, uuid: str) -> DomainInfo:
        """Freeze a running domain's vCPUs; paused: no-op.

        Emits ``PAUSED "suspended/paused"``.

        Raises:
            InvalidState: the domain is not running.
        """

    @abc.abstractmethod
    def resume(self, uuid: str) -> DomainInfo:
        """Unfreeze a paused domain; running: no-op.

        Emits ``RUNNING "resumed/unpaused"``.

        Raises:
            InvalidState: the domain is neither paused nor running.
        """

    @abc.abstractmethod
    def hibernate(self, uuid: str) -> DomainInfo:
        """Save a running or paused domain's memory and stop it (managed save).

        The domain becomes HIBERNATED; :meth:`start` restores it running.
        Hibernated: no-op. Emits ``HIBERNATED "stopped/saved"``.

        Raises:
            InvalidState: the domain is stopped, crashed or shutting down.
            HypervisorError: the driver cannot save (``capabilities.managed_save``
                is False).
        """

    def flush(self) -> None:  # noqa: B027 - optional: most hypervisors persist on their own
        """Make every change made so far durable before it is reported upward.

        A real hypervisor keeps its own state and needs nothing here (the
        default). A fake host writes its host file. The node manager calls
        this once after each node call, before replying, so the changes of
        calls that ran together cost one write.
        """

    @abc.abstractmethod
    def migrate_live(self, uuid: str, target_uri: str, *, migrate_uri: str | None = None,
                     copy_storage: bool = True, tls: bool = False, timeout_s: float,
                     progress: ProgressCallback | None = None) -> None:
        """Move a running or paused domain to the hypervisor at ``target_uri`` without stopping it.

        The source's hypervisor talks to the target itself (peer to peer):
        ``target_uri`` must be reachable from this host, not only from the
        caller, e.g. ``qemu+tls://vmm2.example.org/system``. ``migrate_uri``
        chooses the address the data goes to (default: the target's choice).
        With ``copy_storage`` the domain's disk is copied to the target
        (incremental: only the overlay's blocks), which must already have the
        same base and an empty overlay of the same virtual size at the same
        path (:meth:`~usher.lnm.images.ImageStore.prepare_incoming`); without
        it the disk must be on storage both hosts share. ``tls`` encrypts the
        data (the target's certificate must match its name in ``target_uri``).

        On success the domain runs (or stays paused) on the target with the
        same UUID, name and usher metadata, and is defined there persistently;
        it is gone from this host (its disk files stay: removing them is the
        caller's business). The source emits ``PAUSED "suspended/migrated"``
        then ``STOPPED "stopped/migrated"`` (and no "undefined/" event: after
        "stopped/migrated" the domain does not exist here). The target's
        driver emits ``RUNNING "started/migrated"``, ``UNKNOWN "defined/added"``
        and then ``RUNNING "resumed/migrated"`` (a paused domain: its paused
        state). On failure the domain keeps running here as before.

        ``progress`` is called on the calling thread every time the phase or
        its percentage moves; it must be quick, and an exception it raises is
        logged and ignored. It is called with ``FINISH`` and 100 last on
        success.

        Raises:
            MigrationUnsupported: this driver cannot migrate live
                (``capabilities.live_migration`` is False); checked first,
                right after the connection.
            InvalidState: the domain is neither running nor paused (a stopped
                domain moves cold, by its disk: the controller's business).
            HostUnavailable: the target could not be reached, or the
                connection to it broke; the message names the phase.
            TimedOut: not done within ``timeout_s``. The migration was aborted
                and the domain still runs here (``details['aborted']``); if the
                abort could not take effect in time, ``details['aborted']`` is
                False and the domain may yet end up on the target.
            HypervisorError: the target or this hypervisor refused or failed
                (``details['phase']`` names the :class:`MigrationPhase`, the
                message names it too; ``details['aborted']`` is True when
                :meth:`abort_migration` ended it).
        """

    @abc.abstractmethod
    def abort_migration(self, uuid: str) -> bool:
        """Abort the domain's outgoing live migration; True if one was running and
        the hypervisor took the abort, False (and nothing done) if none runs.

        May be called from any thread while :meth:`migrate_live` runs (it does
        not wait for it); that call then fails with HypervisorError
        (``details['aborted']`` True) and the domain keeps running here. A
        migration that is already finishing on the target cannot be aborted
        and completes.

        Raises:
            DomainNotFound: no such domain.
        """

    def move_stopped(self, uuid: str, target_uri: str, *, migrate_uri: str | None = None,
                     tls: bool = False, timeout_s: float,
                     progress: ProgressCallback | None = None) -> None:
        """Move a stopped domain and its disk to the hypervisor at ``target_uri``.

        The disk moves the way a live migration copies it (the target has
        prepared an empty overlay, see :meth:`migrate_live`): the domain is
        started here paused, so its vCPUs never run and its disk never
        changes, and migrated live with ``copy_storage``. On success it is
        defined on the target and PAUSED there, never having run: the caller
        powers it off there. On failure it is stopped here again, as it was.
        :meth:`abort_migration` and ``progress`` work as for
        :meth:`migrate_live`. Events: those of a start, then those of a live
        migration.

        The default raises MigrationUnsupported: drivers without live
        migration cannot move disks either.

        Raises:
            MigrationUnsupported: ``capabilities.live_migration`` is False.
            InvalidState: the domain is not stopped.
            DomainNotFound, HostUnavailable, TimedOut, HypervisorError: as
                :meth:`migrate_live`.
        """
        raise MigrationUnsupported(f"{self.name} cannot move domains to another host",
                                   details={"uuid": uuid, "target": target_uri})

    def adopt_incoming(self, uuid: str) -> DomainInfo:
        """Take over a domain that arrived here by migration; returns it as it is.

        Gives it what this host keeps for each of its domains outside the
        domain itself (for libvirt: the DHCP host entry of its address, read
        from its own metadata), which the migration did not bring. Call it
        once the migration has succeeded, not from the event callback; a
        repeat is harmless. The default does nothing more than
        :meth:`get_domain`.

        Raises:
            DomainNotFound: no such domain (it has not arrived).
        """
        return self.get_domain(uuid)

    @abc.abstractmethod
    def open_console(self, uuid: str, on_data: Callable[[bytes], None],
                     on_end: Callable[[str], None]) -> ConsoleStream:
        """Attach to the domain's serial console, taking it from any other holder.

        ``on_data(bytes)`` gets what the guest prints; ``on_end(reason)`` is
        called once if the console ends on its own (the guest stopped, the
        stream broke), never after :meth:`ConsoleStream.close`. Callbacks may
        run on any thread (libvirt's event loop), possibly before this returns.

        Raises:
            DomainNotFound: no such domain.
            InvalidState: the domain is not running or paused.
            HypervisorError: the hypervisor has no console for it.
        """

    @abc.abstractmethod
    def undefine(self, uuid: str) -> None:
        """Remove the domain: power it off if needed, drop its saved image, undefine it.

        A missing domain succeeds (the goal already holds). Emits
        ``STOPPED "stopped/destroyed"`` if it was running, then
        ``STOPPED "undefined/removed"``.
        """

    @abc.abstractmethod
    def domain_stats(self, uuids: Iterable[str] | None = None) -> list[DomainStats]:
        """The resource counters of the domains with ``uuids`` (None: every domain).

        One :class:`DomainStats` per domain, in no particular order. A UUID
        with no domain is left out, and so is a domain that disappears while
        being read; neither is an error. A domain whose counters can be read
        only in part is reported with what could be read (the rest zero): one
        domain never fails the call for the others. Reading changes nothing.

        Raises:
            HypervisorError: the hypervisor could not list the domains at all.
        """
