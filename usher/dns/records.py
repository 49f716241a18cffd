"""DNS records as data: what usher wants published, what a server holds, and the diff.

This module is the pure half of usher's DNS support: no sockets, no clock. A
:class:`Record` is one resource record in canonical text form, so records built
by usher and records read back from a server compare equal when they mean the
same thing. :func:`vm_records` turns a VM's name and address into its forward,
reverse and round-robin records; :func:`owner_marker` is the TXT record that
marks a name as usher's (the TXT registry of external-dns); :class:`Zones` maps
names to the zones a server is authoritative for; and :func:`plan` computes the
:class:`ChangeSet` that takes a server from what it holds to what usher wants,
touching only names that carry usher's marker. Ownership is what makes
convergence safe after the controller's database is restored from an old
backup: records someone made by hand are never deleted, only reported.

Every function here raises :class:`~usher.errors.DnsError` for records it
cannot use (a malformed name or value, a record outside every zone).
"""

from __future__ import annotations

import functools
import ipaddress
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import dns.exception
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.PTR
import dns.rdtypes.ANY.TXT
import dns.rdtypes.IN.A
import dns.rdtypes.IN.AAAA
import dns.reversename

from usher.errors import DnsError

__all__ = [
    "MANAGED_TYPES",
    "Change",
    "ChangeSet",
    "Record",
    "Zones",
    "canonical_name",
    "owner_marker",
    "plan",
    "reverse_zone_for",
    "vm_records",
    "with_markers",
]

MANAGED_TYPES = frozenset({"A", "AAAA", "PTR"})
"""The address and pointer types usher publishes (besides its TXT markers)."""

_NAME_VALUED = frozenset({"PTR", "CNAME", "NS", "DNAME"})
MARKER_PREFIX = "heritage=usher,site="

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_IN = dns.rdataclass.IN


def canonical_name(name: str) -> str:
    """``name`` as an absolute, lower-case domain name with its trailing dot.

    A name without the trailing dot is taken as absolute (usher never deals in
    names relative to an origin).

    Raises:
        DnsError: ``name`` is not a valid domain name.
    """
    try:
        return dns.name.from_text(name, origin=dns.name.root).to_text().lower()
    except dns.exception.DNSException as exc:
        raise DnsError(f"{name!r} is not a valid DNS name: {exc}") from None


@functools.lru_cache(maxsize=8192)
def to_rdata(rdtype: str, value: str) -> dns.rdata.Rdata:
    """The dnspython rdata of a record value (class IN), cached.

    The types usher writes are built directly: dnspython's general text
    parser costs 60 us a record, which a burst of a thousand VMs notices.

    Raises:
        dns.exception.DNSException, ValueError: ``value`` is not valid for ``rdtype``.
    """
    if rdtype == "A":
        return dns.rdtypes.IN.A.A(_IN, dns.rdatatype.A, value)
    if rdtype == "AAAA":
        return dns.rdtypes.IN.AAAA.AAAA(_IN, dns.rdatatype.AAAA, value)
    if rdtype == "PTR":
        return dns.rdtypes.ANY.PTR.PTR(_IN, dns.rdatatype.PTR,
                                       dns.name.from_text(value, origin=dns.name.root))
    if rdtype == "TXT" and len(value) >= 2 and value[0] == value[-1] == '"' \
            and '"' not in value[1:-1] and "\\" not in value:
        return dns.rdtypes.ANY.TXT.TXT(_IN, dns.rdatatype.TXT, [value[1:-1].encode()])
    return dns.rdata.from_text(_IN, rdtype, value, origin=dns.name.root, relativize=False)


def _canonical_value(rdtype: str, value: str) -> str:
    try:
        rdata = to_rdata(rdtype, value)
    except (dns.exception.DNSException, ValueError) as exc:
        raise DnsError(f"{value!r} is not a valid {rdtype} value: {exc}") from None
    text = rdata.to_text()
    # Domain names compare without regard to case; text in TXT records does not.
    return text.lower() if rdtype in _NAME_VALUED else text


