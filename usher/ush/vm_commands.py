"""ush commands on VMs: the lifecycle verbs, ``migrate`` and ``list``.

Each command turns its arguments into one client call and prints the reply.
Names go to the controller exactly as typed (relative to the user's domain,
a full FQDN, or a batch such as ``{1..8}.web``): the controller expands and
validates a batch as a whole, so one bad name fails the command and nothing
starts. A mutation prints one line per accepted task; completions follow as
the controller pushes them.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from cmd2 import Cmd2ArgumentParser, CommandSet, RawDescriptionCmd2HelpFormatter, with_argparser

from usher.client import Client, TaskInfo
from usher.ush import format as fmt
from usher.ush.completion import host_name_choices, vm_name_choices

if TYPE_CHECKING:
    from usher.ush.shell import UshApp  # noqa: F401 - named in the CommandSet base

__all__ = ["VmCommands", "positive_int"]

NAMES_HELP = ("VM names, relative to your domain (redfish.sneetch) or full; "
              "a batch like {1..8}.web names eight VMs")


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return value


def names_parser(description: str) -> Cmd2ArgumentParser:
    """A parser for ``VERB NAME...`` with VM name completion."""
    parser = Cmd2ArgumentParser(description=description,
                                formatter_class=RawDescriptionCmd2HelpFormatter)
    parser.add_argument("names", nargs="+", metavar="NAME", help=NAMES_HELP,
                        choices_provider=vm_name_choices)
    return parser


class VmCommands(CommandSet["UshApp"]):
    """Starting, stopping, moving and listing VMs."""

    DEFAULT_CATEGORY = "VMs"

    def _mutate(self, request: Callable[[Client], list[TaskInfo]]) -> None:
        tasks = self._cmd.call(request)
        if tasks is not None:
            self._cmd.accepted(tasks)

    # ---------------------------------------------------------------- start
    start_parser = names_parser("""\
start VM(s) (creating if necessary)

A name that is not a VM yet creates one: usher registers it, reserves its
address, defines it on a host and boots it. A stopped or crashed VM boots
again; a hibernated VM is restored. A VM already running or starting is left
as it is. --ram, --vcpus, --vmm, --ip_range and --ip apply to VMs being created.

example:
  start redfish.sneetch
  start {1..8}.web --ram 512 --vcpus 2""")
    start_parser.add_argument("--ram", type=positive_int, metavar="MiB",
                              help="memory of a new VM in MiB (default: the site's)")
    start_parser.add_argument("--vcpus", type=positive_int, metavar="N",
                              help="virtual CPUs of a new VM (default: the site's)")
    start_parser.add_argument("--vmm", metavar="HOST", choices_provider=host_name_choices,
                              help="create the VM on this VMM (see vmm_list)")
    start_parser.add_argument("--ip_range", metavar="NAME",
                              help="take the address from this IP range (default: the "
                                   "site's default range)")
    start_parser.add_argument("--ip", metavar="ADDR",
                              help="this address of the range (default: the lowest free one)")

    @with_argparser(start_parser)
    def do_start(self, args: argparse.Namespace) -> None:
        """start VM(s) (creating if necessary)"""
        self._mutate(lambda c: c.start(args.names, ram=args.ram, vcpus=args.vcpus,
                                       vmm=args.vmm, ip_range=args.ip_range, ip=args.ip))

    # --------------------------------------------------- lifecycle verbs
    shutdown_parser = names_parser("""\
shutdown VM(s)

Asks running VMs to shut down gracefully (ACPI power button) and waits for the
guest within the site's timeout. The VMs stay registered: start boots them
again. Applies to: running.

example:
  shutdown redfish.sneetch""")

    @with_argparser(shutdown_parser)
    def do_shutdown(self, args: argparse.Namespace) -> None:
        """shutdown VM(s)"""
        self._mutate(lambda c: c.shutdown(args.names))

    reboot_parser = names_parser("""\
reboot VM(s)

Asks running VMs to reboot gracefully. Applies to: running.

example:
  reboot {1..4}.web""")

    @with_argparser(reboot_parser)
    def do_reboot(self, args: argparse.Namespace) -> None:
        """reboot VM(s)"""
        self._mutate(lambda c: c.reboot(args.names))

    cycle_parser = names_parser("""\
power off and restart VM(s)

Hard power off, then boot again on the same host, without asking the guest.
Applies to: running, paused, crashed.

