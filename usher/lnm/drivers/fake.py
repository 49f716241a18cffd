"""An in-memory hypervisor that documents, by running, what every driver does.

:class:`FakeDriver` keeps domains in a dict and follows the contract of
:class:`~usher.lnm.drivers.base.HypervisorDriver` exactly as the libvirt driver
does (the contract suite runs both). Use it where a test needs a node manager
but not a hypervisor, and read it to learn the semantics without libvirt.

What the fake models and libvirt's test driver cannot: a guest that ignores
ACPI (:meth:`FakeDriver.ignore_acpi`), so that shutdown times out; a
hypervisor daemon that dies and comes back (:meth:`FakeDriver.lose_hypervisor`,
:meth:`FakeDriver.restore_hypervisor`) while its guests run on.
What it does not model: time. Every verb completes at once, and a shutdown
that would time out raises TimedOut at once instead of after ``timeout_s``.
Nor other hosts: live migration raises MigrationUnsupported, as on libvirt's
test driver.
Resource counters (:meth:`FakeDriver.domain_stats`) follow the driver's clock
(``clock``, :func:`time.monotonic` by default): a running fake guest keeps
:data:`FAKE_CPU_LOAD` of each vCPU busy and moves bytes at the ``FAKE_*_BPS``
rates; a paused one keeps its counters and memory; a stopped, crashed or
hibernated one reports zeros, and boots (or is restored) with fresh counters,
as a new QEMU process would.
Events are delivered synchronously, on the calling thread, after the change
and outside the driver's lock, so a callback may call back into the driver.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar

from usher.errors import (
    DomainExists,
    DomainNotFound,
    HypervisorError,
    MigrationUnsupported,
    NotConnected,
    TimedOut,
)
from usher.lnm.drivers.base import (
    ConsoleStream,
    DomainEvent,
    DomainInfo,
    DomainSpec,
    DomainState,
    DomainStats,
    DriverCapabilities,
    EventCallback,
    HostFacts,
    HypervisorDriver,
    LostCallback,
    ProgressCallback,
    check_spec,
    invalid_state,
)

log = logging.getLogger(__name__)

_NOT_RUNNING = frozenset({DomainState.STOPPED, DomainState.CRASHED, DomainState.HIBERNATED})

FAKE_CPU_LOAD = 0.25
"""Share of each vCPU a running fake guest keeps busy."""
FAKE_DISK_RD_BPS = 64 * 1024
FAKE_DISK_WR_BPS = 16 * 1024
FAKE_NET_RX_BPS = 8 * 1024
FAKE_NET_TX_BPS = 4 * 1024
"""Bytes per second a running fake guest reads, writes, receives and sends."""


@dataclass(slots=True)
class _Meter:
    """How long a fake domain has run since it booted: its counters follow from that."""

    run_s: float = 0.0
    since: float | None = None  # the clock when it last started running; None: not running


class FakeDriver(HypervisorDriver):
    """A hypervisor made of a dict; the host keeps its domains across close/open.

    ``domains`` are what the host already has when the driver is made, e.g.
    domains usher did not define (owner None).
    """

    name: ClassVar[str] = "fake"

    def __init__(self, *, hostname: str = "fake.usher.example.org", cpus: int = 8,
                 memory_mib: int = 16384, domains: Iterable[DomainInfo] = (),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.capabilities = DriverCapabilities(live_migration=False, managed_save=True,
                                               acpi=True)
        self._facts = HostFacts(hostname=hostname, cpus=cpus, memory_mib=memory_mib,
                                hypervisor="fake")
        self._lock = threading.Lock()
        self._open = False
        self._event_cb: EventCallback | None = None
        self._lost_cb: LostCallback | None = None
        self._down: str | None = None  # why the "daemon" is down; None: it is up
        self._domains: dict[str, DomainInfo] = {d.uuid: d for d in domains}
        self._ignores_acpi: set[str] = set()
        self._clock = clock
        self._meters: dict[str, _Meter] = {
            d.uuid: _Meter(since=clock()) for d in self._domains.values()
            if d.state is DomainState.RUNNING}
        self._consoles: dict[str, _FakeConsole] = {}

    def open(self) -> None:
        """See :meth:`HypervisorDriver.open`; fails only while the hypervisor is down.

        Raises:
            HypervisorError: :meth:`lose_hypervisor` was called and
                :meth:`restore_hypervisor` not yet.
        """
        with self._lock:
            if self._down is not None:
                raise HypervisorError(f"cannot connect to the fake hypervisor: {self._down}")
            self._open = True

    def close(self) -> None:
        """See :meth:`HypervisorDriver.close`."""
        self._open = False

    def set_event_callback(self, cb: EventCallback | None) -> None:
        """See :meth:`HypervisorDriver.set_event_callback`; callbacks run synchronously."""
        self._event_cb = cb

    def set_lost_callback(self, cb: LostCallback | None) -> None:
        """See :meth:`HypervisorDriver.set_lost_callback`; fired by :meth:`lose_hypervisor`."""
        self._lost_cb = cb

    def lose_hypervisor(self, reason: str = "the hypervisor daemon exited") -> None:
        """Test hook: the hypervisor's daemon dies; its domains keep their states.

        The connection is lost (calls raise NotConnected, the lost callback
        gets ``reason`` on the calling thread) and :meth:`open` fails until
        :meth:`restore_hypervisor`.
        """
        with self._lock:
            was_open, self._open, self._down = self._open, False, reason
        cb = self._lost_cb
        if was_open and cb is not None:
            cb(reason)

    def restore_hypervisor(self) -> None:
        """Test hook: the daemon is back; :meth:`open` works again."""
        with self._lock:
            self._down = None

    def ignore_acpi(self, uuid: str, ignore: bool = True) -> None:
        """Make the guest of ``uuid`` ignore (or again obey) ACPI shutdown requests."""
        with self._lock:
            if ignore:
                self._ignores_acpi.add(uuid)
            else:
                self._ignores_acpi.discard(uuid)

    def host_facts(self) -> HostFacts:
        """See :meth:`HypervisorDriver.host_facts`."""
        self._check_open()
        return self._facts

    def list_domains(self) -> list[DomainInfo]:
        """See :meth:`HypervisorDriver.list_domains`."""
        self._check_open()
        with self._lock:
            return list(self._domains.values())

    def get_domain(self, uuid: str) -> DomainInfo:
        """See :meth:`HypervisorDriver.get_domain`."""
        with self._lock:
            return self._get(uuid)

    def define(self, spec: DomainSpec) -> DomainInfo:
        """See :meth:`HypervisorDriver.define`."""
        check_spec(spec)
        with self._lock:
            self._check_open()
            existing = self._domains.get(spec.uuid)
            if existing is not None:
                return existing
            for other in self._domains.values():
                if other.name == spec.name:
                    raise DomainExists(
                        f"domain name {spec.name} is taken by domain {other.uuid}",
                        details={"name": spec.name, "uuid": other.uuid})
            info = DomainInfo(uuid=spec.uuid, name=spec.name, state=DomainState.STOPPED,
                              memory_mib=spec.memory_mib, vcpus=spec.vcpus, owner=spec.owner,
                              task_id=spec.task_id, mac=spec.mac)
            self._domains[spec.uuid] = info
        self._emit(info, "defined/added")
        return info

    def address_ready(self, uuid: str) -> None:
        """See :meth:`HypervisorDriver.address_ready`: fake domains get no address entry."""

    def start(self, uuid: str, *, wait_address: bool = True) -> DomainInfo:
        """See :meth:`HypervisorDriver.start`."""
        with self._lock:
            info = self._get(uuid)
            if info.state is DomainState.RUNNING:
                return info
            if info.state not in _NOT_RUNNING:
                raise invalid_state("start", uuid, info.name, info.state)
            reason = ("started/restored" if info.state is DomainState.HIBERNATED
                      else "started/booted")
            info = self._set(info, DomainState.RUNNING)
        self._emit(info, reason)
        return info

    def shutdown(self, uuid: str, timeout_s: float) -> DomainInfo:
        """See :meth:`HypervisorDriver.shutdown`. A cooperating guest stops at once;
        one set to :meth:`ignore_acpi` makes this raise TimedOut at once."""
        with self._lock:
            info = self._get(uuid)
            if info.state in _NOT_RUNNING:
                return info
            if info.state not in (DomainState.RUNNING, DomainState.SHUTTING_DOWN):
                raise invalid_state("shut down", uuid, info.name, info.state)
            if uuid in self._ignores_acpi:
                raise TimedOut(f"domain {info.name} did not shut down within {timeout_s:g} s",
                               details={"uuid": uuid, "timeout_s": timeout_s})
            info = self._set(info, DomainState.STOPPED)
        self._emit(info, "stopped/shutdown")
        return info

    def reboot(self, uuid: str) -> DomainInfo:
        """See :meth:`HypervisorDriver.reboot`."""
        with self._lock:
            info = self._get(uuid)
            if info.state is not DomainState.RUNNING:
                raise invalid_state("reboot", uuid, info.name, info.state)
            return info

    def power_off(self, uuid: str) -> DomainInfo:
        """See :meth:`HypervisorDriver.power_off`."""
        with self._lock:
            info = self._get(uuid)
            if info.state in _NOT_RUNNING:
                return info
            info = self._set(info, DomainState.STOPPED)
        self._emit(info, "stopped/destroyed")
        return info

    def pause(self, uuid: str) -> DomainInfo:
        """See :meth:`HypervisorDriver.pause`."""
        with self._lock:
            info = self._get(uuid)
            if info.state is DomainState.PAUSED:
                return info
            if info.state is not DomainState.RUNNING:
                raise invalid_state("pause", uuid, info.name, info.state)
            info = self._set(info, DomainState.PAUSED)
        self._emit(info, "suspended/paused")
        return info

    def resume(self, uuid: str) -> DomainInfo:
        """See :meth:`HypervisorDriver.resume`."""
        with self._lock:
            info = self._get(uuid)
            if info.state is DomainState.RUNNING:
                return info
            if info.state is not DomainState.PAUSED:
                raise invalid_state("resume", uuid, info.name, info.state)
            info = self._set(info, DomainState.RUNNING)
        self._emit(info, "resumed/unpaused")
        return info

    def hibernate(self, uuid: str) -> DomainInfo:
        """See :meth:`HypervisorDriver.hibernate`."""
        with self._lock:
            info = self._get(uuid)
            if info.state is DomainState.HIBERNATED:
                return info
            if info.state not in (DomainState.RUNNING, DomainState.PAUSED):
                raise invalid_state("hibernate", uuid, info.name, info.state)
            if not self.capabilities.managed_save:
                raise HypervisorError("the fake host cannot hibernate domains")
            info = self._set(info, DomainState.HIBERNATED)
        self._emit(info, "stopped/saved")
        return info

    def migrate_live(self, uuid: str, target_uri: str, *, migrate_uri: str | None = None,
                     copy_storage: bool = True, tls: bool = False, timeout_s: float,
                     progress: ProgressCallback | None = None) -> None:
        """See :meth:`HypervisorDriver.migrate_live`: the fake host has no peers."""
        self._check_open()
        raise MigrationUnsupported("the fake host cannot migrate domains live",
                                   details={"uuid": uuid, "target": target_uri})

    def abort_migration(self, uuid: str) -> bool:
        """See :meth:`HypervisorDriver.abort_migration`: no migration ever runs."""
        with self._lock:
            self._get(uuid)
        return False

    def open_console(self, uuid: str, on_data: Callable[[bytes], None],
                     on_end: Callable[[str], None]) -> ConsoleStream:
        """See :meth:`HypervisorDriver.open_console`. The fake guest prints a
        banner, then echoes what is typed (a carriage return as CR LF), like a
        shell on a serial line; its console ends when the domain stops."""
        with self._lock:
            info = self._get(uuid)
            if info.state not in (DomainState.RUNNING, DomainState.PAUSED):
                raise invalid_state("open the console of", uuid, info.name, info.state)
            old = self._consoles.pop(uuid, None)
            console = _FakeConsole(self, uuid, on_data, on_end)
            self._consoles[uuid] = console
        if old is not None:
            old.end("another session took the console")
        on_data(f"[fake console of {info.name}]\r\n".encode())
        return console

    def _end_console(self, uuid: str, reason: str) -> None:
        """The domain stopped: its console ends (the caller holds no lock)."""
        with self._lock:
            console = self._consoles.pop(uuid, None)
        if console is not None:
            console.end(reason)

    def undefine(self, uuid: str) -> None:
        """See :meth:`HypervisorDriver.undefine`."""
        events: list[tuple[DomainInfo, str]] = []
        with self._lock:
            self._check_open()
            info = self._domains.pop(uuid, None)
            self._ignores_acpi.discard(uuid)
            self._meters.pop(uuid, None)
            if info is None:
                return
            if info.state not in _NOT_RUNNING:
                info = dataclasses.replace(info, state=DomainState.STOPPED)
                events.append((info, "stopped/destroyed"))
            events.append((dataclasses.replace(info, state=DomainState.STOPPED),
                           "undefined/removed"))
        for event_info, reason in events:
            self._emit(event_info, reason)

    def _check_open(self) -> None:
        if not self._open:
            raise NotConnected("fake driver is not open")

    def _get(self, uuid: str) -> DomainInfo:
        """The domain ``uuid``; the caller holds the lock."""
        self._check_open()
        try:
            return self._domains[uuid]
        except KeyError:
            raise DomainNotFound(f"no domain with UUID {uuid}", details={"uuid": uuid}) from None

    def _set(self, info: DomainInfo, state: DomainState) -> DomainInfo:
        """Record ``info`` in ``state``; the caller holds the lock."""
        self._meter(info.uuid, state)
        info = dataclasses.replace(info, state=state)
        self._domains[info.uuid] = info
        return info

    def domain_stats(self, uuids: Iterable[str] | None = None) -> list[DomainStats]:
        """See :meth:`HypervisorDriver.domain_stats` and the module docstring."""
        with self._lock:
            self._check_open()
            now = self._clock()
            if uuids is None:
                infos = list(self._domains.values())
            else:
                infos = [self._domains[u] for u in dict.fromkeys(uuids) if u in self._domains]
            return [self._stats(info, now) for info in infos]

    def _stats(self, info: DomainInfo, now: float) -> DomainStats:
        """The counters of ``info`` at clock ``now``; the caller holds the lock."""
        if info.state not in (DomainState.RUNNING, DomainState.PAUSED):
            return DomainStats(uuid=info.uuid)
        meter = self._meters.get(info.uuid) or _Meter()
        run_s = meter.run_s + (now - meter.since if meter.since is not None else 0.0)
        memory_kib = info.memory_mib * 1024
        return DomainStats(uuid=info.uuid, cpu_ns=int(run_s * 1e9 * FAKE_CPU_LOAD * info.vcpus),
                           memory_kib=memory_kib, rss_kib=memory_kib // 2,
                           disk_rd_bytes=int(run_s * FAKE_DISK_RD_BPS),
                           disk_wr_bytes=int(run_s * FAKE_DISK_WR_BPS),
                           net_rx_bytes=int(run_s * FAKE_NET_RX_BPS),
                           net_tx_bytes=int(run_s * FAKE_NET_TX_BPS))

    def _meter(self, uuid: str, state: DomainState) -> None:
        """Follow a change to ``state`` in the domain's meter; the caller holds the lock."""
        meter = self._meters.setdefault(uuid, _Meter())
        now = self._clock()
        if meter.since is not None:
            meter.run_s += now - meter.since
            meter.since = None
        if state is DomainState.RUNNING:
            meter.since = now
        elif state in _NOT_RUNNING:
            meter.run_s = 0.0  # the next boot is a new process with fresh counters

    def _emit(self, info: DomainInfo, reason: str) -> None:
        if info.state not in (DomainState.RUNNING, DomainState.PAUSED):
            self._end_console(info.uuid, f"the domain is {info.state.value}")
        cb = self._event_cb
        if cb is None:
            return
        try:
            cb(DomainEvent(uuid=info.uuid, name=info.name, state=info.state, reason=reason))
        except Exception:
            # As with libvirt: a broken callback must not undo a finished change.
            log.exception("domain event callback failed for %s %s", info.name, reason)


class _FakeConsole(ConsoleStream):
    """The fake guest's serial line: echo, as a shell in cooked mode would."""

    def __init__(self, driver: FakeDriver, uuid: str, on_data: Callable[[bytes], None],
                 on_end: Callable[[str], None]) -> None:
        self._driver = driver
        self._uuid = uuid
        self._on_data = on_data
        self._on_end = on_end
        self._closed = False

    def write(self, data: bytes) -> None:
        if not self._closed:
            self._on_data(data.replace(b"\r", b"\r\n"))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            with self._driver._lock:
                if self._driver._consoles.get(self._uuid) is self:
                    del self._driver._consoles[self._uuid]

    def end(self, reason: str) -> None:
        if not self._closed:
            self._closed = True
            self._on_end(reason)
