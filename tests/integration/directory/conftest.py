"""A real slapd for the directory tests, started once, wiped before each test.

The session-scoped :func:`slapd` fixture runs :class:`~usher.directory.slapd.Slapd`
(the same class ``usher demo`` uses) in a temporary directory. The
function-scoped :func:`site` fixture first wipes every cluster branch, the
people and groups of the site cluster and the Usher-users group (as the rootdn),
then builds the same small world for every test:

* Usher users ``seuss`` and ``horton`` (homes in the site cluster);
* cluster ``bluefish.seuss.usher.test`` (``A``), created by the controller's
  service account for ``seuss``, with ``alice`` and ``bob`` homed there;
* cluster ``redfish.horton.usher.test`` (``B``), created for ``horton``, with
  ``carol`` homed there.

:class:`Site` hands out sessions: :meth:`Site.plain` is a bare ldap3 connection
(no usher code between the test and slapd, for the ACL tests), the other helpers
return :class:`~usher.directory.client.Directory` sessions.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from ldap3 import DEREF_NEVER, MODIFY_REPLACE, SUBTREE, Connection, Server

from usher.directory.client import Directory
from usher.directory.layout import Layout
from usher.directory.slapd import Slapd

SITE = "usher.test"
A = "bluefish.seuss.usher.test"
B = "redfish.horton.usher.test"
ROOT_PASSWORD = "root-secret"
ADMIN_PASSWORD = "site-admin-secret"
SERVICE_PASSWORD = "controller-secret"
PASSWORDS = {"seuss": "green-eggs", "horton": "hears-a-who", "alice": "wonderland",
             "bob": "builder", "carol": "christmas"}


@pytest.fixture(scope="session")
def slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    server = Slapd(tmp_path_factory.mktemp("slapd"), SITE, root_password=ROOT_PASSWORD,
                   admin_password=ADMIN_PASSWORD, service_password=SERVICE_PASSWORD,
                   durable=False)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Site:
    """The running test site: its URL, layout and ways to talk to it."""

    slapd: Slapd
    layout: Layout

    @property
    def url(self) -> str:
        return self.slapd.url

    def root(self) -> Connection:
        """A plain connection as the rootdn, which no ACL restricts."""
        return self.slapd.root_connection()

    def plain(self, dn: str | None = None, password: str | None = None) -> Connection:
        """A plain ldap3 connection bound as ``dn`` (anonymous when None).

        Operations return False and leave the reason in ``conn.result`` rather
        than raising, so tests can check the LDAP result code slapd gave.
        """
        conn = Connection(Server(self.url), user=dn, password=password,
                          raise_exceptions=False, receive_timeout=5)
        assert conn.bind(), conn.result
        return conn

    def plain_user(self, cluster: str, uid: str) -> Connection:
        """A plain connection bound as the person ``uid`` whose home is ``cluster``."""
        return self.plain(self.layout.person_dn(cluster, uid), PASSWORDS[uid])

    def admin(self, **kwargs: object) -> Directory:
        """A Directory session as the site admin."""
        return Directory.connect(self.url, SITE, self.layout.site_admin_dn, ADMIN_PASSWORD,
                                 **kwargs)  # type: ignore[arg-type]

    def service(self, **kwargs: object) -> Directory:
        """A Directory session as the controller's service account."""
        return Directory.connect(self.url, SITE, self.layout.service_dn, SERVICE_PASSWORD,
                                 **kwargs)  # type: ignore[arg-type]

    def user(self, cluster: str, uid: str, **kwargs: object) -> Directory:
        """A Directory session as ``uid``, logging in through ``cluster``."""
        return Directory.bind_user(self.url, SITE, cluster, uid, PASSWORDS[uid],
                                   **kwargs)  # type: ignore[arg-type]

    def anonymous(self) -> Directory:
        return Directory.connect(self.url, SITE)

    def dns(self, base: str) -> set[str]:
        """Every DN at or under ``base`` (as the rootdn, links not followed)."""
        conn = self.root()
        conn.search(base, "(objectClass=*)", SUBTREE, dereference_aliases=DEREF_NEVER)
        found = {e["dn"].lower() for e in conn.response if e.get("type") == "searchResEntry"}
        conn.unbind()
        return found

    def snapshot(self) -> dict[str, dict[str, list[bytes]]]:
        """Every entry of the site with its attributes, to compare before and after."""
        conn = self.root()
        conn.search(self.layout.suffix, "(objectClass=*)", SUBTREE,
                    dereference_aliases=DEREF_NEVER, attributes=["*"])
        found = {e["dn"].lower(): {k.lower(): sorted(v) for k, v in e["raw_attributes"].items()}
                 for e in conn.response if e.get("type") == "searchResEntry"}
        conn.unbind()
        return found

    def wipe(self) -> None:
        """Remove every cluster but the site cluster's base entries, and Usher users."""
        site = self.layout
        keep = {site.cluster_dn(SITE), site.people_dn(SITE), site.groups_dn(SITE),
                site.admin_group_dn(SITE), site.group_dn(SITE, "power")}
        conn = self.root()
        conn.search(site.clusters_dn, "(objectClass=*)", SUBTREE,
                    dereference_aliases=DEREF_NEVER, attributes=["1.1"])
        doomed = [e["dn"] for e in conn.response if e.get("type") == "searchResEntry"
                  and e["dn"].lower() != site.clusters_dn and e["dn"].lower() not in keep]
        for dn in sorted(doomed, key=lambda d: -d.count(",")):
            conn.delete(dn)
        for group in (site.usher_users_dn, site.admin_group_dn(SITE),
                      site.group_dn(SITE, "power")):
            conn.modify(group, {"memberUid": [(MODIFY_REPLACE, [])]})
        conn.unbind()


@pytest.fixture
def site(slapd: Slapd) -> Iterator[Site]:
    world = Site(slapd, slapd.layout)
    world.wipe()
    with world.admin() as admin:
        admin.add_usher_user("seuss", "Theodor Seuss Geisel", PASSWORDS["seuss"])
        admin.add_usher_user("horton", "Horton the Elephant", PASSWORDS["horton"])
    with world.service() as service:
        service.ensure_cluster(A, "seuss")
        service.ensure_cluster(B, "horton")
    with world.user(SITE, "seuss") as seuss:
        seuss.add_user(A, "alice", "Alice Liddell", PASSWORDS["alice"])
        seuss.add_user(A, "bob", "Bob the Builder", PASSWORDS["bob"])
    with world.user(SITE, "horton") as horton:
        horton.add_user(B, "carol", "Carol Singer", PASSWORDS["carol"])
    yield world

