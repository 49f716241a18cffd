"""ush commands about the session itself: ``connect`` and ``reconnect``.

``quit``, ``help`` (and ``?``) and ``history`` are cmd2's own built-ins.
A password is never taken on the command line (it would land in the
history and in ``ps``): it comes from the ush config or is asked for.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from cmd2 import Cmd2ArgumentParser, CommandSet, RawDescriptionCmd2HelpFormatter, with_argparser

from usher.errors import UsherError

if TYPE_CHECKING:
    from usher.ush.shell import UshApp  # noqa: F401 - named in the CommandSet base

__all__ = ["SessionCommands"]


class SessionCommands(CommandSet["UshApp"]):
    """Connecting to the controller."""

    DEFAULT_CATEGORY = "Session"

    connect_parser = Cmd2ArgumentParser(
        formatter_class=RawDescriptionCmd2HelpFormatter,
        description="""\
connect to an Usher controller

Logs in to the controller named in the ush config (or --controller) as your
login name (or the config's user, or --user). The password comes from the ush
config when it holds one for that user; otherwise ush asks for it. A password
is never given on the command line. A successful connect replaces the current
session; a failed one keeps it.

example:
  connect
  connect --user seuss --controller usher.example.org:7443""")
    connect_parser.add_argument("--user", metavar="U", help="user name to log in as")
    connect_parser.add_argument("--controller", metavar="HOST:PORT",
                                help="controller address (default: from the ush config)")

    @with_argparser(connect_parser)
    def do_connect(self, args: argparse.Namespace) -> None:
        """connect to an Usher controller"""
        app = self._cmd
        config = app.config
        user = args.user or app.default_user()
        controller = args.controller or config.controller
        password: str | None = None
        if config.password and user == app.default_user():
            password = config.password
        else:
            try:
                password = app.ask_password(f"password for {user}@{controller}: ")
            except UsherError as exc:  # no terminal to ask on
                app.report_error(exc)
                return
            if password is None:
                return
        app.open_session(controller, user, password)

    reconnect_parser = Cmd2ArgumentParser(
        formatter_class=RawDescriptionCmd2HelpFormatter,
        description="""\
reconnect to Usher Controller after disconnect

ush reconnects on its own after a lost connection; this command is the way
back when it gave up (for example while the controller was down for long),
using the same controller, user and password. Task completions missed while
disconnected are printed after reconnecting.

example:
  reconnect""")

    @with_argparser(reconnect_parser)
    def do_reconnect(self, args: argparse.Namespace) -> None:
        """reconnect to Usher Controller after disconnect"""
        self._cmd.reconnect_session()
