"""A system libvirtd for real guests on hosts without an init system to start one.

Real-guest tests and ``usher demo --hypervisor qemu`` need ``qemu:///system``.
Debian 12 ships no ``virtqemud``, and our machines run no systemd, so nothing
starts libvirtd: :func:`ensure_libvirtd` starts ``virtlogd -d`` and ``libvirtd -d``
when the URI does not answer (after :func:`~usher.lnm.kvm.fix_kvm_permissions`,
which must come first or libvirtd re-probes QEMU on every call) and waits until
the daemon answers ``getCapabilities()``. The first start of a fresh install
probes QEMU for about ten seconds; later ones take a fraction of a second.

Daemons started here are recorded (PID and start time, so a reused PID is not
mistaken for ours) in :data:`RECORD`; :func:`stop_libvirtd` stops only those,
never a libvirtd someone else started. Both daemons fork away (``-d``), so they
outlive the process that started them until stopped.

libvirt's own errors end here: callers see :class:`~usher.errors.Unavailable`
(not root, or no answer in time) or :class:`~usher.errors.HypervisorError`.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import libvirt

from usher.errors import HypervisorError, TimedOut, Unavailable
from usher.lnm.kvm import fix_kvm_permissions

log = logging.getLogger(__name__)

SYSTEM_URI = "qemu:///system"
RECORD = Path("/run/usher/libvirtd.json")
"""Which daemons :func:`ensure_libvirtd` started (what :func:`stop_libvirtd` may stop)."""

# name -> (argv, pid file): the daemons' defaults when run as root with -d.
_DAEMONS: dict[str, tuple[list[str], Path]] = {
    "virtlogd": (["virtlogd", "-d"], Path("/run/virtlogd.pid")),
    "libvirtd": (["libvirtd", "-d"], Path("/run/libvirtd.pid")),
}

_T = TypeVar("_T")


def _log_libvirt_error(_ctx: object, err: Any) -> None:
    # libvirt prints every error to stderr, caught or not; while the daemon
    # starts, each poll fails to connect. The exception is what matters.
    log.debug("libvirt: %s", err[2] if isinstance(err, tuple) and len(err) > 2 else err)


def libvirtd_problem(uri: str = SYSTEM_URI, timeout_s: float = 10.0) -> str | None:
    """Why ``uri`` does not answer ``getCapabilities()`` now, or None if it does.

    Bounded: a connection that hangs counts as a problem after ``timeout_s``
    (the call is left behind in a daemon thread).
    """
    libvirt.registerErrorHandler(_log_libvirt_error, None)

    def check() -> None:
        conn = libvirt.open(uri)
        try:
            conn.getCapabilities()
        finally:
            conn.close()

    try:
        _bounded(check, timeout_s)
    except libvirt.libvirtError as e:
        return e.get_error_message() or str(e)
    except TimeoutError:
        return f"no answer in {timeout_s:g} s"
    return None


def ensure_libvirtd(timeout_s: float = 30.0, uri: str = SYSTEM_URI) -> None:
    """Make sure ``uri`` (a system libvirtd) answers; start the daemons if it does not.

    Idempotent and cheap when libvirtd already answers. Fixes /dev/kvm's
    permissions first in any case (see :func:`~usher.lnm.kvm.fix_kvm_permissions`).
    Starts ``virtlogd -d`` and ``libvirtd -d`` only if their pid files name no
    live daemon, records what it started, then polls until ``getCapabilities()``
    answers or ``timeout_s`` passes.

    Raises:
        Unavailable: ``uri`` does not answer and this process is not root.
        HypervisorError: a daemon failed to start or exited during startup.
        TimedOut: libvirtd did not answer within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    fix_kvm_permissions()
    problem = libvirtd_problem(uri, _remaining(deadline))
    if problem is None:
        return
    if os.geteuid() != 0:
        raise Unavailable(f"{uri} does not answer ({problem}) and only root can start libvirtd")
    started: dict[str, dict[str, int]] = {}
    for name in ("virtlogd", "libvirtd"):
        if _live_pid(name) is None:
            started[name] = _start_daemon(name, deadline)
    if started:
        _record(started)
    attempt = 0
    while True:
        problem = libvirtd_problem(uri, _remaining(deadline))
        if problem is None:
            log.info("%s answers (started %s)", uri, ", ".join(started) or "nothing")
            return
        attempt += 1
        if _live_pid("libvirtd") is None:
            raise HypervisorError(f"libvirtd is not running and {uri} does not answer: {problem}"
                                  " (run `libvirtd` in the foreground to see why)")
        if time.monotonic() >= deadline:
            raise TimedOut(f"{uri} did not answer within {timeout_s:g} s: {problem}")
        log.debug("%s not answering yet (attempt %d): %s", uri, attempt, problem)
        time.sleep(min(0.2, _remaining(deadline)))


