"""``console NAME``: an interactive serial console on the terminal.

The terminal goes into raw mode, so every key (Ctrl-C included) reaches the
guest; what the guest prints is written to the terminal as it arrives. The
escape key, Ctrl-] (as in telnet and ``virsh console``), detaches and gives the
terminal back as it was. The session also ends when the guest stops or the
connection to the controller is lost; ush then says why.
"""

from __future__ import annotations

import contextlib
import os
import select
import termios
import threading
import tty
from typing import BinaryIO

from usher.client import Client

ESCAPE = b"\x1d"  # Ctrl-]
POLL_S = 0.25


def attach(client: Client, name: str, stdin_fd: int, out: BinaryIO) -> str:
    """Relay between the terminal at ``stdin_fd`` and VM ``name``'s console.

    Returns why it ended: ``"detached"`` for Ctrl-], else the session's reason.

    Raises:
        UsherError: the console could not be opened (nothing changed then).
    """
    ended = threading.Event()
    why = ["detached"]
    wake_r, wake_w = os.pipe()

    def on_data(data: bytes) -> None:
        with contextlib.suppress(OSError):
            out.write(data)
            out.flush()

    def on_end(reason: str) -> None:
        why[0] = reason
        ended.set()
        with contextlib.suppress(OSError):
            os.write(wake_w, b"x")

    try:
        console = client.console_open(name, on_data, on_end)
        saved = termios.tcgetattr(stdin_fd)
        try:
            # TCSADRAIN, not the default flush: keys typed ahead still count.
            tty.setraw(stdin_fd, termios.TCSADRAIN)
            on_data(f"connected to the console of {console.name}; Ctrl-] detaches\r\n"
                    .encode())
            while not ended.is_set():
                readable, _, _ = select.select([stdin_fd, wake_r], [], [], POLL_S)
                if stdin_fd not in readable:
                    continue
                data = os.read(stdin_fd, 1024)
                if not data:
                    break  # the terminal went away
                before, escape, _ = data.partition(ESCAPE)
                if before:
                    console.write(before)
                if escape:
                    break
        finally:
            termios.tcsetattr(stdin_fd, termios.TCSADRAIN, saved)
            console.close()
    finally:
        os.close(wake_r)
        os.close(wake_w)
    return why[0]
