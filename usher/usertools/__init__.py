"""The ``usher_*`` tools: manage a cluster's users and groups in the site directory.

Ten thin front-ends, one module each, as in UCSD's Usher: ``usher_useradd``,
``usher_userdel``, ``usher_userlist``, ``usher_usermod``, ``usher_passwd``,
``usher_userln``, ``usher_groupadd``, ``usher_groupdel``, ``usher_grouplist`` and
``usher_groupmod``. Each turns its command line into one call of
:class:`usher.directory.client.Directory`, bound as the person running it, and
prints the reply; :mod:`usher.usertools.common` holds what they share (the
cluster and caller, passwords, sudo refusal, tables, exit codes). The tools use
only the core and the directory library; ``docs/directory.md`` describes them.
"""
