"""The site directory: per-cluster LDAP branches of people and groups.

Each cluster (a DNS domain level such as ``bluefish.seuss.usher.test``) is an
administrative domain with its own branch of people and groups in the site's
OpenLDAP server; slapd's access rules are the real guard of who may change what.

* :mod:`usher.directory.layout`: the tree, its DNs and filters (all escaping);
* :mod:`usher.directory.client`: :class:`~usher.directory.client.Directory`, the
  operations of the ``usher_*`` tools and the controller over ldap3;
* :mod:`usher.directory.slapd`: a private slapd for tests and ``usher demo``;
* ``ldif/``: the usher and openssh-lpk schemas and the ACL template.

The package uses only the core (``usher.errors``, ``usher.names``);
``docs/directory.md`` describes the layout and the rules.
"""
