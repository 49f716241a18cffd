"""The DB thread: schema check, models against migrations, group commit."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import func, select, text

from usher.controller import db as dbmod
from usher.controller.models import Base, User
from usher.errors import SchemaOutdated


def _user(name: str) -> User:
    return User(name=name, password_hash="x", site_admin=False, usher=True, created=time.time())


def test_schema_check_refuses_old_schema(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'u.db'}"
    engine = dbmod.make_engine(url)
    with pytest.raises(SchemaOutdated, match="usher-controller db upgrade"):
        dbmod.check_schema(engine)
    dbmod.upgrade(url)
    dbmod.check_schema(engine)
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"


def test_models_and_migrations_agree(tmp_path: Path) -> None:
    # What autogenerate would write for a new revision: nothing, if every model
    # change has its migration (types and nullability included).
    url = f"sqlite:///{tmp_path / 'm.db'}"
    dbmod.upgrade(url)
    engine = dbmod.make_engine(url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(
            conn, opts={"compare_type": True}), Base.metadata)
    engine.dispose()
    assert diff == [], f"models differ from the migrations; make a revision: {diff}"


async def test_group_commit_isolates_failing_jobs(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'u.db'}"
    dbmod.upgrade(url)
    db = dbmod.Database(dbmod.make_engine(url))
    try:
        await db.run(lambda s: s.add(_user("dup")))

        def bad(s):  # type: ignore[no-untyped-def]
            s.add(_user("dup"))
            s.flush()

        results = await asyncio.gather(
            *[db.run(lambda s, i=i: s.add(_user(f"u{i}"))) for i in range(50)],
            db.run(bad), return_exceptions=True)
        assert sum(isinstance(r, Exception) for r in results) == 1
        count = await db.run(lambda s: s.scalar(select(func.count()).select_from(User)))
        assert count == 51
    finally:
        db.close()


async def test_a_caller_that_gives_up_does_not_stop_the_db_thread(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'u.db'}"
    dbmod.upgrade(url)
    db = dbmod.Database(dbmod.make_engine(url))
    try:
        def slow(s):  # type: ignore[no-untyped-def]
            time.sleep(0.3)
            s.add(_user("slow"))

        with pytest.raises(TimeoutError):
            await asyncio.wait_for(db.run(slow), 0.05)  # cancels the job's future
        # The DB thread finished the job and is still serving.
        count = await asyncio.wait_for(
            db.run(lambda s: s.scalar(select(func.count()).select_from(User))), 5)
        assert count == 1
    finally:
        db.close()
