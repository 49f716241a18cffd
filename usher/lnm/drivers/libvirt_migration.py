"""Live migration over libvirt: the job, its progress, its abort and its errors.

:meth:`LibvirtDriver.migrate_live <usher.lnm.drivers.libvirt.LibvirtDriver.migrate_live>`
checks the domain and hands it to :func:`run_migration`, which runs libvirt's
peer-to-peer migration (``virDomainMigrateToURI3``, which blocks until the
migration ends) in a helper thread while the calling thread reads the job's
statistics, reports the phase (:class:`~usher.lnm.drivers.base.MigrationPhase`)
and enforces the timeout by aborting the job. Every libvirt error of a
migration is translated here, by :func:`migration_error`, into an usher error
that names the phase it happened in.

Flags are policy (:func:`migration_flags`): live, peer to peer, persistent on
the target and undefined on the source, with an incremental copy of the
domain's disk unless storage is shared, and TLS when asked.
libvirt's "unsafe" override is never set: its safety checks (a disk that is
neither copied nor shared, a risky cache mode) stay in force.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

import libvirt

from usher.errors import (
    DomainNotFound,
    HostUnavailable,
    HypervisorError,
    InvalidState,
    TimedOut,
    UsherError,
)
from usher.lnm.drivers.base import MigrationPhase, ProgressCallback

log = logging.getLogger(__name__)

POLL_S = 0.1
"""How often a running migration's statistics are read: one cheap call, often
enough for a progress display, rare enough to cost the daemon nothing."""

ABORT_GRACE_S = 15.0
"""How long an aborted migration may take to unwind before we stop waiting.

