"""Node managers of a :class:`~tests.e2e.site.Site` run against namespace hosts.

Where they run: each in its host's mount and UTS namespaces (``nsenter`` on
the harness's anchor) but in the root network namespace. So it sees what its
libvirtd sees: ``qemu:///system`` is that host's private socket and
``image_dir`` the host's private store at the path every host and its QEMU
use. In the root network namespace it reaches the controller on 127.0.0.1
like any node manager on the controller's machine.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.e2e.realguest.hosts import NETWORK, SUBNET, HostCluster, TestHost
from tests.e2e.site import Site, wait_for
from usher.config import LnmConfig, load_toml, to_toml
from usher.lnm.tinyguest import TinyGuest, heartbeats


def lnm_config(site: Site, i: int, host: TestHost, store: Path, **settings: Any) -> None:
    """Point node manager ``i`` of ``site`` at ``host``'s libvirtd; ``settings`` override."""
    path = Path(site.hosts[i]["config"])
    cfg = load_toml(LnmConfig, path)
    cfg.driver, cfg.uri, cfg.fake_host_file = "libvirt", "qemu:///system", ""
    cfg.network, cfg.domain_type = NETWORK, "qemu"
    cfg.image_dir = str(store)
    # As in production: libvirtd's link and QEMU's stream over TLS, with certificates
    # of a site CA laid out by usher-lnm libvirt-pki's code (see hosts.py).
    cfg.migration_uri = host.tls_uri
    for key, value in settings.items():
        setattr(cfg, key, value)
    path.write_text(to_toml(cfg))


def start_lnm(site: Site, i: int, host: TestHost) -> None:
    """Start node manager ``i`` inside ``host``'s namespaces; ``site.close`` stops it."""
    assert host.anchor is not None
    log = open(site.dir / "logs" / f"lnm-{i}.log", "ab")  # noqa: SIM115 - the child's
    try:
        site.lnm_procs[i] = subprocess.Popen(
            ["nsenter", "-t", str(host.anchor.pid), "-m", "-u", "--", sys.executable, "-m",
             "usher.lnm.cli", "--config", site.hosts[i]["config"]],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    finally:
        log.close()


def add_segment_and_tinydisk(site: Site, cluster: HostCluster, guest: TinyGuest) -> None:
    """Give ``site`` (before its controller starts) the test segment as IP range ``seg``
    and image ``tinydisk``: the tiny guest's kernel and initrd with a 16 MiB qcow2
    disk, kept outside the hosts' private stores so that every host can fetch it."""
    ctl = [sys.executable, "-m", "usher.controller.cli", "--config",
           site.info["controller"]["config"]]  # type: ignore[index]
    subprocess.run([*ctl, "range", "add", "seg", str(SUBNET)], check=True,
                   capture_output=True)
    disk = cluster.base / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"],
                   check=True, timeout=30)
    subprocess.run([*ctl, "image", "add", "tinydisk", "--disk", f"file://{disk}",
                    "--format", "qcow2", "--kernel", f"file://{guest.kernel}",
                    "--initrd", f"file://{guest.initrd}", "--cmdline", guest.cmdline],
                   check=True, capture_output=True)


def start_site(site: Site, cluster: HostCluster, guest: TinyGuest, **settings: Any) -> None:
    """Start ``site``'s controller and one node manager per host of ``cluster``
    (``settings`` go into every node manager's config); return once all are up."""
    add_segment_and_tinydisk(site, cluster, guest)
    for i, host in enumerate(cluster.hosts):
        lnm_config(site, i, host, cluster.store_path, **settings)
    site.start_controller()
    for i, host in enumerate(cluster.hosts):
        start_lnm(site, i, host)
    client = site.client()
    count = len(cluster.hosts)
    wait_for(lambda: sum(h.state == "up" for h in client.list_hosts()) == count, 30,
             f"{count} VMMs up")


@dataclass
class GuestStack:
    """A site on namespace hosts (see :func:`start_site`) and its one test guest,
    named ``guest`` (relative to the site's user), at address ``ip``."""

    site: Site
    cluster: HostCluster
    guest: str
    ip: str
    beat_s: float = 8.0  # how long a heartbeat may take to show

    @property
    def names(self) -> list[str]:
        """The VMM names, by host index."""
        return [h["name"] for h in self.site.hosts]

    def ush(self, *commands: str, ok: bool = True) -> str:
        """Run ush; with ``ok``, fail (showing hosts and node managers) unless it worked."""
        proc = self.site.ush(*commands, timeout=120)
        if ok:
            assert proc.returncode == 0, f"{commands}: rc={proc.returncode}\n{proc.stdout}\n" \
                f"{proc.stderr}\n{self.cluster.diagnostics()}\n--- node managers\n" + \
                "\n".join(self.site.log(f"lnm-{i}.log")[-3000:]
                          for i in range(len(self.cluster.hosts)))
        return proc.stdout + proc.stderr

    def vm(self) -> tuple[str | None, str, str]:
        """The guest's host, state and UUID."""
        [vm] = self.site.client().list_vms([self.guest])
        return vm.host, vm.state, vm.uuid

    def console(self) -> str:
        return self.ush(f"console {self.guest} --tail 400")

    def alive(self, after: int) -> int:
        """The guest beats past ``after`` and answers HTTP at its address; its last beat."""
        beats = wait_for(lambda: [n for n in heartbeats(self.console()) if n > after + 1],
                         self.beat_s, f"heartbeats after {after}")
        body = self.cluster.http_get(self.ip)
        assert body is not None and f"host={self.guest}" in body, body
        return max(beats)
