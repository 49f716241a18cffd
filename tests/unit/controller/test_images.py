"""The image catalogue: registering images, and resolving a start's boot options."""

from __future__ import annotations

import hashlib
from pathlib import Path

import msgspec
import pytest

from usher.controller import images
from usher.controller.images import ImageCatalog, decode_boot, encode_boot, make_image
from usher.controller.state import BootRecord
from usher.errors import ImageNotFound, InvalidOption, NotFound, PermissionDenied
from usher.protocol.ops import ArtifactMsg, BootMsg, StartOptions

SHA_A = "a" * 64
SHA_B = "b" * 64
SHA_C = "c" * 64
SHA_D = "d" * 64


@pytest.fixture
def catalog() -> ImageCatalog:
    cat = ImageCatalog()
    cat.set_images([
        make_image("debian", disk="https://img.example.org/debian.qcow2", disk_format="qcow2",
                   disk_sha256=SHA_A, description="Debian 12"),
        make_image("tiny", kernel="http://img.example.org/vmlinuz", kernel_sha256=SHA_B,
                   initrd="http://img.example.org/initrd", initrd_sha256=SHA_C,
                   cmdline="console=ttyS0", description="test guest"),
        make_image("bare-kernel", kernel="http://img.example.org/k2", kernel_sha256=SHA_D),
        make_image("full", disk="http://img.example.org/full.raw", disk_format="raw",
                   disk_sha256=SHA_D, kernel="http://img.example.org/k3",
                   kernel_sha256=SHA_B, cmdline="root=/dev/vda"),
    ])
    return cat


def resolve(catalog: ImageCatalog, *, site_admin: bool = False, **options: str) -> BootMsg:
    record = catalog.resolve(StartOptions(**options), site_admin=site_admin)  # type: ignore[arg-type]
    assert record is not None
    return record.boot


def art(url: str, sha: str, fmt: str = "raw") -> ArtifactMsg:
    return ArtifactMsg(url=url, sha256=sha, format=fmt)


# ---------------------------------------------------------------- resolving
def test_no_boot_options_boot_nothing(catalog: ImageCatalog) -> None:
    assert catalog.resolve(StartOptions(ram=64), site_admin=False) is None


def test_an_image_with_a_disk(catalog: ImageCatalog) -> None:
    boot = resolve(catalog, image="debian")
    assert boot == BootMsg(disk=art("https://img.example.org/debian.qcow2", SHA_A, "qcow2"))


def test_an_image_with_a_kernel_brings_its_initrd_and_command_line(
        catalog: ImageCatalog) -> None:
    boot = resolve(catalog, image="tiny")
    assert boot == BootMsg(kernel=art("http://img.example.org/vmlinuz", SHA_B),
                           initrd=art("http://img.example.org/initrd", SHA_C),
                           cmdline="console=ttyS0")


def test_kernel_and_initrd_of_other_images(catalog: ImageCatalog) -> None:
    boot = resolve(catalog, image="debian", kernel="tiny")
    assert boot.disk is not None and boot.disk.sha256 == SHA_A
    assert boot.kernel is not None and boot.kernel.sha256 == SHA_B
    assert boot.initrd is not None and boot.initrd.sha256 == SHA_C  # the kernel's image's
    assert boot.cmdline == "console=ttyS0"  # the kernel's image's command line
    boot = resolve(catalog, image="debian", kernel="bare-kernel", initrd="tiny")
    assert (boot.kernel and boot.kernel.sha256, boot.initrd and boot.initrd.sha256,
            boot.cmdline) == (SHA_D, SHA_C, "")
    # --kernel replaces the image's own kernel and command line, not its disk.
    boot = resolve(catalog, image="full", kernel="tiny")
    assert boot.disk is not None and boot.disk.sha256 == SHA_D
    assert boot.cmdline == "console=ttyS0"


def test_command_line_is_image_then_nfs_root_then_parameters(catalog: ImageCatalog) -> None:
    boot = resolve(catalog, kernel="tiny", fs_uri="nfs://10.0.0.5/export/root",
                   kernel_parms="quiet loglevel=3")
    assert boot.cmdline == ("console=ttyS0 root=/dev/nfs nfsroot=10.0.0.5:/export/root rw "
                            "quiet loglevel=3")
    assert boot.disk is None


def test_the_record_keeps_the_options_as_given(catalog: ImageCatalog) -> None:
    record = catalog.resolve(StartOptions(image="tiny", kernel_parms="quiet"), site_admin=False)
    assert record is not None
    assert (record.image, record.kernel, record.kernel_parms) == ("tiny", None, "quiet")
    assert decode_boot(encode_boot(record)) == record
    assert encode_boot(None) is None and decode_boot(None) is None
    assert decode_boot('{"boot": 5}', "x.seuss.usher.test") is None  # logged, not raised


