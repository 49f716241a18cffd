"""The asyncio client of the usher controller.

:class:`AsyncClient` is one user's session with the controller: it dials over
TLS, checks that the far end holds a *controller* certificate, logs in with a
name and password and then calls the client operations of
:mod:`usher.protocol.ops`. Mutations are accepted at once with one task per
VM; the controller pushes the tasks' progress and completion, which the client
hands to :attr:`AsyncClient.on_task`.

Staying connected is the client's job, not the caller's:

* A connection that drops is re-dialled with exponential backoff and jitter
  (:class:`~usher.protocol.backoff.Backoff`); a call made meanwhile waits for the
  new connection, for at most ``reconnect_budget_s`` in all, then fails with
  :class:`~usher.errors.NotConnected`. A refused login
  (:class:`~usher.errors.AuthenticationFailed`) or a TLS failure is never
  retried: the same credentials would be refused again.
* A mutation's request id is its idempotency key. The client draws a uuid4
  per mutation (unless the caller gives one) and, when the connection drops
  before the reply, sends the same request again with the same id on the new
  connection; the controller answers a repeat with the first call's result, so
  nothing runs twice.
* Completions that happen while disconnected are replayed: the client
  remembers every task it saw that had not ended, asks for them after the
  reconnect (``task.list``) and calls ``on_task`` for each that ended
  meanwhile. A completion is delivered to ``on_task`` once, however it is
  learned (push, replay or :meth:`AsyncClient.wait`).

Callbacks run on the event loop and must not block.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, NoReturn

from usher.errors import (
    ConnectionClosed,
    NotConnected,
    TimedOut,
    Unavailable,
    UsherError,
)
from usher.protocol.backoff import Backoff
from usher.protocol.connection import Connection, dial
from usher.protocol.frames import PROTOCOL_VERSIONS, Hello
from usher.protocol.ops import (
    MAX_CONSOLE_INPUT,
    OPS,
    Accepted,
    CompleteArgs,
    ConsoleCloseArgs,
    ConsoleDataMsg,
    ConsoleInputArgs,
    ConsoleSessionMsg,
    ConsoleText,
    Empty,
    HostArgs,
    HostInfo,
    ImageInfo,
    ListArgs,
    MigrateArgs,
    StartArgs,
    StartOptions,
    TaskInfo,
    TaskListArgs,
    TaskWaitArgs,
    VmConsoleArgs,
    VmConsoleOpenArgs,
    VmInfo,
    VmOpArgs,
    VmStateMsg,
    VmStats,
    VmStatsArgs,
    WhoAmI,
)
from usher.protocol.tls import client_context, require_role

__all__ = ["TERMINAL_STATES", "AsyncClient", "ConnectionState", "task_ended"]

log = logging.getLogger(__name__)

SOFTWARE = "usher-client/0.1"

TERMINAL_STATES = frozenset({"done", "error"})
"""Task states after which a task never changes again."""

ConnectionState = Literal["connected", "disconnected", "reconnecting", "failed"]

TaskCallback = Callable[[TaskInfo], None]
VmCallback = Callable[[VmStateMsg], None]
ConnectionCallback = Callable[[str, str], None]

# A task seen long ago is forgotten once this many are remembered; the oldest
# ended ones go first. Bounds memory of a client that runs for months.
MAX_KNOWN_TASKS = 10_000
# A call whose connection drops this many times in a row gives up: a request
# that kills the connection every time must not loop forever.
MAX_RESENDS = 5
# Ids per task.list when replaying, well inside the frame limit.
REPLAY_CHUNK = 500
# Concurrent task.wait calls of one wait_all; most tasks end by push anyway.
WAIT_ALL_CONCURRENCY = 16
# task.wait is answered by the controller after timeout_s at the latest; this
# much more covers the network before the client gives up on the reply.
WAIT_SLACK_S = 30.0


def task_ended(info: TaskInfo) -> bool:
    """Whether ``info`` is a task that has finished (``done`` or ``error``)."""
    return info.state in TERMINAL_STATES


def _copy_error(exc: UsherError) -> UsherError:
    """A fresh exception of the same class and content (safe to raise again)."""
    return UsherError.from_wire(exc.code, exc.message, exc.family, exc.details)


# Errors worth another attempt when dialling: the controller is down,
# restarting, overloaded or the network dropped. Anything else (wrong
# password, TLS or certificate role failure, protocol version) would fail again.
_RETRYABLE = (ConnectionClosed, Unavailable)


class AsyncClient:
    """A session with the usher controller at ``host``:``port``.

    ``ca_cert`` is the site CA file the controller's certificate must chain
    to; ``server_hostname`` is the name checked against that certificate
    (default: ``host``). A ``host`` that is an absolute path is the
    controller's Unix socket (``listen_unix``; ``port`` is ignored and the
    name checked defaults to ``localhost``). Call :meth:`connect` first and :meth:`close` last.

    Callbacks (plain attributes, may be None), all run on the event loop:

    * ``on_task(TaskInfo)``: progress or completion of one of the caller's
      tasks; each completion is delivered once.
    * ``on_vm(VmStateMsg)``: a VM of the caller changed state on its own.
    * ``on_connection(state, detail)``: ``state`` is ``connected`` (detail
      ``connected to H:P`` after :meth:`connect`, ``reconnected to H:P`` after
      an automatic reconnect), ``disconnected`` (detail: why),
      ``reconnecting`` (detail: attempt and delay) or ``failed`` (reconnecting
      gave up; detail: why; :meth:`reconnect` tries again).

    Errors: every method raises :class:`~usher.errors.UsherError` subclasses
    only: the controller's own errors as sent, :class:`NotConnected` when
    there is no connection and none could be made within the budget.
    """

    def __init__(self, host: str, port: int, *, ca_cert: str, user: str, password: str,
                 server_hostname: str | None = None, reconnect: bool = True,
                 reconnect_max_s: float = 30.0, reconnect_initial_s: float = 0.2,
                 reconnect_budget_s: float = 60.0, connect_timeout_s: float = 10.0,
                 rng: random.Random | None = None) -> None:
        self.host = host
        self.port = port
        self.user = user
        self._ca_cert = ca_cert
        self._password = password
        self._server_hostname = server_hostname
        self._auto_reconnect = reconnect
        self._reconnect_initial_s = min(reconnect_initial_s, reconnect_max_s)
        self._reconnect_max_s = reconnect_max_s
        self._reconnect_budget_s = reconnect_budget_s
        self._connect_timeout_s = connect_timeout_s
        self._rng = rng or random.Random()
        self._ssl: ssl.SSLContext | None = None

        self.on_task: TaskCallback | None = None
        self.on_vm: VmCallback | None = None
        self.on_connection: ConnectionCallback | None = None

        self._conn: Connection | None = None
        self._whoami: WhoAmI | None = None
        self._ever_connected = False
        self._closing = False
        self._failure: UsherError | None = None
        self._reconnect_task: asyncio.Task[None] | None = None
        self._known: OrderedDict[str, TaskInfo] = OrderedDict()
        self._consoles: dict[str, ConsoleSession] = {}
        # Output can arrive before console_open's reply: kept (bounded) until then.
        self._console_early: OrderedDict[str, list[ConsoleDataMsg]] = OrderedDict()
        self._waiters: dict[str, list[asyncio.Future[TaskInfo]]] = {}
        self._reapers: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------ properties
    @property
    def address(self) -> str:
        """``HOST:PORT`` of the controller (``unix:PATH`` for its Unix socket)."""
        if self.host.startswith("/"):
            return f"unix:{self.host}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def connected(self) -> bool:
        """Whether a live connection is up right now."""
        return self._conn is not None and not self._conn.closed

    @property
    def session(self) -> WhoAmI | None:
        """Who the session is, as of the last (re)connect; None before :meth:`connect`."""
        return self._whoami

    def known_task(self, task_id: str) -> TaskInfo | None:
        """The latest state of a task this client has seen, or None."""
        return self._known.get(task_id)

    # ------------------------------------------------------------- lifecycle
    async def connect(self) -> WhoAmI:
        """Dial the controller, log in and return who the session is.

        One attempt, no retry: the error says why it failed, in one line.

        Raises:
            NotConnected: the controller is unreachable or closed the
                connection (``cannot connect to HOST:PORT: ...``).
            TimedOut: no answer within the connect timeout.
            PermissionDenied: TLS verification failed, or the server's
                certificate is not a controller certificate.
            AuthenticationFailed: wrong user name or password.
            ConfigError: the CA file cannot be read.
            VersionMismatch: no protocol version in common.
        """
        if self.connected and self._whoami is not None:
            return self._whoami
        await self._stop_reconnecting()
        self._closing = False
        self._failure = None
        try:
            conn = await self._open()
        except ConnectionClosed as exc:
            raise NotConnected(exc.message, details=exc.details) from None
        self._conn = conn
        self._ever_connected = True
        self._emit("connected", f"connected to {self.address}")
        assert self._whoami is not None
        return self._whoami

    async def reconnect(self) -> WhoAmI:
        """Drop the current connection (if any) and connect again, once.

        The way back after reconnecting gave up (state ``failed``). Raises
        what :meth:`connect` raises.
        """
        await self._stop_reconnecting()
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close("reconnecting")
        return await self.connect()

    async def close(self) -> None:
        """Close the session; pending waits fail with :class:`NotConnected`. Idempotent."""
        self._closing = True
        await self._stop_reconnecting()
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close("client closed")
        self._end_consoles("the client was closed")
        if self._reapers:
            await asyncio.gather(*self._reapers, return_exceptions=True)
        err = NotConnected("the client was closed")
        for futures in self._waiters.values():
            for fut in futures:
                if not fut.done():
                    fut.set_exception(_copy_error(err))
        self._waiters.clear()

    async def _stop_reconnecting(self) -> None:
        task, self._reconnect_task = self._reconnect_task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, UsherError):
                await task

    async def _open(self) -> Connection:
        """Dial, check the controller's role, log in and learn who we are."""
        if self._ssl is None:
            self._ssl = client_context(self._ca_cert)
        hello = Hello(versions=list(PROTOCOL_VERSIONS), role="client", user=self.user,
                      password=self._password, software=SOFTWARE)
        reader, writer, welcome = await dial(self.host, self.port, self._ssl, hello,
                                             server_hostname=self._server_hostname,
                                             timeout=self._connect_timeout_s)
        try:
            ssl_object = writer.get_extra_info("ssl_object")
            if ssl_object is None:
                raise ConnectionClosed(f"connection to {self.address} is not TLS")
            require_role(ssl_object, "controller")
        except BaseException:
            writer.close()
            raise
        conn = Connection(reader, writer, peer_role="controller", peer_name=self.address,
                          heartbeat_s=welcome.heartbeat_s, push_handler=self._on_push,
                          on_close=self._on_close)
        conn.start()
        try:
            self._whoami = await conn.request("session.whoami", Empty())
        except BaseException:
            await conn.close("login incomplete")
            raise
        return conn

    def _emit(self, state: ConnectionState, detail: str) -> None:
        log.info("connection to %s: %s (%s)", self.address, state, detail)
        if self.on_connection is not None:
            try:
                self.on_connection(state, detail)
            except Exception:
                log.exception("on_connection callback failed")

    # ------------------------------------------------------------ reconnect
    def _on_close(self, conn: Connection) -> None:
        # Runs inside Connection._shutdown, before any caller sees the error.
        if conn is not self._conn or self._closing:
            return
        self._conn = None
        # A connection closed by its peer leaves its heartbeat task sleeping;
        # closing it from our side too ends that task now.
        reaper = asyncio.get_running_loop().create_task(conn.close("closed by peer"))
        self._reapers.add(reaper)
        reaper.add_done_callback(self._reapers.discard)
        reason = conn.close_reason or "connection closed"
        self._end_consoles(f"connection lost ({reason})")
        self._emit("disconnected", reason)
        if not self._auto_reconnect:
            self._failure = NotConnected(f"connection to {self.address} lost: {reason}")
            self._emit("failed", self._failure.message)
            return
        self._ensure_reconnecting()

    def _ensure_reconnecting(self) -> asyncio.Task[None]:
        task = self._reconnect_task
        if task is None or task.done():
            task = asyncio.get_running_loop().create_task(self._reconnect_loop(),
                                                          name=f"reconnect:{self.address}")
            # The outcome also reaches waiters through _ready; this only keeps
            # asyncio from warning about an exception nobody retrieved.
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            self._reconnect_task = task
        return task

    async def _reconnect_loop(self) -> None:
        """Re-dial until connected, a non-retryable error, or the budget is spent.

        On success replays missed completions. Raises the error that ended it
        (also kept in ``_failure``).
        """
        loop = asyncio.get_running_loop()
        backoff = Backoff(self._reconnect_initial_s, self._reconnect_max_s, rng=self._rng)
        deadline = loop.time() + self._reconnect_budget_s
        last = "no attempt made"
        attempt = 0
        while True:
            delay = backoff.next_delay()
            if loop.time() + delay > deadline:
                self._fail(NotConnected(
                    f"cannot reconnect to {self.address} "
                    f"(gave up after {self._reconnect_budget_s:g} s): {last}"))
            attempt += 1
            self._emit("reconnecting", f"attempt {attempt} in {delay:.1f} s")
            await asyncio.sleep(delay)
            try:
                conn = await self._open()
            except _RETRYABLE as exc:
                last = exc.message
                log.info("reconnect attempt %d to %s failed: %s", attempt, self.address, last)
                continue
            except UsherError as exc:
                self._fail(exc)
            self._conn = conn
            self._emit("connected", f"reconnected to {self.address}")
            await self._replay(conn)
            return

    def _fail(self, exc: UsherError) -> NoReturn:
        self._failure = exc
        self._emit("failed", exc.message)
        raise _copy_error(exc)

    async def _replay(self, conn: Connection) -> None:
        """Deliver the completions of remembered tasks that ended while disconnected."""
        open_ids = [tid for tid, info in self._known.items() if not task_ended(info)]
        for start in range(0, len(open_ids), REPLAY_CHUNK):
            chunk = open_ids[start:start + REPLAY_CHUNK]
            try:
                infos: list[TaskInfo] = await conn.request(
                    "task.list", TaskListArgs(ids=chunk, limit=len(chunk)))
            except UsherError as exc:
                # The tasks' completions still arrive by push or by wait();
                # a failed replay only delays them.
                log.warning("cannot replay task completions from %s: %s", self.address, exc)
                return
            wanted = set(chunk)
            for info in infos:
                if info.id in wanted and task_ended(info):
                    self._observe(info)

    async def _ready(self, wait: bool) -> Connection:
        """The live connection, waiting for a reconnect in progress if ``wait``."""
        while True:
            conn = self._conn
            if conn is not None and not conn.closed:
                return conn
            if self._closing or not self._ever_connected:
                raise NotConnected("not connected to a controller; connect first")
            if self._failure is not None:
                raise _copy_error(self._failure)
            if not wait:
                raise NotConnected(f"not connected to {self.address} (reconnecting)")
            try:
                await asyncio.shield(self._ensure_reconnecting())
            except UsherError as exc:
                raise _copy_error(exc) from None

    async def _call(self, op_name: str, args: Any, *, request_id: str | None = None,
                    timeout: float | None = None, wait_connected: bool = True) -> Any:
        """Call an operation, riding out connection drops.

        A call whose connection drops before its reply is sent again on the
        next connection; a mutation goes with the same request id, so the
        controller answers it with the first call's result.
        """
        if OPS[op_name].mutation and request_id is None:
            request_id = str(uuid.uuid4())
        drops = 0
        while True:
            conn = await self._ready(wait_connected)
            try:
                return await conn.request(op_name, args, request_id=request_id, timeout=timeout)
            except ConnectionClosed as exc:
                if not conn.closed:
                    raise  # the controller sent this error as data
                drops += 1
                if not wait_connected or drops >= MAX_RESENDS:
                    raise NotConnected(f"{op_name}: connection to {self.address} lost: "
                                       f"{exc.message}") from None
                log.info("connection lost during %s (request %s); sending it again "
                         "after reconnecting", op_name, request_id)

    # ----------------------------------------------------------------- tasks
    def _on_push(self, conn: Connection, topic: str, body: Any) -> None:
        if topic == "console":
            self._console_output(body)
            return
        if topic == "task":
            self._observe(body)
        elif topic == "vm" and self.on_vm is not None:
            try:
                self.on_vm(body)
            except Exception:
                log.exception("on_vm callback failed")

    def _remember(self, info: TaskInfo) -> None:
        """Record a task without telling anyone (a newer state wins)."""
        if info.id not in self._known:
            self._store(info)

    def _store(self, info: TaskInfo) -> None:
        self._known[info.id] = info
        self._known.move_to_end(info.id)
        while len(self._known) > MAX_KNOWN_TASKS:
            victim = next((tid for tid, t in self._known.items() if task_ended(t)), None)
            if victim is None:
                self._known.popitem(last=False)
            else:
                del self._known[victim]

    def _observe(self, info: TaskInfo) -> None:
        """A task state learned from the controller: record, wake waiters, notify."""
        previous = self._known.get(info.id)
        if previous is not None and task_ended(previous):
            return  # a repeat or a stale progress report of an ended task
        self._store(info)
        if task_ended(info):
            for fut in self._waiters.pop(info.id, []):
                if not fut.done():
                    fut.set_result(info)
        if self.on_task is not None:
            try:
                self.on_task(info)
            except Exception:
                log.exception("on_task callback failed")

    def _accepted(self, accepted: Accepted) -> list[TaskInfo]:
        for info in accepted.tasks:
            if task_ended(info):
                self._observe(info)
            else:
                self._remember(info)
        # A completion push may have overtaken the reply: return the newest state.
        return [self._known.get(info.id, info) for info in accepted.tasks]

    async def wait(self, task_id: str, timeout_s: float = 600) -> TaskInfo:
        """Wait until a task ends and return it.

        Ends at the first of: the completion push, the controller's answer to
        ``task.wait``. Raises :class:`TimedOut` if the task has not ended
        within ``timeout_s``, :class:`~usher.errors.TaskNotFound` for an
        unknown id, :class:`NotConnected` if the connection is gone for good.
        """
        info = self._known.get(task_id)
        if info is not None and task_ended(info):
            return info
        fut: asyncio.Future[TaskInfo] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(task_id, []).append(fut)
        call = asyncio.ensure_future(self._call(
            "task.wait", TaskWaitArgs(id=task_id, timeout_s=timeout_s),
            timeout=timeout_s + WAIT_SLACK_S))
        try:
            done, _ = await asyncio.wait({fut, call}, timeout=timeout_s + 2 * WAIT_SLACK_S,
                                         return_when=asyncio.FIRST_COMPLETED)
            if fut in done:
                return fut.result()
            if call in done:
                result: TaskInfo = call.result()
                if task_ended(result):
                    self._observe(result)
                    return self._known.get(task_id, result)
            raise TimedOut(f"task {task_id} did not end within {timeout_s:g} s")
        finally:
            waiters = self._waiters.get(task_id)
            if waiters is not None and fut in waiters:
                waiters.remove(fut)
                if not waiters:
                    del self._waiters[task_id]
            if not call.done():
                call.cancel()
            elif not call.cancelled():
                call.exception()  # retrieved: the push won, the call's outcome is moot

    async def wait_all(self, tasks: Sequence[TaskInfo], timeout_s: float = 600) -> list[TaskInfo]:
        """Wait until every task in ``tasks`` ends; return them in the same order.

        Works even when a completion arrived before this call (the client
        keeps the latest state of every task it has seen). Raises the first
        error of any one wait, and :class:`TimedOut` when not all have ended
        within ``timeout_s``.
        """
        for info in tasks:
            self._remember(info)
        ids = list(dict.fromkeys(info.id for info in tasks))
        results: dict[str, TaskInfo] = {}
        pending = iter(ids)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s

        async def worker() -> None:
            for task_id in pending:
                remaining = max(0.0, deadline - loop.time())
                results[task_id] = await self.wait(task_id, remaining)

        workers = [asyncio.ensure_future(worker())
                   for _ in range(min(WAIT_ALL_CONCURRENCY, len(ids)))]
        try:
            await asyncio.wait_for(asyncio.gather(*workers), timeout_s + WAIT_SLACK_S)
        except TimeoutError:
            raise TimedOut(f"{len(ids) - len(results)} of {len(ids)} tasks did not end "
                           f"within {timeout_s:g} s") from None
        finally:
            for w in workers:
                w.cancel()
        return [results[info.id] for info in tasks]

    # ------------------------------------------------------------ mutations
    async def start(self, names: Sequence[str], *, ram: int | None = None,
                    vcpus: int | None = None, vmm: str | None = None,
                    ip_range: str | None = None, ip: str | None = None, rr: bool = False,
                    image: str | None = None, kernel: str | None = None,
                    initrd: str | None = None, kernel_parms: str | None = None,
                    fs_uri: str | None = None,
                    request_id: str | None = None) -> list[TaskInfo]:
        """Start VMs, creating those that do not exist (``ram`` MiB, ``vcpus``, on ``vmm``,
        with an address of IP range ``ip_range`` (else the site's default), ``ip`` if given;
        ``rr``: new VMs also join the round-robin DNS name of their cluster).

        New VMs boot from registered images (:meth:`list_images`): the disk
        (and kernel) of ``image``, the kernel of ``kernel``, the initrd of
        ``initrd``, with ``kernel_parms`` added to the kernel command line;
        ``fs_uri`` is an NFS root for the kernel (``nfs://SERVER/PATH``) or,
        for site admins, a disk URL with ``#sha256=HEX``.

        Names go to the controller as typed (relative, FQDN or a brace batch);
        it expands and validates them as a whole. Returns one task per VM.
        """
        options = StartOptions(ram=ram, vcpus=vcpus, vmm=vmm, ip_range=ip_range, ip=ip, rr=rr,
                               image=image, kernel=kernel, initrd=initrd,
                               kernel_parms=kernel_parms, fs_uri=fs_uri)
        args = StartArgs(names=list(names), options=options)
        return self._accepted(await self._call("vm.start", args, request_id=request_id))

    async def _vm_op(self, op: str, names: Sequence[str], request_id: str | None,
                     force: bool = False) -> list[TaskInfo]:
        args = VmOpArgs(names=list(names), force=force)
        return self._accepted(await self._call(op, args, request_id=request_id))

    async def shutdown(self, names: Sequence[str], *,
                       request_id: str | None = None) -> list[TaskInfo]:
        """Gracefully shut down running VMs; they stay registered."""
        return await self._vm_op("vm.shutdown", names, request_id)

    async def reboot(self, names: Sequence[str], *,
                     request_id: str | None = None) -> list[TaskInfo]:
        """Gracefully reboot running VMs."""
        return await self._vm_op("vm.reboot", names, request_id)

    async def cycle(self, names: Sequence[str], *,
                    request_id: str | None = None) -> list[TaskInfo]:
        """Hard power off VMs and boot them again on the same host."""
        return await self._vm_op("vm.cycle", names, request_id)

    async def pause(self, names: Sequence[str], *,
                    request_id: str | None = None) -> list[TaskInfo]:
        """Suspend running VMs in memory."""
        return await self._vm_op("vm.pause", names, request_id)

    async def resume(self, names: Sequence[str], *,
                     request_id: str | None = None) -> list[TaskInfo]:
        """Resume paused VMs."""
        return await self._vm_op("vm.resume", names, request_id)

    async def hibernate(self, names: Sequence[str], *,
                        request_id: str | None = None) -> list[TaskInfo]:
        """Save VMs to disk; :meth:`start` restores them."""
        return await self._vm_op("vm.hibernate", names, request_id)

    async def destroy(self, names: Sequence[str], *, force: bool = False,
                      request_id: str | None = None) -> list[TaskInfo]:
        """Power off, undefine and unregister VMs; ``force`` forgets VMs on a lost host."""
        return await self._vm_op("vm.destroy", names, request_id, force=force)

    async def migrate(self, names: Sequence[str], *, vmm: str | None = None,
                      request_id: str | None = None) -> list[TaskInfo]:
        """Move VMs to host ``vmm`` (or the scheduler's choice)."""
        args = MigrateArgs(names=list(names), vmm=vmm)
        return self._accepted(await self._call("vm.migrate", args, request_id=request_id))

    async def abort_migration(self, names: Sequence[str], *,
                              request_id: str | None = None) -> list[TaskInfo]:
        """Abort the running migrations of VMs; returns their migrate tasks (which fail)."""
        return await self._vm_op("vm.migrate_abort", names, request_id)

    async def host_disable(self, name: str, *, request_id: str | None = None) -> HostInfo:
        """Stop placing new VMs on a host (site admin)."""
        result: HostInfo = await self._call("host.disable", HostArgs(name=name),
                                            request_id=request_id)
        return result

    async def host_enable(self, name: str, *, request_id: str | None = None) -> HostInfo:
        """Place VMs on a disabled host again (site admin)."""
        result: HostInfo = await self._call("host.enable", HostArgs(name=name),
                                            request_id=request_id)
        return result

    async def host_remove(self, name: str, *, request_id: str | None = None) -> HostInfo:
        """Forget an empty host (site admin)."""
        result: HostInfo = await self._call("host.remove", HostArgs(name=name),
                                            request_id=request_id)
        return result

    # -------------------------------------------------------------- consoles
    async def console_open(self, name: str, on_data: Callable[[bytes], None],
                           on_end: Callable[[str], None]) -> ConsoleSession:
        """Attach to VM ``name``'s serial console.

        ``on_data(bytes)`` gets its output and ``on_end(reason)`` is called once
        when the session ends by itself (the guest stopped, the connection
        broke); both run on the event loop. Detach with
        :meth:`ConsoleSession.close`. A session lives on one connection: an
        automatic reconnect does not carry it over (``on_end`` says so).
        """
        reply: ConsoleSessionMsg = await self._call("vm.console_open",
                                                    VmConsoleOpenArgs(name=name))
        session = ConsoleSession(self, reply.session, reply.name, on_data, on_end)
        self._consoles[reply.session] = session
        for msg in self._console_early.pop(reply.session, []):
            self._console_output(msg)
        return session

    def _console_output(self, msg: ConsoleDataMsg) -> None:
        session = self._consoles.get(msg.session)
        if session is None:
            early = self._console_early.setdefault(msg.session, [])
            if len(early) < 256:
                early.append(msg)
            while len(self._console_early) > 16:
                self._console_early.popitem(last=False)
            return
        if msg.data:
            session._deliver(msg.data)
        if msg.eof:
            self._consoles.pop(msg.session, None)
            session._ended(msg.reason or "the console closed")

    def _end_consoles(self, reason: str) -> None:
        consoles, self._consoles = self._consoles, {}
        for session in consoles.values():
            session._ended(reason)

    # ---------------------------------------------------------------- reads
    async def console_tail(self, name: str, lines: int = 50) -> str:
        """The last ``lines`` lines VM ``name`` printed on its serial console."""
        result: ConsoleText = await self._call("vm.console",
                                               VmConsoleArgs(name=name, lines=lines))
        return result.text

    async def list_vms(self, names: Iterable[str] = (), *,
                       all_users: bool = False) -> list[VmInfo]:
        """VMs the caller may see, optionally only those matching ``names``."""
        result: list[VmInfo] = await self._call(
            "vm.list", ListArgs(names=list(names), all_users=all_users))
        return result

    async def vm_stats(self, names: Iterable[str] = (), *, samples: int | None = None,
                       all_users: bool = False) -> list[VmStats]:
        """Recent resource samples of VMs (as :meth:`list_vms` selects them), oldest
        first, with their rates over the last interval and over the samples.

        ``samples`` per VM: 1 to the site's ``stats_keep``; None: the newest
        :data:`~usher.protocol.ops.DEFAULT_STATS_SAMPLES` (or all the site keeps).
        """
        result: list[VmStats] = await self._call(
            "vm.stats", VmStatsArgs(names=list(names), all_users=all_users, samples=samples))
        return result

    async def list_hosts(self) -> list[HostInfo]:
        """The hosts (VMMs) and their capacity."""
        result: list[HostInfo] = await self._call("host.list", Empty())
        return result

    async def list_images(self) -> list[ImageInfo]:
        """The registered images new VMs may start from (names, formats, descriptions)."""
        result: list[ImageInfo] = await self._call("image.list", Empty())
        return result

    async def tasks(self, ids: Iterable[str] = (), *, limit: int = 50,
                    active_only: bool = False) -> list[TaskInfo]:
        """The caller's recent tasks (or those with ``ids``), newest first."""
        result: list[TaskInfo] = await self._call(
            "task.list", TaskListArgs(ids=list(ids), limit=limit, active_only=active_only))
        return result

    async def whoami(self) -> WhoAmI:
        """Who the session is, asked of the controller."""
        result: WhoAmI = await self._call("session.whoami", Empty())
        self._whoami = result
        return result

    async def complete(self, kind: Literal["vm", "host", "image"],
                       prefix: str = "") -> list[str]:
        """Names for tab completion: the caller's VMs, the hosts or the images.

        Never waits for a reconnect: raises :class:`NotConnected` at once when
        there is no live connection, so completion does not hang.
        """
        result: list[str] = await self._call("session.complete",
                                             CompleteArgs(kind=kind, prefix=prefix),
                                             wait_connected=False)
        return result


