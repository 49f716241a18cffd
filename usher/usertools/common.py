"""What every ``usher_*`` tool shares: options, caller, passwords, sessions and output.

Each tool module builds its parser with :func:`tool_parser`, adds its own
arguments, and hands :func:`run` an action: a function that validates the
arguments, makes one or two :class:`~usher.directory.client.Directory` calls and
formats the reply. Everything else is done here, the same way for all ten:

* refuse to run under sudo (and warn when run as plain root), as the original
  did: the directory checks the caller's own password, not local privileges;
* read the :class:`~usher.config.ToolsConfig` layers once;
* work out the cluster (``--cluster``, else ``ToolsConfig.cluster``, else the
  parent domain of this host's name) and the caller (``ToolsConfig.user``, else
  the login name);
* read passwords from a terminal prompt, a mode-600 file or standard input,
  never from the command line;
* bind as the caller (listings read anonymously);
* end with one line on stderr and the exit code of the
  :class:`~usher.errors.UsherError` that stopped the tool (:data:`EXIT_CODES`).

Actions validate everything the user typed before asking for a password, so
a typo costs no prompt; the library validates again, and slapd's access rules
decide who may do what.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import getpass
import json
import logging
import os
import pwd
import socket
import stat
import sys
import textwrap
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from usher.config import ToolsConfig, load_tools_config
from usher.directory import layout
from usher.directory.client import Directory, validate_password, validate_ssh_key
from usher.errors import (
    ConfigError,
    Conflict,
    DirectoryError,
    InvalidName,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    Unavailable,
    UsherError,
)
from usher.names import validate_domain, validate_login

__all__ = [
    "EXIT_CODES",
    "INTERRUPTED",
    "SUDO_WARNING",
    "Action",
    "ToolContext",
    "cluster_of_host",
    "format_table",
    "login_name",
    "read_keys",
    "refuse_sudo",
    "run",
    "tool_parser",
    "validate_group_name",
]

SUDO_WARNING = "Do not run 'usher_' commands using sudo or as root"
INTERRUPTED = 130
"""Exit status after Ctrl-C (128 + SIGINT, as shells report it)."""

EXIT_CODES: tuple[tuple[int, str], ...] = (
    (0, "success"),
    (UsherError.exit_code, "internal error (a bug: please report it)"),
    (InvalidRequest.exit_code, "usage: a bad option or a malformed name, key, shell, URI or"
                               " password (argparse's usage errors too)"),
    (NotFound.exit_code, "not found: no such cluster, user or group"),
    (Conflict.exit_code, "conflict: it exists already, the last admin of the cluster, a"
                         " uid number clash, a change made meanwhile"),
    (PermissionDenied.exit_code, "permission denied: a wrong password, not an admin of the"
                                 " cluster, run under sudo"),
    (Unavailable.exit_code, "unavailable: the directory server does not answer"),
    (DirectoryError.exit_code, "the directory failed or refused for another reason"),
    (ConfigError.exit_code, "configuration: a bad config file or password file"),
    (INTERRUPTED, "interrupted"),
)
"""Every exit status of the tools, from the error classes (shown by ``-h``)."""

_PASSWORDS_HELP = """\
passwords:
  Your password is asked on the terminal. For scripts, put it in a file only
  you can read (--password-file PATH, or password_file in the config; chmod
  600 it) or pipe it in with --password-stdin. A new password (useradd,
  passwd) is asked twice on the terminal, or read from --new-password-file,
  or from the next line of standard input with --password-stdin: standard
  input then holds one password per line, yours first (unless it comes from
  a file), then the new one. A password is never a command-line argument.
"""

_SETTINGS_HELP = """\
settings:
  /etc/usher/usertools.config, then ~/.usher/usertools.config, then the file
  $USHER_TOOLS_CONFIG names (TOML; each overrides the one before): ldap_url,
  site_domain, cluster, user (default: your login name), password_file.
  Do not run 'usher_' commands using sudo or as root.
"""

Action = Callable[["ToolContext"], int]
"""A tool's work: validate, call the directory, print; returns the exit status."""

log = logging.getLogger(__name__)


def _epilog(examples: str, binds: bool) -> str:
    codes = "\n".join(textwrap.fill(text, 78, initial_indent=f"  {code:<4} ",
                                    subsequent_indent=" " * 7) for code, text in EXIT_CODES)
    parts = [f"examples:\n{examples.rstrip()}\n"] if examples else []
    parts += [_PASSWORDS_HELP] if binds else []
    parts += [_SETTINGS_HELP, f"exit status:\n{codes}\n"]
    return "\n".join(parts)


