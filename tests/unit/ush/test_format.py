"""Tests of usher.ush.format: relative names, task lines, tables and JSON."""

from __future__ import annotations

import json

import pytest

from usher.protocol.ops import (
    HostInfo,
    ImageInfo,
    StatsSample,
    TaskInfo,
    VmInfo,
    VmRates,
    VmStateMsg,
    VmStats,
)
from usher.ush import format as fmt

DOMAIN = "seuss.usher.test"
NOW = 1_000_000.0


def vm(name: str, state: str = "running", **kw: object) -> VmInfo:
    fields: dict[str, object] = dict(name=name, uuid="5f0c", state=state, owner="seuss",
                                     cluster=DOMAIN, host="vmm1", memory_mib=512, vcpus=2,
                                     mac="52:54:00:12:34:56")
    fields.update(kw)
    return VmInfo(**fields)  # type: ignore[arg-type]


def task(state: str, **kw: object) -> TaskInfo:
    fields: dict[str, object] = dict(id="3f2a1b2c9d8e7f60", op="vm.start",
                                     vm=f"redfish.sneetch.{DOMAIN}", state=state, user="seuss")
    fields.update(kw)
    return TaskInfo(**fields)  # type: ignore[arg-type]


# ---------------------------------------------------------------- names
@pytest.mark.parametrize(("name", "domain", "shown"), [
    (f"redfish.sneetch.{DOMAIN}", DOMAIN, "redfish.sneetch"),
    (f"web1.{DOMAIN}.", DOMAIN, "web1"),
    ("Web1.SEUSS.usher.test", DOMAIN, "Web1"),
    (f"1.bluefish.{DOMAIN}", DOMAIN + ".", "1.bluefish"),
    ("web1.horton.usher.test", DOMAIN, "web1.horton.usher.test"),
    (DOMAIN, DOMAIN, DOMAIN),
    ("xseuss.usher.test", DOMAIN, "xseuss.usher.test"),
    ("web1.seuss.usher.test", None, "web1.seuss.usher.test"),
])
def test_relative_name(name: str, domain: str | None, shown: str) -> None:
    assert fmt.relative_name(name, domain) == shown


def test_verb_and_short_id() -> None:
    assert fmt.verb_of("vm.start") == "start"
    assert fmt.verb_of("host.disable") == "disable"
    assert fmt.verb_of("odd") == "odd"
    assert fmt.short_id("3f2a1b2c9d8e7f60") == "3f2a1b2c"


# ---------------------------------------------------------------- lines
def test_accepted_line() -> None:
    assert fmt.task_accepted_line(task("queued"), DOMAIN) == \
        "task 3f2a1b2c start redfish.sneetch: accepted"
    assert fmt.task_accepted_line(task("queued"), None) == \
        f"task 3f2a1b2c start redfish.sneetch.{DOMAIN}: accepted"


def test_completion_lines() -> None:
    assert fmt.task_completion_line(task("done", vm_state="running"), DOMAIN) == \
        ("redfish.sneetch: start done (running)", False)
    assert fmt.task_completion_line(task("done", op="vm.destroy"), DOMAIN) == \
        ("redfish.sneetch: destroy done", False)
    assert fmt.task_completion_line(task("error", message="no host has 512 MiB free"),
                                    DOMAIN) == \
        ("redfish.sneetch: start FAILED: no host has 512 MiB free", True)
    line, failed = fmt.task_completion_line(task("error"), DOMAIN)
    assert failed and line.endswith("FAILED: no reason given")


def test_vm_state_line() -> None:
    msg = VmStateMsg(name=f"web1.{DOMAIN}", state="stopped", reason="guest powered off")
    assert fmt.vm_state_line(msg, DOMAIN) == "web1: now stopped (guest powered off)"
    msg = VmStateMsg(name=f"web1.{DOMAIN}", state="running", host="vmm2")
    assert fmt.vm_state_line(msg, DOMAIN) == "web1: now running on vmm2"