example:
  cycle web1""")

    @with_argparser(cycle_parser)
    def do_cycle(self, args: argparse.Namespace) -> None:
        """power off and restart VM(s)"""
        self._mutate(lambda c: c.cycle(args.names))

    destroy_parser = names_parser("""\
power off VM(s) and unregister

Powers VMs off, undefines them and unregisters them: their address, DNS
names and disk are released. Applies to: any state but unknown. A VM left
unknown on a lost VMM is forgotten with --force.

example:
  destroy {1..8}.web
  destroy --force web3""")
    destroy_parser.add_argument("--force", action="store_true",
                                help="forget VMs left unknown on a lost VMM")

    @with_argparser(destroy_parser)
    def do_destroy(self, args: argparse.Namespace) -> None:
        """power off VM(s) and unregister"""
        self._mutate(lambda c: c.destroy(args.names, force=args.force))

    pause_parser = names_parser("""\
pause execution of VM(s)

Suspends running VMs in memory; resume continues them. Applies to: running
(a paused VM stays paused).

example:
  pause redfish.sneetch""")

    @with_argparser(pause_parser)
    def do_pause(self, args: argparse.Namespace) -> None:
        """pause execution of VM(s)"""
        self._mutate(lambda c: c.pause(args.names))

    resume_parser = names_parser("""\
resume paused VM(s). See 'start' for hibernated VMs.

Continues VMs suspended by pause. Applies to: paused (a running VM stays
running). A hibernated VM is restored with start.

example:
  resume redfish.sneetch""")

    @with_argparser(resume_parser)
    def do_resume(self, args: argparse.Namespace) -> None:
        """resume paused VM(s). See 'start' for hibernated VMs."""
        self._mutate(lambda c: c.resume(args.names))

    hibernate_parser = names_parser("""\
save VM(s) to disk and stop them

Saves the memory of VMs to disk and stops them; start restores them where
they were. Applies to: running, paused.

example:
  hibernate {1..8}.web""")

    @with_argparser(hibernate_parser)
    def do_hibernate(self, args: argparse.Namespace) -> None:
        """save VM(s) to disk and stop them"""
        self._mutate(lambda c: c.hibernate(args.names))

    migrate_parser = names_parser("""\
migrate VM(s) to different VMM

Moves VMs to the VMM given with --vmm, or to the one the scheduler picks.
Running and paused VMs move live where the VMMs can; stopped VMs (and VMs on
VMMs that cannot move them live) move cold. Applies to: running, paused,
stopped.

example:
  migrate web1 --vmm vmm2
  migrate {1..4}.web""")
    migrate_parser.add_argument("--vmm", metavar="HOST", choices_provider=host_name_choices,
                                help="target VMM (default: the scheduler's choice)")

    @with_argparser(migrate_parser)
    def do_migrate(self, args: argparse.Namespace) -> None:
        """migrate VM(s) to different VMM"""
        self._mutate(lambda c: c.migrate(args.names, vmm=args.vmm))

    # ----------------------------------------------------------------- list
    list_parser = Cmd2ArgumentParser(
        formatter_class=RawDescriptionCmd2HelpFormatter,
        description="""\
list VMs

Lists the VMs you may see with their state, VMM, address, size, uptime and
the reason for their state. NAMEs filter the list (the controller matches
them; a cluster name lists its VMs). --json prints a JSON array for scripts.

example:
  list
  list -l {1..8}.web
  list --json""")
    list_parser.add_argument("names", nargs="*", metavar="NAME",
                             help="only these VMs (names or patterns)",
                             choices_provider=vm_name_choices)
    list_parser.add_argument("--all", action="store_true",
                             help="every user's VMs (site admin)")
    list_parser.add_argument("--json", action="store_true", help="print a JSON array")
    list_parser.add_argument("-l", "--long", action="store_true",
                             help="also show owner, cluster, MAC and UUID")

    @with_argparser(list_parser)
    def do_list(self, args: argparse.Namespace) -> None:
        """list VMs"""
        app = self._cmd
        vms = app.call(lambda c: c.list_vms(args.names, all_users=args.all))
        if vms is None:
            return
        if args.json:
            app.poutput(fmt.to_json(vms))
        elif not vms:
            app.poutput("no VMs match" if args.names else "no VMs")
        else:
            app.poutput(fmt.vm_table(vms, app.domain, time.time(), long=args.long))
