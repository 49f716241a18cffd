"""The hypervisor driver contract, run against every driver.

Each test gets an open driver on a host of 4 CPUs and 8 GiB that already runs
one domain usher did not define (FOREIGN). The flavours: the in-memory
FakeDriver, LibvirtDriver on a private libvirt test-driver host file, and
LibvirtDriver on a FakeHost (which also rewrites its file after every change).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import libvirt
import libvirtaio
import pytest

from usher.errors import (
    ConfigError,
    DomainExists,
    DomainNotFound,
    HypervisorError,
    InvalidRequest,
    InvalidState,
    MigrationUnsupported,
    NotConnected,
    TimedOut,
)
from usher.lnm.drivers import DRIVERS, make_driver
from usher.lnm.drivers.base import (
    DomainEvent,
    DomainInfo,
    DomainSpec,
    DomainState,
    DomainStats,
    HypervisorDriver,
)
from usher.lnm.drivers.fake import (
    FAKE_CPU_LOAD,
    FAKE_DISK_RD_BPS,
    FAKE_DISK_WR_BPS,
    FAKE_NET_RX_BPS,
    FAKE_NET_TX_BPS,
    FakeDriver,
)
from usher.lnm.drivers.libvirt import (
    LibvirtDriver,
    libvirt_errors,
    lifecycle_event,
    stats_from_record,
)
from usher.lnm.fakehost import FakeHost

CPUS = 4
MEMORY_MIB = 8192
HOSTNAME = "h1.usher.example.org"
FOREIGN_UUID = "f0000000-0000-4000-8000-000000000001"
FOREIGN_NAME = "not-usher.example.org"
MISSING_UUID = "deadbeef-0000-4000-8000-000000000000"

FOREIGN_XML = f"""\
<domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>
  <name>{FOREIGN_NAME}</name>
  <uuid>{FOREIGN_UUID}</uuid>
  <memory unit='MiB'>128</memory>
  <vcpu>2</vcpu>
  <os><type>hvm</type></os>
  <test:runstate>1</test:runstate>
