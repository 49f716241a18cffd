"""Seam tests of the client's connection handling against a real TLS server.

The server is the loopback :class:`FakeController` of ``fake_controller.py``: real
sockets, real TLS with site-CA certificates, the real frames and Connection.
What is tested is the client's own logic: resending an interrupted mutation
under the same request id, replaying completions missed while disconnected,
never retrying a refused login, bounded and growing reconnect delays, and
clear errors when connecting fails.
"""

from __future__ import annotations

import asyncio
import random
import socket
import threading
from collections.abc import Callable
from typing import Any

import pytest

from usher.client import AsyncClient, Backoff, Client, TaskInfo
from usher.errors import AuthenticationFailed, NotConnected, PermissionDenied
from usher.protocol.connection import Connection
from usher.protocol.ops import Accepted, VmStateMsg

from .fake_controller import PASSWORD, USER, FakeController, Pki

pytestmark = pytest.mark.timeout(30)

MakeClient = Callable[..., AsyncClient]


def task(tid: str, state: str, vm: str = f"web1.{USER}.usher.test", **kw: Any) -> TaskInfo:
    return TaskInfo(id=tid, op="vm.start", vm=vm, state=state, user=USER, **kw)


class Recorder:
    """Collects callbacks and lets a test wait for one that matches."""

    def __init__(self, client: AsyncClient) -> None:
        self.tasks: list[TaskInfo] = []
        self.vms: list[VmStateMsg] = []
        self.states: list[tuple[str, str]] = []
        self._changed = asyncio.Event()
        client.on_task = self._task
        client.on_vm = self._vm
        client.on_connection = self._conn

    def _task(self, info: TaskInfo) -> None:
        self.tasks.append(info)
        self._changed.set()

    def _vm(self, msg: VmStateMsg) -> None:
        self.vms.append(msg)
        self._changed.set()

    def _conn(self, state: str, detail: str) -> None:
        self.states.append((state, detail))
        self._changed.set()

    async def until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    def seen(self, state: str) -> bool:
        return any(s == state for s, _ in self.states)


# ------------------------------------------------------------------ resend
async def test_mutation_in_flight_is_resent_with_same_id(controller: FakeController,
                                                         make_client: MakeClient) -> None:
    calls = 0

    async def start(conn: Connection, args: Any, rid: str) -> Accepted:
        nonlocal calls
        calls += 1
        if calls == 1:
            controller.drop_all()  # the reply never leaves
            await asyncio.sleep(60)
        return Accepted(tasks=[task("t1", "queued")])

    controller.handlers["vm.start"] = start
    client = make_client(controller.port)
    rec = Recorder(client)
    await client.connect()
    try:
        tasks = await client.start(["web1"])
    finally:
        await client.close()
    starts = controller.ops("vm.start")
    assert len(starts) == 2
    assert starts[0][1] == starts[1][1], "the resend must reuse the idempotency key"
    assert starts[0][2].names == ["web1"]
    assert [t.id for t in tasks] == ["t1"]
    assert controller.hellos == 2
    assert [s for s, _ in rec.states] == ["connected", "disconnected", "reconnecting",
                                          "connected"]
    assert rec.states[-1][1].startswith("reconnected to 127.0.0.1:")


async def test_caller_request_id_is_the_idempotency_key(controller: FakeController,
                                                        make_client: MakeClient) -> None:
    async def destroy(conn: Connection, args: Any, rid: str) -> Accepted:
        if len(controller.ops("vm.destroy")) == 1:
            controller.drop_all()
            await asyncio.sleep(60)
        return Accepted(tasks=[task("t9", "queued")])

    controller.handlers["vm.destroy"] = destroy
    client = make_client(controller.port)
    await client.connect()
    try:
        await client.destroy(["web1"], force=True, request_id="req-42")
    finally:
        await client.close()
    assert [r[1] for r in controller.ops("vm.destroy")] == ["req-42", "req-42"]
    assert all(r[2].force for r in controller.ops("vm.destroy"))


async def test_each_mutation_gets_a_fresh_id(controller: FakeController,
                                             make_client: MakeClient) -> None:
    async def pause(conn: Connection, args: Any, rid: str) -> Accepted:
        return Accepted(tasks=[])

    controller.handlers["vm.pause"] = pause
    client = make_client(controller.port)
    await client.connect()
    try:
        await client.pause(["a"])
        await client.pause(["a"])
    finally:
        await client.close()
    ids = [r[1] for r in controller.ops("vm.pause")]
    assert len(set(ids)) == 2


