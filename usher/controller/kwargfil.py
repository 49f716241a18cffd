"""The built-in ``kwargfil`` plugin: which request options users may pass.

As in the original Usher, a site lists per event either the options it
accepts or the options it drops; options outside the rule are removed from
the request (reset to their defaults) before it is validated again and
carried out. The site admins are exempt. The shipped rule for ``start``
accepts every option usher has, so a site narrows it deliberately, e.g.::

    kwargfil = { start = { accept = ["ram", "vcpus"] }, migrate = { drop = ["vmm"] } }

A dropped option is logged with who asked for it; ``list`` shows what the VM
actually got.
"""

from __future__ import annotations

import logging
from typing import Any

from usher.config import ControllerConfig
from usher.controller.events import EventBus, EventData
from usher.errors import ConfigError

log = logging.getLogger(__name__)


def setup(bus: EventBus, config: ControllerConfig, services: Any) -> None:
    """Subscribe one filter per configured event; a malformed rule is a ConfigError."""
    for op, rule in config.kwargfil.items():
        kinds = set(rule) & {"accept", "drop"}
        if len(kinds) != 1 or set(rule) - kinds:
            raise ConfigError(f"kwargfil.{op}: give exactly one of 'accept' or 'drop' "
                              f"(a list of option names)")
        (kind,) = kinds
        bus.subscribe(f"{op}_request", _filter(op, kind, frozenset(rule[kind])))


def _filter(op: str, kind: str, names: frozenset[str]) -> Any:
    async def handle(ev: EventData) -> dict[str, Any] | None:
        if ev.data.get("site_admin"):
            return None
        options: dict[str, Any] = dict(ev.data.get("options", {}))
        dropped = [k for k, v in options.items() if v not in (None, False)
                   and ((k not in names) if kind == "accept" else (k in names))]
        if not dropped:
            return None
        for key in dropped:
            options[key] = False if options[key] is True else None
        log.info("kwargfil: dropped %s from %s's %s request", ", ".join(sorted(dropped)),
                 ev.user, op)
        return options

    return handle
