"""``usher_useradd``: add a person to a cluster, with the cluster as their home.

Thin front-end over :meth:`usher.directory.client.Directory.add_user`; admins of
the cluster may add users. The new user's password is asked twice (or read
from a file or standard input) and set with the Password Modify operation, so
slapd hashes it; ``--no-password`` makes an account that logs in by SSH key only.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from usher.directory.client import (
    DEFAULT_SHELL,
    validate_full_name,
    validate_home_uri,
    validate_shell,
)
from usher.errors import AlreadyExists, InvalidOption, UserNotFound
from usher.names import validate_login
from usher.usertools.common import ToolContext, read_keys, run, tool_parser

PROG = "usher_useradd"

DESCRIPTION = """\
Add the user USER to a cluster. The cluster becomes their home: their
account (password, keys, shell) lives there, and other clusters can link them
in with usher_userln instead of adding them again. They get a private group
named like them, a uid number unique in the site and the home directory
/home/USER. Only admins of the cluster may add users; the login name must be
free in the whole site (if USER exists elsewhere, link them in).

You are asked for your own password, then for the new user's password twice."""

EXAMPLES = """\
  usher_useradd alice --full-name 'Alice Liddell'
  usher_useradd bob --key ~/bob.pub --homeuri nfs://files.example.org/home/bob
  usher_useradd ci --no-password --key 'ssh-ed25519 AAAAC3... ci@build'"""


def build_parser() -> argparse.ArgumentParser:
    parser = tool_parser(PROG, DESCRIPTION, examples=EXAMPLES, new_password=True)
    parser.add_argument("user", metavar="USER",
                        help="login name: 1 to 32 of a-z 0-9 -, starting with a letter")
    parser.add_argument("--full-name", "-c", metavar="NAME",
                        help="the person's full name (default: USER)")
    parser.add_argument("--shell", metavar="PATH", default=DEFAULT_SHELL,
                        help=f"login shell (default: {DEFAULT_SHELL})")
    parser.add_argument("--homeuri", metavar="URI",
                        help="where their home directory lives: nfs://HOST/PATH")
    parser.add_argument("--key", metavar="KEY", action="append", default=[],
                        help="register an SSH public key: a key line in quotes, or a file"
                             " of them such as ~/.ssh/id_ed25519.pub (repeatable)")
    parser.add_argument("--no-password", action="store_true",
                        help="set no password: the account logs in with SSH keys only")
    return parser


def add_user(ctx: ToolContext) -> int:
    args = ctx.args
    uid = validate_login(args.user)
    full_name = validate_full_name(args.full_name if args.full_name is not None else uid)
    shell = validate_shell(args.shell)
    home_uri = validate_home_uri(args.homeuri) if args.homeuri else None
    keys = read_keys(args.key)
    if args.no_password and args.new_password_file:
        raise InvalidOption("--no-password and --new-password-file contradict each other")
    with ctx.bind_caller() as directory:
        # Checked before asking for the new password, which would be typed in vain.
        ctx.require_admin(directory, ctx.cluster, f"you may not add users to {ctx.cluster}:"
                          f" only admins of {ctx.cluster} may")
        try:
            directory.get_user(ctx.cluster, uid)
        except UserNotFound:
            pass
        else:
            raise AlreadyExists(f"{uid} is already a user of {ctx.cluster}",
                                details={"cluster": ctx.cluster, "uid": uid})
        password = None if args.no_password else ctx.new_password(uid)
        user = directory.add_user(ctx.cluster, uid, full_name, password, shell=shell,
                                  home_uri=home_uri, keys=keys)
    return ctx.say(f"added {user.uid} to {ctx.cluster} (uid {user.uid_number})")


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), add_user, argv)


if __name__ == "__main__":
    raise SystemExit(main())
