"""console --tail through the controller: the VM's host reads its console log."""

from __future__ import annotations

import pytest

from tests.integration.conftest import OTHER_PASSWORD, OTHER_USER, RunningController
from usher.errors import InvalidOption, PermissionDenied, VmNotFound


async def test_console_tail_comes_from_the_vms_host(controller: RunningController) -> None:
    await controller.start_node("h1.usher.test")
    client = await controller.client()
    other = await controller.client(OTHER_USER, OTHER_PASSWORD)
    try:
        await client.wait_all(await client.start(["talky"], ram=64), 5)
        [vm] = await client.list_vms(["talky"])
        assert await client.console_tail("talky", 10) == ""  # nothing printed yet
        log = controller.image_dir("h1.usher.test") / "vms" / f"{vm.uuid}.console.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("".join(f"boot line {i}\n" for i in range(30)))
        assert await client.console_tail("talky", 2) == "boot line 28\nboot line 29\n"
        with pytest.raises(InvalidOption, match="1 to 1000"):
            await client.console_tail("talky", 5000)
        with pytest.raises(InvalidOption, match="one VM at a time"):
            await client.console_tail("{1..2}.talky", 5)
        with pytest.raises(PermissionDenied):  # another user's VM is not theirs to read
            await other.console_tail("talky.seuss.usher.test", 5)
        with pytest.raises(VmNotFound):
            await client.console_tail("nope", 5)
    finally:
        await client.close()
        await other.close()


async def test_an_attached_console_relays_both_ways_and_belongs_to_its_connection(
        controller: RunningController) -> None:
    import asyncio

    await controller.start_node("h1.usher.test")
    client = await controller.client()
    intruder = await controller.client()  # same user, another connection
    got: list[bytes] = []
    ended: list[str] = []
    try:
        await client.wait_all(await client.start(["tty"], ram=64), 5)
        session = await client.console_open("tty", got.append, ended.append)
        assert session.name == "tty.seuss.usher.test"

        async def seen(text: bytes) -> None:
            for _ in range(100):
                if text in b"".join(got):
                    return
                await asyncio.sleep(0.02)
            raise AssertionError(f"{text!r} not in {b''.join(got)!r}")

        await seen(b"[fake console of tty.seuss.usher.test]")  # the banner came first
        await session.write(b"hello\r")
        await seen(b"hello\r\n")  # echoed by the fake guest's line
        from usher.errors import NotFound
        from usher.protocol.ops import ConsoleInputArgs
        with pytest.raises(NotFound, match="no console session"):
            await intruder._call("vm.console_input",
                                 ConsoleInputArgs(session=session.id, data=b"x"))
        # The guest stops: the session ends with the reason.
        await client.wait_all(await client.shutdown(["tty"]), 5)
        for _ in range(100):
            if ended:
                break
            await asyncio.sleep(0.02)
        assert ended and "stopped" in ended[0]
        with pytest.raises(NotFound):
            await session.write(b"late")
        # A stopped VM has no console to attach to.
        from usher.errors import InvalidState
        with pytest.raises(InvalidState):
            await client.console_open("tty", got.append, ended.append)
    finally:
        await client.close()
        await intruder.close()


async def test_closing_the_connection_detaches_on_the_node(controller: RunningController) -> None:
    import asyncio

    agent = await controller.start_node("h1.usher.test")
    client = await controller.client()
    await client.wait_all(await client.start(["tty2"], ram=64), 5)
    await client.console_open("tty2", lambda _d: None, lambda _r: None)
    assert len(agent._consoles) == 1
    await client.close()
    for _ in range(100):
        if not agent._consoles:
            break
        await asyncio.sleep(0.02)
    assert agent._consoles == {}
