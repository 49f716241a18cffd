"""ush commands on VMs: the lifecycle verbs, ``migrate`` and ``list``.

Each command turns its arguments into one client call and prints the reply.
Names go to the controller exactly as typed (relative to the user's domain,
a full FQDN, or a batch such as ``{1..8}.web``): the controller expands and
validates a batch as a whole, so one bad name fails the command and nothing
starts. A mutation prints one line per accepted task; completions follow as
the controller pushes them.

Each verb is a parser builder (see :mod:`.parsers`) beside its body; both are
free of cmd2, so the batch runner and the interactive shell
(:mod:`.command_sets`) run the same code.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

from usher.client import Client, TaskInfo
from usher.errors import InvalidOption
from usher.ush import format as fmt
from usher.ush.parsers import Command, P, ParserKit, names_parser, positive_int
from usher.ush.session import Session

__all__ = ["COMMANDS"]


def _mutate(session: Session, request: Callable[[Client], list[TaskInfo]]) -> None:
    tasks = session.call(request)
    if tasks is not None:
        session.accepted(tasks)


# -------------------------------------------------------------------- start
def start_parser(kit: ParserKit[P]) -> P:
    parser = names_parser(kit, "start", """\
start VM(s) (creating if necessary)

A name that is not a VM yet creates one: usher registers it, reserves its
address, defines it on a host and boots it. A stopped or crashed VM boots
again; a hibernated VM is restored. A VM already running or starting is left
as it is. The options apply to VMs being created. --rr also gives the
cluster's own name to the VMs, round-robin: after 'start {1..4}.web --rr',
web.USER.SITE answers with all four addresses.

