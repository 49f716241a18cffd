"""``usher_userln``: link a user of any cluster into this one.

Thin front-end over :meth:`usher.directory.client.Directory.link_user`; admins of
the cluster may link users. The link is an LDAP alias: nothing is copied, so the
user keeps one password and one set of keys, which only they and the admins of
their home cluster can change.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from usher.names import validate_login
from usher.usertools.common import ToolContext, run, tool_parser

PROG = "usher_userln"

DESCRIPTION = """\
Link the existing user USER, whose home is any other cluster of the site (not
necessarily one of yours), into a cluster, rather than creating them again.
They log in with their own password and keys; only they and the admins of
their home cluster can change those, not the admins of the clusters they are
linked into. Only admins of the cluster may link users.

A linked user's uid number must not clash with that of a user already in the
cluster (possible only with entries made outside usher); such a link is
refused: ask the site admin to renumber one of them."""

EXAMPLES = """\
  usher_userln carol
  usher_userln seuss --cluster redfish.horton.usher.example.org"""


def build_parser() -> argparse.ArgumentParser:
    parser = tool_parser(PROG, DESCRIPTION, examples=EXAMPLES)
    parser.add_argument("user", metavar="USER", help="the user to link in")
    return parser


def link_user(ctx: ToolContext) -> int:
    uid = validate_login(ctx.args.user)
    with ctx.bind_caller() as directory:
        user = directory.link_user(ctx.cluster, uid)
    return ctx.say(f"linked {user.uid} (uid {user.uid_number}, home cluster"
                   f" {user.home_cluster}) into {ctx.cluster}")


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), link_user, argv)


if __name__ == "__main__":
    raise SystemExit(main())
