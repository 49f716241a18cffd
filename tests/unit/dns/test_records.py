"""The DNS data model: records, zones and the ownership rules of :func:`plan`."""

from __future__ import annotations

import ipaddress

import dns.name
import dns.rdata
import dns.rdataclass
import pytest

from usher.dns.records import (
    Change,
    ChangeSet,
    Record,
    Zones,
    owner_marker,
    plan,
    reverse_zone_for,
    vm_records,
    with_markers,
)
from usher.errors import DnsError

SITE = "site1"
ZONES = Zones(["usher.test.", "10.in-addr.arpa.", "d.f.ip6.arpa.", "lab.usher.test"])


def marker(name: str, site: str = SITE) -> Record:
    return owner_marker(name, site)


# ------------------------------------------------------------------ records
def test_record_is_canonical_hashable_and_ordered() -> None:
    a = Record("Web.Usher.Test", "a", "10.0.0.1")
    assert (a.name, a.rdtype, a.value) == ("web.usher.test.", "A", "10.0.0.1")
    assert a == Record("web.usher.test.", "A", "10.0.0.1")
    assert len({a, Record("web.usher.test.", "A", "10.0.0.1")}) == 1
    assert Record("fd00::0:1.usher.test", "AAAA", "FD00:0::1").value == "fd00::1"
    assert Record("x.usher.test", "PTR", "Web.Usher.Test").value == "web.usher.test."
    assert Record("x.usher.test", "TXT", '"Case Kept"').value == '"Case Kept"'
    assert sorted([Record("b.t", "A", "10.0.0.1"), a]) == [Record("b.t", "A", "10.0.0.1"), a]
    assert str(a) == "web.usher.test. A 10.0.0.1"


@pytest.mark.parametrize(("rdtype", "value"), [
    ("A", "10.0.0.1"), ("AAAA", "fd00:0::0:1"), ("PTR", "Web.Usher.Test."),
    ("TXT", '"heritage=usher,site=site1" "two"'), ("MX", "10 Mail.Example.net."),
    ("CNAME", "Web.Usher.Test."),
])
def test_records_from_dnspython_equal_records_from_text(rdtype: str, value: str) -> None:
    rdata = dns.rdata.from_text(dns.rdataclass.IN, rdtype, value, relativize=False)
    fast = Record.from_rdata(dns.name.from_text("X.Usher.Test."), rdata)
    assert fast == Record("x.usher.test", rdtype, value)
    assert hash(fast) == hash(Record("x.usher.test", rdtype, value))


@pytest.mark.parametrize(("name", "rdtype", "value"), [
    ("web.usher.test", "A", "10.0.0.300"),
    ("web.usher.test", "AAAA", "10.0.0.1"),
    ("web.usher.test", "NOSUCHTYPE", "x"),
    ("a" * 64 + ".usher.test", "A", "10.0.0.1"),
])
def test_bad_records_raise_dns_error(name: str, rdtype: str, value: str) -> None:
    with pytest.raises(DnsError):
        Record(name, rdtype, value)


def test_vm_records_ipv4() -> None:
    assert vm_records("web.usher.test", "10.1.2.3") == [
        Record("web.usher.test.", "A", "10.1.2.3"),
        Record("3.2.1.10.in-addr.arpa.", "PTR", "web.usher.test."),
    ]


def test_vm_records_ipv6() -> None:
    records = vm_records("web.usher.test", "fd00::5")
    assert records[0] == Record("web.usher.test.", "AAAA", "fd00::5")
    assert records[1].rdtype == "PTR" and records[1].value == "web.usher.test."
    assert records[1].name == "5." + "0." * 29 + "d.f.ip6.arpa."


def test_vm_records_round_robin_member() -> None:
    records = vm_records("web.bluefish.usher.test", "10.1.2.3", rr_name="bluefish.usher.test")
    assert records[-1] == Record("bluefish.usher.test.", "A", "10.1.2.3")
    assert not any(r.rdtype == "TXT" for r in records)
    six = vm_records("web.bluefish.usher.test", "fd00::5", rr_name="bluefish.usher.test")
    assert six[-1] == Record("bluefish.usher.test.", "AAAA", "fd00::5")


@pytest.mark.parametrize("ip", ["10.1.2.3", "192.168.0.255", "0.0.0.1", "fd00::5",
                                "2001:db8:0:0:1:0:0:1", "::ffff:10.1.2.3", "fe80::",
                                "2001:DB8::AbCd"])
def test_vm_records_are_canonical_as_parsed_records(ip: str) -> None:
    # vm_records builds its records from parts instead of parsing them: each
    # must equal, field by field, the record the checking constructor makes.
    import dns.reversename

    address = ipaddress.ip_address(ip)
    rdtype = "A" if address.version == 4 else "AAAA"
    fast = vm_records("Web.Bluefish.usher.test", ip, rr_name="Bluefish.usher.test")
    slow = [Record("Web.Bluefish.usher.test", rdtype, ip),
            Record(dns.reversename.from_address(ip).to_text(), "PTR",
                   "Web.Bluefish.usher.test"),
            Record("Bluefish.usher.test", rdtype, ip)]
    assert [(r.name, r.rdtype, r.value) for r in fast] == \
        [(r.name, r.rdtype, r.value) for r in slow]


