"""The embedded server's zone store: answers follow every change, queried or not."""

from __future__ import annotations

import dns.name
import dns.rcode
import dns.rdatatype

from usher.dns.embedded import ZoneStore
from usher.dns.records import ChangeSet, Record, vm_records, with_markers

ZONES = ["usher.test.", "10.in-addr.arpa."]
SITE = "site1"


def answer(store: ZoneStore, name: str, rdtype: str = "A") -> tuple[str, set[str]]:
    found = store.lookup(dns.name.from_text(name), dns.rdatatype.from_text(rdtype))
    return (dns.rcode.to_text(found.rcode),
            {rd.to_text() for rrset in found.answer for rd in rrset})


def soa_serial(store: ZoneStore, name: str, rdtype: str = "SOA") -> int:
    found = store.lookup(dns.name.from_text(name), dns.rdatatype.from_text(rdtype))
    [soa] = found.answer or found.authority
    return int(soa[0].serial)


def test_answers_and_serials_follow_changes_between_queries() -> None:
    # Rrsets and the SOA are built when read: each read must see every
    # change before it, whether or not anything was read in between.
    store = ZoneStore(ZONES, serial=100)
    one = with_markers(vm_records("web.usher.test", "10.1.2.3"), SITE)
    store.apply(ChangeSet(adds=one))
    assert answer(store, "web.usher.test") == ("NOERROR", {"10.1.2.3"})
    assert answer(store, "3.2.1.10.in-addr.arpa", "PTR") == ("NOERROR", {"web.usher.test."})
    store.apply(ChangeSet(adds={Record("web.usher.test", "A", "10.1.2.4")}))
    store.apply(ChangeSet(adds={Record("web.usher.test", "A", "10.1.2.5")}))
    assert answer(store, "web.usher.test") == ("NOERROR", {"10.1.2.3", "10.1.2.4",
                                                           "10.1.2.5"})
    assert soa_serial(store, "usher.test") == 103
    assert soa_serial(store, "nobody.usher.test", "A") == 103  # in the NXDOMAIN's authority

    store.apply(ChangeSet(deletes={Record("web.usher.test", "A", "10.1.2.4")}))
    assert answer(store, "web.usher.test") == ("NOERROR", {"10.1.2.3", "10.1.2.5"})
    assert answer(store, "web.usher.test", "ANY")[1] >= {"10.1.2.3", "10.1.2.5"}
    store.apply(ChangeSet(deletes={Record("web.usher.test", "A", "10.1.2.4")}))  # gone
    assert soa_serial(store, "usher.test") == 104  # no change, no new serial

    store.apply(ChangeSet(deletes=one | {Record("web.usher.test", "A", "10.1.2.5")}))
    assert answer(store, "web.usher.test") == ("NXDOMAIN", set())
    assert answer(store, "2.1.10.in-addr.arpa", "PTR") == ("NXDOMAIN", set())  # no ENT left
    assert store.records("usher.test.") == set()
    assert soa_serial(store, "10.in-addr.arpa") == 102
    assert answer(store, "usher.test", "NS") == ("NOERROR", {"ns.usher.test."})


def test_records_reads_back_what_was_applied() -> None:
    store = ZoneStore(ZONES)
    records = with_markers(vm_records("Web.usher.test", "10.1.2.3", "rr.usher.test"), SITE)
    store.apply(ChangeSet(adds=records))
    assert store.records("usher.test.") | store.records("10.in-addr.arpa.") == records


def test_names_match_without_regard_to_case_and_escapes_stay_one_label() -> None:
    store = ZoneStore(ZONES)
    store.apply(ChangeSet(adds={Record("a\\.b.lab.usher.test", "A", "10.1.2.3"),
                                Record("Web.Lab.usher.test", "A", "10.1.2.4")}))
    assert answer(store, "A\\.B.LAB.usher.test") == ("NOERROR", {"10.1.2.3"})
    assert answer(store, "WEB.lab.usher.test") == ("NOERROR", {"10.1.2.4"})
    assert answer(store, "lab.usher.test") == ("NOERROR", set())  # an empty non-terminal
    assert answer(store, "b.lab.usher.test") == ("NXDOMAIN", set())  # "a.b" is one label
    assert answer(store, "example.com")[0] == "REFUSED"
    assert store.records("usher.test") == {Record("a\\.b.lab.usher.test", "A", "10.1.2.3"),
                                           Record("web.lab.usher.test", "A", "10.1.2.4")}
