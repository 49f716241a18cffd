"""Several libvirtd "hosts" on one machine, for live-migration tests.

Each host is a libvirtd (with its virtlogd) in its own network, mount and UTS
namespace, as ``reference/platform-notes.md`` describes:

* An *anchor* process (``sleep infinity``, started and stopped by us, by PID)
  holds the host's namespaces. Its mount namespace bind-mounts private copies
  of /etc/libvirt, /run/libvirt, /var/lib/libvirt, /var/cache/libvirt and
  /var/log/libvirt over the real ones, and the host's private image store over
  one path that is the same on every host (:attr:`HostCluster.store_path`), as
  a site's hosts all keep their store at the same place. With
  ``shared_store=True`` every host mounts one GlusterFS volume there instead
  (:mod:`.gluster`): one store that all hosts share. Everything else runs
  inside through ``nsenter -t ANCHOR``.
* Each libvirtd has its own ``host_uuid`` (libvirt will not migrate to "the same
  host"), listens on TCP on its own address without authentication (tests
  only) and on TLS with a host certificate of a site CA made here, laid out by
  the product's ``usher-lnm libvirt-pki`` code (:attr:`TestHost.tls_uri`), runs
  QEMU as root without cgroups, dynamic ownership or a security driver, and
  tells QEMU to take migrations on its own address.
* A switch namespace holds a bridge; a veth pair joins it to a bridge inside
  each host that carries the host's address. A libvirt network on every host
  (:data:`NETWORK`) puts guests on that bridge, so all guests and hosts share
  one L2 segment and a guest keeps its address on whichever host runs it.

Network safety: the test subnet exists only inside namespaces created here;
packets are sent only from inside them (the switch namespace's :meth:`client`
checks that the route to the address is our bridge first). Nothing is ever
sent from the root namespace. Every namespace and link is named with
:data:`PREFIX` (``ushm<pid>-``) and only those are deleted.

From the root namespace each libvirtd answers on its unix socket, which lies
inside the host's private /run/libvirt copy (:attr:`TestHost.uri`).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid as uuidlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import libvirt

from tests.e2e.realguest.gluster import GlusterVolume
from usher.lnm.kvm import fix_kvm_permissions
from usher.lnm.libvirt_pki import install as install_pki
from usher.protocol.pki import SitePki, issue_host_cert_files, write_site_pki

log = logging.getLogger(__name__)

PREFIX = f"ushm{os.getpid()}-"
"""Prefix of every namespace and link these tests create (and the only ones they delete)."""

SUBNET = ipaddress.IPv4Network("10.213.77.0/24")
"""The test segment. Not on this machine (checked at start); never 192.0.2.0/24."""

CLIENT_IP = SUBNET[250]
"""The switch namespace's own address: where test traffic to guests comes from."""

NETWORK = "usher-seg"
"""The libvirt network, on every host, that puts guests on the shared segment."""

LIBVIRT_PORT = 16509
LIBVIRT_TLS_PORT = 16514
PKI_DIR = "/etc/libvirt/pki"
"""Inside each host (its private /etc/libvirt): libvirt's TLS files, one directory."""
QEMU_PKI_DIR = "/etc/libvirt/pki-qemu"
"""Inside each host: QEMU's TLS files (``default_tls_x509_cert_dir``)."""

_ROUTE_TYPES = frozenset({"unicast", "local", "broadcast", "multicast", "unreachable",
                          "blackhole", "prohibit", "throw", "nat", "anycast"})

_PRIVATE_DIRS = {
    "etc": Path("/etc/libvirt"),
    "run": Path("/run/libvirt"),
    "lib": Path("/var/lib/libvirt"),
    "cache": Path("/var/cache/libvirt"),
    "log": Path("/var/log/libvirt"),
}

# Measured: a libvirtd with a warm capabilities cache answers in ~0.1-0.5 s;
# a cold one probes QEMU for 8-12 s. Bounds leave room for a loaded machine.
DAEMON_START_TIMEOUT_S = 30.0
DAEMON_STOP_TIMEOUT_S = 10.0
COMMAND_TIMEOUT_S = 30.0

