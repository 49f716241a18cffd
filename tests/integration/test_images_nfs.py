"""``nfs://`` images through the real image store, libnfs's tools and a real NFS server.

:class:`~tests.integration.nfs_server.Ganesha` serves a directory over NFSv4
on loopback; :class:`~usher.lnm.images.ImageStore` fetches from it with
``nfs-ls`` and ``nfs-cp`` as on a host, through the ``version=4&nfsport=``
URL arguments libnfs reads. One server serves the module; each test serves
files of its own names.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.nfs_server import Ganesha, require_nfs_tools
from usher.dns.named import free_port
from usher.errors import ImageError, InvalidRequest, NotFound, TimedOut
from usher.lnm.images import Artifact, ImageStore

UUID = "0b7e3c52-9d4f-4a61-8e2c-5f1a7d3b9c08"
FAST_S = 5.0
"""Upper bound of a failure that needs no timeout; it takes milliseconds."""
needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None,
                                    reason="overlays need qemu-img (Debian: qemu-utils)")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ganesha]:
    with Ganesha(tmp_path_factory.mktemp("ganesha")) as ganesha:
        yield ganesha


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "store", fetch_timeout_s=10)


def serve(server: Ganesha, name: str, data: bytes) -> Artifact:
    """``data`` as ``name`` in the export, and a raw artifact naming it by URL."""
    (server.export / name).write_bytes(data)
    return Artifact(url=server.url(name), sha256=sha(data))


def stored(store: ImageStore) -> list[Path]:
    """Everything in the store's base directory (partial files included)."""
    return sorted(store.base_dir.iterdir()) if store.base_dir.exists() else []


@needs_qemu_img
def test_an_nfs_disk_is_fetched_checked_read_only_and_gets_an_overlay(
        server: Ganesha, store: ImageStore) -> None:
    # Over 3 MiB with an odd tail: nfs-cp copies in 1 MiB reads.
    data = os.urandom((3 << 20) + 17)
    art = serve(server, "disk.raw", data)
    base = store.base(art)
    assert base == store.base_dir / art.sha256 and stored(store) == [base]
    assert base.read_bytes() == data and base.stat().st_mode & 0o777 == 0o444
    (server.export / "disk.raw").unlink()  # fetched once: the server is not asked again
    assert store.base(art) == base and base.read_bytes() == data

    overlay = store.overlay(UUID, base, "raw")
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(overlay)],
                                     capture_output=True, text=True, check=True,
                                     timeout=30).stdout)
    assert info["format"] == "qcow2" and info["backing-filename"] == str(base)
    assert info["backing-filename-format"] == "raw"


def test_a_wrong_checksum_is_refused_and_leaves_nothing(server: Ganesha,
                                                       store: ImageStore) -> None:
    art = serve(server, "changed.raw", b"not what was registered")
    wrong = Artifact(url=art.url, sha256=sha(b"what was registered"))
    with pytest.raises(ImageError, match="failed its checksum"):
        store.base(wrong)
    assert stored(store) == []


@pytest.mark.parametrize("path", ["export/nope.raw", "export/no-dir/disk.raw",
                                  "no-export/disk.raw"])
def test_a_missing_file_or_export_is_not_found(server: Ganesha, store: ImageStore,
                                              path: str) -> None:
    url = f"nfs://127.0.0.1/{path}?version=4&nfsport={server.port}"
    with pytest.raises(NotFound, match=rf"^image {re.escape(url)} does not exist on NFS "
                                       rf"server 127\.0\.0\.1 .*check the export and path"):
        store.base(Artifact(url=url, sha256=sha(b"")))
    assert stored(store) == []


def test_a_server_that_is_not_there_fails_fast(tmp_path: Path) -> None:
    require_nfs_tools("nfs-ls", "nfs-cp")
    store = ImageStore(tmp_path / "store", fetch_timeout_s=60)
    url = f"nfs://127.0.0.1/export/disk.raw?version=4&nfsport={free_port()}"
    started = time.monotonic()
    with pytest.raises(ImageError, match=r"^cannot reach NFS server 127\.0\.0\.1 for "
                                         rf"{re.escape(url)} .*nfsport="):
        store.base(Artifact(url=url, sha256=sha(b"")))
    assert time.monotonic() - started < FAST_S
    assert stored(store) == []


def test_a_server_that_never_answers_times_out(tmp_path: Path) -> None:
    require_nfs_tools("nfs-ls", "nfs-cp")
    store = ImageStore(tmp_path / "store", fetch_timeout_s=1)
    # The kernel accepts the connection into the backlog; nothing ever reads it.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        url = f"nfs://127.0.0.1/export/disk.raw?version=4&nfsport={silent.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(TimedOut, match="took longer than 1 s"):
            store.base(Artifact(url=url, sha256=sha(b"")))
        assert time.monotonic() - started < 1 + FAST_S
    assert stored(store) == []


def test_a_file_larger_than_max_bytes_is_refused_and_nothing_stays(
        server: Ganesha, tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "store", fetch_timeout_s=10, max_bytes=1000)
    assert store.base(serve(server, "just-fits.raw", b"x" * 1000)).stat().st_size == 1000
    fits = stored(store)

    big = serve(server, "big.raw", b"y" * 1001)
    with pytest.raises(ImageError, match=r"is larger than 1000 bytes \(1001 bytes\)"):
        store.base(big)
    # A symbolic link lists at its own size: the copy's size is checked too.
    (server.export / "big-link.raw").symlink_to("big.raw")
    with pytest.raises(ImageError, match=r"is larger than 1000 bytes \(1001 bytes\)"):
        store.base(Artifact(url=server.url("big-link.raw"), sha256=big.sha256))
    assert stored(store) == fits


@pytest.mark.parametrize(("url", "message"), [
    ("nfs:///export/disk.raw", "names no NFS server"),
    ("nfs://127.0.0.1", "names no export and file"),
    ("nfs://127.0.0.1/", "names no export and file"),
    ("nfs://127.0.0.1/disk.raw", "names no export and file"),
    ("nfs://127.0.0.1/export/", "names no export and file"),
    ("nfs://127.0.0.1:2049/export/disk.raw", r"give it as \?nfsport=2049"),
    ("nfs://root@127.0.0.1/export/disk.raw", "names a user"),
    ("nfs://127.0.0.1/export/disk.raw#part", "has a #fragment"),
    ("nfs://127.0.0.1/export/disk\n.raw", "control character"),
])
def test_malformed_nfs_urls_are_refused_up_front(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 url: str, message: str) -> None:
    # With no tools on PATH, a check made after looking for nfs-cp would say so instead.
    monkeypatch.setenv("PATH", str(tmp_path))
    store = ImageStore(tmp_path / "store")
    with pytest.raises(InvalidRequest, match=rf"^NFS image URL .*{message}"):
        store.base(Artifact(url=url, sha256=sha(b"")))
    assert stored(store) == []


def test_without_libnfs_utils_the_error_says_what_to_install(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    store = ImageStore(tmp_path / "store")
    with pytest.raises(ImageError, match="not installed on this host; install Debian's "
                                         "libnfs-utils"):
        store.base(Artifact(url="nfs://127.0.0.1/export/disk.raw", sha256=sha(b"")))
    assert stored(store) == []
