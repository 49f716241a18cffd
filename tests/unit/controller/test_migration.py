"""How a VM moves between hosts: the policy of usher.controller.migration."""

from __future__ import annotations

import pytest

from usher.controller.migration import (
    COLD,
    DISK,
    LIVE,
    migration_kind,
    shares_store,
    target_rank,
    uses_tls,
)
from usher.controller.state import HostRec
from usher.errors import MigrationUnsupported


def host(name: str, *, live: bool = True, uri: str = "qemu+tls://{name}/system",
         store: str = "", store_id: str = "") -> HostRec:
    return HostRec(name=name, state="up", disabled=False, hypervisor="qemu:///system", cpus=4,
                   memory_mib=8192, live_migration=live, migration_uri=uri.format(name=name),
                   shared_store=store, store_id=store_id)


A, B = host("vmm1"), host("vmm2")


@pytest.mark.parametrize(("state", "disk", "kind"), [
    ("running", True, LIVE), ("paused", True, LIVE), ("running", False, LIVE),
    ("stopped", True, DISK), ("stopped", False, COLD),
])
def test_hosts_that_migrate_live(state: str, disk: bool, kind: str) -> None:
    assert migration_kind(state, disk, A, B) == kind


@pytest.mark.parametrize(("source", "target", "why"), [
    (host("fake1", live=False), B, "VMM fake1 cannot migrate live"),
    (A, host("fake2", live=False), "VMM fake2 cannot migrate live"),
    (A, host("vmm3", uri=""), "VMM vmm3 has no migration_uri"),
])
def test_without_live_migration_only_vms_without_a_disk_move(
        source: HostRec, target: HostRec, why: str) -> None:
    for state in ("running", "paused", "stopped"):
        assert migration_kind(state, False, source, target) == COLD
        with pytest.raises(MigrationUnsupported, match=why) as caught:
            migration_kind(state, True, source, target)
        assert f"cannot move the disk of a {state} VM from {source.name} to {target.name}" \
            in caught.value.message


SHARED_ID, OTHER_ID = "a" * 32, "b" * 32


def test_hosts_share_a_store_they_both_name_and_both_see() -> None:
    nfs1, nfs2 = host("vmm1", store="nfs", store_id=SHARED_ID), host("vmm2", store="nfs",
                                                                       store_id=SHARED_ID)
    assert shares_store(nfs1, nfs2)
    assert not shares_store(nfs1, host("vmm3", store="nfs", store_id=OTHER_ID))  # not mounted
    assert not shares_store(nfs1, host("vmm3", store="gluster", store_id=OTHER_ID))
    assert not shares_store(host("vmm3"), host("vmm4"))  # own stores, no ids yet


def test_between_hosts_of_one_shared_store_a_disk_never_moves() -> None:
    a, b = host("vmm1", store="nfs", store_id=SHARED_ID), host("vmm2", store="nfs",
                                                               store_id=SHARED_ID)
    assert migration_kind("running", True, a, b) == LIVE  # without copying (see _by_libvirt)
    assert migration_kind("stopped", True, a, b) == COLD  # define there, undefine here
    # Hosts that cannot migrate live move a VM with a disk cold (it is restarted).
    fa, fb = (host(n, live=False, store="nfs", store_id=SHARED_ID) for n in ("f1", "f2"))
    for state in ("running", "paused", "stopped"):
        assert migration_kind(state, True, fa, fb) == COLD


def test_one_store_that_the_hosts_do_not_both_name_as_shared_is_refused() -> None:
    # Copying would make the target's empty overlay over the VM's own disk.
    for a, b in ((host("vmm1", store_id=SHARED_ID), host("vmm2", store_id=SHARED_ID)),
                 (host("vmm1", store="nfs", store_id=SHARED_ID),
                  host("vmm2", store="nfs2", store_id=SHARED_ID))):
        for state in ("running", "stopped"):
            with pytest.raises(MigrationUnsupported, match="same image store, but do not both "
                                                           "name it as their shared_store"):
                migration_kind(state, True, a, b)
        assert migration_kind("running", False, a, b) == LIVE  # no disk: nothing to lose


def test_the_scheduler_ranks_targets_by_what_the_move_costs() -> None:
    src = host("vmm1", store="nfs", store_id=SHARED_ID)
    live_shared = host("vmm2", store="nfs", store_id=SHARED_ID)
    live_own = host("vmm3", store_id=OTHER_ID)
    cold_shared = host("f1", live=False, store="nfs", store_id=SHARED_ID)
    cold_own = host("f2", live=False)
    unnamed_same = host("vmm4", store_id=SHARED_ID)  # one store, not declared shared

    def ranks(state: str, disk: bool) -> list[int]:
        rank = target_rank(state, disk, src)
        return [rank(h) for h in (live_shared, live_own, cold_shared, cold_own, unnamed_same)]

    # Running: live without a copy, live with one, a cold restart, refused.
    assert ranks("running", True) == [3, 2, 1, 0, 0]
    assert ranks("running", False) == [2, 2, 1, 1, 2]
    # Stopped with a disk: nothing moves, the disk moves, refused.
    assert ranks("stopped", True) == [2, 1, 2, 0, 0]
    assert ranks("stopped", False) == [1, 1, 1, 1, 1]
    # Every rank above 0 is a move migration_kind accepts; 0, one it refuses.
    for state in ("running", "stopped"):
        for disk in (True, False):
            rank = target_rank(state, disk, src)
            for target in (live_shared, live_own, cold_shared, cold_own, unnamed_same):
                if rank(target) > 0:
                    migration_kind(state, disk, src, target)
                else:
                    with pytest.raises(MigrationUnsupported):
                        migration_kind(state, disk, src, target)


def test_the_target_uri_decides_on_encrypting_the_data() -> None:
    assert uses_tls("qemu+tls://vmm2.example.org/system")
    assert not uses_tls("qemu+tcp://10.0.0.2/system")
    assert not uses_tls("qemu+ssh://root@vmm2/system")
