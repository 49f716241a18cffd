"""ush commands about the session itself: ``connect`` and ``reconnect``.

``quit``, ``help`` (and ``?``) and ``history`` are cmd2's own built-ins (the
batch runner does ``quit`` itself). A password is never taken on the command
line (it would land in the history and in ``ps``): it comes from the ush
config or is asked for. Each verb is a parser builder (see :mod:`.parsers`)
beside its body, free of cmd2.
"""

from __future__ import annotations

import argparse

from usher.errors import UsherError
from usher.ush.parsers import Command, P, ParserKit
from usher.ush.session import Session

__all__ = ["COMMANDS"]


def connect_parser(kit: ParserKit[P]) -> P:
    parser = kit.parser("connect", """\
connect to an Usher controller

Logs in to the controller named in the ush config (or --controller) as your
login name (or the config's user, or --user). The password comes from the ush
config when it holds one for that user; otherwise ush asks for it. A password
is never given on the command line. A successful connect replaces the current
session; a failed one keeps it.

example:
  connect
  connect --user seuss --controller usher.example.org:7443""")
    parser.add_argument("--user", metavar="U", help="user name to log in as")
    parser.add_argument("--controller", metavar="HOST:PORT",
                        help="controller address (default: from the ush config)")
    return parser


def connect(session: Session, args: argparse.Namespace) -> None:
    config = session.config
    user = args.user or session.default_user()
    controller = args.controller or config.controller
    password: str | None = None
    if config.password and user == session.default_user():
        password = config.password
    else:
        try:
            password = session.ask_password(f"password for {user}@{controller}: ")
        except UsherError as exc:  # no terminal to ask on
            session.report_error(exc)
            return
        if password is None:
            return
    session.open(controller, user, password)


def reconnect_parser(kit: ParserKit[P]) -> P:
    return kit.parser("reconnect", """\
reconnect to Usher Controller after disconnect

ush reconnects on its own after a lost connection; this command is the way
back when it gave up (for example while the controller was down for long),
using the same controller, user and password. Task completions missed while
disconnected are printed after reconnecting.

example:
  reconnect""")


def reconnect(session: Session, args: argparse.Namespace) -> None:
    session.reconnect()


COMMANDS = (
    Command("connect", connect_parser, connect),
    Command("reconnect", reconnect_parser, reconnect),
)
