"""The node manager turns a VM's boot spec into local files and domain XML.

A real LibvirtDriver on a fake host (libvirt's test driver keeps the XML, it
does not open the files), a real image store and real qemu-img.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from usher.config import LnmConfig
from usher.errors import ImageError
from usher.lnm.agent import NodeAgent, address_parameters
from usher.lnm.drivers.libvirt import LibvirtDriver
from usher.lnm.fakehost import FakeHost
from usher.protocol.ops import OPS, ArtifactMsg, BootMsg, DefineArgs, DomainSpecMsg, ForgetArgs

UUID = "0b7e4c1a-5d2f-4e8a-9c3b-7f6e5d4c3b2a"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    src = tmp_path / "src"
    src.mkdir()
    disk = src / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "8M"], check=True)
    (src / "vmlinuz").write_bytes(b"kernel")
    (src / "initrd.gz").write_bytes(b"initrd")
    return {"disk": disk, "kernel": src / "vmlinuz", "initrd": src / "initrd.gz"}


@pytest.fixture
async def agent(tmp_path: Path) -> NodeAgent:
    host = FakeHost.create(tmp_path / "host.xml", hostname="h1", cpus=4, memory_mib=8192)
    driver = LibvirtDriver(host.uri, fake_host=host)
    driver.open()
    cfg = LnmConfig(image_dir=str(tmp_path / "images"), image_fetch_timeout_s=10)
    return NodeAgent(cfg, driver)


def spec(files: dict[str, Path], **boot: object) -> DomainSpecMsg:
    msg = BootMsg(disk=ArtifactMsg(url=f"file://{files['disk']}", sha256=sha(files["disk"]),
                                   format="qcow2"),
                  kernel=ArtifactMsg(url=f"file://{files['kernel']}",
                                     sha256=sha(files["kernel"])),
                  initrd=ArtifactMsg(url=f"file://{files['initrd']}",
                                     sha256=sha(files["initrd"])),
                  cmdline="console=ttyS0")
    for key, value in boot.items():
        setattr(msg, key, value)
    return DomainSpecMsg(uuid=UUID, name="t1.seuss.usher.test", memory_mib=128, vcpus=1,
                         mac="52:54:00:aa:bb:cc", owner="seuss", task_id="task-1",
                         ip="10.87.0.7", ip_prefix=16, gateway="10.87.0.1", boot=msg)


async def test_boot_artifacts_become_an_overlay_and_a_kernel_boot(
        agent: NodeAgent, files: dict[str, Path], tmp_path: Path) -> None:
    await agent._handle(None, OPS["node.define"], DefineArgs(spec=spec(files), start=False),
                        "r1")  # type: ignore[arg-type]
    overlay = tmp_path / "images" / "vms" / f"{UUID}.qcow2"
    assert overlay.exists()
    xml = agent.driver._connection().lookupByUUIDString(UUID).XMLDesc(0)  # type: ignore[attr-defined]
    base = tmp_path / "images" / "base"
    assert f"<source file='{overlay}'/>" in xml
    assert f"<kernel>{base / sha(files['kernel'])}</kernel>" in xml
    assert f"<initrd>{base / sha(files['initrd'])}</initrd>" in xml
    assert ("<cmdline>console=ttyS0 usher.ip=10.87.0.7/16 usher.hostname=t1 "
            "usher.gw=10.87.0.1 ip=10.87.0.7::10.87.0.1:255.255.0.0:t1::off</cmdline>") in xml
    (tmp_path / "images" / "vms" / f"{UUID}.console.log").write_text("booted\n")
    await agent._handle(None, OPS["node.undefine"], ForgetArgs(uuid=UUID),
                        "r2")  # type: ignore[arg-type]
    assert not overlay.exists()
    assert not (tmp_path / "images" / "vms" / f"{UUID}.console.log").exists()
    assert (base / sha(files["disk"])).exists()  # never the base


async def test_a_bad_image_leaves_no_domain_and_no_disk(agent: NodeAgent, files: dict[str, Path],
                                                        tmp_path: Path) -> None:
    bad = ArtifactMsg(url=f"file://{files['kernel']}", sha256="0" * 64)
    with pytest.raises(ImageError, match="failed its checksum"):
        await agent._handle(None, OPS["node.define"], DefineArgs(spec=spec(files, kernel=bad)),
                            "r1")  # type: ignore[arg-type]
    assert not (tmp_path / "images" / "vms" / f"{UUID}.qcow2").exists()
    assert agent.driver.list_domains() == []


def test_address_parameters() -> None:
    assert address_parameters("web1.seuss.usher.test", "fd00::5", 64, None) == \
        "usher.ip=fd00::5/64 usher.hostname=web1"


async def test_console_tail_reads_the_console_log(agent: NodeAgent, files: dict[str, Path],
                                                  tmp_path: Path) -> None:
    from usher.errors import DomainNotFound, InvalidOption
    from usher.protocol.ops import ConsoleArgs

    async def tail(lines: int, uuid: str = UUID) -> str:
        reply = await agent._handle(None, OPS["node.console"],  # type: ignore[arg-type]
                                    ConsoleArgs(uuid=uuid, lines=lines), "r")
        return reply.text  # type: ignore[no-any-return]

    await agent._handle(None, OPS["node.define"], DefineArgs(spec=spec(files), start=False),
                        "r1")  # type: ignore[arg-type]
    assert await tail(5) == ""  # printed nothing yet
    log = tmp_path / "images" / "vms" / f"{UUID}.console.log"
    log.write_bytes(b"".join(b"line %d\r\n" % i for i in range(100)) + b"bad \xff byte\r\n")
    assert await tail(3) == "line 98\nline 99\nbad \ufffd byte\n"
    with pytest.raises(InvalidOption, match="1 to 1000"):
        await tail(0)
    with pytest.raises(DomainNotFound):
        await tail(3, uuid="11111111-2222-4333-8444-555555555555")
