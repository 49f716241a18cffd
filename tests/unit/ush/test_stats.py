"""``stats`` driven as a script would drive it, against a fake controller on loopback.

Run both ways, as the other batch tests are: through the cmd2-free batch
runner and through the cmd2 shell. The fake controller answers ``vm.stats``
with fixed figures; what it is asked for (names, samples) is checked here,
the controller's own sampling in tests/integration/test_stats.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.unit.client.fake_controller import DOMAIN, FakeController, Pki
from tests.unit.ush.conftest import Cluster
from tests.unit.ush.test_batch import Runner, make_config
from usher.errors import InvalidOption
from usher.protocol.connection import Connection
from usher.protocol.ops import StatsSample, VmRates, VmStats

pytestmark = pytest.mark.timeout(30)


class Accounting:
    """``vm.stats`` for two VMs: web1 with figures, web2 too new to have rates."""

    def __init__(self, fake: FakeController) -> None:
        self.asked: list[Any] = []
        fake.handlers["vm.stats"] = self.stats

    async def stats(self, conn: Connection, args: Any, rid: str) -> list[VmStats]:
        self.asked.append(args)
        if args.samples is not None and args.samples > 1440:
            raise InvalidOption(f"--samples takes 1 to 1440 (the samples kept per VM), "
                                f"not {args.samples}")
        samples = [StatsSample(time=60.0 * i, cpu_ns=i * 30 * 10**9, memory_kib=262144,
                               rss_kib=200 * 1024, disk_rd=i * 6144 * 60)
                   for i in range(min(args.samples or 60, 3))]
        last = VmRates(interval_s=60.0, cpu_pct=50.0, mem_kib=200 * 1024,
                       disk_rd_bps=6144.0, net_rx_bps=1024.0)
        average = VmRates(interval_s=120.0, cpu_pct=25.0, mem_kib=200 * 1024)
        web1 = VmStats(name=f"web1.{DOMAIN}", uuid="u1", state="running", host="vmm1",
                       samples=samples, rates=last, average=average)
        web2 = VmStats(name=f"web2.{DOMAIN}", uuid="u2", state="running", host="vmm1",
                       samples=samples[:1])
        every = [web1, web2]
        if args.names == ["nothing*"]:
            return []
        return every if not args.names else [v for v in every
                                             if v.name.split(".")[0] in args.names]


@pytest.fixture(params=["batch", "cmd2"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def accounting(controller: FakeController) -> Accounting:
    return Accounting(controller)


@pytest.fixture
def runner(kind: str, pki: Pki, controller: FakeController, cluster: Cluster,
           accounting: Accounting) -> Iterator[Runner]:
    run = Runner(kind, make_config(pki, controller.port))
    yield run
    run.close()


def test_stats_table_over_the_last_interval(runner: Runner, accounting: Accounting) -> None:
    assert runner.run(["stats"]) == 0
    assert [line.split() for line in runner.out()] == [
        ["NAME", "CPU%", "MEM", "DISK-R/s", "DISK-W/s", "NET-IN/s", "NET-OUT/s"],
        ["web1", "50.0", "200M", "6.0K", "0", "1.0K", "0"],
        ["web2", "-", "200M", "-", "-", "-", "-"],
        ["TOTAL", "50.0", "200M", "6.0K", "0", "1.0K", "0"],
    ]
    [asked] = accounting.asked
    assert (asked.names, asked.samples, asked.all_users) == ([], 2, False)


def test_stats_samples_average_and_names(runner: Runner, accounting: Accounting) -> None:
    assert runner.run(["stats web1 --samples 30"]) == 0
    assert [line.split() for line in runner.out()] == [
        ["NAME", "CPU%", "MEM", "DISK-R/s", "DISK-W/s", "NET-IN/s", "NET-OUT/s"],
        ["web1", "25.0", "200M", "0", "0", "0", "0"],  # the average, no TOTAL for one
    ]
    assert (accounting.asked[0].names, accounting.asked[0].samples) == (["web1"], 30)


def test_stats_json_carries_the_samples(runner: Runner, accounting: Accounting) -> None:
    assert runner.run(["stats web1 --json"]) == 0
    [web1] = json.loads("\n".join(runner.out()))
    assert accounting.asked[0].samples is None  # the controller's default series
    assert [s["cpu_ns"] for s in web1["samples"]] == [0, 30 * 10**9, 60 * 10**9]
    assert web1["samples"][0]["net_tx"] == 0, "every field, defaults too"
    assert web1["rates"]["cpu_pct"] == 50.0 and web1["average"]["interval_s"] == 120.0


def test_stats_of_nothing_and_refusals(runner: Runner,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert runner.run(["stats nothing*"]) == 0
    assert runner.out() == ["no VMs match"]
    assert runner.run(["stats --samples 5000"]) == InvalidOption.exit_code
    assert capsys.readouterr().err == (
        "error: --samples takes 1 to 1440 (the samples kept per VM), not 5000\n")
