"""ush commands on images: ``image_list``, the images new VMs may boot from.

Site admins register images with ``usher-controller image add``; users name
them with ``start --image`` (``--kernel``, ``--initrd``). Users never see an
image's URLs or checksums, only its name, what it holds and its description.
The verb is a parser builder (see :mod:`.parsers`) beside its body, free of
cmd2.
"""

from __future__ import annotations

import argparse

from usher.ush import format as fmt
from usher.ush.parsers import Command, P, ParserKit
from usher.ush.session import Session

__all__ = ["COMMANDS"]


def image_list_parser(kit: ParserKit[P]) -> P:
    parser = kit.parser("image_list", """\
list the images VMs start from

Lists the images the site admins registered. DISK is the format of the
image's disk (a VM started with --image gets its own copy-on-write overlay
on it; - for none), KERNEL and INITRD say whether it has a kernel (and an
initrd) to boot directly. 'start NAME --image IMAGE' starts a VM from one;
--kernel and --initrd take another image's kernel and initrd. --json prints
a JSON array for scripts.

example:
  image_list
  image_list --json""")
    parser.add_argument("--json", action="store_true", help="print a JSON array")
    return parser


def list_images(session: Session, args: argparse.Namespace) -> None:
    images = session.call(lambda c: c.list_images())
    if images is None:
        return
    if args.json:
        session.output(fmt.to_json(images))
    elif not images:
        session.output("no images; ask the site admin to register one")
    else:
        session.output(fmt.image_table(images))


COMMANDS = (
    Command("image_list", image_list_parser, list_images),
)
