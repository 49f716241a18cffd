"""Whether KVM really boots Linux on this host, decided by booting the tiny guest.

A node manager picks the libvirt domain type ``kvm`` only where KVM works and
``qemu`` (TCG) elsewhere. /dev/kvm existing, or even opening, proves nothing:
on some hosts (nested virtualisation without the features Linux needs) KVM
hangs in the guest's first instructions, stops with ``KVM internal error ...
emulation failure``, or aborts setting an MSR. So :func:`probe_kvm` boots the
tiny guest (:mod:`usher.lnm.tinyguest`) with ``-accel kvm`` under plain qemu
and calls KVM usable only if the guest's READY marker appears on its serial
console in time.

:class:`DirectBoot` is the machinery: one qemu process booting a kernel and
initrd directly, no disk and no network unless asked, its serial console
captured from stdout. Tests use it with ``accel="tcg"`` too.

:func:`fix_kvm_permissions` gives /dev/kvm the group and mode udev would have
given it; without them libvirtd re-probes QEMU on every call.
"""

from __future__ import annotations

import grp
import json
import logging
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from usher.errors import ConfigError, UsherError
from usher.lnm.tinyguest import TinyGuest

log = logging.getLogger(__name__)

KVM_DEVICE = Path("/dev/kvm")
QEMU = "qemu-system-x86_64"

_T = TypeVar("_T")
_CACHE_NAME = "kvm-probe.json"


@dataclass(frozen=True)
class KvmProbe:
    """A verdict on KVM: ``usable`` and, either way, the ``reason`` in words.

    ``elapsed_s`` is what deciding cost this time (near zero when ``cached``).
    """

    usable: bool
    reason: str
    elapsed_s: float
    cached: bool = False


class DirectBoot:
    """One qemu process booting a kernel and initrd directly, serial console on stdout.

    The process is ours: :meth:`stop` (and leaving the ``with`` block) kills it by
    PID and reaps it, within a bound. It gets no disk, no default devices
    (``-nodefaults``) and no network beyond ``extra_args``. Output is read by two
    threads into memory; a guest is expected to print kilobytes, not gigabytes.
    """

    def __init__(self, guest: TinyGuest, *, accel: str = "tcg", cmdline: str | None = None,
                 memory_mib: int = 128, cpu: str | None = None,
                 extra_args: Sequence[str] = (), qemu: str = QEMU) -> None:
        self.argv = [
            qemu, "-accel", accel, "-m", str(memory_mib), "-smp", "1",
            "-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none",
            "-serial", "stdio", "-no-reboot",
            "-kernel", str(guest.kernel), "-initrd", str(guest.initrd),
            "-append", cmdline if cmdline is not None else guest.cmdline,
            *(["-cpu", cpu] if cpu else []), *extra_args,
        ]
        self._proc: subprocess.Popen[bytes] | None = None
        self._cond = threading.Condition()
        self._out = bytearray()
        self._err = bytearray()
        self._open_streams = 0
        self._readers: list[threading.Thread] = []

    @property
    def pid(self) -> int | None:
        """The qemu process's PID once started."""
        return self._proc.pid if self._proc else None

    def start(self) -> None:
        """Start qemu; returns at once.

        Raises:
            ConfigError: the qemu binary is not installed.
        """
        try:
            self._proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except FileNotFoundError as e:
            raise ConfigError(f"{self.argv[0]} is not installed (run ./scripts/setup)") from e
        assert self._proc.stdout is not None and self._proc.stderr is not None
        self._open_streams = 2
        for stream, buf in ((self._proc.stdout, self._out), (self._proc.stderr, self._err)):
            t = threading.Thread(target=self._read, args=(stream.fileno(), buf),
                                 name=f"qemu-{self._proc.pid}-reader", daemon=True)
            t.start()
            self._readers.append(t)

    def _read(self, fd: int, buf: bytearray) -> None:
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            with self._cond:
                if chunk:
                    buf.extend(chunk)
                else:
                    self._open_streams -= 1
                self._cond.notify_all()
            if not chunk:
                return

    def console(self) -> str:
        """The serial console output so far."""
        with self._cond:
            return self._out.decode(errors="replace")

    def errors(self) -> str:
        """qemu's own messages (stderr) so far."""
        with self._cond:
            return self._err.decode(errors="replace")

    def returncode(self) -> int | None:
        """qemu's exit status once it has exited, else None."""
        return self._proc.poll() if self._proc else None

    def wait_for(self, predicate: Callable[[str, str], _T | None], timeout_s: float) -> _T | None:
        """Wait until ``predicate(console, errors)`` returns something truthy and return it.

        Returns None when ``timeout_s`` passes, or when qemu has closed its
        output (exited) and the predicate still does not hold.
        """
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                result = predicate(self._out.decode(errors="replace"),
                                   self._err.decode(errors="replace"))
                if result:
                    return result
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._open_streams == 0:
                    return None
                self._cond.wait(remaining)

    def wait_for_text(self, text: str, timeout_s: float) -> bool:
        """Whether ``text`` appears on the console within ``timeout_s``."""
        return bool(self.wait_for(lambda out, _err: text in out, timeout_s))

    def stop(self, timeout_s: float = 5.0) -> None:
        """Kill qemu by PID and reap it; idempotent.

        Raises:
            UsherError: qemu did not die within ``timeout_s`` (it is left to the
                caller; it should not happen after SIGKILL).
        """
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            # A throwaway guest has nothing to save: kill at once, don't negotiate.
            os.kill(proc.pid, signal.SIGKILL)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired as e:
            raise UsherError(f"qemu (pid {proc.pid}) did not exit {timeout_s:g} s "
                             "after SIGKILL") from e
        for t in self._readers:
            t.join(timeout=1.0)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()

    def __enter__(self) -> DirectBoot:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def kvm_access_problem(device: Path = KVM_DEVICE) -> str | None:
    """Why this process cannot use ``device``, or None if it can open it read-write."""
    if not device.exists():
        return f"no {device}"
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"{device} not accessible: {e.strerror}"
    os.close(fd)
    return None


