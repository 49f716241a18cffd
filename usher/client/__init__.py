"""The usher client library: talk to the controller from any Python program.

``ush`` is built on it, and so can any script or service be. Two front doors:

* :class:`AsyncClient` for asyncio programs: every method is a coroutine;
* :class:`Client`, a blocking facade that runs the same client on an event
  loop of its own in a daemon thread.

Both connect over TLS (the controller must show a controller certificate of
the site CA), log in with a user name and password, reconnect on their own
with backoff, resend an interrupted mutation under the same request id (its
idempotency key) and replay task completions missed while disconnected. See
``docs/client.md`` and ``examples/client_example.py``.

Errors are :class:`usher.errors.UsherError` subclasses only.
"""

from usher.client.async_client import (
    TERMINAL_STATES,
    AsyncClient,
    ConnectionState,
    ConsoleSession,
    task_ended,
)
from usher.client.sync_client import Client, SyncConsole
from usher.protocol.backoff import Backoff
from usher.protocol.ops import (
    HostInfo,
    ImageInfo,
    TaskInfo,
    VmInfo,
    VmStateMsg,
    VmStats,
    WhoAmI,
)

__all__ = [
    "TERMINAL_STATES",
    "AsyncClient",
    "Backoff",
    "Client",
    "ConnectionState",
    "ConsoleSession",
    "HostInfo",
    "ImageInfo",
    "SyncConsole",
    "TaskInfo",
    "VmInfo",
    "VmStateMsg",
    "VmStats",
    "WhoAmI",
    "task_ended",
]
