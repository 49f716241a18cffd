"""Where everything lives in the site's directory: the DIT, its DNs and filters.

This module is the one place that knows the shape of the directory tree and the
one place that turns values into DN and filter text, always escaped
(``escape_rdn`` for DN values, ``escape_filter_chars`` for filter values), so no
caller ever pastes a name into LDAP syntax. It does no I/O. For the site domain
``usher.test`` the tree is::

    dc=usher,dc=test                              the site suffix
    ├── cn=admin                                  the site admin bind account
    ├── ou=services
    │   └── cn=controller                         the controller's service account
    ├── ou=counters
    │   └── cn=nextId                             next free uid/gid number
    ├── ou=groups
    │   └── cn=usher-users                        Usher users (may log in to ush)
    └── ou=clusters
        ├── ou=usher.test                         the site cluster: Usher users' homes
        └── ou=bluefish.seuss.usher.test          one branch per cluster, by FQDN
            ├── ou=people
            │   ├── uid=alice                     a person whose home is here
            │   └── uid=seuss                     an alias: a person linked in
            └── ou=groups
                ├── cn=admin, cn=power            in every cluster
                ├── cn=alice                      alice's private group
                └── cn=seuss                      an alias to seuss's private group

Cluster branches are flat (all siblings under ``ou=clusters``) because clusters
are flat administrative domains: a subtree search of one cluster's branch must
never see another cluster's people. ``docs/directory.md`` explains the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import escape_rdn, parse_dn

from usher.errors import InvalidName
from usher.names import validate_domain

__all__ = [
    "ADMIN_GROUP",
    "FIRST_ID",
    "MAX_ID",
    "POWER_GROUP",
    "USHER_USERS_GROUP",
    "Attributes",
    "Layout",
    "base_entries",
    "cluster_entries",
    "escape_dn_value",
    "filter_and",
    "filter_eq",
    "filter_or",
    "suffix_for",
]

ADMIN_GROUP = "admin"
POWER_GROUP = "power"
USHER_USERS_GROUP = "usher-users"
#: uid and gid numbers handed out start here; slapd refuses smaller ones.
FIRST_ID = 10000
#: The largest uid/gid number slapd accepts (nine digits, well below 2**31).
MAX_ID = 999_999_999


def escape_dn_value(value: str) -> str:
    """``value`` escaped for use as an attribute value in a DN (RFC 4514).

    ldap3's ``escape_rdn`` escapes NUL as a backslash followed by a raw NUL;
    RFC 4514 wants the hex pair ``\\00``, which this fixes.
    """
    return escape_rdn(value).replace("\\\x00", "\\00")


def filter_eq(attribute: str, value: str) -> str:
    """The equality filter ``(attribute=value)`` with ``value`` escaped."""
    return f"({attribute}={escape_filter_chars(value)})"


def filter_and(*parts: str) -> str:
    """The conjunction of already built filters."""
    return "(&" + "".join(parts) + ")"


def filter_or(*parts: str) -> str:
    """The disjunction of already built filters."""
    return "(|" + "".join(parts) + ")"


def suffix_for(site_domain: str) -> str:
    """The directory suffix of a site: ``usher.test`` gives ``dc=usher,dc=test``.

    Raises:
        InvalidName: ``site_domain`` is not a valid domain name.
    """
    domain = validate_domain(site_domain)
    return ",".join(f"dc={escape_dn_value(label)}" for label in domain.split("."))


@dataclass(frozen=True)
class Layout:
    """The DNs of one site's directory. Plain data; build it with :meth:`for_site`.

    Methods taking a cluster expect a validated, lower-case FQDN and methods
    taking a uid or group name a validated name; they escape them all the same.
    """

    site: str
    suffix: str

    @classmethod
    def for_site(cls, site_domain: str) -> Layout:
        """The layout of the site ``site_domain``.

        Raises:
            InvalidName: ``site_domain`` is not a valid domain name.
        """
        site = validate_domain(site_domain)
        return cls(site=site, suffix=suffix_for(site))

    # --- site-wide entries ---------------------------------------------------
    @property
    def site_admin_dn(self) -> str:
        """The site admin's bind DN: may write everything but read no hash."""
        return f"cn=admin,{self.suffix}"

    @property
    def services_dn(self) -> str:
        return f"ou=services,{self.suffix}"

    @property
    def service_dn(self) -> str:
        """The controller's bind DN: creates cluster branches, reads Usher users."""
        return f"cn=controller,{self.services_dn}"

    @property
    def counters_dn(self) -> str:
        return f"ou=counters,{self.suffix}"

    @property
    def id_counter_dn(self) -> str:
        """The counter entry whose ``usherNextId`` is the next uid/gid number."""
        return f"cn=nextId,{self.counters_dn}"

    @property
    def site_groups_dn(self) -> str:
        return f"ou=groups,{self.suffix}"

    @property
    def usher_users_dn(self) -> str:
        """The site group of Usher users, by ``memberUid``."""
        return f"cn={USHER_USERS_GROUP},{self.site_groups_dn}"

    @property
    def clusters_dn(self) -> str:
        """The parent of every cluster branch."""
        return f"ou=clusters,{self.suffix}"

    # --- cluster branches ----------------------------------------------------
    def cluster_dn(self, cluster: str) -> str:
        """The branch of cluster ``cluster`` (an FQDN)."""
        return f"ou={escape_dn_value(cluster)},{self.clusters_dn}"

    def people_dn(self, cluster: str) -> str:
        """Where a cluster's people and links to people live."""
        return f"ou=people,{self.cluster_dn(cluster)}"

    def groups_dn(self, cluster: str) -> str:
        """Where a cluster's groups and links to private groups live."""
        return f"ou=groups,{self.cluster_dn(cluster)}"

    def person_dn(self, cluster: str, uid: str) -> str:
        """The entry of ``uid`` in ``cluster``: their home entry or a link."""
        return f"uid={escape_dn_value(uid)},{self.people_dn(cluster)}"

    def group_dn(self, cluster: str, name: str) -> str:
        """The group ``name`` of ``cluster`` (or a link to a private group)."""
        return f"cn={escape_dn_value(name)},{self.groups_dn(cluster)}"

    def admin_group_dn(self, cluster: str) -> str:
        return self.group_dn(cluster, ADMIN_GROUP)

    # --- reading DNs back ----------------------------------------------------
    def cluster_of(self, dn: str) -> str:
        """The cluster FQDN of an entry at or below a cluster branch.

        Raises:
            InvalidName: ``dn`` is not below ``ou=clusters`` of this site.
        """
        try:
            parts = parse_dn(dn)
        except Exception as exc:  # ldap3 raises its own LDAPInvalidDnError
            raise InvalidName(f"{dn!r} is not a valid DN") from exc
        suffix = parse_dn(self.clusters_dn)
        n = len(suffix)
        tail = [(a.lower(), v.lower()) for a, v, _ in parts[-n:]] if len(parts) > n else []
        if tail != [(a.lower(), v.lower()) for a, v, _ in suffix]:
            raise InvalidName(f"{dn} is not in a cluster branch of {self.site}")
        attr, value, _ = parts[-n - 1]
        if attr.lower() != "ou":
            raise InvalidName(f"{dn} is not in a cluster branch of {self.site}")
        return value.lower()