</domain>
"""


def write_host_file(path: Path) -> None:
    """A test-driver host file running the foreign domain."""
    path.write_text(
        "<node>\n"
        f"<cpu><mhz>2000</mhz><nodes>1</nodes><sockets>1</sockets><cores>{CPUS}</cores>"
        f"<threads>1</threads><active>{CPUS}</active></cpu>\n"
        f"<memory>{MEMORY_MIB * 1024}</memory>\n"
        f"{FOREIGN_XML}</node>\n")


def make_fake(tmp_path: Path) -> HypervisorDriver:
    foreign = DomainInfo(uuid=FOREIGN_UUID, name=FOREIGN_NAME, state=DomainState.RUNNING,
                         memory_mib=128, vcpus=2, owner=None, task_id=None, mac=None)
    return FakeDriver(hostname=HOSTNAME, cpus=CPUS, memory_mib=MEMORY_MIB, domains=[foreign])


def make_libvirt(tmp_path: Path) -> HypervisorDriver:
    path = tmp_path / "host.xml"
    write_host_file(path)
    return LibvirtDriver(f"test://{path}")


def make_libvirt_fakehost(tmp_path: Path) -> HypervisorDriver:
    path = tmp_path / "fakehost.xml"
    # An existing file keeps its domains; create() sets the size.
    write_host_file(path)
    host = FakeHost.create(path, hostname=HOSTNAME, cpus=CPUS, memory_mib=MEMORY_MIB)
    return LibvirtDriver(host.uri, fake_host=host)


FLAVOURS: dict[str, Callable[[Path], HypervisorDriver]] = {
    "fake": make_fake,
    "libvirt-test": make_libvirt,
    "libvirt-fakehost": make_libvirt_fakehost,
}


@pytest.fixture(params=list(FLAVOURS))
def flavour(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def driver(flavour: str, tmp_path: Path) -> Iterator[HypervisorDriver]:
    d = FLAVOURS[flavour](tmp_path)
    d.open()
    yield d
    d.close()


def spec(n: int = 1, **changes: Any) -> DomainSpec:
    fields: dict[str, Any] = dict(
        uuid=f"00000000-0000-4000-8000-{n:012d}",
        name=f"vm{n}.alice.seuss.usher.example.org",
        memory_mib=256, vcpus=1, mac=f"52:54:00:00:00:{n:02x}",
        owner="alice", task_id=f"task-{n}")
    fields.update(changes)
    return DomainSpec(**fields)


def running(driver: HypervisorDriver, n: int = 1) -> str:
    uuid = driver.define(spec(n)).uuid
    driver.start(uuid)
    return uuid


# -- registry and connection ---------------------------------------------------------


def test_registry_names_every_driver() -> None:
    assert DRIVERS == {"libvirt": LibvirtDriver, "fake": FakeDriver}
    assert isinstance(make_driver("fake", cpus=2), FakeDriver)
    with pytest.raises(ConfigError):
        make_driver("vmware")
    with pytest.raises(ConfigError):
        make_driver("fake", colour="blue")


def test_open_and_close_are_idempotent(driver: HypervisorDriver) -> None:
    driver.open()
    assert driver.host_facts().cpus == CPUS
    driver.close()
    driver.close()
    with pytest.raises(NotConnected):
        driver.list_domains()
    driver.open()
    assert driver.get_domain(FOREIGN_UUID).name == FOREIGN_NAME


def test_host_facts_give_the_hosts_size(driver: HypervisorDriver) -> None:
    facts = driver.host_facts()
    assert (facts.cpus, facts.memory_mib) == (CPUS, MEMORY_MIB)
    assert facts.hypervisor
    assert facts.hostname


def test_capabilities(driver: HypervisorDriver) -> None:
    caps = driver.capabilities
    assert caps.managed_save and caps.acpi
    assert not caps.live_migration


# -- defining and reading ------------------------------------------------------------


def test_define_makes_a_stopped_domain_with_usher_metadata(driver: HypervisorDriver) -> None:
    s = spec()
    info = driver.define(s)
    assert info == DomainInfo(uuid=s.uuid, name=s.name, state=DomainState.STOPPED,
                              memory_mib=256, vcpus=1, owner="alice", task_id="task-1",
                              mac=s.mac)
    assert driver.get_domain(s.uuid) == info


def test_define_twice_returns_the_existing_domain(driver: HypervisorDriver) -> None:
    first = driver.define(spec())
    driver.start(first.uuid)
    again = driver.define(spec(memory_mib=1024, owner="mallory"))
    assert again.memory_mib == 256 and again.owner == "alice"
    assert again.state is DomainState.RUNNING


def test_define_name_clash_with_other_uuid(driver: HypervisorDriver) -> None:
    driver.define(spec(1))
    with pytest.raises(DomainExists):
        driver.define(spec(2, name=spec(1).name))
    with pytest.raises(DomainExists):
        driver.define(spec(3, name=FOREIGN_NAME))


@pytest.mark.parametrize("bad", [
    {"uuid": "00000000-0000-4000-8000-00000000000A"},
    {"uuid": "not-a-uuid"},
    {"mac": "52-54-00-00-00-01"},
    {"memory_mib": 0},
    {"vcpus": 0},
])
def test_define_rejects_malformed_specs(driver: HypervisorDriver, bad: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest):
        driver.define(spec(**bad))


def test_list_domains_includes_foreign_domains(driver: HypervisorDriver) -> None:
    driver.define(spec(1))
    running(driver, 2)
    by_uuid = {d.uuid: d for d in driver.list_domains()}
    assert set(by_uuid) == {FOREIGN_UUID, spec(1).uuid, spec(2).uuid}
    foreign = by_uuid[FOREIGN_UUID]
    assert (foreign.name, foreign.state, foreign.owner, foreign.task_id) == (
        FOREIGN_NAME, DomainState.RUNNING, None, None)
    assert (foreign.memory_mib, foreign.vcpus) == (128, 2)
    assert by_uuid[spec(1).uuid].state is DomainState.STOPPED
    assert by_uuid[spec(2).uuid].state is DomainState.RUNNING
    assert by_uuid[spec(2).uuid].owner == "alice"


VERBS: dict[str, Callable[[HypervisorDriver, str], object]] = {
    "get_domain": lambda d, u: d.get_domain(u),
    "start": lambda d, u: d.start(u),
    "shutdown": lambda d, u: d.shutdown(u, 1.0),
    "reboot": lambda d, u: d.reboot(u),
    "power_off": lambda d, u: d.power_off(u),
    "pause": lambda d, u: d.pause(u),
    "resume": lambda d, u: d.resume(u),
    "hibernate": lambda d, u: d.hibernate(u),
    "abort_migration": lambda d, u: d.abort_migration(u),
}


@pytest.mark.parametrize("verb", list(VERBS))
def test_unknown_uuid_is_domain_not_found(driver: HypervisorDriver, verb: str) -> None:
    with pytest.raises(DomainNotFound):
        VERBS[verb](driver, MISSING_UUID)


@pytest.mark.parametrize("verb", ["define", "start", "list_domains", "host_facts",
                                  "migrate_live", "abort_migration"])
def test_closed_driver_is_not_connected(flavour: str, tmp_path: Path, verb: str) -> None:
    d = FLAVOURS[flavour](tmp_path)
    call: dict[str, Callable[[], object]] = {
        "define": lambda: d.define(spec()),
        "start": lambda: d.start(FOREIGN_UUID),
        "list_domains": d.list_domains,
        "host_facts": d.host_facts,
        "migrate_live": lambda: d.migrate_live(FOREIGN_UUID, "qemu+tcp://h2/system",
                                               timeout_s=1.0),
        "abort_migration": lambda: d.abort_migration(FOREIGN_UUID),
    }
    with pytest.raises(NotConnected):
        call[verb]()


def lose(d: HypervisorDriver, reason: str) -> None:
    """The hypervisor's daemon dies under an open driver."""
    if isinstance(d, FakeDriver):
        d.lose_hypervisor(reason)
    else:
        # libvirt's test driver has no daemon to lose: fire the close callback
        # as libvirt does when libvirtd's socket ends (tests/e2e/realguest kill
        # a real libvirtd).
        assert isinstance(d, LibvirtDriver)
        d._on_close(d._conn, libvirt.VIR_CONNECT_CLOSE_REASON_EOF, None)


