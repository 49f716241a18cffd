"""Reconnect delays: exponential backoff with jitter.

Clients and node managers wait a little longer after each failed attempt to reach the
controller, so a controller that restarts is not hammered by every client at
once. Delays start at ``initial``, double per attempt and never exceed ``cap``;
jitter draws each delay from the upper part of its step so that clients that
lost the controller at the same instant spread out their attempts.
"""

from __future__ import annotations

import random

__all__ = ["Backoff"]

# Past this many doublings every delay is the cap anyway; stopping the exponent
# here keeps ``factor ** attempt`` from overflowing on a very long outage.
_MAX_EXPONENT = 64


class Backoff:
    """Delays for successive attempts: ``initial``, doubling, capped at ``cap``.

    With ``jitter`` j (0 to 1) attempt n waits a random time in
    ``[(1 - j) * base_n, base_n]`` where ``base_n = min(cap, initial * factor**n)``,
    so no delay ever exceeds ``cap``. ``rng`` is injectable for tests.
    """

    def __init__(self, initial: float = 0.2, cap: float = 30.0, *, factor: float = 2.0,
                 jitter: float = 0.5, rng: random.Random | None = None) -> None:
        if initial <= 0 or cap < initial:
            raise ValueError(f"backoff needs 0 < initial <= cap, got {initial} and {cap}")
        if not 0.0 <= jitter <= 1.0:
            raise ValueError(f"backoff jitter must be between 0 and 1, got {jitter}")
        self.initial = initial
        self.cap = cap
        self.factor = factor
        self.jitter = jitter
        self.attempt = 0
        self._rng = rng or random.Random()

    def base(self, attempt: int) -> float:
        """The delay of ``attempt`` (0-based) before jitter."""
        return min(self.cap, self.initial * self.factor ** min(attempt, _MAX_EXPONENT))

    def next_delay(self) -> float:
        """The delay before the next attempt; each call counts one attempt."""
        base = self.base(self.attempt)
        self.attempt += 1
        return base * (1.0 - self.jitter * self._rng.random())

    def reset(self) -> None:
        """Start again from ``initial`` (after a success)."""
        self.attempt = 0
