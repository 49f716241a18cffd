"""The event bus: request policies refuse or amend; observers are isolated."""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path
from typing import Any

import pytest

from usher.config import ControllerConfig
from usher.controller.events import EventBus, EventData, load_plugins
from usher.errors import ConfigError, PermissionDenied, TimedOut, UsherError


async def test_request_handler_refuses() -> None:
    bus = EventBus()

    async def deny(ev: EventData) -> None:
        raise PermissionDenied("no VMs on Sundays")

    bus.subscribe("start_request", deny)
    with pytest.raises(PermissionDenied, match="Sundays"):
        await bus.request(EventData("start_request", data={"options": {"ram": 64}}))


async def test_request_handlers_amend_in_order() -> None:
    bus = EventBus()

    async def cap(ev: EventData) -> dict[str, Any]:
        return {**ev.data["options"], "ram": min(ev.data["options"]["ram"], 128)}

    async def seen(ev: EventData) -> None:
        assert ev.data["options"]["ram"] == 128

    bus.subscribe("start_request", cap)
    bus.subscribe("start_request", seen)
    out = await bus.request(EventData("start_request", data={"options": {"ram": 4096}}))
    assert out == {"ram": 128}


async def test_request_handler_timeout_refuses() -> None:
    bus = EventBus(timeout_s=0.05)

    async def slow(ev: EventData) -> None:
        await asyncio.sleep(1)

    bus.subscribe("start_request", slow)
    with pytest.raises(TimedOut, match="refused"):
        await bus.request(EventData("start_request", data={"options": {}}))


async def test_observer_failure_is_isolated() -> None:
    bus = EventBus()
    got: list[str] = []

    async def broken(ev: EventData) -> None:
        raise RuntimeError("boom")

    async def good(ev: EventData) -> None:
        got.append(ev.name)

    bus.subscribe("start", broken)
    bus.subscribe("*", good)
    bus.fire(EventData("start"))
    await bus.drain()
    assert got == ["start"]


def test_unknown_plugin_is_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown plugin 'nope'"):
        load_plugins(EventBus(), ControllerConfig(plugins=["nope"]), None)


async def test_plugin_dir_and_hooks(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "sunday.py").write_text(
        "async def _deny(ev):\n"
        "    from usher.errors import PermissionDenied\n"
        "    raise PermissionDenied('site plugin says no')\n"
        "def setup(bus, config, services):\n"
        "    bus.subscribe('destroy_request', _deny)\n")
    out = tmp_path / "hook.out"
    hook = tmp_path / "hook.sh"
    hook.write_text(f"#!/bin/sh\ncat > {out}\n")
    hook.chmod(hook.stat().st_mode | stat.S_IEXEC)
    refuse = tmp_path / "refuse.sh"
    refuse.write_text("#!/bin/sh\necho 'quota exceeded for seuss' >&2\nexit 1\n")
    refuse.chmod(refuse.stat().st_mode | stat.S_IEXEC)
    cfg = ControllerConfig(plugins=["sunday"], plugin_dirs=[str(plugins)],
                           hooks={"start": str(hook), "start_request": str(refuse)})
    bus = EventBus()
    assert load_plugins(bus, cfg, None) == ["sunday", "hooks"]
    with pytest.raises(PermissionDenied, match="site plugin says no"):
        await bus.request(EventData("destroy_request", data={"options": {}}))
    with pytest.raises(UsherError, match="quota exceeded for seuss"):
        await bus.request(EventData("start_request", data={"options": {}}))
    bus.fire(EventData("start", user="seuss", subject="a.seuss.site", data={"task": "t1"}))
    await bus.drain()
    event = json.loads(out.read_text())
    assert event["event"] == "start" and event["user"] == "seuss" and event["data"]["task"] == "t1"