A new VM boots from registered images (see image_list): --image gives its
disk (each VM writes to its own copy-on-write overlay) and, if the image has
one, its kernel and initrd; --kernel and --initrd take those of other images.
--kernel_parms is added to the kernel's command line. --fs_uri
nfs://SERVER/PATH makes an NFS export the root file system of the kernel
(SERVER by IPv4 address); site admins may give a disk URL instead
(file://, http://, https:// with #sha256=HEX[&format=qcow2|raw]).

example:
  start redfish.sneetch
  start {1..8}.web --ram 512 --vcpus 2
  start {1..4}.web --rr
  start t1 --image tiny
  start t2 --kernel tiny --fs_uri nfs://10.0.0.5/export/root --kernel_parms quiet""")
    parser.add_argument("--ram", type=positive_int, metavar="MiB",
                        help="memory of a new VM in MiB (default: the site's)")
    parser.add_argument("--vcpus", type=positive_int, metavar="N",
                        help="virtual CPUs of a new VM (default: the site's)")
    parser.add_argument("--vmm", metavar="HOST", **kit.host_names(),
                        help="create the VM on this VMM (see vmm_list)")
    parser.add_argument("--ip_range", metavar="NAME",
                        help="take the address from this IP range (default: the "
                             "site's default range)")
    parser.add_argument("--ip", metavar="ADDR",
                        help="this address of the range (default: the lowest free one)")
    parser.add_argument("--rr", action="store_true",
                        help="also answer for the cluster's DNS name, round-robin")
    parser.add_argument("--image", metavar="NAME", **kit.image_names("image"),
                        help="boot a new VM from this registered image: its disk (and "
                             "kernel, if it has one); see image_list")
    parser.add_argument("--kernel", metavar="NAME", **kit.image_names("kernel"),
                        help="boot the kernel (and initrd) of this registered image")
    parser.add_argument("--initrd", metavar="NAME", **kit.image_names("initrd"),
                        help="with the initrd of this registered image")
    parser.add_argument("--kernel_parms", metavar="TEXT",
                        help="add these parameters to the kernel command line (needs a "
                             "kernel; quote them: --kernel_parms 'quiet loglevel=3')")
    parser.add_argument("--fs_uri", metavar="URI",
                        help="nfs://SERVER/PATH: the kernel's root file system over NFS; "
                             "site admins: a disk URL with #sha256=HEX")
    return parser


def start_vms(session: Session, args: argparse.Namespace) -> None:
    _mutate(session, lambda c: c.start(args.names, ram=args.ram, vcpus=args.vcpus,
                                       vmm=args.vmm, ip_range=args.ip_range, ip=args.ip,
                                       rr=args.rr, image=args.image, kernel=args.kernel,
                                       initrd=args.initrd, kernel_parms=args.kernel_parms,
                                       fs_uri=args.fs_uri))


# ---------------------------------------------------------- lifecycle verbs
def shutdown_parser(kit: ParserKit[P]) -> P:
    return names_parser(kit, "shutdown", """\
shutdown VM(s)

Asks running VMs to shut down gracefully (ACPI power button) and waits for the
guest within the site's timeout. The VMs stay registered: start boots them
again. Applies to: running.

example:
  shutdown redfish.sneetch""")


def shutdown_vms(session: Session, args: argparse.Namespace) -> None:
    _mutate(session, lambda c: c.shutdown(args.names))


def reboot_parser(kit: ParserKit[P]) -> P:
    return names_parser(kit, "reboot", """\
reboot VM(s)

Asks running VMs to reboot gracefully. Applies to: running.

example:
  reboot {1..4}.web""")


def reboot_vms(session: Session, args: argparse.Namespace) -> None:
    _mutate(session, lambda c: c.reboot(args.names))


def cycle_parser(kit: ParserKit[P]) -> P:
    return names_parser(kit, "cycle", """\
power off and restart VM(s)

Hard power off, then boot again on the same host, without asking the guest.
Applies to: running, paused, crashed.

example:
  cycle web1""")


def cycle_vms(session: Session, args: argparse.Namespace) -> None:
    _mutate(session, lambda c: c.cycle(args.names))


def destroy_parser(kit: ParserKit[P]) -> P:
    parser = names_parser(kit, "destroy", """\
power off VM(s) and unregister

Powers VMs off, undefines them and unregisters them: their address, DNS
names and disk are released. Applies to: any state but unknown. A VM left
unknown on a lost VMM is forgotten with --force.

example:
  destroy {1..8}.web
  destroy --force web3""")
    parser.add_argument("--force", action="store_true",
                        help="forget VMs left unknown on a lost VMM")
    return parser


def destroy_vms(session: Session, args: argparse.Namespace) -> None:
    _mutate(session, lambda c: c.destroy(args.names, force=args.force))


def pause_parser(kit: ParserKit[P]) -> P:
    return names_parser(kit, "pause", """\
pause execution of VM(s)

Suspends running VMs in memory; resume continues them. Applies to: running
(a paused VM stays paused).

example:
  pause redfish.sneetch""")


def pause_vms(session: Session, args: argparse.Namespace) -> None:
    _mutate(session, lambda c: c.pause(args.names))


def resume_parser(kit: ParserKit[P]) -> P:
    return names_parser(kit, "resume", """\
resume paused VM(s). See 'start' for hibernated VMs.

Continues VMs suspended by pause. Applies to: paused (a running VM stays
running). A hibernated VM is restored with start.

example:
  resume redfish.sneetch""")


def resume_vms(session: Session, args: argparse.Namespace) -> None:
    _mutate(session, lambda c: c.resume(args.names))


def hibernate_parser(kit: ParserKit[P]) -> P:
    return names_parser(kit, "hibernate", """\
save VM(s) to disk and stop them

Saves the memory of VMs to disk and stops them; start restores them where
they were. Applies to: running, paused.

example:
  hibernate {1..8}.web""")


def hibernate_vms(session: Session, args: argparse.Namespace) -> None:
    _mutate(session, lambda c: c.hibernate(args.names))


def migrate_parser(kit: ParserKit[P]) -> P:
    parser = names_parser(kit, "migrate", """\
migrate VM(s) to different VMM

Moves VMs to the VMM given with --vmm, or to the one the scheduler picks.
Running and paused VMs move live where the VMMs can: they keep running (a
paused VM stays paused), with their disk, name, address and DNS names. Other
VMs move cold: a stopped VM's disk moves with it where the VMMs can migrate
live; a VM without a disk is powered off, moved and booted again. Applies to:
running, paused, stopped. --abort stops the running migration of VMs (those
moving cold cannot be stopped); they stay where they were.

example:
  migrate web1 --vmm vmm2
  migrate {1..4}.web
  migrate --abort web1""")
    parser.add_argument("--vmm", metavar="HOST", **kit.host_names(),
                        help="target VMM (default: the scheduler's choice)")
    parser.add_argument("--abort", action="store_true",
                        help="abort the running migration of the VMs instead")
    return parser


def migrate_vms(session: Session, args: argparse.Namespace) -> None:
    if args.abort:
        if args.vmm is not None:
            session.report_error(InvalidOption("migrate --abort takes no --vmm"))
            return
        _mutate(session, lambda c: c.abort_migration(args.names))
        return
    _mutate(session, lambda c: c.migrate(args.names, vmm=args.vmm))


# --------------------------------------------------------------------- list
def list_parser(kit: ParserKit[P]) -> P:
    parser = kit.parser("list", """\
list VMs

Lists the VMs you may see with their state, VMM, address, size, uptime and
the reason for their state. NAMEs filter the list (the controller matches
them; a cluster name lists its VMs). -l adds CPU% and MEM (as 'stats' shows
them, for running VMs), owner, cluster, MAC, UUID, DNS and image. --json
prints a JSON array for scripts.

example:
  list
  list -l {1..8}.web
  list --json""")
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="only these VMs (names or patterns)", **kit.vm_names())
    parser.add_argument("--all", action="store_true", help="every user's VMs (site admin)")
    parser.add_argument("--json", action="store_true", help="print a JSON array")
    parser.add_argument("-l", "--long", action="store_true",
                        help="also show CPU%%, memory in use, owner, cluster, MAC and UUID")
    return parser


