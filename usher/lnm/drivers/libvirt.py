"""The libvirt hypervisor driver, for any libvirt URI.

:class:`LibvirtDriver` drives ``qemu:///system`` on real hosts and libvirt's
in-library test driver (``test:///...``) in tests and on fake hosts
(:mod:`usher.lnm.fakehost`). Every libvirt error is translated into an usher
error by :func:`libvirt_errors`, the one place that knows libvirt's error codes.

Events: the driver subscribes to libvirt lifecycle events and turns each into a
:class:`~usher.lnm.drivers.base.DomainEvent`. libvirt delivers events only
through a registered event loop implementation: the node manager calls
``libvirtaio.virEventRegisterAsyncIOImpl()`` on its running asyncio loop once
per process, before the first driver subscribes. Callbacks then run on that
loop's thread. The driver emits no events of its own: the test driver reports
every verb except reboot, which (like a guest reboot under QEMU) leaves the
domain RUNNING and produces no lifecycle event.

Losing libvirtd: the driver registers a connection close callback (delivered
by the same event loop) and reports the loss through the lost callback
(:meth:`~usher.lnm.drivers.base.HypervisorDriver.set_lost_callback`); from then
on every call raises NotConnected at once, as does any call that meets the
broken connection before the callback has run. A daemon that dies closes the
socket (reported at once); one that hangs is caught by libvirt's client
keepalive, which the remote driver runs by itself once an event loop is
registered (every 5 s, lost after 5 unanswered: about 30 s). Reconnecting is
the caller's business (``close`` then ``open``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import ipaddress
import logging
import queue
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlsplit

import libvirt

from usher.errors import (
    ConfigError,
    DomainExists,
    DomainNotFound,
    HypervisorError,
    InvalidState,
    MigrationUnsupported,
    NotConnected,
    TimedOut,
    UsherError,
)
from usher.lnm.domxml import build_domain_xml, domain_type_for_uri, parse_domain_xml
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
from usher.lnm.drivers.libvirt_migration import abort_outgoing, migration_flags, run_migration

if TYPE_CHECKING:
    from usher.lnm.fakehost import FakeHost

log = logging.getLogger(__name__)
DHCP_UPDATE_TIMEOUT_S = 30.0

# Shutdown polls the domain's state; start fast (the test driver and idle
# guests stop at once), back off so a slow guest costs few calls.
_POLL_FIRST_S = 0.005
_POLL_MAX_S = 0.25

_NOT_RUNNING = frozenset({DomainState.STOPPED, DomainState.CRASHED, DomainState.HIBERNATED})

# Parsing is most of the cost of listing domains and their XML rarely changes:
# remember the facts of recent XML texts (about 1.5 KiB each; bounded).
_parse_domain_xml = functools.lru_cache(maxsize=2048)(parse_domain_xml)


# libvirt errors of the connection itself (libvirtd died, the socket broke):
# the domain or verb is not at fault, so they are NotConnected, not HypervisorError.
_CONNECTION_CODES = frozenset({
    libvirt.VIR_ERR_NO_CONNECT,
    libvirt.VIR_ERR_SYSTEM_ERROR,     # "End of file while reading data", "Broken pipe"
    libvirt.VIR_ERR_RPC,
    libvirt.VIR_ERR_INTERNAL_ERROR,   # "client socket is closed", keepalive timeout
})


@contextmanager
def libvirt_errors(action: str, uuid: str | None = None, *,
                   connecting: bool = False) -> Iterator[None]:
    """Translate libvirt errors raised inside the block into usher errors.

    VIR_ERR_NO_DOMAIN becomes DomainNotFound, VIR_ERR_OPERATION_INVALID
    InvalidState, VIR_ERR_DOM_EXIST DomainExists, a broken connection (an
    RPC error, e.g. libvirtd exited) NotConnected, anything else
    HypervisorError; each keeps libvirt's message and code in ``details``.
    While ``connecting`` a connection that cannot be made is a
    HypervisorError, as :meth:`HypervisorDriver.open` promises.
    """
    try:
        yield
    except libvirt.libvirtError as e:
        code = e.get_error_code()
        details: dict[str, Any] = {"libvirt_code": code}
        if uuid is not None:
            details["uuid"] = uuid
        message = f"{action}: {e.get_error_message() or e}"
        if code == libvirt.VIR_ERR_NO_DOMAIN:
            raise DomainNotFound(
                f"{action}: no domain with UUID {uuid}" if uuid else message,
                details=details) from e
        if code == libvirt.VIR_ERR_OPERATION_INVALID:
            raise InvalidState(message, details=details) from e
        if code == libvirt.VIR_ERR_DOM_EXIST:
            raise DomainExists(message, details=details) from e
        if "virtlogd-sock" in message:
            # The daemon's connection is fine; its log daemon is not there.
            raise HypervisorError(
                f"{message} (virtlogd is not running: start `virtlogd -d`, or on "
                "qemu:///embed set stdio_handler = \"file\" in ROOT/etc/qemu.conf)",
                details=details) from e
        if (not connecting and code in _CONNECTION_CODES
                and e.get_error_domain() in (libvirt.VIR_FROM_RPC, libvirt.VIR_FROM_REMOTE)):
            raise NotConnected(message, details=details) from e
        raise HypervisorError(message, details=details) from e


_CLOSE_REASONS = {
    libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: "connection error",
    libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "end of file (the daemon exited)",
    libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "keepalive timeout (the daemon stopped "
                                                "answering)",
    libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT: "closed by the client",
}


def _log_libvirt_error(_ctx: object, err: Any) -> None:
    # libvirt prints every error to stderr, even ones we catch and expect
    # (a lookup that misses); the translated exception is what matters.
    log.debug("libvirt: %s", err[2] if isinstance(err, tuple) and len(err) > 2 else err)


def capabilities_for_uri(uri: str) -> DriverCapabilities:
    """Policy: what the hypervisor behind ``uri`` supports."""
    scheme = urlsplit(uri).scheme.split("+", 1)[0]
    if scheme == "test":
        # virDomainMigrate is unsupported by the test driver; managedSave works.
        return DriverCapabilities(live_migration=False, managed_save=True, acpi=True)
    if scheme == "qemu":
        return DriverCapabilities(live_migration=True, managed_save=True, acpi=True)
    return DriverCapabilities(live_migration=False, managed_save=False, acpi=True)


def _detail_names(event: str) -> dict[int, str]:
    """libvirt's detail codes of one lifecycle event, by their constant names."""
    prefix = f"VIR_DOMAIN_EVENT_{event.upper()}_"
    return {
        getattr(libvirt, name): name[len(prefix):].lower()
        for name in dir(libvirt)
        if name.startswith(prefix) and not name.endswith("_LAST")
    }


