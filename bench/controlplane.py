"""Control-plane benchmark: how fast the controller starts and lists VMs.

It builds a throwaway site in a temporary directory the way ``usher demo``
does (:class:`usher.demo.Demo`: a controller and N real ``usher-lnm``
processes on fake libvirt test-driver hosts, all talking TLS on loopback),
sized so that 10,000 small VMs fit, and measures through the client library
(:class:`usher.client.AsyncClient`):

* ``start_p50_ms`` / ``start_p99_ms``: one VM started, from the ``vm.start``
  request to its task's completion, over sequential starts;
* ``starts_per_s``: a burst of single-VM ``vm.start`` requests pipelined on
  one connection, first request to last completion;
* ``list_500_ms`` / ``list_10k_ms``: a ``vm.list`` round trip with 500 and
  10,000 VMs (median of several calls);
* ``rss_mib_10k``: controller plus node managers' resident memory holding
  10,000 VMs;
* ``ush_list_s``: ``ush list`` as a new process with 500 VMs.

The same run measures the raw libvirt test-driver floor (define+create of
one domain, list with state of 500 domains) with libvirt-python directly, so
the numbers can be read against what the hypervisor layer costs by itself.

Every process started is stopped by PID on the way out, Ctrl-C and SIGTERM
included. Usage::

    .venv/bin/python -m bench.controlplane [--quick] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import libvirt

from usher.client import AsyncClient, TaskInfo, task_ended
from usher.config import LnmConfig, load_toml, to_toml
from usher.demo import Demo
from usher.errors import TimedOut, UsherError
from usher.lnm.domxml import build_domain_xml
from usher.lnm.drivers.base import DomainSpec
from usher.lnm.fakehost import FakeHost

HOST_CPUS = 64
HOST_MEMORY_MIB = 10 * 1024 * 1024  # 10 TiB: 10,000 VMs of 16 MiB use 1.5 % of one host
VM_RAM_MIB = 16  # the smallest --ram the controller accepts
BATCH = 1000  # names per brace batch: the controller's default batch_cap
TASK_TIMEOUT_S = 600.0
STALL_S = 30.0  # no task ended for this long while some are running: the site is stuck

TARGETS = {
    "start_p50_ms": ("<=", 5.0),
    "starts_per_s": (">=", 500.0),
    "list_500_ms": ("<=", 5.0),
    "list_10k_ms": ("<=", 100.0),
    "ush_list_s": ("<=", 0.3),
}
FLOORS = {"start_p50_ms": "raw_define_create_ms", "start_p99_ms": "raw_define_create_ms",
          "list_500_ms": "raw_list_500_ms"}


def rows(plan_label: str) -> list[str]:
    """The table's metrics, in order; ``plan_label`` names the big site (``10k``)."""
    return ["start_p50_ms", "start_p99_ms", "starts_per_s", "list_500_ms",
            f"list_{plan_label}_ms", f"rss_mib_{plan_label}", "ush_list_s"]


@dataclasses.dataclass
class Plan:
    """How much of each phase to run: node managers, starts, VMs, list calls."""

    lnms: int
    sequential: int
    burst: int
    total: int
    list_calls: int

    @property
    def label(self) -> str:
        """How the big site is named in metric names: ``10k``."""
        return f"{self.total // 1000}k" if self.total % 1000 == 0 else str(self.total)


def plan_for(args: argparse.Namespace) -> Plan:
    # Filling a site runs at about 170 starts/s on 2 cores, so --quick stops
    # at 5,000 VMs to finish within a minute; the full run reaches 10,000.
    if args.quick:
        return Plan(lnms=args.lnms, sequential=50, burst=1000, total=5_000, list_calls=5)
    return Plan(lnms=args.lnms, sequential=200, burst=1000, total=10_000, list_calls=9)


# =========================================================== raw libvirt floor
def _percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[index]


