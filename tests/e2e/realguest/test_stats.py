"""Resource counters of a real guest: LibvirtDriver.domain_stats on qemu:///system.

libvirt's test driver reports only the state in virConnectGetAllDomainStats
(the driver then reads it one call at a time); real QEMU reports CPU time,
balloon, disks and interfaces in the one call. One tiny guest, booted from
its kernel with a small qcow2 disk and no network; it need not finish
booting: its CPU time grows from the first instruction.
"""

from __future__ import annotations

import subprocess
import time
import uuid as uuidlib
from pathlib import Path

import libvirt
import pytest

from usher.lnm.drivers.base import DomainSpec, DomainStats
from usher.lnm.drivers.libvirt import LibvirtDriver
from usher.lnm.tinyguest import TinyGuest

pytestmark = [pytest.mark.e2e, pytest.mark.realguest, pytest.mark.timeout(60)]


def test_a_real_guests_counters(tiny_guest: TinyGuest, system_libvirt: libvirt.virConnect,
                                shared_tmp: Path) -> None:
    disk = shared_tmp / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    disk.chmod(0o666)
    uuid = str(uuidlib.uuid4())
    spec = DomainSpec(uuid=uuid, name=f"usher-rg-stats-{uuid[:8]}", memory_mib=128, vcpus=1,
                      mac="52:54:00:5a:a7:01", owner="rg", task_id="rg", disk=str(disk),
                      kernel=str(tiny_guest.kernel), initrd=str(tiny_guest.initrd),
                      cmdline=tiny_guest.cmdline_for(hostname="stats"),
                      console_log=str(shared_tmp / "console.log"))
    driver = LibvirtDriver("qemu:///system", domain_type="qemu", network="")
    driver.open()
    try:
        driver.define(spec)
        assert driver.domain_stats([uuid]) == [DomainStats(uuid=uuid)]  # not running yet
        driver.start(uuid)
        time.sleep(1.0)
        [first] = driver.domain_stats([uuid])
        time.sleep(1.0)
        [second] = driver.domain_stats([uuid])
        assert second.cpu_ns > first.cpu_ns > 10**8  # TCG keeps the CPU busy booting
        assert first.memory_kib == second.memory_kib == 128 * 1024
        assert second.rss_kib is not None and second.rss_kib > 16 * 1024  # QEMU holds memory
        assert second.disk_rd_bytes >= first.disk_rd_bytes >= 0
        assert (second.net_rx_bytes, second.net_tx_bytes) == (0, 0)  # no interface
        assert uuid in {s.uuid for s in driver.domain_stats()}
        driver.pause(uuid)
        [paused] = driver.domain_stats([uuid])
        assert paused.memory_kib == 128 * 1024 and paused.cpu_ns >= second.cpu_ns
        driver.power_off(uuid)
        assert driver.domain_stats([uuid]) == [DomainStats(uuid=uuid)]
    finally:
        driver.undefine(uuid)
        driver.close()