def come_back(d: HypervisorDriver) -> None:
    if isinstance(d, FakeDriver):
        d.restore_hypervisor()


def test_a_lost_connection_is_reported_once_and_not_connected_until_reopened(
        driver: HypervisorDriver) -> None:
    told: list[str] = []
    driver.set_lost_callback(told.append)
    lose(driver, "daemon exited")
    assert len(told) == 1
    for call in (driver.list_domains, driver.host_facts,
                 lambda: driver.get_domain(FOREIGN_UUID),
                 lambda: driver.power_off(FOREIGN_UUID)):
        with pytest.raises(NotConnected):
            call()
    lose(driver, "again")  # told once per connection
    assert len(told) == 1
    come_back(driver)
    driver.close()
    driver.open()
    # The host's domains were never touched: the foreign guest still runs.
    assert driver.get_domain(FOREIGN_UUID).state is DomainState.RUNNING
    lose(driver, "a second time")
    assert len(told) == 2
    driver.set_lost_callback(None)


# -- lifecycle -----------------------------------------------------------------------


def test_start_boots_and_is_a_no_op_when_running(driver: HypervisorDriver) -> None:
    uuid = driver.define(spec()).uuid
    assert driver.start(uuid).state is DomainState.RUNNING
    assert driver.start(uuid).state is DomainState.RUNNING
    assert driver.get_domain(uuid).state is DomainState.RUNNING


def test_pause_and_resume(driver: HypervisorDriver) -> None:
    uuid = running(driver)
    assert driver.pause(uuid).state is DomainState.PAUSED
    assert driver.pause(uuid).state is DomainState.PAUSED
    assert driver.resume(uuid).state is DomainState.RUNNING
    assert driver.resume(uuid).state is DomainState.RUNNING


def test_shutdown_stops_and_is_a_no_op_when_stopped(driver: HypervisorDriver) -> None:
    uuid = running(driver)
    assert driver.shutdown(uuid, 5.0).state is DomainState.STOPPED
    assert driver.shutdown(uuid, 5.0).state is DomainState.STOPPED
    assert driver.start(uuid).state is DomainState.RUNNING


def test_power_off_stops_and_is_a_no_op_when_stopped(driver: HypervisorDriver) -> None:
    uuid = running(driver)
    driver.pause(uuid)
    assert driver.power_off(uuid).state is DomainState.STOPPED
    assert driver.power_off(uuid).state is DomainState.STOPPED


def test_reboot_keeps_the_domain_running(driver: HypervisorDriver) -> None:
    uuid = running(driver)
    assert driver.reboot(uuid).state is DomainState.RUNNING