def raw_floor(directory: Path, starts: int) -> dict[str, float]:
    """Define+create and list on one test-driver host, with no usher code in the way.

    The host file is a fake host's, so the driver parses the same kind of
    node file the node managers open; the domain XML is usher's own.
    """
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    fake = FakeHost.create(directory / "raw-host.xml", hostname="raw.usher.test",
                           cpus=HOST_CPUS, memory_mib=HOST_MEMORY_MIB)
    conn = libvirt.open(fake.uri)
    try:
        count = max(starts, 500)
        xmls = [build_domain_xml(DomainSpec(
            uuid=str(uuid.uuid4()), name=f"raw{i}.seuss.usher.test", memory_mib=VM_RAM_MIB,
            vcpus=1, mac=f"52:54:00:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}",
            owner="seuss", task_id=str(uuid.uuid4())), "test") for i in range(count)]
        created = []
        for xml in xmls:
            t0 = time.perf_counter()
            dom = conn.defineXML(xml)
            dom.create()
            created.append(time.perf_counter() - t0)
        doms = conn.listAllDomains()
        for dom in doms[500:]:
            dom.destroy()
            dom.undefine()
        listed = []
        for _ in range(9):
            t0 = time.perf_counter()
            states = [d.state() for d in conn.listAllDomains()]
            listed.append(time.perf_counter() - t0)
        assert len(states) == 500, len(states)
    finally:
        conn.close()
    return {"raw_define_create_ms": statistics.median(created[:starts]) * 1e3,
            "raw_list_500_ms": statistics.median(listed) * 1e3}


# ==================================================================== the site
def build_site(directory: Path, lnms: int, *,
               addresses: bool = False) -> tuple[Demo, dict[str, Any]]:
    """A demo site whose fake hosts are big enough for the benchmark.

    ``addresses`` gives it the demo's IP range and embedded DNS server; the
    control-plane numbers are measured without them (bench.dns compares).
    """
    demo = Demo(directory, lnms, None, addresses=addresses)
    info = demo.setup()
    for host in info["hosts"]:  # type: ignore[attr-defined]
        path = Path(host["config"])
        cfg = dataclasses.replace(load_toml(LnmConfig, path), fake_cpus=HOST_CPUS,
                                  fake_memory_mib=HOST_MEMORY_MIB)
        path.write_text(to_toml(cfg))
        host["cpus"], host["memory_mib"] = HOST_CPUS, HOST_MEMORY_MIB
    return demo, info


def cpu_s(pid: int) -> float:
    """User plus system CPU seconds a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds used by the controller, the node managers and this process, per phase."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.phases: dict[str, dict[str, float]] = {}
        self._mark = self._now()

    def _now(self) -> dict[str, float]:
        return {"controller": cpu_s(self.pids[0]),
                "lnms": sum(cpu_s(pid) for pid in self.pids[1:]),
                "client": cpu_s(os.getpid()), "wall": time.perf_counter()}

    def phase(self, name: str) -> None:
        """Close the phase that began at the previous call (or at creation)."""
        now = self._now()
        self.phases[name] = {k: round(now[k] - self._mark[k], 2) for k in now}
        self._mark = now


def rss_mib(pids: Iterable[int]) -> float:
    total_kib = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total_kib += int(line.split()[1])
    return total_kib / 1024


class Completions:
    """When each task ended, as learned from the controller's pushes."""

    def __init__(self) -> None:
        self.ended: dict[str, float] = {}
        self.last = time.perf_counter()
        self._waiters: list[tuple[set[str], asyncio.Future[None]]] = []

    def on_task(self, info: TaskInfo) -> None:
        if not task_ended(info) or info.id in self.ended:
            return
        self.ended[info.id] = self.last = time.perf_counter()
        if info.state != "done":
            print(f"bench: task {info.id} ({info.vm}) ended in {info.state}: {info.message}",
                  file=sys.stderr)
        for ids, fut in self._waiters:
            ids.discard(info.id)
            if not ids and not fut.done():
                fut.set_result(None)

    async def wait(self, ids: Iterable[str], timeout: float) -> float:
        """Wait until every task in ``ids`` has ended; returns the last end time.

        Raises TimedOut after ``timeout``, or sooner when no task at all has
        ended for STALL_S: a wedged controller fails the run instead of hanging it.
        """
        ids = list(ids)
        missing = {i for i in ids if i not in self.ended}
        if missing:
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[None] = loop.create_future()
            entry = (missing, fut)
            self._waiters.append(entry)
            began = time.perf_counter()
            try:
                while not fut.done():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(fut), 1.0)
                    now = time.perf_counter()
                    if now - max(self.last, began) > STALL_S or now - began > timeout:
                        raise TimedOut(f"{len(missing)} of {len(ids)} tasks still running; "
                                       f"none ended in the last {now - self.last:.0f} s")
            finally:
                self._waiters.remove(entry)
        return max(self.ended[i] for i in ids)


