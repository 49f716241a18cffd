"""Fake hosts of a real size that outlive the process driving them.

A fake host is a libvirt test-driver node file: ``<cpu>`` and ``<memory>`` give
the host its size, and each ``<domain>`` carries its run state
(``<test:runstate>``) and whether it has a managed-save image
(``<test:hasmanagedsave/>``). Opening ``test:///ABS/PATH`` starts a private
in-memory host from the file; the test driver never writes it back, so the
:class:`~usher.lnm.drivers.libvirt.LibvirtDriver` calls :meth:`FakeHost.save`
after every change. A node manager that is killed and restarted then finds the
domains its host still "runs", in the state they were left in.

Limits: the test driver cannot store why a domain stopped, so a crashed domain
comes back STOPPED; a domain that was shutting down comes back RUNNING.
"""

from __future__ import annotations

import os
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from pathlib import Path

import libvirt

from usher.errors import ConfigError, HypervisorError
from usher.lnm import domxml

TEST_NS = "http://libvirt.org/schemas/domain/test/1.0"

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

    @classmethod
    def create(cls, path: Path, *, hostname: str, cpus: int, memory_mib: int) -> FakeHost:
        """The fake host stored at ``path``, writing the file if needed.

        A new file holds no domains. An existing file keeps its domains; its
        size is rewritten if ``cpus`` or ``memory_mib`` differ.

        Raises:
            ConfigError: ``path`` exists but is not a host file, or the size
                is not positive.
            HypervisorError: the file cannot be written.
        """
        if cpus <= 0 or memory_mib <= 0:
            raise ConfigError(f"fake host {hostname} needs a positive size")
        host = cls(path.absolute(), hostname=hostname, cpus=cpus, memory_mib=memory_mib)
        if not host.path.exists():
            host._write(host._render([]))
            return host
        try:
            root = ET.parse(host.path).getroot()
            old_cpus = int(root.findtext("cpu/active") or 0)
            old_memory_mib = int(root.findtext("memory") or 0) // 1024
        except (ET.ParseError, ValueError, OSError) as e:
            raise ConfigError(f"{host.path} is not a fake host file: {e}") from e
        if root.tag != "node":
            raise ConfigError(f"{host.path} is not a fake host file: no <node>")
        if (old_cpus, old_memory_mib) != (cpus, memory_mib):
            chunks = []
            for dom in root.findall("domain"):
                dom.tail = None
                chunks.append(ET.tostring(dom, encoding="unicode"))
            host._write(host._render(chunks))
        return host

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
            else:
                before = dict(self._chunks)
                for uuid in changed:
                    try:
                        dom = conn.lookupByUUIDString(uuid)
                    except libvirt.libvirtError as e:
                        if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                            raise
                        self._chunks.pop(uuid, None)
                    else:
                        self._chunks[uuid] = _stored_domain(dom)
                if self._chunks == before:
                    # A no-op verb (or a retry): the file already says this.
                    return
            self._write(self._render(self._chunks.values()))

    def _render(self, chunks: Iterable[str]) -> str:
        head = (
            "<node>\n"
            f"<!-- usher fake host {self.hostname} -->\n"
            "<cpu><mhz>2000</mhz><nodes>1</nodes><sockets>1</sockets>"
            f"<cores>{self.cpus}</cores><threads>1</threads><active>{self.cpus}</active></cpu>\n"
            f"<memory>{self.memory_mib * 1024}</memory>\n"
        )
        return head + "".join(chunks) + "</node>\n"

    def _write(self, text: str) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError as e:
            raise HypervisorError(f"cannot write fake host file {self.path}: {e}") from e


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
