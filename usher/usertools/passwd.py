"""``usher_passwd``: change your password, or (for admins) a cluster user's.

Thin front-end over :meth:`usher.directory.client.Directory.set_password`, the
Password Modify extended operation (RFC 3062): slapd hashes the new password;
the tool never stores or logs it. Changing your own password sends your old
one too, which slapd checks.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from usher.names import validate_login
from usher.usertools.common import ToolContext, run, tool_parser

PROG = "usher_passwd"

DESCRIPTION = """\
Set the password of USER (default: you). Use this rather than passwd on the
VMs: the password lives in the site directory and works on every VM of every
cluster you are a user of. Everyone may change their own password; admins of a
cluster may set the password of anyone whose home is that cluster (not of users
linked in from elsewhere: only they and their home cluster's admins may).

You are asked for your own password, then for the new one twice."""

EXAMPLES = """\
  usher_passwd
  usher_passwd bob
  printf '%s\\n%s\\n' "$MINE" "$NEW" | usher_passwd --password-stdin bob"""


def build_parser() -> argparse.ArgumentParser:
    parser = tool_parser(PROG, DESCRIPTION, examples=EXAMPLES, new_password=True)
    parser.add_argument("user", metavar="USER", nargs="?", help="whose password (default: yours)")
    return parser


def set_password(ctx: ToolContext) -> int:
    caller = ctx.caller
    uid = validate_login(ctx.args.user) if ctx.args.user is not None else caller
    with ctx.bind_caller() as directory:
        # Checked before asking for the new password, which would be typed in vain.
        user = directory.get_user(ctx.cluster, uid)
        if uid != caller:
            ctx.require_admin(directory, user.home_cluster,
                              f"you may not set {uid}'s password: only {uid} and the admins"
                              f" of their home cluster {user.home_cluster} may")
        new = ctx.new_password(uid)
        directory.set_password(ctx.cluster, uid, new,
                               old_password=ctx.own_password() if uid == caller else None)
    return ctx.say(f"changed the password of {uid}")


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), set_password, argv)


if __name__ == "__main__":
    raise SystemExit(main())