async def _client(info: dict[str, Any], password: str) -> AsyncClient:
    host, port = info["controller"]["address"].rsplit(":", 1)
    client = AsyncClient(host, int(port), ca_cert=info["controller"]["ca_cert"],
                         user=info["user"], password=password, server_hostname="localhost")
    await client.connect()
    return client


async def _fill(client: AsyncClient, done: Completions, prefix: str, count: int,
                refusals: list[str]) -> int:
    """Start ``count`` VMs ``N.PREFIXk`` in brace batches of at most BATCH; wait for all.

    A batch the controller refuses is sent again (a new request id, so new
    MACs) up to twice; each refusal is recorded in ``refusals``.
    """
    batch = started = 0
    while started < count:
        batch += 1
        n = min(BATCH, count - started)
        for attempt in range(3):
            try:
                tasks = await client.start([f"{{1..{n}}}.{prefix}{batch}"], ram=VM_RAM_MIB)
                break
            except UsherError as exc:
                refusals.append(f"batch {prefix}{batch}: {exc.code}: {exc.message}")
                if attempt == 2:
                    raise
        await done.wait([t.id for t in tasks], TASK_TIMEOUT_S)
        started += n
    return started


async def _time_list(client: AsyncClient, calls: int, expect: int) -> list[float]:
    """Round-trip times (ms) of ``calls`` vm.list calls, each expected to list ``expect``."""
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        vms = await client.list_vms()
        times.append(time.perf_counter() - t0)
        if len(vms) != expect:
            raise RuntimeError(f"vm.list returned {len(vms)} VMs, expected {expect}")
    return [t * 1e3 for t in times]


async def _settle(pids: list[int], limit_s: float = 30.0) -> float:
    """Wait until the site is idle (under 10 % of a core for 0.25 s); returns the wait.

    Work a task leaves behind after it is reported done (event deliveries,
    journal writes) would otherwise land in the next measurement.
    """
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit_s:
        before = sum(cpu_s(pid) for pid in pids)
        await asyncio.sleep(0.25)
        if sum(cpu_s(pid) for pid in pids) - before < 0.025:
            break
    return time.perf_counter() - t0


def time_ush_list(info: dict[str, Any], runs: int = 3) -> tuple[float | None, str]:
    """Median wall time of ``ush list`` as a new process, or None and why not."""
    ush = Path(sys.executable).parent / "ush"
    if not ush.exists():
        return None, f"{ush} does not exist"
    env = dict(os.environ, USH_CONFIG=str(info["ush_config"]))
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        proc = subprocess.run([str(ush), "list"], env=env, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=60)
        times.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            return None, f"ush exited {proc.returncode}: {lines[-1] if lines else ''}"
    return statistics.median(times), ""


