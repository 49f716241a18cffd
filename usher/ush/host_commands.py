"""ush commands on VMMs (the hosts VMs run on): ``vmm_list`` and site-admin upkeep.

``vmm_disable``, ``vmm_enable`` and ``vmm_remove`` are for the site admin;
the controller refuses them for anyone else, and ush prints its refusal.
Each verb is a parser builder (see :mod:`.parsers`) beside its body, free of
cmd2.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from usher.client import Client, HostInfo
from usher.ush import format as fmt
from usher.ush.parsers import Command, P, ParserKit, host_parser
from usher.ush.session import Session

__all__ = ["COMMANDS"]


def _change(session: Session, request: Callable[[Client], HostInfo], done: str) -> None:
    host = session.call(request)
    if host is not None:
        session.output(f"{host.name}: {done} (now {host.state})")


def vmm_list_parser(kit: ParserKit[P]) -> P:
    parser = kit.parser("vmm_list", """\
show list of VMM names

Lists the VMMs (hosts) with their state (up, disabled, lost), their CPUs and
memory, what their VMs use (memory MiB / vcpus) and how many VMs they run.
--json prints a JSON array for scripts.

example:
  vmm_list
  vmm_list --json""")
    parser.add_argument("--json", action="store_true", help="print a JSON array")
    return parser


def list_hosts(session: Session, args: argparse.Namespace) -> None:
    hosts = session.call(lambda c: c.list_hosts())
    if hosts is None:
        return
    if args.json:
        session.output(fmt.to_json(hosts))
    elif not hosts:
        session.output("no VMMs")
    else:
        session.output(fmt.host_table(hosts))


def vmm_disable_parser(kit: ParserKit[P]) -> P:
    return host_parser(kit, "vmm_disable", """\
stop placing new VMs on a VMM (site admin)

The VMM keeps running its VMs but gets no new ones. Applies to: up VMMs.

example:
  vmm_disable vmm3""")


def disable_host(session: Session, args: argparse.Namespace) -> None:
    _change(session, lambda c: c.host_disable(args.name), "disabled")


def vmm_enable_parser(kit: ParserKit[P]) -> P:
    return host_parser(kit, "vmm_enable", """\
place VMs on a disabled VMM again (site admin)

Applies to: disabled VMMs.

example:
  vmm_enable vmm3""")


def enable_host(session: Session, args: argparse.Namespace) -> None:
    _change(session, lambda c: c.host_enable(args.name), "enabled")


def vmm_remove_parser(kit: ParserKit[P]) -> P:
    return host_parser(kit, "vmm_remove", """\
forget an empty VMM (site admin)

Removes a VMM that runs no VMs from usher; migrate or destroy its VMs first.
Applies to: VMMs without VMs, in any state.

example:
  vmm_remove vmm3""")


def remove_host(session: Session, args: argparse.Namespace) -> None:
    _change(session, lambda c: c.host_remove(args.name), "removed")


COMMANDS = (
    Command("vmm_list", vmm_list_parser, list_hosts),
    Command("vmm_disable", vmm_disable_parser, disable_host),
    Command("vmm_enable", vmm_enable_parser, enable_host),
    Command("vmm_remove", vmm_remove_parser, remove_host),
)
