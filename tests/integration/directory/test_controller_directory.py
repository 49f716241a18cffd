"""The controller with a real directory: LDAP login, cluster branches, the outbox."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.integration.conftest import RunningController, write_site
from tests.integration.directory.conftest import (
    ADMIN_PASSWORD,
    PASSWORDS,
    SERVICE_PASSWORD,
    SITE,
    Site,
)
from usher.client import AsyncClient
from usher.controller import ipam
from usher.controller.app import Controller
from usher.directory.slapd import Slapd
from usher.errors import AuthenticationFailed, PermissionDenied, RateLimited


async def _controller(tmp: Path, ldap_url: str, **overrides: object) -> RunningController:
    cfg, pki = write_site(tmp)
    secret = tmp / "ldap-service.password"
    secret.write_text(SERVICE_PASSWORD + "\n")
    cfg = dataclasses.replace(cfg, ldap_url=ldap_url, ldap_service_password_file=str(secret),
                              site_admins=["horton"], ldap_timeout_s=1.0,
                              outbox_retry_s=0.2, **overrides)  # type: ignore[arg-type]
    assert cfg.site_domain == SITE
    ctrl = Controller(cfg)
    host, port = await ctrl.start()
    return RunningController(cfg=cfg, ctrl=ctrl, host=host, port=port, pki=pki, tmp=tmp)


@pytest.fixture
async def controller(site: Site, tmp_path: Path) -> AsyncIterator[RunningController]:
    running = await _controller(tmp_path, site.url)
    try:
        yield running
    finally:
        await running.close()


async def _login(c: RunningController, user: str, password: str) -> AsyncClient:
    return await c.client(user, password, reconnect=False)


async def test_login_is_an_ldap_bind(controller: RunningController) -> None:
    seuss = await _login(controller, "seuss", PASSWORDS["seuss"])
    who = await seuss.whoami()
    assert (who.user, who.site_admin, who.usher_user) == ("seuss", False, True)
    await seuss.close()
    horton = await _login(controller, "horton", PASSWORDS["horton"])
    assert (await horton.whoami()).site_admin  # listed in site_admins
    await horton.close()
    with pytest.raises(AuthenticationFailed, match="wrong user name or password"):
        await _login(controller, "seuss", "not-it")
    with pytest.raises(AuthenticationFailed, match="wrong user name or password"):
        await _login(controller, "nobody", "whatever")
    # A cluster user with the right password learns why; with a wrong one, nothing.
    with pytest.raises(PermissionDenied, match="alice is a cluster user, not an usher user"):
        await _login(controller, "alice", PASSWORDS["alice"])
    with pytest.raises(AuthenticationFailed):
        await _login(controller, "alice", "guess")
    # Injection in the user name is refused, not searched.
    with pytest.raises(AuthenticationFailed):
        await _login(controller, "*)(uid=*", "x")


async def test_failed_ldap_logins_are_rate_limited(controller: RunningController,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    for _ in range(controller.cfg.login_max_failures):
        with pytest.raises(AuthenticationFailed):
            await _login(controller, "seuss", "wrong-secret-1")
    with pytest.raises(RateLimited):
        await _login(controller, "seuss", PASSWORDS["seuss"])
    assert "wrong-secret-1" not in caplog.text and PASSWORDS["seuss"] not in caplog.text


async def test_first_vm_in_a_cluster_creates_its_branch(controller: RunningController,
                                                        site: Site) -> None:
    await controller.start_node("h1.usher.test")
    seuss = await _login(controller, "seuss", PASSWORDS["seuss"])
    try:
        done = await seuss.wait_all(await seuss.start(["1.greenham"], ram=32), 10)
        assert done[0].state == "done"
        cluster = "greenham.seuss.usher.test"
        with site.admin() as admin:
            groups = {g.name: g for g in admin.list_groups(cluster)}
            assert {"admin", "power"} <= set(groups)
            assert "seuss" in groups["admin"].members
        # seuss, now admin of the new cluster, manages it with his own credentials.
        with site.user(SITE, "seuss") as me:
            me.add_user(cluster, "sam", "Sam I Am", "ham-and-eggs")
        # A second VM in the same cluster changes nothing in the directory.
        before = site.snapshot()
        await seuss.wait_all(await seuss.start(["2.greenham"], ram=32), 10)
        assert site.snapshot() == before
    finally:
        await seuss.close()


async def test_a_batch_in_a_new_cluster_asks_the_directory_once(
        controller: RunningController, site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    link = controller.ctrl.ctx.directory
    assert link is not None
    calls: list[str] = []
    real = link._ensure

    def counted(cluster: str, creator: str) -> bool:
        calls.append(cluster)  # a spy: the real directory call still happens
        return real(cluster, creator)

    monkeypatch.setattr(link, "_ensure", counted)
    await controller.start_node("h1.usher.test", cpus=64, memory_mib=1 << 20)
    seuss = await _login(controller, "seuss", PASSWORDS["seuss"])
    try:
        tasks = await seuss.start(["{1..50}.crowd"], ram=16)
        assert {t.state for t in await seuss.wait_all(tasks, 20)} == {"done"}
        assert calls == ["crowd.seuss.usher.test"]
        with site.admin() as admin:
            assert "seuss" in {g.name: g for g in admin.list_groups(
                "crowd.seuss.usher.test")}["admin"].members
    finally:
        await seuss.close()


async def test_ip_range_access_by_site_group(controller: RunningController,
                                            site: Site) -> None:
    with site.admin() as admin:
        admin.add_group(SITE, "gpu")
        admin.modify_group(SITE, "gpu", add=["seuss"])
    db = controller.ctrl.ctx.db
    await db.run(lambda s: ipam.add_range(s, "gpu", "10.90.0.0/24", allow_groups=["gpu"]))
    await controller.ctrl.reload_ranges()
    await controller.start_node("h1.usher.test")
    seuss = await _login(controller, "seuss", PASSWORDS["seuss"])
    horton = await _login(controller, "horton", PASSWORDS["horton"])
    try:
        [done] = await seuss.wait_all(await seuss.start(["g1"], ram=32, ip_range="gpu"), 10)
        assert done.state == "done"
        [vm] = await seuss.list_vms(["g1"])
        assert vm.ip == "10.90.0.2"
        with pytest.raises(PermissionDenied, match="horton may not use IP range gpu"):
            await horton.start(["h1"], ram=32, ip_range="gpu")
    finally:
        await seuss.close()
        await horton.close()


async def test_directory_away_queues_the_branch_in_the_outbox(tmp_path: Path) -> None:
    own = Slapd(tmp_path / "slapd", SITE, root_password="r00t-pw", admin_password=ADMIN_PASSWORD,
                service_password=SERVICE_PASSWORD, durable=False)
    own.start()
    try:
        from usher.directory.client import Directory

        with Directory.connect(own.url, SITE, own.layout.site_admin_dn, ADMIN_PASSWORD) as adm:
            adm.add_usher_user("seuss", "Theodor Seuss Geisel", PASSWORDS["seuss"])
        running = await _controller(tmp_path / "ctl", own.url)
        try:
            await running.start_node("h1.usher.test")
            seuss = await _login(running, "seuss", PASSWORDS["seuss"])
            own.stop()  # the directory goes away after the login
            done = await seuss.wait_all(await seuss.start(["1.away"], ram=32), 15)
            assert done[0].state == "done"  # the VM starts regardless
            link = running.ctrl.ctx.directory
            assert link is not None and await link.pending() == 1
            own.start()  # back on the same port with the same data
            for _ in range(150):  # bounded: 15 s
                if not await link.pending():
                    break
                await asyncio.sleep(0.1)
            assert await link.pending() == 0
            with Directory.connect(own.url, SITE, own.layout.site_admin_dn,
                                   ADMIN_PASSWORD) as adm:
                groups = {g.name: g for g in adm.list_groups("away.seuss.usher.test")}
                assert "seuss" in groups["admin"].members
            await seuss.close()
        finally:
            await running.close()
    finally:
        own.stop()
