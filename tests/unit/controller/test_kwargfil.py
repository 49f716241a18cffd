"""kwargfil: per-event accept or drop lists of request options."""

from __future__ import annotations

from typing import Any

import pytest

from usher.config import ControllerConfig
from usher.controller import kwargfil
from usher.controller.events import EventBus, EventData
from usher.errors import ConfigError


def _bus(rule: dict[str, dict[str, list[str]]]) -> EventBus:
    bus = EventBus()
    kwargfil.setup(bus, ControllerConfig(kwargfil=rule), None)
    return bus


async def _run(bus: EventBus, event: str, options: dict[str, Any],
               site_admin: bool = False) -> dict[str, Any]:
    return await bus.request(EventData(event, user="seuss", data={
        "options": options, "site_admin": site_admin}))


async def test_accept_list_drops_everything_else() -> None:
    bus = _bus({"start": {"accept": ["ram"]}})
    out = await _run(bus, "start_request", {"ram": 64, "vcpus": 4, "vmm": "h1", "ip": None})
    assert out == {"ram": 64, "vcpus": None, "vmm": None, "ip": None}


async def test_drop_list_drops_only_those() -> None:
    bus = _bus({"destroy": {"drop": ["force"]}, "migrate": {"drop": ["vmm"]}})
    assert await _run(bus, "destroy_request", {"force": True}) == {"force": False}
    assert await _run(bus, "migrate_request", {"vmm": "h2", "force": False}) == {
        "vmm": None, "force": False}
    # Events without a rule are left alone.
    assert await _run(bus, "start_request", {"vmm": "h1"}) == {"vmm": "h1"}


async def test_site_admins_are_exempt() -> None:
    bus = _bus({"start": {"accept": []}})
    assert await _run(bus, "start_request", {"vmm": "h1"}, site_admin=True) == {"vmm": "h1"}
    assert await _run(bus, "start_request", {"vmm": "h1"}) == {"vmm": None}


def test_the_shipped_rule_accepts_every_start_option() -> None:
    from usher.protocol.ops import StartOptions

    shipped = ControllerConfig().kwargfil["start"]["accept"]
    assert sorted(shipped) == sorted(StartOptions.__struct_fields__)


@pytest.mark.parametrize("rule", [{"accept": ["ram"], "drop": ["vmm"]}, {}, {"keep": []}])
def test_a_malformed_rule_stops_the_controller(rule: dict[str, list[str]]) -> None:
    with pytest.raises(ConfigError, match="exactly one of 'accept' or 'drop'"):
        _bus({"start": rule})
