"""The ush shell: a thin cmd2 application over the usher client library.

:class:`UshApp` owns the session (one :class:`~usher.client.Client`) and the
few services every command shares: calling the client with an error turned
into one ``error: ...`` line on stderr, announcing accepted and finished
tasks, and delivering what the controller pushes. The commands themselves are
one :class:`cmd2.CommandSet` per noun: :mod:`.session_commands`,
:mod:`.vm_commands`, :mod:`.host_commands` and :mod:`.task_commands`.

The shell runs in one of two modes:

* **interactive** (a terminal): a command returns to the prompt as soon as the
  controller accepts it. Task completions, VM state changes and connection
  news arrive on the client's thread and are shown above the prompt through
  cmd2's asynchronous alerts, which redraw the prompt intact.
* **batch** (``ush 'start web1' 'list'``, or commands on a pipe): after each
  command the shell waits for that command's tasks, printing completions as
  they arrive; pushes are queued and printed by the main thread so lines
  never interleave. The first failure decides the exit status: the
  :class:`~usher.errors.UsherError`'s exit code, 1 for a usage error or a
  failed task.
"""

from __future__ import annotations

import getpass
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, Literal, TypeVar

import cmd2
from cmd2 import Cmd2ArgparseError, Cmd2Style, Statement
from rich.text import Text

from usher.client import Client, TaskInfo, VmStateMsg, task_ended
from usher.config import UshConfig
from usher.errors import ConfigError, InvalidOption, NotConnected, UsherError
from usher.ush import format as fmt
from usher.ush.host_commands import HostCommands
from usher.ush.session_commands import SessionCommands
from usher.ush.task_commands import TaskCommands
from usher.ush.vm_commands import VmCommands

__all__ = ["REMOVED_BUILTINS", "UshApp", "parse_controller"]

T = TypeVar("T")

REMOVED_BUILTINS = ("alias", "edit", "ipy", "macro", "py", "run_pyscript", "run_script",
                    "_relative_run_script", "set", "shell", "shortcuts")
"""cmd2 built-ins a user of ush would not expect (scripting, shell escapes)."""

# cmd2 files its built-ins (help, history, quit) under the category of the
# class that defines them; renaming it is the documented way to title them.
cmd2.Cmd.DEFAULT_CATEGORY = "Shell"

PROMPT = "ush> "
TASK_WAIT_S = 3600.0
"""Longest a batch command waits for its tasks (the controller's own task
deadline is far shorter, so this only guards against a wedged controller)."""
COMPLETE_TIMEOUT_S = 2.0
"""Tab completion gives up on a slow controller after this long."""
_MAX_ANNOUNCED = 10_000

ClientFactory = Callable[..., Client]
Event = tuple[Literal["task", "vm", "conn"], Any]


