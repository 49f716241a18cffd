"""Starting VMs from registered images through a real in-process controller.

The node managers run the fake driver, which ignores what a VM boots from, but
they still fetch every file of the boot into their own image store and check
its checksum: a base under ``images/HOST/base/SHA256`` shows what reached the
node manager. The controller's side is checked in memory (the VM record), in
SQL (``vms.boot``) and after a restart; every refused start must leave no VM
row, no lease and nothing in the hosts' stores.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tests.integration.conftest import (
    OTHER_PASSWORD,
    OTHER_USER,
    SITE,
    USER,
    MakeController,
    RunningController,
)
from usher.client import AsyncClient
from usher.controller import auth, images, ipam
from usher.controller.images import decode_boot
from usher.controller.models import Image, Lease, Vm
from usher.controller.state import BootRecord
from usher.errors import (
    ImageNotFound,
    InvalidOption,
    InvalidState,
    MigrationUnsupported,
    PermissionDenied,
    UsherError,
)
from usher.protocol.ops import ArtifactMsg, BootMsg

ADMIN = "ops"
ADMIN_PASSWORD = "operations-all-day"
HOST = "h1.usher.test"
DOMAIN = f"{USER}.{SITE}"
needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None,
                                    reason="overlays need qemu-img (Debian: qemu-utils)")


@dataclass(frozen=True)
class File:
    path: Path
    sha256: str

    @property
    def url(self) -> str:
        return self.path.as_uri()

    def artifact(self, fmt: str = "raw") -> ArtifactMsg:
        return ArtifactMsg(url=self.url, sha256=self.sha256, format=fmt)


def _file(path: Path, data: bytes) -> File:
    path.write_bytes(data)
    return File(path, hashlib.sha256(data).hexdigest())


@dataclass(frozen=True)
class Files:
    kernel: File
    initrd: File
    disk: File


@pytest.fixture
def files(tmp_path: Path) -> Files:
    where = tmp_path / "files"
    where.mkdir()
    return Files(kernel=_file(where / "vmlinuz", b"a kernel"),
                 initrd=_file(where / "initrd.img", b"an initrd"),
                 disk=_file(where / "disk.raw", bytes(1 << 16)))


def catalogue(files: Files) -> Callable[[Session], None]:
    """The site's images, an admin and a default IP range, as the admin CLI writes them."""

    def setup(session: Session) -> None:
        add = images.add_image
        add(session, images.make_image("tiny", kernel=files.kernel.url,
                                       initrd=files.initrd.url, cmdline="console=ttyS0",
                                       description="test guest"))
        add(session, images.make_image("plain", disk=files.disk.url, disk_format="raw"))
        add(session, images.make_image("corrupt", kernel=files.kernel.url,
                                       kernel_sha256="0" * 64))
        add(session, images.make_image("missing", kernel=files.kernel.url + ".gone",
                                       kernel_sha256=files.kernel.sha256))
        auth.add_user(session, ADMIN, ADMIN_PASSWORD, site_admin=True)
        ipam.add_range(session, "lab", "10.91.0.0/24", default=True)

    return setup


@pytest.fixture
async def site(make_controller: MakeController, files: Files) -> RunningController:
    controller = await make_controller(setup=catalogue(files))
    await controller.start_node(HOST)
    return controller


@pytest.fixture
async def seuss(site: RunningController) -> AsyncIterator[AsyncClient]:
    client = await site.client(reconnect=False)
    yield client
    await client.close()


@pytest.fixture
async def admin(site: RunningController) -> AsyncIterator[AsyncClient]:
    client = await site.client(ADMIN, ADMIN_PASSWORD, reconnect=False)
    yield client
    await client.close()


async def _rows(c: RunningController) -> dict[str, BootRecord | None]:
    """vms.boot of every VM, by short name, read from SQL."""
    def read(session: Session) -> dict[str, BootRecord | None]:
        return {v.name.split(".")[0]: decode_boot(v.boot) for v in session.scalars(select(Vm))}

    return await c.ctrl.ctx.db.run(read)


def _bases(c: RunningController, host: str = HOST) -> set[str]:
    base = c.image_dir(host) / "base"
    return {p.name for p in base.iterdir()} if base.exists() else set()