@pytest.mark.parametrize(("options", "message"), [
    ({"image": "nope"}, "--image: no image named nope; see 'image_list'"),
    ({"kernel": "nope"}, "--kernel: no image named nope; see 'image_list'"),
    ({"image": "tiny", "initrd": "nope"}, "--initrd: no image named nope; see 'image_list'"),
])
def test_unknown_images(catalog: ImageCatalog, options: dict[str, str], message: str) -> None:
    with pytest.raises(ImageNotFound) as err:
        catalog.resolve(StartOptions(**options), site_admin=True)  # type: ignore[arg-type]
    assert err.value.message == message
    assert err.value.exit_code == 3


@pytest.mark.parametrize(("options", "message"), [
    ({"kernel": "debian"}, "--kernel debian: that image has no kernel"),
    ({"image": "full", "initrd": "debian"}, "--initrd debian: that image has no initrd"),
    ({"image": "debian", "initrd": "tiny"}, "--initrd needs a kernel"),
    ({"image": "debian", "kernel_parms": "quiet"}, "--kernel_parms needs a kernel"),
    ({"kernel_parms": "quiet"}, "--kernel_parms needs a kernel"),
    ({"kernel": "tiny", "kernel_parms": "a\nb"}, "only printable ASCII"),
    ({"kernel": "tiny", "kernel_parms": "a\tb"}, "only printable ASCII"),
    ({"kernel": "tiny", "kernel_parms": "ré"}, "only printable ASCII"),
    ({"kernel": "tiny", "kernel_parms": "x" * 1025}, "give at most 1024"),
    ({"kernel": "tiny", "kernel_parms": "x" * 1000, "fs_uri": "nfs://10.0.0.5/" + "p" * 900},
     "at most 1900 fit"),
    ({"image": "debian", "fs_uri": "nfs://10.0.0.5/export"}, "root file system of a kernel"),
    ({"kernel": "tiny", "fs_uri": "nfs://nfs.example.org/export"}, "by address"),
    ({"kernel": "tiny", "fs_uri": "nfs://[fd00::5]/export"}, "by address"),
    ({"kernel": "tiny", "fs_uri": "nfs://10.0.0.5:2049/export"}, "without a port"),
    ({"kernel": "tiny", "fs_uri": "nfs://10.0.0.5/a,b"}, "export path must start with /"),
    ({"kernel": "tiny", "fs_uri": "nfs://10.0.0.5/root-%s"}, "export path must start with /"),
    ({"kernel": "tiny", "fs_uri": "nfs://10.0.0.5"}, "export path must start with /"),
    ({"kernel": "tiny", "fs_uri": "nfs://10.0.0.5/a b"}, "without spaces"),
    ({"kernel": "tiny", "fs_uri": "ftp://h/disk"}, "give nfs://SERVER/PATH"),
    ({"kernel": "tiny", "fs_uri": "/srv/disk.raw"}, "give nfs://SERVER/PATH"),
])
def test_bad_options(catalog: ImageCatalog, options: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidOption) as err:
        catalog.resolve(StartOptions(**options), site_admin=False)  # type: ignore[arg-type]
    assert message in err.value.message
    assert err.value.exit_code == 2


def test_nfs_root_is_for_everyone(catalog: ImageCatalog) -> None:
    boot = resolve(catalog, image="tiny", fs_uri="nfs://192.168.7.1/")
    assert boot.cmdline.endswith("root=/dev/nfs nfsroot=192.168.7.1:/ rw")


# ------------------------------------------------------------ disk URLs
@pytest.mark.parametrize("uri", [f"file:///srv/d.raw#sha256={SHA_A}",
                                 f"https://img.example.org/d.qcow2#sha256={SHA_A}"])
def test_only_site_admins_give_disk_urls(catalog: ImageCatalog, uri: str) -> None:
    with pytest.raises(PermissionDenied) as err:
        catalog.resolve(StartOptions(fs_uri=uri), site_admin=False)
    assert err.value.message == ("only site admins give image URLs; use a registered image "
                                 "(image_list)")


def test_a_site_admins_disk_url(catalog: ImageCatalog) -> None:
    boot = resolve(catalog, site_admin=True, fs_uri=f"file:///srv/d.raw#sha256={SHA_A.upper()}")
    assert boot == BootMsg(disk=art("file:///srv/d.raw", SHA_A, "raw"))
    boot = resolve(catalog, site_admin=True, kernel="tiny",
                   fs_uri=f"https://img.example.org/d.qcow2#sha256={SHA_A}&format=qcow2")
    assert boot.disk == art("https://img.example.org/d.qcow2", SHA_A, "qcow2")
    assert boot.kernel is not None and boot.cmdline == "console=ttyS0"


