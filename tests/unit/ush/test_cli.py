"""``ush`` as a new process: batch input runs without cmd2 unless it needs the cmd2 shell.

Loading cmd2 (with prompt_toolkit and rich) costs a script's ``ush list``
about 0.3 s, so each check runs ``usher.ush.cli`` in a fresh interpreter,
against the fake controller on loopback, and looks at which modules it loaded.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.client.fake_controller import PASSWORD, USER, FakeController, Pki
from tests.unit.ush.conftest import Cluster
from usher.config import UshConfig, to_toml

pytestmark = pytest.mark.timeout(60)

HEAVY = ("cmd2", "prompt_toolkit", "rich")
MARK = "loaded heavy modules: "

# Runs ush's main in this interpreter, then reports the heavy modules it loaded.
CHILD = f"""\
import sys
from usher.ush import cli
status = cli.main(sys.argv[1:])
heavy = sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))
sys.stderr.write({MARK!r} + ",".join(heavy) + "\\n")
sys.exit(status)
"""


def ush(home: Path, *args: str, stdin: str | None = None) -> tuple[int, str, str, list[str]]:
    """Run ush; its exit status, stdout, stderr and the heavy modules it loaded."""
    env = {**os.environ, "HOME": str(home), "USH_CONFIG": str(home / "ush.config"),
           "NO_COLOR": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], env=env, input=stdin or "",
                          capture_output=True, text=True, timeout=30, check=False)
    err, _, report = proc.stderr.rpartition(MARK)
    return proc.returncode, proc.stdout, err, [m for m in report.strip().split(",") if m]


@pytest.fixture
def home(tmp_path: Path, pki: Pki, controller: FakeController, cluster: Cluster) -> Path:
    config = UshConfig(controller=f"127.0.0.1:{controller.port}", ca_cert=str(pki.ca),
                       user=USER, password=PASSWORD, history_file="")
    path = tmp_path / "ush.config"
    path.write_text(to_toml(config))
    path.chmod(0o600)
    return tmp_path


def test_the_command_line_modules_do_not_import_cmd2() -> None:
    code = ("import sys, usher.ush.cli, usher.ush.batch; "
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    assert out.strip() == "[]"


def test_batch_commands_run_without_cmd2(home: Path) -> None:
    status, out, err, heavy = ush(home, "start web1", "list --json")
    assert (status, err, heavy) == (0, "", [])
    assert out.startswith("task 0001beef start web1: accepted\nweb1: start done (running)\n[")


def test_piped_commands_run_without_cmd2(home: Path) -> None:
    # Nothing after quit runs, so its help does not call for cmd2.
    status, out, err, heavy = ush(home, stdin="vmm_list\n\n# done\nquit\nhelp\n")
    assert (status, err, heavy) == (0, "", [])
    assert out.startswith("NAME") and "history" not in out


def test_help_falls_back_to_the_cmd2_shell(home: Path) -> None:
    status, out, err, heavy = ush(home, "vmm_list", "help")
    assert (status, err) == (0, "")
    assert "cmd2" in heavy
    assert out.startswith("NAME")
    for verb in ("connect", "history", "quit", "start", "vmm_list", "wait"):
        assert verb in out


def test_a_usage_error_is_cmd2s_message_and_status_1(home: Path) -> None:
    status, out, err, heavy = ush(home, stdin="vmm_list\nstart --ram 0 web1\n")
    assert status == 1 and "cmd2" in heavy
    assert out.startswith("NAME")
    assert err.startswith("Usage: start [-h]")
    assert "Error: argument --ram: 0 is not a positive number" in err


def test_cmd2_syntax_falls_back_to_the_cmd2_shell(home: Path) -> None:
    status, out, err, heavy = ush(home, "vmm_list > /dev/null", "tasks")
    assert (status, err) == (0, "") and "cmd2" in heavy
    assert out == "no tasks\n", "the redirection is cmd2's"


def test_too_much_stdin_is_refused_before_anything_runs(home: Path,
                                                        controller: FakeController) -> None:
    status, out, err, heavy = ush(home, stdin="vmm_list\n" * 200_000)
    assert (status, out, heavy) == (2, "", [])
    assert err == "error: more than 1048576 characters of commands on stdin; run them in " \
        "smaller parts\n"
    assert controller.hellos == 0
