"""Domain XML: golden files, reading it back, and a round trip through libvirt.

Set USHER_UPDATE_GOLDEN=1 to rewrite the golden files after an intended change
(then read the diff).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import libvirt
import pytest

from usher.errors import ConfigError, HypervisorError
from usher.lnm.domxml import (
    DomainXmlFacts,
    build_domain_xml,
    domain_type_for_uri,
    parse_domain_xml,
)
from usher.lnm.drivers.base import DomainSpec

GOLDEN = Path(__file__).parent / "golden"

SPEC = DomainSpec(
    uuid="6f1d3c2e-8a7b-4c5d-9e0f-112233445566",
    name="redfish.sneetch.seuss.usher.example.org",
    memory_mib=512,
    vcpus=2,
    mac="52:54:00:12:34:56",
    owner="sneetch",
    task_id="t-0042",
)


def facts_of(spec: DomainSpec) -> DomainXmlFacts:
    return DomainXmlFacts(uuid=spec.uuid, name=spec.name, memory_mib=spec.memory_mib,
                          vcpus=spec.vcpus, mac=spec.mac, owner=spec.owner,
                          task_id=spec.task_id)


@pytest.mark.parametrize("domain_type", ["test", "kvm"])
def test_domain_xml_matches_golden_file(domain_type: str) -> None:
    golden = GOLDEN / f"{domain_type}.xml"
    xml = build_domain_xml(SPEC, domain_type)
    if os.environ.get("USHER_UPDATE_GOLDEN"):
        golden.write_text(xml)
    assert xml == golden.read_text()


def test_domain_xml_is_deterministic() -> None:
    assert build_domain_xml(SPEC, "test") == build_domain_xml(SPEC, "test")


def test_parse_reads_back_what_build_wrote() -> None:
    assert parse_domain_xml(build_domain_xml(SPEC, "test")) == facts_of(SPEC)


def test_address_goes_into_metadata_and_the_interface_joins_the_network() -> None:
    spec = dataclasses.replace(SPEC, ip="10.87.0.5", ip_prefix=16, gateway="10.87.0.1")
    xml = build_domain_xml(spec, "test", network="usher")
    assert '<usher:ip prefix="16" gateway="10.87.0.1">10.87.0.5</usher:ip>' in xml
    assert "<source network=\"usher\" />" in xml
    assert parse_domain_xml(xml).ip == "10.87.0.5"
    # clean-traffic pins the guest to its MAC and address (no spoofing).
    assert ('<filterref filter="clean-traffic">\n        <parameter name="IP" '
            'value="10.87.0.5" />') in xml
    assert parse_domain_xml(build_domain_xml(SPEC, "test")).ip is None


def test_no_network_means_no_interface() -> None:
    assert "<interface" not in build_domain_xml(SPEC, "qemu", network="")


def test_metadata_text_is_escaped() -> None:
    spec = DomainSpec(uuid=SPEC.uuid, name=SPEC.name, memory_mib=1, vcpus=1, mac=SPEC.mac,
                      owner="a<b>&'\"c", task_id="]]>")
    xml = build_domain_xml(spec, "test")
    assert "a&lt;b&gt;&amp;" in xml
    assert parse_domain_xml(xml).owner == "a<b>&'\"c"


def test_defined_domain_round_trips_through_the_test_driver(tmp_path: Path) -> None:
    host = tmp_path / "host.xml"
    host.write_text("<node><cpu><active>2</active></cpu><memory>4194304</memory></node>")
    conn = libvirt.open(f"test://{host}")
    try:
        dom = conn.defineXML(build_domain_xml(SPEC, "test"))
        # libvirt rewrites units (MiB -> KiB), adds defaults and reorders;
        # what usher reads back must not change.
        xml = dom.XMLDesc(0)
        assert xml != build_domain_xml(SPEC, "test")
        assert "unit='KiB'" in xml
        assert parse_domain_xml(xml) == facts_of(SPEC)
        assert dom.UUIDString() == SPEC.uuid
        dom.create()
        assert parse_domain_xml(dom.XMLDesc(0)) == facts_of(SPEC)
    finally:
        conn.close()


def test_parse_without_usher_metadata_has_no_owner() -> None:
    facts = parse_domain_xml(
        "<domain type='kvm'><name>x</name><uuid>6F1D3C2E-8A7B-4C5D-9E0F-112233445566</uuid>"
        "<memory unit='GiB'>2</memory><vcpu placement='static' current='1'>4</vcpu>"
        "</domain>")
    assert facts == DomainXmlFacts(uuid=SPEC.uuid, name="x", memory_mib=2048, vcpus=1,
                                   mac=None, owner=None, task_id=None)


@pytest.mark.parametrize(("memory", "mib"), [
    ("<memory>524288</memory>", 512),
    ("<memory unit='KiB'>1048576</memory>", 1024),
    ("<memory unit='b'>1073741824</memory>", 1024),
    ("<memory unit='M'>64</memory>", 64),
])
def test_parse_memory_units(memory: str, mib: int) -> None:
    xml = f"<domain><name>x</name><uuid>{SPEC.uuid}</uuid>{memory}<vcpu>1</vcpu></domain>"
    assert parse_domain_xml(xml).memory_mib == mib


@pytest.mark.parametrize("xml", [
    "<domain><name>x</name>",
    "<network><name>x</name><uuid>u</uuid></network>",
    "<domain><uuid>u</uuid></domain>",
    f"<domain><name>x</name><uuid>{SPEC.uuid}</uuid><memory unit='parsec'>1</memory></domain>",
])
def test_parse_rejects_what_is_not_a_domain(xml: str) -> None:
    with pytest.raises(HypervisorError):
        parse_domain_xml(xml)


@pytest.mark.parametrize(("uri", "domain_type"), [
    ("test:///default", "test"),
    ("test:///var/lib/usher/host.xml", "test"),
    ("qemu:///system", "qemu"),
    ("qemu+tcp://10.0.0.2/system", "qemu"),
])
def test_domain_type_policy(uri: str, domain_type: str) -> None:
    assert domain_type_for_uri(uri) == domain_type


def test_domain_type_policy_refuses_unknown_hypervisors() -> None:
    with pytest.raises(ConfigError):
        domain_type_for_uri("xen:///system")
