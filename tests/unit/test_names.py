"""Tests of usher.names: labels, domains, logins, VM name resolution, batches."""

from __future__ import annotations

import itertools
import re
import time

import pytest

from usher.errors import InvalidName, InvalidRequest, PermissionDenied
from usher.names import (
    RESERVED_NAMES,
    VmName,
    cluster_of,
    expand_batch,
    owner_of,
    resolve_vm_name,
    validate_domain,
    validate_label,
    validate_login,
)

SITE = "usher.example.org"


# --- labels -----------------------------------------------------------------

@pytest.mark.parametrize("label, expected", [
    ("a", "a"),
    ("redfish", "redfish"),
    ("RedFish", "redfish"),
    ("1", "1"),
    ("123abc", "123abc"),
    ("a-b", "a-b"),
    ("a--b", "a--b"),
    ("x" * 63, "x" * 63),
])
def test_validate_label_accepts_and_folds(label: str, expected: str) -> None:
    assert validate_label(label) == expected


@pytest.mark.parametrize("label, fragment", [
    ("", "empty"),
    ("x" * 64, "64 characters"),
    ("-a", "starts or ends with '-'"),
    ("a-", "starts or ends with '-'"),
    ("-", "starts or ends with '-'"),
    ("a_b", "'_'"),
    ("a.b", "'.'"),
    ("a b", "' '"),
    ("café", "'é'"),
    ("\u212a", "'\u212a'"),  # Kelvin sign: lower() turns it into ASCII 'k'
    ("a\n", "'\\n'"),
    ("a*", "'*'"),
])
def test_validate_label_refuses(label: str, fragment: str) -> None:
    with pytest.raises(InvalidName) as info:
        validate_label(label)
    message = str(info.value)
    assert fragment in message
    assert "a-z, 0-9 and '-'" in message
    assert "\n" not in message


# --- domains ----------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("example.org", "example.org"),
    ("Example.ORG.", "example.org"),
    ("a", "a"),
    ("a.", "a"),
    ("1.bluefish.seuss.usher.example.org", "1.bluefish.seuss.usher.example.org"),
])
def test_validate_domain_accepts(name: str, expected: str) -> None:
    assert validate_domain(name) == expected


def test_validate_domain_length_limit() -> None:
    name = ".".join(["a" * 63] * 3 + ["b" * 61])  # 253 characters
    assert len(name) == 253
    assert validate_domain(name) == name
    assert validate_domain(name + ".") == name
    with pytest.raises(InvalidName, match="254 characters long"):
        validate_domain(name + "b")


@pytest.mark.parametrize("name, fragment", [
    ("", "empty domain"),
    (".", "empty domain"),
    ("a..b", "empty label"),
    (".a", "empty label"),
    ("a..", "empty label"),
    ("a.-b", "starts or ends"),
    ("a.b_c", "'_'"),
    ("a." + "x" * 64, "64 characters"),
])
def test_validate_domain_refuses(name: str, fragment: str) -> None:
    with pytest.raises(InvalidName, match=re.escape(fragment)):
        validate_domain(name)


# --- logins -----------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("seuss", "seuss"),
    ("Seuss", "seuss"),
    ("a1", "a1"),
    ("bob-smith", "bob-smith"),
    ("x" * 32, "x" * 32),
])
def test_validate_login_accepts(name: str, expected: str) -> None:
    assert validate_login(name) == expected


@pytest.mark.parametrize("name, fragment", [
    ("", "empty"),
    ("1abc", "must start with a letter"),
    ("9", "must start with a letter"),
    ("x" * 33, "33 characters"),
    ("x" * 64, "64 characters"),
    ("bob_smith", "'_'"),
    ("-bob", "starts or ends"),
    ("root", "reserved"),
    ("ROOT", "reserved"),
    ("admin", "reserved"),
    ("ns1", "reserved"),
])
def test_validate_login_refuses(name: str, fragment: str) -> None:
    with pytest.raises(InvalidName, match=re.escape(fragment)):
        validate_login(name)


@pytest.mark.parametrize("name", [
    "root", "admin", "www", "ns1", "ns2", "mail", "daemon", "bin", "sys", "nobody",
    "postmaster", "hostmaster", "usher", "localhost",
])
def test_reserved_names_include_the_usual(name: str) -> None:
    assert name in RESERVED_NAMES
    with pytest.raises(InvalidName, match="reserved"):
        validate_login(name)


def test_reserved_names_are_lower_case_labels() -> None:
    assert isinstance(RESERVED_NAMES, frozenset)
    for name in RESERVED_NAMES:
        assert validate_label(name) == name


