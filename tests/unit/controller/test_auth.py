"""Login rate limits and password hashing."""

from __future__ import annotations

import pytest

from usher.controller.auth import LoginLimiter, hash_password, verify_password
from usher.errors import RateLimited


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_hash_is_argon2_and_verifies() -> None:
    h = hash_password("correct horse")
    assert h.startswith("$argon2id$") and "correct horse" not in h
    assert verify_password(h, "correct horse")
    assert not verify_password(h, "wrong")
    assert not verify_password("not a hash", "x")


def test_limit_per_key_and_window() -> None:
    clock = Clock()
    lim = LoginLimiter(3, 60.0, clock)
    for _ in range(3):
        lim.check("user:a", "addr:1")
        lim.failed("user:a", "addr:1")
    with pytest.raises(RateLimited, match="try again"):
        lim.check("user:a")
    with pytest.raises(RateLimited):
        lim.check("user:b", "addr:1")  # same address, other user
    lim.check("user:b", "addr:2")
    clock.now += 61
    lim.check("user:a", "addr:1")


def test_success_clears_user_failures_not_address() -> None:
    lim = LoginLimiter(2, 60.0, Clock())
    lim.failed("user:a", "addr:1")
    lim.succeeded("user:a")
    lim.failed("user:a", "addr:1")
    lim.check("user:a")
    with pytest.raises(RateLimited):
        lim.check("addr:1")


def test_address_limit_is_separate() -> None:
    lim = LoginLimiter(2, 60.0, Clock(), max_per_address=4)
    for user in "abcd":
        lim.check(f"user:{user}", "addr:1")
        lim.failed(f"user:{user}", "addr:1")
    with pytest.raises(RateLimited):
        lim.check("user:e", "addr:1")
    lim.check("user:e", "addr:2")
