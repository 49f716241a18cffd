"""The site PKI: the CA and the controller and host certificates, and their files.

Each site has its own certificate authority. The controller holds a
``controller`` certificate; each node manager holds a ``host`` certificate that
it presents when it dials the controller (and that libvirt serves for
migration between hosts). The role is carried twice: in a custom non-critical
X.509 extension (``usher.protocol.tls.ROLE_OID``, a DER UTF8String) that
``usher.protocol.tls`` reads on every connection, and in ExtendedKeyUsage
(controller: serverAuth; host: clientAuth and serverAuth) so that OpenSSL's own
purpose checks agree.

This module needs the ``cryptography`` package; ``usher.protocol.tls`` does
not, so clients that only connect never import it. Keys are EC P-256. Files
are written atomically; private keys with mode 0600. Unreadable or mismatched
PKI files raise :class:`~usher.errors.ConfigError`.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    PublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from usher.errors import ConfigError, InvalidName, InvalidRequest
from usher.protocol.tls import ROLE_OID_DOTTED, ROLES, Role, cert_role

__all__ = ["ROLE_OID", "SitePki", "issue_cert", "issue_host_cert_files", "make_ca",
           "read_file", "spki", "write_file", "write_site_pki"]

ROLE_OID = x509.ObjectIdentifier(ROLE_OID_DOTTED)

_EKU: dict[str, list[x509.ObjectIdentifier]] = {
    "controller": [ExtendedKeyUsageOID.SERVER_AUTH],
    "host": [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH],
}
# Issued an hour in the past so that a host whose clock lags a little still
# accepts a certificate made a moment ago.
_BACKDATE = dt.timedelta(hours=1)
# A controller certificate this close to expiry is re-issued by write_site_pki.
_RENEW_BEFORE = dt.timedelta(days=30)
_MAX_CN = 64  # X.520 upper bound on commonName
_UTF8STRING = 0x0C
_HOSTNAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*")

_ISSUER_KEYS = (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, dsa.DSAPrivateKey,
                ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)

StrPath = str | os.PathLike[str]
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


# --- certificates -----------------------------------------------------------

def _der_utf8string(text: str) -> bytes:
    data = text.encode("utf-8")
    if len(data) < 0x80:
        return bytes([_UTF8STRING, len(data)]) + data
    size = len(data).to_bytes((len(data).bit_length() + 7) // 8, "big")
    return bytes([_UTF8STRING, 0x80 | len(size)]) + size + data


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "usher"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name[:_MAX_CN] or "usher"),
    ])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def spki(public_key: PublicKeyTypes) -> bytes:
    """A public key's DER SubjectPublicKeyInfo: equal for a key and its certificate."""
    return public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def _check_days(days: int) -> None:
    if days < 1:
        raise InvalidRequest(f"certificate lifetime must be at least 1 day, not {days}")


