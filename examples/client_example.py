#!/usr/bin/env python3
"""Use the usher client library from a script: start two VMs, list them, destroy them.

The blocking :class:`usher.client.Client` suits scripts: each call returns
when the controller has answered. Mutations (``start``, ``destroy``, ...) are
accepted at once with one task per VM; ``wait_all`` blocks until the tasks
end. Settings come from the same files as ``ush`` (``/etc/usher/ush.config``,
``~/.usher/ush.config`` and the file ``USH_CONFIG`` names), which must hold
your password for a script to run unattended::

    USH_CONFIG=~/.usher/ush.config python examples/client_example.py

Exit status: 0 when every task succeeded, 1 when one failed, else the exit
code of the usher error that stopped the script.
"""

from __future__ import annotations

import getpass
import os
import sys
from pathlib import Path

from usher.client import Client, TaskInfo
from usher.config import load_ush_config
from usher.errors import UsherError

# Relative names: they become demo1.example.USER.SITE. A batch such as
# "{1..2}.example" would name the same two VMs; the controller expands it.
NAMES = ["demo1.example", "demo2.example"]


def show(info: TaskInfo) -> None:
    """Progress and completion pushes; called on the client's own thread."""
    print(f"  task {info.id[:8]} {info.op} {info.vm}: {info.state} {info.message}".rstrip())


def main() -> int:
    try:
        config = load_ush_config(dict(os.environ), Path.home())
        host, _, port = config.controller.rpartition(":")
        with Client(host, int(port), ca_cert=config.ca_cert,
                    user=config.user or getpass.getuser(), password=config.password,
                    reconnect_max_s=config.reconnect_max_s) as client:
            client.on_task = show
            who = client.connect()
            print(f"connected as {who.user}; VMs are named under {who.domain}")

            started = client.wait_all(client.start(NAMES, ram=256, vcpus=1), timeout_s=300)
            failed = [t for t in started if t.state == "error"]

            for vm in client.list_vms(NAMES):
                print(f"{vm.name}: {vm.state} on {vm.host} at {vm.ip or 'no address yet'}")

            client.wait_all(client.destroy(NAMES), timeout_s=300)
            return 1 if failed else 0
    except UsherError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
