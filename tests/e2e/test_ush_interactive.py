"""ush as a person uses it: a terminal (pty), a prompt, pushes, tab completion, history."""

from __future__ import annotations

import lzma
import os
import pty
import re
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.site import Site

pytestmark = pytest.mark.e2e


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\r")


class Terminal:
    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                                     close_fds=True, start_new_session=True)
        os.close(slave)
        self.seen = ""

    def expect(self, text: str, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while text not in ANSI.sub("", self.seen):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"did not see {text!r}; screen:\n{self.seen[-2000:]}")
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    self.seen += os.read(self.master, 65536).decode(errors="replace")
                except OSError:
                    break
        return ANSI.sub("", self.seen)

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        os.close(self.master)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = Site(tmp_path / "site", lnms=1)
    try:
        yield s.start()
    finally:
        s.close()


def test_interactive_session(site: Site) -> None:
    env = {**os.environ, "USH_CONFIG": str(site.dir / "ush.config"), "HOME": str(site.dir),
           "TERM": "xterm", "PROMPT_TOOLKIT_NO_CPR": "1"}
    term = Terminal([str(Path(sys.executable).parent / "ush")], env)
    try:
        term.expect("ush(seuss)>")
        term.send("start inter --ram 32\r")
        term.expect("accepted")
        term.expect("inter: start done (running)")
        term.send("pause int\t")  # Tab completes the VM name: "int" alone names no VM
        time.sleep(0.5)
        term.send("\r")
        term.expect("inter: pause done (paused)")
        term.send("list\r")
        term.expect("paused")
        term.send("quit\r")
        term.proc.wait(15)
        assert term.proc.returncode == 0
    finally:
        term.close()
    history = lzma.decompress((site.dir / "ush_history").read_bytes())  # cmd2's format
    assert b"start inter --ram 32" in history
