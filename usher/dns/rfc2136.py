"""Publishing records in a site's own DNS server by TSIG-signed RFC 2136 UPDATE.

:class:`Rfc2136Backend` is the :class:`~usher.dns.backend.DnsBackend` for a site
that runs its own authoritative server (BIND 9, Knot, PowerDNS ...). Changes go
as dynamic updates (RFC 2136) over TCP, one message per zone (split beyond
:attr:`~Rfc2136Backend.max_records_per_message` records), each signed with a
TSIG key (RFC 8945); the server's state is read back by a zone transfer (AXFR)
signed with the same key. The server must therefore grant the key both
``allow-update`` and ``allow-transfer`` on every zone usher manages.

An UPDATE message is atomic: if the server refuses one record of it, none of
its records is made. BIND 9.18.28 and later refuse an rrset larger than
``max-records-per-type`` (100 by default), so a round-robin name with more
than 100 members fails the whole message for its zone (SERVFAIL) unless the
site raises that limit.

The I/O is asyncio's (UPDATEs on streams, transfers through dnspython's
asyncio functions), so no call blocks the event loop; each has a time limit.
UPDATEs keep one TCP connection per zone open between calls (RFC 7766):
setting one up costs a server like BIND about as much as the update itself.
A connection the server has closed meanwhile (BIND drops idle ones after
30 s) is replaced and the UPDATE sent once more, which is safe because
usher's updates add and delete exact records. This module is where
dnspython's exceptions become :class:`~usher.errors.DnsError` and
:class:`~usher.errors.DnsUnavailable`.
:func:`parse_key_file` reads the key file ``tsig-keygen`` writes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import logging
import re
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import dns.asyncquery
import dns.exception
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.tsig
import dns.xfr
import dns.zone

from usher.dns.backend import DnsBackend, is_bookkeeping
from usher.dns.records import (
    Change,
    ChangeSet,
    Record,
    Zones,
    canonical_name,
)
from usher.dns.wire import TsigKey, UpdateMessage, check_answer
from usher.errors import ConfigError, DnsError, DnsUnavailable

__all__ = ["Rfc2136Backend", "parse_key_file"]

log = logging.getLogger(__name__)

_LENGTH = struct.Struct("!H")

# A quoted string or a comment: strings are kept whole, for a base64 secret
# may hold "//" (about one key in a hundred), which is no comment there.
_STRING_OR_COMMENT = re.compile(r'("(?:[^"\\]|\\.)*")|/\*.*?\*/|//[^\n]*|#[^\n]*', re.DOTALL)
_KEY = re.compile(r'key\s+"?([^"\s{]+)"?\s*\{(.*?)\}\s*;', re.DOTALL)
_ALGORITHM = re.compile(r"algorithm\s+\"?([A-Za-z0-9.-]+)\"?\s*;")
_SECRET = re.compile(r'secret\s+"([^"]+)"\s*;')


def parse_key_file(path: Path | str) -> tuple[str, str, str]:
    """The ``(name, algorithm, secret)`` of the TSIG key in a BIND key file.

    The file is what ``tsig-keygen`` writes (and ``include`` in named.conf
    reads): ``key "NAME" { algorithm ALG; secret "BASE64"; };``. Comments are
    allowed; a file with several keys gives the first.

    Raises:
        ConfigError: the file cannot be read or holds no complete key.
    """
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read the TSIG key file {path}: {exc.strerror}") from None
    match = _KEY.search(_STRING_OR_COMMENT.sub(lambda m: m.group(1) or "", text))
    if match is None:
        raise ConfigError(f"{path} holds no 'key \"NAME\" {{ ... }};' clause")
    name, body = match.groups()
    algorithm, secret = _ALGORITHM.search(body), _SECRET.search(body)
    if algorithm is None or secret is None:
        raise ConfigError(f"the key {name!r} in {path} lacks its algorithm or secret")
    return name, algorithm.group(1).lower(), secret.group(1)


_RCODE_HINTS = {
    dns.rcode.REFUSED: "check that the zone grants the key in allow-update (and"
                       " allow-transfer) and that the server knows the key",
    dns.rcode.NOTAUTH: "the server is not authoritative for the zone or rejected the TSIG"
                       " key: check the zone list and the key's name, algorithm and secret",
    dns.rcode.NOTZONE: "a record lies outside the zone: check the zone list",
    dns.rcode.SERVFAIL: "the server failed: see its log (BIND 9.18.28 and later refuse an"
                        " rrset of more records than max-records-per-type, 100 by default,"
                        " such as a round-robin name with more members)",
    dns.rcode.NOTIMP: "the server does not do dynamic updates for this zone",
}
_TSIG_HINTS: dict[type[Exception], str] = {
    dns.tsig.PeerBadKey: "the server does not know the key (BADKEY): check its name and"
                         " algorithm",
    dns.tsig.PeerBadSignature: "the server rejected the signature (BADSIG): check the secret",
    dns.tsig.PeerBadTime: "the clocks differ too much (BADTIME): check both clocks",
}


@dataclass
class _Link:
    """One zone's TCP connection to the server, used by one exchange at a time."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None

    @property
    def usable(self) -> bool:
        """Connected, and not (yet) seen closed by either side."""
        return (self.writer is not None and self.reader is not None
                and not self.writer.is_closing() and not self.reader.at_eof())

    def drop(self) -> None:
        writer, self.reader, self.writer = self.writer, None, None
        if writer is not None:
            writer.close()  # it is broken already, or going: nothing to wait for


