"""``node.stats``: the node manager reports the counters of usher's domains only.

A real LibvirtDriver on a fake host that also runs a domain usher did not
define: its use is the host's business, not a user's, and stays out of the
reply. (The round trip through a controller is tests/integration/test_stats.py.)
"""

from __future__ import annotations

from pathlib import Path

from usher.config import LnmConfig
from usher.lnm.agent import NodeAgent
from usher.lnm.drivers.base import DomainSpec
from usher.lnm.drivers.libvirt import LibvirtDriver
from usher.lnm.fakehost import FakeHost
from usher.protocol.ops import OPS, Empty, StatsReply

FOREIGN = """\
<domain type='test'>
  <name>not-usher</name>
  <uuid>f0000000-0000-4000-8000-000000000001</uuid>
  <memory unit='MiB'>128</memory>
  <os><type>hvm</type></os>
</domain>
"""


async def test_node_stats_reports_usher_domains_only(tmp_path: Path) -> None:
    host = FakeHost.create(tmp_path / "host.xml", hostname="h1", cpus=4, memory_mib=8192)
    driver = LibvirtDriver(host.uri, fake_host=host, network="")
    driver.open()
    try:
        foreign = driver._connection().defineXML(FOREIGN)
        foreign.create()
        ours = "00000000-0000-4000-8000-000000000001"
        driver.define(DomainSpec(uuid=ours, name="t1.seuss.usher.test", memory_mib=256, vcpus=1,
                                 mac="52:54:00:00:00:01", owner="seuss", task_id="t"))
        driver.start(ours)
        stopped = "00000000-0000-4000-8000-000000000002"
        driver.define(DomainSpec(uuid=stopped, name="t2.seuss.usher.test", memory_mib=256,
                                 vcpus=1, mac="52:54:00:00:00:02", owner="seuss", task_id="t"))
        agent = NodeAgent(LnmConfig(image_dir=str(tmp_path / "images")), driver)
        reply = await agent._handle(None, OPS["node.stats"], Empty(), "r1")  # type: ignore[arg-type]
        assert isinstance(reply, StatsReply)
        by_uuid = {d.uuid: d for d in reply.domains}
        assert set(by_uuid) == {ours, stopped}
        assert by_uuid[ours].cpu_ns > 0 and by_uuid[ours].memory_kib == 256 * 1024
        assert by_uuid[stopped].cpu_ns == 0 and by_uuid[stopped].memory_kib == 0
    finally:
        driver.close()
