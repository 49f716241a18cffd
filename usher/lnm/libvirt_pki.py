"""The host's site certificate laid out for libvirt and QEMU: TLS live migration.

Live migration over ``qemu+tls://`` needs, on every host, a certificate that
both sides trust: libvirtd serves it to the source host's libvirtd (which
presents its own as a client), and with ``VIR_MIGRATE_TLS`` the two QEMUs do
the same for the migration stream. The node manager's host certificate is
made for exactly that: issued by the site CA for the host's name, with both
serverAuth and clientAuth. :func:`install` copies it, its key and the CA into
the places libvirt and QEMU read them from:

* libvirt, by default: ``/etc/pki/CA/cacert.pem``, ``/etc/pki/libvirt/
  servercert.pem``, ``clientcert.pem`` and ``private/serverkey.pem``,
  ``private/clientkey.pem``; or, with ``pkipath``, all five in one directory
  (libvirt's layout for a ``?pkipath=DIR`` URI and for ``ca_file``,
  ``cert_file``, ``key_file`` in ``libvirtd.conf``);
* QEMU (``default_tls_x509_cert_dir`` in ``qemu.conf``, ``/etc/pki/qemu`` by
  default): ``ca-cert.pem``, ``server-cert.pem``, ``server-key.pem``,
  ``client-cert.pem``, ``client-key.pem``; the keys readable by QEMU's group.

Nothing is written unless the three files belong together: the certificate is
a host certificate signed by the CA and the key is its key. A file that exists
with other content (another CA, say) is replaced only with ``force``. Files
are written atomically; keys are never world-readable.
"""

from __future__ import annotations

import grp
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from usher.errors import ConfigError
from usher.protocol.pki import read_file, spki, write_file
from usher.protocol.tls import cert_role

__all__ = ["QEMU_DIR", "Installed", "install", "libvirt_layout", "qemu_layout"]

QEMU_DIR = Path("/etc/pki/qemu")
QEMU_GROUP = "libvirt-qemu"
"""The group QEMU runs with on Debian; its TLS keys are made readable to it."""


def libvirt_layout(pkipath: Path | None = None) -> dict[Path, str]:
    """Where libvirt reads its TLS files: path -> ``ca``, ``cert`` or ``key``."""
    if pkipath is not None:
        return {pkipath / "cacert.pem": "ca", pkipath / "servercert.pem": "cert",
                pkipath / "serverkey.pem": "key", pkipath / "clientcert.pem": "cert",
                pkipath / "clientkey.pem": "key"}
    lib = Path("/etc/pki/libvirt")
    return {Path("/etc/pki/CA/cacert.pem"): "ca", lib / "servercert.pem": "cert",
            lib / "private" / "serverkey.pem": "key", lib / "clientcert.pem": "cert",
            lib / "private" / "clientkey.pem": "key"}


def qemu_layout(directory: Path = QEMU_DIR) -> dict[Path, str]:
    """Where QEMU reads its TLS files (``default_tls_x509_cert_dir``)."""
    return {directory / "ca-cert.pem": "ca", directory / "server-cert.pem": "cert",
            directory / "server-key.pem": "key", directory / "client-cert.pem": "cert",
            directory / "client-key.pem": "key"}


@dataclass(frozen=True)
class Installed:
    """What :func:`install` did: files written and files already as they should be."""

    written: list[Path]
    unchanged: list[Path]


def install(ca_cert: Path, cert: Path, key: Path, *, pkipath: Path | None = None,
            qemu_dir: Path | None = QEMU_DIR, force: bool = False,
            qemu_group: str | None = QEMU_GROUP) -> Installed:
    """Copy the host certificate ``cert``, its ``key`` and the site CA ``ca_cert``
    into libvirt's layout (:func:`libvirt_layout` of ``pkipath``) and, unless
    ``qemu_dir`` is None, QEMU's (:func:`qemu_layout`).

    Certificates are written 0644, keys 0600 for libvirt and 0640 with group
    ``qemu_group`` (when that group exists) for QEMU.

    Raises:
        ConfigError: a file cannot be read or written; the three do not belong
            together (not a host certificate, not signed by the CA, or the key
            is not the certificate's); or a target exists with other content
            and ``force`` is not set (nothing is written then).
    """
    data = {"ca": read_file(ca_cert), "cert": read_file(cert), "key": read_file(key)}
    _check_together(data["ca"], data["cert"], data["key"], ca_cert, cert, key)
    qemu_gid = _gid(qemu_group) if qemu_dir is not None else None
    plan: list[tuple[Path, bytes, int, int | None]] = []
    for path, kind in libvirt_layout(pkipath).items():
        plan.append((path, data[kind], 0o600 if kind == "key" else 0o644, None))
    if qemu_dir is not None:
        for path, kind in qemu_layout(qemu_dir).items():
            if kind == "key":
                plan.append((path, data[kind], 0o640 if qemu_gid is not None else 0o600,
                             qemu_gid))
            else:
                plan.append((path, data[kind], 0o644, None))
    same = {path for path, content, _, _ in plan
            if path.exists() and read_file(path) == content}
    conflicts = [path for path, _, _, _ in plan if path not in same and path.exists()]
    if conflicts and not force:
        raise ConfigError(f"{conflicts[0]} exists with other content"
                          f"{f' (and {len(conflicts) - 1} more)' if len(conflicts) > 1 else ''}"
                          "; give --force to replace it with the site's")
    written, unchanged = [], []
    for path, content, mode, gid in plan:
        if path in same:
            _set_mode(path, mode, gid)
            unchanged.append(path)
            continue
        _write(path, content, mode, gid)
        written.append(path)
    return Installed(written=written, unchanged=unchanged)


def _check_together(ca_pem: bytes, cert_pem: bytes, key_pem: bytes,
                    ca_path: Path, cert_path: Path, key_path: Path) -> None:
    try:
        ca = x509.load_pem_x509_certificate(ca_pem)
    except ValueError:
        raise ConfigError(f"{ca_path} is not a PEM certificate") from None
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise ConfigError(f"{cert_path} is not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"{key_path} is not an unencrypted PEM private key") from None
    if cert_role(cert_pem) != "host":
        raise ConfigError(f"{cert_path} is not a host certificate of the site (usher-lnm "
                          "gets one when it joins)")
    try:
        cert.verify_directly_issued_by(ca)
    except (InvalidSignature, TypeError, ValueError):
        raise ConfigError(f"{cert_path} is not signed by the CA in {ca_path}") from None
    if spki(key.public_key()) != spki(cert.public_key()):
        raise ConfigError(f"{key_path} is not the key of {cert_path}")


def _gid(group: str | None) -> int | None:
    if group is None:
        return None
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        return None


def _set_mode(path: Path, mode: int, gid: int | None) -> None:
    try:
        if gid is not None:
            os.chown(path, -1, gid)
        path.chmod(mode)
    except OSError as exc:
        raise ConfigError(f"cannot set the mode of {path}: {exc.strerror}") from None


def _write(path: Path, content: bytes, mode: int, gid: int | None) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file(path, content, mode, gid)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from None
