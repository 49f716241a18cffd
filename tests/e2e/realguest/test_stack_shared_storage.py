"""Hosts that share one image store: VMs move between them, their disks never do.

Two libvirtd hosts of :mod:`.hosts` mount one GlusterFS volume (:mod:`.gluster`)
at their store path, and their node managers name it as their
``shared_store``. Through the whole stack (ush -> controller -> node
managers): a running guest migrates live without any of its disk being
copied (libvirt accepts that only because the disk is on a filesystem it
knows for shared), and keeps answering; a controller killed while libvirt
moves it finds it where it went; stopped, it moves cold, its disk left in
place; destroyed, its disk goes.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from tests.e2e.realguest.hosts import SUBNET, HostCluster
from tests.e2e.realguest.nodes import GuestStack, start_site
from tests.e2e.site import Site, wait_for
from usher.lnm.tinyguest import TinyGuest, ready_fields

pytestmark = [pytest.mark.e2e, pytest.mark.realguest, pytest.mark.timeout(180)]

GUEST_IP = str(SUBNET[101])
BOOT_S = 30.0
BEAT_S = 8.0
STORE = "gluster1"
PATTERN, PATTERN_LEN = "0x6d", "2M"
READY = "USHER-TINY-GUEST-READY"


class SharedStack(GuestStack):
    """The two hosts of one shared store and their guest ``s1``."""

    def disk(self, uuid: str) -> Path:
        """The VM's overlay in the shared store, as the root namespace reaches it."""
        return self.cluster.hosts[0].store_dir / "vms" / f"{uuid}.qcow2"

    def domains(self, index: int) -> list[str]:
        return self.cluster.hosts[index].call(
            lambda conn: [d.UUIDString() for d in conn.listAllDomains()])


@pytest.fixture(scope="module")
def shared(tiny_guest: TinyGuest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[SharedStack]:
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse on this machine: the shared store is a FUSE mount")
    missing = [t for t in ("glusterd", "glusterfs", "gluster") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: run ./scripts/setup")
    with HostCluster(2, shared_store=True) as cluster:
        site = Site(tmp_path_factory.mktemp("shared") / "site", lnms=2, task_deadline_s=60.0)
        try:
            start_site(site, cluster, tiny_guest, shared_store=STORE)
            yield SharedStack(site=site, cluster=cluster, guest="s1", ip=GUEST_IP,
                              beat_s=BEAT_S)
        finally:
            site.close()


def test_a_running_guest_migrates_live_and_its_disk_stays_put(shared: SharedStack) -> None:
    s = shared
    vmm1, vmm2 = s.names
    assert all(h.shared_store == STORE for h in s.site.client().list_hosts())
    assert "STORE" in s.ush("vmm_list")
    s.ush(f"start s1 --image tinydisk --ram 128 --vmm {vmm1} --ip_range seg --ip {GUEST_IP}")
    ready = wait_for(lambda: ready_fields(s.console()), BOOT_S, "the guest's READY marker")
    _, _, uuid = s.vm()
    assert ready["uuid"].lower() == uuid
    beat = s.alive(0)
    disk = s.disk(uuid)
    inode = disk.stat().st_ino

    out = s.ush(f"migrate s1 --vmm {vmm2}")
    found = re.search(rf"live migration {vmm1} -> {vmm2} \((\d+\.\d) s\), its disk on "
                      rf"shared store {STORE}", out)
    assert found, out
    print(f"\nlive hop on a shared store: {found.group(1)} s")
    job = s.cluster.hosts[1].call(lambda conn: conn.lookupByUUIDString(uuid).jobStats(
        libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED))
    assert int(job.get("disk_total", 0)) == 0, job  # not one block of the disk was copied
    assert s.vm() == (vmm2, "running", uuid)
    assert s.domains(0) == [] and s.domains(1) == [uuid]
    assert disk.stat().st_ino == inode  # the same file, kept by the source's cleanup
    s.alive(beat)
    # One console log, appended to by both hosts' QEMUs: one boot in it.
    assert s.console().count(READY) == 1


def test_a_controller_killed_mid_transfer_finds_the_guest_where_it_went(
        shared: SharedStack) -> None:
    s = shared
    vmm1, vmm2 = s.names
    _, _, uuid = s.vm()
    before = s.alive(0)
    client = s.site.client()
    [task] = client.migrate(["s1"], vmm=vmm1)
    wait_for(lambda: "%" in client.tasks([task.id])[0].progress, 20,
             "the transfer to start", interval=0.02)
    assert s.site.controller is not None
    s.site.kill(s.site.controller)  # SIGKILL while libvirt moves the guest
    s.site.start_controller()
    [done] = client.wait_all([task], 90)
    assert done.state == "done", done
    print(f"\nafter a controller restart mid-transfer: {done.message}")
    assert s.vm() == (vmm1, "running", uuid)
    assert s.domains(0) == [uuid] and s.domains(1) == []
    assert s.disk(uuid).exists()
    s.alive(before)
    assert s.console().count(READY) == 1


def test_a_stopped_guest_moves_cold_and_its_disk_stays_put(shared: SharedStack) -> None:
    s = shared
    vmm2, vmm1 = s.names  # the guest is on the first host now
    s.ush("shutdown s1")
    _, state, uuid = s.vm()
    assert state == "stopped"
    disk = s.disk(uuid)
    inode = disk.stat().st_ino
    inside = str(s.cluster.store_path / "vms" / f"{uuid}.qcow2")
    s.cluster.hosts[0].run(["qemu-io", "-f", "qcow2", "-c",
                            f"write -P {PATTERN} 0 {PATTERN_LEN}", inside])

    started = time.monotonic()
    out = s.ush(f"migrate s1 --vmm {vmm1}")
    assert f"cold migration {vmm2} -> {vmm1}, its disk on shared store {STORE}" in out, out
    print(f"\ncold move on a shared store: {time.monotonic() - started:.2f} s")
    assert s.vm() == (vmm1, "stopped", uuid)
    assert s.domains(1) == [uuid] and s.domains(0) == []
    assert disk.stat().st_ino == inode
    s.cluster.hosts[1].run(["qemu-io", "-r", "-f", "qcow2", "-c",
                            f"read -P {PATTERN} 0 {PATTERN_LEN}", inside])

    s.ush("start s1")
    wait_for(lambda: s.console().count(READY) == 2, BOOT_S, "READY after the move")
    s.ush("destroy s1")
    assert not disk.exists()
    assert not disk.with_name(f"{uuid}.console.log").exists()
