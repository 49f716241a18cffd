"""The libvirt driver on ``qemu:///embed``: QEMU driven from inside the node manager's
own process, no libvirtd. The tiny guest boots and its console is attached.

The check runs in a process of its own: once a process has used the embedded QEMU
driver, libvirt routes every later ``qemu:///`` URI of that process to it, so
``qemu:///system`` would no longer open in the tests that follow (a node manager
uses one URI for its whole life, so this never matters there).
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import tempfile
import uuid as uuidlib
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.realguest]

BOOT_S = 30.0
SEEN = "EMBED-GUEST-CONSOLE-SEEN"


def test_the_tiny_guest_boots_on_qemu_embed() -> None:
    proc = subprocess.run([sys.executable, "-m", "tests.e2e.realguest.test_embed"],
                          capture_output=True, text=True, timeout=BOOT_S + 60,
                          cwd=Path(__file__).parents[3])
    assert proc.returncode == 0 and SEEN in proc.stdout, proc.stdout + proc.stderr


def make_root() -> Path:
    """An embedded driver's root: it reads its qemu.conf there. As root, with no
    security driver (there is no libvirtd to set labels up), and QEMU writing the
    console log itself (no virtlogd either)."""
    root = Path(tempfile.mkdtemp(prefix="usher-embed-", dir="/var/tmp"))
    (root / "etc").mkdir()
    (root / "etc" / "qemu.conf").write_text(
        'user = "root"\ngroup = "root"\nsecurity_driver = "none"\n'
        'stdio_handler = "file"\n')
    root.chmod(0o755)
    return root


async def boot_on_embed(root: Path) -> None:
    import libvirtaio

    from usher.lnm.drivers.base import DomainSpec, DomainState
    from usher.lnm.drivers.libvirt import LibvirtDriver
    from usher.lnm.tinyguest import MARKER, build_tiny_guest

    libvirtaio.virEventRegisterAsyncIOImpl()  # the console stream's events
    guest = build_tiny_guest()
    driver = LibvirtDriver(f"qemu:///embed?root={root}", network="", domain_type="qemu")
    await asyncio.to_thread(driver.open)
    uuid = str(uuidlib.uuid4())
    spec = DomainSpec(uuid=uuid, name="emb.seuss.usher.test", memory_mib=128, vcpus=1,
                      mac="52:54:00:fd:22:01", owner="seuss", task_id="t-embed",
                      kernel=str(guest.kernel), initrd=str(guest.initrd), cmdline=guest.cmdline)
    got: list[bytes] = []
    try:
        await asyncio.to_thread(driver.define, spec)
        info = await asyncio.to_thread(driver.start, uuid)
        assert info.state is DomainState.RUNNING and info.owner == "seuss"
        console = await asyncio.to_thread(driver.open_console, uuid, got.append,
                                          lambda _reason: None)
        for _ in range(int(BOOT_S * 10)):
            if MARKER.encode() in b"".join(got):
                break
            await asyncio.sleep(0.1)
        console.close()
        assert MARKER.encode() in b"".join(got), b"".join(got)[-500:]
        assert [d.uuid for d in await asyncio.to_thread(driver.list_domains)] == [uuid]
        print(SEEN, flush=True)
    finally:
        await asyncio.to_thread(driver.undefine, uuid)
        await asyncio.to_thread(driver.close)


def main() -> None:
    root = make_root()
    try:
        asyncio.run(boot_on_embed(root))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
