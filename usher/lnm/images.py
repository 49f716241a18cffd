"""Each host's image store: read-only base images fetched by URL, a qcow2 overlay per VM.

A site admin registers images with the controller (a URL and a SHA-256 for the
disk, the kernel and the initrd, and a pinned disk format); users only name
them. When a VM is defined, the node manager asks its :class:`ImageStore` for
the files: each artifact is fetched once by its URL scheme's fetcher
(``file``, ``http``, ``https``; more through :func:`register_fetcher`), checked
against its SHA-256 while it is written, and kept read-only under
``ROOT/base/<sha256>``, so every VM on the host that uses it shares one copy and
a changed file at the URL is caught, never used. A VM's disk is a qcow2 overlay
``ROOT/vms/<uuid>.qcow2`` on its base, made with the base's pinned format
(``-F``: formats are never guessed), and a base that is a qcow2 with a backing
file of its own is refused (no backing chains from outside). Destroying a VM
deletes its overlay, never a base.

Live migration without shared storage copies only the overlay's blocks
(libvirt's incremental storage copy) into an empty overlay that the target
made beforehand with :meth:`ImageStore.prepare_incoming`: on its own copy of
the same base, of the source overlay's virtual size
(:meth:`ImageStore.overlay_size`), at the same path. Every host of a site keeps
its store under the same root, so the path and the base path recorded inside
the overlay are the same everywhere.

Everything here blocks (downloads, ``qemu-img``): the node manager calls it in
its hypervisor thread, like the driver. Every download and command runs under
a timeout, and downloads under a size limit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from usher.errors import (
    AlreadyExists,
    ConfigError,
    ImageError,
    InvalidRequest,
    NotFound,
    TimedOut,
)

log = logging.getLogger(__name__)

DISK_FORMATS = ("qcow2", "raw")
ARTIFACT_KINDS = ("disk", "kernel", "initrd")
CHUNK = 1 << 20
QEMU_IMG_TIMEOUT_S = 60.0
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

Fetcher = Callable[[str, Path, float, int], None]
"""``fetch(url, dest, timeout_s, max_bytes)`` writes the URL's bytes to ``dest``.

Raises NotFound when the URL names nothing, ImageError for any other failure
(including more than ``max_bytes``), TimedOut when ``timeout_s`` passes.
"""


@dataclass(frozen=True, slots=True)
class Artifact:
    """One file of an image: where it comes from and what it must hash to."""

    url: str
    sha256: str
    format: str = "raw"  # qcow2 or raw for disks; raw for kernels and initrds

    def check(self) -> None:
        """Raises InvalidRequest for a malformed checksum, format or URL scheme."""
        if not _SHA256.match(self.sha256):
            raise InvalidRequest(f"image checksum {self.sha256!r} is not a lower-case "
                                 f"SHA-256 (64 hex digits)")
        if self.format not in DISK_FORMATS:
            raise InvalidRequest(f"image format {self.format!r} is not one of "
                                 f"{', '.join(DISK_FORMATS)}")
        scheme = urllib.parse.urlsplit(self.url).scheme
        if scheme not in FETCHERS:
            raise InvalidRequest(f"no image fetcher for {scheme or 'no'} scheme in "
                                 f"{self.url!r} (known: {', '.join(sorted(FETCHERS))})")


# ------------------------------------------------------------------ fetchers
def _fetch_file(url: str, dest: Path, timeout_s: float, max_bytes: int) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ImageError(f"{url}: a file URL names a path on this host, not {parts.netloc}")
    source = Path(urllib.parse.unquote(parts.path))
    try:
        size = source.stat().st_size
    except FileNotFoundError:
        raise NotFound(f"image file {source} does not exist on this host") from None
    except OSError as exc:
        raise ImageError(f"cannot read image file {source}: {exc.strerror}") from None
    if size > max_bytes:
        raise ImageError(f"image file {source} is larger than {max_bytes} bytes")
    try:
        shutil.copyfile(source, dest)
    except OSError as exc:
        raise ImageError(f"cannot copy image file {source}: {exc.strerror}") from None


def _fetch_http(url: str, dest: Path, timeout_s: float, max_bytes: int) -> None:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response, \
                dest.open("wb") as out:
            written = 0
            while chunk := response.read(CHUNK):
                written += len(chunk)
                if written > max_bytes:
                    raise ImageError(f"{url} is larger than {max_bytes} bytes")
                out.write(chunk)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise NotFound(f"image {url} does not exist (HTTP 404)") from None
        raise ImageError(f"fetching {url} failed: HTTP {exc.code} {exc.reason}") from None
    except TimeoutError:
        raise TimedOut(f"fetching {url} took longer than {timeout_s:g} s") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ImageError(f"fetching {url} failed: {reason}") from None


FETCHERS: dict[str, Fetcher] = {"file": _fetch_file, "http": _fetch_http,
                                "https": _fetch_http}


def register_fetcher(scheme: str, fetcher: Fetcher) -> None:
    """Make ``scheme://`` URLs fetchable (a site plugin: an NFS mount, S3, ...)."""
    FETCHERS[scheme] = fetcher