def stop_libvirtd(timeout_s: float = 10.0) -> bool:
    """Stop the daemons :func:`ensure_libvirtd` started; True if it stopped any.

    A daemon is stopped only if the PID recorded for it still runs the same
    process (same start time); others are left alone. SIGTERM first, SIGKILL if
    it has not exited by half of ``timeout_s``. Guests keep running: their qemu
    processes do not depend on libvirtd.

    Raises:
        TimedOut: a daemon was still alive after SIGKILL and ``timeout_s``.
    """
    record = _read_record()
    if not record:
        return False
    deadline = time.monotonic() + timeout_s
    stopped = False
    for name in ("libvirtd", "virtlogd"):  # libvirtd logs through virtlogd: stop it first
        entry = record.get(name)
        if not entry or _start_time(entry["pid"]) != entry["start_time"]:
            continue
        pid = entry["pid"]
        log.info("stopping %s (pid %d)", name, pid)
        _signal(pid, signal.SIGTERM)
        if not _wait_gone(pid, time.monotonic() + (deadline - time.monotonic()) / 2):
            log.warning("%s (pid %d) ignored SIGTERM; killing it", name, pid)
            _signal(pid, signal.SIGKILL)
            if not _wait_gone(pid, deadline):
                raise TimedOut(f"{name} (pid {pid}) did not exit within {timeout_s:g} s")
        stopped = True
    RECORD.unlink(missing_ok=True)
    return stopped


# -- daemons ---------------------------------------------------------------------


def _start_daemon(name: str, deadline: float) -> dict[str, int]:
    argv, pid_file = _DAEMONS[name]
    # The daemon inherits the stderr file; a pipe would keep us waiting for it.
    with tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=err, timeout=_remaining(deadline), check=False)
        except FileNotFoundError as e:
            raise HypervisorError(f"{argv[0]} is not installed (run ./scripts/setup)") from e
        except subprocess.TimeoutExpired as e:
            raise TimedOut(f"{' '.join(argv)} did not return in time") from e
        err.seek(0)
        message = err.read().decode(errors="replace").strip()
    if proc.returncode != 0:
        raise HypervisorError(f"{' '.join(argv)} failed (exit {proc.returncode}): {message}")
    # -d returns once the daemon has forked; its pid file follows shortly.
    while (pid := _live_pid(name)) is None:
        if time.monotonic() >= deadline:
            raise HypervisorError(f"{name} started but wrote no live pid to {pid_file}: "
                                  f"{message or 'no message'}")
        time.sleep(0.05)
    log.info("started %s (pid %d)", name, pid)
    return {"pid": pid, "start_time": _start_time(pid) or 0}


def _live_pid(name: str) -> int | None:
    """The PID in ``name``'s pid file if that process is a live ``name``."""
    _, pid_file = _DAEMONS[name]
    try:
        pid = int(pid_file.read_text().split()[0])
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError, IndexError):
        return None
    comm = stat[stat.index("(") + 1:stat.rindex(")")]
    state = stat[stat.rindex(")") + 2:].split()[0]
    return pid if comm == name and state not in ("Z", "X") else None


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[19])


def _wait_gone(pid: int, deadline: float) -> bool:
    # A daemon re-parented to PID 1 is reaped late: a zombie counts as gone.
    while True:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return True
        if stat[stat.rindex(")") + 2:].split()[0] in ("Z", "X"):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _read_record() -> dict[str, Any]:
    try:
        data = json.loads(RECORD.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        log.warning("ignoring unreadable %s", RECORD)
        return {}
    return data if isinstance(data, dict) else {}


def _record(started: dict[str, dict[str, int]]) -> None:
    record = _read_record() | started
    RECORD.parent.mkdir(parents=True, exist_ok=True)
    tmp = RECORD.with_name(f".{RECORD.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, RECORD)


# -- helpers ---------------------------------------------------------------------


def _remaining(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def _bounded(fn: Callable[[], _T], timeout_s: float) -> _T:
    """Run a blocking call in a daemon thread; raise TimeoutError after ``timeout_s``.

    libvirt calls have no timeout of their own; a hung one is abandoned, not
    waited for.
    """
    result: list[_T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as e:  # re-raised in the caller's thread
            error.append(e)

    thread = threading.Thread(target=run, name="libvirtd-check", daemon=True)
    thread.start()
    thread.join(max(timeout_s, 0.01))
    if thread.is_alive():
        raise TimeoutError
    if error:
        raise error[0]
    return result[0]

