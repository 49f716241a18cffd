"""``usher_userlist``: list the users of a cluster.

Thin front-end over :meth:`usher.directory.client.Directory.list_users` and
``get_user``. Anyone may list, so it reads anonymously and asks for no
password. Prints an aligned table, or JSON with ``--json``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from usher.directory.client import DirectoryUser
from usher.names import validate_login
from usher.usertools.common import ToolContext, format_table, run, tool_parser

PROG = "usher_userlist"

DESCRIPTION = """\
List the users of a cluster: the people whose home it is and those linked in
from other clusters (HOME CLUSTER tells which). With -l also their groups in
this cluster, the URI of their home directory and their registered SSH public
keys (one per line under the user). With USER names, list only those.
Anyone may list; no password is asked."""

EXAMPLES = """\
  usher_userlist
  usher_userlist -l alice
  usher_userlist --json --cluster redfish.horton.usher.example.org"""

_NONE = "-"


def build_parser() -> argparse.ArgumentParser:
    parser = tool_parser(PROG, DESCRIPTION, examples=EXAMPLES, binds=False)
    parser.add_argument("users", metavar="USER", nargs="*", help="list only these users")
    parser.add_argument("-l", "--long", action="store_true",
                        help="also show groups, home URI and public keys")
    parser.add_argument("--json", action="store_true",
                        help="print JSON (every field, groups included)")
    return parser


def user_lines(users: Sequence[DirectoryUser], *, long: bool) -> list[str]:
    """The table of ``users``; with ``long``, each user's keys on lines below them."""
    headers = ["USER", "UID", "NAME", "SHELL", "HOME CLUSTER"]
    if long:
        headers += ["GROUPS", "HOME URI"]
    rows = []
    for user in users:
        row = [user.uid, str(user.uid_number), user.full_name, user.shell, user.home_cluster]
        if long:
            row += [",".join(user.groups) or _NONE, user.home_uri or _NONE]
        rows.append(row)
    table = format_table(headers, rows)
    if not long:
        return table
    lines = table[:1]
    for user, line in zip(users, table[1:], strict=True):
        lines.append(line)
        lines.extend(f"    key: {key}" for key in user.keys)
    return lines


def list_users(ctx: ToolContext) -> int:
    args = ctx.args
    wanted = [validate_login(name) for name in args.users]
    long = args.long or args.json
    with ctx.anonymous() as directory:
        if wanted:
            users = [directory.get_user(ctx.cluster, uid) for uid in dict.fromkeys(wanted)]
        else:
            users = directory.list_users(ctx.cluster, long=long)
    if args.json:
        return ctx.show_json(users)
    return ctx.show_lines(user_lines(users, long=args.long))


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), list_users, argv)


if __name__ == "__main__":
    raise SystemExit(main())
