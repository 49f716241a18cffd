"""The dns provider's writer against the database thread and the embedded store."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from sqlalchemy.orm import Session

from usher.config import ControllerConfig
from usher.controller import db as dbmod
from usher.controller.dns import DnsProvider
from usher.controller.providers import Placement
from usher.controller.state import Registry, VmRec
from usher.dns import ChangeSet, EmbeddedBackend, Zones, ZoneStore

SITE = "usher.test"
ZONES = Zones([SITE, "10.in-addr.arpa"])


class RecordingBackend(EmbeddedBackend):
    """The embedded store's backend, noting each apply."""

    def __init__(self) -> None:
        super().__init__(ZoneStore(ZONES))
        self.applied: list[ChangeSet] = []

    async def apply(self, changes: ChangeSet) -> None:
        self.applied.append(changes)
        await super().apply(changes)


def _vm(name: str, ip: str) -> VmRec:
    return VmRec(uuid=f"uuid-{name}", name=f"{name}.seuss.{SITE}", cluster=f"seuss.{SITE}",
                 owner="seuss", host=None, state="pending", memory_mib=16, vcpus=1,
                 mac="52:54:00:00:00:01", ip=ip)


async def test_records_are_written_only_after_the_transactions_before_them(
        tmp_path: Path) -> None:
    # A start's records go out once its VM row has committed (the outbox
    # pattern), never beside the journal write that the start waits for.
    url = f"sqlite:///{tmp_path / 'u.db'}"
    dbmod.upgrade(url)
    db = dbmod.Database(dbmod.make_engine(url))
    backend = RecordingBackend()
    provider = DnsProvider(ControllerConfig(site_domain=SITE), ZONES, backend, Registry(), db)
    writer = asyncio.create_task(provider.run())
    release = threading.Event()
    try:
        for _ in range(500):  # the writer's first converge
            if provider._synced_once:
                break
            await asyncio.sleep(0.01)
        assert provider._synced_once

        def journal(_session: Session) -> None:  # stands for the VM's transaction
            release.wait(10)

        committed = db.submit(journal)
        vm = _vm("web", "10.0.0.5")
        provider.reserve(Placement(vm=vm))
        written = asyncio.ensure_future(provider.records_written(vm))
        await asyncio.sleep(0.3)
        assert not backend.applied and not written.done()
        assert provider.state_of(vm) == "pending"

        release.set()
        await committed
        await asyncio.wait_for(written, 5)
        assert provider.state_of(vm) == "ok"
        [changes] = backend.applied
        assert {r.name for r in changes.adds} == {"web.seuss.usher.test.",
                                                  "5.0.0.10.in-addr.arpa."}
    finally:
        release.set()
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        db.close()
