"""Batch ush without cmd2: ``ush 'start web1' 'list'`` and commands piped on stdin.

Importing cmd2 (with prompt_toolkit and rich) costs about 0.3 s, more than a
script's ``ush list`` of 500 VMs takes otherwise, so batch input runs here
when it can: each line is split the way cmd2 splits it, parsed by the verb's
plain parser (:data:`~usher.ush.parsers.PLAIN_KIT`) and run by the verb's
body against a :class:`~usher.ush.session.Session` that waits for each
command's tasks, exactly as the cmd2 shell does in batch mode.

:func:`plan` decides for the whole input before anything runs. Input with
any line this module would not run the way the cmd2 shell does gives None,
and the caller runs all of it in the cmd2 shell
(:meth:`usher.ush.shell.UshApp.run_commands`): a verb only cmd2 has
(``help``, ``?``, ``history``, ``quit`` with arguments, an unknown word),
cmd2 syntax (``;``, ``|``, ``>``, ``>>``, unbalanced quotes), or a line whose
parse asks for help or fails (cmd2 prints the help and the usage message in
its own layout). Deciding line by line instead would switch shells halfway
through a run: a second login, and the first failure and the tasks already
announced split between two sessions.
"""

from __future__ import annotations

import argparse
import io
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import IO

from usher.client import Client
from usher.config import UshConfig
from usher.errors import InvalidRequest
from usher.ush import (
    host_commands,
    image_commands,
    session_commands,
    stats_commands,
    task_commands,
    vm_commands,
)
from usher.ush.parsers import PLAIN_KIT, Command, ParseRefused
from usher.ush.session import ClientFactory, Session, Sink

__all__ = ["COMMANDS", "MAX_STDIN_CHARS", "BatchRunner", "Step", "StreamSink", "plan",
           "read_lines", "split_line", "wants_colour"]

COMMANDS: dict[str, Command] = {c.name: c for c in (
    *session_commands.COMMANDS, *vm_commands.COMMANDS, *host_commands.COMMANDS,
    *image_commands.COMMANDS, *task_commands.COMMANDS, *stats_commands.COMMANDS)}
"""The verbs batch mode runs itself, by name."""

MAX_STDIN_CHARS = 1 << 20
"""Most commands read from stdin (1 MiB of text): all of it is read before
anything runs (see :func:`plan`), so it must be bounded."""

# cmd2 reads these as a command terminator (;) and output redirection (|, >, >>);
# a line holding one anywhere, even quoted, goes to cmd2 whole.
_CMD2_SYNTAX = (";", "|", ">")
_QUOTES = ('"', "'")

# What rich (under cmd2) drops from a printed line: ANSI control sequences and
# C0 control characters but tab and newline. A controller's message must not
# drive the terminal.
_CONTROL = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-_]?|[\x00-\x08\x0b-\x1f]")
_RED = "\x1b[91m"  # cmd2's error style (bright red)
_RESET = "\x1b[0m"


@dataclass(frozen=True)
class Step:
    """One parsed line; ``command`` None is ``quit``."""

    command: Command | None
    args: argparse.Namespace


def split_line(line: str) -> list[str]:
    """``line`` as cmd2 splits it: non-POSIX shlex, then outer quotes stripped.

    cmd2 splits a line into the command and its argument string, joins the
    arguments back with spaces and splits them again; doing the same keeps
    odd quoting (``a"b c"``, a trailing backslash) identical.

    Raises:
        ValueError: unbalanced quotes.
    """
    tokens = shlex.split(line, comments=False, posix=False)
    if not tokens:
        return []
    args = shlex.split(" ".join(tokens[1:]), comments=False, posix=False)
    return [tokens[0], *(_unquote(arg) for arg in args)]


def _unquote(token: str) -> str:
    if len(token) > 1 and token[0] == token[-1] and token[0] in _QUOTES:
        return token[1:-1]
    return token


@cache
def _plain_parser(name: str) -> argparse.ArgumentParser:
    return COMMANDS[name].build_parser(PLAIN_KIT)


def plan(lines: Sequence[str]) -> list[Step] | None:
    """The steps to run ``lines``, or None when the cmd2 shell must run them all.

    Blank lines and lines starting with ``#`` are skipped; nothing after a
    ``quit`` is looked at, as it never runs.
    """
    steps: list[Step] = []
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        step = _plan_line(line.rstrip("\n"))
        if step is None:
            return None
        steps.append(step)
        if step.command is None:
            break
    return steps


