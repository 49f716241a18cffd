"""The controller's listener: TLS, hello, authentication and request dispatch.

Before hello completes a connection is on probation: it must send a small
hello frame within ``hello_timeout_s``, at most ``max_unauthenticated``
connections may be on probation at once, and a frame larger than
``PRELOGIN_MAX_FRAME`` closes it. A client authenticates with name and
password; a node manager with its host certificate (whose common name is its
host name), or once with a join token that is exchanged for a certificate.
A host certificate cannot open a client session.

After hello, requests are dispatched by operation name to the services;
mutations run through the idempotency layer keyed by the caller's request id.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import ssl
import stat
import time
import uuid as uuidlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID
from sqlalchemy.orm import Session

from usher.controller.auth import Authenticator, Identity
from usher.controller.console import ConsoleRelay
from usher.controller.context import Context
from usher.controller.hosts import HostService
from usher.controller.models import JoinToken
from usher.controller.service import VmService
from usher.errors import (
    AuthenticationFailed,
    BadFrame,
    ConfigError,
    ConnectionClosed,
    PermissionDenied,
    ProtocolError,
    TimedOut,
    UsherError,
    VersionMismatch,
)
from usher.names import validate_domain
from usher.protocol import frames, tls
from usher.protocol.connection import Connection, error_body
from usher.protocol.frames import Hello, Refuse, Welcome
from usher.protocol.ops import Empty, ListArgs, Op, WhoAmI

log = logging.getLogger(__name__)

SOFTWARE = "usher-controller/0.1"


class ControllerServer:
    """Accepts connections and turns them into client or node sessions."""

    def __init__(self, ctx: Context, users: Authenticator, vms: VmService, hosts: HostService,
                 ssl_context: ssl.SSLContext, issue_host_cert: Callable[[str], tuple[str, str]]
                 ) -> None:
        self.ctx = ctx
        self.users = users
        self.vms = vms
        self.hosts = hosts
        self.consoles = ConsoleRelay(ctx, vms)
        self.ssl_context = ssl_context
        self._issue_host_cert = issue_host_cert
        self._server: asyncio.Server | None = None
        self._unix_server: asyncio.Server | None = None
        self._unix_path: Path | None = None
        self._probation = 0
        self._connections: set[Connection] = set()
        self._raw: set[asyncio.StreamWriter] = set()
        self._client_ops = self._client_table()

    async def start(self) -> tuple[str, int]:
        cfg = self.ctx.config
        self._server = await asyncio.start_server(self._accept, cfg.listen_host,
                                                  cfg.listen_port, ssl=self.ssl_context,
                                                  ssl_handshake_timeout=cfg.hello_timeout_s,
                                                  limit=2 ** 20, backlog=1024)
        sock = self._server.sockets[0].getsockname()
        if cfg.listen_unix:
            await self._listen_unix(cfg.listen_unix)
        return sock[0], sock[1]

    async def _listen_unix(self, path_text: str) -> None:
        """The same service on a Unix socket, for clients on this machine.

        A socket file left by a controller that died is replaced; any other
        file at the path is a configuration error. The socket is mode 0666:
        it carries the same TLS and logins as the TCP listener, and keeping
        local users off it would take file groups the site may not have.
        """
        cfg = self.ctx.config
        path = _prepare_socket_path(Path(path_text))
        self._unix_server = await asyncio.start_unix_server(
            self._accept, str(path), ssl=self.ssl_context,
            ssl_handshake_timeout=cfg.hello_timeout_s, limit=2 ** 20, backlog=1024)
        os.chmod(path, 0o666)
        self._unix_path = path

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._unix_server is not None:
            self._unix_server.close()
            if self._unix_path is not None:
                with contextlib.suppress(OSError):
                    self._unix_path.unlink()
        for conn in list(self._connections):
            await conn.close("controller shutting down")
        for writer in list(self._raw):
            writer.close()

    # ================================================================ hello
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cfg = self.ctx.config
        peer = writer.get_extra_info("peername")
        # A Unix socket peer has no address: every local client counts as one.
        address = str(peer[0]) if isinstance(peer, tuple) and peer else "local"
        if (len(self._connections) >= cfg.max_connections
                or self._probation >= cfg.max_unauthenticated):
            log.warning("refusing connection from %s: connection cap reached", address)
            writer.close()
            return
        self._probation += 1
        self._raw.add(writer)
        try:
            conn = await self._hello(reader, writer, address)
        except Exception:
            log.exception("hello from %s failed", address)
            conn = None
        finally:
            self._probation -= 1
            self._raw.discard(writer)
        if conn is None:
            writer.close()
            return
        self._connections.add(conn)
        conn.start()

    async def _refuse(self, writer: asyncio.StreamWriter, err: UsherError) -> None:
        with contextlib.suppress(Exception):
            writer.write(frames.pack(Refuse(error=error_body(err))))
            await asyncio.wait_for(writer.drain(), 1.0)

    async def _hello(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     address: str) -> Connection | None:
        cfg = self.ctx.config
        try:
            hello = await asyncio.wait_for(frames.read_frame(reader, frames.PRELOGIN_MAX_FRAME),
                                           cfg.hello_timeout_s)
        except TimeoutError:
            log.info("connection from %s sent no hello within %g s", address,
                     cfg.hello_timeout_s)
            await self._refuse(writer, TimedOut("no hello in time"))
            return None
        except ConnectionClosed:
            return None
        except ProtocolError as exc:
            log.info("bad hello from %s: %s", address, exc.message)
            await self._refuse(writer, exc)
            return None
        except (OSError, ssl.SSLError) as exc:
            log.info("connection from %s failed during hello: %s", address, exc)
            return None
        try:
            if not isinstance(hello, Hello):
                raise BadFrame(f"expected hello, got {type(hello).__name__}")
            common = [v for v in hello.versions if v in frames.PROTOCOL_VERSIONS]
            if not common:
                ours = list(frames.PROTOCOL_VERSIONS)
                raise VersionMismatch(f"no common protocol version: peer speaks "
                                      f"{hello.versions}, controller {ours}")
            version = max(common)
            ssl_object = writer.get_extra_info("ssl_object")
            if hello.role == "client":
                return await self._client_session(reader, writer, hello, version, ssl_object,
                                                  address)
            if hello.role == "node":
                return await self._node_session(reader, writer, hello, version, ssl_object)
            raise BadFrame(f"unknown role {hello.role!r}")
        except UsherError as exc:
            await self._refuse(writer, exc)
            return None

    async def _client_session(self, reader: asyncio.StreamReader,
                              writer: asyncio.StreamWriter, hello: Hello, version: int,
                              ssl_object: Any, address: str) -> Connection:
        if ssl_object is not None and tls.peer_role(ssl_object) is not None:
            raise PermissionDenied("a host certificate cannot open a client session")
        if not hello.user or hello.password is None:
            raise AuthenticationFailed("login failed: give a user name and password")
        identity = await self.users.authenticate(hello.user, hello.password, address)
        session = str(uuidlib.uuid4())
        cfg = self.ctx.config
        conn = Connection(reader, writer, peer_role="client",
                          peer_name=f"{identity.user}@{address}", heartbeat_s=cfg.heartbeat_s,
                          handler=self._client_request, on_close=self._client_closed)
        conn.context["identity"] = identity
        writer.write(frames.pack(Welcome(
            version=version, site=cfg.site_domain, heartbeat_s=cfg.heartbeat_s,
            session=session, user=identity.user, site_admin=identity.site_admin,
            usher_user=identity.usher)))
        self.ctx.sessions.add(identity.user, conn)
        log.info("user %s logged in from %s", identity.user, address)
        return conn

    async def _node_session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            hello: Hello, version: int, ssl_object: Any) -> Connection:
        cfg = self.ctx.config
        cert_pem = key_pem = None
        if hello.join_token:
            hostname = validate_domain(hello.hostname or "")
            await self._use_join_token(hello.join_token, hostname)
            cert_pem, key_pem = self._issue_host_cert(hostname)
        else:
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            if der is None:
                raise PermissionDenied("a node manager must present its host certificate "
                                       "or a join token")
            tls.require_role(ssl_object, "host")
            cert = x509.load_der_x509_certificate(der)
            cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            hostname = validate_domain(str(cns[0].value)) if cns else ""
            if hello.hostname and validate_domain(hello.hostname) != hostname:
                raise PermissionDenied(f"certificate is for {hostname}, not {hello.hostname}")
        conn = Connection(reader, writer, peer_role="node", peer_name=f"node {hostname}",
                          heartbeat_s=cfg.heartbeat_s, handler=self._node_request,
                          push_handler=self._node_push, on_close=self._node_closed)
        conn.context["host"] = hostname
        writer.write(frames.pack(Welcome(version=version, site=cfg.site_domain,
                                         heartbeat_s=cfg.heartbeat_s,
                                         session=str(uuidlib.uuid4()),
                                         host_cert_pem=cert_pem, host_key_pem=key_pem)))
        log.info("node manager of %s connected", hostname)
        return conn

    async def _use_join_token(self, token: str, hostname: str) -> None:
        digest = hashlib.sha256(token.encode()).hexdigest()

        def use(session: Session) -> str | None:
            row = session.get(JoinToken, digest)
            if row is None or row.used or row.expires < time.time():
                return "join token is unknown, used or expired; make a new one"
            if row.hostname != hostname:
                return f"join token is for {row.hostname}, not {hostname}"
            row.used = True
            return None

        problem = await self.ctx.db.run(use)
        if problem is not None:
            raise AuthenticationFailed(problem)

    # ============================================================ dispatch
    def _client_closed(self, conn: Connection) -> None:
        self._connections.discard(conn)
        identity: Identity = conn.context["identity"]
        self.ctx.sessions.remove(identity.user, conn)
        self.consoles.client_closed(conn)

    def _node_closed(self, conn: Connection) -> None:
        self._connections.discard(conn)
        self.hosts.disconnected(conn)
        host = conn.context.get("host")
        if host is not None:
            self.consoles.node_closed(host)

    def _client_table(self) -> dict[str, Callable[[Identity, Any, str], Awaitable[Any]]]:
        vms, hosts = self.vms, self.hosts

        async def whoami(ident: Identity, _a: Empty, _r: str) -> WhoAmI:
            site = self.ctx.config.site_domain
            return WhoAmI(user=ident.user, domain=f"{ident.user}.{site}", site=site,
                          site_admin=ident.site_admin, usher_user=ident.usher)

        async def complete(ident: Identity, a: Any, _r: str) -> list[str]:
            if a.kind == "vm":
                return vms.complete_vms(ident, a.prefix)
            if a.kind == "image":
                return self.ctx.images.complete(a.prefix)
            return [h for h in sorted(self.ctx.reg.hosts) if h.startswith(a.prefix)]

        def mutation(fn: Callable[[Identity, Any, str], Awaitable[Any]], name: str
                     ) -> Callable[[Identity, Any, str], Awaitable[Any]]:
            async def run(ident: Identity, a: Any, rid: str) -> Any:
                return await vms.idempotent(ident, name, rid, lambda: fn(ident, a, rid))
            return run

        def verb(name: str) -> Callable[[Identity, Any, str], Awaitable[Any]]:
            return mutation(lambda i, a, r: vms.act(i, name, a, r), name)

        async def vm_list(i: Identity, a: Any, _r: str) -> Any:
            return vms.list_vms(i, a)

        async def vm_stats(i: Identity, a: Any, _r: str) -> Any:
            assert self.ctx.stats is not None  # the controller always makes one
            return await self.ctx.stats.query(
                vms.list_vms(i, ListArgs(names=a.names, all_users=a.all_users)), a.samples)

        async def host_list(_i: Identity, _a: Any, _r: str) -> Any:
            return hosts.list_hosts()

        async def task_list(i: Identity, a: Any, _r: str) -> Any:
            return vms.list_tasks(i, a)

        async def console(i: Identity, a: Any, _r: str) -> Any:
            return await vms.console_tail(i, a)

        async def image_list(_i: Identity, _a: Any, _r: str) -> Any:
            return self.ctx.images.list_images()  # no URLs: users only name images

        table: dict[str, Callable[[Identity, Any, str], Awaitable[Any]]] = {
            "vm.start": mutation(vms.start, "start"),
            "vm.migrate_abort": mutation(vms.migrations.abort, "migrate_abort"),
            "vm.list": vm_list,
            "vm.stats": vm_stats,
            "host.list": host_list,
            "host.disable": mutation(lambda i, a, r: hosts.disable(a.name), "host_disable"),
            "host.enable": mutation(lambda i, a, r: hosts.enable(a.name), "host_enable"),
            "host.remove": mutation(lambda i, a, r: hosts.remove(a.name), "host_remove"),
            "image.list": image_list,
            "vm.console": console,
            "task.list": task_list,
            "task.wait": lambda i, a, r: vms.wait_task(i, a),
            "session.whoami": whoami,
            "session.complete": complete,
        }
        for name in ("shutdown", "reboot", "cycle", "destroy", "pause", "resume", "hibernate",
                     "migrate"):
            table[f"vm.{name}"] = verb(name)
        return table

    async def _client_request(self, conn: Connection, op: Op, args: Any, rid: str) -> Any:
        identity: Identity = conn.context["identity"]
        if op.admin_only and not identity.site_admin:
            raise PermissionDenied(f"only the site admin may {op.name.replace('.', ' ')}")
        # Console sessions belong to the connection that opened them.
        if op.name == "vm.console_open":
            return await self.consoles.open(identity, conn, args)
        if op.name == "vm.console_input":
            return await self.consoles.input(conn, args)
        if op.name == "vm.console_close":
            return await self.consoles.close(conn, args)
        return await self._client_ops[op.name](identity, args, rid)

    async def _node_request(self, conn: Connection, op: Op, args: Any, rid: str) -> Any:
        if op.name == "node.register":
            return await self.hosts.register(conn, args)
        raise PermissionDenied(f"operation {op.name} is not for a node")

    def _node_push(self, conn: Connection, topic: str, body: Any) -> None:
        self.hosts.heartbeat(conn)
        if topic == "domain":
            self.hosts.domain_event(conn, body)
        elif topic == "migration":
            self.vms.migrations.progress(conn.context.get("host", ""), body)
        elif topic == "node_console" and "host" in conn.context:
            self.consoles.node_output(conn.context["host"], body)


def _prepare_socket_path(path: Path) -> Path:
    """Clear a stale socket at ``path`` (start-up only, so blocking is fine).

    Raises:
        ConfigError: something other than a socket is there.
    """
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise ConfigError(f"listen_unix = {path} exists and is not a socket; "
                              f"remove it or choose another path")
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