def probe_kvm(guest: TinyGuest, *, timeout_s: float = 15.0, cpu: str | None = None,
              use_cache: bool = True, cache_file: Path | None = None,
              device: Path = KVM_DEVICE, qemu: str = QEMU) -> KvmProbe:
    """Decide whether KVM boots Linux here by booting ``guest`` with ``-accel kvm``.

    KVM is usable only if the guest's READY marker appears on its console within
    ``timeout_s``. Otherwise the reason names what was seen: no device, no
    access, ``KVM internal error ...``, qemu's own error when it exits early, or
    ``marker not seen in N s``. qemu is killed by PID before this returns; the
    call takes at most about ``timeout_s`` plus a second.

    Verdicts from a guest that really ran are cached in ``cache_file`` (default:
    ``kvm-probe.json`` beside the guest's kernel), keyed by the guest kernel,
    the qemu version, the host kernel and ``cpu``; a cached "not seen" verdict
    counts only for a ``timeout_s`` no longer than the one it was reached with.
    The device checks run every time, since they are cheap and can change.

    Raises:
        ConfigError: qemu is not installed.
    """
    started = time.monotonic()
    problem = kvm_access_problem(device)
    if problem is not None:
        return KvmProbe(False, problem, time.monotonic() - started)
    cache_file = cache_file or guest.kernel.parent / _CACHE_NAME
    key = {"guest_kernel": guest.kernel_version, "qemu": _qemu_version(qemu),
           "host_kernel": os.uname().release, "cpu": cpu or "default"}
    if use_cache:
        entry = _read_cache(cache_file)
        if entry and entry.get("key") == key and (
                entry.get("usable") or not entry.get("timed_out")
                or float(entry.get("timeout_s", 0)) >= timeout_s):
            return KvmProbe(bool(entry["usable"]), str(entry["reason"]),
                            time.monotonic() - started, cached=True)
    usable, reason, timed_out = _boot_with_kvm(guest, timeout_s, cpu, qemu)
    verdict = KvmProbe(usable, reason, time.monotonic() - started)
    log.info("KVM probe: %s (%s) in %.1f s", "usable" if usable else "unusable", reason,
             verdict.elapsed_s)
    if use_cache:
        _write_cache(cache_file, {"key": key, "usable": usable, "reason": reason,
                                  "timed_out": timed_out, "timeout_s": timeout_s})
    return verdict


