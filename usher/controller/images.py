"""The image catalogue: the images site admins register, and what a start boots from.

Site admins register images with ``usher-controller image add`` (rows of the
``images`` table; the running controller reads them again on SIGHUP): a disk
and/or a kernel, with an initrd and a kernel command line, each file as a URL
and a SHA-256, the disk's format pinned (qcow2 or raw: never guessed). Users
only name images; they never see nor give URLs (``image.list`` shows names,
formats and descriptions). Only a site admin may give a disk URL, with
``start --fs_uri URL#sha256=HEX``.

:meth:`ImageCatalog.resolve` turns a start's options into the
:class:`~usher.protocol.ops.BootMsg` the node manager boots a new VM from. It
runs on the event loop before the start decides, so a bad option refuses the
whole start before anything is reserved. The result is kept with the VM (a
:class:`~usher.controller.state.BootRecord` in ``vms.boot``) and sent again
whenever the VM is defined (cold migration, a task re-run after a restart),
so deleting or changing an image never touches the VMs made from it.

Each host's node manager fetches the files by URL into its own store and
checks their SHA-256 (:mod:`usher.lnm.images`); the schemes and formats
accepted here are the ones it fetches.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import re
import time
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import msgspec
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from usher.controller.models import Image
from usher.controller.state import BootRecord
from usher.errors import (
    AlreadyExists,
    ImageNotFound,
    InvalidOption,
    NotFound,
    PermissionDenied,
)
from usher.protocol.ops import ArtifactMsg, BootMsg, ImageInfo, StartOptions

log = logging.getLogger(__name__)

URL_SCHEMES = ("file", "http", "https", "nfs")
"""Schemes of image URLs: the node managers' fetchers (usher.lnm.images)."""

DISK_FORMATS = ("qcow2", "raw")
MAX_CMDLINE = 1024
"""Longest image command line, and longest ``--kernel_parms``."""
MAX_BOOT_CMDLINE = 1900
"""Longest resolved command line: an x86 kernel takes 2048 bytes, and the node
manager adds the VM's address (well under 148)."""
MAX_DESCRIPTION = 200
MAX_URL = 2048
HASH_CHUNK = 1 << 20

_IMAGE_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_PRINTABLE = re.compile(r"^[\x20-\x7e]*$")
_URL_CHARS = re.compile(r"^[\x21-\x7e]+$")
# An NFS export path as the kernel's nfsroot= takes it: no ',' (it starts the
# mount options), no '%' (the kernel puts the client's address at '%s').
_NFS_PATH = re.compile(r"^/[A-Za-z0-9._~+@/-]*$")


# ------------------------------------------------------------------ records
@dataclass(frozen=True, slots=True)
class ImageRec:
    """One registered image as the catalogue holds it."""

    name: str
    disk: ArtifactMsg | None = None
    kernel: ArtifactMsg | None = None
    initrd: ArtifactMsg | None = None
    cmdline: str = ""
    description: str = ""

    def info(self) -> ImageInfo:
        """What users see: no URLs, no checksums."""
        return ImageInfo(name=self.name, disk_format=self.disk.format if self.disk else None,
                         kernel=self.kernel is not None, initrd=self.initrd is not None,
                         cmdline=self.cmdline, description=self.description)


def image_rec(row: Image) -> ImageRec:
    def artifact(url: str | None, sha256: str | None, fmt: str = "raw") -> ArtifactMsg | None:
        return ArtifactMsg(url=url, sha256=sha256, format=fmt) if url and sha256 else None

    return ImageRec(name=row.name,
                    disk=artifact(row.disk_url, row.disk_sha256, row.disk_format or "raw"),
                    kernel=artifact(row.kernel_url, row.kernel_sha256),
                    initrd=artifact(row.initrd_url, row.initrd_sha256),
                    cmdline=row.cmdline or "", description=row.description or "")


def encode_boot(record: BootRecord | None) -> str | None:
    """The ``vms.boot`` column of a VM (None: it boots nothing)."""
    return msgspec.json.encode(record).decode() if record is not None else None


