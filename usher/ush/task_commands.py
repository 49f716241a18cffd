"""ush commands on tasks: ``tasks`` lists them, ``wait`` blocks until one ends.

Every mutation runs as one task per VM. Task ids are shown by their first
characters (``task 3f2a1b2c start web1: accepted``); ``wait`` takes such a
prefix as long as it names one of the caller's recent tasks. Each verb is a
parser builder (see :mod:`.parsers`) beside its body, free of cmd2.
"""

from __future__ import annotations

import argparse
import time

from usher.client import Client
from usher.errors import InvalidRequest
from usher.ush import format as fmt
from usher.ush.parsers import Command, P, ParserKit, positive_int
from usher.ush.session import Session

__all__ = ["COMMANDS", "resolve_task_id"]

# How far back a short task id is looked up.
PREFIX_LOOKUP_LIMIT = 500


def resolve_task_id(client: Client, typed: str) -> str:
    """The full id of the caller's task that ``typed`` is a prefix of.

    Unmatched prefixes are returned as typed (the controller then reports the
    task as not found). Raises :class:`InvalidRequest` when the prefix fits
    more than one recent task.
    """
    matches = {t.id for t in client.tasks(limit=PREFIX_LOOKUP_LIMIT) if t.id.startswith(typed)}
    if typed in matches or not matches:
        return typed
    if len(matches) > 1:
        raise InvalidRequest(f"task id {typed!r} is ambiguous ({len(matches)} tasks start "
                             f"with it); type more of it")
    return matches.pop()


def tasks_parser(kit: ParserKit[P]) -> P:
    parser = kit.parser("tasks", """\
list your recent tasks

Lists your tasks, newest first: id, operation, VM, state (queued, running,
done, error), age and message. --json prints a JSON array for scripts.

example:
  tasks
  tasks --active
  tasks --json --limit 10""")
    parser.add_argument("--active", action="store_true", help="only tasks that have not ended")
    parser.add_argument("--limit", type=positive_int, default=50, metavar="N",
                        help="at most N tasks (default: 50)")
    parser.add_argument("--json", action="store_true", help="print a JSON array")
    return parser


def list_tasks(session: Session, args: argparse.Namespace) -> None:
    tasks = session.call(lambda c: c.tasks(limit=args.limit, active_only=args.active))
    if tasks is None:
        return
    if args.json:
        session.output(fmt.to_json(tasks))
    elif not tasks:
        session.output("no active tasks" if args.active else "no tasks")
    else:
        session.output(fmt.task_table(tasks, session.domain, time.time()))


def wait_parser(kit: ParserKit[P]) -> P:
    parser = kit.parser("wait", """\
wait until a task ends

Blocks until the task ends and prints how it ended (Ctrl-C stops waiting;
the task runs on). ID may be the short id shown when the task was accepted.

example:
  wait 3f2a1b2c
  wait 3f2a1b2c --timeout 60""")
    parser.add_argument("id", metavar="ID", help="task id, or the start of one")
    parser.add_argument("--timeout", type=positive_int, default=600, metavar="S",
                        help="give up after S seconds (default: 600)")
    return parser


def wait_task(session: Session, args: argparse.Namespace) -> None:
    info = session.call(lambda c: c.wait(resolve_task_id(c, args.id), args.timeout))
    if info is not None:
        session.announce(info, again=True)


COMMANDS = (
    Command("tasks", tasks_parser, list_tasks),
    Command("wait", wait_parser, wait_task),
)
