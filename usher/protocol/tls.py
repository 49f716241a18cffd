"""TLS contexts and certificate roles for every usher connection.

The site CA (see :mod:`usher.protocol.pki`) signs a ``controller`` certificate
for the controller and a ``host`` certificate for each node manager; the role
sits in a custom X.509 extension (:data:`ROLE_OID`). Because a host
certificate is also good for serverAuth, chain and hostname checks alone cannot
stop a host from posing as the controller: a client calls
``require_role(ssl_object, "controller")`` after the handshake and before it
sends anything, and the controller calls ``require_role(ssl_object, "host")``
for node managers.

Users log in with a password and present no certificate, so the server asks
for a client certificate without requiring one (``CERT_OPTIONAL``); one that is
presented must still chain to the site CA or the handshake fails.

This module uses only the standard library (the role extension is read with a
small DER reader), so a client such as ``ush`` starts without loading the
``cryptography`` package.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterator
from typing import Literal, get_args

from usher.errors import ConfigError, PermissionDenied, ProtocolError

__all__ = ["ROLES", "ROLE_OID", "Role", "cert_role", "client_context", "peer_role",
           "require_role", "server_context"]

Role = Literal["controller", "host"]
ROLES: tuple[str, ...] = get_args(Role)

#: The role extension: under the UUID arc 2.25 (ITU-T X.667), so no OID
#: registration is needed. Its arc is the low 56 bits of f83efaab-c112-4e6c-
#: bbc8-f08d51ca4c63, a uuid4 drawn once for usher: GnuTLS (so libvirt and
#: QEMU, which serve host certificates for TLS migration) refuses to parse a
#: certificate with an OID arc of 64 bits or more, which the full UUID is.
ROLE_OID_DOTTED = "2.25.56559485095398499"
ROLE_OID = ROLE_OID_DOTTED
#: The role extension's OID in certificates issued before the change (the full
#: UUID): still read, never written. Never change either.
LEGACY_ROLE_OID_DOTTED = "2.25.329975549570057736560558771982947732579"

StrPath = str | os.PathLike[str]
_UTF8STRING = 0x0C
_EXTENSIONS = 0xA3  # [3] EXPLICIT in TBSCertificate


def _encode_oid(dotted: str) -> bytes:
    """The DER content octets of an OBJECT IDENTIFIER."""
    arcs = [int(a) for a in dotted.split(".")]
    out = bytearray()
    for arc in [arcs[0] * 40 + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out.extend(reversed(chunk))
    return bytes(out)


_ROLE_OID_DERS = (_encode_oid(ROLE_OID_DOTTED), _encode_oid(LEGACY_ROLE_OID_DOTTED))


def _tlv(der: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """Tag, value start and value end of the DER element at ``pos``."""
    if pos + 2 > end:
        raise ValueError("truncated DER")
    tag, size = der[pos], der[pos + 1]
    pos += 2
    if size & 0x80:
        count = size & 0x7F
        if count == 0 or count > 4 or pos + count > end:
            raise ValueError("bad DER length")
        size = int.from_bytes(der[pos:pos + count], "big")
        pos += count
    if pos + size > end:
        raise ValueError("truncated DER")
    return tag, pos, pos + size


def _children(der: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    pos = start
    while pos < end:
        element = _tlv(der, pos, end)
        yield element
        pos = element[2]


def _parse_der_utf8string(der: bytes) -> str:
    """Decode one DER UTF8String; ValueError if ``der`` is anything else."""
    tag, start, end = _tlv(der, 0, len(der))
    if tag != _UTF8STRING or end != len(der):
        raise ValueError("not one UTF8String")
    return der[start:end].decode("utf-8")


def _role_from_der(der: bytes) -> str | None:
    _, cert_start, cert_end = _tlv(der, 0, len(der))
    _, tbs_start, tbs_end = _tlv(der, cert_start, cert_end)
    for tag, start, end in _children(der, tbs_start, tbs_end):
        if tag != _EXTENSIONS:
            continue
        _, exts_start, exts_end = _tlv(der, start, end)
        for _, ext_start, ext_end in _children(der, exts_start, exts_end):
            parts = list(_children(der, ext_start, ext_end))
            _, oid_start, oid_end = parts[0]
            if der[oid_start:oid_end] in _ROLE_OID_DERS:
                _, value_start, value_end = parts[-1]  # the OCTET STRING
                return _parse_der_utf8string(der[value_start:value_end])
        return None
    return None


def cert_role(cert_der_or_pem: bytes) -> str | None:
    """The role in a certificate's role extension, or None if it has none.

    Accepts DER or PEM. The value is returned as found (normally one of
    :data:`ROLES`); whether to trust it is the caller's business: only a
    certificate whose chain was verified against the site CA means anything.

    Raises:
        ProtocolError: the bytes are not a certificate, or the role extension
            is not a DER UTF8String.
    """
    try:
        der = cert_der_or_pem
        if der.lstrip().startswith(b"-----BEGIN"):
            der = ssl.PEM_cert_to_DER_cert(der.decode("ascii"))
        return _role_from_der(der)
    except (ValueError, IndexError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"cannot read the certificate's role: {exc}") from None


# --- TLS contexts -----------------------------------------------------------

def _load_chain(ctx: ssl.SSLContext, cert_file: StrPath, key_file: StrPath | None) -> None:
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot load TLS certificate {os.fspath(cert_file)}"
            f" with key {os.fspath(key_file or cert_file)}: {exc}") from None


def _load_ca_file(ctx: ssl.SSLContext, ca_file: StrPath) -> None:
    try:
        ctx.load_verify_locations(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the site CA {os.fspath(ca_file)}: {exc}") from None


def _harden(ctx: ssl.SSLContext) -> None:
    # TLS 1.3 is negotiated whenever both ends have it; 1.2 stays for old peers.
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT


def server_context(cert_file: StrPath, key_file: StrPath, ca_file: StrPath) -> ssl.SSLContext:
    """A TLS server context: TLS 1.2 or newer, client certificates optional.

    A client certificate, when presented, must chain to ``ca_file`` or the
    handshake fails; who presented which role is read with :func:`peer_role`.

    Raises:
        ConfigError: a file is missing, unreadable or not PEM, or the key does
            not match the certificate.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx)
    _load_chain(ctx, cert_file, key_file)
    _load_ca_file(ctx, ca_file)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def client_context(ca_file: StrPath, *, cert_file: StrPath | None = None,
                   key_file: StrPath | None = None) -> ssl.SSLContext:
    """A TLS client context that trusts only the site CA and checks host names.

    Pass ``cert_file`` (and ``key_file`` unless the key is in the same file) to
    present a certificate, as node managers do. Connect with the server's name
    as ``server_hostname``; after the handshake call :func:`require_role`.

    Raises:
        ConfigError: a file is missing or unreadable, or ``key_file`` is given
            without ``cert_file``.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(ctx)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load_ca_file(ctx, ca_file)
    if cert_file is not None:
        _load_chain(ctx, cert_file, key_file)
    elif key_file is not None:
        raise ConfigError("a TLS key file was given without its certificate file")
    return ctx


def peer_role(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> str | None:
    """The role of the certificate the peer presented, or None if it sent none.

    Call it after the handshake (asyncio: ``writer.get_extra_info("ssl_object")``).

    Raises:
        ProtocolError: the certificate or its role extension is malformed.
    """
    der = ssl_object.getpeercert(binary_form=True)
    return None if der is None else cert_role(der)


def require_role(ssl_object: ssl.SSLObject | ssl.SSLSocket, role: Role) -> None:
    """Check that the peer's certificate has ``role``.

    Raises:
        PermissionDenied: the peer presented no certificate, or one with
            another role or no role; ``details`` hold ``expected`` and ``actual``.
        ProtocolError: the certificate or its role extension is malformed.
    """
    actual = peer_role(ssl_object)
    if actual == role:
        return
    if actual is None:
        what = ("peer presented no certificate"
                if ssl_object.getpeercert(binary_form=True) is None
                else "peer certificate has no usher role")
    else:
        what = f"peer certificate is a {actual} certificate"
    raise PermissionDenied(f"{what}, not a {role} certificate",
                           details={"expected": role, "actual": actual})


