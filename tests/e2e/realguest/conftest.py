"""Fixtures for tests that boot the real tiny guest: built once, libvirtd ensured once.

These tests boot one guest at a time (under TCG each guest takes a core) and
stop everything they start. They skip only when a prerequisite that
``./scripts/setup`` cannot provide is missing: root, or access to a Debian
mirror while no kernel package is cached yet.

``libvirt_hosts`` gives several libvirtd hosts in network namespaces on one
machine (see :mod:`tests.e2e.realguest.hosts`), for live migration.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from tests.e2e.realguest.hosts import HostCluster
from usher.errors import Unavailable
from usher.lnm.libvirtd import SYSTEM_URI, ensure_libvirtd, libvirtd_problem, stop_libvirtd
from usher.lnm.tinyguest import DEFAULT_CACHE_DIR, TinyGuest, build_tiny_guest


@pytest.fixture(scope="session")
def tiny_guest() -> TinyGuest:
    """The tiny guest from the shared cache (readable by libvirt-qemu), built if needed."""
    if os.geteuid() != 0:
        pytest.skip(f"real-guest tests run as root (they write {DEFAULT_CACHE_DIR}, "
                    "start libvirtd and fix /dev/kvm)")
    try:
        return build_tiny_guest(DEFAULT_CACHE_DIR, timeout_s=120)
    except Unavailable as e:
        if not any((DEFAULT_CACHE_DIR / "debs").glob("*.deb")):
            pytest.skip(f"no Debian mirror to fetch the guest kernel from, none cached: {e}")
        raise


@pytest.fixture(scope="session")
def system_libvirt(tiny_guest: TinyGuest) -> Iterator[libvirt.virConnect]:
    """A connection to qemu:///system; libvirtd is started if needed, and then stopped."""
    was_running = libvirtd_problem(SYSTEM_URI) is None
    ensure_libvirtd(timeout_s=60)
    conn = libvirt.open(SYSTEM_URI)
    try:
        yield conn
    finally:
        conn.close()
        if not was_running:
            stop_libvirtd()


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A temporary directory libvirt-qemu can enter (pytest's tmp_path is 0700 root)."""
    path = Path(tempfile.mkdtemp(prefix="usher-rg-", dir="/var/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def libvirt_hosts(tiny_guest: TinyGuest) -> Iterator[HostCluster]:
    """Three libvirtd hosts on one L2 segment, each in its own namespaces; all
    removed afterwards, also when a test fails."""
    missing = [tool for tool in ("ip", "nsenter", "unshare", "libvirtd", "virtlogd", "qemu-io")
               if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: run ./scripts/setup")
    with HostCluster(3) as cluster:
        yield cluster
