"""The one error hierarchy of usher.

Every error usher raises on purpose is an :class:`UsherError`. Each class has a
stable ``code`` (what programs branch on and what crosses the wire), a message
for people, optional ``details`` for programs, and the ``exit_code`` a command
line tool exits with when the error ends it. Errors from libvirt, SQLAlchemy
and the network are translated into these at the boundary where they occur.

::

    UsherError (internal, exit 1)
    ├── InvalidRequest (invalid_request, 2)
    │   ├── InvalidName (invalid_name)
    │   └── InvalidOption (invalid_option)
    ├── NotFound (not_found, 3)
    │   ├── VmNotFound (vm_not_found)
    │   ├── HostNotFound (host_not_found)
    │   ├── TaskNotFound (task_not_found)
    │   ├── UserNotFound (user_not_found)
    │   ├── ClusterNotFound (cluster_not_found)
    │   ├── GroupNotFound (group_not_found)
    │   └── ImageNotFound (image_not_found)
    ├── Conflict (conflict, 4)
    │   ├── InvalidState (invalid_state)
    │   └── AlreadyExists (already_exists)
    ├── PermissionDenied (permission_denied, 5)
    │   ├── AuthenticationFailed (auth_failed)
    │   └── RateLimited (rate_limited)
    ├── Unavailable (unavailable, 6)
    │   ├── NoCapacity (no_capacity)
    │   ├── HostUnavailable (host_unavailable)
    │   ├── NotConnected (not_connected)
    │   └── TimedOut (timeout)
    ├── HypervisorError (hypervisor, 7)
    │   ├── DomainNotFound (domain_not_found)
    │   ├── DomainExists (domain_exists)
    │   ├── ImageError (image)
    │   └── MigrationUnsupported (migration_unsupported)
    ├── DirectoryError (directory, 8)
    ├── DnsError (dns, 11)
    │   └── DnsUnavailable (dns_unavailable)
    ├── ProtocolError (protocol, 9)
    │   ├── FrameTooLarge (frame_too_large)
    │   ├── BadFrame (bad_frame)
    │   ├── VersionMismatch (version_mismatch)
    │   └── ConnectionClosed (connection_closed)
    └── ConfigError (config, 10)
        └── SchemaOutdated (schema_outdated)

A code received from a peer that this version does not know is rebuilt as the
nearest known family (by the ``family`` field sent with it), never as a new
class made up at run time.
"""

from __future__ import annotations

from typing import Any, ClassVar

_REGISTRY: dict[str, type[UsherError]] = {}


