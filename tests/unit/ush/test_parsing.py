"""Tests of ush's command line: each verb's parser, its help, and what was removed.

The parsers are the ones the cmd2 app actually runs (cmd2 builds one per
command from the verb's builder); the batch runner's plain parsers, from the
same builders, must agree with them. No controller is needed.
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Iterator

import pytest
from cmd2 import Cmd2ArgumentParser

from usher.config import UshConfig
from usher.ush.batch import COMMANDS
from usher.ush.completion import image_name_choices, initrd_image_choices, kernel_image_choices
from usher.ush.parsers import PLAIN_KIT, ParseRefused
from usher.ush.shell import REMOVED_BUILTINS, UshApp

VERBS = {
    "connect", "reconnect", "start", "shutdown", "reboot", "cycle", "destroy", "pause",
    "resume", "hibernate", "migrate", "list", "vmm_list", "vmm_disable", "vmm_enable",
    "vmm_remove", "image_list", "tasks", "wait", "console", "stats",
}
BUILTINS = {"help", "history", "quit"}


@pytest.fixture
def app() -> Iterator[UshApp]:
    shell = UshApp(UshConfig(history_file=""), interactive=False, stdin=io.StringIO(),
                   stdout=io.StringIO())
    yield shell
    shell.session.close()


def parser_of(app: UshApp, command: str) -> Cmd2ArgumentParser:
    func = app.get_command_func(command)
    assert func is not None, command
    parser = app.command_parsers.get(func)
    assert parser is not None, command
    return parser


def parse(app: UshApp, line: str) -> argparse.Namespace:
    command, *argv = line.split()
    return parser_of(app, command).parse_args(argv)


def output(app: UshApp) -> str:
    stream = app.stdout
    assert isinstance(stream, io.StringIO)
    return stream.getvalue()


# ---------------------------------------------------------------- commands
def test_the_commands_are_the_verbs_and_a_few_builtins(app: UshApp) -> None:
    assert set(app.get_visible_commands()) == VERBS | BUILTINS


@pytest.mark.parametrize("name", REMOVED_BUILTINS)
def test_unexpected_builtins_are_gone(app: UshApp, name: str) -> None:
    assert app.get_command_func(name) is None
    app.onecmd_plus_hooks(f"{name} x")
    assert app.exit_status == 1


@pytest.mark.parametrize("line", ["!ls", "@script.txt"])
def test_shell_and_script_shortcuts_are_gone(app: UshApp, line: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    app.onecmd_plus_hooks(line)
    assert "unknown command" in capsys.readouterr().err


def test_question_mark_is_help(app: UshApp) -> None:
    app.onecmd_plus_hooks("?")
    assert "vmm_list" in output(app)


# ----------------------------------------------------------------- parsing
def test_start_options(app: UshApp) -> None:
    args = parse(app, "start {1..8}.web redfish.sneetch --ram 512 --vcpus 2 --vmm vmm3")
    assert args.names == ["{1..8}.web", "redfish.sneetch"], "batches go to the controller as typed"
    assert (args.ram, args.vcpus, args.vmm) == (512, 2, "vmm3")
    args = parse(app, "start web1")
    assert (args.ram, args.vcpus, args.vmm) == (None, None, None)
    assert (args.image, args.kernel, args.initrd, args.kernel_parms, args.fs_uri) == (
        None, None, None, None, None)


def test_start_boot_options(app: UshApp) -> None:
    args = parse(app, "start t1 --image debian --kernel tiny --initrd tiny "
                      "--kernel_parms quiet --fs_uri nfs://10.0.0.5/export")
    assert (args.image, args.kernel, args.initrd, args.kernel_parms, args.fs_uri) == (
        "debian", "tiny", "tiny", "quiet", "nfs://10.0.0.5/export")
    options = {a.dest: a for a in parser_of(app, "start")._actions}
    providers = {dest: options[dest].get_choices_provider()  # type: ignore[attr-defined]
                 for dest in ("image", "kernel", "initrd", "kernel_parms", "fs_uri")}
    assert providers == {"image": image_name_choices, "kernel": kernel_image_choices,
                         "initrd": initrd_image_choices, "kernel_parms": None, "fs_uri": None}
    assert all(options[dest].help for dest in providers)


def test_image_list(app: UshApp) -> None:
    assert parse(app, "image_list").json is False
    assert parse(app, "image_list --json").json is True


USAGE_ERRORS = ["start", "start web1 --ram 0", "start web1 --ram lots", "start web1 --vcpus -1",
                "start web1 --image", "image_list tiny",
                "shutdown", "destroy", "migrate --vmm vmm2", "vmm_disable", "wait",
                "vmm_disable a b", "list --bogus", "connect --password x", "reconnect now"]


@pytest.mark.parametrize("line", USAGE_ERRORS)
def test_usage_errors(app: UshApp, line: str) -> None:
    with pytest.raises(SystemExit):
        parse(app, line)


@pytest.mark.parametrize("verb", ["shutdown", "reboot", "cycle", "pause", "resume",
                                  "hibernate"])
def test_plain_vm_verbs(app: UshApp, verb: str) -> None:
    assert parse(app, f"{verb} web1 {{1..4}}.db").names == ["web1", "{1..4}.db"]


def test_destroy_and_migrate(app: UshApp) -> None:
    assert parse(app, "destroy web1").force is False
    assert parse(app, "destroy --force web1").force is True
    args = parse(app, "migrate web1 web2 --vmm vmm2")
    assert (args.names, args.vmm) == (["web1", "web2"], "vmm2")
    assert parse(app, "migrate web1").vmm is None


def test_list(app: UshApp) -> None:
    args = parse(app, "list")
    assert (args.names, args.all, args.json, args.long) == ([], False, False, False)
    args = parse(app, "list web1 {1..3}.db --all --json -l")
    assert (args.names, args.all, args.json, args.long) == (["web1", "{1..3}.db"], True,
                                                            True, True)


def test_stats(app: UshApp) -> None:
    args = parse(app, "stats")
    assert (args.names, args.samples, args.all, args.json) == ([], None, False, False)
    line = "stats web1 {1..3}.db --samples 60 --all --json"
    args = parse(app, line)
    assert (args.names, args.samples, args.all, args.json) == (["web1", "{1..3}.db"], 60,
                                                               True, True)
    assert vars(plain_parse(line)) == vars(args)
    for bad in ("stats --samples 0", "stats --samples x"):
        with pytest.raises(ParseRefused):
            plain_parse(bad)


def test_vmm_commands(app: UshApp) -> None:
    assert parse(app, "vmm_list --json").json is True
    for verb in ("vmm_disable", "vmm_enable", "vmm_remove"):
        assert parse(app, f"{verb} vmm3").name == "vmm3"


def test_task_commands(app: UshApp) -> None:
    args = parse(app, "tasks")
    assert (args.active, args.json, args.limit) == (False, False, 50)
    args = parse(app, "tasks --active --json --limit 5")
    assert (args.active, args.json, args.limit) == (True, True, 5)
    args = parse(app, "wait 3f2a1b2c --timeout 30")
    assert (args.id, args.timeout) == ("3f2a1b2c", 30)


def test_connect_takes_no_password(app: UshApp) -> None:
    args = parse(app, "connect --user seuss --controller ctl.example.org:7443")
    assert (args.user, args.controller) == ("seuss", "ctl.example.org:7443")
    options = {o for action in parser_of(app, "connect")._actions for o in action.option_strings}
    assert not any("pass" in o for o in options)


# -------------------------------------------------------------------- help
@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_verb_has_verbose_help(app: UshApp, verb: str) -> None:
    parser = parser_of(app, verb)
    description = parser.description
    assert isinstance(description, str)
    brief, _, rest = description.partition("\n\n")
    assert brief and rest, "a brief line, then what the command does"
    assert "example:" in rest
    examples = rest.split("example:")[1].strip().splitlines()
    assert examples and all(line.strip().startswith(verb) for line in examples)
    func = app.get_command_func(verb)
    assert func is not None and func.__doc__ and func.__doc__.strip() == brief


@pytest.mark.parametrize("verb", ["start", "shutdown", "reboot", "cycle", "destroy", "pause",
                                  "resume", "hibernate", "migrate"])
def test_vm_verbs_say_which_states_they_apply_to(app: UshApp, verb: str) -> None:
    description = parser_of(app, verb).description
    assert isinstance(description, str)
    assert "Applies to:" in description or verb == "start"
    if verb == "start":
        assert "stopped" in description and "hibernated" in description


def test_help_command_prints_the_example(app: UshApp) -> None:
    app.onecmd_plus_hooks("help start")
    text = output(app)
    assert "start {1..8}.web --ram 512" in text
    assert "--vmm HOST" in text
    assert "--image NAME" in text and "start t1 --image tiny" in text
    assert app.exit_status == 0


def test_help_lists_brief_descriptions(app: UshApp) -> None:
    app.onecmd_plus_hooks("help -v")
    text = output(app)
    assert "start VM(s) (creating if necessary)" in text
    assert "show list of VMM names" in text


# -------------------------------------------------------- failure recording
def test_usage_error_is_exit_status_1_but_help_is_not(app: UshApp) -> None:
    app.onecmd_plus_hooks("start -h")
    assert app.exit_status == 0
    app.onecmd_plus_hooks("start --ram 0 web1")
    assert app.exit_status == 1


def test_commands_without_a_session_fail_clearly(app: UshApp,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    app.onecmd_plus_hooks("list")
    assert capsys.readouterr().err.strip() == "error: not connected; type connect"
    assert app.exit_status == 6  # NotConnected is an Unavailable


def test_completion_without_a_session_is_empty_at_once(app: UshApp) -> None:
    assert app.session.complete_names("vm", "we") == []
    assert app.session.complete_names("host", "") == []




# ------------------------------------------------- batch mode's plain parsers
def plain_parse(line: str) -> argparse.Namespace:
    command, *argv = line.split()
    return COMMANDS[command].build_parser(PLAIN_KIT).parse_args(argv)


@pytest.mark.parametrize("line", [
    "start {1..8}.web redfish.sneetch --ram 512 --vcpus 2 --vmm vmm3 --ip_range lab --ip 10.0.0.9",
    "start web1", "start t1 --image debian --kernel tiny --initrd tiny --kernel_parms quiet",
    "start t1 --fs_uri nfs://10.0.0.5/x", "image_list", "image_list --json",
    "shutdown web1 {1..4}.db", "reboot a", "cycle a", "pause a", "resume a",
    "hibernate a", "destroy --force web1", "migrate web1 web2 --vmm vmm2", "migrate web1",
    "list", "list web1 {1..3}.db --all --json -l", "list --lo", "vmm_list --json",
    "vmm_disable vmm3", "vmm_enable vmm3", "vmm_remove vmm3", "tasks --active --limit 5",
    "tasks", "wait 3f2a --timeout 30", "connect --user seuss --controller c:1", "reconnect",
])
def test_plain_parsers_read_lines_as_cmd2_does(app: UshApp, line: str) -> None:
    assert vars(plain_parse(line)) == vars(parse(app, line))


@pytest.mark.parametrize("line", [*USAGE_ERRORS, "start -h", "list --help", "tasks --he"])
def test_plain_parsers_refuse_without_printing(line: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ParseRefused):
        plain_parse(line)
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_plain_parsers_have_the_same_help(app: UshApp, verb: str) -> None:
    plain = COMMANDS[verb].build_parser(PLAIN_KIT)
    cmd2 = parser_of(app, verb)
    assert (plain.prog, plain.description) == (cmd2.prog, cmd2.description)
    assert [(a.option_strings, a.dest, a.help) for a in plain._actions] == \
        [(a.option_strings, a.dest, a.help) for a in cmd2._actions]
