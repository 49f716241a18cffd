"""A ush session: one client, its failures, its tasks and its pushes, free of cmd2.

:class:`Session` holds what every ush command shares, in either front-end:
the connection (one :class:`~usher.client.Client`), calling it with an error
turned into one ``error: ...`` line, announcing accepted and finished tasks,
and delivering what the controller pushes. Commands
(:mod:`.vm_commands` and the other noun modules) run against a session; the
interactive shell (:mod:`.shell`, cmd2) and the batch runner (:mod:`.batch`,
no cmd2) each own one.

A session prints only through a :class:`Sink` (a line for stdout, a line for
stderr) and, in the interactive shell, an alert callback that shows a line
above the prompt. It works in one of two ways:

* **with alerts** (the interactive shell on a terminal): a command returns as
  soon as the controller accepts it; task completions, VM state changes and
  connection news arrive on the client's thread and go straight to the alert.
* **waiting** (everything else): after each command the front-end calls
  :meth:`Session.wait_for_pending`, which waits for that command's tasks and
  prints completions as they arrive; pushes are queued and printed by the
  main thread, so lines never interleave. The first failure decides the exit
  status (:attr:`Session.exit_status`): the
  :class:`~usher.errors.UsherError`'s exit code, 1 for a usage error or a
  failed task.
"""

from __future__ import annotations

import getpass
import queue
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import IO, Any, Literal, Protocol, TypeVar

from usher.client import Client, TaskInfo, VmStateMsg, WhoAmI, task_ended
from usher.config import UshConfig
from usher.errors import ConfigError, InvalidOption, NotConnected, UsherError
from usher.ush import format as fmt

__all__ = ["COMPLETE_TIMEOUT_S", "TASK_WAIT_S", "Alert", "ClientFactory", "Session", "Sink",
           "parse_controller"]

T = TypeVar("T")

TASK_WAIT_S = 3600.0
"""Longest a batch command waits for its tasks (the controller's own task
deadline is far shorter, so this only guards against a wedged controller)."""
COMPLETE_TIMEOUT_S = 2.0
"""Tab completion gives up on a slow controller after this long."""
_MAX_ANNOUNCED = 10_000

ClientFactory = Callable[..., Client]
Event = tuple[Literal["task", "vm", "conn"], Any]


class Sink(Protocol):
    """Where a session's lines go, one whole line per call (no newline in ``text``)."""

    def out(self, text: str) -> None:
        """Command output and task completions (stdout)."""

    def err(self, text: str, *, error: bool) -> None:
        """An error (``error=True``) or a status line such as connection news (stderr)."""


Alert = Callable[[str, bool], None]
"""Shows ``(text, is_error)`` above the prompt; called from the client's thread."""


