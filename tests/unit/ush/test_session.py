"""A ush session on its own, against a fake controller on loopback: no cmd2, no shell.

What both front-ends rely on: errors become one line and a recorded failure,
tasks are announced once, pushes are queued (waiting) or shown at once from
the client's thread (alerts), completion never hangs, connection news.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from tests.unit.client.fake_controller import PASSWORD, USER, FakeController, Pki
from tests.unit.ush.conftest import Cluster
from usher.config import UshConfig
from usher.errors import InvalidOption
from usher.ush import vm_commands
from usher.ush.batch import COMMANDS
from usher.ush.parsers import PLAIN_KIT
from usher.ush.session import Session, parse_controller

pytestmark = pytest.mark.timeout(30)


class Lines:
    """A sink that keeps what a session printed, and where."""

    def __init__(self) -> None:
        self.stdout: list[str] = []
        self.stderr: list[tuple[str, bool]] = []
        self.alerts: list[tuple[str, bool, str]] = []
        self.alerted = threading.Event()

    def out(self, text: str) -> None:
        self.stdout.append(text)

    def err(self, text: str, *, error: bool) -> None:
        self.stderr.append((text, error))

    def alert(self, text: str, error: bool) -> None:
        self.alerts.append((text, error, threading.current_thread().name))
        self.alerted.set()


def config(pki: Pki, port: int) -> UshConfig:
    return UshConfig(controller=f"127.0.0.1:{port}", ca_cert=str(pki.ca), user=USER,
                     password=PASSWORD, history_file="")


def run(session: Session, line: str) -> None:
    verb, *argv = line.split()
    command = COMMANDS[verb]
    command.run(session, command.build_parser(PLAIN_KIT).parse_args(argv))


@pytest.fixture
def lines() -> Lines:
    return Lines()


@pytest.fixture
def session(pki: Pki, controller: FakeController, cluster: Cluster,
            lines: Lines) -> Iterator[Session]:
    s = Session(config(pki, controller.port), lines)
    assert s.connect_from_config(quiet=True)
    yield s
    s.close()


def test_a_waiting_session_prints_completions_after_the_command(session: Session,
                                                                 lines: Lines) -> None:
    run(session, "start web1")
    assert lines.stdout == ["task 0001beef start web1: accepted"]
    session.wait_for_pending()
    assert lines.stdout[1:] == ["web1: start done (running)"]
    session.wait_for_pending()
    assert len(lines.stdout) == 2, "a task is announced once"
    assert session.exit_status == 0


def test_failed_task_is_an_error_line_and_a_failure(session: Session, lines: Lines) -> None:
    run(session, "start bad")
    session.wait_for_pending()
    assert lines.stderr == [("bad: start FAILED: no host has enough memory", True)]
    assert session.exit_status == 1


def test_completion_and_reconnect_news(session: Session, lines: Lines,
                                       controller: FakeController) -> None:
    run(session, "start web1 web2")
    session.wait_for_pending()
    assert session.complete_names("vm", "") == ["web1", "web2"]
    assert session.complete_names("host", "v") == ["vmm1"]
    assert session.complete_names("image", "t") == ["tiny"]
    loop: asyncio.AbstractEventLoop = controller.loop  # type: ignore[attr-defined]
    loop.call_soon_threadsafe(controller.drop_all)
    run(session, "vmm_list")
    session.wait_for_pending()
    assert lines.stdout[-1].startswith("NAME")
    news = [text for text, _ in lines.stderr]
    assert any("connection lost" in t and "reconnecting..." in t for t in news)
    assert "reconnected" in news
    assert session.exit_status == 0


def test_image_options_complete_the_option_being_typed(session: Session) -> None:
    # cmd2 gives a provider every option's tokens; each option has its own provider.
    from cmd2 import Choices

    from usher.ush.completion import (
        image_name_choices,
        initrd_image_choices,
        kernel_image_choices,
    )

    def texts(choices: Choices) -> list[str]:
        return [item.text for item in choices]

    app: Any = SimpleNamespace(session=session)
    tokens = {"names": ["t1"], "image": ["d"], "kernel": ["t"], "initrd": [""]}
    assert texts(image_name_choices(app, tokens)) == ["debian"]
    assert texts(kernel_image_choices(app, tokens)) == ["tiny"]
    assert texts(initrd_image_choices(app, tokens)) == ["debian", "tiny"]


def test_an_alerting_session_shows_pushes_at_once_from_the_client_thread(
        pki: Pki, controller: FakeController, cluster: Cluster, lines: Lines) -> None:
    session = Session(config(pki, controller.port), lines, alert=lines.alert)
    try:
        assert session.connect_from_config(quiet=True)
        run(session, "start web1")
        assert lines.alerted.wait(5)
        text, error, thread = lines.alerts[0]
        assert (text, error) == ("web1: start done (running)", False)
        assert thread != threading.main_thread().name
        session.wait_for_pending()  # nothing is pending: the session did not queue it
        assert lines.stdout == ["task 0001beef start web1: accepted"]
    finally:
        session.close()


def test_without_a_connection_commands_fail_clearly(pki: Pki, lines: Lines) -> None:
    session = Session(config(pki, 1), lines)
    run(session, "list")
    assert lines.stderr == [("error: not connected; type connect", True)]
    assert session.exit_status == 6  # NotConnected is an Unavailable
    assert session.complete_names("vm", "") == []


def test_a_bad_controller_address_keeps_the_session(session: Session, lines: Lines) -> None:
    client = session.client
    assert not session.open("nowhere", USER, PASSWORD)
    assert session.client is client
    assert lines.stderr[-1][0].startswith("error: controller address 'nowhere'")
    assert session.exit_status == 2


def test_first_failure_decides_the_exit_status(pki: Pki, lines: Lines) -> None:
    session = Session(config(pki, 1), lines)
    session.fail(4)
    session.fail(2)
    assert session.exit_status == 4


def test_list_prints_what_the_controller_returns(session: Session, lines: Lines,
                                                 cluster: Cluster) -> None:
    args: Any = vm_commands.list_parser(PLAIN_KIT).parse_args(["web9"])
    vm_commands.list_vms(session, args)
    assert lines.stdout == ["no VMs match"]


# ----------------------------------------------------------- the address
@pytest.mark.parametrize(("text", "expected"), [
    ("localhost:7443", ("localhost", 7443)),
    ("ctl.example.org:1", ("ctl.example.org", 1)),
    ("[::1]:7443", ("::1", 7443)),
    ("unix:/run/usher/usher.sock", ("/run/usher/usher.sock", 0)),
])
def test_parse_controller(text: str, expected: tuple[str, int]) -> None:
    assert parse_controller(text) == expected


@pytest.mark.parametrize("text", ["localhost", "localhost:", ":7443", "h:0", "h:65536",
                                  "h:port"])
def test_parse_controller_refuses(text: str) -> None:
    with pytest.raises(InvalidOption, match="HOST:PORT"):
        parse_controller(text)


def test_parse_controller_wants_an_absolute_socket_path() -> None:
    with pytest.raises(InvalidOption, match="unix:/ABSOLUTE/PATH"):
        parse_controller("unix:usher.sock")