# --- clusters and owners ----------------------------------------------------

@pytest.mark.parametrize("fqdn, cluster", [
    ("1.bluefish.seuss.usher.example.org", "bluefish.seuss.usher.example.org"),
    ("redfish.seuss.usher.example.org", "seuss.usher.example.org"),
    ("seuss.usher.example.org", "usher.example.org"),
    ("Redfish.Seuss.usher.example.org.", "seuss.usher.example.org"),
])
def test_cluster_of(fqdn: str, cluster: str) -> None:
    assert cluster_of(fqdn) == cluster


@pytest.mark.parametrize("fqdn", ["localhost", "a..b", ""])
def test_cluster_of_refuses(fqdn: str) -> None:
    with pytest.raises(InvalidName):
        cluster_of(fqdn)


@pytest.mark.parametrize("fqdn, owner", [
    ("1.bluefish.seuss.usher.example.org", "seuss"),
    ("redfish.seuss.usher.example.org", "seuss"),
    ("seuss.usher.example.org", None),
    ("web.usher.example.org.", None),
    ("x.SEUSS.usher.example.org", "seuss"),
])
def test_owner_of(fqdn: str, owner: str | None) -> None:
    assert owner_of(fqdn, SITE) == owner
    assert owner_of(fqdn, SITE + ".") == owner


@pytest.mark.parametrize("fqdn", ["usher.example.org", "a.example.org", "xusher.example.org"])
def test_owner_of_refuses_names_not_under_the_site(fqdn: str) -> None:
    with pytest.raises(InvalidName, match="not under the site domain"):
        owner_of(fqdn, SITE)


# --- resolving VM names -----------------------------------------------------

def resolve(name: str, user: str = "seuss", admin: bool = False) -> VmName:
    return resolve_vm_name(name, user=user, site=SITE, site_admin=admin)


@pytest.mark.parametrize("typed, fqdn, cluster", [
    ("redfish.sneetch", "redfish.sneetch.seuss.usher.example.org",
     "sneetch.seuss.usher.example.org"),
    ("redfish", "redfish.seuss.usher.example.org", "seuss.usher.example.org"),
    ("1.bluefish", "1.bluefish.seuss.usher.example.org", "bluefish.seuss.usher.example.org"),
    ("RedFish.Sneetch", "redfish.sneetch.seuss.usher.example.org",
     "sneetch.seuss.usher.example.org"),
    ("redfish.seuss.usher.example.org", "redfish.seuss.usher.example.org",
     "seuss.usher.example.org"),
    ("redfish.seuss.usher.example.org.", "redfish.seuss.usher.example.org",
     "seuss.usher.example.org"),
    ("redfish.seuss.usher.example.ORG", "redfish.seuss.usher.example.org",
     "seuss.usher.example.org"),
    ("a.b.c.d.e", "a.b.c.d.e.seuss.usher.example.org", "b.c.d.e.seuss.usher.example.org"),
    ("seuss", "seuss.seuss.usher.example.org", "seuss.usher.example.org"),
])
def test_resolve_own_names(typed: str, fqdn: str, cluster: str) -> None:
    vm = resolve(typed)
    assert vm == VmName(fqdn=fqdn, cluster=cluster, owner="seuss")


def test_resolve_is_relative_unless_under_site_or_dotted() -> None:
    # "example.org" does not end in ".usher.example.org", so it is relative.
    assert resolve("web.example.org").fqdn == "web.example.org.seuss.usher.example.org"


def test_resolve_folds_user_and_site() -> None:
    vm = resolve_vm_name("x", user="Seuss", site="Usher.Example.Org.", site_admin=False)
    assert vm.fqdn == "x.seuss.usher.example.org"


@pytest.mark.parametrize("typed, fragment", [
    ("", "empty VM name"),
    (".", "empty VM name"),
    ("red_fish", "'_'"),
    ("redfish..sneetch", "empty label"),
    (".redfish", "empty label"),
    ("-redfish", "starts or ends"),
    ("x" * 64, "64 characters"),
    ("a" * 60 + "." + "b" * 60 + "." + "c" * 60 + "." + "d" * 50, "characters long"),
])
def test_resolve_refuses_bad_names(typed: str, fragment: str) -> None:
    for admin in (False, True):
        with pytest.raises(InvalidName, match=re.escape(fragment)):
            resolve(typed, admin=admin)