class UsherError(Exception):
    """Root of every usher error.

    Subclasses set ``code`` (unique, stable, lower_snake) and may set
    ``exit_code``; subclasses inherit the exit code of their family.
    """

    code: ClassVar[str] = "internal"
    exit_code: ClassVar[int] = 1

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = details or {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        code = cls.__dict__.get("code")
        if code is None:
            raise TypeError(f"{cls.__name__} must define its own code")
        if code in _REGISTRY:
            raise TypeError(f"error code {code!r} is used twice")
        _REGISTRY[code] = cls

    @property
    def family(self) -> str:
        """The code of the top-level family this error belongs to."""
        for klass in type(self).__mro__:
            if klass.__bases__ == (UsherError,):
                return klass.code  # type: ignore[attr-defined]
        return UsherError.code

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"

    def to_wire(self) -> dict[str, Any]:
        """The error as data: what crosses the wire inside an error reply."""
        return {
            "code": self.code,
            "family": self.family,
            "message": self.message,
            "details": self.details,
        }

    @staticmethod
    def from_wire(code: str, message: str, family: str | None = None,
                  details: dict[str, Any] | None = None) -> UsherError:
        """Rebuild an error received from a peer as a known usher class."""
        cls = _REGISTRY.get(code) or (_REGISTRY.get(family) if family else None) or UsherError
        err = cls.__new__(cls)
        UsherError.__init__(err, message, details=details)
        return err


_REGISTRY[UsherError.code] = UsherError


def error_class(code: str) -> type[UsherError] | None:
    """The class registered for ``code``, or None."""
    return _REGISTRY.get(code)


def all_codes() -> dict[str, type[UsherError]]:
    """Every registered code and its class (for docs and tests)."""
    return dict(_REGISTRY)


class InvalidRequest(UsherError):
    """The request is malformed or its arguments are not acceptable."""

    code = "invalid_request"
    exit_code = 2


class InvalidName(InvalidRequest):
    """A VM, host or user name is not valid here."""

    code = "invalid_name"


class InvalidOption(InvalidRequest):
    """An option's value is out of range or not allowed."""

    code = "invalid_option"


class NotFound(UsherError):
    """The named thing does not exist (or the caller may not see it)."""

    code = "not_found"
    exit_code = 3


class VmNotFound(NotFound):
    """No VM of that name (that the caller may see)."""

    code = "vm_not_found"


class HostNotFound(NotFound):
    """No host (VMM) of that name."""

    code = "host_not_found"


class TaskNotFound(NotFound):
    """No task with that id (that the caller may see)."""

    code = "task_not_found"


class UserNotFound(NotFound):
    """No user of that name."""

    code = "user_not_found"


class ClusterNotFound(NotFound):
    """No cluster of that name in the directory (it has no branch yet)."""

    code = "cluster_not_found"


class GroupNotFound(NotFound):
    """No group of that name in the cluster."""

    code = "group_not_found"


class ImageNotFound(NotFound):
    """No registered image of that name."""

    code = "image_not_found"


class Conflict(UsherError):
    """The request clashes with the current state."""

    code = "conflict"
    exit_code = 4


class InvalidState(Conflict):
    """The verb is not valid in the VM's or host's current state."""

    code = "invalid_state"


class AlreadyExists(Conflict):
    """Something of that name exists already."""

    code = "already_exists"


class PermissionDenied(UsherError):
    """The caller is not allowed to do this."""

    code = "permission_denied"
    exit_code = 5


class AuthenticationFailed(PermissionDenied):
    """Wrong user name or password, or an unacceptable credential."""

    code = "auth_failed"


class RateLimited(PermissionDenied):
    """Too many failed logins; retry after the window."""

    code = "rate_limited"


class Unavailable(UsherError):
    """A needed resource or peer is not available now; retrying later may work."""

    code = "unavailable"
    exit_code = 6


class NoCapacity(Unavailable):
    """No host can take the VM; details name the resource that is short."""

    code = "no_capacity"


class HostUnavailable(Unavailable):
    """The host is not connected, disabled or lost."""

    code = "host_unavailable"


class NotConnected(Unavailable):
    """The client has no connection to the controller."""

    code = "not_connected"


class TimedOut(Unavailable):
    """An operation did not finish within its time limit."""

    code = "timeout"


class HypervisorError(UsherError):
    """The hypervisor refused or failed an operation."""

    code = "hypervisor"
    exit_code = 7


class DomainNotFound(HypervisorError):
    """The hypervisor has no domain with that UUID."""

    code = "domain_not_found"


class DomainExists(HypervisorError):
    """The hypervisor has another domain of that name."""

    code = "domain_exists"


class ImageError(HypervisorError):
    """An image could not be fetched, failed its checksum, or is not what it claims."""

    code = "image"


class MigrationUnsupported(HypervisorError):
    """The hypervisor cannot migrate domains live (e.g. a fake or test host)."""

    code = "migration_unsupported"


class DirectoryError(UsherError):
    """The directory (LDAP) refused or failed an operation."""

    code = "directory"
    exit_code = 8


class DnsError(UsherError):
    """The DNS server refused an update or answered something usher cannot use."""

    code = "dns"
    exit_code = 11


class DnsUnavailable(DnsError):
    """The DNS server did not answer in time or could not be reached."""

    code = "dns_unavailable"


class ProtocolError(UsherError):
    """The peer broke the wire protocol."""

    code = "protocol"
    exit_code = 9


class FrameTooLarge(ProtocolError):
    """A frame is larger than the limit in force."""

    code = "frame_too_large"


class BadFrame(ProtocolError):
    """A frame is not valid MessagePack or does not match its schema."""

    code = "bad_frame"


class VersionMismatch(ProtocolError):
    """The peers share no protocol version."""

    code = "version_mismatch"


class ConnectionClosed(ProtocolError):
    """The connection ended; ``details['by_peer']`` tells who closed it."""

    code = "connection_closed"


class ConfigError(UsherError):
    """A configuration file or setting is missing or invalid."""

    code = "config"
    exit_code = 10


class SchemaOutdated(ConfigError):
    """The database schema is older than this build; run db upgrade."""

    code = "schema_outdated"