@pytest.mark.parametrize(("seconds", "text"), [
    (None, "-"), (-3, "-"), (0, "0s"), (59.9, "59s"), (60, "1m00s"), (750, "12m30s"),
    (3600, "1h00m"), (11_100, "3h05m"), (86_400 * 2 + 3600 * 4, "2d04h"),
])
def test_format_duration(seconds: float | None, text: str) -> None:
    assert fmt.format_duration(seconds) == text


# --------------------------------------------------------------- tables
def test_render_table_aligns_and_trims() -> None:
    text = fmt.render_table(["NAME", "N", "NOTE"], [["a", "5", ""], ["longer", "123", "x"]],
                            right=(1,))
    assert text.splitlines() == [
        "NAME      N  NOTE",
        "a         5",
        "longer  123  x",
    ]


def test_vm_table() -> None:
    vms = [
        vm(f"web2.{DOMAIN}", state="stopped", host=None, reason="guest powered off"),
        vm(f"web1.{DOMAIN}", ip="10.0.0.5", started=NOW - 750),
        vm("db.horton.usher.test", state="paused", memory_mib=4096, vcpus=16,
           started=NOW - 7200),
    ]
    lines = fmt.vm_table(vms, DOMAIN, NOW).splitlines()
    assert lines[0].split() == ["NAME", "STATE", "HOST", "IP", "RAM", "VCPUS", "UPTIME",
                                "REASON"]
    rows = [line.split() for line in lines[1:]]
    assert rows == [
        ["db.horton.usher.test", "paused", "vmm1", "-", "4096M", "16", "2h00m"],
        ["web1", "running", "vmm1", "10.0.0.5", "512M", "2", "12m30s"],
        ["web2", "stopped", "-", "-", "512M", "2", "-", "guest", "powered", "off"],
    ]
    # Every column starts at the same offset on every line.
    state_col = lines[0].index("STATE")
    assert all(line[state_col - 2:state_col] == "  " for line in lines)
    assert all(line == line.rstrip() for line in lines)


def test_vm_table_long() -> None:
    cluster = f"bluefish.{DOMAIN}"
    lines = fmt.vm_table([vm(f"1.{cluster}", cluster=cluster),
                          vm(f"2.{cluster}", cluster=cluster, image="tiny", cpu_pct=152.25,
                             mem_kib=215 * 1024)], DOMAIN, NOW, long=True).splitlines()
    assert lines[0].split() == ["NAME", "STATE", "HOST", "IP", "RAM", "VCPUS", "UPTIME",
                                "CPU%", "MEM", "OWNER", "CLUSTER", "MAC", "UUID", "DNS",
                                "IMAGE", "REASON"]
    assert lines[1].split()[7:] == ["-", "-", "seuss", "bluefish", "52:54:00:12:34:56",
                                    "5f0c", "-", "-"]
    assert lines[2].split()[7:9] == ["152.2", "215M"]
    assert lines[2].split()[14:] == ["tiny"]
    # The figures are right-aligned under their headers.
    assert lines[2].index("215M") + len("215M") == lines[0].index("MEM") + len("MEM")


def test_vm_table_shows_dns_state() -> None:
    vms = [vm(f"a.{DOMAIN}", ip="10.0.0.5", dns="pending"),
           vm(f"b.{DOMAIN}", ip="10.0.0.6", dns="ok", rr=True, reason="held by policy")]
    rows = [line.split() for line in fmt.vm_table(vms, DOMAIN, NOW).splitlines()[1:]]
    assert rows[0][-2:] == ["DNS", "pending"]
    assert rows[1][-3:] == ["held", "by", "policy"]
    long = [line.split() for line in fmt.vm_table(vms, DOMAIN, NOW, long=True)
            .splitlines()[1:]]
    assert long[0][13:] == ["pending", "-", "DNS", "pending"]
    assert long[1][13] == "ok+rr"


