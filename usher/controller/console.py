"""Interactive serial consoles, relayed between a client and the VM's node manager.

A client attaches with ``vm.console_open``: the controller checks that the
caller may see the VM, names a session, and asks the VM's node manager to open
the domain's console (``node.console_open``). From then on the node manager
pushes what the guest prints (``node_console``) and the controller passes it
to the connection that opened the session (``console``); keystrokes go the
other way (``vm.console_input`` -> ``node.console_input``). A session belongs
to the connection that opened it: other connections cannot feed or close it,
and it ends when that connection closes, when the console ends on the node
(the guest stopped: an ``eof`` push with the reason), or when the node manager
disconnects.
"""

from __future__ import annotations

import asyncio
import logging
import uuid as uuidlib
from dataclasses import dataclass
from typing import Any

from usher.controller.auth import Identity
from usher.controller.context import Context
from usher.controller.service import VmService
from usher.errors import NotFound, UsherError
from usher.protocol.connection import Connection
from usher.protocol.ops import (
    ConsoleCloseArgs,
    ConsoleDataMsg,
    ConsoleInputArgs,
    ConsoleOpenArgs,
    ConsoleSessionMsg,
    Empty,
    VmConsoleOpenArgs,
)

log = logging.getLogger(__name__)

MAX_SESSIONS_PER_CONNECTION = 8


@dataclass(slots=True)
class _Session:
    conn: Connection  # the client connection that opened it
    host: str
    uuid: str
    name: str


class ConsoleRelay:
    """Console sessions between clients and node managers (see the module docstring)."""

    def __init__(self, ctx: Context, vms: VmService) -> None:
        self.ctx = ctx
        self.vms = vms
        self._sessions: dict[str, _Session] = {}
        self._background: set[asyncio.Task[None]] = set()

    async def open(self, identity: Identity, conn: Connection,
                   args: VmConsoleOpenArgs) -> ConsoleSessionMsg:
        """Attach ``conn`` to the VM's console.

        Raises:
            VmNotFound, PermissionDenied, InvalidOption: as for naming one VM.
            HostUnavailable: the VM's host is not connected.
            InvalidState: the VM is not running or paused (from the node).
            UsherError: too many sessions on this connection.
        """
        vm, host = self.vms.console_host(identity, args.name)
        if sum(1 for s in self._sessions.values() if s.conn is conn) >= \
                MAX_SESSIONS_PER_CONNECTION:
            raise UsherError(f"at most {MAX_SESSIONS_PER_CONNECTION} consoles per connection")
        session = uuidlib.uuid4().hex
        self._sessions[session] = _Session(conn, host, vm.uuid, vm.name)
        try:
            await self.ctx.nodes.call(host, "node.console_open",
                                      ConsoleOpenArgs(uuid=vm.uuid, session=session))
        except BaseException:
            self._sessions.pop(session, None)
            raise
        return ConsoleSessionMsg(session=session, name=vm.name)

    async def input(self, conn: Connection, args: ConsoleInputArgs) -> Empty:
        s = self._own(conn, args.session)
        await self.ctx.nodes.call(s.host, "node.console_input", args)
        return Empty()

    async def close(self, conn: Connection, args: ConsoleCloseArgs) -> Empty:
        s = self._own(conn, args.session)
        del self._sessions[args.session]
        await self._close_on_node(s.host, args.session)
        return Empty()

    def _own(self, conn: Connection, session: str) -> _Session:
        s = self._sessions.get(session)
        if s is None or s.conn is not conn:
            raise NotFound(f"no console session {session} on this connection")
        return s

    async def _close_on_node(self, host: str, session: str) -> None:
        if not self.ctx.nodes.connected(host):
            return
        try:
            await self.ctx.nodes.call(host, "node.console_close",
                                      ConsoleCloseArgs(session=session))
        except UsherError as exc:
            log.info("closing console %s on %s: %s", session, host, exc.message)

    # ------------------------------------------------------------ events
    def node_output(self, host: str, msg: ConsoleDataMsg) -> None:
        """A node pushed console output (or its end): pass it to the session's client."""
        s = self._sessions.get(msg.session)
        if s is None or s.host != host:
            return  # a session that ended meanwhile, or not this node's
        if msg.eof:
            del self._sessions[msg.session]
        s.conn.push("console", msg)

    def client_closed(self, conn: Connection) -> None:
        """The client went away: its sessions end on their nodes too."""
        for session, s in list(self._sessions.items()):
            if s.conn is conn:
                del self._sessions[session]
                self._spawn(self._close_on_node(s.host, session))

    def node_closed(self, host: str) -> None:
        """The node manager went away: its consoles end for their clients."""
        for session, s in list(self._sessions.items()):
            if s.host == host:
                del self._sessions[session]
                s.conn.push("console", ConsoleDataMsg(
                    session=session, eof=True, reason=f"VMM {host} disconnected"))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
