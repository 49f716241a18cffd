"""The services every part of the controller shares, and the links to peers.

:class:`Context` bundles config, database, in-memory registry, providers,
event bus, node links and client sessions, so the service modules take one
argument instead of seven. :class:`NodeLinks` holds the connection of every
registered node manager and makes node calls with timeouts;
:class:`Sessions` holds client connections by user and pushes to them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from usher.config import ControllerConfig
from usher.controller.db import Database
from usher.controller.events import EventBus, EventData
from usher.controller.images import ImageCatalog
from usher.controller.providers import PlacementProvider, ProviderChain
from usher.controller.state import Registry, TaskRec, VmRec
from usher.errors import HostUnavailable
from usher.protocol.connection import Connection
from usher.protocol.ops import VmStateMsg

if TYPE_CHECKING:
    from usher.controller.directory import DirectoryLink
    from usher.controller.dns import DnsProvider
    from usher.controller.ipam import IpamProvider
    from usher.controller.stats import StatsCollector

log = logging.getLogger(__name__)


class NodeLinks:
    """Connections to node managers, by host name."""

    def __init__(self) -> None:
        self._conns: dict[str, Connection] = {}
        self._changed: dict[str, asyncio.Event] = {}

    def attach(self, host: str, conn: Connection) -> Connection | None:
        """Make ``conn`` the host's link; returns the link it replaces, if any."""
        old = self._conns.get(host)
        self._conns[host] = conn
        self._event(host).set()
        return old if old is not conn else None

    def detach(self, host: str, conn: Connection) -> bool:
        """Forget ``conn`` if it is still the host's link; True if it was."""
        if self._conns.get(host) is conn:
            del self._conns[host]
            return True
        return False

    def connected(self, host: str) -> bool:
        conn = self._conns.get(host)
        return conn is not None and not conn.closed

    def get(self, host: str) -> Connection | None:
        return self._conns.get(host)

    def _event(self, host: str) -> asyncio.Event:
        ev = self._changed.get(host)
        if ev is None:
            ev = self._changed[host] = asyncio.Event()
        return ev

    async def wait_connected(self, host: str, timeout: float) -> bool:
        """Wait until the host has a registered link, at most ``timeout`` s."""
        if self.connected(host):
            return True
        ev = self._event(host)
        ev.clear()
        try:
            await asyncio.wait_for(ev.wait(), max(timeout, 0.0))
        except TimeoutError:
            return False
        return self.connected(host)

    async def call(self, host: str, op: str, args: Any, timeout: float | None = None) -> Any:
        """Call a node operation on ``host``; :class:`HostUnavailable` if not linked."""
        conn = self._conns.get(host)
        if conn is None or conn.closed:
            raise HostUnavailable(f"VMM {host} is not connected")
        return await conn.request(op, args, timeout=timeout)

    def all(self) -> list[Connection]:
        return list(self._conns.values())


class Sessions:
    """Client connections by user, for pushes filtered per caller."""

    def __init__(self) -> None:
        self._by_user: dict[str, set[Connection]] = {}

    def add(self, user: str, conn: Connection) -> None:
        self._by_user.setdefault(user, set()).add(conn)

    def remove(self, user: str, conn: Connection) -> None:
        conns = self._by_user.get(user)
        if conns is not None:
            conns.discard(conn)
            if not conns:
                del self._by_user[user]

    def push(self, user: str, topic: str, body: Any) -> None:
        for conn in list(self._by_user.get(user, ())):
            conn.push(topic, body)

    def push_task(self, task: TaskRec) -> None:
        if task.user in self._by_user:
            self.push(task.user, "task", task.info())

    def push_vm(self, vm: VmRec) -> None:
        if vm.owner in self._by_user:
            self.push(vm.owner, "vm", VmStateMsg(name=vm.name, state=vm.state, host=vm.host,
                                                  reason=vm.reason))

    def all(self) -> list[Connection]:
        return [c for conns in self._by_user.values() for c in conns]


@dataclass
class Context:
    config: ControllerConfig
    db: Database
    reg: Registry
    placement: PlacementProvider
    providers: ProviderChain
    bus: EventBus
    nodes: NodeLinks
    sessions: Sessions
    directory: DirectoryLink | None = None  # the site directory, when configured
    dns: DnsProvider | None = None  # the dns provider, when configured
    ipam: IpamProvider | None = None
    images: ImageCatalog = field(default_factory=ImageCatalog)  # the registered images
    stats: StatsCollector | None = None  # accounting: the VMs' resource samples

    def db_background(self, job: Callable[[Session], Any]) -> None:
        """Journal ``job`` without waiting for it (state seen by events); failures log."""
        fut = asyncio.ensure_future(self.db.run(job))
        fut.add_done_callback(_log_failure)

    def fire(self, name: str, user: str | None = None, subject: str | None = None,
             **data: Any) -> None:
        self.bus.fire(EventData(name=name, user=user, subject=subject, data=data))


def _log_failure(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("background journal write failed: %s", fut.exception())
