"""The controller on a real PostgreSQL, beside the SQLite default.

A throwaway PostgreSQL (Debian's package) is started in a temporary
directory; the controller migrates it, runs VMs through a node manager with
the fake driver, restarts on the same database and finds everything again.
"""

from __future__ import annotations

import asyncio
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from usher.client import AsyncClient
from usher.config import ControllerConfig, LnmConfig
from usher.controller import auth
from usher.controller import db as dbmod
from usher.controller.app import Controller
from usher.lnm.agent import NodeAgent
from usher.lnm.drivers import make_driver
from usher.protocol.pki import issue_host_cert_files, write_site_pki


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    bindir = _pg_bin()
    if bindir is None or os.geteuid() != 0:
        pytest.skip("PostgreSQL binaries (Debian package postgresql) and root are needed")
    base = Path(tempfile.mkdtemp(prefix="usher-pg-"))
    shutil.chown(base, "postgres")
    data, port = base / "data", _free_port()
    run = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*run, str(bindir / "initdb"), "-A", "trust", "--no-sync", "-U", "usher",
                    "-D", str(data)], check=True, capture_output=True)
    subprocess.run([*run, str(bindir / "pg_ctl"), "-D", str(data), "-w", "-t", "30", "-o",
                    f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off",
                    "-l", str(base / "log"), "start"], check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg://usher@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*run, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate",
                        "stop"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


async def test_controller_on_postgresql(postgres: str, tmp_path: Path) -> None:
    site = "pg.usher.test"
    pki = write_site_pki(tmp_path / "pki", site=site,
                             controller_names=["localhost", "127.0.0.1"])
    dbmod.upgrade(postgres)
    db = dbmod.Database(dbmod.make_engine(postgres))
    db.run_sync(lambda s: auth.add_user(s, "seuss", "password1"))
    db.close()
    cfg = ControllerConfig(site_domain=site, listen_port=0, database_url=postgres,
                           ca_cert=str(pki.ca_cert), ca_key=str(pki.ca_key),
                           cert=str(pki.controller_cert), key=str(pki.controller_key),
                           heartbeat_s=0.5, host_lost_after_s=5)
    cert, key = issue_host_cert_files(pki, f"h1.{site}", tmp_path / "h1")
    driver = make_driver("fake", hostname=f"h1.{site}", cpus=8, memory_mib=8192)

    async def run_site(check: str) -> list[str]:
        ctl = Controller(cfg)
        host, port = await ctl.start()
        agent = NodeAgent(LnmConfig(controller_port=port, ca_cert=str(pki.ca_cert),
                                    cert=str(cert), key=str(key), hostname=f"h1.{site}"),
                          driver)
        stop = asyncio.Event()
        runner = asyncio.create_task(agent.run(stop))
        client = AsyncClient(host, port, ca_cert=str(pki.ca_cert), user="seuss",
                             password="password1", server_hostname="localhost")
        try:
            await asyncio.wait_for(agent.registered.wait(), 10)
            await client.connect()
            if check == "create":
                done = await client.wait_all(await client.start(["{1..3}.pg"], ram=64), 10)
                assert {t.state for t in done} == {"done"}
                await client.wait_all(await client.pause(["2.pg"]), 10)
            return [f"{v.name.split('.')[0]}:{v.state}" for v in await client.list_vms()]
        finally:
            await client.close()
            stop.set()
            await asyncio.wait_for(runner, 10)
            await ctl.stop()

    t0 = time.monotonic()
    assert await run_site("create") == ["1:running", "2:paused", "3:running"]
    # A new controller on the same database sees the same VMs, reconciled with the host.
    assert await run_site("read") == ["1:running", "2:paused", "3:running"]
    assert time.monotonic() - t0 < 30