def parse_controller(address: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` for IPv6 literals); ``unix:PATH`` is
    the controller's Unix socket, returned as ``(PATH, 0)``.

    Raises:
        InvalidOption: no port, or a port that is not a number from 1 to 65535,
            or a socket path that is not absolute.
    """
    text = address.strip()
    if text.startswith("unix:"):
        path = text[len("unix:"):]
        if not path.startswith("/"):
            raise InvalidOption(f"controller address {address!r}: a Unix socket is "
                                f"unix:/ABSOLUTE/PATH (for example unix:/run/usher/usher.sock)")
        return path, 0
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidOption(f"controller address {address!r} is not HOST:PORT "
                            f"(for example localhost:7443) or unix:PATH")
    return host, int(port)


class Session:
    """The session of one ush process (see the module docstring).

    ``alert`` selects the interactive way (pushes shown at once above the
    prompt); without it the session waits for tasks. ``stdin`` is where a
    password may be asked for (default: ``sys.stdin``). ``client_factory``
    builds the client from :class:`~usher.client.Client`'s arguments (a seam
    for programs that embed ush).
    """

    def __init__(self, config: UshConfig, sink: Sink, *, alert: Alert | None = None,
                 stdin: IO[str] | None = None,
                 client_factory: ClientFactory = Client) -> None:
        self.config = config
        self.client: Client | None = None
        self._sink = sink
        self._alert = alert
        self._stdin = stdin
        self._client_factory = client_factory
        self.alerts = alert is not None
        self.waits_for_tasks = not self.alerts
        self.first_failure: int | None = None
        self._pending: list[TaskInfo] = []
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._announced: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self._connecting = False

    # -------------------------------------------------------------- output
    def output(self, text: str) -> None:
        """Print command output (stdout)."""
        self._sink.out(text)

    def error(self, text: str) -> None:
        """Print an error line (stderr) without recording a failure."""
        self._sink.err(text, error=True)

    # ---------------------------------------------------------- connection
    @property
    def domain(self) -> str | None:
        """The user's own domain ``USER.SITE``; names under it are shown relative."""
        session = self.client.session if self.client is not None else None
        return session.domain if session is not None else None

    @property
    def exit_status(self) -> int:
        return self.first_failure or 0

    def default_user(self) -> str:
        return self.config.user or getpass.getuser()

    def ask_password(self, prompt: str) -> str | None:
        """Ask for a password on the terminal; None if the user gave up.

        Raises:
            ConfigError: there is no terminal to ask on.
        """
        stdin = self._stdin if self._stdin is not None else sys.stdin
        if not stdin.isatty():
            raise ConfigError("no password in the ush config and no terminal to ask for "
                              "one; set password in the file USH_CONFIG names (mode 600)")
        try:
            return getpass.getpass(prompt)
        except (EOFError, KeyboardInterrupt):
            self.output("")
            return None

    def open(self, controller: str, user: str, password: str, *, quiet: bool = False) -> bool:
        """Connect to ``controller`` as ``user``, replacing any current connection.

        A failure is reported (and recorded) and keeps the current connection.
        """
        try:
            host, port = parse_controller(controller)
        except UsherError as exc:
            self.report_error(exc)
            return False
        client = self._client_factory(host, port, ca_cert=self.config.ca_cert, user=user,
                                      password=password,
                                      reconnect_max_s=self.config.reconnect_max_s)
        client.on_task = self._on_task
        client.on_vm = self._on_vm
        client.on_connection = self._on_connection
        self._connecting = True
        try:
            who = client.connect()
        except UsherError as exc:
            client.close()
            self.report_error(exc)
            return False
        finally:
            self._connecting = False
        # Only a good new connection replaces the old one.
        self.close()
        self.client = client
        if not quiet:
            self.output(f"connected to {client.address} as {who.user} (domain {who.domain})")
        return True

    def connect_from_config(self, *, quiet: bool = False) -> bool:
        """Connect with the config's controller, user and password (asking if none)."""
        user = self.default_user()
        password: str | None = self.config.password
        if not password:
            try:
                password = self.ask_password(f"password for {user}@{self.config.controller}: ")
            except UsherError as exc:
                self.report_error(exc)
                return False
            if password is None:
                self.fail(1)
                return False
        return self.open(self.config.controller, user, password, quiet=quiet)

    def reconnect(self) -> None:
        """Connect the current session again (after reconnecting gave up)."""
        self._connecting = True
        try:
            who: WhoAmI | None = self.call(lambda client: client.reconnect())
        finally:
            self._connecting = False
        if who is not None and self.client is not None:
            self.output(f"reconnected to {self.client.address} as {who.user}")

    def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            client.close()

    def require_client(self) -> Client:
        if self.client is None:
            raise NotConnected("not connected; type connect")
        return self.client

    # --------------------------------------------------- calls and failures
    def call(self, request: Callable[[Client], T]) -> T | None:
        """Run ``request`` on the session; an error is reported and gives None."""
        try:
            return request(self.require_client())
        except UsherError as exc:
            self.report_error(exc)
            return None

    def report_error(self, exc: UsherError) -> None:
        self.error(f"error: {exc.message}")
        self.fail(exc.exit_code)

    def fail(self, exit_code: int) -> None:
        """Record a failure; the first one is the exit status of a batch run."""
        if self.first_failure is None:
            self.first_failure = exit_code or 1

    # ----------------------------------------------------------------- tasks
    def accepted(self, tasks: list[TaskInfo]) -> None:
        """Print one line per accepted task; a waiting session will wait for them."""
        for info in tasks:
            self.output(fmt.task_accepted_line(info, self.domain))
        if self.waits_for_tasks:
            self._pending.extend(tasks)

    def announce(self, info: TaskInfo, *, again: bool = False) -> None:
        """Print a finished task's line, once per task however often it is learned.

        ``again`` prints it even if it was shown before (``wait`` asks for it).
        """
        with self._lock:
            if info.id in self._announced and not again:
                return
            self._announced[info.id] = None
            while len(self._announced) > _MAX_ANNOUNCED:
                self._announced.popitem(last=False)
        line, failed = fmt.task_completion_line(info, self.domain)
        if failed:
            self.fail(1)
        self._say(line, error=failed)

    def wait_for_pending(self, timeout_s: float = TASK_WAIT_S) -> None:
        """Wait for the last command's tasks, printing pushes meanwhile."""
        tasks, self._pending = self._pending, []
        client = self.client
        if tasks and client is not None:
            future = client.submit(client.aio.wait_all(tasks, timeout_s))
            try:
                while not future.done():
                    self.drain_events(0.1)
                results = future.result()
            except UsherError as exc:
                self.drain_events(0)
                self.report_error(exc)
                return
            except BaseException:
                future.cancel()
                raise
            self.drain_events(0)
            for info in results:
                self.announce(info)
        self.drain_events(0)

    def drain_events(self, timeout: float) -> None:
        """Print queued pushes: wait up to ``timeout`` for one, then take all queued."""
        try:
            event = self._events.get(timeout=timeout) if timeout > 0 else \
                self._events.get_nowait()
        except queue.Empty:
            return
        while True:
            self._show(event)
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return

    # ------------------------------------------------ pushes (client thread)
    def _on_task(self, info: TaskInfo) -> None:
        if task_ended(info):
            self._post(("task", info))

    def _on_vm(self, msg: VmStateMsg) -> None:
        self._post(("vm", msg))

    def _on_connection(self, state: str, detail: str) -> None:
        if state == "connected" and self._connecting:
            return  # the connect command reports its own success
        self._post(("conn", (state, detail)))

    def _post(self, event: Event) -> None:
        if self.alerts:
            self._show(event)
        else:
            self._events.put(event)

    def _show(self, event: Event) -> None:
        kind, body = event
        if kind == "task":
            self.announce(body)
        elif kind == "vm":
            self._say(fmt.vm_state_line(body, self.domain), status=True)
        else:
            self._connection_news(*body)

    def _connection_news(self, state: str, detail: str) -> None:
        if state == "disconnected":
            self._say(f"connection lost ({detail}); reconnecting...", status=True)
        elif state == "connected":
            self._say("reconnected", status=True)
        elif state == "failed":
            self._say(f"error: {detail}; type reconnect to try again", error=True)

    def _say(self, text: str, *, error: bool = False, status: bool = False) -> None:
        """Show a line: above the prompt from the client's thread, else in order.

        Errors and status lines (connection news, VMs changing state on
        their own) go to stderr when waiting, so stdout holds only command
        output and task completions (``list --json`` stays parseable).
        """
        if self._alert is not None and threading.current_thread() is not threading.main_thread():
            self._alert(text, error)
        elif error or status:
            self._sink.err(text, error=error)
        else:
            self._sink.out(text)

    # ----------------------------------------------------------- completion
    def complete_names(self, kind: Literal["vm", "host", "image"], prefix: str) -> list[str]:
        """Names for tab completion; ``[]`` at once when not connected or on error."""
        client = self.client
        if client is None or not client.connected:
            return []
        try:
            names = client.complete(kind, prefix, timeout=COMPLETE_TIMEOUT_S)
        except UsherError:
            return []
        if kind == "vm":
            shown = [fmt.relative_name(n, self.domain) for n in names]
            # Offer the form the user is typing: relative unless it is an FQDN.
            if any(s.startswith(prefix) for s in shown) or not prefix:
                names = shown
        return sorted(set(names))
