"""ush driven non-interactively against a real site: every verb, every bad input.

Each check reads what ush printed, its exit status, and the domains on the
fake hosts (their host files), so a command that claims success but did
nothing, or an error that changed something, fails the test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.site import Site, wait_for
from usher.lnm.fakehost import stored_domains

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    s = Site(tmp_path_factory.mktemp("ush") / "site", lnms=2)
    try:
        yield s.start()
    finally:
        s.close()


def ok(site: Site, *commands: str) -> str:
    proc = site.ush(*commands)
    assert proc.returncode == 0, f"{commands}: rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def fails(site: Site, command: str, message: str, code: int | None = None) -> str:
    before = site.all_domains()
    proc = site.ush(command)
    assert proc.returncode != 0, f"{command} succeeded:\n{proc.stdout}"
    if code is not None:
        assert proc.returncode == code, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert any(line.startswith("error: ") and message in line for line in err), proc.stderr
    assert site.all_domains() == before, f"{command} changed the hosts"
    return proc.stderr


def vms(site: Site) -> dict[str, dict[str, object]]:
    out = json.loads(ok(site, "list --json"))
    return {v["name"].removesuffix(".seuss.usher.test"): v for v in out}


def host_state(site: Site, name: str) -> tuple[int, str]:
    """Which fake host holds the VM and its run state there (exactly one)."""
    uuid = vms(site)[name]["uuid"]
    places = site.all_domains().get(str(uuid), [])
    assert len(places) == 1, places
    i, _, state = places[0]
    return i, state


def test_lifecycle_through_every_verb(site: Site) -> None:
    out = ok(site, "start {1..3}.life --ram 64 --vcpus 2", "list")
    assert out.count("start done (running)") == 3
    assert "1.life" in out and "running" in out
    table = vms(site)
    assert {n for n in table if n.endswith(".life")} == {"1.life", "2.life", "3.life"}
    assert table["1.life"]["memory_mib"] == 64 and table["1.life"]["vcpus"] == 2
    assert host_state(site, "1.life")[1] == "running"

    ok(site, "pause 1.life")
    assert host_state(site, "1.life")[1] == "paused"
    assert "already paused" in ok(site, "pause 1.life")  # same state again: a no-op
    ok(site, "resume 1.life")
    assert host_state(site, "1.life")[1] == "running"
    ok(site, "hibernate 1.life")
    assert host_state(site, "1.life")[1] == "hibernated"
    assert vms(site)["1.life"]["state"] == "hibernated"
    ok(site, "start 1.life")  # restores
    assert host_state(site, "1.life")[1] == "running"
    ok(site, "reboot 1.life", "cycle 1.life")
    assert host_state(site, "1.life")[1] == "running"
    ok(site, "shutdown 1.life")
    assert host_state(site, "1.life")[1] == "stopped" and vms(site)["1.life"]["state"] == "stopped"
    assert "already running" in ok(site, "start 2.life")

    # migrate: cold on the test driver, shown as such, to the named VMM.
    src, _ = host_state(site, "2.life")
    target = site.hosts[1 - src]["name"]
    out = ok(site, f"migrate 2.life --vmm {target}")
    assert "cold migration" in out and "restarted" in out
    dst, state = host_state(site, "2.life")
    assert dst == 1 - src and state == "running" and vms(site)["2.life"]["host"] == target
    out = ok(site, "migrate 1.life")  # stopped: moves cold to the scheduler's choice
    assert "cold migration" in out and host_state(site, "1.life")[1] == "stopped"

    out = ok(site, "destroy {1..3}.life", "list")
    assert out.count("destroy done") == 3
    assert not [n for n in vms(site) if n.endswith(".life")]
    assert not any(name.endswith(".life.seuss.usher.test")
                   for places in site.all_domains().values() for _, name, _ in places)


def dig(site: Site, *args: str) -> set[str]:
    """``dig +short`` against the demo's embedded DNS server (on loopback)."""
    host, port = str(site.info["dns"]).rsplit(":", 1)
    out = subprocess.run(["dig", f"@{host}", "-p", port, "+short", "+time=2", "+tries=1",
                          *args], capture_output=True, text=True, timeout=10).stdout
    return {line for line in out.splitlines() if line}


