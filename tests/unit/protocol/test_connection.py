"""Tests of usher.protocol.connection over real loopback sockets.

Each test gets a TCP connection on 127.0.0.1 (plain TCP: TLS is tested in
test_tls.py and against the controller) and puts a :class:`Connection` on
either end, or a real one on one end and raw frames on the other to play a
misbehaving peer.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest

from usher.errors import (
    AuthenticationFailed,
    BadFrame,
    ConnectionClosed,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    TimedOut,
    UsherError,
    VersionMismatch,
    VmNotFound,
)
from usher.protocol import frames, tls
from usher.protocol.connection import Connection, dial, error_body, error_from_body
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
from usher.protocol.ops import (
    OPS,
    Accepted,
    DefineArgs,
    DomainEventMsg,
    DomainSpecMsg,
    Empty,
    Op,
    StartArgs,
    TaskInfo,
    TaskWaitArgs,
    WhoAmI,
)
from usher.protocol.ops import Caller as Role
from usher.protocol.pki import write_site_pki

WAIT_S = 5.0
ME = WhoAmI(user="seuss", domain="seuss.usher.test", site="usher.test", site_admin=False,
            usher_user=True)
TASK = TaskInfo(id="t1", op="start", vm="web.seuss.usher.test", state="done", user="seuss")
Handler = Callable[[Connection, Op, Any, str], Awaitable[Any]]


@dataclass
class Link:
    """Both ends of one loopback TCP connection."""

    server: tuple[asyncio.StreamReader, asyncio.StreamWriter]
    client: tuple[asyncio.StreamReader, asyncio.StreamWriter]
    conns: list[Connection] = field(default_factory=list)

    def end(self, side: str, peer_role: Role, *, heartbeat_s: float = 5.0,
            handler: Handler | None = None,
            push_handler: Callable[[Connection, str, Any], None] | None = None,
            on_close: Callable[[Connection], None] | None = None) -> Connection:
        """A started Connection on ``side`` ("server" or "client")."""
        reader, writer = self.server if side == "server" else self.client
        conn = Connection(reader, writer, peer_role=peer_role, peer_name=f"{side}'s peer",
                          heartbeat_s=heartbeat_s, handler=handler, push_handler=push_handler,
                          on_close=on_close)
        conn.start()
        self.conns.append(conn)
        return conn

    def pair(self, *, handler: Handler | None = None, heartbeat_s: float = 5.0,
             client_pushes: Callable[[Connection, str, Any], None] | None = None
             ) -> tuple[Connection, Connection]:
        """A controller on the server side serving a client on the client side."""
        controller = self.end("server", "client", heartbeat_s=heartbeat_s, handler=handler)
        client = self.end("client", "controller", heartbeat_s=heartbeat_s,
                          push_handler=client_pushes)
        return controller, client

    # Raw frames from the client side, for playing a misbehaving peer.
    def send_raw(self, message: frames.Envelope) -> None:
        self.client[1].write(frames.pack(message))

    async def read_raw(self) -> frames.Envelope:
        """The next frame at the client side that is not a heartbeat."""
        while True:
            message = await asyncio.wait_for(
                frames.read_frame(self.client[0], frames.MAX_FRAME), WAIT_S)
            if not isinstance(message, Ping | Pong):
                return message


@pytest.fixture
async def link() -> AsyncIterator[Link]:
    accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = \
        asyncio.Queue()

    async def on_accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accepted.put((reader, writer))

    server = await asyncio.start_server(on_accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = await asyncio.open_connection("127.0.0.1", port)
    ends = Link(server=await asyncio.wait_for(accepted.get(), WAIT_S), client=client)
    try:
        yield ends
    finally:
        for conn in ends.conns:
            await conn.close("test over")
        for _, writer in (ends.server, ends.client):
            writer.close()
        server.close()
        await server.wait_closed()


async def serve_whoami(conn: Connection, op: Op, args: Any, rid: str) -> Any:
    return ME


# ------------------------------------------------------------------ calls
async def test_request_gets_its_reply(link: Link) -> None:
    seen: list[tuple[str, Any, str]] = []

    async def handler(conn: Connection, op: Op, args: Any, rid: str) -> Any:
        seen.append((op.name, args, rid))
        return ME if op.name == "session.whoami" else Accepted(tasks=[TASK])

    controller, client = link.pair(handler=handler)
    assert await client.request("session.whoami", Empty()) == ME
    accepted = await client.request("vm.start", StartArgs(names=["web"]), request_id="mine-1")
    assert accepted == Accepted(tasks=[TASK])
    assert seen[0][:2] == ("session.whoami", Empty())
    assert seen[1] == ("vm.start", StartArgs(names=["web"]), "mine-1")


async def test_concurrent_requests_are_matched_by_id(link: Link) -> None:
    async def handler(conn: Connection, op: Op, args: Any, rid: str) -> Any:
        await asyncio.sleep(0.05 if args.id == "slow" else 0)
        return TaskInfo(id=args.id, op="start", vm="v", state="done", user="u")

    _, client = link.pair(handler=handler)
    slow, fast = await asyncio.gather(client.request("task.wait", TaskWaitArgs(id="slow")),
                                      client.request("task.wait", TaskWaitArgs(id="fast")))
    assert (slow.id, fast.id) == ("slow", "fast")


async def test_error_reply_is_rebuilt_as_its_class(link: Link) -> None:
    async def handler(conn: Connection, op: Op, args: Any, rid: str) -> Any:
        raise VmNotFound("no VM named web; see 'list'", details={"name": "web"})

    _, client = link.pair(handler=handler)
    with pytest.raises(VmNotFound) as info:
        await client.request("session.whoami", Empty())
    assert info.value.message == "no VM named web; see 'list'"
    assert info.value.details == {"name": "web"}
    assert not client.closed


async def test_unknown_error_code_is_rebuilt_as_its_family(link: Link) -> None:
    client = link.end("server", "controller")  # the raw client side plays the controller
    call = asyncio.create_task(client.request("session.whoami", Empty(), request_id="q1"))
    request = await link.read_raw()
    assert isinstance(request, Request) and request.id == "q1"
    link.send_raw(Reply(id="q1", error=ErrorBody(code="vm_vanished", family="not_found",
                                                 message="gone", details={"k": 1})))
    with pytest.raises(NotFound) as info:
        await asyncio.wait_for(call, WAIT_S)
    assert type(info.value) is NotFound and info.value.details == {"k": 1}


async def test_handler_crash_is_an_internal_error(link: Link) -> None:
    async def handler(conn: Connection, op: Op, args: Any, rid: str) -> Any:
        raise RuntimeError("secret internals")

    _, client = link.pair(handler=handler)
    with pytest.raises(UsherError) as info:
        await client.request("session.whoami", Empty())
    assert type(info.value) is UsherError and info.value.code == "internal"
    assert "secret" not in info.value.message
    assert not client.closed


async def test_result_of_the_wrong_shape_is_a_bad_frame(link: Link) -> None:
    async def handler(conn: Connection, op: Op, args: Any, rid: str) -> Any:
        return ["not", "a", "whoami"]

    _, client = link.pair(handler=handler)
    with pytest.raises(BadFrame):
        await client.request("session.whoami", Empty())


# ------------------------------------------------------ refused as data
async def test_unknown_operation_is_refused_as_data(link: Link) -> None:
    link.end("server", "client", handler=serve_whoami)
    link.send_raw(Request(id="1", op="vm.explode", args=msgspec.Raw(frames.encode(Empty()))))
    reply = await link.read_raw()
    assert isinstance(reply, Reply) and reply.id == "1" and reply.error is not None
    assert type(error_from_body(reply.error)) is InvalidRequest
    assert "vm.explode" in reply.error.message
    # The connection carries on.
    link.send_raw(Request(id="2", op="session.whoami", args=msgspec.Raw(frames.encode(Empty()))))
    reply = await link.read_raw()
    assert isinstance(reply, Reply) and reply.error is None
    assert frames.decode_as(reply.result, WhoAmI) == ME


@pytest.mark.parametrize("op_name", ["node.define", "node.register"])
async def test_operation_of_another_caller_is_refused(link: Link, op_name: str) -> None:
    called: list[str] = []

    async def handler(conn: Connection, op: Op, args: Any, rid: str) -> Any:
        called.append(op.name)
        return None

    link.end("server", "client", handler=handler)  # a client may not call node operations
    assert OPS[op_name].caller != "client"
    link.send_raw(Request(id="1", op=op_name, args=msgspec.Raw(frames.encode(Empty()))))
    reply = await link.read_raw()
    assert isinstance(reply, Reply) and reply.error is not None
    assert type(error_from_body(reply.error)) is PermissionDenied
    assert called == []


async def test_operation_of_another_caller_is_refused_end_to_end(link: Link) -> None:
    _, client = link.pair(handler=serve_whoami)
    spec = DomainSpecMsg(uuid="u", name="n", memory_mib=1, vcpus=1, mac="m", owner="o",
                         task_id="t")
    with pytest.raises(PermissionDenied):
        await client.request("node.define", DefineArgs(spec=spec))


async def test_bad_arguments_are_refused_as_data(link: Link) -> None:
    link.end("server", "client", handler=serve_whoami)
    link.send_raw(Request(id="1", op="vm.start",
                          args=msgspec.Raw(frames.encode({"names": "web"}))))
    reply = await link.read_raw()
    assert isinstance(reply, Reply) and reply.error is not None
    assert reply.error.code == "bad_frame" and reply.error.family == "protocol"


async def test_a_connection_without_handler_refuses_requests(link: Link) -> None:
    _, client = link.pair(handler=None)
    with pytest.raises(PermissionDenied):
        await client.request("session.whoami", Empty())


async def test_request_id_already_in_flight_is_refused(link: Link) -> None:
    gate = asyncio.Event()

    async def handler(conn: Connection, op: Op, args: Any, rid: str) -> Any:
        await gate.wait()
        return ME

    _, client = link.pair(handler=handler)
    first = asyncio.create_task(client.request("session.whoami", Empty(), request_id="same"))
    await asyncio.sleep(0)
    with pytest.raises(InvalidRequest):
        await client.request("session.whoami", Empty(), request_id="same")
    gate.set()
    assert await asyncio.wait_for(first, WAIT_S) == ME


# ------------------------------------------------------------------ pushes
async def test_push_is_delivered_decoded(link: Link) -> None:
    got: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    controller, _ = link.pair(client_pushes=lambda conn, topic, body: got.put_nowait(
        (topic, body)))
    assert controller.push("task", TASK)
    assert await asyncio.wait_for(got.get(), WAIT_S) == ("task", TASK)


async def test_pushes_from_the_wrong_sender_or_of_bad_shape_are_dropped(link: Link) -> None:
    got: list[tuple[str, Any]] = []
    arrived = asyncio.Event()

    def on_push(conn: Connection, topic: str, body: Any) -> None:
        got.append((topic, body))
        arrived.set()

    link.end("server", "node", push_handler=on_push)
    event = DomainEventMsg(uuid="u", name="n", state="running")
    link.send_raw(Push(topic="task", body=msgspec.Raw(frames.encode(TASK))))  # controller's
    link.send_raw(Push(topic="weather", body=msgspec.Raw(frames.encode("sunny"))))
    link.send_raw(Push(topic="domain", body=msgspec.Raw(frames.encode({"uuid": 1}))))
    link.send_raw(Push(topic="domain", body=msgspec.Raw(frames.encode(event))))
    await asyncio.wait_for(arrived.wait(), WAIT_S)
    assert got == [("domain", event)]


async def test_push_on_a_closed_connection_is_dropped(link: Link) -> None:
    controller, _ = link.pair()
    await controller.close("done")
    assert controller.push("task", TASK) is False


# --------------------------------------------------------------- heartbeats
async def test_heartbeat_closes_a_silent_peer(link: Link) -> None:
    closed: list[Connection] = []
    conn = link.end("server", "client", heartbeat_s=0.05, on_close=closed.append)
    started = time.monotonic()
    await asyncio.wait_for(conn.wait_closed(), WAIT_S)
    assert 0.1 <= time.monotonic() - started < 2.0
    assert "silent" in conn.close_reason and conn.closed_by_peer
    assert closed == [conn]


async def test_heartbeats_keep_a_live_peer(link: Link) -> None:
    controller, client = link.pair(handler=serve_whoami, heartbeat_s=0.25)
    await asyncio.sleep(1.5)  # six heartbeats, no other traffic (tolerates a loaded box)
    assert not controller.closed and not client.closed
    assert await client.request("session.whoami", Empty()) == ME


async def test_peer_is_answered_with_pong(link: Link) -> None:
    link.end("server", "client")
    link.send_raw(Ping(seq=42))
    while True:
        message = await asyncio.wait_for(frames.read_frame(link.client[0], frames.MAX_FRAME),
                                         WAIT_S)
        if isinstance(message, Pong):
            assert message.seq == 42
            return


# ----------------------------------------------------------------- closing
@pytest.mark.parametrize("how", ["bye", "abort", "eof"])
async def test_pending_requests_fail_when_the_peer_goes(link: Link, how: str) -> None:
    started = asyncio.Event()

    async def handler(conn: Connection, op: Op, args: Any, rid: str) -> Any:
        started.set()
        await asyncio.sleep(3600)

    closed: list[Connection] = []
    controller = link.end("server", "client", handler=handler)
    client = link.end("client", "controller", on_close=closed.append)
    calls = [asyncio.create_task(client.request("session.whoami", Empty())) for _ in range(3)]
    await asyncio.wait_for(started.wait(), WAIT_S)
    if how == "bye":
        await controller.close("controller shutting down")
    elif how == "abort":
        link.server[1].transport.abort()
    else:
        link.server[1].close()
    for call in calls:
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(call, WAIT_S)
        assert info.value.details["by_peer"] is True
    assert client.closed and client.closed_by_peer and closed == [client]
    if how == "bye":
        assert "controller shutting down" in client.close_reason
    with pytest.raises(ConnectionClosed):
        await client.request("session.whoami", Empty())


async def test_close_by_us_fails_pending_requests(link: Link) -> None:
    async def handler(conn: Connection, op: Op, args: Any, rid: str) -> Any:
        await asyncio.sleep(3600)

    closed: list[Connection] = []
    link.end("server", "client", handler=handler)
    client = link.end("client", "controller", on_close=closed.append)
    call = asyncio.create_task(client.request("session.whoami", Empty()))
    await asyncio.sleep(0.01)
    await client.close("user quit")
    await client.close("twice is harmless")
    with pytest.raises(ConnectionClosed) as info:
        await asyncio.wait_for(call, WAIT_S)
    assert info.value.details["by_peer"] is False
    assert not client.closed_by_peer and client.close_reason == "user quit"
    assert closed == [client]


async def test_handlers_are_cancelled_when_the_connection_closes(link: Link) -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def handler(conn: Connection, op: Op, args: Any, rid: str) -> Any:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    controller, client = link.pair(handler=handler)
    asyncio.create_task(client.request("session.whoami", Empty())).add_done_callback(
        lambda t: t.exception())
    await asyncio.wait_for(started.wait(), WAIT_S)
    await client.close("bye")
    await asyncio.wait_for(cancelled.wait(), WAIT_S)
    await asyncio.wait_for(controller.wait_closed(), WAIT_S)


async def test_request_timeout_is_timed_out(link: Link) -> None:
    async def handler(conn: Connection, op: Op, args: Any, rid: str) -> Any:
        if op.name == "task.wait":
            await asyncio.sleep(3600)
        return ME

    _, client = link.pair(handler=handler)
    started = time.monotonic()
    with pytest.raises(TimedOut) as info:
        await client.request("task.wait", TaskWaitArgs(id="t"), timeout=0.05)
    assert time.monotonic() - started < 2.0
    assert "task.wait" in info.value.message
    # The connection is still good, and the late reply (if any) is ignored.
    assert await client.request("session.whoami", Empty()) == ME


async def test_protocol_error_from_the_peer_closes(link: Link) -> None:
    conn = link.end("server", "client")
    link.client[1].write(b"\x00\x00\x00\x01\xc1")
    await asyncio.wait_for(conn.wait_closed(), WAIT_S)
    assert "protocol error" in conn.close_reason and not conn.closed_by_peer


async def test_oversized_frame_from_the_peer_closes(link: Link) -> None:
    conn = link.end("server", "client")
    link.client[1].write((frames.MAX_FRAME + 1).to_bytes(4, "big"))
    await asyncio.wait_for(conn.wait_closed(), WAIT_S)
    assert "exceeds the limit" in conn.close_reason


async def test_unexpected_envelope_after_hello_closes(link: Link) -> None:
    conn = link.end("server", "client")
    link.send_raw(frames.Hello(versions=[1], role="client"))
    await asyncio.wait_for(conn.wait_closed(), WAIT_S)
    assert "unexpected Hello" in conn.close_reason


async def test_bye_from_the_peer_closes(link: Link) -> None:
    conn = link.end("server", "client")
    link.send_raw(Bye(reason="user quit"))
    await asyncio.wait_for(conn.wait_closed(), WAIT_S)
    assert conn.close_reason == "peer said bye: user quit" and conn.closed_by_peer


def test_error_body_round_trip() -> None:
    err = VmNotFound("gone", details={"vm": "web"})
    body = error_body(err)
    assert body == ErrorBody(code="vm_not_found", message="gone", family="not_found",
                             details={"vm": "web"})
    back = error_from_body(body)
    assert type(back) is VmNotFound and back.details == {"vm": "web"}


async def test_large_requests_fail_as_closed_when_the_peer_resets(link: Link) -> None:
    # The peer reads nothing, so big requests wait in our write buffer (and
    # drain); then it resets. Every caller must see ConnectionClosed, not OSError.
    client = link.end("client", "controller")
    big = StartArgs(names=["x" * 1000] * 1000)  # about 1 MB
    calls = [asyncio.create_task(client.request("vm.start", big)) for _ in range(8)]
    await asyncio.sleep(0.05)
    sock = link.server[1].get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    link.server[1].transport.abort()  # RST
    for call in calls:
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(call, WAIT_S)


# -------------------------------------------------------------------- dial
HelloServer = Callable[[asyncio.StreamReader, asyncio.StreamWriter, Hello], Awaitable[None]]
StartTls = Callable[[HelloServer], Awaitable[tuple[int, ssl.SSLContext]]]


@pytest.fixture
async def tls_server(tmp_path: Path) -> AsyncIterator[StartTls]:
    """Start a TLS server answering hello with a given behaviour; returns its
    port and a client context for it."""
    pki = write_site_pki(tmp_path / "pki", site="usher.test", controller_names=[])
    servers: list[asyncio.Server] = []
    writers: list[asyncio.StreamWriter] = []

    async def start(behaviour: HelloServer) -> tuple[int, ssl.SSLContext]:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writers.append(writer)
            hello = await frames.read_frame(reader, frames.PRELOGIN_MAX_FRAME)
            assert isinstance(hello, Hello)
            await behaviour(reader, writer, hello)

        server = await asyncio.start_server(
            serve, "127.0.0.1", 0,
            ssl=tls.server_context(pki.controller_cert, pki.controller_key, pki.ca_cert))
        servers.append(server)
        return server.sockets[0].getsockname()[1], tls.client_context(pki.ca_cert)

    yield start
    for writer in writers:
        writer.close()
    for server in servers:
        server.close()
        await server.wait_closed()


HELLO = Hello(versions=[1], role="client", user="seuss", password="pw")
WELCOME = Welcome(version=1, site="usher.test", heartbeat_s=5.0, session="s", user="seuss")


async def dial_local(port: int, context: ssl.SSLContext, hello: Hello = HELLO,
                     timeout: float = WAIT_S) -> Welcome:
    _, writer, welcome = await dial("127.0.0.1", port, context, hello,
                                    server_hostname="localhost", timeout=timeout)
    writer.close()
    return welcome


async def test_dial_returns_the_welcome(tls_server: StartTls) -> None:
    async def welcome(r: asyncio.StreamReader, w: asyncio.StreamWriter, hello: Hello) -> None:
        assert hello == HELLO
        w.write(frames.pack(WELCOME))

    assert await dial_local(*await tls_server(welcome)) == WELCOME


async def test_dial_raises_the_refusal(tls_server: StartTls) -> None:
    async def refuse(r: asyncio.StreamReader, w: asyncio.StreamWriter, hello: Hello) -> None:
        w.write(frames.pack(Refuse(error=error_body(AuthenticationFailed("login failed")))))

    with pytest.raises(AuthenticationFailed, match="login failed"):
        await dial_local(*await tls_server(refuse))


async def test_dial_refuses_a_version_it_did_not_offer(tls_server: StartTls) -> None:
    async def bad_version(r: asyncio.StreamReader, w: asyncio.StreamWriter,
                          hello: Hello) -> None:
        w.write(frames.pack(msgspec.structs.replace(WELCOME, version=99)))

    with pytest.raises(VersionMismatch):
        await dial_local(*await tls_server(bad_version))


async def test_dial_refuses_an_answer_that_is_not_a_welcome(tls_server: StartTls) -> None:
    async def ping(r: asyncio.StreamReader, w: asyncio.StreamWriter, hello: Hello) -> None:
        w.write(frames.pack(Ping(seq=1)))

    with pytest.raises(BadFrame):
        await dial_local(*await tls_server(ping))


async def test_dial_times_out_on_a_silent_server(tls_server: StartTls) -> None:
    async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter, hello: Hello) -> None:
        await asyncio.sleep(3600)

    with pytest.raises(TimedOut):
        port, context = await tls_server(silent)
        await dial_local(port, context, timeout=0.1)


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_dial_reports_a_drop_during_hello_as_closed(tls_server: StartTls, how: str) -> None:
    async def drop(r: asyncio.StreamReader, w: asyncio.StreamWriter, hello: Hello) -> None:
        if how == "reset":
            sock = w.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            w.transport.abort()
        else:
            w.close()

    with pytest.raises(ConnectionClosed):
        await dial_local(*await tls_server(drop))


async def test_dial_reports_no_listener_as_closed() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connection refused
        with pytest.raises(ConnectionClosed):
            await dial("127.0.0.1", port, ssl.create_default_context(), HELLO, timeout=WAIT_S)


async def test_timeout_covers_a_peer_that_stops_reading(link: Link) -> None:
    # Big requests to a peer that reads nothing fill our write buffer, so the
    # later ones wait for it to drain: the request timeout must cover that wait.
    client = link.end("client", "controller")
    big = StartArgs(names=["x" * 1000] * 1000)  # about 1 MB
    started = time.monotonic()
    calls = [asyncio.create_task(client.request("vm.start", big, timeout=0.2))
             for _ in range(16)]
    for call in calls:
        with pytest.raises(TimedOut):
            await asyncio.wait_for(call, WAIT_S)
    assert time.monotonic() - started < 2.0
    link.client[1].transport.abort()  # nothing will drain the 16 MB: don't wait for it


async def test_pushes_from_other_threads_arrive_intact(tmp_path: Path) -> None:
    # Hypervisor drivers deliver events on their own threads and the node
    # manager pushes them on: the TLS stream must not be corrupted by it.
    pki = write_site_pki(tmp_path / "pki", site="usher.test", controller_names=[])
    accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = \
        asyncio.Queue()

    async def on_accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accepted.put((reader, writer))

    server = await asyncio.start_server(
        on_accept, "127.0.0.1", 0,
        ssl=tls.server_context(pki.controller_cert, pki.controller_key, pki.ca_cert))
    port = server.sockets[0].getsockname()[1]
    got: list[Any] = []
    all_in = asyncio.Event()
    per_thread, threads = 300, 4

    def on_push(conn: Connection, topic: str, body: Any) -> None:
        got.append(body)
        if len(got) == per_thread * threads:
            all_in.set()

    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=tls.client_context(pki.ca_cert), server_hostname="localhost")
    node = Connection(reader, writer, peer_role="controller", peer_name="controller",
                      heartbeat_s=5.0, handler=serve_whoami)
    controller = Connection(*await asyncio.wait_for(accepted.get(), WAIT_S),
                            peer_role="node", peer_name="node", heartbeat_s=5.0,
                            push_handler=on_push)
    node.start()
    controller.start()

    def emit(thread: int) -> None:
        for i in range(per_thread):
            node.push("domain", DomainEventMsg(uuid=f"{thread}-{i}", name="n",
                                               state="running"))

    try:
        await asyncio.gather(*(asyncio.to_thread(emit, t) for t in range(threads)))
        await asyncio.wait_for(all_in.wait(), WAIT_S)
        assert not node.closed and not controller.closed
        for thread in range(threads):
            uuids = [b.uuid for b in got if b.uuid.startswith(f"{thread}-")]
            assert uuids == [f"{thread}-{i}" for i in range(per_thread)]
    finally:
        await node.close("done")
        await controller.close("done")
        server.close()
        await server.wait_closed()
