"""ush, the usher shell: a command line over the usher client library.

Run ``ush`` for the interactive shell or ``ush 'CMD' 'CMD' ...`` to run
commands in order and exit (see :mod:`usher.ush.cli`). Each verb is a parser
builder and a body in its noun's module (:mod:`.vm_commands`,
:mod:`.host_commands`, :mod:`.task_commands`, :mod:`.session_commands`),
run against a :class:`~usher.ush.session.Session`. The interactive shell is a
thin cmd2 application (:mod:`usher.ush.shell`) with one command set per noun
(:mod:`.command_sets`); batch input runs without cmd2 (:mod:`usher.ush.batch`).
What ush prints is made by the pure functions of :mod:`usher.ush.format`.
"""