_KVM_ERROR = re.compile(r"KVM internal error[^\n]*(?:\n[^\n]*emulation failure)?")
_KVM_DETAIL = re.compile(r"KVM internal error[^\n]*\n[^\n]*emulation failure")


def _boot_with_kvm(guest: TinyGuest, timeout_s: float, cpu: str | None,
                   qemu: str) -> tuple[bool, str, bool]:
    """Boot once; returns (usable, reason, whether the verdict is a timeout)."""

    def outcome(out: str, err: str) -> str | None:
        if guest.marker in out:
            return "marker"
        if _KVM_ERROR.search(err):
            return "kvm_error"
        return None

    boot = DirectBoot(guest, accel="kvm", cpu=cpu, qemu=qemu)
    with boot:
        seen = boot.wait_for(outcome, timeout_s)
        if seen == "kvm_error":
            # qemu prints the error over several lines: give the rest a moment.
            boot.wait_for(lambda _o, e: "ok" if _KVM_DETAIL.search(e) else None, 0.5)
        err = boot.errors()
        returncode = boot.returncode()
    if seen == "marker":
        return True, f"guest marker seen under KVM in {timeout_s:g} s or less", False
    if seen == "kvm_error":
        match = _KVM_ERROR.search(err)
        assert match is not None
        return False, " ".join(match.group(0).split()), False
    if returncode is not None:
        lines = [ln.strip() for ln in err.splitlines() if ln.strip()]
        # qemu's "error:" line says why; an assertion or abort after it says where.
        errors = [ln for ln in lines if "error" in ln.lower()]
        detail = (errors or lines or ["no message"])[0]
        status = f"signal {-returncode}" if returncode < 0 else f"status {returncode}"
        return False, f"qemu exited ({status}) before the marker: {detail}", False
    return False, f"marker not seen in {timeout_s:g} s", True


def _qemu_version(qemu: str) -> str:
    try:
        proc = subprocess.run([qemu, "--version"], capture_output=True, timeout=10, check=False)
    except FileNotFoundError as e:
        raise ConfigError(f"{qemu} is not installed (run ./scripts/setup)") from e
    except subprocess.TimeoutExpired as e:
        raise UsherError(f"{qemu} --version did not answer in 10 s") from e
    return proc.stdout.decode(errors="replace").splitlines()[0].strip() if proc.stdout else ""


def _read_cache(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        log.warning("KVM probe cache %s is unreadable; probing again", path)
        return None
    return data if isinstance(data, dict) else None


def _write_cache(path: Path, entry: dict[str, Any]) -> None:
    # Caching is an optimisation: a cache we cannot write only costs a probe later.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(entry, indent=2, sort_keys=True) + "\n")
        tmp.chmod(0o644)
        os.replace(tmp, path)
    except OSError:
        log.warning("cannot write the KVM probe cache %s", path, exc_info=True)
        tmp.unlink(missing_ok=True)


def fix_kvm_permissions(device: Path = KVM_DEVICE, group: str = "kvm") -> bool:
    """Give ``device`` group ``group`` and mode 0660, as udev would; True if it changed it.

    Hosts without udev leave /dev/kvm root:root 0600; libvirtd (whose QEMU runs
    as libvirt-qemu:kvm) then finds KVM inaccessible and re-probes QEMU on every
    call. Run this before starting libvirtd. Does nothing (returns False) when
    not root, when the device or the group does not exist, or when it is right.
    """
    if os.geteuid() != 0 or not device.exists():
        return False
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        log.warning("no group %s: leaving %s as it is", group, device)
        return False
    st = device.stat()
    if st.st_gid == gid and st.st_mode & 0o777 == 0o660:
        return False
    os.chown(device, -1, gid)
    device.chmod(0o660)
    log.info("set %s to group %s, mode 0660", device, group)
    return True
