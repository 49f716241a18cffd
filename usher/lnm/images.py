"""Each host's image store: read-only base images fetched by URL, a qcow2 overlay per VM.

A site admin registers images with the controller (a URL and a SHA-256 for the
disk, the kernel and the initrd, and a pinned disk format); users only name
them. When a VM is defined, the node manager asks its :class:`ImageStore` for
the files: each artifact is fetched once by its URL scheme's fetcher
(``file``, ``http``, ``https``, ``nfs``; more through :func:`register_fetcher`), checked
against its SHA-256 while it is written, and kept read-only under
``ROOT/base/<sha256>``, so every VM on the host that uses it shares one copy and
a changed file at the URL is caught, never used. A VM's disk is a qcow2 overlay
``ROOT/vms/<uuid>.qcow2`` on its base, made with the base's pinned format
(``-F``: formats are never guessed), and a base that is a qcow2 with a backing
file of its own is refused (no backing chains from outside). Destroying a VM
deletes its overlay, never a base.

``nfs://SERVER/EXPORT/PATH`` URLs need no kernel NFS client and no mount:
libnfs's user-space client (``nfs-ls`` and ``nfs-cp`` from Debian's
``libnfs-utils``) reads the file itself, and libnfs's URL arguments pass
through (``?version=4&nfsport=2049`` and the like; see :func:`_fetch_nfs`).

Live migration without shared storage copies only the overlay's blocks
(libvirt's incremental storage copy) into an empty overlay that the target
made beforehand with :meth:`ImageStore.prepare_incoming`: on its own copy of
the same base, of the source overlay's virtual size
(:meth:`ImageStore.overlay_size`), at the same path. Every host of a site keeps
its store under the same root, so the path and the base path recorded inside
the overlay are the same everywhere.

A store on a filesystem that several hosts mount (NFS, GlusterFS, CephFS, at
the same path everywhere) is *shared*: the node manager names it
(``shared_store`` in its config) and :meth:`ImageStore.store_id` tells which
filesystem it really is, so the controller moves VMs between hosts of one
store without copying their disks. Writes that hosts could race on go
through unique temporary names and atomic renames.

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
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
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
STORE_ID_FILE = ".usher-store-id"
ARTIFACT_KINDS = ("disk", "kernel", "initrd")
CHUNK = 1 << 20
QEMU_IMG_TIMEOUT_S = 60.0
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

Fetcher = Callable[[str, Path, float, int], None]
"""``fetch(url, dest, timeout_s, max_bytes)`` writes the URL's bytes to ``dest``.

Raises NotFound when the URL names nothing, ImageError for any other failure
(including more than ``max_bytes``), TimedOut when ``timeout_s`` passes. A
fetcher may refuse a URL it cannot use with InvalidRequest, before fetching.
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


_NFS_MISSING = re.compile(r"NOENT|No such file", re.IGNORECASE)
# What libnfs 4.0 says, when its mount fails, if no NFS service answered at
# all: nothing listening ("nfs_service failed"), a name it cannot resolve
# ("Failed to start connection ... Can not resolv"), a network that refuses.
# A server that answers and refuses says so with an NFS4ERR_*/MNT3ERR_* status.
_NFS_UNREACHABLE = re.compile(r"nfs_service failed|connect|resolv|refused|unreachable",
                              re.IGNORECASE)
# An ``nfs-ls`` line: type and mode, links, uid, gid, size, then the name after
# exactly one space (so names with spaces parse).
_NFS_LS_ENTRY = re.compile(r"^(?P<mode>\S+) +\d+ +-?\d+ +-?\d+ +(?P<size>\d+) (?P<name>.*)$")
_NFS_DETAIL_MAX = 300