An abort takes effect at QEMU's next check (well under a second when data
moves); only a source stuck connecting to a target that never answers (a
TCP connect runs until the kernel gives up, about two minutes) takes longer.
"""

CONNECT_RETRY_S = 1.0
"""Pause before connecting again when the target closed a new connection at once."""

# libvirt errors that mean the connection to the target failed or broke:
# waiting for the target may help, so they are HostUnavailable.
_CONNECTION_CODES = frozenset({
    libvirt.VIR_ERR_NO_CONNECT,
    libvirt.VIR_ERR_SYSTEM_ERROR,
    libvirt.VIR_ERR_RPC,
    libvirt.VIR_ERR_INTERNAL_ERROR,  # "connection closed due to keepalive timeout"
})


def migration_flags(*, copy_storage: bool, tls: bool) -> int:
    """Policy: the libvirt flags of a live migration.

    Live and peer to peer (the source's libvirtd drives the whole migration,
    so it survives the caller going away), persistent on the target and
    undefined on the source (the domain moves, it is not copied). With
    ``copy_storage`` the disk is copied incrementally (the target has the
    base; only the overlay's blocks move). Never libvirt's "unsafe" override.
    """
    flags = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER
             | libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)
    if copy_storage:
        flags |= libvirt.VIR_MIGRATE_NON_SHARED_INC
    if tls:
        flags |= libvirt.VIR_MIGRATE_TLS
    return flags


def phase_of(stats: Mapping[str, Any]) -> tuple[MigrationPhase, float] | None:
    """The phase and its percentage that a job's statistics show; None: no job.

    ``stats`` is what ``virDomain.jobStats()`` returns. Memory moving means
    the disk copy (which comes first) is done; all memory sent means QEMU is
    handing over to the target.
    """
    if stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) == libvirt.VIR_DOMAIN_JOB_NONE:
        return None
    mem_total = int(stats.get("memory_total", 0))
    mem_processed = int(stats.get("memory_processed", 0))
    mem_remaining = int(stats.get("memory_remaining", 0))
    if mem_processed > 0:
        if mem_remaining == 0:
            return MigrationPhase.FINISH, 0.0
        return MigrationPhase.MIGRATE_MEMORY, _percent(mem_total - mem_remaining, mem_total)
    disk_total = int(stats.get("disk_total", 0))
    if disk_total > 0:
        return MigrationPhase.COPY_STORAGE, _percent(int(stats.get("disk_processed", 0)),
                                                     disk_total)
    return MigrationPhase.PREPARE, 0.0


def _percent(done: int, total: int) -> float:
    return 0.0 if total <= 0 else max(0.0, min(100.0, 100.0 * done / total))


class PhaseTracker:
    """The phase a migration has reached; phases and percentages only move forward.

    Reports each move to ``progress`` (exceptions from it are logged and
    swallowed: a broken progress display must not break a migration).
    """

    def __init__(self, progress: ProgressCallback | None) -> None:
        self.phase = MigrationPhase.CONNECT
        self.percent = 0.0
        self._progress = progress

    def update(self, stats: Mapping[str, Any]) -> None:
        """Advance to what ``stats`` (from ``jobStats()``) show; no job: no change."""
        found = phase_of(stats)
        if found is None:
            return
        phase, percent = found
        if phase is MigrationPhase.PREPARE and self.phase is MigrationPhase.CONNECT:
            # A job with nothing moved yet: we are past connecting.
            self.advance(phase, percent)
        elif phase is not MigrationPhase.PREPARE:
            self.advance(phase, percent)

    def advance(self, phase: MigrationPhase, percent: float) -> None:
        if phase.order < self.phase.order:
            return
        if phase is self.phase:
            if percent <= self.percent:
                return
        self.phase, self.percent = phase, percent
        if self._progress is None:
            return
        try:
            self._progress(phase, percent)
        except Exception:
            log.exception("migration progress callback failed at %s %.0f%%", phase, percent)


def migration_error(e: libvirt.libvirtError, *, phase: MigrationPhase, name: str, uuid: str,
                    target_uri: str) -> UsherError:
    """The usher error for a migration that libvirt failed with ``e`` in ``phase``.

    An error of the connection to the target is HostUnavailable (and, before
    any job started, happened while connecting); an abort is HypervisorError
    with ``details['aborted']``; a domain that vanished or stopped meanwhile
    is DomainNotFound or InvalidState; anything else HypervisorError.
    """
    code = e.get_error_code()
    domain = e.get_error_domain()
    text = e.get_error_message() or str(e)
    connection = code in _CONNECTION_CODES and domain == libvirt.VIR_FROM_RPC
    if connection and phase is MigrationPhase.PREPARE:
        phase = MigrationPhase.CONNECT  # connecting is the only RPC work before data moves
    details: dict[str, Any] = {"uuid": uuid, "target": target_uri, "phase": phase.value,
                               "libvirt_code": code}
    message = f"live migration of {name} to {target_uri} failed to {phase.value}: {text}"
    if code == libvirt.VIR_ERR_OPERATION_ABORTED:
        details["aborted"] = True
        return HypervisorError(f"live migration of {name} to {target_uri} was aborted "
                               f"during {phase.value}", details=details)
    if connection:
        return HostUnavailable(message, details=details)
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        return DomainNotFound(message, details=details)
    if code == libvirt.VIR_ERR_MIGRATE_UNSAFE:
        return HypervisorError(message + " (the disk is not on shared storage: copy it)",
                               details=details)
    return HypervisorError(message, details=details)


def run_migration(dom: Any, *, name: str, uuid: str, target_uri: str, params: dict[str, Any],
                  flags: int, timeout_s: float, progress: ProgressCallback | None,
                  poll_s: float = POLL_S, abort_grace_s: float = ABORT_GRACE_S,
                  connect_retry_s: float = CONNECT_RETRY_S) -> None:
    """Migrate ``dom`` (a ``virDomain``) with ``migrateToURI3``; see ``migrate_live``.

    The call runs in a daemon thread; this thread polls ``jobStats()`` every
    ``poll_s`` and reports progress. At ``timeout_s`` it aborts the job
    (repeating the abort until a job exists to abort), waits up to
    ``abort_grace_s`` for the migration to unwind and raises TimedOut. An
    abort taken before memory moved that libvirt then lost (memory starts
    moving after it) is sent once more. A migration that completes despite
    the abort (it was already handing over) counts as done.

    A target that closes the new connection before any data moved ("client
    socket is closed": seen now and then right after the target's libvirtd
    took a connection) is tried once more after ``connect_retry_s``, within
    the same ``timeout_s``: the domain has not left then. A target that refuses
    the connection is not (its libvirtd is down: that is the answer).

    Raises: see :meth:`HypervisorDriver.migrate_live
    <usher.lnm.drivers.base.HypervisorDriver.migrate_live>`.
    """
    deadline = time.monotonic() + timeout_s
    for attempt in (1, 2):
        try:
            _run_once(dom, name=name, uuid=uuid, target_uri=target_uri, params=params,
                      flags=flags, timeout_s=timeout_s, deadline=deadline,
                      progress=progress, poll_s=poll_s, abort_grace_s=abort_grace_s)
            return
        except _ClosedWhileConnecting as closed:
            error = migration_error(closed.error, phase=MigrationPhase.CONNECT, name=name,
                                    uuid=uuid, target_uri=target_uri)
            if attempt == 2 or time.monotonic() + connect_retry_s + poll_s >= deadline:
                raise error from closed.error
            log.warning("%s; connecting again in %g s", error.message, connect_retry_s)
            time.sleep(connect_retry_s)


class _ClosedWhileConnecting(Exception):
    """The target closed the connection before any migration job started."""

    def __init__(self, error: libvirt.libvirtError) -> None:
        super().__init__(str(error))
        self.error = error


def _run_once(dom: Any, *, name: str, uuid: str, target_uri: str, params: dict[str, Any],
              flags: int, timeout_s: float, deadline: float,
              progress: ProgressCallback | None, poll_s: float, abort_grace_s: float) -> None:
    """One ``migrateToURI3`` until ``deadline`` (see :func:`run_migration`, whose
    ``timeout_s`` it names in its errors)."""
    tracker = PhaseTracker(progress)
    outcome: list[BaseException | None] = []

    def migrate() -> None:
        try:
            dom.migrateToURI3(target_uri, params, flags)
        except BaseException as exc:  # handed to the caller's thread
            outcome.append(exc)
        else:
            outcome.append(None)

    thread = threading.Thread(target=migrate, name=f"migrate {name}", daemon=True)
    started = time.monotonic()
    thread.start()
    timed_out = False
    abort_deadline = 0.0
    abort_sent = False
    aborted_at: MigrationPhase | None = None  # the phase libvirt took our abort in
    resent = False
    while True:
        thread.join(poll_s)
        if not thread.is_alive():
            break
        stats = _job_stats(dom)
        if stats is not None:
            tracker.update(stats)
        now = time.monotonic()
        if not timed_out and now >= deadline:
            timed_out = True
            abort_deadline = now + abort_grace_s
            log.warning("live migration of %s to %s not done within %g s (at %s): aborting",
                        name, target_uri, timeout_s, tracker.phase.value)
        if timed_out:
            if not abort_sent:
                abort_sent = _abort(dom, name)
                if abort_sent:
                    aborted_at = tracker.phase
            elif (not resent and aborted_at is not None
                  and aborted_at.order < MigrationPhase.MIGRATE_MEMORY.order
                  and tracker.phase.order >= MigrationPhase.MIGRATE_MEMORY.order):
                # libvirt (9.0) looks at an abort request only while it waits
                # for the disk copy to converge: one taken before or after that
                # wait is lost and memory starts to move. QEMU's own cancel
                # works from then on, so ask once more (never more: a second
                # abort while libvirt unwinds a taken one can hang the job).
                log.warning("the abort of %s's migration, taken during %s, was lost: "
                            "aborting again", name, aborted_at.value)
                resent = _abort(dom, name)
            if now >= abort_deadline:
                raise TimedOut(
                    f"live migration of {name} to {target_uri} did not finish within "
                    f"{timeout_s:g} s (during {tracker.phase.value}) and could not be aborted "
                    f"within {abort_grace_s:g} s: it may still complete",
                    details={"uuid": uuid, "target": target_uri, "timeout_s": timeout_s,
                             "phase": tracker.phase.value, "aborted": False})
    error = outcome[0] if outcome else None
    elapsed = time.monotonic() - started
    if error is None:
        if timed_out:
            log.warning("live migration of %s to %s completed while being aborted",
                        name, target_uri)
        tracker.advance(MigrationPhase.FINISH, 100.0)
        log.info("migrated %s live to %s in %.2f s", name, target_uri, elapsed)
        return
    if not isinstance(error, libvirt.libvirtError):
        raise error
    if timed_out:
        raise TimedOut(
            f"live migration of {name} to {target_uri} did not finish within {timeout_s:g} s "
            f"(during {tracker.phase.value}); aborted, the domain stays on this host",
            details={"uuid": uuid, "target": target_uri, "timeout_s": timeout_s,
                     "phase": tracker.phase.value, "aborted": True}) from error
    if (tracker.phase in (MigrationPhase.CONNECT, MigrationPhase.PREPARE)
            and tracker.percent == 0.0
            and error.get_error_code() == libvirt.VIR_ERR_INTERNAL_ERROR
            and error.get_error_domain() == libvirt.VIR_FROM_RPC):
        raise _ClosedWhileConnecting(error)
    if error.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID:
        raise InvalidState(f"cannot migrate {name}: {error.get_error_message() or error}",
                           details={"uuid": uuid, "target": target_uri}) from error
    raise migration_error(error, phase=tracker.phase, name=name, uuid=uuid,
                          target_uri=target_uri) from error


def abort_outgoing(dom: Any, name: str) -> bool:
    """Abort ``dom``'s outgoing migration; False when none runs (then nothing is done).

    Other jobs (a managed save, a dump) are left alone.

    Raises:
        HypervisorError: libvirt refused the abort for another reason.
    """
    stats = _job_stats(dom)
    if stats is None or stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) == \
            libvirt.VIR_DOMAIN_JOB_NONE:
        return False
    operation = stats.get("operation")
    if operation is not None and operation != libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT:
        return False
    try:
        dom.abortJob()
    except libvirt.libvirtError as e:
        if e.get_error_code() in (libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_ERR_NO_DOMAIN):
            return False  # it ended meanwhile
        raise HypervisorError(f"cannot abort the migration of {name}: "
                              f"{e.get_error_message() or e}",
                              details={"libvirt_code": e.get_error_code()}) from e
    log.info("aborted the outgoing migration of %s", name)
    return True


def _abort(dom: Any, name: str) -> bool:
    """One abort attempt after a timeout; True once libvirt accepted it."""
    try:
        dom.abortJob()
    except libvirt.libvirtError as e:
        # No job yet (still setting up) or already finishing: try again next poll.
        log.debug("aborting the migration of %s: %s", name, e.get_error_message() or e)
        return False
    return True


def _job_stats(dom: Any) -> dict[str, Any] | None:
    try:
        stats = dom.jobStats()
    except libvirt.libvirtError as e:
        # The domain is gone from here once the migration completes.
        log.debug("job statistics: %s", e.get_error_message() or e)
        return None
    return dict(stats)
