"""slapd enforces the site's rules by itself: every rule proved with plain ldap3.

No usher code stands between these tests and slapd (the world is built with it,
but each check is a bare ldap3 connection bound as someone), so what passes here
holds for any LDAP client, including a hostile one. Rules, from
``usher/directory/ldif/acl.ldif``:

* admins of a cluster create and delete its people, groups and links and change
  its memberships; nobody else does (not admins of other clusters, not members of
  ``power``, not plain users, not the anonymous);
* a person's password, keys, shell and name are changed only by the person and
  admins of their home cluster, so linking someone in gives no power over them;
* uid/gid numbers, login names and object classes are never written after
  creation; numbers are unique site-wide and at least 10000;
* password hashes are never readable nor comparable, and clear text is hashed;
* the controller's account creates (and may take back) cluster branches, their
  admin and power groups, links and admin memberships, and reads the Usher
  users; nothing else. The site admin writes everything.
"""

from __future__ import annotations

from typing import Any

import pytest
from ldap3 import (
    BASE,
    DEREF_ALWAYS,
    DEREF_NEVER,
    LEVEL,
    MODIFY_ADD,
    MODIFY_DELETE,
    MODIFY_REPLACE,
    SUBTREE,
    Connection,
)

from usher.directory.layout import Layout

from .conftest import ADMIN_PASSWORD, PASSWORDS, SERVICE_PASSWORD, SITE, A, B, Site

INSUFFICIENT_ACCESS = 50
STRONGER_AUTH_REQUIRED = 8  # slapd's answer to any write by the anonymous
CONSTRAINT_VIOLATION = 19
INVALID_CREDENTIALS = 49
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl test"


def person(uid: str, number: int) -> dict[str, Any]:
    return {"objectClass": ["top", "inetOrgPerson", "posixAccount", "shadowAccount"],
            "uid": uid, "cn": uid, "sn": uid, "uidNumber": str(number),
            "gidNumber": str(number), "homeDirectory": f"/home/{uid}"}


def link(layout: Layout, home_cluster: str, uid: str) -> dict[str, Any]:
    return {"objectClass": ["top", "alias", "uidObject"], "uid": uid,
            "aliasedObjectName": layout.person_dn(home_cluster, uid)}


def group(name: str, number: int) -> dict[str, Any]:
    return {"objectClass": ["top", "posixGroup"], "cn": name, "gidNumber": str(number)}


def refused(conn: Connection, outcome: object, code: int = INSUFFICIENT_ACCESS) -> None:
    """slapd said no, with ``code`` (a refusal for lack of rights by default)."""
    assert outcome is False, f"slapd allowed it: {conn.result}"
    codes = {code}
    if code == INSUFFICIENT_ACCESS:
        codes.add(STRONGER_AUTH_REQUIRED)
    assert conn.result["result"] in codes, conn.result


def allowed(conn: Connection, outcome: object) -> None:
    assert outcome, conn.result


def attributes(conn: Connection, dn: str, *names: str) -> dict[str, list[bytes]]:
    """The raw attributes of ``dn`` that ``conn`` may read ({} if it sees nothing)."""
    conn.search(dn, "(objectClass=*)", BASE, dereference_aliases=DEREF_NEVER,
                attributes=list(names) or ["*"])
    found = [e for e in conn.response or [] if e.get("type") == "searchResEntry"]
    return {k: v for k, v in found[0]["raw_attributes"].items() if v} if found else {}