# libvirt lifecycle event -> (reason prefix, usher state, detail names).
_EVENTS: dict[int, tuple[str, DomainState, dict[int, str]]] = {
    ev: (name, state, _detail_names(name))
    for ev, name, state in [
        (libvirt.VIR_DOMAIN_EVENT_DEFINED, "defined", DomainState.UNKNOWN),
        (libvirt.VIR_DOMAIN_EVENT_UNDEFINED, "undefined", DomainState.STOPPED),
        (libvirt.VIR_DOMAIN_EVENT_STARTED, "started", DomainState.RUNNING),
        (libvirt.VIR_DOMAIN_EVENT_SUSPENDED, "suspended", DomainState.PAUSED),
        (libvirt.VIR_DOMAIN_EVENT_RESUMED, "resumed", DomainState.RUNNING),
        (libvirt.VIR_DOMAIN_EVENT_STOPPED, "stopped", DomainState.STOPPED),
        (libvirt.VIR_DOMAIN_EVENT_SHUTDOWN, "shutdown", DomainState.SHUTTING_DOWN),
        (libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED, "pmsuspended", DomainState.PAUSED),
        (libvirt.VIR_DOMAIN_EVENT_CRASHED, "crashed", DomainState.CRASHED),
    ]
}


def lifecycle_event(uuid: str, name: str, event: int, detail: int, *,
                    arriving: bool = False) -> DomainEvent:
    """The usher event for libvirt lifecycle ``event`` with ``detail``.

    ``arriving``: the domain is coming in by live migration (it started
    "migrated" and has not run on its own yet).
    """
    prefix, state, details = _EVENTS.get(event, ("event", DomainState.UNKNOWN, {}))
    detail_name = details.get(detail, str(detail))
    if event == libvirt.VIR_DOMAIN_EVENT_DEFINED and detail_name == "added" and not arriving:
        # A new definition is never running; a redefinition may be, and so
        # may a domain that arrives by migration (defined after it started
        # here): then the receiver has to look (state stays UNKNOWN).
        state = DomainState.STOPPED
    elif event == libvirt.VIR_DOMAIN_EVENT_STOPPED and detail_name == "saved":
        state = DomainState.HIBERNATED
    elif event == libvirt.VIR_DOMAIN_EVENT_STOPPED and detail_name == "crashed":
        state = DomainState.CRASHED
    return DomainEvent(uuid=uuid, name=name, state=state, reason=f"{prefix}/{detail_name}")


def _usher_state(state: int, reason: int, has_managed_save: Callable[[], bool]) -> DomainState:
    if state in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED):
        return DomainState.RUNNING
    if state in (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PMSUSPENDED):
        return DomainState.PAUSED
    if state == libvirt.VIR_DOMAIN_SHUTDOWN:
        return DomainState.SHUTTING_DOWN
    if state == libvirt.VIR_DOMAIN_CRASHED:
        return DomainState.CRASHED
    if state == libvirt.VIR_DOMAIN_SHUTOFF:
        if has_managed_save():
            return DomainState.HIBERNATED
        if reason == libvirt.VIR_DOMAIN_SHUTOFF_CRASHED:
            return DomainState.CRASHED
        return DomainState.STOPPED
    return DomainState.UNKNOWN


# What domain_stats asks libvirt for, in one virConnectGetAllDomainStats call.
_STATS_FLAGS = (libvirt.VIR_DOMAIN_STATS_STATE | libvirt.VIR_DOMAIN_STATS_CPU_TOTAL
                | libvirt.VIR_DOMAIN_STATS_BALLOON | libvirt.VIR_DOMAIN_STATS_INTERFACE
                | libvirt.VIR_DOMAIN_STATS_BLOCK)
# libvirt states in which a domain has a process whose counters mean something.
_ACTIVE_STATES = frozenset({libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED,
                            libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_SHUTDOWN,
                            libvirt.VIR_DOMAIN_PMSUSPENDED})


def stats_from_record(uuid: str, record: dict[str, Any]) -> DomainStats:
    """The counters of one ``virConnectGetAllDomainStats`` record of an active domain.

    Sums the ``block.N.*`` and ``net.N.*`` entries over all disks and
    interfaces; a missing entry counts as zero (an empty CD-ROM drive has no
    byte counts). ``balloon.rss`` is reported by newer libvirt only.
    """
    def total(group: str, key: str) -> int:
        count = int(record.get(f"{group}.count", 0))
        return sum(int(record.get(f"{group}.{i}.{key}", 0)) for i in range(count))

    rss = record.get("balloon.rss")
    return DomainStats(uuid=uuid, cpu_ns=int(record.get("cpu.time", 0)),
                       memory_kib=int(record.get("balloon.current", 0)),
                       rss_kib=int(rss) if rss is not None else None,
                       disk_rd_bytes=total("block", "rd.bytes"),
                       disk_wr_bytes=total("block", "wr.bytes"),
                       net_rx_bytes=total("net", "rx.bytes"),
                       net_tx_bytes=total("net", "tx.bytes"))


def _quietly(call: Callable[..., Any], *args: Any) -> Any:
    """``call(*args)``, or None if libvirt refuses (a counter it cannot read)."""
    try:
        return call(*args)
    except libvirt.libvirtError as exc:
        log.debug("%s%s: %s", getattr(call, "__name__", "call"), args, exc)
        return None