@dataclass(frozen=True, order=True)
class Record:
    """One resource record in canonical text form (class IN; the TTL is the backend's).

    ``name`` is an absolute lower-case FQDN with its trailing dot; ``rdtype``
    the upper-case type name (``"A"``, ``"AAAA"``, ``"PTR"``, ``"TXT"``, ...);
    ``value`` the presentation form of the data: an address, a target FQDN with
    its trailing dot, or TXT strings in quotes (``'"heritage=usher,site=s1"'``).
    Construction canonicalises all three, so ``Record("Web.usher.test", "a",
    "10.0.0.1")`` equals the record read back from a server.

    Raises:
        DnsError: the name, type or value is not valid.
    """

    name: str
    rdtype: str
    value: str

    def __post_init__(self) -> None:
        rdtype = self.rdtype.upper()
        try:
            dns.rdatatype.from_text(rdtype)
        except dns.exception.DNSException:
            raise DnsError(f"{self.rdtype!r} is not a DNS record type") from None
        # The dataclass is frozen for hashing; canonical forms are set once, here.
        object.__setattr__(self, "name", canonical_name(self.name))
        object.__setattr__(self, "rdtype", rdtype)
        object.__setattr__(self, "value", _canonical_value(rdtype, self.value))

    def __str__(self) -> str:
        return f"{self.name} {self.rdtype} {self.value}"

    @classmethod
    def from_rdata(cls, name: dns.name.Name, rdata: dns.rdata.Rdata) -> Record:
        """The record of ``rdata`` at ``name``, as dnspython parsed it from a server.

        Both must be absolute (not relativized to a zone origin). Faster than
        the constructor: dnspython's objects are valid already, so only their
        text is taken, not parsed again (reading a zone of thousands of
        records is where that counts).
        """
        rdtype = dns.rdatatype.to_text(rdata.rdtype)
        value = rdata.to_text()
        return cls._trusted(name.to_text().lower(), rdtype,
                            value.lower() if rdtype in _NAME_VALUED else value)

    @classmethod
    def _trusted(cls, name: str, rdtype: str, value: str) -> Record:
        """A record from parts known to be canonical: no checks, no parsing."""
        record = object.__new__(cls)
        object.__setattr__(record, "name", name)
        object.__setattr__(record, "rdtype", rdtype)
        object.__setattr__(record, "value", value)
        return record


def _address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(ip)
    except ValueError:
        raise DnsError(f"{ip!r} is not an IP address") from None


def vm_records(fqdn: str, ip: str, rr_name: str | None = None) -> list[Record]:
    """The address records of one VM: forward, reverse and round-robin membership.

    An ``A`` (IPv4) or ``AAAA`` (IPv6) record at ``fqdn``, a ``PTR`` at the
    address's reverse name pointing to ``fqdn`` and, when ``rr_name`` is given
    (the round-robin name of a set the VM belongs to, e.g. its cluster's FQDN),
    the same address at ``rr_name``. Ownership markers are not included: see
    :func:`with_markers`.

    Raises:
        DnsError: ``ip`` is not an address or a name is not valid.
    """
    address = _address(ip)
    # Built from canonical parts (one name parse, not five: a start pays for
    # this on the event loop). An IPv4 address as Python writes it is as
    # dnspython writes it; IPv6 is left to dnspython, whose text and reverse
    # names differ from Python's for IPv4-mapped addresses.
    if address.version == 4:
        rdtype, value = "A", str(address)
        reverse = ".".join(reversed(value.split("."))) + ".in-addr.arpa."
    else:
        rdtype, value = "AAAA", _canonical_value("AAAA", str(address))
        reverse = canonical_name(dns.reversename.from_address(str(address)).to_text())
    name = canonical_name(fqdn)
    records = [Record._trusted(name, rdtype, value), Record._trusted(reverse, "PTR", name)]
    if rr_name is not None:
        records.append(Record._trusted(canonical_name(rr_name), rdtype, value))
    return records


def _check_site(site_id: str) -> None:
    # The site id goes into a quoted TXT string and is compared as text: keep
    # it to characters that need no escaping, so every reader sees one form.
    if not site_id or not all(c.isalnum() or c in "._-" for c in site_id) \
            or not site_id.isascii():
        raise DnsError(f"site id {site_id!r} must be letters, digits, '.', '_' or '-'")