def decode_boot(text: str | None, vm_name: str = "") -> BootRecord | None:
    """A ``vms.boot`` column read back; one that does not decode is logged and dropped."""
    if not text:
        return None
    try:
        return msgspec.json.decode(text, type=BootRecord)
    except msgspec.DecodeError as exc:
        log.error("VM %s: its boot record does not decode (%s); it is defined without one",
                  vm_name, exc)
        return None


# ---------------------------------------------------------------- catalogue
class ImageCatalog:
    """The registered images, in memory; see the module docstring."""

    def __init__(self) -> None:
        self.images: dict[str, ImageRec] = {}

    def load(self, session: Session) -> None:
        """Read every image (start-up)."""
        self.set_images(session.scalars(select(Image)))

    def set_images(self, rows: Iterable[Image]) -> None:
        """Replace the catalogue (start-up or a reload, on the loop)."""
        self.images = {row.name: image_rec(row) for row in rows}

    def list_images(self) -> list[ImageInfo]:
        return [self.images[name].info() for name in sorted(self.images)]

    def complete(self, prefix: str) -> list[str]:
        return sorted(name for name in self.images if name.startswith(prefix))[:500]

    def _image(self, name: str, flag: str) -> ImageRec:
        image = self.images.get(name)
        if image is None:
            raise ImageNotFound(f"{flag}: no image named {_shown(name)}; see 'image_list'",
                                details={"image": name})
        return image

    def resolve(self, options: StartOptions, *, site_admin: bool) -> BootRecord | None:
        """What a new VM started with ``options`` boots from (None: nothing to boot).

        The disk comes from ``--image`` (or, for site admins, a disk URL in
        ``--fs_uri``); the kernel from ``--kernel``'s image, else
        ``--image``'s; the initrd from ``--initrd``'s image, else the kernel's
        image; the command line is the kernel's image's, then the NFS root of
        ``--fs_uri``, then ``--kernel_parms``.

        Raises:
            ImageNotFound: an image named by --image, --kernel or --initrd is
                not registered.
            InvalidOption: a kernel or initrd image without one, kernel
                parameters or an NFS root without a kernel, a malformed
                --kernel_parms or --fs_uri, two disks.
            PermissionDenied: a disk URL in --fs_uri from someone who is not a
                site admin.
        """
        image = self._image(options.image, "--image") if options.image is not None else None
        kernel_image = image if image is not None and image.kernel is not None else None
        if options.kernel is not None:
            kernel_image = self._image(options.kernel, "--kernel")
            if kernel_image.kernel is None:
                raise InvalidOption(f"--kernel {options.kernel}: that image has no kernel; "
                                    f"see 'image_list' for images with one")
        kernel = kernel_image.kernel if kernel_image is not None else None
        initrd = kernel_image.initrd if kernel_image is not None else None
        if options.initrd is not None:
            initrd_image = self._image(options.initrd, "--initrd")
            if initrd_image.initrd is None:
                raise InvalidOption(f"--initrd {options.initrd}: that image has no initrd; "
                                    f"see 'image_list' for images with one")
            if kernel is None:
                raise InvalidOption("--initrd needs a kernel: give --kernel NAME or an "
                                    "--image that has one")
            initrd = initrd_image.initrd
        cmdline = [kernel_image.cmdline] if kernel_image is not None and \
            kernel_image.cmdline else []
        disk = image.disk if image is not None else None
        if options.fs_uri is not None:
            url_disk, root = parse_fs_uri(options.fs_uri, site_admin=site_admin)
            if url_disk is not None:
                if disk is not None:
                    raise InvalidOption(f"--fs_uri gives a disk and image {options.image} has "
                                        f"one too; give one of them (--kernel NAME boots an "
                                        f"image's kernel without its disk)")
                disk = url_disk
            else:
                if kernel is None:
                    raise InvalidOption("--fs_uri nfs://... is the root file system of a "
                                        "kernel: give --kernel NAME or an --image that has one")
                cmdline.append(root)
        if options.kernel_parms is not None:
            check_kernel_parms(options.kernel_parms)
            if kernel is None:
                raise InvalidOption("--kernel_parms needs a kernel: give --kernel NAME or an "
                                    "--image that has one")
            if options.kernel_parms:
                cmdline.append(options.kernel_parms)
        if disk is None and kernel is None:
            return None
        line = " ".join(cmdline)
        if len(line) > MAX_BOOT_CMDLINE:
            raise InvalidOption(f"the kernel command line would be {len(line)} characters "
                                f"long; at most {MAX_BOOT_CMDLINE} fit: shorten "
                                f"--kernel_parms or --fs_uri")
        boot = BootMsg(disk=disk, kernel=kernel, initrd=initrd, cmdline=line)
        return BootRecord(boot=boot, image=options.image, kernel=options.kernel,
                          initrd=options.initrd, kernel_parms=options.kernel_parms,
                          fs_uri=options.fs_uri)


