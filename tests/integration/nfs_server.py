"""A real NFS server for the tests: nfs-ganesha in user space, on loopback.

This machine's kernel may have no NFS server or client, so :class:`Ganesha`
runs Debian's ``ganesha.nfsd`` in the foreground: NFSv4 only over TCP on a
free 127.0.0.1 port, without rpcbind or dbus (it logs errors about both, and
about Kerberos, that do not matter here), exporting one directory read-only
as ``/export``. Clients reach it with libnfs's tools through :meth:`Ganesha.url`.
Tests write the files it serves behind its back, so it caches no attributes
(``Attr_Expiration_Time = 0``): by default it would list a directory, and
give a rewritten file's size, as they were up to 60 s before.

ganesha's VFS backend opens files by handle (``open_by_handle_at``), which
needs root: run as another user it starts but refuses every read. The tests
therefore skip when not run as root, and fail under root when a binary is
missing, since ``./scripts/setup`` installs them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

import pytest

from usher.dns.named import free_port

LOOPBACK = "127.0.0.1"
PSEUDO = "/export"
READY_S = 10.0
"""Upper bound of the wait for a first read; a healthy start takes ~0.1 s."""
POLL_S = 0.05
STOP_S = 5.0
"""How long a SIGTERM may take before SIGKILL; ganesha takes ~1.2 s to shut down."""
PLUGINS_DIR = "/usr/lib/x86_64-linux-gnu/ganesha"
TOOLS = ("ganesha.nfsd", "nfs-cp", "nfs-ls")

CONFIG = """\
NFS_CORE_PARAM {{
    Protocols = 4; NFS_Port = {port}; Bind_addr = {address};
    Enable_NLM = false; Enable_RQUOTA = false; Enable_UDP = false;
    Plugins_Dir = "{plugins}";
}}
NFSv4 {{
    Graceless = true; Lease_Lifetime = 10; Grace_Period = 0;
    RecoveryBackend = fs; RecoveryRoot = "{state}"; Only_Numeric_Owners = true;
}}
NFS_KRB5 {{ Active_krb5 = false; CCacheDir = "{run}"; }}
EXPORT {{
    Export_Id = 1; Path = "{export}"; Pseudo = "{pseudo}"; Protocols = 4;
    Transports = TCP; Access_Type = RO; Squash = No_Root_Squash; SecType = sys;
    Attr_Expiration_Time = 0;
    FSAL {{ Name = VFS; }}
}}
LOG {{ Default_Log_Level = EVENT; }}
"""


def require_nfs_tools(*tools: str) -> None:
    """Skip the test unless root; fail it, under root, if one of ``tools`` is missing."""
    if os.geteuid() != 0:
        pytest.skip("the NFS tests run as root (ganesha's VFS backend opens files by "
                    "handle, which needs CAP_DAC_READ_SEARCH)")
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: run ./scripts/setup")


class Ganesha:
    """``ganesha.nfsd`` serving ``root/export`` read-only as ``/export``.

    Use it as a context manager: entering writes the config under ``root``,
    starts the server and returns once a client reads through it; leaving
    stops it (SIGTERM, SIGKILL after :data:`STOP_S`), also when the start
    failed halfway.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.export = root / "export"
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.root / "ganesha.log"

    def url(self, path: str, *, port: int | None = None) -> str:
        """The ``nfs://`` URL libnfs reads ``path`` (relative to the export) by."""
        return (f"nfs://{LOOPBACK}{PSEUDO}/{path}?version=4"
                f"&nfsport={self.port if port is None else port}")

    def __enter__(self) -> Ganesha:
        require_nfs_tools(*TOOLS)
        run, state = self.root / "run", self.root / "state"
        for d in (self.export, run, state):
            d.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        conf = self.root / "ganesha.conf"
        conf.write_text(CONFIG.format(port=self.port, address=LOOPBACK, plugins=PLUGINS_DIR,
                                      state=state, run=run, export=self.export,
                                      pseudo=PSEUDO))
        # libblkid (ganesha finds the export's file system with it) would
        # write its cache to /run/blkid otherwise.
        env = {**os.environ, "BLKID_FILE": str(run / "blkid.tab")}
        with (self.root / "ganesha.out").open("wb") as out:
            self._proc = subprocess.Popen(
                ["ganesha.nfsd", "-F", "-L", str(self.log_path), "-f", str(conf),
                 "-p", str(run / "ganesha.pid")],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop the server we started (by its PID only); idempotent."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_S)

    def _wait_ready(self) -> None:
        # The export answers once ganesha has loaded it, ~0.1 s after start;
        # listing it is the cheapest read that proves that.
        assert self._proc is not None
        probe = f"nfs://{LOOPBACK}{PSEUDO}?version=4&nfsport={self.port}"
        deadline = time.monotonic() + READY_S
        for _ in range(int(READY_S / POLL_S)):
            if self._proc.poll() is not None:
                raise RuntimeError(f"ganesha.nfsd exited with {self._proc.returncode}: "
                                   f"{self._log_tail()}")
            try:
                done = subprocess.run(["nfs-ls", probe], stdin=subprocess.DEVNULL,
                                      capture_output=True,
                                      timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                break
            if done.returncode == 0:
                return
            if time.monotonic() >= deadline:
                break
            time.sleep(POLL_S)
        raise RuntimeError(f"ganesha.nfsd did not serve {probe} within {READY_S:g} s: "
                           f"{self._log_tail()}")

    def _log_tail(self, lines: int = 15) -> str:
        text = ""
        for path in (self.root / "ganesha.out", self.log_path):
            try:
                text += path.read_text(errors="replace")
            except OSError:
                pass
        return "\n".join(text.splitlines()[-lines:])
