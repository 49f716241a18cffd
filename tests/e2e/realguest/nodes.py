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
from pathlib import Path
from typing import Any

from tests.e2e.realguest.hosts import NETWORK, SUBNET, HostCluster, TestHost
from tests.e2e.site import Site
from usher.config import LnmConfig, load_toml, to_toml
from usher.lnm.tinyguest import TinyGuest


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