def test_resolve_refuses_own_domain_for_users() -> None:
    for typed in ("seuss.usher.example.org", "seuss.usher.example.org.", "SEUSS.usher.example.org"):
        with pytest.raises(PermissionDenied) as info:
            resolve(typed)
        message = str(info.value)
        assert "seuss.usher.example.org is your own domain" in message
        assert "site cluster usher.example.org" in message
        assert "only the site admin" in message
        assert "NAME.CLUSTER" in message


@pytest.mark.parametrize("typed, fqdn", [
    ("web.usher.example.org", "web.usher.example.org"),
    ("bob.usher.example.org", "bob.usher.example.org"),
    ("redfish.bob.usher.example.org", "redfish.bob.usher.example.org"),
    ("x.seussx.usher.example.org", "x.seussx.usher.example.org"),
])
def test_resolve_refuses_names_outside_own_domain_for_users(typed: str, fqdn: str) -> None:
    with pytest.raises(PermissionDenied) as info:
        resolve(typed)
    assert str(info.value) == (
        f"{fqdn} is outside your domain seuss.usher.example.org;"
        " name VMs like NAME or NAME.CLUSTER")


@pytest.mark.parametrize("typed", [
    "usher.example.org", "usher.example.org.", "USHER.example.org",
])
def test_resolve_refuses_the_site_domain_for_everyone(typed: str) -> None:
    for admin in (False, True):
        with pytest.raises(InvalidName, match="is the site domain itself"):
            resolve(typed, admin=admin)


@pytest.mark.parametrize("typed", [
    "example.org.", "web.example.com.", "localhost.", "xusher.example.org.",
])
def test_resolve_refuses_names_outside_the_site_for_everyone(typed: str) -> None:
    for admin in (False, True):
        with pytest.raises(InvalidName, match="outside the site domain usher.example.org"):
            resolve(typed, admin=admin)


@pytest.mark.parametrize("typed, fqdn, owner", [
    ("web.usher.example.org", "web.usher.example.org", None),
    ("seuss.usher.example.org.", "seuss.usher.example.org", None),
    ("redfish.seuss.usher.example.org", "redfish.seuss.usher.example.org", "seuss"),
    ("redfish", "redfish.root.usher.example.org", "root"),
])
def test_site_admin_may_name_anything_under_the_site(typed: str, fqdn: str,
                                                     owner: str | None) -> None:
    vm = resolve(typed, user="root", admin=True)
    assert vm.fqdn == fqdn
    assert vm.owner == owner
    assert vm.cluster == fqdn.split(".", 1)[1]


def test_site_admin_may_name_own_domain() -> None:
    vm = resolve("root.usher.example.org", user="root", admin=True)
    assert vm == VmName("root.usher.example.org", SITE, None)


def test_resolve_refuses_invalid_user_or_site() -> None:
    with pytest.raises(InvalidName):
        resolve_vm_name("x", user="bad_user", site=SITE, site_admin=False)
    with pytest.raises(InvalidName):
        resolve_vm_name("x", user="seuss", site="bad..site", site_admin=False)


def test_vm_name_is_frozen() -> None:
    vm = resolve("redfish")
    with pytest.raises(AttributeError):
        vm.fqdn = "other"  # type: ignore[misc]


@pytest.mark.parametrize("fqdn, user, short", [
    ("redfish.sneetch.seuss.usher.example.org", "seuss", "redfish.sneetch"),
    ("redfish.seuss.usher.example.org", "seuss", "redfish"),
    ("redfish.seuss.usher.example.org", "SEUSS", "redfish"),
    ("redfish.bob.usher.example.org", "seuss", "redfish.bob.usher.example.org"),
    ("seuss.usher.example.org", "seuss", "seuss.usher.example.org"),
    ("web.usher.example.org", "seuss", "web.usher.example.org"),
    ("x.xseuss.usher.example.org", "seuss", "x.xseuss.usher.example.org"),
])
def test_relative_to(fqdn: str, user: str, short: str) -> None:
    vm = VmName(fqdn=fqdn, cluster=cluster_of(fqdn), owner=owner_of(fqdn, SITE))
    assert vm.relative_to(user, SITE) == short
    assert vm.relative_to(user, SITE + ".") == short


def test_relative_to_round_trips_with_resolve() -> None:
    for typed in ("redfish", "redfish.sneetch", "1.bluefish", "a.b.c"):
        assert resolve(typed).relative_to("seuss", SITE) == typed


# --- batch expansion --------------------------------------------------------