def make_ca(site: str, *, days: int = 3650) -> tuple[bytes, bytes]:
    """Create a new site CA: ``(certificate PEM, private key PEM)``.

    The CA is self-signed with an EC P-256 key, may sign end-entity
    certificates only (BasicConstraints CA with path length 0; KeyUsage
    keyCertSign and cRLSign) and is valid for ``days`` days.

    Raises:
        InvalidRequest: ``days`` is less than 1.
    """
    _check_days(days)
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(f"usher CA {site}")
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True,
            crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _general_names(dns_names: Iterable[str],
                   ip_addresses: Iterable[str | IpAddress]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for dns in dns_names:
        folded = dns.lower().rstrip(".")
        if not folded or not folded.isascii() or any(c.isspace() for c in folded):
            raise InvalidRequest(
                f"{dns!r} is not a DNS name for a certificate; use ASCII host names")
        entry: x509.GeneralName = x509.DNSName(folded)
        if entry not in names:
            names.append(entry)
    for address in ip_addresses:
        try:
            entry = x509.IPAddress(ipaddress.ip_address(address))
        except ValueError:
            raise InvalidRequest(f"{address!r} is not an IP address") from None
        if entry not in names:
            names.append(entry)
    return names


def issue_cert(ca_cert_pem: bytes, ca_key_pem: bytes, *, common_name: str, role: Role,
               dns_names: Sequence[str] = (),
               ip_addresses: Sequence[str | IpAddress] = (),
               days: int = 825) -> tuple[bytes, bytes]:
    """Issue an end-entity certificate for ``role``: ``(certificate PEM, key PEM)``.

    The certificate has a fresh EC P-256 key, the role extension, the role's
    ExtendedKeyUsage and subjectAltName entries for exactly the given DNS names
    and IP addresses (none if both are empty: hostname checks use only these,
    never ``common_name``).

    Raises:
        InvalidRequest: ``role`` is not a known role, ``days`` is less than 1, or
            a DNS name or IP address is malformed.
        ConfigError: the CA certificate or key cannot be read, the key does not
            belong to the certificate, or the certificate is not a CA.
    """
    if role not in ROLES:
        raise InvalidRequest(f"unknown certificate role {role!r}; roles are {', '.join(ROLES)}")
    _check_days(days)
    ca_cert, ca_key = _load_ca(ca_cert_pem, ca_key_pem)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # libvirt refuses a TLS certificate whose critical key usage lacks
        # keyEncipherment (meaningless for EC keys, but checked): hosts serve
        # theirs to libvirtd and QEMU for migration.
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False,
            key_encipherment=role == "host",
            data_encipherment=False, key_agreement=False, key_cert_sign=False,
            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(_EKU[role]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                       critical=False)
        .add_extension(x509.UnrecognizedExtension(ROLE_OID, _der_utf8string(role)),
                       critical=False)
    )
    general_names = _general_names(dns_names, ip_addresses)
    if general_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(general_names),
                                        critical=False)
    algorithm = (None if isinstance(ca_key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey)
                 else hashes.SHA256())
    cert = builder.sign(ca_key, algorithm)
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _load_ca(cert_pem: bytes,
             key_pem: bytes) -> tuple[x509.Certificate, CertificateIssuerPrivateKeyTypes]:
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"cannot read the site CA: {exc}") from None
    if not isinstance(key, _ISSUER_KEYS):
        raise ConfigError(f"the site CA key is a {type(key).__name__}, which cannot sign")
    if spki(key.public_key()) != spki(cert.public_key()):
        raise ConfigError("the site CA key does not belong to the CA certificate")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    except x509.ExtensionNotFound:
        raise ConfigError("the site CA certificate is not a usher CA") from None
    if not constraints.ca:
        raise ConfigError("the site CA certificate is not a CA certificate")
    return cert, key


# --- files ------------------------------------------------------------------

@dataclass(frozen=True)
class SitePki:
    """Where a site's PKI files are: the CA and the controller's certificate."""

    ca_cert: Path
    ca_key: Path
    controller_cert: Path
    controller_key: Path


def write_file(path: Path, data: bytes, mode: int, gid: int | None = None) -> None:
    """Write ``data`` to ``path`` atomically with exactly ``mode`` (and group ``gid``).

    Raises OSError; the temporary file never stays behind.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        # mkstemp creates the file 0600, so a key is never readable by others.
        os.fchmod(fd, mode)
        if gid is not None:
            os.fchown(fd, -1, gid)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_pair(cert_path: Path, key_path: Path, cert_pem: bytes, key_pem: bytes) -> None:
    write_file(key_path, key_pem, 0o600)
    write_file(cert_path, cert_pem, 0o644)


def read_file(path: Path) -> bytes:
    """The bytes of ``path``; ConfigError (naming it) if it cannot be read."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None


def _split_names(names: Iterable[str]) -> tuple[list[str], list[IpAddress]]:
    dns: list[str] = []
    ips: list[IpAddress] = []
    for name in names:
        try:
            ips.append(ipaddress.ip_address(name))
        except ValueError:
            dns.append(name)
    return dns, ips


