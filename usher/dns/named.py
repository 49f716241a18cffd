"""A throwaway BIND 9 ``named`` on loopback, for tests and benchmarks.

:class:`Named` turns an empty directory into a running authoritative server
for a few zones, configured the way usher expects a site's server to be: a
TSIG key made by ``tsig-keygen``, each zone a primary that grants the key
``allow-update`` and ``allow-transfer``, no recursion, no NOTIFY, no control
channel, listening on 127.0.0.1 only. It starts ``named -g`` as a child
process (``-g`` keeps it in the foreground, so its PID is ours and no pid file
is needed to stop it), waits within a bound until every zone answers, and
stops it by PID.

Starting it again on the same directory keeps the zones: the zone files are
written only once, and named replays the journals (``.jnl``) of the updates
it took; that is how tests restart "the site's DNS server". The key and the
port stay the same too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype

from usher.dns.records import canonical_name
from usher.dns.rfc2136 import parse_key_file
from usher.errors import ConfigError, DnsUnavailable

__all__ = ["Named", "free_port"]

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
_PORT_ATTEMPTS = 20


def free_port() -> int:
    """A loopback port free for both UDP and TCP right now (a DNS server needs both).

    Raises:
        DnsUnavailable: no such port found in a few attempts.
    """
    for _ in range(_PORT_ATTEMPTS):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((LOOPBACK, 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((LOOPBACK, port))
                except OSError:
                    continue
                return port
    raise DnsUnavailable(f"no loopback port free for both UDP and TCP in {_PORT_ATTEMPTS}"
                         " attempts")


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if found is None:
        raise ConfigError(f"{name} is not installed; install Debian's bind9 package")
    return found


def _file_name(zone: str) -> str:
    return (zone.rstrip(".") or "root") + ".db"


class Named:
    """One BIND 9 named serving ``zones`` from the directory ``directory``.

    ``directory`` holds ``named.conf``, the key file ``tsig.key``, one zone
    file per zone (and its journal), ``named.log`` (named's output) and
    named's working files. ``port`` 0 picks a free loopback port when the
    object is made. Use it as a context manager, or call :meth:`start` and
    :meth:`stop`.
    """

    def __init__(self, directory: Path, zones: list[str], port: int = 0, *,
                 key_name: str = "usher-update") -> None:
        self.directory = Path(directory).resolve()
        self.zones = [canonical_name(z) for z in zones]
        if not self.zones:
            raise ConfigError("Named needs at least one zone")
        self._port = port or free_port()
        self._key_name = key_name
        self._proc: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------ properties
    @property
    def port(self) -> int:
        """The port named listens on, UDP and TCP, on 127.0.0.1."""
        return self._port

    @property
    def key_file(self) -> Path:
        """The TSIG key file (``tsig-keygen`` output); exists after :meth:`start`."""
        return self.directory / "tsig.key"

    def _key(self) -> tuple[str, str, str]:
        if not self.key_file.exists():
            raise ConfigError(f"{self.key_file} does not exist yet: start named first")
        return parse_key_file(self.key_file)

    @property
    def key_name(self) -> str:
        return self._key()[0]

    @property
    def key_algorithm(self) -> str:
        return self._key()[1]

    @property
    def key_secret(self) -> str:
        """The key's secret, base64."""
        return self._key()[2]

    @property
    def pid(self) -> int | None:
        """The PID of the running named, or None."""
        return self._proc.pid if self._proc is not None else None

    # ------------------------------------------------------------ configuration
    def named_conf(self) -> str:
        """The named.conf :meth:`start` writes."""
        d = self.directory
        zones = "".join(f"""
zone "{zone}" {{
    type primary;
    file "{d / _file_name(zone)}";
    allow-update {{ key "{self._key_name}"; }};
    allow-transfer {{ key "{self._key_name}"; }};
}};
""" for zone in self.zones)
        # notify no: NOTIFY goes to the NS addresses on port 53, never ours to
        # send to. controls {}: no rndc channel on the shared port 953.
        return f"""include "{self.key_file}";

options {{
    directory "{d}";
    pid-file "{d / 'named.pid'}";
    session-keyfile "{d / 'session.key'}";
    managed-keys-directory "{d}";
    dump-file "{d / 'named_dump.db'}";
    statistics-file "{d / 'named.stats'}";
    recursion no;
    dnssec-validation no;
    notify no;
    listen-on port {self._port} {{ {LOOPBACK}; }};
    listen-on-v6 {{ none; }};
    allow-query {{ {LOOPBACK}; }};
}};

controls {{ }};
{zones}"""

    def zone_file(self, zone: str) -> str:
        """The minimal zone file of ``zone``: SOA, NS ``ns.<zone>`` and that name's A.

        Reverse zones get the A too: named refuses to load a zone whose in-zone
        NS has no address.
        """
        ns = f"ns.{zone}"
        return f"""$TTL 60
@ IN SOA {ns} hostmaster.{zone} 1 3600 600 86400 60
@ IN NS {ns}
{ns} IN A {LOOPBACK}
"""

    def _configure(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        if not self.key_file.exists():
            key = subprocess.run([_tool("tsig-keygen"), "-a", "hmac-sha256", self._key_name],
                                 capture_output=True, text=True, timeout=10, check=False)
            if key.returncode != 0:
                raise ConfigError(f"tsig-keygen failed: {key.stderr.strip()}")
            fd = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(key.stdout)
        for zone in self.zones:
            path = self.directory / _file_name(zone)
            # Written once: named replays its journal onto this file at restart,
            # and a rewritten file would not match the journal.
            if not path.exists():
                path.write_text(self.zone_file(zone))
        (self.directory / "named.conf").write_text(self.named_conf())

    # ------------------------------------------------------------ lifetime
    def start(self, timeout: float = 10.0) -> int:
        """Configure (first time only) and start named; return its port once every zone answers.

        Does nothing but return the port if it is running already.

        Raises:
            ConfigError: named or tsig-keygen is missing or refuses the setup.
            DnsUnavailable: named exited or did not serve every zone within
                ``timeout`` seconds (it is stopped then); the message quotes
                its log.
        """
        if self._proc is not None:
            return self._port
        self._configure()
        logfile = open(self.directory / "named.log", "ab")  # noqa: SIM115 - held by the child
        try:
            self._proc = subprocess.Popen(
                [_tool("named"), "-g", "-4", "-c", str(self.directory / "named.conf")],
                stdin=subprocess.DEVNULL, stdout=logfile, stderr=subprocess.STDOUT,
                cwd=self.directory)
        finally:
            logfile.close()
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        log.info("named serving %s on %s port %d (pid %d)", ", ".join(self.zones), LOOPBACK,
                 self._port, self._proc.pid)
        return self._port

    def log_tail(self, lines: int = 5) -> str:
        """The last lines of named's output, joined (for error messages)."""
        try:
            text = (self.directory / "named.log").read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.splitlines()[-lines:])

    def _serves(self, zone: str) -> bool:
        query = dns.message.make_query(zone, dns.rdatatype.SOA)
        try:
            response = dns.query.udp(query, LOOPBACK, timeout=0.2, port=self._port)
        except (dns.exception.DNSException, OSError):
            return False
        return response.rcode() == dns.rcode.NOERROR and bool(response.answer)

    def _wait_ready(self, timeout: float) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        pending = list(self.zones)
        delay = 0.01
        while pending:
            if self._proc.poll() is not None:
                raise DnsUnavailable(f"named exited with status {self._proc.returncode} at"
                                     f" start: {self.log_tail()}")
            pending = [zone for zone in pending if not self._serves(zone)]
            if not pending:
                return
            if time.monotonic() > deadline:
                raise DnsUnavailable(f"named did not serve {', '.join(pending)} on port"
                                     f" {self._port} within {timeout:g} s: {self.log_tail()}")
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop named by its PID: SIGTERM, then SIGKILL after ``timeout`` seconds.

        Does nothing if it is not running. Safe to call twice.
        """
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("named (pid %d) ignored SIGTERM for %g s; killing it", proc.pid,
                            timeout)
                proc.kill()
                proc.wait(timeout)

    def __enter__(self) -> Named:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
