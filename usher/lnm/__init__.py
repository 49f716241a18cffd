"""The node manager (usher-lnm): the thin daemon on each host that drives its hypervisor.

It receives requests from the controller, runs them through a hypervisor driver
(:mod:`usher.lnm.drivers`) and reports domain lifecycle events back up.
"""
