"""IP address management: ranges, leases, and the provider that hands out addresses.

A site admin defines IP ranges (``usher-controller range add``); each new VM
gets one address of a range: the one named with ``--ip_range``, else the
site's default range (none defined: the VM gets no address). ``--ip`` asks
for a particular address; otherwise the lowest free one is taken.

:class:`IpamProvider` decides in memory, on the event loop, like placement:
``reserve`` has no ``await``, so two concurrent starts never get the same
address. The lease row is contributed through :meth:`IpamProvider.rows` and
written in the same transaction as the VM's row; it is deleted with the VM
row. Ranges and leases are loaded at start-up; ranges are read again on
SIGHUP (``usher-controller range`` edits the database, then signals or
restarts the daemon).

Access lists name users (``*``: everyone) and groups: the groups of the site
cluster in the directory (``usher_groupadd`` in the site's own cluster). The
service looks the caller's groups up before a start that needs them (cached
for a short while); without a directory there are no groups, so only the
listed users are admitted.

IPv4 and IPv6 ranges are handled alike with :mod:`ipaddress`: the network
address, the IPv4 broadcast address and the gateway are never handed out.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import Table, delete, func, select
from sqlalchemy.orm import Session

from usher.controller.models import IpRange, Lease
from usher.controller.providers import Placement, Provider, Row
from usher.controller.state import VmRec
from usher.errors import (
    AlreadyExists,
    Conflict,
    InvalidOption,
    NoCapacity,
    NotFound,
    PermissionDenied,
    UsherError,
)

log = logging.getLogger(__name__)

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IP_INTERFACES = (ipaddress.IPv4Interface, ipaddress.IPv6Interface)

_LEASES: Table = Lease.__table__  # type: ignore[assignment]
_RANGE_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
EVERYONE = "*"
IP_COMMAND_TIMEOUT_S = 5.0


@dataclass(slots=True)
class RangeRec:
    """One IP range as the provider holds it."""

    name: str
    network: Network
    gateway: Address | None = None
    vlan: int | None = None
    is_default: bool = False
    users: frozenset[str] = frozenset({EVERYONE})
    groups: frozenset[str] = frozenset()
    taken: set[Address] = field(default_factory=set)
    # Every address below this one (as an int) is taken or unusable: the
    # search for the lowest free address starts here, not at the bottom.
    cursor: int = 0

    def take(self, addr: Address) -> None:
        self.taken.add(addr)

    def give_back(self, addr: Address) -> None:
        self.taken.discard(addr)
        self.cursor = min(self.cursor, int(addr))

    def allows(self, user: str, groups: frozenset[str] = frozenset()) -> bool:
        return EVERYONE in self.users or user in self.users or bool(self.groups & groups)

    def usable(self, addr: Address) -> bool:
        """True if ``addr`` may be given to a VM (leased or not)."""
        net = self.network
        if addr not in net or addr == self.gateway:
            return False
        if net.num_addresses <= 2:  # /31, /32, /127, /128: every address is a host
            return True
        if addr == net.network_address:
            return False
        return net.version == 6 or addr != net.broadcast_address


def range_rec(row: IpRange) -> RangeRec:
    access = json.loads(row.access or "{}")
    return RangeRec(name=row.name, network=ipaddress.ip_network(row.cidr),
                    gateway=ipaddress.ip_address(row.gateway) if row.gateway else None,
                    vlan=row.vlan, is_default=row.is_default,
                    users=frozenset(access.get("users", [])),
                    groups=frozenset(access.get("groups", [])))


class IpamProvider(Provider):
    """Gives each new VM an address of its range; see the module docstring."""

    name = "ipam"
    vm_tables = (_LEASES,)

    def __init__(self) -> None:
        self.ranges: dict[str, RangeRec] = {}
        self._by_vm: dict[str, tuple[str, Address]] = {}  # vm uuid -> (range, address)

    # ------------------------------------------------------------ start-up
    def load(self, session: Session) -> None:
        """Read ranges and leases (start-up; the in-memory index is rebuilt)."""
        self.ranges = {r.name: range_rec(r) for r in session.scalars(select(IpRange))}
        self._by_vm.clear()
        for lease in session.scalars(select(Lease)):
            self._hold(lease.vm_uuid, lease.range_name, ipaddress.ip_address(lease.address))

    def set_ranges(self, rows: list[IpRange]) -> None:
        """Replace the ranges (a reload, on the loop); leases stay as they are."""
        self.ranges = {r.name: range_rec(r) for r in rows}
        for range_name, addr in self._by_vm.values():
            rng = self.ranges.get(range_name)
            if rng is not None:
                rng.taken.add(addr)

    def _hold(self, vm_uuid: str, range_name: str, addr: Address) -> None:
        self._by_vm[vm_uuid] = (range_name, addr)
        rng = self.ranges.get(range_name)
        if rng is not None:
            rng.taken.add(addr)

    # ------------------------------------------------------------ provider
    def reserve(self, placement: Placement) -> None:
        vm = placement.vm
        rng = self._range_for(placement.ip_range, placement.ip)
        if rng is None:
            return
        if not rng.allows(vm.owner, placement.groups):
            raise PermissionDenied(f"{vm.owner} may not use IP range {rng.name}; "
                                   f"ask the site admin")
        addr = self._requested(rng, placement.ip) if placement.ip else self._lowest_free(rng)
        self._hold(vm.uuid, rng.name, addr)
        vm.ip = str(addr)
        vm.vlan = rng.vlan

    def _range_for(self, name: str | None, ip: str | None) -> RangeRec | None:
        if name is not None:
            rng = self.ranges.get(name)
            if rng is None:
                raise InvalidOption(f"no IP range named {name}; ask the site admin for one")
            return rng
        for rng in self.ranges.values():
            if rng.is_default:
                return rng
        if ip is not None:
            raise InvalidOption("--ip needs --ip_range: the site has no default IP range")
        return None

    @staticmethod
    def _requested(rng: RangeRec, ip: str) -> Address:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            raise InvalidOption(f"--ip {ip} is not an IP address") from None
        if addr not in rng.network:
            raise InvalidOption(f"--ip {ip} is outside IP range {rng.name} ({rng.network})")
        if not rng.usable(addr):
            raise InvalidOption(f"--ip {ip} is the network, broadcast or gateway address "
                                f"of IP range {rng.name}")
        if addr in rng.taken:
            raise InvalidOption(f"--ip {ip} is already leased; choose another or leave "
                                f"out --ip")
        return addr

    @staticmethod
    def _lowest_free(rng: RangeRec) -> Address:
        # The walk starts at the range's cursor (everything below it is taken),
        # so a burst of N starts costs N steps, not N times the leases; it
        # never materialises a /64.
        net = rng.network
        make = ipaddress.IPv4Address if net.version == 4 else ipaddress.IPv6Address
        last = int(net.broadcast_address)
        at = max(rng.cursor, int(net.network_address))
        while at <= last:
            addr = make(at)
            if addr not in rng.taken and rng.usable(addr):
                rng.cursor = at
                return addr
            at += 1
        rng.cursor = at
        raise NoCapacity(f"IP range {rng.name} ({rng.network}) has no free address; "
                         f"destroy VMs or use another --ip_range",
                         details={"short": "addresses", "range": rng.name})

    def rows(self, vm: VmRec) -> list[tuple[Table, Row]]:
        held = self._by_vm.get(vm.uuid)
        if held is None:
            return []
        return [(_LEASES, dict(address=str(held[1]), range_name=held[0], vm_uuid=vm.uuid,
                               created=time.time()))]

    def release(self, vm: VmRec) -> None:
        held = self._by_vm.pop(vm.uuid, None)
        if held is None:
            return
        rng = self.ranges.get(held[0])
        if rng is not None:
            rng.give_back(held[1])
        if vm.ip == str(held[1]):
            vm.ip = None
            vm.vlan = None

    def needs_groups(self, range_name: str | None, user: str) -> bool:
        """True if admitting ``user`` to the range a start would use depends on groups."""
        try:
            rng = self._range_for(range_name, None)
        except UsherError:
            return False  # reserve reports it
        return rng is not None and bool(rng.groups) and not rng.allows(user)

    def network_of(self, vm_uuid: str) -> tuple[int | None, str | None]:
        """(prefix length, gateway) of the range ``vm_uuid`` has its address from."""
        held = self._by_vm.get(vm_uuid)
        rng = self.ranges.get(held[0]) if held is not None else None
        if rng is None:
            return None, None
        return rng.network.prefixlen, str(rng.gateway) if rng.gateway else None

    def vlan_of(self, vm_uuid: str) -> int | None:
        """The VLAN of the range ``vm_uuid`` has its address from (None: untagged or none)."""
        held = self._by_vm.get(vm_uuid)
        rng = self.ranges.get(held[0]) if held is not None else None
        return rng.vlan if rng is not None else None

    def leased(self, vm_uuid: str) -> str | None:
        held = self._by_vm.get(vm_uuid)
        return str(held[1]) if held else None


# ---------------------------------------------------------- administration
def host_networks() -> list[Interface]:
    """This machine's own addresses with their subnets, from ``ip -j addr``.

    iproute2's JSON output is stable and needs no extra dependency; a
    machine without it (or where it fails) reports nothing, with a warning.
    """
    nets: list[Interface] = []
    for family in ("-4", "-6"):
        try:
            out = subprocess.run(["ip", "-j", family, "addr"], capture_output=True, text=True,
                                 timeout=IP_COMMAND_TIMEOUT_S, check=True).stdout
            links = json.loads(out or "[]")
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            log.warning("cannot read this machine's addresses (ip %s addr): %s", family, exc)
            continue
        for link in links:
            for info in link.get("addr_info", []):
                try:
                    nets.append(ipaddress.ip_interface(f"{info['local']}/{info['prefixlen']}"))
                except (KeyError, ValueError):
                    continue
    return nets


def parse_range(name: str, cidr: str, gateway: str | None,
                own: Sequence[Network | Interface]) -> tuple[Network, Address | None]:
    """Check a new range's name, CIDR and gateway; returns (network, gateway)."""
    if not _RANGE_NAME.match(name):
        raise InvalidOption(f"bad range name {name!r}: use lower-case letters, digits, "
                            f"'.', '_' and '-'")
    try:
        net = ipaddress.ip_network(cidr, strict=True)
    except ValueError as exc:
        raise InvalidOption(f"bad CIDR {cidr!r}: {exc}") from None
    if gateway is None:
        # By convention the first host address is the gateway.
        gw = ipaddress.ip_address(net.network_address + 1) if net.num_addresses > 2 else None
    else:
        try:
            gw = ipaddress.ip_address(gateway)
        except ValueError:
            raise InvalidOption(f"bad gateway {gateway!r}: not an IP address") from None
        if gw not in net:
            raise InvalidOption(f"gateway {gw} is outside {net}")
    for mine in own:
        subnet = mine.network if isinstance(mine, IP_INTERFACES) else mine
        if subnet.version != net.version or not subnet.overlaps(net):
            continue
        # The one overlap allowed: this machine is the range's own gateway on
        # exactly that subnet (the VMs' bridge here, e.g. a libvirt network).
        if isinstance(mine, IP_INTERFACES) and subnet == net and mine.ip == gw:
            continue
        raise Conflict(f"{net} overlaps {subnet}, a subnet of this machine; "
                       f"choose another range")
    return net, gw


