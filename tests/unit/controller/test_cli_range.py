"""``usher-controller range add|list|del`` on a freshly initialised site."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from usher.controller import cli


@pytest.fixture
def config(tmp_path: Path) -> str:
    path = tmp_path / "etc" / "controller.toml"
    assert cli.main(["--config", str(path), "init", "--site", "usher.test",
                     "--state-dir", str(tmp_path / "state")]) == 0
    return str(path)


def test_range_add_list_del(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = cli.main(["--config", config, "range", *argv])
        out, err = capsys.readouterr()
        return code, out, err

    code, _, err = run("add", "bad", "10.0.0.1/24")
    assert code == 2 and "bad CIDR" in err
    if shutil.which("ip"):  # the machine's own loopback subnet is 127.0.0.0/8
        code, _, err = run("add", "lo", "127.0.0.0/24")
        assert code == 4 and "subnet of this machine" in err
    code, out, _ = run("add", "lab", "10.66.0.0/24", "--vlan", "20", "--default",
                       "--allow", "seuss", "horton")
    assert code == 0 and "gateway 10.66.0.1" in out
    code, out, _ = run("list")
    [line] = [x for x in out.splitlines() if x.startswith("lab ")]
    assert line.split() == ["lab", "10.66.0.0/24", "10.66.0.1", "20", "0", "yes",
                            "horton,seuss"]
    code, out, _ = run("add", "gpu", "10.67.0.0/24", "--allow-group", "gpu-users")
    assert code == 0
    code, out, _ = run("list")
    [line] = [x for x in out.splitlines() if x.startswith("gpu ")]
    assert line.split()[-1] == "@gpu-users"  # members of the group only
    assert run("del", "gpu")[0] == 0
    code, _, err = run("del", "nope")
    assert code == 3 and "no IP range named nope" in err
    code, out, _ = run("del", "lab")
    assert code == 0 and "deleted" in out
    code, out, _ = run("list")
    assert "lab " not in out