_T = TypeVar("_T")


class HostSetupError(RuntimeError):
    """The multi-host harness could not build or run something (not a product error)."""


def _run(argv: Sequence[str], *, timeout_s: float = COMMAND_TIMEOUT_S,
         check: bool = True, input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s,
                              input=input_text, stdin=None if input_text else subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        raise HostSetupError(f"{' '.join(argv)} took longer than {timeout_s:g} s") from e
    if check and proc.returncode != 0:
        raise HostSetupError(f"{' '.join(argv)} failed (exit {proc.returncode}): "
                             f"{proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks (tells a reused PID from ours)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[19])


def _alive(pid: int, start_time: int | None = None) -> bool:
    """True while ``pid`` runs (a zombie waiting for PID 1 to reap it counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return False
    return start_time is None or int(fields[19]) == start_time


def _stop_pid(pid: int, start_time: int | None, timeout_s: float, what: str) -> bool:
    """SIGTERM, then SIGKILL at half the budget; True once the process is gone."""
    if not _alive(pid, start_time):
        return True
    deadline = time.monotonic() + timeout_s
    for sig, until in ((signal.SIGTERM, time.monotonic() + timeout_s / 2),
                       (signal.SIGKILL, deadline)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        while time.monotonic() < until:
            if not _alive(pid, start_time):
                return True
            time.sleep(0.05)
        log.warning("%s (pid %d) still alive after %s", what, pid, sig.name)
    return not _alive(pid, start_time)


def _bounded(fn: Callable[[], _T], timeout_s: float, what: str) -> _T:
    """Run a libvirt call that has no timeout of its own; give up after ``timeout_s``."""
    result: list[_T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as e:  # re-raised in the caller's thread
            error.append(e)

    thread = threading.Thread(target=run, name=f"bounded {what}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise HostSetupError(f"{what} did not answer within {timeout_s:g} s")
    if error:
        raise error[0]
    return result[0]


@dataclass
class TestHost:
    """One libvirtd host in its namespaces; paths are as the root namespace sees them."""

    __test__ = False  # not a pytest test class

    index: int
    name: str               # host name inside its UTS namespace (and its netns name's tail)
    netns: str
    ip: str
    root: Path              # this host's private files: etc/, run/, lib/, cache/, log/, store/
    store_path: Path        # where the host (and its QEMU) sees its image store
    host_uuid: str = field(default_factory=lambda: str(uuidlib.uuid4()))
    shared: bool = False    # its store is the cluster's GlusterFS volume, not its own
    anchor: subprocess.Popen[bytes] | None = None
    daemons: dict[str, tuple[int, int | None]] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        """The root namespace's libvirt URI for this host (its unix socket)."""
        return f"qemu+unix:///system?socket={self.root / 'run' / 'libvirt-sock'}"

    @property
    def tcp_uri(self) -> str:
        """The URI other hosts use to reach this one (plain TCP: tests only)."""
        return f"qemu+tcp://{self.ip}/system"

    @property
    def tls_uri(self) -> str:
        """The URI other hosts use to reach this one over TLS (site certificates)."""
        return f"qemu+tls://{self.ip}/system?pkipath={PKI_DIR}"

    @property
    def store_dir(self) -> Path:
        """This host's image store as the root namespace sees it."""
        if self.shared:  # a mount only the host's mount namespace has
            assert self.anchor is not None
            return Path(f"/proc/{self.anchor.pid}/root") / self.store_path.relative_to("/")
        return self.root / "store"

    def outside(self, inside: str | Path) -> Path:
        """The root namespace's path for a path in this host's image store."""
        rel = Path(inside).relative_to(self.store_path)
        return self.store_dir / rel

    # -- running things inside ---------------------------------------------------

    def nsenter(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed to run in this host's network, mount and UTS namespaces."""
        if self.anchor is None or self.anchor.poll() is not None:
            raise HostSetupError(f"host {self.name} has no namespace anchor")
        return ["nsenter", "-t", str(self.anchor.pid), "-m", "-u", "-n", "--", *argv]

    def run(self, argv: Sequence[str], *, timeout_s: float = COMMAND_TIMEOUT_S,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run(self.nsenter(argv), timeout_s=timeout_s, check=check)

    def store(self, op: str, timeout_s: float = COMMAND_TIMEOUT_S, **args: Any) -> Any:
        """Run one :class:`~usher.lnm.images.ImageStore` call inside the host; its JSON result.

        Inside, because overlays record their base's path as the host sees it.
        """
        request = json.dumps({"op": op, "root": str(self.store_path), **args})
        proc = self.run([sys.executable, "-c", _STORE_HELPER, request], timeout_s=timeout_s,
                        check=False)
        if proc.returncode != 0:
            raise HostSetupError(f"image store {op} on {self.name} failed: "
                                 f"{proc.stderr.strip()}")
        return json.loads(proc.stdout)

    # -- daemons ------------------------------------------------------------------

    def libvirtd_running(self) -> bool:
        entry = self.daemons.get("libvirtd")
        return entry is not None and _alive(*entry)

    def start_daemons(self, timeout_s: float = DAEMON_START_TIMEOUT_S) -> None:
        """Start virtlogd and libvirtd inside the host; wait until libvirtd answers."""
        deadline = time.monotonic() + timeout_s
        for name, argv in (("virtlogd", ["virtlogd", "-d", "-p", "/run/libvirt/virtlogd.pid"]),
                           ("libvirtd", ["libvirtd", "-d", "--listen",
                                         "-p", "/run/libvirt/libvirtd.pid"])):
            entry = self.daemons.get(name)
            if entry is not None and _alive(*entry):
                continue
            pid_file = self.root / "run" / f"{name}.pid"
            pid_file.unlink(missing_ok=True)
            self.run(argv, timeout_s=max(1.0, deadline - time.monotonic()))
            while True:  # -d returns once the daemon forked; its pid file follows
                try:
                    pid = int(pid_file.read_text().split()[0])
                except (OSError, ValueError, IndexError):
                    pid = 0
                if pid and _alive(pid):
                    self.daemons[name] = (pid, _start_time(pid))
                    break
                if time.monotonic() >= deadline:
                    raise HostSetupError(f"{name} on {self.name} wrote no live pid; see "
                                         f"{self.root / 'log'}")
                time.sleep(0.02)
        while True:
            try:
                self.call(lambda conn: conn.getCapabilities(),
                          timeout_s=max(0.5, deadline - time.monotonic()))
                return
            except (libvirt.libvirtError, HostSetupError) as e:
                if not self.libvirtd_running():
                    raise HostSetupError(f"libvirtd on {self.name} exited: see "
                                         f"{self.root / 'log' / 'libvirtd.log'}") from e
                if time.monotonic() >= deadline:
                    raise HostSetupError(f"libvirtd on {self.name} did not answer within "
                                         f"{timeout_s:g} s: {e}") from e
                time.sleep(0.05)

    def stop_daemon(self, name: str, timeout_s: float = DAEMON_STOP_TIMEOUT_S) -> None:
        """Stop ``name`` (libvirtd or virtlogd) by the PID recorded when we started it."""
        entry = self.daemons.pop(name, None)
        if entry is not None and not _stop_pid(entry[0], entry[1], timeout_s,
                                               f"{name} on {self.name}"):
            raise HostSetupError(f"{name} on {self.name} (pid {entry[0]}) did not stop")

    def kill_daemon(self, name: str, timeout_s: float = DAEMON_STOP_TIMEOUT_S) -> int:
        """SIGKILL ``name`` by its recorded PID, as a crash would; returns that PID.

        Its QEMU processes live on (libvirtd does not own them);
        :meth:`start_daemons` starts it again, and it takes them back.
        """
        entry = self.daemons.pop(name, None)
        if entry is None or not _alive(*entry):
            raise HostSetupError(f"{name} on {self.name} is not running")
        pid, start = entry
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout_s
        while _alive(pid, start):
            if time.monotonic() >= deadline:
                raise HostSetupError(f"{name} on {self.name} (pid {pid}) survived SIGKILL")
            time.sleep(0.02)
        return pid

    def call(self, fn: Callable[[libvirt.virConnect], _T], timeout_s: float = 10.0) -> _T:
        """Run ``fn`` on a fresh connection to this host's libvirtd, bounded."""
        def run() -> _T:
            conn = libvirt.open(self.uri)
            try:
                return fn(conn)
            finally:
                conn.close()
        return _bounded(run, timeout_s, f"libvirtd on {self.name}")

    def qemu_pids(self) -> list[tuple[int, int | None]]:
        """The QEMU processes this host's libvirtd started (from its pid files)."""
        found = []
        for pid_file in (self.root / "run" / "qemu").glob("*.pid"):
            try:
                pid = int(pid_file.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            if comm.startswith("qemu"):
                found.append((pid, _start_time(pid)))
        return found


# Runs in the switch namespace: GET a URL, print the body; exit 1 on any failure.
_HTTP_GET = r"""
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])) as reply:
        sys.stdout.write(reply.read().decode(errors="replace"))
except OSError as e:
    sys.exit(f"GET {sys.argv[1]}: {e}")
"""

# Runs inside a host's mount namespace: one ImageStore call, JSON on stdout.
_STORE_HELPER = r"""
import json, sys
from pathlib import Path
from usher.lnm.images import Artifact, ImageStore
req = json.loads(sys.argv[1])
store = ImageStore(Path(req["root"]))
op = req["op"]
if op == "overlay":
    a = Artifact(**req["artifact"])
    out = str(store.overlay(req["uuid"], store.base(a), a.format))
elif op == "prepare_incoming":
    a = Artifact(**req["artifact"])
    out = str(store.prepare_incoming(req["uuid"], store.base(a), a.format, req["size"]))
elif op == "overlay_size":
    out = store.overlay_size(req["uuid"])
elif op == "remove_overlay":
    out = store.remove_overlay(req["uuid"])
else:
    raise SystemExit(f"unknown op {op}")
print(json.dumps(out))
"""


class HostCluster:
    """``count`` libvirtd hosts on one segment; a context manager that removes all it made.

    Setup failures and test failures alike end in :meth:`close`, which destroys
    the hosts' guests, stops every process started here by PID and deletes
    only the namespaces named with :data:`PREFIX`.
    """

    def __init__(self, count: int, *, base_dir: Path | None = None,
                 shared_store: bool = False) -> None:
        if not 1 <= count <= 9:
            raise ValueError("between 1 and 9 hosts")
        self.count = count
        self.shared_store = shared_store
        self.base = Path(tempfile.mkdtemp(prefix=PREFIX, dir=base_dir or "/var/tmp"))
        self.base.chmod(0o755)
        self.store_path = self.base / "store"  # empty here; each host mounts its own over it
        self.switch = f"{PREFIX}sw"
        self.bridge = f"{PREFIX}br"
        self.hosts: list[TestHost] = []
        self._namespaces: list[str] = []
        self.pki: SitePki | None = None  # the site CA of the hosts' certificates
        self.gluster: GlusterVolume | None = None  # the shared store's server, if any

    def __enter__(self) -> HostCluster:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- building ----------------------------------------------------------------

    def start(self) -> None:
        for name in [self.switch, self.bridge, f"{PREFIX}h9", f"{PREFIX}up"]:
            if len(name) > 15:
                raise HostSetupError(f"link name {name} is longer than 15 characters")
        self._check_subnet_unused()
        fix_kvm_permissions()  # or every libvirtd re-probes QEMU on every call
        self.store_path.mkdir()
        self.pki = write_site_pki(self.base / "pki", site="usher.test",
                                  controller_names=["localhost"])
        self._add_netns(self.switch)
        self._ip(self.switch, "link", "add", self.bridge, "address", _bridge_mac(0),
                 "type", "bridge", "stp_state", "0", "forward_delay", "0")
        self._ip(self.switch, "addr", "add", f"{CLIENT_IP}/{SUBNET.prefixlen}",
                 "dev", self.bridge)
        self._ip(self.switch, "link", "set", self.bridge, "up")
        self._ip(self.switch, "link", "set", "lo", "up")
        if self.shared_store:
            self.gluster = GlusterVolume(self.switch, str(CLIENT_IP), self.base / "gluster")
            self.gluster.start()
        cache_seed = Path("/var/cache/libvirt")
        for index in range(1, self.count + 1):
            host = self._make_host(index, cache_seed)
            self.hosts.append(host)
            if self.gluster is not None:
                assert host.anchor is not None
                self.gluster.mount(host.anchor.pid, self.store_path,
                                   pid_file=Path("/run/libvirt/glusterfs.pid"),
                                   pid_file_outside=host.root / "run" / "glusterfs.pid",
                                   log_file=Path("/var/log/libvirt/glusterfs.log"))
            host.start_daemons()
            host.call(self._define_network)
            # The next host starts from this one's warm QEMU capabilities cache.
            cache_seed = host.root / "cache"

    def _check_subnet_unused(self) -> None:
        """Refuse a test subnet that overlaps anything this machine routes itself."""
        if SUBNET.overlaps(ipaddress.IPv4Network("192.0.2.0/24")):
            raise HostSetupError("192.0.2.0/24 is this machine's own subnet")
        routes = _run(["ip", "-4", "-o", "route", "show", "table", "all"]).stdout
        for line in routes.splitlines():
            words = line.split()
            dest = words[1] if words[0] in _ROUTE_TYPES and len(words) > 1 else words[0]
            if dest == "default":
                continue
            try:
                network = ipaddress.IPv4Network(dest, strict=False)
            except ValueError:
                continue
            if network.overlaps(SUBNET):
                raise HostSetupError(f"test subnet {SUBNET} overlaps route {line.strip()}")

    def _make_host(self, index: int, cache_seed: Path) -> TestHost:
        name = f"h{index}"
        host = TestHost(index=index, name=name, netns=f"{PREFIX}{name}",
                        ip=str(SUBNET[index]), root=self.base / name,
                        store_path=self.store_path, shared=self.shared_store)
        for sub in _PRIVATE_DIRS:
            (host.root / sub).mkdir(parents=True)
        (host.root / "store").mkdir()
        (host.root / "store").chmod(0o755)
        self._write_config(host)
        if cache_seed.is_dir():
            shutil.copytree(cache_seed, host.root / "cache", dirs_exist_ok=True)
        # Network: a veth from the switch's bridge to a bridge inside the host
        # that carries the host's address (guests' taps join it too).
        self._add_netns(host.netns)
        uplink, sw_port, br = f"{PREFIX}up", f"{PREFIX}h{index}", self.bridge
        self._ip(self.switch, "link", "add", sw_port, "type", "veth", "peer", "name", uplink,
                 "netns", host.netns)
        self._ip(self.switch, "link", "set", sw_port, "master", self.bridge, "up")
        self._ip(host.netns, "link", "add", br, "address", _bridge_mac(index), "type",
                 "bridge", "stp_state", "0", "forward_delay", "0")
        self._ip(host.netns, "link", "set", uplink, "master", br, "up")
        self._ip(host.netns, "addr", "add", f"{host.ip}/{SUBNET.prefixlen}", "dev", br)
        self._ip(host.netns, "link", "set", br, "up")
        self._ip(host.netns, "link", "set", "lo", "up")
        self._start_anchor(host)
        return host

    def _write_config(self, host: TestHost) -> None:
        etc = host.root / "etc"
        shutil.copytree("/etc/libvirt", etc, dirs_exist_ok=True)
        # Only the nwfilter definitions and daemon configs matter: no domains,
        # networks or pools of the machine's own libvirtd come along.
        for sub in ("qemu", "storage", "secrets"):
            shutil.rmtree(etc / sub, ignore_errors=True)
        # The host's certificate for its address, as usher-lnm libvirt-pki lays it out.
        assert self.pki is not None
        cert, key = issue_host_cert_files(self.pki, host.ip, host.root / "host-cert")
        install_pki(self.pki.ca_cert, cert, key, pkipath=etc / "pki", qemu_dir=etc / "pki-qemu",
                    qemu_group=None)
        (etc / "libvirtd.conf").write_text(
            f'host_uuid = "{host.host_uuid}"\n'
            "listen_tls = 1\n"
            f'tls_port = "{LIBVIRT_TLS_PORT}"\n'
            f'ca_file = "{PKI_DIR}/cacert.pem"\n'
            f'cert_file = "{PKI_DIR}/servercert.pem"\n'
            f'key_file = "{PKI_DIR}/serverkey.pem"\n'
            "listen_tcp = 1\n"
            f'listen_addr = "{host.ip}"\n'
            f'tcp_port = "{LIBVIRT_PORT}"\n'
            # Tests only: production migrates over TLS with site-CA host certificates.
            'auth_tcp = "none"\n'
            'auth_unix_rw = "none"\n'
            'auth_unix_ro = "none"\n'
            # USHER_TEST_LIBVIRTD_LOG_FILTERS (e.g. "1:rpc 1:remote") adds
            # libvirt's debug output of those parts, for reading a failure.
            f'log_filters = "{os.environ.get("USHER_TEST_LIBVIRTD_LOG_FILTERS", "")}"\n'
            f'log_outputs = "{"1" if os.environ.get("USHER_TEST_LIBVIRTD_LOG_FILTERS") else "3"}'
            ':file:/var/log/libvirt/libvirtd.log"\n')
        (etc / "qemu.conf").write_text(
            'user = "root"\n'
            'group = "root"\n'
            "dynamic_ownership = 0\n"
            "remember_owner = 0\n"
            'security_driver = "none"\n'
            # The hosts share one cgroupfs: cgroups would collide.
            "cgroup_controllers = [ ]\n"
            f'migration_address = "{host.ip}"\n'
            f'migration_host = "{host.ip}"\n'
            f'default_tls_x509_cert_dir = "{QEMU_PKI_DIR}"\n'
            "default_tls_x509_verify = 1\n")

    def _start_anchor(self, host: TestHost) -> None:
        mounts = [(host.root / sub, target) for sub, target in _PRIVATE_DIRS.items()]
        if not host.shared:
            mounts.append((host.root / "store", self.store_path))
        script = "set -e\n" + f"hostname {host.name}\n" + "".join(
            f"mount --bind '{src}' '{dst}'\n" for src, dst in mounts) + "echo anchored\n" \
            "exec sleep infinity\n"
        host.anchor = subprocess.Popen(
            ["ip", "netns", "exec", host.netns, "unshare", "--mount", "--uts",
             "--propagation", "private", "sh", "-c", script],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert host.anchor.stdout is not None
        ready, _, _ = select.select([host.anchor.stdout], [], [], 10.0)
        line = host.anchor.stdout.readline() if ready else b""
        if line.strip() != b"anchored":
            err = host.anchor.stderr.read().decode() if host.anchor.poll() is not None \
                and host.anchor.stderr else ""
            raise HostSetupError(f"namespaces of {host.name} not ready: {err or 'no answer'}")

    def _define_network(self, conn: libvirt.virConnect) -> None:
        net = conn.networkDefineXML(
            f"<network><name>{NETWORK}</name><forward mode='bridge'/>"
            f"<bridge name='{self.bridge}'/></network>")
        net.setAutostart(1)
        net.create()

    def _add_netns(self, name: str) -> None:
        if not name.startswith(PREFIX):
            raise HostSetupError(f"refusing to create namespace {name} without {PREFIX}")
        _run(["ip", "netns", "add", name])
        self._namespaces.append(name)

    @staticmethod
    def _ip(netns: str, *args: str) -> None:
        _run(["ip", "-n", netns, *args])

    # -- using -------------------------------------------------------------------

    def client(self, argv: Sequence[str], *, address: str,
               timeout_s: float = 10.0) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the switch namespace to reach ``address`` on the test segment.

        Checks first that the route to ``address`` is our bridge, so nothing
        could ever leave the machine.
        """
        route = _run(["ip", "-n", self.switch, "route", "get", address]).stdout
        if f"dev {self.bridge}" not in route:
            raise HostSetupError(f"route to {address} is not our bridge: {route.strip()}")
        return _run(["ip", "netns", "exec", self.switch, *argv], timeout_s=timeout_s,
                    check=False)

    def http_get(self, address: str, timeout_s: float = 5.0) -> str | None:
        """The body at ``http://address/`` fetched from the switch namespace, or None."""
        # Python, not busybox wget: the static busybox's wget crashes here.
        proc = self.client([sys.executable, "-I", "-S", "-c", _HTTP_GET, f"http://{address}/",
                            str(timeout_s)], address=address, timeout_s=timeout_s + 5)
        return proc.stdout if proc.returncode == 0 else None

    def diagnostics(self, lines: int = 15) -> str:
        """Each host's libvirtd (alive or not) and the tail of its log: for failure messages."""
        parts = []
        for host in self.hosts:
            state = "running" if host.libvirtd_running() else "NOT RUNNING"
            try:
                tail = (host.root / "log" / "libvirtd.log").read_text(
                    errors="replace").splitlines()[-lines:]
            except OSError as e:
                tail = [f"(no log: {e})"]
            net = [_run(["ip", "-n", host.netns, *argv], check=False).stdout.strip()
                   for argv in (["-br", "link", "show", "master", self.bridge],
                                ["-br", "link", "show", self.bridge], ["neigh"])]
            parts.append(f"--- {host.name} ({host.ip}): libvirtd {state}\n" + "\n".join(tail)
                         + "\n" + "\n".join(net))
        return "\n".join(parts)

    # -- tearing down -------------------------------------------------------------

    def close(self) -> None:
        """Remove everything :meth:`start` made; never raises for a step that fails."""
        problems: list[str] = []

        def step(what: str, fn: Callable[[], object]) -> None:
            try:
                fn()
            except Exception as e:  # keep tearing down; report at the end
                log.warning("teardown: %s failed: %s", what, e)
                problems.append(f"{what}: {e}")

        for host in self.hosts:
            if host.libvirtd_running():
                step(f"destroy guests on {host.name}", lambda h=host: h.call(_destroy_all))
            for pid, start in host.qemu_pids():
                step(f"stop qemu {pid} of {host.name}",
                     lambda p=pid, s=start, h=host: _stop_pid(p, s, 10.0, f"qemu on {h.name}"))
            for name in ("libvirtd", "virtlogd"):
                step(f"stop {name} on {host.name}", lambda n=name, h=host: h.stop_daemon(n))
        if self.gluster is not None:  # its clients need the hosts' namespaces: first
            gluster = self.gluster
            step("stop GlusterFS", lambda: problems.extend(gluster.close()))
            self.gluster = None
        for host in self.hosts:
            if host.anchor is not None:
                anchor = host.anchor
                step(f"stop anchor of {host.name}",
                     lambda a=anchor: _stop_popen(a))
        for name in reversed(self._namespaces):
            step(f"delete netns {name}", lambda n=name: _run(["ip", "netns", "del", n]))
        self._namespaces.clear()
        keep = os.environ.get("USHER_TEST_KEEP_HOST_LOGS")
        if keep:  # for a failure to be read afterwards
            for host in self.hosts:
                shutil.copytree(host.root / "log", Path(keep) / f"{self.base.name}-{host.name}",
                                dirs_exist_ok=True)
        shutil.rmtree(self.base, ignore_errors=True)
        if problems:
            log.warning("teardown left problems: %s", "; ".join(problems))


def _bridge_mac(index: int) -> str:
    """A fixed, locally administered MAC for bridge ``index`` (0: the switch).

    A bridge whose MAC was never set takes its lowest port's and changes it
    when a lower one joins: a guest's tap could then move the host's address
    to a new MAC while the other hosts' ARP caches keep the old one, and
    their traffic to it would be dropped until those entries expire (about
    30 s: a migration's connection dies of keepalive timeouts meanwhile).
    """
    return f"02:75:73:68:00:{index:02x}"


def _destroy_all(conn: libvirt.virConnect) -> None:
    for dom in conn.listAllDomains():
        if dom.isActive():
            dom.destroy()
        if dom.isPersistent():
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)


def _stop_popen(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
