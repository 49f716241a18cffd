"""ush commands on accounting: ``stats``, what VMs use of CPU, memory, disk and network.

The controller samples every VM's counters at the site's interval and keeps
a bounded series of them; ``stats`` shows the rates it derives (over the last
interval, or averaged over the last N samples) or, with ``--json``, the
samples themselves. ``list -l`` shows the same CPU% and MEM. The verb is a
parser builder (see :mod:`.parsers`) beside its body, free of cmd2.
"""

from __future__ import annotations

import argparse

from usher.protocol.ops import DEFAULT_STATS_SAMPLES
from usher.ush import format as fmt
from usher.ush.parsers import Command, P, ParserKit, positive_int
from usher.ush.session import Session

__all__ = ["COMMANDS"]

LAST_INTERVAL_SAMPLES = 2
"""Samples the table asks for without --samples: the newest two make the last interval."""


def stats_parser(kit: ParserKit[P]) -> P:
    parser = kit.parser("stats", """\
show what VMs use: CPU, memory, disk and network

For each VM: CPU% (100 is one host CPU kept busy, so a busy 2-vCPU VM shows
up to 200), MEM (the host memory the VM holds; the guest's memory where the
host cannot tell), and bytes per second read from and written to its disks
and received and sent on its network, then the TOTAL of them all. The figures
are over the last sampling interval (the site samples every minute by
default); --samples N averages over the last N samples instead. A VM shows
- until it has two samples. With no NAME: all your VMs. --json prints, per
VM, its newest samples (N, default 60; the counters are cumulative since its
boot) with both kinds of rates, for scripts.

example:
  stats web1
  stats {1..8}.web --samples 60
  stats web1 --json --samples 10""")
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="only these VMs (names or patterns)", **kit.vm_names())
    parser.add_argument("--samples", type=positive_int, metavar="N",
                        help="average over the last N samples (--json: print N samples, "
                             f"default {DEFAULT_STATS_SAMPLES})")
    parser.add_argument("--all", action="store_true", help="every user's VMs (site admin)")
    parser.add_argument("--json", action="store_true", help="print a JSON array")
    return parser


def show_stats(session: Session, args: argparse.Namespace) -> None:
    samples = args.samples
    if samples is None and not args.json:
        samples = LAST_INTERVAL_SAMPLES
    stats = session.call(lambda c: c.vm_stats(args.names, samples=samples, all_users=args.all))
    if stats is None:
        return
    if args.json:
        session.output(fmt.to_json(stats))
    elif not stats:
        session.output("no VMs match" if args.names else "no VMs")
    else:
        session.output(fmt.stats_table(stats, session.domain, average=args.samples is not None))


COMMANDS = (
    Command("stats", stats_parser, show_stats),
)
