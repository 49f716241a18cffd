"""Tests of usher.protocol.tls: the site PKI and real TLS over loopback."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ssl
import stat
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from usher.errors import ConfigError, InvalidName, InvalidRequest, PermissionDenied, ProtocolError
from usher.protocol.pki import (
    ROLE_OID,
    SitePki,
    issue_cert,
    issue_host_cert_files,
    make_ca,
    write_site_pki,
)
from usher.protocol.tls import (
    ROLE_OID_DOTTED,
    Role,
    cert_role,
    client_context,
    peer_role,
    require_role,
    server_context,
)

SITE = "usher.example.org"
HOST = "vmm1.example.org"


@dataclass(frozen=True)
class Site:
    pki: SitePki
    host_cert: Path
    host_key: Path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    root = tmp_path_factory.mktemp("pki")
    pki = write_site_pki(root / "site", site=SITE, controller_names=["ctl.example.org"])
    host_cert, host_key = issue_host_cert_files(pki, HOST, root / "hosts")
    return Site(pki, host_cert, host_key)


@pytest.fixture(scope="module")
def other_site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    root = tmp_path_factory.mktemp("other")
    pki = write_site_pki(root / "site", site="evil.example.net",
                         controller_names=["ctl.example.org"])
    host_cert, host_key = issue_host_cert_files(pki, HOST, root / "hosts")
    return Site(pki, host_cert, host_key)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


# --- certificates -----------------------------------------------------------

def test_role_oid_is_under_the_uuid_arc_and_readable_by_gnutls() -> None:
    arc, _, number = ROLE_OID.dotted_string.partition(".25.")
    assert arc == "2"
    # GnuTLS (libvirt, QEMU) cannot parse a certificate with an arc of 64 bits or more.
    assert 0 < int(number) < 2**56


def test_a_host_certificate_parses_with_gnutls(site: Site) -> None:
    import shutil
    import subprocess

    if shutil.which("certtool") is None:
        pytest.fail("certtool is missing: run ./scripts/setup (gnutls-bin)")
    out = subprocess.run(["certtool", "-i", "--infile", str(site.host_cert)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert ROLE_OID_DOTTED in out.stdout


def test_certificates_of_before_the_oid_change_keep_their_role() -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    from usher.protocol.tls import LEGACY_ROLE_OID_DOTTED

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "old")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.UnrecognizedExtension(
                x509.ObjectIdentifier(LEGACY_ROLE_OID_DOTTED), b"\x0c\x04host"),
                critical=False)
            .sign(key, hashes.SHA256()))
    assert cert_role(cert.public_bytes(serialization.Encoding.DER)) == "host"


def test_make_ca() -> None:
    cert_pem, key_pem = make_ca(SITE, days=10)
    cert = x509.load_pem_x509_certificate(cert_pem)
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign
    assert SITE in cert.subject.rfc4514_string()
    assert cert.issuer == cert.subject
    assert 10 <= (cert.not_valid_after_utc - cert.not_valid_before_utc).days <= 11
    assert cert_role(cert_pem) is None
    assert b"PRIVATE KEY" in key_pem


def test_make_ca_refuses_bad_lifetime() -> None:
    with pytest.raises(InvalidRequest):
        make_ca(SITE, days=0)


@pytest.mark.parametrize("role, usages", [
    ("controller", [ExtendedKeyUsageOID.SERVER_AUTH]),
    ("host", [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]),
])
def test_issue_cert_carries_role_twice(role: Role, usages: list[x509.ObjectIdentifier]) -> None:
    ca_cert, ca_key = make_ca(SITE)
    cert_pem, key_pem = issue_cert(ca_cert, ca_key, common_name="n1", role=role,
                                   dns_names=["N1.example.org."], ip_addresses=["10.0.0.1"],
                                   days=30)
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert cert_role(cert_pem) == role
    assert cert_role(cert.public_bytes(serialization.Encoding.DER)) == role
    extension = cert.extensions.get_extension_for_oid(ROLE_OID)
    assert not extension.critical
    assert extension.value.value == b"\x0c" + bytes([len(role)]) + role.encode()  # type: ignore[attr-defined]
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == usages
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["n1.example.org"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.1"]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_cert))
    key = serialization.load_pem_private_key(key_pem, None)
    assert key.public_key() == cert.public_key()


def test_issue_cert_refusals() -> None:
    ca_cert, ca_key = make_ca(SITE)
    with pytest.raises(InvalidRequest, match="unknown certificate role"):
        issue_cert(ca_cert, ca_key, common_name="x", role="admin")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="not an IP address"):
        issue_cert(ca_cert, ca_key, common_name="x", role="host", ip_addresses=["10.0.0.300"])
    with pytest.raises(InvalidRequest, match="at least 1 day"):
        issue_cert(ca_cert, ca_key, common_name="x", role="host", days=0)
    _, other_key = make_ca(SITE)
    with pytest.raises(ConfigError, match="does not belong"):
        issue_cert(ca_cert, other_key, common_name="x", role="host")
    with pytest.raises(ConfigError, match="cannot read"):
        issue_cert(b"junk", ca_key, common_name="x", role="host")


def test_issued_certs_cannot_sign(site: Site) -> None:
    host_pem, host_key = site.host_cert.read_bytes(), site.host_key.read_bytes()
    with pytest.raises(ConfigError, match="not a usher CA|not a CA"):
        issue_cert(host_pem, host_key, common_name="x", role="controller")


def test_cert_role_refuses_garbage() -> None:
    with pytest.raises(ProtocolError):
        cert_role(b"not a certificate")
    with pytest.raises(ProtocolError):
        cert_role(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")


# --- files ------------------------------------------------------------------

def test_write_site_pki_files_and_modes(site: Site) -> None:
    pki = site.pki
    for key in (pki.ca_key, pki.controller_key, site.host_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    for cert in (pki.ca_cert, pki.controller_cert, site.host_cert):
        assert stat.S_IMODE(cert.stat().st_mode) == 0o644
    assert site.host_cert.name == f"{HOST}.crt"
    assert not [p for p in pki.ca_cert.parent.iterdir() if p.name.startswith(".")]


def test_controller_cert_names(site: Site) -> None:
    cert = load(site.pki.controller_cert)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["ctl.example.org", "localhost"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert cert_role(site.pki.controller_cert.read_bytes()) == "controller"
    assert cert_role(site.host_cert.read_bytes()) == "host"


def test_write_site_pki_is_idempotent(tmp_path: Path) -> None:
    first = write_site_pki(tmp_path, site=SITE, controller_names=["ctl"])
    ca, controller = first.ca_cert.read_bytes(), first.controller_cert.read_bytes()
    ca_key = first.ca_key.read_bytes()
    second = write_site_pki(tmp_path, site=SITE, controller_names=["ctl"])
    assert second == first
    assert second.ca_cert.read_bytes() == ca
    assert second.ca_key.read_bytes() == ca_key
    assert second.controller_cert.read_bytes() == controller

    # New names re-issue the controller certificate from the same CA.
    third = write_site_pki(tmp_path, site=SITE, controller_names=["ctl", "10.1.2.3"])
    assert third.ca_cert.read_bytes() == ca
    cert = load(third.controller_cert)
    cert.verify_directly_issued_by(load(third.ca_cert))
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {
        "10.1.2.3", "127.0.0.1"}


def test_write_site_pki_refuses_half_a_ca(tmp_path: Path) -> None:
    pki = write_site_pki(tmp_path, site=SITE, controller_names=[])
    pki.ca_key.unlink()
    with pytest.raises(ConfigError, match="restore ca.key or remove both"):
        write_site_pki(tmp_path, site=SITE, controller_names=[])
    assert not pki.ca_key.exists()


def test_write_site_pki_refuses_mismatched_ca(tmp_path: Path) -> None:
    pki = write_site_pki(tmp_path, site=SITE, controller_names=[])
    pki.ca_key.write_bytes(make_ca(SITE)[1])
    with pytest.raises(ConfigError, match="does not belong"):
        write_site_pki(tmp_path, site=SITE, controller_names=[])


def test_issue_host_cert_files(site: Site, tmp_path: Path) -> None:
    cert_path, key_path = issue_host_cert_files(site.pki, "VMM2.Example.org.", tmp_path / "h")
    assert cert_path == tmp_path / "h" / "vmm2.example.org.crt"
    assert key_path == tmp_path / "h" / "vmm2.example.org.key"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    cert_path, _ = issue_host_cert_files(site.pki, "10.0.0.7", tmp_path)
    sans = load(cert_path).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.7"]


@pytest.mark.parametrize("hostname", ["", "../evil", "a/b", "a b", "-a", "a..b", "caf\u00e9"])
def test_issue_host_cert_files_refuses_bad_names(site: Site, tmp_path: Path,
                                                 hostname: str) -> None:
    with pytest.raises(InvalidName):
        issue_host_cert_files(site.pki, hostname, tmp_path)
    assert not list(tmp_path.iterdir())


# --- contexts ---------------------------------------------------------------

def test_context_settings(site: Site) -> None:
    pki = site.pki
    server = server_context(pki.controller_cert, pki.controller_key, pki.ca_cert)
    assert server.verify_mode == ssl.CERT_OPTIONAL
    assert server.minimum_version == ssl.TLSVersion.TLSv1_2
    client = client_context(pki.ca_cert)
    assert client.check_hostname
    assert client.verify_mode == ssl.CERT_REQUIRED
    assert client.minimum_version == ssl.TLSVersion.TLSv1_2


def test_context_errors_are_config_errors(site: Site, tmp_path: Path) -> None:
    pki = site.pki
    missing = tmp_path / "missing.pem"
    with pytest.raises(ConfigError, match="missing.pem"):
        server_context(missing, pki.controller_key, pki.ca_cert)
    with pytest.raises(ConfigError, match="site CA"):
        server_context(pki.controller_cert, pki.controller_key, missing)
    with pytest.raises(ConfigError):
        server_context(pki.controller_cert, site.host_key, pki.ca_cert)
    with pytest.raises(ConfigError):
        client_context(missing)
    with pytest.raises(ConfigError, match="without its certificate"):
        client_context(pki.ca_cert, key_file=site.host_key)


# --- real TLS over loopback -------------------------------------------------

Seen = asyncio.Queue[tuple[str | None, ssl.SSLObject]]


@contextlib.asynccontextmanager
async def serving(ctx: ssl.SSLContext) -> AsyncIterator[tuple[int, Seen]]:
    """A TLS echo-once server on loopback; yields its port and what it saw."""
    seen: Seen = asyncio.Queue()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        await seen.put((peer_role(ssl_object), ssl_object))
        writer.write(b"hello\n")
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.drain()
            writer.close()
            await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    try:
        yield server.sockets[0].getsockname()[1], seen
    finally:
        server.close()
        await server.wait_closed()


async def talk(port: int, ctx: ssl.SSLContext, hostname: str,
               check: Callable[[ssl.SSLObject], None] = lambda _: None) -> bytes:
    async with asyncio.timeout(5):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname=hostname)
        try:
            check(writer.get_extra_info("ssl_object"))
            return await reader.readline()
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()


def controller_server(site: Site) -> ssl.SSLContext:
    return server_context(site.pki.controller_cert, site.pki.controller_key, site.pki.ca_cert)


@pytest.mark.parametrize("hostname", ["ctl.example.org", "localhost", "127.0.0.1"])
async def test_user_client_verifies_the_controller(site: Site, hostname: str) -> None:
    def check(ssl_object: ssl.SSLObject) -> None:
        assert peer_role(ssl_object) == "controller"
        require_role(ssl_object, "controller")
        assert ssl_object.version() == "TLSv1.3"

    async with serving(controller_server(site)) as (port, seen):
        assert await talk(port, client_context(site.pki.ca_cert), hostname, check) == b"hello\n"
        role, server_side = await seen.get()
    assert role is None  # a user presents no certificate
    with pytest.raises(PermissionDenied, match="peer presented no certificate"):
        require_role(server_side, "host")


async def test_controller_sees_a_node_as_host(site: Site) -> None:
    node = client_context(site.pki.ca_cert, cert_file=site.host_cert, key_file=site.host_key)
    async with serving(controller_server(site)) as (port, seen):
        assert await talk(port, node, "localhost", lambda s: require_role(s, "controller"))
        role, server_side = await seen.get()
    assert role == "host"
    require_role(server_side, "host")
    with pytest.raises(PermissionDenied, match="is a host certificate, not a controller"):
        require_role(server_side, "controller")


async def test_host_cannot_pose_as_the_controller(site: Site) -> None:
    impostor = server_context(site.host_cert, site.host_key, site.pki.ca_cert)

    def check(ssl_object: ssl.SSLObject) -> None:
        # The chain and the host name are fine: only the role gives it away.
        assert peer_role(ssl_object) == "host"
        with pytest.raises(PermissionDenied) as info:
            require_role(ssl_object, "controller")
        assert str(info.value) == (
            "peer certificate is a host certificate, not a controller certificate")
        assert info.value.details == {"expected": "controller", "actual": "host"}

    async with serving(impostor) as (port, _):
        await talk(port, client_context(site.pki.ca_cert), HOST, check)


async def test_client_refuses_a_server_from_another_ca(site: Site, other_site: Site) -> None:
    async with serving(controller_server(other_site)) as (port, seen):
        with pytest.raises(ssl.SSLCertVerificationError):
            await talk(port, client_context(site.pki.ca_cert), "localhost")
    assert seen.empty()


async def test_client_checks_the_host_name(site: Site) -> None:
    async with serving(controller_server(site)) as (port, _):
        with pytest.raises(ssl.SSLCertVerificationError, match="match|mismatch"):
            await talk(port, client_context(site.pki.ca_cert), "elsewhere.example.org")


async def test_controller_refuses_a_node_from_another_ca(site: Site, other_site: Site) -> None:
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, _context: None)  # the refused handshake
    stranger = client_context(site.pki.ca_cert, cert_file=other_site.host_cert,
                              key_file=other_site.host_key)
    async with serving(controller_server(site)) as (port, seen):
        # With TLS 1.3 the client learns of the refusal only on its next read.
        try:
            data = await talk(port, stranger, "localhost")
        except (ssl.SSLError, ConnectionError):
            data = b""
        assert data == b""
    assert seen.empty()


def test_stdlib_role_reader_agrees_with_cryptography() -> None:
    """tls reads the role with its own DER reader; pki writes it with cryptography."""
    assert ROLE_OID.dotted_string == ROLE_OID_DOTTED
    ca_cert, ca_key = make_ca(SITE)
    for role in ("controller", "host"):
        pem, _ = issue_cert(ca_cert, ca_key, common_name=HOST, role=role, dns_names=[HOST])
        der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
        assert cert_role(pem) == cert_role(der) == role
    assert cert_role(ca_cert) is None
    with pytest.raises(ProtocolError):
        cert_role(b"\x30\x82\xff\xff garbage")