def test_names_resolve_and_addresses_reach_the_hosts(site: Site) -> None:
    ok(site, "start redfish.sneetch --ram 64", "start {1..2}.pool --ram 64 --rr")
    table = vms(site)
    red = table["redfish.sneetch"]
    assert str(red["ip"]).startswith("10.87.") and red["dns"] == "ok"
    assert dig(site, "redfish.sneetch.seuss.usher.test") == {red["ip"]}
    assert dig(site, "-x", str(red["ip"])) == {"redfish.sneetch.seuss.usher.test."}
    members = {table[f"{i}.pool"]["ip"] for i in (1, 2)}
    assert dig(site, "pool.seuss.usher.test") == members
    # The node manager got the address with the domain (its DHCP host entry
    # is made from it); it is in the domain's own metadata on the host.
    [(i, _, _)] = site.all_domains()[str(red["uuid"])]
    xml = stored_domains(Path(site.hosts[i]["uri"].removeprefix("test://")))[str(red["uuid"])]
    assert f">{red['ip']}</usher:ip>" in xml and "prefix=\"16\"" in xml
    assert "--rr" in ok(site, "help start")
    ok(site, "destroy redfish.sneetch {1..2}.pool")
    wait_for(lambda: dig(site, "redfish.sneetch.seuss.usher.test") == set()
             and dig(site, "pool.seuss.usher.test") == set(), 5, "records to go")


def test_tasks_and_wait(site: Site) -> None:
    ok(site, "start tw --ram 32")
    tasks = json.loads(ok(site, "tasks --json"))
    assert tasks[0]["op"] == "start" and tasks[0]["state"] == "done"
    out = ok(site, f"wait {tasks[0]['id']}")
    assert "tw" in out and "done" in out
    fails(site, "wait 00000000-0000-0000-0000-000000000000", "no task")
    ok(site, "destroy tw")


def test_vmm_list_json_and_sizes(site: Site) -> None:
    hosts = json.loads(ok(site, "vmm_list --json"))
    assert sorted(h["name"] for h in hosts) == sorted(h["name"] for h in site.hosts)
    sizes = {h["name"]: (h["cpus"], h["memory_mib"]) for h in hosts}
    assert sizes == {h["name"]: (h["cpus"], h["memory_mib"]) for h in site.hosts}
    assert all(h["state"] == "up" for h in hosts)


def test_fqdn_names_and_placement_by_free_memory(site: Site) -> None:
    ok(site, "start fq.seuss.usher.test --ram 32")
    v = vms(site)["fq"]
    # The larger fake host (the second demo size) has the most free memory.
    assert v["host"] == max(site.hosts, key=lambda h: h["memory_mib"])["name"]
    ok(site, "destroy fq.seuss.usher.test")


@pytest.mark.parametrize(("command", "message", "code"), [
    ("start web.other.usher.test", "outside your domain seuss.usher.test", 5),
    ("start seuss.usher.test", "is your own domain", 5),
    ("start usher.test", "site domain", None),
    ("start bad_name", "contains '_'", 2),
    ("start -- -x", "", None),
    ("start a..b", "empty label", 2),
    ("start " + "x" * 64, "63", 2),
    ("pause nope", "no VM named nope", 3),
    ("start x --vmm nope", "no VMM named nope", 2),
    ("start big --ram 30000", "no VMM has 30000 MiB of memory free", 6),
    ("start big --vcpus 16 --ram 32", "cpus", 6),
    ("start big --ram 100000", "out of range", 2),
    ("start {1..5000}.x", "more than 1000 names", 2),
    ("start ok1 bad_name ok2", "contains '_'", 2),
    ("start img --image nope", "--image: no image named nope; see 'image_list'", 3),
    ("start img --kernel_parms quiet", "--kernel_parms needs a kernel", 2),
    ("start img --fs_uri file:///srv/d.raw#sha256=" + "a" * 64,
     "only site admins give image URLs", 5),
])
def test_bad_input_changes_nothing(site: Site, command: str, message: str,
                                   code: int | None) -> None:
    before = vms(site)
    fails(site, command, message, code)
    assert vms(site) == before


