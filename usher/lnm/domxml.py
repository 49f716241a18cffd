"""libvirt domain XML for usher VMs, built and read by pure code.

:func:`build_domain_xml` turns a :class:`~usher.lnm.drivers.base.DomainSpec`
into domain XML; it does no I/O and its output is byte-for-byte deterministic
(golden files in ``tests/unit/lnm/golden`` pin it). Decisions that depend on the
host rather than on the VM, such as the domain type, are policy and live in
:func:`domain_type_for_uri`, not in the builder.

usher records who owns a domain in the domain's own ``<metadata>``::

    <usher:vm xmlns:usher="https://usher.dev/xmlns/domain/1">
      <usher:owner>alice</usher:owner>
      <usher:task>t-123</usher:task>
      <usher:ip prefix="24" gateway="10.0.0.1">10.0.0.5</usher:ip>
    </usher:vm>

The address is there so a node manager can give it back to the VM (a DHCP
host entry on the VM's libvirt network) after a restart, from the domains
alone.

:func:`parse_domain_xml` reads that back, with the facts the driver reports
(memory, vCPUs, MAC) from any domain, usher's or not.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from usher.errors import ConfigError, HypervisorError

if TYPE_CHECKING:
    from usher.lnm.drivers.base import DomainSpec

USHER_NS = "https://usher.dev/xmlns/domain/1"

_KIB_PER_UNIT = {
    "b": 1 / 1024, "bytes": 1 / 1024,
    "k": 1, "kib": 1, "kb": 1000 / 1024,
    "m": 1024, "mib": 1024, "mb": 1000**2 / 1024,
    "g": 1024**2, "gib": 1024**2, "gb": 1000**3 / 1024,
    "t": 1024**3, "tib": 1024**3, "tb": 1000**4 / 1024,
}


def domain_type_for_uri(uri: str) -> str:
    """Policy: the ``<domain type=...>`` to use on the hypervisor at ``uri``.

    ``test://`` gets ``test``. QEMU URIs get ``qemu`` (TCG), which boots
    everywhere; choosing ``kvm`` needs a probe that KVM really runs guests
    (on some hosts /dev/kvm opens but cannot boot Linux), which a later change
    adds here. Callers may always pass an explicit type to the driver instead.

    Raises:
        ConfigError: no policy for this URI's scheme.
    """
    scheme = urlsplit(uri).scheme.split("+", 1)[0]
    if scheme == "test":
        return "test"
    if scheme == "qemu":
        return "qemu"
    raise ConfigError(f"no domain type policy for hypervisor URI {uri!r}; set it explicitly")


def build_domain_xml(spec: DomainSpec, domain_type: str, *, network: str = "default") -> str:
    """The domain XML that defines ``spec`` with ``<domain type=domain_type>``,
    its interface on the libvirt network ``network`` (empty: no interface)."""
    root = ET.Element("domain", type=domain_type)
    _text(root, "name", spec.name)
    _text(root, "uuid", spec.uuid)
    root.append(_metadata(spec))
    _text(root, "memory", str(spec.memory_mib), unit="MiB")
    _text(root, "vcpu", str(spec.vcpus))
    os_el = ET.SubElement(root, "os")
    _text(os_el, "type", "hvm")
    if spec.kernel is not None:
        _text(os_el, "kernel", spec.kernel)
        if spec.initrd is not None:
            _text(os_el, "initrd", spec.initrd)
        _text(os_el, "cmdline", spec.cmdline)
    elif spec.disk is not None:
        ET.SubElement(os_el, "boot", dev="hd")
    # ACPI lets the guest hear the power button: shutdown is ACPI.
    features = ET.SubElement(root, "features")
    ET.SubElement(features, "acpi")
    ET.SubElement(features, "apic")
    # Power-off and crash end the domain so usher sees and decides; a guest
    # reboot stays inside the hypervisor.
    _text(root, "on_poweroff", "destroy")
    _text(root, "on_reboot", "restart")
    _text(root, "on_crash", "destroy")
    devices = ET.SubElement(root, "devices")
    if spec.disk is not None:
        disk = ET.SubElement(devices, "disk", type="file", device="disk")
        ET.SubElement(disk, "driver", name="qemu", type="qcow2")
        ET.SubElement(disk, "source", file=spec.disk)
        ET.SubElement(disk, "target", dev="vda", bus="virtio")
    if network:
        devices.append(_interface(spec, network))
    serial = ET.SubElement(devices, "serial", type="pty")
    if spec.console_log is not None:
        # virtlogd keeps what the guest prints, for 'console --tail'.
        ET.SubElement(serial, "log", file=spec.console_log, append="on")
    ET.SubElement(serial, "target", port="0")
    console = ET.SubElement(devices, "console", type="pty")
    ET.SubElement(console, "target", type="serial", port="0")
    # No balloon: usher's placement counts each VM's full memory, so the
    # hypervisor must not be able to hand memory around behind its back.
    ET.SubElement(devices, "memballoon", model="none")
    ET.indent(root, space="  ")
    return ET.tostring(root, encoding="unicode") + "\n"


def _text(parent: ET.Element, tag: str, text: str, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrs)
    el.text = text
    return el


def _metadata(spec: DomainSpec) -> ET.Element:
    # Prefixed names written literally: ElementTree would hoist the xmlns
    # declaration to <domain>; libvirt stores each metadata element on its
    # own, so it should declare its namespace itself.
    metadata = ET.Element("metadata")
    vm = ET.SubElement(metadata, "usher:vm", {"xmlns:usher": USHER_NS})
    _text(vm, "usher:owner", spec.owner)
    _text(vm, "usher:task", spec.task_id)
    if spec.ip is not None:
        attrs = {}
        if spec.ip_prefix is not None:
            attrs["prefix"] = str(spec.ip_prefix)
        if spec.gateway is not None:
            attrs["gateway"] = spec.gateway
        _text(vm, "usher:ip", spec.ip, **attrs)
    return metadata


def _interface(spec: DomainSpec, network: str) -> ET.Element:
    # A libvirt network: the node manager can hand out the VM's address
    # through the network's DHCP server (and the test driver accepts it
    # without host setup).
    iface = ET.Element("interface", type="network")
    ET.SubElement(iface, "mac", address=spec.mac)
    ET.SubElement(iface, "source", network=network)
    ET.SubElement(iface, "model", type="virtio")
    if spec.ip is not None:
        # libvirt's clean-traffic filter pins the guest to its MAC and leased
        # address: it cannot spoof another guest's.
        ref = ET.SubElement(iface, "filterref", filter="clean-traffic")
        ET.SubElement(ref, "parameter", name="IP", value=spec.ip)
    return iface


@dataclass(frozen=True, slots=True)
class DomainXmlFacts:
    """What the driver reads back from a domain's XML."""

    uuid: str
    name: str
    memory_mib: int
    vcpus: int
    mac: str | None         # the first interface's MAC
    owner: str | None       # None: no usher metadata
    task_id: str | None
    ip: str | None = None   # the address usher leased it
    kernel_boot: bool = False  # boots a kernel directly (its address is on the command line)


