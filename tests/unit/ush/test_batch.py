"""ush driven as a script would drive it, against a fake controller on loopback.

Batch mode (``ush 'cmd' 'cmd'``): each command's tasks are waited for and
their completions printed before the next command; errors are one line on
stderr; the exit status is the first failure's. Every run is checked twice,
through the cmd2-free batch runner and through the cmd2 shell it falls back
to, so the two stay the same. How lines are planned (and which go to cmd2),
and how the batch sink prints, are checked here too; the controller's own
behaviour is the end-to-end tests' business.
"""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from cmd2.parsing import StatementParser

from tests.unit.client.fake_controller import DOMAIN, PASSWORD, USER, FakeController, Pki
from tests.unit.ush.conftest import Cluster
from usher.config import UshConfig
from usher.errors import InvalidRequest, InvalidState
from usher.ush.batch import (
    COMMANDS,
    BatchRunner,
    Step,
    StreamSink,
    plan,
    read_lines,
    split_line,
    wants_colour,
)
from usher.ush.parsers import Command
from usher.ush.session import Session
from usher.ush.shell import UshApp

pytestmark = pytest.mark.timeout(30)


def make_config(pki: Pki, port: int, **config: Any) -> UshConfig:
    settings: dict[str, Any] = dict(controller=f"127.0.0.1:{port}", ca_cert=str(pki.ca),
                                    user=USER, password=PASSWORD, history_file="")
    settings.update(config)
    return UshConfig(**settings)


class Runner:
    """Runs batch lines one way (``batch`` or ``cmd2``) and keeps what went to stdout."""

    def __init__(self, kind: str, config: UshConfig) -> None:
        self.kind = kind
        self.stdout = io.StringIO()
        if kind == "batch":
            self.batch = BatchRunner(config, StreamSink(stdout=self.stdout), stdin=io.StringIO())
        else:
            self.app = UshApp(config, interactive=False, stdin=io.StringIO(),
                              stdout=self.stdout)

    def run(self, lines: Sequence[str]) -> int:
        if self.kind == "cmd2":
            return self.app.run_commands(lines)
        steps = plan(lines)
        assert steps is not None, f"{lines} would go to cmd2"
        return self.batch.run(steps)

    def out(self) -> list[str]:
        return self.stdout.getvalue().splitlines()

    def close(self) -> None:
        (self.batch.session if self.kind == "batch" else self.app.session).close()


