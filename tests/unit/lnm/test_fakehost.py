"""Fake hosts: their size, and domains that outlive the driver that ran them."""

from __future__ import annotations

from pathlib import Path

import libvirt
import pytest

from usher.errors import ConfigError
from usher.lnm import fakehost
from usher.lnm.domxml import build_domain_xml
from usher.lnm.drivers.base import DomainSpec, DomainState
from usher.lnm.drivers.libvirt import LibvirtDriver
from usher.lnm.fakehost import FakeHost, stored_domains


def spec(n: int, owner: str = "alice") -> DomainSpec:
    return DomainSpec(uuid=f"00000000-0000-4000-8000-{n:012d}",
                      name=f"vm{n}.{owner}.usher.example.org", memory_mib=128 * n, vcpus=n,
                      mac=f"52:54:00:00:01:{n:02x}", owner=owner, task_id=f"task-{n}")


def open_driver(path: Path, *, cpus: int = 16, memory_mib: int = 65536) -> LibvirtDriver:
    host = FakeHost.create(path, hostname="h7.usher.example.org", cpus=cpus,
                           memory_mib=memory_mib)
    driver = LibvirtDriver(host.uri, fake_host=host)
    driver.open()
    return driver


def test_new_fake_host_has_its_size_and_no_domains(tmp_path: Path) -> None:
    host = FakeHost.create(tmp_path / "h.xml", hostname="h7.usher.example.org", cpus=48,
                           memory_mib=196608)
    assert host.uri == f"test://{tmp_path / 'h.xml'}"
    driver = LibvirtDriver(host.uri, fake_host=host)
    driver.open()
    try:
        facts = driver.host_facts()
        assert (facts.hostname, facts.cpus, facts.memory_mib) == (
            "h7.usher.example.org", 48, 196608)
        assert facts.hypervisor == host.uri
        assert driver.list_domains() == []
    finally:
        driver.close()


def test_relative_paths_become_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    host = FakeHost.create(Path("rel.xml"), hostname="h", cpus=1, memory_mib=512)
    assert host.uri == f"test://{tmp_path}/rel.xml"


def test_domains_and_their_states_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "h.xml"
    driver = open_driver(path)
    for n in (1, 2, 3):
        driver.define(spec(n, owner=f"user{n}"))
        driver.start(spec(n).uuid)
    driver.pause(spec(2).uuid)
    driver.hibernate(spec(3).uuid)
    driver.define(spec(4))
    driver.define(spec(5))
    driver.undefine(spec(5).uuid)
    before = {d.uuid: d for d in driver.list_domains()}
    driver.close()          # the node manager dies; the "host" keeps running

    again = open_driver(path)
    try:
        after = {d.uuid: d for d in again.list_domains()}
        assert after == before
        assert {u: d.state for u, d in after.items()} == {
            spec(1).uuid: DomainState.RUNNING,
            spec(2).uuid: DomainState.PAUSED,
            spec(3).uuid: DomainState.HIBERNATED,
            spec(4).uuid: DomainState.STOPPED,
        }
        assert after[spec(3).uuid].owner == "user3"
        assert again.start(spec(3).uuid).state is DomainState.RUNNING
        assert again.resume(spec(2).uuid).state is DomainState.RUNNING
    finally:
        again.close()


def test_changes_are_journaled_at_flush_and_no_ops_not_at_all(tmp_path: Path) -> None:
    path = tmp_path / "h.xml"
    journal = tmp_path / "h.xml.journal"
    driver = open_driver(path)
    try:
        uuid = driver.define(spec(1)).uuid
        driver.start(uuid)
        driver.flush()
        inode, size = path.stat().st_ino, journal.stat().st_size
        driver.start(uuid)
        driver.define(spec(1))
        driver.flush()
        assert journal.stat().st_size == size  # no-ops: nothing written
        driver.pause(uuid)
        driver.resume(uuid)
        driver.pause(uuid)
        assert journal.stat().st_size == size  # not yet: written at the next flush
        driver.flush()
        assert journal.stat().st_size > size
        assert path.stat().st_ino == inode  # appended, not rewritten
        assert "<test:runstate>3</test:runstate>" in stored_domains(path)[uuid]
    finally:
        driver.close()
    # libvirt reads only the file: opening the host folds the journal in first.
    again = open_driver(path)
    try:
        assert not journal.exists()
        assert "<test:runstate>3</test:runstate>" in path.read_text()
        assert again.get_domain(uuid).state is DomainState.PAUSED
    finally:
        again.close()


def test_a_torn_journal_line_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "h.xml"
    driver = open_driver(path)
    try:
        driver.define(spec(1))
        driver.start(spec(1).uuid)
        driver.flush()
    finally:
        driver.close()
    journal = tmp_path / "h.xml.journal"
    with journal.open("a") as fh:  # killed in the middle of the next append
        fh.write('{"uuid": "' + spec(1).uuid + '", "xml": "<dom')
    again = open_driver(path)
    try:
        assert again.get_domain(spec(1).uuid).state is DomainState.RUNNING
    finally:
        again.close()


