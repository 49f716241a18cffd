"""How a VM moves between hosts: the policy of usher.controller.migration."""

from __future__ import annotations

import pytest

from usher.controller.migration import COLD, DISK, LIVE, migration_kind, uses_tls
from usher.controller.state import HostRec
from usher.errors import MigrationUnsupported


def host(name: str, *, live: bool = True, uri: str = "qemu+tls://{name}/system") -> HostRec:
    return HostRec(name=name, state="up", disabled=False, hypervisor="qemu:///system", cpus=4,
                   memory_mib=8192, live_migration=live, migration_uri=uri.format(name=name))


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


def test_the_target_uri_decides_on_encrypting_the_data() -> None:
    assert uses_tls("qemu+tls://vmm2.example.org/system")
    assert not uses_tls("qemu+tcp://10.0.0.2/system")
    assert not uses_tls("qemu+ssh://root@vmm2/system")
