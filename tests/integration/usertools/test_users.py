"""usher_useradd, userdel, userlist, usermod, passwd and userln, run as an unprivileged
user against a real slapd: happy paths, refusals with their exit codes, and the
linked user whose account the linking admin cannot touch."""

from __future__ import annotations

import json
import re

from usher.directory.client import Directory
from usher.errors import (
    AuthenticationFailed,
    Conflict,
    InvalidRequest,
    NotFound,
    PermissionDenied,
)

from .conftest import PASSWORDS, SITE, A, Site, Tools, assert_aligned

B = "redfish.horton.usher.test"
KEY1 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl one"
KEY2 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBPuNy7ytbXQXzjDQ2nnFmh0nS3nFNNzWrTJ2SnFxIWK two"
RELAX = ("1.3.6.1.4.1.4203.666.5.12", True, None)

BAD = InvalidRequest.exit_code
MISSING = NotFound.exit_code
CONFLICT = Conflict.exit_code
DENIED = PermissionDenied.exit_code


def entry(site: Site, dn: str) -> dict[str, list[bytes]]:
    return site.snapshot()[dn.lower()]


def can_bind(site: Site, cluster: str, uid: str, password: str) -> bool:
    try:
        Directory.bind_user(site.url, SITE, cluster, uid, password).close()
    except AuthenticationFailed:
        return False
    return True


# --- useradd -----------------------------------------------------------------------------
def test_useradd_creates_the_user_with_keys_uri_and_a_hashed_password(
        tools: Tools, site: Site) -> None:
    key_file = tools.readable_file("dave.pub", f"# dave's laptop\n{KEY2}\n")
    done = tools("useradd", "dave", "--full-name", "Dave Dent", "--shell", "/bin/sh",
                 "--homeuri", "nfs://files.usher.test/home/dave", "--key", KEY1,
                 "--key", str(key_file), new="dave-secret")
    assert (done.code, done.err) == (0, "")
    assert re.fullmatch(rf"added dave to {A} \(uid \d+\)\n", done.out)
    with site.anonymous() as anonymous:
        dave = anonymous.get_user(A, "dave")
    assert (dave.full_name, dave.shell, dave.home_uri) == (
        "Dave Dent", "/bin/sh", "nfs://files.usher.test/home/dave")
    assert sorted(k.split()[-1] for k in dave.keys) == ["one", "two"]
    stored = entry(site, site.layout.person_dn(A, "dave"))["userpassword"]
    assert stored[0].startswith(b"{SSHA512}") and b"dave-secret" not in stored[0]
    assert can_bind(site, A, "dave", "dave-secret")


def test_useradd_without_password_and_its_refusals(tools: Tools, site: Site) -> None:
    before = site.snapshot()
    new = {"new": "eve-secret"}
    results = tools.many([
        (("useradd", "alice"), new),                                  # taken here
        (("useradd", "carol"), new),                                  # taken in B
        (("useradd", "Bad_Name"), new),
        (("useradd", "root"), new),                                   # reserved
        (("useradd", "eve", "--homeuri", "http://x.usher.test/h"), new),
        (("useradd", "eve", "--key", "ssh-ed25519 notbase64!"), new),
        (("useradd", "eve", "--cluster", f"nosuch.seuss.{SITE}"), new),
        (("useradd", "eve"), {"user": "alice", **new}),               # not an admin
        (("useradd", "eve"), {"password": "wrong", **new}),
        (("useradd", "eve"), {"new": ""}),                            # empty new password
    ])
    codes = [r.code for r in results]
    assert codes == [CONFLICT, CONFLICT, BAD, BAD, BAD, BAD, MISSING, DENIED, DENIED, BAD]
    for result in results:
        assert result.out == "" and len(result.err.splitlines()) == 1, result
    assert "link them in instead" in results[1].err
    assert f"only admins of {A} may" in results[7].err
    assert "wrong user name or password" in results[8].err
    assert site.snapshot().keys() == before.keys()
    keys_only = tools("useradd", "ci", "--no-password", "--key", KEY1)
    assert keys_only.code == 0, keys_only
    assert "userpassword" not in entry(site, site.layout.person_dn(A, "ci"))


