"""``usher_groupmod``: add users to and remove them from a group of a cluster.

Thin front-end over :meth:`usher.directory.client.Directory.modify_group`, one
guarded modify; admins of the cluster may change memberships. This is the only
tool that changes group membership (``usher_usermod`` never does). Removing the
last member of ``admin`` is refused.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence

from usher.errors import InvalidRequest
from usher.names import validate_login
from usher.usertools.common import ToolContext, run, tool_parser, validate_group_name

PROG = "usher_groupmod"

DESCRIPTION = """\
Add users to and remove them from the group GROUP of a cluster, in one change.
Members must be users of the cluster (add or link them first). Adding a
member or removing a non-member changes nothing. Members of admin may manage
the cluster and have sudo on its VMs; members of power have sudo only. The
last member of admin cannot be removed. Only admins of the cluster may change
groups."""

EXAMPLES = """\
  usher_groupmod devs --add alice,bob
  usher_groupmod admin --add alice --remove seuss
  usher_groupmod power -a carol -r bob"""


def build_parser() -> argparse.ArgumentParser:
    parser = tool_parser(PROG, DESCRIPTION, examples=EXAMPLES)
    parser.add_argument("group", metavar="GROUP", help="the group to change")
    parser.add_argument("--add", "-a", metavar="USER[,USER...]", action="append", default=[],
                        help="make these users members (repeatable)")
    parser.add_argument("--remove", "-r", metavar="USER[,USER...]", action="append",
                        default=[], help="remove these members (repeatable)")
    return parser


def _names(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(validate_login(name) for value in values
                              for name in value.split(",")))


def modify_group(ctx: ToolContext) -> int:
    args = ctx.args
    name = validate_group_name(args.group)
    adds, removes = _names(args.add), _names(args.remove)
    if not adds and not removes:
        raise InvalidRequest("nothing to change; give --add USER or --remove USER")
    both = sorted(set(adds) & set(removes))
    if both:
        raise InvalidRequest(f"{both[0]} is both added and removed; give each user once")
    with ctx.bind_caller() as directory:
        # Checked here too: a change that turns out to be a no-op never reaches
        # slapd, and a non-admin must not be told it succeeded.
        ctx.require_admin(directory, ctx.cluster, f"you may not change the groups of"
                          f" {ctx.cluster}: only admins of {ctx.cluster} may")
        before = next((g.members for g in directory.list_groups(ctx.cluster)
                       if g.name == name), ())
        group = directory.modify_group(ctx.cluster, name, add=adds, remove=removes)
    added = [u for u in group.members if u not in before]
    removed = [u for u in before if u not in group.members]
    done = [f"{verb} {', '.join(users)}" for verb, users in
            (("added", added), ("removed", removed)) if users] or ["nothing changed"]
    members = ", ".join(group.members) or "none"
    return ctx.say(f"group {group.name} of {ctx.cluster}: {'; '.join(done)}; members now:"
                   f" {members}")


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), modify_group, argv)


if __name__ == "__main__":
    raise SystemExit(main())