def test_hibernate_and_restore(driver: HypervisorDriver) -> None:
    uuid = running(driver)
    assert driver.hibernate(uuid).state is DomainState.HIBERNATED
    assert driver.hibernate(uuid).state is DomainState.HIBERNATED
    assert driver.get_domain(uuid).state is DomainState.HIBERNATED
    # Not running already: stopping keeps the saved image.
    assert driver.power_off(uuid).state is DomainState.HIBERNATED
    assert driver.shutdown(uuid, 1.0).state is DomainState.HIBERNATED
    assert driver.start(uuid).state is DomainState.RUNNING
    assert driver.power_off(uuid).state is DomainState.STOPPED
    assert driver.start(uuid).state is DomainState.RUNNING


def test_hibernate_a_paused_domain_restores_it_running(driver: HypervisorDriver) -> None:
    uuid = running(driver)
    driver.pause(uuid)
    assert driver.hibernate(uuid).state is DomainState.HIBERNATED
    assert driver.start(uuid).state is DomainState.RUNNING


@pytest.mark.parametrize(("verb", "prepare", "state"), [
    ("pause", "stopped", DomainState.STOPPED),
    ("resume", "stopped", DomainState.STOPPED),
    ("hibernate", "stopped", DomainState.STOPPED),
    ("reboot", "stopped", DomainState.STOPPED),
    ("reboot", "paused", DomainState.PAUSED),
    ("start", "paused", DomainState.PAUSED),
    ("shutdown", "paused", DomainState.PAUSED),
    ("resume", "hibernated", DomainState.HIBERNATED),
    ("pause", "hibernated", DomainState.HIBERNATED),
])
def test_verbs_invalid_in_the_domains_state(driver: HypervisorDriver, verb: str,
                                            prepare: str, state: DomainState) -> None:
    uuid = driver.define(spec()).uuid
    if prepare != "stopped":
        driver.start(uuid)
        if prepare == "paused":
            driver.pause(uuid)
        else:
            driver.hibernate(uuid)
    with pytest.raises(InvalidState) as caught:
        VERBS[verb](driver, uuid)
    assert caught.value.details["state"] == state.value
    assert state.value in str(caught.value)
    assert driver.get_domain(uuid).state is state


def test_undefine_removes_the_domain_in_any_state(driver: HypervisorDriver) -> None:
    stopped = driver.define(spec(1)).uuid
    run = running(driver, 2)
    paused = running(driver, 3)
    driver.pause(paused)
    hibernated = running(driver, 4)
    driver.hibernate(hibernated)
    for uuid in (stopped, run, paused, hibernated):
        driver.undefine(uuid)
        with pytest.raises(DomainNotFound):
            driver.get_domain(uuid)
    assert [d.uuid for d in driver.list_domains()] == [FOREIGN_UUID]
    # The name is free again, and the new domain starts fresh (no saved image).
    assert driver.define(spec(4)).state is DomainState.STOPPED


def test_undefine_of_a_missing_domain_succeeds(driver: HypervisorDriver) -> None:
    driver.undefine(MISSING_UUID)
    uuid = driver.define(spec()).uuid
    driver.undefine(uuid)
    driver.undefine(uuid)


# -- live migration ------------------------------------------------------------------
# No flavour here can migrate (libvirt's test driver has no virDomainMigrate);
# real migration between libvirtd hosts is tested in tests/e2e/realguest.


@pytest.mark.parametrize("target", ["qemu+tcp://h2.usher.example.org/system", "test:///default"])
def test_live_migration_unsupported_is_a_typed_error_and_changes_nothing(
        driver: HypervisorDriver, target: str) -> None:
    uuid = running(driver)
    with pytest.raises(MigrationUnsupported) as caught:
        driver.migrate_live(uuid, target, timeout_s=5.0, progress=lambda *_: None)
    assert caught.value.code == "migration_unsupported"
    assert "migrat" in caught.value.message
    # Checked first: even an unknown domain gets the same answer.
    with pytest.raises(MigrationUnsupported):
        driver.migrate_live(MISSING_UUID, target, timeout_s=5.0)
    assert driver.get_domain(uuid).state is DomainState.RUNNING
    assert driver.get_domain(uuid).name == spec().name


