"""The controller's use of the site directory: logins and cluster branches.

With ``ldap_url`` set, people log in to ush with their directory password: the
controller's service account finds the user among the site's Usher users,
then the controller binds as the user. A cluster user who is not an Usher user
is told so (only once their password has proved who they are). Without a
directory, the embedded user table of :mod:`usher.controller.auth` serves.

The directory provider (the original's uldap) gives every cluster its branch:
the first VM a user starts in a cluster makes the controller create the
cluster's branch with its ``admin`` and ``power`` groups and put the creator
in ``admin``, as a step of that start task. When the directory is away, the
step goes into the outbox and is replayed, with growing delays, until it
succeeds; the VM starts meanwhile. Branches are never deleted.

Every directory call is a blocking ldap3 call: it runs in a small thread pool
under ``ldap_timeout_s``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from usher.config import ControllerConfig
from usher.controller.auth import Identity, LoginLimiter
from usher.controller.db import Database
from usher.controller.models import Outbox
from usher.directory.client import Directory
from usher.directory.layout import Layout
from usher.errors import (
    AuthenticationFailed,
    ConfigError,
    InvalidName,
    PermissionDenied,
    Unavailable,
)
from usher.names import validate_login

log = logging.getLogger(__name__)
T = TypeVar("T")

ENSURE_CLUSTER = "directory.ensure_cluster"
MAX_RETRY_S = 60.0
GROUPS_CACHE_S = 30.0
"""How long the site's group memberships are reused before they are read again."""


