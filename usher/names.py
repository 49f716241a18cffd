"""Names of VMs, clusters and users: validation, resolution and batch expansion.

Every name a person types reaches the controller through this module. It holds
the site's naming rules (DESIGN.md section 2) as pure functions with no I/O: a
VM name is a DNS name under the site domain ``D``; a user ``U`` owns ``U.D`` and
may name VMs at any depth below it; a VM's cluster is its parent domain; only
the site admin names VMs directly under ``D`` or under other users' domains.
Names are RFC 1123 labels, case-insensitive, and always returned lower-case.
Batch forms such as ``{1..8}.bluefish`` are expanded here, with a cap checked
before anything is built.

Every refusal is an :class:`~usher.errors.InvalidName` (the name is malformed or
can never be a VM name), :class:`~usher.errors.PermissionDenied` (the name is
well formed but not the caller's to use) or, for a batch that is too large,
:class:`~usher.errors.InvalidRequest`; messages are one line and say what to do.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from usher.errors import InvalidName, InvalidRequest, PermissionDenied

__all__ = [
    "MAX_DOMAIN_LENGTH",
    "MAX_LABEL_LENGTH",
    "MAX_LOGIN_LENGTH",
    "RESERVED_NAMES",
    "VmName",
    "cluster_of",
    "expand_batch",
    "owner_of",
    "resolve_vm_name",
    "validate_domain",
    "validate_label",
    "validate_login",
]

MAX_LABEL_LENGTH = 63
MAX_DOMAIN_LENGTH = 253
# Login names become Unix user names on the VMs; 32 is the limit of useradd.
MAX_LOGIN_LENGTH = 32

#: Login names nobody may have: system accounts found on the VMs and hosts, and
#: names whose domain ``NAME.D`` the site itself needs (name servers, mail, web).
RESERVED_NAMES: frozenset[str] = frozenset({
    # people and roles with special powers
    "root", "admin", "administrator", "operator", "superuser", "sudo", "wheel",
    "staff", "adm", "usher", "site", "controller", "lnm", "vmm",
    # system accounts of common distributions
    "daemon", "bin", "sys", "sync", "games", "man", "lp", "news", "uucp",
    "proxy", "backup", "list", "irc", "gnats", "nobody", "nogroup", "shutdown",
    "halt", "sshd", "messagebus", "systemd-network", "systemd-resolve",
    "systemd-timesync", "polkitd", "libvirt", "libvirt-qemu", "qemu", "kvm",
    "dnsmasq", "www-data", "ldap", "openldap", "bind", "named", "ntp", "chrony",
    "postfix", "users", "guest",
    # mail and DNS role addresses (RFC 2142) and well-known host names
    "postmaster", "hostmaster", "webmaster", "abuse", "security", "noc", "info",
    "support", "localhost", "localdomain", "www", "ftp", "mail", "smtp", "imap",
    "pop", "pop3", "mx", "dns", "ns", "ns1", "ns2", "ns3", "ns4", "ldaps",
    "api", "vpn", "gateway", "router", "wpad", "autoconfig", "autodiscover",
})

_LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")
_LABEL_RULE = "1 to 63 characters of a-z, 0-9 and '-', not starting or ending with '-'"
_NAME_HINT = "name VMs like NAME or NAME.CLUSTER"


def validate_label(label: str) -> str:
    """Check one RFC 1123 label and return it lower-cased.

    A label is 1 to 63 characters of ``a-z``, ``0-9`` and ``-`` (upper case is
    accepted and folded) and neither starts nor ends with ``-``.

    Raises:
        InvalidName: the label breaks one of these rules; the message names the
            rule and what is allowed.
    """
    if not label:
        raise InvalidName(f"empty name label; a label is {_LABEL_RULE}")
    # Checked on the original string: str.lower() maps some non-ASCII letters
    # (the Kelvin sign, for one) onto ASCII ones.
    for char in label:
        if char not in _LABEL_CHARS:
            raise InvalidName(f"{label!r} contains {char!r}; a label is {_LABEL_RULE}")
    if len(label) > MAX_LABEL_LENGTH:
        raise InvalidName(
            f"{label!r} is {len(label)} characters long; a label is {_LABEL_RULE}")
    if label[0] == "-" or label[-1] == "-":
        raise InvalidName(f"{label!r} starts or ends with '-'; a label is {_LABEL_RULE}")
    return label.lower()


def validate_domain(name: str) -> str:
    """Check a dotted DNS name and return it lower-cased without a trailing dot.

    Every label must pass :func:`validate_label` and the whole name (without
    the trailing dot) may be at most 253 characters.

    Raises:
        InvalidName: the name is empty, has an empty label (``a..b``, a leading
            dot), a bad label, or is too long.
    """
    body = name[:-1] if name.endswith(".") else name
    if not body:
        raise InvalidName(f"empty domain name {name!r}; write labels joined by dots")
    labels = body.split(".")
    if "" in labels:
        raise InvalidName(
            f"{name!r} has an empty label; write labels joined by single dots")
    folded = ".".join(validate_label(label) for label in labels)
    if len(folded) > MAX_DOMAIN_LENGTH:
        raise InvalidName(
            f"{folded[:40]}... is {len(folded)} characters long;"
            f" a domain name is at most {MAX_DOMAIN_LENGTH}")
    return folded


def validate_login(name: str) -> str:
    """Check a login name and return it lower-cased.

    A login name is a label (see :func:`validate_label`) that starts with a
    letter, has at most 32 characters and is not in :data:`RESERVED_NAMES`.

    Raises:
        InvalidName: the name breaks one of these rules.
    """
    login = validate_label(name)
    if len(login) > MAX_LOGIN_LENGTH:
        raise InvalidName(
            f"login name {login!r} is {len(login)} characters long;"
            f" at most {MAX_LOGIN_LENGTH} are allowed")
    if not login[0].isalpha():
        raise InvalidName(f"login name {login!r} must start with a letter a-z")
    if login in RESERVED_NAMES:
        raise InvalidName(f"login name {login!r} is reserved; choose another name")
    return login


@dataclass(frozen=True)
class VmName:
    """A resolved VM name: plain data, all fields lower-case without trailing dots.

    ``cluster`` is the parent domain of ``fqdn``. ``owner`` is the label directly
    under the site domain (the user whose domain holds the VM), or None for a VM
    directly under the site domain, which is in the site cluster.
    """

    fqdn: str
    cluster: str
    owner: str | None

    def relative_to(self, user: str, site: str) -> str:
        """The short name ``user`` would type: the part above ``user.site``.

        ``redfish.sneetch.seuss.D`` is ``redfish.sneetch`` for ``seuss``. A name
        not strictly under ``user.site`` is returned as its full FQDN.
        """
        suffix = f".{user.lower()}.{site.lower().rstrip('.')}"
        if self.fqdn.endswith(suffix) and len(self.fqdn) > len(suffix):
            return self.fqdn[: -len(suffix)]
        return self.fqdn


def cluster_of(fqdn: str) -> str:
    """The cluster of a VM: its parent domain, lower-cased.

    Raises:
        InvalidName: ``fqdn`` is not a valid domain name or has a single label
            (and so no parent).
    """
    name = validate_domain(fqdn)
    if "." not in name:
        raise InvalidName(f"{name!r} has a single label and so no parent domain")
    return name.split(".", 1)[1]


def owner_of(fqdn: str, site: str) -> str | None:
    """The user whose domain holds ``fqdn``: the label directly under ``site``.

    Returns None for a name directly under the site domain (in the site
    cluster, owned by the site admin).

    Raises:
        InvalidName: either name is invalid, or ``fqdn`` is not strictly under
            ``site``.
    """
    name = validate_domain(fqdn)
    domain = validate_domain(site)
    if not name.endswith("." + domain):
        raise InvalidName(f"{name!r} is not under the site domain {domain}")
    above = name[: -len(domain) - 1].split(".")
    return above[-1] if len(above) > 1 else None


def resolve_vm_name(name: str, *, user: str, site: str, site_admin: bool) -> VmName:
    """Turn the VM name ``user`` typed into a full, authorized :class:`VmName`.

    A name is relative to the user's domain ``user.site`` unless it has a
    trailing dot or ends in ``.site`` (or is ``site`` itself): ``seuss`` typing
    ``redfish.sneetch`` names ``redfish.sneetch.seuss.D``. Then:

    - the site domain itself and names outside the site are refused for all;
    - the site admin may name anything strictly under the site;
    - anyone else may name only what is strictly under their own domain; their
      domain ``user.site`` itself is a VM of the site cluster, not theirs.

    Raises:
        InvalidName: a label is invalid, the name is too long, it is the site
            domain, or it lies outside the site.
        PermissionDenied: a user who is not the site admin names something
            outside their domain, or their domain itself.
    """
    domain = validate_domain(site)
    login = validate_label(user)
    if not name or name == ".":
        raise InvalidName(f"empty VM name; {_NAME_HINT}")
    body = name[:-1] if name.endswith(".") else name
    folded = body.lower()
    absolute = name.endswith(".") or folded == domain or folded.endswith("." + domain)
    fqdn = validate_domain(body if absolute else f"{body}.{login}.{domain}")

    if fqdn == domain:
        raise InvalidName(f"{fqdn} is the site domain itself, not a VM name; {_NAME_HINT}")
    if not fqdn.endswith("." + domain):
        raise InvalidName(
            f"{fqdn} is outside the site domain {domain};"
            f" {_NAME_HINT} (relative to {login}.{domain})")
    own = f"{login}.{domain}"
    if not site_admin:
        if fqdn == own:
            raise PermissionDenied(
                f"{own} is your own domain: a VM of that name is in the site cluster"
                f" {domain}, where only the site admin starts VMs; {_NAME_HINT} under it")
        if not fqdn.endswith("." + own):
            raise PermissionDenied(
                f"{fqdn} is outside your domain {own}; {_NAME_HINT}")
    return VmName(fqdn=fqdn, cluster=fqdn.split(".", 1)[1], owner=owner_of(fqdn, domain))


# --- batch expansion -------------------------------------------------------

_RANGE = re.compile(r"(\d+)\.\.(\d+)")


@dataclass(frozen=True)
class _Range:
    """A numeric brace range; ``width`` > 0 means zero-padded to that width."""

    start: int
    end: int
    width: int

    @property
    def size(self) -> int:
        # Not __len__: len() overflows past sys.maxsize and ranges may be huge.
        return abs(self.end - self.start) + 1

    def __iter__(self) -> Iterator[str]:
        step = 1 if self.end >= self.start else -1
        for number in range(self.start, self.end + step, step):
            yield str(number).zfill(self.width)


_Part = str | _Range | tuple[str, ...]


def _parse_group(pattern: str, body: str) -> _Range | tuple[str, ...]:
    group = "{" + body + "}"
    if not body:
        raise InvalidName(
            f"empty braces {{}} in {pattern!r}; write a list {{a,b}} or a range {{1..8}}")
    if "," in body:
        items = tuple(body.split(","))
        if "" in items:
            raise InvalidName(
                f"empty item in {group} of {pattern!r}; write a list like {{a,b,c}}")
        return items
    if ".." in body:
        match = _RANGE.fullmatch(body)
        if match is None:
            raise InvalidName(
                f"bad range {group} in {pattern!r}; write {{M..N}} with whole numbers"
                " like {1..8} or {01..10}")
        first, last = match.group(1), match.group(2)
        padded = (len(first) > 1 and first[0] == "0") or (len(last) > 1 and last[0] == "0")
        width = max(len(first), len(last)) if padded else 0
        return _Range(int(first), int(last), width)
    raise InvalidName(
        f"{group} in {pattern!r} is neither a list {{a,b}} nor a range {{1..8}}")


def _parse_pattern(pattern: str) -> list[_Part]:
    if not pattern:
        raise InvalidName("empty name in batch; name VMs like NAME or {1..8}.CLUSTER")
    parts: list[_Part] = []
    literal: list[str] = []
    group: list[str] | None = None
    for char in pattern:
        if group is None:
            if char == "{":
                group = []
                if literal:
                    parts.append("".join(literal))
                    literal = []
            elif char == "}":
                raise InvalidName(f"unbalanced '}}' in {pattern!r}; braces come in pairs")
            else:
                literal.append(char)
        elif char == "{":
            raise InvalidName(f"nested braces in {pattern!r}; braces cannot be nested")
        elif char == "}":
            parts.append(_parse_group(pattern, "".join(group)))
            group = None
        else:
            group.append(char)
    if group is not None:
        raise InvalidName(f"unbalanced '{{' in {pattern!r}; braces come in pairs")
    if literal:
        parts.append("".join(literal))
    return parts


def _size(part: _Part) -> int:
    if isinstance(part, str):
        return 1
    if isinstance(part, _Range):
        return part.size
    return len(part)


def _expand(parts: Sequence[_Part]) -> Iterator[str]:
    choices: list[Iterable[str]] = [(part,) if isinstance(part, str) else part
                                    for part in parts]
    for combination in itertools.product(*choices):
        yield "".join(combination)


def expand_batch(patterns: Iterable[str], *, cap: int = 1000) -> list[str]:
    """Expand shell-like brace patterns into a list of names.

    Each pattern may hold several brace groups, each a comma list ``{a,b,c}`` or
    a numeric range ``{1..8}`` (descending ``{3..1}`` counts down; a leading
    zero on either end, ``{01..10}``, pads every number to the wider end). The
    groups of one pattern combine as a cartesian product, the leftmost varying
    slowest, like the shell. Results keep the order of the patterns and their
    expansion; repeats are dropped. Names are not validated here.

    The size of the whole batch, repeats included, is computed before any name
    is built, so a huge range is refused at once.

    Raises:
        InvalidName: a pattern is empty or has malformed braces (unbalanced,
            nested, empty, an empty list item, or a range that is not
            ``{M..N}`` with whole numbers).
        InvalidRequest: the batch expands to more than ``cap`` names.
    """
    parsed = [_parse_pattern(pattern) for pattern in patterns]
    total = sum(math.prod(_size(part) for part in parts) for parts in parsed)
    if total > cap:
        raise InvalidRequest(
            f"the batch expands to more than {cap} names; start fewer VMs at once",
            details={"cap": cap})
    seen: dict[str, None] = {}
    for parts in parsed:
        for name in _expand(parts):
            seen.setdefault(name, None)
    return list(seen)
