"""Placement: fit memory and vcpus, most free memory first, clear shortage errors."""

from __future__ import annotations

import pytest

from usher.controller.providers import Placement, PlacementProvider, Provider, ProviderChain
from usher.controller.state import HostRec, Registry, VmRec
from usher.errors import HostNotFound, HostUnavailable, NoCapacity


def _reg(*hosts: tuple[str, int, int, str]) -> Registry:
    reg = Registry()
    for name, cpus, mem, state in hosts:
        reg.add_host(HostRec(name=name, state=state, disabled=state == "disabled",
                             hypervisor="test", cpus=cpus, memory_mib=mem, connected=True))
    return reg


def _vm(reg: Registry, mem: int = 512, vcpus: int = 1, name: str = "a") -> VmRec:
    vm = VmRec(uuid=f"uuid-{name}", name=f"{name}.u.site", cluster="u.site", owner="u",
               host=None, state="pending", memory_mib=mem, vcpus=vcpus, mac="52:54:00:00:00:01")
    reg.add_vm(vm)
    return vm


def test_prefers_most_free_memory_and_charges_it() -> None:
    reg = _reg(("h1", 4, 4096, "up"), ("h2", 4, 8192, "up"))
    p = PlacementProvider(reg)
    vm = _vm(reg, 1024)
    p.reserve(Placement(vm=vm))
    assert vm.host == "h2"
    assert reg.hosts["h2"].used_memory_mib == 1024 and reg.hosts["h2"].vm_count == 1
    p.release(vm)
    p.release(vm)  # idempotent
    assert reg.hosts["h2"].used_memory_mib == 0 and vm.host is None


def test_skips_disabled_and_lost_hosts() -> None:
    reg = _reg(("h1", 4, 4096, "up"), ("h2", 4, 99999, "disabled"), ("h3", 4, 99999, "lost"))
    vm = _vm(reg)
    PlacementProvider(reg).reserve(Placement(vm=vm))
    assert vm.host == "h1"


def test_memory_shortage_names_memory() -> None:
    reg = _reg(("h1", 4, 1024, "up"))
    with pytest.raises(NoCapacity, match="2048 MiB") as err:
        PlacementProvider(reg).reserve(Placement(vm=_vm(reg, 2048)))
    assert err.value.details["short"] == "memory"


def test_vcpu_shortage_names_vcpus() -> None:
    reg = _reg(("h1", 2, 8192, "up"))
    with pytest.raises(NoCapacity, match="4 cpus") as err:
        PlacementProvider(reg).reserve(Placement(vm=_vm(reg, 256, 4)))
    assert err.value.details["short"] == "vcpus"


def test_no_host_up() -> None:
    reg = _reg(("h1", 2, 8192, "lost"))
    with pytest.raises(NoCapacity, match="no VMM is up"):
        PlacementProvider(reg).reserve(Placement(vm=_vm(reg)))


def test_vmm_pin() -> None:
    reg = _reg(("h1", 4, 4096, "up"), ("h2", 4, 8192, "up"), ("h3", 4, 8192, "disabled"))
    p = PlacementProvider(reg)
    vm = _vm(reg)
    p.reserve(Placement(vm=vm, vmm="h1"))
    assert vm.host == "h1"
    with pytest.raises(HostNotFound):
        p.reserve(Placement(vm=_vm(reg, name="b"), vmm="nope"))
    with pytest.raises(HostUnavailable, match="disabled"):
        p.reserve(Placement(vm=_vm(reg, name="c"), vmm="h3"))


def test_fills_up_then_refuses() -> None:
    reg = _reg(("h1", 4, 1000, "up"))
    p = PlacementProvider(reg)
    for i in range(4):
        p.reserve(Placement(vm=_vm(reg, 250, name=f"v{i}")))
    with pytest.raises(NoCapacity):
        p.reserve(Placement(vm=_vm(reg, 250, name="v5")))
    assert reg.hosts["h1"].free_memory_mib == 0


def test_chain_releases_earlier_providers_on_failure() -> None:
    reg = _reg(("h1", 4, 4096, "up"))

    class Refuses(Provider):
        name = "refuses"

        def reserve(self, placement: Placement) -> None:
            raise NoCapacity("no addresses left")

        def release(self, vm: VmRec) -> None:
            pass

    chain = ProviderChain([PlacementProvider(reg), Refuses()])
    vm = _vm(reg)
    with pytest.raises(NoCapacity, match="addresses"):
        chain.reserve(Placement(vm=vm))
    assert vm.host is None and reg.hosts["h1"].used_memory_mib == 0


def test_hold_charges_move_target() -> None:
    reg = _reg(("h1", 4, 4096, "up"), ("h2", 4, 4096, "up"))
    vm = _vm(reg, 1000)
    reg.move_vm(vm, "h1")
    reg.hold("h2", vm)
    assert reg.hosts["h2"].used_memory_mib == 1000
    reg.unhold("h2", vm)
    reg.unhold("h2", vm)
    assert reg.hosts["h2"].used_memory_mib == 0


def test_disconnected_host_is_not_placed_on() -> None:
    reg = _reg(("h1", 4, 4096, "up"), ("h2", 4, 8192, "up"))
    reg.hosts["h2"].connected = False  # registered before a restart, not back yet
    p = PlacementProvider(reg)
    vm = _vm(reg)
    p.reserve(Placement(vm=vm))
    assert vm.host == "h1"
    with pytest.raises(HostUnavailable, match="not connected"):
        p.reserve(Placement(vm=_vm(reg, name="b"), vmm="h2"))


def test_registry_tracks_macs() -> None:
    reg = _reg(("h1", 4, 4096, "up"))
    vm = _vm(reg)
    assert vm.mac in reg.macs
    reg.remove_vm(vm)
    assert vm.mac not in reg.macs


def test_a_preference_comes_before_free_memory() -> None:
    from usher.controller.migration import target_rank

    reg = _reg(("src", 4, 4096, "up"), ("big", 4, 65536, "up"), ("live", 4, 8192, "up"),
               ("shared", 4, 8192, "up"))
    for name in ("src", "live", "shared"):
        reg.hosts[name].live_migration = True
    reg.hosts["live"].migration_uri = "qemu+tcp://10.0.0.3/system"
    p = PlacementProvider(reg)
    vm = _vm(reg, 1024)
    running = target_rank("running", True, reg.hosts["src"])
    assert p.choose(vm, None, exclude={"src"}).name == "big"  # no preference: most free
    assert p.choose(vm, None, exclude={"src"}, prefer=running).name == "live"
    # Live on the store the VM's disk is on beats live with a copy of it.
    reg.hosts["shared"].migration_uri = "qemu+tcp://10.0.0.4/system"
    for name in ("src", "shared"):
        reg.hosts[name].shared_store, reg.hosts[name].store_id = "nfs", "a" * 32
    assert p.choose(vm, None, exclude={"src"}, prefer=running).name == "shared"
    for name in ("live", "shared"):
        reg.hosts[name].migration_uri = ""
    # Nobody can take it live: a cold restart where its disk is, else most free.
    assert p.choose(vm, None, exclude={"src"}, prefer=running).name == "shared"
    reg.hosts["shared"].shared_store = ""
    assert p.choose(vm, None, exclude={"src"},
                    prefer=target_rank("running", False, reg.hosts["src"])).name == "big"
