"""Hosts that declare a shared image store: what they report and what the controller makes of it.

Real node managers (fake driver) register with a real controller; their image
stores are directories, one of them given to two hosts as their shared store.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.integration.conftest import RunningController
from usher.controller.migration import shares_store
from usher.errors import ConfigError


async def test_hosts_of_one_store_share_it_and_one_that_has_not_mounted_it_is_flagged(
        controller: RunningController, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store, local = tmp_path / "nfs", tmp_path / "local"
    store.mkdir()
    local.mkdir()
    await controller.start_node("a.usher.test", shared_store="s1", image_dir=store)
    await controller.start_node("b.usher.test", shared_store="s1", image_dir=store)
    with caplog.at_level(logging.WARNING, logger="usher.controller.hosts"):
        await controller.start_node("c.usher.test", shared_store="s1", image_dir=local)
    assert ("VMM c.usher.test names shared store s1, but its image store is not the one "
            "a.usher.test, b.usher.test see there") in caplog.text
    hosts = controller.ctrl.ctx.reg.hosts
    a, b, c = (hosts[f"{n}.usher.test"] for n in "abc")
    assert len(a.store_id) == 32 and a.store_id == b.store_id != c.store_id
    assert shares_store(a, b) and not shares_store(a, c)
    client = await controller.client()
    try:
        assert {h.name: h.shared_store for h in await client.list_hosts()} == {
            "a.usher.test": "s1", "b.usher.test": "s1", "c.usher.test": "s1"}
    finally:
        await client.close()


async def test_a_node_manager_whose_shared_store_is_not_there_does_not_start(
        controller: RunningController, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist: mount shared store s1 there"):
        await controller.start_node("d.usher.test", shared_store="s1",
                                    image_dir=tmp_path / "missing")