class DirectoryLink:
    """Logins against the directory and the cluster-branch provider step."""

    def __init__(self, config: ControllerConfig, db: Database, limiter: LoginLimiter) -> None:
        self.config = config
        self.db = db
        self.limiter = limiter
        self.url = config.ldap_url
        self.site = config.site_domain
        path = Path(config.ldap_service_password_file)
        try:
            self._password = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read ldap_service_password_file {path}: "
                              f"{exc.strerror}") from None
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="usher-ldap")
        self._known: set[str] = set()  # clusters whose branch exists (this run)
        self._inflight: dict[str, asyncio.Future[str]] = {}  # cluster -> its ensure step
        self._site_groups: tuple[float, dict[str, frozenset[str]]] | None = None
        self._wake = asyncio.Event()

    async def _run(self, fn: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(loop.run_in_executor(self._pool, fn),
                                          self.config.ldap_timeout_s * 2)
        except TimeoutError:
            raise Unavailable(f"the directory at {self.url} did not answer within "
                              f"{self.config.ldap_timeout_s * 2:g} s") from None

    def _service(self) -> Directory:
        return Directory.connect(self.url, self.site, _service_dn(self.site), self._password,
                                 timeout=self.config.ldap_timeout_s)

    # ================================================================ login
    async def authenticate(self, user: str, password: str, address: str) -> Identity:
        """Check a login with an LDAP bind; :class:`AuthenticationFailed` or
        :class:`RateLimited` otherwise. Passwords never reach a log."""
        name = user.strip().lower()
        self.limiter.check(f"user:{name}", f"addr:{address}")
        try:
            verdict = await self._run(lambda: self._login(name, password))
        except AuthenticationFailed:
            self.limiter.failed(f"user:{name}", f"addr:{address}")
            raise
        self.limiter.succeeded(f"user:{name}")
        return Identity(user=verdict, site_admin=verdict in self.config.site_admins, usher=True)

    def _login(self, name: str, password: str) -> str:
        try:
            validate_login(name)
        except InvalidName:  # no such user can exist; answer as for any bad login
            raise AuthenticationFailed("login failed: wrong user name or password") from None
        service = self._service()
        try:
            found = service.find_usher_user(name)
            if found is None:
                if service.check_password(name, password):
                    raise PermissionDenied(
                        f"{name} is a cluster user, not an usher user: cluster users log "
                        f"in to their VMs, not to ush; ask the site admin to make {name} "
                        f"an usher user")
                raise AuthenticationFailed("login failed: wrong user name or password")
        finally:
            service.close()
        try:
            Directory.bind_user(self.url, self.site, self.site, name, password,
                                timeout=self.config.ldap_timeout_s).close()
        except AuthenticationFailed:
            raise AuthenticationFailed("login failed: wrong user name or password") from None
        return found.uid

    # ================================================================ groups
    async def groups_of(self, user: str) -> frozenset[str]:
        """The site-cluster groups ``user`` is a member of (IP range access lists).

        Memberships are read for the whole site cluster at once and reused for
        ``GROUPS_CACHE_S``, so a burst of starts costs one search.

        Raises:
            Unavailable: the directory did not answer.
        """
        now = time.monotonic()
        cached = self._site_groups
        if cached is None or now - cached[0] > GROUPS_CACHE_S:
            by_user = await self._run(self._read_site_groups)
            self._site_groups = cached = (now, by_user)
        return cached[1].get(user, frozenset())

    def _read_site_groups(self) -> dict[str, frozenset[str]]:
        service = self._service()
        try:
            groups = service.list_groups(self.site)
        finally:
            service.close()
        by_user: dict[str, set[str]] = {}
        for group in groups:
            for member in group.members:
                by_user.setdefault(member.lower(), set()).add(group.name)
        return {user: frozenset(names) for user, names in by_user.items()}

    # ===================================================== cluster branches
    async def ensure_cluster(self, cluster: str, creator: str, task_id: str) -> str:
        """Give ``cluster`` its branch with ``creator`` in ``admin``; returns what happened.

        A directory that does not answer queues the step in the outbox (in
        the same way a later replay does), so the start goes on. Concurrent
        calls for one cluster share one directory round trip (a batch of a
        thousand new VMs in a new cluster asks once, not a thousand times).
        """
        if cluster in self._known:
            return "exists"
        pending = self._inflight.get(cluster)
        if pending is not None:
            outcome = await asyncio.shield(pending)
            return "exists" if outcome == "created" else outcome
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._inflight[cluster] = fut
        try:
            outcome = await self._ensure_step(cluster, creator, task_id)
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: followers re-raise it themselves
            raise
        else:
            fut.set_result(outcome)
            return outcome
        finally:
            del self._inflight[cluster]

    async def _ensure_step(self, cluster: str, creator: str, task_id: str) -> str:
        try:
            created = await self._run(lambda: self._ensure(cluster, creator))
        except Unavailable as exc:
            payload = json.dumps({"cluster": cluster, "creator": creator}).encode()
            row = dict(kind=ENSURE_CLUSTER, payload=payload, task_id=task_id,
                       created=time.time(), attempts=1,
                       next_try=time.time() + self.config.outbox_retry_s, done=False,
                       last_error=exc.message)
            await self.db.run(lambda s: s.execute(insert(Outbox), [row]))
            log.warning("directory away; branch of %s queued in the outbox: %s", cluster,
                        exc.message)
            self._wake.set()
            return "queued"
        self._known.add(cluster)
        return "created" if created else "exists"

    def _ensure(self, cluster: str, creator: str) -> bool:
        service = self._service()
        try:
            return service.ensure_cluster(cluster, creator)
        finally:
            service.close()

    async def replay_outbox(self) -> None:
        """Replay queued directory writes until each succeeds (runs forever)."""
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.config.outbox_retry_s)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self._replay_due()
            except Exception:
                log.exception("outbox replay failed")

    async def _replay_due(self) -> None:
        now = time.time()

        def due(session: Session) -> list[tuple[int, bytes, int]]:
            rows = session.execute(
                select(Outbox.id, Outbox.payload, Outbox.attempts)
                .where(Outbox.kind == ENSURE_CLUSTER, Outbox.done.is_(False),
                       Outbox.next_try <= now).order_by(Outbox.id).limit(100))
            return [(r[0], r[1], r[2]) for r in rows]

        for row_id, payload, attempts in await self.db.run(due):
            item = json.loads(payload)
            try:
                cluster, creator = item["cluster"], item["creator"]
                await self._run(_bind(self._ensure, cluster, creator))
            except Unavailable as exc:
                delay = min(MAX_RETRY_S, self.config.outbox_retry_s * 2 ** attempts)
                values = dict(attempts=attempts + 1, next_try=time.time() + delay,
                              last_error=exc.message)
                log.info("outbox %d (%s) still waiting: %s", row_id, item["cluster"],
                         exc.message)
            except Exception as exc:  # a permanent refusal: keep it visible, stop retrying
                log.error("outbox %d (%s) failed for good: %s", row_id, item["cluster"], exc)
                values = dict(attempts=attempts + 1, done=True, last_error=str(exc))
            else:
                self._known.add(item["cluster"])
                values = dict(attempts=attempts + 1, done=True, last_error="")
                log.info("outbox %d: branch of %s created", row_id, item["cluster"])
            await self.db.run(_mark(row_id, values))

    async def pending(self) -> int:
        """How many directory writes wait in the outbox."""
        def count(session: Session) -> int:
            return len(session.execute(select(Outbox.id).where(
                Outbox.kind == ENSURE_CLUSTER, Outbox.done.is_(False))).all())
        return await self.db.run(count)

    def close(self) -> None:
        self._pool.shutdown(wait=False)


def _bind(fn: Callable[[str, str], bool], a: str, b: str) -> Callable[[], bool]:
    return lambda: fn(a, b)


def _mark(row_id: int, values: dict[str, object]) -> Callable[[Session], None]:
    def write(session: Session) -> None:
        session.execute(update(Outbox).where(Outbox.id == row_id).values(values))
    return write


def _service_dn(site: str) -> str:
    return Layout.for_site(site).service_dn