def test_address_ready_without_a_pending_address_returns_at_once(
        driver: HypervisorDriver) -> None:
    uuid = driver.define(spec()).uuid
    assert driver.start(uuid, wait_address=False).state is DomainState.RUNNING
    driver.address_ready(uuid)
    driver.address_ready(uuid)  # nothing pending any more
    driver.address_ready(running(driver, 2))


def test_abort_migration_without_a_migration_is_a_no_op(driver: HypervisorDriver) -> None:
    uuid = running(driver)
    assert driver.abort_migration(uuid) is False
    assert driver.abort_migration(uuid) is False
    stopped = driver.define(spec(2)).uuid
    assert driver.abort_migration(stopped) is False
    assert driver.get_domain(uuid).state is DomainState.RUNNING
    assert driver.get_domain(stopped).state is DomainState.STOPPED


def test_moving_a_stopped_domain_is_unsupported_without_live_migration(
        driver: HypervisorDriver) -> None:
    stopped = driver.define(spec()).uuid
    with pytest.raises(MigrationUnsupported) as caught:
        driver.move_stopped(stopped, "qemu+tcp://h2.usher.example.org/system", timeout_s=5.0)
    assert caught.value.code == "migration_unsupported"
    assert driver.get_domain(stopped).state is DomainState.STOPPED


def test_adopting_an_arrived_domain_returns_it_and_repeats(driver: HypervisorDriver) -> None:
    # No domain arrives here (nothing can migrate): a defined one stands in.
    uuid = running(driver, 1)
    for _ in range(2):
        info = driver.adopt_incoming(uuid)
        assert (info.uuid, info.state, info.owner) == (uuid, DomainState.RUNNING, "alice")
    with pytest.raises(DomainNotFound):
        driver.adopt_incoming(MISSING_UUID)


def test_fake_guest_ignoring_acpi_times_out() -> None:
    # Only the fake can model a guest that ignores ACPI (the test driver's
    # guests always obey), so this case is the fake's own.
    d = FakeDriver()
    d.open()
    uuid = running(d)
    d.ignore_acpi(uuid)
    with pytest.raises(TimedOut):
        d.shutdown(uuid, 0.1)
    assert d.get_domain(uuid).state is DomainState.RUNNING
    assert d.power_off(uuid).state is DomainState.STOPPED


# -- resource counters ---------------------------------------------------------------

COUNTERS = ("cpu_ns", "disk_rd_bytes", "disk_wr_bytes", "net_rx_bytes", "net_tx_bytes")


def stats_of(driver: HypervisorDriver, uuid: str) -> DomainStats:
    [stats] = driver.domain_stats([uuid])
    assert stats.uuid == uuid
    return stats


def test_domain_stats_of_a_running_domain_grow(driver: HypervisorDriver) -> None:
    uuid = running(driver)
    first = stats_of(driver, uuid)
    assert first.memory_kib == 256 * 1024
    assert first.rss_kib is None or 0 < first.rss_kib <= 2 * first.memory_kib
    time.sleep(0.02)
    second = stats_of(driver, uuid)
    assert second.cpu_ns > first.cpu_ns > 0  # one vCPU kept a little busy meanwhile
    for counter in COUNTERS:
        assert getattr(second, counter) >= getattr(first, counter) >= 0, counter
    assert second.net_rx_bytes > 0 and second.net_tx_bytes > 0  # it has an interface


def test_domain_stats_of_inactive_domains_are_zero(driver: HypervisorDriver) -> None:
    defined = driver.define(spec(1)).uuid
    stopped = running(driver, 2)
    driver.power_off(stopped)
    hibernated = running(driver, 3)
    driver.hibernate(hibernated)
    for uuid in (defined, stopped, hibernated):
        assert stats_of(driver, uuid) == DomainStats(uuid=uuid)


def test_domain_stats_of_a_paused_domain_keep_its_memory(driver: HypervisorDriver) -> None:
    uuid = running(driver)
    driver.pause(uuid)
    paused = stats_of(driver, uuid)
    assert paused.memory_kib == 256 * 1024 and paused.cpu_ns > 0
    driver.resume(uuid)
    assert stats_of(driver, uuid).cpu_ns >= paused.cpu_ns


