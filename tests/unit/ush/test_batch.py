"""ush driven as a script would drive it, against a fake controller on loopback.

Batch mode (``ush 'cmd' 'cmd'``): each command's tasks are waited for and
their completions printed before the next command; errors are one line on
stderr; the exit status is the first failure's. The wiring of pushes,
reconnect news and completion is checked here too; the controller's own
behaviour is the end-to-end tests' business.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.unit.client.fake_controller import DOMAIN, PASSWORD, USER, FakeController, Pki
from usher.config import UshConfig
from usher.errors import InvalidState, TaskNotFound
from usher.protocol.connection import Connection
from usher.protocol.ops import Accepted, HostInfo, TaskInfo, VmInfo
from usher.ush.shell import UshApp

pytestmark = pytest.mark.timeout(30)


class Cluster:
    """Just enough controller behaviour: tasks that end by push a moment later."""

    def __init__(self, fake: FakeController) -> None:
        self.vms: dict[str, VmInfo] = {}
        self.tasks: dict[str, TaskInfo] = {}
        self.ended: dict[str, asyncio.Event] = {}
        fake.handlers.update({"vm.start": self.start, "vm.list": self.list_vms,
                              "host.list": self.hosts, "task.wait": self.wait,
                              "task.list": self.task_list, "session.complete": self.complete,
                              "vm.shutdown": self.refuse})

    async def start(self, conn: Connection, args: Any, rid: str) -> Accepted:
        accepted = []
        for name in args.names:
            fqdn = f"{name}.{DOMAIN}"
            info = TaskInfo(id=f"{len(self.tasks) + 1:04d}beef{len(self.tasks):04d}",
                            op="vm.start", vm=fqdn, state="queued", user=USER)
            self.tasks[info.id] = info
            self.ended[info.id] = asyncio.Event()
            accepted.append(info)
            asyncio.get_running_loop().call_later(0.05, self._finish, conn, info,
                                                  args.options.ram or 256)
        return Accepted(tasks=accepted)

    def _finish(self, conn: Connection, info: TaskInfo, ram: int) -> None:
        name = info.vm.split(".")[0]
        if name == "bad":
            end = TaskInfo(id=info.id, op=info.op, vm=info.vm, state="error", user=USER,
                           message="no host has enough memory")
        else:
            end = TaskInfo(id=info.id, op=info.op, vm=info.vm, state="done", user=USER,
                           vm_state="running")
            self.vms[info.vm] = VmInfo(name=info.vm, uuid="u", state="running", owner=USER,
                                       cluster=DOMAIN, host="vmm1", memory_mib=ram, vcpus=1,
                                       mac="52:54:00:00:00:01")
        self.tasks[info.id] = end
        self.ended[info.id].set()
        conn.push("task", end)

    async def list_vms(self, conn: Connection, args: Any, rid: str) -> list[VmInfo]:
        return list(self.vms.values())

    async def hosts(self, conn: Connection, args: Any, rid: str) -> list[HostInfo]:
        return [HostInfo(name="vmm1", state="up", hypervisor="qemu", cpus=8, memory_mib=8192,
                         used_memory_mib=256, used_vcpus=1, vm_count=1)]

    async def wait(self, conn: Connection, args: Any, rid: str) -> TaskInfo:
        event = self.ended.get(args.id)
        if event is None:
            raise TaskNotFound(f"no task {args.id}")
        await event.wait()
        return self.tasks[args.id]

    async def task_list(self, conn: Connection, args: Any, rid: str) -> list[TaskInfo]:
        return [t for t in reversed(self.tasks.values()) if not args.ids or t.id in args.ids]

    async def complete(self, conn: Connection, args: Any, rid: str) -> list[str]:
        if args.kind == "host":
            return ["vmm1"]
        return [n for n in self.vms if n.startswith(args.prefix)]

    async def refuse(self, conn: Connection, args: Any, rid: str) -> Accepted:
        raise InvalidState("web1 is stopped; shutdown needs a running VM")


@pytest.fixture
def cluster(controller: FakeController) -> Cluster:
    return Cluster(controller)


def make_app(pki: Pki, port: int, **config: Any) -> UshApp:
    settings: dict[str, Any] = dict(controller=f"127.0.0.1:{port}", ca_cert=str(pki.ca),
                                    user=USER, password=PASSWORD, history_file="")
    settings.update(config)
    return UshApp(UshConfig(**settings), interactive=False, stdin=io.StringIO(),
                  stdout=io.StringIO())


@pytest.fixture
def app(pki: Pki, controller: FakeController, cluster: Cluster) -> Iterator[UshApp]:
    shell = make_app(pki, controller.port)
    yield shell
    shell.close_session()


def out(app: UshApp) -> list[str]:
    stream = app.stdout
    assert isinstance(stream, io.StringIO)
    return stream.getvalue().splitlines()


def test_commands_run_in_order_waiting_for_their_tasks(app: UshApp,
                                                       controller: FakeController) -> None:
    status = app.run_commands(["start web1 {1..2}.db --ram 512", "list"])
    assert status == 0
    lines = out(app)
    assert lines[:4] == [
        "task 0001beef start web1: accepted",
        "task 0002beef start {1..2}.db: accepted",
        "web1: start done (running)",
        "{1..2}.db: start done (running)",
    ]
    assert lines[4].split()[:5] == ["NAME", "STATE", "HOST", "IP", "RAM"]
    assert [line.split()[0] for line in lines[5:]] == ["web1", "{1..2}.db"]
    start = controller.ops("vm.start")[0][2]
    assert start.names == ["web1", "{1..2}.db"] and start.options.ram == 512


def test_failed_task_fails_the_run(app: UshApp, capsys: pytest.CaptureFixture[str]) -> None:
    status = app.run_commands(["start bad web1", "vmm_list"])
    assert status == 1
    assert "bad: start FAILED: no host has enough memory" in capsys.readouterr().err
    lines = out(app)
    assert "web1: start done (running)" in lines
    assert lines[-2].split() == ["NAME", "STATE", "CPUS", "MEM(MiB)", "USED", "VMS"]


def test_refused_command_is_one_error_line(app: UshApp,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    status = app.run_commands(["shutdown web1", "vmm_list --json"])
    assert status == InvalidState.exit_code
    assert capsys.readouterr().err == \
        "error: web1 is stopped; shutdown needs a running VM\n"
    # stdout holds only the JSON of the command that worked.
    assert json.loads("\n".join(out(app)))[0]["name"] == "vmm1"


def test_json_output_is_parseable(app: UshApp) -> None:
    assert app.run_commands(["start web1", "list --json"]) == 0
    lines = out(app)
    data = json.loads("\n".join(lines[lines.index("[") :]))
    assert [vm["name"] for vm in data] == [f"web1.{DOMAIN}"]


def test_wait_takes_a_short_id(app: UshApp, cluster: Cluster) -> None:
    assert app.run_commands(["start web1", "wait 0001", "tasks"]) == 0
    lines = out(app)
    assert lines.count("web1: start done (running)") == 2, "wait prints the outcome again"
    assert lines[-2].split()[:4] == ["ID", "OP", "NAME", "STATE"]


def test_unreachable_controller(pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    status = make_app(pki, 1).run_commands(["list"])
    assert status == 6
    assert capsys.readouterr().err.startswith("error: cannot connect to 127.0.0.1:1: ")


def test_wrong_password(pki: Pki, controller: FakeController,
                        capsys: pytest.CaptureFixture[str]) -> None:
    status = make_app(pki, controller.port, password="nope").run_commands(["list"])
    assert status == 5
    assert capsys.readouterr().err == "error: wrong user name or password\n"
    assert controller.hellos == 1


def test_completion_and_reconnect_news(app: UshApp, controller: FakeController,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert app.connect_from_config(quiet=True)
    app.onecmd_plus_hooks("start web1 web2")
    assert app.complete_names("vm", "") == ["web1", "web2"]
    assert app.complete_names("host", "v") == ["vmm1"]
    loop: asyncio.AbstractEventLoop = controller.loop  # type: ignore[attr-defined]
    loop.call_soon_threadsafe(controller.drop_all)
    app.onecmd_plus_hooks("vmm_list")
    assert out(app)[-2].startswith("NAME")
    err = capsys.readouterr().err
    assert "connection lost" in err and "reconnecting..." in err
    assert "reconnected" in err
    assert app.exit_status == 0
