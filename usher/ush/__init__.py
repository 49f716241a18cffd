"""ush, the usher shell: a command line over the usher client library.

Run ``ush`` for the interactive shell or ``ush 'CMD' 'CMD' ...`` to run
commands in order and exit (see :mod:`usher.ush.cli`). The shell is a thin
cmd2 application (:mod:`usher.ush.shell`) with one command set per noun;
what it prints is made by the pure functions of :mod:`usher.ush.format`.
"""