def test_domain_stats_cover_every_domain_or_the_ones_asked_for(
        driver: HypervisorDriver) -> None:
    ours = running(driver, 1)
    stopped = driver.define(spec(2)).uuid
    every = {s.uuid: s for s in driver.domain_stats()}
    assert set(every) == {FOREIGN_UUID, ours, stopped}
    assert every[FOREIGN_UUID].memory_kib == 128 * 1024  # usher's or not
    asked = driver.domain_stats([ours, MISSING_UUID, ours])
    assert [s.uuid for s in asked] == [ours]  # a missing domain is left out, no error
    assert driver.domain_stats([]) == []
    assert driver.domain_stats(iter([stopped])) == [DomainStats(uuid=stopped)]


def test_domain_stats_of_a_closed_driver_is_not_connected(flavour: str,
                                                          tmp_path: Path) -> None:
    d = FLAVOURS[flavour](tmp_path)
    with pytest.raises(NotConnected):
        d.domain_stats()


def test_fake_counters_follow_its_clock() -> None:
    # The fake's counters are exact functions of the time it ran: a clock
    # the test moves shows pause, resume and a fresh boot precisely.
    now = [100.0]
    d = FakeDriver(clock=lambda: now[0])
    d.open()
    uuid = d.define(spec(vcpus=2)).uuid
    d.start(uuid)
    now[0] += 10
    s = stats_of(d, uuid)
    assert s.cpu_ns == int(10 * 1e9 * FAKE_CPU_LOAD * 2)
    assert (s.disk_rd_bytes, s.disk_wr_bytes, s.net_rx_bytes, s.net_tx_bytes) == (
        10 * FAKE_DISK_RD_BPS, 10 * FAKE_DISK_WR_BPS, 10 * FAKE_NET_RX_BPS,
        10 * FAKE_NET_TX_BPS)
    d.pause(uuid)
    now[0] += 50
    assert stats_of(d, uuid) == s  # paused: nothing moves
    d.resume(uuid)
    now[0] += 10
    assert stats_of(d, uuid).cpu_ns == 2 * s.cpu_ns
    d.power_off(uuid)
    assert stats_of(d, uuid) == DomainStats(uuid=uuid)
    d.start(uuid)
    now[0] += 1
    assert stats_of(d, uuid).cpu_ns == s.cpu_ns // 10  # a new boot starts from zero


def test_libvirt_stats_records_are_summed_over_disks_and_interfaces() -> None:
    # The shape qemu:///system returns (libvirt's test driver returns the
    # state only, so the driver reads those domains one call at a time).
    record = {
        "state.state": 1, "state.reason": 1, "cpu.time": 5_000_000_000,
        "balloon.current": 262144, "balloon.maximum": 262144, "balloon.rss": 180000,
        "net.count": 2, "net.0.name": "vnet0", "net.0.rx.bytes": 100, "net.0.tx.bytes": 7,
        "net.1.name": "vnet1", "net.1.rx.bytes": 20, "net.1.tx.bytes": 3,
        "block.count": 2, "block.0.name": "vda", "block.0.rd.bytes": 4096,
        "block.0.wr.bytes": 512, "block.1.name": "sda",  # an empty CD-ROM: no counts
    }
    assert stats_from_record("u", record) == DomainStats(
        uuid="u", cpu_ns=5_000_000_000, memory_kib=262144, rss_kib=180000,
        disk_rd_bytes=4096, disk_wr_bytes=512, net_rx_bytes=120, net_tx_bytes=10)
    older = {"state.state": 1, "cpu.time": 1, "balloon.current": 1024}
    assert stats_from_record("u", older) == DomainStats(uuid="u", cpu_ns=1, memory_kib=1024)


# -- events --------------------------------------------------------------------------


def use_libvirt_event_loop() -> None:
    """Register libvirt's asyncio event loop once per process, on this loop.

    libvirt accepts one event loop implementation per process, for good; the
    event tests therefore share the session's loop.
    """
    loop = asyncio.get_running_loop()
    impl = libvirtaio.getCurrentImpl()
    if impl is None:
        libvirtaio.virEventRegisterAsyncIOImpl(loop)
    elif impl.loop is not loop:
        pytest.skip("libvirt's event loop is bound to another asyncio loop in this process")


