"""The controller's Unix socket for local clients: same TLS, same logins, same service."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from tests.integration.conftest import PASSWORD, USER, MakeController
from usher.client import AsyncClient
from usher.errors import AuthenticationFailed, ConfigError


async def test_clients_and_node_managers_work_over_the_socket(
        make_controller: MakeController, tmp_path: Path) -> None:
    sock = tmp_path / "run" / "usher.sock"
    controller = await make_controller(listen_unix=str(sock))
    assert stat.S_ISSOCK(sock.stat().st_mode)
    await controller.start_node("h1.usher.test")
    client = AsyncClient(str(sock), 0, ca_cert=str(controller.ca), user=USER,
                         password=PASSWORD)
    await client.connect()
    try:
        assert client.address == f"unix:{sock}"
        assert (await client.whoami()).user == USER
        [task] = await client.wait_all(await client.start(["local1"], ram=64), 5)
        assert task.state == "done"
        assert [v.name for v in await client.list_vms()] == ["local1.seuss.usher.test"]
    finally:
        await client.close()
    with pytest.raises(AuthenticationFailed):
        bad = AsyncClient(str(sock), 0, ca_cert=str(controller.ca), user=USER,
                          password="not-it", reconnect=False)
        await bad.connect()
    await controller.close()
    assert not sock.exists()  # removed on the way out


async def test_a_stale_socket_is_replaced_and_a_file_refused(
        make_controller: MakeController, tmp_path: Path) -> None:
    import socket

    path = tmp_path / "usher.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # left behind by a controller that was killed
    stale.close()
    controller = await make_controller(listen_unix=str(path))
    await controller.close()

    path.write_text("not a socket")
    with pytest.raises(ConfigError, match="is not a socket"):
        await make_controller(listen_unix=str(path))
    assert path.read_text() == "not a socket"
