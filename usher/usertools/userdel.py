"""``usher_userdel``: remove a user from a cluster.

Thin front-end over :meth:`usher.directory.client.Directory.delete_user`; admins
of the cluster may remove users. A user linked in loses only the link; a user
whose home is the cluster is deleted, with their private group and the links
to them in other clusters. The last admin of a cluster cannot be removed.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from usher.names import validate_login
from usher.usertools.common import ToolContext, run, tool_parser

PROG = "usher_userdel"

DESCRIPTION = """\
Remove the user USER from a cluster. If the cluster is USER's home, their
account is deleted with their private group, their memberships and the links
to them in every other cluster. If USER is linked in from another cluster,
only the link and their memberships here go; their account stays in their home
cluster. Only admins of the cluster may remove users, and the last member of
the cluster's admin group cannot be removed (make someone else an admin first
with usher_groupmod admin --add NAME)."""

EXAMPLES = """\
  usher_userdel bob
  usher_userdel carol --cluster redfish.horton.usher.example.org"""


def build_parser() -> argparse.ArgumentParser:
    parser = tool_parser(PROG, DESCRIPTION, examples=EXAMPLES)
    parser.add_argument("user", metavar="USER", help="the user to remove")
    return parser


def delete_user(ctx: ToolContext) -> int:
    uid = validate_login(ctx.args.user)
    with ctx.bind_caller() as directory:
        user = directory.get_user(ctx.cluster, uid)
        directory.delete_user(ctx.cluster, uid)
    if user.linked:
        return ctx.say(f"unlinked {uid} from {ctx.cluster} (their account in"
                       f" {user.home_cluster} is untouched)")
    return ctx.say(f"deleted {uid} from {ctx.cluster}, their home cluster (links to them"
                   " elsewhere are gone too)")


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), delete_user, argv)


if __name__ == "__main__":
    raise SystemExit(main())
