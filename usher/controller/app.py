"""The controller daemon: builds the services, recovers state, serves.

Start-up order matters for crash safety: the schema is checked, the
in-memory registry is rebuilt from SQL (VMs, hosts, unfinished tasks and
their reservations, recent replies), and only then does the listener open.
Hosts known from before are not trusted until their node managers register
again; one that stays away for ``host_lost_after_s`` is lost. Unfinished
tasks are settled as their hosts register; a sweeper ends in ``error`` any
task whose deadline passes first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from usher.config import ControllerConfig
from usher.controller import db as dbmod
from usher.controller.auth import Authenticator, LoginLimiter, UserStore
from usher.controller.context import Context, NodeLinks, Sessions
from usher.controller.dns import DnsProvider
from usher.controller.events import EventBus, load_plugins
from usher.controller.hosts import HostService
from usher.controller.images import decode_boot
from usher.controller.ipam import IpamProvider
from usher.controller.models import Host, Image, IpRange, Task, Vm
from usher.controller.providers import PlacementProvider, ProviderChain
from usher.controller.server import ControllerServer
from usher.controller.service import VmService
from usher.controller.state import HostRec, Registry, TaskRec, VmRec
from usher.controller.stats import StatsCollector
from usher.dns import (
    DnsBackend,
    EmbeddedBackend,
    EmbeddedDns,
    Rfc2136Backend,
    Zones,
    ZoneStore,
    parse_key_file,
    reverse_zone_for,
)
from usher.errors import ConfigError
from usher.protocol import pki, tls

log = logging.getLogger(__name__)

RECENT_TASKS_LOADED = 5000


class Controller:
    """One controller process; ``await start()``, then ``await stop()``."""

    def __init__(self, config: ControllerConfig) -> None:
        self.config = config
        self.address: tuple[str, int] | None = None
        self._tasks: list[asyncio.Task[None]] = []  # background loops

    async def start(self) -> tuple[str, int]:
        """Recover state and listen; returns the TCP address.

        A failure part way (a bad setting, a port in use) closes whatever was
        opened before it is raised.
        """
        try:
            return await self._start()
        except BaseException:
            await self._abandon()
            raise

    async def _abandon(self) -> None:
        for task in self._tasks:
            task.cancel()
        server = getattr(self, "server", None)
        if server is not None:
            await server.stop()
        if getattr(self, "dns_server", None) is not None:
            await self.dns_server.stop()  # type: ignore[union-attr]
        ctx = getattr(self, "ctx", None)
        if ctx is not None:
            if ctx.directory is not None:
                ctx.directory.close()
            await asyncio.to_thread(ctx.db.close)

    async def _start(self) -> tuple[str, int]:
        cfg = self.config
        engine = dbmod.make_engine(cfg.database_url)
        await asyncio.to_thread(dbmod.check_schema, engine)
        db = dbmod.Database(engine)
        reg = Registry()
        placement = PlacementProvider(reg)
        self.ipam = IpamProvider()
        self.ctx = ctx = Context(config=cfg, db=db, reg=reg, placement=placement,
                                 # ipam first: the range's VLAN narrows the hosts.
                                 providers=ProviderChain([self.ipam, placement]),
                                 bus=EventBus(cfg.plugin_timeout_s), nodes=NodeLinks(),
                                 sessions=Sessions(), ipam=self.ipam)
        self.vms = VmService(ctx)
        self.hosts = HostService(ctx, self.vms)
        # A provider that reserves nothing (its place in the chain does not
        # matter): its samples go with a destroyed VM.
        ctx.stats = stats = StatsCollector(ctx)
        ctx.providers.providers.append(stats)
        self.dns_server: EmbeddedDns | None = None
        await db.run(self._load)
        await db.run(self.vms.load_replies)
        if cfg.dns != "none":
            ctx.dns = await self._start_dns()
            ctx.providers.providers.append(ctx.dns)
            self._tasks.append(asyncio.create_task(ctx.dns.run()))
        loaded = load_plugins(ctx.bus, cfg, ctx)
        log.info("plugins: %s", ", ".join(loaded) or "none")
        limiter = LoginLimiter(cfg.login_max_failures, cfg.login_window_s,
                               max_per_address=cfg.login_max_failures_per_address)
        users: Authenticator
        if cfg.ldap_url:
            from usher.controller.directory import DirectoryLink

            ctx.directory = users = DirectoryLink(cfg, db, limiter)
            self._tasks.append(asyncio.create_task(ctx.directory.replay_outbox()))
        else:
            users = UserStore(db, limiter)
        ssl_context = tls.server_context(cfg.cert, cfg.key, cfg.ca_cert)
        self.server = ControllerServer(ctx, users, self.vms, self.hosts, ssl_context,
                                       self._issue_host_cert)
        try:
            self.address = await self.server.start()
        except BaseException:
            await self.server.stop()
            raise
        for name in reg.hosts:  # known from before: trusted again only when they register
            self.hosts.expect_back(name)
        self._tasks += [asyncio.create_task(self._sweep_deadlines()),
                        asyncio.create_task(self._reconcile_periodically()),
                        asyncio.create_task(stats.run())]
        ctx.fire("ctrl_start", subject=cfg.site_domain)
        log.info("controller for %s listening on %s:%d (%d VMs, %d hosts, %d open tasks)",
                 cfg.site_domain, *self.address, len(reg.vms), len(reg.hosts),
                 sum(1 for t in reg.tasks.values() if t.active))
        return self.address

    def _load(self, session: Session) -> None:
        reg = self.ctx.reg
        self.ipam.load(session)
        self.ctx.images.load(session)
        for h in session.scalars(select(Host)):
            reg.hosts[h.name] = HostRec(
                name=h.name, state=h.state, disabled=h.disabled, hypervisor=h.hypervisor,
                cpus=h.cpus, memory_mib=h.memory_mib, live_migration=h.live_migration,
                managed_save=h.managed_save, last_seen=h.last_seen)
        for v in session.scalars(select(Vm)):
            reg.add_vm(VmRec(uuid=v.uuid, name=v.name, cluster=v.cluster, owner=v.owner,
                             host=v.host, state=v.state, memory_mib=v.memory_mib,
                             vcpus=v.vcpus, mac=v.mac, ip=v.ip, since=v.since,
                             started=v.started, reason=v.reason, rr=v.rr,
                             boot=decode_boot(v.boot, v.name)))
        for rec in reg.vms.values():
            rec.vlan = self.ipam.vlan_of(rec.uuid)
        open_tasks = session.scalars(select(Task).where(Task.state == "running")).all()
        recent = session.scalars(select(Task).where(Task.state != "running")
                                 .order_by(Task.created.desc()).limit(RECENT_TASKS_LOADED))
        for t in [*reversed(recent.all()), *open_tasks]:
            task = TaskRec(id=t.id, op=t.op, user=t.user, vm_uuid=t.vm_uuid,
                           vm_name=t.vm_name, state=t.state, created=t.created,
                           deadline=t.deadline, step=t.step, host=t.host, target=t.target,
                           created_vm=t.created_vm, message=t.message, vm_state=t.vm_state,
                           finished=t.finished)
            reg.add_task(task)
            vm = reg.vms.get(t.vm_uuid or "")
            if task.active and vm is not None:
                vm.task = task.id
                if task.op == "migrate" and task.target and vm.host != task.target:
                    reg.hold(task.target, vm)

    async def _start_dns(self) -> DnsProvider:
        """The dns provider with its backend (and the embedded server, if chosen).

        Raises:
            ConfigError: an unknown ``dns`` setting, a bad address or key file.
        """
        cfg = self.config
        if cfg.dns_down not in ("refuse", "queue"):
            raise ConfigError(f"dns_down = {cfg.dns_down!r}: use refuse or queue")
        origins = list(cfg.dns_zones) or [cfg.site_domain] + sorted(
            {reverse_zone_for(r.network) for r in self.ipam.ranges.values()})
        zones = Zones(origins)
        backend: DnsBackend
        if cfg.dns == "embedded":
            host, port = split_address(cfg.dns_listen, "dns_listen")
            store = ZoneStore(zones, ttl=cfg.dns_ttl)
            self.dns_server = EmbeddedDns(store, host, port)
            await self.dns_server.start()
            backend = EmbeddedBackend(store)
            log.info("embedded DNS for %s on %s:%d", ", ".join(zones), host,
                     self.dns_server.port)
        elif cfg.dns == "rfc2136":
            host, port = split_address(cfg.dns_server, "dns_server")
            if not cfg.dns_key_file:
                raise ConfigError("dns = rfc2136 needs dns_key_file (a TSIG key from "
                                  "tsig-keygen that the server accepts updates with)")
            key_name, algorithm, secret = parse_key_file(cfg.dns_key_file)
            backend = Rfc2136Backend(host, port, zones, key_name, secret, algorithm,
                                     cfg.dns_timeout_s, ttl=cfg.dns_ttl)
            log.info("DNS updates for %s go to %s:%d", ", ".join(zones), host, port)
        else:
            raise ConfigError(f"dns = {cfg.dns!r}: use none, embedded or rfc2136")
        provider = DnsProvider(cfg, zones, backend, self.ctx.reg, self.ctx.db)
        provider.load(self.ctx.reg.vms.values())
        return provider

    async def reload(self) -> None:
        """Read what the admin commands edit again: IP ranges and images (SIGHUP).

        A failure (the database unavailable) is logged; what was loaded stays.
        """
        try:
            await self.reload_ranges()
            await self.reload_images()
        except Exception:
            log.exception("reload failed; the ranges and images in use stay as they were")

    async def reload_ranges(self) -> None:
        """Read the IP ranges again (SIGHUP, after ``usher-controller range``)."""
        rows = await self.ctx.db.run(lambda s: list(s.scalars(select(IpRange))))
        self.ipam.set_ranges(rows)  # on the loop: atomic with reservations
        log.info("IP ranges reloaded: %s", ", ".join(sorted(self.ipam.ranges)) or "none")

    async def reload_images(self) -> None:
        """Read the images again (SIGHUP, after ``usher-controller image``).

        VMs keep the boot they were made with; only new starts see the change.
        """
        rows = await self.ctx.db.run(lambda s: list(s.scalars(select(Image))))
        self.ctx.images.set_images(rows)
        log.info("images reloaded: %s", ", ".join(sorted(self.ctx.images.images)) or "none")

    async def _sweep_deadlines(self) -> None:
        """End tasks whose deadline passed while no runner was working on them."""
        while True:
            await asyncio.sleep(1.0)
            now = time.time()
            for task in list(self.ctx.reg.tasks.values()):
                if task.active and task.deadline < now and not self.vms.running(task.id):
                    self.vms.settle(task, None)

    async def _reconcile_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.config.reconcile_interval_s)
            try:
                await self.hosts.reconcile_all()
            except Exception:
                log.exception("periodic reconciliation failed")

    def _issue_host_cert(self, hostname: str) -> tuple[str, str]:
        cert, key = pki.issue_cert(Path(self.config.ca_cert).read_bytes(),
                                   Path(self.config.ca_key).read_bytes(),
                                   common_name=hostname, role="host", dns_names=[hostname])
        return cert.decode(), key.decode()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.ctx.directory is not None:
            self.ctx.directory.close()
        await self.server.stop()
        await self.vms.stop()
        if self.ctx.dns is not None:
            await self.ctx.dns.backend.close()
        if self.dns_server is not None:
            await self.dns_server.stop()
        await self.ctx.bus.drain(2.0)
        await asyncio.to_thread(self.ctx.db.close)


def split_address(text: str, setting: str) -> tuple[str, int]:
    """``HOST:PORT`` of a config setting (``[v6]:PORT`` for IPv6).

    Raises:
        ConfigError: not HOST:PORT with a port from 0 to 65535.
    """
    host, sep, port = text.strip().rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{setting} = {text!r} is not HOST:PORT (for example 127.0.0.1:53)")
    return host, int(port)
