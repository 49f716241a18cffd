"""The node manager's side of a migration, on a host that cannot migrate.

A real LibvirtDriver on a fake host (libvirt's test driver has no migration,
but keeps domains), a real image store and real qemu-img: what a target
prepares and what a host forgets. The transfer itself is tested on real
libvirtd hosts in tests/e2e/realguest.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from usher.config import LnmConfig
from usher.errors import (
    AlreadyExists,
    ConfigError,
    DomainNotFound,
    ImageError,
    InvalidOption,
    MigrationUnsupported,
    NotFound,
    UsherError,
)
from usher.lnm.agent import NodeAgent
from usher.lnm.drivers.libvirt import LibvirtDriver
from usher.lnm.fakehost import FakeHost
from usher.protocol.ops import (
    OPS,
    ArtifactMsg,
    BootMsg,
    DefineArgs,
    DiskSizeMsg,
    DomainMsg,
    DomainSpecMsg,
    Empty,
    ForgetArgs,
    IncomingArgs,
    NodeMigrateArgs,
    UuidArgs,
)

UUID = "6c1f0e2a-3b4d-4c5e-8f60-718293a4b5c6"
SIZE = 32 << 20


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def boot(tmp_path: Path) -> BootMsg:
    src = tmp_path / "src"
    src.mkdir()
    disk = src / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "8M"], check=True)
    (src / "vmlinuz").write_bytes(b"kernel")
    return BootMsg(disk=ArtifactMsg(url=f"file://{disk}", sha256=sha(disk), format="qcow2"),
                   kernel=ArtifactMsg(url=f"file://{src / 'vmlinuz'}",
                                      sha256=sha(src / "vmlinuz")),
                   cmdline="console=ttyS0")


@pytest.fixture
def agent(tmp_path: Path) -> NodeAgent:
    host = FakeHost.create(tmp_path / "host.xml", hostname="h2", cpus=4, memory_mib=8192)
    driver = LibvirtDriver(host.uri, fake_host=host)
    driver.open()
    return NodeAgent(LnmConfig(hostname="h2", image_dir=str(tmp_path / "images"),
                               image_fetch_timeout_s=10), driver)


def spec(boot: BootMsg | None) -> DomainSpecMsg:
    return DomainSpecMsg(uuid=UUID, name="m1.seuss.usher.test", memory_mib=128, vcpus=1,
                         mac="52:54:00:aa:bb:01", owner="seuss", task_id="task-m1",
                         ip="10.87.0.9", ip_prefix=16, boot=boot)


async def call(agent: NodeAgent, op: str, args: Any) -> Any:
    return await agent._handle(None, OPS[op], args, "r")  # type: ignore[arg-type]


def info(path: Path) -> dict[str, Any]:
    out = subprocess.run(["qemu-img", "info", "--output=json", "-U", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return dict(json.loads(out))


def qemu_io(path: Path, command: str) -> None:
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", command, str(path)], check=True,
                   capture_output=True)


async def test_a_target_prepares_an_empty_overlay_of_the_size_on_its_own_base(
        agent: NodeAgent, boot: BootMsg, tmp_path: Path) -> None:
    store = tmp_path / "images"
    assert await call(agent, "node.prepare_incoming",
                      IncomingArgs(spec=spec(boot), disk_bytes=SIZE)) == Empty()
    overlay = store / "vms" / f"{UUID}.qcow2"
    assert boot.disk is not None and boot.kernel is not None
    assert info(overlay)["virtual-size"] == SIZE
    assert info(overlay)["backing-filename"] == str(store / "base" / boot.disk.sha256)
    assert (store / "base" / boot.kernel.sha256).exists()  # the kernel is fetched too
    # What the source reports is what the target makes.
    reply: DiskSizeMsg = await call(agent, "node.disk_size", UuidArgs(uuid=UUID))
    assert reply.bytes == SIZE

    # A repeat (a retry after a failed migration) starts from an empty overlay again.
    qemu_io(overlay, "write -P 0x5a 0 1M")
    await call(agent, "node.prepare_incoming", IncomingArgs(spec=spec(boot), disk_bytes=SIZE))
    qemu_io(overlay, "read -P 0 0 1M")


async def test_a_vm_that_is_here_cannot_arrive(agent: NodeAgent, boot: BootMsg,
                                               tmp_path: Path) -> None:
    await call(agent, "node.define", DefineArgs(spec=spec(boot), start=False))
    overlay = tmp_path / "images" / "vms" / f"{UUID}.qcow2"
    with pytest.raises(AlreadyExists, match="already on h2"):
        await call(agent, "node.prepare_incoming",
                   IncomingArgs(spec=spec(boot), disk_bytes=SIZE))
    assert overlay.exists()  # the VM's own disk is kept
    with pytest.raises(InvalidOption, match="size"):
        await call(agent, "node.prepare_incoming", IncomingArgs(spec=spec(boot)))


async def test_a_vm_without_boot_artifacts_needs_nothing(agent: NodeAgent,
                                                         tmp_path: Path) -> None:
    await call(agent, "node.prepare_incoming", IncomingArgs(spec=spec(None)))
    assert not (tmp_path / "images").exists()
    with pytest.raises(NotFound):
        await call(agent, "node.disk_size", UuidArgs(uuid=UUID))


async def test_a_host_that_cannot_migrate_keeps_the_vm_and_its_files(
        agent: NodeAgent, boot: BootMsg, tmp_path: Path) -> None:
    await call(agent, "node.define", DefineArgs(spec=spec(boot)))
    log = tmp_path / "images" / "vms" / f"{UUID}.console.log"
    log.write_text("booted\n")
    for stopped in (False, True):
        with pytest.raises(MigrationUnsupported):
            await call(agent, "node.migrate", NodeMigrateArgs(
                uuid=UUID, target_uri="qemu+tcp://10.0.0.2/system", stopped=stopped,
                timeout_s=5))
    assert agent.driver.get_domain(UUID).state == "running"
    assert log.exists() and (tmp_path / "images" / "vms" / f"{UUID}.qcow2").exists()
    # No migration runs: an abort does nothing.
    assert await call(agent, "node.abort_migration", UuidArgs(uuid=UUID)) == Empty()
    dom: DomainMsg = await call(agent, "node.finish_incoming", UuidArgs(uuid=UUID))
    assert (dom.uuid, dom.state) == (UUID, "running")


async def test_a_host_forgets_a_vm_that_runs_elsewhere(agent: NodeAgent, boot: BootMsg,
                                                       tmp_path: Path) -> None:
    await call(agent, "node.define", DefineArgs(spec=spec(boot)))
    vms = tmp_path / "images" / "vms"
    (vms / f"{UUID}.console.log").write_text("booted\n")
    for _ in range(2):  # a repeat is harmless
        assert await call(agent, "node.forget_vm", ForgetArgs(uuid=UUID)) == Empty()
    assert sorted(p.name for p in vms.iterdir()) == []
    with pytest.raises(DomainNotFound):
        agent.driver.get_domain(UUID)
    with pytest.raises(DomainNotFound):
        await call(agent, "node.finish_incoming", UuidArgs(uuid=UUID))
    assert any((tmp_path / "images" / "base").iterdir())  # bases stay


# -- a store shared with other hosts ------------------------------------------------


def shared_agent(tmp_path: Path, store: Path, name: str = "h3") -> NodeAgent:
    """A second node manager whose image_dir is ``store`` (one filesystem, two hosts)."""
    host = FakeHost.create(tmp_path / f"{name}.xml", hostname=name, cpus=4, memory_mib=8192)
    driver = LibvirtDriver(host.uri, fake_host=host)
    driver.open()
    return NodeAgent(LnmConfig(hostname=name, image_dir=str(store), shared_store="nfs-a",
                               image_fetch_timeout_s=10), driver)


async def test_on_a_shared_store_the_target_checks_the_disk_and_touches_nothing(
        agent: NodeAgent, boot: BootMsg, tmp_path: Path) -> None:
    store = tmp_path / "images"
    await call(agent, "node.define", DefineArgs(spec=spec(boot)))
    overlay = store / "vms" / f"{UUID}.qcow2"
    qemu_io(overlay, "write -P 0x5a 0 1M")
    other = shared_agent(tmp_path, store)
    assert await call(other, "node.prepare_incoming",
                      IncomingArgs(spec=spec(boot), shared=True)) == Empty()
    qemu_io(overlay, "read -P 0x5a 0 1M")  # not replaced by an empty one

    # A target that does not see the disk (its store is not mounted) says so.
    unmounted = shared_agent(tmp_path, tmp_path / "local", name="h4")
    with pytest.raises(ImageError, match="does not see the disk .* is the store mounted"):
        await call(unmounted, "node.prepare_incoming",
                   IncomingArgs(spec=spec(boot), shared=True))
    assert not (tmp_path / "local" / "vms" / f"{UUID}.qcow2").exists()


async def test_forgetting_or_undefining_with_keep_disk_leaves_the_shared_disk(
        agent: NodeAgent, boot: BootMsg, tmp_path: Path) -> None:
    vms = tmp_path / "images" / "vms"
    await call(agent, "node.define", DefineArgs(spec=spec(boot)))
    (vms / f"{UUID}.console.log").write_text("booted\n")
    await call(agent, "node.forget_vm", ForgetArgs(uuid=UUID, keep_disk=True))
    with pytest.raises(DomainNotFound):
        agent.driver.get_domain(UUID)
    assert sorted(p.name for p in vms.iterdir()) == [f"{UUID}.console.log", f"{UUID}.qcow2"]

    # A cold move: the target defines the VM on the disk it finds; the source
    # undefines its copy of the definition and keeps the disk.
    other = shared_agent(tmp_path, tmp_path / "images")
    await call(agent, "node.define", DefineArgs(spec=spec(boot), start=False))
    qemu_io(vms / f"{UUID}.qcow2", "write -P 0x3c 0 1M")
    await call(other, "node.define", DefineArgs(spec=spec(boot), start=False))
    await call(agent, "node.undefine", ForgetArgs(uuid=UUID, keep_disk=True))
    qemu_io(vms / f"{UUID}.qcow2", "read -P 0x3c 0 1M")
    assert other.driver.get_domain(UUID).state == "stopped"

    # Destroying it (no keep_disk) deletes the disk.
    await call(other, "node.undefine", ForgetArgs(uuid=UUID))
    assert sorted(p.name for p in vms.iterdir()) == []


async def test_a_failed_define_keeps_a_disk_it_found(
        agent: NodeAgent, boot: BootMsg, tmp_path: Path) -> None:
    vms = tmp_path / "images" / "vms"
    await call(agent, "node.define", DefineArgs(spec=spec(boot), start=False))
    other = shared_agent(tmp_path, tmp_path / "images")
    # A domain of the same name there: libvirt refuses the define after the fetch.
    clash = DomainSpecMsg(uuid="0d1f0e2a-3b4d-4c5e-8f60-718293a4b5c6", name=spec(None).name,
                          memory_mib=128, vcpus=1, mac="52:54:00:aa:bb:02", owner="seuss",
                          task_id="task-m0")
    await call(other, "node.define", DefineArgs(spec=clash, start=False))
    with pytest.raises(UsherError, match="is taken by"):
        await call(other, "node.define", DefineArgs(spec=spec(boot), start=False))
    assert (vms / f"{UUID}.qcow2").exists()  # the VM's own disk, on the shared store


async def test_hosts_of_one_store_report_its_id_and_a_missing_mount_stops_the_agent(
        agent: NodeAgent, tmp_path: Path) -> None:
    store = tmp_path / "images"
    store.mkdir()
    first = await agent._store_id()
    assert len(first) == 32
    assert await shared_agent(tmp_path, store)._store_id() == first
    assert (store / ".usher-store-id").read_text().strip() == first
    (tmp_path / "local").mkdir()
    assert await shared_agent(tmp_path, tmp_path / "local", name="h4")._store_id() != first

    missing = shared_agent(tmp_path, tmp_path / "not-mounted", name="h5")
    with pytest.raises(ConfigError, match="does not exist: mount shared store nfs-a"):
        await missing.run(asyncio.Event())
    assert not (tmp_path / "not-mounted").exists()
