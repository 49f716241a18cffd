"""Starting and stopping libvirtd: what may be stopped, and how an absent daemon reads.

Starting the real daemons is tested in tests/e2e/realguest; here a ``sleep``
stands in for a daemon usher started, so the rule "stop only what we started,
by PID and start time" is checked without touching the host's libvirtd.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from usher.lnm import libvirtd


@pytest.fixture
def record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "run" / "libvirtd.json"
    monkeypatch.setattr(libvirtd, "RECORD", path)
    return path


@pytest.fixture
def fake_daemon() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "60"])
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=5)


def write_record(path: Path, pid: int, start_time: int | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"libvirtd": {"pid": pid, "start_time": start_time}}))


def test_stops_the_daemon_it_recorded(record: Path,
                                      fake_daemon: subprocess.Popen[bytes]) -> None:
    write_record(record, fake_daemon.pid, libvirtd._start_time(fake_daemon.pid))
    started = time.monotonic()
    assert libvirtd.stop_libvirtd(timeout_s=5) is True
    assert time.monotonic() - started < 2
    assert fake_daemon.wait(timeout=5) == -15  # SIGTERM
    assert not record.exists()


def test_leaves_a_process_that_only_reuses_the_pid(record: Path,
                                                  fake_daemon: subprocess.Popen[bytes]) -> None:
    start_time = libvirtd._start_time(fake_daemon.pid)
    assert start_time is not None
    write_record(record, fake_daemon.pid, start_time - 1)
    assert libvirtd.stop_libvirtd(timeout_s=5) is False
    assert fake_daemon.poll() is None
    assert not record.exists()  # the record is stale either way


def test_without_a_record_nothing_is_stopped(record: Path) -> None:
    assert libvirtd.stop_libvirtd() is False


def test_a_uri_nobody_serves_is_a_problem_in_words(tmp_path: Path) -> None:
    started = time.monotonic()
    problem = libvirtd.libvirtd_problem(f"qemu+unix:///system?socket={tmp_path}/none",
                                        timeout_s=5)
    assert problem is not None and "connect" in problem.lower()
    assert time.monotonic() - started < 5
    assert libvirtd.libvirtd_problem("test:///default") is None
