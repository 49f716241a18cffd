"""A blocking facade over :class:`~usher.client.async_client.AsyncClient`.

:class:`Client` runs one asyncio event loop in a daemon thread and forwards
each call to the :class:`AsyncClient` living there, blocking until it
returns. It suits scripts and the ``ush`` shell, which are not asyncio
programs. Callbacks (``on_task``, ``on_vm``, ``on_connection``) run on the
client's thread, not the caller's: they must not block and must hand work to
the caller's thread themselves (a queue, cmd2's alerts).

A call interrupted in the caller (Ctrl-C) is cancelled in the loop too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable, Coroutine, Iterable, Sequence
from types import TracebackType
from typing import Any, Literal, TypeVar

from usher.client.async_client import (
    AsyncClient,
    ConnectionCallback,
    ConsoleSession,
    TaskCallback,
    VmCallback,
)
from usher.errors import NotConnected, TimedOut
from usher.protocol.ops import (
    HostInfo,
    ImageInfo,
    TaskInfo,
    VmInfo,
    VmStats,
    WhoAmI,
)

__all__ = ["Client"]

T = TypeVar("T")


class Client:
    """The blocking twin of :class:`AsyncClient`: same methods, same errors.

    Use it as a context manager, or call :meth:`close` when done (the loop
    thread is a daemon, so a forgotten client never keeps a process alive).
    """

    def __init__(self, host: str, port: int, *, ca_cert: str, user: str, password: str,
                 server_hostname: str | None = None, reconnect: bool = True,
                 reconnect_max_s: float = 30.0, reconnect_budget_s: float = 60.0,
                 connect_timeout_s: float = 10.0) -> None:
        self._aio = AsyncClient(host, port, ca_cert=ca_cert, user=user, password=password,
                                server_hostname=server_hostname, reconnect=reconnect,
                                reconnect_max_s=reconnect_max_s,
                                reconnect_budget_s=reconnect_budget_s,
                                connect_timeout_s=connect_timeout_s)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name=f"usher-client:{host}",
                                        daemon=True)
        self._thread.start()
        self._closed = False

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    # ------------------------------------------------------------ plumbing
    @property
    def aio(self) -> AsyncClient:
        """The :class:`AsyncClient` underneath (use it only on the client's loop)."""
        return self._aio

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run ``coro`` on the client's loop; returns at once with a future."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if self._closed:
            coro.close()
            raise NotConnected("the client was closed")
        fut = self.submit(coro)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimedOut(f"no answer from {self._aio.address} within {timeout:g} s") from None
        except BaseException:
            fut.cancel()
            raise

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ------------------------------------------------------------ callbacks
    @property
    def on_task(self) -> TaskCallback | None:
        return self._aio.on_task

    @on_task.setter
    def on_task(self, callback: TaskCallback | None) -> None:
        self._aio.on_task = callback

    @property
    def on_vm(self) -> VmCallback | None:
        return self._aio.on_vm

    @on_vm.setter
    def on_vm(self, callback: VmCallback | None) -> None:
        self._aio.on_vm = callback

    @property
    def on_connection(self) -> ConnectionCallback | None:
        return self._aio.on_connection

    @on_connection.setter
    def on_connection(self, callback: ConnectionCallback | None) -> None:
        self._aio.on_connection = callback

    # ------------------------------------------------------------ lifecycle
    @property
    def address(self) -> str:
        return self._aio.address

    @property
    def user(self) -> str:
        return self._aio.user

    @property
    def connected(self) -> bool:
        return self._aio.connected

    @property
    def session(self) -> WhoAmI | None:
        return self._aio.session

    def connect(self) -> WhoAmI:
        return self._run(self._aio.connect())

    def reconnect(self) -> WhoAmI:
        return self._run(self._aio.reconnect())

    async def _close_all(self) -> None:
        await self._aio.close()
        # Whatever still runs on this loop (a call abandoned by Ctrl-C, say)
        # ends here rather than being destroyed with the loop.
        current = asyncio.current_task()
        rest = [t for t in asyncio.all_tasks() if t is not current]
        for task in rest:
            task.cancel()
        await asyncio.gather(*rest, return_exceptions=True)

    def close(self) -> None:
        """Close the session and stop the loop thread; idempotent."""
        if self._closed:
            return
        try:
            # Closing must not fail: a peer that is already gone is closed enough.
            with contextlib.suppress(Exception):
                self._run(self._close_all(), timeout=5.0)
        finally:
            self._closed = True
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5.0)
            if not self._thread.is_alive():
                self._loop.close()

    # ------------------------------------------------------------ mutations
    def start(self, names: Sequence[str], *, ram: int | None = None, vcpus: int | None = None,
              vmm: str | None = None, ip_range: str | None = None, ip: str | None = None,
              rr: bool = False, image: str | None = None, kernel: str | None = None,
              initrd: str | None = None, kernel_parms: str | None = None,
              fs_uri: str | None = None, request_id: str | None = None) -> list[TaskInfo]:
        return self._run(self._aio.start(names, ram=ram, vcpus=vcpus, vmm=vmm,
                                         ip_range=ip_range, ip=ip, rr=rr, image=image,
                                         kernel=kernel, initrd=initrd,
                                         kernel_parms=kernel_parms, fs_uri=fs_uri,
                                         request_id=request_id))

    def shutdown(self, names: Sequence[str], *, request_id: str | None = None) -> list[TaskInfo]:
        return self._run(self._aio.shutdown(names, request_id=request_id))

    def reboot(self, names: Sequence[str], *, request_id: str | None = None) -> list[TaskInfo]:
        return self._run(self._aio.reboot(names, request_id=request_id))

    def cycle(self, names: Sequence[str], *, request_id: str | None = None) -> list[TaskInfo]:
        return self._run(self._aio.cycle(names, request_id=request_id))

    def pause(self, names: Sequence[str], *, request_id: str | None = None) -> list[TaskInfo]:
        return self._run(self._aio.pause(names, request_id=request_id))

    def resume(self, names: Sequence[str], *, request_id: str | None = None) -> list[TaskInfo]:
        return self._run(self._aio.resume(names, request_id=request_id))

    def hibernate(self, names: Sequence[str], *,
                  request_id: str | None = None) -> list[TaskInfo]:
        return self._run(self._aio.hibernate(names, request_id=request_id))

    def destroy(self, names: Sequence[str], *, force: bool = False,
                request_id: str | None = None) -> list[TaskInfo]:
        return self._run(self._aio.destroy(names, force=force, request_id=request_id))

    def migrate(self, names: Sequence[str], *, vmm: str | None = None,
                request_id: str | None = None) -> list[TaskInfo]:
        return self._run(self._aio.migrate(names, vmm=vmm, request_id=request_id))

    def abort_migration(self, names: Sequence[str], *,
                        request_id: str | None = None) -> list[TaskInfo]:
        return self._run(self._aio.abort_migration(names, request_id=request_id))

    def host_disable(self, name: str, *, request_id: str | None = None) -> HostInfo:
        return self._run(self._aio.host_disable(name, request_id=request_id))

    def host_enable(self, name: str, *, request_id: str | None = None) -> HostInfo:
        return self._run(self._aio.host_enable(name, request_id=request_id))

    def host_remove(self, name: str, *, request_id: str | None = None) -> HostInfo:
        return self._run(self._aio.host_remove(name, request_id=request_id))

    # ---------------------------------------------------------------- reads
    def console_tail(self, name: str, lines: int = 50) -> str:
        return self._run(self._aio.console_tail(name, lines))

    def console_open(self, name: str, on_data: Callable[[bytes], None],
                     on_end: Callable[[str], None]) -> SyncConsole:
        """As :meth:`AsyncClient.console_open`; the callbacks run on the client's thread."""
        return SyncConsole(self, self._run(self._aio.console_open(name, on_data, on_end)))

    def list_vms(self, names: Iterable[str] = (), *, all_users: bool = False) -> list[VmInfo]:
        return self._run(self._aio.list_vms(names, all_users=all_users))

    def vm_stats(self, names: Iterable[str] = (), *, samples: int | None = None,
                 all_users: bool = False) -> list[VmStats]:
        return self._run(self._aio.vm_stats(names, samples=samples, all_users=all_users))

    def list_hosts(self) -> list[HostInfo]:
        return self._run(self._aio.list_hosts())

    def list_images(self) -> list[ImageInfo]:
        return self._run(self._aio.list_images())

    def tasks(self, ids: Iterable[str] = (), *, limit: int = 50,
              active_only: bool = False) -> list[TaskInfo]:
        return self._run(self._aio.tasks(ids, limit=limit, active_only=active_only))

    def wait(self, task_id: str, timeout_s: float = 600) -> TaskInfo:
        return self._run(self._aio.wait(task_id, timeout_s))

    def wait_all(self, tasks: Sequence[TaskInfo], timeout_s: float = 600) -> list[TaskInfo]:
        return self._run(self._aio.wait_all(tasks, timeout_s))

    def whoami(self) -> WhoAmI:
        return self._run(self._aio.whoami())

    def complete(self, kind: Literal["vm", "host", "image"], prefix: str = "", *,
                 timeout: float | None = None) -> list[str]:
        """Names for tab completion; ``timeout`` bounds the wait (TimedOut)."""
        return self._run(self._aio.complete(kind, prefix), timeout)


class SyncConsole:
    """The blocking twin of :class:`~usher.client.async_client.ConsoleSession`."""

    def __init__(self, client: Client, session: ConsoleSession) -> None:
        self._client = client
        self.session = session
        self.name = session.name

    @property
    def ended(self) -> str | None:
        return self.session.ended

    def write(self, data: bytes) -> None:
        self._client._run(self.session.write(data))

    def close(self) -> None:
        self._client._run(self.session.close())
