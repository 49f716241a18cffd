"""The controller's listener under abuse, against a real in-process controller.

Each test attacks one defence (frame limits, hello deadline, TLS handshake
deadline, the probation cap, login limits, certificate roles, join tokens,
request-id idempotency) and then checks that the controller carries on: a
normal client still logs in and is answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
import time
from pathlib import Path

import msgspec
import pytest
from cryptography import x509

from tests.integration.conftest import (
    HELLO_TIMEOUT_S,
    LOGIN_MAX_FAILURES,
    LOGIN_MAX_FAILURES_PER_ADDRESS,
    MAX_UNAUTHENTICATED,
    OTHER_PASSWORD,
    OTHER_USER,
    WAIT_S,
    RunningController,
)
from usher.errors import AuthenticationFailed, ConnectionClosed, NoCapacity, PermissionDenied
from usher.protocol import frames, tls
from usher.protocol.connection import dial
from usher.protocol.frames import Envelope, Hello, Refuse, Reply, Request, Welcome
from usher.protocol.ops import (
    Accepted,
    Empty,
    ListArgs,
    StartArgs,
    TaskInfo,
    TaskWaitArgs,
    VmInfo,
    WhoAmI,
)

SITE = "usher.test"


async def frames_until_closed(reader: asyncio.StreamReader,
                              limit: int = frames.MAX_FRAME) -> list[Envelope]:
    """Every frame the controller sends until it closes the connection."""
    got: list[Envelope] = []
    async with asyncio.timeout(WAIT_S):
        while True:
            try:
                got.append(await frames.read_frame(reader, limit))
            except (ConnectionClosed, OSError, ssl.SSLError):
                return got


def refusal(messages: list[Envelope]) -> str:
    """The code of the one refusal the controller sent before closing."""
    assert len(messages) == 1, messages
    assert isinstance(messages[0], Refuse), messages
    return messages[0].error.code


def body_frame(body: bytes) -> bytes:
    return struct.pack("!I", len(body)) + body


def nested_request(depth: int) -> bytes:
    """A request whose arguments are ``depth`` nested arrays."""
    enc = msgspec.msgpack.encode
    return (b"\x84" + enc("t") + enc("req") + enc("id") + enc("x") + enc("op")
            + enc("session.whoami") + enc("args") + b"\x91" * depth + b"\xc0")


async def logged_in_raw(controller: RunningController
                        ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await controller.open_tls()
    writer.write(frames.pack(controller.client_hello()))
    welcome = await asyncio.wait_for(frames.read_frame(reader, frames.MAX_FRAME), WAIT_S)
    assert isinstance(welcome, Welcome)
    return reader, writer


# ------------------------------------------------------------------ frames
async def test_oversized_frame_before_hello_is_refused(controller: RunningController) -> None:
    reader, writer = await controller.open_tls()
    writer.write(struct.pack("!I", frames.PRELOGIN_MAX_FRAME + 1))
    assert refusal(await frames_until_closed(reader)) == "frame_too_large"
    await controller.assert_serving()


async def test_large_hello_is_refused(controller: RunningController) -> None:
    # Well under MAX_FRAME, but a login has no business being this big.
    hello = controller.client_hello(password="x" * (frames.PRELOGIN_MAX_FRAME + 10))
    reader, writer = await controller.open_tls()
    writer.write(frames.pack(hello))
    assert refusal(await frames_until_closed(reader)) == "frame_too_large"
    await controller.assert_serving()


async def test_oversized_frame_after_login_closes(controller: RunningController) -> None:
    reader, writer = await logged_in_raw(controller)
    writer.write(struct.pack("!I", frames.MAX_FRAME + 1) + b"\0" * 1024)
    got = await frames_until_closed(reader)
    assert not [m for m in got if isinstance(m, Reply)]
    await controller.assert_serving()


@pytest.mark.parametrize("body", [
    pytest.param(b"\xc1", id="never-used-byte"),
    pytest.param(b"\x82\xa1t\xa5hello", id="truncated"),
    pytest.param(b"\xdf\xff\xff\xff\xff", id="huge-map-header"),
    pytest.param(msgspec.msgpack.encode({"t": "hello", "versions": "1", "role": "client"}),
                 id="wrong-types"),
    pytest.param(msgspec.msgpack.encode({"t": "nonsense"}), id="unknown-tag"),
    pytest.param(msgspec.msgpack.encode([1, 2, 3]), id="not-a-map"),
    pytest.param(b"\x91" * 15000 + b"\xc0", id="nested-arrays"),
    pytest.param(nested_request(15000), id="nested-request"),
    pytest.param(frames.pack(Request(id="1", op="session.whoami",
                                     args=msgspec.Raw(b"\x80")))[4:], id="request-first"),
])
async def test_garbled_frame_before_hello_is_refused(controller: RunningController,
                                                     body: bytes) -> None:
    reader, writer = await controller.open_tls()
    writer.write(body_frame(body))
    assert refusal(await frames_until_closed(reader)) == "bad_frame"
    await controller.assert_serving()


async def test_deeply_nested_frame_after_login_closes(controller: RunningController) -> None:
    # A million nested arrays: msgspec's recursion guard, not the stack, stops it.
    reader, writer = await logged_in_raw(controller)
    writer.write(body_frame(nested_request(1_000_000)))
    got = await frames_until_closed(reader)
    assert not [m for m in got if isinstance(m, Reply)]
    await controller.assert_serving()


async def test_garbage_after_login_closes(controller: RunningController) -> None:
    reader, writer = await logged_in_raw(controller)
    writer.write(body_frame(b"\xc1\xc1\xc1"))
    got = await frames_until_closed(reader)
    assert not [m for m in got if isinstance(m, Reply)]
    await controller.assert_serving()


# ------------------------------------------------------------- probation
async def test_client_without_hello_is_dropped(controller: RunningController) -> None:
    reader, _writer = await controller.open_tls()
    started = time.monotonic()
    assert refusal(await frames_until_closed(reader)) == "timeout"
    assert HELLO_TIMEOUT_S * 0.8 <= time.monotonic() - started < HELLO_TIMEOUT_S + 2.0
    await controller.assert_serving()


async def test_unfinished_tls_handshake_is_dropped(controller: RunningController) -> None:
    reader, writer = await asyncio.open_connection(controller.host, controller.port)
    try:
        started = time.monotonic()
        async with asyncio.timeout(WAIT_S):
            with contextlib.suppress(ConnectionResetError):
                assert await reader.read(1024) == b""
        assert time.monotonic() - started < HELLO_TIMEOUT_S + 2.0
    finally:
        writer.close()
    await controller.assert_serving()


async def test_unauthenticated_connections_are_capped(controller: RunningController) -> None:
    idle = [await controller.open_tls() for _ in range(MAX_UNAUTHENTICATED)]
    await asyncio.sleep(0.02)  # let the controller accept the last of them
    extra_reader, _ = await controller.open_tls()
    # Over the cap: closed at once, without even a refusal.
    assert await frames_until_closed(extra_reader) == []
    # Within the cap: dropped only when the hello deadline passes.
    for reader, _writer in idle:
        assert refusal(await frames_until_closed(reader)) == "timeout"
    await controller.assert_serving()


# ------------------------------------------------------------------ logins
async def test_wrong_password_fails(controller: RunningController) -> None:
    with pytest.raises(AuthenticationFailed):
        await controller.login(password="not the password")
    with pytest.raises(AuthenticationFailed):
        await controller.login(user="nobody")
    await controller.assert_serving()


async def test_failed_logins_are_limited_per_user(controller: RunningController) -> None:
    for _ in range(LOGIN_MAX_FAILURES):
        answer = await controller.hello(controller.client_hello(password="wrong"),
                                        local_addr="127.0.0.2")
        assert isinstance(answer, Refuse) and answer.error.code == "auth_failed"
    # The right password, from an address with no failures: the user is limited.
    answer = await controller.hello(controller.client_hello(), local_addr="127.0.0.3")
    assert isinstance(answer, Refuse) and answer.error.code == "rate_limited"
    # Other users are not.
    answer = await controller.hello(controller.client_hello(OTHER_USER, OTHER_PASSWORD),
                                    local_addr="127.0.0.3")
    assert isinstance(answer, Welcome) and answer.user == OTHER_USER
    await controller.assert_serving(OTHER_USER, OTHER_PASSWORD)


async def test_failed_logins_are_limited_per_address(controller: RunningController) -> None:
    # Each name fails once, so only the address's own limit can bite.
    for i in range(LOGIN_MAX_FAILURES_PER_ADDRESS - 1):
        answer = await controller.hello(controller.client_hello(f"nobody{i}", "wrong"),
                                        local_addr="127.0.0.2")
        assert isinstance(answer, Refuse) and answer.error.code == "auth_failed"
    answer = await controller.hello(controller.client_hello(), local_addr="127.0.0.2")
    assert isinstance(answer, Welcome)  # one failure short of the limit
    answer = await controller.hello(controller.client_hello("nobody", "wrong"),
                                    local_addr="127.0.0.2")
    assert isinstance(answer, Refuse) and answer.error.code == "auth_failed"
    answer = await controller.hello(controller.client_hello(), local_addr="127.0.0.2")
    assert isinstance(answer, Refuse) and answer.error.code == "rate_limited"
    await controller.assert_serving()  # from 127.0.0.1


async def test_no_common_version_is_refused(controller: RunningController) -> None:
    answer = await controller.hello(controller.client_hello(versions=[99, 100]))
    assert isinstance(answer, Refuse) and answer.error.code == "version_mismatch"
    await controller.assert_serving()


async def test_unknown_role_is_refused(controller: RunningController) -> None:
    answer = await controller.hello(Hello(versions=[1], role="controller"))
    assert isinstance(answer, Refuse) and answer.error.code == "bad_frame"
    await controller.assert_serving()


# ------------------------------------------------------------ certificates
async def test_host_certificate_cannot_open_client_session(
        controller: RunningController) -> None:
    cert = controller.issue_host_cert(f"vmm1.{SITE}")
    answer = await controller.hello(controller.client_hello(), cert=cert)
    assert isinstance(answer, Refuse) and answer.error.code == "permission_denied"
    await controller.assert_serving()


async def test_node_needs_certificate_or_token(controller: RunningController) -> None:
    hostname = f"vmm1.{SITE}"
    answer = await controller.hello(Hello(versions=[1], role="node", hostname=hostname))
    assert isinstance(answer, Refuse) and answer.error.code == "permission_denied"
    cert = controller.issue_host_cert(hostname)
    answer = await controller.hello(Hello(versions=[1], role="node", hostname=f"vmm2.{SITE}"),
                                    cert=cert)
    assert isinstance(answer, Refuse) and answer.error.code == "permission_denied"
    answer = await controller.hello(Hello(versions=[1], role="node", hostname=hostname),
                                    cert=cert)
    assert isinstance(answer, Welcome) and answer.host_cert_pem is None
    await controller.assert_serving()


async def test_join_token_is_used_once_for_its_host(controller: RunningController,
                                                     tmp_path: Path) -> None:
    hostname = f"vmm9.{SITE}"
    token = await asyncio.to_thread(controller.add_join_token, hostname)

    def join(name: str) -> Hello:
        return Hello(versions=[1], role="node", hostname=name, join_token=token)

    answer = await controller.hello(join(f"vmm8.{SITE}"))
    assert isinstance(answer, Refuse) and answer.error.code == "auth_failed"
    answer = await controller.hello(join(hostname))
    assert isinstance(answer, Welcome)
    assert answer.host_cert_pem and answer.host_key_pem
    cert = x509.load_pem_x509_certificate(answer.host_cert_pem.encode())
    assert tls.cert_role(answer.host_cert_pem.encode()) == "host"
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == [hostname]
    answer_again = await controller.hello(join(hostname))
    assert isinstance(answer_again, Refuse) and answer_again.error.code == "auth_failed"

    # The certificate it got is what the host logs in with from now on.
    cert_file, key_file = tmp_path / "joined.crt", tmp_path / "joined.key"
    cert_file.write_text(answer.host_cert_pem)
    key_file.write_text(answer.host_key_pem)
    welcome = await controller.hello(Hello(versions=[1], role="node", hostname=hostname),
                                     cert=(cert_file, key_file))
    assert isinstance(welcome, Welcome)
    await controller.assert_serving()


async def test_expired_join_token_is_refused(controller: RunningController) -> None:
    hostname = f"vmm9.{SITE}"
    token = await asyncio.to_thread(controller.add_join_token, hostname, -1.0)
    answer = await controller.hello(Hello(versions=[1], role="node", hostname=hostname,
                                          join_token=token))
    assert isinstance(answer, Refuse) and answer.error.code == "auth_failed"
    await controller.assert_serving()


async def test_host_posing_as_controller_is_refused(controller: RunningController) -> None:
    cert, key = controller.issue_host_cert("localhost")
    server_ssl = tls.server_context(cert, key, controller.ca)
    received: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ssl.SSLError):
            received.append(await reader.read(65536))
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_ssl)
    port = server.sockets[0].getsockname()[1]
    try:
        # Chain and host name check out: a host certificate is good for serverAuth.
        _reader, writer = await asyncio.wait_for(asyncio.open_connection(
            "127.0.0.1", port, ssl=controller.client_ssl(), server_hostname="localhost"),
            WAIT_S)
        try:
            with pytest.raises(PermissionDenied) as info:
                tls.require_role(writer.get_extra_info("ssl_object"), "controller")
            assert info.value.details == {"expected": "controller", "actual": "host"}
        finally:
            writer.close()
        # dial, which clients and node managers use, hangs up before the hello:
        # the impostor never sees the password.
        with pytest.raises(PermissionDenied, match="not a controller certificate"):
            await dial("127.0.0.1", port, controller.client_ssl(), controller.client_hello(),
                       server_hostname="localhost", timeout=WAIT_S)
        await asyncio.sleep(0.05)
        assert not any(controller.password.encode() in data for data in received)
    finally:
        server.close()
        await server.wait_closed()
    await controller.assert_serving()


# ------------------------------------------------------------- mutations
async def test_failed_mutation_is_not_cached(controller: RunningController) -> None:
    conn = await controller.login()
    args = StartArgs(names=["web"])
    for _ in range(2):
        with pytest.raises(NoCapacity):
            await conn.request("vm.start", args, request_id="start-web-1")
    # Now a host can take it: the same request id runs again, for real.
    await controller.start_node(f"vmm1.{SITE}")
    first = await conn.request("vm.start", args, request_id="start-web-1")
    assert isinstance(first, Accepted) and len(first.tasks) == 1
    # Repeats, from this session or another of the same user, get the same tasks.
    again = await conn.request("vm.start", args, request_id="start-web-1")
    other_session = await controller.login()
    third = await other_session.request("vm.start", args, request_id="start-web-1")
    assert [t.id for t in again.tasks] == [t.id for t in third.tasks] == [first.tasks[0].id]
    done = await conn.request("task.wait", TaskWaitArgs(id=first.tasks[0].id, timeout_s=WAIT_S))
    assert isinstance(done, TaskInfo) and done.state == "done", done
    vms = await conn.request("vm.list", ListArgs())
    assert [v.name for v in vms] == [f"web.{controller.user}.{SITE}"]
    assert vms[0].state == "running" and vms[0].host == f"vmm1.{SITE}"
    # The key is scoped to the caller: another user's same id is a call of its own.
    horton = await controller.login(OTHER_USER, OTHER_PASSWORD)
    theirs = await horton.request("vm.start", args, request_id="start-web-1")
    assert theirs.tasks[0].id != first.tasks[0].id
    assert theirs.tasks[0].vm == f"web.{OTHER_USER}.{SITE}"
    await controller.assert_serving()


async def test_concurrent_starts_of_one_new_name(controller: RunningController) -> None:
    await controller.start_node(f"vmm1.{SITE}")
    one, two = await controller.login(), await controller.login()
    args = StartArgs(names=["db"])
    first, second = await asyncio.gather(one.request("vm.start", args),
                                         two.request("vm.start", args))
    assert isinstance(first, Accepted) and isinstance(second, Accepted)
    vms: list[VmInfo] = await one.request("vm.list", ListArgs())
    assert [v.name for v in vms] == [f"db.{controller.user}.{SITE}"]
    for accepted in (first, second):
        task = await one.request("task.wait",
                                 TaskWaitArgs(id=accepted.tasks[0].id, timeout_s=WAIT_S))
        assert task.state == "done", task
    vms = await two.request("vm.list", ListArgs())
    assert len(vms) == 1 and vms[0].state == "running"
    me = await two.request("session.whoami", Empty())
    assert isinstance(me, WhoAmI)
    await controller.assert_serving()