class ConsoleSession:
    """An attached serial console (see :meth:`AsyncClient.console_open`)."""

    def __init__(self, client: AsyncClient, session: str, name: str,
                 on_data: Callable[[bytes], None], on_end: Callable[[str], None]) -> None:
        self.client = client
        self.id = session
        self.name = name  # the VM's FQDN
        self._on_data = on_data
        self._on_end = on_end
        self.ended: str | None = None  # why it ended, once it has

    async def write(self, data: bytes) -> None:
        """Send keystrokes (split into pieces the protocol takes)."""
        for start in range(0, len(data), MAX_CONSOLE_INPUT):
            await self.client._call("vm.console_input", ConsoleInputArgs(
                session=self.id, data=data[start:start + MAX_CONSOLE_INPUT]))

    async def close(self) -> None:
        """Detach; idempotent."""
        if self.ended is not None:
            return
        self.ended = "detached"
        self.client._consoles.pop(self.id, None)
        with contextlib.suppress(UsherError):
            await self.client._call("vm.console_close", ConsoleCloseArgs(session=self.id))

    def _deliver(self, data: bytes) -> None:
        try:
            self._on_data(data)
        except Exception:
            log.exception("console on_data callback failed")

    def _ended(self, reason: str) -> None:
        if self.ended is not None:
            return
        self.ended = reason
        try:
            self._on_end(reason)
        except Exception:
            log.exception("console on_end callback failed")