def tool_parser(prog: str, description: str, *, examples: str = "", binds: bool = True,
                new_password: bool = False) -> argparse.ArgumentParser:
    """The parser of one tool, with the options every tool shares and the ``-h`` epilog.

    ``binds`` adds the options giving the caller's password (tools that
    change the directory); ``new_password`` adds ``--new-password-file``.
    """
    parser = argparse.ArgumentParser(
        prog=prog, description=description, epilog=_epilog(examples, binds),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--cluster", metavar="FQDN",
        help="the cluster to work on, e.g. bluefish.seuss.usher.example.org (default: cluster"
             " in the config, else the cluster of this host: the parent domain of its name)")
    if binds:
        group = parser.add_argument_group("passwords (never on the command line)")
        group.add_argument("--password-file", metavar="PATH",
                           help="read your password from the first line of PATH, which"
                                " others must not be able to read (chmod 600 PATH)")
        group.add_argument("--password-stdin", action="store_true",
                           help="read passwords from standard input (a pipe or file), one"
                                " per line: yours, then the new one")
        if new_password:
            group.add_argument("--new-password-file", metavar="PATH",
                               help="read the new password from the first line of PATH"
                                    " (chmod 600 PATH)")
    return parser


# --- who, where -------------------------------------------------------------------------
def refuse_sudo(prog: str, env: Mapping[str, str], euid: int, stderr: TextIO) -> None:
    """Refuse to run under sudo; warn (on ``stderr``) and go on as plain root.

    Raises:
        PermissionDenied: the effective user is root and the environment says
            sudo started the tool (``SUDO_USER`` or ``SUDO_UID``).
    """
    if euid != 0:
        return
    if env.get("SUDO_USER") or env.get("SUDO_UID"):
        raise PermissionDenied(
            f"{SUDO_WARNING}: the directory checks your own password, not local"
            f" privileges; run {prog} as yourself, without sudo")
    stderr.write(f"{prog}: warning: {SUDO_WARNING}; going on as root, which gives no"
                 " rights in the directory\n")


def login_name(env: Mapping[str, str], uid: int) -> str:
    """The login name, as :func:`getpass.getuser` finds it (environment, then passwd)."""
    for name in ("LOGNAME", "USER", "LNAME", "USERNAME"):
        if env.get(name):
            return env[name]
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        raise ConfigError(f"uid {uid} has no user name; set user = \"NAME\" in"
                          " ~/.usher/usertools.config") from None


def cluster_of_host(fqdn: str) -> str:
    """The cluster of the host named ``fqdn``: its parent domain.

    Raises:
        InvalidRequest: the name has no parent domain (or is not a domain name).
    """
    hint = "give --cluster FQDN or set cluster in ~/.usher/usertools.config"
    try:
        name = validate_domain(fqdn)
    except InvalidName:
        raise InvalidRequest(f"this host's name {fqdn!r} is not a domain name, so its"
                             f" cluster is unknown; {hint}") from None
    if "." not in name:
        raise InvalidRequest(f"this host's name {name!r} has no parent domain, so its"
                             f" cluster is unknown; {hint}")
    return name.split(".", 1)[1]


def validate_group_name(name: str) -> str:
    """A group name as typed: a login name, or a built-in group (``admin``, ``power``).

    Raises:
        InvalidName: neither.
    """
    if name.lower() in (layout.ADMIN_GROUP, layout.POWER_GROUP):
        return name.lower()
    return validate_login(name)


def read_keys(values: Iterable[str]) -> list[str]:
    """The public keys named by ``values``, each checked and normalised.

    A value with whitespace in it is a key line (``ssh-ed25519 AAAA... me@host``);
    any other value is a file of key lines, such as ``~/.ssh/id_ed25519.pub``
    (blank lines and ``#`` comments skipped).

    Raises:
        InvalidRequest: a file cannot be read, holds no key, or a key is malformed.
    """
    keys: list[str] = []
    for value in values:
        if any(char.isspace() for char in value.strip()):
            keys.append(validate_ssh_key(value.strip()))
            continue
        path = Path(value).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise InvalidRequest(f"cannot read the key file {value}: {reason}; give a key"
                                 " line in quotes or a .pub file") from None
        lines = [line.strip() for line in text.splitlines()]
        found = [validate_ssh_key(line) for line in lines if line and not line.startswith("#")]
        if not found:
            raise InvalidRequest(f"the key file {value} holds no public key")
        keys.extend(found)
    return keys