def parse_controller(address: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` for IPv6 literals).

    Raises:
        InvalidOption: no port, or a port that is not a number from 1 to 65535.
    """
    host, sep, port = address.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidOption(f"controller address {address!r} is not HOST:PORT "
                            f"(for example localhost:7443)")
    return host, int(port)


class UshApp(cmd2.Cmd):
    """The ``ush`` command interpreter.

    ``interactive`` selects persistent history and, on a terminal, returning
    to the prompt at once; otherwise the shell works in batch mode (see the
    module docstring). ``client_factory`` builds the session's client from
    :class:`~usher.client.Client`'s arguments (a seam for programs that embed
    the shell).
    """

    def __init__(self, config: UshConfig, *, interactive: bool,
                 client_factory: ClientFactory = Client, stdin: Any = None,
                 stdout: Any = None) -> None:
        super().__init__(
            allow_cli_args=False,
            allow_clipboard=False,
            persistent_history_file=config.history_file if interactive else "",
            shortcuts={"?": "help"},
            command_sets=[SessionCommands(), VmCommands(), HostCommands(), TaskCommands()],
            stdin=stdin,
            stdout=stdout,
        )
        # After cmd2's own set-up, which attaches subcommands to alias and macro.
        for name in REMOVED_BUILTINS:
            setattr(self, f"do_{name}", None)
        self.prompt = PROMPT
        self.config = config
        self.client: Client | None = None
        self._client_factory = client_factory
        # Alerts need prompt_toolkit on a terminal; without one, print in order.
        self.alerts = interactive and self.stdin.isatty() and self.stdout.isatty()
        self.waits_for_tasks = not self.alerts
        self.first_failure: int | None = None
        self._pending: list[TaskInfo] = []
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._announced: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self._connecting = False

    # ------------------------------------------------------------- session
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
        if not self.stdin.isatty():
            raise ConfigError("no password in the ush config and no terminal to ask for "
                              "one; set password in the file USH_CONFIG names (mode 600)")
        try:
            return getpass.getpass(prompt)
        except (EOFError, KeyboardInterrupt):
            self.poutput("")
            return None

    def open_session(self, controller: str, user: str, password: str, *,
                     quiet: bool = False) -> bool:
        """Connect to ``controller`` as ``user``, replacing any current session."""
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
        # Only a good new session replaces the old one.
        self.close_session()
        self.client = client
        if not quiet:
            self.poutput(f"connected to {client.address} as {who.user} (domain {who.domain})")
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
        return self.open_session(self.config.controller, user, password, quiet=quiet)

    def reconnect_session(self) -> None:
        """Connect the current session again (after reconnecting gave up)."""
        self._connecting = True
        try:
            who = self.call(lambda client: client.reconnect())
        finally:
            self._connecting = False
        if who is not None and self.client is not None:
            self.poutput(f"reconnected to {self.client.address} as {who.user}")

    def close_session(self) -> None:
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
        self.perror(f"error: {exc.message}")
        self.fail(exc.exit_code)

    def fail(self, exit_code: int) -> None:
        """Record a failure; the first one is the exit status of a batch run."""
        if self.first_failure is None:
            self.first_failure = exit_code or 1

    def onecmd(self, statement: Statement | str, *, add_to_history: bool = True) -> bool:
        try:
            return super().onecmd(statement, add_to_history=add_to_history)
        except Cmd2ArgparseError as exc:
            cause = exc.__cause__
            if not (isinstance(cause, SystemExit) and cause.code in (0, None)):
                self.fail(1)  # a usage error; plain -h/--help is not a failure
            raise

    def default(self, statement: Statement) -> bool | None:
        self.perror(f"error: unknown command {statement.command!r}; type help")
        self.fail(1)
        return None

    def pexcept(self, exception: BaseException, **kwargs: Any) -> None:
        self.fail(1)
        super().pexcept(exception, **kwargs)

    # ----------------------------------------------------------------- tasks
    def accepted(self, tasks: list[TaskInfo]) -> None:
        """Print one line per accepted task; batch mode will wait for them."""
        for info in tasks:
            self.poutput(fmt.task_accepted_line(info, self.domain))
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
        """Batch mode: wait for the last command's tasks, printing pushes meanwhile."""
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
        their own) go to stderr in batch mode, so stdout holds only command
        output and task completions (``list --json`` stays parseable).
        """
        if self.alerts and threading.current_thread() is not threading.main_thread():
            style = Cmd2Style.ERROR if error else ""
            self.add_alert(msg=Text(text, style=style), prompt=self.current_prompt())
        elif error or status:
            self.perror(text, style=Cmd2Style.ERROR if error else None)
        else:
            self.poutput(text)

    # ----------------------------------------------------------- completion
    def complete_names(self, kind: Literal["vm", "host"], prefix: str) -> list[str]:
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

    # ---------------------------------------------------------------- loop
    def current_prompt(self) -> str:
        client = self.client
        if client is not None and client.connected:
            return f"ush({client.user})> "
        return PROMPT

    def pre_prompt(self) -> None:
        self.prompt = self.current_prompt()

    def preloop(self) -> None:
        if self.config.password:
            self.connect_from_config()
        else:
            self.poutput(f"not connected; type connect to log in to {self.config.controller}")

    def postloop(self) -> None:
        self.close_session()

    def postcmd(self, stop: bool, statement: Statement | str) -> bool:
        if self.waits_for_tasks:
            self.wait_for_pending()
        return stop

    def run_commands(self, lines: Iterable[str]) -> int:
        """Batch mode: connect from the config, run each line, return the exit status.

        Blank lines and lines starting with ``#`` are skipped; ``quit`` stops.
        """
        if not self.connect_from_config(quiet=True):
            return self.exit_status or 1
        try:
            for line in lines:
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                if self.onecmd_plus_hooks(line.rstrip("\n")):
                    break
            self.drain_events(0)
        finally:
            self.close_session()
        return self.exit_status