def test_vm_records_refuse_a_bad_address() -> None:
    with pytest.raises(DnsError, match="not an IP address"):
        vm_records("web.usher.test", "10.1.2")


def test_owner_marker_and_with_markers() -> None:
    assert marker("Web.usher.test") == Record("web.usher.test.", "TXT",
                                              '"heritage=usher,site=site1"')
    records = vm_records("web.usher.test", "10.1.2.3", "rr.usher.test")
    full = with_markers(records, SITE)
    assert full == set(records) | {marker("web.usher.test"), marker("rr.usher.test"),
                                   marker("3.2.1.10.in-addr.arpa")}
    with pytest.raises(DnsError, match="site id"):
        owner_marker("web.usher.test", 'bad"site')


# ------------------------------------------------------------------ zones
@pytest.mark.parametrize(("cidr", "zone"), [
    ("10.20.0.0/16", "20.10.in-addr.arpa."),
    ("10.20.4.0/22", "20.10.in-addr.arpa."),
    ("10.20.30.0/24", "30.20.10.in-addr.arpa."),
    ("10.20.30.64/26", "30.20.10.in-addr.arpa."),
    ("10.0.0.0/8", "10.in-addr.arpa."),
    ("10.0.0.0/7", "in-addr.arpa."),
    ("fd00::/8", "d.f.ip6.arpa."),
    ("fc00::/7", "f.ip6.arpa."),
    ("2001:db8::/32", "8.b.d.0.1.0.0.2.ip6.arpa."),
    ("2001:db8:4::/46", "0.0.0.8.b.d.0.1.0.0.2.ip6.arpa."),
])
def test_reverse_zone_for_rounds_down_to_a_label(cidr: str, zone: str) -> None:
    assert reverse_zone_for(ipaddress.ip_network(cidr)) == zone
    assert Zones.reverse_zone_for(ipaddress.ip_network(cidr)) == zone


def test_every_vm_address_is_in_the_reverse_zone_of_its_network() -> None:
    for cidr, ip in (("10.20.4.0/22", "10.20.7.9"), ("fd00:1:2::/47", "fd00:1:3::9")):
        zones = Zones([reverse_zone_for(ipaddress.ip_network(cidr))])
        ptr = vm_records("vm.usher.test", ip)[1]
        assert zones.zone_of(ptr.name) == reverse_zone_for(ipaddress.ip_network(cidr))


def test_zone_of_takes_the_longest_suffix() -> None:
    assert ZONES.zone_of("web.usher.test.") == "usher.test."
    assert ZONES.zone_of("usher.test.") == "usher.test."
    assert ZONES.zone_of("a.lab.usher.test.") == "lab.usher.test."
    assert ZONES.zone_of("3.2.1.10.in-addr.arpa.") == "10.in-addr.arpa."
    assert ZONES.zone_of("example.com.") is None
    assert ZONES.zone_of("test.") is None
    assert ZONES.zone_of(".") is None
    assert ZONES.zone_of("a\\.b.usher.test.") == "usher.test."
    assert "usher.test." in ZONES and len(ZONES) == 4


def test_group_by_zone_splits_adds_deletes_and_conflicts() -> None:
    changes = ChangeSet(adds=set(vm_records("web.usher.test", "10.1.2.3")),
                        deletes={Record("old.lab.usher.test", "A", "10.0.0.9")},
                        conflicts={"taken.usher.test.", "nowhere.example."})
    grouped = changes.group_by_zone(ZONES)
    assert set(grouped) == {"usher.test.", "10.in-addr.arpa.", "lab.usher.test."}
    assert grouped["usher.test."].adds == {Record("web.usher.test", "A", "10.1.2.3")}
    assert grouped["usher.test."].conflicts == {"taken.usher.test."}
    assert grouped["lab.usher.test."].deletes == {Record("old.lab.usher.test", "A", "10.0.0.9")}


def test_group_by_zone_names_the_record_and_the_zone_to_configure() -> None:
    changes = ChangeSet(adds=set(vm_records("web.usher.test", "192.168.1.5")))
    with pytest.raises(DnsError, match=r"5\.1\.168\.192\.in-addr\.arpa\. PTR web\.usher\.test\."
                                       r".*reverse zone") as err:
        changes.group_by_zone(ZONES)
    assert "1.168.192.in-addr.arpa." in err.value.message
    with pytest.raises(DnsError, match="'example.com.'"):
        ChangeSet(deletes={Record("web.example.com", "A", "10.0.0.1")}).group_by_zone(ZONES)


