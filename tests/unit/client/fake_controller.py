"""A minimal controller on loopback for seam tests of the client and of ush.

:class:`FakeController` is a real asyncio TLS server that speaks the usher
protocol with the real frames and :class:`~usher.protocol.connection.Connection`:
it answers hello with a welcome (or a refusal for a wrong password) and serves
the operations a test plugs into ``handlers``. It can drop every connection at
once, as a crashing controller or a broken network would. Certificates come
from :mod:`usher.protocol.tls` (:func:`make_pki`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from usher.protocol import frames
from usher.protocol.connection import Connection
from usher.protocol.frames import ErrorBody, Hello, Refuse, Welcome
from usher.protocol.ops import Op, WhoAmI
from usher.protocol.pki import issue_cert, make_ca
from usher.protocol.tls import server_context

SITE = "usher.test"
USER = "seuss"
PASSWORD = "sneetch"
DOMAIN = f"{USER}.{SITE}"

Handler = Callable[[Connection, Any, str], Awaitable[Any]]


@dataclass
class Pki:
    ca: Path
    controller_cert: Path
    controller_key: Path
    host_cert: Path
    host_key: Path
    other_ca: Path


def make_pki(d: Path) -> Pki:
    """A site CA, a controller and a host certificate, and a foreign CA, in ``d``."""
    ca_pem, ca_key = make_ca(SITE)
    cert, key = issue_cert(ca_pem, ca_key, common_name="controller", role="controller",
                           dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    host_cert, host_key = issue_cert(ca_pem, ca_key, common_name="vmm1", role="host",
                                     dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    other_ca, _ = make_ca("elsewhere")
    files = {"ca.crt": ca_pem, "controller.crt": cert, "controller.key": key,
             "host.crt": host_cert, "host.key": host_key, "other-ca.crt": other_ca}
    for name, data in files.items():
        (d / name).write_bytes(data)
    return Pki(ca=d / "ca.crt", controller_cert=d / "controller.crt",
               controller_key=d / "controller.key", host_cert=d / "host.crt",
               host_key=d / "host.key", other_ca=d / "other-ca.crt")


class FakeController:
    """A controller that logs in one user and serves ``handlers[op_name]``."""

    def __init__(self, pki: Pki, *, as_host: bool = False) -> None:
        cert, key = (pki.host_cert, pki.host_key) if as_host else (pki.controller_cert,
                                                                    pki.controller_key)
        self._ssl = server_context(cert, key, pki.ca)
        self.password = PASSWORD
        self.hellos = 0
        self.requests: list[tuple[str, str, Any]] = []  # (op, request id, args)
        self.conns: list[Connection] = []  # live ones
        self._every_conn: list[Connection] = []
        self.handlers: dict[str, Handler] = {"session.whoami": self._whoami}
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port,
                                                  ssl=self._ssl)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and drop every connection (the controller died)."""
        if self._server is not None:
            self._server.close()
            self.drop_all()
            for conn in self._every_conn:
                await conn.close("controller stopped")
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    def drop_all(self) -> None:
        """Cut every connection without a goodbye, as a network failure would."""
        for conn in self.conns:
            writer: asyncio.StreamWriter = conn.context["writer"]
            writer.transport.abort()
        self.conns.clear()

    def ops(self, name: str) -> list[tuple[str, str, Any]]:
        return [r for r in self.requests if r[0] == name]

    async def _whoami(self, conn: Connection, args: Any, rid: str) -> WhoAmI:
        return WhoAmI(user=USER, domain=DOMAIN, site=SITE, site_admin=False,
                      usher_user=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            hello = await frames.read_frame(reader, frames.PRELOGIN_MAX_FRAME)
        except Exception:
            writer.close()
            return
        assert isinstance(hello, Hello)
        self.hellos += 1
        if hello.user != USER or hello.password != self.password:
            writer.write(frames.pack(Refuse(error=ErrorBody(
                code="auth_failed", family="permission_denied",
                message="wrong user name or password"))))
            with contextlib.suppress(Exception):
                await writer.drain()
            writer.close()
            return
        writer.write(frames.pack(Welcome(version=1, site=SITE, heartbeat_s=5.0,
                                         session=f"s{self.hellos}", user=USER)))
        conn = Connection(reader, writer, peer_role="client", peer_name="client",
                          heartbeat_s=5.0, handler=self._handle)
        conn.context["writer"] = writer
        self.conns.append(conn)
        self._every_conn.append(conn)
        conn.start()

    async def _handle(self, conn: Connection, op: Op, args: Any, rid: str) -> Any:
        self.requests.append((op.name, rid, args))
        return await self.handlers[op.name](conn, args, rid)