def _fetch_nfs(url: str, dest: Path, timeout_s: float, max_bytes: int) -> None:
    """Copy ``nfs://SERVER/EXPORT/PATH[?ARGS]`` with libnfs's ``nfs-cp``: no kernel mount.

    libnfs speaks NFS itself, as the calling user (AUTH_SYS with the node
    manager's uid: from root, a root-squashing export must make its images
    world-readable). ``ARGS`` are libnfs's URL arguments and pass through
    unchanged: ``?version=4&nfsport=2049`` reaches an NFSv4 server without
    rpcbind (libnfs 4.0, Debian 12's, speaks NFSv3 through the portmapper
    unless told otherwise, and reads no ``:PORT`` after the server). The path is
    taken literally: libnfs decodes no ``%XX``.

    The file's size comes first from a listing of its directory (``nfs-ls``),
    so an image larger than ``max_bytes`` is refused before any byte of it
    moves; it is checked again after the copy, for a file that grew in
    between or is a symbolic link (the listing gives the link's own size).
    ``timeout_s`` bounds the listing and the copy together.

    Raises:
        InvalidRequest: the URL names no server, no export and file, has a
            user, a ``:PORT`` (give ``?nfsport=PORT``), a fragment or a
            control character.
        NotFound: the server has no such export or file.
        ImageError: the server cannot be reached or refuses, the file is
            larger than ``max_bytes``, libnfs-utils is not installed, or the
            copy fails (nfs-cp's first error line is in the message). What
            was written to ``dest`` is deleted.
        TimedOut: listing and copying took longer than ``timeout_s``.
    """
    nfs = _NfsUrl.parse(url)
    nfs_ls, nfs_cp = shutil.which("nfs-ls"), shutil.which("nfs-cp")
    if nfs_ls is None or nfs_cp is None:
        raise ImageError(f"cannot fetch {url}: nfs-ls and nfs-cp are not installed on this "
                         f"host; install Debian's libnfs-utils")
    deadline = time.monotonic() + timeout_s
    size = _nfs_size(nfs_ls, nfs, deadline, timeout_s)
    if size is not None and size > max_bytes:
        raise ImageError(f"image {url} is larger than {max_bytes} bytes ({size} bytes); "
                         f"raise the node manager's size limit or use a smaller image")
    try:
        proc = _run_nfs_tool([nfs_cp, nfs.source, str(dest)], nfs, deadline, timeout_s)
        if proc.returncode != 0:
            raise _nfs_failure(nfs, proc.stderr + proc.stdout)
        written = dest.stat().st_size
        if written > max_bytes:
            raise ImageError(f"image {url} is larger than {max_bytes} bytes ({written} "
                             f"bytes); raise the node manager's size limit or use a "
                             f"smaller image")
    except BaseException:
        dest.unlink(missing_ok=True)
        raise


@dataclass(frozen=True, slots=True)
class _NfsUrl:
    """An ``nfs`` image URL taken apart for libnfs's tools."""

    url: str  # as given, for messages
    source: str  # the file, for nfs-cp
    listing: str  # its directory, for nfs-ls
    host: str
    name: str  # the file's name in its directory

    @classmethod
    def parse(cls, url: str) -> _NfsUrl:
        """Raises InvalidRequest: see :func:`_fetch_nfs`."""
        hint = "write it as nfs://SERVER/EXPORT/PATH[?LIBNFS-ARGS]"
        if any(ord(c) < 0x20 or ord(c) == 0x7f for c in url):
            raise InvalidRequest(f"NFS image URL {url!r} holds a control character; {hint}")
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise InvalidRequest(f"NFS image URL {url} is malformed ({exc}); {hint}") from None
        if not parts.hostname:
            raise InvalidRequest(f"NFS image URL {url} names no NFS server; {hint}")
        if port is not None:
            raise InvalidRequest(f"NFS image URL {url} gives a port after the server, which "
                                 f"libnfs does not read; give it as ?nfsport={port}")
        if parts.username is not None or parts.password is not None:
            raise InvalidRequest(f"NFS image URL {url} names a user; libnfs takes uid= and "
                                 f"gid= arguments instead")
        if parts.fragment or url.endswith("#"):
            raise InvalidRequest(f"NFS image URL {url} has a #fragment; {hint}")
        directory, _, name = parts.path.rpartition("/")
        # libnfs mounts everything before the last "/" and opens the rest, so
        # both must be there: nfs://SERVER/FILE would mount an empty export path.
        if not directory or not name:
            raise InvalidRequest(f"NFS image URL {url} names no export and file on the "
                                 f"server; {hint}")
        # nfs-cp tells its NFS side from a local file by a literal "nfs://" prefix.
        query = f"?{parts.query}" if parts.query else ""
        return cls(url=url, source=f"nfs://{parts.netloc}{parts.path}{query}",
                   listing=f"nfs://{parts.netloc}{directory}{query}", host=parts.hostname,
                   name=name)