# --- the run of one tool -------------------------------------------------------------------
@dataclass
class ToolContext:
    """One run of a tool: its arguments, settings, streams and sessions.

    ``cluster`` is resolved when the context is made; the caller and their
    password only when needed, so listings ask for nothing.
    """

    prog: str
    args: argparse.Namespace
    config: ToolsConfig
    env: Mapping[str, str]
    cluster: str
    stdin: TextIO
    stdout: TextIO
    uid: int = dataclasses.field(default_factory=os.getuid)
    _own_password: str | None = None

    @property
    def site(self) -> str:
        """The site domain (``site_domain`` of the config).

        Raises:
            ConfigError: it is not set.
        """
        if not self.config.site_domain:
            raise ConfigError("site_domain is not set; add site_domain = \"DOMAIN\" to"
                              " /etc/usher/usertools.config (or the file"
                              " $USHER_TOOLS_CONFIG names)")
        return self.config.site_domain

    @functools.cached_property
    def caller(self) -> str:
        """Who runs the tool: ``user`` of the config, else the login name.

        Raises:
            InvalidName: that is not a valid login name.
        """
        name = self.config.user or login_name(self.env, self.uid)
        try:
            return validate_login(name)
        except InvalidName as exc:
            raise InvalidName(f"you are {name!r}, which cannot be a directory user ({exc});"
                              " set user = \"NAME\" in ~/.usher/usertools.config") from None

    # --- sessions -------------------------------------------------------------------------
    def anonymous(self) -> Directory:
        """An anonymous session (anyone may list users and groups).

        Raises:
            Unavailable: the server does not answer.
        """
        return Directory.connect(self.config.ldap_url, self.site)

    def bind_caller(self) -> Directory:
        """A session bound as the caller, a user of the cluster; asks for their password.

        Raises:
            AuthenticationFailed: wrong password, or the caller is no user of the cluster.
            ClusterNotFound: no such cluster.
            Unavailable: the server does not answer.
        """
        caller = self.caller
        site = self.site
        return Directory.bind_user(self.config.ldap_url, site, self.cluster, caller,
                                   self.own_password())

    def require_admin(self, directory: Directory, cluster: str, denied: str) -> None:
        """Refuse early, before asking for a new password, if the caller is no admin of
        ``cluster``.

        Only a good error: slapd decides. The check never refuses what slapd
        would allow (slapd also wants an admin to be a user of the cluster).

        Raises:
            PermissionDenied: with ``denied`` as the message.
        """
        admins = next((g.members for g in directory.list_groups(cluster)
                       if g.name == layout.ADMIN_GROUP), ())
        if self.caller not in {m.lower() for m in admins}:
            raise PermissionDenied(denied, details={"cluster": cluster})

    # --- passwords ------------------------------------------------------------------------
    def own_password(self) -> str:
        """The caller's password: from a file, standard input or the terminal, once.

        Raises:
            ConfigError: the password file is missing, unreadable, empty or
                readable by others.
            InvalidRequest: no way to get it (no terminal, no option), or
                standard input ended.
        """
        if self._own_password is None:
            args = self.args
            if args.password_file:
                password = _read_password_file(args.password_file, "--password-file")
            elif args.password_stdin:
                password = self._stdin_line("your password")
            elif self.config.password_file:
                password = _read_password_file(self.config.password_file,
                                               "password_file in the config")
            else:
                password = self._prompt(f"Password for {self.caller}: ", "your password",
                                        "--password-file")
            self._own_password = password
        return self._own_password

    def new_password(self, uid: str) -> str:
        """A new password for ``uid``: from a file, standard input, or asked twice.

        Raises:
            ConfigError: a bad ``--new-password-file``.
            InvalidRequest: no way to get it, the two typed passwords differ,
                or the password is empty, too long or holds NUL.
        """
        args = self.args
        if args.new_password_file:
            password = _read_password_file(args.new_password_file, "--new-password-file")
        elif args.password_stdin:
            password = self._stdin_line(f"the new password of {uid}")
        else:
            what, option = f"the new password of {uid}", "--new-password-file"
            password = self._prompt(f"New password for {uid}: ", what, option)
            again = self._prompt(f"Retype the new password for {uid}: ", what, option)
            if again != password:
                raise InvalidRequest("the two passwords differ; nothing was changed")
        return validate_password(password)

    def _stdin_line(self, what: str) -> str:
        if self.stdin.isatty():
            raise InvalidRequest("--password-stdin reads a pipe or a file, but standard input"
                                 " is a terminal; leave the option out to be asked")
        line = self.stdin.readline()
        if not line:
            raise InvalidRequest(f"standard input ended before {what}; give one password per"
                                 " line: yours, then the new one")
        password = line.rstrip("\n").rstrip("\r")
        if not password:
            raise InvalidRequest(f"{what} on standard input is empty")
        return password

    def _prompt(self, prompt: str, what: str, option: str) -> str:
        if not self.stdin.isatty():
            raise InvalidRequest(f"no terminal to ask for {what}; use {option} PATH"
                                 " (chmod 600 PATH) or --password-stdin")
        try:
            password = getpass.getpass(prompt)
        except EOFError:
            password = ""
        if not password:
            raise InvalidRequest(f"no password given for {what}")
        return password

    # --- output ---------------------------------------------------------------------------
    def say(self, line: str) -> int:
        """Print one confirmation line; returns exit status 0."""
        self.stdout.write(line + "\n")
        return 0

    def show_json(self, data: Any) -> int:
        """Print ``data`` (dataclasses allowed) as JSON; returns exit status 0."""
        json.dump(_plain(data), self.stdout, indent=2, ensure_ascii=False)
        self.stdout.write("\n")
        return 0

    def show_lines(self, lines: Iterable[str]) -> int:
        for line in lines:
            self.stdout.write(line + "\n")
        return 0


