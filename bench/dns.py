"""What IP addresses and DNS records cost a start: the same site with and without them.

Three runs, each on a fresh demo site with real processes (a controller and
node managers on fake hosts):

* ``off``: no IP range, no DNS (the control-plane benchmark's site);
* ``embedded``: the default IP range and the controller's embedded DNS server
  (what ``usher demo`` runs);
* ``bind``: the default IP range and RFC 2136 updates with TSIG to a real
  BIND 9 ``named`` on loopback.

The three sites run side by side and the rounds alternate between them. In
each round: single-VM starts one after the other (latency, p50), then
single-VM starts submitted at once (throughput: until the last is done).
With DNS, ``dns_down = "refuse"`` is in force, so a start is done only once
its records are on the server; each round then checks one VM by asking the
server with ``dig``, and destroys its VMs. The table gives each metric per run and the
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
DESTROY_BATCH = 200
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
                  burst: int, dns_server: str | None, round_no: int) -> dict[str, Any]:
    """One round on one site: ``sequential`` starts one by one, then a burst."""
    done = Completions()
    client = await _client(info, password)
    client.on_task = done.on_task
    out: dict[str, Any] = {}
    try:
        await _settle(pids)
        lat = []
        for i in range(sequential):
            t0 = time.perf_counter()
            [task] = await client.start([f"{i}.seq{round_no}"], ram=VM_RAM_MIB)
            await done.wait([task.id], TASK_TIMEOUT_S)
            lat.append((done.ended[task.id] - t0) * 1e3)
        out["start_p50_ms"] = statistics.median(lat)
        await _settle(pids)
        t0 = time.perf_counter()
        accepted = await asyncio.gather(*(client.start([f"{i}.burst{round_no}"], ram=VM_RAM_MIB)
                                          for i in range(burst)))
        last = await done.wait([t[0].id for t in accepted], TASK_TIMEOUT_S)
        out["burst_s"] = last - t0
        vms = {v.name: v for v in await client.list_vms()}
        expected = sequential + burst
        if len(vms) != expected:
            raise RuntimeError(f"{len(vms)} VMs after round {round_no}, expected {expected}")
        if dns_server is not None:
            probe = vms[f"{burst // 2}.burst{round_no}.seuss.{SITE}"]
            out["dig_ok"] = dig(dns_server, probe.name) == [probe.ip]
            out["dns_pending"] = sum(1 for v in vms.values() if v.dns != "ok")
        # Every round starts from an empty site: rounds measure the same thing,
        # and a host's libvirt network (whose DHCP entries cost O(entries) per
        # change) holds at most one round's VMs.
        names = sorted(vms)
        for first in range(0, len(names), DESTROY_BATCH):
            tasks = await client.destroy(names[first:first + DESTROY_BATCH])
            await done.wait([t.id for t in tasks], TASK_TIMEOUT_S)
        if await client.list_vms():
            raise RuntimeError(f"VMs left after round {round_no}'s clean-up")
    finally:
        await client.close()
    return out


class Site:
    """One running demo site of a mode, for several rounds."""

    def __init__(self, mode: str, directory: Path, lnms: int,
                 stack: contextlib.ExitStack) -> None:
        self.mode = mode
        self.demo, self.info = build_site(directory / mode, lnms, addresses=mode != "off")
        self.dns_server: str | None = self.info.get("dns")
        if mode == "bind":
            named = Named(directory / "named",
                          [SITE, reverse_zone_for(ipaddress.ip_network(DEMO_RANGE))])
            named.start()
            stack.callback(named.stop)
            use_bind(self.info, named)
            self.dns_server = f"127.0.0.1:{named.port}"
        stack.callback(self.demo.stop)
        self.demo.start(self.info)
        self.pids = [p.pid for p in self.demo.procs]
        self.password = Path(self.info["password_file"]).read_text().strip()

    def round(self, sequential: int, burst: int, round_no: int) -> dict[str, Any]:
        return asyncio.run(measure(self.info, self.password, self.pids, sequential, burst,
                                   self.dns_server, round_no))


def summarize(rounds: list[dict[str, Any]], base: list[dict[str, Any]],
              burst: int) -> dict[str, Any]:
    """Medians over the rounds of one mode; its ratios to ``base`` (the ``off``
    rounds) are the medians of each round's ratio to the ``off`` round run
    just before it, so a slow minute of the machine cancels out."""
    out: dict[str, Any] = {
        "start_p50_ms": statistics.median(r["start_p50_ms"] for r in rounds),
        "burst_s": statistics.median(r["burst_s"] for r in rounds),
        "start_ratio": statistics.median(r["start_p50_ms"] / b["start_p50_ms"]
                                         for r, b in zip(rounds, base, strict=True)),
        "burst_ratio": statistics.median(r["burst_s"] / b["burst_s"]
                                         for r, b in zip(rounds, base, strict=True)),
        "rounds": rounds,
    }
    out["starts_per_s"] = burst / out["burst_s"]
    if "dig_ok" in rounds[0]:
        out["dig_ok"] = all(r["dig_ok"] for r in rounds)
    return out


def table(results: dict[str, dict[str, Any]]) -> str:
    cells = [("run", "start_p50_ms", "ratio", "burst_s", "ratio", "starts_per_s", "dig")]
    for mode in MODES:
        r = results.get(mode)
        if r is None:
            continue
        cells.append((mode, f"{r['start_p50_ms']:.2f}", f"{r['start_ratio']:.2f}x",
                      f"{r['burst_s']:.2f}", f"{r['burst_ratio']:.2f}x",
                      f"{r['starts_per_s']:.0f}",
                      "-" if "dig_ok" not in r else ("ok" if r["dig_ok"] else "WRONG")))
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
    lines = [" | ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)).rstrip()
             for c in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    lines.append(f"medians of {results['rounds']} rounds of {results['sequential']} sequential "
                 f"and {results['burst']} concurrent starts per site; ratios: medians of each "
                 f"round's against off's; target: ratio <= "
                 f"{TARGET_RATIO:g}x; load average before {results['load_before']:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.dns", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="300 burst starts instead of 1,000")
    p.add_argument("--rounds", type=int, default=3, help="rounds per site (default: 3)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--lnms", type=int, default=4, help="node managers per site (default: 4)")
    args = p.parse_args(argv)
    sequential, burst = (30, 300) if args.quick else (100, 1000)

    def log(text: str) -> None:
        print(f"bench: {text}", file=sys.stderr, flush=True)

    signal.signal(signal.SIGTERM, _raise_interrupt)
    results: dict[str, Any] = {"load_before": os.getloadavg()[0], "burst": burst,
                               "sequential": sequential, "rounds": args.rounds}
    rounds: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    try:
        with tempfile.TemporaryDirectory(prefix="usher-bench-dns-") as tmp, \
                contextlib.ExitStack() as stack:
            sites = [Site(mode, Path(tmp), args.lnms, stack) for mode in MODES]
            log(f"sites up: {', '.join(MODES)}")
            # Rounds alternate between the sites, so a slow minute of a shared
            # machine hits every mode alike.
            for n in range(args.rounds):
                for site in sites:
                    r = site.round(sequential, burst, n)
                    rounds[site.mode].append(r)
                    log(f"round {n} {site.mode}: start p50 {r['start_p50_ms']:.2f} ms, "
                        f"burst of {burst} in {r['burst_s']:.2f} s"
                        + (f", dig ok {r['dig_ok']}" if "dig_ok" in r else ""))
            signal.signal(signal.SIGINT, signal.SIG_IGN)
    except UsherError as exc:
        log(f"failed: {type(exc).__name__}: {exc.message}")
        return 1
    for mode in MODES:
        results[mode] = summarize(rounds[mode], rounds["off"], burst)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