# --- creating people, groups and links ----------------------------------------
def test_cluster_admins_create_and_delete_people_groups_and_links(site: Site) -> None:
    lay = site.layout
    seuss = site.plain_user(SITE, "seuss")  # an admin of A through his link there
    allowed(seuss, seuss.add(lay.person_dn(A, "dave"), attributes=person("dave", 50001)))
    allowed(seuss, seuss.add(lay.group_dn(A, "devs"), attributes=group("devs", 50002)))
    allowed(seuss, seuss.modify(lay.group_dn(A, "devs"),
                                {"memberUid": [(MODIFY_ADD, ["alice", "dave"])]}))
    allowed(seuss, seuss.modify(lay.group_dn(A, "devs"),
                                {"memberUid": [(MODIFY_DELETE, ["dave"])]}))
    allowed(seuss, seuss.add(lay.person_dn(A, "carol"), attributes=link(lay, B, "carol")))
    allowed(seuss, seuss.delete(lay.person_dn(A, "carol")))
    allowed(seuss, seuss.delete(lay.group_dn(A, "devs")))
    allowed(seuss, seuss.delete(lay.person_dn(A, "dave")))


def test_an_admin_homed_in_the_cluster_has_the_same_rights(site: Site) -> None:
    lay = site.layout
    site.plain_user(SITE, "seuss").modify(lay.admin_group_dn(A),
                                          {"memberUid": [(MODIFY_ADD, ["bob"])]})
    bob = site.plain_user(A, "bob")
    allowed(bob, bob.add(lay.person_dn(A, "dave"), attributes=person("dave", 50011)))


@pytest.mark.parametrize("who", ["bob", "carol", "horton", "anonymous", "power"])
def test_nobody_but_the_clusters_admins_adds_or_removes(site: Site, who: str) -> None:
    lay = site.layout
    if who == "power":  # bob in A's power group: sudo on the VMs, no directory rights
        site.root().modify(lay.group_dn(A, "power"), {"memberUid": [(MODIFY_ADD, ["bob"])]})
        who = "bob"
    conn = {"bob": lambda: site.plain_user(A, "bob"), "carol": lambda: site.plain_user(B, "carol"),
            "horton": lambda: site.plain_user(SITE, "horton"),
            "anonymous": lambda: site.plain()}[who]()
    refused(conn, conn.add(lay.person_dn(A, "dave"), attributes=person("dave", 50021)))
    refused(conn, conn.add(lay.group_dn(A, "devs"), attributes=group("devs", 50022)))
    refused(conn, conn.add(lay.person_dn(A, "carol"), attributes=link(lay, B, "carol")))
    refused(conn, conn.modify(lay.admin_group_dn(A), {"memberUid": [(MODIFY_ADD, [who])]}))
    refused(conn, conn.modify(lay.admin_group_dn(A), {"memberUid": [(MODIFY_DELETE, ["seuss"])]}))
    refused(conn, conn.delete(lay.person_dn(A, "alice")))
    refused(conn, conn.delete(lay.group_dn(A, "alice")))
    refused(conn, conn.delete(lay.person_dn(A, "seuss")))  # seuss's link in A


def test_an_admin_of_one_cluster_cannot_touch_another(site: Site) -> None:
    lay = site.layout
    horton = site.plain_user(SITE, "horton")  # admin of B, not of A
    refused(horton, horton.add(lay.person_dn(A, "dave"), attributes=person("dave", 50031)))
    refused(horton, horton.modify(lay.person_dn(A, "alice"),
                                  {"loginShell": [(MODIFY_REPLACE, ["/bin/sh"])]}))
    refused(horton, horton.extend.standard.modify_password(lay.person_dn(A, "alice"), None, "x"))
    refused(horton, horton.modify(lay.group_dn(A, "power"),
                                  {"memberUid": [(MODIFY_ADD, ["horton"])]}))
    refused(horton, horton.delete(lay.person_dn(A, "bob")))
    # ...while in his own cluster he may.
    allowed(horton, horton.add(lay.person_dn(B, "dave"), attributes=person("dave", 50032)))


def test_admin_and_power_groups_stay(site: Site) -> None:
    lay = site.layout
    seuss = site.plain_user(SITE, "seuss")
    refused(seuss, seuss.delete(lay.group_dn(A, "power")))
    refused(seuss, seuss.delete(lay.admin_group_dn(A)))


