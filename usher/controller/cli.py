"""``usher-controller``: the daemon and its site administration commands.

::

    usher-controller [--config PATH] init --site DOMAIN [--admin NAME] [--state-dir DIR]
    usher-controller [--config PATH] db upgrade
    usher-controller [--config PATH] user add|passwd|del|list ...
    usher-controller [--config PATH] range add NAME CIDR [--gateway IP] [--vlan N]
                                           [--default] [--allow USER ...]
                                           [--allow-group GROUP ...]
    usher-controller [--config PATH] range list | del NAME
    usher-controller [--config PATH] image add NAME [--disk URL --format qcow2|raw]
                                           [--kernel URL] [--initrd URL] [--cmdline TEXT]
                                           [--description TEXT] [--disk-sha256 HEX]
                                           [--kernel-sha256 HEX] [--initrd-sha256 HEX]
    usher-controller [--config PATH] image list [-l] | del NAME
    usher-controller [--config PATH] join-token HOSTNAME
    usher-controller [--config PATH] [serve]

Passwords are read with getpass from a terminal, else one line from standard
input (``--password-file`` for scripts); never from the command line. Errors
print one line and exit with the error's exit code.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import hashlib
import logging
import os
import secrets
import signal
import sys
import time
from pathlib import Path

from usher import failpoints, sdnotify
from usher.config import DEFAULT_CONTROLLER_CONFIG, ControllerConfig, load_toml, to_toml
from usher.controller import auth, images, ipam
from usher.controller import db as dbmod
from usher.controller.models import JoinToken
from usher.errors import ConfigError, InvalidRequest, UsherError
from usher.names import validate_domain
from usher.protocol.pki import write_site_pki

log = logging.getLogger("usher.controller")


def _read_password(args: argparse.Namespace, prompt: str) -> str:
    if getattr(args, "password_file", None):
        path = Path(args.password_file)
        try:
            text = path.read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
        password = text[0] if text else ""
    elif sys.stdin.isatty():
        password = getpass.getpass(prompt)
        if getpass.getpass("again: ") != password:
            raise InvalidRequest("the passwords differ; nothing changed")
    else:
        password = sys.stdin.readline().rstrip("\n")
    if len(password) < 8:
        raise InvalidRequest("password too short: use at least 8 characters")
    return password


def _config(args: argparse.Namespace) -> ControllerConfig:
    return load_toml(ControllerConfig, Path(args.config))


def _database(cfg: ControllerConfig) -> dbmod.Database:
    engine = dbmod.make_engine(cfg.database_url)
    dbmod.check_schema(engine)
    return dbmod.Database(engine)


def cmd_init(args: argparse.Namespace) -> int:
    """Write config, PKI, database and the first site admin; safe to re-run."""
    config_path = Path(args.config)
    site = validate_domain(args.site)
    state = Path(args.state_dir).resolve()
    pki_dir = config_path.parent.resolve() / "pki"
    host, _, port = args.listen.rpartition(":")
    names = sorted({host, "localhost", "127.0.0.1", *args.controller_name})
    pki = write_site_pki(pki_dir, site=site, controller_names=names)
    if config_path.exists():
        cfg = load_toml(ControllerConfig, config_path)
    else:
        cfg = ControllerConfig(
            site_domain=site, listen_host=host, listen_port=int(port),
            database_url=args.database_url or f"sqlite:///{state / 'usher.db'}",
            ca_cert=str(pki.ca_cert), ca_key=str(pki.ca_key), cert=str(pki.controller_cert),
            key=str(pki.controller_key))
        config_path.parent.mkdir(parents=True, exist_ok=True)
        config_path.write_text(to_toml(cfg))
    state.mkdir(parents=True, exist_ok=True)
    dbmod.upgrade(cfg.database_url)
    db = _database(cfg)
    try:
        if not db.run_sync(lambda s: auth.list_users(s)):
            password = secrets.token_urlsafe(12)
            name = args.admin
            db.run_sync(lambda s: auth.add_user(s, name, password, site_admin=True))
            secret = state / f"{name}.password"
            secret.touch(mode=0o600)
            secret.write_text(password + "\n")
            print(f"site admin {name} created; password in {secret} (mode 600)")
    finally:
        db.close()
    print(f"config {config_path}, CA {pki.ca_cert}, database {cfg.database_url}")
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    cfg = _config(args)
    head = dbmod.upgrade(cfg.database_url)
    print(f"database schema is at revision {head}")
    return 0


def cmd_user(args: argparse.Namespace) -> int:
    cfg = _config(args)
    db = _database(cfg)
    try:
        if args.user_cmd == "add":
            password = _read_password(args, f"password for {args.name}: ")
            db.run_sync(lambda s: auth.add_user(s, args.name, password,
                                                site_admin=args.site_admin,
                                                usher=not args.no_usher))
            print(f"user {args.name} added")
        elif args.user_cmd == "passwd":
            password = _read_password(args, f"new password for {args.name}: ")
            db.run_sync(lambda s: auth.set_password(s, args.name, password))
            print(f"password of {args.name} changed")
        elif args.user_cmd == "del":
            db.run_sync(lambda s: auth.delete_user(s, args.name))
            print(f"user {args.name} deleted")
        else:
            for u in db.run_sync(auth.list_users):
                flags = ",".join(f for f, on in (("site_admin", u.site_admin),
                                                 ("usher", u.usher)) if on) or "-"
                print(f"{u.name:<20} {flags}")
    finally:
        db.close()
    return 0


def cmd_range(args: argparse.Namespace) -> int:
    cfg = _config(args)
    db = _database(cfg)
    try:
        if args.range_cmd == "add":
            own = ipam.host_networks()
            row = db.run_sync(lambda s: ipam.add_range(
                s, args.name, args.cidr, gateway=args.gateway, vlan=args.vlan,
                default=args.default, allow=args.allow, allow_groups=args.allow_groups,
                own=own))
            print(f"IP range {row.name} ({row.cidr}, gateway {row.gateway or '-'}) added; "
                  f"send the controller SIGHUP (or restart it) to use it")
        elif args.range_cmd == "del":
            db.run_sync(lambda s: ipam.delete_range(s, args.name))
            print(f"IP range {args.name} deleted; send the controller SIGHUP (or restart it)")
        else:
            print(f"{'NAME':<16} {'CIDR':<20} {'GATEWAY':<16} {'VLAN':<5} {'LEASES':>6}  "
                  f"DEFAULT ACCESS")
            for r, leases in db.run_sync(ipam.list_ranges):
                rec = ipam.range_rec(r)
                access = ",".join(sorted(rec.users) + [f"@{g}" for g in sorted(rec.groups)])
                print(f"{r.name:<16} {r.cidr:<20} {r.gateway or '-':<16} "
                      f"{r.vlan if r.vlan is not None else '-':<5} {leases:>6}  "
                      f"{'yes' if r.is_default else 'no':<7} {access or '-'}")
    finally:
        db.close()
    return 0


def cmd_image(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if args.image_cmd == "add":
        # Checked (and file URLs hashed) before the database is opened: hashing
        # a large disk takes a while and needs no transaction.
        row = images.make_image(
            args.name, disk=args.disk, disk_format=args.format, disk_sha256=args.disk_sha256,
            kernel=args.kernel, kernel_sha256=args.kernel_sha256, initrd=args.initrd,
            initrd_sha256=args.initrd_sha256, cmdline=args.cmdline or "",
            description=args.description or "")
    db = _database(cfg)
    try:
        if args.image_cmd == "add":
            db.run_sync(lambda s: images.add_image(s, row))
            parts = [f"disk {row.disk_format} {row.disk_sha256}" if row.disk_url else "",
                     f"kernel {row.kernel_sha256}" if row.kernel_url else "",
                     f"initrd {row.initrd_sha256}" if row.initrd_url else ""]
            print(f"image {row.name} added ({'; '.join(filter(None, parts))}); send the "
                  f"controller SIGHUP (or restart it) to use it")
        elif args.image_cmd == "del":
            db.run_sync(lambda s: images.delete_image(s, args.name))
            print(f"image {args.name} deleted (VMs made from it keep their disks and boot as "
                  f"before); send the controller SIGHUP (or restart it)")
        else:
            rows = db.run_sync(images.list_images)
            print(f"{'NAME':<16} {'DISK':<6} {'KERNEL':<6} {'INITRD':<6} DESCRIPTION")
            for r in rows:
                print(f"{r.name:<16} {r.disk_format or '-':<6} "
                      f"{'yes' if r.kernel_url else '-':<6} "
                      f"{'yes' if r.initrd_url else '-':<6} {r.description or '-'}")
                if args.long:
                    for what, url, digest in (("disk", r.disk_url, r.disk_sha256),
                                              ("kernel", r.kernel_url, r.kernel_sha256),
                                              ("initrd", r.initrd_url, r.initrd_sha256)):
                        if url:
                            print(f"  {what:<7} {url}\n          sha256 {digest}")
                    if r.cmdline:
                        print(f"  cmdline {r.cmdline}")
    finally:
        db.close()
    return 0


def cmd_join_token(args: argparse.Namespace) -> int:
    cfg = _config(args)
    hostname = validate_domain(args.hostname)
    token = secrets.token_urlsafe(24)
    row = JoinToken(token_hash=hashlib.sha256(token.encode()).hexdigest(), hostname=hostname,
                    expires=time.time() + cfg.join_token_ttl_s)
    db = _database(cfg)
    try:
        db.run_sync(lambda s: s.add(row))
    finally:
        db.close()
    print(token)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from usher.controller.app import Controller

    cfg = _config(args)
    failpoints.arm(os.environ.get("USHER_FAILPOINTS", ""))
    notify_socket = os.environ.get("NOTIFY_SOCKET", "")  # set by systemd (Type=notify)

    async def run() -> None:
        controller = Controller(cfg)
        await controller.start()
        sdnotify.notify(notify_socket, "READY=1")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        reloads: set[asyncio.Task[None]] = set()

        def reload() -> None:
            task = asyncio.create_task(controller.reload())
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, reload)
        await stop.wait()
        log.info("stopping")
        sdnotify.notify(notify_socket, "STOPPING=1")
        await controller.stop()

    asyncio.run(run())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="usher-controller",
                                description="The usher controller daemon and its admin tools.")
    p.add_argument("--config", default=str(DEFAULT_CONTROLLER_CONFIG),
                   help="controller config file (default: %(default)s)")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    sub = p.add_subparsers(dest="cmd")
    init = sub.add_parser("init", help="write config, CA, certificates, DB and a site admin")
    init.add_argument("--site", required=True, help="site DNS domain, e.g. usher.example.org")
    init.add_argument("--admin", default="siteadmin", help="name of the first site admin")
    init.add_argument("--state-dir", default="/var/lib/usher", help="where the DB lives")
    init.add_argument("--listen", default="127.0.0.1:7443", help="HOST:PORT to listen on")
    init.add_argument("--controller-name", action="append", default=[],
                      help="extra DNS name or IP for the controller certificate")
    init.add_argument("--database-url", default="", help="SQLAlchemy URL (default: SQLite)")
    dbp = sub.add_parser("db", help="database schema")
    dbp.add_argument("db_cmd", choices=["upgrade"])
    user = sub.add_parser("user", help="the embedded user store")
    usub = user.add_subparsers(dest="user_cmd", required=True)
    for name, helptext in (("add", "add a user"), ("passwd", "set a user's password")):
        sp = usub.add_parser(name, help=helptext)
        sp.add_argument("name")
        sp.add_argument("--password-file", help="read the password from this file")
        if name == "add":
            sp.add_argument("--site-admin", action="store_true", help="make a site admin")
            sp.add_argument("--no-usher", action="store_true",
                            help="may log in but not create VMs")
    usub.add_parser("del", help="delete a user").add_argument("name")
    usub.add_parser("list", help="list users")
    rng = sub.add_parser("range", help="IP ranges VMs take their addresses from")
    rsub = rng.add_subparsers(dest="range_cmd", required=True)
    radd = rsub.add_parser("add", help="add an IP range (not overlapping this machine's)")
    radd.add_argument("name")
    radd.add_argument("cidr", help="e.g. 10.20.0.0/24 or fd00:20::/64")
    radd.add_argument("--gateway", help="gateway address (default: the first address)")
    radd.add_argument("--vlan", type=int,
                      help="VLAN id: its VMs go only to hosts that carry it")
    radd.add_argument("--default", action="store_true",
                      help="VMs started without --ip_range use this range")
    radd.add_argument("--allow", nargs="+", metavar="USER",
                      help="users who may use it (default: * = everyone, unless "
                           "--allow-group is given)")
    radd.add_argument("--allow-group", nargs="+", metavar="GROUP", dest="allow_groups",
                      help="groups of the site cluster in the directory whose members "
                           "may use it")
    rsub.add_parser("list", help="list IP ranges and their lease counts")
    rsub.add_parser("del", help="delete an IP range without leases").add_argument("name")
    img = sub.add_parser("image", help="images users start VMs from (start --image)")
    isub = img.add_subparsers(dest="image_cmd", required=True)
    iadd = isub.add_parser("add", help="register an image: a disk and/or a kernel, by URL "
                                       "(file, http, https) and SHA-256")
    iadd.add_argument("name", help="the name users give to start --image")
    iadd.add_argument("--disk", metavar="URL", help="the disk; each VM gets a qcow2 overlay on it")
    iadd.add_argument("--format", choices=images.DISK_FORMATS,
                      help="the disk's format, pinned (needed with --disk; never guessed)")
    iadd.add_argument("--kernel", metavar="URL", help="a kernel to boot directly")
    iadd.add_argument("--initrd", metavar="URL", help="its initrd (needs --kernel)")
    iadd.add_argument("--cmdline", metavar="TEXT", help="the kernel command line")
    iadd.add_argument("--description", metavar="TEXT", help="one line users see in image_list")
    for what in ("disk", "kernel", "initrd"):
        iadd.add_argument(f"--{what}-sha256", metavar="HEX", dest=f"{what}_sha256",
                          help=f"SHA-256 of the {what} (computed from the file for a "
                               f"file:// URL; needed for http and https)")
    ilist = isub.add_parser("list", help="list images")
    ilist.add_argument("-l", "--long", action="store_true",
                       help="also show URLs, checksums and command lines")
    isub.add_parser("del", help="forget an image (VMs made from it keep theirs)"
                    ).add_argument("name")
    jt = sub.add_parser("join-token", help="make a one-time token a new host joins with")
    jt.add_argument("hostname")
    sub.add_parser("serve", help="run the daemon (the default)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    commands = {"init": cmd_init, "db": cmd_db, "user": cmd_user, "range": cmd_range,
                "image": cmd_image,
                "join-token": cmd_join_token,
                "serve": cmd_serve, None: cmd_serve}
    try:
        return commands[args.cmd](args)
    except UsherError as exc:
        print(f"usher-controller: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