async def measure(info: dict[str, Any], password: str, pids: list[int], plan: Plan,
                  log: Any) -> dict[str, Any]:
    """Run every phase against the site in ``info``; returns the metrics."""
    done = Completions()
    client = await _client(info, password)
    client.on_task = done.on_task
    out: dict[str, Any] = {}
    cpu = CpuMeter(pids)
    out["cpu_s"] = cpu.phases
    refusals: list[str] = []
    out["refused_batches"] = refusals
    big = plan.label
    out["rss_mib_empty"] = rss_mib(pids)
    out["rss_mib_empty_controller"] = rss_mib(pids[:1])
    try:
        # -- sequential starts: request -> completion push, one VM at a time
        latencies, accepts = [], []
        for i in range(plan.sequential):
            t0 = time.perf_counter()
            (task,) = await client.start([f"s{i}.seq"], ram=VM_RAM_MIB)
            accepts.append(time.perf_counter() - t0)
            latencies.append(await done.wait([task.id], TASK_TIMEOUT_S) - t0)
        out["start_p50_ms"] = statistics.median(latencies) * 1e3
        out["start_p99_ms"] = _percentile(latencies, 99) * 1e3
        out["start_accept_p50_ms"] = statistics.median(accepts) * 1e3
        cpu.phase("sequential")
        log(f"{plan.sequential} sequential starts: p50 {out['start_p50_ms']:.2f} ms "
            f"(accepted after {out['start_accept_p50_ms']:.2f} ms)")

        # -- 500 VMs: vm.list and ush list
        have = plan.sequential
        have += await _fill(client, done, "f", 500 - have, refusals)
        cpu.phase("fill_500")
        out["settle_500_s"] = await _settle(pids)
        cpu.phase("settle_500")
        out["list_500_all_ms"] = await _time_list(client, plan.list_calls, 500)
        out["list_500_ms"] = statistics.median(out["list_500_all_ms"])
        cpu.phase("list_500")
        ush_s, why = time_ush_list(info)
        out["ush_list_s"] = ush_s
        if why:
            out["ush_list_note"] = why
        cpu.phase("ush_list")
        log(f"500 VMs: vm.list {out['list_500_ms']:.2f} ms, ush list "
            f"{f'{ush_s:.3f} s' if ush_s is not None else why}")

        # -- burst: single-VM starts, all submitted at once on one connection
        await _settle(pids)
        cpu.phase("idle")
        t0 = time.perf_counter()
        accepted = await asyncio.gather(*(client.start([f"{i}.burst"], ram=VM_RAM_MIB)
                                          for i in range(plan.burst)))
        accepted_at = time.perf_counter()
        last = await done.wait([t[0].id for t in accepted], TASK_TIMEOUT_S)
        out["starts_per_s"] = plan.burst / (last - t0)
        cpu.phase("burst")
        out["burst_accept_s"] = accepted_at - t0
        out["burst_total_s"] = last - t0
        have += plan.burst
        log(f"burst of {plan.burst}: {out['starts_per_s']:.0f}/s "
            f"(all accepted after {out['burst_accept_s']:.2f} s)")

        # -- the big site: brace batches up to plan.total VMs
        t0 = time.perf_counter()
        added = await _fill(client, done, "b", plan.total - have, refusals)
        out["fill_per_s"] = added / (time.perf_counter() - t0)
        have += added
        cpu.phase(f"fill_{big}")
        out[f"settle_{big}_s"] = await _settle(pids)
        cpu.phase(f"settle_{big}")
        log(f"{have} VMs: batches of {BATCH} started at {out['fill_per_s']:.0f}/s, "
            f"site busy {out[f'settle_{big}_s']:.1f} s after the last completion")
        out[f"list_{big}_all_ms"] = await _time_list(client, plan.list_calls, plan.total)
        out[f"list_{big}_ms"] = statistics.median(out[f"list_{big}_all_ms"])
        cpu.phase(f"list_{big}")
        out[f"rss_mib_{big}"] = rss_mib(pids)
        out[f"rss_mib_{big}_controller"] = rss_mib(pids[:1])
        log(f"{have} VMs: vm.list {out[f'list_{big}_ms']:.1f} ms, "
            f"RSS {out[f'rss_mib_{big}']:.0f} MiB")
    finally:
        await client.close()
    return out


# =================================================================== reporting
def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3g}" if value < 100 else f"{value:.0f}"
    return str(value)


