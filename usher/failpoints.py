"""Failpoints: a test-only switch that kills the process at a named step.

Crash-safety tests name a step (``start.committed``, ...) and the daemon dies
there with SIGKILL, exactly as if the machine had pulled the plug on it, with
no timing guesses. The daemon's front-end calls :func:`arm` once at start-up
with the names from its ``USHER_FAILPOINTS`` environment variable (comma
separated); in production nothing is armed and :func:`hit` is one set lookup.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)
_armed: frozenset[str] = frozenset()


def arm(names: str) -> None:
    """Arm the comma-separated failpoint names (empty: disarm all)."""
    global _armed
    _armed = frozenset(n.strip() for n in names.split(",") if n.strip())
    if _armed:
        log.warning("failpoints armed: %s", ", ".join(sorted(_armed)))


def hit(name: str) -> None:
    """Kill this process with SIGKILL if ``name`` is armed."""
    if name in _armed:
        log.warning("failpoint %s: killing the process", name)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)
