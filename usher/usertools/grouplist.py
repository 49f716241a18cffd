"""``usher_grouplist``: list the groups of a cluster.

Thin front-end over :meth:`usher.directory.client.Directory.list_groups`. Anyone
may list, so it reads anonymously and asks for no password. Prints an aligned
table, or JSON with ``--json``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from usher.directory import layout
from usher.directory.client import DirectoryGroup
from usher.errors import GroupNotFound
from usher.usertools.common import (
    ToolContext,
    format_table,
    run,
    tool_parser,
    validate_group_name,
)

PROG = "usher_grouplist"

DESCRIPTION = """\
List the groups of a cluster with their gid numbers and members. TYPE is
built-in for admin (may manage the cluster, sudo on its VMs) and power (sudo
on its VMs only), private for a user's own group, linked for the private group
of a user linked in from another cluster, and group for the rest. With GROUP
names, list only those. Anyone may list; no password is asked."""

EXAMPLES = """\
  usher_grouplist
  usher_grouplist admin power
  usher_grouplist --json"""

_NONE = "-"


def build_parser() -> argparse.ArgumentParser:
    parser = tool_parser(PROG, DESCRIPTION, examples=EXAMPLES, binds=False)
    parser.add_argument("groups", metavar="GROUP", nargs="*", help="list only these groups")
    parser.add_argument("--json", action="store_true", help="print JSON")
    return parser


def group_type(group: DirectoryGroup) -> str:
    if group.linked:
        return "linked"
    if group.private:
        return "private"
    if group.name in (layout.ADMIN_GROUP, layout.POWER_GROUP):
        return "built-in"
    return "group"


def group_lines(groups: Sequence[DirectoryGroup]) -> list[str]:
    return format_table(["GROUP", "GID", "TYPE", "MEMBERS"], [
        [g.name, str(g.gid_number), group_type(g), ",".join(g.members) or _NONE]
        for g in groups])


def list_groups(ctx: ToolContext) -> int:
    args = ctx.args
    wanted = list(dict.fromkeys(validate_group_name(name) for name in args.groups))
    with ctx.anonymous() as directory:
        groups = directory.list_groups(ctx.cluster)
    if wanted:
        by_name = {g.name.lower(): g for g in groups}
        missing = [name for name in wanted if name not in by_name]
        if missing:
            raise GroupNotFound(f"no group {missing[0]} in {ctx.cluster}",
                                details={"cluster": ctx.cluster, "group": missing[0]})
        groups = [by_name[name] for name in wanted]
    if args.json:
        return ctx.show_json(groups)
    return ctx.show_lines(group_lines(groups))


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), list_groups, argv)


if __name__ == "__main__":
    raise SystemExit(main())
