"""Hypervisor drivers, chosen by name from a registry.

The node manager reads a driver name from its configuration and calls
:func:`make_driver`; nothing else imports a driver class directly. The
interface every driver implements is :class:`~usher.lnm.drivers.base.HypervisorDriver`.
"""

from __future__ import annotations

from typing import Any

from usher.errors import ConfigError
from usher.lnm.drivers.base import HypervisorDriver
from usher.lnm.drivers.fake import FakeDriver
from usher.lnm.drivers.libvirt import LibvirtDriver

DRIVERS: dict[str, type[HypervisorDriver]] = {
    LibvirtDriver.name: LibvirtDriver,
    FakeDriver.name: FakeDriver,
}


def make_driver(name: str, **kw: Any) -> HypervisorDriver:
    """A new (not yet open) driver of the registered ``name``, built with ``kw``.

    Raises:
        ConfigError: no driver has this name, or ``kw`` does not fit it.
    """
    try:
        cls = DRIVERS[name]
    except KeyError:
        known = ", ".join(sorted(DRIVERS))
        raise ConfigError(f"unknown hypervisor driver {name!r} (known: {known})") from None
    try:
        return cls(**kw)
    except TypeError as e:
        raise ConfigError(f"bad settings for hypervisor driver {name!r}: {e}") from e


__all__ = ["DRIVERS", "HypervisorDriver", "make_driver"]