def owner_marker(name: str, site_id: str) -> Record:
    """The TXT record that marks ``name`` as managed by usher for site ``site_id``.

    Its text is ``"heritage=usher,site=<site_id>"``. usher deletes records only
    at names that carry the marker of its own site.

    Raises:
        DnsError: ``site_id`` holds characters other than letters, digits,
            ``.``, ``_`` and ``-``, or ``name`` is not valid.
    """
    _check_site(site_id)
    return _marker(canonical_name(name), site_id)


def _marker(name: str, site_id: str) -> Record:
    # For a canonical name and a checked site id the text is canonical as it
    # stands: the site id has nothing TXT presentation would escape.
    return Record._trusted(name, "TXT", f'"{MARKER_PREFIX}{site_id}"')


def with_markers(records: Iterable[Record], site_id: str) -> set[Record]:
    """``records`` plus the owner marker of ``site_id`` at each distinct name.

    Raises:
        DnsError: ``site_id`` is not valid (see :func:`owner_marker`).
    """
    _check_site(site_id)
    result = set(records)
    result.update(_marker(name, site_id) for name in {r.name for r in result})
    return result


# ------------------------------------------------------------------ zones
def reverse_zone_for(network: IpNetwork) -> str:
    """The reverse zone origin that covers ``network``, cut at a label boundary.

    IPv4 reverse labels are octets, IPv6 ones nibbles, so the prefix is rounded
    down to a multiple of 8 (IPv4) or 4 (IPv6) bits: ``10.20.0.0/16`` gives
    ``20.10.in-addr.arpa.``, ``10.20.4.0/22`` the same /16 zone, and
    ``fd00::/8`` gives ``d.f.ip6.arpa.``.
    """
    address = network.network_address
    if network.version == 4:
        octets = network.prefixlen // 8
        labels = str(address).split(".")[:octets]
        return ".".join([*reversed(labels), "in-addr.arpa."])
    nibbles = network.prefixlen // 4
    digits = address.exploded.replace(":", "")[:nibbles]
    return ".".join([*reversed(digits), "ip6.arpa."])


class Zones:
    """The zones a DNS server is authoritative for, by origin.

    Built from origins such as ``usher.test.``, ``10.in-addr.arpa.`` or
    ``d.f.ip6.arpa.``. A name belongs to the zone whose origin is its longest
    suffix (so nested zones work); lookups walk the name's labels, one set
    lookup per label, never scanning the zones.

    Raises:
        DnsError: an origin is not a valid name.
    """

    reverse_zone_for = staticmethod(reverse_zone_for)

    def __init__(self, origins: Iterable[str]) -> None:
        self._origins = frozenset(canonical_name(o) for o in origins)

    @property
    def origins(self) -> list[str]:
        """Every zone origin, sorted."""
        return sorted(self._origins)

    def __iter__(self) -> Iterator[str]:
        return iter(self.origins)

    def __len__(self) -> int:
        return len(self._origins)

    def __contains__(self, origin: object) -> bool:
        return isinstance(origin, str) and origin in self._origins

    def __repr__(self) -> str:
        return f"Zones({self.origins!r})"

    def zone_of(self, name: str) -> str | None:
        """The origin of the zone ``name`` belongs to, or None if it is in none.

        ``name`` must be canonical (as in a :class:`Record`).
        """
        if "\\" in name:
            # An escaped dot inside a label: let dnspython find the label ends.
            parsed: dns.name.Name = dns.name.from_text(name)
            for _ in range(len(parsed.labels)):
                if parsed.to_text().lower() in self._origins:
                    return parsed.to_text().lower()
                if parsed == dns.name.root:
                    return None
                parsed = parsed.parent()
            return None
        candidate = name
        # One iteration per label: a name has at most 127 of them.
        for _ in range(128):
            if candidate in self._origins:
                return candidate
            if candidate == ".":
                return None
            candidate = candidate.split(".", 1)[1] or "."
        return None


# ------------------------------------------------------------------ changes
@dataclass(frozen=True, order=True)
class Change:
    """One step of a change set: add or delete one record."""

    action: Literal["add", "delete"]
    record: Record


