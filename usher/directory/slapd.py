"""A private OpenLDAP slapd for one usher site, for tests and ``usher demo``.

:class:`Slapd` turns an empty directory into a running slapd that holds one
site's directory the way usher expects it: it writes a cn=config LDIF (module
``back_mdb`` with the ``unique`` and ``constraint`` overlays, the schemas core,
cosine, nis, inetorgperson, openssh-lpk and usher, one mdb database with the
site suffix, a hashed rootpw and the ACLs of ``ldif/acl.ldif``; passwords are
hashed as ``{SSHA512}`` by the ``pw-sha2`` module) and loads it
with ``slapadd -n0``; starts ``slapd -d 0`` as a child process (``-d`` keeps it
in the foreground, so its PID is ours and no pid file is needed) listening on
loopback TCP and on an ldapi socket in the directory; waits, within a bound,
until it answers; and adds the base entries of :mod:`usher.directory.layout`
(suffix, service and site admin accounts, the id counter, the Usher-users group
and the site cluster). It stops the process by its PID.

It needs no systemd and works as root (slapd then runs as root, like every other
process of a test). Starting it again on the same directory keeps the data, and
the passwords given the first time.

In production a site runs its distribution's slapd instead and loads the same
``ldif/*.ldif`` files with ``ldapadd``/``ldapmodify``; see ``docs/directory.md``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from types import TracebackType

from ldap3 import HASHED_SALTED_SHA512, Connection, Server
from ldap3.core.exceptions import LDAPException
from ldap3.utils.hashed import hashed

from usher.directory import layout as lay
from usher.errors import ConfigError, Unavailable

__all__ = ["Slapd", "acl_rules", "hash_password", "render_template"]

log = logging.getLogger(__name__)

SYSTEM_SCHEMA_DIR = Path("/etc/ldap/schema")
SYSTEM_SCHEMAS = ("core", "cosine", "nis", "inetorgperson")
OUR_SCHEMAS = ("openssh-lpk", "usher")
MODULE_PATH = "/usr/lib/ldap"
MODULES = ("back_mdb", "unique", "constraint", "ppolicy", "pw-sha2")
#: The database's position in cn=config: ldapmodify acl.ldif targets this DN.
DATABASE_DN = "olcDatabase={1}mdb,cn=config"
MAX_SOCKET_PATH = 108

_PLACEHOLDER = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")


def _ldif_text(name: str) -> str:
    return resources.files("usher.directory").joinpath("ldif", name).read_text()


def render_template(text: str, values: Mapping[str, str]) -> str:
    """Replace every ``${NAME}`` (upper case) in ``text`` by ``values[NAME]``.

    Other dollar forms (``$1``, ``${1}`` of ACL regex substitutions) are left
    alone, which is why this is not :class:`string.Template`.

    Raises:
        ConfigError: the text names a placeholder ``values`` lacks.
    """
    def replace(match: re.Match[str]) -> str:
        try:
            return values[match.group(1)]
        except KeyError:
            raise ConfigError(f"no value for ${{{match.group(1)}}} in an LDIF template") \
                from None
    return _PLACEHOLDER.sub(replace, text)


def _unfold(text: str) -> list[str]:
    """The logical lines of LDIF text: comments dropped, folded lines joined."""
    lines: list[str] = []
    for raw in text.splitlines():
        if raw.startswith("#"):
            continue
        if raw.startswith(" ") and lines:
            lines[-1] += raw[1:]
        else:
            lines.append(raw)
    return lines


def _admins_of(group: int, suffix: str) -> str:
    """The ``by`` clause granting the admins of the cluster in submatch ``group``.

    The bound person's uid must be a memberUid of the cluster's admin group and
    the bound DN must be a user of the cluster: the DN of a person homed in its
    people branch, or the target of a link there.
    """
    people = f"ou=people,ou=${group},ou=clusters,{suffix}"
    return (f'set.expand="[cn=admin,ou=groups,ou=${group},ou=clusters,{suffix}]/memberUid'
            f" & (user & ([ldap:///{people}??one?(objectClass=posixAccount)]/entryDN"
            f' | [ldap:///{people}??one?(objectClass=alias)]/aliasedObjectName))/uid"')


def acl_rules(site_domain: str) -> list[str]:
    """The ``olcAccess`` values of ``ldif/acl.ldif`` rendered for a site, in order."""
    site = lay.Layout.for_site(site_domain)
    text = render_template(_ldif_text("acl.ldif"), {
        "SUFFIX": site.suffix, "SITE_ADMIN": site.site_admin_dn,
        "SERVICE": site.service_dn,
        **{f"ADMINS_OF_{n}": _admins_of(n, site.suffix) for n in (1, 2, 3)}})
    return [line.split(":", 1)[1].strip() for line in _unfold(text)
            if line.lower().startswith("olcaccess:")]


def hash_password(password: str) -> str:
    """``password`` as a salted SHA-512 ``{SSHA512}`` userPassword value.

    ldap3 writes the scheme in lower case; slapd's constraint on userPassword
    (no clear text) expects the upper-case form slapd itself writes.
    """
    value = hashed(HASHED_SALTED_SHA512, password)
    scheme, _, rest = value.partition("}")
    return scheme.upper() + "}" + rest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if found is None:
        raise ConfigError(f"{name} is not installed; install Debian's slapd package")
    return found


class Slapd:
    """One slapd holding one site's directory, run from the directory ``path``.

    ``path`` holds ``slapd.d`` (cn=config), ``data`` (the mdb database),
    ``ldapi`` (the socket) and ``slapd.log`` (its output). The three passwords
    are stored only as salted hashes. With ``durable=False`` the database is
    not synced to disk after each write (fast, for tests; a crash may lose the
    last writes). Use it as a context manager, or call :meth:`start` and
    :meth:`stop`.
    """

    def __init__(self, path: Path, site_domain: str, *, root_password: str,
                 admin_password: str, service_password: str,
                 port: int | None = None, durable: bool = True) -> None:
        self.path = Path(path).resolve()
        self.layout = lay.Layout.for_site(site_domain)
        self.root_dn = f"cn=root,{self.layout.suffix}"
        self._root_password = root_password
        self._admin_password = admin_password
        self._service_password = service_password
        self.port = port or _free_port()
        self.durable = durable
        self._proc: subprocess.Popen[bytes] | None = None

    # --- addresses -----------------------------------------------------------
    @property
    def url(self) -> str:
        """The TCP URL clients use: ``ldap://127.0.0.1:PORT``."""
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def ldapi_url(self) -> str | None:
        """The ldapi URL of the socket (its owner may bind there with SASL EXTERNAL).

        None when ``path`` is too deep for a Unix socket name (108 bytes); slapd
        then listens on TCP only.
        """
        socket_path = str(self.path / "ldapi")
        if len(socket_path.encode()) >= MAX_SOCKET_PATH:
            return None
        return "ldapi://" + urllib.parse.quote(socket_path, safe="")

    @property
    def pid(self) -> int | None:
        """The PID of the running slapd, or None."""
        return self._proc.pid if self._proc is not None else None

    # --- configuration -------------------------------------------------------
    def config_ldif(self) -> str:
        """The cn=config LDIF :meth:`start` loads with ``slapadd -n0``."""
        suffix = self.layout.suffix
        me = f"gidNumber={os.getgid()}+uidNumber={os.getuid()},cn=peercred,cn=external,cn=auth"
        parts = [f"""\
dn: cn=config
objectClass: olcGlobal
cn: config
olcPidFile: {self.path / 'slapd.pid'}
olcLogLevel: none

dn: cn=module{{0}},cn=config
objectClass: olcModuleList
cn: module{{0}}
olcModulePath: {MODULE_PATH}
""" + "".join(f"olcModuleLoad: {m}\n" for m in MODULES) + """
dn: cn=schema,cn=config
objectClass: olcSchemaConfig
cn: schema
"""]
        for name in SYSTEM_SCHEMAS:
            parts.append((SYSTEM_SCHEMA_DIR / f"{name}.ldif").read_text())
        for name in OUR_SCHEMAS:
            parts.append(_ldif_text(f"{name}.ldif"))
        access = "".join(f"olcAccess: {{{i}}}{rule}\n"
                         for i, rule in enumerate(acl_rules(self.layout.site)))
        parts.append(f"""\
dn: olcDatabase={{-1}}frontend,cn=config
objectClass: olcDatabaseConfig
objectClass: olcFrontendConfig
olcDatabase: {{-1}}frontend
olcPasswordHash: {{SSHA512}}
olcAccess: {{0}}to dn.base="" by * read
olcAccess: {{1}}to dn.base="cn=Subschema" by * read

dn: olcDatabase={{0}}config,cn=config
objectClass: olcDatabaseConfig
olcDatabase: {{0}}config
olcAccess: {{0}}to * by dn.exact="{me}" manage by * none

dn: {DATABASE_DN}
objectClass: olcDatabaseConfig
objectClass: olcMdbConfig
olcDatabase: {{1}}mdb
olcDbDirectory: {self.path / 'data'}
olcSuffix: {suffix}
olcRootDN: {self.root_dn}
olcRootPW: {hash_password(self._root_password)}
olcDbMaxSize: 1073741824
olcDbNoSync: {'FALSE' if self.durable else 'TRUE'}
olcSizeLimit: unlimited
olcDbIndex: objectClass eq
olcDbIndex: uid,cn,memberUid eq
olcDbIndex: uidNumber,gidNumber eq
olcDbIndex: aliasedObjectName eq
{access}
dn: olcOverlay={{0}}unique,{DATABASE_DN}
objectClass: olcOverlayConfig
objectClass: olcUniqueConfig
olcOverlay: {{0}}unique
olcUniqueURI: ldap:///{suffix}?uid?sub?(!(objectClass=alias))
olcUniqueURI: ldap:///{suffix}?uidNumber?sub?(objectClass=posixAccount)
olcUniqueURI: ldap:///{suffix}?gidNumber?sub?(objectClass=posixGroup)

dn: olcOverlay={{1}}constraint,{DATABASE_DN}
objectClass: olcOverlayConfig
objectClass: olcConstraintConfig
olcOverlay: {{1}}constraint
olcConstraintAttribute: uidNumber regex ^[1-9][0-9]{{4,8}}$
olcConstraintAttribute: gidNumber regex ^[1-9][0-9]{{4,8}}$
olcConstraintAttribute: usherNextId regex ^[1-9][0-9]{{4,8}}$
olcConstraintAttribute: userPassword regex ^[{{](SSHA|SSHA256|SSHA512|ARGON2)[}}]

dn: olcOverlay={{2}}ppolicy,{DATABASE_DN}
objectClass: olcOverlayConfig
objectClass: olcPPolicyConfig
olcOverlay: {{2}}ppolicy
olcPPolicyHashCleartext: TRUE
""")
        return "\n".join(p.rstrip("\n") + "\n" for p in parts)

    def _configure(self) -> None:
        config = self.path / "slapd.d"
        if config.exists():
            return
        (self.path / "data").mkdir(parents=True, exist_ok=True)
        ldif = self.path / "config.ldif"
        ldif.write_text(self.config_ldif())
        config.mkdir(mode=0o700)
        proc = subprocess.run([_tool("slapadd"), "-n0", "-F", str(config), "-l", str(ldif)],
                              capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            shutil.rmtree(config, ignore_errors=True)
            raise ConfigError(f"slapadd could not load the slapd configuration:"
                              f" {proc.stderr.strip() or proc.stdout.strip()}")

    # --- running -------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> str:
        """Configure (the first time), start slapd, wait for it, bootstrap; return the URL.

        Raises:
            ConfigError: slapd or slapadd is missing or refuses the configuration.
            Unavailable: slapd exited or did not answer within ``timeout``
                seconds (it is stopped then); the message quotes its log.
        """
        if self._proc is not None:
            return self.url
        self.path.mkdir(parents=True, exist_ok=True)
        self._configure()
        logfile = open(self.path / "slapd.log", "ab")  # noqa: SIM115 - held by the child
        try:
            self._proc = subprocess.Popen(
                [_tool("slapd"), "-d", "0", "-F", str(self.path / "slapd.d"),
                 "-h", " ".join(u for u in (f"{self.url}/", self.ldapi_url) if u)],
                stdin=subprocess.DEVNULL, stdout=logfile, stderr=subprocess.STDOUT)
        finally:
            logfile.close()
        try:
            self._wait_ready(timeout)
            self._bootstrap()
        except BaseException:
            self.stop()
            raise
        log.info("slapd for %s listening on %s (pid %d)", self.layout.site, self.url,
                 self._proc.pid)
        return self.url

    def _log_tail(self) -> str:
        try:
            lines = (self.path / "slapd.log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return " | ".join(lines[-5:])

    def _wait_ready(self, timeout: float) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            if self._proc.poll() is not None:
                raise Unavailable(f"slapd exited with status {self._proc.returncode}"
                                  f" at start: {self._log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise Unavailable(f"slapd did not answer on {self.url} within {timeout:g} s:"
                                  f" {self._log_tail()}")
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def root_connection(self) -> Connection:
        """A connection bound as the rootdn (bypasses every ACL; for setup and tests)."""
        conn = Connection(Server(self.url, connect_timeout=5), self.root_dn,
                          self._root_password, receive_timeout=10, raise_exceptions=True)
        conn.bind()
        return conn

    def _bootstrap(self) -> None:
        site = self.layout
        try:
            conn = self.root_connection()
        except LDAPException as exc:
            raise Unavailable(f"cannot bind to the new slapd at {self.url}: {exc}") from exc
        try:
            present = conn.search(site.suffix, "(objectClass=*)", search_scope="BASE")
        except LDAPException:
            present = False
        if present:
            conn.unbind()
            return
        entries = lay.base_entries(
            site, admin_password_hash=hash_password(self._admin_password),
            service_password_hash=hash_password(self._service_password))
        try:
            for dn, attributes in entries:
                conn.add(dn, attributes=attributes)
        except LDAPException as exc:
            raise Unavailable(f"cannot add the base entries to slapd at {self.url}: {exc}") \
                from exc
        finally:
            conn.unbind()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop slapd by its PID: SIGTERM, then SIGKILL after ``timeout`` seconds.

        Does nothing if it is not running. Safe to call twice.
        """
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("slapd (pid %d) ignored SIGTERM for %g s; killing it",
                            proc.pid, timeout)
                proc.kill()
                proc.wait()

    def __enter__(self) -> Slapd:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
