"""Configuration of every usher program, declared in one place.

Each program has one typed config: :class:`ControllerConfig`,
:class:`LnmConfig` and :class:`UshConfig`. Fields carry their default and
help text; files are TOML. A config is read once at start-up by the program's
front-end and passed down: nothing below reads files or the environment.

An unknown key or a value of the wrong type is a :class:`ConfigError` naming
the file and the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from usher.errors import ConfigError

T = TypeVar("T")

DEFAULT_CONTROLLER_CONFIG = Path("/etc/usher/controller.toml")
DEFAULT_LNM_CONFIG = Path("/etc/usher/lnm.toml")
USH_CONFIG_LAYERS = (Path("/etc/usher/ush.config"), Path("~/.usher/ush.config"))


def _f(default: Any, help: str) -> Any:
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ControllerConfig:
    """``usher-controller`` settings (``/etc/usher/controller.toml``)."""

    site_domain: str = _f("usher.example.org", "DNS domain of the site; users own USER.SITE")
    listen_host: str = _f("127.0.0.1", "address the controller listens on")
    listen_port: int = _f(7443, "TCP port of the controller")
    listen_unix: str = _f("", "also listen on this Unix socket path for local clients "
                          "(same TLS and logins; clients use unix:PATH)")
    database_url: str = _f("sqlite:////var/lib/usher/usher.db", "SQLAlchemy URL of the state DB")
    ca_cert: str = _f("/etc/usher/pki/ca.crt", "site CA certificate")
    ca_key: str = _f("/etc/usher/pki/ca.key", "site CA key (issues host certificates)")
    cert: str = _f("/etc/usher/pki/controller.crt", "controller certificate")
    key: str = _f("/etc/usher/pki/controller.key", "controller key")
    heartbeat_s: float = _f(5.0, "heartbeat interval on every connection")
    host_lost_after_s: float = _f(15.0, "a disconnected host is lost after this long")
    hello_timeout_s: float = _f(5.0, "a connection must complete hello within this")
    max_connections: int = _f(2000, "connections served at once")
    max_unauthenticated: int = _f(64, "connections still in hello at once")
    default_ram_mib: int = _f(256, "memory of a new VM without --ram")
    default_vcpus: int = _f(1, "vcpus of a new VM without --vcpus")
    max_ram_mib: int = _f(65536, "largest --ram a user may ask for")
    max_vcpus: int = _f(16, "largest --vcpus a user may ask for")
    reconcile_interval_s: float = _f(60.0, "compare every host's inventory this often")
    stats_interval_s: float = _f(60.0, "ask every host for its VMs' resource counters this "
                                 "often and store one sample per VM (0: no accounting)")
    stats_keep: int = _f(1440, "samples kept per VM; older ones are dropped (1440 at 60 s: "
                         "a day)")
    stats_timeout_s: float = _f(20.0, "a host that takes longer to report its counters "
                                "gives no samples that round")
    task_deadline_s: float = _f(300.0, "a task not finished by then ends in error")
    shutdown_timeout_s: float = _f(60.0, "graceful shutdown waits this long for the guest")
    batch_cap: int = _f(1000, "most VM names one command may expand to")
    login_max_failures: int = _f(5, "failed logins per user name in the window")
    login_max_failures_per_address: int = _f(20, "failed logins per client address in the "
                                              "window (higher: many users share NATs)")
    login_window_s: float = _f(60.0, "window of the login failure limit")
    join_token_ttl_s: float = _f(3600.0, "lifetime of a one-time host join token")
    ldap_url: str = _f("", "site directory (LDAP) URL; empty: the embedded user table")
    ldap_service_password_file: str = _f("", "file with the controller's directory password")
    ldap_timeout_s: float = _f(5.0, "a directory call that takes longer fails")
    site_admins: list[str] = _f([], "with a directory: the Usher users who are site admins")
    outbox_retry_s: float = _f(2.0, "first delay before writes to other systems are retried")
    dns: str = _f("none", "DNS provider: none, embedded (a server in the controller) or "
                  "rfc2136 (dynamic updates with TSIG to a server such as BIND)")
    dns_listen: str = _f("127.0.0.1:5353", "embedded DNS: HOST:PORT it answers on (UDP and TCP)")
    dns_server: str = _f("127.0.0.1:53", "rfc2136: HOST:PORT of the primary server")
    dns_key_file: str = _f("", "rfc2136: TSIG key file as tsig-keygen writes it")
    dns_zones: list[str] = _f([], "zones usher writes to (empty: the site domain and the "
                              "reverse zones of the IP ranges)")
    dns_ttl: int = _f(60, "TTL of the records usher writes")
    dns_down: str = _f("refuse", "when DNS cannot be written: refuse (the start fails) or "
                       "queue (the VM starts; its records wait, shown as pending)")
    dns_timeout_s: float = _f(5.0, "a DNS update or transfer that takes longer fails")
    dns_converge_interval_s: float = _f(300.0, "compare DNS with the database this often")
    dns_rr_max_members: int = _f(100, "most VMs one round-robin name may answer with "
                                 "(BIND refuses larger record sets by default)")
    plugins: list[str] = _f(["audit", "kwargfil"], "plugins to load, by name")
    kwargfil: dict[str, dict[str, list[str]]] = _f(
        {"start": {"accept": ["ram", "vcpus", "vmm", "ip_range", "ip", "rr", "image", "kernel",
                              "initrd", "kernel_parms", "fs_uri"]}},
        "kwargfil: per event, the options accepted (or dropped) for everyone but site admins")
    plugin_dirs: list[str] = _f([], "directories with site plugin files (*.py)")
    plugin_timeout_s: float = _f(5.0, "each plugin call must finish within this")
    hooks: dict[str, str] = _f({}, "hooks: event name -> executable fed the event as JSON")


@dataclass
class LnmConfig:
    """``usher-lnm`` settings (``/etc/usher/lnm.toml``)."""

    controller_host: str = _f("127.0.0.1", "controller address")
    controller_port: int = _f(7443, "controller port")
    controller_name: str = _f("localhost", "name in the controller's certificate")
    ca_cert: str = _f("/etc/usher/pki/ca.crt", "site CA certificate")
    cert: str = _f("/etc/usher/pki/host.crt", "this host's certificate (written on join)")
    key: str = _f("/etc/usher/pki/host.key", "this host's key (written on join)")
    join_token_file: str = _f("", "file holding a one-time join token (used once, then removed)")
    hostname: str = _f("", "host name reported to the controller (default: the machine's)")
    driver: str = _f("libvirt", "hypervisor driver: libvirt or fake")
    uri: str = _f("qemu:///system", "libvirt URI")
    fake_host_file: str = _f("", "fake host: libvirt test-driver host file")
    vlans: list[int] = _f([], "VLAN ids this host's bridge carries: VMs of an IP range "
                          "with a VLAN are placed only on hosts that carry it")
    domain_type: str = _f("auto", "libvirt domain type on qemu hosts: auto (kvm if KVM boots "
                          "the tiny test guest here, else qemu/TCG), kvm or qemu")
    network: str = _f("default", "libvirt network the VMs' interfaces join; where it serves "
                      "DHCP on a VM's subnet, each VM's address becomes a DHCP host entry "
                      "(empty: VMs get no network interface)")
    fake_cpus: int = _f(8, "fake host: cpus")
    fake_network: str = _f("", "fake host: CIDR of a network named by 'network' with DHCP, "
                           "made in the host file (empty: none)")
    fake_memory_mib: int = _f(16384, "fake host: memory")
    call_timeout_s: float = _f(60.0, "a hypervisor call that takes longer fails")
    image_dir: str = _f("/var/lib/usher/images", "this host's image store: base images "
                        "and a disk overlay per VM (must be readable by the qemu user)")
    shared_store: str = _f("", "name of the shared filesystem (NFS, GlusterFS, CephFS...) "
                           "that image_dir is on, mounted at the same path on every host "
                           "that names it: VMs move between those hosts without copying "
                           "their disks (empty: the store is this host's own)")
    image_fetch_timeout_s: float = _f(600.0, "fetching one image that takes longer fails")
    migration_uri: str = _f("", "libvirt URI at which other hosts' libvirtd reach this host's "
                            "for live migration, e.g. qemu+tls://vmm2.example.org/system "
                            "(empty: VMs cannot migrate live to this host)")
    migration_address: str = _f("", "where migration data to this host goes, as a libvirt "
                                "migrate URI such as tcp://10.0.0.2 (empty: libvirt's choice, "
                                "qemu.conf migration_host)")
    backoff_initial_s: float = _f(0.2, "first reconnect delay")
    backoff_max_s: float = _f(30.0, "longest reconnect delay")


@dataclass
class UshConfig:
    """``ush`` settings, layered ``/etc/usher/ush.config`` < ``~/.usher/ush.config``
    < ``$USH_CONFIG``."""

    controller: str = _f("localhost:7443", "controller HOST:PORT")
    ca_cert: str = _f("/etc/usher/pki/ca.crt", "site CA certificate")
    user: str = _f("", "user name (default: login name)")
    password: str = _f("", "password (the file must not be readable by others)")
    history_file: str = _f("~/.usher/ush_history", "persistent command history")
    reconnect_max_s: float = _f(30.0, "longest automatic reconnect delay")


@dataclass
class ToolsConfig:
    """``usher_*`` tools settings, layered ``/etc/usher/usertools.config`` <
    ``~/.usher/usertools.config`` < ``$USHER_TOOLS_CONFIG``."""

    ldap_url: str = _f("ldap://localhost", "the site's directory server")
    site_domain: str = _f("", "the site's DNS domain (its directory suffix follows from it)")
    cluster: str = _f("", "default cluster (default: the cluster of this host's name)")
    user: str = _f("", "who runs the tools (default: the login name)")
    password_file: str = _f("", "read the caller's password from this file (mode 600)")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin in (list,):
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list")
        return [_coerce(v, item, where) for v in value]
    if origin in (dict,):
        _, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table")
        return {str(k): _coerce(v, vt, where) for k, v in value.items()}
    if isinstance(tp, type) and not (tp is int and isinstance(value, bool)) \
            and isinstance(value, tp):
        return value
    if isinstance(tp, types.UnionType):
        return value
    raise ConfigError(f"{where}: expected {getattr(tp, '__name__', tp)}, "
                      f"got {type(value).__name__}")


def from_dict(cls: type[T], data: dict[str, Any], source: str, base: T | None = None) -> T:
    """Build ``cls`` from a mapping over ``base`` (or the defaults)."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown setting {unknown[0]!r}; "
                          f"known settings: {', '.join(sorted(known))}")
    values = {k: _coerce(v, hints[k], f"{source}: {k}") for k, v in data.items()}
    start = base if base is not None else cls()
    return dataclasses.replace(start, **values)  # type: ignore[type-var]