class Rfc2136Backend(DnsBackend):
    """A site DNS server updated by TSIG-signed RFC 2136 UPDATE over TCP.

    ``server`` is an IP address (no name lookup: DNS may be what is broken).
    ``key_secret`` is base64, as in the key file. Records are added with TTL
    ``ttl``. ``timeout_s`` bounds each UPDATE exchange, connection included;
    ``xfr_lifetime_s`` bounds a whole zone transfer (each of its messages
    also gets ``timeout_s``).

    Raises:
        ConfigError: ``server`` is not an IP address or the key is unusable.
    """

    def __init__(self, server: str, port: int, zones: Zones, key_name: str, key_secret: str,
                 key_algorithm: str = "hmac-sha256", timeout_s: float = 5.0, *,
                 ttl: int = 60, max_records_per_message: int = 1000,
                 xfr_lifetime_s: float = 30.0) -> None:
        try:
            ipaddress.ip_address(server)
        except ValueError:
            raise ConfigError(f"DNS server {server!r} must be an IP address") from None
        try:
            base64.b64decode(key_secret, validate=True)
            self._key = dns.tsig.Key(key_name, key_secret, key_algorithm)
        except (binascii.Error, ValueError, dns.exception.DNSException) as exc:
            raise ConfigError(f"TSIG key {key_name!r} is not usable: {exc}") from None
        if self._key.algorithm not in dns.tsig.mac_sizes:
            raise ConfigError(f"TSIG algorithm {key_algorithm!r} is not supported")
        try:
            self._wire_key = TsigKey(self._key.name.to_text(), self._key.algorithm.to_text(),
                                     base64.b64decode(key_secret))
        except DnsError as exc:
            raise ConfigError(f"TSIG key {key_name!r} is not usable: {exc.message}") from None
        if not 1 <= max_records_per_message <= 10000:
            raise ConfigError("max_records_per_message must be between 1 and 10000")
        self.server = server
        self.port = port
        self.zones = zones
        self.key_name = key_name
        self.timeout_s = timeout_s
        self.ttl = ttl
        self.max_records_per_message = max_records_per_message
        self.xfr_lifetime_s = xfr_lifetime_s
        self.updates_sent = 0
        """UPDATE messages the server accepted (for tests and metrics)."""
        self.connections_made = 0
        """TCP connections opened for UPDATEs (for tests and metrics)."""
        self._links: dict[str, _Link] = {}
        self._closed = False

    def __repr__(self) -> str:
        return f"Rfc2136Backend({self.server}:{self.port}, key {self.key_name!r})"

    @property
    def _where(self) -> str:
        return f"DNS server {self.server} port {self.port}"

    # ------------------------------------------------------------ apply
    async def apply(self, changes: ChangeSet) -> None:
        """See :meth:`DnsBackend.apply`. Zones are updated at the same time (a
        VM's forward and reverse records cost one round trip, not two); the
        messages of one zone go one after the other. The first failure is
        raised once every zone's attempt has ended."""
        self._check_open()
        groups = sorted(changes.group_by_zone(self.zones).items())

        async def update_zone(zone: str, steps: list[Change]) -> None:
            for message in self._update_messages(zone, steps):
                await self._send_update(zone, message)

        results = await asyncio.gather(*(update_zone(zone, group.changes())
                                         for zone, group in groups), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    def _update_messages(self, zone: str, steps: list[Change]) -> list[UpdateMessage]:
        """``steps`` as UPDATEs of ``zone``, in order: a new message when one is
        full (``max_records_per_message`` records, or 64 KiB)."""
        messages = [UpdateMessage(zone, self._wire_key)]
        for step in steps:
            record = step.record
            wire = UpdateMessage.record(record.name, record.rdtype, record.value, self.ttl,
                                        delete=step.action == "delete")
            if len(messages[-1]) >= self.max_records_per_message or \
                    not messages[-1].fits(wire):
                messages.append(UpdateMessage(zone, self._wire_key))
            messages[-1].add(wire)
        return messages

    async def _send_update(self, zone: str, message: UpdateMessage) -> None:
        started = time.monotonic()
        rcode = dns.rcode.Rcode.make(await self._update_exchange(zone, message))
        if rcode != dns.rcode.NOERROR:
            text = dns.rcode.to_text(rcode)
            raise DnsError(
                f"{self._where} refused an UPDATE of zone {zone} with"
                f" {text}: {_RCODE_HINTS.get(rcode, 'see its log')}",
                details={"zone": zone, "rcode": text})
        self.updates_sent += 1
        log.debug("UPDATE of %s: %d records in %.3f s", zone, len(message),
                  time.monotonic() - started)

    async def _update_exchange(self, zone: str, message: UpdateMessage) -> int:
        """Send ``message`` on ``zone``'s connection (made if there is none) and
        return the answer's rcode; a reused connection that turns out closed
        is replaced once. Any other failure drops the connection.

        The exchange is a length-prefixed message each way (RFC 1035 4.2.2)
        on asyncio streams, under one time limit: dnspython's own TCP query
        spends a task per read and write, which a controller sending two
        UPDATEs per start paid for in CPU beside the start's journal write.
        """
        what = f"an UPDATE of zone {zone}"
        link = self._links.setdefault(zone, _Link())
        async with link.lock:
            for attempt in (1, 2):
                reused = link.writer is not None
                try:
                    async with asyncio.timeout(self.timeout_s):
                        if not link.usable:
                            link.drop()
                            reused = False
                            link.reader, link.writer = await self._connect()
                        return await self._exchange(link, message)
                except (EOFError, ConnectionError) as exc:
                    link.drop()
                    if reused and attempt == 1:
                        log.debug("%s closed the connection for %s; reconnecting",
                                  self._where, zone)
                        continue
                    raise self._translate(exc, what) from exc
                except Exception as exc:
                    link.drop()  # its state is unknown: an answer may still come
                    raise self._translate(exc, what) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    async def _exchange(link: _Link, message: UpdateMessage) -> int:
        assert link.reader is not None and link.writer is not None
        wire = message.to_wire()
        link.writer.write(_LENGTH.pack(len(wire)) + wire)
        await link.writer.drain()
        (length,) = _LENGTH.unpack(await link.reader.readexactly(_LENGTH.size))
        return check_answer(await link.reader.readexactly(length), message)

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(self.server, self.port)
        self.connections_made += 1
        return reader, writer

    def _translate(self, exc: Exception, what: str) -> DnsError:
        """The usher error for a failure of ``what`` (the one place dnspython's end)."""
        if isinstance(exc, dns.exception.Timeout | TimeoutError):
            return DnsUnavailable(f"{self._where} did not answer {what} within"
                                  f" {self.timeout_s:g} s")
        if isinstance(exc, OSError | EOFError):
            reason = getattr(exc, "strerror", None) or str(exc) or "connection closed"
            return DnsUnavailable(f"cannot reach {self._where} for {what}: {reason}")
        if isinstance(exc, DnsError):  # from usher.dns.wire: the answer to an UPDATE
            if "tsig_error" in exc.details:
                return DnsError(f"{self._where} refused the TSIG key {self.key_name!r} for"
                                f" {what}: {exc.message}", details=exc.details)
            return DnsError(f"{self._where} gave an unusable answer to {what}: {exc.message}")
        for kind, hint in _TSIG_HINTS.items():
            if isinstance(exc, kind):
                return DnsError(f"{self._where} refused the TSIG key {self.key_name!r} for"
                                f" {what}: {hint}")
        if isinstance(exc, dns.xfr.TransferError):
            rcode = exc.rcode
            return DnsError(f"{self._where} refused {what} with {dns.rcode.to_text(rcode)}:"
                            f" check that the zone has allow-transfer {{ key"
                            f" {self.key_name}; }}", details={"rcode": dns.rcode.to_text(rcode)})
        if isinstance(exc, dns.exception.DNSException):
            # An unsigned answer to a signed request lands here: a server that
            # does not know the key may answer without a TSIG at all.
            return DnsError(f"{self._where} gave an unusable answer to {what}: {exc}; check"
                            f" that it knows the TSIG key {self.key_name!r}")
        return DnsError(f"{what} to {self._where} failed: {exc!r}")

    # ------------------------------------------------------------ read
    async def read_all(self, zone: str) -> set[Record]:
        """See :meth:`DnsBackend.read_all`: one TSIG-signed AXFR of ``zone``."""
        self._check_open()
        zone = canonical_name(zone)
        if zone not in self.zones:
            raise DnsError(f"zone {zone} is not one usher manages ({', '.join(self.zones)})")
        store = dns.zone.Zone(zone, relativize=False)
        query, _ = dns.xfr.make_query(store, serial=None, keyring=self._key)
        what = f"a zone transfer (AXFR) of {zone}"
        try:
            await dns.asyncquery.inbound_xfr(self.server, store, query, port=self.port,
                                             timeout=self.timeout_s,
                                             lifetime=self.xfr_lifetime_s)
        except Exception as exc:
            raise self._translate(exc, what) from exc
        records = set()
        for name, _ttl, rdata in store.iterate_rdatas():
            record = Record.from_rdata(name, rdata)
            if not is_bookkeeping(record, zone):
                records.add(record)
        return records

    # ------------------------------------------------------------ lifetime
    def _check_open(self) -> None:
        if self._closed:
            raise DnsError(f"{self!r} is closed")

    async def close(self) -> None:
        """See :meth:`DnsBackend.close`: closes the UPDATE connections."""
        self._closed = True
        links, self._links = list(self._links.values()), {}
        for link in links:
            link.drop()