class EventLog:
    """An event callback that records events and lets a test await them.

    Both drivers call it on the loop's thread here (the fake synchronously,
    libvirt from its event loop), so no lock is needed.
    """

    def __init__(self, fail: bool = False) -> None:
        self.events: list[DomainEvent] = []
        self._fail = fail
        self._arrived = asyncio.Event()

    def __call__(self, event: DomainEvent) -> None:
        self.events.append(event)
        self._arrived.set()
        if self._fail:
            raise RuntimeError("callback bug")

    async def wait_for(self, count: int, timeout_s: float = 2.0) -> list[DomainEvent]:
        """The events so far, once there are ``count`` (or the time is up)."""
        try:
            async with asyncio.timeout(timeout_s):
                while len(self.events) < count:
                    self._arrived.clear()
                    await self._arrived.wait()
        except TimeoutError:
            pass
        return self.events


@pytest.mark.asyncio(loop_scope="session")
async def test_lifecycle_events_are_delivered(driver: HypervisorDriver) -> None:
    use_libvirt_event_loop()
    log = EventLog()
    driver.set_event_callback(log)
    uuid = driver.define(spec()).uuid
    driver.start(uuid)
    driver.pause(uuid)
    driver.resume(uuid)
    driver.reboot(uuid)      # no event: the domain never leaves RUNNING
    driver.power_off(uuid)
    events = await log.wait_for(5)
    assert [(e.uuid, e.state, e.reason) for e in events] == [
        (uuid, DomainState.STOPPED, "defined/added"),
        (uuid, DomainState.RUNNING, "started/booted"),
        (uuid, DomainState.PAUSED, "suspended/paused"),
        (uuid, DomainState.RUNNING, "resumed/unpaused"),
        (uuid, DomainState.STOPPED, "stopped/destroyed"),
    ]
    assert {e.name for e in events} == {spec().name}

    log = EventLog()
    driver.set_event_callback(log)
    driver.start(uuid)
    driver.hibernate(uuid)
    driver.start(uuid)
    driver.shutdown(uuid, 5.0)
    driver.start(uuid)
    driver.undefine(uuid)
    events = await log.wait_for(7)
    # The test driver reports a restore as "started/booted", QEMU and the fake
    # as "started/restored": compare the event, not its detail, there.
    assert [(e.state, e.reason.split("/")[0]) for e in events] == [
        (DomainState.RUNNING, "started"),
        (DomainState.HIBERNATED, "stopped"),
        (DomainState.RUNNING, "started"),
        (DomainState.STOPPED, "stopped"),
        (DomainState.RUNNING, "started"),
        (DomainState.STOPPED, "stopped"),
        (DomainState.STOPPED, "undefined"),
    ]
    assert [e.reason for e in events if e.state is not DomainState.RUNNING] == [
        "stopped/saved", "stopped/shutdown", "stopped/destroyed", "undefined/removed"]

    driver.set_event_callback(None)
    driver.define(spec(2))
    await asyncio.sleep(0.05)   # time for a stray event to arrive
    assert len(log.events) == 7


@pytest.mark.asyncio(loop_scope="session")
async def test_a_failing_event_callback_does_not_break_the_driver(
        driver: HypervisorDriver) -> None:
    use_libvirt_event_loop()
    log = EventLog(fail=True)
    driver.set_event_callback(log)
    uuid = running(driver)
    assert len(await log.wait_for(2)) == 2
    assert driver.get_domain(uuid).state is DomainState.RUNNING
    driver.set_event_callback(None)


@pytest.mark.parametrize(("event", "detail", "state", "reason"), [
    (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED,
     DomainState.CRASHED, "stopped/crashed"),
    (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_SAVED,
     DomainState.HIBERNATED, "stopped/saved"),
    (libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_STARTED_RESTORED,
     DomainState.RUNNING, "started/restored"),
    (libvirt.VIR_DOMAIN_EVENT_DEFINED, libvirt.VIR_DOMAIN_EVENT_DEFINED_UPDATED,
     DomainState.UNKNOWN, "defined/updated"),
    (libvirt.VIR_DOMAIN_EVENT_SHUTDOWN, libvirt.VIR_DOMAIN_EVENT_SHUTDOWN_GUEST,
     DomainState.SHUTTING_DOWN, "shutdown/guest"),
    (libvirt.VIR_DOMAIN_EVENT_CRASHED, libvirt.VIR_DOMAIN_EVENT_CRASHED_PANICKED,
     DomainState.CRASHED, "crashed/panicked"),
    (99, 7, DomainState.UNKNOWN, "event/7"),
])
def test_libvirt_events_map_to_usher_states(event: int, detail: int, state: DomainState,
                                            reason: str) -> None:
    # Events the test driver cannot produce (crashes, guest shutdowns), mapped directly.
    assert lifecycle_event("u", "n", event, detail) == DomainEvent("u", "n", state, reason)