def test_image_table() -> None:
    images = [ImageInfo(name="tiny", kernel=True, initrd=True, description="test guest"),
              ImageInfo(name="debian", disk_format="qcow2", description="Debian 12"),
              ImageInfo(name="bare", disk_format="raw")]
    lines = fmt.image_table(images).splitlines()
    assert [line.split() for line in lines] == [
        ["NAME", "DISK", "KERNEL", "INITRD", "DESCRIPTION"],
        ["bare", "raw", "-", "-"],
        ["debian", "qcow2", "-", "-", "Debian", "12"],
        ["tiny", "-", "yes", "yes", "test", "guest"],
    ]
    assert all(line == line.rstrip() for line in lines)


def test_host_table() -> None:
    hosts = [HostInfo(name="vmm2", state="lost", hypervisor="qemu", cpus=8, memory_mib=16384,
                      used_memory_mib=0, used_vcpus=0, vm_count=0),
             HostInfo(name="vmm1", state="up", hypervisor="qemu", cpus=32, memory_mib=131072,
                      used_memory_mib=1024, used_vcpus=2, vm_count=2)]
    lines = fmt.host_table(hosts).splitlines()
    assert lines == [
        "NAME  STATE  CPUS  MEM(MiB)     USED  VMS",
        "vmm1  up       32    131072  1024M/2    2",
        "vmm2  lost      8     16384     0M/0    0",
    ]


def test_host_table_shows_vlans_when_any_host_has_them() -> None:
    hosts = [HostInfo(name="vmm1", state="up", hypervisor="qemu", cpus=8, memory_mib=16384,
                      used_memory_mib=0, used_vcpus=0, vm_count=0, vlans=[30, 31]),
             HostInfo(name="vmm2", state="up", hypervisor="qemu", cpus=8, memory_mib=16384,
                      used_memory_mib=0, used_vcpus=0, vm_count=0)]
    lines = fmt.host_table(hosts).splitlines()
    assert lines[0].split()[-1] == "VLANS"
    assert lines[1].split()[-1] == "30,31" and lines[2].split()[-1] == "-"


def test_host_table_shows_shared_stores_when_any_host_has_one() -> None:
    hosts = [HostInfo(name="vmm1", state="up", hypervisor="qemu", cpus=8, memory_mib=16384,
                      used_memory_mib=0, used_vcpus=0, vm_count=0, shared_store="nfs-a"),
             HostInfo(name="vmm2", state="up", hypervisor="qemu", cpus=8, memory_mib=16384,
                      used_memory_mib=0, used_vcpus=0, vm_count=0)]
    lines = fmt.host_table(hosts).splitlines()
    assert lines[0].split()[-1] == "STORE"
    assert lines[1].split()[-1] == "nfs-a" and lines[2].split()[-1] == "-"


def test_task_table() -> None:
    tasks = [task("running", progress="booting", created=NOW - 5),
             task("done", id="aa", vm_state="running", created=NOW - 90)]
    lines = fmt.task_table(tasks, DOMAIN, NOW).splitlines()
    assert lines[0].split() == ["ID", "OP", "NAME", "STATE", "AGE", "MESSAGE"]
    assert lines[1].split() == ["3f2a1b2c", "start", "redfish.sneetch", "running", "5s",
                                "booting"]
    assert lines[2].split() == ["aa", "start", "redfish.sneetch", "done", "1m30s", "running"]


# ----------------------------------------------------------------- JSON
def test_json_is_an_array_of_complete_objects() -> None:
    data = json.loads(fmt.to_json([vm(f"web1.{DOMAIN}")]))
    assert isinstance(data, list) and len(data) == 1
    obj = data[0]
    assert set(obj) == set(VmInfo.__struct_fields__)
    # Fields at their defaults are present for scripts, not omitted as on the wire.
    assert obj["ip"] is None and obj["reason"] == "" and obj["started"] is None
    assert obj["name"] == f"web1.{DOMAIN}", "JSON keeps full names"
    assert json.loads(fmt.to_json([])) == []