class LibvirtDriver(HypervisorDriver):
    """A :class:`HypervisorDriver` over one libvirt connection.

    ``domain_type`` overrides the policy of
    :func:`~usher.lnm.domxml.domain_type_for_uri`. With ``fake_host`` (whose
    URI must be ``uri``) every mutating call rewrites the fake host's file
    before it returns, so the host survives a restart of the node manager.

    Raises (constructor):
        ConfigError: no domain type policy for ``uri``, or ``fake_host`` is for
            another URI.
    """

    name: ClassVar[str] = "libvirt"

    def __init__(self, uri: str, *, domain_type: str | None = None,
                 fake_host: FakeHost | None = None, network: str = "default") -> None:
        if fake_host is not None and fake_host.uri != uri:
            raise ConfigError(f"fake host {fake_host.uri} does not match URI {uri}")
        self.uri = uri
        self.network = network
        self._dhcp: _Dhcp | None = None
        # DHCP updates of a live network cost ~0.3 s (libvirt reloads dnsmasq):
        # they run beside the boot, one after the other, on one worker thread
        # (a thread per entry cost more than the entry on a busy host).
        self._dhcp_lock = threading.RLock()
        self._dhcp_worker = _Worker("usher-dhcp")
        self._dhcp_jobs: dict[str, concurrent.futures.Future[None]] = {}
        self.domain_type = domain_type or domain_type_for_uri(uri)
        self.capabilities = capabilities_for_uri(uri)
        self._fake_host = fake_host
        self._dirty: set[str] = set()  # domains changed since the last flush
        # Guards the connection, the subscription and the fake host's file
        # against the event thread and overlapping callers.
        self._lock = threading.RLock()
        self._conn: libvirt.virConnect | None = None
        self._event_cb: EventCallback | None = None
        self._callback_id: int | None = None
        self._lost_cb: LostCallback | None = None
        self._lost: str | None = None  # why the open connection broke; None: it did not
        self._arriving: set[str] = set()  # domains coming in by migration (event thread only)

    # -- connection and events -------------------------------------------------

    def open(self) -> None:
        """Connect to ``uri``; idempotent. See :meth:`HypervisorDriver.open`."""
        with self._lock:
            if self._conn is not None:
                return
            libvirt.registerErrorHandler(_log_libvirt_error, None)
            if self._fake_host is not None:
                self._fake_host.compact()  # libvirt reads the file, not the journal
            with libvirt_errors(f"connect to {self.uri}", connecting=True):
                self._conn = libvirt.open(self.uri)
            self._lost = None
            try:
                self._watch_close()
                if self._event_cb is not None:
                    self._subscribe()
                # A fresh connection starts from the file: rescan it all once.
                self._save_fake_host(None)
                self._dhcp_sync()
            except BaseException:
                self.close()
                raise

    def close(self) -> None:
        """Flush, unsubscribe and disconnect; idempotent. Domains keep running."""
        with self._lock:
            if self._conn is not None:
                try:
                    self.flush()
                except UsherError:
                    log.exception("saving fake host %s failed", self.uri)
            for uuid in list(self._dhcp_jobs):
                self._dhcp_wait_quietly(uuid)
            self._dhcp_worker.stop()
            conn, self._conn = self._conn, None
            self._dhcp = None
            self._lost = None
            if conn is None:
                return
            try:
                conn.unregisterCloseCallback()
            except libvirt.libvirtError:
                log.debug("unregistering the close callback on %s failed", self.uri,
                          exc_info=True)
            if self._callback_id is not None:
                callback_id, self._callback_id = self._callback_id, None
                try:
                    conn.domainEventDeregisterAny(callback_id)
                except libvirt.libvirtError:
                    log.debug("deregistering events on %s failed", self.uri, exc_info=True)
            try:
                conn.close()
            except libvirt.libvirtError:
                log.debug("closing %s failed", self.uri, exc_info=True)

    def set_event_callback(self, cb: EventCallback | None) -> None:
        """See :meth:`HypervisorDriver.set_event_callback`.

        Subscribing needs a libvirt event loop implementation registered first
        (``libvirtaio.virEventRegisterAsyncIOImpl()``); without one this raises
        HypervisorError.
        """
        with self._lock:
            self._event_cb = cb
            if self._conn is None:
                return
            if cb is not None and self._callback_id is None:
                self._subscribe()
            elif cb is None and self._callback_id is not None:
                callback_id, self._callback_id = self._callback_id, None
                with libvirt_errors("unsubscribe from domain events"):
                    self._conn.domainEventDeregisterAny(callback_id)

    def set_lost_callback(self, cb: LostCallback | None) -> None:
        """See :meth:`HypervisorDriver.set_lost_callback`. The loss is noticed by
        libvirt's close callback, so like events it needs an event loop
        implementation; without one, calls still fail with NotConnected."""
        self._lost_cb = cb

    def _watch_close(self) -> None:
        assert self._conn is not None
        try:
            self._conn.registerCloseCallback(self._on_close, None)
        except libvirt.libvirtError as e:
            # Losing it then shows only as calls failing with NotConnected.
            log.debug("no close callback on %s: %s", self.uri, e.get_error_message() or e)

    def _on_close(self, conn: Any, reason: int, _opaque: Any) -> None:
        # Runs on the event loop's thread: no libvirt calls, nothing may escape,
        # and no driver lock (a call stuck on the dead daemon may hold it).
        if conn is not self._conn or self._lost is not None:
            return  # an old connection's, or told already
        text = _CLOSE_REASONS.get(reason, f"reason {reason}")
        self._lost = text
        log.warning("lost the connection to %s: %s", self.uri, text)
        cb = self._lost_cb
        if cb is None:
            return
        try:
            cb(f"{self.uri}: {text}")
        except Exception:
            log.exception("lost-connection callback failed")

    def _subscribe(self) -> None:
        assert self._conn is not None
        with libvirt_errors("subscribe to domain events (is an event loop registered?)"):
            self._callback_id = self._conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None)

    def _on_lifecycle(self, _conn: Any, dom: Any, event: int, detail: int,
                      _opaque: Any) -> None:
        # Runs on the event loop's thread: no libvirt calls here (UUID and name
        # are held by the handle), nothing may escape into libvirt's loop.
        cb = self._event_cb
        if cb is None:
            return
        try:
            uuid = dom.UUIDString()
            # An incoming migration starts the domain, then defines it
            # (persistent on the target), then resumes it: its "defined/added"
            # must not claim that it is stopped.
            arriving = uuid in self._arriving
            if event == libvirt.VIR_DOMAIN_EVENT_STARTED:
                if detail == libvirt.VIR_DOMAIN_EVENT_STARTED_MIGRATED:
                    self._arriving.add(uuid)
            elif event != libvirt.VIR_DOMAIN_EVENT_DEFINED:
                self._arriving.discard(uuid)
            cb(lifecycle_event(uuid, dom.name(), event, detail, arriving=arriving))
        except Exception:
            log.exception("domain event callback failed for event %s/%s", event, detail)

    # -- reading ---------------------------------------------------------------

    def host_facts(self) -> HostFacts:
        """See :meth:`HypervisorDriver.host_facts`; a fake host's name and size
        come from its file (libvirt reports the machine's hostname)."""
        conn = self._connection()
        with libvirt_errors("read host facts"):
            info = conn.getInfo()
            hostname = (self._fake_host.hostname if self._fake_host is not None
                        else conn.getHostname())
        return HostFacts(hostname=hostname, cpus=int(info[2]), memory_mib=int(info[1]),
                         hypervisor=self.uri)

    def list_domains(self) -> list[DomainInfo]:
        """See :meth:`HypervisorDriver.list_domains`."""
        conn = self._connection()
        with libvirt_errors("list domains"):
            doms = conn.listAllDomains()
            saved = {d.UUIDString()
                     for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_MANAGEDSAVE)}
        infos = []
        for dom in doms:
            try:
                infos.append(self._info(dom, has_managed_save=dom.UUIDString() in saved))
            except DomainNotFound:
                continue
        return infos

    def get_domain(self, uuid: str) -> DomainInfo:
        """See :meth:`HypervisorDriver.get_domain`."""
        return self._info(self._lookup(uuid))

    def domain_stats(self, uuids: Iterable[str] | None = None) -> list[DomainStats]:
        """See :meth:`HypervisorDriver.domain_stats`.

        One virConnectGetAllDomainStats call (virDomainListGetStats for given
        UUIDs) asks for state, CPU time, balloon, interfaces and disks. Where
        an active domain's record lacks the CPU time (libvirt's test driver
        reports the state only), its counters are read one call at a time
        instead (virDomainGetInfo, virDomainBlockStats, virDomainInterfaceStats,
        virDomainMemoryStats), each counter that fails staying zero.
        """
        conn = self._connection()
        with libvirt_errors("read domain statistics"):
            if uuids is None:
                records = conn.getAllDomainStats(_STATS_FLAGS)
            else:
                doms = [dom for dom in (self._find(conn.lookupByUUIDString, u)
                                        for u in dict.fromkeys(uuids)) if dom is not None]
                records = conn.domainListGetStats(doms, _STATS_FLAGS) if doms else []
        stats = []
        for dom, record in records:
            try:
                stats.append(self._stats(dom, record))
            except DomainNotFound:
                continue  # gone meanwhile
            except UsherError as exc:
                log.warning("statistics of domain %s: %s", dom.UUIDString(), exc.message)
                stats.append(DomainStats(uuid=dom.UUIDString()))
        return stats

    def _stats(self, dom: Any, record: dict[str, Any]) -> DomainStats:
        uuid = dom.UUIDString()
        state = record.get("state.state")
        if state is None:
            with libvirt_errors("read domain state", uuid):
                state = dom.state()[0]
        if state not in _ACTIVE_STATES:
            return DomainStats(uuid=uuid)
        if "cpu.time" in record:
            return stats_from_record(uuid, record)
        with libvirt_errors("read domain statistics", uuid):
            info = dom.info()
            root = ET.fromstring(dom.XMLDesc(0))
        rd = wr = rx = tx = 0
        for disk in root.iterfind("devices/disk/target"):
            block = _quietly(dom.blockStats, disk.get("dev"))
            if block is not None:  # (rd_req, rd_bytes, wr_req, wr_bytes, errs)
                rd, wr = rd + int(block[1]), wr + int(block[3])
        for iface in root.iterfind("devices/interface"):
            target, mac = iface.find("target"), iface.find("mac")
            dev = target.get("dev") if target is not None else None
            if dev is None and mac is not None:
                dev = mac.get("address")  # libvirt takes the MAC address too
            net = _quietly(dom.interfaceStats, dev) if dev else None
            if net is not None:  # (rx_bytes, rx_packets, rx_errs, rx_drop, tx_bytes, ...)
                rx, tx = rx + int(net[0]), tx + int(net[4])
        memory = _quietly(dom.memoryStats) or {}
        rss = memory.get("rss")
        return DomainStats(uuid=uuid, cpu_ns=int(info[4]), memory_kib=int(info[2]),
                           rss_kib=int(rss) if rss is not None else None,
                           disk_rd_bytes=rd, disk_wr_bytes=wr, net_rx_bytes=rx, net_tx_bytes=tx)

    # -- changing --------------------------------------------------------------

    def define(self, spec: DomainSpec) -> DomainInfo:
        """See :meth:`HypervisorDriver.define`."""
        check_spec(spec)
        with self._changing(spec.uuid):
            conn = self._connection()
            dom = self._find(conn.lookupByUUIDString, spec.uuid)
            if dom is None:
                clash = self._find(conn.lookupByName, spec.name)
                if clash is not None:
                    raise DomainExists(
                        f"domain name {spec.name} is taken by domain {clash.UUIDString()}",
                        details={"name": spec.name, "uuid": clash.UUIDString()})
                with libvirt_errors(f"define {spec.name}", spec.uuid):
                    dom = conn.defineXML(build_domain_xml(spec, self.domain_type,
                                                          network=self.network))
            # Also for a domain that exists: a retried define after a crash
            # between the two steps still gets its address handed out. A
            # kernel booted directly has it on its command line instead.
            if spec.ip is not None and spec.kernel is None:
                self._dhcp_add_soon(spec.uuid, spec.name, spec.mac, spec.ip)
            return self._info(dom)

    def start(self, uuid: str, *, wait_address: bool = True) -> DomainInfo:
        """See :meth:`HypervisorDriver.start`; a hibernated domain is restored by
        the same virDomainCreate that boots a stopped one."""
        with self._changing(uuid):
            dom = self._lookup(uuid)
            state = self._state(dom)
            if state is DomainState.RUNNING:
                return self._info(dom)
            if state not in _NOT_RUNNING:
                raise invalid_state("start", uuid, dom.name(), state)
            with libvirt_errors(f"start {dom.name()}", uuid):
                dom.create()
            # The guest asks for its address seconds after create: the DHCP
            # entry was being written meanwhile; a failure fails the start.
            if wait_address:
                self._dhcp_wait(uuid)
            return self._info(dom)

    def address_ready(self, uuid: str) -> None:
        """See :meth:`HypervisorDriver.address_ready`: waits for the DHCP entry's job."""
        self._dhcp_wait(uuid)

    def shutdown(self, uuid: str, timeout_s: float) -> DomainInfo:
        """See :meth:`HypervisorDriver.shutdown`. Uses the hypervisor's default
        shutdown method (ACPI for QEMU guests without an agent); the test
        driver does not accept an explicit ACPI flag."""
        with self._changing(uuid):
            dom = self._lookup(uuid)
            state = self._state(dom)
            if state in _NOT_RUNNING:
                return self._info(dom)
            if state not in (DomainState.RUNNING, DomainState.SHUTTING_DOWN):
                raise invalid_state("shut down", uuid, dom.name(), state)
            deadline = time.monotonic() + timeout_s
            if state is DomainState.RUNNING:
                with libvirt_errors(f"shut down {dom.name()}", uuid):
                    dom.shutdown()
            self._wait_not_running(dom, uuid, deadline, timeout_s)
            return self._info(dom)

    def _wait_not_running(self, dom: Any, uuid: str, deadline: float, timeout_s: float) -> None:
        delay = _POLL_FIRST_S
        while self._state(dom) not in _NOT_RUNNING:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimedOut(
                    f"domain {dom.name()} did not shut down within {timeout_s:g} s",
                    details={"uuid": uuid, "timeout_s": timeout_s})
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, _POLL_MAX_S)

    def reboot(self, uuid: str) -> DomainInfo:
        """See :meth:`HypervisorDriver.reboot`."""
        with self._changing(uuid):
            dom = self._lookup(uuid)
            state = self._state(dom)
            if state is not DomainState.RUNNING:
                raise invalid_state("reboot", uuid, dom.name(), state)
            with libvirt_errors(f"reboot {dom.name()}", uuid):
                dom.reboot(0)
            return self._info(dom)

    def power_off(self, uuid: str) -> DomainInfo:
        """See :meth:`HypervisorDriver.power_off`."""
        with self._changing(uuid):
            dom = self._lookup(uuid)
            if self._state(dom) not in _NOT_RUNNING:
                with libvirt_errors(f"power off {dom.name()}", uuid):
                    dom.destroy()
            return self._info(dom)

    def pause(self, uuid: str) -> DomainInfo:
        """See :meth:`HypervisorDriver.pause`."""
        with self._changing(uuid):
            dom = self._lookup(uuid)
            state = self._state(dom)
            if state is DomainState.RUNNING:
                with libvirt_errors(f"pause {dom.name()}", uuid):
                    dom.suspend()
            elif state is not DomainState.PAUSED:
                raise invalid_state("pause", uuid, dom.name(), state)
            return self._info(dom)

    def resume(self, uuid: str) -> DomainInfo:
        """See :meth:`HypervisorDriver.resume`."""
        with self._changing(uuid):
            dom = self._lookup(uuid)
            state = self._state(dom)
            if state is DomainState.PAUSED:
                with libvirt_errors(f"resume {dom.name()}", uuid):
                    dom.resume()
            elif state is not DomainState.RUNNING:
                raise invalid_state("resume", uuid, dom.name(), state)
            return self._info(dom)

    def hibernate(self, uuid: str) -> DomainInfo:
        """See :meth:`HypervisorDriver.hibernate`. Saved with
        VIR_DOMAIN_SAVE_RUNNING so that a paused domain, too, comes back running."""
        with self._changing(uuid):
            dom = self._lookup(uuid)
            state = self._state(dom)
            if state is DomainState.HIBERNATED:
                return self._info(dom)
            if state not in (DomainState.RUNNING, DomainState.PAUSED):
                raise invalid_state("hibernate", uuid, dom.name(), state)
            if not self.capabilities.managed_save:
                raise HypervisorError(f"{self.uri} cannot hibernate domains")
            with libvirt_errors(f"hibernate {dom.name()}", uuid):
                dom.managedSave(libvirt.VIR_DOMAIN_SAVE_RUNNING)
            return self._info(dom)

    def migrate_live(self, uuid: str, target_uri: str, *, migrate_uri: str | None = None,
                     copy_storage: bool = True, tls: bool = False, timeout_s: float,
                     progress: ProgressCallback | None = None) -> None:
        """See :meth:`HypervisorDriver.migrate_live`; the work is
        :func:`~usher.lnm.drivers.libvirt_migration.run_migration`'s.

        The driver's lock is held only to check the domain before and to tidy
        up after (its DHCP host entry goes with it), not while data moves:
        other domains' verbs and :meth:`abort_migration` go on meanwhile.
        """
        conn = self._connection()
        if not self.capabilities.live_migration:
            raise MigrationUnsupported(f"{self.uri} cannot migrate domains live",
                                       details={"uuid": uuid, "target": target_uri})
        with self._changing(uuid):
            dom = self._lookup(uuid)
            state = self._state(dom)
            if state not in (DomainState.RUNNING, DomainState.PAUSED):
                raise invalid_state("migrate", uuid, dom.name(), state)
            with libvirt_errors(f"read {uuid}", uuid):
                name = dom.name()
                facts = parse_domain_xml(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        params: dict[str, Any] = {}
        if migrate_uri is not None:
            params[libvirt.VIR_MIGRATE_PARAM_URI] = migrate_uri
        try:
            run_migration(dom, name=name, uuid=uuid, target_uri=target_uri, params=params,
                          flags=migration_flags(copy_storage=copy_storage, tls=tls),
                          timeout_s=timeout_s, progress=progress)
        finally:
            with self._lock:
                self._dirty.add(uuid)  # a fake host's file follows libvirt, whatever happened
        if facts.ip is not None and facts.mac is not None:
            # The domain has moved whatever happens here: a stale entry is
            # replaced when its address is handed out again, so log, don't fail.
            try:
                with self._lock:
                    if self._conn is conn:
                        self._dhcp_remove(facts.mac, facts.ip)
            except UsherError:
                log.exception("removing the DHCP entry of migrated %s failed", name)

    def abort_migration(self, uuid: str) -> bool:
        """See :meth:`HypervisorDriver.abort_migration`. Takes no lock: it must
        get through while :meth:`migrate_live` runs."""
        dom = self._lookup(uuid)
        if not self.capabilities.live_migration:
            return False  # nothing can be migrating
        return abort_outgoing(dom, dom.name())

    def move_stopped(self, uuid: str, target_uri: str, *, migrate_uri: str | None = None,
                     tls: bool = False, timeout_s: float,
                     progress: ProgressCallback | None = None) -> None:
        """See :meth:`HypervisorDriver.move_stopped`: started with
        VIR_DOMAIN_START_PAUSED, then :meth:`migrate_live`. Should that fail,
        the paused domain is destroyed here, which leaves it defined and
        stopped with its disk as it was.

        Why not copy the disk file some other way: libvirt's own storage copy
        needs no channel, credentials or port besides the ones live migration
        uses, copies only the overlay's blocks, and QEMU holding the image
        while it moves means nothing else can write to it meanwhile.
        """
        self._connection()
        if not self.capabilities.live_migration:
            raise MigrationUnsupported(f"{self.uri} cannot move domains",
                                       details={"uuid": uuid, "target": target_uri})
        with self._changing(uuid):
            dom = self._lookup(uuid)
            state = self._state(dom)
            if state is not DomainState.STOPPED:
                raise invalid_state("move the disk of", uuid, dom.name(), state)
            with libvirt_errors(f"start {dom.name()} paused to move it", uuid):
                dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
        try:
            self.migrate_live(uuid, target_uri, migrate_uri=migrate_uri, copy_storage=True,
                              tls=tls, timeout_s=timeout_s, progress=progress)
        except BaseException:
            try:
                with self._changing(uuid):
                    left = self._find(self._connection().lookupByUUIDString, uuid)
                    if left is not None and left.isActive():
                        left.destroy()
            except (UsherError, libvirt.libvirtError):
                log.exception("stopping %s again after its move failed", uuid)
            raise

    def adopt_incoming(self, uuid: str) -> DomainInfo:
        """See :meth:`HypervisorDriver.adopt_incoming`: the DHCP host entry of
        a domain that takes its address by DHCP (one that boots a kernel has
        it on its command line). Not done from the event thread, which must
        make no libvirt calls."""
        with self._changing(uuid):
            dom = self._lookup(uuid)
            with libvirt_errors(f"read {uuid}", uuid):
                facts = parse_domain_xml(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
            if facts.ip is not None and facts.mac is not None and facts.owner is not None \
                    and not facts.kernel_boot:
                self._dhcp_add(facts.mac, facts.ip)
            return self._info(dom)

    def open_console(self, uuid: str, on_data: Callable[[bytes], None],
                     on_end: Callable[[str], None]) -> ConsoleStream:
        """See :meth:`HypervisorDriver.open_console`: a non-blocking libvirt
        stream whose events arrive through the registered event loop (the node
        manager's libvirtaio)."""
        with self._lock:
            dom = self._lookup(uuid)
            state = self._state(dom)
            if state not in (DomainState.RUNNING, DomainState.PAUSED):
                raise invalid_state("open the console of", uuid, dom.name(), state)
            with libvirt_errors(f"open the console of {dom.name()}", uuid):
                stream = self._connection().newStream(libvirt.VIR_STREAM_NONBLOCK)
                # FORCE: a console left attached by a crashed session is taken over.
                dom.openConsole(None, stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
            return _LibvirtConsole(stream, dom.name(), on_data, on_end)

    def undefine(self, uuid: str) -> None:
        """See :meth:`HypervisorDriver.undefine`."""
        with self._changing(uuid):
            dom = self._find(self._connection().lookupByUUIDString, uuid)
            if dom is None:
                return
            with libvirt_errors(f"read {uuid}", uuid):
                facts = parse_domain_xml(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
            self._dhcp_wait_quietly(uuid)  # an entry still being written: it goes next
            if facts.ip is not None and facts.mac is not None:
                self._dhcp_remove(facts.mac, facts.ip)
            try:
                with libvirt_errors(f"undefine {dom.name()}", uuid):
                    if dom.isActive():
                        dom.destroy()
                    # Snapshot metadata would block undefine; qemu hosts with
                    # UEFI will need VIR_DOMAIN_UNDEFINE_NVRAM too, which the
                    # test driver rejects.
                    dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                                      | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
            except DomainNotFound:
                return

    # -- addresses: DHCP host entries on the VMs' libvirt network ----------------

    def _dhcp_state(self) -> _Dhcp:
        """The network's DHCP sections and host entries, read once per connection.

        The entries are kept in memory and changed along with the network, so
        a start costs no read of a network that lists thousands of hosts.
        """
        if self._dhcp is None:
            try:
                net = self._connection().networkLookupByName(self.network)
            except libvirt.libvirtError:
                self._dhcp = _Dhcp(None, [], set())  # no such network: nothing to do
                return self._dhcp
            with libvirt_errors(f"read network {self.network}"):
                root = ET.fromstring(net.XMLDesc(0))
            sections = []
            for index, el in enumerate(root.findall("ip")):
                if el.find("dhcp") is not None and el.get("address"):
                    prefix = el.get("prefix") or el.get("netmask") or ""
                    sections.append((index, ipaddress.ip_interface(
                        f"{el.get('address')}/{prefix}").network))
            hosts = {(h.get("mac"), h.get("ip")) for h in root.iterfind("ip/dhcp/host")}
            self._dhcp = _Dhcp(net, sections, hosts)
        return self._dhcp

    def _dhcp_section(self, ip: str) -> int | None:
        """The index of the network's DHCP-serving ``<ip>`` that covers ``ip``.

        None when the network does not exist or serves no DHCP for that
        address (a bridge whose DHCP the site runs itself): then the address
        reaches the VM some other way and there is nothing to do here.
        """
        state = self._dhcp_state()
        addr = ipaddress.ip_address(ip)
        for index, network in state.sections:
            if addr in network:
                return index
        return None

    def _dhcp_update(self, command: int, index: int, xml: str) -> None:
        net = self._dhcp_state().net
        flags = libvirt.VIR_NETWORK_UPDATE_AFFECT_CONFIG
        with libvirt_errors(f"update the DHCP hosts of network {self.network}"):
            if net.isActive():
                flags |= libvirt.VIR_NETWORK_UPDATE_AFFECT_LIVE
                if self._fake_host is not None:
                    # Its definition lives in the host file and the entries are
                    # rebuilt at open: a config copy would only cost (libvirt
                    # copies the whole network per change: O(entries)).
                    flags = libvirt.VIR_NETWORK_UPDATE_AFFECT_LIVE
            net.update(command, libvirt.VIR_NETWORK_SECTION_IP_DHCP_HOST, index, xml, flags)

    def _dhcp_add_soon(self, uuid: str, name: str, mac: str, ip: str) -> None:
        """Queue the domain's DHCP entry on the DHCP worker; :meth:`_dhcp_wait` waits for it."""
        self._dhcp_wait_quietly(uuid)

        def job() -> None:
            try:
                self._dhcp_add(mac, ip)
            except BaseException as exc:
                log.warning("DHCP entry of %s: %s", name, exc)
                raise  # to whoever waits for the job

        self._dhcp_jobs[uuid] = self._dhcp_worker.submit(job)

    def _dhcp_wait(self, uuid: str) -> None:
        """Wait for the domain's DHCP entry job, if any; raise what it raised.

        Raises:
            HypervisorError: the job failed or took longer than DHCP_UPDATE_TIMEOUT_S.
        """
        job = self._dhcp_jobs.pop(uuid, None)
        if job is None:
            return
        try:
            job.result(DHCP_UPDATE_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            raise HypervisorError(f"the DHCP entry on network {self.network} was not written "
                                  f"within {DHCP_UPDATE_TIMEOUT_S:g} s") from None
        except UsherError:
            raise
        except Exception as error:
            raise HypervisorError(f"the DHCP entry on network {self.network} failed: "
                                  f"{error}") from error

    def _dhcp_wait_quietly(self, uuid: str) -> None:
        with contextlib.suppress(UsherError):
            self._dhcp_wait(uuid)

    def _dhcp_add(self, mac: str, ip: str) -> None:
        with self._dhcp_lock:
            self._dhcp_add_locked(mac, ip)

    def _dhcp_add_locked(self, mac: str, ip: str) -> None:
        index = self._dhcp_section(ip)
        if index is None:
            return
        hosts = self._dhcp_state().hosts
        if (mac, ip) in hosts:
            return
        # A stale entry for this MAC or address (a VM long gone) would make
        # libvirt refuse the new one: replace it.
        for old in [h for h in hosts if h[0] == mac or h[1] == ip]:
            self._dhcp_update(libvirt.VIR_NETWORK_UPDATE_COMMAND_DELETE, index,
                              _dhcp_host_xml(*old))
            hosts.discard(old)
        self._dhcp_update(libvirt.VIR_NETWORK_UPDATE_COMMAND_ADD_LAST, index,
                          _dhcp_host_xml(mac, ip))
        hosts.add((mac, ip))

    def _dhcp_remove(self, mac: str, ip: str) -> None:
        with self._dhcp_lock:
            self._dhcp_remove_locked(mac, ip)

    def _dhcp_remove_locked(self, mac: str, ip: str) -> None:
        index = self._dhcp_section(ip)
        hosts = self._dhcp_state().hosts
        if index is None or (mac, ip) not in hosts:
            return
        self._dhcp_update(libvirt.VIR_NETWORK_UPDATE_COMMAND_DELETE, index,
                          _dhcp_host_xml(mac, ip))
        hosts.discard((mac, ip))

    def _dhcp_sync(self) -> None:
        """Give every usher domain that has an address its DHCP entry (after a restart)."""
        self._dhcp = None
        if self._dhcp_state().net is None:
            return
        with libvirt_errors("list domains"):
            domains = self._connection().listAllDomains()
        for dom in domains:
            with libvirt_errors("read domain"):
                facts = parse_domain_xml(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
            if facts.ip is not None and facts.mac is not None and facts.owner is not None \
                    and not facts.kernel_boot:
                self._dhcp_add(facts.mac, facts.ip)

    # -- helpers ---------------------------------------------------------------

    def _connection(self) -> Any:
        conn, lost = self._conn, self._lost
        if conn is None:
            raise NotConnected(f"driver for {self.uri} is not open")
        if lost is not None:
            raise NotConnected(f"lost the connection to {self.uri} ({lost}); not reopened yet")
        return conn

    def _lookup(self, uuid: str) -> Any:
        with libvirt_errors("look up domain", uuid):
            return self._connection().lookupByUUIDString(uuid)

    def _find(self, lookup: Callable[[str], Any], key: str) -> Any | None:
        """The domain ``lookup(key)`` finds, or None."""
        try:
            with libvirt_errors("look up domain", key):
                return lookup(key)
        except DomainNotFound:
            return None

    def _state(self, dom: Any) -> DomainState:
        with libvirt_errors("read domain state", dom.UUIDString()):
            state, reason = dom.state()
            return _usher_state(state, reason, lambda: bool(dom.hasManagedSaveImage()))

    def _info(self, dom: Any, has_managed_save: bool | None = None) -> DomainInfo:
        uuid = dom.UUIDString()
        with libvirt_errors("read domain", uuid):
            state, reason = dom.state()
            xml = dom.XMLDesc(0)
            if has_managed_save is None:
                usher_state = _usher_state(state, reason,
                                           lambda: bool(dom.hasManagedSaveImage()))
            else:
                usher_state = _usher_state(state, reason, lambda: has_managed_save)
        facts = _parse_domain_xml(xml)
        return DomainInfo(uuid=uuid, name=facts.name, state=usher_state,
                          memory_mib=facts.memory_mib, vcpus=facts.vcpus,
                          owner=facts.owner, task_id=facts.task_id, mac=facts.mac)

    @contextmanager
    def _changing(self, uuid: str) -> Iterator[None]:
        """Serialise a mutating call and note the domain for the next flush.

        The domain is noted even when the call fails: the file must follow
        libvirt (a shutdown that timed out may still have changed the state).
        """
        with self._lock:
            try:
                yield
            finally:
                self._dirty.add(uuid)

    def flush(self) -> None:
        """Write the changed domains to a fake host's file (see the ABC)."""
        with self._lock:
            if not self._dirty:
                return
            changed, self._dirty = self._dirty, set()
            try:
                self._save_fake_host(changed)
            except BaseException:
                self._dirty |= changed
                raise

    def _save_fake_host(self, changed: Iterable[str] | None) -> None:
        if self._fake_host is None or self._conn is None:
            return
        with libvirt_errors(f"save fake host {self._fake_host.path}"):
            self._fake_host.save(self._conn, changed=changed)


class _Worker:
    """One daemon thread running submitted calls in order (started on first use,
    ended by :meth:`stop`).

    A daemon, unlike a ThreadPoolExecutor's threads: a libvirt call that hangs
    must not keep the node manager from exiting.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._queue: queue.SimpleQueue[tuple[Callable[[], None],
                                             concurrent.futures.Future[None]] | None] = \
            queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def submit(self, fn: Callable[[], None]) -> concurrent.futures.Future[None]:
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        with self._start_lock:  # the same order as stop's: no call queued behind its end
            self._queue.put((fn, future))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name,
                                                daemon=True)
                self._thread.start()
        return future

    def stop(self) -> None:
        """Let the thread end once the calls queued so far have run; a later
        :meth:`submit` starts a new one."""
        with self._start_lock:
            if self._thread is not None:
                self._queue.put(None)
                self._thread = None

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                fn()
            except BaseException as exc:  # handed to whoever waits for the future
                future.set_exception(exc)
            else:
                future.set_result(None)


def _dhcp_host_xml(mac: str | None, ip: str | None) -> str:
    # No name: libvirt refuses a second entry with the same one (web.a and web.b
    # of one user, or two users' web) and names that start with a digit. The
    # guest's name is in DNS and, for kernel boots, on its command line.
    host = ET.Element("host")
    if mac:
        host.set("mac", mac)
    if ip:
        host.set("ip", ip)
    return ET.tostring(host, encoding="unicode")


@dataclass(slots=True)
class _Dhcp:
    """A network's DHCP-serving sections (index, subnet) and its host entries."""

    net: Any  # virNetwork, or None: the network does not exist
    sections: list[tuple[int, ipaddress.IPv4Network | ipaddress.IPv6Network]]
    hosts: set[tuple[str | None, str | None]]


class _LibvirtConsole(ConsoleStream):
    """A domain's console as a libvirt stream, read as its events say."""

    _EVENTS = (libvirt.VIR_STREAM_EVENT_READABLE | libvirt.VIR_STREAM_EVENT_ERROR
               | libvirt.VIR_STREAM_EVENT_HANGUP)

    def __init__(self, stream: Any, name: str, on_data: Callable[[bytes], None],
                 on_end: Callable[[str], None]) -> None:
        self._stream = stream
        self._name = name
        self._on_data = on_data
        self._on_end = on_end
        self._closed = False
        self._lock = threading.Lock()
        try:
            stream.eventAddCallback(self._EVENTS, self._event, None)
        except libvirt.libvirtError as exc:
            with contextlib.suppress(libvirt.libvirtError):
                stream.abort()
            raise HypervisorError(f"console of {name}: no event loop for its stream "
                                  f"({exc.get_error_message()})") from None

    def _event(self, stream: Any, events: int, _opaque: object) -> None:
        if events & libvirt.VIR_STREAM_EVENT_READABLE:
            # Bounded: a guest printing without pause must not starve the loop.
            for _ in range(64):
                try:
                    data = stream.recv(65536)
                except libvirt.libvirtError as exc:
                    self._end(f"console stream broke: {exc.get_error_message()}")
                    return
                if data == -2:  # nothing more for now
                    break
                if not data:
                    self._end("the console closed (the guest stopped)")
                    return
                self._on_data(bytes(data))
        if events & (libvirt.VIR_STREAM_EVENT_ERROR | libvirt.VIR_STREAM_EVENT_HANGUP):
            self._end("the console closed (the guest stopped)")

    def write(self, data: bytes) -> None:
        with self._lock:
            if self._closed:
                return
            view = memoryview(data)
            for _ in range(100):  # keystrokes: the stream takes them at once
                try:
                    sent = self._stream.send(bytes(view))
                except libvirt.libvirtError as exc:
                    raise HypervisorError(f"console of {self._name}: "
                                          f"{exc.get_error_message()}") from None
                if sent == -2:
                    time.sleep(0.01)
                    continue
                view = view[sent:]
                if not view:
                    return

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._release()

    def _end(self, reason: str) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._release()
        self._on_end(reason)

    def _release(self) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            self._stream.eventRemoveCallback()
        with contextlib.suppress(libvirt.libvirtError):
            self._stream.abort()