# ------------------------------------------------------------------ the store
class ImageStore:
    """Base images and VM overlays under ``root`` (see the module docstring)."""

    def __init__(self, root: Path, *, fetch_timeout_s: float = 600.0,
                 max_bytes: int = 64 << 30, qemu_img: str = "qemu-img") -> None:
        self.root = root
        self.fetch_timeout_s = fetch_timeout_s
        self.max_bytes = max_bytes
        self.qemu_img = qemu_img
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    @property
    def base_dir(self) -> Path:
        return self.root / "base"

    @property
    def vm_dir(self) -> Path:
        return self.root / "vms"

    def prepare(self) -> None:
        """Create the store's directories (world-readable: qemu runs as another user).

        Raises:
            ConfigError: they cannot be created.
        """
        try:
            for d in (self.root, self.base_dir, self.vm_dir):
                d.mkdir(parents=True, exist_ok=True)
                d.chmod(0o755)
        except OSError as exc:
            raise ConfigError(f"cannot create the image store {self.root}: "
                              f"{exc.strerror}") from None

    def base(self, artifact: Artifact) -> Path:
        """The local, verified, read-only copy of ``artifact``, fetched if needed.

        Raises:
            InvalidRequest: a malformed artifact (checksum, format, scheme).
            NotFound: the URL names nothing.
            ImageError: the download failed, is too large, fails its checksum,
                or is a qcow2 with a backing file of its own.
            TimedOut: the download took longer than ``fetch_timeout_s``.
        """
        artifact.check()
        path = self.base_dir / artifact.sha256
        with self._lock_for(artifact.sha256):
            if path.exists():
                return path
            self.prepare()
            partial = self.base_dir / f".partial-{artifact.sha256}-{os.getpid()}"
            try:
                FETCHERS[urllib.parse.urlsplit(artifact.url).scheme](
                    artifact.url, partial, self.fetch_timeout_s, self.max_bytes)
                got = _sha256_of(partial)
                if got != artifact.sha256:
                    raise ImageError(
                        f"image {artifact.url} failed its checksum (expected "
                        f"{artifact.sha256}, got {got}): the file changed or is corrupt; "
                        f"ask the site admin to check and register it again",
                        details={"url": artifact.url, "expected": artifact.sha256,
                                 "got": got})
                if artifact.format == "qcow2":
                    self._check_qcow2(partial, artifact.url)
                partial.chmod(0o444)
                os.replace(partial, path)
            finally:
                partial.unlink(missing_ok=True)
            log.info("image %s fetched into %s", artifact.url, path)
            return path

    def overlay(self, vm_uuid: str, base: Path, base_format: str) -> Path:
        """The VM's qcow2 overlay on ``base``, made if missing (idempotent).

        Raises:
            ImageError: qemu-img failed.
        """
        if base_format not in DISK_FORMATS:
            raise InvalidRequest(f"image format {base_format!r} is not one of "
                                 f"{', '.join(DISK_FORMATS)}")
        path = self.overlay_path(vm_uuid)
        if path.exists():
            return path
        self.prepare()
        partial = path.with_name(path.name + ".partial")
        try:
            self._qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", base_format,
                           str(partial))
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        return path

    def prepare_incoming(self, vm_uuid: str, base: Path, base_format: str,
                         size_bytes: int) -> Path:
        """A new, empty overlay for a VM about to arrive here by live migration.

        The incremental storage copy writes the source overlay's blocks into
        this file, so it must be on this host's copy of the VM's base (``base``,
        from :meth:`base`) and have the source overlay's virtual size
        ``size_bytes`` (from :meth:`overlay_size` on the source).

        Raises:
            InvalidRequest: a format that is not pinnable, or a size that is
                not positive.
            AlreadyExists: this host already has an overlay for the VM: a VM
                defined here, or what a failed migration left behind. A
                leftover is never reused: blocks it holds that the source's
                overlay does not would show through in the guest's disk. The
                caller removes it (:meth:`remove_overlay`) once it knows that
                no domain here uses it.
            ImageError: qemu-img failed.
        """
        if base_format not in DISK_FORMATS:
            raise InvalidRequest(f"image format {base_format!r} is not one of "
                                 f"{', '.join(DISK_FORMATS)}")
        if size_bytes <= 0:
            raise InvalidRequest(f"disk size {size_bytes} is not positive")
        path = self.overlay_path(vm_uuid)
        if path.exists():
            raise AlreadyExists(f"this host already has a disk for VM {vm_uuid} ({path})",
                                details={"uuid": vm_uuid, "path": str(path)})
        self.prepare()
        partial = path.with_name(path.name + ".partial")
        try:
            self._qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", base_format,
                           str(partial), str(size_bytes))
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        return path

    def overlay_size(self, vm_uuid: str) -> int:
        """The virtual size in bytes of the VM's overlay; readable while the VM runs.

        Raises:
            NotFound: the VM has no overlay here.
            ImageError: qemu-img cannot read it.
        """
        path = self.overlay_path(vm_uuid)
        if not path.exists():
            raise NotFound(f"this host has no disk for VM {vm_uuid}", details={"uuid": vm_uuid})
        # -U: the running QEMU holds the image's write lock; reading its header is safe.
        out = self._qemu_img("info", "--output=json", "-U", "-f", "qcow2", str(path))
        try:
            return int(json.loads(out)["virtual-size"])
        except (ValueError, KeyError, TypeError):
            raise ImageError(f"qemu-img could not tell the size of {path}") from None

    def overlay_path(self, vm_uuid: str) -> Path:
        return self.vm_dir / f"{vm_uuid}.qcow2"

    def remove_overlay(self, vm_uuid: str) -> bool:
        """Delete the VM's overlay (never a base); True if there was one."""
        path = self.overlay_path(vm_uuid)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise ImageError(f"cannot delete the disk {path}: {exc.strerror}") from None
        return True

    # ------------------------------------------------------------ helpers
    def _lock_for(self, key: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def _check_qcow2(self, path: Path, url: str) -> None:
        out = self._qemu_img("info", "--output=json", "-f", "qcow2", str(path))
        try:
            info = json.loads(out)
        except ValueError:
            raise ImageError(f"qemu-img could not describe {url}") from None
        if info.get("format") != "qcow2":
            raise ImageError(f"image {url} is not a qcow2 image")
        if info.get("backing-filename"):
            raise ImageError(f"image {url} has a backing file of its own "
                             f"({info['backing-filename']}); register a standalone image "
                             f"(qemu-img convert)")

    def _qemu_img(self, *args: str) -> str:
        try:
            proc = subprocess.run([self.qemu_img, *args], capture_output=True, text=True,
                                  timeout=QEMU_IMG_TIMEOUT_S)
        except FileNotFoundError:
            raise ConfigError(f"{self.qemu_img} is not installed (Debian: qemu-utils)") from None
        except subprocess.TimeoutExpired:
            raise TimedOut(f"qemu-img {args[0]} took longer than "
                           f"{QEMU_IMG_TIMEOUT_S:g} s") from None
        if proc.returncode != 0:
            raise ImageError(f"qemu-img {args[0]} failed: {proc.stderr.strip()}")
        return proc.stdout


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()

