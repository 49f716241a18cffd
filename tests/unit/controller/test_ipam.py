"""IP address management: allocation order, --ip checks, exhaustion, access, release."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from usher.controller import db as dbmod
from usher.controller import ipam
from usher.controller.ipam import IpamProvider, RangeRec
from usher.controller.models import Lease
from usher.controller.providers import Placement
from usher.controller.state import VmRec
from usher.errors import AlreadyExists, Conflict, InvalidOption, NoCapacity, PermissionDenied


def _ipam(cidr: str = "10.9.0.0/29", *, name: str = "lab", gateway: str | None = "10.9.0.1",
          users: frozenset[str] = frozenset({"*"}), default: bool = True) -> IpamProvider:
    p = IpamProvider()
    p.ranges[name] = RangeRec(name=name, network=ipaddress.ip_network(cidr),
                              gateway=ipaddress.ip_address(gateway) if gateway else None,
                              is_default=default, users=users)
    return p


def _vm(name: str = "a", owner: str = "u") -> VmRec:
    return VmRec(uuid=f"uuid-{name}", name=f"{name}.{owner}.site", cluster=f"{owner}.site",
                 owner=owner, host=None, state="pending", memory_mib=64, vcpus=1,
                 mac="52:54:00:00:00:01")


def test_lowest_free_skips_network_gateway_and_broadcast() -> None:
    p = _ipam()
    got = []
    for i in range(5):  # /29: .1 gateway, .2 to .6 usable, .7 broadcast
        vm = _vm(f"v{i}")
        p.reserve(Placement(vm=vm))
        got.append(vm.ip)
    assert got == [f"10.9.0.{i}" for i in range(2, 7)]
    with pytest.raises(NoCapacity, match="IP range lab") as err:
        p.reserve(Placement(vm=_vm("full")))
    assert err.value.details["range"] == "lab"


def test_release_frees_the_address_and_is_idempotent() -> None:
    p = _ipam()
    a, b = _vm("a"), _vm("b")
    p.reserve(Placement(vm=a))
    p.reserve(Placement(vm=b))
    p.release(a)
    p.release(a)
    assert a.ip is None and p.leased(a.uuid) is None
    c = _vm("c")
    p.reserve(Placement(vm=c))
    assert c.ip == "10.9.0.2"


def test_requested_ip_is_checked() -> None:
    p = _ipam()
    vm = _vm()
    p.reserve(Placement(vm=vm, ip="10.9.0.5"))
    assert vm.ip == "10.9.0.5"
    for bad, why in (("10.9.0.5", "already leased"), ("10.9.1.5", "outside"),
                     ("10.9.0.1", "gateway"), ("10.9.0.0", "network"),
                     ("10.9.0.7", "broadcast"), ("nonsense", "not an IP address")):
        with pytest.raises(InvalidOption, match=why):
            p.reserve(Placement(vm=_vm("x"), ip=bad))
    assert p.leased("uuid-x") is None


def test_named_range_default_and_no_range() -> None:
    p = _ipam(default=False)
    vm = _vm()
    p.reserve(Placement(vm=vm))
    assert vm.ip is None  # no default range: no address
    with pytest.raises(InvalidOption, match="no IP range named other"):
        p.reserve(Placement(vm=_vm("b"), ip_range="other"))
    with pytest.raises(InvalidOption, match="--ip needs --ip_range"):
        p.reserve(Placement(vm=_vm("c"), ip="10.9.0.3"))
    named = _vm("d")
    p.reserve(Placement(vm=named, ip_range="lab"))
    assert named.ip == "10.9.0.2"


def test_access_list_names_users() -> None:
    p = _ipam(users=frozenset({"seuss"}))
    ok = _vm("a", owner="seuss")
    p.reserve(Placement(vm=ok))
    assert ok.ip == "10.9.0.2"
    with pytest.raises(PermissionDenied, match="horton may not use IP range lab"):
        p.reserve(Placement(vm=_vm("b", owner="horton")))


def test_access_list_groups() -> None:
    p = _ipam(users=frozenset())
    p.ranges["lab"].groups = frozenset({"gpu"})
    assert p.needs_groups(None, "seuss") and p.needs_groups("lab", "seuss")
    member = _vm("a", owner="seuss")
    p.reserve(Placement(vm=member, groups=frozenset({"gpu", "other"})))
    assert member.ip == "10.9.0.2"
    # Without the group (or without a directory to say so) the range is closed.
    with pytest.raises(PermissionDenied, match="horton may not use IP range lab"):
        p.reserve(Placement(vm=_vm("b", owner="horton"), groups=frozenset({"other"})))
    with pytest.raises(PermissionDenied):
        p.reserve(Placement(vm=_vm("c", owner="horton")))
    open_range = _ipam()
    assert not open_range.needs_groups(None, "horton")


def test_lowest_free_resumes_at_the_cursor_and_reuses_freed_addresses() -> None:
    p = _ipam("10.9.0.0/24")
    vms = [_vm(str(i)) for i in range(5)]
    for vm in vms:
        p.reserve(Placement(vm=vm))
    assert [vm.ip for vm in vms] == [f"10.9.0.{i}" for i in range(2, 7)]
    p.release(vms[1])
    again = _vm("again")
    p.reserve(Placement(vm=again))
    assert again.ip == "10.9.0.3"
    nxt = _vm("next")
    p.reserve(Placement(vm=nxt))
    assert nxt.ip == "10.9.0.7"


def test_ipv6_range() -> None:
    p = _ipam("fd00:9::/120", gateway="fd00:9::1")
    vm = _vm()
    p.reserve(Placement(vm=vm))
    assert vm.ip == "fd00:9::2"


def test_rows_carry_the_lease() -> None:
    p = _ipam()
    vm = _vm()
    assert p.rows(vm) == []
    p.reserve(Placement(vm=vm))
    [(table, row)] = p.rows(vm)
    assert table.name == "leases"
    assert (row["address"], row["range_name"], row["vm_uuid"]) == ("10.9.0.2", "lab", vm.uuid)


def test_admin_add_list_delete_and_load(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'u.db'}"
    dbmod.upgrade(url)
    db = dbmod.Database(dbmod.make_engine(url))
    own = [ipaddress.ip_network("127.0.0.0/8")]
    try:
        with pytest.raises(InvalidOption, match="bad CIDR"):
            db.run_sync(lambda s: ipam.add_range(s, "x", "10.1.0.1/24", own=own))
        with pytest.raises(Conflict, match="this machine"):
            db.run_sync(lambda s: ipam.add_range(s, "x", "127.5.0.0/16", own=own))
        db.run_sync(lambda s: ipam.add_range(s, "lab", "10.1.0.0/24", default=True, own=own,
                                             allow=["seuss"]))
        with pytest.raises(AlreadyExists):
            db.run_sync(lambda s: ipam.add_range(s, "lab", "10.2.0.0/24", own=own))
        with pytest.raises(Conflict, match="overlaps IP range lab"):
            db.run_sync(lambda s: ipam.add_range(s, "lab2", "10.1.0.128/25", own=own))
        db.run_sync(lambda s: s.add(Lease(address="10.1.0.9", range_name="lab",
                                          vm_uuid="uuid-a", created=0.0)))
        [(row, leases)] = db.run_sync(ipam.list_ranges)
        assert (row.gateway, row.is_default, leases) == ("10.1.0.1", True, 1)
        p = IpamProvider()
        db.run_sync(p.load)
        assert p.leased("uuid-a") == "10.1.0.9"
        assert p.ranges["lab"].users == {"seuss"}
        with pytest.raises(Conflict, match="1 leases"):
            db.run_sync(lambda s: ipam.delete_range(s, "lab"))
    finally:
        db.close()


def test_overlap_with_this_machine_is_refused_unless_it_is_the_gateway() -> None:
    lan = ipaddress.ip_interface("10.40.0.17/16")  # the machine's own LAN
    bridge = ipaddress.ip_interface("10.87.0.1/16")  # the VMs' bridge, the range's gateway
    with pytest.raises(Conflict, match="a subnet of this machine"):
        ipam.parse_range("lab", "10.40.1.0/24", None, [lan])
    assert ipam.parse_range("demo", "10.87.0.0/16", None, [lan, bridge])[0] == \
        ipaddress.ip_network("10.87.0.0/16")
    with pytest.raises(Conflict):  # the machine there, but not as the gateway
        ipam.parse_range("demo", "10.87.0.0/16", "10.87.0.254", [bridge])
    with pytest.raises(Conflict):  # a wider subnet that only contains it
        ipam.parse_range("part", "10.87.4.0/24", None, [bridge])
