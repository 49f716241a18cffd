"""A real controller, in this process, on loopback.

The :func:`controller` fixture runs a site built the way ``usher-controller
init`` does (site PKI, SQLite schema by migration, users in the embedded
store): the site is made once per session and each test gets a copy of its
database in ``tmp_path``. The fixture starts
:class:`~usher.controller.app.Controller` on an ephemeral port and stops it
after the test. Timeouts are shrunk so that the
hardening paths (hello deadline, TLS handshake deadline, login limits) run in
a fraction of a second.

:class:`RunningController` carries the helpers tests need: TLS contexts, a
normal login, a raw hello, join tokens, host certificates and in-process node
managers on the fake driver.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import secrets
import shutil
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from usher.client import AsyncClient
from usher.config import ControllerConfig, LnmConfig
from usher.controller import auth
from usher.controller import db as dbmod
from usher.controller.app import Controller
from usher.controller.models import JoinToken
from usher.lnm.agent import NodeAgent
from usher.lnm.drivers import make_driver
from usher.protocol import frames, tls
from usher.protocol.connection import Connection, dial
from usher.protocol.frames import Envelope, Hello
from usher.protocol.ops import Empty, WhoAmI
from usher.protocol.pki import SitePki, issue_host_cert_files, write_site_pki

SITE = "usher.test"
USER = "seuss"
OTHER_USER = "horton"
PASSWORD = "green-eggs-and-ham"
OTHER_PASSWORD = "who-hears-a-who"

HELLO_TIMEOUT_S = 0.3
MAX_UNAUTHENTICATED = 4
LOGIN_MAX_FAILURES = 3
LOGIN_MAX_FAILURES_PER_ADDRESS = 5
WAIT_S = 5.0
"""Upper bound of every wait in these tests; a healthy run takes far less."""


@dataclass
class RunningController:
    """A started in-process controller and what a test needs to talk to it."""

    cfg: ControllerConfig
    ctrl: Controller
    host: str
    port: int
    pki: SitePki
    tmp: Path
    user: str = USER
    password: str = PASSWORD
    _conns: list[Connection] = field(default_factory=list)
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)
    _nodes: list[tuple[asyncio.Event, asyncio.Task[None]]] = field(default_factory=list)
    closed: bool = False

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def ca(self) -> Path:
        return self.pki.ca_cert

    # ------------------------------------------------------------ TLS
    def client_ssl(self, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
        """A client context trusting the site CA, presenting ``cert`` if given."""
        return tls.client_context(self.ca, cert_file=cert, key_file=key)

    def issue_host_cert(self, hostname: str) -> tuple[Path, Path]:
        """Issue a host certificate; returns (cert path, key path)."""
        return issue_host_cert_files(self.pki, hostname, self.tmp / "hosts" / hostname)

    async def open_tls(self, *, cert: tuple[Path, Path] | None = None,
                       local_addr: str | None = None
                       ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A TLS connection with the handshake done and nothing sent."""
        context = self.client_ssl(*cert) if cert else self.client_ssl()
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            self.host, self.port, ssl=context, server_hostname="localhost",
            local_addr=(local_addr, 0) if local_addr else None), WAIT_S)
        self._writers.append(writer)
        return reader, writer

    async def hello(self, hello: Hello, *, cert: tuple[Path, Path] | None = None,
                    local_addr: str | None = None) -> Envelope:
        """Send ``hello`` on a fresh connection and return the controller's answer."""
        reader, writer = await self.open_tls(cert=cert, local_addr=local_addr)
        writer.write(frames.pack(hello))
        return await asyncio.wait_for(frames.read_frame(reader, frames.MAX_FRAME), WAIT_S)

    def client_hello(self, user: str | None = None, password: str | None = None,
                     versions: list[int] | None = None) -> Hello:
        return Hello(versions=versions or list(frames.PROTOCOL_VERSIONS), role="client",
                     software="tests", user=user or self.user,
                     password=self.password if password is None else password)

    # ------------------------------------------------------------ sessions
    async def client(self, user: str | None = None, password: str | None = None, *,
                     reconnect: bool = True) -> AsyncClient:
        """A connected :class:`AsyncClient` of ``user`` (default: the site's user);
        the caller closes it."""
        client = AsyncClient(self.host, self.port, ca_cert=str(self.ca), user=user or self.user,
                             password=self.password if password is None else password,
                             server_hostname="localhost",
                             reconnect=reconnect)
        await client.connect()
        return client

    async def login(self, user: str | None = None, password: str | None = None) -> Connection:
        """Log in as a normal client does; raises the controller's refusal."""
        hello = self.client_hello(user, password)
        reader, writer, welcome = await dial(self.host, self.port, self.client_ssl(), hello,
                                             server_hostname="localhost", timeout=WAIT_S)
        self._writers.append(writer)
        tls.require_role(writer.get_extra_info("ssl_object"), "controller")
        conn = Connection(reader, writer, peer_role="controller", peer_name="controller",
                          heartbeat_s=welcome.heartbeat_s)
        conn.start()
        self._conns.append(conn)
        return conn

    async def assert_serving(self, user: str = USER, password: str = PASSWORD) -> None:
        """The controller still logs a normal client in and answers it."""
        conn = await self.login(user, password)
        me = await conn.request("session.whoami", Empty(), timeout=WAIT_S)
        assert isinstance(me, WhoAmI)
        assert me.user == user and me.site == SITE
        await conn.close("test done")

    # ------------------------------------------------------------ nodes
    def image_dir(self, hostname: str) -> Path:
        """The image store of the node manager ``start_node`` runs for ``hostname``."""
        return self.tmp / "images" / hostname

    def add_join_token(self, hostname: str, ttl_s: float = 600.0) -> str:
        """Store a join token as ``usher-controller join-token`` does; returns it."""
        token = secrets.token_urlsafe(24)
        row = JoinToken(token_hash=hashlib.sha256(token.encode()).hexdigest(),
                        hostname=hostname, expires=time.time() + ttl_s)
        db = dbmod.Database(dbmod.make_engine(self.cfg.database_url))
        try:
            db.run_sync(lambda s: s.add(row))
        finally:
            db.close()
        return token

    async def start_node(self, hostname: str, *, cpus: int = 8, memory_mib: int = 16384,
                         vlans: list[int] | None = None, shared_store: str = "",
                         image_dir: Path | None = None) -> NodeAgent:
        """Run a node manager on the fake driver until the fixture ends.

        Its image store is ``image_dir`` or else ``images/HOSTNAME`` under the
        test's directory (the fake driver ignores what a VM boots from, but
        the node manager still fetches and checks the files).
        """
        cert, key = self.issue_host_cert(hostname)
        config = LnmConfig(controller_host=self.host, controller_port=self.port,
                           controller_name="localhost", ca_cert=str(self.ca), cert=str(cert),
                           key=str(key), hostname=hostname, driver="fake",
                           backoff_initial_s=0.05, backoff_max_s=0.2, call_timeout_s=WAIT_S,
                           vlans=vlans or [], shared_store=shared_store,
                           image_dir=str(image_dir or self.image_dir(hostname)))
        driver = make_driver("fake", hostname=hostname, cpus=cpus, memory_mib=memory_mib)
        agent = NodeAgent(config, driver)
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop), name=f"lnm:{hostname}")
        self._nodes.append((stop, task))
        registered = asyncio.create_task(agent.registered.wait())
        done, _ = await asyncio.wait({registered, task}, timeout=WAIT_S,
                                     return_when=asyncio.FIRST_COMPLETED)
        registered.cancel()
        if task in done:
            task.result()  # the agent gave up: show why
        assert registered in done, f"{hostname} did not register within {WAIT_S} s"
        return agent

    async def close(self) -> None:
        """Stop the node managers, connections and the controller; idempotent."""
        if self.closed:
            return
        self.closed = True
        for stop, _task in self._nodes:
            stop.set()
        for _stop, task in self._nodes:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, WAIT_S)
        for conn in self._conns:
            await conn.close("test done")
        for writer in self._writers:
            writer.close()
        await self.ctrl.stop()


