"""``usher_usermod``: change a user's full name, shell, home URI or public keys.

Thin front-end over :meth:`usher.directory.client.Directory.modify_user`, one
modify of the person's home entry. A person may change their own account;
admins of a cluster may change the accounts of people whose home it is, not of
people linked in. Group membership is changed with ``usher_groupmod``, never here.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from usher.directory.client import validate_full_name, validate_home_uri, validate_shell
from usher.errors import InvalidOption, InvalidRequest
from usher.names import validate_login
from usher.usertools.common import ToolContext, read_keys, run, tool_parser

PROG = "usher_usermod"

DESCRIPTION = """\
Change the account of USER (default: you): full name, login shell, the URI of
their home directory, and their registered SSH public keys. Registered keys
become the user's ~/.ssh/authorized_keys on the cluster's VMs (and root's, for
Usher users), replacing what is there, so register every key you want.

KEY is a public key line in quotes ('ssh-ed25519 AAAA... me@laptop') or a file
of key lines such as ~/.ssh/id_ed25519.pub. Keys are matched by type and data,
so the comment does not matter when removing one.

You may change your own account; admins of a cluster may change the accounts
of the people whose home it is, but not of users linked in from elsewhere.
To add users to or remove them from groups, use usher_groupmod."""

EXAMPLES = """\
  usher_usermod --homeuri nfs://files.example.org/home/alice
  usher_usermod --add-key ~/.ssh/id_ed25519.pub
  usher_usermod bob --shell /bin/zsh --full-name 'Bob the Builder'
  usher_usermod --remove-key 'ssh-rsa AAAAB3NzaC1yc2E...'
  usher_usermod --set-keys ~/keys.pub    (replaces every registered key)"""


def build_parser() -> argparse.ArgumentParser:
    parser = tool_parser(PROG, DESCRIPTION, examples=EXAMPLES)
    parser.add_argument("user", metavar="USER", nargs="?", help="the user (default: you)")
    parser.add_argument("--full-name", "-c", metavar="NAME", help="set the full name")
    parser.add_argument("--shell", "-s", metavar="PATH", help="set the login shell")
    parser.add_argument("--homeuri", metavar="URI",
                        help="set where the home directory lives: nfs://HOST/PATH (an NFS"
                             " URI, not a mount point); --homeuri '' removes it")
    keys = parser.add_argument_group("public keys")
    keys.add_argument("--add-key", metavar="KEY", action="append", default=[],
                      help="register KEY (repeatable)")
    keys.add_argument("--remove-key", metavar="KEY", action="append", default=[],
                      help="unregister KEY (repeatable)")
    keys.add_argument("--set-keys", metavar="KEY", action="append",
                      help="replace every registered key by these (repeatable)")
    keys.add_argument("--clear-keys", action="store_true", help="unregister every key")
    return parser


def modify_user(ctx: ToolContext) -> int:
    args = ctx.args
    full_name = None if args.full_name is None else validate_full_name(args.full_name)
    shell = None if args.shell is None else validate_shell(args.shell)
    home_uri = None if args.homeuri is None else (
        validate_home_uri(args.homeuri) if args.homeuri else "")
    add_keys = read_keys(args.add_key)
    remove_keys = read_keys(args.remove_key)
    if args.clear_keys and args.set_keys:
        raise InvalidOption("--set-keys and --clear-keys contradict each other")
    replace_keys = [] if args.clear_keys else (
        None if args.set_keys is None else read_keys(args.set_keys))
    if replace_keys is not None and (add_keys or remove_keys):
        raise InvalidOption("replace the keys (--set-keys, --clear-keys) or add and remove"
                            " keys, not both")
    changed = [label for label, value in (("full name", full_name), ("shell", shell),
                                          ("home URI", home_uri)) if value is not None]
    if replace_keys is not None or add_keys or remove_keys:
        changed.append("keys")
    if not changed:
        raise InvalidRequest("nothing to change; give --full-name, --shell, --homeuri or a"
                             " key option (see -h)")
    uid = validate_login(args.user) if args.user is not None else ctx.caller
    with ctx.bind_caller() as directory:
        if uid != ctx.caller:
            # Checked here too: adding keys the user has already changes nothing
            # and never reaches slapd, and a stranger must not be told it succeeded.
            home = directory.get_user(ctx.cluster, uid).home_cluster
            ctx.require_admin(directory, home, f"you may not change {uid}'s account: only"
                              f" {uid} and the admins of their home cluster {home} may")
        user = directory.modify_user(ctx.cluster, uid, full_name=full_name, shell=shell,
                                     home_uri=home_uri, add_keys=add_keys,
                                     remove_keys=remove_keys, replace_keys=replace_keys)
    return ctx.say(f"changed the {', '.join(changed)} of {user.uid}"
                   f" ({len(user.keys)} key{'' if len(user.keys) == 1 else 's'} registered)")


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), modify_user, argv)


if __name__ == "__main__":
    raise SystemExit(main())