@pytest.fixture(params=["batch", "cmd2"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def runner(kind: str, pki: Pki, controller: FakeController, cluster: Cluster,
           ) -> Iterator[Runner]:
    run = Runner(kind, make_config(pki, controller.port))
    yield run
    run.close()


# --------------------------------------------------------- running commands
def test_commands_run_in_order_waiting_for_their_tasks(runner: Runner,
                                                       controller: FakeController) -> None:
    status = runner.run(["start web1 {1..2}.db --ram 512", "list"])
    assert status == 0
    lines = runner.out()
    assert lines[:4] == [
        "task 0001beef start web1: accepted",
        "task 0002beef start {1..2}.db: accepted",
        "web1: start done (running)",
        "{1..2}.db: start done (running)",
    ]
    assert lines[4].split()[:5] == ["NAME", "STATE", "HOST", "IP", "RAM"]
    assert [line.split()[0] for line in lines[5:]] == ["web1", "{1..2}.db"]
    start = controller.ops("vm.start")[0][2]
    assert start.names == ["web1", "{1..2}.db"] and start.options.ram == 512


def test_start_sends_the_boot_options(runner: Runner, controller: FakeController) -> None:
    status = runner.run([
        "start t1 --image tiny --kernel_parms 'quiet loglevel=3'",
        "start t2 --kernel tiny --initrd tiny --fs_uri nfs://10.0.0.5/export/t2",
        "start t3 --fs_uri file:///srv/d.qcow2#sha256=abc&format=qcow2"])
    assert status == 0
    first, second, third = (op[2].options for op in controller.ops("vm.start"))
    assert (first.image, first.kernel_parms, first.kernel) == ("tiny", "quiet loglevel=3", None)
    assert (second.kernel, second.initrd, second.fs_uri) == (
        "tiny", "tiny", "nfs://10.0.0.5/export/t2")
    assert third.fs_uri == "file:///srv/d.qcow2#sha256=abc&format=qcow2"


def test_unknown_image_is_one_error_line(runner: Runner,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    status = runner.run(["start t1 --image nope", "image_list"])
    assert status == 3  # NotFound
    assert capsys.readouterr().err == "error: --image: no image named nope; see 'image_list'\n"
    assert runner.out()[0].split() == ["NAME", "DISK", "KERNEL", "INITRD", "DESCRIPTION"]


def test_image_list_table_and_json(runner: Runner) -> None:
    assert runner.run(["image_list", "image_list --json"]) == 0
    lines = runner.out()
    assert [line.split() for line in lines[:3]] == [
        ["NAME", "DISK", "KERNEL", "INITRD", "DESCRIPTION"],
        ["debian", "qcow2", "-", "-", "Debian", "12"],
        ["tiny", "-", "yes", "yes", "test", "guest"]]
    data = json.loads("\n".join(lines[3:]))
    assert [(i["name"], i["disk_format"], i["kernel"]) for i in data] == [
        ("debian", "qcow2", False), ("tiny", None, True)]
    assert not any("url" in key or "sha" in key for item in data for key in item)


def test_failed_task_fails_the_run(runner: Runner, capsys: pytest.CaptureFixture[str]) -> None:
    status = runner.run(["start bad web1", "vmm_list"])
    assert status == 1
    assert "bad: start FAILED: no host has enough memory" in capsys.readouterr().err
    lines = runner.out()
    assert "web1: start done (running)" in lines
    assert lines[-2].split() == ["NAME", "STATE", "CPUS", "MEM(MiB)", "USED", "VMS"]


def test_refused_command_is_one_error_line(runner: Runner,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    status = runner.run(["shutdown web1", "vmm_list --json"])
    assert status == InvalidState.exit_code
    assert capsys.readouterr().err == \
        "error: web1 is stopped; shutdown needs a running VM\n"
    # stdout holds only the JSON of the command that worked.
    assert json.loads("\n".join(runner.out()))[0]["name"] == "vmm1"


def test_json_output_is_parseable(runner: Runner) -> None:
    assert runner.run(["start web1", "list --json"]) == 0
    lines = runner.out()
    data = json.loads("\n".join(lines[lines.index("[") :]))
    assert [vm["name"] for vm in data] == [f"web1.{DOMAIN}"]


def test_wait_takes_a_short_id(runner: Runner) -> None:
    assert runner.run(["start web1", "wait 0001", "tasks"]) == 0
    lines = runner.out()
    assert lines.count("web1: start done (running)") == 2, "wait prints the outcome again"
    assert lines[-2].split()[:4] == ["ID", "OP", "NAME", "STATE"]


def test_quit_stops_and_blank_and_comment_lines_are_skipped(runner: Runner) -> None:
    assert runner.run(["\n", "  # a comment\n", "vmm_list\n", "quit\n", "list\n"]) == 0
    lines = runner.out()
    assert lines[0].startswith("NAME") and len(lines) == 2, "list never ran"


def test_connect_replaces_the_session(runner: Runner, controller: FakeController) -> None:
    assert runner.run(["connect", "vmm_list"]) == 0
    assert runner.out()[0] == f"connected to 127.0.0.1:{controller.port} as {USER} " \
        f"(domain {DOMAIN})"
    assert controller.hellos == 2


def test_connect_as_another_user_needs_a_terminal(runner: Runner,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert runner.run(["connect --user other", "vmm_list"]) == 10
    assert capsys.readouterr().err.startswith("error: no password in the ush config")
    assert runner.out()[0].startswith("NAME"), "the session carries on"


def test_unreachable_controller(kind: str, pki: Pki,
                                capsys: pytest.CaptureFixture[str]) -> None:
    status = Runner(kind, make_config(pki, 1)).run(["list"])
    assert status == 6
    assert capsys.readouterr().err.startswith("error: cannot connect to 127.0.0.1:1: ")


def test_wrong_password(kind: str, pki: Pki, controller: FakeController,
                        capsys: pytest.CaptureFixture[str]) -> None:
    status = Runner(kind, make_config(pki, controller.port, password="nope")).run(["list"])
    assert status == 5
    assert capsys.readouterr().err == "error: wrong user name or password\n"
    assert controller.hellos == 1


def test_a_bug_in_a_command_fails_the_run_and_the_next_runs(
        pki: Pki, controller: FakeController, cluster: Cluster,
        capsys: pytest.CaptureFixture[str]) -> None:
    def broken(session: Session, args: argparse.Namespace) -> None:
        raise RuntimeError("oops")

    runner = Runner("batch", make_config(pki, controller.port))
    steps = plan(["vmm_list"])
    assert steps is not None
    bug = Step(Command("list", COMMANDS["list"].build_parser, broken), argparse.Namespace())
    assert runner.batch.run([bug, *steps]) == 1
    assert capsys.readouterr().err == "RuntimeError: oops\n"
    assert runner.out()[0].startswith("NAME")


# ------------------------------------------------------------------ planning
@pytest.mark.parametrize("line", [
    "help", "help start", "?", "?start", "history", "quit now", "bogus", "shell ls", "!ls",
    "eof", "list; vmm_list", "list | grep web", "list > out.txt", "list >> out.txt",
    "list 'web1", 'start "a b', "start", "start -h", "list --help", "list --he",
    "start web1 --ram 0", "wait", "vmm_disable a b", "connect --password x", '"list"',
    "start t1 --image", "image_list x", "image_list -h", "start t1 --kernel_parms 'a | b'",
    "list\"x\"",
])
def test_lines_only_cmd2_runs_alike_go_to_cmd2(line: str) -> None:
    assert plan(["vmm_list", line]) is None


def test_plan_parses_every_line_before_running() -> None:
    steps = plan(["start {1..2}.web --ram 512\n", "\n", "# note\n", "list -l --json",
                  "quit", "help"])
    assert steps is not None
    assert [s.command.name if s.command else "quit" for s in steps] == ["start", "list",
                                                                        "quit"]
    assert steps[0].args.names == ["{1..2}.web"] and steps[0].args.ram == 512
    assert steps[1].args.long and steps[1].args.json


def test_plan_of_nothing_is_nothing() -> None:
    assert plan([]) == [] and plan(["", "# only a comment"]) == []


@pytest.mark.parametrize("line", [
    "start web1 {1..4}.db --ram 512", "start 'a b' \"c d\" e", "start a\"b c\" d",
    "start x\\ y", "start 'it''s'", "list \"\" ''", "start \"'x'\"", "list  web1\t  web2 ",
    "start web1 #2", "start -- -x",
])
def test_lines_split_as_cmd2_splits_them(line: str) -> None:
    assert split_line(line) == StatementParser().parse(line).argv


def test_batch_and_cmd2_know_the_same_verbs() -> None:
    app = UshApp(UshConfig(history_file=""), interactive=False, stdin=io.StringIO(),
                 stdout=io.StringIO())
    assert set(COMMANDS) | {"help", "history", "quit"} == set(app.get_visible_commands())


# --------------------------------------------------------------------- stdin
def test_stdin_is_read_whole_and_split_as_a_file_iterates() -> None:
    text = "start web1\r\nlist\x0bweb1\n\nvmm_list"
    assert read_lines(io.StringIO(text)) == list(io.StringIO(text))
    assert read_lines(io.StringIO("list\n" * 4), limit=20) == ["list\n"] * 4


def test_stdin_is_bounded() -> None:
    with pytest.raises(InvalidRequest, match="more than 20 characters"):
        read_lines(io.StringIO("list\n" * 5), limit=20)


# ---------------------------------------------------------------------- sink
def test_sink_splits_stdout_and_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    sink = StreamSink()
    sink.out("table")
    sink.err("error: no", error=True)
    sink.err("web1: now running", error=False)
    assert capsys.readouterr() == ("table\n", "error: no\nweb1: now running\n")


def test_sink_keeps_the_terminal_safe_and_colours_errors_like_cmd2() -> None:
    out, err = io.StringIO(), io.StringIO()
    sink = StreamSink(out, err, colour_errors=True)
    sink.out("a\tb\x1b[2Jc\x07d")
    sink.err("error: x", error=True)
    sink.err("status", error=False)
    assert out.getvalue() == "a       bcd\n"
    assert err.getvalue() == "\x1b[91merror: x\x1b[0m\nstatus\n"


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("tty", "environ", "expected"), [
    (True, {}, True),
    (False, {}, False),
    (True, {"NO_COLOR": "1"}, False),
    (True, {"NO_COLOR": ""}, True),
    (False, {"FORCE_COLOR": "1"}, True),
    (True, {"FORCE_COLOR": ""}, False),
    (True, {"TTY_COMPATIBLE": "0", "FORCE_COLOR": "1"}, False),
    (False, {"TTY_COMPATIBLE": "1"}, True),
])
def test_errors_are_coloured_where_cmd2_colours_them(tty: bool, environ: dict[str, str],
                                                     expected: bool) -> None:
    assert wants_colour(Tty() if tty else io.StringIO(), environ) is expected