# --- a person's own account -----------------------------------------------------
def test_a_person_and_their_home_admins_change_their_account(site: Site) -> None:
    lay = site.layout
    dn = lay.person_dn(A, "alice")
    for conn in (site.plain_user(A, "alice"), site.plain_user(SITE, "seuss")):
        allowed(conn, conn.modify(dn, {"loginShell": [(MODIFY_REPLACE, ["/bin/zsh"])],
                                       "sshPublicKey": [(MODIFY_REPLACE, [KEY])],
                                       "cn": [(MODIFY_REPLACE, ["Alice L."])],
                                       "usherHomeURI": [(MODIFY_REPLACE, ["nfs://f/h/a"])]}))
        allowed(conn, conn.extend.standard.modify_password(dn, None, "changed"))
    site.plain(dn, "changed")


@pytest.mark.parametrize("who", ["bob", "carol", "anonymous"])
def test_nobody_else_changes_a_persons_account(site: Site, who: str) -> None:
    dn = site.layout.person_dn(A, "alice")
    conn = {"bob": lambda: site.plain_user(A, "bob"), "carol": lambda: site.plain_user(B, "carol"),
            "anonymous": lambda: site.plain()}[who]()
    for change in ({"loginShell": [(MODIFY_REPLACE, ["/bin/sh"])]},
                   {"sshPublicKey": [(MODIFY_ADD, [KEY])]},
                   {"cn": [(MODIFY_REPLACE, ["Mallory"])]},
                   {"userPassword": [(MODIFY_REPLACE, ["{SSHA512}forged"])]}):
        refused(conn, conn.modify(dn, change))
    if who != "anonymous":
        refused(conn, conn.extend.standard.modify_password(dn, None, "hijacked"))
    site.plain_user(A, "alice")


def test_linking_someone_in_gives_no_power_over_their_account(site: Site) -> None:
    lay = site.layout
    horton = site.plain_user(SITE, "horton")
    allowed(horton, horton.add(lay.person_dn(B, "alice"), attributes=link(lay, A, "alice")))
    # The link works: alice is now a user of B...
    conn = site.plain()
    conn.search(lay.people_dn(B), "(uid=alice)", LEVEL, dereference_aliases=DEREF_ALWAYS)
    assert [e["dn"] for e in conn.response] == [lay.person_dn(A, "alice")]
    # ...but horton, admin of B, cannot take her account, through either DN.
    for dn in (lay.person_dn(A, "alice"), lay.person_dn(B, "alice")):
        refused(horton, horton.extend.standard.modify_password(dn, None, "hijacked"))
        for change in ({"sshPublicKey": [(MODIFY_ADD, [KEY])]},
                       {"loginShell": [(MODIFY_REPLACE, ["/bin/sh"])]}):
            refused(horton, horton.modify(dn, change))
    refused(horton, horton.delete(lay.person_dn(A, "alice")))
    assert attributes(site.root(), lay.person_dn(A, "alice"), "sshPublicKey") == {}
    site.plain_user(A, "alice")
    # He may remove the link itself: it is his cluster's entry.
    allowed(horton, horton.delete(lay.person_dn(B, "alice")))


def test_a_link_binds_nobody(site: Site) -> None:
    lay = site.layout
    site.root().add(lay.person_dn(B, "alice"), attributes=link(lay, A, "alice"))
    conn = Connection(site.url, lay.person_dn(B, "alice"), PASSWORDS["alice"])
    refused(conn, conn.bind(), INVALID_CREDENTIALS)
    conn = Connection(site.url, lay.person_dn(A, "alice"), "wrong")
    refused(conn, conn.bind(), INVALID_CREDENTIALS)


