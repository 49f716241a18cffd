"""The tiny guest's pure parts and its cache, without network or qemu.

The guest's shell scripts run here under the same busybox the initramfs
carries. The cache tests build a real initramfs from a small fake kernel
package made with ``dpkg-deb`` (dummy vmlinuz and modules), so the whole
pipeline runs offline in well under a second.
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from usher.errors import ConfigError, InvalidOption, Unavailable
from usher.lnm import tinyguest
from usher.lnm.tinyguest import (
    HEARTBEAT,
    MARKER,
    MODULES,
    POWEROFF,
    build_tiny_guest,
    cmdline_helper_script,
    heartbeats,
    init_script,
    kernel_cmdline,
    power_button_script,
    ready_fields,
    unreachable_ancestor,
)

BUSYBOX = shutil.which("busybox") or "busybox"
FAKE_VERSION = "9.9.9-1-cloud-amd64"


def sh(script: str, *args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "script.sh"
    path.write_text(script)
    return subprocess.run([BUSYBOX, "sh", str(path), *args], capture_output=True, text=True,
                          timeout=10, check=False)


def parse_cmdline(text: str, tmp_path: Path) -> tuple[dict[str, str], str]:
    """What the guest's usher-cmdline makes of a kernel command line."""
    cmdline = tmp_path / "cmdline"
    cmdline.write_text(text + "\n")
    proc = sh(cmdline_helper_script(), str(cmdline), tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    values = dict(line.split("=", 1) for line in proc.stdout.splitlines())
    return {k: v.strip("'") for k, v in values.items()}, proc.stderr


# -- the guest's scripts -------------------------------------------------------------


@pytest.mark.parametrize("script", [init_script(), cmdline_helper_script(),
                                    power_button_script()],
                         ids=["init", "usher-cmdline", "power-button"])
def test_guest_scripts_are_valid_busybox_shell(script: str, tmp_path: Path) -> None:
    assert script.startswith("#!/bin/sh\n")
    proc = subprocess.run([BUSYBOX, "sh", "-n"], input=script, capture_output=True, text=True,
                          timeout=10, check=False)
    assert proc.returncode == 0, proc.stderr


def test_init_loads_the_modules_in_order_before_using_them() -> None:
    text = init_script()
    assert f"for m in {' '.join(MODULES)}; do" in text
    assert MODULES.index("virtio_ring") < MODULES.index("virtio_pci") < MODULES.index(
        "virtio_net")
    assert MODULES[-2:] == ("button", "evdev")
    assert text.index("insmod") < text.index("ip link set eth0") < text.index("httpd -p 80")


def test_init_prints_ready_after_the_guest_can_answer_and_power_off() -> None:
    text = init_script()
    ready = text.index(f'echo "{MARKER} $ready"')
    # acpid logs to /var/log: it must exist before acpid starts.
    assert text.index("mkdir -p /var/log") < text.index("acpid -f")
    assert text.index("httpd -p 80") < ready
    # READY waits until acpid holds the input devices, or an early ACPI press is lost.
    assert text.index("/dev/input/event") < ready
    assert text.index(f'echo "{HEARTBEAT} $n"') > ready
    assert "@" not in text  # every placeholder filled


def test_power_button_handler_powers_off_at_once() -> None:
    text = power_button_script()
    assert POWEROFF in text
    assert text.rstrip().endswith("poweroff -f")


def test_cmdline_helper_reads_the_usher_parameters(tmp_path: Path) -> None:
    values, err = parse_cmdline(
        "console=ttyS0 quiet usher.ip=10.0.0.5/24 usher.gw=10.0.0.1 usher.hostname=t-1 ro",
        tmp_path)
    assert values == {"USHER_IP": "10.0.0.5/24", "USHER_GW": "10.0.0.1",
                      "USHER_HOSTNAME": "t-1"}
    assert err == ""


def test_cmdline_helper_reads_the_acpi_switch(tmp_path: Path) -> None:
    assert parse_cmdline("quiet usher.acpi=ignore", tmp_path)[0] == {"USHER_ACPI": "ignore"}
    assert parse_cmdline("usher.acpi=$(reboot)", tmp_path)[0] == {}


def test_cmdline_helper_without_parameters_prints_nothing(tmp_path: Path) -> None:
    assert parse_cmdline("console=ttyS0 quiet panic=-1", tmp_path) == ({}, "")


@pytest.mark.parametrize("word", [
    "usher.hostname=$(reboot)", "usher.hostname=a;b", "usher.ip=10.0.0.5/24'", "usher.gw=",
    "usher.gw=10.0.0.1/24", "usher.hostname=a`id`",
])
def test_cmdline_helper_ignores_values_the_shell_could_misread(word: str,
                                                               tmp_path: Path) -> None:
    values, err = parse_cmdline(f"console=ttyS0 {word} usher.hostname=ok", tmp_path)
    assert values == {"USHER_HOSTNAME": "ok"}
    assert f"ignoring invalid {word}" in err


def test_init_evals_what_the_helper_prints(tmp_path: Path) -> None:
    helper = tmp_path / "usher-cmdline"
    helper.write_text(cmdline_helper_script())
    cmdline = tmp_path / "cmdline"
    cmdline.write_text(kernel_cmdline(hostname="web1", address="192.168.7.9/25",
                                      gateway="192.168.7.1") + "\n")
    script = (f'eval "$({BUSYBOX} sh {helper} {cmdline})"\n'
              'echo "$USHER_IP|$USHER_GW|$USHER_HOSTNAME"\n')
    proc = sh(script, tmp_path=tmp_path)
    assert proc.stdout.strip() == "192.168.7.9/25|192.168.7.1|web1"


# -- the host side of the command line and the console ------------------------------------


def test_kernel_cmdline_adds_validated_parameters() -> None:
    assert kernel_cmdline() == "console=ttyS0 quiet panic=-1"
    assert kernel_cmdline("console=ttyS0", hostname="t1", address="10.1.2.3/16",
                          gateway="10.1.0.1") == (
        "console=ttyS0 usher.hostname=t1 usher.ip=10.1.2.3/16 usher.gw=10.1.0.1")


@pytest.mark.parametrize("kwargs", [
    {"hostname": "bad_name"}, {"hostname": "-x"}, {"hostname": "a" * 64},
    {"address": "10.0.0.5"}, {"address": "10.0.0.300/24"}, {"address": "fe80::1/64"},
    {"gateway": "10.0.0.1"}, {"address": "10.0.0.5/24", "gateway": "10.0.1.1"},
    {"address": "10.0.0.5/24", "gateway": "nope"},
])
def test_kernel_cmdline_rejects_what_the_guest_would_ignore(kwargs: dict[str, str]) -> None:
    with pytest.raises(InvalidOption):
        kernel_cmdline(**kwargs)


def test_console_parsing_takes_only_complete_lines() -> None:
    console = (
        "[    0.5] random kernel line\r\n"
        f"{MARKER} host=t1 uuid=6a1e ip=10.0.0.5/24\r\n"
        f"{HEARTBEAT} 1\r\n"
        f"/ # \x1b[6n{HEARTBEAT} 2\r\n"
        f"{HEARTBEAT} 1"  # still being written: may yet become 13
    )
    assert ready_fields(console) == {"host": "t1", "uuid": "6a1e", "ip": "10.0.0.5/24"}
    assert heartbeats(console) == [1, 2]
    assert ready_fields(f"{MARKER} host=t1 uu") is None
    assert ready_fields("") is None and heartbeats("") == []


def test_unreachable_ancestor_names_the_closed_directory(tmp_path: Path) -> None:
    closed = tmp_path / "closed"
    (closed / "inner").mkdir(parents=True)
    closed.chmod(0o700)
    assert unreachable_ancestor(closed / "inner") in (closed, *closed.parents)
    opened = Path("/usr/share")
    assert unreachable_ancestor(opened) is None


# -- building and the cache ---------------------------------------------------------------


def make_kernel_deb(directory: Path, *, version: str = FAKE_VERSION,
                    modules: tuple[str, ...] = MODULES, tag: str = "a") -> Path:
    """A linux-image .deb with a dummy vmlinuz and dummy modules, made with dpkg-deb."""
    package = f"linux-image-{version}"
    root = directory / f"pkg-{tag}"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {package}\nVersion: 1-{tag}\nArchitecture: amd64\n"
        "Maintainer: usher tests <tests@example.org>\nDescription: fake kernel\n")
    (root / "boot").mkdir()
    (root / "boot" / f"vmlinuz-{version}").write_bytes(b"fake kernel " + tag.encode())
    moddir = root / "lib" / "modules" / version / "kernel" / "drivers"
    moddir.mkdir(parents=True)
    for name in modules:
        (moddir / f"{name}.ko").write_bytes(f"fake module {name}".encode())
    deb = directory / f"{package}_1-{tag}_amd64.deb"
    subprocess.run(["dpkg-deb", "-Zgzip", "--root-owner-group", "-b", str(root), str(deb)],
                   check=True, capture_output=True, timeout=30)
    return deb