def add_range(session: Session, name: str, cidr: str, *, gateway: str | None = None,
              vlan: int | None = None, default: bool = False, allow: list[str] | None = None,
              allow_groups: list[str] | None = None,
              own: Sequence[Network | Interface] | None = None) -> IpRange:
    """Add a range (admin CLI); refuses overlaps with this machine and other ranges.

    ``allow`` names users (``*``: everyone), ``allow_groups`` site-cluster
    groups; with neither, everyone may use the range; with groups only, only
    their members.
    """
    net, gw = parse_range(name, cidr, gateway, own or [])
    if vlan is not None and not 1 <= vlan <= 4094:
        raise InvalidOption(f"--vlan {vlan} is out of range; give 1 to 4094")
    if session.get(IpRange, name) is not None:
        raise AlreadyExists(f"an IP range named {name} exists")
    for other in session.scalars(select(IpRange)):
        theirs = ipaddress.ip_network(other.cidr)
        if theirs.version == net.version and theirs.overlaps(net):
            raise Conflict(f"{net} overlaps IP range {other.name} ({theirs})")
        if default and other.is_default:
            other.is_default = False
    row = IpRange(name=name, cidr=str(net), gateway=str(gw) if gw else None, vlan=vlan,
                  family=net.version, is_default=default,
                  access=json.dumps({"users": sorted(set(allow or ([] if allow_groups
                                                                   else [EVERYONE]))),
                                     "groups": sorted(set(allow_groups or []))}),
                  created=time.time())
    session.add(row)
    return row


def list_ranges(session: Session) -> list[tuple[IpRange, int]]:
    """Every range with its number of leases."""
    counts: dict[str, int] = {name: n for name, n in session.execute(
        select(Lease.range_name, func.count()).group_by(Lease.range_name))}
    return [(r, counts.get(r.name, 0))
            for r in session.scalars(select(IpRange).order_by(IpRange.name))]


def delete_range(session: Session, name: str) -> None:
    """Delete a range that has no leases."""
    if session.get(IpRange, name) is None:
        raise NotFound(f"no IP range named {name}; see 'range list'")
    leases = session.scalar(select(func.count()).select_from(Lease)
                            .where(Lease.range_name == name)) or 0
    if leases:
        raise Conflict(f"IP range {name} has {leases} leases; destroy those VMs first")
    session.execute(delete(IpRange).where(IpRange.name == name))
