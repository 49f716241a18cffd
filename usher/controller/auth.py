"""Authentication of people: the embedded user store and login rate limits.

Passwords are hashed with argon2id (argon2-cffi). Hashing and verifying are
deliberately slow, so they run in a thread pool, never on the event loop.
Failed logins are limited per user and per address in a sliding window; a
limited login is refused before the password is even checked, and a wrong
password costs the same time whether or not the user exists, so neither the
limit nor the timing tells an attacker which names are real. Passwords never
reach a log.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import select
from sqlalchemy.orm import Session

from usher.controller.db import Database
from usher.controller.models import User
from usher.errors import AlreadyExists, AuthenticationFailed, RateLimited, UserNotFound
from usher.names import validate_login

# Light argon2id parameters: a login costs a few ms of one core, which is what a
# control plane on 2-core machines can afford; still far beyond brute force
# given the rate limit below.
_hasher = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)
_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="usher-hash")
_DUMMY_HASH = _hasher.hash("not a real password")


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(stored_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(stored_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a session is."""

    user: str
    site_admin: bool
    usher: bool


class Authenticator(Protocol):
    """Whatever checks logins: the embedded user table or the directory."""

    async def authenticate(self, user: str, password: str, address: str) -> Identity:
        """The caller's identity; :class:`AuthenticationFailed`, :class:`RateLimited`
        or :class:`PermissionDenied` otherwise."""
        ...


class LoginLimiter:
    """Sliding-window limit of failed logins per key (user name, address)."""

    def __init__(self, max_failures: int, window_s: float,
                 clock: Callable[[], float] = time.monotonic,
                 max_per_address: int | None = None) -> None:
        self.max_failures = max_failures
        self.max_per_address = max_per_address or max_failures
        self.window_s = window_s
        self._clock = clock
        self._failures: dict[str, collections.deque[float]] = {}

    def _recent(self, key: str) -> collections.deque[float]:
        now = self._clock()
        q = self._failures.get(key)
        if q is None:
            return collections.deque()
        while q and now - q[0] > self.window_s:
            q.popleft()
        if not q:
            del self._failures[key]
        return q

    def check(self, *keys: str) -> None:
        """Raise :class:`RateLimited` if any key is over its limit."""
        for key in keys:
            q = self._recent(key)
            limit = self.max_per_address if key.startswith("addr:") else self.max_failures
            if len(q) >= limit:
                wait = self.window_s - (self._clock() - q[0])
                raise RateLimited(f"too many failed logins; try again in {max(wait, 1):.0f} s")

    def failed(self, *keys: str) -> None:
        now = self._clock()
        for key in keys:
            self._failures.setdefault(key, collections.deque()).append(now)
        if len(self._failures) > 100_000:  # bound memory under a spray of names
            oldest = sorted(self._failures, key=lambda k: self._failures[k][-1])
            for key in oldest[: len(oldest) // 2]:
                del self._failures[key]

    def succeeded(self, user_key: str) -> None:
        self._failures.pop(user_key, None)


class UserStore:
    """The embedded user table, used where no directory is configured."""

    def __init__(self, db: Database, limiter: LoginLimiter) -> None:
        self._db = db
        self._limiter = limiter

    async def authenticate(self, user: str, password: str, address: str) -> Identity:
        """Check a login; raises :class:`AuthenticationFailed` or :class:`RateLimited`."""
        name = user.strip().lower()
        self._limiter.check(f"user:{name}", f"addr:{address}")

        def load(session: Session) -> User | None:
            return session.get(User, name)

        row = await self._db.run(load)
        stored = row.password_hash if row is not None else _DUMMY_HASH
        loop = asyncio.get_running_loop()
        ok = await loop.run_in_executor(_pool, verify_password, stored, password)
        if row is None or not ok:
            self._limiter.failed(f"user:{name}", f"addr:{address}")
            raise AuthenticationFailed("login failed: wrong user name or password")
        self._limiter.succeeded(f"user:{name}")
        return Identity(user=row.name, site_admin=row.site_admin, usher=row.usher)


# --------------------------------------------------- admin operations (CLI)
def add_user(session: Session, name: str, password: str, *, site_admin: bool = False,
             usher: bool = True) -> User:
    name = validate_login(name)
    if session.get(User, name) is not None:
        raise AlreadyExists(f"user {name} already exists; use 'user passwd' to change "
                            f"the password")
    user = User(name=name, password_hash=hash_password(password), site_admin=site_admin,
                usher=usher, created=time.time())
    session.add(user)
    return user


def set_password(session: Session, name: str, password: str) -> None:
    user = session.get(User, name.lower())
    if user is None:
        raise UserNotFound(f"no user {name}; see 'usher-controller user list'")
    user.password_hash = hash_password(password)


def delete_user(session: Session, name: str) -> None:
    user = session.get(User, name.lower())
    if user is None:
        raise UserNotFound(f"no user {name}; see 'usher-controller user list'")
    session.delete(user)


def list_users(session: Session) -> list[User]:
    return list(session.scalars(select(User).order_by(User.name)))
