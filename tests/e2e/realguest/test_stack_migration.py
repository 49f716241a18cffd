"""Migration of a real guest through the whole stack: ush -> controller -> node managers.

Three node managers, one per libvirtd host of :mod:`.hosts`, register with one
controller. One guest (the tiny guest, 128 MiB, TCG, a qcow2 overlay on a
small base, an address of the test segment) starts on host 1 and moves with
``ush migrate NAME --vmm HOST``: live 1 -> 2 -> 3, an abort, a target whose
libvirtd is down, then stopped, its disk with it, 3 -> 2, where it boots again.

Where the node managers run: see :mod:`.nodes` (the host's mount and UTS
namespaces, the root network namespace). Overlays record their base by the
store's path, and migration needs the same disk path on both sides, so every
host keeps its store at one path. Node managers never connect to another
host: the libvirtds do, peer to peer, from inside their network namespaces,
at each host's ``migration_uri``; no packet for the test segment leaves the
root namespace.
The guest's HTTP responder is asked from the switch namespace only.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator

import dns.message
import dns.query
import libvirt
import pytest

from tests.e2e.realguest.hosts import SUBNET, HostCluster, TestHost
from tests.e2e.realguest.nodes import GuestStack, start_site
from tests.e2e.site import Site, wait_for
from usher.lnm.tinyguest import TinyGuest, ready_fields

pytestmark = [pytest.mark.e2e, pytest.mark.realguest, pytest.mark.timeout(180)]

GUEST_IP = str(SUBNET[100])
BOOT_S = 30.0  # TCG on a busy 2-core machine: READY 4-5 s after start
BEAT_S = 8.0
# Written into the stopped guest's overlay before its disk moves.
PATTERN, PATTERN_LEN = "0x3c", "2M"
TIMES: list[tuple[str, float]] = []  # what took how long, printed at the end


class Stack(GuestStack):
    """The three-host site and its guest ``g1``."""

    def forget_arp(self) -> None:
        """Drop the switch namespace's ARP entry of the guest.

        A live migration announces the guest's MAC on its new port (QEMU
        sends RARPs). A guest booted on another host sends nothing until
        asked (the tiny guest has no gratuitous ARP), so the client would
        keep sending to the old port until its ARP entry went stale and it
        asked by broadcast: 20 s and more. The namespace is ours.
        """
        cluster = self.cluster
        subprocess.run(["ip", "-n", cluster.switch, "neigh", "flush", "to", GUEST_IP],
                       check=True, capture_output=True, timeout=10)

    def traces(self, host: TestHost, uuid: str) -> list[str]:
        """What ``host`` still has of the VM: its domain, overlay, console log."""
        found = []
        if host.libvirtd_running() and uuid in host.call(
                lambda conn: [d.UUIDString() for d in conn.listAllDomains()]):
            found.append("domain")
        vms = host.store_dir / "vms"
        found += [p.name for p in (vms / f"{uuid}.qcow2", vms / f"{uuid}.console.log")
                  if p.exists()]
        return found


@pytest.fixture(scope="module")
def stack(libvirt_hosts: HostCluster, tiny_guest: TinyGuest,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    cluster = libvirt_hosts
    site = Site(tmp_path_factory.mktemp("migration") / "site", lnms=len(cluster.hosts),
                task_deadline_s=60.0)
    try:
        start_site(site, cluster, tiny_guest)
        yield Stack(site=site, cluster=cluster, guest="g1", ip=GUEST_IP, beat_s=BEAT_S)
    finally:
        site.close()
        print(f"\nthrough the stack: {', '.join(f'{k} {s:.2f} s' for k, s in TIMES)}")


def test_a_guest_migrates_live_across_hosts_and_keeps_its_address(stack: Stack) -> None:
    s, hosts = stack, stack.cluster.hosts
    [vmm1, vmm2, vmm3] = s.names
    started = time.monotonic()
    s.ush(f"start g1 --image tinydisk --ram 128 --vmm {vmm1} --ip_range seg --ip {GUEST_IP}")
    ready = wait_for(lambda: ready_fields(s.console()), BOOT_S, "the guest's READY marker")
    host, state, uuid = s.vm()
    assert (host, state) == (vmm1, "running") and ready["uuid"].lower() == uuid
    TIMES.append(("READY", time.monotonic() - started))
    beat = s.alive(0)

    for source, target in ((0, 1), (1, 2)):
        out = s.ush(f"migrate g1 --vmm {s.names[target]}")
        found = re.search(rf"live migration {s.names[source]} -> {s.names[target]} "
                          rf"\((\d+\.\d) s\)", out)
        assert found, out
        TIMES.append((f"hop {source + 1}->{target + 1}", float(found.group(1))))
        job = hosts[target].call(lambda conn: conn.lookupByUUIDString(uuid).jobStats(
            libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED))
        TIMES.append(("  guest stopped", float(job.get("downtime", 0)) / 1000))
        # The same VM, on the target, still running (not booted again) and
        # answering at the same address; nothing of it left on the source.
        assert s.vm() == (s.names[target], "running", uuid)
        listed = s.ush("list g1")
        assert s.names[target].split(".")[0] in listed and GUEST_IP in listed, listed
        beat = s.alive(beat)
        assert "USHER-TINY-GUEST-READY" not in s.console()
        assert s.traces(hosts[source], uuid) == []
        assert s.traces(hosts[target], uuid) == ["domain", f"{uuid}.qcow2",
                                                 f"{uuid}.console.log"]

    # Name and address unchanged: the DNS record still points at the guest.
    dns_host, dns_port = str(s.site.info["dns"]).rsplit(":", 1)
    reply = dns.query.udp(dns.message.make_query("g1.seuss.usher.test.", "A"), dns_host,
                          port=int(dns_port), timeout=5)
    assert GUEST_IP in reply.to_text(), reply.to_text()


def test_abort_leaves_the_guest_where_it_was(stack: Stack) -> None:
    s = stack
    [vmm1, vmm2, vmm3] = s.names
    before = s.alive(0)
    client = s.site.client()
    [task] = client.migrate(["g1"], vmm=vmm2)
    wait_for(lambda: client.tasks([task.id])[0].progress, 10, "the migration to start",
             interval=0.02)
    out = s.ush("migrate --abort g1", ok=False)
    [done] = client.wait_all([task], 60)
    assert done.state == "error" and "abort" in done.message, (done, out)
    print(f"abort: {done.message}")
    assert s.vm()[:2] == (vmm3, "running")
    s.alive(before)
    assert s.traces(s.cluster.hosts[1], s.vm()[2]) == []


def test_a_target_whose_libvirtd_is_down_fails_clearly_and_the_guest_stays(
        stack: Stack) -> None:
    s = stack
    [vmm1, vmm2, vmm3] = s.names
    before = s.alive(0)
    down = s.cluster.hosts[0]
    down.stop_daemon("libvirtd")
    started = time.monotonic()
    out = s.ush(f"migrate g1 --vmm {vmm1}", ok=False)
    elapsed = time.monotonic() - started
    # Either its node manager has already noticed and left (the request is
    # refused up front), or the migration fails in a named step: both clear.
    assert (f"live migration {vmm3} -> {vmm1} failed" in out
            or f"VMM {vmm1} is not connected" in out), out
    print(f"to a stopped libvirtd, in {elapsed:.2f} s: {out.strip()}")
    assert s.vm()[:2] == (vmm3, "running")
    s.alive(before)
    assert s.traces(down, s.vm()[2]) == []


def test_a_stopped_guest_moves_with_its_disk(stack: Stack) -> None:
    s = stack
    [vmm1, vmm2, vmm3] = s.names
    h2, h3 = s.cluster.hosts[1], s.cluster.hosts[2]
    s.ush("shutdown g1")
    _, state, uuid = s.vm()
    assert state == "stopped"
    disk = str(s.cluster.store_path / "vms" / f"{uuid}.qcow2")  # as the hosts see it
    h3.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {PATTERN} 0 {PATTERN_LEN}", disk])

    out = s.ush(f"migrate g1 --vmm {vmm2}")
    found = re.search(rf"cold migration {vmm3} -> {vmm2} \((\d+\.\d) s\), its disk with it",
                      out)
    assert found, out
    TIMES.append(("stopped, disk 3->2", float(found.group(1))))
    assert s.vm() == (vmm2, "stopped", uuid)
    assert s.traces(h3, uuid) == []
    h2.run(["qemu-io", "-r", "-f", "qcow2", "-c", f"read -P {PATTERN} 0 {PATTERN_LEN}", disk])

    s.ush("start g1")
    wait_for(lambda: ready_fields(s.console()), BOOT_S, "READY after the move")
    s.forget_arp()
    s.alive(0)
    s.ush("destroy g1")
    assert s.traces(h2, uuid) == []
