"""Fixtures of ush's tests: a fake controller on loopback, served from a thread.

ush uses the blocking :class:`usher.client.Client`, so the tests are plain
functions and the controller (the client tests' :class:`FakeController`)
runs on an event loop in a thread of its own. :class:`Cluster` plugs in just
enough controller behaviour for the shell: tasks that end by push a moment
later, listings, completion and one refusal.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests.unit.client.fake_controller import DOMAIN, USER, FakeController, Pki, make_pki
from usher.errors import ImageNotFound, InvalidState, TaskNotFound
from usher.protocol.connection import Connection
from usher.protocol.ops import Accepted, HostInfo, ImageInfo, TaskInfo, VmInfo


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def controller(pki: Pki) -> Iterator[FakeController]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fake-controller", daemon=True)
    thread.start()
    fake = FakeController(pki)
    fake.loop = loop  # type: ignore[attr-defined]
    asyncio.run_coroutine_threadsafe(fake.start(), loop).result(5)
    try:
        yield fake
    finally:
        asyncio.run_coroutine_threadsafe(fake.stop(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


class Cluster:
    """Just enough controller behaviour: tasks that end by push a moment later.

    Two images are registered (``tiny``, a kernel, and ``debian``, a disk);
    ``start --image`` of any other name is refused as the controller refuses it.
    """

    IMAGES = (ImageInfo(name="debian", disk_format="qcow2", description="Debian 12"),
              ImageInfo(name="tiny", kernel=True, initrd=True, cmdline="console=ttyS0",
                        description="test guest"))

    def __init__(self, fake: FakeController) -> None:
        self.vms: dict[str, VmInfo] = {}
        self.tasks: dict[str, TaskInfo] = {}
        self.ended: dict[str, asyncio.Event] = {}
        fake.handlers.update({"vm.start": self.start, "vm.list": self.list_vms,
                              "host.list": self.hosts, "task.wait": self.wait,
                              "task.list": self.task_list, "session.complete": self.complete,
                              "vm.shutdown": self.refuse, "image.list": self.images})

    async def start(self, conn: Connection, args: Any, rid: str) -> Accepted:
        image = args.options.image
        if image is not None and image not in {i.name for i in self.IMAGES}:
            raise ImageNotFound(f"--image: no image named {image}; see 'image_list'")
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

    async def images(self, conn: Connection, args: Any, rid: str) -> list[ImageInfo]:
        return list(self.IMAGES)

    async def complete(self, conn: Connection, args: Any, rid: str) -> list[str]:
        if args.kind == "host":
            return ["vmm1"]
        if args.kind == "image":
            return [i.name for i in self.IMAGES if i.name.startswith(args.prefix)]
        return [n for n in self.vms if n.startswith(args.prefix)]

    async def refuse(self, conn: Connection, args: Any, rid: str) -> Accepted:
        raise InvalidState("web1 is stopped; shutdown needs a running VM")


@pytest.fixture
def cluster(controller: FakeController) -> Cluster:
    return Cluster(controller)