# --- userdel -----------------------------------------------------------------------------
def test_userdel_removes_users_but_not_the_last_admin(tools: Tools, site: Site) -> None:
    results = tools.many([
        (("userdel", "bob"), {}),
        (("userdel", "nobody-here"), {}),
        (("userdel", "alice"), {"user": "bob"}),
        (("userdel", "seuss"), {}),
    ])
    assert [r.code for r in results] == [0, MISSING, DENIED, CONFLICT]
    assert results[0].lines == [f"deleted bob from {A}, their home cluster (links to them"
                                " elsewhere are gone too)"]
    assert "no admin left" in results[3].err
    with site.anonymous() as anonymous:
        assert [u.uid for u in anonymous.list_users(A)] == ["alice", "seuss"]


# --- userlist ----------------------------------------------------------------------------
def test_userlist_prints_aligned_tables_and_json(tools: Tools, site: Site) -> None:
    with site.user(A, "alice") as alice:
        alice.modify_user(A, "alice", home_uri="nfs://files.usher.test/home/alice",
                          add_keys=[KEY1])
    plain, long, only, as_json, unknown, no_cluster = tools.many([
        (("userlist",), {}), (("userlist", "-l"), {}), (("userlist", "-l", "alice"), {}),
        (("userlist", "--json"), {}), (("userlist", "zed"), {}),
        (("userlist", "--cluster", f"nosuch.{SITE}"), {})])
    assert plain.code == 0 and plain.err == ""
    header, *rows = plain.lines
    assert header.split() == ["USER", "UID", "NAME", "SHELL", "HOME", "CLUSTER"]
    assert [row.split()[0] for row in rows] == ["alice", "bob", "seuss"]
    assert_aligned(plain.lines)
    assert_aligned([line for line in long.lines if not line.startswith("    key: ")])
    assert rows[2].endswith(SITE)  # seuss is linked in from the site cluster
    assert long.code == 0 and "HOME URI" in long.lines[0]
    assert only.lines[1].split()[-2:] == ["-", "nfs://files.usher.test/home/alice"]
    assert only.lines[2] == f"    key: {KEY1}"
    assert any(line.startswith("seuss") and " admin " in line for line in long.lines)
    users = json.loads(as_json.out)
    assert [u["uid"] for u in users] == ["alice", "bob", "seuss"]
    assert users[2]["linked"] is True and users[2]["groups"] == ["admin"]
    assert users[0]["keys"] == [KEY1]
    assert (unknown.code, no_cluster.code) == (MISSING, MISSING)
    assert f"no cluster nosuch.{SITE}" in no_cluster.err


# --- usermod -----------------------------------------------------------------------------
def test_usermod_changes_own_account_and_admins_change_homed_users(
        tools: Tools, site: Site) -> None:
    key_file = tools.readable_file("keys.pub", f"{KEY1}\n{KEY2}\n")
    own = tools("usermod", "--full-name", "x,dc=evil", "--shell", "/bin/zsh", "--homeuri",
                "nfs://10.0.0.5/export/alice", "--add-key", str(key_file), user="alice")
    assert own.lines == ["changed the full name, shell, home URI, keys of alice (2 keys"
                         " registered)"], own
    results = tools.many([
        (("usermod", "alice", "--remove-key", KEY1.rsplit(" ", 1)[0]), {}),  # an admin
        (("usermod", "alice", "--shell", "/bin/sh"), {"user": "bob"}),
        (("usermod", "--homeuri", "http://files.usher.test/home/bob"), {"user": "bob"}),
        (("usermod", "--homeuri", "nfs://files.usher.test"), {"user": "bob"}),
        (("usermod", "--homeuri", "nfs://files.usher.test/home/../etc"), {"user": "bob"}),
        (("usermod",), {"user": "bob"}),
        (("usermod", "--set-keys", KEY1, "--add-key", KEY2), {"user": "bob"}),
        (("usermod", "--remove-key", KEY2), {"user": "bob"}),            # not registered
        (("usermod", "--add-key", "/nonexistent.pub"), {"user": "bob"}),
        (("usermod", "zed", "--shell", "/bin/sh"), {}),
    ])
    assert [r.code for r in results] == [0, DENIED, BAD, BAD, BAD, BAD, BAD, BAD, BAD,
                                         MISSING], results
    assert "only alice and the admins of their home cluster" in results[1].err
    assert "nfs://HOST/PATH" in results[2].err
    with site.anonymous() as anonymous:
        alice = anonymous.get_user(A, "alice")
    assert (alice.full_name, alice.shell, alice.home_uri, alice.keys) == (
        "x,dc=evil", "/bin/zsh", "nfs://10.0.0.5/export/alice", (KEY2,))
    cleared = tools("usermod", "--clear-keys", "--homeuri", "", user="alice")
    assert cleared.lines == ["changed the home URI, keys of alice (0 keys registered)"]


