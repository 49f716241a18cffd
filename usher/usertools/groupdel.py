"""``usher_groupdel``: delete a group of a cluster.

Thin front-end over :meth:`usher.directory.client.Directory.delete_group`; admins
of the cluster may delete groups. The built-in ``admin`` and ``power`` groups
and users' private groups cannot be deleted.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from usher.usertools.common import ToolContext, run, tool_parser, validate_group_name

PROG = "usher_groupdel"

DESCRIPTION = """\
Delete the group GROUP of a cluster. The admin and power groups every cluster
has cannot be deleted, nor a user's private group (remove the user instead).
Only admins of the cluster may delete groups."""

EXAMPLES = """\
  usher_groupdel devs"""


def build_parser() -> argparse.ArgumentParser:
    parser = tool_parser(PROG, DESCRIPTION, examples=EXAMPLES)
    parser.add_argument("group", metavar="GROUP", help="the group to delete")
    return parser


def delete_group(ctx: ToolContext) -> int:
    name = validate_group_name(ctx.args.group)
    with ctx.bind_caller() as directory:
        directory.delete_group(ctx.cluster, name)
    return ctx.say(f"deleted the group {name} of {ctx.cluster}")


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), delete_group, argv)


if __name__ == "__main__":
    raise SystemExit(main())