def list_vms(session: Session, args: argparse.Namespace) -> None:
    vms = session.call(lambda c: c.list_vms(args.names, all_users=args.all))
    if vms is None:
        return
    if args.json:
        session.output(fmt.to_json(vms))
    elif not vms:
        session.output("no VMs match" if args.names else "no VMs")
    else:
        session.output(fmt.vm_table(vms, session.domain, time.time(), long=args.long))


# ------------------------------------------------------------------ console
def console_parser(kit: ParserKit[P]) -> P:
    parser = kit.parser("console", """\
attach to a VM's serial console

Connects the terminal to the VM's serial console: what the guest prints
appears as it comes, and every key goes to the guest. Ctrl-] detaches. The
session ends when the guest stops. --tail N instead prints the last N lines
the VM printed (its boot messages, a login prompt) from the log its VMM keeps,
and returns; that also works without a terminal.

example:
  console redfish.sneetch
  console redfish.sneetch --tail 50""")
    parser.add_argument("name", metavar="NAME", help="the VM", **kit.vm_names())
    parser.add_argument("--tail", type=positive_int, metavar="N",
                        help="print its last N lines (1 to 1000) and return")
    return parser


def console_vm(session: Session, args: argparse.Namespace) -> None:
    if args.tail is not None:
        text = session.call(lambda c: c.console_tail(args.name, args.tail))
        if text is not None:
            session.output(text.rstrip("\n") if text else
                           "(the console has printed nothing yet)")
        return
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        session.report_error(InvalidOption(
            "console without --tail needs a terminal; use --tail N to print its last lines"))
        return
    from usher.ush.console import attach

    why = session.call(lambda c: attach(c, args.name, sys.stdin.fileno(), sys.stdout.buffer))
    if why is not None:
        session.output(f"\r\nconsole of {args.name} closed: {why}")


COMMANDS = (
    Command("start", start_parser, start_vms),
    Command("shutdown", shutdown_parser, shutdown_vms),
    Command("reboot", reboot_parser, reboot_vms),
    Command("cycle", cycle_parser, cycle_vms),
    Command("destroy", destroy_parser, destroy_vms),
    Command("pause", pause_parser, pause_vms),
    Command("resume", resume_parser, resume_vms),
    Command("hibernate", hibernate_parser, hibernate_vms),
    Command("migrate", migrate_parser, migrate_vms),
    Command("list", list_parser, list_vms),
    Command("console", console_parser, console_vm),
)