# ------------------------------------------------------------------ replay
async def test_completion_missed_while_disconnected_is_replayed(
        controller: FakeController, make_client: MakeClient) -> None:
    done = task("t1", "done", vm_state="running")

    async def start(conn: Connection, args: Any, rid: str) -> Accepted:
        return Accepted(tasks=[task("t1", "running"), task("t2", "running")])

    async def task_list(conn: Connection, args: Any, rid: str) -> list[TaskInfo]:
        return [done, task("t2", "running")] if "t1" in args.ids else []

    controller.handlers["vm.start"] = start
    controller.handlers["task.list"] = task_list
    client = make_client(controller.port)
    rec = Recorder(client)
    await client.connect()
    try:
        await client.start(["{1..2}.web"])
        controller.drop_all()  # t1 ends while the client is away
        await rec.until(lambda: any(t.id == "t1" for t in rec.tasks))
        assert rec.tasks == [done]
        replay = controller.ops("task.list")
        assert sorted(replay[0][2].ids) == ["t1", "t2"]
        # The replayed completion is what wait() answers now, without asking.
        assert await client.wait("t1") == done
        assert controller.ops("task.wait") == []
    finally:
        await client.close()


async def test_completion_is_delivered_once(controller: FakeController,
                                            make_client: MakeClient) -> None:
    done = task("t1", "done")

    async def start(conn: Connection, args: Any, rid: str) -> Accepted:
        conn.push("task", task("t1", "running", progress="booting"))
        conn.push("task", done)
        conn.push("task", done)  # a repeat, as after a replay
        conn.push("vm", VmStateMsg(name="web1", state="running"))
        return Accepted(tasks=[task("t1", "queued")])

    controller.handlers["vm.start"] = start
    client = make_client(controller.port)
    rec = Recorder(client)
    await client.connect()
    try:
        tasks = await client.start(["web1"])
        await rec.until(lambda: bool(rec.vms))
    finally:
        await client.close()
    assert [t.state for t in rec.tasks] == ["running", "done"]
    assert tasks == [done], "the push overtook the reply: the newest state wins"


async def test_wait_all_when_completion_raced_ahead(controller: FakeController,
                                                    make_client: MakeClient) -> None:
    async def start(conn: Connection, args: Any, rid: str) -> Accepted:
        for i in (1, 2):
            conn.push("task", task(f"t{i}", "done"))
        return Accepted(tasks=[task("t1", "queued"), task("t2", "queued"),
                               task("t3", "queued")])

    async def task_wait(conn: Connection, args: Any, rid: str) -> TaskInfo:
        return task(args.id, "error", message="no capacity")

    controller.handlers["vm.start"] = start
    controller.handlers["task.wait"] = task_wait
    client = make_client(controller.port)
    await client.connect()
    try:
        tasks = await client.start(["{1..3}.web"])
        ended = await client.wait_all(tasks, timeout_s=5)
    finally:
        await client.close()
    assert [(t.id, t.state) for t in ended] == [("t1", "done"), ("t2", "done"), ("t3", "error")]
    assert [r[2].id for r in controller.ops("task.wait")] == ["t3"]


# ------------------------------------------------------------ no retrying
async def test_wrong_password_is_not_retried(controller: FakeController,
                                             make_client: MakeClient) -> None:
    client = make_client(controller.port, password="wrong")
    with pytest.raises(AuthenticationFailed, match="wrong user name or password"):
        await client.connect()
    await asyncio.sleep(0.3)  # longer than several backoff steps
    assert controller.hellos == 1
    await client.close()


async def test_refused_login_during_reconnect_fails_at_once(controller: FakeController,
                                                            make_client: MakeClient) -> None:
    client = make_client(controller.port)
    rec = Recorder(client)
    await client.connect()
    try:
        controller.password = "changed"
        controller.drop_all()
        await rec.until(lambda: rec.seen("failed"))
        await asyncio.sleep(0.3)
        assert controller.hellos == 2, "one reconnect attempt, then no more"
        with pytest.raises(AuthenticationFailed):
            await client.list_hosts()
        # reconnect() is the way back once the password is right again.
        controller.password = PASSWORD
        who = await client.reconnect()
        assert who.user == USER
    finally:
        await client.close()


