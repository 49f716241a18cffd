"""One established protocol connection, symmetric for both ends.

After hello, both sides of a connection may send requests, replies, pushes and
heartbeats. :class:`Connection` owns the stream: one reader task decodes
frames and routes them (replies to waiting callers, requests to the handler in
tasks of their own, pushes to the push handler), one heartbeat task pings the
peer and closes the connection when it falls silent. Every wait has a timeout
and the number of requests in flight from the peer is bounded: past the bound
the reader stops reading, so TCP pushes back on the peer.

Closing: :meth:`close` is "closed by us"; a peer that disconnects or breaks
the protocol is "closed by peer"; either way pending requests fail with
:class:`ConnectionClosed` and ``on_close`` runs once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from usher.errors import (
    BadFrame,
    ConnectionClosed,
    InvalidRequest,
    PermissionDenied,
    ProtocolError,
    TimedOut,
    UsherError,
    VersionMismatch,
)
from usher.protocol import frames, tls
from usher.protocol.frames import (
    Bye,
    ErrorBody,
    Hello,
    Ping,
    Pong,
    Push,
    Refuse,
    Reply,
    Request,
    Welcome,
)
from usher.protocol.ops import OPS, PUSHES, Caller, Op

log = logging.getLogger(__name__)

RequestHandler = Callable[["Connection", Op, Any, str], Awaitable[Any]]
"""``handler(conn, op, args, request_id) -> result`` for requests from the peer."""

PushHandler = Callable[["Connection", str, Any], None]
"""``push_handler(conn, topic, body)``; called on the reader task: must not block."""

MAX_IN_FLIGHT = 512
"""Requests from one peer being handled at once before the reader pauses."""

MAX_WRITE_BUFFER = 32 * 1024 * 1024
"""A peer that lets this much output pile up is too slow and is disconnected."""


def error_body(exc: UsherError) -> ErrorBody:
    return ErrorBody(code=exc.code, message=exc.message, family=exc.family,
                     details=exc.details)


def error_from_body(body: ErrorBody) -> UsherError:
    return UsherError.from_wire(body.code, body.message, body.family, body.details)


class Connection:
    """A live, authenticated connection to one peer.

    ``peer_role`` is the role of the far end (``client``, ``node`` or
    ``controller``); only operations whose declared caller is that role are
    accepted from it, everything else is refused as data. Create it on the
    event loop that owns the stream.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        peer_role: Caller,
        peer_name: str,
        heartbeat_s: float,
        handler: RequestHandler | None = None,
        push_handler: PushHandler | None = None,
        on_close: Callable[[Connection], None] | None = None,
        max_frame: int = frames.MAX_FRAME,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._reader = reader
        self._writer = writer
        self.peer_role = peer_role
        self.peer_name = peer_name
        self.heartbeat_s = heartbeat_s
        self._handler = handler
        self._push_handler = push_handler
        self._on_close = on_close
        self._max_frame = max_frame
        self._pending: dict[str, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._id_prefix = f"{id(self):x}-"
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._handlers: set[asyncio.Task[None]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = asyncio.Event()
        self.close_reason = ""
        self.closed_by_peer = False
        self.last_seen = time.monotonic()
        self.context: dict[str, Any] = {}  # session data of the owner (user, host, ...)

    # ------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start reading and heartbeating; call once."""
        self._tasks = [
            asyncio.create_task(self._read_loop(), name=f"read:{self.peer_name}"),
            asyncio.create_task(self._heartbeat_loop(), name=f"hb:{self.peer_name}"),
        ]

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def close(self, reason: str = "closed") -> None:
        """Close the connection from our side; idempotent."""
        if not self.closed:
            with contextlib.suppress(Exception):
                self._writer.write(frames.pack(Bye(reason=reason)))
        self._shutdown(reason, by_peer=False)
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._writer.wait_closed(), 2.0)

    def _shutdown(self, reason: str, *, by_peer: bool) -> None:
        if self.closed:
            return
        self.close_reason = reason
        self.closed_by_peer = by_peer
        self._closed.set()
        who = "by peer" if by_peer else "by us"
        err = ConnectionClosed(f"connection to {self.peer_name} closed {who}: {reason}",
                               details={"by_peer": by_peer})
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(err)
        self._pending.clear()
        for task in self._handlers:
            task.cancel()
        with contextlib.suppress(Exception):
            self._writer.close()
        if self._on_close is not None:
            try:
                self._on_close(self)
            except Exception:
                log.exception("on_close handler of %s failed", self.peer_name)

    # --------------------------------------------------------------- sending
    def _send(self, message: frames.Envelope) -> None:
        if self.closed:
            raise ConnectionClosed(f"connection to {self.peer_name} is closed: "
                                   f"{self.close_reason}", details={"by_peer": self.closed_by_peer})
        transport = self._writer.transport
        if transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
            self._shutdown("peer too slow to read its messages", by_peer=False)
            raise ConnectionClosed(f"connection to {self.peer_name} dropped: peer too slow")
        self._writer.write(frames.pack(message))

    def push(self, topic: str, body: Any) -> bool:
        """Send a push; returns False (and drops it) if the connection is closed.

        Safe to call from any thread (hypervisor drivers deliver events on
        their own): off the event loop the push is handed to the loop, since
        asyncio transports are not thread-safe and a write from another thread
        corrupts the TLS stream. It is then dropped there if the connection
        has closed meanwhile.
        """
        if self.closed:
            return False
        try:
            on_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            on_loop = False
        if not on_loop:
            try:
                self._loop.call_soon_threadsafe(self.push, topic, body)
            except RuntimeError:  # the loop is closed
                return False
            return True
        try:
            self._send(Push(topic=topic, body=msgspec.Raw(frames.encode(body))))
        except ConnectionClosed:
            return False
        return True

    async def request(self, op_name: str, args: Any, *, request_id: str | None = None,
                      timeout: float | None = None) -> Any:
        """Call ``op_name`` on the peer and return its decoded result.

        ``request_id`` is the idempotency key of a mutation: the same id sent
        again (after a reconnect, say) returns the first call's result. Raises
        the peer's error rebuilt as an :class:`UsherError`,
        :class:`TimedOut` after ``timeout`` (default: the op's timeout class)
        and :class:`ConnectionClosed` if the connection ends first.
        """
        op = OPS[op_name]
        rid = request_id or f"{self._id_prefix}{next(self._ids)}"
        if rid in self._pending:
            raise InvalidRequest(f"request id {rid!r} is already in flight")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            self._send(Request(id=rid, op=op_name, args=msgspec.Raw(frames.encode(args))))
            wait = op.timeout_s if timeout is None else timeout
            try:
                # The timeout covers the drain too: a peer that stops reading
                # must not hold the caller past it.
                async with asyncio.timeout(wait):
                    if self._writer.transport.get_write_buffer_size() > 256 * 1024:
                        # A lost connection fails the drain; the reader sees the same
                        # loss and fails ``fut`` with ConnectionClosed, raised below.
                        with contextlib.suppress(OSError):
                            await self._writer.drain()
                    reply: Reply = await fut
            except TimeoutError:
                raise TimedOut(f"{op_name} on {self.peer_name} got no answer "
                               f"within {wait:g} s") from None
        finally:
            self._pending.pop(rid, None)
        if reply.error is not None:
            raise error_from_body(reply.error)
        return frames.decode_as(reply.result, op.result)

    # ------------------------------------------------------------- receiving
    async def _read_loop(self) -> None:
        reason, by_peer = "reader stopped", True
        try:
            while True:
                message = await frames.read_frame(self._reader, self._max_frame)
                self.last_seen = time.monotonic()
                if isinstance(message, Reply):
                    fut = self._pending.get(message.id)
                    if fut is not None and not fut.done():
                        fut.set_result(message)
                elif isinstance(message, Request):
                    await self._slots.acquire()
                    task = asyncio.create_task(self._handle(message))
                    self._handlers.add(task)
                    task.add_done_callback(self._handler_done)
                elif isinstance(message, Push):
                    self._on_push(message)
                elif isinstance(message, Ping):
                    self._send(Pong(seq=message.seq))
                elif isinstance(message, Pong):
                    pass
                elif isinstance(message, Bye):
                    reason = f"peer said bye: {message.reason}"
                    break
                else:
                    reason = f"unexpected {type(message).__name__} after hello"
                    break
        except ConnectionClosed as exc:
            reason = exc.message
        except ProtocolError as exc:
            reason = f"protocol error: {exc.message}"
            log.warning("closing connection to %s: %s", self.peer_name, exc.message)
            by_peer = False
        except (OSError, ssl.SSLError) as exc:
            reason = f"connection error: {exc}"
        except asyncio.CancelledError:
            return
        self._shutdown(reason, by_peer=by_peer)

    def _handler_done(self, task: asyncio.Task[None]) -> None:
        self._handlers.discard(task)
        self._slots.release()

    def _on_push(self, message: Push) -> None:
        spec = PUSHES.get(message.topic)
        if spec is None or spec.sender != self.peer_role or self._push_handler is None:
            log.debug("dropping push %r from %s", message.topic, self.peer_name)
            return
        try:
            body = frames.decode_as(message.body, spec.body)
            self._push_handler(self, message.topic, body)
        except BadFrame as exc:
            log.warning("bad %s push from %s: %s", message.topic, self.peer_name, exc)
        except Exception:
            log.exception("push handler failed for %s from %s", message.topic, self.peer_name)

    async def _handle(self, request: Request) -> None:
        try:
            op = OPS.get(request.op)
            if op is None:
                raise InvalidRequest(f"unknown operation {request.op!r}")
            if op.caller != self.peer_role or self._handler is None:
                raise PermissionDenied(f"operation {request.op!r} is not for a {self.peer_role}")
            args = frames.decode_as(request.args, op.args)
            result = await self._handler(self, op, args, request.id)
            reply = Reply(id=request.id, result=msgspec.Raw(frames.encode(result)))
        except UsherError as exc:
            reply = Reply(id=request.id, error=error_body(exc))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("handler of %s from %s failed", request.op, self.peer_name)
            reply = Reply(id=request.id, error=ErrorBody(
                code="internal", family="internal",
                message=f"internal error in {request.op}; see the server's log"))
        with contextlib.suppress(ConnectionClosed):
            self._send(reply)

    async def _heartbeat_loop(self) -> None:
        seq = 0
        try:
            while not self.closed:
                await asyncio.sleep(self.heartbeat_s)
                silent = time.monotonic() - self.last_seen
                if silent > 3 * self.heartbeat_s:
                    self._shutdown(f"peer silent for {silent:.1f} s", by_peer=True)
                    return
                seq += 1
                with contextlib.suppress(ConnectionClosed):
                    self._send(Ping(seq=seq))
        except asyncio.CancelledError:
            return


def address_text(host: str, port: int) -> str:
    """How a controller address is shown: ``HOST:PORT``, or ``unix:PATH`` for a socket."""
    return f"unix:{host}" if host.startswith("/") else f"{host}:{port}"


async def dial(
    host: str,
    port: int,
    ssl_context: ssl.SSLContext,
    hello: Hello,
    *,
    server_hostname: str | None = None,
    timeout: float = 10.0,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Welcome]:
    """Open a TLS connection, send ``hello`` and wait for the welcome.

    A ``host`` that is an absolute path is the controller's Unix socket
    (``port`` is then ignored; the certificate is checked against
    ``server_hostname``, default ``localhost``).

    Raises the controller's refusal as an :class:`UsherError` (a wrong
    password is :class:`AuthenticationFailed`), :class:`TimedOut` when no
    answer arrives in ``timeout``, and :class:`ConnectionClosed` on a drop.
    Raises :class:`PermissionDenied` when TLS verification fails or the server's
    certificate is not a *controller* certificate; that is checked before the
    hello, which may carry a password or a join token, is sent.
    """
    where = address_text(host, port)
    try:
        if host.startswith("/"):
            opening = asyncio.open_unix_connection(
                host, ssl=ssl_context, server_hostname=server_hostname or "localhost",
                limit=2 ** 20)
        else:
            opening = asyncio.open_connection(host, port, ssl=ssl_context,
                                              server_hostname=server_hostname or host,
                                              limit=2 ** 20)
        reader, writer = await asyncio.wait_for(opening, timeout)
    except TimeoutError:
        raise TimedOut(f"no answer from {where} within {timeout:g} s") from None
    except ssl.SSLCertVerificationError as exc:
        raise PermissionDenied(f"controller at {where} failed TLS verification: "
                               f"{exc.verify_message}; check the CA file") from None
    except OSError as exc:
        raise ConnectionClosed(f"cannot connect to {where}: {exc.strerror or exc}",
                               details={"by_peer": True}) from None
    # A host certificate passes the chain and host name checks too: a host posing
    # as the controller must be turned away before it sees the credentials.
    try:
        tls.require_role(writer.get_extra_info("ssl_object"), "controller")
    except UsherError:
        writer.close()
        raise
    try:
        writer.write(frames.pack(hello))
        answer = await asyncio.wait_for(frames.read_frame(reader, frames.MAX_FRAME), timeout)
    except TimeoutError:
        writer.close()
        raise TimedOut(f"controller at {where} did not answer hello "
                       f"within {timeout:g} s") from None
    except OSError as exc:  # a reset or TLS alert mid-hello (ssl.SSLError is an OSError)
        writer.close()
        raise ConnectionClosed(f"connection to {where} broke during hello: {exc}",
                               details={"by_peer": True}) from None
    except BaseException:
        writer.close()
        raise
    if isinstance(answer, Refuse):
        writer.close()
        raise error_from_body(answer.error)
    if not isinstance(answer, Welcome):
        writer.close()
        raise BadFrame(f"expected welcome, got {type(answer).__name__}")
    if answer.version not in hello.versions:
        writer.close()
        raise VersionMismatch(f"controller chose protocol version {answer.version}, "
                              f"which this client does not speak")
    return reader, writer, answer
