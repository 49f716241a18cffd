"""ush commands on VMMs (the hosts VMs run on): ``vmm_list`` and site-admin upkeep.

``vmm_disable``, ``vmm_enable`` and ``vmm_remove`` are for the site admin;
the controller refuses them for anyone else, and ush prints its refusal.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING

from cmd2 import Cmd2ArgumentParser, CommandSet, RawDescriptionCmd2HelpFormatter, with_argparser

from usher.client import Client, HostInfo
from usher.ush import format as fmt
from usher.ush.completion import host_name_choices

if TYPE_CHECKING:
    from usher.ush.shell import UshApp  # noqa: F401 - named in the CommandSet base

__all__ = ["HostCommands"]


def host_parser(description: str) -> Cmd2ArgumentParser:
    """A parser for ``VERB NAME`` with VMM name completion."""
    parser = Cmd2ArgumentParser(description=description,
                                formatter_class=RawDescriptionCmd2HelpFormatter)
    parser.add_argument("name", metavar="NAME", help="VMM name, as vmm_list shows it",
                        choices_provider=host_name_choices)
    return parser


class HostCommands(CommandSet["UshApp"]):
    """Listing VMMs and, for the site admin, taking them in and out of service."""

    DEFAULT_CATEGORY = "VMMs"

    def _change(self, request: Callable[[Client], HostInfo], done: str) -> None:
        host = self._cmd.call(request)
        if host is not None:
            self._cmd.poutput(f"{host.name}: {done} (now {host.state})")

    vmm_list_parser = Cmd2ArgumentParser(
        formatter_class=RawDescriptionCmd2HelpFormatter,
        description="""\
show list of VMM names

Lists the VMMs (hosts) with their state (up, disabled, lost), their CPUs and
memory, what their VMs use (memory MiB / vcpus) and how many VMs they run.
--json prints a JSON array for scripts.

example:
  vmm_list
  vmm_list --json""")
    vmm_list_parser.add_argument("--json", action="store_true", help="print a JSON array")

    @with_argparser(vmm_list_parser)
    def do_vmm_list(self, args: argparse.Namespace) -> None:
        """show list of VMM names"""
        app = self._cmd
        hosts = app.call(lambda c: c.list_hosts())
        if hosts is None:
            return
        if args.json:
            app.poutput(fmt.to_json(hosts))
        elif not hosts:
            app.poutput("no VMMs")
        else:
            app.poutput(fmt.host_table(hosts))

    vmm_disable_parser = host_parser("""\
stop placing new VMs on a VMM (site admin)

The VMM keeps running its VMs but gets no new ones. Applies to: up VMMs.

example:
  vmm_disable vmm3""")

    @with_argparser(vmm_disable_parser)
    def do_vmm_disable(self, args: argparse.Namespace) -> None:
        """stop placing new VMs on a VMM (site admin)"""
        self._change(lambda c: c.host_disable(args.name), "disabled")

    vmm_enable_parser = host_parser("""\
place VMs on a disabled VMM again (site admin)

Applies to: disabled VMMs.

example:
  vmm_enable vmm3""")

    @with_argparser(vmm_enable_parser)
    def do_vmm_enable(self, args: argparse.Namespace) -> None:
        """place VMs on a disabled VMM again (site admin)"""
        self._change(lambda c: c.host_enable(args.name), "enabled")

    vmm_remove_parser = host_parser("""\
forget an empty VMM (site admin)

Removes a VMM that runs no VMs from usher; migrate or destroy its VMs first.
Applies to: VMMs without VMs, in any state.

example:
  vmm_remove vmm3""")

    @with_argparser(vmm_remove_parser)
    def do_vmm_remove(self, args: argparse.Namespace) -> None:
        """forget an empty VMM (site admin)"""
        self._change(lambda c: c.host_remove(args.name), "removed")
