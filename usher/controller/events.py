"""Events and the plugins that act on them.

Event names follow the original Usher: ``ctrl_start``, ``request``,
``<op>_request``, ``<op>``, ``<op>_failure`` for every operation,
``register``, ``unregister``, ``state_change``, ``lnm_register`` and
``lnm_lost``. Handlers of ``*_request`` events run before the action and may
refuse it (raise :class:`PermissionDenied` or another UsherError) or amend
its options (return a new options mapping); the service validates and
authorizes an amended request again. Handlers of other events observe; their
failures are logged and never reach the caller.

Plugins are async Python: a module (entry point group ``usher.plugins`` or a
file in ``plugin_dirs``) whose ``setup(bus, config)`` subscribes handlers.
Every handler call runs under ``plugin_timeout_s``. Built-ins: ``audit``
(every event into the ``events`` table) and ``hooks`` (a site executable per
event gets the event as JSON on stdin, out of process).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import importlib.util
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from usher.config import ControllerConfig
from usher.errors import ConfigError, TimedOut, UsherError

log = logging.getLogger(__name__)


@dataclass(slots=True)
class EventData:
    """What a handler is given."""

    name: str
    user: str | None = None
    subject: str | None = None  # VM FQDN or host name
    data: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)

    def to_json(self) -> str:
        return json.dumps({"event": self.name, "user": self.user, "subject": self.subject,
                           "time": self.time, "data": self.data}, default=str)


Handler = Callable[[EventData], Awaitable[dict[str, Any] | None]]


class EventBus:
    """Subscriptions per event name, with timeouts and error isolation."""

    def __init__(self, timeout_s: float = 5.0) -> None:
        self.timeout_s = timeout_s
        self._handlers: dict[str, list[Handler]] = {}
        self._background: set[asyncio.Task[None]] = set()

    def subscribe(self, event: str, handler: Handler) -> None:
        """Call ``handler`` for ``event`` (``*`` for every event)."""
        self._handlers.setdefault(event, []).append(handler)

    def has_handlers(self, event: str) -> bool:
        return bool(self._handlers.get(event) or self._handlers.get("*"))

    async def request(self, event: EventData) -> dict[str, Any]:
        """Run ``*_request`` handlers in order; returns the (maybe amended) options.

        A handler's UsherError refuses the request and propagates; a handler
        that times out refuses it too (fail closed: a policy that cannot
        decide must not let the request through).
        """
        options = dict(event.data.get("options", {}))
        for handler in self._handlers.get(event.name, []):
            event.data["options"] = options
            try:
                # asyncio.timeout, not wait_for: no extra task per handler call.
                async with asyncio.timeout(self.timeout_s):
                    amended = await handler(event)
            except TimeoutError:
                raise TimedOut(f"policy for {event.name} did not answer within "
                               f"{self.timeout_s:g} s; request refused") from None
            if amended is not None:
                options = dict(amended)
        return options

    def fire(self, event: EventData) -> None:
        """Deliver an observed event to its handlers in the background."""
        handlers = self._handlers.get(event.name, []) + self._handlers.get("*", [])
        if not handlers:
            return
        task = asyncio.create_task(self._deliver(event, handlers))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _deliver(self, event: EventData, handlers: list[Handler]) -> None:
        for handler in handlers:
            try:
                async with asyncio.timeout(self.timeout_s):
                    await handler(event)
            except TimeoutError:
                log.warning("handler %s for %s timed out", handler, event.name)
            except Exception:
                log.exception("handler %s for %s failed", handler, event.name)

    async def drain(self, timeout: float = 5.0) -> None:
        """Wait for background deliveries (shutdown, tests)."""
        if self._background:
            await asyncio.wait(set(self._background), timeout=timeout)


# ------------------------------------------------------------------ plugins
Setup = Callable[[EventBus, ControllerConfig, Any], None]


def _hooks_setup(bus: EventBus, config: ControllerConfig, services: Any) -> None:
    """Built-in ``hooks``: run a site executable per event, event JSON on stdin."""
    for event, executable in config.hooks.items():
        async def run(ev: EventData, exe: str = executable) -> None:
            proc = await asyncio.create_subprocess_exec(
                exe, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE)
            try:
                _, err = await asyncio.wait_for(proc.communicate(ev.to_json().encode()),
                                                config.plugin_timeout_s)
            except TimeoutError:
                proc.kill()
                await proc.wait()
                raise
            if proc.returncode != 0:
                if ev.name.endswith("_request"):
                    msg = err.decode(errors="replace").strip().splitlines()
                    raise UsherError(f"refused by site hook: {msg[-1] if msg else exe}")
                log.warning("hook %s for %s exited %s", exe, ev.name, proc.returncode)

        bus.subscribe(event, run)


def _audit_setup(bus: EventBus, config: ControllerConfig, services: Any) -> None:
    """Built-in ``audit``: every observed event into the ``events`` table.

    Rows join the database's group commit without waiting for it, so auditing
    adds no latency to the operations it records; the rows of the events
    fired in one turn of the event loop go as one insert (a burst of starts
    fires thousands)."""
    from sqlalchemy import insert

    from usher.controller.models import Event

    table = Event.__table__
    pending: list[dict[str, Any]] = []

    def flush() -> None:
        rows = pending[:]
        pending.clear()
        services.db_background(lambda s: s.execute(insert(table), rows))  # type: ignore[arg-type]

    async def record(ev: EventData) -> None:
        if ev.name.endswith("_request"):
            return
        if not pending:
            asyncio.get_running_loop().call_soon(flush)
        pending.append(dict(time=ev.time, name=ev.name, user=ev.user, subject=ev.subject,
                            detail=json.dumps(ev.data, default=str)[:4000]))

    bus.subscribe("*", record)


def _kwargfil_setup(bus: EventBus, config: ControllerConfig, services: Any) -> None:
    from usher.controller import kwargfil

    kwargfil.setup(bus, config, services)


BUILTIN: dict[str, Setup] = {"audit": _audit_setup, "hooks": _hooks_setup,
                             "kwargfil": _kwargfil_setup}


def load_plugins(bus: EventBus, config: ControllerConfig, services: Any) -> list[str]:
    """Load the configured plugins; an unknown name is a ConfigError at start-up."""
    found: dict[str, Setup] = dict(BUILTIN)
    for ep in importlib.metadata.entry_points(group="usher.plugins"):
        found.setdefault(ep.name, ep.load())
    for d in config.plugin_dirs:
        for path in sorted(Path(d).glob("*.py")):
            spec = importlib.util.spec_from_file_location(f"usher_site_plugin_{path.stem}", path)
            if spec is None or spec.loader is None:
                continue
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            setup = getattr(module, "setup", None)
            if setup is None:
                raise ConfigError(f"plugin file {path} has no setup(bus, config, services)")
            found.setdefault(path.stem, setup)
    loaded = []
    names = list(config.plugins)
    if config.hooks and "hooks" not in names:
        names.append("hooks")
    for name in names:
        setup = found.get(name)
        if setup is None:
            raise ConfigError(f"unknown plugin {name!r}; available: {', '.join(sorted(found))}")
        setup(bus, config, services)
        loaded.append(name)
    return loaded
