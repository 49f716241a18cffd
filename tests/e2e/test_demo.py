"""``usher demo``: a whole site in the foreground that stops cleanly on a signal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.site import wait_for

pytestmark = pytest.mark.e2e


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_demo_runs_a_site_and_stops_everything(tmp_path: Path, sig: int) -> None:
    d = tmp_path / "demo"
    usher = Path(sys.executable).parent / "usher"
    proc = subprocess.Popen([str(usher), "demo", "--dir", str(d), "--lnms", "3"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: (d / "demo.json").exists() or proc.poll() is not None, 30,
                 "demo.json")
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        info = json.loads((d / "demo.json").read_text())
        assert info["site_domain"] == "usher.test" and info["user"] == "seuss"
        assert len(info["hosts"]) == 3 and info["services"]["controller"]
        assert len({h["memory_mib"] for h in info["hosts"]}) == 3  # different sizes
        pids = [info["pids"]["controller"], *info["pids"]["lnms"]]
        assert all(_alive(p) for p in pids)
        assert os.stat(d / "ush.config").st_mode & 0o077 == 0
        env = {**os.environ, "USH_CONFIG": str(d / "ush.config"), "HOME": str(tmp_path)}
        ush = [str(Path(sys.executable).parent / "ush")]
        out = subprocess.run([*ush, "start demo1 --ram 64", "list", "vmm_list"], env=env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "demo1" in out.stdout and "vmm3.usher.test" in out.stdout
        # The directory: demo.json names it, and the usher_* tools work out of the box
        # in the cluster the first VM created (seuss is its admin).
        assert info["directory"]["url"].startswith("ldap://127.0.0.1:")
        assert info["directory"]["suffix"] == "dc=usher,dc=test"
        tools = {**env, "USHER_TOOLS_CONFIG": info["usertools_config"]}
        password = Path(info["password_file"]).read_text().strip()
        bin_dir = Path(sys.executable).parent
        added = subprocess.run([str(bin_dir / "usher_useradd"), "--password-stdin",
                                "--full-name", "Sam I Am", "sam"],
                               input=f"{password}\nham-and-eggs-1\n", env=tools,
                               capture_output=True, text=True, timeout=60)
        assert added.returncode == 0, added.stderr
        listed = subprocess.run([str(bin_dir / "usher_userlist"), "-l"], env=tools,
                                capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0 and "sam" in listed.stdout and "seuss" in listed.stdout
    finally:
        proc.send_signal(sig)
        proc.wait(30)
    assert proc.returncode == 0
    wait_for(lambda: not any(_alive(p) for p in pids), 10, "every demo process gone")
    assert not (d / "demo.json").exists()