def _nfs_size(nfs_ls: str, nfs: _NfsUrl, deadline: float, timeout_s: float) -> int | None:
    """The size of the file from a listing of its directory; None if that cannot tell.

    Raises NotFound (no such export), ImageError (the server cannot be
    mounted) or TimedOut, like :func:`_fetch_nfs`.
    """
    proc = _run_nfs_tool([nfs_ls, nfs.listing], nfs, deadline, timeout_s)
    if proc.returncode != 0:
        output = proc.stderr + proc.stdout
        if "Failed to mount" in output:
            raise _nfs_failure(nfs, output)
        # The directory may be unreadable while the file is not (an
        # execute-only directory): nfs-cp decides, and the size is checked after.
        log.debug("cannot list the directory of %s, copying without a size check first: %s",
                  nfs.url, output.strip())
        return None
    for line in proc.stdout.splitlines():
        entry = _NFS_LS_ENTRY.match(line)
        if entry and entry["name"] == nfs.name:
            # Only a regular file's listed size is its content's size.
            return int(entry["size"]) if entry["mode"].startswith("-") else None
    # Not listed is not proof of absence: a server may list from a stale
    # cache (nfs-ganesha does, for files made behind its back) while its
    # lookup by name finds the file. nfs-cp's open decides.
    return None


def _run_nfs_tool(argv: list[str], nfs: _NfsUrl, deadline: float,
                  timeout_s: float) -> subprocess.CompletedProcess[str]:
    remaining = deadline - time.monotonic()
    try:
        if remaining <= 0:
            raise subprocess.TimeoutExpired(argv, timeout_s)
        return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              errors="replace", timeout=remaining)
    except subprocess.TimeoutExpired:
        raise TimedOut(f"fetching {nfs.url} took longer than {timeout_s:g} s; is NFS server "
                       f"{nfs.host} answering?") from None
    except OSError as exc:
        raise ImageError(f"cannot run {argv[0]} to fetch {nfs.url}: {exc.strerror}") from None


def _nfs_failure(nfs: _NfsUrl, output: str) -> NotFound | ImageError:
    """The error for a failed nfs-ls or nfs-cp, from what it printed."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    detail = lines[0][:_NFS_DETAIL_MAX] if lines else "no message"
    if _NFS_MISSING.search(output):
        return NotFound(f"image {nfs.url} does not exist on NFS server {nfs.host} "
                        f"({detail}); check the export and path in the URL")
    if "Failed to mount" in output and _NFS_UNREACHABLE.search(output):
        return ImageError(f"cannot reach NFS server {nfs.host} for {nfs.url} ({detail}); "
                          f"check that it runs and that the URL's version= and nfsport= "
                          f"match it")
    return ImageError(f"fetching {nfs.url} failed: {detail}")


FETCHERS: dict[str, Fetcher] = {"file": _fetch_file, "http": _fetch_http,
                                "https": _fetch_http, "nfs": _fetch_nfs}


def register_fetcher(scheme: str, fetcher: Fetcher) -> None:
    """Make ``scheme://`` URLs fetchable by ``fetcher`` (a site plugin: S3, a CDN ...).

    A plugin may also replace a built-in fetcher, e.g. ``nfs`` by one that
    reads the export where the site mounts it on every host.
    """
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
            InvalidRequest: a malformed artifact (checksum, format, scheme, or a
                URL its scheme's fetcher cannot use).
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
            # Unique per host too: on a shared store another host may fetch it now.
            partial = self.base_dir / (f".partial-{artifact.sha256}-{socket.gethostname()}"
                                       f"-{os.getpid()}")
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

    def has_overlay(self, vm_uuid: str) -> bool:
        return self.overlay_path(vm_uuid).exists()

    def store_id(self) -> str:
        """This store's identity: a random id kept in ``ROOT/.usher-store-id``.

        Made by the first host to ask (a hard link of a written file, atomic
        on NFS and GlusterFS too: nobody reads a half-written id), so every
        host that mounts the same filesystem reads the same id, and a host
        whose store is not mounted (a local directory under the same path)
        has an id of its own.

        Raises:
            ConfigError: the store or its id file cannot be written or read.
        """
        self.prepare()
        path = self.root / STORE_ID_FILE
        if not path.exists():
            mine = path.with_name(f"{path.name}.{socket.gethostname()}-{os.getpid()}")
            try:
                mine.write_text(uuid.uuid4().hex + "\n")
                os.link(mine, path)
            except FileExistsError:
                pass  # another host was first: its id is the store's
            except OSError as exc:
                raise ConfigError(f"cannot write the image store's id {path}: "
                                  f"{exc.strerror}") from None
            finally:
                mine.unlink(missing_ok=True)
        try:
            found = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the image store's id {path}: {exc.strerror}") \
                from None
        if not re.fullmatch(r"[0-9a-f]{32}", found):
            raise ConfigError(f"{path} does not hold an image store id; remove it and "
                              f"restart the node managers of this store")
        return found

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

