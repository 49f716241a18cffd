"""Crash safety with real processes: node managers and the controller killed with -9."""

from __future__ import annotations

import concurrent.futures
import re
from pathlib import Path

import pytest

from tests.e2e.site import Site, wait_for
from usher.errors import InvalidState, UsherError
from usher.lnm.fakehost import compact

pytestmark = pytest.mark.e2e


@pytest.fixture
def site(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = Site(tmp_path / "site", lnms=2)
    try:
        yield s.start()
    finally:
        s.close()


def test_lost_node_manager_then_reconciled(site: Site) -> None:
    c = site.client()
    host0 = site.hosts[0]["name"]
    tasks = c.start(["{1..3}.lost"], ram=64, vmm=host0)
    assert all(t.state == "done" for t in c.wait_all(tasks))
    uuids = {v.name: v.uuid for v in c.list_vms()}
    assert len(site.domains(0)) == 3

    Site.kill(site.lnm_procs[0])  # kill -9: the host's domains stay as the file says
    wait_for(lambda: {h.name: h.state for h in c.list_hosts()}[host0] == "lost", 10,
             "host to be lost")
    vms = c.list_vms()
    assert {v.state for v in vms} == {"unknown"}
    with pytest.raises(InvalidState, match="unknown"):
        c.wait_all(c.pause(["1.lost"]))
    with pytest.raises(InvalidState, match="destroy --force"):
        c.destroy(["1.lost"])

    # While the node manager is away, guest 2 powers itself off and someone
    # defines a domain by hand: the host file says so.
    path = Path(site.hosts[0]["uri"].removeprefix("test://"))
    compact(path)  # the node manager is down: fold its journal in, then edit the file
    text = path.read_text()
    uuid2 = uuids["2.lost.seuss.usher.test"]
    start = text.index(f"<uuid>{uuid2}</uuid>")
    end = text.index("</domain>", start)
    chunk = re.sub(r"<test:runstate>\d</test:runstate>", "<test:runstate>5</test:runstate>",
                   text[start:end])
    foreign = ("<domain type='test'><name>handmade</name>"
               "<uuid>11111111-2222-3333-4444-555555555555</uuid>"
               "<memory unit='KiB'>1048576</memory><vcpu>1</vcpu>"
               "<os><type>hvm</type></os></domain>\n")
    path.write_text(text[:start] + chunk + text[end:].replace("</node>", foreign + "</node>"))

    site.start_lnm(0)
    wait_for(lambda: {h.name: h.state for h in c.list_hosts()}[host0] == "up", 15,
             "host back up")
    states = wait_for(lambda: (lambda s: s if "unknown" not in s.values() else None)(
        {v.name.split(".")[0]: v.state for v in c.list_vms()}), 10, "reconciled states")
    assert states == {"1": "running", "2": "stopped", "3": "running"}
    # The foreign domain is never handed to the user, and never touched.
    assert "handmade" not in {v.name for v in c.list_vms()}
    assert "11111111-2222-3333-4444-555555555555" in site.domains(0)
    host = {h.name: h for h in c.list_hosts()}[host0]
    # Registered VMs keep their reservation even when stopped; plus the foreign domain.
    assert host.used_memory_mib == 3 * 64 + 1024
    # A reconciled VM is usable again, and destroy --force is only for unknown VMs.
    assert c.wait_all(c.start(["2.lost"]))[0].state == "done"
    assert c.wait_all(c.destroy(["{1..3}.lost"]))[0].state == "done"
    wait_for(lambda: set(site.domains(0)) == {"11111111-2222-3333-4444-555555555555"}, 5,
             "only the foreign domain left")


def test_destroy_force_forgets_vm_on_lost_host(site: Site) -> None:
    c = site.client()
    host1 = site.hosts[1]["name"]
    c.wait_all(c.start(["gone"], ram=32, vmm=host1))
    Site.kill(site.lnm_procs[1])
    wait_for(lambda: c.list_vms()[0].state == "unknown", 10, "VM unknown")
    done = c.wait_all(c.destroy(["gone"], force=True))
    assert done[0].state == "done"
    assert c.list_vms() == []
    host = {h.name: h for h in c.list_hosts()}[host1]
    assert host.used_memory_mib == 0 and host.vm_count == 0


@pytest.mark.parametrize("step", ["start.committed", "start.dispatch", "start.node_done"])
def test_controller_killed_during_start(tmp_path: Path, step: str) -> None:
    """Kill -9 the controller at each step of a start; restart; nothing lost or leaked."""
    site = Site(tmp_path / "site", lnms=2)
    try:
        site.start_controller(failpoints=step)
        for i in range(2):
            site.start_lnm(i)
        c = site.client()
        wait_for(lambda: sum(h.state == "up" for h in c.list_hosts()) == 2, 20, "hosts up")
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            fut = pool.submit(c.start, ["crash"], ram=128, request_id="req-crash-1")
            assert site.controller is not None
            site.controller.wait(20)  # the failpoint killed it
            assert site.controller.returncode == -9, site.log("controller.log")
            site.start_controller()
            try:  # the client resends the same request id after reconnecting
                tasks = fut.result(30)
            except UsherError:
                tasks = None
        wait_for(lambda: sum(h.state == "up" for h in c.list_hosts()) == 2, 20,
                 "hosts re-registered")
        vm = wait_for(lambda: next((v for v in c.list_vms() if v.state == "running"), None),
                      20, "VM running after settle")
        assert [v.name for v in c.list_vms()] == ["crash.seuss.usher.test"]
        if tasks is not None:  # the replayed reply names the same task
            assert c.wait_all(tasks)[0].state == "done"
        assert not c.tasks(active_only=True)
        # Exactly one domain with the VM's UUID, on the VM's host, running.
        doms = site.all_domains()
        assert list(doms) == [vm.uuid]
        [(i, name, state)] = doms[vm.uuid]
        assert site.hosts[i]["name"] == vm.host and state == "running"
        # No reservation leaked: host usage is exactly the VM's size.
        usage = {h.name: (h.used_memory_mib, h.vm_count) for h in c.list_hosts()}
        assert usage[vm.host] == (128, 1)
        assert sum(u[0] for u in usage.values()) == 128
        # The same request id again returns the first reply, creating nothing.
        again = c.start(["crash"], ram=128, request_id="req-crash-1")
        assert len(c.list_vms()) == 1 and len(again) == 1
    finally:
        site.close()
