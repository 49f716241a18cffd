"""The tiny guest on real qemu: plain TCG, the KVM probe, and libvirt's qemu:///system.

Needs no network beyond loopback: the TCG guest's only NIC is a user-mode one
with ``restrict=on`` (the guest can reach nothing), and the test talks to its
HTTP responder through a port forwarded on 127.0.0.1.
"""

from __future__ import annotations

import secrets
import socket
import time
import urllib.request
from pathlib import Path
from xml.sax.saxutils import escape

import libvirt
import pytest

from tests.e2e.site import wait_for
from usher.lnm.kvm import DirectBoot, probe_kvm
from usher.lnm.tinyguest import POWEROFF, TinyGuest, heartbeats, ready_fields

pytestmark = [pytest.mark.e2e, pytest.mark.realguest, pytest.mark.timeout(90)]

# Measured under TCG on 2 cores: READY 2.4-4 s after start, ACPI power-off < 2 s.
MARKER_TIMEOUT_S = 15.0
SHUTDOWN_TIMEOUT_S = 10.0
PROBE_TIMEOUT_S = 6.0  # a working KVM shows the marker in about a second


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_tcg_guest_shows_marker_heartbeats_and_answers(tiny_guest: TinyGuest) -> None:
    port = free_loopback_port()
    cmdline = tiny_guest.cmdline_for(hostname="rg-tcg", address="10.0.2.15/24",
                                     gateway="10.0.2.2")
    nic = ["-netdev", f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:80",
           "-device", "virtio-net-pci,netdev=n0"]
    started = time.monotonic()
    with DirectBoot(tiny_guest, accel="tcg", cmdline=cmdline, extra_args=nic) as boot:
        fields = boot.wait_for(lambda out, _err: ready_fields(out), MARKER_TIMEOUT_S)
        ready_s = time.monotonic() - started
        assert fields, f"no marker in {MARKER_TIMEOUT_S} s:\n{boot.console()}\n{boot.errors()}"
        assert fields["host"] == "rg-tcg"
        assert fields["ip"] == "10.0.2.15/24"

        beats = boot.wait_for(lambda out, _err: [n for n in heartbeats(out) if n >= 3],
                              5.0)
        assert beats, f"no third heartbeat:\n{boot.console()}"
        seen = heartbeats(boot.console())
        assert seen[:3] == [1, 2, 3]

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as reply:
            body = reply.read().decode()
        assert "host=rg-tcg" in body
        assert boot.pid is not None
    assert boot.returncode() is not None  # killed and reaped
    print(f"TCG marker after {ready_s:.2f} s")


def test_kvm_probe_gives_a_bounded_verdict_that_holds(tiny_guest: TinyGuest,
                                                      tmp_path: Path) -> None:
    cache = tmp_path / "kvm-probe.json"
    started = time.monotonic()
    verdict = probe_kvm(tiny_guest, timeout_s=PROBE_TIMEOUT_S, cache_file=cache)
    elapsed = time.monotonic() - started
    assert elapsed < PROBE_TIMEOUT_S + 3
    assert verdict.reason and not verdict.cached
    print(f"KVM probe: usable={verdict.usable} ({verdict.reason}) in {elapsed:.2f} s")

    again = probe_kvm(tiny_guest, timeout_s=PROBE_TIMEOUT_S, cache_file=cache)
    assert again.cached and (again.usable, again.reason) == (verdict.usable, verdict.reason)
    assert again.elapsed_s < 1.0

    # Hold the verdict against what really happens: a probe that calls KVM
    # usable must be right, or every guest on the host would hang.
    if verdict.usable:
        with DirectBoot(tiny_guest, accel="kvm") as boot:
            assert boot.wait_for_text(f"{tiny_guest.heartbeat} 2", 10.0), boot.errors()
    else:
        assert not verdict.reason.startswith("guest marker seen")


def domain_xml(name: str, guest: TinyGuest, serial_log: Path) -> str:
    """A minimal TCG domain: direct kernel boot, serial console to a file, no disk, no NIC."""
    cmdline = guest.cmdline_for(hostname=name)
    return f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64'>hvm</type>
    <kernel>{escape(str(guest.kernel))}</kernel>
    <initrd>{escape(str(guest.initrd))}</initrd>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <serial type='file'>
      <source path='{escape(str(serial_log))}'/>
      <target port='0'/>
    </serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def test_libvirt_system_guest_boots_and_powers_off_on_acpi(
        tiny_guest: TinyGuest, system_libvirt: libvirt.virConnect, shared_tmp: Path) -> None:
    name = f"usher-rg-{secrets.token_hex(4)}"
    serial_log = shared_tmp / "console.log"
    serial_log.touch(mode=0o644)
    dom = system_libvirt.defineXML(domain_xml(name, tiny_guest, serial_log))
    try:
        started = time.monotonic()
        dom.create()
        created_s = time.monotonic() - started

        def console() -> str:
            return serial_log.read_text(errors="replace")

        fields = wait_for(lambda: ready_fields(console()), MARKER_TIMEOUT_S, "marker")
        ready_s = time.monotonic() - started
        assert fields["host"] == name
        assert fields["uuid"].lower() == dom.UUIDString()

        started = time.monotonic()
        dom.shutdown()  # ACPI power button
        wait_for(lambda: dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF, SHUTDOWN_TIMEOUT_S,
                 "shut-off state after ACPI shutdown")
        shutdown_s = time.monotonic() - started
        assert POWEROFF in console()
        print(f"libvirt TCG: create {created_s:.2f} s, marker {ready_s:.2f} s, "
              f"ACPI shutdown {shutdown_s:.2f} s")
    finally:
        try:
            if dom.isActive():
                dom.destroy()
        finally:
            dom.undefine()


def test_auto_domain_type_probes_and_picks_tcg_where_kvm_fails() -> None:
    from usher.config import LnmConfig
    from usher.lnm.cli import domain_type_for
    from usher.lnm.kvm import kvm_access_problem, probe_kvm
    from usher.lnm.tinyguest import build_tiny_guest

    chosen = domain_type_for(LnmConfig(uri="qemu:///system", domain_type="auto"))
    usable = kvm_access_problem() is None and probe_kvm(build_tiny_guest()).usable
    assert chosen == ("kvm" if usable else "qemu")
