"""The interactive ush shell: a thin cmd2 application over a ush session.

:class:`UshApp` is the cmd2 front-end of one :class:`~usher.ush.session.Session`,
which holds the connection and everything commands share (calling the
client, reporting errors, announcing tasks, delivering pushes). The commands
are one :class:`cmd2.CommandSet` per noun (:mod:`.command_sets`) over the
verbs' cmd2-free parsers and bodies.

On a terminal a command returns to the prompt as soon as the controller
accepts it; task completions, VM state changes and connection news arrive on
the client's thread and are shown above the prompt through cmd2's
asynchronous alerts, which redraw the prompt intact. Without a terminal the
app runs batch input (:meth:`UshApp.run_commands`) the waiting way (see
:mod:`.session`): ``ush`` uses it for batch input that only cmd2 can run
(``help``, ``history``, ``;``, pipes and redirection; see :mod:`.batch`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import cmd2
from cmd2 import Cmd2ArgparseError, Cmd2Style, Statement
from rich.text import Text

from usher.client import Client
from usher.config import UshConfig
from usher.ush.command_sets import (
    HostCommands,
    ImageCommands,
    SessionCommands,
    TaskCommands,
    VmCommands,
)
from usher.ush.session import ClientFactory, Session

__all__ = ["PROMPT", "REMOVED_BUILTINS", "UshApp"]

REMOVED_BUILTINS = ("alias", "edit", "ipy", "macro", "py", "run_pyscript", "run_script",
                    "_relative_run_script", "set", "shell", "shortcuts")
"""cmd2 built-ins a user of ush would not expect (scripting, shell escapes)."""

# cmd2 files its built-ins (help, history, quit) under the category of the
# class that defines them; renaming it is the documented way to title them.
cmd2.Cmd.DEFAULT_CATEGORY = "Shell"

PROMPT = "ush> "


class UshApp(cmd2.Cmd):
    """The ``ush`` command interpreter.

    ``interactive`` selects persistent history and, on a terminal, returning
    to the prompt at once with pushes shown as alerts; otherwise the session
    waits for each command's tasks. ``client_factory`` builds the session's
    client (see :class:`~usher.ush.session.Session`).
    """

    def __init__(self, config: UshConfig, *, interactive: bool,
                 client_factory: ClientFactory = Client, stdin: Any = None,
                 stdout: Any = None) -> None:
        super().__init__(
            allow_cli_args=False,
            allow_clipboard=False,
            persistent_history_file=config.history_file if interactive else "",
            shortcuts={"?": "help"},
            command_sets=[SessionCommands(), VmCommands(), HostCommands(), ImageCommands(),
                          TaskCommands()],
            stdin=stdin,
            stdout=stdout,
        )
        # After cmd2's own set-up, which attaches subcommands to alias and macro.
        for name in REMOVED_BUILTINS:
            setattr(self, f"do_{name}", None)
        self.prompt = PROMPT
        self.config = config
        # Alerts need prompt_toolkit on a terminal; without one, print in order.
        alerts = interactive and self.stdin.isatty() and self.stdout.isatty()
        self.session = Session(config, self, alert=self._alert if alerts else None,
                               stdin=self.stdin, client_factory=client_factory)

    @property
    def exit_status(self) -> int:
        return self.session.exit_status

    # ------------------------------------------- the session's sink (Sink)
    def out(self, text: str) -> None:
        self.poutput(text)

    def err(self, text: str, *, error: bool) -> None:
        self.perror(text, style=Cmd2Style.ERROR if error else None)

    def _alert(self, text: str, error: bool) -> None:
        style = Cmd2Style.ERROR if error else ""
        self.add_alert(msg=Text(text, style=style), prompt=self.current_prompt())

    # ------------------------------------------------- failures cmd2 sees
    def onecmd(self, statement: Statement | str, *, add_to_history: bool = True) -> bool:
        try:
            return super().onecmd(statement, add_to_history=add_to_history)
        except Cmd2ArgparseError as exc:
            cause = exc.__cause__
            if not (isinstance(cause, SystemExit) and cause.code in (0, None)):
                self.session.fail(1)  # a usage error; plain -h/--help is not a failure
            raise

    def default(self, statement: Statement) -> bool | None:
        self.perror(f"error: unknown command {statement.command!r}; type help")
        self.session.fail(1)
        return None

    def pexcept(self, exception: BaseException, **kwargs: Any) -> None:
        self.session.fail(1)
        super().pexcept(exception, **kwargs)

    # ---------------------------------------------------------------- loop
    def current_prompt(self) -> str:
        client = self.session.client
        if client is not None and client.connected:
            return f"ush({client.user})> "
        return PROMPT

    def pre_prompt(self) -> None:
        self.prompt = self.current_prompt()

    def preloop(self) -> None:
        if self.config.password:
            self.session.connect_from_config()
        else:
            self.poutput(f"not connected; type connect to log in to {self.config.controller}")

    def postloop(self) -> None:
        self.session.close()

    def postcmd(self, stop: bool, statement: Statement | str) -> bool:
        if self.session.waits_for_tasks:
            self.session.wait_for_pending()
        return stop

    def run_commands(self, lines: Iterable[str]) -> int:
        """Batch mode: connect from the config, run each line, return the exit status.

        Blank lines and lines starting with ``#`` are skipped; ``quit`` stops.
        """
        session = self.session
        if not session.connect_from_config(quiet=True):
            return session.exit_status or 1
        try:
            for line in lines:
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                if self.onecmd_plus_hooks(line.rstrip("\n")):
                    break
            session.drain_events(0)
        finally:
            session.close()
        return session.exit_status
