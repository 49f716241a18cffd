"""Fake hosts of a real size that outlive the process driving them.

A fake host is a libvirt test-driver node file: ``<cpu>`` and ``<memory>`` give
the host its size, and each ``<domain>`` carries its run state
(``<test:runstate>``) and whether it has a managed-save image
(``<test:hasmanagedsave/>``). Opening ``test:///ABS/PATH`` starts a private
in-memory host from the file; the test driver never writes it back, so the
:class:`~usher.lnm.drivers.libvirt.LibvirtDriver` calls :meth:`FakeHost.save`
after every change. A node manager that is killed and restarted then finds the
domains its host still "runs", in the state they were left in.

A save appends the changed domains to a journal beside the file
(``host.xml.journal``, one JSON line per domain: its UUID and its stored XML,
or null once it is gone) instead of rewriting the whole file: a busy host
with thousands of domains would otherwise write megabytes per change. The
journal is folded into the file (:func:`compact`) before libvirt opens it,
and whenever it grows past the file's own size, so writes stay proportional
to what changed. A torn last line (a process killed mid-append) is ignored:
the call that wrote it never replied, so nobody was told of that change.

Limits: the test driver cannot store why a domain stopped, so a crashed domain
comes back STOPPED; a domain that was shutting down comes back RUNNING.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import libvirt

from usher.errors import ConfigError, HypervisorError
from usher.lnm import domxml

TEST_NS = "http://libvirt.org/schemas/domain/test/1.0"
JOURNAL_SUFFIX = ".journal"
COMPACT_MIN_BYTES = 1 << 20
"""The journal is folded into the file once it is larger than this and the file."""

# Domains re-serialised by ElementTree keep their prefixes (not ns0, ns1).
ET.register_namespace("test", TEST_NS)
ET.register_namespace("usher", domxml.USHER_NS)

# libvirt run state -> the state the domain is stored in. The test driver
# restores any active state by booting, so transitional states are stored as
# the stable state they come from.
_STORED_STATE = {
    libvirt.VIR_DOMAIN_RUNNING: libvirt.VIR_DOMAIN_RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: libvirt.VIR_DOMAIN_RUNNING,
    libvirt.VIR_DOMAIN_SHUTDOWN: libvirt.VIR_DOMAIN_RUNNING,
    libvirt.VIR_DOMAIN_PAUSED: libvirt.VIR_DOMAIN_PAUSED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: libvirt.VIR_DOMAIN_PAUSED,
}


class FakeHost:
    """A libvirt test-driver host file with a cache of its domains' XML.

    Use :meth:`create`, then drive ``test:///PATH`` (:attr:`uri`) through a
    ``LibvirtDriver(fake_host.uri, fake_host=fake_host)``. One connection per
    fake host: each open of the URI is a separate host started from the file.
    """

    def __init__(self, path: Path, *, hostname: str, cpus: int, memory_mib: int) -> None:
        self.path = path
        self.hostname = hostname
        self.cpus = cpus
        self.memory_mib = memory_mib
        self._lock = threading.Lock()
        # uuid -> that domain's <domain> element as stored, in file order.
        # None until the first full scan of a connection.
        self._chunks: dict[str, str] | None = None
        self.networks: list[str] = []  # <network> elements of the file, as XML
        self._file_bytes = 0
        self._journal_bytes = 0

    @classmethod
    def create(cls, path: Path, *, hostname: str, cpus: int, memory_mib: int,
               network: tuple[str, str] | None = None) -> FakeHost:
        """The fake host stored at ``path``, writing the file if needed.

        A new file holds no domains. An existing file keeps its domains (and
        its networks); its size is rewritten if ``cpus`` or ``memory_mib``
        differ. ``network`` ``(NAME, CIDR)`` gives the host a libvirt network
        of that name serving DHCP on that subnet (its first address is the
        gateway), if it has none of that name yet.

        Raises:
            ConfigError: ``path`` exists but is not a host file, or the size
                is not positive.
            HypervisorError: the file cannot be written.
        """
        if cpus <= 0 or memory_mib <= 0:
            raise ConfigError(f"fake host {hostname} needs a positive size")
        host = cls(path.absolute(), hostname=hostname, cpus=cpus, memory_mib=memory_mib)
        new_network = network_xml(*network) if network is not None else None
        if not host.path.exists():
            _journal_path(host.path).unlink(missing_ok=True)  # no file: nothing to replay
            host.networks = [new_network] if new_network else []
            host._write(host._render([]))
            return host
        stored = _load(host.path)
        host.networks = stored.networks
        added = network is not None and f"<name>{network[0]}</name>" not in "".join(
            host.networks)
        if added and new_network:
            host.networks.append(new_network)
        if added or stored.replayed or stored.size != (cpus, memory_mib):
            host._write(host._render(stored.chunks.values()))
        return host

    def compact(self) -> None:
        """Fold the journal into the host file; libvirt reads only the file.

        The driver calls this before it opens the host; it is idempotent and
        cheap when there is no journal.

        Raises:
            ConfigError: the file is not a host file.
            HypervisorError: the file cannot be written.
        """
        with self._lock:
            if not _journal_path(self.path).exists():
                return
            stored = _load(self.path)
            self.networks = stored.networks
            self._write(self._render(stored.chunks.values()))

    @property
    def uri(self) -> str:
        """The libvirt URI of this host: ``test:///ABS/PATH``."""
        return f"test://{self.path}"

    def save(self, conn: libvirt.virConnect, changed: Iterable[str] | None = None) -> None:
        """Rewrite the file from ``conn``'s domains and their run states.

        ``changed`` names the UUIDs that may differ from the last save; only
        those are read from libvirt (a missing one is dropped from the file).
        None reads every domain; the first save after creating the object
        always does. The file is replaced atomically (write, then rename), and
        not at all if nothing changed.

        Raises:
            libvirt.libvirtError: reading a domain failed (the caller translates).
            HypervisorError: the file cannot be written.
        """
        with self._lock:
            if changed is None or self._chunks is None:
                self._chunks = {d.UUIDString(): _stored_domain(d) for d in conn.listAllDomains()}
                self._write(self._render(self._chunks.values()))
                return
            entries: list[tuple[str, str | None]] = []
            for uuid in changed:
                try:
                    chunk: str | None = _stored_domain(conn.lookupByUUIDString(uuid))
                except libvirt.libvirtError as e:
                    if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                        raise
                    chunk = None
                # A no-op verb (or a retry) leaves the domain as stored: skip it.
                if self._chunks.get(uuid) != chunk:
                    entries.append((uuid, chunk))
                    if chunk is None:
                        del self._chunks[uuid]
                    else:
                        self._chunks[uuid] = chunk
            if not entries:
                return
            if self._journal_bytes > max(COMPACT_MIN_BYTES, self._file_bytes):
                self._write(self._render(self._chunks.values()))
            else:
                self._append(entries)

    def _render(self, chunks: Iterable[str]) -> str:
        head = (
            "<node>\n"
            f"<!-- usher fake host {self.hostname} -->\n"
            "<cpu><mhz>2000</mhz><nodes>1</nodes><sockets>1</sockets>"
            f"<cores>{self.cpus}</cores><threads>1</threads><active>{self.cpus}</active></cpu>\n"
            f"<memory>{self.memory_mib * 1024}</memory>\n"
        )
        return head + "".join(n + "\n" for n in self.networks) + "".join(chunks) + "</node>\n"

    def _write(self, text: str) -> None:
        """Replace the file with ``text`` (atomically) and drop the journal it includes."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        data = text.encode()
        try:
            tmp.write_bytes(data)
            os.replace(tmp, self.path)
            # Replaying a journal onto a file that already holds it changes
            # nothing, so a crash between these two steps is harmless.
            _journal_path(self.path).unlink(missing_ok=True)
        except OSError as e:
            raise HypervisorError(f"cannot write fake host file {self.path}: {e}") from e
        self._file_bytes, self._journal_bytes = len(data), 0

    def _append(self, entries: list[tuple[str, str | None]]) -> None:
        data = "".join(json.dumps({"uuid": u, "xml": x}) + "\n" for u, x in entries).encode()
        path = _journal_path(self.path)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
        except OSError as e:
            raise HypervisorError(f"cannot write fake host journal {path}: {e}") from e
        self._journal_bytes += len(data)


def _journal_path(path: Path) -> Path:
    return path.with_name(path.name + JOURNAL_SUFFIX)


@dataclass(slots=True)
class _Stored:
    size: tuple[int, int]  # (cpus, memory_mib)
    chunks: dict[str, str]  # uuid -> stored domain XML
    replayed: bool  # a journal changed anything
    networks: list[str]


def network_xml(name: str, cidr: str) -> str:
    """A test-driver ``<network>`` serving DHCP on ``cidr`` (gateway: its first address).

    Raises:
        ConfigError: ``cidr`` is not an IPv4 network with room for hosts.
    """
    try:
        net = ipaddress.IPv4Network(cidr, strict=True)
    except ValueError as exc:
        raise ConfigError(f"fake host network {cidr!r}: {exc}") from None
    if net.num_addresses < 4:
        raise ConfigError(f"fake host network {cidr} is too small")
    gateway, first, last = net[1], net[2], net[-2]
    bridge = f"ush-{name}"[:15]  # Linux interface names are 15 characters at most
    return (f"<network><name>{name}</name><bridge name='{bridge}'/>"
            f"<ip address='{gateway}' prefix='{net.prefixlen}'><dhcp>"
            f"<range start='{first}' end='{last}'/></dhcp></ip></network>")


def _load(path: Path) -> _Stored:
    """Read a host file and replay its journal, writing nothing.

    Raises:
        ConfigError: the file is not a host file.
    """
    try:
        root = ET.parse(path).getroot()
        head = (int(root.findtext("cpu/active") or 0), int(root.findtext("memory") or 0) // 1024)
    except (ET.ParseError, ValueError, OSError) as e:
        raise ConfigError(f"{path} is not a fake host file: {e}") from e
    if root.tag != "node":
        raise ConfigError(f"{path} is not a fake host file: no <node>")
    networks = []
    for net in root.findall("network"):
        net.tail = None
        networks.append(ET.tostring(net, encoding="unicode"))
    chunks: dict[str, str] = {}
    for i, dom in enumerate(root.findall("domain")):
        dom.tail = None
        # A hand-written domain may lack a UUID: keep it under a key of its own.
        chunks[dom.findtext("uuid") or f"no-uuid-{i}"] = ET.tostring(dom, encoding="unicode")
    replayed = False
    try:
        lines = _journal_path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        lines = []
    except OSError as e:
        raise ConfigError(f"cannot read the journal of {path}: {e}") from e
    for line in lines:
        try:
            entry = json.loads(line)
            uuid, xml = entry["uuid"], entry["xml"]
        except (ValueError, KeyError, TypeError):
            continue  # a torn line: its writer never replied
        if xml is None:
            chunks.pop(uuid, None)
        else:
            chunks[uuid] = xml
        replayed = True
    return _Stored(head, chunks, replayed, networks)


def compact(path: Path) -> None:
    """Fold the journal of the host file at ``path`` into it (for tools and tests).

    Only while no node manager drives the host: it appends to the journal.
    """
    stored = _load(path)
    if stored.replayed:
        with path.open(encoding="utf-8") as fh:
            found = _HOSTNAME.search(fh.read(4096))
        host = FakeHost(path, hostname=found.group(1) if found else path.stem,
                        cpus=stored.size[0], memory_mib=stored.size[1])
        host.networks = stored.networks
        host._write(host._render(stored.chunks.values()))


_HOSTNAME = re.compile(r"<!-- usher fake host (\S+) -->")


def stored_domains(path: Path) -> dict[str, str]:
    """The domains a host file and its journal hold: uuid -> stored XML. Writes nothing."""
    return _load(path).chunks


def _stored_domain(dom: libvirt.virDomain) -> str:
    """One domain as it is stored in the host file: its config plus run state."""
    xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    state = _STORED_STATE.get(dom.state()[0], libvirt.VIR_DOMAIN_SHUTOFF)
    extra = f"<test:runstate>{state}</test:runstate>\n"
    if state == libvirt.VIR_DOMAIN_SHUTOFF and dom.hasManagedSaveImage():
        extra += "<test:hasmanagedsave/>\n"
    if not dom.isPersistent():
        extra += "<test:transient/>\n"
    end = xml.rindex("</domain>")
    return (
        xml[:end].replace("<domain ", f"<domain xmlns:test='{TEST_NS}' ", 1)
        + extra + xml[end:].rstrip() + "\n"
    )
