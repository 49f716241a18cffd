"""Site administration with real processes: the controller CLI, joining hosts,
removing hosts, task deadlines, and the client library example."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.site import Site, wait_for
from usher.config import LnmConfig, to_toml

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent


def ctl(config: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "usher-controller"), "--config", str(config), *args],
                          input=stdin, capture_output=True, text=True, timeout=60)


def test_controller_cli(tmp_path: Path) -> None:
    config = tmp_path / "etc" / "controller.toml"
    first = ctl(config, "init", "--site", "Cli.Usher.Test", "--state-dir",
                str(tmp_path / "state"), "--listen", "127.0.0.1:0")
    assert first.returncode == 0, first.stderr
    secret = tmp_path / "state" / "siteadmin.password"
    assert secret.stat().st_mode & 0o077 == 0
    assert secret.read_text().strip() not in first.stdout + first.stderr
    assert (tmp_path / "etc" / "pki" / "ca.key").stat().st_mode & 0o077 == 0
    ca = (tmp_path / "etc" / "pki" / "ca.crt").read_bytes()
    again = ctl(config, "init", "--site", "cli.usher.test", "--state-dir",
                str(tmp_path / "state"), "--listen", "127.0.0.1:0")
    assert again.returncode == 0 and "created" not in again.stdout  # safe to re-run
    assert (tmp_path / "etc" / "pki" / "ca.crt").read_bytes() == ca
    assert 'site_domain = "cli.usher.test"' in config.read_text()

    assert ctl(config, "db", "upgrade").returncode == 0
    added = ctl(config, "user", "add", "seuss", stdin="a-good-password\n")
    assert added.returncode == 0, added.stderr
    dup = ctl(config, "user", "add", "seuss", stdin="a-good-password\n")
    assert dup.returncode == 4 and "already exists" in dup.stderr
    short = ctl(config, "user", "add", "thidwick", stdin="short\n")
    assert short.returncode == 2 and "at least 8" in short.stderr
    reserved = ctl(config, "user", "add", "root", stdin="a-good-password\n")
    assert reserved.returncode == 2 and "reserved" in reserved.stderr
    pwfile = tmp_path / "pw"
    pwfile.write_text("another-password\n")
    assert ctl(config, "user", "add", "horton", "--no-usher", "--password-file",
               str(pwfile)).returncode == 0
    assert ctl(config, "user", "passwd", "seuss", stdin="changed-password\n").returncode == 0
    listing = ctl(config, "user", "list").stdout
    assert "seuss" in listing and "siteadmin" in listing and "site_admin" in listing
    assert "horton" in listing
    assert ctl(config, "user", "del", "horton").returncode == 0
    gone = ctl(config, "user", "del", "horton")
    assert gone.returncode == 3 and "no user horton" in gone.stderr
    assert "horton" not in ctl(config, "user", "list").stdout

    bad = ctl(tmp_path / "nope.toml", "user", "list")
    assert bad.returncode == 10 and "does not exist" in bad.stderr


def test_old_schema_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "controller.toml"
    assert ctl(config, "init", "--site", "old.usher.test", "--state-dir",
               str(tmp_path / "state")).returncode == 0
    import sqlite3

    with sqlite3.connect(tmp_path / "state" / "usher.db") as db:
        db.execute("UPDATE alembic_version SET version_num = '0000'")
    proc = ctl(config, "serve")
    assert proc.returncode == 10
    assert "run: usher-controller db upgrade" in proc.stderr


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = Site(tmp_path / "site", lnms=2, reconcile_interval_s=0.5, heartbeat_s=2.0)
    try:
        yield s.start()
    finally:
        s.close()


def test_host_joins_with_a_one_time_token(site: Site, tmp_path: Path) -> None:
    config = Path(site.info["controller"]["config"])  # type: ignore[index]
    token = ctl(config, "join-token", "newhost.usher.test")
    assert token.returncode == 0
    hdir = tmp_path / "newhost"
    hdir.mkdir()
    (hdir / "token").write_text(token.stdout)
    lcfg = LnmConfig(controller_port=site.config.listen_port, ca_cert=site.config.ca_cert,
                     cert=str(hdir / "host.crt"), key=str(hdir / "host.key"),
                     join_token_file=str(hdir / "token"), hostname="newhost.usher.test",
                     fake_host_file=str(hdir / "host.xml"), fake_cpus=2,
                     fake_memory_mib=2048)
    (hdir / "lnm.toml").write_text(to_toml(lcfg))
    lnm = subprocess.Popen([str(BIN / "usher-lnm"), "--config", str(hdir / "lnm.toml")],
                           stderr=subprocess.PIPE, text=True)
    try:
        c = site.client()
        wait_for(lambda: "newhost.usher.test" in {h.name for h in c.list_hosts()}, 15,
                 "new host registered")
        assert not (hdir / "token").exists()  # used once, then gone
        assert (hdir / "host.key").stat().st_mode & 0o077 == 0
    finally:
        Site.kill(lnm, signal.SIGTERM)
    # The stored certificate brings it back; the token is never needed again.
    lnm = subprocess.Popen([str(BIN / "usher-lnm"), "--config", str(hdir / "lnm.toml")],
                           stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: {h.name: h.state for h in c.list_hosts()}.get(
            "newhost.usher.test") == "up", 15, "host back with its certificate")
    finally:
        Site.kill(lnm, signal.SIGTERM)
    # A token for another host name, or used twice, is refused.
    other = ctl(config, "join-token", "other.usher.test").stdout
    (hdir / "token").write_text(other)
    (hdir / "host.crt").unlink()
    refused = subprocess.run([str(BIN / "usher-lnm"), "--config", str(hdir / "lnm.toml")],
                             capture_output=True, text=True, timeout=30)
    assert refused.returncode == 5 and "not newhost.usher.test" in refused.stderr


def test_remove_host_and_task_deadline(site: Site) -> None:
    admin_pw = (site.dir / "state" / "siteadmin.password").read_text().strip()
    admin = site.client("siteadmin", admin_pw)
    c = site.client()
    h0, h1 = site.hosts[0]["name"], site.hosts[1]["name"]
    c.wait_all(c.start(["keep"], ram=32, vmm=h0))
    with pytest.raises(Exception, match="is up; disable it first"):
        admin.host_remove(h1)
    admin.host_disable(h0)
    with pytest.raises(Exception, match="still has 1 VMs"):
        admin.host_remove(h0)
    c.wait_all(c.destroy(["keep"]))
    admin.host_remove(h0)
    assert h0 not in {h.name for h in admin.list_hosts()}

    # A host that stops answering: the task ends in error at its deadline; the VM
    # stays registered in error and is settled when the host answers again.
    site.config.task_deadline_s = 1.5
    lnm = site.lnm_procs[1]
    ctlcfg = Path(site.info["controller"]["config"])  # type: ignore[index]
    text = ctlcfg.read_text().replace("task_deadline_s = 20.0", "task_deadline_s = 1.5")
    ctlcfg.write_text(text)
    Site.kill(site.controller, signal.SIGTERM)
    site.start_controller()
    c2 = site.client()
    wait_for(lambda: {h.name: h.connected for h in c2.list_hosts()}.get(h1), 15,
             "h1 connected again")
    lnm.send_signal(signal.SIGSTOP)
    try:
        proc = site.ush("start slow --ram 32", timeout=60)
        assert proc.returncode != 0
        assert "start FAILED: did not finish within 1.5 s" in proc.stdout + proc.stderr
        vm = c2.list_vms()[0]
        assert vm.state == "error" and "destroy it or start it again" in vm.reason
    finally:
        lnm.send_signal(signal.SIGCONT)
    # The host did the work late; reconciliation sees the domain running.
    wait_for(lambda: c2.list_vms()[0].state == "running", 15, "settled by reconciliation")
    c2.wait_all(c2.destroy(["slow"]))
    wait_for(lambda: not site.all_domains(), 5, "no domain left")


def test_client_example_runs(site: Site) -> None:
    env = {**os.environ, "USH_CONFIG": str(site.dir / "ush.config"), "HOME": str(site.dir)}
    proc = subprocess.run([sys.executable, "examples/client_example.py"], env=env,
                          capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr
    assert "demo1.example.seuss.usher.test: running" in proc.stdout
    assert site.client().list_vms() == []
