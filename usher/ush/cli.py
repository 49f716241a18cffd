"""The ``ush`` command: pick the mode, load the config, run the shell.

* ``ush`` on a terminal: the interactive shell; it connects at once when the
  ush config holds a password, else the user types ``connect``.
* ``ush 'start web1' 'list'``: each argument is one command line, run in
  order after connecting from the config; each command's tasks are waited for
  before the next. Commands piped to ``ush`` on stdin run the same way (at
  most :data:`~usher.ush.batch.MAX_STDIN_CHARS` of them, read before any
  runs). The exit status is 0 if every command and task succeeded, else the
  exit code of the first failure (see :mod:`usher.errors`; 1 for a usage
  error or a failed task).

Batch input runs without cmd2 (:mod:`usher.ush.batch`) unless it needs the
cmd2 shell, which is imported only then and for the interactive shell: this
module must not import cmd2, as loading it costs a script's ``ush list``
about 0.3 s.

The config is layered ``/etc/usher/ush.config`` < ``~/.usher/ush.config`` <
``$USH_CONFIG`` (:func:`usher.config.load_ush_config`); a bad config ends ush
with its one-line error and exit code before anything else happens.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from usher.config import UshConfig, load_ush_config
from usher.errors import ConfigError, UsherError
from usher.ush.batch import BatchRunner, StreamSink, plan, read_lines, wants_colour

__all__ = ["USAGE", "main", "run_batch"]

USAGE = """\
usage: ush [COMMAND ...]

With no COMMAND, ush is an interactive shell (type help). Otherwise each
COMMAND is one ush command line, for example:

  ush 'start {1..4}.web --ram 512' 'list --json'

The commands run in order, each waiting for its tasks; the exit status is
non-zero if any command or task failed. Settings come from
/etc/usher/ush.config, ~/.usher/ush.config and the file USH_CONFIG names.
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Run ush with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return 0
    logging.basicConfig(level=logging.WARNING, format="ush: %(message)s")
    try:
        config = load_ush_config(dict(os.environ), Path.home())
    except ConfigError as exc:
        sys.stderr.write(f"error: {exc.message}\n")
        return exc.exit_code
    try:
        if args:
            return run_batch(config, args)
        if not sys.stdin.isatty():
            try:
                lines = read_lines(sys.stdin)
            except UsherError as exc:
                sys.stderr.write(f"error: {exc.message}\n")
                return exc.exit_code
            return run_batch(config, lines)
        from usher.ush.shell import UshApp  # cmd2: only the interactive shell pays for it

        app = UshApp(config, interactive=True)
        app.cmdloop()
        return app.exit_code
    except KeyboardInterrupt:
        return 130


def run_batch(config: UshConfig, lines: Sequence[str]) -> int:
    """Run batch ``lines`` without cmd2 when it can, else in the cmd2 shell."""
    steps = plan(lines)
    if steps is None:
        # Some line needs the cmd2 shell (see usher.ush.batch); it runs them all.
        from usher.ush.shell import UshApp

        return UshApp(config, interactive=False).run_commands(lines)
    sink = StreamSink(colour_errors=wants_colour(sys.stderr, os.environ))
    return BatchRunner(config, sink).run(steps)


if __name__ == "__main__":
    sys.exit(main())