@pytest.mark.parametrize(("options", "message"), [
    ({"fs_uri": "file:///srv/d.raw"}, "needs its checksum: add #sha256=HEX"),
    ({"fs_uri": "file:///srv/d.raw#sha256=abc"}, "is not a SHA-256"),
    ({"fs_uri": f"file:///srv/d.raw#sha256={SHA_A}&format=vmdk"}, "format vmdk is not one of"),
    ({"fs_uri": f"file:///srv/d.raw#sha256={SHA_A}&size=1"}, "unknown #size"),
    ({"fs_uri": f"file://host2/srv/d.raw#sha256={SHA_A}"}, "a path on each host"),
    ({"fs_uri": f"https:///d.raw#sha256={SHA_A}"}, "names no server"),
    ({"image": "debian", "fs_uri": f"file:///srv/d.raw#sha256={SHA_A}"},
     "image debian has one too"),
])
def test_bad_disk_urls(catalog: ImageCatalog, options: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidOption) as err:
        catalog.resolve(StartOptions(**options), site_admin=True)  # type: ignore[arg-type]
    assert message in err.value.message


# ---------------------------------------------------------------- catalogue
def test_users_see_no_urls(catalog: ImageCatalog) -> None:
    infos = catalog.list_images()
    assert [i.name for i in infos] == ["bare-kernel", "debian", "full", "tiny"]
    encoded = msgspec.json.encode(infos).decode()
    assert "example.org" not in encoded and SHA_A not in encoded
    tiny = infos[-1]
    assert (tiny.disk_format, tiny.kernel, tiny.initrd, tiny.cmdline, tiny.description) == (
        None, True, True, "console=ttyS0", "test guest")
    assert infos[1].disk_format == "qcow2" and not infos[1].kernel
    assert catalog.complete("d") == ["debian"] and catalog.complete("") == [
        "bare-kernel", "debian", "full", "tiny"]


# ------------------------------------------------------------ registering
def test_file_urls_are_hashed_here(tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"\0" * 4096)
    row = make_image("local", disk=disk.as_uri(), disk_format="raw")
    assert row.disk_sha256 == hashlib.sha256(b"\0" * 4096).hexdigest()
    assert row.disk_url == disk.as_uri()
    with pytest.raises(NotFound, match="give --kernel-sha256 HEX"):
        make_image("gone", kernel=(tmp_path / "nope").as_uri())


@pytest.mark.parametrize(("options", "message"), [
    ({}, "needs a disk (--disk URL --format F) or a kernel"),
    ({"disk": "http://h/d"}, "--disk needs --format (qcow2 or raw)"),
    ({"disk": "http://h/d", "disk_format": "qcow2"}, "give its checksum with --disk-sha256"),
    ({"kernel": "https://h/k"}, "give its checksum with --kernel-sha256"),
    ({"kernel": "ftp://h/k", "kernel_sha256": SHA_B},
     "unknown URL scheme ftp; use one of file, http, https, nfs"),
    ({"kernel": "h/k", "kernel_sha256": SHA_B}, "unknown URL scheme (none)"),
    ({"disk": "http://h/d", "disk_format": "vmdk", "disk_sha256": SHA_A}, "not one of"),
    ({"kernel": "http://h/k", "kernel_sha256": "xyz"}, "is not a SHA-256"),
    ({"kernel": "http://h/k#x", "kernel_sha256": SHA_B}, "#fragment"),
    ({"disk_format": "raw", "kernel": "http://h/k", "kernel_sha256": SHA_B},
     "give --disk too"),
    ({"disk": "http://h/d", "disk_format": "raw", "disk_sha256": SHA_A,
      "initrd": "http://h/i", "initrd_sha256": SHA_C}, "give --kernel too"),
    ({"disk": "http://h/d", "disk_format": "raw", "disk_sha256": SHA_A, "cmdline": "quiet"},
     "give --kernel too"),
    ({"kernel": "http://h/k", "kernel_sha256": SHA_B, "initrd_sha256": SHA_C},
     "give --initrd too"),
    ({"kernel": "http://h/k", "kernel_sha256": SHA_B, "cmdline": "a\nb"}, "--cmdline must be"),
    ({"kernel": "http://h/k", "kernel_sha256": SHA_B, "description": "two\nlines"},
     "--description must be"),
])
def test_bad_registrations(options: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidOption) as err:
        make_image("img", **options)
    assert message in err.value.message


@pytest.mark.parametrize("name", ["", "Tiny", "-x", "a b", "x" * 65, "é"])
def test_image_names_are_like_range_names(name: str) -> None:
    with pytest.raises(InvalidOption, match="bad image name"):
        make_image(name, kernel="http://h/k", kernel_sha256=SHA_B)


def test_checksums_are_kept_in_lower_case() -> None:
    row = make_image("k", kernel="http://h/k", kernel_sha256=SHA_B.upper())
    assert row.kernel_sha256 == SHA_B
    assert images.image_rec(row).kernel == art("http://h/k", SHA_B)


def test_boot_record_is_dumb_data() -> None:
    record = BootRecord(boot=BootMsg(cmdline="x"), image="tiny")
    assert msgspec.json.decode(encode_boot(record) or "", type=BootRecord) == record
