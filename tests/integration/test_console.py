"""console --tail through the controller: the VM's host reads its console log."""

from __future__ import annotations

import pytest

from tests.integration.conftest import OTHER_PASSWORD, OTHER_USER, RunningController
from usher.client import AsyncClient
from usher.errors import InvalidOption, PermissionDenied, VmNotFound


async def _client(c: RunningController, user: str | None = None,
                  password: str | None = None) -> AsyncClient:
    client = AsyncClient(c.host, c.port, ca_cert=str(c.ca), user=user or c.user,
                         password=password or c.password, server_hostname="localhost")
    await client.connect()
    return client


async def test_console_tail_comes_from_the_vms_host(controller: RunningController) -> None:
    await controller.start_node("h1.usher.test")
    client = await _client(controller)
    other = await _client(controller, OTHER_USER, OTHER_PASSWORD)
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