def _shown(text: str) -> str:
    """A user's word safe to put in a message: printable, bounded."""
    if _PRINTABLE.match(text) and len(text) <= 100:
        return text
    return repr(text[:100])


def check_kernel_parms(text: str) -> None:
    """Raises InvalidOption unless ``text`` is printable ASCII of at most MAX_CMDLINE chars."""
    if len(text) > MAX_CMDLINE:
        raise InvalidOption(f"--kernel_parms is {len(text)} characters long; give at most "
                            f"{MAX_CMDLINE}")
    if not _PRINTABLE.match(text):
        raise InvalidOption("--kernel_parms may hold only printable ASCII characters (no "
                            "newlines, tabs or control characters)")


def parse_fs_uri(text: str, *, site_admin: bool) -> tuple[ArtifactMsg | None, str]:
    """``--fs_uri``: (a disk, "") for a disk URL, (None, kernel parameters) for NFS.

    ``nfs://SERVER/PATH`` (SERVER an IPv4 address: the kernel mounts its root
    before any name service) becomes ``root=/dev/nfs nfsroot=SERVER:/PATH rw``.
    A ``file``, ``http`` or ``https`` URL with ``#sha256=HEX`` (and
    ``&format=qcow2|raw``, default raw) is the VM's disk: site admins only.

    Raises:
        InvalidOption: malformed, or another scheme.
        PermissionDenied: a disk URL from someone who is not a site admin.
    """
    if len(text) > MAX_URL or not _URL_CHARS.match(text):
        raise InvalidOption(f"--fs_uri must be a URL of printable ASCII characters without "
                            f"spaces, at most {MAX_URL} long")
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise InvalidOption(f"--fs_uri {text} is not a URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme == "nfs":
        return None, _nfs_root(text, parts, port)
    if scheme in URL_SCHEMES:
        if not site_admin:
            raise PermissionDenied("only site admins give image URLs; use a registered image "
                                   "(image_list)")
        return _disk_url(text, parts), ""
    raise InvalidOption(f"--fs_uri {text}: give nfs://SERVER/PATH (an NFS root for the "
                        f"kernel); site admins may give a "
                        f"{', '.join(s for s in URL_SCHEMES if s != 'nfs')} URL of a "
                        f"disk with #sha256=HEX")


def _nfs_root(text: str, parts: urllib.parse.SplitResult, port: int | None) -> str:
    if port is not None or parts.username or parts.password or parts.query or parts.fragment:
        raise InvalidOption(f"--fs_uri {text}: an NFS root is nfs://SERVER/PATH, without a "
                            f"port, user, query or fragment")
    try:
        server = ipaddress.IPv4Address(parts.hostname or "")
    except ValueError:
        raise InvalidOption(f"--fs_uri {text}: the kernel mounts an NFS root by address, "
                            f"before any name service: give nfs://IPV4-ADDRESS/PATH") from None
    if not _NFS_PATH.match(parts.path):
        raise InvalidOption(f"--fs_uri {text}: the export path must start with / and hold "
                            f"only letters, digits and . _ ~ + @ / -")
    return f"root=/dev/nfs nfsroot={server}:{parts.path} rw"


def _disk_url(text: str, parts: urllib.parse.SplitResult) -> ArtifactMsg:
    sha256 = None
    fmt = "raw"
    for item in filter(None, parts.fragment.split("&")):
        key, _, value = item.partition("=")
        if key == "sha256":
            sha256 = value.lower()
        elif key == "format":
            fmt = value
        else:
            raise InvalidOption(f"--fs_uri: unknown #{key}; a disk URL takes "
                                f"#sha256=HEX[&format=qcow2|raw]")
    if sha256 is None:
        raise InvalidOption("--fs_uri: a disk URL needs its checksum: add #sha256=HEX "
                            "(64 hex digits)")
    url = urllib.parse.urlunsplit(parts._replace(fragment=""))
    return ArtifactMsg(url=check_url(url, "--fs_uri"), sha256=check_sha256(sha256, "--fs_uri"),
                       format=check_format(fmt, "--fs_uri"))


def check_url(url: str, flag: str) -> str:
    """``url`` if it is an image URL the node managers fetch; else InvalidOption."""
    if len(url) > MAX_URL or not _URL_CHARS.match(url):
        raise InvalidOption(f"{flag}: the URL must be printable ASCII without spaces, at "
                            f"most {MAX_URL} characters")
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as exc:
        raise InvalidOption(f"{flag} {url} is not a URL: {exc}") from None
    if parts.scheme not in URL_SCHEMES:
        raise InvalidOption(f"{flag} {url}: unknown URL scheme {parts.scheme or '(none)'}; "
                            f"use one of {', '.join(URL_SCHEMES)}")
    if parts.fragment:
        raise InvalidOption(f"{flag} {url}: a URL with a #fragment; give the checksum with "
                            f"its own option")
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise InvalidOption(f"{flag} {url}: a file URL is file:///ABSOLUTE/PATH, a "
                                f"path on each host")
    elif not parts.hostname:
        raise InvalidOption(f"{flag} {url}: the URL names no server")
    elif parts.scheme == "nfs" and parts.port is not None:
        # libnfs ignores it and would ask the standard port.
        raise InvalidOption(f"{flag} {url}: give an NFS server's port as ?nfsport=N, not "
                            f"after the server's name")
    return url


def check_sha256(text: str, flag: str) -> str:
    """``text`` lower-cased if it is a SHA-256 in hex; else InvalidOption."""
    digest = text.lower()
    if not _SHA256.match(digest):
        raise InvalidOption(f"{flag}: {_shown(text)} is not a SHA-256 (64 hex digits)")
    return digest


def check_format(fmt: str, flag: str) -> str:
    if fmt not in DISK_FORMATS:
        raise InvalidOption(f"{flag}: format {_shown(fmt)} is not one of "
                            f"{', '.join(DISK_FORMATS)}")
    return fmt


# ---------------------------------------------------------- administration
def file_sha256(url: str, flag: str) -> str:
    """The SHA-256 of the file a ``file://`` URL names on this machine (blocks: CLI only).

    Raises:
        NotFound: there is no such file.
        InvalidOption: it cannot be read. Either message says which checksum
            option to give instead.
    """
    path = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path))
    digest = hashlib.sha256()
    try:
        with path.open("rb") as fh:
            while chunk := fh.read(HASH_CHUNK):
                digest.update(chunk)
    except FileNotFoundError:
        raise NotFound(f"{flag} {url}: {path} does not exist on this machine, so its "
                       f"checksum cannot be computed here; give {flag}-sha256 HEX") from None
    except OSError as exc:
        raise InvalidOption(f"{flag} {url}: cannot read {path} to compute its checksum "
                            f"({exc.strerror}); give {flag}-sha256 HEX") from None
    return digest.hexdigest()