# --- numbers, names and object classes ------------------------------------------
def test_ids_names_and_classes_are_never_writable_by_users(site: Site) -> None:
    lay = site.layout
    for conn in (site.plain_user(A, "alice"), site.plain_user(SITE, "seuss")):
        for attribute, value in (("uidNumber", "60000"), ("gidNumber", "60000"),
                                 ("uid", "mallory"), ("homeDirectory", "/root")):
            refused(conn, conn.modify(lay.person_dn(A, "alice"),
                                      {attribute: [(MODIFY_REPLACE, [value])]}))
        refused(conn, conn.modify(lay.person_dn(A, "alice"),
                                  {"objectClass": [(MODIFY_ADD, ["extensibleObject"])]}))
    seuss = site.plain_user(SITE, "seuss")
    refused(seuss, seuss.modify(lay.group_dn(A, "power"),
                                {"gidNumber": [(MODIFY_REPLACE, ["60001"])]}))
    refused(seuss, seuss.modify(lay.person_dn(A, "seuss"), {"aliasedObjectName": [
        (MODIFY_REPLACE, [lay.person_dn(B, "carol")])]}))
    # Only the site admin renumbers.
    admin = site.plain(lay.site_admin_dn, ADMIN_PASSWORD)
    allowed(admin, admin.modify(lay.person_dn(A, "alice"),
                                {"uidNumber": [(MODIFY_REPLACE, ["60002"])]}))


def test_names_and_numbers_are_unique_and_in_range_for_everyone(site: Site) -> None:
    lay = site.layout
    root = site.root()
    root.raise_exceptions = False
    alice = int(attributes(root, lay.person_dn(A, "alice"), "uidNumber")["uidNumber"][0])
    power = int(attributes(root, lay.group_dn(A, "power"), "gidNumber")["gidNumber"][0])
    refused(root, root.add(lay.person_dn(B, "alice"), attributes=person("alice", 50041)),
            CONSTRAINT_VIOLATION)
    refused(root, root.add(lay.person_dn(B, "dave"), attributes=person("dave", alice)),
            CONSTRAINT_VIOLATION)
    refused(root, root.add(lay.group_dn(B, "devs"), attributes=group("devs", power)),
            CONSTRAINT_VIOLATION)
    refused(root, root.add(lay.person_dn(B, "dave"), attributes=person("dave", 999)),
            CONSTRAINT_VIOLATION)
    # A bindable non-person named like someone else is refused too: no spoofed uid.
    refused(root, root.add(lay.person_dn(B, "seuss"), attributes={
        "objectClass": ["top", "account", "simpleSecurityObject"], "uid": "seuss",
        "userPassword": "{SSHA512}x"}), CONSTRAINT_VIOLATION)


def test_the_id_counter_is_bumped_only_by_those_who_create(site: Site) -> None:
    lay = site.layout
    value = attributes(site.root(), lay.id_counter_dn, "usherNextId")["usherNextId"][0].decode()

    def bump(conn: Connection, current: str) -> object:
        return conn.modify(lay.id_counter_dn, {"usherNextId": [
            (MODIFY_DELETE, [current]), (MODIFY_ADD, [str(int(current) + 1)])]})

    bob = site.plain_user(A, "bob")
    refused(bob, bump(bob, value))
    seuss = site.plain_user(SITE, "seuss")
    allowed(seuss, bump(seuss, value))
    refused(seuss, bump(seuss, value), 16)  # a stale read loses: noSuchAttribute
    service = site.plain(lay.service_dn, SERVICE_PASSWORD)
    allowed(service, bump(service, str(int(value) + 1)))
    assert "usherNextId" not in attributes(site.plain(), lay.id_counter_dn)


# --- password hashes --------------------------------------------------------------
def test_password_hashes_are_never_readable_or_comparable(site: Site) -> None:
    lay = site.layout
    dn = lay.person_dn(A, "alice")
    stored = attributes(site.root(), dn, "userPassword")["userPassword"][0]
    assert stored.startswith(b"{SSHA512}")
    for conn in (site.plain(), site.plain_user(A, "alice"), site.plain_user(SITE, "seuss"),
                 site.plain(lay.site_admin_dn, ADMIN_PASSWORD),
                 site.plain(lay.service_dn, SERVICE_PASSWORD)):
        assert "userPassword" not in attributes(conn, dn, "userPassword", "*")
        assert conn.compare(dn, "userPassword", stored) is False
        assert conn.result["result"] != 6, "compareTrue leaks the hash"
        assert "userPassword" not in attributes(conn, lay.service_dn, "userPassword")