# --- passwd ------------------------------------------------------------------------------
def test_passwd_for_oneself_and_for_admins(tools: Tools, site: Site) -> None:
    new_file = tools.secret_file("new-password", "bob-by-file")
    results = tools.many([
        (("passwd",), {"user": "alice", "new": "alice-2"}),
        (("passwd", "bob", "--new-password-file", str(new_file)), {}),
        (("passwd", "alice"), {"user": "bob", "new": "hijacked"}),
        (("passwd", "zed"), {"new": "whatever"}),
        (("passwd",), {"user": "alice", "password": "wrong", "new": "alice-3"}),
        (("passwd", "bob"), {}),                                          # stdin runs out
    ])
    assert [r.code for r in results] == [0, 0, DENIED, MISSING, DENIED, BAD], results
    assert results[0].lines == ["changed the password of alice"]
    assert "standard input ended before the new password of bob" in results[5].err
    assert can_bind(site, A, "alice", "alice-2")
    assert can_bind(site, A, "bob", "bob-by-file")
    assert not can_bind(site, A, "alice", PASSWORDS["alice"])


# --- userln ------------------------------------------------------------------------------
def test_userln_links_a_user_whose_account_the_admin_then_cannot_touch(
        tools: Tools, site: Site) -> None:
    linked = tools("userln", "carol")
    assert (linked.code, linked.err) == (0, "")
    assert linked.lines[0].startswith("linked carol (uid ")
    assert linked.lines[0].endswith(f"home cluster {B}) into {A}")
    carol_dn = site.layout.person_dn(B, "carol")
    before = entry(site, carol_dn)
    listed, password, keys, again, stranger, in_b = tools.many([
        (("userlist", "-l", "carol"), {}),
        (("passwd", "carol"), {"new": "taken-over"}),
        (("usermod", "carol", "--add-key", KEY1), {}),
        (("userln", "carol"), {}),
        (("userln", "zed"), {}),
        (("userln", "alice", "--cluster", B), {}),                        # seuss: not admin of B
    ])
    assert listed.code == 0 and B in listed.lines[1].split()
    assert password.code == DENIED and password.out == ""
    assert password.err.strip() == (
        f"usher_passwd: you may not set carol's password: only carol and the admins of"
        f" their home cluster {B} may")
    assert keys.code == DENIED
    assert f"only carol and the admins of their home cluster {B} may" in keys.err
    assert entry(site, carol_dn) == before
    assert can_bind(site, A, "carol", PASSWORDS["carol"])
    assert (again.code, stranger.code) == (CONFLICT, MISSING)
    assert in_b.code == DENIED and "wrong user name or password for seuss in" in in_b.err
    # carol herself still may change her account, seen through the link.
    own = tools("usermod", "carol", "--add-key", KEY1, user="carol")
    assert own.code == 0, own
    unlinked = tools("userdel", "carol")
    assert unlinked.lines == [f"unlinked carol from {A} (their account in {B} is untouched)"]
    assert can_bind(site, B, "carol", PASSWORDS["carol"])


def test_userln_refuses_a_uid_number_clash(tools: Tools, site: Site) -> None:
    # Unique numbers are slapd's rule; a clash comes only from data loaded
    # around it (here: the rootdn with the relax control).
    with site.anonymous() as anonymous:
        number = anonymous.get_user(B, "carol").uid_number
    site.root().add(site.layout.person_dn(A, "dave"), attributes={
        "objectClass": ["top", "inetOrgPerson", "posixAccount"], "uid": "dave", "cn": "Dave",
        "sn": "Dave", "uidNumber": str(number), "gidNumber": str(number),
        "homeDirectory": "/home/dave"}, controls=[RELAX])
    before = site.snapshot()
    clash = tools("userln", "carol")
    assert clash.code == CONFLICT and clash.out == ""
    assert clash.err.strip() == (
        f"usher_userln: cannot link carol: their uid number {number} is already used in {A}"
        " by dave; ask the site admin to renumber one of them")
    assert site.snapshot() == before