def table(results: dict[str, Any]) -> str:
    """The results as a text table (metric | value | target | raw floor) and host info."""
    cells = [("metric", "value", "target", "raw floor")]
    for name in rows(results["plan"]["label"]):
        target = TARGETS.get(name)
        floor = FLOORS.get(name)
        cells.append((name, _fmt(results.get(name)),
                      f"{target[0]} {target[1]:g}" if target else "",
                      f"{_fmt(results[floor])} ({floor})" if floor else ""))
    widths = [max(len(r[i]) for r in cells) for i in range(4)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    host = results["host"]
    lines.append("")
    lines.append(f"host: {host['cpus']} cpus, {host['machine']}, Python {host['python']}, "
                 f"libvirt {host['libvirt']}; {host['lnms']} node managers; {host['date']}; "
                 f"load average before {host['loadavg_1m_before']:.2f}; "
                 f"run took {results['elapsed_s']:.0f} s")
    if results.get("ush_list_note"):
        lines.append(f"ush_list_s n/a: {results['ush_list_note']}")
    for refusal in results.get("refused_batches", []):
        lines.append(f"refused and sent again: {refusal}")
    return "\n".join(lines)


def verdicts(results: dict[str, Any]) -> dict[str, bool | None]:
    out: dict[str, bool | None] = {}
    for name, (op, bound) in TARGETS.items():
        value = results.get(name)
        out[name] = None if value is None else (value <= bound if op == "<=" else value >= bound)
    return out


# ======================================================================== main
def _trouble(log_file: Path, limit: int = 25) -> list[str]:
    """A daemon log's distinct warnings, errors and traceback lines, errors first."""
    try:
        lines = log_file.read_text(errors="replace").splitlines()
    except OSError:
        return []
    seen: dict[str, None] = {}
    for line in lines:
        if " INFO " in line or " DEBUG " in line:
            continue
        # Drop the timestamp so a message repeated a thousand times shows once.
        text = line[24:] if line[:4].isdigit() and line[4:5] == "-" else line
        seen.setdefault(text[:300], None)
    ordered = sorted(seen, key=lambda t: 0 if "WARNING" not in t else 1)
    return ordered[:limit]


def _raise_interrupt(_signo: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.controlplane", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="50 sequential starts, a 5,000-VM site (under 60 s)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--lnms", type=int, default=10, help="node managers (default: 10)")
    p.add_argument("--keep", metavar="DIR", help="build the site in DIR and keep it")
    args = p.parse_args(argv)
    plan = plan_for(args)

    def log(text: str) -> None:
        print(f"bench: {text}", file=sys.stderr, flush=True)

    signal.signal(signal.SIGTERM, _raise_interrupt)
    # Other work on the machine shows up in every number; record how busy it was.
    load_before = os.getloadavg()[0]
    began = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if args.keep:
            directory = Path(args.keep)
            directory.mkdir(parents=True, exist_ok=True)
        else:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(
                prefix="usher-bench-")))
        results: dict[str, Any] = raw_floor(directory, plan.sequential)
        log(f"raw libvirt: define+create {results['raw_define_create_ms']:.3f} ms, "
            f"list 500 {results['raw_list_500_ms']:.2f} ms")
        demo, info = build_site(directory / "site", plan.lnms)
        try:
            demo.start(info)
            pids = [proc.pid for proc in demo.procs]
            log(f"site up: controller {pids[0]}, {len(pids) - 1} node managers")
            password = Path(info["password_file"]).read_text().strip()
            results.update(asyncio.run(measure(info, password, pids, plan, log)))
        except UsherError as exc:
            # The site's own account of what went wrong dies with the temp dir.
            log(f"failed: {type(exc).__name__}: {exc.message}")
            for line in _trouble(directory / "site" / "logs" / "controller.log"):
                log(f"controller.log: {line}")
            if args.json:
                print(json.dumps({"error": f"{type(exc).__name__}: {exc.message}"}))
            return 1
        finally:
            # A second Ctrl-C must not cut the teardown short.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            demo.stop()
            signal.signal(signal.SIGINT, signal.default_int_handler)
    results["elapsed_s"] = time.perf_counter() - began
    version = libvirt.getVersion()
    results["host"] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                       "libvirt": f"{version // 1000000}.{version // 1000 % 1000}."
                                  f"{version % 1000}", "lnms": plan.lnms,
                       "machine": platform.machine(), "loadavg_1m_before": load_before,
                       "date": time.strftime("%Y-%m-%d")}
    results["plan"] = dict(dataclasses.asdict(plan), label=plan.label)
    results["targets_met"] = verdicts(results)
    if args.json:
        print(json.dumps(results, sort_keys=True))
    else:
        print(table(results))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