def test_json_of_hosts_and_tasks() -> None:
    host = HostInfo(name="vmm1", state="up", hypervisor="qemu", cpus=8, memory_mib=1,
                    used_memory_mib=0, used_vcpus=0, vm_count=0)
    assert json.loads(fmt.to_json([host]))[0]["live_migration"] is False
    assert json.loads(fmt.to_json([task("queued")]))[0]["finished"] is None


# ------------------------------------------------------------ accounting
@pytest.mark.parametrize(("n", "text"), [
    (None, "-"), (0, "0"), (900, "900"), (1536, "1.5K"), (10 * 1024, "10K"),
    (215 * 1024 * 1024, "215M"), (3.25 * 1024 ** 3, "3.2G"), (5 * 1024 ** 5, "5120T"),
])
def test_format_size(n: float | None, text: str) -> None:
    assert fmt.format_size(n) == text


def rates(cpu: float, mem_kib: int = 1024, bps: float = 0.0) -> VmRates:
    return VmRates(interval_s=60.0, cpu_pct=cpu, mem_kib=mem_kib, disk_rd_bps=bps,
                   disk_wr_bps=bps / 2, net_rx_bps=bps / 4, net_tx_bps=bps / 8)


def vm_stats(name: str, last: VmRates | None, average: VmRates | None = None,
             samples: list[StatsSample] | None = None) -> VmStats:
    return VmStats(name=f"{name}.{DOMAIN}", uuid="u", state="running", host="vmm1",
                   samples=samples or [], rates=last, average=average)


def test_stats_table_shows_rates_and_totals() -> None:
    table = fmt.stats_table([
        vm_stats("web2", rates(200.0, 512 * 1024, 8192)),
        vm_stats("web1", rates(12.34, 215 * 1024, 1024 * 1024)),
        vm_stats("new", None, samples=[StatsSample(time=1.0, memory_kib=2048, rss_kib=1024)]),
    ], DOMAIN)
    assert [line.split() for line in table.splitlines()] == [
        ["NAME", "CPU%", "MEM", "DISK-R/s", "DISK-W/s", "NET-IN/s", "NET-OUT/s"],
        ["new", "-", "1.0M", "-", "-", "-", "-"],  # one sample: memory, no rates yet
        ["web1", "12.3", "215M", "1.0M", "512K", "256K", "128K"],
        ["web2", "200.0", "512M", "8.0K", "4.0K", "2.0K", "1.0K"],
        ["TOTAL", "212.3", "727M", "1.0M", "516K", "258K", "129K"],
    ]
    lines = table.splitlines()
    assert all(line.endswith(("NET-OUT/s", "K", "-")) for line in lines)  # right-aligned


def test_stats_table_averages_and_a_single_vm() -> None:
    one = vm_stats("web1", rates(50.0), average=rates(5.0))
    assert fmt.stats_table([one], DOMAIN).splitlines()[1].split()[:2] == ["web1", "50.0"]
    lines = fmt.stats_table([one], DOMAIN, average=True).splitlines()
    assert len(lines) == 2 and lines[1].split()[:2] == ["web1", "5.0"]  # no TOTAL for one
    none = fmt.stats_table([vm_stats("a", None), vm_stats("b", None)], DOMAIN).splitlines()
    assert none[-1].split() == ["TOTAL", "-", "-", "-", "-", "-", "-"]


def test_json_of_stats_has_every_nested_field() -> None:
    stats = vm_stats("web1", rates(1.0), samples=[StatsSample(time=1.0)])
    [obj] = json.loads(fmt.to_json([stats]))
    assert set(obj) == set(VmStats.__struct_fields__)
    assert obj["samples"] == [{"time": 1.0, "cpu_ns": 0, "memory_kib": 0, "rss_kib": None,
                               "disk_rd": 0, "disk_wr": 0, "net_rx": 0, "net_tx": 0}]
    assert set(obj["rates"]) == set(VmRates.__struct_fields__) and obj["average"] is None
