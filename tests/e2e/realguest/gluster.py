"""One GlusterFS volume served inside the test segment, for a shared image store.

A site that shares its hosts' image stores mounts one network filesystem at
the same path on every host. The kernel here has no NFS client (and no module
loading), but FUSE works, and libvirt counts a ``fuse.glusterfs`` mount as
shared storage (its migration safety check reads the mount type), so the
tests use a real GlusterFS: ``glusterd`` and one brick run in the switch
namespace (:data:`~tests.e2e.realguest.hosts.CLIENT_IP`), in a mount
namespace of their own whose /var/lib/glusterd, /run/gluster and
/var/log/glusterfs are private copies, and each host mounts the volume with
the ``glusterfs`` FUSE client over its store path
(:meth:`GlusterVolume.mount`).

Processes are found and stopped by PID (pid files in the private run
directories), and anything left in these mount namespaces afterwards is
killed too; nothing outside them is touched.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from pathlib import Path

VOLUME = "usher-store"
STOP_TIMEOUT_S = 10.0
# GlusterFS's own advice for VM images (its "virt" option group) without the
# replica settings: no client-side caches in the volume's translators.
VM_IMAGE_OPTIONS = {
    "performance.quick-read": "off",
    "performance.read-ahead": "off",
    "performance.io-cache": "off",
    "performance.stat-prefetch": "off",
    "performance.open-behind": "off",
    "performance.strict-o-direct": "on",
    "network.remote-dio": "disable",
}

# Close-to-open consistency, as NFS has: a host drops its cached blocks and
# attributes of a file when it opens it. Measured without these options (this
# build keeps the page cache on open, whatever its --help says, and caches
# sizes for a second): after a cold move the new host read stale blocks of a
# disk the old host had written, and the old, shorter length of the file.
MOUNT_OPTIONS = ["--fopen-keep-cache=false", "--attribute-timeout=0", "--entry-timeout=0",
                 "--negative-timeout=0"]
_PRIVATE = {"lib": "/var/lib/glusterd", "run": "/run/gluster", "log": "/var/log/glusterfs"}


class GlusterError(RuntimeError):
    """The GlusterFS harness could not do something (not a product error)."""


def _run(argv: list[str], timeout_s: float = 60.0) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
    if proc.returncode != 0:
        raise GlusterError(f"{' '.join(argv)} failed ({proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip()}")
    return proc.stdout


def _mount_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def kill_mount_ns(anchor_pid: int, *, spare_anchor: bool = False) -> list[int]:
    """SIGKILL every process in ``anchor_pid``'s mount namespace; their PIDs.

    The namespace is one these tests made (private copies of daemon state),
    so whatever runs in it is ours.
    """
    ns = _mount_ns(anchor_pid)
    if ns is None or ns == _mount_ns(os.getpid()):
        return []  # gone already, or (never) ours
    killed = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if (spare_anchor and pid == anchor_pid) or _mount_ns(pid) != ns:
            continue
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except ProcessLookupError:
            pass
    return killed


class GlusterVolume:
    """A one-brick GlusterFS volume served from ``netns`` at ``address``.

    ``start()`` runs glusterd and the brick; ``mount()`` mounts the volume in
    a host's namespaces; ``close()`` stops all of it (mounts first).
    """

    def __init__(self, netns: str, address: str, base: Path) -> None:
        self.netns = netns
        self.address = address
        self.base = base
        self.anchor: subprocess.Popen[bytes] | None = None
        self._mounts: list[tuple[int, Path]] = []  # (host anchor pid, client pid file)

    def nsenter(self, argv: list[str]) -> list[str]:
        assert self.anchor is not None
        return ["nsenter", "-t", str(self.anchor.pid), "-m", "-n", "--", *argv]

    def start(self) -> None:
        for sub in (*_PRIVATE, "brick"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        script = "set -e\n" + "".join(
            f"mkdir -p '{target}'\nmount --bind '{self.base / sub}' '{target}'\n"
            for sub, target in _PRIVATE.items()) + "echo anchored\nexec sleep infinity\n"
        self.anchor = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, "unshare", "--mount", "--propagation",
             "private", "sh", "-c", script],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self.anchor.stdout is not None
        ready, _, _ = select.select([self.anchor.stdout], [], [], 10.0)
        if not ready or self.anchor.stdout.readline().strip() != b"anchored":
            raise GlusterError("the GlusterFS namespace did not come up")
        _run(self.nsenter(["glusterd", "-p", "/run/gluster/glusterd.pid",
                           "-l", "/var/log/glusterfs/glusterd.log"]))
        deadline = time.monotonic() + 30.0
        while True:  # glusterd answers its CLI a moment after it forked
            try:
                _run(self.nsenter(["gluster", "--mode=script", "volume", "create", VOLUME,
                                   f"{self.address}:{self.base / 'brick'}", "force"]))
                break
            except GlusterError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.2)
        for key, value in VM_IMAGE_OPTIONS.items():
            _run(self.nsenter(["gluster", "--mode=script", "volume", "set", VOLUME, key, value]))
        _run(self.nsenter(["gluster", "--mode=script", "volume", "start", VOLUME]))

    def mount(self, host_anchor_pid: int, mount_point: Path, pid_file: Path,
              pid_file_outside: Path, log_file: Path) -> None:
        """Mount the volume at ``mount_point`` inside a host's namespaces.

        ``pid_file`` and ``log_file`` are paths inside the host;
        ``pid_file_outside`` is where the root namespace sees that pid file.
        """
        self._mounts.append((host_anchor_pid, pid_file_outside))
        _run(["nsenter", "-t", str(host_anchor_pid), "-m", "-n", "--", "glusterfs",
              f"--volfile-server={self.address}", f"--volfile-id={VOLUME}",
              f"--pid-file={pid_file}", f"--log-file={log_file}", *MOUNT_OPTIONS,
              str(mount_point)])
        deadline = time.monotonic() + 30.0
        while True:  # the client forks before the mount is there
            found = subprocess.run(
                ["nsenter", "-t", str(host_anchor_pid), "-m", "--", "findmnt", "-n", "-o",
                 "FSTYPE", "--mountpoint", str(mount_point)],
                capture_output=True, text=True, timeout=10, check=False).stdout.split()
            if found and found[-1] == "fuse.glusterfs":
                return
            if time.monotonic() >= deadline:
                raise GlusterError(f"the volume did not mount at {mount_point}")
            time.sleep(0.1)

    def close(self) -> list[str]:
        """Stop the clients, the brick and glusterd; problems, as text (never raises)."""
        problems = []
        for host_pid, pid_file in self._mounts:
            try:
                _run(["nsenter", "-t", str(host_pid), "-m", "--", "umount", "-l",
                      "-t", "fuse.glusterfs", "-a"], timeout_s=STOP_TIMEOUT_S)
            except (GlusterError, subprocess.TimeoutExpired) as e:
                problems.append(f"unmount: {e}")
            _kill_pid_file(pid_file)
        self._mounts.clear()
        if self.anchor is not None:
            kill_mount_ns(self.anchor.pid, spare_anchor=True)
            if self.anchor.poll() is None:
                self.anchor.kill()
            try:
                self.anchor.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                problems.append("the GlusterFS anchor survived SIGKILL")
            self.anchor = None
        return problems


def _kill_pid_file(pid_file: Path) -> None:
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    try:
        if Path(f"/proc/{pid}/comm").read_text().strip().startswith("glusterfs"):
            os.kill(pid, signal.SIGKILL)
    except (OSError, ProcessLookupError):
        pass
