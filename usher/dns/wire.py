"""RFC 2136 UPDATE messages in wire form, signed and checked with TSIG (RFC 8945).

The RFC 2136 backend's hot path: every start with DNS sends one UPDATE per
zone and waits for the answer. dnspython builds the same messages, but
through a Name object per owner, an Rdata object per record and a renderer:
measured, 170 us to build and sign a one-VM UPDATE and 70 us to check the
answer, most of a start's DNS cost in the controller. Here a message is
bytes put together from cached encoded names (about 15 us), and the answer
is checked without parsing more of it than its header and TSIG.

Only what usher sends is encoded by hand: A, AAAA, PTR and plain TXT
records added (class IN) or deleted (class NONE), in uncompressed form,
which every server accepts; other types' data go through dnspython. Answers
are walked, not interpreted: their TSIG is verified (MAC, time, error) and
their rcode returned. Zone transfers and everything else stay dnspython's.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets
import struct
import time
from dataclasses import dataclass
from functools import lru_cache

import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype

from usher.errors import DnsError

__all__ = ["TsigKey", "UpdateMessage", "check_answer", "encode_name"]

CLASS_IN, CLASS_NONE, CLASS_ANY = 1, 254, 255
TYPE_SOA, TYPE_TSIG = 6, 250
OPCODE_UPDATE = 5
MAX_MESSAGE = 65535  # a DNS message over TCP (its length prefix is 16 bits)

# TSIG errors (RFC 8945 5.3.2): what each means, for the error message.
TSIG_ERRORS = {
    16: "the server rejected the signature (BADSIG): check the secret",
    17: "the server does not know the key (BADKEY): check its name and algorithm",
    18: "the clocks differ too much (BADTIME): check both clocks",
    22: "the server rejected the MAC length (BADTRUNC): check the key's algorithm",
}

_HASHES = {
    "hmac-md5.sig-alg.reg.int.": "md5",
    "hmac-sha1.": "sha1",
    "hmac-sha224.": "sha224",
    "hmac-sha256.": "sha256",
    "hmac-sha384.": "sha384",
    "hmac-sha512.": "sha512",
}
_HEADER = struct.Struct("!HHHHHH")
_RR_FIXED = struct.Struct("!HHIH")  # type, class, ttl, rdlength
_PLAIN_LABEL = re.compile(r"[A-Za-z0-9_*-]{1,63}")
_PLAIN_TXT = re.compile(r'"[^"\\]*"(?: "[^"\\]*")*')  # quoted strings without escapes
_TXT_STRING = re.compile(r'"([^"\\]*)"')


@lru_cache(maxsize=65536)
def encode_name(name: str) -> bytes:
    """The uncompressed wire form of absolute name ``name`` (cached: owners repeat).

    Raises:
        DnsError: not a valid absolute name.
    """
    if name == ".":
        return b"\0"
    if not name.endswith("."):
        raise DnsError(f"{name!r} is not an absolute DNS name (no trailing dot)")
    labels = name[:-1].split(".")
    if all(_PLAIN_LABEL.fullmatch(label) for label in labels):
        wire = b"".join(bytes((len(label),)) + label.encode("ascii") for label in labels)
        if len(wire) + 1 <= 255:
            return wire + b"\0"
    try:  # escapes, or something to refuse: dnspython's parser decides
        parsed = dns.name.from_text(name)
    except dns.exception.DNSException as exc:
        raise DnsError(f"{name!r} is not a valid DNS name: {exc}") from None
    encoded = parsed.to_wire()
    assert encoded is not None  # no file given: the bytes are returned
    return encoded


def _canonical_name(name: str) -> bytes:
    return encode_name(name.lower())


def encode_rdata(rdtype: str, value: str) -> tuple[int, bytes]:
    """The type number and wire data of a record's presentation form.

    Raises:
        DnsError: the data do not parse as ``rdtype``.
    """
    try:
        if rdtype == "A":
            return 1, ipaddress.IPv4Address(value).packed
        if rdtype == "AAAA":
            return 28, ipaddress.IPv6Address(value).packed
        if rdtype == "PTR" and value.endswith("."):
            return 12, encode_name(value)
        if rdtype == "TXT" and _PLAIN_TXT.fullmatch(value):
            return 16, b"".join(_char_string(text) for text in _TXT_STRING.findall(value))
        rdata = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.from_text(rdtype), value)
        return int(rdata.rdtype), rdata.to_digestable()
    except (ValueError, dns.exception.DNSException) as exc:
        raise DnsError(f"{value!r} is not valid {rdtype} data: {exc}") from None


def _char_string(text: str) -> bytes:
    data = text.encode("utf-8")
    if len(data) > 255:
        raise ValueError("a TXT string is longer than 255 bytes")
    return bytes((len(data),)) + data


@dataclass(frozen=True)
class TsigKey:
    """A TSIG key: its name, algorithm (both absolute names) and secret bytes.

    Raises:
        DnsError: an algorithm usher cannot sign with.
    """

    name: str
    algorithm: str
    secret: bytes

    def __post_init__(self) -> None:
        if self.algorithm.lower() not in _HASHES:
            raise DnsError(f"TSIG algorithm {self.algorithm} is not one of "
                           f"{', '.join(sorted({a.rstrip('.') for a in _HASHES}))}")

    @property
    def _digest(self) -> str:
        return _HASHES[self.algorithm.lower()]

    @property
    def mac_size(self) -> int:
        return hashlib.new(self._digest).digest_size

    def mac(self, data: bytes) -> bytes:
        return hmac.new(self.secret, data, self._digest).digest()

    def variables(self, signed: int, fudge: int, error: int, other: bytes) -> bytes:
        """The TSIG variables a MAC covers after the message (RFC 8945 4.3.3)."""
        return (_canonical_name(self.name) + struct.pack("!HI", CLASS_ANY, 0)
                + _canonical_name(self.algorithm) + signed.to_bytes(6, "big")
                + struct.pack("!HHH", fudge, error, len(other)) + other)


class UpdateMessage:
    """One UPDATE of ``zone``: records added and deleted, signed with ``key``.

    Records go in as they are added; :meth:`fits` says whether one more of a
    given size still fits a message. :meth:`to_wire` signs and returns the
    message, after which ``id`` and ``mac`` identify it for :func:`check_answer`.
    """

    def __init__(self, zone: str, key: TsigKey, *, fudge: int = 300) -> None:
        self.zone = zone
        self.key = key
        self.fudge = fudge
        self.id = secrets.randbits(16)
        self.mac = b""
        self._updates: list[bytes] = []
        self._size = _HEADER.size + len(encode_name(zone)) + 4 + self._tsig_size()

    def _tsig_size(self) -> int:
        return (len(encode_name(self.key.name)) + _RR_FIXED.size + len(
            encode_name(self.key.algorithm)) + 6 + 2 + 2 + self.key.mac_size + 6)

    def __len__(self) -> int:
        return len(self._updates)

    @staticmethod
    def record(name: str, rdtype: str, value: str, ttl: int, *, delete: bool = False) -> bytes:
        """One update-section record: added (class IN, ``ttl``) or deleted (class NONE)."""
        number, data = encode_rdata(rdtype, value)
        rrclass, ttl = (CLASS_NONE, 0) if delete else (CLASS_IN, ttl)
        return encode_name(name) + _RR_FIXED.pack(number, rrclass, ttl, len(data)) + data

    def fits(self, record: bytes) -> bool:
        return self._size + len(record) <= MAX_MESSAGE

    def add(self, record: bytes) -> None:
        """Append a record made by :meth:`record` (check :meth:`fits` first)."""
        self._updates.append(record)
        self._size += len(record)

    def to_wire(self, now: float | None = None) -> bytes:
        """The signed message (RFC 8945 4.3: the MAC covers it and the TSIG variables)."""
        signed = int(time.time() if now is None else now)
        body = (_HEADER.pack(self.id, OPCODE_UPDATE << 11, 1, 0, len(self._updates), 0)
                + encode_name(self.zone) + struct.pack("!HH", TYPE_SOA, CLASS_IN)
                + b"".join(self._updates))
        self.mac = self.key.mac(body + self.key.variables(signed, self.fudge, 0, b""))
        rdata = (encode_name(self.key.algorithm) + signed.to_bytes(6, "big")
                 + struct.pack("!HH", self.fudge, len(self.mac)) + self.mac
                 + struct.pack("!HHH", self.id, 0, 0))
        tsig = (encode_name(self.key.name)
                + _RR_FIXED.pack(TYPE_TSIG, CLASS_ANY, 0, len(rdata)) + rdata)
        header = _HEADER.pack(self.id, OPCODE_UPDATE << 11, 1, 0, len(self._updates), 1)
        return header + body[_HEADER.size:] + tsig


def check_answer(wire: bytes, request: UpdateMessage, now: float | None = None) -> int:
    """The rcode of the answer ``wire`` to ``request``, once its TSIG checks out.

    Raises:
        DnsError: a malformed answer, one that answers another message, is
            not signed, fails its MAC or time check, or carries a TSIG error
            (the message says which and what to check).
    """
    try:
        ident, flags, qd, an, ns, ar = _HEADER.unpack_from(wire, 0)
        if ident != request.id or not flags & 0x8000 or (flags >> 11) & 0xF != OPCODE_UPDATE:
            raise DnsError("the answer is not one to this UPDATE")
        rcode = flags & 0xF
        if ar == 0:
            raise DnsError(f"the answer (rcode {rcode}) is not signed: check that the server "
                           f"knows the TSIG key {request.key.name.rstrip('.')!r}")
        at = _HEADER.size
        for _ in range(qd):
            at = _skip_name(wire, at) + 4
        for _ in range(an + ns + ar - 1):
            at = _skip_name(wire, at)
            (rdlength,) = struct.unpack_from("!H", wire, at + 8)
            at += _RR_FIXED.size + rdlength
        tsig_start = at
        at = _skip_name(wire, at)
        rrtype, _rrclass, _ttl, rdlength = _RR_FIXED.unpack_from(wire, at)
        at += _RR_FIXED.size
        end = at + rdlength
        if rrtype != TYPE_TSIG or end != len(wire):
            raise DnsError("the answer's last record is not its TSIG")
        at = _skip_name(wire, at)
        signed = int.from_bytes(wire[at:at + 6], "big")
        fudge, mac_size = struct.unpack_from("!HH", wire, at + 6)
        at += 10
        mac = wire[at:at + mac_size]
        at += mac_size
        original_id, error, other_len = struct.unpack_from("!HHH", wire, at)
        other = wire[at + 6:at + 6 + other_len]
    except (struct.error, IndexError) as exc:
        raise DnsError(f"the answer to an UPDATE is malformed: {exc}") from None
    if error:
        raise DnsError(TSIG_ERRORS.get(error, f"the server answered with TSIG error {error}"),
                       details={"tsig_error": error})
    unsigned = (_HEADER.pack(original_id, flags, qd, an, ns, ar - 1)
                + wire[_HEADER.size:tsig_start])
    expected = request.key.mac(struct.pack("!H", len(request.mac)) + request.mac + unsigned
                               + request.key.variables(signed, fudge, error, other))
    if not hmac.compare_digest(expected, mac):
        raise DnsError("the answer's TSIG signature does not verify: check the key's secret")
    clock = time.time() if now is None else now
    if abs(clock - signed) > fudge:
        raise DnsError(f"the answer was signed {clock - signed:+.0f} s off this clock "
                       f"(fudge {fudge} s): check both clocks")
    return rcode


def _skip_name(wire: bytes, at: int) -> int:
    """The offset after the (possibly compressed) name at ``at``."""
    for _ in range(128):
        length = wire[at]
        if length == 0:
            return at + 1
        if length & 0xC0 == 0xC0:
            return at + 2
        at += 1 + length
    raise DnsError("a name in the answer is too long")
