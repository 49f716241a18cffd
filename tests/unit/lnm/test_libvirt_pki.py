"""Installing the host's site certificate for libvirt and QEMU (usher-lnm libvirt-pki)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from usher.config import LnmConfig, to_toml
from usher.errors import ConfigError
from usher.lnm.cli import main as lnm_main
from usher.lnm.libvirt_pki import install, libvirt_layout, qemu_layout
from usher.protocol.pki import SitePki, issue_host_cert_files, write_site_pki


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[SitePki, Path, Path]:
    """A site PKI and a host certificate for vmm1.example.org."""
    root = tmp_path_factory.mktemp("pki")
    pki = write_site_pki(root / "site", site="example.org", controller_names=["ctl"])
    cert, key = issue_host_cert_files(pki, "vmm1.example.org", root / "hosts")
    return pki, cert, key


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_land_in_libvirts_and_qemus_layouts(site: tuple[SitePki, Path, Path],
                                                  tmp_path: Path) -> None:
    pki, cert, key = site
    done = install(pki.ca_cert, cert, key, pkipath=tmp_path / "libvirt",
                   qemu_dir=tmp_path / "qemu", qemu_group=None)
    layout = {**libvirt_layout(tmp_path / "libvirt"), **qemu_layout(tmp_path / "qemu")}
    assert sorted(done.written) == sorted(layout) and len(layout) == 10
    source = {"ca": pki.ca_cert, "cert": cert, "key": key}
    for path, kind in layout.items():
        assert path.read_bytes() == source[kind].read_bytes(), path
        assert mode(path) == (0o600 if kind == "key" else 0o644), path
    again = install(pki.ca_cert, cert, key, pkipath=tmp_path / "libvirt",
                    qemu_dir=tmp_path / "qemu", qemu_group=None)
    assert again.written == [] and len(again.unchanged) == 10


def test_qemus_keys_are_readable_by_its_group(site: tuple[SitePki, Path, Path],
                                              tmp_path: Path) -> None:
    import grp
    import os

    pki, cert, key = site
    group = grp.getgrgid(os.getgid()).gr_name
    install(pki.ca_cert, cert, key, pkipath=tmp_path / "l", qemu_dir=tmp_path / "q",
            qemu_group=group)
    assert mode(tmp_path / "q" / "server-key.pem") == 0o640
    assert (tmp_path / "q" / "server-key.pem").stat().st_gid == os.getgid()
    assert mode(tmp_path / "l" / "serverkey.pem") == 0o600


def test_another_file_in_the_way_is_replaced_only_when_forced(
        site: tuple[SitePki, Path, Path], tmp_path: Path) -> None:
    pki, cert, key = site
    theirs = tmp_path / "libvirt" / "cacert.pem"
    theirs.parent.mkdir()
    theirs.write_text("another CA\n")
    with pytest.raises(ConfigError, match=r"cacert.pem exists with other content; give --force"):
        install(pki.ca_cert, cert, key, pkipath=tmp_path / "libvirt", qemu_dir=None)
    assert sorted(p.name for p in theirs.parent.iterdir()) == ["cacert.pem"]  # nothing else
    install(pki.ca_cert, cert, key, pkipath=tmp_path / "libvirt", qemu_dir=None, force=True)
    assert theirs.read_bytes() == pki.ca_cert.read_bytes()


def test_files_that_do_not_belong_together_are_refused(site: tuple[SitePki, Path, Path],
                                                       tmp_path: Path) -> None:
    pki, cert, key = site
    other = write_site_pki(tmp_path / "other", site="other.org", controller_names=["c"])
    other_cert, other_key = issue_host_cert_files(other, "vmm1.example.org", tmp_path / "oh")
    cases = [
        ((other.ca_cert, cert, key), "is not signed by the CA"),
        ((pki.ca_cert, cert, other_key), "is not the key of"),
        ((pki.ca_cert, pki.controller_cert, pki.controller_key), "is not a host certificate"),
        ((pki.ca_cert, key, key), "is not a PEM certificate"),
        ((pki.ca_cert, cert, tmp_path / "missing.key"), "cannot read"),
    ]
    for (ca, c, k), message in cases:
        with pytest.raises(ConfigError, match=message):
            install(ca, c, k, pkipath=tmp_path / "out", qemu_dir=tmp_path / "q")
    assert not (tmp_path / "out").exists() and not (tmp_path / "q").exists()
    assert other_cert.exists()


def test_usher_lnm_libvirt_pki_installs_from_its_config(
        site: tuple[SitePki, Path, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    pki, cert, key = site
    config = tmp_path / "lnm.toml"
    config.write_text(to_toml(LnmConfig(ca_cert=str(pki.ca_cert), cert=str(cert),
                                        key=str(key))))
    argv = ["--config", str(config), "libvirt-pki", "--pkipath", str(tmp_path / "l"),
            "--qemu-dir", str(tmp_path / "q")]
    assert lnm_main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("wrote ") == 10 and str(tmp_path / "q" / "client-key.pem") in out
    assert lnm_main(argv) == 0
    assert "10 file(s) already up to date" in capsys.readouterr().out
    (tmp_path / "q" / "ca-cert.pem").write_text("stale\n")
    assert lnm_main(argv) == ConfigError("").exit_code
    assert "give --force" in capsys.readouterr().err