def load_toml(cls: type[T], path: Path, base: T | None = None) -> T:
    """Read one TOML file into ``cls``; a missing or malformed file is a ConfigError."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; "
                          f"create it or pass --config PATH") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    return from_dict(cls, data, str(path), base)


def to_toml(config: Any) -> str:
    """Render a config dataclass as TOML (for ``init`` and the demo)."""
    lines = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        lines.append(f"# {f.metadata.get('help', '')}")
        lines.append(f"{f.name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_value(k)} = {_toml_value(v)}"
                               for k, v in value.items()) + "}"
    raise TypeError(f"cannot render {value!r} as TOML")


def load_tools_config(env: dict[str, str], home: Path) -> ToolsConfig:
    """Layer the usher_* tools' config files (each overrides the one before)."""
    config = ToolsConfig()
    paths = [Path("/etc/usher/usertools.config"), home / ".usher" / "usertools.config"]
    if env.get("USHER_TOOLS_CONFIG"):
        paths.append(Path(env["USHER_TOOLS_CONFIG"]))
        if not paths[-1].exists():
            raise ConfigError(f"USHER_TOOLS_CONFIG names {paths[-1]}, which does not exist")
    for path in paths:
        if path.exists():
            config = load_toml(ToolsConfig, path, config)
    return config


def load_ush_config(env: dict[str, str], home: Path) -> UshConfig:
    """Layer the ush config files; a password in a file others can read is refused."""
    config = UshConfig()
    paths = [USH_CONFIG_LAYERS[0], home / ".usher" / "ush.config"]
    if env.get("USH_CONFIG"):
        paths.append(Path(env["USH_CONFIG"]))
    for i, path in enumerate(paths):
        if not path.exists():
            if i == len(paths) - 1 and env.get("USH_CONFIG") and path == Path(env["USH_CONFIG"]):
                raise ConfigError(f"USH_CONFIG names {path}, which does not exist")
            continue
        layer = load_toml(UshConfig, path, config)
        if layer.password != config.password:
            mode = os.stat(path).st_mode
            if mode & (stat.S_IRGRP | stat.S_IROTH):
                raise ConfigError(f"{path} holds a password but others can read it; "
                                  f"run: chmod 600 {path}")
        config = layer
    return config