def test_a_large_journal_is_folded_into_the_file(tmp_path: Path, monkeypatch:
                                                  pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fakehost, "COMPACT_MIN_BYTES", 4096)
    path = tmp_path / "h.xml"
    driver = open_driver(path)
    try:
        uuid = driver.define(spec(1)).uuid
        driver.start(uuid)
        driver.flush()
        for _ in range(20):
            driver.pause(uuid)
            driver.flush()
            driver.resume(uuid)
            driver.flush()
        # 40 appends of a domain each would be far larger: it was folded in.
        journal = tmp_path / "h.xml.journal"
        assert not journal.exists() or journal.stat().st_size <= 2 * 4096
        assert "<test:runstate>1</test:runstate>" in stored_domains(path)[uuid]
    finally:
        driver.close()


def test_resizing_keeps_the_domains(tmp_path: Path) -> None:
    path = tmp_path / "h.xml"
    driver = open_driver(path)
    driver.define(spec(1))
    driver.start(spec(1).uuid)
    driver.define(spec(2))
    driver.start(spec(2).uuid)
    driver.hibernate(spec(2).uuid)
    driver.define(spec(3))
    driver.close()

    bigger = open_driver(path, cpus=64, memory_mib=262144)
    try:
        facts = bigger.host_facts()
        assert (facts.cpus, facts.memory_mib) == (64, 262144)
        domains = {d.uuid: d for d in bigger.list_domains()}
        assert domains[spec(1).uuid].state is DomainState.RUNNING
        assert domains[spec(1).uuid].owner == "alice"
        assert domains[spec(2).uuid].state is DomainState.HIBERNATED
        assert domains[spec(3).uuid].state is DomainState.STOPPED
    finally:
        bigger.close()


def test_save_rereads_only_the_changed_domains(tmp_path: Path) -> None:
    host = FakeHost.create(tmp_path / "h.xml", hostname="h", cpus=4, memory_mib=8192)
    conn = libvirt.open(host.uri)
    try:
        for n in (1, 2):
            conn.defineXML(build_domain_xml(spec(n), "test"))
        host.save(conn)
        # Start domain 2 without telling the cache: a save naming only
        # domain 1 keeps the cached (stopped) domain 2.
        conn.lookupByUUIDString(spec(2).uuid).create()
        host.save(conn, changed={spec(1).uuid})
        stored = stored_domains(host.path)
        assert "<test:runstate>1</test:runstate>" not in stored[spec(2).uuid]
        host.save(conn, changed={spec(2).uuid})
        assert "<test:runstate>1</test:runstate>" in stored_domains(host.path)[spec(2).uuid]
        # A changed UUID that no longer exists is dropped from the file.
        conn.lookupByUUIDString(spec(1).uuid).undefine()
        host.save(conn, changed={spec(1).uuid})
        assert set(stored_domains(host.path)) == {spec(2).uuid}
        host.compact()
        assert spec(1).uuid not in host.path.read_text()
        assert spec(2).uuid in host.path.read_text()
    finally:
        conn.close()
    assert not list(tmp_path.glob("*.tmp"))


def test_transient_domains_stay_transient(tmp_path: Path) -> None:
    host = FakeHost.create(tmp_path / "h.xml", hostname="h", cpus=4, memory_mib=8192)
    conn = libvirt.open(host.uri)
    try:
        conn.createXML("<domain type='test'><name>t</name><memory>65536</memory>"
                       "<os><type>hvm</type></os></domain>")
        host.save(conn)
    finally:
        conn.close()
    conn = libvirt.open(host.uri)
    try:
        dom = conn.lookupByName("t")
        assert dom.isActive() and not dom.isPersistent()
    finally:
        conn.close()


def test_a_file_that_is_not_a_host_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "h.xml"
    path.write_text("<domain/>")
    with pytest.raises(ConfigError):
        FakeHost.create(path, hostname="h", cpus=1, memory_mib=512)
    path.write_text("not xml")
    with pytest.raises(ConfigError):
        FakeHost.create(path, hostname="h", cpus=1, memory_mib=512)
    with pytest.raises(ConfigError):
        FakeHost.create(tmp_path / "new.xml", hostname="h", cpus=0, memory_mib=512)


# ------------------------------------------------------------- addresses
def dhcp_hosts(driver: LibvirtDriver, network: str = "usher") -> set[tuple[str, str, str]]:
    """The DHCP host entries of ``network`` as libvirt holds them now."""
    import xml.etree.ElementTree as ET

    conn = driver._connection()
    root = ET.fromstring(conn.networkLookupByName(network).XMLDesc(0))
    return {(h.get("mac", ""), h.get("ip", ""), h.get("name", ""))
            for h in root.iterfind("ip/dhcp/host")}


def addressed(n: int, ip: str) -> DomainSpec:
    base = spec(n)
    return DomainSpec(uuid=base.uuid, name=base.name, memory_mib=64, vcpus=1, mac=base.mac,
                      owner=base.owner, task_id=base.task_id, ip=ip, ip_prefix=16,
                      gateway="10.87.0.1")