def initrd_listing(initrd: Path) -> list[str]:
    """``cpio -tv`` of the initrd: mode, owner, size, date, name per line."""
    proc = subprocess.run([BUSYBOX, "cpio", "-tv"], input=gzip.decompress(initrd.read_bytes()),
                          capture_output=True, timeout=10, check=True)
    return proc.stdout.decode().splitlines()


def test_build_packs_busybox_scripts_and_modules(tmp_path: Path) -> None:
    deb = make_kernel_deb(tmp_path)
    guest = build_tiny_guest(tmp_path / "cache", kernel_deb=deb, world_readable=False)
    assert guest.kernel.read_bytes() == b"fake kernel a"
    assert guest.kernel_version == FAKE_VERSION
    assert guest.kernel_package == f"linux-image-{FAKE_VERSION}"
    assert guest.marker == MARKER and guest.cmdline.startswith("console=ttyS0")
    listing = initrd_listing(guest.initrd)
    names = {line.split()[-1] if "->" not in line else line.split()[-3] for line in listing}
    assert {"init", "bin/busybox", "bin/sh", "bin/usher-cmdline", "etc/acpi/PWRF/00000080",
            "var/log", "dev", "proc", "sys"} <= names
    assert {f"lib/modules/{m}.ko" for m in MODULES} <= names
    assert all(" 0/0 " in line for line in listing)  # owned by root in the guest
    init_line = next(line for line in listing if line.endswith(" init"))
    assert init_line.startswith("-rwxr-xr-x")
    assert guest.kernel.stat().st_mode & 0o777 == 0o644
    assert guest.initrd.stat().st_mode & 0o777 == 0o644


