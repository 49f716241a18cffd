"""Resource providers: the parts of a task that reserve, commit and release.

A provider takes part in a VM's creation and destruction (DESIGN section 6).
``reserve`` runs on the event loop with no ``await``: it decides and records
its decision in the :class:`Placement` being built, atomically with the
checks before it. ``commit`` runs when the VM exists; ``release`` undoes a
reservation, on failure or on destroy, and must be safe to call twice. A
provider that cannot reserve raises an :class:`UsherError` and every provider
that had reserved before it is released, so a failed start leaves nothing
behind. A provider that must journal something with the VM contributes rows
through ``rows`` (written in the same transaction as the VM's row) and names
in ``vm_tables`` the tables whose rows go with the VM when it is removed;
``removal_rows`` are written in the transaction that removes it (an outbox
entry, say).

Placement fits memory and vcpus, prefers the host with the most free memory,
honours ``--vmm``, keeps a VM whose IP range has a VLAN on hosts that carry
that VLAN, and says which resource is short when nothing fits. (ipam runs
before it, so the VM's range, and with it the VLAN, is known.)
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Table

from usher.controller.state import HostRec, Registry, VmRec
from usher.errors import HostNotFound, HostUnavailable, NoCapacity

Row = dict[str, Any]
"""A row as a plain dict, for a Core INSERT."""


@dataclass(slots=True)
class Placement:
    """What the providers decided for one new (or moving) VM."""

    vm: VmRec
    vmm: str | None = None  # host asked for by the caller
    host: str | None = None  # chosen host
    exclude: frozenset[str] = frozenset()
    ip_range: str | None = None  # --ip_range
    ip: str | None = None  # --ip
    rr: bool = False  # --rr
    groups: frozenset[str] = frozenset()  # the owner's directory groups, when needed
    notes: dict[str, str] = field(default_factory=dict)


class Provider(abc.ABC):
    """One resource a VM needs; see the module docstring for the contract."""

    name: str
    vm_tables: tuple[Table, ...] = ()
    """Tables whose rows (keyed by a ``vm_uuid`` column) are deleted with the VM."""

    @abc.abstractmethod
    def reserve(self, placement: Placement) -> None:
        """Reserve the resource for ``placement.vm``; raise an UsherError if impossible."""

    def commit(self, vm: VmRec) -> None:  # noqa: B027 - optional hook
        """The transaction that made ``vm`` (with :meth:`rows`) has committed: the VM
        now exists in SQL, and what was reserved for it may act (default: nothing)."""

    def rows(self, vm: VmRec) -> list[tuple[Table, Row]]:
        """Rows to insert in the same transaction as new VM ``vm``'s row (default: none)."""
        return []

    def removal_rows(self, vm: VmRec) -> list[tuple[Table, Row]]:
        """Rows to insert in the transaction that removes ``vm`` (default: none)."""
        return []

    @abc.abstractmethod
    def release(self, vm: VmRec) -> None:
        """Undo the reservation for ``vm``; idempotent."""


class PlacementProvider(Provider):
    """Chooses the host: fit memory and vcpus, most free memory first."""

    name = "placement"

    def __init__(self, registry: Registry) -> None:
        self._reg = registry

    def reserve(self, placement: Placement) -> None:
        best = self.choose(placement.vm, placement.vmm, placement.exclude)
        placement.host = best.name
        self._reg.move_vm(placement.vm, best.name)

    def choose(self, vm: VmRec, vmm: str | None, exclude: Iterable[str] = (),
               prefer: Callable[[HostRec], int] | None = None) -> HostRec:
        """The host ``vm`` should go to; raises if none fits. Changes nothing.

        Among the hosts that fit, those ``prefer`` ranks higher come first (a
        running VM's migration prefers targets that can take it live).
        """
        hosts = self._reg.hosts
        vlan = vm.vlan
        if vmm is not None:
            host = hosts.get(vmm)
            if host is None:
                raise HostNotFound(f"no VMM named {vmm}; see vmm_list")
            if host.state != "up" or not host.connected:
                what = host.state if host.state != "up" else "not connected"
                raise HostUnavailable(f"VMM {host.name} is {what}; choose another "
                                      f"or leave out --vmm")
            if vlan is not None and vlan not in host.vlans:
                raise NoCapacity(f"VMM {host.name} does not carry VLAN {vlan}, the VLAN of "
                                 f"the VM's IP range; choose a VMM that does (vmm_list) or "
                                 f"leave out --vmm", details={"short": "vlan", "vlan": vlan})
            candidates = [host]
        else:
            skip = set(exclude)
            candidates = [h for h in hosts.values()
                          if h.state == "up" and h.connected and h.name not in skip]
            if not candidates:
                raise NoCapacity("no VMM is up to take the VM; see vmm_list",
                                 details={"short": "hosts"})
            if vlan is not None:
                candidates = [h for h in candidates if vlan in h.vlans]
                if not candidates:
                    raise NoCapacity(f"no VMM that is up carries VLAN {vlan}, the VLAN of "
                                     f"the VM's IP range; use another --ip_range or ask the "
                                     f"site admin", details={"short": "vlan", "vlan": vlan})
        fitting = [h for h in candidates if h.free_memory_mib >= vm.memory_mib
                   and h.cpus >= vm.vcpus]
        if not fitting:
            raise self._shortage(vm, candidates)
        liked = prefer or (lambda _h: 0)
        return max(fitting, key=lambda h: (liked(h), h.free_memory_mib, h.name))

    @staticmethod
    def _shortage(vm: VmRec, candidates: list[HostRec]) -> NoCapacity:
        most_mem = max(h.free_memory_mib for h in candidates)
        most_cpus = max(h.cpus for h in candidates)
        if most_mem < vm.memory_mib:
            return NoCapacity(
                f"no VMM has {vm.memory_mib} MiB of memory free (most free: {most_mem} MiB); "
                f"ask for less with --ram or destroy VMs",
                details={"short": "memory", "wanted": vm.memory_mib, "most_free": most_mem})
        if most_cpus < vm.vcpus:
            return NoCapacity(
                f"no VMM has {vm.vcpus} cpus (largest: {most_cpus}); ask for fewer with --vcpus",
                details={"short": "vcpus", "wanted": vm.vcpus, "largest": most_cpus})
        return NoCapacity(
            f"no single VMM has both {vm.memory_mib} MiB free and {vm.vcpus} cpus",
            details={"short": "memory+vcpus"})

    def release(self, vm: VmRec) -> None:
        if vm.host is not None:
            self._reg.move_vm(vm, None)


class ProviderChain:
    """Runs providers in order; a failure releases those that had reserved."""

    def __init__(self, providers: list[Provider]) -> None:
        self.providers = providers

    def reserve(self, placement: Placement) -> None:
        done: list[Provider] = []
        try:
            for provider in self.providers:
                provider.reserve(placement)
                done.append(provider)
        except BaseException:
            for provider in reversed(done):
                provider.release(placement.vm)
            raise

    def rows(self, vm: VmRec) -> list[tuple[Table, Row]]:
        return [row for provider in self.providers for row in provider.rows(vm)]

    def removal_rows(self, vm: VmRec) -> list[tuple[Table, Row]]:
        return [row for provider in self.providers for row in provider.removal_rows(vm)]

    @property
    def vm_tables(self) -> list[Table]:
        return [t for provider in self.providers for t in provider.vm_tables]

    def commit(self, vm: VmRec) -> None:
        for provider in self.providers:
            provider.commit(vm)

    def release(self, vm: VmRec) -> None:
        for provider in reversed(self.providers):
            provider.release(vm)
