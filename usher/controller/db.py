"""The controller's SQL database: engine, migrations and a group-committing writer.

All SQL runs in one dedicated thread, so the event loop never blocks on the
database and SQLite sees a single writer. Jobs (plain functions of a
``Session``) queue up while a transaction is in progress and the next
transaction takes them all at once: a burst of N requests costs one commit
instead of N. If any job of a batch fails, the batch is rolled back and each
job runs again in a transaction of its own, so one failing job fails alone.
A job must therefore not depend on side effects of its own earlier attempt.

SQLite runs in WAL mode with ``synchronous=NORMAL``: a killed controller loses
nothing committed; a power cut may lose the last transactions (documented in
docs/operations.md). Any other SQLAlchemy URL (PostgreSQL) works unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from usher.errors import ConfigError, SchemaOutdated, Unavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

MIGRATIONS = Path(__file__).parent / "migrations"
MAX_BATCH = 512


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, NORMAL sync and working SAVEPOINTs."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            # pysqlite's own transaction handling breaks SAVEPOINT; take it over
            # (the recipe from SQLAlchemy's SQLite dialect documentation).
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN")

        return engine
    try:
        return create_engine(url, pool_pre_ping=True)
    except (SQLAlchemyError, ImportError) as exc:
        raise ConfigError(f"database_url {url!r} is not usable: {exc}") from None


def _alembic_config(url: str) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str) -> str:
    """Bring the schema at ``url`` to the newest revision; returns it."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(_alembic_config(url), "head")
    return head_revision()


def head_revision() -> str:
    head = ScriptDirectory.from_config(_alembic_config("sqlite://")).get_current_head()
    assert head is not None
    return head


def check_schema(engine: Engine) -> None:
    """Refuse a database whose schema is not this build's newest."""
    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    head = head_revision()
    if current != head:
        raise SchemaOutdated(
            f"database schema is at revision {current or 'none'}, this usher needs {head}; "
            f"run: usher-controller db upgrade")


class Database:
    """Runs session jobs in the DB thread, group-committing queued jobs."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._jobs: queue.SimpleQueue[tuple[Callable[[Session], Any], Future[Any]] | None] = (
            queue.SimpleQueue())
        self._thread = threading.Thread(target=self._worker, name="usher-db", daemon=True)
        self._thread.start()

    async def run(self, job: Callable[[Session], T]) -> T:
        """Run ``job(session)`` in the next transaction (see the module docstring).

        The transaction commits before this returns. The job's exception is
        re-raised here; a failed commit raises :class:`Unavailable`.
        """
        fut: Future[T] = Future()
        self._jobs.put((job, fut))
        return await asyncio.wrap_future(fut)

    def submit(self, job: Callable[[Session], T]) -> asyncio.Future[T]:
        """Queue ``job`` now (jobs run in the order queued) and return its future.

        Like :meth:`run`, but the job is in the queue when this returns, so
        its place in the order is fixed before the caller does anything else.
        """
        fut: Future[T] = Future()
        self._jobs.put((job, fut))
        return asyncio.wrap_future(fut)

    def run_sync(self, job: Callable[[Session], T]) -> T:
        """Run a job from a thread that is not the event loop (start-up, CLI)."""
        fut: Future[T] = Future()
        self._jobs.put((job, fut))
        return fut.result()

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=10)
        self.engine.dispose()

    def _worker(self) -> None:
        while True:
            first = self._jobs.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < MAX_BATCH:
                try:
                    item = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            self._run_batch(batch)
            if stop:
                return

    def _run_batch(self, batch: list[tuple[Callable[[Session], Any], Future[Any]]]) -> None:
        # Optimistic group commit: the whole batch in one transaction. Should
        # any job fail, nothing of the batch is committed and each job runs
        # again alone, so only the failing one fails. Savepoints would isolate
        # jobs too, but cost more than the rare re-run.
        if len(batch) > 1:
            try:
                results = self._transaction([job for job, _ in batch])
            except Exception:
                log.debug("a batch of %d jobs failed; running them one by one", len(batch))
            else:
                for (_, fut), result in zip(batch, results, strict=True):
                    _resolve(fut, result=result)
                return
        for job, fut in batch:
            try:
                [result] = self._transaction([job])
            except Exception as exc:
                _resolve(fut, error=_translate(exc))
            else:
                _resolve(fut, result=result)

    def _transaction(self, jobs: list[Callable[[Session], Any]]) -> list[Any]:
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            results = [job(session) for job in jobs]
            session.flush()
        return results


def _resolve(fut: Future[Any], *, result: Any = None, error: BaseException | None = None
             ) -> None:
    """Hand a job's outcome to its caller, unless the caller stopped waiting."""
    if fut.done():  # cancelled: its awaiter timed out; the work is done regardless
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


def _translate(exc: BaseException) -> BaseException:
    if isinstance(exc, SQLAlchemyError):
        log.error("database error: %s", exc)
        return Unavailable(f"database error: {type(exc).__name__}")
    return exc
