"""The one interface usher publishes DNS records through.

The controller talks to DNS only through a :class:`DnsBackend`: either
:class:`~usher.dns.rfc2136.Rfc2136Backend`, which sends TSIG-signed RFC 2136
updates to a site's own authoritative server (BIND, Knot, PowerDNS ...), or
:class:`~usher.dns.embedded.EmbeddedBackend`, which changes the zones of the
DNS server usher runs in its own process. Both keep the same contract, written
down here, so the controller needs no branch on which one it has. The pure
planning lives in :mod:`usher.dns.records`; this module adds the I/O-shaped
contract and :meth:`DnsBackend.converge`, the same for every backend.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from dataclasses import dataclass
from types import TracebackType

from usher.dns.records import MANAGED_TYPES, ChangeSet, Record, Zones, plan

__all__ = ["READ_TYPES", "ConvergeReport", "DnsBackend", "is_bookkeeping"]

log = logging.getLogger(__name__)

READ_TYPES = MANAGED_TYPES | {"TXT"}
"""The types :meth:`DnsBackend.read` returns."""

# Types that are zone bookkeeping rather than somebody's data: present at every
# name of a signed zone, they must not make a name look taken.
_BOOKKEEPING_TYPES = frozenset({"RRSIG", "NSEC", "NSEC3", "NSEC3PARAM", "DNSKEY", "CDS",
                                "CDNSKEY", "TYPE65534"})


def is_bookkeeping(record: Record, zone: str) -> bool:
    """Whether ``record`` is zone infrastructure: the apex SOA and NS, DNSSEC data.

    Backends leave these out of :meth:`DnsBackend.read_all`.
    """
    if record.rdtype in _BOOKKEEPING_TYPES:
        return True
    return record.name == zone and record.rdtype in ("SOA", "NS")


@dataclass(frozen=True)
class ConvergeReport:
    """What one :meth:`DnsBackend.converge` did.

    ``conflicts`` are the names usher wants records at that hold records it
    does not own; nothing was changed there.
    """

    added: int
    removed: int
    conflicts: tuple[str, ...]

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed)


class DnsBackend(abc.ABC):
    """A DNS server usher publishes records in, for the zones of :attr:`zones`.

    Every method is a coroutine that never blocks the event loop and has a
    time limit. Errors:

    * :class:`~usher.errors.DnsUnavailable`: the server did not answer in time
      or could not be reached; retrying later may work.
    * :class:`~usher.errors.DnsError`: the server refused (wrong key, update
      or transfer not allowed, name outside the zone) or answered something
      unusable, or a record is outside every zone of :attr:`zones`; the
      message names the zone, the response code and what to check.

    Cancellation: a cancelled :meth:`apply` may have made the changes of some
    zones and not others; since applying is idempotent, applying again (or a
    :meth:`converge`) finishes the job.

    Use one backend from one task at a time, or serialise callers: a
    :meth:`converge` racing an :meth:`apply` may undo it.
    """

    zones: Zones

    @abc.abstractmethod
    async def apply(self, changes: ChangeSet) -> None:
        """Make every change in ``changes`` (its ``conflicts`` are ignored).

        Deletes go before adds. Changes are grouped into as few messages as
        possible: one per zone, split only when very large. Idempotent: adding
        a record that is there, or deleting one that is not, succeeds. The
        changes of one message are atomic on the server; those of different
        zones are not atomic together.

        Raises:
            DnsError: a record is outside every zone (nothing is sent), or the
                server refused; changes of other zones may have been made.
            DnsUnavailable: the server did not answer within the time limit.
        """

    @abc.abstractmethod
    async def read_all(self, zone: str) -> set[Record]:
        """Every record the server holds in ``zone``, of every type.

        The zone's bookkeeping is left out (the apex SOA and NS, DNSSEC
        records: see :func:`is_bookkeeping`), so that a name appears here only
        if someone put data there.

        Raises:
            DnsError: ``zone`` is not one of :attr:`zones`, or the server
                refused to show it.
            DnsUnavailable: the server did not answer within the time limit.
        """

    async def read(self, zone: str) -> set[Record]:
        """The A, AAAA, PTR and TXT records the server holds in ``zone``.

        Raises: as :meth:`read_all`.
        """
        return {r for r in await self.read_all(zone) if r.rdtype in READ_TYPES}

    async def converge(self, desired: set[Record], site_id: str) -> ConvergeReport:
        """Make the server hold ``desired`` at every name usher owns, and nothing else.

        Reads every zone of :attr:`zones`, :func:`~usher.dns.records.plan`\\ s
        against what is there (records at names without this site's marker
        are never touched) and applies the result. ``desired`` is the whole
        truth for ``site_id``: usher-owned names absent from it are emptied.

        Raises:
            DnsError: a desired record is outside every zone (checked before
                anything is read or changed), or the server refused.
            DnsUnavailable: the server did not answer within the time limit.
        """
        ChangeSet(adds=set(desired)).group_by_zone(self.zones)
        zones = self.zones.origins
        snapshots = await asyncio.gather(*(self.read_all(zone) for zone in zones),
                                         return_exceptions=True)
        actual: set[Record] = set()
        for zone, snapshot in zip(zones, snapshots, strict=True):
            if isinstance(snapshot, BaseException):
                raise snapshot
            # A name belongs to the innermost zone: drop the parent's view of
            # a child zone's names (glue, delegations) so each name has one owner.
            actual.update(r for r in snapshot if self.zones.zone_of(r.name) == zone)
        changes = plan(desired, actual, site_id)
        if changes:
            await self.apply(changes)
        if changes.conflicts:
            log.warning("DNS names held by others, left alone: %s",
                        ", ".join(sorted(changes.conflicts)))
        # Converging is periodic: only a run that changed something is news.
        log.log(logging.INFO if changes else logging.DEBUG,
                "DNS converged for site %s: %d added, %d removed, %d conflicts", site_id,
                len(changes.adds), len(changes.deletes), len(changes.conflicts))
        return ConvergeReport(added=len(changes.adds), removed=len(changes.deletes),
                              conflicts=tuple(sorted(changes.conflicts)))

    @abc.abstractmethod
    async def close(self) -> None:
        """Release what the backend holds. Safe to call twice; the backend is unusable after."""

    async def __aenter__(self) -> DnsBackend:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()
