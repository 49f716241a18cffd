"""``usher-lnm``: the node manager daemon of one host.

::

    usher-lnm [--config PATH] [--hostname NAME]
    usher-lnm --config PATH --fake-host --cpus N --memory MiB [--fake-host-file PATH]
    usher-lnm [--config PATH] libvirt-pki [--pkipath DIR] [--qemu-dir DIR | --no-qemu] [--force]

With ``--fake-host`` the host is a libvirt test-driver host of the given
size, kept in a host file that records its domains and their run states, so a
restarted node manager finds what its host still runs.

``libvirt-pki`` copies the host's site certificate, its key and the site CA to
where libvirt and QEMU read them (see :mod:`usher.lnm.libvirt_pki`), for live
migration over ``qemu+tls://``, and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
from pathlib import Path

from usher import sdnotify
from usher.config import DEFAULT_LNM_CONFIG, LnmConfig, load_toml
from usher.errors import ConfigError, UsherError
from usher.lnm.agent import NodeAgent
from usher.lnm.drivers import make_driver
from usher.lnm.drivers.base import HypervisorDriver
from usher.names import validate_domain

log = logging.getLogger(__name__)


def build_driver(cfg: LnmConfig, hostname: str) -> HypervisorDriver:
    if cfg.driver == "libvirt" and cfg.fake_host_file:
        from usher.lnm.fakehost import FakeHost

        fake = FakeHost.create(Path(cfg.fake_host_file).resolve(), hostname=hostname,
                               cpus=cfg.fake_cpus, memory_mib=cfg.fake_memory_mib,
                               network=(cfg.network, cfg.fake_network)
                               if cfg.fake_network else None)
        return make_driver("libvirt", uri=fake.uri, fake_host=fake, network=cfg.network)
    if cfg.driver == "fake":
        return make_driver("fake", hostname=hostname, cpus=cfg.fake_cpus,
                           memory_mib=cfg.fake_memory_mib)
    if cfg.driver == "libvirt":
        return make_driver("libvirt", uri=cfg.uri, network=cfg.network,
                           domain_type=domain_type_for(cfg))
    return make_driver(cfg.driver, uri=cfg.uri)


def domain_type_for(cfg: LnmConfig) -> str | None:
    """Policy: the libvirt domain type of this host (None: the URI's default).

    ``auto`` on a qemu URI decides by probing, never by assuming: KVM is used
    only if it really boots the tiny test guest here (see :mod:`usher.lnm.kvm`;
    the verdict is cached, so only the first start pays seconds). If the
    probe cannot run (no guest can be built), TCG is the safe choice.

    Raises:
        ConfigError: an unknown ``domain_type``.
    """
    if cfg.domain_type in ("kvm", "qemu"):
        return cfg.domain_type
    if cfg.domain_type != "auto":
        raise ConfigError(f"domain_type = {cfg.domain_type!r}: use auto, kvm or qemu")
    if not cfg.uri.startswith("qemu"):
        return None
    from usher.lnm.kvm import kvm_access_problem, probe_kvm
    from usher.lnm.tinyguest import build_tiny_guest

    problem = kvm_access_problem()
    if problem is not None:
        log.info("domain type qemu (TCG): %s", problem)
        return "qemu"
    try:
        verdict = probe_kvm(build_tiny_guest())
    except UsherError as exc:
        log.warning("cannot probe KVM (%s); using qemu (TCG)", exc.message)
        return "qemu"
    log.info("domain type %s: KVM %s", "kvm" if verdict.usable else "qemu", verdict.reason)
    return "kvm" if verdict.usable else "qemu"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="usher-lnm", description="usher node manager of one host")
    p.add_argument("--config", default=str(DEFAULT_LNM_CONFIG),
                   help="node manager config (default: %(default)s)")
    p.add_argument("--hostname", help="host name to register as")
    p.add_argument("--fake-host", action="store_true",
                   help="drive a libvirt test-driver host of --cpus and --memory")
    p.add_argument("--cpus", type=int, help="fake host: cpus")
    p.add_argument("--memory", type=int, help="fake host: memory in MiB")
    p.add_argument("--fake-host-file", help="fake host: its host file")
    p.add_argument("--log-level", default="INFO")
    commands = p.add_subparsers(dest="command", metavar="COMMAND")
    pki = commands.add_parser(
        "libvirt-pki", help="install this host's certificate for libvirt and QEMU TLS",
        description="Copy the host certificate, its key and the site CA (from the config) "
                    "to libvirt's and QEMU's TLS file locations, for live migration over "
                    "qemu+tls://.")
    pki.add_argument("--pkipath", type=Path,
                     help="one directory for libvirt's five files (as ?pkipath=DIR takes "
                          "them); default: /etc/pki/CA and /etc/pki/libvirt")
    where = pki.add_mutually_exclusive_group()
    where.add_argument("--qemu-dir", type=Path, default=Path("/etc/pki/qemu"),
                       help="QEMU's default_tls_x509_cert_dir (default: %(default)s)")
    where.add_argument("--no-qemu", action="store_true",
                       help="libvirt only (no VIR_MIGRATE_TLS for the migration stream)")
    pki.add_argument("--force", action="store_true",
                     help="replace files that exist with other content")
    return p


def install_libvirt_pki(cfg: LnmConfig, args: argparse.Namespace) -> int:
    """``usher-lnm libvirt-pki``: install and say what was done."""
    from usher.lnm.libvirt_pki import install

    done = install(Path(cfg.ca_cert), Path(cfg.cert), Path(cfg.key), pkipath=args.pkipath,
                   qemu_dir=None if args.no_qemu else args.qemu_dir, force=args.force)
    for path in done.written:
        print(f"wrote {path}")
    if done.unchanged:
        print(f"{len(done.unchanged)} file(s) already up to date")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_toml(LnmConfig, Path(args.config))
        if args.command == "libvirt-pki":
            return install_libvirt_pki(cfg, args)
        changes: dict[str, object] = {}
        if args.hostname:
            changes["hostname"] = validate_domain(args.hostname)
        if args.fake_host:
            changes["driver"] = "libvirt"
            changes["fake_host_file"] = args.fake_host_file or cfg.fake_host_file or str(
                Path(args.config).resolve().parent / "host.xml")
            if args.cpus:
                changes["fake_cpus"] = args.cpus
            if args.memory:
                changes["fake_memory_mib"] = args.memory
        cfg = dataclasses.replace(cfg, **changes)  # type: ignore[arg-type]
        bad = [v for v in cfg.vlans if not 1 <= v <= 4094]
        if bad:
            raise ConfigError(f"{args.config}: vlans {bad} are not VLAN ids (1 to 4094)")
        asyncio.run(_run(cfg, os.environ.get("NOTIFY_SOCKET", "")))
    except UsherError as exc:
        print(f"usher-lnm: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


async def _run(cfg: LnmConfig, notify_socket: str) -> None:
    import libvirtaio

    # libvirt delivers domain events through the asyncio loop; once per process.
    libvirtaio.virEventRegisterAsyncIOImpl()
    agent = NodeAgent(cfg, build_driver(cfg, cfg.hostname or "localhost"))
    if not cfg.hostname:
        agent.hostname = validate_domain(agent.hostname)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = asyncio.create_task(agent.run(stop))
    opened = asyncio.create_task(agent.opened.wait())
    await asyncio.wait({runner, opened}, return_when=asyncio.FIRST_COMPLETED)
    opened.cancel()
    if agent.opened.is_set():
        # Ready once the hypervisor is open; reaching the controller may take
        # longer and is retried in the background (VMs are fine meanwhile).
        sdnotify.notify(notify_socket, "READY=1")
    await runner


if __name__ == "__main__":
    sys.exit(main())