def open_networked(path: Path) -> LibvirtDriver:
    host = FakeHost.create(path, hostname="h7.usher.example.org", cpus=16, memory_mib=65536,
                           network=("usher", "10.87.0.0/16"))
    driver = LibvirtDriver(host.uri, fake_host=host, network="usher")
    driver.open()
    return driver


def test_addresses_become_dhcp_host_entries(tmp_path: Path) -> None:
    path = tmp_path / "h.xml"
    driver = open_networked(path)
    try:
        driver.define(addressed(1, "10.87.0.5"))
        driver.define(addressed(2, "10.87.0.6"))
        driver.define(addressed(2, "10.87.0.6"))  # a retried define: no second entry
        driver.define(addressed(3, "192.168.50.7"))  # outside the network: left alone
        for n in (1, 2, 3):  # the entry is written beside the boot, done when start is
            driver.start(spec(n).uuid)
        assert dhcp_hosts(driver) == {(spec(1).mac, "10.87.0.5", ""),
                                      (spec(2).mac, "10.87.0.6", "")}
        driver.undefine(spec(1).uuid)
        assert dhcp_hosts(driver) == {(spec(2).mac, "10.87.0.6", "")}
    finally:
        driver.close()
    # libvirt's test driver keeps networks in memory: after a restart the
    # node manager rebuilds the entries from the domains' metadata.
    again = open_networked(path)
    try:
        assert dhcp_hosts(again) == {(spec(2).mac, "10.87.0.6", "")}
        assert "<network><name>usher</name>" in path.read_text()  # kept in the file
    finally:
        again.close()


def test_a_start_that_does_not_wait_for_the_address_leaves_it_to_address_ready(
        tmp_path: Path) -> None:
    driver = open_networked(tmp_path / "h.xml")
    try:
        specs = [addressed(n, f"10.87.0.{40 + n}") for n in (1, 2, 3)]
        for s in specs:  # as a node manager does for a burst: no waits between
            driver.define(s)
            driver.start(s.uuid, wait_address=False)
        for s in specs:
            driver.address_ready(s.uuid)
        assert dhcp_hosts(driver) == {(s.mac, s.ip, "") for s in specs}
    finally:
        driver.close()


def test_vms_that_share_a_short_name_each_get_their_entry(tmp_path: Path) -> None:
    import dataclasses

    driver = open_networked(tmp_path / "h.xml")
    try:
        # The same first label (two clusters of one user, two users) and one
        # that starts with a digit: entries carry no name, so none collides.
        names = ["web.a.seuss.usher.test", "web.b.seuss.usher.test", "1.burst.seuss.usher.test",
                 "1.seq.seuss.usher.test"]
        specs = [dataclasses.replace(addressed(n, f"10.87.0.{20 + n}"), name=name)
                 for n, name in enumerate(names, start=1)]
        for s in specs:
            driver.define(s)
            driver.start(s.uuid)
        assert dhcp_hosts(driver) == {(s.mac, s.ip, "") for s in specs}
    finally:
        driver.close()


def test_a_kernel_booted_directly_gets_its_address_on_the_command_line_only(
        tmp_path: Path) -> None:
    import dataclasses

    driver = open_networked(tmp_path / "h.xml")
    try:
        booted = dataclasses.replace(addressed(1, "10.87.0.5"), kernel="/boot/vmlinuz")
        driver.define(booted)
        driver.start(booted.uuid)
        assert dhcp_hosts(driver) == set()
    finally:
        driver.close()


def test_a_domain_that_arrived_by_migration_gets_its_dhcp_entry_when_adopted(
        tmp_path: Path) -> None:
    import dataclasses

    driver = open_networked(tmp_path / "h.xml")
    try:
        # Arrived: libvirt defined it here, the driver wrote nothing for it.
        arrived = addressed(1, "10.87.0.5")
        booted = dataclasses.replace(addressed(2, "10.87.0.6"), kernel="/boot/vmlinuz")
        for s in (arrived, booted):
            driver._connection().defineXML(build_domain_xml(s, "test", network="usher"))
        assert dhcp_hosts(driver) == set()
        for _ in range(2):  # a repeat adds no second entry
            assert driver.adopt_incoming(arrived.uuid).uuid == arrived.uuid
        driver.adopt_incoming(booted.uuid)  # its address is on its command line
        assert dhcp_hosts(driver) == {(arrived.mac, "10.87.0.5", "")}
    finally:
        driver.close()


def test_no_such_network_is_not_an_error(tmp_path: Path) -> None:
    host = FakeHost.create(tmp_path / "h.xml", hostname="h", cpus=4, memory_mib=8192)
    driver = LibvirtDriver(host.uri, fake_host=host, network="nowhere")
    driver.open()
    try:
        assert driver.define(addressed(1, "10.87.0.5")).uuid == spec(1).uuid
        driver.undefine(spec(1).uuid)
    finally:
        driver.close()