def artifact(url: str, sha256: str | None, flag: str, fmt: str = "raw") -> ArtifactMsg:
    """One file of a new image, its checksum computed for a file URL if not given.

    Raises:
        InvalidOption: a bad URL, checksum or format, or no checksum for a URL
            that is not a file (names the option to give).
        NotFound, InvalidOption: a file URL whose file cannot be read to
            compute its checksum.
    """
    url = check_url(url, flag)
    if sha256 is not None:
        digest = check_sha256(sha256, f"{flag}-sha256")
    elif url.startswith("file:"):
        digest = file_sha256(url, flag)
    else:
        raise InvalidOption(f"{flag} {url}: give its checksum with {flag}-sha256 HEX (only "
                            f"file URLs are hashed here)")
    return ArtifactMsg(url=url, sha256=digest, format=check_format(fmt, "--format"))


def make_image(name: str, *, disk: str | None = None, disk_format: str | None = None,
               disk_sha256: str | None = None, kernel: str | None = None,
               kernel_sha256: str | None = None, initrd: str | None = None,
               initrd_sha256: str | None = None, cmdline: str = "",
               description: str = "") -> Image:
    """A new image row from the ``image add`` options, checked (hashing file URLs: blocks).

    Raises:
        InvalidOption: a bad name or option, or no disk and no kernel.
        NotFound: a file URL whose file is not there to compute its checksum.
    """
    if not _IMAGE_NAME.match(name):
        raise InvalidOption(f"bad image name {_shown(name)}: use lower-case letters, digits, "
                            f"'.', '_' and '-' (at most 64)")
    if disk is None and kernel is None:
        raise InvalidOption("an image needs a disk (--disk URL --format F) or a kernel "
                            "(--kernel URL), or both")
    if disk is not None and disk_format is None:
        raise InvalidOption(f"--disk needs --format ({' or '.join(DISK_FORMATS)}): image "
                            f"formats are pinned, never guessed")
    if disk is None and (disk_format is not None or disk_sha256 is not None):
        raise InvalidOption("--format and --disk-sha256 describe --disk; give --disk too")
    if kernel is None and (initrd is not None or cmdline or kernel_sha256 is not None):
        raise InvalidOption("--initrd, --cmdline and --kernel-sha256 go with a kernel; give "
                            "--kernel too")
    if initrd is None and initrd_sha256 is not None:
        raise InvalidOption("--initrd-sha256 describes --initrd; give --initrd too")
    if len(cmdline) > MAX_CMDLINE or not _PRINTABLE.match(cmdline):
        raise InvalidOption(f"--cmdline must be printable ASCII (no newlines) of at most "
                            f"{MAX_CMDLINE} characters")
    if len(description) > MAX_DESCRIPTION or not description.isprintable():
        raise InvalidOption(f"--description must be one printable line of at most "
                            f"{MAX_DESCRIPTION} characters")
    disk_art = artifact(disk, disk_sha256, "--disk", disk_format or "") if disk else None
    kernel_art = artifact(kernel, kernel_sha256, "--kernel") if kernel else None
    initrd_art = artifact(initrd, initrd_sha256, "--initrd") if initrd else None
    return Image(name=name,
                 disk_url=disk_art.url if disk_art else None,
                 disk_sha256=disk_art.sha256 if disk_art else None,
                 disk_format=disk_art.format if disk_art else None,
                 kernel_url=kernel_art.url if kernel_art else None,
                 kernel_sha256=kernel_art.sha256 if kernel_art else None,
                 initrd_url=initrd_art.url if initrd_art else None,
                 initrd_sha256=initrd_art.sha256 if initrd_art else None,
                 cmdline=cmdline, description=description, created=time.time())


def add_image(session: Session, image: Image) -> Image:
    """Register ``image`` (from :func:`make_image`); AlreadyExists if the name is taken."""
    if session.get(Image, image.name) is not None:
        raise AlreadyExists(f"an image named {image.name} exists; delete it first "
                            f"('image del {image.name}') to register it again")
    session.add(image)
    return image


def list_images(session: Session) -> list[Image]:
    return list(session.scalars(select(Image).order_by(Image.name)))


def delete_image(session: Session, name: str) -> None:
    """Forget an image. VMs made from it keep what they boot from (their boot record).

    Raises:
        ImageNotFound: no image of that name.
    """
    if session.get(Image, name) is None:
        raise ImageNotFound(f"no image named {_shown(name)}; see 'image list'")
    session.execute(delete(Image).where(Image.name == name))
