"""What IP addresses and DNS records cost a start: the same site with and without them.

Three runs, each on a fresh demo site with real processes (a controller and
node managers on fake hosts):

* ``off``: no IP range, no DNS (the control-plane benchmark's site);
* ``embedded``: the default IP range and the controller's embedded DNS server
  (what ``usher demo`` runs);
* ``bind``: the default IP range and RFC 2136 updates with TSIG to a real
  BIND 9 ``named`` on loopback.

In each run: ``SEQUENTIAL`` single-VM starts one after the other (latency,
p50), then ``BURST`` single-VM starts submitted at once (throughput: until the
last is done). With DNS, ``dns_down = "refuse"`` is in force, so a start is
done only once its records are on the server; the run then checks one VM by
asking the server with ``dig``. The table gives each metric per run and the
overhead ratio against ``off`` (target: at most 1.5x). Usage::

    .venv/bin/python -m bench.dns [--quick] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.controlplane import (
    TASK_TIMEOUT_S,
    VM_RAM_MIB,
    Completions,
    _client,
    _raise_interrupt,
    _settle,
    build_site,
)
from usher.config import ControllerConfig, load_toml, to_toml
from usher.demo import DEMO_RANGE, SITE
from usher.dns import Named, reverse_zone_for
from usher.errors import UsherError

MODES = ("off", "embedded", "bind")
TARGET_RATIO = 1.5


def use_bind(info: dict[str, Any], named: Named) -> None:
    """Point the site's controller at ``named`` instead of its embedded server."""
    path = Path(info["controller"]["config"])
    cfg = load_toml(ControllerConfig, path)
    cfg.dns, cfg.dns_server = "rfc2136", f"127.0.0.1:{named.port}"
    cfg.dns_key_file = str(named.key_file)
    cfg.dns_zones = [SITE, reverse_zone_for(ipaddress.ip_network(DEMO_RANGE))]
    path.write_text(to_toml(cfg))


def dig(server: str, name: str) -> list[str]:
    host, port = server.rsplit(":", 1)
    out = subprocess.run(["dig", f"@{host}", "-p", port, "+short", "+time=2", "+tries=1",
                          name], capture_output=True, text=True, timeout=10).stdout
    return out.split()


async def measure(info: dict[str, Any], password: str, pids: list[int], sequential: int,
                  burst: int, dns_server: str | None) -> dict[str, Any]:
    done = Completions()
    client = await _client(info, password)
    client.on_task = done.on_task
    out: dict[str, Any] = {}
    try:
        lat = []
        for i in range(sequential):
            t0 = time.perf_counter()
            [task] = await client.start([f"{i}.seq"], ram=VM_RAM_MIB)
            await done.wait([task.id], TASK_TIMEOUT_S)
            lat.append((done.ended[task.id] - t0) * 1e3)
        out["start_p50_ms"] = statistics.median(lat)
        await _settle(pids)
        t0 = time.perf_counter()
        accepted = await asyncio.gather(*(client.start([f"{i}.burst"], ram=VM_RAM_MIB)
                                          for i in range(burst)))
        last = await done.wait([t[0].id for t in accepted], TASK_TIMEOUT_S)
        out["burst_s"] = last - t0
        out["starts_per_s"] = burst / (last - t0)
        vms = {v.name: v for v in await client.list_vms()}
        out["vms"] = len(vms)
        if len(vms) != sequential + burst:
            raise RuntimeError(f"{len(vms)} VMs after the run, expected {sequential + burst}")
        if dns_server is not None:
            probe = vms[f"{burst // 2}.burst.seuss.{SITE}"]
            answer = dig(dns_server, probe.name)
            out["dig_ok"] = answer == [probe.ip]
            out["dns_pending"] = sum(1 for v in vms.values() if v.dns != "ok")
    finally:
        await client.close()
    return out


def run_mode(mode: str, directory: Path, lnms: int, sequential: int, burst: int,
             log: Any) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        demo, info = build_site(directory / mode, lnms, addresses=mode != "off")
        dns_server = info.get("dns")
        if mode == "bind":
            named = Named(directory / "named",
                          [SITE, reverse_zone_for(ipaddress.ip_network(DEMO_RANGE))])
            named.start()
            stack.callback(named.stop)
            use_bind(info, named)
            dns_server = f"127.0.0.1:{named.port}"
        try:
            demo.start(info)
            pids = [p.pid for p in demo.procs]
            password = Path(info["password_file"]).read_text().strip()
            result = asyncio.run(measure(info, password, pids, sequential, burst, dns_server))
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            demo.stop()
            signal.signal(signal.SIGINT, signal.default_int_handler)
    log(f"{mode}: start p50 {result['start_p50_ms']:.2f} ms, burst of {burst} "
        f"{result['starts_per_s']:.0f}/s" + (f", dig ok {result['dig_ok']}"
                                             if "dig_ok" in result else ""))
    return result


def table(results: dict[str, dict[str, Any]]) -> str:
    base = results["off"]
    cells = [("run", "start_p50_ms", "ratio", "burst_s", "ratio", "starts_per_s", "dig")]
    for mode in MODES:
        r = results.get(mode)
        if r is None:
            continue
        cells.append((mode, f"{r['start_p50_ms']:.2f}",
                      f"{r['start_p50_ms'] / base['start_p50_ms']:.2f}x",
                      f"{r['burst_s']:.2f}", f"{r['burst_s'] / base['burst_s']:.2f}x",
                      f"{r['starts_per_s']:.0f}",
                      "-" if "dig_ok" not in r else ("ok" if r["dig_ok"] else "WRONG")))
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
    lines = [" | ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)).rstrip()
             for c in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    lines.append(f"target: ratio <= {TARGET_RATIO:g}x; load average before "
                 f"{results['load_before']:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.dns", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="300 burst starts instead of 1,000")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--lnms", type=int, default=4, help="node managers (default: 4)")
    args = p.parse_args(argv)
    sequential, burst = (30, 300) if args.quick else (100, 1000)

    def log(text: str) -> None:
        print(f"bench: {text}", file=sys.stderr, flush=True)

    signal.signal(signal.SIGTERM, _raise_interrupt)
    results: dict[str, Any] = {"load_before": os.getloadavg()[0]}
    try:
        with tempfile.TemporaryDirectory(prefix="usher-bench-dns-") as tmp:
            for mode in MODES:
                results[mode] = run_mode(mode, Path(tmp), args.lnms, sequential, burst, log)
    except UsherError as exc:
        log(f"failed: {type(exc).__name__}: {exc.message}")
        return 1
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