def test_libvirt_events_of_a_migration_map_to_usher_states() -> None:
    # As a real libvirtd emits them (tests/e2e/realguest has no event loop).
    def ev(event: int, detail: int, arriving: bool = False) -> tuple[DomainState, str]:
        e = lifecycle_event("u", "n", event, detail, arriving=arriving)
        return e.state, e.reason

    assert ev(libvirt.VIR_DOMAIN_EVENT_SUSPENDED, libvirt.VIR_DOMAIN_EVENT_SUSPENDED_MIGRATED) \
        == (DomainState.PAUSED, "suspended/migrated")
    assert ev(libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_MIGRATED) \
        == (DomainState.STOPPED, "stopped/migrated")
    assert ev(libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_STARTED_MIGRATED) \
        == (DomainState.RUNNING, "started/migrated")
    # Defined on the target after it started there: not a stopped domain.
    assert ev(libvirt.VIR_DOMAIN_EVENT_DEFINED, libvirt.VIR_DOMAIN_EVENT_DEFINED_ADDED,
              arriving=True) == (DomainState.UNKNOWN, "defined/added")
    assert ev(libvirt.VIR_DOMAIN_EVENT_RESUMED, libvirt.VIR_DOMAIN_EVENT_RESUMED_MIGRATED) \
        == (DomainState.RUNNING, "resumed/migrated")


def test_libvirt_driver_rejects_unknown_uris_and_mismatched_fake_hosts(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        LibvirtDriver("vbox:///session")
    host = FakeHost.create(tmp_path / "h.xml", hostname="h", cpus=1, memory_mib=1024)
    with pytest.raises(ConfigError):
        LibvirtDriver("test:///default", fake_host=host)
    assert LibvirtDriver("vbox:///session", domain_type="kvm").domain_type == "kvm"


def test_libvirt_errors_are_translated_quietly(tmp_path: Path,
                                               capfd: pytest.CaptureFixture[str]) -> None:
    d = make_libvirt(tmp_path)
    d.open()
    try:
        with pytest.raises(DomainNotFound) as caught:
            d.get_domain(MISSING_UUID)
        assert caught.value.details["libvirt_code"] == libvirt.VIR_ERR_NO_DOMAIN
        assert MISSING_UUID in str(caught.value)
    finally:
        d.close()
    assert "libvirt" not in capfd.readouterr().err


def _libvirt_error(code: int, domain: int, message: str) -> libvirt.libvirtError:
    e = libvirt.libvirtError(message)
    e.err = (code, domain, message, libvirt.VIR_ERR_ERROR, None, None, None, 0, 0)
    return e


@pytest.mark.parametrize("code, message", [
    (libvirt.VIR_ERR_SYSTEM_ERROR, "End of file while reading data: Input/output error"),
    (libvirt.VIR_ERR_INTERNAL_ERROR, "client socket is closed"),
    (libvirt.VIR_ERR_INTERNAL_ERROR, "connection closed due to keepalive timeout"),
])
def test_a_broken_libvirt_connection_is_not_connected(code: int, message: str) -> None:
    with pytest.raises(NotConnected, match=message), libvirt_errors("list domains"):
        raise _libvirt_error(code, libvirt.VIR_FROM_RPC, message)
    # Not while connecting: open promises HypervisorError for a daemon that is not there.
    with pytest.raises(HypervisorError), libvirt_errors("connect", connecting=True):
        raise _libvirt_error(code, libvirt.VIR_FROM_RPC, message)
    # The same codes from the hypervisor itself are its own failures.
    with pytest.raises(HypervisorError), libvirt_errors("start"):
        raise _libvirt_error(code, libvirt.VIR_FROM_QEMU, message)


def test_a_missing_virtlogd_is_a_hypervisor_error_that_says_what_to_do() -> None:
    # libvirt reports it as an RPC system error, but the connection to libvirt is fine.
    message = "Failed to connect socket to '/run/libvirt/virtlogd-sock': Connection refused"
    with pytest.raises(HypervisorError) as caught, libvirt_errors("start"):
        raise _libvirt_error(libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_RPC, message)
    assert not isinstance(caught.value, NotConnected)
    assert "virtlogd -d" in str(caught.value) and "stdio_handler" in str(caught.value)
