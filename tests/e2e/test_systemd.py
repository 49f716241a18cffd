"""The daemons tell systemd (Type=notify) when they are ready, as sd_notify(3) says."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import pytest

from tests.e2e.site import Site

pytestmark = pytest.mark.e2e


def _listen(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(20)
    return sock


def test_controller_and_node_manager_notify_readiness(tmp_path: Path) -> None:
    site = Site(tmp_path / "site", lnms=1)
    ctl_sock, lnm_sock = _listen(tmp_path / "ctl.sock"), _listen(tmp_path / "lnm.sock")
    try:
        cfg = site.info["controller"]["config"]  # type: ignore[index]
        site.controller = site._spawn(["-m", "usher.controller.cli", "--config", cfg],
                                      "controller.log",
                                      {"NOTIFY_SOCKET": str(tmp_path / "ctl.sock")})
        assert ctl_sock.recv(64) == b"READY=1"
        lnm = site._spawn(["-m", "usher.lnm.cli", "--config", site.hosts[0]["config"]],
                          "lnm-0.log", {"NOTIFY_SOCKET": str(tmp_path / "lnm.sock")})
        site.lnm_procs[0] = lnm
        assert lnm_sock.recv(64) == b"READY=1"
        site.controller.send_signal(signal.SIGTERM)
        assert ctl_sock.recv(64) == b"STOPPING=1"
        assert site.controller.wait(20) == 0
    finally:
        site.close()
        ctl_sock.close()
        lnm_sock.close()


def test_notify_without_systemd_sends_nothing() -> None:
    from usher.sdnotify import notify

    assert notify("", "READY=1") is False
    assert notify("/nonexistent/notify.sock", "READY=1") is False  # logged, not raised