@pytest.mark.parametrize("patterns, expected", [
    (["redfish"], ["redfish"]),
    ([], []),
    (["{1..3}.bluefish"], ["1.bluefish", "2.bluefish", "3.bluefish"]),
    (["{3..1}"], ["3", "2", "1"]),
    (["{5..5}"], ["5"]),
    (["{0..2}"], ["0", "1", "2"]),
    (["{01..03}"], ["01", "02", "03"]),
    (["{8..10}"], ["8", "9", "10"]),
    (["{08..10}"], ["08", "09", "10"]),
    (["{1..010}"], ["001", "002", "003", "004", "005", "006", "007", "008", "009", "010"]),
    (["{10..08}"], ["10", "09", "08"]),
    (["{a,b,c}"], ["a", "b", "c"]),
    (["web{a,b}x"], ["webax", "webbx"]),
    (["{a,b}.{1..2}"], ["a.1", "a.2", "b.1", "b.2"]),
    (["{1..2}{x,y}{3..4}"],
     ["1x3", "1x4", "1y3", "1y4", "2x3", "2x4", "2y3", "2y4"]),
    (["a", "b", "a"], ["a", "b"]),
    (["{1..3}", "{2..4}"], ["1", "2", "3", "4"]),
    (["{b,a,b}"], ["b", "a"]),
    (["{1..2}.x", "y"], ["1.x", "2.x", "y"]),
])
def test_expand_batch(patterns: list[str], expected: list[str]) -> None:
    assert expand_batch(patterns) == expected


def test_expand_batch_accepts_any_iterable() -> None:
    assert expand_batch(p for p in ("{1..2}", "z")) == ["1", "2", "z"]


def test_expand_batch_matches_a_reference_product() -> None:
    # A small exhaustive cross-check against itertools for every range pair.
    for start, end in itertools.product(range(0, 12), repeat=2):
        step = 1 if end >= start else -1
        expected = [f"n{i}.c{j}" for i in range(start, end + step, step) for j in "ab"]
        assert expand_batch([f"n{{{start}..{end}}}.c{{a,b}}"]) == expected


def test_expand_batch_cap() -> None:
    assert len(expand_batch(["{1..1000}"])) == 1000
    assert len(expand_batch(["{1..10}"], cap=10)) == 10
    with pytest.raises(InvalidRequest, match="more than 10 names") as info:
        expand_batch(["{1..11}"], cap=10)
    assert type(info.value) is InvalidRequest
    assert info.value.details == {"cap": 10}
    with pytest.raises(InvalidRequest, match="more than 1000 names"):
        expand_batch(["{1..1001}"])


def test_expand_batch_cap_counts_products_and_patterns() -> None:
    with pytest.raises(InvalidRequest):
        expand_batch(["{1..10}{1..10}"], cap=99)
    assert len(expand_batch(["{1..10}{1..10}"], cap=100)) == 100
    with pytest.raises(InvalidRequest):
        expand_batch(["{1..5}", "{6..10}"], cap=9)


def test_expand_batch_refuses_huge_ranges_at_once() -> None:
    began = time.monotonic()
    for pattern in ("{1..99999999}", "{0..99999999999999999999999999}",
                    "{1..99999}{1..99999}{1..99999}"):
        with pytest.raises(InvalidRequest):
            expand_batch([pattern])
    assert time.monotonic() - began < 0.5


def test_expand_batch_validates_every_pattern_before_expanding() -> None:
    with pytest.raises(InvalidName):
        expand_batch(["{1..5}", "bad{"])


@pytest.mark.parametrize("pattern, fragment", [
    ("", "empty name"),
    ("{", "unbalanced '{'"),
    ("a{1..3", "unbalanced '{'"),
    ("}", "unbalanced '}'"),
    ("a}b", "unbalanced '}'"),
    ("{1..3}}", "unbalanced '}'"),
    ("{}", "empty braces"),
    ("a{}b", "empty braces"),
    ("{1..}", "bad range"),
    ("{..3}", "bad range"),
    ("{..}", "bad range"),
    ("{1...3}", "bad range"),
    ("{a..c}", "bad range"),
    ("{-1..3}", "bad range"),
    ("{1..3..2}", "bad range"),
    ("{ 1..3}", "bad range"),
    ("{a,,b}", "empty item"),
    ("{a,}", "empty item"),
    ("{,a}", "empty item"),
    ("{,}", "empty item"),
    ("{a}", "neither a list"),
    ("{1}", "neither a list"),
    ("{{1..2}}", "nested braces"),
    ("{a,{b,c}}", "nested braces"),
])
def test_expand_batch_refuses_malformed_braces(pattern: str, fragment: str) -> None:
    with pytest.raises(InvalidName, match=re.escape(fragment)) as info:
        expand_batch([pattern])
    assert "\n" not in str(info.value)