def test_clear_text_is_never_stored(site: Site) -> None:
    lay = site.layout
    dn = lay.person_dn(A, "alice")
    alice = site.plain_user(A, "alice")
    relax = ("1.3.6.1.4.1.4203.666.5.12", True, None)  # would skip the constraint overlay
    for controls in (None, [relax]):
        allowed(alice, alice.modify(dn, {"userPassword": [(MODIFY_REPLACE, ["plain-text"])]},
                                    controls=controls))
        stored = attributes(site.root(), dn, "userPassword")["userPassword"]
        assert len(stored) == 1 and stored[0].startswith(b"{SSHA512}"), stored
        site.plain(dn, "plain-text")


# --- the stale-membership guard and links ---------------------------------------------
def test_an_admin_membership_counts_only_for_users_of_the_cluster(site: Site) -> None:
    lay = site.layout
    # A leftover memberUid "alice" in B's admin group (say, an earlier alice's).
    site.root().modify(lay.admin_group_dn(B), {"memberUid": [(MODIFY_ADD, ["alice"])]})
    alice = site.plain_user(A, "alice")
    refused(alice, alice.add(lay.person_dn(B, "dave"), attributes=person("dave", 50051)))
    site.root().add(lay.person_dn(B, "alice"), attributes=link(lay, A, "alice"))
    alice = site.plain_user(A, "alice")
    allowed(alice, alice.add(lay.person_dn(B, "dave"), attributes=person("dave", 50051)))


def test_a_dangling_link_may_be_removed_by_anyone_a_live_one_not(site: Site) -> None:
    lay = site.layout
    root = site.root()
    root.add(lay.person_dn(B, "bob"), attributes=link(lay, A, "bob"))
    alice = site.plain_user(A, "alice")
    refused(alice, alice.delete(lay.person_dn(B, "bob")))
    root.delete(lay.group_dn(A, "bob"))
    root.delete(lay.person_dn(A, "bob"))
    allowed(alice, alice.delete(lay.person_dn(B, "bob")))


# --- the controller and the site admin ---------------------------------------------------
def test_the_controller_creates_cluster_branches_and_nothing_else(site: Site) -> None:
    lay = site.layout
    c = "greenfish.seuss.usher.test"
    service = site.plain(lay.service_dn, SERVICE_PASSWORD)
    ou = {"objectClass": ["top", "organizationalUnit"]}
    allowed(service, service.add(lay.cluster_dn(c), attributes={**ou, "ou": c}))
    allowed(service, service.add(lay.people_dn(c), attributes={**ou, "ou": "people"}))
    allowed(service, service.add(lay.groups_dn(c), attributes={**ou, "ou": "groups"}))
    allowed(service, service.add(lay.admin_group_dn(c), attributes=group("admin", 50061)))
    allowed(service, service.add(lay.group_dn(c, "power"), attributes=group("power", 50062)))
    allowed(service, service.add(lay.person_dn(c, "seuss"), attributes=link(lay, SITE, "seuss")))
    allowed(service, service.modify(lay.admin_group_dn(c),
                                    {"memberUid": [(MODIFY_ADD, ["seuss"])]}))
    # It may take back what it made (to undo a failed creation)...
    allowed(service, service.modify(lay.admin_group_dn(c),
                                    {"memberUid": [(MODIFY_DELETE, ["seuss"])]}))
    allowed(service, service.delete(lay.person_dn(c, "seuss")))
    allowed(service, service.delete(lay.group_dn(c, "power")))
    # ...but nothing more: no people, no passwords, no other groups or members.
    refused(service, service.delete(lay.cluster_dn(A)), 66)  # not a leaf: it has people
    refused(service, service.modify(lay.group_dn(A, "power"),
                                    {"memberUid": [(MODIFY_ADD, ["horton"])]}))
    refused(service, service.add(lay.person_dn(c, "dave"), attributes=person("dave", 50063)))
    refused(service, service.add(lay.group_dn(c, "devs"), attributes=group("devs", 50064)))
    refused(service, service.extend.standard.modify_password(lay.person_dn(A, "alice"), None,
                                                            "x"))
    refused(service, service.delete(lay.person_dn(A, "alice")))
    refused(service, service.delete(lay.group_dn(A, "alice")))
    refused(service, service.delete(lay.people_dn(A)), 66)
    refused(service, service.modify(lay.usher_users_dn, {"memberUid": [(MODIFY_ADD, ["bob"])]}))