# ---------------------------------------------------------------- backoff
def test_backoff_doubles_from_initial_and_is_capped() -> None:
    b = Backoff(0.2, 3.0, jitter=0.0)
    assert [b.next_delay() for _ in range(7)] == pytest.approx(
        [0.2, 0.4, 0.8, 1.6, 3.0, 3.0, 3.0])
    b.reset()
    assert b.next_delay() == pytest.approx(0.2)
    assert Backoff(0.2, 30.0).base(10_000) == 30.0  # no overflow on a long outage


def test_backoff_jitter_stays_in_its_band() -> None:
    b = Backoff(0.2, 5.0, jitter=0.5, rng=random.Random(7))
    for attempt in range(40):
        base = b.base(attempt)
        delay = b.next_delay()
        assert base / 2 <= delay <= base <= 5.0
    spread = {round(Backoff(1, 1, rng=random.Random(s)).next_delay(), 6) for s in range(20)}
    assert len(spread) > 10, "jitter must spread clients out"


async def test_reconnect_gives_up_after_its_budget(controller: FakeController,
                                                   make_client: MakeClient) -> None:
    client = make_client(controller.port, reconnect_budget_s=1.0)
    rec = Recorder(client)
    await client.connect()
    try:
        await controller.stop()
        loop = asyncio.get_running_loop()
        began = loop.time()
        with pytest.raises(NotConnected, match="gave up after 1 s"):
            await client.list_hosts()
        assert loop.time() - began < 2.5
        assert rec.seen("failed")
        delays = [float(d.split(" in ")[1].split()[0])
                  for s, d in rec.states if s == "reconnecting"]
        assert len(delays) >= 3
        assert max(delays) <= 0.2
        # Later calls fail at once instead of hanging.
        with pytest.raises(NotConnected):
            await asyncio.wait_for(client.list_hosts(), 0.5)
    finally:
        await client.close()


async def test_completion_does_not_wait_for_a_reconnect(controller: FakeController,
                                                        make_client: MakeClient) -> None:
    client = make_client(controller.port)
    await client.connect()
    try:
        await controller.stop()
        await asyncio.sleep(0.05)
        with pytest.raises(NotConnected):
            await asyncio.wait_for(client.complete("vm", "we"), 0.5)
    finally:
        await client.close()


# ---------------------------------------------------------- connect errors
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_unreachable_controller_is_one_clear_line(make_client: MakeClient) -> None:
    port = free_port()
    client = make_client(port)
    with pytest.raises(NotConnected, match=rf"^cannot connect to 127.0.0.1:{port}: "):
        await client.connect()


async def test_foreign_ca_fails_tls_verification(controller: FakeController, pki: Pki,
                                                 make_client: MakeClient) -> None:
    client = make_client(controller.port, ca_cert=str(pki.other_ca))
    with pytest.raises(PermissionDenied, match="failed TLS verification"):
        await client.connect()


async def test_host_certificate_cannot_pose_as_controller(pki: Pki,
                                                          make_client: MakeClient) -> None:
    impostor = FakeController(pki, as_host=True)
    await impostor.start()
    try:
        client = make_client(impostor.port)
        with pytest.raises(PermissionDenied, match="not a controller certificate"):
            await client.connect()
    finally:
        await impostor.stop()


async def test_calls_before_connect_fail_clearly(make_client: MakeClient) -> None:
    with pytest.raises(NotConnected, match="connect first"):
        await make_client(free_port()).list_vms()


# ------------------------------------------------------------ sync facade
async def test_sync_client_runs_its_own_loop(controller: FakeController, pki: Pki) -> None:
    async def start(conn: Connection, args: Any, rid: str) -> Accepted:
        conn.push("task", task("t1", "done", vm_state="running"))
        return Accepted(tasks=[task("t1", "queued")])

    controller.handlers["vm.start"] = start
    seen: list[tuple[str, str]] = []

    def use() -> list[TaskInfo]:
        with Client("127.0.0.1", controller.port, ca_cert=str(pki.ca), user=USER,
                    password=PASSWORD) as client:
            client.on_task = lambda t: seen.append((t.id, threading.current_thread().name))
            assert client.connect().domain == f"{USER}.usher.test"
            return client.wait_all(client.start(["web1"], ram=512))

    ended = await asyncio.to_thread(use)
    assert [t.state for t in ended] == ["done"]
    assert seen and seen[0][0] == "t1" and seen[0][1].startswith("usher-client:")
    assert controller.ops("vm.start")[0][2].options.ram == 512