def test_images_registered_with_the_admin_cli(site: Site, tmp_path: Path) -> None:
    out = ok(site, "image_list")
    assert "e2e" not in out
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"an end-to-end kernel")
    admin = subprocess.run(
        [sys.executable, "-m", "usher.controller.cli", "--config",
         str(site.info["controller"]["config"]),  # type: ignore[index]
         "image", "add", "e2e", "--kernel", kernel.as_uri(), "--description", "e2e guest"],
        capture_output=True, text=True, timeout=30)
    assert admin.returncode == 0, admin.stderr
    assert site.controller is not None
    site.controller.send_signal(signal.SIGHUP)  # read the images again
    wait_for(lambda: "e2e" in ok(site, "image_list"), 10, "the controller to reload images")
    [row] = [line.split() for line in ok(site, "image_list").splitlines()
             if line.startswith("e2e ")]
    assert row == ["e2e", "-", "yes", "-", "e2e", "guest"]
    assert "file:" not in ok(site, "image_list --json")  # users see no URLs
    out = ok(site, "start img1 --ram 32 --image e2e --kernel_parms 'quiet loglevel=3'")
    assert "img1: start done (running)" in out
    assert vms(site)["img1"]["image"] == "e2e"
    ok(site, "destroy img1")


def test_verb_invalid_in_state(site: Site) -> None:
    ok(site, "start st --ram 32", "shutdown st")
    fails(site, "pause st", "cannot pause st: it is stopped", 4)
    fails(site, "resume st", "it is stopped", 4)
    fails(site, "hibernate st", "it is stopped", 4)
    fails(site, "reboot st", "it is stopped", 4)
    # A batch with one VM in the wrong state does nothing at all.
    ok(site, "start st2 --ram 32")
    fails(site, "pause st2 st", "it is stopped", 4)
    assert vms(site)["st2"]["state"] == "running"
    ok(site, "destroy st st2")


def test_wrong_password_and_rate_limit(site: Site, tmp_path: Path) -> None:
    cfg = tmp_path / "bad.config"
    text = (site.dir / "ush.config").read_text()
    cfg.write_text(text.replace(site.password, "wrong-password").replace(
        'user = "seuss"', 'user = "ratelimited"'))
    os.chmod(cfg, 0o600)
    seen = set()
    for _ in range(site.config.login_max_failures + 1):
        proc = site.ush("list", env={"USH_CONFIG": str(cfg)})
        assert proc.returncode == 5
        seen.add("too many failed logins" in proc.stderr)
        assert "wrong-password" not in proc.stderr + proc.stdout
    assert seen == {False, True}
    assert "wrong-password" not in site.log("controller.log")


def test_password_file_readable_by_others_is_refused(site: Site, tmp_path: Path) -> None:
    cfg = tmp_path / "open.config"
    cfg.write_text((site.dir / "ush.config").read_text())
    os.chmod(cfg, 0o644)
    proc = site.ush("list", env={"USH_CONFIG": str(cfg)})
    assert proc.returncode != 0 and f"chmod 600 {cfg}" in proc.stderr


def test_host_disable_enable_remove_need_site_admin(site: Site) -> None:
    host = site.hosts[0]["name"]
    fails(site, f"vmm_disable {host}", "only the site admin", 5)
    admin_pw = (site.dir / "state" / "siteadmin.password").read_text().strip()
    admin = site.client("siteadmin", admin_pw)
    admin.host_disable(host)
    assert {h.name: h.state for h in admin.list_hosts()}[host] == "disabled"
    # No new VMs on a disabled host; pinning to it says so.
    fails(site, f"start pinned --vmm {host}", "disabled")
    ok(site, "start dis --ram 32")
    assert vms(site)["dis"]["host"] != host
    admin.host_enable(host)
    assert {h.name: h.state for h in admin.list_hosts()}[host] == "up"
    ok(site, "destroy dis")
    wait_for(lambda: True)


def test_interactive_help_lists_every_verb(site: Site) -> None:
    out = ok(site, "help")
    for verb in ("connect", "reconnect", "quit", "start", "shutdown", "reboot", "cycle",
                 "destroy", "pause", "resume", "hibernate", "migrate", "list", "vmm_list",
                 "image_list", "tasks", "wait"):
        assert verb in out, verb
    assert "start {1..8}.web" in ok(site, "help start")
