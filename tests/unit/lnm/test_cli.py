"""usher-lnm's policy choices: the domain type."""

from __future__ import annotations

import pytest

from usher.config import LnmConfig
from usher.errors import ConfigError
from usher.lnm.cli import domain_type_for


def test_explicit_domain_types_are_kept_and_unknown_ones_refused() -> None:
    assert domain_type_for(LnmConfig(uri="qemu:///system", domain_type="kvm")) == "kvm"
    assert domain_type_for(LnmConfig(uri="qemu:///system", domain_type="qemu")) == "qemu"
    assert domain_type_for(LnmConfig(uri="test:///default")) is None  # the URI's default
    with pytest.raises(ConfigError, match="use auto, kvm or qemu"):
        domain_type_for(LnmConfig(domain_type="xen"))
