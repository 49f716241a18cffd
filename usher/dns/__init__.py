"""usher's DNS: the records of VMs, published in a site's server or in usher's own.

* :mod:`usher.dns.records`: the data model and the convergence plan (pure);
* :mod:`usher.dns.backend`: :class:`DnsBackend`, the one interface the
  controller publishes through, and :class:`ConvergeReport`;
* :mod:`usher.dns.rfc2136`: :class:`Rfc2136Backend`, TSIG-signed dynamic
  updates and zone transfers against the site's server;
* :mod:`usher.dns.embedded`: :class:`EmbeddedDns`, an authoritative server in
  the process, its :class:`ZoneStore` and :class:`EmbeddedBackend`;
* :mod:`usher.dns.named`: :class:`Named`, a throwaway BIND 9 for tests and
  benchmarks.

The package uses only ``usher.errors`` of the rest of usher, and dnspython.
"""

from usher.dns.backend import ConvergeReport, DnsBackend
from usher.dns.embedded import EmbeddedBackend, EmbeddedDns, ZoneStore
from usher.dns.named import Named
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
from usher.dns.rfc2136 import Rfc2136Backend, parse_key_file

__all__ = [
    "Change",
    "ChangeSet",
    "ConvergeReport",
    "DnsBackend",
    "EmbeddedBackend",
    "EmbeddedDns",
    "Named",
    "Record",
    "Rfc2136Backend",
    "ZoneStore",
    "Zones",
    "owner_marker",
    "parse_key_file",
    "plan",
    "reverse_zone_for",
    "vm_records",
    "with_markers",
]
