"""The ``usher_*`` tools run as real processes, as an unprivileged user, against a real slapd.

The directory tests' :func:`slapd` and :func:`site` fixtures provide the world
(Usher users ``seuss`` and ``horton``; ``alice`` and ``bob`` homed in ``A``
whose admin is ``seuss``; ``carol`` homed in ``B`` whose admin is ``horton``).

:class:`Tools` runs a tool the way a person would: as the system user
``usher-test`` (made by ``scripts/setup``) through ``runuser`` when the tests
run as root, else as the unprivileged user running them; with ``HOME`` a
temporary directory, ``USHER_TOOLS_CONFIG`` naming a config that makes the
given directory user the caller, and passwords on standard input. Files the
tools read live in a world-readable temporary directory.

The venv's interpreter may sit where ``usher-test`` cannot reach (a pyenv
build under ``/root``); then the tools run from small launchers there that
start a system Python of the same version on the venv's site-packages.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import site as site_module
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from usher.directory.slapd import Slapd

from ..directory.conftest import PASSWORDS, SITE, A, Site, site, slapd

__all__ = ["PASSWORDS", "SITE", "TIMEOUT_S", "TOOLS", "A", "Result", "Site", "Tools",
           "assert_aligned", "closed_port", "site", "slapd", "tools"]

TEST_USER = "usher-test"
TOOLS = ("useradd", "userdel", "userlist", "usermod", "passwd", "userln", "groupadd",
         "groupdel", "grouplist", "groupmod")
LISTINGS = ("userlist", "grouplist")
TIMEOUT_S = 30.0
"""Upper bound of one tool run; a healthy one takes a fraction of a second."""
PATH = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"


@dataclass(frozen=True)
class Result:
    """How a tool run ended."""

    code: int
    out: str
    err: str

    @property
    def lines(self) -> list[str]:
        return self.out.splitlines()


def _as_test_user() -> list[str]:
    """The command prefix that drops to the unprivileged user (nothing if not root)."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(TEST_USER)
    except KeyError:
        pytest.skip(f"the system user {TEST_USER} is missing; run scripts/setup as root")
    runuser = shutil.which("runuser", path=PATH)
    if runuser is None:
        pytest.skip("runuser is not installed")
    return [runuser, "-u", TEST_USER, "--"]


def _can_run(prefix: Sequence[str], python: str) -> bool:
    check = subprocess.run([*prefix, python, "-S", "-c", "pass"], capture_output=True,
                           timeout=TIMEOUT_S, env={"PATH": PATH})
    return check.returncode == 0


def _tool_dir(prefix: Sequence[str], scratch: Path) -> Path:
    """Where the unprivileged user finds runnable ``usher_*`` scripts."""
    venv_bin = Path(sys.executable).parent
    if not (venv_bin / "usher_useradd").exists():
        pytest.skip("the usher_* scripts are missing; run: .venv/bin/pip install -e . --no-deps")
    if _can_run(prefix, sys.executable):
        return venv_bin
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [f"/usr/bin/{version}", f"/usr/local/bin/{version}"]
    python = next((c for c in candidates if Path(c).exists() and _can_run(prefix, c)), None)
    if python is None:
        pytest.skip(f"{TEST_USER} can run neither {sys.executable} nor a system {version}")
    launchers = scratch / "bin"
    launchers.mkdir(mode=0o755)
    packages = site_module.getsitepackages()
    for tool in TOOLS:
        script = launchers / f"usher_{tool}"
        # -S keeps the system's own packages out; addsitedir reads the venv's
        # .pth files, which put the (editable) usher on the path.
        script.write_text(
            f"#!{python} -S\nimport site\nimport sys\n"
            + "".join(f"site.addsitedir({p!r})\n" for p in packages)
            + f"from usher.usertools.{tool} import main\nsys.exit(main())\n")
        script.chmod(0o755)
    return launchers


def assert_aligned(lines: Sequence[str]) -> None:
    """Every row of a table has a cell starting right under each column header."""
    header, *rows = lines
    starts = [0, *(i for i in range(2, len(header))
                   if header[i] != " " and header[i - 2:i] == "  ")]
    assert len(starts) >= 2, header
    for row in rows:
        for start in starts[1:]:
            assert row[start - 1] == " " and row[start] != " ", (header, row)


