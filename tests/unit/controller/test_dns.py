"""The dns provider's writer against the database thread and the embedded store."""

from __future__ import annotations

import asyncio
from pathlib import Path

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


async def _writer(tmp_path: Path) -> tuple[DnsProvider, RecordingBackend, asyncio.Task[None],
                                          dbmod.Database]:
    url = f"sqlite:///{tmp_path / 'u.db'}"
    dbmod.upgrade(url)
    db = dbmod.Database(dbmod.make_engine(url))
    backend = RecordingBackend()
    provider = DnsProvider(ControllerConfig(site_domain=SITE), ZONES, backend, Registry(), db)
    writer = asyncio.create_task(provider.run())
    for _ in range(500):  # the writer's first converge
        if provider._synced_once:
            break
        await asyncio.sleep(0.01)
    assert provider._synced_once
    return provider, backend, writer, db


async def test_records_are_written_only_once_their_vm_is_committed(tmp_path: Path) -> None:
    # A start's records go out once its VM row is in SQL (the outbox pattern),
    # never beside the journal write that the start waits for.
    provider, backend, writer, db = await _writer(tmp_path)
    try:
        vm, other = _vm("web", "10.0.0.5"), _vm("db", "10.0.0.6")
        provider.reserve(Placement(vm=vm))
        provider.reserve(Placement(vm=other))
        written = asyncio.ensure_future(provider.records_written(vm))
        await asyncio.sleep(0.3)
        assert not backend.applied and not written.done()
        assert provider.state_of(vm) == "pending"

        provider.commit(vm)  # the VM's transaction committed; the other's has not
        await asyncio.wait_for(written, 5)
        assert provider.state_of(vm) == "ok" and provider.state_of(other) == "pending"
        [changes] = backend.applied
        assert {r.name for r in changes.adds} == {"web.seuss.usher.test.",
                                                  "5.0.0.10.in-addr.arpa."}

        # A start undone before its commit leaves nothing to write.
        provider.release(other)
        await asyncio.sleep(0.3)
        assert len(backend.applied) == 1 and not provider._unready
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        db.close()
