"""A throwaway usher site of real processes, for end-to-end tests.

Built on :class:`usher.demo.Demo`'s setup (config, PKI, users, fake hosts),
but every process is started and killed individually so tests can crash
them. Nothing here talks to the daemons except over their real sockets; the
fake hosts' state is read from their host files, which the node managers
write back after every change.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

from usher.client import Client
from usher.config import ControllerConfig, load_toml, to_toml
from usher.demo import Demo
from usher.lnm.fakehost import stored_domains

RUNSTATES = {"1": "running", "3": "paused", "5": "stopped"}
TEST_NS = "{http://libvirt.org/schemas/domain/test/1.0}"


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition",
             interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it is truthy; bounded in time."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last: {last!r})")


class Site:
    def __init__(self, directory: Path, lnms: int = 2, *, hypervisor: str = "fake",
                 **controller: Any) -> None:
        self.dir = directory
        self.demo = Demo(directory, lnms, None, hypervisor=hypervisor)
        self.info = self.demo.setup()
        cfg_path = Path(self.info["controller"]["config"])  # type: ignore[index]
        cfg = load_toml(ControllerConfig, cfg_path)
        cfg.heartbeat_s = 0.5
        cfg.host_lost_after_s = 1.5
        cfg.task_deadline_s = 20.0
        cfg.hello_timeout_s = 2.0
        for key, value in controller.items():
            setattr(cfg, key, value)
        cfg_path.write_text(to_toml(cfg))
        self.config = cfg
        self.controller: subprocess.Popen[bytes] | None = None
        self.lnm_procs: dict[int, subprocess.Popen[bytes]] = {}
        self.hosts: list[dict[str, Any]] = self.info["hosts"]  # type: ignore[assignment]
        self.password = Path(self.info["password_file"]).read_text().strip()  # type: ignore[arg-type]
        self._clients: list[Client] = []

    # ---------------------------------------------------------------- processes
    def _spawn(self, argv: list[str], log: str, env: dict[str, str] | None = None
               ) -> subprocess.Popen[bytes]:
        out = open(self.dir / "logs" / log, "ab")  # noqa: SIM115 - owned by the child
        try:
            return subprocess.Popen([sys.executable, *argv], stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env={**os.environ, **(env or {})})
        finally:
            out.close()

    def start_controller(self, failpoints: str = "") -> None:
        cfg = self.info["controller"]["config"]  # type: ignore[index]
        self.controller = self._spawn(["-m", "usher.controller.cli", "--config", cfg],
                                      "controller.log", {"USHER_FAILPOINTS": failpoints})

        def listening() -> bool:
            assert self.controller is not None
            if self.controller.poll() is not None:
                raise AssertionError(f"controller exited: {self.log('controller.log')}")
            import socket
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.config.listen_port), 0.2):
                return True
            return False

        wait_for(listening, 20, "controller to listen")

    def start_lnm(self, i: int) -> None:
        host = self.hosts[i]
        self.lnm_procs[i] = self._spawn(["-m", "usher.lnm.cli", "--config", host["config"]],
                                        f"lnm-{i}.log")

    def start(self) -> Site:
        self.start_controller()
        for i in range(len(self.hosts)):
            self.start_lnm(i)
        client = self.client()
        wait_for(lambda: sum(h.state == "up" for h in client.list_hosts()) == len(self.hosts),
                 20, "all hosts up")
        return self

    @staticmethod
    def kill(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGKILL) -> None:
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def reload_controller(self) -> None:
        """SIGHUP: the controller reads IP ranges and images again."""
        assert self.controller is not None
        self.controller.send_signal(signal.SIGHUP)

    def close(self) -> None:
        if self.demo.hypervisor == "qemu" and self.controller is not None:
            # Real guests outlive the site's processes: destroy what a test left.
            with contextlib.suppress(Exception):
                c = self.client()
                names = [v.name + "." for v in c.list_vms(all_users=True)]
                if names:
                    c.wait_all(c.destroy(names, force=True), 30)
        for c in self._clients:
            with contextlib.suppress(Exception):
                c.close()
        for proc in self.lnm_procs.values():
            self.kill(proc, signal.SIGTERM)
        self.kill(self.controller, signal.SIGTERM)
        if self.demo.slapd is not None:
            self.demo.slapd.stop()

    def log(self, name: str) -> str:
        path = self.dir / "logs" / name
        return path.read_text()[-4000:] if path.exists() else ""

    # ------------------------------------------------------------------ clients
    def client(self, user: str | None = None, password: str | None = None) -> Client:
        c = Client("127.0.0.1", self.config.listen_port, ca_cert=self.config.ca_cert,
                   user=user or "seuss", password=password or self.password,
                   server_hostname="localhost", reconnect_max_s=1.0)
        c.connect()
        self._clients.append(c)
        return c

    def ush(self, *commands: str, timeout: float = 60.0,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        ush = Path(sys.executable).parent / "ush"
        return subprocess.run([str(ush), *commands], capture_output=True, text=True,
                              timeout=timeout, env={**os.environ,
                                                    "USH_CONFIG": str(self.dir / "ush.config"),
                                                    "HOME": str(self.dir), **(env or {})})

    # --------------------------------------------------------------- fake hosts
    def domains(self, i: int) -> dict[str, tuple[str, str]]:
        """Domains on fake host ``i`` as its host file records them: uuid -> (name, state)."""
        path = Path(self.hosts[i]["uri"].removeprefix("test://"))
        out = {}
        for chunk in stored_domains(path).values():
            dom = ET.fromstring(chunk)
            uuid = dom.findtext("uuid") or ""
            state = RUNSTATES.get(dom.findtext(f"{TEST_NS}runstate") or "5", "?")
            if dom.find(f"{TEST_NS}hasmanagedsave") is not None:
                state = "hibernated"
            out[uuid] = (dom.findtext("name") or "", state)
        return out

    def all_domains(self) -> dict[str, list[tuple[int, str, str]]]:
        """uuid -> [(host index, name, state), ...] over every fake host."""
        out: dict[str, list[tuple[int, str, str]]] = {}
        for i in range(len(self.hosts)):
            for uuid, (name, state) in self.domains(i).items():
                out.setdefault(uuid, []).append((i, name, state))
        return out

    def demo_json(self) -> dict[str, Any]:
        return json.loads((self.dir / "demo.json").read_text()) if (
            self.dir / "demo.json").exists() else {}
