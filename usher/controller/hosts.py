"""Hosts: node registration, reconciliation, liveness and the host verbs.

libvirt on each host is the truth about what runs. When a node manager
registers it sends its full inventory and the controller reconciles: a VM
whose domain shows another state takes that state (recorded with the cause),
a VM whose domain is missing is recorded as stopped (``start`` defines it
again from the journal), and a domain usher did not place is left alone,
counted against the host's capacity and never handed to a user. Tasks left
unfinished by a controller restart are settled against the same inventory.

A host whose node manager disconnects is ``lost`` once it has stayed away
for ``host_lost_after_s``; its VMs become ``unknown``. Heartbeats on the
connection detect a silent peer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from sqlalchemy import delete
from sqlalchemy.orm import Session

from usher.controller.context import Context
from usher.controller.models import Host, Vm
from usher.controller.providers import Row
from usher.controller.service import TRANSITIONS, VmService, insert_rows, transition_row
from usher.controller.state import HostRec, VmRec
from usher.errors import Conflict, HostNotFound, InvalidRequest, UsherError
from usher.names import validate_domain
from usher.protocol.connection import Connection
from usher.protocol.ops import (
    DomainEventMsg,
    DomainMsg,
    Empty,
    HostInfo,
    Inventory,
    RegisterArgs,
    RegisterReply,
)

log = logging.getLogger(__name__)

_SETTLED_STATES = {"running", "paused", "stopped", "hibernated", "crashed"}


class HostService:
    """Everything about hosts and the node managers that speak for them."""

    def __init__(self, ctx: Context, vms: VmService) -> None:
        self.ctx = ctx
        self.reg = ctx.reg
        self.vms = vms
        self._lost_timers: dict[str, asyncio.TimerHandle] = {}

    # ============================================================ register
    async def register(self, conn: Connection, args: RegisterArgs) -> RegisterReply:
        facts = args.facts
        name = conn.context["host"]
        if validate_domain(facts.hostname) != name:
            raise InvalidRequest(f"node registers as {facts.hostname} but its certificate "
                                 f"names {name}")
        host = self.reg.hosts.get(name)
        now = time.time()
        if host is None:
            host = HostRec(name=name, state="up", disabled=False, hypervisor=facts.hypervisor,
                           cpus=facts.cpus, memory_mib=facts.memory_mib)
        host.hypervisor, host.cpus, host.memory_mib = (facts.hypervisor, facts.cpus,
                                                       facts.memory_mib)
        host.live_migration, host.managed_save = facts.live_migration, facts.managed_save
        host.vlans = sorted(set(facts.vlans))
        host.migration_uri, host.migration_address = (facts.migration_uri,
                                                      facts.migration_address)
        host.shared_store, host.store_id = facts.shared_store, facts.store_id
        self._check_store(host)
        host.state = "disabled" if host.disabled else "up"
        host.last_seen = now
        host.connected = True
        if name not in self.reg.hosts:
            self.reg.add_host(host)
        timer = self._lost_timers.pop(name, None)
        if timer is not None:
            timer.cancel()
        old = self.ctx.nodes.attach(name, conn)
        if old is not None:
            await old.close("replaced by a newer connection of the same host")
        await self.ctx.db.run(_save_host(host))
        inventory = {d.uuid: d for d in args.domains}
        self._reconcile(host, inventory)
        self.ctx.fire("lnm_register", subject=name, domains=len(args.domains))
        for task in list(self.reg.tasks.values()):
            if task.active and name in (task.host, task.target) \
                    and not self.vms.running(task.id):
                self.vms.settle(task, inventory)
        return RegisterReply(host=name, heartbeat_s=self.ctx.config.heartbeat_s)

    async def reconcile_all(self) -> None:
        """Compare every connected host's inventory with the journal (periodic)."""
        for name, host in list(self.reg.hosts.items()):
            if not self.ctx.nodes.connected(name):
                continue
            asked = time.time()
            try:
                inv: Inventory = await self.ctx.nodes.call(name, "node.inventory", Empty())
            except UsherError as exc:
                log.warning("periodic inventory of %s failed: %s", name, exc.message)
                continue
            if self.reg.hosts.get(name) is host:
                self._reconcile(host, {d.uuid: d for d in inv.domains}, before=asked)

    def _check_store(self, host: HostRec) -> None:
        """Warn when ``host`` names a shared store that other hosts see as another one.

        Such hosts do not share (see ``migration.shares_store``): VMs moving
        between them copy their disks, which is safe but not what the admin meant.
        """
        if not host.shared_store:
            return
        others = sorted(h.name for h in self.reg.hosts.values()
                        if h is not host and h.shared_store == host.shared_store
                        and h.store_id and h.store_id != host.store_id)
        if others:
            log.warning("VMM %s names shared store %s, but its image store is not the one "
                        "%s see%s there (another store id): is the shared filesystem "
                        "mounted at its image_dir? Until it is, VMs moving between them "
                        "copy their disks", host.name, host.shared_store, ", ".join(others),
                        "s" if len(others) == 1 else "")

    def _reconcile(self, host: HostRec, inventory: dict[str, DomainMsg],
                   before: float | None = None) -> None:
        """Bring VMs in line with ``inventory``; with ``before``, only VMs whose
        state is older than the inventory (newer changes are not in it)."""
        rows: list[Row] = []
        now = time.time()
        seen: set[str] = set()
        for vm in self.reg.vms_on(host.name):
            dom = inventory.get(vm.uuid)
            seen.add(vm.uuid)
            if vm.task is not None or (before is not None and vm.since >= before):
                continue  # its task settles it, or it changed after the snapshot
            if dom is None:
                if vm.state not in ("stopped", "pending"):
                    rows.append(self._change(vm, "stopped", f"reconciled: no domain on "
                                             f"{host.name}", "the domain was missing from its "
                                             "VMM; start defines it again", now))
            elif dom.state != vm.state and dom.state in _SETTLED_STATES:
                rows.append(self._change(vm, dom.state, f"reconciled: {host.name} reports "
                                         f"{dom.state}", "", now))
        host.foreign, host.foreign_memory_mib = [], 0
        for uuid, dom in inventory.items():
            if uuid in seen:
                continue
            placed = self.reg.vms.get(uuid)
            if placed is not None and (self.reg.holds.get(uuid) == host.name or placed.task):
                continue  # a move in progress
            host.foreign.append(dom.name)
            if dom.state in ("running", "paused"):
                host.foreign_memory_mib += dom.memory_mib
            if placed is not None:
                log.warning("domain %s (%s) is on %s but usher placed it on %s; left alone",
                            dom.name, uuid, host.name, placed.host)
            else:
                log.info("foreign domain %s on %s: not usher's, left alone", dom.name,
                         host.name)
        if host.foreign:
            self.ctx.fire("foreign_domains", subject=host.name, domains=host.foreign)
        if rows:
            self.ctx.db_background(lambda s: insert_rows(s, TRANSITIONS, rows))

    def _change(self, vm: VmRec, state: str, cause: str, reason: str, now: float) -> Row:
        old = self.reg.set_state(vm, state, reason)
        self.ctx.sessions.push_vm(vm)
        self.ctx.db_background(_save_vm_state(vm))
        self.ctx.fire("state_change", user=vm.owner, subject=vm.name, old=old, new=state,
                      cause=cause)
        return transition_row(vm, old, state, cause, now)

    # ============================================================= liveness
    def disconnected(self, conn: Connection) -> None:
        name = conn.context.get("host")
        if name is None or not self.ctx.nodes.detach(name, conn):
            return
        host = self.reg.hosts.get(name)
        if host is None:
            return
        host.connected = False
        log.warning("node manager of %s disconnected (%s); lost in %g s unless it returns",
                    name, conn.close_reason, self.ctx.config.host_lost_after_s)
        self.expect_back(name)

    def expect_back(self, name: str) -> None:
        """Mark ``name`` lost unless its node manager registers within ``host_lost_after_s``."""
        loop = asyncio.get_running_loop()
        self._lost_timers[name] = loop.call_later(self.ctx.config.host_lost_after_s,
                                                  self._lose, name)

    def _lose(self, name: str) -> None:
        self._lost_timers.pop(name, None)
        host = self.reg.hosts.get(name)
        if host is None or self.ctx.nodes.connected(name):
            return
        host.state = "lost"
        self.ctx.db_background(_save_host(host))
        now = time.time()
        rows = [self._change(vm, "unknown", f"VMM {name} lost", f"VMM {name} is lost", now)
                for vm in self.reg.vms_on(name) if vm.state != "unknown"]
        if rows:
            self.ctx.db_background(lambda s: insert_rows(s, TRANSITIONS, rows))
        log.warning("host %s is lost; %d VMs are unknown", name, len(rows))
        self.ctx.fire("lnm_lost", subject=name, vms=len(rows))

    def heartbeat(self, conn: Connection) -> None:
        host = self.reg.hosts.get(conn.context.get("host", ""))
        if host is not None:
            host.last_seen = time.time()

    # ======================================================= domain events
    def domain_event(self, conn: Connection, ev: DomainEventMsg) -> None:
        """A lifecycle event from a host: the guest changed state by itself."""
        host_name = conn.context.get("host")
        vm = self.reg.vms.get(ev.uuid)
        if vm is None or vm.host != host_name:
            return
        if vm.task is not None or ev.state not in _SETTLED_STATES or ev.state == vm.state:
            return  # a running task decides the state it ends in
        row = self._change(vm, ev.state, f"domain event on {host_name}: {ev.reason}",
                           ev.reason if ev.state == "crashed" else "", time.time())
        self.ctx.db_background(lambda s: insert_rows(s, TRANSITIONS, [row]))

    # ========================================================== host verbs
    def list_hosts(self) -> list[HostInfo]:
        return [h.info() for h in sorted(self.reg.hosts.values(), key=lambda h: h.name)]

    def _host(self, name: str) -> HostRec:
        host = self.reg.hosts.get(name.lower())
        if host is None:
            raise HostNotFound(f"no VMM named {name}; see 'vmm_list'")
        return host

    async def disable(self, name: str) -> HostInfo:
        return await self._set_disabled(name, True)

    async def enable(self, name: str) -> HostInfo:
        return await self._set_disabled(name, False)

    async def _set_disabled(self, name: str, disabled: bool) -> HostInfo:
        """A disabled host takes no new VMs; a lost host stays lost until it returns."""
        host = self._host(name)
        host.disabled = disabled
        if host.state in ("up", "disabled"):
            host.state = "disabled" if disabled else "up"
        await self.ctx.db.run(_save_host(host))
        self.ctx.fire("host_disable" if disabled else "host_enable", subject=host.name)
        return host.info()

    async def remove(self, name: str) -> HostInfo:
        host = self._host(name)
        if host.vm_count or self.reg.vms_on(host.name):
            raise Conflict(f"VMM {host.name} still has {host.vm_count} VMs; migrate or "
                           f"destroy them first")
        if host.state == "up":
            raise Conflict(f"VMM {host.name} is up; disable it first (vmm_disable)")
        info = host.info()
        hname = host.name
        await self.ctx.db.run(lambda s: s.execute(delete(Host).where(Host.name == hname)))
        del self.reg.hosts[host.name]
        conn = self.ctx.nodes.get(host.name)
        if conn is not None:
            self.ctx.nodes.detach(host.name, conn)
            await conn.close("host removed by the site admin")
        self.ctx.fire("host_remove", subject=host.name)
        return info


def _save_host(host: HostRec) -> Any:
    values = dict(name=host.name, state=host.state, disabled=host.disabled,
                  hypervisor=host.hypervisor, cpus=host.cpus, memory_mib=host.memory_mib,
                  live_migration=host.live_migration, managed_save=host.managed_save,
                  last_seen=host.last_seen)

    def write(session: Session) -> None:
        session.merge(Host(**values))

    return write


def _save_vm_state(vm: VmRec) -> Any:
    uuid = vm.uuid
    values: dict[Any, Any] = dict(state=vm.state, since=vm.since, started=vm.started,
                                  reason=vm.reason, host=vm.host)

    def write(session: Session) -> None:
        session.query(Vm).filter(Vm.uuid == uuid).update(values)

    return write
