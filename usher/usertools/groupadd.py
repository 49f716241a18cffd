"""``usher_groupadd``: add a group to a cluster.

Thin front-end over :meth:`usher.directory.client.Directory.add_group`; admins of
the cluster may add groups. Members are added with ``usher_groupmod``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from usher.names import validate_login
from usher.usertools.common import ToolContext, run, tool_parser

PROG = "usher_groupadd"

DESCRIPTION = """\
Add the empty group GROUP to a cluster, with a gid number unique in the site.
Group names follow the rules of login names and cannot be the name of a user
of the cluster (each user has a private group of their name). Every cluster
already has the groups admin (may manage the cluster, sudo on its VMs) and
power (sudo on its VMs only). Only admins of the cluster may add groups; add
members with usher_groupmod."""

EXAMPLES = """\
  usher_groupadd devs
  usher_groupadd devs && usher_groupmod devs --add alice,bob"""


def build_parser() -> argparse.ArgumentParser:
    parser = tool_parser(PROG, DESCRIPTION, examples=EXAMPLES)
    parser.add_argument("group", metavar="GROUP",
                        help="group name: 1 to 32 of a-z 0-9 -, starting with a letter")
    return parser


def add_group(ctx: ToolContext) -> int:
    name = validate_login(ctx.args.group)
    with ctx.bind_caller() as directory:
        group = directory.add_group(ctx.cluster, name)
    return ctx.say(f"added the group {group.name} (gid {group.gid_number}) to {ctx.cluster}")


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), add_group, argv)


if __name__ == "__main__":
    raise SystemExit(main())