def test_changes_are_deletes_first_in_a_stable_order() -> None:
    a, b = Record("a.usher.test", "A", "10.0.0.1"), Record("b.usher.test", "A", "10.0.0.2")
    changes = ChangeSet(adds={b, a}, deletes={Record("c.usher.test", "A", "10.0.0.3")})
    assert changes.changes() == [Change("delete", Record("c.usher.test", "A", "10.0.0.3")),
                                 Change("add", a), Change("add", b)]
    assert len(changes) == 3 and changes and not ChangeSet(conflicts={"x."})


# ------------------------------------------------------------------ plan
def test_plan_adds_everything_at_free_names_with_markers() -> None:
    desired = set(vm_records("web.usher.test", "10.1.2.3"))
    changes = plan(desired, set(), SITE)
    assert changes.adds == with_markers(desired, SITE)
    assert not changes.deletes and not changes.conflicts


def test_plan_is_empty_when_converged() -> None:
    desired = set(vm_records("web.usher.test", "10.1.2.3", "rr.usher.test"))
    changes = plan(desired, with_markers(desired, SITE), SITE)
    assert not changes and not changes.conflicts


def test_plan_fixes_our_names_and_removes_our_stale_ones() -> None:
    actual = {
        Record("web.usher.test", "A", "10.1.2.9"),  # wrong address
        marker("web.usher.test"),
        Record("gone.usher.test", "A", "10.1.2.7"),  # a VM that no longer exists
        Record("gone.usher.test", "AAAA", "fd00::7"),
        marker("gone.usher.test"),
    }
    desired = {Record("web.usher.test", "A", "10.1.2.3")}
    changes = plan(desired, actual, SITE)
    assert changes.adds == {Record("web.usher.test", "A", "10.1.2.3")}
    assert changes.deletes == {Record("web.usher.test", "A", "10.1.2.9"),
                               Record("gone.usher.test", "A", "10.1.2.7"),
                               Record("gone.usher.test", "AAAA", "fd00::7"),
                               marker("gone.usher.test")}


def test_plan_keeps_round_robin_members_that_are_still_wanted() -> None:
    rr = "bluefish.usher.test"
    actual = with_markers({Record(rr, "A", "10.0.0.1"), Record(rr, "A", "10.0.0.2")}, SITE)
    changes = plan({Record(rr, "A", "10.0.0.2"), Record(rr, "A", "10.0.0.3")}, actual, SITE)
    assert changes.deletes == {Record(rr, "A", "10.0.0.1")}
    assert changes.adds == {Record(rr, "A", "10.0.0.3")}


def test_plan_never_touches_foreign_names_and_reports_wanted_ones() -> None:
    hand_made = {Record("mail.usher.test", "A", "10.0.0.25"),  # not wanted: left alone
                 Record("web.usher.test", "A", "10.1.2.3"),  # wanted, but not ours
                 Record("other.usher.test", "A", "10.0.0.8"),
                 marker("other.usher.test", "site2")}  # another site's name
    desired = {Record("web.usher.test", "A", "10.1.2.3"),
               Record("other.usher.test", "A", "10.0.0.9")}
    changes = plan(desired, hand_made, SITE)
    assert not changes
    assert changes.conflicts == {"web.usher.test.", "other.usher.test."}


def test_plan_leaves_other_types_alone_even_at_our_names() -> None:
    others = {Record("web.usher.test", "MX", "10 mx.usher.test"),
              Record("web.usher.test", "TXT", '"v=spf1 -all"'),
              Record("web.usher.test", "TXT", '"heritage=usher,site=site2"'),
              Record("web.usher.test", "SSHFP", "1 1 " + "ab" * 20)}
    actual = others | {Record("web.usher.test", "A", "10.1.2.9"), marker("web.usher.test")}
    changes = plan(set(), actual, SITE)
    assert changes.deletes == {Record("web.usher.test", "A", "10.1.2.9"),
                               marker("web.usher.test")}
    assert not changes.adds and not changes.conflicts


def test_plan_only_counts_names_it_wants_as_conflicts() -> None:
    actual = {Record("ns.usher.test", "A", "127.0.0.1"),
              Record("alias.usher.test", "CNAME", "web.usher.test")}
    assert not plan(set(), actual, SITE).conflicts
    changes = plan({Record("alias.usher.test", "A", "10.0.0.1")}, actual, SITE)
    assert changes.conflicts == {"alias.usher.test."} and not changes


def test_plan_refuses_to_publish_other_types() -> None:
    with pytest.raises(DnsError, match="only A, AAAA and PTR"):
        plan({Record("web.usher.test", "TXT", '"hello"')}, set(), SITE)
    # The site's own markers may be passed in (with_markers output).
    desired = with_markers(vm_records("web.usher.test", "10.1.2.3"), SITE)
    assert plan(desired, set(), SITE).adds == desired