# ------------------------------------------------------------------ starts
async def test_start_from_an_image_records_its_boot(site: RunningController,
                                                    seuss: AsyncClient, files: Files,
                                                    make_controller: MakeController) -> None:
    await seuss.wait_all(await seuss.start(["t1"], ram=64, image="tiny",
                                           kernel_parms="quiet"), 10)
    await seuss.wait_all(await seuss.start(["t2"], ram=64, kernel="tiny",
                                           fs_uri="nfs://10.0.0.5/export/t2"), 10)
    listed = {v.name.split(".")[0]: v for v in await seuss.list_vms()}
    assert {n: (v.state, v.image) for n, v in listed.items()} == {
        "t1": ("running", "tiny"), "t2": ("running", "")}

    t1 = BootRecord(boot=BootMsg(kernel=files.kernel.artifact(),
                                 initrd=files.initrd.artifact(),
                                 cmdline="console=ttyS0 quiet"),
                    image="tiny", kernel_parms="quiet")
    t2 = BootRecord(boot=BootMsg(kernel=files.kernel.artifact(),
                                 initrd=files.initrd.artifact(),
                                 cmdline="console=ttyS0 root=/dev/nfs "
                                         "nfsroot=10.0.0.5:/export/t2 rw"),
                    kernel="tiny", fs_uri="nfs://10.0.0.5/export/t2")
    reg = site.ctrl.ctx.reg
    assert reg.by_name[f"t1.{DOMAIN}"].boot == t1
    assert reg.by_name[f"t2.{DOMAIN}"].boot == t2
    assert await _rows(site) == {"t1": t1, "t2": t2}
    # The node manager fetched and checked both files into its store.
    assert _bases(site) == {files.kernel.sha256, files.initrd.sha256}

    # A start of an existing VM ignores the boot options, like --ram.
    await seuss.wait_all(await seuss.shutdown(["t1"]), 10)
    await seuss.wait_all(await seuss.start(["t1"], image="plain"), 10)
    assert reg.by_name[f"t1.{DOMAIN}"].boot == t1

    # A cold migration defines the VM on the other host with the same boot.
    other = "h2.usher.test"
    await site.start_node(other)
    [task] = await seuss.wait_all(await seuss.migrate(["t1"], vmm=other), 10)
    assert task.state == "done", task.message
    assert _bases(site, other) == {files.kernel.sha256, files.initrd.sha256}

    # The record outlives the controller and the image: deleting it changes no VM.
    await site.ctrl.ctx.db.run(lambda s: images.delete_image(s, "tiny"))
    await site.ctrl.reload_images()
    assert "tiny" not in {i.name for i in await seuss.list_images()}
    await seuss.close()
    await site.close()
    again = await make_controller()
    assert again.ctrl.ctx.reg.by_name[f"t1.{DOMAIN}"].boot == t1
    assert again.ctrl.ctx.reg.by_name[f"t2.{DOMAIN}"].boot == t2


@needs_qemu_img
async def test_disks_get_an_overlay_per_vm(site: RunningController, seuss: AsyncClient,
                                           admin: AsyncClient, files: Files) -> None:
    await seuss.wait_all(await seuss.start(["d1", "d2"], ram=64, image="plain"), 10)
    vms = {v.name.split(".")[0]: v for v in await seuss.list_vms()}
    assert {v.state for v in vms.values()} == {"running"}
    store = site.image_dir(HOST)
    assert _bases(site) == {files.disk.sha256}  # one base, shared
    assert {p.name for p in (store / "vms").glob("*.qcow2")} == {
        f"{v.uuid}.qcow2" for v in vms.values()}
    # A site admin may boot a disk by URL (its checksum pinned in the URL).
    url = f"{files.disk.url}#sha256={files.disk.sha256}&format=raw"
    [task] = await admin.wait_all(await admin.start([f"a1.{DOMAIN}."], ram=64, fs_uri=url), 10)
    assert task.state == "done", task.message
    record = site.ctrl.ctx.reg.by_name[f"a1.{DOMAIN}"].boot
    assert record is not None and record.boot == BootMsg(disk=files.disk.artifact())
    await seuss.wait_all(await seuss.destroy(["d1"]), 10)
    assert f"{vms['d1'].uuid}.qcow2" not in {p.name for p in (store / "vms").iterdir()}
    assert _bases(site) == {files.disk.sha256}  # destroy never deletes a base


@needs_qemu_img
async def test_a_disk_never_stays_behind_on_hosts_without_live_migration(
        site: RunningController, seuss: AsyncClient) -> None:
    # The fake driver cannot migrate live, so it cannot move a disk either:
    # a cold move would boot the VM on an empty disk and delete its own.
    await seuss.wait_all(await seuss.start(["d1"], ram=64, image="plain"), 10)
    [vm] = await seuss.list_vms(["d1"])
    other = "h2.usher.test"
    await site.start_node(other)
    with pytest.raises(MigrationUnsupported, match=f"cannot move the disk of a running VM "
                                                   f"from {HOST} to {other}: VMM {HOST} "
                                                   f"cannot migrate live"):
        await seuss.migrate(["d1"], vmm=other)
    [after] = await seuss.list_vms(["d1"])
    assert (after.host, after.state) == (HOST, "running")
    assert (site.image_dir(HOST) / "vms" / f"{vm.uuid}.qcow2").exists()
    assert not (site.image_dir(other) / "vms").exists()
    with pytest.raises(InvalidState, match="d1 is not migrating"):
        await seuss.abort_migration(["d1"])


