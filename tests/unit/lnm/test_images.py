"""The image store: fetch by URL, checksums, read-only bases, qcow2 overlays (real qemu-img)."""

from __future__ import annotations

import hashlib
import http.server
import json
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from usher.errors import AlreadyExists, ImageError, InvalidRequest, NotFound
from usher.lnm.images import Artifact, ImageStore

UUID = "6f1c5e2a-0d7b-4c1e-9a53-2b8e4f0c1d77"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "store", fetch_timeout_s=5)


@pytest.fixture
def qcow2(tmp_path: Path) -> Path:
    path = tmp_path / "src" / "base.qcow2"
    path.parent.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "16M"], check=True)
    return path


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A static HTTP server on 127.0.0.1 serving a temporary directory."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kw: object) -> None:
            super().__init__(*args, directory=str(root), **kw)  # type: ignore[arg-type]

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_file_image_is_fetched_once_checked_and_read_only(store: ImageStore,
                                                          qcow2: Path) -> None:
    data = qcow2.read_bytes()
    art = Artifact(url=f"file://{qcow2}", sha256=sha(data), format="qcow2")
    base = store.base(art)
    assert base.read_bytes() == data and base.stat().st_mode & 0o777 == 0o444
    qcow2.write_bytes(b"changed later")  # the cached copy is what is used
    assert store.base(art) == base and base.read_bytes() == data


def test_checksum_mismatch_and_missing_file_leave_nothing(store: ImageStore,
                                                          tmp_path: Path) -> None:
    f = tmp_path / "kernel"
    f.write_bytes(b"not what was registered")
    with pytest.raises(ImageError, match="failed its checksum"):
        store.base(Artifact(url=f"file://{f}", sha256=sha(b"something else")))
    with pytest.raises(NotFound, match="does not exist"):
        store.base(Artifact(url=f"file://{tmp_path}/nope", sha256=sha(b"")))
    assert list(store.base_dir.iterdir()) == []
    with pytest.raises(InvalidRequest, match="SHA-256"):
        store.base(Artifact(url=f"file://{f}", sha256="abc"))
    with pytest.raises(InvalidRequest, match="no image fetcher for ftp"):
        store.base(Artifact(url="ftp://example.org/x", sha256=sha(b"")))
    with pytest.raises(InvalidRequest, match="format"):
        store.base(Artifact(url=f"file://{f}", sha256=sha(b""), format="vmdk"))


def test_http_image_and_404(store: ImageStore, http_root: tuple[Path, str]) -> None:
    root, url = http_root
    (root / "initrd.gz").write_bytes(b"initrd bytes")
    base = store.base(Artifact(url=f"{url}/initrd.gz", sha256=sha(b"initrd bytes")))
    assert base.read_bytes() == b"initrd bytes"
    with pytest.raises(NotFound, match="HTTP 404"):
        store.base(Artifact(url=f"{url}/missing", sha256=sha(b"")))
    small = ImageStore(store.root, max_bytes=4)
    (root / "big").write_bytes(b"0123456789")
    with pytest.raises(ImageError, match="larger than 4 bytes"):
        small.base(Artifact(url=f"{url}/big", sha256=sha(b"0123456789")))


def test_overlay_is_qcow2_on_the_pinned_base_and_goes_with_the_vm(store: ImageStore,
                                                                   qcow2: Path) -> None:
    art = Artifact(url=f"file://{qcow2}", sha256=sha(qcow2.read_bytes()), format="qcow2")
    base = store.base(art)
    overlay = store.overlay(UUID, base, "qcow2")
    assert store.overlay(UUID, base, "qcow2") == overlay  # idempotent
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(overlay)],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["format"] == "qcow2" and info["backing-filename"] == str(base)
    assert info["backing-filename-format"] == "qcow2"
    assert store.remove_overlay(UUID) and not overlay.exists()
    assert not store.remove_overlay(UUID)  # twice: fine
    assert base.exists()  # the base stays


def test_a_qcow2_with_its_own_backing_file_is_refused(store: ImageStore, qcow2: Path,
                                                      tmp_path: Path) -> None:
    chained = tmp_path / "chained.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(qcow2), "-F", "qcow2",
                    str(chained)], check=True)
    with pytest.raises(ImageError, match="backing file of its own"):
        store.base(Artifact(url=f"file://{chained}", sha256=sha(chained.read_bytes()),
                            format="qcow2"))
    assert list(store.base_dir.iterdir()) == []


def test_incoming_overlay_is_fresh_on_this_hosts_base_with_the_sources_size(
        store: ImageStore, qcow2: Path, tmp_path: Path) -> None:
    art = Artifact(url=f"file://{qcow2}", sha256=sha(qcow2.read_bytes()), format="qcow2")
    source = ImageStore(tmp_path / "source", fetch_timeout_s=5)
    source.overlay(UUID, source.base(art), "qcow2")
    size = source.overlay_size(UUID)
    assert size == 16 << 20

    base = store.base(art)
    incoming = store.prepare_incoming(UUID, base, "qcow2", size)
    assert incoming == store.overlay_path(UUID)
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(incoming)],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["virtual-size"] == size and info["backing-filename"] == str(base)
    assert info["backing-filename-format"] == "qcow2"

    # A leftover (a VM here, or a failed migration's) is never reused.
    with pytest.raises(AlreadyExists):
        store.prepare_incoming(UUID, base, "qcow2", size)
    with pytest.raises(InvalidRequest):
        store.prepare_incoming("other", base, "vmdk", size)
    with pytest.raises(InvalidRequest):
        store.prepare_incoming("other", base, "qcow2", 0)
    with pytest.raises(NotFound):
        store.overlay_size("other")
    assert not store.overlay_path("other").exists()
