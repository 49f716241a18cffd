"""The node manager's agent: one host's link to the controller.

The agent dials the controller (the control plane needs no inbound port on
hosts), presents its host certificate (or, once, a join token that the
controller exchanges for one), registers the host's facts and its full domain
inventory, then serves node calls and pushes domain lifecycle events. When the
link drops it reconnects with exponential backoff and full jitter, leaving
every VM untouched meanwhile: the inventory sent on the next register tells
the controller what happened.

When the hypervisor connection is lost (libvirtd died) the agent cannot speak
for the host any more, so it hangs up on the controller, giving the reason:
the controller marks the host lost after ``host_lost_after_s`` and its VMs
unknown, as for any node manager that went away. The agent then reopens the
driver with backoff, touching no domain, and only once the hypervisor answers
again dials the controller, whose register with the full inventory reconciles
the VMs (guests usually outlive their libvirtd).

Driver calls are blocking libvirt calls; they run in one worker thread, each
under ``call_timeout_s``, so a wedged hypervisor stalls neither heartbeats nor
the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import ipaddress
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from usher.config import LnmConfig
from usher.errors import (
    AlreadyExists,
    AuthenticationFailed,
    ConfigError,
    DomainNotFound,
    ImageError,
    InvalidOption,
    NotFound,
    PermissionDenied,
    TimedOut,
    UsherError,
)
from usher.lnm.drivers.base import (
    ConsoleStream,
    DomainEvent,
    DomainInfo,
    DomainSpec,
    HypervisorDriver,
    MigrationPhase,
)
from usher.lnm.images import Artifact, ImageStore
from usher.protocol import frames, tls
from usher.protocol.backoff import Backoff
from usher.protocol.connection import Connection, dial
from usher.protocol.frames import Hello
from usher.protocol.ops import (
    MAX_CONSOLE_INPUT,
    MAX_CONSOLE_LINES,
    ActionArgs,
    ArtifactMsg,
    BootMsg,
    ConsoleArgs,
    ConsoleDataMsg,
    ConsoleText,
    DefineArgs,
    DiskSizeMsg,
    DomainEventMsg,
    DomainMsg,
    DomainStatsMsg,
    Empty,
    ForgetArgs,
    HostFactsMsg,
    IncomingArgs,
    Inventory,
    MigrationProgressMsg,
    NodeMigrateArgs,
    Op,
    RegisterArgs,
    StatsReply,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

SOFTWARE = "usher-lnm/0.1"
MIGRATION_OPS = frozenset({"node.disk_size", "node.prepare_incoming", "node.migrate",
                           "node.abort_migration", "node.finish_incoming", "node.forget_vm"})
MIGRATIONS_AT_ONCE = 4  # more wait their turn
MIGRATION_GRACE_S = 30.0  # past its own timeout, a migration has this long to unwind
PROGRESS_EVERY_S = 0.5  # progress pushes of one migration, unless the phase changes
CONSOLE_READ_BYTES = 1 << 20


def domain_msg(d: DomainInfo, *, migrating: bool = False) -> DomainMsg:
    return DomainMsg(uuid=d.uuid, name=d.name, state=str(d.state), memory_mib=d.memory_mib,
                     vcpus=d.vcpus, owner=d.owner, task_id=d.task_id, mac=d.mac,
                     migrating=migrating)


@dataclass(frozen=True, slots=True)
class Boot:
    """A VM's boot artifacts as local files (see :meth:`NodeAgent._fetch_boot`)."""

    disk: str | None
    kernel: str | None
    initrd: str | None
    console_log: str | None
    new_disk: bool = False  # the overlay was made for this call (not found in the store)


def _artifact(msg: ArtifactMsg) -> Artifact:
    return Artifact(url=msg.url, sha256=msg.sha256, format=msg.format)


def address_parameters(name: str, ip: str, prefix: int | None, gateway: str | None) -> str:
    """The VM's address on a kernel command line, for guests booted directly.

    ``ip=`` is the kernel's own (``CONFIG_IP_PNP``, IPv4 only); ``usher.ip``,
    ``usher.gw`` and ``usher.hostname`` are for an initramfs that configures
    the network itself (the tiny test guest does).
    """
    short = name.split(".", 1)[0]
    addr = ipaddress.ip_interface(f"{ip}/{prefix if prefix is not None else 32}")
    words = [f"usher.ip={addr.with_prefixlen}", f"usher.hostname={short}"]
    if gateway:
        words.append(f"usher.gw={gateway}")
    if addr.version == 4:
        words.append(f"ip={addr.ip}::{gateway or ''}:{addr.netmask}:{short}::off")
    return " ".join(words)


