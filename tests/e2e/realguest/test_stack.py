"""A real guest through the whole stack: ush -> controller -> node manager -> qemu.

The site is ``usher demo --hypervisor qemu`` (one node manager on this
machine's libvirtd, TCG where KVM cannot boot Linux) with an extra image that
has a disk, so the guest's qcow2 overlay is made and removed for real. One
guest goes through its whole life: boot (its READY marker, with the address
usher leased, read back through ``console --tail``), an HTTP request to that
address over the demo's isolated libvirt bridge, pause and resume (its
once-a-second heartbeat stops and goes on), hibernate and restore (the
counter continues: the memory came back), ACPI shutdown, boot again, destroy
(no domain, no overlay, no console log; the base image stays). On the way,
``ush console`` on a terminal reaches the guest's shell.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.site import Site, wait_for
from tests.e2e.test_ush_interactive import Terminal
from usher.lnm.tinyguest import build_tiny_guest

pytestmark = [pytest.mark.e2e, pytest.mark.realguest]

BOOT_S = 30.0  # TCG on a busy 2-core machine: a boot takes 3-5 s


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    # A short ACPI wait, for the guest that ignores the power button.
    s = Site(tmp_path_factory.mktemp("qemu") / "site", hypervisor="qemu",
             shutdown_timeout_s=8.0)
    try:
        yield s.start()
    finally:
        s.close()


def ok(site: Site, *commands: str) -> str:
    proc = site.ush(*commands, timeout=120)
    assert proc.returncode == 0, f"{commands}: rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def console(site: Site, name: str) -> str:
    return ok(site, f"console {name} --tail 200")


def heartbeat(site: Site, name: str) -> int:
    beats = [int(n) for n in re.findall(r"USHER-TINY-GUEST-HEARTBEAT (\d+)", console(site, name))]
    return beats[-1] if beats else -1


def register_disk_image(site: Site, tmp: Path) -> Path:
    """Image ``tinydisk``: the tiny guest's kernel and initrd plus a small qcow2 disk."""
    disk = tmp / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    guest = build_tiny_guest()  # the demo's, from the cache
    ctl = [sys.executable, "-m", "usher.controller.cli", "--config",
           site.info["controller"]["config"], "image"]  # type: ignore[index]
    subprocess.run([*ctl, "add", "tinydisk", "--disk", f"file://{disk}", "--format", "qcow2",
                    "--kernel", f"file://{guest.kernel}", "--initrd", f"file://{guest.initrd}",
                    "--cmdline", guest.cmdline], check=True, capture_output=True)
    site.reload_controller()
    wait_for(lambda: "tinydisk" in ok(site, "image_list"), 10, "the image to be served")
    return disk


def test_a_real_guest_lives_its_whole_life(site: Site, tmp_path: Path) -> None:
    disk = register_disk_image(site, tmp_path)
    ok(site, "start g1 --image tinydisk --ram 128")
    [vm] = [v for v in site.client().list_vms() if v.name.startswith("g1.")]
    ready = wait_for(lambda: re.search(r"USHER-TINY-GUEST-READY host=g1 uuid=(\S+) ip=(\S+)",
                                       console(site, "g1")), BOOT_S, "the guest's marker")
    assert ready.group(1) == vm.uuid and ready.group(2).split("/")[0] == vm.ip
    image_dir = Path(site.hosts[0]["image_dir"])
    overlay = image_dir / "vms" / f"{vm.uuid}.qcow2"
    assert overlay.exists()
    base = image_dir / "base" / hashlib.sha256(disk.read_bytes()).hexdigest()
    assert base.exists()

    # The guest answers at the address usher leased, over the demo's bridge
    # (a link this site made: the route must not leave the machine).
    route = subprocess.run(["ip", "route", "get", str(vm.ip)], capture_output=True,
                           text=True).stdout
    assert "dev ush-usher-demo" in route, route
    with urllib.request.urlopen(f"http://{vm.ip}/", timeout=5) as reply:
        assert "host=g1" in reply.read().decode()

    # An interactive console on a terminal: the guest's shell answers; Ctrl-] detaches.
    term = Terminal([str(Path(sys.executable).parent / "ush"), "console g1"],
                    {**os.environ, "USH_CONFIG": str(site.dir / "ush.config"),
                     "HOME": str(site.dir), "TERM": "xterm"})
    try:
        term.expect("Ctrl-] detaches")
        term.send("\r")
        term.expect("/ #")
        # busybox asks the terminal where its cursor is (ESC[6n) after a
        # prompt and reads keys as the answer for a moment: let that pass.
        time.sleep(1.0)
        term.send("echo usher-$((6*7))\r")
        term.expect("usher-42")
        term.send("\x1d")
        term.expect("console of g1 closed: detached")
        assert term.proc.wait(10) == 0
    finally:
        term.close()

    ok(site, "pause g1")
    paused_at = heartbeat(site, "g1")
    wait_for(lambda: heartbeat(site, "g1") == paused_at, 3, "no heartbeat while paused")
    ok(site, "resume g1")
    wait_for(lambda: heartbeat(site, "g1") > paused_at + 1, 10, "heartbeats after resume")

    ok(site, "hibernate g1")
    assert site.client().list_vms(["g1"])[0].state == "hibernated"
    saved_at = heartbeat(site, "g1")
    ok(site, "start g1")  # restores the saved memory: the counter goes on
    wait_for(lambda: heartbeat(site, "g1") > saved_at, 10, "heartbeats after restore")
    assert console(site, "g1").count("USHER-TINY-GUEST-READY") == 1  # not booted again

    ok(site, "shutdown g1")
    assert site.client().list_vms(["g1"])[0].state == "stopped"
    assert "USHER-TINY-GUEST-POWEROFF" in console(site, "g1")
    ok(site, "start g1")  # a fresh boot
    wait_for(lambda: console(site, "g1").count("USHER-TINY-GUEST-READY") == 2, BOOT_S,
             "the second boot")

    ok(site, "destroy g1")
    assert not overlay.exists() and base.exists()
    assert not (image_dir / "vms" / f"{vm.uuid}.console.log").exists()
    virsh = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--uuid"],
                           capture_output=True, text=True).stdout
    assert vm.uuid not in virsh


def test_a_guest_that_ignores_acpi_is_reported_and_destroy_still_works(site: Site) -> None:
    ok(site, "start deaf --image tiny --ram 128 --kernel_parms usher.acpi=ignore")
    wait_for(lambda: "USHER-TINY-GUEST-READY host=deaf" in console(site, "deaf"), BOOT_S,
             "the guest's marker")
    assert "ignoring ACPI" in console(site, "deaf")
    proc = site.ush("shutdown deaf", timeout=120)
    assert proc.returncode != 0
    assert "did not shut down within 8 s" in proc.stdout + proc.stderr, proc
    assert site.client().list_vms(["deaf"])[0].state == "running"  # still up, as it is
    ok(site, "destroy deaf")  # the hard way works
    assert not site.client().list_vms()
