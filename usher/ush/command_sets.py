"""The interactive shell's commands: one thin cmd2 :class:`CommandSet` per noun.

Each ``do_*`` method takes its parser from the verb's builder (through the
cmd2 kit of :mod:`.completion`, which adds name completion) and runs the
verb's body from its noun module against the app's session; the docstring is
the brief line ``help -v`` shows. The batch runner (:mod:`.batch`) runs the
same builders and bodies without cmd2.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from cmd2 import CommandSet, with_argparser

from usher.ush import host_commands as hosts
from usher.ush import image_commands as images
from usher.ush import session_commands as session
from usher.ush import stats_commands as stats
from usher.ush import task_commands as tasks
from usher.ush import vm_commands as vms
from usher.ush.completion import cmd2_parser

if TYPE_CHECKING:
    from usher.ush.shell import UshApp  # noqa: F401 - named in the CommandSet base

__all__ = ["HostCommands", "ImageCommands", "SessionCommands", "TaskCommands", "VmCommands"]


class SessionCommands(CommandSet["UshApp"]):
    """Connecting to the controller."""

    DEFAULT_CATEGORY = "Session"

    @with_argparser(cmd2_parser(session.connect_parser))
    def do_connect(self, args: argparse.Namespace) -> None:
        """connect to an Usher controller"""
        session.connect(self._cmd.session, args)

    @with_argparser(cmd2_parser(session.reconnect_parser))
    def do_reconnect(self, args: argparse.Namespace) -> None:
        """reconnect to Usher Controller after disconnect"""
        session.reconnect(self._cmd.session, args)


class VmCommands(CommandSet["UshApp"]):
    """Starting, stopping, moving and listing VMs."""

    DEFAULT_CATEGORY = "VMs"

    @with_argparser(cmd2_parser(vms.start_parser))
    def do_start(self, args: argparse.Namespace) -> None:
        """start VM(s) (creating if necessary)"""
        vms.start_vms(self._cmd.session, args)

    @with_argparser(cmd2_parser(vms.shutdown_parser))
    def do_shutdown(self, args: argparse.Namespace) -> None:
        """shutdown VM(s)"""
        vms.shutdown_vms(self._cmd.session, args)

    @with_argparser(cmd2_parser(vms.reboot_parser))
    def do_reboot(self, args: argparse.Namespace) -> None:
        """reboot VM(s)"""
        vms.reboot_vms(self._cmd.session, args)

    @with_argparser(cmd2_parser(vms.cycle_parser))
    def do_cycle(self, args: argparse.Namespace) -> None:
        """power off and restart VM(s)"""
        vms.cycle_vms(self._cmd.session, args)

    @with_argparser(cmd2_parser(vms.destroy_parser))
    def do_destroy(self, args: argparse.Namespace) -> None:
        """power off VM(s) and unregister"""
        vms.destroy_vms(self._cmd.session, args)

    @with_argparser(cmd2_parser(vms.pause_parser))
    def do_pause(self, args: argparse.Namespace) -> None:
        """pause execution of VM(s)"""
        vms.pause_vms(self._cmd.session, args)

    @with_argparser(cmd2_parser(vms.resume_parser))
    def do_resume(self, args: argparse.Namespace) -> None:
        """resume paused VM(s). See 'start' for hibernated VMs."""
        vms.resume_vms(self._cmd.session, args)

    @with_argparser(cmd2_parser(vms.hibernate_parser))
    def do_hibernate(self, args: argparse.Namespace) -> None:
        """save VM(s) to disk and stop them"""
        vms.hibernate_vms(self._cmd.session, args)

    @with_argparser(cmd2_parser(vms.migrate_parser))
    def do_migrate(self, args: argparse.Namespace) -> None:
        """migrate VM(s) to different VMM"""
        vms.migrate_vms(self._cmd.session, args)

    @with_argparser(cmd2_parser(vms.list_parser))
    def do_list(self, args: argparse.Namespace) -> None:
        """list VMs"""
        vms.list_vms(self._cmd.session, args)

    @with_argparser(cmd2_parser(stats.stats_parser))
    def do_stats(self, args: argparse.Namespace) -> None:
        """show what VMs use: CPU, memory, disk and network"""
        stats.show_stats(self._cmd.session, args)

    @with_argparser(cmd2_parser(vms.console_parser))
    def do_console(self, args: argparse.Namespace) -> None:
        """attach to a VM's serial console"""
        vms.console_vm(self._cmd.session, args)


class HostCommands(CommandSet["UshApp"]):
    """Listing VMMs and, for the site admin, taking them in and out of service."""

    DEFAULT_CATEGORY = "VMMs"

    @with_argparser(cmd2_parser(hosts.vmm_list_parser))
    def do_vmm_list(self, args: argparse.Namespace) -> None:
        """show list of VMM names"""
        hosts.list_hosts(self._cmd.session, args)

    @with_argparser(cmd2_parser(hosts.vmm_disable_parser))
    def do_vmm_disable(self, args: argparse.Namespace) -> None:
        """stop placing new VMs on a VMM (site admin)"""
        hosts.disable_host(self._cmd.session, args)

    @with_argparser(cmd2_parser(hosts.vmm_enable_parser))
    def do_vmm_enable(self, args: argparse.Namespace) -> None:
        """place VMs on a disabled VMM again (site admin)"""
        hosts.enable_host(self._cmd.session, args)

    @with_argparser(cmd2_parser(hosts.vmm_remove_parser))
    def do_vmm_remove(self, args: argparse.Namespace) -> None:
        """forget an empty VMM (site admin)"""
        hosts.remove_host(self._cmd.session, args)


class ImageCommands(CommandSet["UshApp"]):
    """Listing the images new VMs boot from."""

    DEFAULT_CATEGORY = "Images"

    @with_argparser(cmd2_parser(images.image_list_parser))
    def do_image_list(self, args: argparse.Namespace) -> None:
        """list the images VMs start from"""
        images.list_images(self._cmd.session, args)


class TaskCommands(CommandSet["UshApp"]):
    """Following the tasks that VM commands start."""

    DEFAULT_CATEGORY = "Tasks"

    @with_argparser(cmd2_parser(tasks.tasks_parser))
    def do_tasks(self, args: argparse.Namespace) -> None:
        """list your recent tasks"""
        tasks.list_tasks(self._cmd.session, args)

    @with_argparser(cmd2_parser(tasks.wait_parser))
    def do_wait(self, args: argparse.Namespace) -> None:
        """wait until a task ends"""
        tasks.wait_task(self._cmd.session, args)