def parse_domain_xml(xml: str) -> DomainXmlFacts:
    """Read name, UUID, size, first MAC and usher's metadata from domain XML.

    Raises:
        HypervisorError: the XML is not a domain description.
    """
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        raise HypervisorError(f"unreadable domain XML: {e}") from e
    name = root.findtext("name")
    uuid = root.findtext("uuid")
    if root.tag != "domain" or not name or not uuid:
        raise HypervisorError("domain XML lacks <domain>, <name> or <uuid>")
    vcpu = root.find("vcpu")
    vcpus = int(vcpu.get("current") or vcpu.text or 1) if vcpu is not None else 1
    mac_el = root.find("devices/interface/mac")
    vm = root.find(f"metadata/{{{USHER_NS}}}vm")
    return DomainXmlFacts(
        uuid=uuid.lower(),
        name=name,
        memory_mib=_memory_mib(root.find("memory")),
        vcpus=vcpus,
        mac=mac_el.get("address") if mac_el is not None else None,
        owner=vm.findtext(f"{{{USHER_NS}}}owner") if vm is not None else None,
        task_id=vm.findtext(f"{{{USHER_NS}}}task") if vm is not None else None,
        ip=vm.findtext(f"{{{USHER_NS}}}ip") if vm is not None else None,
        kernel_boot=root.find("os/kernel") is not None,
    )


def _memory_mib(el: ET.Element | None) -> int:
    if el is None or not el.text:
        return 0
    unit = el.get("unit", "KiB").lower()
    try:
        kib = int(el.text) * _KIB_PER_UNIT[unit]
    except (KeyError, ValueError) as e:
        raise HypervisorError(f"unreadable domain memory {el.text!r} {unit!r}") from e
    return int(kib // 1024)
