"""``usher-controller image add|list|del`` on a freshly initialised site."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest

from usher.controller import cli

SHA = "ab" * 32

Run = Callable[..., tuple[int, str, str]]
"""``run(*argv)`` runs ``usher-controller image *argv``: (exit code, stdout, stderr)."""


@pytest.fixture
def config(tmp_path: Path) -> str:
    path = tmp_path / "etc" / "controller.toml"
    assert cli.main(["--config", str(path), "init", "--site", "usher.test",
                     "--state-dir", str(tmp_path / "state")]) == 0
    return str(path)


@pytest.fixture
def run(config: str, capsys: pytest.CaptureFixture[str]) -> Run:
    def run_image(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = cli.main(["--config", config, "image", *argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run_image


def test_image_add_list_del(run: Run, tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"kernel bytes")
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(b"initrd bytes")
    code, out, err = run("add", "tiny", "--kernel", kernel.as_uri(), "--initrd",
                         initrd.as_uri(), "--cmdline", "console=ttyS0",
                         "--description", "the test guest")
    assert code == 0, err
    digest = hashlib.sha256(b"kernel bytes").hexdigest()
    assert f"kernel {digest}" in out and "SIGHUP" in out
    code, out, err = run("add", "deb", "--disk", "https://img.example.org/deb.qcow2",
                         "--format", "qcow2", "--disk-sha256", SHA)
    assert code == 0, err

    code, out, _ = run("list")
    lines = [line.split() for line in out.splitlines()]
    assert lines == [["NAME", "DISK", "KERNEL", "INITRD", "DESCRIPTION"],
                     ["deb", "qcow2", "-", "-", "-"],
                     ["tiny", "-", "yes", "yes", "the", "test", "guest"]]
    code, out, _ = run("list", "-l")
    assert "https://img.example.org/deb.qcow2" in out and f"sha256 {SHA}" in out
    assert kernel.as_uri() in out and "cmdline console=ttyS0" in out

    code, _, err = run("add", "tiny", "--kernel", kernel.as_uri())
    assert code == 4 and "an image named tiny exists" in err
    code, out, _ = run("del", "tiny")
    assert code == 0 and "keep their disks" in out
    code, _, err = run("del", "tiny")
    assert code == 3 and "no image named tiny" in err
    code, out, _ = run("list")
    assert "tiny" not in out


@pytest.mark.parametrize(("argv", "message"), [
    (["add", "x", "--disk", "http://h/d.raw", "--format", "raw"],
     "give its checksum with --disk-sha256 HEX"),
    (["add", "x", "--kernel", "https://h/k"], "give its checksum with --kernel-sha256 HEX"),
    (["add", "x", "--disk", "http://h/d.raw", "--disk-sha256", SHA], "--disk needs --format"),
    (["add", "x", "--kernel", "ftp://h/k", "--kernel-sha256", SHA],
     "unknown URL scheme ftp; use one of file, http, https, nfs"),
    (["add", "x", "--kernel", "nfs://h:2049/export/k", "--kernel-sha256", SHA],
     "give an NFS server's port as ?nfsport=N"),
    (["add", "x", "--description", "nothing"], "needs a disk"),
    (["add", "Bad", "--kernel", "http://h/k", "--kernel-sha256", SHA], "bad image name"),
])
def test_bad_image_add(run: Run, argv: list[str], message: str) -> None:
    code, out, err = run(*argv)
    assert code == 2, err
    assert err.startswith("usher-controller: ") and message in err
    assert len(err.splitlines()) == 1
    assert run("list")[1].splitlines()[1:] == []


def test_an_nfs_image_is_registered_by_url(run: Run) -> None:
    url = "nfs://10.0.0.5/export/images/k?version=4&nfsport=2049"
    code, _, err = run("add", "nk", "--kernel", url, "--kernel-sha256", SHA)
    assert code == 0, err
    assert url in run("list", "-l")[1]


def test_missing_file_is_not_found(run: Run, tmp_path: Path) -> None:
    code, _, err = run("add", "x", "--disk", (tmp_path / "nope.raw").as_uri(), "--format",
                       "raw")
    assert code == 3 and "does not exist on this machine" in err and "--disk-sha256" in err


def test_format_is_pinned_by_choice(run: Run) -> None:
    with pytest.raises(SystemExit) as exc:
        run("add", "x", "--disk", "http://h/d", "--format", "vmdk", "--disk-sha256", SHA)
    assert exc.value.code == 2
