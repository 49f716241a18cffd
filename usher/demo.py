"""``usher demo``: a whole local site in the foreground, for trying usher out.

It initialises a site in DIR (config, CA, SQLite database), starts a
throwaway slapd (Debian's slapd, with usher's schema and ACLs) holding the
site directory, adds a demo user (an Usher user, who logs in to ush with the
directory password) and the site admin, starts the controller and N node
managers on fake hosts of different sizes (libvirt test-driver host files in
DIR), waits until every host has registered, then writes ``DIR/ush.config``
(mode 600: it holds the password), ``DIR/usertools.config`` (for the
``usher_*`` tools) and ``DIR/demo.json``, and runs until SIGINT or SIGTERM,
when it stops every process it started, by PID, and waits for each.

Running it again on the same DIR keeps the site: the database, the users and
the fake hosts with their domains.

VMs get addresses from the IP range ``demo`` (:data:`DEMO_RANGE`, the
default range) and names in the controller's embedded DNS server, whose
address is ``dns`` in ``demo.json``: ``dig @127.0.0.1 -p PORT NAME``.
``addresses=False`` leaves both out (the control-plane benchmark compares).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from usher.config import (
    ControllerConfig,
    LnmConfig,
    ToolsConfig,
    UshConfig,
    load_toml,
    to_toml,
)
from usher.directory.client import Directory
from usher.directory.layout import Layout
from usher.directory.slapd import Slapd
from usher.dns.named import free_port
from usher.errors import ConfigError, Unavailable
from usher.protocol.pki import SitePki, issue_host_cert_files

SITE = "usher.test"
USER = "seuss"
HOST_SIZES = [(4, 8192), (8, 16384), (16, 32768), (2, 4096)]
DEMO_RANGE = "10.87.0.0/16"
QEMU_URI = "qemu:///system"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(argv: list[str], stdin: str | None = None) -> None:
    proc = subprocess.run(argv, input=stdin, text=True, capture_output=True)
    if proc.returncode != 0:
        raise Unavailable(f"{' '.join(argv[2:4])} failed: {proc.stderr.strip()}")


class Demo:
    def __init__(self, directory: Path, lnms: int, port: int | None, *,
                 addresses: bool = True, hypervisor: str = "fake") -> None:
        if hypervisor not in ("fake", "qemu"):
            raise ConfigError(f"--hypervisor {hypervisor}: use fake or qemu")
        self.dir = directory.resolve()
        # One libvirtd on this machine: with real guests the site has one VMM.
        self.lnms = 1 if hypervisor == "qemu" else lnms
        self.port = port
        self.addresses = addresses
        self.hypervisor = hypervisor
        self.procs: list[subprocess.Popen[bytes]] = []
        self.slapd: Slapd | None = None

    def setup(self) -> dict[str, object]:
        d = self.dir
        (d / "logs").mkdir(parents=True, exist_ok=True)
        config = d / "controller.toml"
        py = sys.executable
        if not config.exists():
            port = self.port or _free_port()
            _run([py, "-m", "usher.controller.cli", "--config", str(config), "init",
                  "--site", SITE, "--state-dir", str(d / "state"),
                  "--listen", f"127.0.0.1:{port}"])
            cfg = load_toml(ControllerConfig, config)
            cfg.heartbeat_s, cfg.host_lost_after_s = 2.0, 6.0
            if self.addresses:
                _run([py, "-m", "usher.controller.cli", "--config", str(config), "range",
                      "add", "demo", DEMO_RANGE, "--default"])
                cfg.dns, cfg.dns_listen = "embedded", f"127.0.0.1:{free_port()}"
            config.write_text(to_toml(cfg))
        cfg = load_toml(ControllerConfig, config)
        secret = d / "state" / f"{USER}.password"
        if not secret.exists():
            password = secrets.token_urlsafe(12)
            _run([py, "-m", "usher.controller.cli", "--config", str(config), "user", "add",
                  USER], stdin=password + "\n")
            secret.touch(mode=0o600)
            secret.write_text(password + "\n")
        password = secret.read_text().strip()
        directory = self._directory(cfg, config, password)
        cfg = load_toml(ControllerConfig, config)
        pki = SitePki(ca_cert=Path(cfg.ca_cert), ca_key=Path(cfg.ca_key),
                          controller_cert=Path(cfg.cert), controller_key=Path(cfg.key))
        if self.hypervisor == "qemu":
            return self._qemu_site(cfg, config, pki, password, secret, directory)
        hosts = []
        for i in range(1, self.lnms + 1):
            name = f"vmm{i}.{SITE}"
            hdir = d / "hosts" / name
            hdir.mkdir(parents=True, exist_ok=True)
            cert, key = hdir / "host.crt", hdir / "host.key"
            if not cert.exists():
                cert, key = issue_host_cert_files(pki, name, hdir)
            cpus, mem = HOST_SIZES[(i - 1) % len(HOST_SIZES)]
            lcfg = LnmConfig(controller_host="127.0.0.1", controller_port=cfg.listen_port,
                             controller_name="localhost", ca_cert=cfg.ca_cert, cert=str(cert),
                             key=str(key), hostname=name, driver="libvirt",
                             fake_host_file=str(hdir / "host.xml"), fake_cpus=cpus,
                             fake_memory_mib=mem, backoff_max_s=5.0,
                             image_dir=str(hdir / "images"),
                             network="usher" if self.addresses else "default",
                             fake_network=DEMO_RANGE if self.addresses else "")
            (hdir / "lnm.toml").write_text(to_toml(lcfg))
            hosts.append({"name": name, "cpus": cpus, "memory_mib": mem,
                          "uri": f"test://{hdir / 'host.xml'}", "config": str(hdir / "lnm.toml")})
        return self._info(cfg, config, password, secret, directory, hosts)

    def _info(self, cfg: ControllerConfig, config: Path, password: str, secret: Path,
              directory: dict[str, str], hosts: list[dict[str, Any]]) -> dict[str, object]:
        d = self.dir
        ush = UshConfig(controller=f"localhost:{cfg.listen_port}", ca_cert=cfg.ca_cert,
                        user=USER, password=password,
                        history_file=str(d / "ush_history"))
        ush_path = d / "ush.config"
        ush_path.touch(mode=0o600)
        os.chmod(ush_path, 0o600)
        ush_path.write_text(to_toml(ush))
        tools_path = d / "usertools.config"
        tools_path.write_text(to_toml(ToolsConfig(ldap_url=cfg.ldap_url, site_domain=SITE,
                                                  cluster=f"{USER}.{SITE}", user=USER)))
        return {"site_domain": SITE, "user": USER, "user_domain": f"{USER}.{SITE}",
                "hypervisor": self.hypervisor,
                "directory": directory, "usertools_config": str(tools_path),
                "password_file": str(secret), "ush_config": str(ush_path),
                "controller": {"address": f"127.0.0.1:{cfg.listen_port}",
                               "config": str(config), "database": cfg.database_url,
                               "ca_cert": cfg.ca_cert},
                "dns": cfg.dns_listen if cfg.dns == "embedded" else None,
                "hosts": hosts, "services": {"controller": f"127.0.0.1:{cfg.listen_port}",
                                             "ldap": cfg.ldap_url}}

    def _qemu_site(self, cfg: ControllerConfig, config: Path, pki: SitePki, password: str,
                   secret: Path, directory: dict[str, str]) -> dict[str, object]:
        """One node manager on this machine's libvirtd, real guests, image ``tiny``.

        Starts libvirtd if it is not running, builds (or finds) the tiny test
        guest, gives VMs the isolated libvirt network ``usher-demo`` on the
        demo's IP range (DHCP; nothing is forwarded off the machine) and
        registers the guest's kernel and initrd as image ``tiny`` (again on
        every run, so a rebuilt guest is picked up).
        """
        from usher.lnm.libvirtd import ensure_libvirtd
        from usher.lnm.tinyguest import build_tiny_guest, unreachable_ancestor

        ensure_libvirtd()
        guest = build_tiny_guest()
        network = ""
        if self.addresses:
            network = "usher-demo"
            _ensure_network(network, DEMO_RANGE)
        # qemu runs as libvirt-qemu: its disks must be reachable from /.
        images = self.dir / "images"
        if unreachable_ancestor(self.dir) is not None:
            digest = hashlib.sha256(str(self.dir).encode()).hexdigest()[:12]
            images = Path("/var/lib/usher/demo") / digest / "images"
        py = sys.executable
        ctl = [py, "-m", "usher.controller.cli", "--config", str(config), "image"]
        with contextlib.suppress(Unavailable):
            _run([*ctl, "del", "tiny"])
        _run([*ctl, "add", "tiny", "--kernel", f"file://{guest.kernel}", "--initrd",
              f"file://{guest.initrd}", "--cmdline", guest.cmdline,
              "--description", "busybox test guest (serial console, httpd, ACPI)"])
        name = f"vmm1.{SITE}"
        hdir = self.dir / "hosts" / name
        hdir.mkdir(parents=True, exist_ok=True)
        cert, key = hdir / "host.crt", hdir / "host.key"
        if not cert.exists():
            cert, key = issue_host_cert_files(pki, name, hdir)
        lcfg = LnmConfig(controller_host="127.0.0.1", controller_port=cfg.listen_port,
                         controller_name="localhost", ca_cert=cfg.ca_cert, cert=str(cert),
                         key=str(key), hostname=name, driver="libvirt", uri=QEMU_URI,
                         backoff_max_s=5.0, image_dir=str(images), network=network,
                         domain_type="auto")
        (hdir / "lnm.toml").write_text(to_toml(lcfg))
        hosts = [{"name": name, "uri": QEMU_URI, "config": str(hdir / "lnm.toml"),
                  "image_dir": str(images)}]
        info = self._info(cfg, config, password, secret, directory, hosts)
        info["image"] = "tiny"
        info["guest"] = {"marker": guest.marker, "heartbeat": guest.heartbeat}
        return info

    def _directory(self, cfg: ControllerConfig, config: Path, password: str) -> dict[str, str]:
        """Start the site's slapd; make the demo user and the site admin Usher users."""
        state = self.dir / "state"
        secrets_ = {name: _secret(state / f"ldap-{name}.password")
                    for name in ("root", "admin", "service")}
        port_file = self.dir / "ldap" / "port"
        port = int(port_file.read_text()) if port_file.exists() else _free_port()
        self.slapd = Slapd(self.dir / "ldap", SITE, root_password=secrets_["root"],
                           admin_password=secrets_["admin"],
                           service_password=secrets_["service"], port=port)
        url = self.slapd.start()
        port_file.write_text(str(port))
        admin_dn = Layout.for_site(SITE).site_admin_dn
        site_admin_password = (state / "siteadmin.password").read_text().strip()
        admin = Directory.connect(url, SITE, admin_dn, secrets_["admin"])
        try:
            for uid, name, pw in ((USER, "Theodor Seuss Geisel", password),
                                  ("siteadmin", "Site Admin", site_admin_password)):
                if admin.find_usher_user(uid) is None:
                    admin.add_usher_user(uid, name, pw)
        finally:
            admin.close()
        if not cfg.ldap_url or cfg.ldap_url != url:
            cfg.ldap_url = url
            cfg.ldap_service_password_file = str(state / "ldap-service.password")
            cfg.site_admins = ["siteadmin"]
            config.write_text(to_toml(cfg))
        return {"url": url, "suffix": Layout.for_site(SITE).suffix, "admin_dn": admin_dn,
                "admin_password_file": str(state / "ldap-admin.password")}

    def start(self, info: dict[str, object]) -> None:
        py = sys.executable
        ctl = info["controller"]
        assert isinstance(ctl, dict)
        self._spawn([py, "-m", "usher.controller.cli", "--config", ctl["config"]],
                    "controller.log")
        host, port = ctl["address"].rsplit(":", 1)
        _wait_port(host, int(port), 20.0, self.procs[0])
        hosts = info["hosts"]
        assert isinstance(hosts, list)
        for h in hosts:
            self._spawn([py, "-m", "usher.lnm.cli", "--config", h["config"]],
                        f"lnm-{h['name'].split('.')[0]}.log")
        deadline = time.monotonic() + 20.0
        logs = [self.dir / "logs" / f"lnm-{h['name'].split('.')[0]}.log" for h in hosts]
        while time.monotonic() < deadline:
            if all(p.exists() and "registered" in p.read_text() for p in logs):
                break
            for p in self.procs:
                if p.poll() is not None:
                    raise Unavailable(f"a demo process exited early; see {self.dir / 'logs'}")
            time.sleep(0.05)
        else:
            raise Unavailable(f"node managers did not register; see {self.dir / 'logs'}")
        pids = {"controller": self.procs[0].pid,
                "lnms": [p.pid for p in self.procs[1:]]}
        info["pids"] = pids
        tmp = self.dir / "demo.json.tmp"
        tmp.write_text(json.dumps(info, indent=2) + "\n")
        tmp.replace(self.dir / "demo.json")

    def _spawn(self, argv: list[str], log: str) -> None:
        out = open(self.dir / "logs" / log, "ab")  # noqa: SIM115 - owned by the child
        self.procs.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL))
        out.close()

    def stop(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.dir / "demo.json").unlink()
        self.stop_processes()
        if self.slapd is not None:
            self.slapd.stop()

    def stop_processes(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _secret(path: Path) -> str:
    """A generated password kept in ``path`` (mode 600), made on first use."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(16) + "\n")
    return path.read_text().strip()


def _wait_port(host: str, port: int, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise Unavailable("the controller exited at start; see its log")
        with contextlib.suppress(OSError), socket.create_connection((host, port), 0.2):
            return
        time.sleep(0.05)
    raise Unavailable(f"controller did not listen on {host}:{port} within {timeout:g} s")


def _ensure_network(name: str, cidr: str) -> None:
    """An isolated libvirt network ``name`` serving DHCP on ``cidr``, defined and active."""
    import libvirt

    from usher.lnm.fakehost import network_xml

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        conn = libvirt.open(QEMU_URI)
    except libvirt.libvirtError as exc:
        raise Unavailable(f"cannot reach {QEMU_URI}: {exc}") from None
    try:
        try:
            net = conn.networkLookupByName(name)
        except libvirt.libvirtError:
            net = conn.networkDefineXML(network_xml(name, cidr))
        if not net.isActive():
            net.create()
        net.setAutostart(True)
    except libvirt.libvirtError as exc:
        raise Unavailable(f"cannot set up libvirt network {name}: {exc}") from None
    finally:
        conn.close()


def run_demo(directory: Path, lnms: int, port: int | None = None,
             hypervisor: str = "fake") -> int:
    demo = Demo(directory, lnms, port, hypervisor=hypervisor)
    stop = {"now": False}

    def on_signal(_signo: int, _frame: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        info = demo.setup()
        demo.start(info)
        print(f"usher demo site {SITE} is up: {demo.lnms} VMMs, user {USER}\n"
              f"  USH_CONFIG={info['ush_config']} ush\n"
              f"  details: {directory.resolve() / 'demo.json'}", flush=True)
        if hypervisor == "qemu":
            print(f"  try: USH_CONFIG={info['ush_config']} ush 'start t1 --image tiny' "
                  f"'console t1 --tail 50'", flush=True)
        while not stop["now"]:
            for p in demo.procs:
                if p.poll() is not None:
                    print(f"usher demo: process {p.pid} exited ({p.returncode}); stopping",
                          file=sys.stderr)
                    stop["now"] = True
            time.sleep(0.2)
    finally:
        demo.stop()
    return 0