Attributes = dict[str, list[str]]
"""An entry's attributes as ldap3 takes them for an add: name to string values."""


def cluster_entries(layout: Layout, cluster: str, *, admin_gid: int,
                    power_gid: int) -> list[tuple[str, Attributes]]:
    """The entries of a new cluster branch, parents first.

    The branch, its ``people`` and ``groups`` containers, and the ``admin``
    and ``power`` groups (empty) with the given gid numbers.
    """
    def group(name: str, gid: int) -> tuple[str, Attributes]:
        return layout.group_dn(cluster, name), {
            "objectClass": ["top", "posixGroup"], "cn": [name], "gidNumber": [str(gid)]}

    def ou(dn: str, name: str) -> tuple[str, Attributes]:
        return dn, {"objectClass": ["top", "organizationalUnit"], "ou": [name]}

    return [
        ou(layout.cluster_dn(cluster), cluster),
        ou(layout.people_dn(cluster), "people"),
        ou(layout.groups_dn(cluster), "groups"),
        group(ADMIN_GROUP, admin_gid),
        group(POWER_GROUP, power_gid),
    ]


def base_entries(layout: Layout, *, admin_password_hash: str,
                 service_password_hash: str) -> list[tuple[str, Attributes]]:
    """The entries a new site's directory starts with, parents first.

    The suffix; the site admin and the controller's service account (their
    ``userPassword`` must already be hashed, e.g. ``{SSHA}...``); the id
    counter; the Usher-users group; and the site cluster (named by the site
    domain), which holds the home entries of Usher users and whose admin group
    starts empty, so only the site admin manages those accounts.
    """
    def ou(dn: str, name: str) -> tuple[str, Attributes]:
        return dn, {"objectClass": ["top", "organizationalUnit"], "ou": [name]}

    def account(dn: str, name: str, password_hash: str, what: str) -> tuple[str, Attributes]:
        return dn, {"objectClass": ["top", "organizationalRole", "simpleSecurityObject"],
                    "cn": [name], "userPassword": [password_hash], "description": [what]}

    suffix = layout.suffix
    return [
        (suffix, {"objectClass": ["top", "dcObject", "organization"],
                  "dc": [layout.site.split(".")[0]], "o": [layout.site]}),
        account(layout.site_admin_dn, "admin", admin_password_hash,
                f"The site admin of {layout.site}"),
        ou(layout.services_dn, "services"),
        account(layout.service_dn, "controller", service_password_hash,
                "The usher controller's service account"),
        ou(layout.counters_dn, "counters"),
        (layout.id_counter_dn, {"objectClass": ["top", "usherCounter"], "cn": ["nextId"],
                                "usherNextId": [str(FIRST_ID + 3)]}),
        ou(layout.site_groups_dn, "groups"),
        (layout.usher_users_dn, {"objectClass": ["top", "posixGroup"],
                                 "cn": [USHER_USERS_GROUP], "gidNumber": [str(FIRST_ID)],
                                 "description": ["Usher users: may log in to ush"]}),
        ou(layout.clusters_dn, "clusters"),
        *cluster_entries(layout, layout.site, admin_gid=FIRST_ID + 1, power_gid=FIRST_ID + 2),
    ]
