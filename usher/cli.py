"""``usher``: the site and developer entry point (``usher demo``, ...)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from usher.errors import UsherError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="usher", description="usher site and developer tools")
    sub = p.add_subparsers(dest="cmd", required=True)
    demo = sub.add_parser("demo", help="run a whole local site in the foreground",
                          description="Run a local demo site (controller, node managers on "
                          "fake hosts, a demo user) until Ctrl-C or SIGTERM. Writes "
                          "DIR/ush.config and DIR/demo.json.")
    demo.add_argument("--dir", required=True, help="directory of the site (kept across runs)")
    demo.add_argument("--lnms", type=int, default=3, help="number of node managers")
    demo.add_argument("--port", type=int, help="controller port (default: a free one)")
    demo.add_argument("--hypervisor", choices=["fake", "qemu"], default="fake",
                      help="fake hosts (default), or real guests on this machine's "
                           "libvirtd (one VMM; the tiny test guest as image 'tiny')")
    args = p.parse_args(argv)
    try:
        if args.cmd == "demo":
            from usher.demo import run_demo

            if not 1 <= args.lnms <= 64:
                print("usher: --lnms must be 1 to 64", file=sys.stderr)
                return 2
            return run_demo(Path(args.dir), args.lnms, args.port, args.hypervisor)
    except UsherError as exc:
        print(f"usher: {exc.message}", file=sys.stderr)
        return exc.exit_code
    return 2


if __name__ == "__main__":
    sys.exit(main())
