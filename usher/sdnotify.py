"""systemd readiness notification (``Type=notify``), with the standard library.

A daemon started by systemd with ``Type=notify`` tells it when it is ready to
serve by sending ``READY=1`` as a datagram to the socket named by
``$NOTIFY_SOCKET`` (sd_notify(3)). The front-ends read that variable once at
start-up and hand the address to :func:`notify`; without systemd it is empty
and nothing is sent.
"""

from __future__ import annotations

import logging
import socket

log = logging.getLogger(__name__)


def notify(address: str, state: str) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to the notify socket ``address``.

    An address starting with ``@`` is in the abstract namespace. Returns True
    if it was sent; failures are logged, never raised: a daemon must not die
    because its supervisor could not be told something.
    """
    if not address:
        return False
    path = "\0" + address[1:] if address.startswith("@") else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(path)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("could not notify systemd at %s: %s", address, exc)
        return False
    return True
