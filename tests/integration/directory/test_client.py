"""usher.directory.client.Directory against a real slapd: every method, its refusals,
escaping, concurrency and multi-entry changes that leave nothing half-done."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from ldap3 import MODIFY_ADD, MODIFY_REPLACE

from usher.directory import layout as lay
from usher.directory.client import Directory, DirectoryUser
from usher.directory.slapd import Slapd
from usher.errors import (
    AlreadyExists,
    AuthenticationFailed,
    ClusterNotFound,
    Conflict,
    GroupNotFound,
    InvalidName,
    InvalidRequest,
    PermissionDenied,
    Unavailable,
    UserNotFound,
)

from .conftest import PASSWORDS, SITE, A, B, Site

KEY1 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl one"
KEY2 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBPuNy7ytbXQXzjDQ2nnFmh0nS3nFNNzWrTJ2SnFxIWK two"
RELAX = ("1.3.6.1.4.1.4203.666.5.12", True, None)
HOSTILE = ["*)(uid=*", "a,dc=evil", "x\x00y", "alice)(|(uid=*", "\\2a", "cn=admin"]


class StepFailed(Exception):
    """The failure a test injects into one step of a multi-entry change.

    Deliberately not an UsherError: a subclass would join the error registry.
    """


def fail_at(step: str) -> Callable[[str], None]:
    def hook(name: str) -> None:
        if name == step:
            raise StepFailed(f"injected failure at {step}")
    return hook


def unchanged(site: Site, before: dict[str, Any]) -> None:
    """The site holds exactly what it held, but for numbers taken from the counter."""
    after = site.snapshot()
    counter = site.layout.id_counter_dn.lower()
    before = {dn: attrs for dn, attrs in before.items() if dn != counter}
    after = {dn: attrs for dn, attrs in after.items() if dn != counter}
    assert sorted(set(after) - set(before)) == [], "entries left behind"
    assert sorted(set(before) - set(after)) == [], "entries lost"
    for dn in before:
        assert after[dn] == before[dn], dn


def uids(users: list[DirectoryUser]) -> list[str]:
    return [u.uid for u in users]


# --- sessions -------------------------------------------------------------------------
def test_connect_as_accounts_and_refuse_bad_credentials(site: Site) -> None:
    with site.admin() as admin:
        assert admin.bound_dn == site.layout.site_admin_dn
    with pytest.raises(AuthenticationFailed):
        Directory.connect(site.url, SITE, site.layout.site_admin_dn, "wrong")
    with pytest.raises(AuthenticationFailed):  # an empty password would bind anonymously
        Directory.connect(site.url, SITE, site.layout.site_admin_dn, "")
    with site.anonymous() as anonymous:
        assert uids(anonymous.list_users(A)) == ["alice", "bob", "seuss"]


def test_bind_user_finds_the_user_in_the_cluster_following_links(site: Site) -> None:
    with site.user(A, "alice") as alice:
        assert alice.bound_dn == site.layout.person_dn(A, "alice")
    with site.user(A, "seuss") as seuss:  # linked into A, homed in the site cluster
        assert seuss.bound_dn == site.layout.person_dn(SITE, "seuss")
    with pytest.raises(AuthenticationFailed):
        Directory.bind_user(site.url, SITE, A, "alice", "wrong")
    with pytest.raises(AuthenticationFailed):
        Directory.bind_user(site.url, SITE, A, "alice", "")
    with pytest.raises(AuthenticationFailed):  # carol is not a user of A
        Directory.bind_user(site.url, SITE, A, "carol", PASSWORDS["carol"])
    with pytest.raises(ClusterNotFound):
        Directory.bind_user(site.url, SITE, "nofish.seuss.usher.test", "alice", "x")
    with pytest.raises(InvalidName):
        Directory.bind_user(site.url, SITE, A, "root", "x")


def test_an_unreachable_server_is_unavailable(tmp_path: Path) -> None:
    server = Slapd(tmp_path, SITE, root_password="r", admin_password="a",
                   service_password="s")
    url = server.start()
    directory = Directory.connect(url, SITE, server.layout.site_admin_dn, "a", timeout=2)
    server.stop()
    with pytest.raises(Unavailable, match=f"directory server at {url} is unreachable"):
        directory.list_users(SITE)
    with pytest.raises(Unavailable, match="is unreachable"):
        Directory.connect(url, SITE, timeout=2)


def test_slapd_restarted_on_its_directory_keeps_the_site(tmp_path: Path) -> None:
    server = Slapd(tmp_path, SITE, root_password="r", admin_password="a",
                   service_password="s", durable=False)
    with server:
        with Directory.connect(server.url, SITE, server.layout.site_admin_dn, "a") as admin:
            admin.add_usher_user("yertle", "Yertle", "pw")
    assert server.pid is None
    with server, Directory.bind_user(server.url, SITE, SITE, "yertle", "pw") as yertle:
        assert yertle.get_user(SITE, "yertle").uid_number >= lay.FIRST_ID


# --- clusters ---------------------------------------------------------------------------
def test_ensure_cluster_creates_the_branch_once(site: Site) -> None:
    c = "greenfish.seuss.usher.test"
    with site.service() as service:
        assert service.ensure_cluster(c, "seuss") is True
        assert service.ensure_cluster(c, "SEUSS") is False
    with site.anonymous() as anonymous:
        users = anonymous.list_users(c, long=True)
        groups = {g.name: g for g in anonymous.list_groups(c)}
    assert [(u.uid, u.linked, u.groups) for u in users] == [("seuss", True, ("admin",))]
    assert set(groups) == {"admin", "power", "seuss"}
    assert groups["admin"].members == ("seuss",) and groups["seuss"].linked
    assert groups["admin"].gid_number >= lay.FIRST_ID
    assert groups["admin"].gid_number != groups["power"].gid_number


def test_ensure_cluster_called_twice_at_once_makes_one_branch(site: Site) -> None:
    c = "greenfish.seuss.usher.test"
    sessions = [site.service(), site.service()]
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def ensure(session: Directory) -> None:
        barrier.wait()
        try:
            session.ensure_cluster(c, "seuss")
        except BaseException as exc:  # reported below
            errors.append(exc)

    workers = [threading.Thread(target=ensure, args=(s,)) for s in sessions]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(10)
    for session in sessions:
        session.close()
    assert errors == []
    with site.anonymous() as anonymous:
        assert {g.name: g.members for g in anonymous.list_groups(c)} == {
            "admin": ("seuss",), "power": (), "seuss": ()}


def test_ensure_cluster_repairs_a_partial_branch(site: Site) -> None:
    site.root().delete(site.layout.group_dn(A, "power"))
    with site.service() as service:
        assert service.ensure_cluster(A, "seuss") is True
    with site.anonymous() as anonymous:
        assert "power" in {g.name for g in anonymous.list_groups(A)}


def test_ensure_cluster_for_a_creator_homed_there_adds_no_link(site: Site) -> None:
    with site.service() as service:
        assert service.ensure_cluster(A, "alice") is True
    with site.anonymous() as anonymous:
        alice = [u for u in anonymous.list_users(A, long=True) if u.uid == "alice"][0]
    assert not alice.linked and alice.groups == ("admin",)


def test_ensure_cluster_refusals(site: Site) -> None:
    with site.service() as service:
        with pytest.raises(InvalidName):
            service.ensure_cluster("fish.example.org", "seuss")
        with pytest.raises(UserNotFound):
            service.ensure_cluster("greenfish.seuss.usher.test", "zaphod")
    with site.user(A, "alice") as alice, pytest.raises(PermissionDenied):
        alice.ensure_cluster("greenfish.seuss.usher.test", "alice")


@pytest.mark.parametrize("step", ["ensure_cluster.add:ou=groups",
                                  "ensure_cluster.add:cn=power", "link.person", "link.group",
                                  "ensure_cluster.add_admin"])
def test_ensure_cluster_failing_midway_leaves_nothing(site: Site, step: str) -> None:
    before = site.snapshot()
    with site.service(step_hook=fail_at(step)) as service, pytest.raises(StepFailed):
        service.ensure_cluster("greenfish.seuss.usher.test", "seuss")
    unchanged(site, before)


# --- users ------------------------------------------------------------------------------
def test_add_user_makes_a_person_a_private_group_and_a_password(site: Site) -> None:
    with site.user(SITE, "seuss") as seuss:
        dave = seuss.add_user(A, "Dave", "Dave Bowman", "open-the-pod-bay", shell="/bin/zsh",
                              home_uri="nfs://files.usher.test/home/dave", keys=[KEY1])
        assert (dave.uid, dave.home_cluster, dave.linked) == ("dave", A, False)
        assert dave.uid_number == dave.gid_number >= lay.FIRST_ID
        assert seuss.get_user(A, "dave") == dave
        groups = {g.name: g for g in seuss.list_groups(A)}
    assert groups["dave"].gid_number == dave.uid_number and groups["dave"].private
    assert dave.keys == (KEY1,) and dave.shell == "/bin/zsh"
    assert dave.home_uri == "nfs://files.usher.test/home/dave"
    with Directory.bind_user(site.url, SITE, A, "dave", "open-the-pod-bay") as session:
        assert session.bound_dn == site.layout.person_dn(A, "dave")
    stored = site.snapshot()[site.layout.person_dn(A, "dave")]["userpassword"]
    assert stored[0].startswith(b"{SSHA512}")


def test_add_user_without_password_cannot_log_in(site: Site) -> None:
    with site.user(SITE, "seuss") as seuss:
        seuss.add_user(A, "dave", "Dave", None, keys=[KEY1])
    assert "userpassword" not in site.snapshot()[site.layout.person_dn(A, "dave")]
    with pytest.raises(AuthenticationFailed):
        Directory.bind_user(site.url, SITE, A, "dave", "anything")


def test_add_user_refusals(site: Site) -> None:
    with site.user(SITE, "seuss") as seuss:
        with pytest.raises(AlreadyExists, match="alice lives in cluster"):
            seuss.add_user(A, "alice", "Another Alice", "pw")
        with pytest.raises(AlreadyExists):  # login names are unique across the site
            seuss.add_user(A, "carol", "Another Carol", "pw")
        seuss.add_group(A, "devs")
        with pytest.raises(AlreadyExists, match="group named devs"):
            seuss.add_user(A, "devs", "Dev Null", "pw")
        with pytest.raises(InvalidName):
            seuss.add_user(A, "root", "Root", "pw")
        with pytest.raises(ClusterNotFound):
            seuss.add_user("nofish.seuss.usher.test", "dave", "Dave", "pw")
        for bad in ({"full_name": "Dave: Bowman"}, {"full_name": " "},
                    {"shell": "bash"}, {"shell": "/bin/../sh"},
                    {"home_uri": "http://files/home/dave"}, {"home_uri": "nfs://files/"},
                    {"home_uri": "nfs://user@files/home"}, {"keys": ["ssh-ed25519 AAAA"]},
                    {"keys": ["ssh-rsa " + KEY1.split()[1]]}, {"password": ""}):
            args: dict[str, Any] = {"full_name": "Dave", "password": "pw", **bad}
            with pytest.raises(InvalidRequest):
                seuss.add_user(A, "dave", args.pop("full_name"), args.pop("password"), **args)
    with site.user(A, "bob") as bob, pytest.raises(PermissionDenied, match="admins of"):
        bob.add_user(A, "dave", "Dave", "pw")
    with site.user(SITE, "horton") as horton, pytest.raises(PermissionDenied):
        horton.add_user(A, "dave", "Dave", "pw")


@pytest.mark.parametrize("step", ["add_user.person", "add_user.group", "add_user.password"])
def test_add_user_failing_midway_leaves_nothing(site: Site, step: str) -> None:
    before = site.snapshot()
    with site.user(SITE, "seuss", step_hook=fail_at(step)) as seuss, \
            pytest.raises(StepFailed):
        seuss.add_user(A, "dave", "Dave", "pw")
    unchanged(site, before)


def test_delete_user_removes_entry_group_memberships_and_links(site: Site) -> None:
    with site.user(SITE, "seuss") as seuss:
        seuss.add_group(A, "devs")
        seuss.modify_group(A, "devs", add=["alice"])
        seuss.modify_group(A, "admin", add=["alice"])
    with site.user(SITE, "horton") as horton:
        horton.link_user(B, "alice")
    with site.user(SITE, "seuss") as seuss:
        seuss.delete_user(A, "alice")
        assert uids(seuss.list_users(A)) == ["bob", "seuss"]
        assert {g.name: g.members for g in seuss.list_groups(A)}["devs"] == ()
        assert {g.name: g.members for g in seuss.list_groups(A)}["admin"] == ("seuss",)
    dns = site.dns(site.layout.suffix)
    assert not [dn for dn in dns if dn.startswith(("uid=alice,", "cn=alice,"))]
    with site.anonymous() as anonymous:
        assert uids(anonymous.list_users(B)) == ["carol", "horton"]


def test_delete_user_of_a_link_unlinks_only(site: Site) -> None:
    with site.user(SITE, "horton") as horton:
        horton.link_user(B, "alice")
        horton.add_group(B, "devs")
        horton.modify_group(B, "devs", add=["alice"])
        horton.delete_user(B, "alice")
        assert uids(horton.list_users(B)) == ["carol", "horton"]
        assert {g.name: g.members for g in horton.list_groups(B)} == {
            "admin": ("horton",), "carol": (), "devs": (), "horton": (), "power": ()}
    with site.user(A, "alice") as alice:
        assert alice.get_user(A, "alice").uid == "alice"


def test_delete_user_refusals(site: Site) -> None:
    with site.user(SITE, "seuss") as seuss:
        with pytest.raises(Conflict, match="no admin left"):
            seuss.delete_user(A, "seuss")
        with pytest.raises(UserNotFound):
            seuss.delete_user(A, "carol")
    with site.user(A, "bob") as bob, pytest.raises(PermissionDenied):
        bob.delete_user(A, "alice")
    with site.user(SITE, "horton") as horton, pytest.raises(PermissionDenied):
        horton.delete_user(A, "alice")


@pytest.mark.parametrize("step", ["leave_group:devs", "delete_user.group",
                                  "delete_user.person"])
def test_delete_user_failing_midway_leaves_nothing(site: Site, step: str) -> None:
    with site.user(SITE, "seuss") as seuss:
        seuss.add_group(A, "devs")
        seuss.modify_group(A, "admin", add=["alice"])
        seuss.modify_group(A, "devs", add=["alice"])
    before = site.snapshot()
    with site.user(SITE, "seuss", step_hook=fail_at(step)) as seuss, \
            pytest.raises(StepFailed):
        seuss.delete_user(A, "alice")
    unchanged(site, before)


def test_delete_user_refused_by_slapd_midway_is_undone(site: Site) -> None:
    # A real failure: slapd will not delete an entry that has children.
    site.root().add("cn=note," + site.layout.person_dn(A, "alice"),
                    attributes={"objectClass": ["top", "organizationalRole"], "cn": "note"})
    with site.user(SITE, "seuss") as seuss:
        seuss.modify_group(A, "admin", add=["alice"])
    before = site.snapshot()
    with site.user(SITE, "seuss") as seuss, pytest.raises(Conflict):
        seuss.delete_user(A, "alice")
    unchanged(site, before)


def test_unlink_failing_midway_leaves_nothing(site: Site) -> None:
    with site.user(SITE, "horton") as horton:
        horton.link_user(B, "alice")
        horton.modify_group(B, "admin", add=["alice"])
    before = site.snapshot()
    for step in ("delete_user.group_link", "delete_user.link"):
        with site.user(SITE, "horton", step_hook=fail_at(step)) as horton, \
                pytest.raises(StepFailed):
            horton.delete_user(B, "alice")
        unchanged(site, before)


def test_list_users_marks_links_and_skips_dangling_ones(site: Site) -> None:
    with site.user(SITE, "horton") as horton:
        horton.link_user(B, "alice")
    with site.anonymous() as anonymous:
        users = {u.uid: u for u in anonymous.list_users(B, long=True)}
        assert set(users) == {"alice", "carol", "horton"}
        assert users["alice"].linked and users["alice"].home_cluster == A
        assert not users["carol"].linked and users["horton"].groups == ("admin",)
        assert anonymous.list_users(B)[0].groups == ()  # groups only with long
        root = site.root()
        root.delete(site.layout.group_dn(A, "alice"))
        root.delete(site.layout.person_dn(A, "alice"))
        assert uids(anonymous.list_users(B)) == ["carol", "horton"]
        with pytest.raises(UserNotFound, match="deleted user"):
            anonymous.get_user(B, "alice")
        with pytest.raises(ClusterNotFound):
            anonymous.list_users("nofish.seuss.usher.test")


def test_modify_user_by_the_person_and_home_admins(site: Site) -> None:
    with site.user(A, "alice") as alice:
        user = alice.modify_user(A, "alice", full_name="Alice Pleasance Liddell",
                                 shell="/bin/zsh", home_uri="nfs://10.0.0.5/export/alice",
                                 add_keys=[KEY1, KEY2])
        assert (user.full_name, user.shell) == ("Alice Pleasance Liddell", "/bin/zsh")
        assert user.home_uri == "nfs://10.0.0.5/export/alice"
        assert set(user.keys) == {KEY1, KEY2}
        # A key is matched by type and data; its comment does not matter.
        user = alice.modify_user(A, "alice", remove_keys=[KEY1.rsplit(" ", 1)[0] + " x"])
        assert user.keys == (KEY2,)
        assert alice.modify_user(A, "alice", add_keys=[KEY2]).keys == (KEY2,)
    with site.user(SITE, "seuss") as seuss:
        user = seuss.modify_user(A, "alice", full_name="Алиса", home_uri="", replace_keys=[])
        assert (user.full_name, user.home_uri, user.keys) == ("Алиса", None, ())
    assert "gecos" not in site.snapshot()[site.layout.person_dn(A, "alice")]


def test_modify_user_refusals(site: Site) -> None:
    with site.user(SITE, "horton") as horton:
        horton.link_user(B, "alice")
        with pytest.raises(PermissionDenied, match=f"home cluster {A}"):
            horton.modify_user(B, "alice", shell="/bin/sh")
    with site.user(A, "bob") as bob, pytest.raises(PermissionDenied):
        bob.modify_user(A, "alice", add_keys=[KEY1])
    with site.user(A, "alice") as alice:
        with pytest.raises(InvalidRequest, match="nothing to change"):
            alice.modify_user(A, "alice")
        with pytest.raises(InvalidRequest, match="has no key"):
            alice.modify_user(A, "alice", remove_keys=[KEY1])
        with pytest.raises(InvalidRequest, match="not both"):
            alice.modify_user(A, "alice", replace_keys=[KEY1], add_keys=[KEY2])
        with pytest.raises(InvalidRequest):
            alice.modify_user(A, "alice", home_uri="nfs://host/home/a?x=1")
        with pytest.raises(UserNotFound):
            alice.modify_user(A, "carol", shell="/bin/sh")


def test_set_password(site: Site) -> None:
    with site.user(A, "alice") as alice:
        alice.set_password(A, "alice", "new-secret", old_password=PASSWORDS["alice"])
        with pytest.raises(AuthenticationFailed, match="old password"):
            alice.set_password(A, "alice", "other", old_password="wrong")
    with Directory.bind_user(site.url, SITE, A, "alice", "new-secret"):
        pass
    with site.user(SITE, "seuss") as seuss:
        seuss.set_password(A, "alice", "from-admin")
        with pytest.raises(InvalidRequest):
            seuss.set_password(A, "alice", "")
    with site.user(SITE, "horton") as horton:
        horton.link_user(B, "alice")
        with pytest.raises(PermissionDenied, match="only alice and the admins"):
            horton.set_password(B, "alice", "hijacked")
    with Directory.bind_user(site.url, SITE, B, "alice", "from-admin"):
        pass
    stored = site.snapshot()[site.layout.person_dn(A, "alice")]["userpassword"]
    assert len(stored) == 1 and stored[0].startswith(b"{SSHA512}")


def test_link_user_shares_the_account_without_copying_it(site: Site) -> None:
    with site.user(SITE, "horton") as horton:
        alice = horton.link_user(B, "alice")
        assert alice.linked and alice.home_cluster == A
        groups = {g.name: g for g in horton.list_groups(B)}
        assert groups["alice"].linked and groups["alice"].gid_number == alice.gid_number
    with Directory.bind_user(site.url, SITE, B, "alice", PASSWORDS["alice"]) as session:
        assert session.bound_dn == site.layout.person_dn(A, "alice")
    entry = site.snapshot()[site.layout.person_dn(B, "alice")]
    assert "userpassword" not in entry and b"alias" in entry["objectclass"]


def test_link_user_refusals(site: Site) -> None:
    with site.user(SITE, "horton") as horton:
        horton.link_user(B, "alice")
        with pytest.raises(AlreadyExists):
            horton.link_user(B, "alice")
        with pytest.raises(AlreadyExists, match="home"):
            horton.link_user(B, "carol")
        with pytest.raises(UserNotFound):
            horton.link_user(B, "zaphod")
        horton.add_group(B, "bob")
        with pytest.raises(Conflict, match="group named bob"):
            horton.link_user(B, "bob")
    with site.user(B, "carol") as carol, pytest.raises(PermissionDenied):
        carol.link_user(B, "seuss")


def test_link_user_refuses_a_uid_number_clash(site: Site) -> None:
    # Unique numbers are slapd's rule; a clash can only come from data loaded
    # around it (here: the rootdn with the relax control).
    with site.anonymous() as anonymous:
        number = anonymous.get_user(A, "alice").uid_number
    site.root().add(site.layout.person_dn(B, "dave"), attributes={
        "objectClass": ["top", "inetOrgPerson", "posixAccount"], "uid": "dave", "cn": "Dave",
        "sn": "Dave", "uidNumber": str(number), "gidNumber": str(number),
        "homeDirectory": "/home/dave"}, controls=[RELAX])
    with site.user(SITE, "horton") as horton, \
            pytest.raises(Conflict, match=f"uid number {number} is already used in {B} by dave"):
        horton.link_user(B, "alice")


def test_link_user_drops_memberships_of_an_earlier_namesake(site: Site) -> None:
    with site.user(SITE, "horton") as horton:
        horton.add_group(B, "devs")
    site.root().modify(site.layout.group_dn(B, "devs"), {"memberUid": [(MODIFY_ADD, ["alice"])]})
    site.root().modify(site.layout.admin_group_dn(B), {"memberUid": [(MODIFY_ADD, ["alice"])]})
    with site.user(SITE, "horton") as horton:
        horton.link_user(B, "alice")
        assert horton.get_user(B, "alice").groups == ()


@pytest.mark.parametrize("step", ["leave_group:admin", "link.person", "link.group"])
def test_link_user_failing_midway_leaves_nothing(site: Site, step: str) -> None:
    site.root().modify(site.layout.admin_group_dn(B), {"memberUid": [(MODIFY_ADD, ["alice"])]})
    before = site.snapshot()
    with site.user(SITE, "horton", step_hook=fail_at(step)) as horton, \
            pytest.raises(StepFailed):
        horton.link_user(B, "alice")
    unchanged(site, before)


# --- groups -----------------------------------------------------------------------------
def test_groups_add_list_modify_delete(site: Site) -> None:
    with site.user(SITE, "seuss") as seuss:
        devs = seuss.add_group(A, "Devs")
        assert devs.name == "devs" and devs.gid_number >= lay.FIRST_ID
        devs = seuss.modify_group(A, "devs", add=["alice", "bob"])
        assert devs.members == ("alice", "bob")
        assert seuss.modify_group(A, "devs", add=["alice"]).members == ("alice", "bob")
        devs = seuss.modify_group(A, "devs", add=["seuss"], remove=["bob", "alice"])
        assert devs.members == ("seuss",)
        groups = {g.name: g for g in seuss.list_groups(A)}
        assert set(groups) == {"admin", "alice", "bob", "devs", "power", "seuss"}
        assert groups["alice"].private and not groups["devs"].private
        assert len({g.gid_number for g in groups.values()}) == len(groups)
        seuss.delete_group(A, "devs")
        assert "devs" not in {g.name for g in seuss.list_groups(A)}


def test_group_refusals(site: Site) -> None:
    with site.user(SITE, "seuss") as seuss:
        seuss.add_group(A, "devs")
        with pytest.raises(AlreadyExists):
            seuss.add_group(A, "devs")
        with pytest.raises(AlreadyExists):
            seuss.add_group(A, "alice")
        with pytest.raises(InvalidName):
            seuss.add_group(A, "wheel")
        for name in ("admin", "power"):
            with pytest.raises(InvalidRequest, match="every cluster"):
                seuss.delete_group(A, name)
        with pytest.raises(InvalidRequest, match="private group"):
            seuss.delete_group(A, "alice")
        with pytest.raises(InvalidRequest, match="private group"):
            seuss.delete_group(A, "seuss")
        with pytest.raises(GroupNotFound):
            seuss.delete_group(A, "ops")
        with pytest.raises(GroupNotFound):
            seuss.modify_group(A, "ops", add=["alice"])
        with pytest.raises(UserNotFound, match="carol is not a user"):
            seuss.modify_group(A, "devs", add=["carol"])
        with pytest.raises(InvalidRequest, match="linked in"):
            seuss.modify_group(A, "seuss", add=["alice"])
        with pytest.raises(Conflict, match="no admin left"):
            seuss.modify_group(A, "admin", remove=["seuss"])
    with site.user(A, "bob") as bob:
        with pytest.raises(PermissionDenied):
            bob.add_group(A, "ops")
        with pytest.raises(PermissionDenied):
            bob.modify_group(A, "devs", add=["bob"])
        with pytest.raises(PermissionDenied):
            bob.delete_group(A, "devs")


def test_two_admins_removing_each_other_at_once_leave_one(site: Site) -> None:
    with site.user(SITE, "seuss") as seuss:
        seuss.modify_group(A, "admin", add=["bob"])
    sessions = {"seuss": site.user(SITE, "seuss"), "bob": site.user(A, "bob")}
    other = {"seuss": "bob", "bob": "seuss"}
    barrier = threading.Barrier(2)
    outcomes: dict[str, str] = {}

    def remove_other(who: str) -> None:
        barrier.wait()
        try:
            sessions[who].modify_group(A, "admin", remove=[other[who]])
            outcomes[who] = "removed"
        except Conflict:
            outcomes[who] = "refused"
        except PermissionDenied:  # removed first, so no longer an admin
            outcomes[who] = "denied"

    threads = [threading.Thread(target=remove_other, args=(w,)) for w in sessions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    for session in sessions.values():
        session.close()
    assert sorted(outcomes.values()).count("removed") == 1, outcomes
    with site.anonymous() as anonymous:
        admins = {g.name: g.members for g in anonymous.list_groups(A)}["admin"]
    assert len(admins) == 1


# --- Usher users ---------------------------------------------------------------------------
def test_usher_users(site: Site) -> None:
    with site.service() as service:
        seuss = service.find_usher_user("Seuss")
        assert seuss is not None and seuss.home_cluster == SITE and seuss.uid == "seuss"
        assert service.find_usher_user("alice") is None
        assert service.find_usher_user("zaphod") is None
    with site.admin() as admin:
        admin.add_usher_user("yertle", "Yertle the Turtle", "king-of-the-pond")
        with pytest.raises(AlreadyExists):
            admin.add_usher_user("alice", "Alice", "pw")
    with site.service() as service:
        assert service.find_usher_user("yertle") is not None
    with Directory.bind_user(site.url, SITE, SITE, "yertle", "king-of-the-pond"):
        pass
    with site.admin() as admin:
        admin.delete_user(SITE, "yertle")
    with site.service() as service:
        assert service.find_usher_user("yertle") is None
    assert b"yertle" not in site.snapshot()[site.layout.usher_users_dn].get("memberuid", [])
    with site.user(SITE, "seuss") as session:
        with pytest.raises(PermissionDenied):
            session.find_usher_user("seuss")
        with pytest.raises(PermissionDenied, match="site admin"):
            session.add_usher_user("mack", "Mack", "pw")


def test_add_usher_user_failing_midway_leaves_nothing(site: Site) -> None:
    before = site.snapshot()
    with site.admin(step_hook=fail_at("add_usher_user.member")) as admin, \
            pytest.raises(StepFailed):
        admin.add_usher_user("yertle", "Yertle", "pw")
    unchanged(site, before)


# --- id numbers -----------------------------------------------------------------------------
def test_concurrent_allocation_gives_unique_numbers(site: Site) -> None:
    per_thread, threads = 15, 6
    sessions = [site.user(SITE, "seuss") for _ in range(threads)]
    barrier = threading.Barrier(threads)
    taken: list[list[int]] = [[] for _ in range(threads)]

    def take(i: int) -> None:
        barrier.wait()
        for _ in range(per_thread):
            taken[i].append(sessions[i].allocate_id())

    workers = [threading.Thread(target=take, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(20)
    numbers = [n for numbers in taken for n in numbers]
    assert len(numbers) == per_thread * threads
    assert len(set(numbers)) == len(numbers) and min(numbers) >= lay.FIRST_ID
    for session in sessions:
        session.close()


def test_concurrent_add_user_gives_unique_numbers(site: Site) -> None:
    names = [f"user{i}" for i in range(8)]
    sessions = [site.user(SITE, "seuss") for _ in names]
    barrier = threading.Barrier(len(names))
    errors: list[BaseException] = []

    def add(i: int) -> None:
        barrier.wait()
        try:
            sessions[i].add_user(A, names[i], f"User {i}", "pw")
        except BaseException as exc:  # reported below
            errors.append(exc)

    workers = [threading.Thread(target=add, args=(i,)) for i in range(len(names))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(20)
    assert errors == []
    with site.anonymous() as anonymous:
        users = [u for u in anonymous.list_users(A) if u.uid in names]
    assert len({u.uid_number for u in users}) == len(names)
    for session in sessions:
        session.close()


# --- escaping and injection ---------------------------------------------------------------------
def test_layout_escapes_every_value() -> None:
    site = lay.Layout.for_site(SITE)
    assert site.person_dn(A, "a,dc=evil") == f"uid=a\\,dc\\=evil,ou=people,ou={A},ou=clusters," \
                                             "dc=usher,dc=test"
    assert site.group_dn(A, "x\x00y").startswith("cn=x\\00y,")
    assert site.cluster_dn("a+b") == "ou=a\\+b,ou=clusters,dc=usher,dc=test"
    assert lay.filter_eq("uid", "*)(uid=*") == "(uid=\\2a\\29\\28uid=\\2a)"
    assert lay.filter_eq("uid", "x\x00y") == "(uid=x\\00y)"
    assert lay.filter_eq("uid", "a\\b") == "(uid=a\\5cb)"
    with pytest.raises(InvalidName):
        lay.suffix_for("usher.test,dc=evil")
    with pytest.raises(InvalidName):
        site.cluster_of("uid=a,ou=people,dc=evil")


def _calls(value: str) -> list[tuple[str, Callable[[Directory], object]]]:
    """Every Directory call with ``value`` in one argument: names taken as they
    come, free text (full name, password) with a NUL added, which no free text
    may hold."""
    return [
        ("ensure_cluster.cluster", lambda d: d.ensure_cluster(value, "seuss")),
        ("ensure_cluster.creator", lambda d: d.ensure_cluster(A, value)),
        ("add_user.cluster", lambda d: d.add_user(value, "dave", "Dave", "pw")),
        ("add_user.uid", lambda d: d.add_user(A, value, "Dave", "pw")),
        ("add_user.shell", lambda d: d.add_user(A, "dave", "Dave", "pw", shell=value)),
        ("add_user.home_uri", lambda d: d.add_user(A, "dave", "Dave", "pw", home_uri=value)),
        ("add_user.key", lambda d: d.add_user(A, "dave", "Dave", "pw", keys=[value])),
        ("delete_user.cluster", lambda d: d.delete_user(value, "alice")),
        ("delete_user.uid", lambda d: d.delete_user(A, value)),
        ("list_users.cluster", lambda d: d.list_users(value)),
        ("get_user.cluster", lambda d: d.get_user(value, "alice")),
        ("get_user.uid", lambda d: d.get_user(A, value)),
        ("modify_user.cluster", lambda d: d.modify_user(value, "alice", shell="/bin/sh")),
        ("modify_user.uid", lambda d: d.modify_user(A, value, shell="/bin/sh")),
        ("modify_user.shell", lambda d: d.modify_user(A, "alice", shell=value)),
        ("modify_user.home_uri", lambda d: d.modify_user(A, "alice", home_uri=value)),
        ("modify_user.add_key", lambda d: d.modify_user(A, "alice", add_keys=[value])),
        ("modify_user.remove_key", lambda d: d.modify_user(A, "alice", remove_keys=[value])),
        ("set_password.cluster", lambda d: d.set_password(value, "alice", "pw")),
        ("set_password.uid", lambda d: d.set_password(A, value, "pw")),
        ("link_user.cluster", lambda d: d.link_user(value, "carol")),
        ("link_user.uid", lambda d: d.link_user(A, value)),
        ("add_group.cluster", lambda d: d.add_group(value, "devs")),
        ("add_group.name", lambda d: d.add_group(A, value)),
        ("delete_group.cluster", lambda d: d.delete_group(value, "power")),
        ("delete_group.name", lambda d: d.delete_group(A, value)),
        ("list_groups.cluster", lambda d: d.list_groups(value)),
        ("modify_group.cluster", lambda d: d.modify_group(value, "power", add=["alice"])),
        ("modify_group.name", lambda d: d.modify_group(A, value, add=["alice"])),
        ("modify_group.add", lambda d: d.modify_group(A, "power", add=[value])),
        ("modify_group.remove", lambda d: d.modify_group(A, "admin", remove=[value])),
        ("find_usher_user.uid", lambda d: d.find_usher_user(value)),
        ("add_usher_user.uid", lambda d: d.add_usher_user(value, "Dave", "pw")),
        ("add_user.full_name", lambda d: d.add_user(A, "dave", value + "\x00", "pw")),
        ("add_user.password", lambda d: d.add_user(A, "dave", "Dave", value + "\x00")),
        ("modify_user.full_name", lambda d: d.modify_user(A, "alice", full_name="\x00" + value)),
        ("set_password.password", lambda d: d.set_password(A, "alice", value + "\x00")),
    ]


@pytest.mark.parametrize("value", HOSTILE, ids=repr)
def test_injection_attempts_are_refused_before_reaching_ldap(site: Site, value: str) -> None:
    before = site.snapshot()
    with site.admin() as admin:
        for name, call in _calls(value):
            with pytest.raises((InvalidName, InvalidRequest)):
                call(admin)
                pytest.fail(f"{name} accepted {value!r}")
    with pytest.raises(InvalidName):
        Directory.bind_user(site.url, SITE, value, "alice", PASSWORDS["alice"])
    with pytest.raises(InvalidName):
        Directory.bind_user(site.url, SITE, A, value, "pw")
    unchanged(site, before)


@pytest.mark.parametrize("value", ["*)(uid=*", "a,dc=evil", "Robert'); DROP TABLE--"],
                         ids=repr)
def test_free_text_is_stored_as_is_never_interpreted(site: Site, value: str) -> None:
    with site.user(SITE, "seuss") as seuss:
        dave = seuss.add_user(A, "dave", value, value)
        assert dave.full_name == value
        assert seuss.get_user(A, "dave").full_name == value
        assert uids(seuss.list_users(A)) == ["alice", "bob", "dave", "seuss"]
    with Directory.bind_user(site.url, SITE, A, "dave", value):
        pass
    with site.user(SITE, "seuss") as seuss, pytest.raises(InvalidRequest):
        seuss.add_user(A, "eve", "Eve\x00", "pw")


def test_the_site_cluster_and_clusters_outside_the_site(site: Site) -> None:
    with site.admin() as admin:
        assert uids(admin.list_users(SITE)) == ["horton", "seuss"]
        with pytest.raises(InvalidName, match="not in the site"):
            admin.list_users("bluefish.example.org")
        site.root().modify(site.layout.person_dn(SITE, "horton"),
                           {"loginShell": [(MODIFY_REPLACE, ["/bin/sh"])]})
        assert admin.get_user(SITE, "horton").shell == "/bin/sh"


def test_listing_a_cluster_is_never_truncated(site: Site) -> None:
    """slapd's default size limit (500 entries) would silently cut a big cluster's list."""
    cluster = "big.seuss.usher.test"
    with site.service() as service:
        service.ensure_cluster(cluster, "seuss")
    with site.user(SITE, "seuss") as seuss:
        for i in range(520):
            seuss.add_user(cluster, f"p{i:04d}", f"Person {i}", None)
        users = seuss.list_users(cluster)
    assert len([u for u in users if u.uid.startswith("p")]) == 520
    with site.anonymous() as anyone:  # as NSS clients and usher_userlist read it
        assert len([u for u in anyone.list_users(cluster) if u.uid.startswith("p")]) == 520
