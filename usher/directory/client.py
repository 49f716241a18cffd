"""Operations on the site directory: users, groups, links and cluster branches.

:class:`Directory` is what the ``usher_*`` tools and the controller's directory
provider use to talk to slapd. It works with the caller's own credentials: slapd's
access rules (``ldif/acl.ldif``) are the real guard, and this class checks the
same things first only to give good errors. Its methods validate every argument
(:mod:`usher.names` for names), build DNs and filters only through
:mod:`usher.directory.layout` (which escapes everything), and turn every ldap3
error into an usher error in one place, :func:`translate_error`.

Changes that touch several entries (adding a user and their private group,
linking, deleting, creating a cluster branch) run their steps in an order chosen
so that the first step is the one most likely to fail, and record an undo action
for every step done; if a later step fails, the undo actions run in reverse and
the original error is raised. If the server becomes unreachable midway the undo
cannot run either; :meth:`Directory.ensure_cluster` is idempotent for that reason
and a half-deleted user leaves only links that any bound account may remove.

The class is synchronous (ldap3's SYNC strategy) and holds one connection, which
is not thread-safe: use one :class:`Directory` per thread, and from asyncio code
run each call in a worker thread (``await asyncio.to_thread(d.list_users, c)``).
Every network wait is bounded by the ``timeout`` given at connect time.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import ipaddress
import logging
import math
import random
import re
import time
import unicodedata
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from ldap3 import (
    BASE,
    DEREF_ALWAYS,
    DEREF_NEVER,
    LEVEL,
    MODIFY_ADD,
    MODIFY_DELETE,
    MODIFY_REPLACE,
    NONE,
    SUBTREE,
    Connection,
    Server,
)
from ldap3.core.exceptions import (
    LDAPCommunicationError,
    LDAPException,
    LDAPOperationResult,
    LDAPResponseTimeoutError,
)

from usher.directory import layout as lay
from usher.directory.layout import Attributes, Layout, filter_and, filter_eq
from usher.errors import (
    AlreadyExists,
    AuthenticationFailed,
    ClusterNotFound,
    Conflict,
    DirectoryError,
    GroupNotFound,
    InvalidName,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    Unavailable,
    UserNotFound,
    UsherError,
)
from usher.names import validate_domain, validate_login

__all__ = [
    "DEFAULT_SHELL",
    "DEFAULT_TIMEOUT",
    "Directory",
    "DirectoryGroup",
    "DirectoryUser",
    "translate_error",
    "validate_full_name",
    "validate_home_uri",
    "validate_password",
    "validate_shell",
    "validate_ssh_key",
]

log = logging.getLogger(__name__)

DEFAULT_SHELL = "/bin/bash"
DEFAULT_TIMEOUT = 10.0
"""Seconds to wait for a connection, and for each reply (rounded up to whole
seconds), before giving up."""
ID_ATTEMPTS = 50
"""Tries to take a number from the counter before giving up under contention."""
MEMBERSHIP_ATTEMPTS = 10
"""Tries of a guarded group change before giving up under contention."""
PERMISSIVE_MODIFY = ("1.2.840.113556.1.4.1413", False, None)
"""Control that makes adding a present value or deleting an absent one a no-op."""

# LDAP result codes (RFC 4511) this module branches on.
_NO_SUCH_ATTRIBUTE = 16
_CONSTRAINT_VIOLATION = 19
_VALUE_EXISTS = 20
_NO_SUCH_OBJECT = 32
_INAPPROPRIATE_AUTH = 48
_INVALID_CREDENTIALS = 49
_INSUFFICIENT_ACCESS = 50
_BUSY = 51
_UNAVAILABLE = 52
_UNWILLING = 53
_NOT_ALLOWED_ON_NON_LEAF = 66
_ALREADY_EXISTS = 68

_PERSON_CLASSES = ["top", "inetOrgPerson", "posixAccount", "shadowAccount",
                   "ldapPublicKey", "usherAccount"]
_PERSON_ATTRIBUTES = ["objectClass", "uid", "cn", "uidNumber", "gidNumber", "homeDirectory",
                      "loginShell", "sshPublicKey", "usherHomeURI", "aliasedObjectName"]
_GROUP_ATTRIBUTES = ["objectClass", "cn", "gidNumber", "memberUid", "aliasedObjectName"]
_PERSON_FILTER = "(objectClass=posixAccount)"
_GROUP_FILTER = "(objectClass=posixGroup)"


# --- values people type --------------------------------------------------------
_SHELL = re.compile(r"/[A-Za-z0-9._+/-]{1,254}")
_URI_PATH = re.compile(r"/[A-Za-z0-9._~+/-]*")
_KEY_TYPES = frozenset({
    "ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521", "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com"})
MAX_FULL_NAME = 128
MAX_PASSWORD = 256
MAX_KEY = 16384
MAX_URI = 1024


def _has_control(text: str) -> bool:
    return any(unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp") for char in text)


def validate_full_name(name: str) -> str:
    """Check a person's full name and return it stripped.

    1 to 128 characters, no control or format characters, no ``:`` (the field
    separator of ``/etc/passwd``, where the name ends up as GECOS).

    Raises:
        InvalidRequest: the name breaks one of these rules.
    """
    text = name.strip()
    if not text or len(text) > MAX_FULL_NAME:
        raise InvalidRequest(f"a full name has 1 to {MAX_FULL_NAME} characters")
    if _has_control(text) or ":" in text:
        raise InvalidRequest("a full name cannot hold control characters or ':'")
    return text


def validate_shell(shell: str) -> str:
    """Check a login shell: an absolute path of ``A-Z a-z 0-9 . _ + / -``.

    Raises:
        InvalidRequest: it is not such a path.
    """
    if not _SHELL.fullmatch(shell) or "/../" in shell + "/":
        raise InvalidRequest(f"{shell!r} is not a login shell; give an absolute path"
                             " such as /bin/bash")
    return shell


def validate_home_uri(uri: str) -> str:
    """Check where a home directory lives: ``nfs://HOST[:PORT]/PATH``.

    HOST is a DNS name or an IP address (IPv6 in brackets); PATH is absolute
    and made of ``A-Z a-z 0-9 . _ ~ + / -``. No user, query or fragment.

    Raises:
        InvalidRequest: the URI breaks one of these rules.
    """
    hint = "write the home URI as nfs://HOST/PATH, e.g. nfs://files.example.org/home/alice"
    if len(uri) > MAX_URI or _has_control(uri) or " " in uri:
        raise InvalidRequest(f"{uri[:60]!r} is not a home URI; {hint}")
    try:
        parts = urllib.parse.urlsplit(uri)
        port = parts.port
    except ValueError as exc:
        raise InvalidRequest(f"{uri!r} is not a home URI ({exc}); {hint}") from None
    if parts.scheme != "nfs" or not parts.hostname or parts.username is not None \
            or parts.password is not None or parts.query or parts.fragment \
            or uri.endswith(("?", "#")) or port == 0:
        raise InvalidRequest(f"{uri!r} is not a home URI; {hint}")
    host = parts.hostname
    try:
        ipaddress.ip_address(host)
    except ValueError:
        try:
            validate_domain(host)
        except InvalidName:
            raise InvalidRequest(f"{host!r} in {uri!r} is not a host name; {hint}") from None
    if not _URI_PATH.fullmatch(parts.path) or parts.path == "/" or "/../" in parts.path + "/":
        raise InvalidRequest(f"{parts.path!r} in {uri!r} is not an absolute path; {hint}")
    return uri


def validate_ssh_key(key: str) -> str:
    """Check an OpenSSH public key line and return it normalised.

    ``TYPE BASE64 [COMMENT]`` as in ``authorized_keys`` (without options), of a
    known type, whose decoded blob names the same type. Returns the parts
    joined by single spaces.

    Raises:
        InvalidRequest: it is not such a key.
    """
    hint = "give a public key line such as 'ssh-ed25519 AAAAC3... alice@laptop'"
    if len(key) > MAX_KEY or _has_control(key.strip()):
        raise InvalidRequest(f"not an SSH public key; {hint}")
    fields = key.split(None, 2)
    if len(fields) < 2 or fields[0] not in _KEY_TYPES:
        raise InvalidRequest(f"{key[:40]!r} is not an SSH public key; {hint}")
    try:
        blob = base64.b64decode(fields[1], validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"the key data of {key[:40]!r} is not base64; {hint}") from None
    name_length = int.from_bytes(blob[:4], "big") if len(blob) >= 4 else -1
    if blob[4:4 + name_length].decode("ascii", "replace") != fields[0]:
        raise InvalidRequest(f"the key data of {key[:40]!r} is not a {fields[0]} key; {hint}")
    return " ".join(fields)


def validate_password(password: str) -> str:
    """Check a new password: 1 to 256 characters, no NUL.

    Raises:
        InvalidRequest: it is empty, too long or holds NUL.
    """
    if not password or len(password) > MAX_PASSWORD or "\x00" in password:
        raise InvalidRequest(f"a password has 1 to {MAX_PASSWORD} characters and no NUL")
    return password


def _key_identity(key: str) -> tuple[str, str]:
    fields = key.split()
    return (fields[0], fields[1]) if len(fields) >= 2 else (key, "")


# --- results -------------------------------------------------------------------
@dataclass(frozen=True)
class DirectoryUser:
    """A person as one cluster sees them. Plain data.

    ``home_cluster`` is where their entry (and password) lives; ``linked`` is
    True when the cluster asked about holds only a link to them. ``groups`` are
    the groups of that cluster listing them as a member (filled by
    :meth:`Directory.list_users` only with ``long=True``); ``private_group`` is
    their primary group, named like them, with gid ``gid_number``.
    """

    uid: str
    uid_number: int
    gid_number: int
    full_name: str
    shell: str
    home_directory: str
    home_cluster: str
    linked: bool = False
    home_uri: str | None = None
    keys: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()

    @property
    def private_group(self) -> str:
        return self.uid


@dataclass(frozen=True)
class DirectoryGroup:
    """A group of one cluster. Plain data.

    ``private`` marks a user's private group (named like the user, their
    primary group); ``linked`` marks a link to the private group of a user
    linked in from another cluster.
    """

    name: str
    gid_number: int
    members: tuple[str, ...] = ()
    private: bool = False
    linked: bool = False


@dataclass
class _Entry:
    """One search result: its DN and its attribute values as text."""

    dn: str
    attrs: dict[str, list[str]] = field(default_factory=dict)

    def get(self, name: str) -> list[str]:
        for key, values in self.attrs.items():
            if key.lower() == name.lower():
                return values
        return []

    def first(self, name: str, default: str = "") -> str:
        values = self.get(name)
        return values[0] if values else default

    def has_class(self, name: str) -> bool:
        return name.lower() in (v.lower() for v in self.get("objectClass"))

    @property
    def is_alias(self) -> bool:
        return self.has_class("alias")


# --- errors ----------------------------------------------------------------------
def translate_error(exc: LDAPException, *, url: str, action: str,
                    not_found: UsherError | None = None,
                    exists: UsherError | None = None,
                    denied: UsherError | None = None) -> UsherError:
    """The usher error for an ldap3 exception raised while doing ``action``.

    The one place ldap3's exceptions and LDAP result codes become usher errors:

    * no answer (socket errors, timeouts) -> :class:`Unavailable`;
    * other client-side ldap3 errors -> :class:`DirectoryError`;
    * invalidCredentials, inappropriateAuthentication -> :class:`AuthenticationFailed`;
    * insufficientAccessRights -> ``denied`` or :class:`PermissionDenied`;
    * noSuchObject -> ``not_found`` or :class:`NotFound`;
    * entryAlreadyExists, a ``unique`` overlay refusal -> ``exists`` or
      :class:`AlreadyExists`;
    * noSuchAttribute, attributeOrValueExists, notAllowedOnNonLeaf -> :class:`Conflict`;
    * busy, unavailable -> :class:`Unavailable`;
    * anything else -> :class:`DirectoryError`.

    ``action`` completes "could not ..." in the messages.
    """
    if not isinstance(exc, LDAPOperationResult):
        if not isinstance(exc, LDAPCommunicationError | LDAPResponseTimeoutError):
            return DirectoryError(f"could not {action}: {exc}")
        return Unavailable(
            f"directory server at {url} is unreachable; could not {action}"
            f" (check that slapd runs and that the URL is right): {exc}",
            details={"url": url})
    code = exc.result
    text = (exc.message or exc.description or "").strip()
    details: dict[str, Any] = {"ldap_result": code, "ldap_message": text}
    if code in (_INVALID_CREDENTIALS, _INAPPROPRIATE_AUTH):
        return AuthenticationFailed(f"could not {action}: wrong user name or password",
                                    details=details)
    if code == _INSUFFICIENT_ACCESS:
        return denied or PermissionDenied(
            f"could not {action}: the directory does not allow you to", details=details)
    if code == _NO_SUCH_OBJECT:
        return not_found or NotFound(f"could not {action}: no such entry", details=details)
    if code == _ALREADY_EXISTS or (code == _CONSTRAINT_VIOLATION and "unique" in text):
        return exists or AlreadyExists(f"could not {action}: it exists already",
                                       details=details)
    if code in (_NO_SUCH_ATTRIBUTE, _VALUE_EXISTS, _NOT_ALLOWED_ON_NON_LEAF):
        return Conflict(f"could not {action}: it changed meanwhile ({text})", details=details)
    if code in (_BUSY, _UNAVAILABLE):
        return Unavailable(f"could not {action}: the directory server is {exc.description}"
                           f" ({text}); try again later", details=details)
    return DirectoryError(f"could not {action}: the directory refused ({exc.description}:"
                          f" {text})", details=details)


class _Undo:
    """Undo actions of the steps done so far, run in reverse if a later step fails."""

    def __init__(self) -> None:
        self._actions: list[tuple[str, Callable[[], object]]] = []

    def push(self, what: str, action: Callable[[], object]) -> None:
        self._actions.append((what, action))

    def rollback(self) -> None:
        while self._actions:
            what, action = self._actions.pop()
            try:
                action()
            except Exception:
                log.exception("could not undo %s; the directory may hold a leftover", what)


class Directory:
    """A bound session with the site's directory. Build it with :meth:`connect`.

    Cluster arguments are FQDNs; uid and group-name arguments are login names.
    Every method validates its arguments first (:class:`InvalidName`,
    :class:`InvalidRequest`) and raises :class:`Unavailable` when the server
    does not answer. Which account may do what is decided by slapd and stated
    in ``docs/directory.md``; a refusal is a :class:`PermissionDenied`.

    ``step_hook`` (tests only) is called with the name of each write step of a
    multi-entry change before it runs, so a test can make one step fail.
    """

    def __init__(self, conn: Connection, site: Layout, *, url: str, bound_dn: str | None,
                 step_hook: Callable[[str], None] | None = None) -> None:
        self._conn = conn
        self.layout = site
        self.url = url
        self.bound_dn = bound_dn
        self._step_hook = step_hook

    # --- sessions --------------------------------------------------------------
    @classmethod
    def connect(cls, url: str, site_domain: str, bind_dn: str | None = None,
                password: str | None = None, *, timeout: float = DEFAULT_TIMEOUT,
                step_hook: Callable[[str], None] | None = None) -> Directory:
        """Open a session bound as ``bind_dn`` (anonymous when None).

        Raises:
            InvalidName: ``site_domain`` is not a domain name.
            AuthenticationFailed: wrong DN or password, or a DN without password
                (which LDAP would otherwise treat as an anonymous bind).
            Unavailable: the server at ``url`` does not answer.
        """
        site = Layout.for_site(site_domain)
        if bind_dn is not None and not password:
            raise AuthenticationFailed(f"no password given for {bind_dn}")
        server = Server(url, connect_timeout=timeout, get_info=NONE)
        # ldap3 packs the reply timeout into SO_RCVTIMEO as whole seconds.
        conn = Connection(server, user=bind_dn, password=password, raise_exceptions=True,
                          receive_timeout=max(1, math.ceil(timeout)), auto_bind="NONE")
        directory = cls(conn, site, url=url, bound_dn=bind_dn, step_hook=step_hook)
        with directory._errors(f"bind to the directory as {bind_dn or 'anonymous'}"):
            conn.open()
            conn.bind()
        return directory

    @classmethod
    def bind_user(cls, url: str, site_domain: str, cluster: str, uid: str, password: str,
                  *, timeout: float = DEFAULT_TIMEOUT,
                  step_hook: Callable[[str], None] | None = None) -> Directory:
        """Open a session bound as the user ``uid`` of ``cluster``.

        The user's entry is looked up anonymously in the cluster's people,
        following links, so a user linked into ``cluster`` binds with the
        password of their home entry. Usher users log in with the site domain
        as ``cluster``.

        Raises:
            InvalidName: a malformed cluster or uid.
            ClusterNotFound: no such cluster.
            AuthenticationFailed: no such user in the cluster, or a wrong or
                empty password (the message does not say which).
            Unavailable: the server does not answer.
        """
        cluster = validate_domain(cluster)
        uid = validate_login(uid)
        if not password:
            raise AuthenticationFailed(f"no password given for {uid}")
        anonymous = cls.connect(url, site_domain, timeout=timeout)
        try:
            found = anonymous._search(
                anonymous.layout.people_dn(cluster), filter_and(_PERSON_FILTER,
                                                                filter_eq("uid", uid)),
                LEVEL, ["uid"], deref=True, action=f"look up {uid} in {cluster}",
                not_found=anonymous._no_cluster(cluster))
        finally:
            anonymous.close()
        if len(found) != 1:
            raise AuthenticationFailed(f"wrong user name or password for {uid} in {cluster}")
        directory = cls.connect(url, site_domain, found[0].dn, password, timeout=timeout,
                                step_hook=step_hook)
        directory.bound_dn = found[0].dn
        return directory

    def close(self) -> None:
        """Unbind and close the connection. Safe to call twice."""
        with contextlib.suppress(LDAPException):
            if not self._conn.closed:
                self._conn.unbind()

    def __enter__(self) -> Directory:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- plumbing ----------------------------------------------------------------
    @contextlib.contextmanager
    def _errors(self, action: str, *, not_found: UsherError | None = None,
                exists: UsherError | None = None,
                denied: UsherError | None = None) -> Iterator[None]:
        try:
            yield
        except LDAPException as exc:
            raise translate_error(exc, url=self.url, action=action, not_found=not_found,
                                  exists=exists, denied=denied) from exc

    @contextlib.contextmanager
    def _undoable(self) -> Iterator[_Undo]:
        undo = _Undo()
        try:
            yield undo
        except BaseException:
            undo.rollback()
            raise

    def _step(self, name: str) -> None:
        if self._step_hook is not None:
            self._step_hook(name)

    def _search(self, base: str, search_filter: str, scope: str, attributes: list[str], *,
                action: str, deref: bool = False,
                not_found: UsherError | None = None) -> list[_Entry]:
        with self._errors(action, not_found=not_found):
            self._conn.search(base, search_filter, search_scope=scope,
                              dereference_aliases=DEREF_ALWAYS if deref else DEREF_NEVER,
                              attributes=attributes)
        entries = []
        for item in self._conn.response or []:
            if item.get("type") != "searchResEntry":
                continue
            raw: dict[str, list[bytes]] = item.get("raw_attributes", {})
            entries.append(_Entry(item["dn"], {
                name: [v.decode("utf-8", "replace") for v in values]
                for name, values in raw.items()}))
        return entries

    def _read(self, dn: str, attributes: list[str], *, action: str) -> _Entry | None:
        """The entry at ``dn`` (links not followed), or None if there is none."""
        try:
            found = self._search(dn, "(objectClass=*)", BASE, attributes, action=action,
                                 not_found=NotFound(dn))
        except NotFound:
            return None
        return found[0] if found else None

    def _add(self, dn: str, attributes: Attributes, *, action: str,
             exists: UsherError | None = None, denied: UsherError | None = None) -> None:
        with self._errors(action, exists=exists, denied=denied):
            self._conn.add(dn, attributes=attributes)

    def _delete(self, dn: str, *, action: str, denied: UsherError | None = None) -> None:
        with self._errors(action, denied=denied):
            self._conn.delete(dn)

    def _modify(self, dn: str, changes: dict[str, list[tuple[str, list[str]]]], *,
                action: str, denied: UsherError | None = None,
                permissive: bool = False) -> None:
        with self._errors(action, denied=denied):
            self._conn.modify(dn, changes, controls=[PERMISSIVE_MODIFY] if permissive else None)

    def _no_cluster(self, cluster: str) -> ClusterNotFound:
        return ClusterNotFound(f"no cluster {cluster} in the directory; a cluster's branch is"
                               " made with its first VM", details={"cluster": cluster})

    def _cluster(self, cluster: str) -> str:
        """``cluster`` validated, lower-cased, under the site and present."""
        name = validate_domain(cluster)
        site = self.layout.site
        if name != site and not name.endswith("." + site):
            raise InvalidName(f"{name} is not in the site domain {site}")
        if self._read(self.layout.people_dn(name), ["ou"], action=f"read cluster {name}") \
                is None:
            raise self._no_cluster(name)
        return name

    def _denied_admin(self, cluster: str, action: str) -> PermissionDenied:
        return PermissionDenied(f"you may not {action}: only admins of {cluster} may",
                                details={"cluster": cluster})

    def _user_from(self, entry: _Entry, *, linked: bool, groups: Sequence[str] = ()) \
            -> DirectoryUser:
        def number(name: str) -> int:
            try:
                return int(entry.first(name))
            except ValueError:
                raise DirectoryError(f"{entry.dn} has no valid {name}") from None
        try:
            home = self.layout.cluster_of(entry.dn)
        except InvalidName:
            raise DirectoryError(f"{entry.dn} is not in a cluster branch") from None
        return DirectoryUser(
            uid=entry.first("uid"), uid_number=number("uidNumber"),
            gid_number=number("gidNumber"), full_name=entry.first("cn"),
            shell=entry.first("loginShell", DEFAULT_SHELL),
            home_directory=entry.first("homeDirectory"), home_cluster=home,
            linked=linked, home_uri=entry.first("usherHomeURI") or None,
            keys=tuple(entry.get("sshPublicKey")), groups=tuple(sorted(groups)))

    def _find_home(self, uid: str) -> _Entry | None:
        """The home entry of ``uid`` anywhere in the site, or None."""
        found = self._search(self.layout.clusters_dn,
                             filter_and(_PERSON_FILTER, filter_eq("uid", uid)), SUBTREE,
                             _PERSON_ATTRIBUTES, action=f"look up user {uid}")
        homes = [e for e in found if not e.is_alias]
        return homes[0] if homes else None

    def _resolve(self, cluster: str, uid: str) -> tuple[_Entry, _Entry]:
        """The entry of ``uid`` in ``cluster`` and their home entry (equal if homed here).

        Raises:
            UserNotFound: no such user in the cluster, or a link to a deleted user.
        """
        missing = UserNotFound(f"no user {uid} in cluster {cluster}",
                               details={"cluster": cluster, "uid": uid})
        here = self._read(self.layout.person_dn(cluster, uid), _PERSON_ATTRIBUTES,
                          action=f"read user {uid} of {cluster}")
        if here is None:
            raise missing
        if not here.is_alias:
            return here, here
        home = self._read(here.first("aliasedObjectName"), _PERSON_ATTRIBUTES,
                          action=f"read the home entry of {uid}")
        if home is None or not home.has_class("posixAccount"):
            raise UserNotFound(f"{uid} in {cluster} is a link to a deleted user; delete the"
                               " link with userdel", details={"cluster": cluster, "uid": uid})
        return here, home

    def _cluster_uids(self, cluster: str) -> set[str]:
        """The uids of the users of ``cluster``: its people and people linked in."""
        entries = self._search(self.layout.people_dn(cluster), "(objectClass=*)", LEVEL,
                               ["uid"], action=f"list the users of {cluster}")
        return {e.first("uid").lower() for e in entries if e.first("uid")}

    # --- id numbers ----------------------------------------------------------------
    def allocate_id(self, *, denied: PermissionDenied | None = None) -> int:
        """Take the next uid/gid number of the site from the counter entry.

        Reads the counter and replaces the value read by the next in one modify
        (delete the old value, add the new one). If another writer got there
        first the delete fails, nothing changes, and it tries again after a
        short random pause, up to :data:`ID_ATTEMPTS` times. Numbers taken by a
        change that is later undone are not reused.

        Raises:
            PermissionDenied: the bound account may not bump the counter (only
                cluster admins, the controller and the site admin may); ``denied``
                is raised instead when given.
            Unavailable: too much contention, or the server does not answer.
            DirectoryError: the counter entry is missing or the site ran out of
                numbers.
        """
        counter = self.layout.id_counter_dn
        for attempt in range(ID_ATTEMPTS):
            entry = self._read(counter, ["usherNextId"], action="read the id counter")
            if entry is None or not entry.first("usherNextId").isdigit():
                raise DirectoryError(f"the id counter {counter} is missing or unreadable")
            current = int(entry.first("usherNextId"))
            if current >= lay.MAX_ID:
                raise DirectoryError("the site has handed out every uid/gid number")
            try:
                with self._conn_errors_raw():
                    self._conn.modify(counter, {"usherNextId": [
                        (MODIFY_DELETE, [str(current)]), (MODIFY_ADD, [str(current + 1)])]})
                return current
            except LDAPOperationResult as exc:
                if exc.result != _NO_SUCH_ATTRIBUTE:
                    raise translate_error(exc, url=self.url, action="take a uid/gid number",
                                          denied=denied or PermissionDenied(
                                              "you may not take uid/gid numbers: only cluster"
                                              " admins may create users and groups")) from exc
                log.debug("id counter moved under us at %d (attempt %d); retrying",
                          current, attempt + 1)
                time.sleep(random.uniform(0, min(0.05, 0.002 * 2 ** attempt)))
        raise Unavailable(f"could not take a uid/gid number after {ID_ATTEMPTS} attempts:"
                          " too many concurrent writers; try again")

    @contextlib.contextmanager
    def _conn_errors_raw(self) -> Iterator[None]:
        """Let LDAP result errors through (the caller branches on them); translate the rest."""
        try:
            yield
        except LDAPOperationResult:
            raise
        except LDAPException as exc:
            raise translate_error(exc, url=self.url, action="reach the directory") from exc

    # --- clusters ------------------------------------------------------------------
    def ensure_cluster(self, cluster: str, creator_uid: str) -> bool:
        """Make sure ``cluster`` has its branch, with ``creator_uid`` among its admins.

        Idempotent: creates whatever is missing of the branch, its people and
        groups containers and its ``admin`` and ``power`` groups; links the
        creator in (their entry and private group) if their home is elsewhere;
        adds them to ``admin``. Returns True if anything was created. If a step
        fails, what this call created is removed again. The controller's
        service account (and the site admin) may do this.

        Raises:
            InvalidName: a malformed cluster or uid, or a cluster outside the site.
            UserNotFound: the creator has no home entry.
            Conflict: the cluster holds a different entry named like the creator.
            PermissionDenied: the bound account may not create cluster branches.
        """
        name = validate_domain(cluster)
        site = self.layout
        if name != site.site and not name.endswith("." + site.site):
            raise InvalidName(f"{name} is not in the site domain {site.site}")
        uid = validate_login(creator_uid)
        home = self._find_home(uid)
        if home is None:
            raise UserNotFound(f"no user {uid} to be the admin of {name}",
                               details={"uid": uid})
        denied = PermissionDenied(f"you may not create the cluster branch of {name}: only"
                                  " the controller and the site admin may")
        created = False
        with self._undoable() as undo:
            missing = [dn for dn, _ in lay.cluster_entries(site, name, admin_gid=0, power_gid=0)
                       if self._read(dn, ["objectClass"], action=f"read {dn}") is None]
            gids = {dn: self.allocate_id(denied=denied) for dn in missing
                    if dn in (site.admin_group_dn(name), site.group_dn(name, lay.POWER_GROUP))}
            entries = lay.cluster_entries(
                site, name, admin_gid=gids.get(site.admin_group_dn(name), 0),
                power_gid=gids.get(site.group_dn(name, lay.POWER_GROUP), 0))
            for dn, attributes in entries:
                if dn in missing:
                    self._step(f"ensure_cluster.add:{dn.split(',', 1)[0]}")
                    try:
                        self._add(dn, attributes, action=f"create {dn}", denied=denied)
                    except AlreadyExists:
                        # Made meanwhile by a concurrent call: theirs to keep, ours to use.
                        log.debug("%s was created concurrently", dn)
                        continue
                    undo.push(f"create {dn}", functools.partial(self._conn.delete, dn))
                    created = True
            if site.cluster_of(home.dn) != name:
                created |= self._link(undo, name, uid, home, denied=denied)
            if uid not in {m.lower() for m in self._members(name, lay.ADMIN_GROUP)}:
                self._step("ensure_cluster.add_admin")
                self._modify(site.admin_group_dn(name), {"memberUid": [(MODIFY_ADD, [uid])]},
                             action=f"make {uid} an admin of {name}", denied=denied,
                             permissive=True)
                undo.push(f"admin {uid} of {name}", lambda: self._conn.modify(
                    site.admin_group_dn(name), {"memberUid": [(MODIFY_DELETE, [uid])]}))
                created = True
        if created:
            log.info("cluster branch %s ensured for %s", name, uid)
        return created

    def _members(self, cluster: str, group: str) -> list[str]:
        entry = self._read(self.layout.group_dn(cluster, group), ["memberUid"],
                           action=f"read group {group} of {cluster}")
        return entry.get("memberUid") if entry is not None else []

    # --- users ------------------------------------------------------------------------
    def add_user(self, cluster: str, uid: str, full_name: str, password: str | None, *,
                 shell: str = DEFAULT_SHELL, home_uri: str | None = None,
                 keys: Iterable[str] = ()) -> DirectoryUser:
        """Create the person ``uid`` with ``cluster`` as their home.

        Creates their entry (uid and gid number from the site counter, home
        directory ``/home/UID``) and their private group (same name and number),
        then sets the password with the Password Modify operation, so slapd
        hashes it (no password: the account takes SSH keys only). Any step that
        fails undoes the earlier ones. Links left behind by an earlier person of
        the same name in this cluster are removed first. Admins of ``cluster``
        may do this.

        Raises:
            InvalidName: a malformed cluster or uid, or a reserved uid.
            InvalidRequest: a bad full name, shell, home URI, key or password.
            ClusterNotFound: no such cluster.
            AlreadyExists: the login name is taken anywhere in the site, or the
                cluster has a group of that name.
            PermissionDenied: the bound account is not an admin of ``cluster``.
        """
        name = self._cluster(cluster)
        login = validate_login(uid)
        with self._undoable() as undo:
            user = self._add_user(undo, name, login, full_name, password, shell=shell,
                                  home_uri=home_uri, keys=keys,
                                  denied=self._denied_admin(name, f"add users to {name}"))
        log.info("user %s added to %s by %s", login, name, self.bound_dn)
        return user

    def _add_user(self, undo: _Undo, cluster: str, uid: str, full_name: str,
                  password: str | None, *, shell: str, home_uri: str | None,
                  keys: Iterable[str], denied: PermissionDenied) -> DirectoryUser:
        site = self.layout
        full = validate_full_name(full_name)
        shell = validate_shell(shell)
        uri = validate_home_uri(home_uri) if home_uri else None
        key_list = list(dict.fromkeys(validate_ssh_key(k) for k in keys))
        if password is not None:
            validate_password(password)
        other = self._find_home(uid)
        if other is not None:
            raise AlreadyExists(f"login name {uid} is taken: {uid} lives in cluster"
                                f" {site.cluster_of(other.dn)}; link them in instead",
                                details={"uid": uid})
        if self._read(site.group_dn(cluster, uid), ["cn"], action="read groups") is not None:
            raise AlreadyExists(f"{cluster} has a group named {uid}, which would hide the"
                                " user's private group; choose another name",
                                details={"uid": uid, "cluster": cluster})
        person_dn, group_dn = site.person_dn(cluster, uid), site.group_dn(cluster, uid)
        self._collect_links_to(person_dn, group_dn)
        number = self.allocate_id(denied=denied)
        attributes: Attributes = {
            "objectClass": _PERSON_CLASSES, "uid": [uid], "cn": [full],
            "sn": [full.split()[-1]], "uidNumber": [str(number)], "gidNumber": [str(number)],
            "homeDirectory": [f"/home/{uid}"], "loginShell": [shell]}
        if full.isascii():
            attributes["gecos"] = [full]
        if uri:
            attributes["usherHomeURI"] = [uri]
        if key_list:
            attributes["sshPublicKey"] = key_list
        exists = AlreadyExists(f"login name {uid} or number {number} is taken in the site",
                               details={"uid": uid})
        self._step("add_user.person")
        self._add(person_dn, attributes, action=f"add user {uid} to {cluster}",
                  exists=exists, denied=denied)
        undo.push(f"add user {person_dn}", lambda: self._conn.delete(person_dn))
        self._step("add_user.group")
        self._add(group_dn, {"objectClass": ["top", "posixGroup"], "cn": [uid],
                             "gidNumber": [str(number)],
                             "description": [f"private group of {uid}"]},
                  action=f"add the private group of {uid}", exists=exists, denied=denied)
        undo.push(f"add group {group_dn}", lambda: self._conn.delete(group_dn))
        if password is not None:
            self._step("add_user.password")
            with self._errors(f"set the password of {uid}", denied=denied):
                self._conn.extend.standard.modify_password(person_dn, None, password)
        return DirectoryUser(uid=uid, uid_number=number, gid_number=number, full_name=full,
                             shell=shell, home_directory=f"/home/{uid}", home_cluster=cluster,
                             home_uri=uri, keys=tuple(key_list))

    def _collect_links_to(self, *targets: str) -> None:
        """Remove links (aliases) anywhere in the site whose target is one of ``targets``.

        Used only for targets that no longer exist: slapd lets any bound account
        remove such a link. Failures are logged, not raised: a dangling link is
        inert (searches skip it) and the next caller collects it.
        """
        for target in targets:
            try:
                links = self._search(self.layout.clusters_dn, filter_eq("aliasedObjectName",
                                                                         target),
                                     SUBTREE, ["aliasedObjectName"],
                                     action=f"look for links to {target}")
                for link in links:
                    self._conn.delete(link.dn)
                    log.info("removed the link %s to the deleted %s", link.dn, target)
            except (UsherError, LDAPException):
                log.exception("could not remove the links to %s; they are inert", target)

    def delete_user(self, cluster: str, uid: str) -> None:
        """Remove the user ``uid`` from ``cluster``.

        For a user linked in, removes the link (and the link to their private
        group) and their memberships in the cluster's groups; their account is
        untouched. For a user whose home is ``cluster``, removes their
        memberships there (and, in the site cluster, from the Usher users),
        their private group and their entry, then the links to them in other
        clusters. Refuses to remove the last admin of the
        cluster. Any step before the entry's removal that fails undoes the
        earlier ones. Admins of ``cluster`` may do this.

        Raises:
            InvalidName: a malformed cluster or uid.
            ClusterNotFound: no such cluster.
            UserNotFound: no such user in the cluster.
            Conflict: ``uid`` is the cluster's last admin, or an entry changed meanwhile.
            PermissionDenied: the bound account is not an admin of ``cluster``.
        """
        name = self._cluster(cluster)
        login = validate_login(uid)
        site = self.layout
        denied = self._denied_admin(name, f"remove users from {name}")
        person_dn = site.person_dn(name, login)
        here = self._read(person_dn, _PERSON_ATTRIBUTES, action=f"read user {login}")
        if here is None:
            raise UserNotFound(f"no user {login} in cluster {name}",
                               details={"cluster": name, "uid": login})
        group_dn = site.group_dn(name, login)
        group = self._read(group_dn, ["*"], action=f"read the private group of {login}")
        with self._undoable() as undo:
            self._leave_groups(undo, name, login, denied=denied)
            if name == site.site and not here.is_alias:
                self._step("delete_user.usher_users")
                self._modify(site.usher_users_dn, {"memberUid": [(MODIFY_DELETE, [login])]},
                             action=f"remove {login} from the Usher users", denied=denied,
                             permissive=True)
                undo.push(f"remove {login} from the Usher users", functools.partial(
                    self._conn.modify, site.usher_users_dn,
                    {"memberUid": [(MODIFY_ADD, [login])]}, controls=[PERMISSIVE_MODIFY]))
            if here.is_alias:
                if group is not None and group.is_alias:
                    self._step("delete_user.group_link")
                    self._delete(group_dn, action=f"unlink the group of {login}", denied=denied)
                    undo.push(f"delete {group_dn}", lambda: self._conn.add(
                        group_dn, attributes=_restorable(group)))
                self._step("delete_user.link")
                self._delete(person_dn, action=f"unlink {login} from {name}", denied=denied)
            else:
                if group is not None and not group.is_alias \
                        and group.first("gidNumber") == here.first("gidNumber"):
                    self._step("delete_user.group")
                    self._delete(group_dn, action=f"delete the private group of {login}",
                                 denied=denied)
                    undo.push(f"delete {group_dn}", lambda: self._conn.add(
                        group_dn, attributes=_restorable(group)))
                self._step("delete_user.person")
                self._delete(person_dn, action=f"delete user {login}", denied=denied)
        if not here.is_alias:
            self._collect_links_to(person_dn, group_dn)
        log.info("user %s removed from %s by %s", login, name, self.bound_dn)

    def _leave_groups(self, undo: _Undo, cluster: str, uid: str, *,
                      denied: PermissionDenied, keep_an_admin: bool = True) -> None:
        """Remove ``uid`` from every group of ``cluster``.

        With ``keep_an_admin``, refuses to remove the last member of ``admin``.
        """
        site = self.layout
        groups = self._search(site.groups_dn(cluster), filter_and(
            _GROUP_FILTER, filter_eq("memberUid", uid)), LEVEL, ["cn", "memberUid"],
            action=f"read the groups of {cluster}")
        # The admin group first: it is the one that may refuse.
        groups.sort(key=lambda g: g.first("cn").lower() != lay.ADMIN_GROUP)
        for group in groups:
            gname = group.first("cn")
            self._step(f"leave_group:{gname}")
            self._change_members(cluster, gname, add=[], remove=[uid], denied=denied,
                                 keep_an_admin=keep_an_admin)
            undo.push(f"remove {uid} from {gname}", functools.partial(
                self._conn.modify, site.group_dn(cluster, gname),
                {"memberUid": [(MODIFY_ADD, [uid])]}, controls=[PERMISSIVE_MODIFY]))

    def list_users(self, cluster: str, long: bool = False) -> list[DirectoryUser]:
        """The users of ``cluster``, people homed there and people linked in, by uid.

        Each comes with their home URI and keys; with ``long`` also the groups
        of ``cluster`` they belong to. Links to deleted users are left out (and
        logged). Anyone may list.

        Raises:
            InvalidName: a malformed cluster.
            ClusterNotFound: no such cluster.
        """
        name = self._cluster(cluster)
        entries = self._search(self.layout.people_dn(name), "(objectClass=*)", LEVEL,
                               _PERSON_ATTRIBUTES, action=f"list the users of {name}")
        memberships: dict[str, list[str]] = {}
        if long:
            for group in self._search(self.layout.groups_dn(name), _GROUP_FILTER, LEVEL,
                                      ["cn", "memberUid"],
                                      action=f"list the groups of {name}"):
                for member in group.get("memberUid"):
                    memberships.setdefault(member.lower(), []).append(group.first("cn"))
        users = []
        for entry in entries:
            linked = entry.is_alias
            if linked:
                target = self._read(entry.first("aliasedObjectName"), _PERSON_ATTRIBUTES,
                                    action=f"read the user linked as {entry.first('uid')}")
                if target is None or not target.has_class("posixAccount"):
                    log.warning("%s links to a deleted user; skipped", entry.dn)
                    continue
                entry = target
            elif not entry.has_class("posixAccount"):
                continue
            users.append(self._user_from(entry, linked=linked,
                                         groups=memberships.get(entry.first("uid").lower(),
                                                                [])))
        return sorted(users, key=lambda u: u.uid)

    def get_user(self, cluster: str, uid: str) -> DirectoryUser:
        """The user ``uid`` of ``cluster`` (homed there or linked in), with groups.

        Raises:
            InvalidName: a malformed cluster or uid.
            ClusterNotFound: no such cluster.
            UserNotFound: no such user in the cluster.
        """
        name = self._cluster(cluster)
        login = validate_login(uid)
        here, home = self._resolve(name, login)
        groups = self._search(self.layout.groups_dn(name), filter_and(
            _GROUP_FILTER, filter_eq("memberUid", login)), LEVEL, ["cn"],
            action=f"read the groups of {name}")
        return self._user_from(home, linked=here.is_alias,
                               groups=[g.first("cn") for g in groups])

    def modify_user(self, cluster: str, uid: str, *, full_name: str | None = None,
                    shell: str | None = None, home_uri: str | None = None,
                    add_keys: Iterable[str] = (), remove_keys: Iterable[str] = (),
                    replace_keys: Iterable[str] | None = None) -> DirectoryUser:
        """Change the account of the user ``uid`` of ``cluster`` in one modify.

        ``home_uri=""`` removes the home URI. ``replace_keys`` replaces every
        key (an empty list removes them all) and excludes ``add_keys`` and
        ``remove_keys``; keys are matched by type and data, ignoring comments.
        The change applies to the person's home entry, wherever ``cluster``
        holds a link to it: slapd lets only the person and admins of their
        home cluster make it. Returns the user as changed.

        Raises:
            InvalidName: a malformed cluster or uid.
            InvalidRequest: a bad value, nothing to change, both replace and
                add/remove of keys, or removing a key the user does not have.
            ClusterNotFound, UserNotFound: no such cluster or user.
            PermissionDenied: the bound account is neither the person nor an
                admin of their home cluster.
        """
        name = self._cluster(cluster)
        login = validate_login(uid)
        adds = [validate_ssh_key(k) for k in add_keys]
        removes = [validate_ssh_key(k) for k in remove_keys]
        replacing = None if replace_keys is None else [validate_ssh_key(k)
                                                       for k in replace_keys]
        if replacing is not None and (adds or removes):
            raise InvalidRequest("replace the keys, or add and remove keys, not both")
        changes: dict[str, list[tuple[str, list[str]]]] = {}
        if full_name is not None:
            full = validate_full_name(full_name)
            changes["cn"] = [(MODIFY_REPLACE, [full])]
            changes["sn"] = [(MODIFY_REPLACE, [full.split()[-1]])]
            changes["gecos"] = [(MODIFY_REPLACE, [full] if full.isascii() else [])]
        if shell is not None:
            changes["loginShell"] = [(MODIFY_REPLACE, [validate_shell(shell)])]
        if home_uri is not None:
            changes["usherHomeURI"] = [(MODIFY_REPLACE,
                                        [validate_home_uri(home_uri)] if home_uri else [])]
        _, home = self._resolve(name, login)
        current = {_key_identity(k): k for k in home.get("sshPublicKey")}
        if replacing is not None:
            changes["sshPublicKey"] = [(MODIFY_REPLACE, list(dict.fromkeys(replacing)))]
        else:
            key_changes: list[tuple[str, list[str]]] = []
            gone = []
            for key in removes:
                stored = current.get(_key_identity(key))
                if stored is None:
                    raise InvalidRequest(f"{login} has no key {key[:40]}...",
                                         details={"uid": login})
                gone.append(stored)
            if gone:
                key_changes.append((MODIFY_DELETE, list(dict.fromkeys(gone))))
            removed = {_key_identity(k) for k in gone}
            new = [k for k in dict.fromkeys(adds)
                   if _key_identity(k) not in current or _key_identity(k) in removed]
            if new:
                key_changes.append((MODIFY_ADD, new))
            if key_changes:
                changes["sshPublicKey"] = key_changes
        if not changes:
            if adds:
                return self.get_user(name, login)
            raise InvalidRequest("nothing to change; give a full name, shell, home URI or keys")
        home_cluster = self.layout.cluster_of(home.dn)
        self._modify(home.dn, changes, action=f"change the account of {login}",
                     denied=PermissionDenied(
                         f"you may not change {login}'s account: only {login} and the admins"
                         f" of their home cluster {home_cluster} may",
                         details={"uid": login, "home_cluster": home_cluster}))
        log.info("account of %s changed by %s: %s", login, self.bound_dn, sorted(changes))
        return self.get_user(name, login)

    def set_password(self, cluster: str, uid: str, new_password: str,
                     old_password: str | None = None) -> None:
        """Set the password of the user ``uid`` of ``cluster``.

        Uses the Password Modify extended operation (RFC 3062): the server
        hashes the password; nothing stores it in clear. A person changing
        their own password may give the old one, which the server then checks.
        Only the person and admins of their home cluster may do this.

        Raises:
            InvalidName: a malformed cluster or uid.
            InvalidRequest: an empty or overlong password.
            ClusterNotFound, UserNotFound: no such cluster or user.
            AuthenticationFailed: ``old_password`` is wrong.
            PermissionDenied: the bound account may not change this password.
        """
        name = self._cluster(cluster)
        login = validate_login(uid)
        validate_password(new_password)
        _, home = self._resolve(name, login)
        home_cluster = self.layout.cluster_of(home.dn)
        denied = PermissionDenied(
            f"you may not set {login}'s password: only {login} and the admins of their"
            f" home cluster {home_cluster} may",
            details={"uid": login, "home_cluster": home_cluster})
        try:
            with self._conn_errors_raw():
                self._conn.extend.standard.modify_password(home.dn, old_password or None,
                                                           new_password)
        except LDAPOperationResult as exc:
            if exc.result == _UNWILLING and old_password:
                raise AuthenticationFailed(f"the old password of {login} is wrong") from exc
            raise translate_error(exc, url=self.url, action=f"set the password of {login}",
                                  denied=denied) from exc
        log.info("password of %s set by %s", login, self.bound_dn)

    def link_user(self, cluster: str, uid: str) -> DirectoryUser:
        """Make the user ``uid`` of any other cluster a user of ``cluster``.

        Adds a link (an LDAP alias) to their entry in the cluster's people and
        one to their private group in its groups; nothing is copied, so their
        password and keys stay theirs. Memberships of ``uid`` left in the
        cluster's groups by an earlier user of that name are dropped first.
        Admins of ``cluster`` may do this.

        Raises:
            InvalidName: a malformed cluster or uid.
            ClusterNotFound: no such cluster.
            UserNotFound: no person ``uid`` in the site.
            AlreadyExists: ``uid`` is already a user of ``cluster``.
            Conflict: ``cluster`` already has a user with the same uid number,
                a group with the same gid number, or a group named ``uid``.
            PermissionDenied: the bound account is not an admin of ``cluster``.
        """
        name = self._cluster(cluster)
        login = validate_login(uid)
        home = self._find_home(login)
        if home is None:
            raise UserNotFound(f"no user {login} in the site to link",
                               details={"uid": login})
        denied = self._denied_admin(name, f"link users into {name}")
        with self._undoable() as undo:
            self._link(undo, name, login, home, denied=denied, strict=True)
        log.info("user %s linked into %s by %s", login, name, self.bound_dn)
        return self._user_from(home, linked=True)

    def _link(self, undo: _Undo, cluster: str, uid: str, home: _Entry, *,
              denied: PermissionDenied, strict: bool = False) -> bool:
        """Link ``home`` (the home entry of ``uid``) into ``cluster``; True if anything was added.

        Without ``strict`` (a cluster's creator), links already in place are kept
        and the name's memberships are left alone.
        """
        site = self.layout
        home_cluster = site.cluster_of(home.dn)
        if home_cluster == cluster:
            raise AlreadyExists(f"{uid} is already a user of {cluster}: it is their home",
                                details={"uid": uid, "cluster": cluster})
        person_dn, group_dn = site.person_dn(cluster, uid), site.group_dn(cluster, uid)
        home_group_dn = site.group_dn(home_cluster, uid)
        here = self._read(person_dn, ["objectClass", "aliasedObjectName"],
                          action=f"read {person_dn}")
        group = self._read(group_dn, ["objectClass", "aliasedObjectName"],
                           action=f"read {group_dn}")
        person_linked = here is not None and here.is_alias and _same_dn(
            here.first("aliasedObjectName"), home.dn)
        group_linked = group is not None and group.is_alias and _same_dn(
            group.first("aliasedObjectName"), home_group_dn)
        if here is not None and (strict or not person_linked):
            raise AlreadyExists(f"{uid} is already a user of {cluster}",
                                details={"uid": uid, "cluster": cluster})
        if group is not None and not group_linked:
            raise Conflict(f"cannot link {uid}: {cluster} has a group named {uid}, which"
                           " would hide their private group; rename or delete it first",
                           details={"uid": uid, "cluster": cluster})
        number = home.first("uidNumber")
        clash = self._number_users(cluster, site.people_dn(cluster), _PERSON_FILTER,
                                   "uidNumber", number, home.dn, ["uid"])
        if clash:
            raise Conflict(f"cannot link {uid}: their uid number {number} is already used in"
                           f" {cluster} by {clash[0].first('uid')}; ask the site admin to"
                           " renumber one of them",
                           details={"uid": uid, "cluster": cluster, "uid_number": number})
        gid = home.first("gidNumber")
        clash = self._number_users(cluster, site.groups_dn(cluster), _GROUP_FILTER,
                                   "gidNumber", gid, home_group_dn, ["cn"])
        if clash:
            raise Conflict(f"cannot link {uid}: their group number {gid} is already used in"
                           f" {cluster} by group {clash[0].first('cn')}",
                           details={"uid": uid, "cluster": cluster, "gid_number": gid})
        added = False
        if not person_linked:
            if strict:
                # Memberships of a former user of this name must not pass to this
                # one. (A cluster's creator is made an admin right after anyway.)
                self._leave_groups(undo, cluster, uid, denied=denied, keep_an_admin=False)
            self._step("link.person")
            added |= self._add_link(undo, person_dn, home.dn, {
                "objectClass": ["top", "alias", "uidObject"], "uid": [uid]},
                action=f"link {uid} into {cluster}", denied=denied, strict=strict)
        if not group_linked and self._read(home_group_dn, ["cn"],
                                           action=f"read {home_group_dn}") is not None:
            self._step("link.group")
            added |= self._add_link(undo, group_dn, home_group_dn, {
                "objectClass": ["top", "alias", "extensibleObject"], "cn": [uid]},
                action=f"link the private group of {uid} into {cluster}", denied=denied,
                strict=strict)
        return added

    def _number_users(self, cluster: str, container: str, kind: str, attribute: str,
                      number: str, own_dn: str, attributes: list[str]) -> list[_Entry]:
        """Entries other than ``own_dn`` that carry ``number`` and are seen in ``container``.

        Two indexed lookups instead of one search through the container with
        aliases dereferenced, which costs slapd a dereference per link already in
        the cluster: every entry of the site with the number (normally just the
        one being linked), then for each other one whether the cluster has it,
        as its home or through a link.
        """
        others = [e for e in self._search(
            self.layout.clusters_dn, filter_and(kind, filter_eq(attribute, number)), SUBTREE,
            attributes, action=f"check {attribute} {number}") if not _same_dn(e.dn, own_dn)]
        seen = []
        for entry in others:
            if entry.dn.lower().endswith("," + container.lower()) or self._search(
                    container, filter_eq("aliasedObjectName", entry.dn), LEVEL, ["1.1"],
                    action=f"check links in {cluster}"):
                seen.append(entry)
        return seen

    def _add_link(self, undo: _Undo, dn: str, target: str, attributes: Attributes, *,
                  action: str, denied: PermissionDenied, strict: bool) -> bool:
        """Add the alias ``dn`` to ``target``; True if added.

        Without ``strict``, the same link made meanwhile by a concurrent call is
        accepted (and left to it).
        """
        try:
            self._add(dn, {**attributes, "aliasedObjectName": [target]}, action=action,
                      denied=denied)
        except AlreadyExists:
            there = None if strict else self._read(dn, ["objectClass", "aliasedObjectName"],
                                                   action=f"read {dn}")
            if there is None or not there.is_alias \
                    or not _same_dn(there.first("aliasedObjectName"), target):
                raise
            return False
        undo.push(f"link {dn}", functools.partial(self._conn.delete, dn))
        return True

    # --- groups ----------------------------------------------------------------------
    def add_group(self, cluster: str, name: str) -> DirectoryGroup:
        """Create the empty group ``name`` in ``cluster`` with a new gid number.

        Group names follow the rules of login names (reserved names refused).
        Admins of ``cluster`` may do this.

        Raises:
            InvalidName: a malformed cluster or group name.
            ClusterNotFound: no such cluster.
            AlreadyExists: the cluster has a group (or user's group) of that name.
            PermissionDenied: the bound account is not an admin of ``cluster``.
        """
        cluster_name = self._cluster(cluster)
        group = validate_login(name)
        dn = self.layout.group_dn(cluster_name, group)
        exists = AlreadyExists(f"{cluster_name} already has a group named {group}",
                               details={"cluster": cluster_name, "group": group})
        if self._read(dn, ["cn"], action=f"read group {group}") is not None:
            raise exists
        denied = self._denied_admin(cluster_name, f"add groups to {cluster_name}")
        number = self.allocate_id(denied=denied)
        self._add(dn, {"objectClass": ["top", "posixGroup"], "cn": [group],
                       "gidNumber": [str(number)]},
                  action=f"add group {group} to {cluster_name}", exists=exists, denied=denied)
        log.info("group %s added to %s by %s", group, cluster_name, self.bound_dn)
        return DirectoryGroup(name=group, gid_number=number)

    def _group_name(self, name: str) -> str:
        """A group name to look up: a login name, or one of the built-in groups."""
        folded = name.lower()
        if folded in (lay.ADMIN_GROUP, lay.POWER_GROUP):
            return folded
        return validate_login(name)

    def delete_group(self, cluster: str, name: str) -> None:
        """Delete the group ``name`` of ``cluster``.

        The ``admin`` and ``power`` groups and users' private groups cannot be
        deleted. Admins of ``cluster`` may do this.

        Raises:
            InvalidName: a malformed cluster or group name.
            InvalidRequest: a built-in or private group.
            ClusterNotFound, GroupNotFound: no such cluster or group.
            PermissionDenied: the bound account is not an admin of ``cluster``.
        """
        cluster_name = self._cluster(cluster)
        group = self._group_name(name)
        if group in (lay.ADMIN_GROUP, lay.POWER_GROUP):
            raise InvalidRequest(f"the {group} group is part of every cluster and cannot be"
                                 " deleted")
        entry = self._read(self.layout.group_dn(cluster_name, group), ["objectClass"],
                           action=f"read group {group}")
        if entry is None:
            raise GroupNotFound(f"no group {group} in {cluster_name}",
                                details={"cluster": cluster_name, "group": group})
        if entry.is_alias or group in self._cluster_uids(cluster_name):
            raise InvalidRequest(f"{group} is the private group of the user {group}; remove"
                                 " the user instead")
        self._delete(self.layout.group_dn(cluster_name, group),
                     action=f"delete group {group} of {cluster_name}",
                     denied=self._denied_admin(cluster_name,
                                               f"delete groups of {cluster_name}"))
        log.info("group %s deleted from %s by %s", group, cluster_name, self.bound_dn)

    def list_groups(self, cluster: str) -> list[DirectoryGroup]:
        """The groups of ``cluster`` by name, private groups (and links to them) included.

        Anyone may list.

        Raises:
            InvalidName: a malformed cluster.
            ClusterNotFound: no such cluster.
        """
        name = self._cluster(cluster)
        uids = self._cluster_uids(name)
        groups = []
        for entry in self._search(self.layout.groups_dn(name), "(objectClass=*)", LEVEL,
                                  _GROUP_ATTRIBUTES, action=f"list the groups of {name}"):
            linked = entry.is_alias
            if linked:
                target = self._read(entry.first("aliasedObjectName"), _GROUP_ATTRIBUTES,
                                    action=f"read the group linked as {entry.first('cn')}")
                if target is None:
                    log.warning("%s links to a deleted group; skipped", entry.dn)
                    continue
                entry = target
            if not entry.has_class("posixGroup"):
                continue
            cn = entry.first("cn")
            groups.append(DirectoryGroup(
                name=cn, gid_number=int(entry.first("gidNumber") or 0),
                members=tuple(sorted(entry.get("memberUid"))),
                private=linked or cn.lower() in uids, linked=linked))
        return sorted(groups, key=lambda g: g.name)

    def modify_group(self, cluster: str, name: str, add: Iterable[str] = (),
                     remove: Iterable[str] = ()) -> DirectoryGroup:
        """Add users to and remove users from the group ``name`` of ``cluster``, atomically.

        Every user added must be a user of ``cluster`` (homed there or linked
        in); adding a member or removing a non-member is a no-op. Removing
        the last member of ``admin`` is refused; the check and the change are
        one modify, so two admins removing each other at once cannot both
        succeed. Admins of ``cluster`` may do this.

        Raises:
            InvalidName: a malformed cluster, group or user name.
            InvalidRequest: a link to another cluster's private group.
            ClusterNotFound, GroupNotFound: no such cluster or group.
            UserNotFound: a user to add is not a user of ``cluster``.
            Conflict: the change would leave ``admin`` without members.
            PermissionDenied: the bound account is not an admin of ``cluster``.
        """
        cluster_name = self._cluster(cluster)
        group = self._group_name(name)
        adds = [validate_login(u) for u in add]
        removes = [validate_login(u) for u in remove]
        entry = self._read(self.layout.group_dn(cluster_name, group), ["objectClass"],
                           action=f"read group {group}")
        if entry is None:
            raise GroupNotFound(f"no group {group} in {cluster_name}",
                                details={"cluster": cluster_name, "group": group})
        if entry.is_alias:
            raise InvalidRequest(f"{group} is the private group of a user linked in from"
                                 " another cluster; it cannot be changed here")
        if adds:
            users = self._cluster_uids(cluster_name)
            strangers = [u for u in adds if u not in users]
            if strangers:
                raise UserNotFound(f"{strangers[0]} is not a user of {cluster_name}; add or"
                                   " link them first",
                                   details={"cluster": cluster_name, "uid": strangers[0]})
        self._change_members(cluster_name, group, add=adds, remove=removes,
                             denied=self._denied_admin(
                                 cluster_name, f"change the groups of {cluster_name}"))
        log.info("group %s of %s changed by %s: +%s -%s", group, cluster_name,
                 self.bound_dn, adds, removes)
        members = self._members(cluster_name, group)
        gid = self._read(self.layout.group_dn(cluster_name, group), ["gidNumber"],
                         action=f"read group {group}")
        return DirectoryGroup(name=group, gid_number=int(gid.first("gidNumber") or 0)
                              if gid else 0, members=tuple(sorted(members)))

    def _change_members(self, cluster: str, group: str, *, add: Sequence[str],
                        remove: Sequence[str], denied: PermissionDenied,
                        keep_an_admin: bool = True) -> None:
        """One guarded modify of a group's memberUid values, retried on races.

        Values to add that are present and values to remove that are absent are
        dropped from the change. For ``admin``, a remaining member K is deleted
        and re-added in the same modify: if K left meanwhile, slapd refuses the
        whole modify (noSuchAttribute) and the change is worked out again.
        """
        dn = self.layout.group_dn(cluster, group)
        for attempt in range(MEMBERSHIP_ATTEMPTS):
            current = self._members(cluster, group)
            folded = {m.lower(): m for m in current}
            gone = [folded[u] for u in dict.fromkeys(remove) if u in folded]
            new = [u for u in dict.fromkeys(add) if u not in folded and u not in remove]
            ops: list[tuple[str, list[str]]] = []
            if gone:
                ops.append((MODIFY_DELETE, gone))
            if new:
                ops.append((MODIFY_ADD, new))
            if not ops:
                return
            if group == lay.ADMIN_GROUP and gone and keep_an_admin:
                keep = [m for m in current if m not in gone]
                if not keep and not new:
                    raise Conflict(f"cannot remove {', '.join(gone)}: {cluster} would have no"
                                   " admin left; make someone else an admin first",
                                   details={"cluster": cluster})
                if keep:
                    ops += [(MODIFY_DELETE, [keep[0]]), (MODIFY_ADD, [keep[0]])]
            try:
                with self._conn_errors_raw():
                    self._conn.modify(dn, {"memberUid": ops})
                return
            except LDAPOperationResult as exc:
                if exc.result not in (_NO_SUCH_ATTRIBUTE, _VALUE_EXISTS):
                    raise translate_error(exc, url=self.url,
                                          action=f"change the members of {group}",
                                          denied=denied,
                                          not_found=GroupNotFound(
                                              f"no group {group} in {cluster}")) from exc
                log.debug("members of %s changed under us (attempt %d); retrying", dn,
                          attempt + 1)
        raise Unavailable(f"could not change the members of {group} of {cluster}: it kept"
                          " changing; try again")

    # --- Usher users -------------------------------------------------------------------
    def find_usher_user(self, uid: str) -> DirectoryUser | None:
        """The Usher user ``uid`` (for ush login), or None if there is none.

        An Usher user is a member of the site's Usher-users group whose home
        entry is in the site cluster (named by the site domain). Only the
        controller's service account and the site admin may read that group.

        Raises:
            InvalidName: a malformed uid.
            PermissionDenied: the bound account may not read the Usher-users group.
        """
        login = validate_login(uid)
        site = self.layout
        try:
            group = self._search(site.usher_users_dn, "(objectClass=*)", BASE, ["memberUid"],
                                 action="read the Usher users", not_found=NotFound("hidden"))
        except NotFound:
            raise PermissionDenied("you may not read the Usher users: only the controller"
                                   " and the site admin may") from None
        if not group or login not in {m.lower() for m in group[0].get("memberUid")}:
            return None
        home = self._read(site.person_dn(site.site, login), _PERSON_ATTRIBUTES,
                          action=f"read Usher user {login}")
        if home is None or home.is_alias or not home.has_class("posixAccount"):
            return None
        return self._user_from(home, linked=False)

    def check_password(self, uid: str, password: str) -> bool:
        """Whether ``password`` is ``uid``'s, wherever their home entry is.

        For telling a cluster user who tries to log in to ush that they are
        not an Usher user, without telling anyone else whether the name
        exists. The bound account must be able to search people (the
        controller's may).

        Raises:
            InvalidName: a malformed uid.
            Unavailable: the server does not answer.
        """
        login = validate_login(uid)
        homes = [e for e in self._search(
            self.layout.clusters_dn, filter_and(_PERSON_FILTER, filter_eq("uid", login)),
            SUBTREE, ["uid"], action=f"look up {login}") if not e.is_alias]
        if len(homes) != 1 or not password:
            return False
        try:
            Directory.connect(self.url, self.layout.site, homes[0].dn, password).close()
        except AuthenticationFailed:
            return False
        return True

    def add_usher_user(self, uid: str, full_name: str, password: str, *,
                       shell: str = DEFAULT_SHELL, keys: Iterable[str] = ()) -> DirectoryUser:
        """Create an Usher user: a person homed in the site cluster, in the Usher-users group.

        Their home entry lives in the branch of the site cluster (the site
        domain), whose admin group is empty, so only they and the site admin
        can change their account. Only the site admin may do this.

        Raises:
            InvalidName: a malformed or reserved uid.
            InvalidRequest: a bad full name, password, shell or key.
            AlreadyExists: the login name is taken anywhere in the site.
            PermissionDenied: the bound account is not the site admin.
        """
        login = validate_login(uid)
        site = self.layout
        denied = PermissionDenied("you may not create Usher users: only the site admin may")
        with self._undoable() as undo:
            user = self._add_user(undo, site.site, login, full_name, password, shell=shell,
                                  home_uri=None, keys=keys, denied=denied)
            self._step("add_usher_user.member")
            self._modify(site.usher_users_dn, {"memberUid": [(MODIFY_ADD, [login])]},
                         action=f"make {login} an Usher user", denied=denied,
                         permissive=True)
        log.info("Usher user %s added by %s", login, self.bound_dn)
        return user


def _same_dn(a: str, b: str) -> bool:
    return a.replace(" ", "").lower() == b.replace(" ", "").lower()


def _restorable(entry: _Entry) -> Attributes:
    """An entry's attributes as an add needs them to re-create it."""
    return {name: values for name, values in entry.attrs.items() if values}
