"""The controller's SQL database: engine, migrations and a group-committing writer.

All SQL runs in one dedicated thread, so the event loop never blocks on the
database and SQLite sees a single writer. Jobs (plain functions of a
``Session``) queue up while a transaction is in progress and the next
transaction takes them all at once, each in a SAVEPOINT of its own: one
failing job rolls back only itself, and a burst of N requests costs one
commit instead of N. That is what lets the controller journal hundreds of
tasks a second on SQLite.

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
        """Run ``job(session)`` in its own savepoint of the next transaction.

        The transaction commits before this returns. The job's exception is
        re-raised here; a failed commit raises :class:`Unavailable`.
        """
        fut: Future[T] = Future()
        self._jobs.put((job, fut))
        return await asyncio.wrap_future(fut)

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
        outcomes: list[tuple[Future[Any], bool, Any]] = []
        try:
            with Session(self.engine, expire_on_commit=False) as session, session.begin():
                for job, fut in batch:
                    if len(batch) == 1:
                        try:
                            outcomes.append((fut, True, job(session)))
                            session.flush()
                        except BaseException as exc:
                            outcomes.append((fut, False, exc))
                            raise
                        continue
                    try:
                        with session.begin_nested():
                            result = job(session)
                        outcomes.append((fut, True, result))
                    except Exception as exc:
                        outcomes.append((fut, False, exc))
        except Exception as exc:
            failed = {id(f) for f, ok, _ in outcomes if not ok}
            if len(batch) == 1 and failed:
                fut = outcomes[0][0]
                fut.set_exception(_translate(outcomes[0][2]))
                return
            log.exception("database commit failed")
            err = Unavailable(f"database commit failed: {exc}")
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(err)
            return
        for fut, ok, value in outcomes:
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(_translate(value))


def _translate(exc: BaseException) -> BaseException:
    if isinstance(exc, SQLAlchemyError):
        log.error("database error: %s", exc)
        return Unavailable(f"database error: {type(exc).__name__}")
    return exc
