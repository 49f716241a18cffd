"""usher_groupadd, groupdel, grouplist and groupmod, run as an unprivileged user against
a real slapd: happy paths, refusals with their exit codes, the last admin kept."""

from __future__ import annotations

import json
import re

from usher.errors import Conflict, InvalidRequest, NotFound, PermissionDenied

from .conftest import SITE, A, Site, Tools, assert_aligned

BAD = InvalidRequest.exit_code
MISSING = NotFound.exit_code
CONFLICT = Conflict.exit_code
DENIED = PermissionDenied.exit_code


def members(site: Site, group: str) -> tuple[str, ...]:
    with site.anonymous() as anonymous:
        return next(g.members for g in anonymous.list_groups(A) if g.name == group)


def test_groupadd_and_its_refusals(tools: Tools, site: Site) -> None:
    added = tools("groupadd", "devs")
    assert added.code == 0 and added.err == ""
    assert re.fullmatch(rf"added the group devs \(gid \d+\) to {A}\n", added.out)
    results = tools.many([
        (("groupadd", "devs"), {}),
        (("groupadd", "alice"), {}),                  # alice's private group
        (("groupadd", "Dev$"), {}),
        (("groupadd", "admin"), {}),                  # reserved
        (("groupadd", "ops"), {"user": "alice"}),
        (("groupadd", "ops", "--cluster", f"nosuch.{SITE}"), {}),
    ])
    assert [r.code for r in results] == [CONFLICT, CONFLICT, BAD, BAD, DENIED, MISSING]
    assert f"{A} already has a group named devs" in results[0].err
    assert f"only admins of {A} may" in results[4].err
    with site.anonymous() as anonymous:
        assert "ops" not in {g.name for g in anonymous.list_groups(A)}


def test_grouplist_prints_aligned_tables_and_json(tools: Tools, site: Site) -> None:
    with site.user(A, "seuss") as seuss:
        seuss.add_group(A, "devs")
        seuss.modify_group(A, "devs", add=["alice", "bob"])
    table, some, as_json, unknown, injected = tools.many([
        (("grouplist",), {}), (("grouplist", "power", "admin"), {}),
        (("grouplist", "--json"), {}), (("grouplist", "ops"), {}),
        (("grouplist", "*)(cn=*"), {})])
    assert table.code == 0 and table.err == ""
    header, *rows = table.lines
    assert header.split() == ["GROUP", "GID", "TYPE", "MEMBERS"]
    by_name = {row.split()[0]: row.split()[2:] for row in rows}
    assert by_name == {"admin": ["built-in", "seuss"], "alice": ["private", "-"],
                       "bob": ["private", "-"], "devs": ["group", "alice,bob"],
                       "power": ["built-in", "-"], "seuss": ["linked", "-"]}
    assert_aligned(table.lines)
    assert [line.split()[0] for line in some.lines[1:]] == ["power", "admin"]
    groups = json.loads(as_json.out)
    assert {g["name"]: g["members"] for g in groups}["devs"] == ["alice", "bob"]
    assert (unknown.code, injected.code) == (MISSING, BAD)
    assert unknown.err.strip() == f"usher_grouplist: no group ops in {A}"


def test_groupmod_changes_members_but_keeps_an_admin(tools: Tools, site: Site) -> None:
    with site.user(A, "seuss") as seuss:
        seuss.add_group(A, "devs")
    changed = tools("groupmod", "devs", "--add", "alice,bob", "-a", "seuss")
    assert changed.lines == [f"group devs of {A}: added alice, bob, seuss; members now:"
                             " alice, bob, seuss"], changed
    results = tools.many([
        (("groupmod", "devs", "--remove", "bob"), {}),
        (("groupmod", "devs", "--add", "carol"), {}),              # not a user of A
        (("groupmod", "admin", "--remove", "seuss"), {}),          # the last admin
        (("groupmod", "devs", "--add", "bob"), {"user": "alice"}),
        (("groupmod", "devs"), {}),
        (("groupmod", "nosuch", "--add", "bob"), {}),
        (("groupmod", "devs", "--add", "bob", "--remove", "bob"), {}),
    ])
    assert [r.code for r in results] == [0, MISSING, CONFLICT, DENIED, BAD, MISSING, BAD]
    assert "carol is not a user of" in results[1].err
    assert "no admin left" in results[2].err
    assert members(site, "devs") == ("alice", "seuss")
    assert members(site, "admin") == ("seuss",)
    handed_over = tools("groupmod", "admin", "--add", "alice", "--remove", "seuss")
    assert handed_over.code == 0 and members(site, "admin") == ("alice",)
    # seuss is no admin now: slapd refuses and the tool says so in one line.
    refused = tools("groupmod", "admin", "--add", "seuss")
    assert refused.code == DENIED and len(refused.err.splitlines()) == 1


def test_groupdel_deletes_groups_but_not_built_in_or_private_ones(
        tools: Tools, site: Site) -> None:
    with site.user(A, "seuss") as seuss:
        seuss.add_group(A, "devs")
        seuss.add_group(A, "ops")
    results = tools.many([
        (("groupdel", "devs"), {}),
        (("groupdel", "admin"), {}),
        (("groupdel", "alice"), {}),
        (("groupdel", "nosuch"), {}),
        (("groupdel", "ops"), {"user": "bob"}),
    ])
    assert [r.code for r in results] == [0, BAD, BAD, MISSING, DENIED]
    assert results[0].lines == [f"deleted the group devs of {A}"]
    assert "remove the user instead" in results[2].err
    with site.anonymous() as anonymous:
        names = {g.name for g in anonymous.list_groups(A)}
    assert "devs" not in names and {"ops", "admin", "alice"} <= names