def test_second_call_is_a_cache_hit_that_needs_no_package(tmp_path: Path) -> None:
    deb = make_kernel_deb(tmp_path)
    cache = tmp_path / "cache"
    first = build_tiny_guest(cache, kernel_deb=deb, world_readable=False)
    deb.unlink()  # a hit must not need the package (nor the network)
    started = time.monotonic()
    again = build_tiny_guest(cache, world_readable=False)
    assert time.monotonic() - started < 0.5
    assert again == first


def test_a_damaged_initrd_is_rebuilt(tmp_path: Path) -> None:
    deb = make_kernel_deb(tmp_path)
    cache = tmp_path / "cache"
    first = build_tiny_guest(cache, kernel_deb=deb, world_readable=False)
    first.initrd.write_bytes(b"garbage")
    again = build_tiny_guest(cache, kernel_deb=deb, world_readable=False)
    assert again.initrd == first.initrd  # same recipe, same content, same name
    assert initrd_listing(again.initrd)


def test_another_kernel_package_rebuilds(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = build_tiny_guest(cache, kernel_deb=make_kernel_deb(tmp_path, tag="a"),
                             world_readable=False)
    second = build_tiny_guest(cache, kernel_deb=make_kernel_deb(tmp_path, tag="b"),
                              world_readable=False)
    assert second.kernel.read_bytes() == b"fake kernel b"
    stamp = json.loads((cache / "stamp.json").read_text())
    assert stamp["kernel"] == second.kernel.name and stamp["initrd"] == second.initrd.name
    assert first.initrd.exists()  # a hibernated guest may still need it


def test_a_changed_recipe_rebuilds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    deb = make_kernel_deb(tmp_path)
    cache = tmp_path / "cache"
    first = build_tiny_guest(cache, kernel_deb=deb, world_readable=False)
    monkeypatch.setattr(tinyguest, "_INIT", tinyguest._INIT + "# changed\n")
    second = build_tiny_guest(cache, kernel_deb=deb, world_readable=False)
    assert second.initrd != first.initrd


def test_a_package_without_a_module_is_refused(tmp_path: Path) -> None:
    deb = make_kernel_deb(tmp_path, modules=tuple(m for m in MODULES if m != "virtio_net"))
    with pytest.raises(Unavailable, match="virtio_net"):
        build_tiny_guest(tmp_path / "cache", kernel_deb=deb, world_readable=False)


def test_a_cache_libvirt_qemu_cannot_reach_is_refused(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    private.chmod(0o700)
    with pytest.raises(ConfigError, match="libvirt-qemu cannot enter"):
        build_tiny_guest(private / "cache", kernel_deb=make_kernel_deb(tmp_path))


def test_cli_prints_the_guest_as_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    deb = make_kernel_deb(tmp_path)
    # pytest's base temp is private; the CLI wants a cache libvirt-qemu can reach.
    with tempfile.TemporaryDirectory(prefix="usher-tiny-", dir="/tmp") as shared:
        Path(shared).chmod(0o755)
        assert tinyguest.main(["--cache", f"{shared}/c", "--kernel-deb", str(deb)]) == 0
        data = json.loads(capsys.readouterr().out)
        assert Path(data["kernel"]).is_file() and Path(data["initrd"]).is_file()
    assert data["marker"] == MARKER


def test_cli_reports_errors_with_their_exit_code(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    private = tmp_path / "private"
    private.mkdir()
    private.chmod(0o700)
    code = tinyguest.main(["--cache", str(private / "c"), "--kernel-deb",
                           str(make_kernel_deb(tmp_path))])
    assert code == ConfigError.exit_code
    assert "libvirt-qemu cannot enter" in capsys.readouterr().err