@dataclass
class ChangeSet:
    """Records to add and delete, and the names :func:`plan` refused to touch.

    ``conflicts`` holds names usher wants records at that hold records it does
    not own (no marker of this site): nothing is changed there; the caller
    reports them. Backends apply deletes before adds.
    """

    adds: set[Record] = field(default_factory=set)
    deletes: set[Record] = field(default_factory=set)
    conflicts: set[str] = field(default_factory=set)

    def __len__(self) -> int:
        """The number of records to change (conflicts are not changes)."""
        return len(self.adds) + len(self.deletes)

    def __bool__(self) -> bool:
        return bool(self.adds or self.deletes)

    def changes(self) -> list[Change]:
        """Every change, deletes first, each group sorted (a stable order to send)."""
        # The order of Record's own comparison, by a key: the dataclass's
        # __lt__ runs in Python per comparison, a tuple key in C.
        return [*(Change("delete", r) for r in sorted(self.deletes, key=_order)),
                *(Change("add", r) for r in sorted(self.adds, key=_order))]

    def group_by_zone(self, zones: Zones) -> dict[str, ChangeSet]:
        """This change set split by zone; conflicts go with their zone if they have one.

        Raises:
            DnsError: a record is outside every zone; the message names it and
                the zone to configure.
        """
        grouped: dict[str, ChangeSet] = {}
        for attr in ("adds", "deletes"):
            for record in getattr(self, attr):
                zone = zones.zone_of(record.name)
                if zone is None:
                    raise DnsError(_outside_message(record, zones),
                                   details={"record": str(record)})
                getattr(grouped.setdefault(zone, ChangeSet()), attr).add(record)
        for name in self.conflicts:
            zone = zones.zone_of(name)
            if zone is not None:
                grouped.setdefault(zone, ChangeSet()).conflicts.add(name)
        return grouped


def _order(record: Record) -> tuple[str, str, str]:
    return record.name, record.rdtype, record.value


def _outside_message(record: Record, zones: Zones) -> str:
    parent = record.name.split(".", 1)[1] or "."
    if record.rdtype == "PTR":
        hint = (f"configure a reverse zone that contains it (such as {parent!r}, or the"
                " zone reverse_zone_for() gives for the VM network)")
    else:
        hint = f"configure a zone that contains it (such as {parent!r})"
    configured = ", ".join(zones.origins) or "none"
    return f"{record} is outside every DNS zone usher manages ({configured}): {hint}"


def plan(desired: set[Record], actual: set[Record], site_id: str) -> ChangeSet:
    """The changes that take a server holding ``actual`` to ``desired``, safely.

    ``desired`` holds A, AAAA and PTR records (and optionally this site's
    markers, which are added where missing anyway). ``actual`` is what the
    server holds, of any type. Per name:

    * **ours** (``actual`` has this site's marker there): every A, AAAA, PTR
      and this site's marker not desired is deleted, every desired record
      missing is added. Other types (NS, MX, CNAME, other TXT ...) stay.
    * **foreign** (``actual`` has records there, none of them our marker):
      nothing is added or deleted; if usher wants records there, the name is
      reported in ``conflicts``.
    * **free** (nothing in ``actual``): the desired records and the marker are
      added.

    Raises:
        DnsError: ``desired`` holds a record of another type, or ``site_id`` is
            not valid.
    """
    _check_site(site_id)
    for record in desired:
        if record.rdtype not in MANAGED_TYPES and record != _marker(record.name, site_id):
            raise DnsError(f"usher does not publish {record.rdtype} records ({record});"
                           " only A, AAAA and PTR")
    want: dict[str, set[Record]] = defaultdict(set)
    for record in with_markers(desired, site_id):
        want[record.name].add(record)
    have: dict[str, set[Record]] = defaultdict(set)
    for record in actual:
        have[record.name].add(record)

    changes = ChangeSet()
    for name in want.keys() | have.keys():
        wanted, held = want.get(name, set()), have.get(name, set())
        marker = _marker(name, site_id)
        if marker in held:
            managed = {r for r in held if r.rdtype in MANAGED_TYPES or r == marker}
            changes.deletes |= managed - wanted
            changes.adds |= wanted - held
        elif held:
            if wanted:
                changes.conflicts.add(name)
        else:
            changes.adds |= wanted
    return changes