def closed_port() -> int:
    """A loopback TCP port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Tools:
    """Runs the tools as the unprivileged test user (see the module docstring)."""

    def __init__(self, scratch: Path, bindir: Path, prefix: list[str], url: str) -> None:
        self.scratch = scratch
        self.bindir = bindir
        self.prefix = prefix
        self.url = url
        self.home = scratch / "home"
        self.home.mkdir(mode=0o755, exist_ok=True)

    def config(self, user: str | None = "seuss", **settings: str) -> Path:
        """A config file making ``user`` the caller, in cluster ``A`` unless told."""
        values = {"ldap_url": self.url, "site_domain": SITE, "cluster": A,
                  **({"user": user} if user else {}), **settings}
        text = "".join(f'{k} = "{v}"\n' for k, v in sorted(values.items()))
        path = self.scratch / f"config-{hashlib.sha256(text.encode()).hexdigest()[:16]}.toml"
        if not path.exists():
            # Written aside and renamed: tools started in parallel never see half a file.
            partial = path.with_suffix(f".{threading.get_ident()}")
            partial.write_text(text)
            partial.chmod(0o644)
            partial.replace(path)
        return path

    def secret_file(self, name: str, text: str, mode: int = 0o600) -> Path:
        """A file the test user owns, holding ``text`` as its first line."""
        path = self.scratch / name
        path.write_text(text + "\n")
        if os.geteuid() == 0:
            info = pwd.getpwnam(TEST_USER)
            os.chown(path, info.pw_uid, info.pw_gid)
        path.chmod(mode)
        return path

    def readable_file(self, name: str, text: str) -> Path:
        path = self.scratch / name
        path.write_text(text)
        path.chmod(0o644)
        return path

    def __call__(self, tool: str, *args: str, user: str = "seuss", password: str | None = None,
                 new: str | None = None, stdin: str | None = None,
                 config: Path | None = None, root: bool = False,
                 env: dict[str, str] | None = None) -> Result:
        """Run ``usher_TOOL ARGS`` as the test user (as root with ``root``).

        Tools that change the directory get ``--password-stdin`` and standard
        input holding ``password`` (default: ``user``'s), then ``new`` if given,
        unless ``stdin`` gives standard input itself.
        """
        if stdin is None:
            stdin = ""
            if tool not in LISTINGS:
                args = (*args, "--password-stdin")
                stdin = (PASSWORDS[user] if password is None else password) + "\n"
                stdin += "" if new is None else new + "\n"
        command, environment = self.command(tool, *args, user=user, config=config, root=root,
                                            env=env)
        done = subprocess.run(command, input=stdin, capture_output=True, text=True,
                              env=environment, timeout=TIMEOUT_S)
        return Result(done.returncode, done.stdout, done.stderr)

    def command(self, tool: str, *args: str, user: str = "seuss", config: Path | None = None,
                root: bool = False, env: dict[str, str] | None = None,
                ) -> tuple[list[str], dict[str, str]]:
        """The command line and environment that run ``usher_TOOL ARGS``."""
        argv = [str(self.bindir / f"usher_{tool}"), *args]
        variables = {"HOME": str(self.home),
                     "USHER_TOOLS_CONFIG": str(config or self.config(user)),
                     "LANG": "C.UTF-8", "PATH": PATH, **(env or {})}
        if root:
            return argv, variables
        # runuser sets HOME to the user's own; env puts the test's back.
        return ([*self.prefix, "env", *(f"{k}={v}" for k, v in variables.items()), *argv],
                {"PATH": PATH})

    def many(self, calls: Sequence[tuple[Sequence[str], Mapping[str, Any]]]) -> list[Result]:
        """Run several tools at once (each ``(tool and args, keyword arguments)``)."""
        with ThreadPoolExecutor(max_workers=4) as pool:
            futures = [pool.submit(self, *argv, **kwargs) for argv, kwargs in calls]
            return [f.result() for f in futures]


@pytest.fixture(scope="session")
def toolbox(slapd: Slapd) -> Iterator[tuple[Path, Path, list[str]]]:
    prefix = _as_test_user()
    scratch = Path(tempfile.mkdtemp(prefix="usher-usertools-"))
    scratch.chmod(0o755)
    try:
        yield scratch, _tool_dir(prefix, scratch), prefix
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.fixture
def tools(toolbox: tuple[Path, Path, list[str]], site: Site) -> Tools:
    scratch, bindir, prefix = toolbox
    return Tools(scratch, bindir, prefix, site.url)
