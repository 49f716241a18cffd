"""A real guest's start through usher against the same guest started with libvirt alone.

On a ``usher demo --hypervisor qemu`` site (one node manager on this machine's
libvirtd, the tiny test guest as image ``tiny``), alternately:

* **usher**: ``ush 'start bK --image tiny'`` as a new process, until the
  guest's READY marker appears in its console log (the node manager's
  ``image_dir/vms/UUID.console.log``, which virtlogd writes);
* **raw**: ``defineXML`` + ``create`` of the same domain XML (built by
  usher's own builder: kernel boot, the demo network, the console log) with
  libvirt-python directly, until the same marker appears in its log.

Each guest is destroyed before the next run, so one guest runs at a time
(under TCG a guest takes a core). The table gives the medians and the ratio
(target: usher within +5 % of raw). Usage::

    .venv/bin/python -m bench.realguest [--runs N] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import uuid as uuidlib
from pathlib import Path
from typing import Any

import libvirt

from bench.controlplane import _raise_interrupt
from tests.e2e.site import Site, wait_for
from usher.config import LnmConfig, load_toml
from usher.lnm.agent import address_parameters
from usher.lnm.domxml import build_domain_xml
from usher.lnm.drivers.base import DomainSpec
from usher.lnm.tinyguest import MARKER, build_tiny_guest

URI = "qemu:///system"
BOOT_TIMEOUT_S = 60.0
RAW_IP = "10.87.255.200"  # in the demo range, never leased by the demo (leases start low)


def _marker_seen(log: Path) -> bool:
    with contextlib.suppress(FileNotFoundError):
        return MARKER.encode() in log.read_bytes()
    return False


def _wait_marker(log: Path, started: float) -> float:
    deadline = started + BOOT_TIMEOUT_S
    while time.perf_counter() < deadline:
        if _marker_seen(log):
            return time.perf_counter() - started
        time.sleep(0.01)
    raise TimeoutError(f"no marker in {log} within {BOOT_TIMEOUT_S:g} s")


def run_usher(site: Site, image_dir: Path, n: int) -> float:
    name = f"b{n}"
    started = time.perf_counter()
    proc = site.ush(f"start {name} --image tiny", timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"ush start failed: {proc.stderr.strip()}")
    [vm] = [v for v in site.client().list_vms() if v.name.startswith(f"{name}.")]
    took = _wait_marker(image_dir / "vms" / f"{vm.uuid}.console.log", started)
    site.ush(f"destroy {name}", timeout=120)
    return took


def run_raw(conn: Any, cfg: LnmConfig, domain_type: str, workdir: Path, n: int) -> float:
    guest = build_tiny_guest()
    uuid = str(uuidlib.uuid4())
    log = workdir / f"raw-{n}.console.log"
    name = f"raw{n}.bench.usher.test"
    spec = DomainSpec(uuid=uuid, name=name, memory_mib=256, vcpus=1,
                      mac=f"52:54:00:fe:{n >> 8 & 255:02x}:{n & 255:02x}", owner="bench",
                      task_id="bench", ip=RAW_IP, ip_prefix=16, gateway="10.87.0.1",
                      kernel=str(guest.kernel), initrd=str(guest.initrd),
                      cmdline=" ".join([guest.cmdline, address_parameters(
                          name, RAW_IP, 16, "10.87.0.1")]),
                      console_log=str(log))
    xml = build_domain_xml(spec, domain_type, network=cfg.network)
    started = time.perf_counter()
    dom = conn.defineXML(xml)
    try:
        dom.create()
        return _wait_marker(log, started)
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            dom.destroy()
        with contextlib.suppress(libvirt.libvirtError):
            dom.undefine()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.realguest", description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=5, help="runs of each kind (default: 5)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    import signal

    signal.signal(signal.SIGTERM, _raise_interrupt)
    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    results: dict[str, Any] = {"load_before": os.getloadavg()[0], "runs": args.runs}
    with tempfile.TemporaryDirectory(prefix="usher-bench-rg-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        work.chmod(0o755)  # virtlogd writes the raw logs; qemu reads nothing here
        site = Site(work / "site", hypervisor="qemu")
        try:
            site.start()
            host = site.hosts[0]
            cfg = load_toml(LnmConfig, Path(host["config"]))
            image_dir = Path(host["image_dir"])
            log_text = (site.dir / "logs" / "lnm-0.log").read_text()
            domain_type = "kvm" if "domain type kvm" in log_text else "qemu"
            conn = libvirt.open(URI)
            try:
                wait_for(lambda: site.client().list_images(), 10, "image tiny")
                usher_s, raw_s = [], []
                for n in range(args.runs):
                    # Alternate, so a slow minute of the machine hits both alike.
                    raw_s.append(run_raw(conn, cfg, domain_type, work, n))
                    usher_s.append(run_usher(site, image_dir, n))
                    print(f"bench: run {n}: raw {raw_s[-1]:.2f} s, usher {usher_s[-1]:.2f} s",
                          file=sys.stderr, flush=True)
            finally:
                conn.close()
        finally:
            site.close()
    results.update(raw_s=raw_s, usher_s=usher_s, domain_type=domain_type,
                   raw_median_s=statistics.median(raw_s),
                   usher_median_s=statistics.median(usher_s))
    results["ratio"] = results["usher_median_s"] / results["raw_median_s"]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"start to READY marker, medians of {args.runs} alternating runs "
              f"(domain type {domain_type}):\n"
              f"  raw libvirt define+create : {results['raw_median_s']:.2f} s\n"
              f"  ush 'start --image tiny'  : {results['usher_median_s']:.2f} s\n"
              f"  ratio                     : {results['ratio']:.3f} (target <= 1.05)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