class NodeAgent:
    """Connects one host to the controller; ``await run(stop)`` until ``stop`` is set."""

    def __init__(self, config: LnmConfig, driver: HypervisorDriver) -> None:
        self.config = config
        self.driver = driver
        self.hostname = config.hostname or socket.getfqdn()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="usher-hv")
        self._conn: Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.registered = asyncio.Event()
        self.opened = asyncio.Event()  # the hypervisor is open: the agent is serving
        self._hv_lost = asyncio.Event()  # the driver lost its hypervisor; set on the loop
        self._hv_lost_reason = ""
        self._qlock = threading.Lock()  # guards the two counters below
        self._queued = 0  # node calls handed to the hypervisor thread, not finished
        self._flushes = 0  # driver flushes done
        self._flushed = asyncio.Event()  # set (and replaced) after each flush
        self._images: ImageStore | None = None  # made at the first VM with a disk or kernel
        self._consoles: dict[str, ConsoleStream] = {}  # session -> attached console
        self._image_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="usher-img")
        # Migrations run in threads of their own (see _migrate); bounded, like
        # every pool here: a site moves a few VMs off a host at a time.
        self._migration_pool = ThreadPoolExecutor(max_workers=MIGRATIONS_AT_ONCE,
                                                  thread_name_prefix="usher-mig")
        # uuid -> set when an abort came before libvirt had a job to abort
        self._migrating: dict[str, threading.Event] = {}
        # Aborts must not queue behind the migrations they abort.
        self._abort_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="usher-abort")

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(loop.run_in_executor(self._pool, fn, *args),
                                          self.config.call_timeout_s)
        except TimeoutError:
            raise TimedOut(f"hypervisor call {fn.__name__} took longer than "
                           f"{self.config.call_timeout_s:g} s") from None

    # ============================================================ lifecycle
    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        if self.config.shared_store:
            await self._store_id()  # a shared store that is not there stops us here
        self.driver.set_lost_callback(self._on_lost)
        await self._call(self.driver.open)
        self.opened.set()
        self.driver.set_event_callback(self._on_event)
        backoff = Backoff(self.config.backoff_initial_s, self.config.backoff_max_s)
        try:
            while not stop.is_set():
                if self._hv_lost.is_set():
                    await self._reopen(stop)
                    continue
                try:
                    conn = await self._connect()
                except AuthenticationFailed as exc:
                    log.error("controller refused this host: %s", exc.message)
                    raise
                except UsherError as exc:
                    if self._hv_lost.is_set():
                        continue  # the hypervisor first; the controller once it answers
                    delay = backoff.next_delay()
                    log.warning("cannot reach controller (%s); retrying in %.1f s",
                                exc.message, delay)
                    await _sleep_or_stop(stop, delay)
                    continue
                backoff.reset()
                self._conn = conn
                waits = {asyncio.create_task(conn.wait_closed()),
                         asyncio.create_task(stop.wait()),
                         asyncio.create_task(self._hv_lost.wait())}
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                for waiting in waits:
                    waiting.cancel()
                self.registered.clear()
                self._conn = None
                self._close_consoles()  # their sessions lived on that connection
                if stop.is_set():
                    await conn.close("node manager stopping")
                    break
                if self._hv_lost.is_set():
                    # Serving on would answer every call with NotConnected, and
                    # the controller would keep trusting this host's silence.
                    log.warning("hypervisor connection lost (%s); leaving the controller "
                                "until it is back", self._hv_lost_reason)
                    await conn.close(f"hypervisor connection lost: {self._hv_lost_reason}")
                    backoff.reset()
                    continue
                delay = backoff.next_delay()
                log.warning("lost the controller (%s); VMs keep running; reconnecting in "
                            "%.1f s", conn.close_reason, delay)
                await _sleep_or_stop(stop, delay)
        finally:
            self.driver.set_event_callback(None)
            self.driver.set_lost_callback(None)
            await self._call(self.driver.close)
            self._pool.shutdown(wait=False)

    def _on_lost(self, reason: str) -> None:
        # Drivers report the loss from their event thread (or the caller's).
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._note_lost, reason)

    def _note_lost(self, reason: str) -> None:
        self._hv_lost_reason = reason
        self._hv_lost.set()

    async def _reopen(self, stop: asyncio.Event) -> None:
        """Reopen the lost hypervisor, with backoff, until it answers or ``stop``.

        Only the connection is dropped and made again (``close`` never changes
        the host); no domain is touched. The hypervisor answers when it lists
        its domains: the inventory the next register needs.
        """
        backoff = Backoff(self.config.backoff_initial_s, self.config.backoff_max_s)
        attempt = 0
        while not stop.is_set():
            attempt += 1
            # Cleared before the attempt: losing the new connection counts again.
            self._hv_lost.clear()
            try:
                await self._call(self.driver.close)
                await self._call(self.driver.open)
                await self._call(self.driver.list_domains)
            except UsherError as exc:
                self._hv_lost.set()
                delay = backoff.next_delay()
                log.warning("hypervisor still unavailable (attempt %d: %s); retrying in %.1f s",
                            attempt, exc.message, delay)
                await _sleep_or_stop(stop, delay)
                continue
            log.info("hypervisor connection reopened after %d attempt(s); reconnecting to "
                     "the controller", attempt)
            return

    def _tls(self) -> tuple[Any, str | None]:
        cfg = self.config
        if Path(cfg.cert).exists() and Path(cfg.key).exists():
            return tls.client_context(cfg.ca_cert, cert_file=cfg.cert, key_file=cfg.key), None
        token_file = Path(cfg.join_token_file) if cfg.join_token_file else None
        if token_file is None or not token_file.exists():
            raise AuthenticationFailed(f"no host certificate at {cfg.cert} and no join token; "
                                       f"run 'usher-controller join-token {self.hostname}' "
                                       f"and set join_token_file")
        return tls.client_context(cfg.ca_cert), token_file.read_text().strip()

    async def _store_id(self) -> str:
        """The image store's id, for the controller ("": this host has no store yet).

        Raises:
            ConfigError: a shared store's directory is missing (not mounted) or
                its id cannot be written or read.
        """
        cfg = self.config

        def read() -> str:  # in the image pool: a hung network mount blocks only it
            if not Path(cfg.image_dir).is_dir():
                if cfg.shared_store:
                    raise ConfigError(f"image_dir {cfg.image_dir} does not exist: mount "
                                      f"shared store {cfg.shared_store} there before starting")
                return ""
            return self.images.store_id()

        try:
            return await self._in_image_pool(read)
        except ConfigError as exc:
            if cfg.shared_store:
                raise
            log.warning("image store without an id (%s): the controller cannot tell "
                        "whether another host shares it", exc.message)
            return ""

    async def _connect(self) -> Connection:
        cfg = self.config
        context, token = self._tls()
        hello = Hello(versions=list(frames.PROTOCOL_VERSIONS), role="node", software=SOFTWARE,
                      hostname=self.hostname, join_token=token)
        reader, writer, welcome = await dial(cfg.controller_host, cfg.controller_port, context,
                                             hello, server_hostname=cfg.controller_name)
        try:
            tls.require_role(writer.get_extra_info("ssl_object"), "controller")
        except PermissionDenied:
            writer.close()
            raise
        if token is not None:
            if not (welcome.host_cert_pem and welcome.host_key_pem):
                writer.close()
                raise AuthenticationFailed("controller accepted the join token but sent "
                                           "no certificate")
            self._store_cert(welcome.host_cert_pem, welcome.host_key_pem)
        conn = Connection(reader, writer, peer_role="controller",
                          peer_name=f"controller {cfg.controller_host}:{cfg.controller_port}",
                          heartbeat_s=welcome.heartbeat_s, handler=self._handle)
        conn.start()
        try:
            domains = await self._call(self.driver.list_domains)
            facts = await self._call(self.driver.host_facts)
            caps = self.driver.capabilities
            store_id = await self._store_id()
            await conn.request("node.register", RegisterArgs(
                facts=HostFactsMsg(hostname=self.hostname, cpus=facts.cpus,
                                   memory_mib=facts.memory_mib, hypervisor=facts.hypervisor,
                                   live_migration=caps.live_migration,
                                   managed_save=caps.managed_save, vlans=list(cfg.vlans),
                                   migration_uri=cfg.migration_uri,
                                   migration_address=cfg.migration_address,
                                   shared_store=cfg.shared_store, store_id=store_id),
                domains=[domain_msg(d) for d in domains]))
        except UsherError as exc:
            await conn.close(f"registering failed: {exc.message}")
            raise
        self.registered.set()
        log.info("registered %s with %d domains", self.hostname, len(domains))
        return conn

    def _store_cert(self, cert_pem: str, key_pem: str) -> None:
        cfg = self.config
        Path(cfg.cert).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(cfg.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(key_pem)
        Path(cfg.cert).write_text(cert_pem)
        if cfg.join_token_file:
            Path(cfg.join_token_file).unlink(missing_ok=True)
        log.info("joined the site; host certificate stored in %s", cfg.cert)

    # ============================================================== serving
    async def _handle(self, conn: Connection, op: Op, args: Any, rid: str) -> Any:
        if op.name in ("node.console_open", "node.console_input", "node.console_close"):
            return await self._console_op(op.name, args)
        if op.name in MIGRATION_OPS:
            return await self._migration_op(op.name, args)
        boot: Boot | None = None
        if op.name == "node.define" and args.spec.boot is not None:
            # Downloads run in their own threads: a slow fetch must not hold
            # up every other call on this host's hypervisor thread.
            boot = await self._fetch_boot(args.spec.uuid, args.spec.boot)
        try:
            result = await self._durably(self._work(op, args, boot))
            if op.name == "node.define" and args.start:
                # Beside the hypervisor thread, which meanwhile starts the next
                # VM: a host's starts overlap their DHCP entries' writes.
                await asyncio.to_thread(self.driver.address_ready, args.spec.uuid)
            return result
        except BaseException:
            if boot is not None and boot.new_disk:
                await self._call(self._drop_unused_overlay, args.spec.uuid)
            raise

    # ============================================================== consoles
    async def _console_op(self, name: str, args: Any) -> Empty:
        """Open, feed or close an attached console (sessions named by the controller)."""
        if name == "node.console_open":
            session = args.session

            def on_data(data: bytes) -> None:
                self._console_push(ConsoleDataMsg(session=session, data=data))

            def on_end(reason: str) -> None:
                self._consoles.pop(session, None)
                self._console_push(ConsoleDataMsg(session=session, eof=True, reason=reason))

            opened: ConsoleStream = await self._call(self.driver.open_console, args.uuid,
                                                     on_data, on_end)
            old = self._consoles.pop(session, None)
            self._consoles[session] = opened
            if old is not None:
                old.close()
        elif name == "node.console_input":
            if len(args.data) > MAX_CONSOLE_INPUT:
                raise InvalidOption(f"console input of {len(args.data)} bytes; send at most "
                                    f"{MAX_CONSOLE_INPUT} at a time")
            current = self._consoles.get(args.session)
            if current is None:
                raise NotFound(f"no console session {args.session} on {self.hostname}")
            # Non-blocking on libvirt's side: keystrokes go straight to the stream.
            current.write(args.data)
        else:
            gone = self._consoles.pop(args.session, None)
            if gone is not None:
                gone.close()
        return Empty()

    def _console_push(self, msg: ConsoleDataMsg) -> None:
        conn = self._conn
        if conn is not None:
            conn.push("node_console", msg)  # safe from libvirt's event thread too

    def _close_consoles(self) -> None:
        consoles, self._consoles = self._consoles, {}
        for handle in consoles.values():
            try:
                handle.close()
            except UsherError as exc:
                log.warning("closing a console: %s", exc.message)

    # ============================================================ migration
    async def _migration_op(self, name: str, args: Any) -> Any:
        """Serve the node calls of a migration (see usher.controller.service)."""
        if name == "node.migrate":
            return await self._migrate(args)
        if name == "node.abort_migration":
            return await self._abort_migration(args.uuid)
        if name == "node.disk_size":
            size = await self._in_image_pool(self.images.overlay_size, args.uuid)
            return DiskSizeMsg(bytes=size)
        if name == "node.prepare_incoming":
            return await self._prepare_incoming(args)
        uuid = args.uuid
        if name == "node.finish_incoming":
            return await self._durably(lambda: domain_msg(self.driver.adopt_incoming(uuid)))
        assert name == "node.forget_vm"
        keep = args.keep_disk
        return await self._durably(lambda: self._forget_vm(uuid, keep_disk=keep))

    async def _in_image_pool(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(loop.run_in_executor(self._image_pool, fn, *args),
                                          self.config.image_fetch_timeout_s + 30)
        except TimeoutError:
            raise TimedOut(f"image store call {fn.__name__} took longer than "
                           f"{self.config.image_fetch_timeout_s + 30:g} s") from None

    async def _prepare_incoming(self, args: IncomingArgs) -> Empty:
        """Fetch the arriving VM's artifacts and make its empty overlay.

        Idempotent by UUID: an overlay left by an earlier attempt is replaced
        by a fresh one (never reused: see ImageStore.prepare_incoming), unless
        a domain here has the UUID, which means the VM (or a migration of it
        still running) is already here. With ``shared`` (a store this host
        shares with the source) no overlay is made or removed: the VM's own
        must be here, or the store is not mounted as it should be.
        """
        spec, boot = args.spec, args.spec.boot
        if boot is None:
            return Empty()  # nothing to fetch: a VM of a fake host
        if boot.disk is not None and args.disk_bytes <= 0 and not args.shared:
            raise InvalidOption(f"VM {spec.name} has a disk: give its size")

        def fetch() -> Path | None:
            store = self.images
            base = store.base(_artifact(boot.disk)) if boot.disk else None
            for extra in (boot.kernel, boot.initrd):
                if extra is not None:
                    store.base(_artifact(extra))
            if base is not None and args.shared and not store.has_overlay(spec.uuid):
                raise ImageError(
                    f"{self.hostname} does not see the disk of {spec.name} at "
                    f"{store.overlay_path(spec.uuid)}, though it shares store "
                    f"{self.config.shared_store} with the VM's host: is the store mounted "
                    f"at its image_dir?", details={"uuid": spec.uuid})
            return base

        base = await self._in_image_pool(fetch)
        if base is None or boot.disk is None or args.shared:
            return Empty()
        if await self._in_image_pool(self.images.has_overlay, spec.uuid):
            await self._call(self._refuse_if_defined, spec.uuid)
            await self._in_image_pool(self.images.remove_overlay, spec.uuid)
        disk_format = boot.disk.format
        await self._in_image_pool(self.images.prepare_incoming, spec.uuid, base, disk_format,
                                  args.disk_bytes)
        return Empty()

    def _refuse_if_defined(self, uuid: str) -> None:
        try:
            info = self.driver.get_domain(uuid)
        except DomainNotFound:
            return
        raise AlreadyExists(f"{info.name} is already on {self.hostname} ({info.state}); "
                            f"it cannot arrive again", details={"uuid": uuid})

    async def _migrate(self, args: NodeMigrateArgs) -> Empty:
        """Move the domain with the driver, then delete what stays here of it.

        The transfer runs in a migration thread, not the hypervisor thread:
        it takes seconds to minutes, and the driver holds its lock only for
        the checks before and the tidying after it, so this host's other
        calls (another VM's start, an inventory) go on meanwhile. The driver
        enforces ``timeout_s`` by aborting; the wait here only guards against
        a driver that does not return.

        The thread, not this call, owns the rest: it keeps the domain marked
        as migrating (``DomainMsg.migrating`` in inventories) until libvirt
        returns and then has what stays here deleted, also when this call is
        gone (the controller went away meanwhile), so a controller that
        comes back finds the transfer still running, or its end.
        """
        uuid = args.uuid
        if uuid in self._migrating:
            raise AlreadyExists(f"domain {uuid} is already migrating", details={"uuid": uuid})
        abort = threading.Event()
        self._migrating[uuid] = abort  # before any await: a following abort finds it
        loop = asyncio.get_running_loop()
        report = self._progress_reporter(uuid, abort)
        keep = args.keep_disk
        forgotten: list[concurrent.futures.Future[Empty]] = []

        def run() -> None:
            try:
                if args.stopped:
                    self.driver.move_stopped(uuid, args.target_uri, migrate_uri=args.migrate_uri,
                                             tls=args.tls, timeout_s=args.timeout_s,
                                             progress=report)
                else:
                    self.driver.migrate_live(uuid, args.target_uri, migrate_uri=args.migrate_uri,
                                             copy_storage=args.copy_storage, tls=args.tls,
                                             timeout_s=args.timeout_s, progress=report)
                # The domain runs on the target now, from its own copy of the
                # disk (or from this very disk, on a store the two hosts
                # share: it stays).
                forget = asyncio.run_coroutine_threadsafe(
                    self._durably(lambda: self._forget_vm(uuid, keep_disk=keep)), loop)
                forgotten.append(forget)
                # Marked migrating until it is gone from here: an inventory
                # never shows it on both hosts and not moving.
                try:
                    forget.result(self.config.call_timeout_s + 5)
                except Exception as exc:  # the call's caller hears it too, if still there
                    log.warning("cleaning up after migrating %s: %s", uuid, exc)
            finally:
                self._migrating.pop(uuid, None)

        try:
            transfer = loop.run_in_executor(self._migration_pool, run)
        except BaseException:
            self._migrating.pop(uuid, None)
            raise
        try:
            await asyncio.wait_for(transfer, args.timeout_s + MIGRATION_GRACE_S)
        except TimeoutError:
            raise TimedOut(f"the migration of {uuid} did not return within "
                           f"{args.timeout_s + MIGRATION_GRACE_S:g} s; it may still "
                           f"complete", details={"uuid": uuid, "aborted": False}) from None
        await asyncio.wrap_future(forgotten[0])
        return Empty()

    def _progress_reporter(self, uuid: str, abort: threading.Event
                           ) -> Callable[[MigrationPhase, float], None]:
        """The driver's progress callback: pushes (a few a second) and late aborts.

        Runs on the migration thread. An abort that came before libvirt had a
        job to abort is repeated here, once, when the job shows. One that
        libvirt took is never repeated: a second abortJob while QEMU unwinds
        the first is a race of its own.
        """
        last: list[Any] = [None, 0.0, False]  # phase and time of the last push; aborted

        def report(phase: MigrationPhase, percent: float) -> None:
            if abort.is_set() and not last[2] and phase is not MigrationPhase.CONNECT:
                last[2] = True
                try:
                    self.driver.abort_migration(uuid)
                except UsherError as exc:
                    log.warning("aborting the migration of %s: %s", uuid, exc.message)
            now = time.monotonic()
            if phase is last[0] and now - last[1] < PROGRESS_EVERY_S and percent < 100:
                return
            last[0], last[1] = phase, now
            loop, conn = self._loop, self._conn
            if loop is not None and conn is not None and not loop.is_closed():
                msg = MigrationProgressMsg(uuid=uuid, phase=phase.value, percent=percent)
                loop.call_soon_threadsafe(conn.push, "migration", msg)

        return report

    async def _abort_migration(self, uuid: str) -> Empty:
        too_early = self._migrating.get(uuid)
        if too_early is None:
            return Empty()  # none runs here (it ended, or never started)
        loop = asyncio.get_running_loop()
        # Not the hypervisor thread, which may be busy: aborting never waits.
        taken = await asyncio.wait_for(loop.run_in_executor(self._abort_pool,
                                                            self.driver.abort_migration, uuid),
                                       self.config.call_timeout_s)
        if not taken:
            too_early.set()  # no job yet: the progress reporter aborts once it shows
        return Empty()

    def _forget_vm(self, uuid: str, *, keep_disk: bool = False) -> Empty:
        """Remove this host's traces of a VM that runs elsewhere (hypervisor thread).

        The controller asks only once it knows where the VM runs, so a
        hypervisor that cannot be asked (its daemon is down) does not keep
        the disk here: a half-arrived domain goes when the daemon is back.
        With ``keep_disk`` (a store shared with the host that runs the VM)
        the disk and console log are that host's and stay.
        """
        try:
            self.driver.undefine(uuid)
        except UsherError as exc:
            log.warning("could not undefine %s while forgetting it: %s", uuid, exc.message)
        if not keep_disk:
            self._remove_vm_files(uuid)
        return Empty()

    def _remove_vm_files(self, uuid: str) -> None:
        """Delete the VM's overlay (never a base) and console log, if this host has a store."""
        if self._images is not None or Path(self.config.image_dir).exists():
            self.images.remove_overlay(uuid)
            (self.images.vm_dir / f"{uuid}.console.log").unlink(missing_ok=True)

    # ================================================================ images
    @property
    def images(self) -> ImageStore:
        if self._images is None:
            self._images = ImageStore(Path(self.config.image_dir),
                                      fetch_timeout_s=self.config.image_fetch_timeout_s)
        return self._images

    async def _fetch_boot(self, uuid: str, boot: BootMsg) -> Boot:
        """Local paths for a VM's boot artifacts (fetched, checked) and its overlay."""
        loop = asyncio.get_running_loop()

        def fetch() -> Boot:
            store = self.images
            # Every base first, the overlay last: a bad kernel leaves no disk.
            base = store.base(_artifact(boot.disk)) if boot.disk else None
            kernel = str(store.base(_artifact(boot.kernel))) if boot.kernel else None
            initrd = str(store.base(_artifact(boot.initrd))) if boot.initrd else None
            disk, new_disk = None, False
            if base is not None and boot.disk is not None:
                # Found, not made: a retried define, or a cold move between
                # hosts of one shared store (then the disk is the VM's own).
                new_disk = not store.has_overlay(uuid)
                disk = str(store.overlay(uuid, base, boot.disk.format))
            return Boot(disk=disk, kernel=kernel, initrd=initrd,
                        console_log=str(store.vm_dir / f"{uuid}.console.log"),
                        new_disk=new_disk)

        try:
            return await asyncio.wait_for(loop.run_in_executor(self._image_pool, fetch),
                                          self.config.image_fetch_timeout_s + 30)
        except TimeoutError:
            raise TimedOut(f"fetching the images of {uuid} took longer than "
                           f"{self.config.image_fetch_timeout_s:g} s") from None

    def _drop_unused_overlay(self, uuid: str) -> None:
        # A define that failed leaves no disk it made behind, unless the
        # domain exists after all (a retry of a define that had worked).
        try:
            self.driver.get_domain(uuid)
        except DomainNotFound:
            self.images.remove_overlay(uuid)

    async def _durably(self, work: Callable[[], T]) -> T:
        """Run ``work`` in the hypervisor thread and return once its effect is durable.

        One thread hop per node call: the call that leaves the queue empty
        flushes the driver (a fake host's file) for every call before it;
        those wait for that flush before replying, so the controller never
        hears of a change a crash could still lose, and a burst of calls
        costs one write.
        """
        with self._qlock:
            self._queued += 1

        def job() -> tuple[T, int | None]:
            try:
                result = work()
            finally:
                with self._qlock:
                    self._queued -= 1
                    last, seen = self._queued == 0, self._flushes
            if not last:
                return result, seen
            try:
                self.driver.flush()
            finally:
                with self._qlock:
                    self._flushes += 1
                if self._loop is not None:
                    self._loop.call_soon_threadsafe(self._pulse)
            return result, None

        result, seen = await self._call(job)
        while seen is not None and self._flushes <= seen:
            await self._flushed.wait()
        return result

    def _pulse(self) -> None:
        self._flushed.set()
        self._flushed = asyncio.Event()

    def _work(self, op: Op, args: Any, boot: Boot | None = None) -> Callable[[], Any]:
        """The driver calls that serve ``op``, as one function for the worker thread."""
        d = self.driver
        if op.name == "node.define":
            assert isinstance(args, DefineArgs)
            s = args.spec
            spec = DomainSpec(uuid=s.uuid, name=s.name, memory_mib=s.memory_mib,
                              vcpus=s.vcpus, mac=s.mac, owner=s.owner, task_id=s.task_id,
                              ip=s.ip, ip_prefix=s.ip_prefix, gateway=s.gateway)
            if boot is not None and s.boot is not None:
                cmdline = s.boot.cmdline
                if boot.kernel is not None and s.ip is not None:
                    cmdline = " ".join(filter(None, [cmdline, address_parameters(
                        s.name, s.ip, s.ip_prefix, s.gateway)]))
                spec = dataclasses.replace(spec, disk=boot.disk, kernel=boot.kernel,
                                           initrd=boot.initrd, cmdline=cmdline,
                                           console_log=boot.console_log)

            def define() -> DomainMsg:
                info = d.define(spec)
                # The address entry is waited for off this thread (see _handle).
                return domain_msg(d.start(spec.uuid, wait_address=False) if args.start
                                  else info)
            return define
        if op.name == "node.action":
            assert isinstance(args, ActionArgs)
            action = args

            def act() -> DomainMsg:
                return domain_msg(self._action(action))
            return act
        if op.name == "node.undefine":
            assert isinstance(args, ForgetArgs)
            uuid = args.uuid

            def undefine() -> Empty:
                d.undefine(uuid)
                if not args.keep_disk:
                    self._remove_vm_files(uuid)
                return Empty()
            return undefine
        if op.name == "node.console":
            assert isinstance(args, ConsoleArgs)
            console = args
            return lambda: self._console_tail(console.uuid, console.lines)
        if op.name == "node.inventory":
            moving = self._migrating  # read in the hypervisor thread (one lookup per domain)
            return lambda: Inventory(domains=[domain_msg(x, migrating=x.uuid in moving)
                                              for x in d.list_domains()])
        if op.name == "node.stats":
            return self._domain_stats
        raise PermissionDenied(f"operation {op.name} is not served by a node")

    def _domain_stats(self) -> StatsReply:
        """The counters of usher's domains here; those of foreign domains are not usher's."""
        d = self.driver
        ours = [x.uuid for x in d.list_domains() if x.owner is not None]
        return StatsReply(domains=[
            DomainStatsMsg(uuid=s.uuid, cpu_ns=s.cpu_ns, memory_kib=s.memory_kib,
                           rss_kib=s.rss_kib, disk_rd_bytes=s.disk_rd_bytes,
                           disk_wr_bytes=s.disk_wr_bytes, net_rx_bytes=s.net_rx_bytes,
                           net_tx_bytes=s.net_tx_bytes)
            for s in d.domain_stats(ours)])

    def _console_tail(self, uuid: str, lines: int) -> ConsoleText:
        """The last ``lines`` lines of the domain's console log (reads at most 1 MiB).

        Raises:
            DomainNotFound: no such domain.
            InvalidOption: ``lines`` out of range.
        """
        if not 1 <= lines <= MAX_CONSOLE_LINES:
            raise InvalidOption(f"--tail takes 1 to {MAX_CONSOLE_LINES} lines, not {lines}")
        self.driver.get_domain(uuid)  # DomainNotFound for a VM that is not here
        path = Path(self.config.image_dir) / "vms" / f"{uuid}.console.log"
        try:
            with path.open("rb") as fh:
                size = fh.seek(0, os.SEEK_END)
                fh.seek(max(0, size - CONSOLE_READ_BYTES))
                data = fh.read(CONSOLE_READ_BYTES)
        except FileNotFoundError:
            return ConsoleText(text="", lines=0)  # it has printed nothing yet
        text = data.decode("utf-8", errors="replace").replace("\r\n", "\n")
        tail = text.splitlines()[-lines:]
        return ConsoleText(text="\n".join(tail) + ("\n" if tail else ""), lines=len(tail))

    def _action(self, args: ActionArgs) -> DomainInfo:
        d, uuid = self.driver, args.uuid
        if args.action == "shutdown":
            return d.shutdown(uuid, args.timeout_s)
        if args.action == "cycle":
            d.power_off(uuid)
            return d.start(uuid)
        method = {"start": d.start, "reboot": d.reboot, "power_off": d.power_off,
                  "pause": d.pause, "resume": d.resume, "hibernate": d.hibernate}[args.action]
        return method(uuid)

    def _on_event(self, ev: DomainEvent) -> None:
        # Drivers may call back from their own threads (the fake driver fires
        # from the worker thread): the connection belongs to the loop thread.
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._push_event, ev)

    def _push_event(self, ev: DomainEvent) -> None:
        conn = self._conn
        if conn is not None and self.registered.is_set():
            conn.push("domain", DomainEventMsg(uuid=ev.uuid, name=ev.name, state=str(ev.state),
                                               reason=ev.reason))


async def _sleep_or_stop(stop: asyncio.Event, delay: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), delay)
    except TimeoutError:
        pass
