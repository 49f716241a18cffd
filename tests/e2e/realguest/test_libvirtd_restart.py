"""A host's libvirtd killed under a running real guest, then started again.

One libvirtd host in namespaces (:mod:`.hosts`), its node manager run as in
:mod:`.nodes`, one controller. The tiny guest boots there; then the host's
libvirtd is killed by its PID (SIGKILL, as a crash). The node manager notices
the lost connection, hangs up on the controller with the reason, and the
controller marks the host lost and the VM unknown. libvirtd is started again:
the node manager reopens it (retrying with backoff meanwhile), registers, and
the inventory brings the VM back to running. The QEMU process outlives its
libvirtd: the guest is the same one, still beating, never rebooted.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.realguest.hosts import SUBNET, HostCluster
from tests.e2e.realguest.nodes import add_segment_and_tinydisk, lnm_config, start_lnm
from tests.e2e.site import Site, wait_for
from usher.lnm.tinyguest import TinyGuest, heartbeats, ready_fields

pytestmark = [pytest.mark.e2e, pytest.mark.realguest, pytest.mark.timeout(120)]

GUEST_IP = str(SUBNET[101])
BOOT_S = 30.0  # TCG on a busy machine: READY 4-5 s after start
STATE_S = 15.0  # lost after 1.5 s (the Site's host_lost_after_s), back within a retry or two


@pytest.fixture(scope="module")
def one_host(tiny_guest: TinyGuest) -> Iterator[HostCluster]:
    missing = [tool for tool in ("ip", "nsenter", "unshare", "libvirtd", "virtlogd")
               if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: run ./scripts/setup")
    with HostCluster(1) as cluster:
        yield cluster


@pytest.fixture
def site(one_host: HostCluster, tiny_guest: TinyGuest, tmp_path: Path) -> Iterator[Site]:
    cluster = one_host
    s = Site(tmp_path / "site", lnms=1, task_deadline_s=60.0)
    try:
        add_segment_and_tinydisk(s, cluster, tiny_guest)
        # Reopening libvirtd retries at most a second apart: the test waits less.
        lnm_config(s, 0, cluster.hosts[0], cluster.store_path, backoff_max_s=1.0)
        s.start_controller()
        start_lnm(s, 0, cluster.hosts[0])
        client = s.client()
        wait_for(lambda: [h.state for h in client.list_hosts()] == ["up"], 30, "the VMM up")
        yield s
    finally:
        s.close()


def test_killed_libvirtd_makes_the_host_lost_and_its_restart_reconciles(
        one_host: HostCluster, site: Site) -> None:
    host = one_host.hosts[0]
    client = site.client()

    def console() -> str:
        proc = site.ush("console g1 --tail 400", timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    def states() -> tuple[str, str]:
        [h] = client.list_hosts()
        [vm] = client.list_vms(["g1"])
        return h.state, vm.state

    proc = site.ush(f"start g1 --image tinydisk --ram 128 --ip_range seg --ip {GUEST_IP}",
                    timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wait_for(lambda: ready_fields(console()), BOOT_S, "the guest's READY marker")
    [qemu] = host.qemu_pids()
    beat = max(wait_for(lambda: heartbeats(console()), 10, "a heartbeat"))

    started = time.monotonic()
    host.kill_daemon("libvirtd")
    wait_for(lambda: states() == ("lost", "unknown"), STATE_S, "host lost, VM unknown")
    lost_s = time.monotonic() - started
    lnm_log = (site.dir / "logs" / "lnm-0.log").read_text()
    assert "hypervisor connection lost" in lnm_log, lnm_log[-3000:]
    assert "peer said bye: hypervisor connection lost" in site.log("controller.log")
    assert host.qemu_pids() == [qemu]  # the guest runs on without its libvirtd
    # The node manager keeps trying (and says so) while libvirtd is down.
    wait_for(lambda: "hypervisor still unavailable" in
             (site.dir / "logs" / "lnm-0.log").read_text(), 10, "a logged retry")

    restarted = time.monotonic()
    host.start_daemons()
    wait_for(lambda: states() == ("up", "running"), STATE_S, "host up, VM running")
    back_s = time.monotonic() - restarted
    # The same QEMU process and guest: it kept counting and never booted again.
    assert host.qemu_pids() == [qemu]
    after = wait_for(lambda: [n for n in heartbeats(console()) if n > beat + 1], 10,
                     "heartbeats after the restart")
    assert max(after) > beat
    assert console().count("USHER-TINY-GUEST-READY") == 1
    print(f"\nlibvirtd killed: lost in {lost_s:.1f} s; restarted: reconciled in {back_s:.1f} s")
    proc = site.ush("destroy g1", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