def write_site(tmp: Path) -> tuple[ControllerConfig, SitePki]:
    """Config, PKI, schema and users of a test site under ``tmp``."""
    pki = write_site_pki(tmp / "pki", site=SITE, controller_names=["localhost"])
    url = f"sqlite:///{tmp / 'state' / 'usher.db'}"
    cfg = ControllerConfig(
        site_domain=SITE, listen_host="127.0.0.1", listen_port=0, database_url=url,
        ca_cert=str(pki.ca_cert), ca_key=str(pki.ca_key), cert=str(pki.controller_cert),
        key=str(pki.controller_key), heartbeat_s=1.0, host_lost_after_s=5.0,
        hello_timeout_s=HELLO_TIMEOUT_S, max_unauthenticated=MAX_UNAUTHENTICATED,
        login_max_failures=LOGIN_MAX_FAILURES,
        login_max_failures_per_address=LOGIN_MAX_FAILURES_PER_ADDRESS, login_window_s=60.0,
        task_deadline_s=10.0)
    dbmod.upgrade(url)
    db = dbmod.Database(dbmod.make_engine(url))
    try:
        db.run_sync(lambda s: auth.add_user(s, USER, PASSWORD))
        db.run_sync(lambda s: auth.add_user(s, OTHER_USER, OTHER_PASSWORD))
    finally:
        db.close()
    return cfg, pki