def _plan_line(line: str) -> Step | None:
    if any(mark in line for mark in _CMD2_SYNTAX):
        return None
    try:
        words = split_line(line)
    except ValueError:
        return None
    if not words:
        return None
    verb, argv = words[0], words[1:]
    if verb == "quit":
        return Step(None, argparse.Namespace()) if not argv else None
    command = COMMANDS.get(verb)
    if command is None:
        return None
    try:
        return Step(command, _plain_parser(verb).parse_args(argv))
    except ParseRefused:
        return None


def read_lines(stream: IO[str], limit: int = MAX_STDIN_CHARS) -> list[str]:
    """All lines of ``stream``, each with its newline, as iterating it would give them.

    Raises:
        InvalidRequest: the stream holds more than ``limit`` characters.
    """
    text = stream.read(limit + 1)
    if len(text) > limit:
        raise InvalidRequest(f"more than {limit} characters of commands on stdin; "
                             f"run them in smaller parts")
    return list(io.StringIO(text))


def wants_colour(stream: IO[str], environ: Mapping[str, str]) -> bool:
    """Whether cmd2 would colour error lines on ``stream`` (it leaves that to rich).

    On a terminal, unless ``NO_COLOR`` is set; ``TTY_COMPATIBLE`` (0 or 1)
    and ``FORCE_COLOR`` override the terminal test.
    """
    if environ.get("NO_COLOR", ""):
        return False
    compatible = environ.get("TTY_COMPATIBLE", "")
    if compatible in ("0", "1"):
        return compatible == "1"
    force = environ.get("FORCE_COLOR")
    if force is not None:
        return force != ""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class StreamSink:
    """A session's lines on plain streams, as cmd2 prints them in batch mode.

    Lines are cleaned of control characters and tabs are expanded; error
    lines are bright red when ``colour_errors``. Each line is flushed, so
    stdout and stderr interleave in order when they share a pipe. A reader
    that went away (``ush list | head``) is ignored, as cmd2 does.
    ``stdout`` and ``stderr`` default to ``sys.stdout`` and ``sys.stderr``
    at the time of writing.
    """

    def __init__(self, stdout: IO[str] | None = None, stderr: IO[str] | None = None, *,
                 colour_errors: bool = False) -> None:
        self._stdout = stdout
        self._stderr = stderr
        self._colour_errors = colour_errors

    def out(self, text: str) -> None:
        self._write(self._stdout or sys.stdout, _clean(text))

    def err(self, text: str, *, error: bool) -> None:
        text = _clean(text)
        if error and self._colour_errors:
            text = f"{_RED}{text}{_RESET}"
        self._write(self._stderr or sys.stderr, text)

    @staticmethod
    def _write(stream: IO[str], text: str) -> None:
        try:
            stream.write(text + "\n")
            stream.flush()
        except BrokenPipeError:
            pass


def _clean(text: str) -> str:
    return _CONTROL.sub("", text).expandtabs(8)


class BatchRunner:
    """Runs planned steps against a waiting :class:`Session` (see the module docstring).

    The exit status is the first failure's: the
    :class:`~usher.errors.UsherError`'s exit code, 1 for a failed task.
    """

    def __init__(self, config: UshConfig, sink: Sink, *,
                 client_factory: ClientFactory = Client,
                 stdin: IO[str] | None = None) -> None:
        self.session = Session(config, sink, stdin=stdin, client_factory=client_factory)

    def run(self, steps: Sequence[Step]) -> int:
        """Connect from the config, run ``steps`` in order, return the exit status."""
        session = self.session
        if not session.connect_from_config(quiet=True):
            return session.exit_status or 1
        try:
            for step in steps:
                if step.command is None:
                    break
                self._run_step(step.command, step.args)
            session.drain_events(0)
        finally:
            session.close()
        return session.exit_status

    def _run_step(self, command: Command, args: argparse.Namespace) -> None:
        session = self.session
        try:
            command.run(session, args)
            session.wait_for_pending()
        except KeyboardInterrupt:
            # As in the cmd2 shell: Ctrl-C ends this command (and stops waiting
            # for its tasks, which run on), and the next line runs.
            pass
        except Exception as exc:  # noqa: BLE001 - a bug in a command must not lose the run
            session.fail(1)
            session.error(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
