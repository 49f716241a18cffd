"""The KVM probe's verdicts and cache, with small scripts standing in for qemu.

qemu is the seam here: each fake prints what a real qemu printed on some host
(the marker, ``KVM internal error``, an MSR failure, nothing at all) so every
verdict is reached in a fraction of a second. The real probe runs in
tests/e2e/realguest.
"""

from __future__ import annotations

import grp
import os
import time
from pathlib import Path

import pytest

from usher.lnm.kvm import (
    DirectBoot,
    fix_kvm_permissions,
    kvm_access_problem,
    probe_kvm,
)
from usher.lnm.tinyguest import MARKER, TinyGuest

VERSION = ('if [ "$1" = --version ]; then\n'
           '  echo "QEMU emulator version 0.0.${FAKE_QEMU_V:-1}"; exit 0\n'
           'fi\n')


@pytest.fixture
def guest(tmp_path: Path) -> TinyGuest:
    return TinyGuest(kernel=tmp_path / "vmlinuz", initrd=tmp_path / "initrd.img",
                     kernel_version="9.9.9-test", kernel_package="linux-image-9.9.9-test")


@pytest.fixture
def device(tmp_path: Path) -> Path:
    path = tmp_path / "kvm"
    path.write_bytes(b"")
    return path


def fake_qemu(tmp_path: Path, body: str) -> str:
    path = tmp_path / "fake-qemu"
    path.write_text("#!/bin/sh\n" + VERSION + body)
    path.chmod(0o755)
    return str(path)


def test_no_device_is_a_verdict_without_running_qemu(guest: TinyGuest, tmp_path: Path) -> None:
    verdict = probe_kvm(guest, device=tmp_path / "none", qemu="/nonexistent/qemu")
    assert not verdict.usable
    assert verdict.reason == f"no {tmp_path / 'none'}"
    assert kvm_access_problem(tmp_path) is not None  # a directory does not open read-write


def test_marker_on_the_console_means_usable(guest: TinyGuest, device: Path,
                                            tmp_path: Path) -> None:
    qemu = fake_qemu(tmp_path, f'echo "{MARKER} host=tiny uuid=x ip=none"\nexec sleep 60\n')
    started = time.monotonic()
    verdict = probe_kvm(guest, timeout_s=10, device=device, qemu=qemu)
    assert verdict.usable and "marker seen" in verdict.reason
    assert time.monotonic() - started < 3  # decided by the marker, not the timeout


def test_kvm_internal_error_is_reported_at_once(guest: TinyGuest, device: Path,
                                                tmp_path: Path) -> None:
    qemu = fake_qemu(tmp_path, 'echo "KVM internal error. Suberror: 1" >&2\n'
                               'echo "emulation failure" >&2\nexec sleep 60\n')
    started = time.monotonic()
    verdict = probe_kvm(guest, timeout_s=10, device=device, qemu=qemu)
    assert not verdict.usable
    assert verdict.reason == "KVM internal error. Suberror: 1 emulation failure"
    assert time.monotonic() - started < 3


def test_qemu_exiting_early_reports_its_error_line(guest: TinyGuest, device: Path,
                                                   tmp_path: Path) -> None:
    qemu = fake_qemu(tmp_path, 'echo "qemu: warning: host lacks pni" >&2\n'
                               'echo "qemu: error: failed to set MSR 0x10a" >&2\n'
                               'echo "qemu: kvm.c:3183: Assertion failed." >&2\nexit 134\n')
    verdict = probe_kvm(guest, timeout_s=10, device=device, qemu=qemu)
    assert not verdict.usable
    assert verdict.reason == ("qemu exited (status 134) before the marker: "
                              "qemu: error: failed to set MSR 0x10a")


def test_a_silent_guest_is_unusable_after_the_timeout(guest: TinyGuest, device: Path,
                                                      tmp_path: Path) -> None:
    qemu = fake_qemu(tmp_path, "exec sleep 60\n")
    started = time.monotonic()
    verdict = probe_kvm(guest, timeout_s=0.5, device=device, qemu=qemu, use_cache=False)
    assert not verdict.usable and verdict.reason == "marker not seen in 0.5 s"
    assert time.monotonic() - started < 2.5


def test_verdicts_are_cached_by_kernel_and_qemu(guest: TinyGuest, device: Path,
                                                tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "verdict.json"
    qemu = fake_qemu(tmp_path, "exec sleep 60\n")
    first = probe_kvm(guest, timeout_s=0.5, device=device, qemu=qemu, cache_file=cache)
    assert not first.cached

    again = probe_kvm(guest, timeout_s=0.5, device=device, qemu=qemu, cache_file=cache)
    assert again.cached and again.reason == first.reason and again.elapsed_s < 0.5
    # A timeout reached with 0.5 s says nothing about a probe allowed 1 s.
    longer = probe_kvm(guest, timeout_s=1.0, device=device, qemu=qemu, cache_file=cache)
    assert not longer.cached
    # Another qemu version is another question.
    monkeypatch.setenv("FAKE_QEMU_V", "2")
    assert not probe_kvm(guest, timeout_s=1.0, device=device, qemu=qemu,
                         cache_file=cache).cached
    # The device is checked every time, cache or not.
    device.unlink()
    gone = probe_kvm(guest, timeout_s=1.0, device=device, qemu=qemu, cache_file=cache)
    assert not gone.usable and gone.reason.startswith("no ")


def test_direct_boot_kills_and_reaps_qemu_by_pid(guest: TinyGuest, tmp_path: Path) -> None:
    qemu = fake_qemu(tmp_path, 'echo "$@"\nexec sleep 60\n')
    with DirectBoot(guest, accel="tcg", cmdline="console=ttyS0 x=1", qemu=qemu) as boot:
        assert boot.wait_for_text("-accel tcg", 5)
        pid = boot.pid
        assert pid is not None
        assert "-nodefaults" in boot.console() and "console=ttyS0 x=1" in boot.console()
    assert boot.returncode() is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's group to kvm needs root")
def test_fix_kvm_permissions_sets_group_kvm_and_mode_0660(device: Path) -> None:
    device.chmod(0o600)
    assert fix_kvm_permissions(device) is True
    st = device.stat()
    assert st.st_gid == grp.getgrnam("kvm").gr_gid and st.st_mode & 0o777 == 0o660
    assert fix_kvm_permissions(device) is False  # already right
    assert fix_kvm_permissions(device.with_name("absent")) is False
