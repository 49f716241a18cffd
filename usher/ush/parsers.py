"""How ush's verbs are parsed and run, without cmd2: parser kits and the command record.

Each verb's argparse parser is written once, in its noun's module
(:mod:`.vm_commands`, :mod:`.host_commands`, :mod:`.task_commands`,
:mod:`.session_commands`), as a builder that takes a :class:`ParserKit`. The
kit decides the parser class and adds completion hints:

* :data:`PLAIN_KIT` (here) builds a plain :class:`argparse.ArgumentParser`
  and ignores completion; the batch runner (:mod:`.batch`) uses it, so a
  script's ``ush list`` never loads cmd2, prompt_toolkit or rich (about 0.3 s);
* the cmd2 kit (:mod:`.completion`) builds a ``Cmd2ArgumentParser`` with
  ``choices_provider`` completion of VM, VMM and image names for the
  interactive shell.

A :class:`Command` pairs a verb's builder with its body, a function of the
:class:`~usher.ush.session.Session` and the parsed arguments.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, TypeVar

if TYPE_CHECKING:
    from usher.ush.session import Session

__all__ = ["NAMES_HELP", "PLAIN_KIT", "Command", "ParseRefused", "ParserKit", "PlainKit",
           "host_parser", "names_parser", "positive_int"]

P_co = TypeVar("P_co", bound=argparse.ArgumentParser, covariant=True)
P = TypeVar("P", bound=argparse.ArgumentParser)

NAMES_HELP = ("VM names, relative to your domain (redfish.sneetch) or full; "
              "a batch like {1..8}.web names eight VMs")


class ParserKit(Protocol[P_co]):
    """Makes a verb's parser and says how its name arguments complete."""

    def parser(self, prog: str, description: str) -> P_co:
        """An empty parser for verb ``prog`` whose help shows ``description`` as written."""

    def vm_names(self) -> dict[str, Any]:
        """Extra ``add_argument`` keywords for an argument of VM names."""

    def host_names(self) -> dict[str, Any]:
        """Extra ``add_argument`` keywords for an argument or option naming a VMM."""

    def image_names(self, dest: str) -> dict[str, Any]:
        """Extra ``add_argument`` keywords for option ``dest`` naming a registered image."""


class ParseRefused(Exception):
    """A plain parser met a usage error or a help request and printed nothing."""


class CheckingParser(argparse.ArgumentParser):
    """An argparse parser that raises :class:`ParseRefused` instead of printing and exiting.

    The batch runner parses every line before running any, and hands a line
    that asks for help or has a usage error to the cmd2 shell, so the help
    and the usage message are the shell's own (its ``Usage:``/``Error:``
    layout and colours), not argparse's look-alikes.
    """

    def error(self, message: str) -> NoReturn:
        raise ParseRefused(message)

    def print_help(self, file: Any = None) -> NoReturn:  # the -h/--help action calls this
        raise ParseRefused("help")


class PlainKit:
    """The kit of the batch runner: :class:`CheckingParser`, no completion."""

    def parser(self, prog: str, description: str) -> CheckingParser:
        return CheckingParser(prog=prog, description=description,
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    def vm_names(self) -> dict[str, Any]:
        return {}

    def host_names(self) -> dict[str, Any]:
        return {}

    def image_names(self, dest: str) -> dict[str, Any]:
        return {}


PLAIN_KIT = PlainKit()


@dataclass(frozen=True)
class Command:
    """One verb: how its line is parsed and what it does."""

    name: str
    build_parser: Callable[[ParserKit[Any]], argparse.ArgumentParser]
    run: Callable[[Session, argparse.Namespace], None]


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return value


def names_parser(kit: ParserKit[P], prog: str, description: str) -> P:
    """A parser for ``VERB NAME...`` with VM name completion."""
    parser = kit.parser(prog, description)
    parser.add_argument("names", nargs="+", metavar="NAME", help=NAMES_HELP, **kit.vm_names())
    return parser


def host_parser(kit: ParserKit[P], prog: str, description: str) -> P:
    """A parser for ``VERB NAME`` with VMM name completion."""
    parser = kit.parser(prog, description)
    parser.add_argument("name", metavar="NAME", help="VMM name, as vmm_list shows it",
                        **kit.host_names())
    return parser