async def test_everyone_lists_images_without_urls(site: RunningController,
                                                  seuss: AsyncClient) -> None:
    infos = {i.name: i for i in await seuss.list_images()}
    assert sorted(infos) == ["corrupt", "missing", "plain", "tiny"]
    tiny = infos["tiny"]
    assert (tiny.disk_format, tiny.kernel, tiny.initrd, tiny.cmdline, tiny.description) == (
        None, True, True, "console=ttyS0", "test guest")
    assert infos["plain"].disk_format == "raw" and not infos["plain"].kernel
    assert await seuss.complete("image", "t") == ["tiny"]
    # A new registration is seen after a reload (SIGHUP), not before.
    await site.ctrl.ctx.db.run(lambda s: images.add_image(s, images.make_image(
        "late", kernel="http://img.example.org/k", kernel_sha256="1" * 64)))
    assert "late" not in {i.name for i in await seuss.list_images()}
    await site.ctrl.reload()
    assert "late" in {i.name for i in await seuss.list_images()}
    other = await site.client(OTHER_USER, OTHER_PASSWORD, reconnect=False)
    try:
        assert len(await other.list_images()) == 5
    finally:
        await other.close()


# --------------------------------------------------------------- bad input
BAD_STARTS: list[tuple[str, dict[str, str], type[UsherError], str]] = [
    ("user", {"image": "nope"}, ImageNotFound, "--image: no image named nope; see 'image_list'"),
    ("user", {"kernel": "plain"}, InvalidOption, "--kernel plain: that image has no kernel"),
    ("user", {"image": "plain", "initrd": "tiny"}, InvalidOption, "--initrd needs a kernel"),
    ("user", {"image": "plain", "kernel_parms": "quiet"}, InvalidOption,
     "--kernel_parms needs a kernel"),
    ("user", {"kernel_parms": "quiet"}, InvalidOption, "--kernel_parms needs a kernel"),
    ("user", {"image": "tiny", "kernel_parms": "quiet\ninit=/bin/sh"}, InvalidOption,
     "only printable ASCII"),
    ("user", {"image": "tiny", "kernel_parms": "x" * 1025}, InvalidOption, "at most 1024"),
    ("user", {"image": "tiny", "fs_uri": "nfs://server.example.org/x"}, InvalidOption,
     "by address"),
    ("user", {"fs_uri": "file:///srv/disk.raw#sha256=" + "a" * 64}, PermissionDenied,
     "only site admins give image URLs; use a registered image (image_list)"),
    ("admin", {"fs_uri": "file:///srv/disk.raw"}, InvalidOption,
     "a disk URL needs its checksum: add #sha256=HEX"),
    ("admin", {"fs_uri": "ftp://h/disk.raw#sha256=" + "a" * 64}, InvalidOption,
     "give nfs://SERVER/PATH"),
]


@pytest.mark.parametrize(("who", "options", "error", "message"), BAD_STARTS)
async def test_bad_options_leave_nothing_behind(site: RunningController, seuss: AsyncClient,
                                                admin: AsyncClient, who: str,
                                                options: dict[str, str],
                                                error: type[UsherError], message: str) -> None:
    client = seuss if who == "user" else admin
    with pytest.raises(error) as err:
        await client.start([f"bad.{DOMAIN}.", f"bad2.{DOMAIN}."], ram=64,
                           **options)  # type: ignore[arg-type]
    assert message in err.value.message
    assert err.value.code == error.code  # rebuilt as the class the controller raised
    await _assert_nothing_left(site, seuss)


@pytest.mark.parametrize(("image", "error"), [("corrupt", "failed its checksum"),
                                              ("missing", "does not exist on this host")])
async def test_a_bad_file_fails_the_start_at_the_node(site: RunningController,
                                                      seuss: AsyncClient, image: str,
                                                      error: str) -> None:
    [task] = await seuss.wait_all(await seuss.start(["bad"], ram=64, image=image), 10)
    assert task.state == "error" and error in task.message
    await _assert_nothing_left(site, seuss)


async def _assert_nothing_left(site: RunningController, seuss: AsyncClient) -> None:
    assert await seuss.list_vms() == []
    assert site.ctrl.ctx.reg.vms == {}

    def count(session: Session) -> tuple[int, int]:
        return (session.scalar(select(func.count()).select_from(Vm)) or 0,
                session.scalar(select(func.count()).select_from(Lease)) or 0)

    assert await site.ctrl.ctx.db.run(count) == (0, 0)
    assert _bases(site) == set()  # nothing fetched, nothing kept
    vm_dir = site.image_dir(HOST) / "vms"
    assert not vm_dir.exists() or not list(vm_dir.glob("*.qcow2"))
    assert await site.ctrl.ctx.db.run(
        lambda s: s.scalar(select(func.count()).select_from(Image))) == 4

