"""Directory benchmark: users, links, listings and LDAP logins on a real slapd.

Not part of the test suite. It starts a throwaway slapd (the project's own
``usher.directory.slapd.Slapd``, durable as in production), then measures:

- ``add_1000_users_s``: 1,000 ``add_user`` calls into one cluster, as its admin;
- ``link_1000x10_s``: linking those 1,000 users into 10 more clusters (10,000 links);
- ``userlist_1000_s``: ``usher_userlist`` of the 1,000-user cluster as a new process
  (``-l`` too), median of 3;
- ``login_p50_ms``, ``login_p99_ms``: an ush login against a controller that checks the
  password with LDAP binds (``AsyncClient.connect``: TLS, hello, service search, user
  bind, welcome), 50 logins;
- ``bind_p50_ms``: the raw floor, one ldap3 simple bind as the user.

Run: ``.venv/bin/python -m bench.directory [--quick] [--json]``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ldap3 import Connection, Server

from usher.client import AsyncClient
from usher.config import ControllerConfig, ToolsConfig, to_toml
from usher.controller import db as dbmod
from usher.controller.app import Controller
from usher.directory.client import Directory
from usher.directory.slapd import Slapd
from usher.protocol.pki import write_site_pki

SITE = "bench.usher.test"
ADMIN_PW, SERVICE_PW, USER_PW = "admin-bench-pw", "service-bench-pw", "user-bench-pw"


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(tmp: Path, users: int, clusters: int, logins: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    slapd = Slapd(tmp / "slapd", SITE, root_password="root-bench-pw",
                  admin_password=ADMIN_PW, service_password=SERVICE_PW)
    slapd.start()
    try:
        url, layout = slapd.url, slapd.layout
        with Directory.connect(url, SITE, layout.site_admin_dn, ADMIN_PW) as admin:
            admin.add_usher_user("seuss", "Theodor Seuss Geisel", USER_PW)
        home = f"home.seuss.{SITE}"
        others = [f"c{i}.seuss.{SITE}" for i in range(clusters)]
        with Directory.connect(url, SITE, layout.service_dn, SERVICE_PW) as service:
            for cluster in [home, *others]:
                service.ensure_cluster(cluster, "seuss")
        with Directory.bind_user(url, SITE, SITE, "seuss", USER_PW) as seuss:
            t = time.perf_counter()
            for i in range(users):
                seuss.add_user(home, f"u{i:05d}", f"User {i}", USER_PW)
            out["add_users_s"] = time.perf_counter() - t
            t = time.perf_counter()
            for cluster in others:
                for i in range(users):
                    seuss.link_user(cluster, f"u{i:05d}")
            out["link_s"] = time.perf_counter() - t
        cfg_path = tmp / "usertools.config"
        cfg_path.write_text(to_toml(ToolsConfig(ldap_url=url, site_domain=SITE, cluster=home,
                                                user="seuss")))
        tool = Path(sys.executable).parent / "usher_userlist"
        env = {**os.environ, "USHER_TOOLS_CONFIG": str(cfg_path), "HOME": str(tmp)}
        for flag, key in (([], "userlist_s"), (["-l"], "userlist_long_s")):
            runs = []
            for _ in range(3):
                t = time.perf_counter()
                proc = subprocess.run([str(tool), *flag],
                                      capture_output=True, text=True, env=env, timeout=120)
                runs.append(time.perf_counter() - t)
                if proc.returncode != 0:
                    raise SystemExit(f"usher_userlist failed: {proc.stderr.strip()}")
            out[key] = statistics.median(runs)
            out[key + "_rows"] = proc.stdout.count("\n")
        dn = layout.person_dn(SITE, "seuss")
        binds = []
        for _ in range(logins):
            t = time.perf_counter()
            Connection(Server(url), dn, USER_PW, auto_bind=True).unbind()
            binds.append((time.perf_counter() - t) * 1000)
        out["bind_p50_ms"] = statistics.median(binds)
        out.update(asyncio.run(_logins(tmp, url, logins)))
    finally:
        slapd.stop()
    return out


async def _logins(tmp: Path, url: str, count: int) -> dict[str, float]:
    pki = write_site_pki(tmp / "pki", site=SITE, controller_names=["localhost"])
    db_url = f"sqlite:///{tmp / 'usher.db'}"
    dbmod.upgrade(db_url)
    dbmod.Database(dbmod.make_engine(db_url)).close()
    secret = tmp / "service.pw"
    secret.write_text(SERVICE_PW)
    cfg = dataclasses.replace(
        ControllerConfig(), site_domain=SITE, listen_port=0, database_url=db_url,
        ca_cert=str(pki.ca_cert), ca_key=str(pki.ca_key), cert=str(pki.controller_cert),
        key=str(pki.controller_key), ldap_url=url, ldap_service_password_file=str(secret),
        login_max_failures=10**6, login_max_failures_per_address=10**6)
    ctl = Controller(cfg)
    host, port = await ctl.start()
    times = []
    try:
        for _ in range(count):
            client = AsyncClient(host, port, ca_cert=str(pki.ca_cert), user="seuss",
                                 password=USER_PW, server_hostname="localhost",
                                 reconnect=False)
            t = time.perf_counter()
            await client.connect()
            times.append((time.perf_counter() - t) * 1000)
            await client.close()
    finally:
        await ctl.stop()
    return {"login_p50_ms": statistics.median(times), "login_p99_ms": _pct(times, 0.99)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="200 users, 3 clusters, 20 logins")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--users", type=int, help="users to add (default 1000)")
    p.add_argument("--clusters", type=int, help="clusters to link them into (default 10)")
    args = p.parse_args()
    users, clusters, logins = (200, 3, 20) if args.quick else (1000, 10, 50)
    users = args.users or users
    clusters = args.clusters if args.clusters is not None else clusters
    with tempfile.TemporaryDirectory(prefix="usher-bench-dir-") as tmp:
        out = measure(Path(tmp), users, clusters, logins)
    out.update(users=users, clusters=clusters)
    if args.json:
        print(json.dumps(out))
        return 0
    rows = [
        (f"add {users} users", f"{out['add_users_s']:.2f} s",
         f"{users / out['add_users_s']:.0f}/s"),
        (f"link {users} users into {clusters} clusters", f"{out['link_s']:.2f} s",
         f"{users * clusters / out['link_s']:.0f}/s"),
        (f"usher_userlist ({out['userlist_s_rows'] - 1} users)", f"{out['userlist_s']:.2f} s",
         "new process"),
        ("usher_userlist -l", f"{out['userlist_long_s']:.2f} s", "new process"),
        ("ush login (LDAP bind) p50", f"{out['login_p50_ms']:.1f} ms",
         f"p99 {out['login_p99_ms']:.1f} ms"),
        ("raw ldap3 bind p50 (floor)", f"{out['bind_p50_ms']:.1f} ms", ""),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'metric':<{width}} | value     | note")
    print(f"{'-' * width}-+-----------+------------")
    for name, value, note in rows:
        print(f"{name:<{width}} | {value:<9} | {note}")
    print(f"\nhost: {os.cpu_count()} cpus, Python {platform.python_version()}; "
          f"{time.strftime('%Y-%m-%d')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