def _controller_cert_is_current(pki: SitePki, ca_cert: x509.Certificate,
                                wanted: list[x509.GeneralName]) -> bool:
    if not (pki.controller_cert.exists() and pki.controller_key.exists()):
        return False
    try:
        cert = x509.load_pem_x509_certificate(pki.controller_cert.read_bytes())
        key = serialization.load_pem_private_key(pki.controller_key.read_bytes(), None)
        cert.verify_directly_issued_by(ca_cert)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return False
    return (spki(key.public_key()) == spki(cert.public_key())
            and set(sans) == set(wanted)
            and cert_role(cert.public_bytes(serialization.Encoding.DER)) == "controller"
            and cert.not_valid_after_utc > _now() + _RENEW_BEFORE)


def write_site_pki(dir: Path, *, site: str, controller_names: Sequence[str]) -> SitePki:
    """Create (or keep) the site CA and the controller's certificate under ``dir``.

    Files: ``ca.crt``, ``ca.key``, ``controller.crt``, ``controller.key``; keys
    are mode 0600, certificates 0644. An existing CA is never overwritten, so
    running this again is safe. The controller certificate is re-issued only
    when it is missing, was not issued by this CA, names other hosts or expires
    within 30 days. Its subjectAltNames are ``controller_names`` (IP addresses
    are recognized) plus ``localhost`` and ``127.0.0.1``.

    Raises:
        ConfigError: only one of ``ca.crt`` and ``ca.key`` exists, or they are
            unreadable or do not match.
        InvalidRequest: a controller name is malformed.
    """
    dir.mkdir(parents=True, exist_ok=True)
    pki = SitePki(ca_cert=dir / "ca.crt", ca_key=dir / "ca.key",
                  controller_cert=dir / "controller.crt",
                  controller_key=dir / "controller.key")
    have_cert, have_key = pki.ca_cert.exists(), pki.ca_key.exists()
    if have_cert != have_key:
        present, missing = ((pki.ca_cert, pki.ca_key) if have_cert
                            else (pki.ca_key, pki.ca_cert))
        raise ConfigError(
            f"found {present} but not {missing}; restore {missing.name} or remove both"
            " to create a new site CA (every host certificate must then be re-issued)")
    if have_cert:
        ca_cert_pem, ca_key_pem = read_file(pki.ca_cert), read_file(pki.ca_key)
    else:
        ca_cert_pem, ca_key_pem = make_ca(site)
        _write_pair(pki.ca_cert, pki.ca_key, ca_cert_pem, ca_key_pem)
    ca_cert, _ = _load_ca(ca_cert_pem, ca_key_pem)

    dns, ips = _split_names([*controller_names, "localhost", "127.0.0.1"])
    wanted = _general_names(dns, ips)
    if not _controller_cert_is_current(pki, ca_cert, wanted):
        common_name = controller_names[0] if controller_names else "localhost"
        cert_pem, key_pem = issue_cert(ca_cert_pem, ca_key_pem, common_name=common_name,
                                       role="controller", dns_names=dns, ip_addresses=ips)
        _write_pair(pki.controller_cert, pki.controller_key, cert_pem, key_pem)
    return pki


def issue_host_cert_files(pki: SitePki, hostname: str, out_dir: Path) -> tuple[Path, Path]:
    """Issue a host certificate for ``hostname`` into ``out_dir``.

    Writes ``HOSTNAME.crt`` (0644) and ``HOSTNAME.key`` (0600), replacing any
    earlier pair, and returns ``(cert path, key path)``. ``hostname`` may be a
    DNS name or an IP address; it is the certificate's only subjectAltName.

    Raises:
        InvalidName: ``hostname`` is neither a host name nor an IP address.
        ConfigError: the site CA cannot be read.
    """
    host = hostname.lower().rstrip(".")
    dns, ips = _split_names([host])
    if dns and (len(host) > 253 or not _HOSTNAME.fullmatch(host)):
        raise InvalidName(
            f"{hostname!r} is not a host name; use a DNS name like vmm1.example.org"
            " or an IP address")
    cert_pem, key_pem = issue_cert(read_file(pki.ca_cert), read_file(pki.ca_key), common_name=host,
                                   role="host", dns_names=dns, ip_addresses=ips)
    out_dir.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out_dir / f"{host}.crt", out_dir / f"{host}.key"
    _write_pair(cert_path, key_path, cert_pem, key_pem)
    return cert_path, key_path