@dataclass(frozen=True)
class SiteTemplate:
    """A site made once per test session; each test copies its database."""

    cfg: ControllerConfig
    pki: SitePki
    db_file: Path


@pytest.fixture(scope="session")
def site_template(tmp_path_factory: pytest.TempPathFactory) -> SiteTemplate:
    tmp = tmp_path_factory.mktemp("site")
    cfg, pki = write_site(tmp)
    return SiteTemplate(cfg=cfg, pki=pki, db_file=tmp / "state" / "usher.db")


MakeController = Callable[..., Awaitable[RunningController]]


@pytest.fixture
async def make_controller(site_template: SiteTemplate,
                          tmp_path: Path) -> AsyncIterator[MakeController]:
    """Start controllers on this test's copy of the site database.

    ``make(setup=job, **settings)`` runs ``job(session)`` on the database
    first (ranges, say), then starts a controller with the template's config
    changed by ``settings``. Several calls share one database (a restart);
    every controller still running is stopped when the test ends.
    """
    db_file = tmp_path / "state" / "usher.db"
    db_file.parent.mkdir()
    for suffix in ("", "-wal"):  # the WAL is normally checkpointed away on close
        source = site_template.db_file.with_name(site_template.db_file.name + suffix)
        if source.exists():
            shutil.copyfile(source, db_file.with_name(db_file.name + suffix))
    running: list[RunningController] = []

    async def make(*, setup: Callable[[Session], object] | None = None,
                   **settings: object) -> RunningController:
        cfg = dataclasses.replace(site_template.cfg, database_url=f"sqlite:///{db_file}",
                                  **settings)  # type: ignore[arg-type]
        if setup is not None:
            db = dbmod.Database(dbmod.make_engine(cfg.database_url))
            try:
                db.run_sync(setup)
            finally:
                db.close()
        ctrl = Controller(cfg)
        host, port = await ctrl.start()
        one = RunningController(cfg=cfg, ctrl=ctrl, host=host, port=port,
                                pki=site_template.pki, tmp=tmp_path)
        running.append(one)
        return one

    try:
        yield make
    finally:
        for one in running:
            await one.close()


@pytest.fixture
async def controller(make_controller: MakeController) -> RunningController:
    return await make_controller()
