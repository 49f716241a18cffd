"""What all the usher_* tools share, run as processes: help and exit codes, the caller,
sudo refusal and the root warning, password sources, settings, an unreachable
server, and injection attempts in every argument."""

from __future__ import annotations

import io
import os
import select
import subprocess
import time
from collections.abc import Sequence

import pytest

from usher.directory.client import Directory
from usher.errors import (
    ConfigError,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from usher.usertools import common, userlist
from usher.usertools.common import EXIT_CODES, SUDO_WARNING, cluster_of_host

from .conftest import (
    PASSWORDS,
    SITE,
    TIMEOUT_S,
    TOOLS,
    A,
    Result,
    Site,
    Tools,
    closed_port,
)

BAD = InvalidRequest.exit_code
DENIED = PermissionDenied.exit_code
HOSTILE = ["*)(uid=*", "x,dc=evil", "a\\00"]
VALID: dict[str, tuple[str, ...]] = {
    "useradd": ("eve",), "userdel": ("bob",), "userlist": (),
    "usermod": ("--shell", "/bin/sh"), "passwd": (), "userln": ("carol",),
    "groupadd": ("devs",), "groupdel": ("devs",), "grouplist": (),
    "groupmod": ("admin", "--add", "alice")}
"""A call of each tool that would succeed, but for what a test changes."""


def test_every_tool_explains_itself_and_its_exit_codes(
        tools: Tools, capsys: pytest.CaptureFixture[str]) -> None:
    shown = tools("useradd", "-h", stdin="")
    assert shown.code == 0 and "usage: usher_useradd" in shown.out
    assert "exit status:" in shown.out and "--password-stdin" in shown.out
    for tool in TOOLS:
        module = __import__(f"usher.usertools.{tool}", fromlist=["main"])
        with pytest.raises(SystemExit) as exited:
            module.main(["-h"])
        assert exited.value.code == 0
        text = capsys.readouterr().out
        assert text.startswith(f"usage: usher_{tool}") and "examples:" in text
        for code, _ in EXIT_CODES:
            assert f"\n  {code:<4} " in text, (tool, code)
        assert ("--password-file" in text) == (tool not in ("userlist", "grouplist"))
    codes = [code for code, _ in EXIT_CODES]
    assert len(set(codes)) == len(codes)


def test_the_caller_is_the_login_name_unless_configured(tools: Tools) -> None:
    anonymous_config = tools.config(user=None)
    result = tools("groupadd", "devs", config=anonymous_config, password="whatever")
    login = "usher-test" if os.geteuid() == 0 else common.login_name(os.environ, os.getuid())
    assert result.code == DENIED
    assert f"wrong user name or password for {login} in {A}" in result.err


def test_sudo_is_refused_before_anything_else() -> None:
    # In process, so it runs without root too; the test below runs the tools as root.
    out, err = io.StringIO(), io.StringIO()
    code = common.run(userlist.build_parser(), userlist.list_users, [],
                      env={"SUDO_USER": "alice", "USHER_TOOLS_CONFIG": "/nonexistent"},
                      euid=0, stdout=out, stderr=err)
    assert (code, out.getvalue()) == (DENIED, "")
    assert err.getvalue().startswith(f"usher_userlist: {SUDO_WARNING}: ")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_sudo_is_refused_and_plain_root_warned(tools: Tools, site: Site) -> None:
    sudo = {"SUDO_USER": "alice", "SUDO_UID": "1000"}
    refused_list = tools("userlist", root=True, env=sudo)
    refused_add = tools("groupadd", "devs", root=True, env={"SUDO_UID": "1000"})
    for refused in (refused_list, refused_add):
        assert refused.code == DENIED and refused.out == ""
        assert SUDO_WARNING in refused.err and len(refused.err.splitlines()) == 1
    warned = tools("groupadd", "devs", root=True)
    assert warned.code == 0, warned
    assert warned.err.startswith(f"usher_groupadd: warning: {SUDO_WARNING}")
    with site.anonymous() as anonymous:
        assert "devs" in {g.name for g in anonymous.list_groups(A)}


def test_an_unreachable_server_is_one_line_and_its_own_exit_code(tools: Tools) -> None:
    down = tools.config(ldap_url=f"ldap://127.0.0.1:{closed_port()}")
    results = tools.many([((tool, *args), {"config": down, "new": "pw"})
                          for tool, args in VALID.items()])
    for tool, result in zip(VALID, results, strict=True):
        assert result.code == Unavailable.exit_code, (tool, result)
        assert result.out == "" and len(result.err.splitlines()) == 1, (tool, result)
        assert result.err.startswith(f"usher_{tool}: directory server at ldap://127.0.0.1:")
        assert "is unreachable" in result.err


def test_an_unknown_cluster_is_not_found_by_every_tool(tools: Tools) -> None:
    cluster = f"nosuch.seuss.{SITE}"
    results = tools.many([((tool, *args, "--cluster", cluster), {"new": "pw"})
                          for tool, args in VALID.items()])
    for tool, result in zip(VALID, results, strict=True):
        assert result.code == NotFound.exit_code, (tool, result)
        assert f"no cluster {cluster} in the directory" in result.err, (tool, result)


def test_passwords_come_from_safe_files_or_stdin_never_argv(tools: Tools, site: Site) -> None:
    good = tools.secret_file("seuss.pw", PASSWORDS["seuss"])
    loose = tools.secret_file("loose.pw", PASSWORDS["seuss"], mode=0o644)
    from_config = tools.config(password_file=str(good))
    by_file, by_config, too_open, no_terminal, dangling = tools.many([
        (("groupadd", "devs", "--password-file", str(good)), {"stdin": ""}),
        (("groupadd", "ops"), {"stdin": "", "config": from_config}),
        (("groupadd", "qa", "--password-file", str(loose)), {"stdin": ""}),
        (("groupadd", "qa"), {"stdin": ""}),
        (("groupadd", "qa", "--password-file", "/nonexistent"), {"stdin": ""}),
    ])
    assert (by_file.code, by_config.code) == (0, 0), (by_file, by_config)
    assert too_open.code == ConfigError.exit_code
    assert f"run: chmod 600 {loose}" in too_open.err
    assert no_terminal.code == BAD and "--password-stdin" in no_terminal.err
    assert dangling.code == ConfigError.exit_code
    no_new = tools("passwd", "--password-file", str(good), stdin="")
    assert no_new.code == BAD and "--new-password-file PATH" in no_new.err
    # With the own password from a file, standard input holds only the new one.
    passwd = tools("passwd", "--password-file", str(good), "--password-stdin",
                   stdin="seuss-new\n")
    assert passwd.code == 0, passwd
    with site.anonymous() as anonymous:
        assert {"devs", "ops"} <= {g.name for g in anonymous.list_groups(A)}


def test_bad_settings_are_config_errors(tools: Tools) -> None:
    typo = tools.readable_file("typo.toml", 'ldap_uri = "ldap://x"\n')
    no_site = tools.config(site_domain="")
    results = tools.many([
        (("userlist",), {"config": typo}),
        (("userlist",), {"config": tools.scratch / "missing.toml"}),
        (("userlist",), {"config": no_site}),
    ])
    assert [r.code for r in results] == [ConfigError.exit_code] * 3, results
    assert "unknown setting 'ldap_uri'" in results[0].err
    assert "site_domain is not set" in results[2].err


def test_injection_attempts_in_every_argument_are_refused(tools: Tools, site: Site) -> None:
    before = site.snapshot()
    calls = []
    for value in HOSTILE:
        for argv in (("useradd", value), ("useradd", "eve", "--cluster", value),
                     ("userdel", value), ("userln", value), ("passwd", value),
                     ("usermod", value, "--shell", "/bin/sh"),
                     ("usermod", "--shell", value), ("groupadd", value),
                     ("groupdel", value), ("groupmod", value, "--add", "alice"),
                     ("groupmod", "admin", "--add", value), ("userlist", value),
                     ("grouplist", value), ("userlist", "--cluster", value)):
            calls.append((argv, {"new": "pw"}))
    results = tools.many(calls)
    for (argv, _), result in zip(calls, results, strict=True):
        assert result.code == BAD, (argv, result)
        assert result.out == "" and len(result.err.splitlines()) == 1, (argv, result)
    assert site.snapshot() == before


def test_the_cluster_defaults_to_the_parent_domain_of_the_host(tools: Tools) -> None:
    assert cluster_of_host(f"vm1.{A}") == A
    assert cluster_of_host(f"VM1.{A}.") == A
    for name in ("localhost", "bad_host.example.org"):
        with pytest.raises(InvalidRequest, match="give --cluster"):
            cluster_of_host(name)
    env = {"HOME": str(tools.home), "USHER_TOOLS_CONFIG": str(tools.config(cluster=""))}
    out, err = io.StringIO(), io.StringIO()
    code = common.run(userlist.build_parser(), userlist.list_users, [], env=env, euid=1000,
                      fqdn=lambda: f"web1.{A}", stdout=out, stderr=err)
    assert (code, err.getvalue()) == (0, "")
    assert [line.split()[0] for line in out.getvalue().splitlines()[1:]] == [
        "alice", "bob", "seuss"]
    code = common.run(userlist.build_parser(), userlist.list_users, [], env=env, euid=1000,
                      fqdn=lambda: "localhost", stdout=out, stderr=err)
    assert code == BAD and "give --cluster FQDN" in err.getvalue()
    code = common.run(userlist.build_parser(), userlist.list_users, ["--cluster", SITE],
                      env=env, euid=1000, fqdn=lambda: "localhost", stdout=out, stderr=err)
    assert code == 0


def on_terminal(tools: Tools, argv: Sequence[str], answers: Sequence[tuple[str, str]],
                ) -> Result:
    """Run a tool on a pseudo-terminal, typing each answer after its prompt.

    The tool has no controlling terminal (a new session), so getpass reads the
    terminal that is its standard input, with echo off.
    """
    command, environment = tools.command(*argv)
    main, tty = os.openpty()
    process = subprocess.Popen(command, stdin=tty, stdout=tty, stderr=tty, env=environment,
                               start_new_session=True)
    os.close(tty)
    seen, pending = "", list(answers)
    deadline = time.monotonic() + 20
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([main], [], [], 0.5)
            if not ready:
                continue
            try:
                chunk = os.read(main, 4096).decode(errors="replace")
            except OSError:  # EIO: the tool has ended and closed the terminal
                break
            if not chunk:
                break
            seen += chunk
            if pending and seen.rstrip().endswith(pending[0][0].rstrip()):
                os.write(main, (pending.pop(0)[1] + "\n").encode())
        code = process.wait(timeout=TIMEOUT_S)
    finally:
        os.close(main)
        if process.poll() is None:
            process.kill()
    return Result(code, seen.replace("\r\n", "\n"), "")


def test_passwords_are_asked_on_the_terminal_new_ones_twice(tools: Tools, site: Site) -> None:
    mismatch = on_terminal(tools, ["passwd", "alice"], [
        ("Password for seuss:", PASSWORDS["seuss"]), ("New password for alice:", "one"),
        ("Retype the new password for alice:", "two")])
    assert mismatch.code == BAD and "the two passwords differ" in mismatch.out
    assert "one" not in mismatch.out.replace("one per", "")  # echo was off
    done = on_terminal(tools, ["passwd", "alice"], [
        ("Password for seuss:", PASSWORDS["seuss"]), ("New password for alice:", "alice-tty"),
        ("Retype the new password for alice:", "alice-tty")])
    assert done.code == 0 and "changed the password of alice" in done.out
    assert "alice-tty" not in done.out
    Directory.bind_user(site.url, SITE, A, "alice", "alice-tty").close()