def test_only_the_controller_and_site_admin_read_the_usher_users(site: Site) -> None:
    lay = site.layout
    for conn in (site.plain(lay.service_dn, SERVICE_PASSWORD),
                 site.plain(lay.site_admin_dn, ADMIN_PASSWORD)):
        found = attributes(conn, lay.usher_users_dn, "memberUid")
        assert sorted(found["memberUid"]) == [b"horton", b"seuss"]
    for conn in (site.plain(), site.plain_user(SITE, "seuss"), site.plain_user(A, "alice")):
        assert attributes(conn, lay.usher_users_dn) == {}
        assert attributes(conn, lay.service_dn) == {}


def test_the_site_admin_writes_everything(site: Site) -> None:
    lay = site.layout
    admin = site.plain(lay.site_admin_dn, ADMIN_PASSWORD)
    allowed(admin, admin.extend.standard.modify_password(lay.person_dn(A, "alice"), None, "x"))
    allowed(admin, admin.modify(lay.usher_users_dn, {"memberUid": [(MODIFY_ADD, ["alice"])]}))
    allowed(admin, admin.delete(lay.person_dn(B, "horton")))
    allowed(admin, admin.add(lay.person_dn(B, "dave"), attributes=person("dave", 50071)))


# --- what NSS clients see ------------------------------------------------------------------
def test_an_nss_client_on_one_branch_sees_exactly_that_clusters_users(site: Site) -> None:
    lay = site.layout
    site.plain_user(SITE, "horton").add(lay.person_dn(B, "alice"),
                                         attributes=link(lay, A, "alice"))
    site.plain_user(SITE, "horton").add(lay.group_dn(B, "alice"), attributes={
        "objectClass": ["top", "alias", "extensibleObject"], "cn": "alice",
        "aliasedObjectName": lay.group_dn(A, "alice")})
    nslcd = site.plain()  # nslcd binds anonymously, "base <branch>", "deref always"
    nslcd.search(lay.cluster_dn(B), "(objectClass=posixAccount)", SUBTREE,
                 dereference_aliases=DEREF_ALWAYS,
                 attributes=["uid", "uidNumber", "gidNumber", "homeDirectory", "loginShell",
                             "gecos", "cn", "userPassword"])
    users = {e["attributes"]["uid"][0]: e for e in nslcd.response
             if e.get("type") == "searchResEntry"}
    assert set(users) == {"alice", "carol", "horton"}
    assert users["alice"]["dn"] == lay.person_dn(A, "alice")
    assert all(not e["raw_attributes"].get("userPassword") for e in users.values())
    assert all(e["raw_attributes"]["uidNumber"] for e in users.values())
    nslcd.search(lay.cluster_dn(B), "(objectClass=posixGroup)", SUBTREE,
                 dereference_aliases=DEREF_ALWAYS, attributes=["cn", "gidNumber", "memberUid"])
    groups = {e["attributes"]["cn"][0] for e in nslcd.response
              if e.get("type") == "searchResEntry"}
    assert groups == {"admin", "power", "carol", "horton", "alice"}