def _plain(data: Any) -> Any:
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        return dataclasses.asdict(data)
    if isinstance(data, list | tuple):
        return [_plain(item) for item in data]
    return data


def _read_password_file(path: str, where: str) -> str:
    """The first line of a password file only its owner may read.

    Raises:
        ConfigError: the file is missing, unreadable, empty or readable by others.
    """
    file = Path(path).expanduser()
    try:
        with open(file, encoding="utf-8") as fh:
            mode = os.fstat(fh.fileno()).st_mode
            if mode & (stat.S_IRGRP | stat.S_IROTH):
                raise ConfigError(f"the password file {file} ({where}) can be read by others;"
                                  f" run: chmod 600 {file}")
            line = fh.readline()
    except OSError as exc:
        raise ConfigError(f"cannot read the password file {file} ({where}):"
                          f" {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"the password file {file} ({where}) is not UTF-8 text") from None
    password = line.rstrip("\n").rstrip("\r")
    if not password:
        raise ConfigError(f"the password file {file} ({where}) is empty")
    return password


def format_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """Rows as left-aligned columns two spaces apart, under their headers."""
    body = [list(row) for row in rows]
    widths = [max([len(header), *(len(row[i]) for row in body)])
              for i, header in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths,
                                                                  strict=True)).rstrip()

    return [line(headers), *(line(row) for row in body)]


def _one_line(text: str) -> str:
    return " ".join(text.split())


def run(parser: argparse.ArgumentParser, action: Action, argv: Sequence[str] | None = None,
        *, env: Mapping[str, str] | None = None, euid: int | None = None,
        fqdn: Callable[[], str] = socket.getfqdn, stdin: TextIO | None = None,
        stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Run one tool: parse ``argv``, check who runs it, read the settings, act.

    Returns the exit status: 0, the ``exit_code`` of the
    :class:`~usher.errors.UsherError` that ended the tool (its message printed
    as one line on ``stderr``), or :data:`INTERRUPTED`. Usage errors exit 2
    through argparse. The keyword arguments replace the process's own
    environment, effective uid, host name and streams (for tests).
    """
    prog = parser.prog
    environment = dict(os.environ) if env is None else env
    out = sys.stdout if stdout is None else stdout
    err = sys.stderr if stderr is None else stderr
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=f"{prog}: %(message)s", stream=err)
    try:
        refuse_sudo(prog, environment, os.geteuid() if euid is None else euid, err)
        home = Path(environment["HOME"]) if environment.get("HOME") else Path.home()
        config = load_tools_config(dict(environment), home)
        if args.cluster is not None:
            cluster = validate_domain(args.cluster)
        elif config.cluster:
            cluster = validate_domain(config.cluster)
        else:
            cluster = cluster_of_host(fqdn())
        context = ToolContext(prog=prog, args=args, config=config, env=environment,
                              cluster=cluster, stdin=sys.stdin if stdin is None else stdin,
                              stdout=out)
        return action(context)
    except UsherError as exc:
        log.debug("%s failed", prog, exc_info=True)
        err.write(f"{prog}: {_one_line(exc.message)}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        err.write("\n")
        return INTERRUPTED

