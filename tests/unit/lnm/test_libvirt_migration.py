"""The live-migration runner: phases from job statistics, the timeout's abort, errors.

Real migrations between libvirtd hosts run in tests/e2e/realguest. Here a
stand-in domain plays libvirt's side of ``migrateToURI3``/``jobStats``/
``abortJob`` (the one seam libvirt's test driver cannot fill: it has no
migration), so that the timing cases, which a real migration makes slow or
rare, are quick and certain. The statistics are ones recorded from real
migrations.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libvirt
import pytest

import usher
from usher.errors import DomainNotFound, HostUnavailable, HypervisorError, InvalidState, TimedOut
from usher.lnm.drivers.base import MigrationPhase
from usher.lnm.drivers.libvirt_migration import (
    PhaseTracker,
    abort_outgoing,
    migration_error,
    migration_flags,
    phase_of,
    run_migration,
)

TARGET = "qemu+tcp://10.0.0.2/system"
UNBOUNDED = libvirt.VIR_DOMAIN_JOB_UNBOUNDED
OUT = libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT

# Recorded from a 128 MiB TCG guest whose overlay held 4 MiB.
NO_JOB: dict[str, Any] = {"type": libvirt.VIR_DOMAIN_JOB_NONE}
SETUP = {"type": UNBOUNDED, "operation": OUT, "data_total": 0, "memory_total": 0,
         "memory_processed": 0, "memory_remaining": 0, "disk_total": 0, "disk_processed": 0,
         "disk_remaining": 0}
DISK = SETUP | {"disk_total": 4194304, "disk_processed": 1048576, "disk_remaining": 3145728}
MEMORY = SETUP | {"memory_total": 135012352, "memory_processed": 40228635,
                  "memory_remaining": 71954432}
SENT = SETUP | {"memory_total": 135012352, "memory_processed": 93568734,
                "memory_remaining": 0}


def libvirt_error(code: int, domain: int = libvirt.VIR_FROM_QEMU,
                  message: str = "it failed") -> libvirt.libvirtError:
    e = libvirt.libvirtError(message)
    e.err = (code, domain, message, libvirt.VIR_ERR_ERROR, None, None, None, 0, 0)
    return e


class StandInDomain:
    """Plays a source domain during ``migrateToURI3``.

    The migration walks through ``script`` (job statistics, one per
    ``step_s``) and then ends with ``result`` (None: success). ``abortJob``
    is refused ``refuse_aborts`` times (no job yet); an accepted abort ends
    the migration as libvirt does, unless ``abort_ignored``, or unless
    ``abort_lost_before_memory`` and no memory moved yet (libvirt 9.0 loses
    an abort taken outside its wait for the disk copy).
    """

    def __init__(self, script: list[dict[str, Any]], *, step_s: float = 0.02,
                 result: libvirt.libvirtError | None = None, refuse_aborts: int = 0,
                 abort_ignored: bool = False, abort_lost_before_memory: bool = False,
                 hang_s: float = 0.0,
                 first_results: list[libvirt.libvirtError] | None = None) -> None:
        self.first_results = list(first_results or [])  # each call's, before the script
        self.script = script
        self.step_s = step_s
        self.result = result
        self.refuse_aborts = refuse_aborts
        self.abort_ignored = abort_ignored
        self.abort_lost_before_memory = abort_lost_before_memory
        self.hang_s = hang_s
        self.aborts = 0
        self.calls: list[tuple[str, dict[str, Any], int]] = []
        self._aborted = threading.Event()
        self._stats: dict[str, Any] = dict(NO_JOB)
        self._done = threading.Event()

    def migrateToURI3(self, uri: str, params: dict[str, Any], flags: int) -> int:  # noqa: N802
        self.calls.append((uri, params, flags))
        if self.first_results:
            raise self.first_results.pop(0)
        try:
            for stats in self.script:
                self._stats = stats
                if self._aborted.wait(self.step_s):
                    raise libvirt_error(libvirt.VIR_ERR_OPERATION_ABORTED,
                                        message="operation aborted: canceled by client")
            if self.hang_s and self._aborted.wait(self.hang_s):
                raise libvirt_error(libvirt.VIR_ERR_OPERATION_ABORTED)
            if self.result is not None:
                raise self.result
            return 0
        finally:
            self._stats = dict(NO_JOB)
            self._done.set()

    def jobStats(self, flags: int = 0) -> dict[str, Any]:  # noqa: N802
        return dict(self._stats)

    def abortJob(self) -> int:  # noqa: N802
        self.aborts += 1
        if self.aborts <= self.refuse_aborts or self._done.is_set():
            raise libvirt_error(libvirt.VIR_ERR_OPERATION_INVALID,
                                message="no job is active on the domain")
        if self.abort_lost_before_memory and not self._stats.get("memory_processed"):
            return 0  # libvirt 9.0 takes it and never looks at it again
        if not self.abort_ignored:
            self._aborted.set()
        return 0


def migrate(dom: StandInDomain, timeout_s: float = 5.0,
            progress: Callable[[MigrationPhase, float], None] | None = None,
            abort_grace_s: float = 2.0) -> None:
    run_migration(dom, name="vm1", uuid="u-1", target_uri=TARGET, params={}, flags=0,
                  timeout_s=timeout_s, progress=progress, poll_s=0.01,
                  abort_grace_s=abort_grace_s)


@pytest.fixture
def seen() -> list[tuple[MigrationPhase, float]]:
    return []


# -- flags -----------------------------------------------------------------------------


def test_flags_are_live_peer_to_peer_moves_and_copy_only_when_asked() -> None:
    base = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER
            | libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)
    assert migration_flags(copy_storage=False, tls=False) == base
    assert migration_flags(copy_storage=True, tls=False) == (
        base | libvirt.VIR_MIGRATE_NON_SHARED_INC)
    assert migration_flags(copy_storage=False, tls=True) == base | libvirt.VIR_MIGRATE_TLS
    for copy in (False, True):
        for tls in (False, True):
            flags = migration_flags(copy_storage=copy, tls=tls)
            assert not flags & libvirt.VIR_MIGRATE_UNSAFE
            assert not flags & libvirt.VIR_MIGRATE_NON_SHARED_DISK  # never the whole chain


def test_the_unsafe_flag_appears_nowhere_in_the_product() -> None:
    root = Path(usher.__file__).parent
    unsafe = re.compile(r"\bVIR_MIGRATE_UNSAFE\b|MIGRATE_\w*\s*\+\s*['\"]UNSAFE")
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if unsafe.search(p.read_text())]
    assert offenders == []


# -- phases ----------------------------------------------------------------------------


@pytest.mark.parametrize(("stats", "expected"), [
    (NO_JOB, None),
    ({}, None),
    (SETUP, (MigrationPhase.PREPARE, 0.0)),
    (DISK, (MigrationPhase.COPY_STORAGE, 25.0)),
    (MEMORY, (MigrationPhase.MIGRATE_MEMORY, pytest.approx(46.7, abs=0.1))),
    (SENT, (MigrationPhase.FINISH, 0.0)),
])
def test_job_statistics_show_the_phase(stats: dict[str, Any], expected: object) -> None:
    assert phase_of(stats) == expected


def test_phases_and_percentages_only_move_forward(
        seen: list[tuple[MigrationPhase, float]]) -> None:
    tracker = PhaseTracker(lambda p, pct: seen.append((p, pct)))
    for stats in (NO_JOB, SETUP, SETUP, DISK, SETUP, DISK | {"disk_processed": 0}, MEMORY,
                  MEMORY | {"memory_remaining": 100000000}, DISK, SENT, NO_JOB):
        tracker.update(stats)
    assert seen == [(MigrationPhase.PREPARE, 0.0), (MigrationPhase.COPY_STORAGE, 25.0),
                    (MigrationPhase.MIGRATE_MEMORY, pytest.approx(46.7, abs=0.1)),
                    (MigrationPhase.FINISH, 0.0)]
    assert tracker.phase is MigrationPhase.FINISH


def test_a_failing_progress_callback_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    def broken(_phase: MigrationPhase, _percent: float) -> None:
        raise RuntimeError("display gone")

    dom = StandInDomain([SETUP, MEMORY])
    migrate(dom, progress=broken)
    assert "progress callback failed" in caplog.text


# -- the run ---------------------------------------------------------------------------


def test_a_migration_reports_progress_and_ends_finished(
        seen: list[tuple[MigrationPhase, float]]) -> None:
    dom = StandInDomain([SETUP] * 3 + [DISK] * 3 + [MEMORY] * 3 + [SENT] * 3, step_s=0.05)
    run_migration(dom, name="vm1", uuid="u-1", target_uri=TARGET,
                  params={libvirt.VIR_MIGRATE_PARAM_URI: "tcp://10.0.0.2"}, flags=7,
                  timeout_s=5.0, progress=lambda p, pct: seen.append((p, pct)), poll_s=0.01)
    assert dom.calls == [(TARGET, {libvirt.VIR_MIGRATE_PARAM_URI: "tcp://10.0.0.2"}, 7)]
    phases = [p for p, _ in seen]
    assert phases[0] is MigrationPhase.PREPARE
    assert MigrationPhase.COPY_STORAGE in phases and MigrationPhase.MIGRATE_MEMORY in phases
    assert seen[-1] == (MigrationPhase.FINISH, 100.0)
    assert dom.aborts == 0


def test_a_timeout_aborts_the_job_retrying_until_one_exists() -> None:
    dom = StandInDomain([SETUP] * 1000, refuse_aborts=3)
    started = time.monotonic()
    with pytest.raises(TimedOut) as caught:
        migrate(dom, timeout_s=0.1)
    assert time.monotonic() - started < 2.0
    assert dom.aborts == 4  # refused three times (no job yet), then accepted once
    assert caught.value.details == {"uuid": "u-1", "target": TARGET, "timeout_s": 0.1,
                                    "phase": "prepare", "aborted": True}
    assert "did not finish within 0.1 s (during prepare); aborted" in caught.value.message
    assert isinstance(caught.value.__cause__, libvirt.libvirtError)


def test_an_abort_that_does_not_take_effect_is_reported_after_the_grace() -> None:
    dom = StandInDomain([MEMORY] * 1000, abort_ignored=True)
    started = time.monotonic()
    with pytest.raises(TimedOut) as caught:
        migrate(dom, timeout_s=0.1, abort_grace_s=0.3)
    assert 0.35 <= time.monotonic() - started < 2.0
    assert caught.value.details["aborted"] is False
    assert caught.value.details["phase"] == "migrate memory"
    assert "may still complete" in caught.value.message
    dom._aborted.set()  # let the stand-in's thread end


def test_a_migration_that_completes_while_aborted_counts_as_done(
        seen: list[tuple[MigrationPhase, float]]) -> None:
    dom = StandInDomain([SENT] * 50, abort_ignored=True, step_s=0.01)
    migrate(dom, timeout_s=0.05, progress=lambda p, pct: seen.append((p, pct)))
    assert dom.aborts >= 1
    assert seen[-1] == (MigrationPhase.FINISH, 100.0)


def test_an_abort_lost_before_memory_moved_is_sent_once_more() -> None:
    # Seen on CI: the abort taken at "prepare", then the migration went on.
    dom = StandInDomain([SETUP] * 20 + [DISK] * 5 + [MEMORY] * 1000,
                        abort_lost_before_memory=True, step_s=0.01)
    with pytest.raises(TimedOut) as caught:
        migrate(dom, timeout_s=0.05)
    assert dom.aborts == 2
    assert caught.value.details["aborted"] is True
    assert caught.value.details["phase"] == "migrate memory"


def test_an_abort_taken_while_memory_moves_is_not_repeated() -> None:
    # The unwinding of a taken abort can show memory for a while; a second
    # abort then once hung the job for 52 s.
    dom = StandInDomain([MEMORY] * 1000, step_s=0.01, hang_s=0.0)
    with pytest.raises(TimedOut):
        migrate(dom, timeout_s=0.05)
    assert dom.aborts == 1


# -- errors ----------------------------------------------------------------------------


def test_an_unreachable_target_is_host_unavailable_while_connecting() -> None:
    refused = libvirt_error(libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_RPC,
                            "unable to connect to server at '10.0.0.2:16509': Connection refused")
    with pytest.raises(HostUnavailable) as caught:
        migrate(StandInDomain([], result=refused))
    assert caught.value.details["phase"] == "connect to target"
    assert caught.value.message == (
        f"live migration of vm1 to {TARGET} failed to connect to target: unable to connect to "
        "server at '10.0.0.2:16509': Connection refused")
    # Seen as a job first, but still only connecting (RPC is all that happened).
    with pytest.raises(HostUnavailable) as caught:
        migrate(StandInDomain([SETUP] * 5, result=refused))
    assert caught.value.details["phase"] == "connect to target"


def test_a_connection_lost_midway_names_the_phase() -> None:
    lost = libvirt_error(libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_RPC,
                         "connection closed due to keepalive timeout")
    with pytest.raises(HostUnavailable) as caught:
        migrate(StandInDomain([SETUP] * 3 + [MEMORY] * 5, result=lost))
    assert caught.value.details["phase"] == "migrate memory"
    assert "failed to migrate memory: connection closed" in caught.value.message


@pytest.mark.parametrize(("code", "script", "cls", "phase", "text"), [
    (libvirt.VIR_ERR_INTERNAL_ERROR, [SETUP] * 3, HypervisorError, "prepare",
     "failed to prepare: it failed"),
    (libvirt.VIR_ERR_OPERATION_FAILED, [SETUP] * 3 + [DISK] * 3, HypervisorError,
     "copy storage", "failed to copy storage"),
    (libvirt.VIR_ERR_OPERATION_FAILED, [SETUP, MEMORY, SENT, SENT], HypervisorError,
     "finish on target", "failed to finish on target"),
    (libvirt.VIR_ERR_MIGRATE_UNSAFE, [SETUP] * 3, HypervisorError, "prepare",
     "not on shared storage"),
    (libvirt.VIR_ERR_NO_DOMAIN, [SETUP] * 3, DomainNotFound, "prepare", "failed to prepare"),
])
def test_refusals_name_the_phase(code: int, script: list[dict[str, Any]],
                                 cls: type[HypervisorError], phase: str, text: str) -> None:
    with pytest.raises(cls) as caught:
        migrate(StandInDomain(script, result=libvirt_error(code)))
    assert type(caught.value) is cls
    assert caught.value.details["phase"] == phase
    assert caught.value.details["libvirt_code"] == code
    assert text in caught.value.message


def test_a_domain_stopped_meanwhile_is_invalid_state() -> None:
    with pytest.raises(InvalidState):
        migrate(StandInDomain([SETUP], result=libvirt_error(libvirt.VIR_ERR_OPERATION_INVALID,
                                                            message="domain is not running")))


def test_an_abort_from_another_thread_is_an_aborted_hypervisor_error() -> None:
    dom = StandInDomain([SETUP] * 5 + [MEMORY] * 1000)
    in_memory = threading.Event()
    result: list[BaseException] = []

    def progress(phase: MigrationPhase, _percent: float) -> None:
        if phase is MigrationPhase.MIGRATE_MEMORY:
            in_memory.set()

    def run() -> None:
        try:
            migrate(dom, progress=progress)
        except BaseException as e:
            result.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    assert in_memory.wait(5)
    assert abort_outgoing(dom, "vm1") is True
    thread.join(5)
    assert len(result) == 1 and type(result[0]) is HypervisorError
    err = result[0]
    assert isinstance(err, HypervisorError)
    assert err.details["aborted"] is True and err.details["phase"] == "migrate memory"
    assert err.message == f"live migration of vm1 to {TARGET} was aborted during migrate memory"
    assert abort_outgoing(dom, "vm1") is False  # nothing runs any more


def test_abort_leaves_other_jobs_alone() -> None:
    dom = StandInDomain([])
    dom._stats = SETUP | {"operation": libvirt.VIR_DOMAIN_JOB_OPERATION_SAVE}
    assert abort_outgoing(dom, "vm1") is False
    assert dom.aborts == 0


def test_migration_error_keeps_libvirts_message() -> None:
    err = migration_error(libvirt_error(libvirt.VIR_ERR_OPERATION_FAILED, message="boom"),
                          phase=MigrationPhase.COPY_STORAGE, name="vm1", uuid="u-1",
                          target_uri=TARGET)
    assert err.message.endswith(": boom")
    assert err.details == {"uuid": "u-1", "target": TARGET, "phase": "copy storage",
                           "libvirt_code": libvirt.VIR_ERR_OPERATION_FAILED}


CLOSED = "client socket is closed"


def test_a_target_that_closes_the_new_connection_is_tried_once_more() -> None:
    dom = StandInDomain([SETUP, MEMORY, SENT], first_results=[
        libvirt_error(libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_RPC, CLOSED)])
    run_migration(dom, name="vm1", uuid="u-1", target_uri=TARGET, params={}, flags=0,
                  timeout_s=5.0, progress=None, poll_s=0.01, connect_retry_s=0.01)
    assert len(dom.calls) == 2


def test_it_is_tried_only_once_more_and_a_refusing_target_not_at_all() -> None:
    closed = [libvirt_error(libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_RPC, CLOSED)
              for _ in range(3)]
    dom = StandInDomain([SETUP], first_results=closed)
    with pytest.raises(HostUnavailable, match="failed to connect to target: client socket"):
        run_migration(dom, name="vm1", uuid="u-1", target_uri=TARGET, params={}, flags=0,
                      timeout_s=5.0, progress=None, poll_s=0.01, connect_retry_s=0.01)
    assert len(dom.calls) == 2
    refused = libvirt_error(libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_FROM_RPC,
                            "unable to connect to server at '10.0.0.2:16509': "
                            "Connection refused")
    dom = StandInDomain([SETUP], first_results=[refused])
    with pytest.raises(HostUnavailable, match="Connection refused"):
        run_migration(dom, name="vm1", uuid="u-1", target_uri=TARGET, params={}, flags=0,
                      timeout_s=5.0, progress=None, poll_s=0.01, connect_retry_s=0.01)
    assert len(dom.calls) == 1


def test_a_connection_closed_once_data_moved_is_not_retried() -> None:
    dom = StandInDomain([SETUP, MEMORY], step_s=0.05, result=libvirt_error(
        libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_FROM_RPC, CLOSED))
    with pytest.raises(HostUnavailable, match="migrate memory"):
        run_migration(dom, name="vm1", uuid="u-1", target_uri=TARGET, params={}, flags=0,
                      timeout_s=5.0, progress=None, poll_s=0.01, connect_retry_s=0.01)
    assert len(dom.calls) == 1
