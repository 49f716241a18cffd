"""The one config module: typed, strict, layered for ush."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from usher.config import ControllerConfig, UshConfig, load_toml, load_ush_config, to_toml
from usher.errors import ConfigError


def test_round_trip(tmp_path: Path) -> None:
    cfg = ControllerConfig(site_domain="x.org", listen_port=1, plugins=["audit", "hooks"],
                           hooks={"start": "/bin/true"})
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg))
    assert load_toml(ControllerConfig, path) == cfg


def test_unknown_key_and_wrong_type(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('site_domian = "x"\n')
    with pytest.raises(ConfigError, match="unknown setting 'site_domian'"):
        load_toml(ControllerConfig, path)
    path.write_text('listen_port = "80"\n')
    with pytest.raises(ConfigError, match="listen_port: expected int"):
        load_toml(ControllerConfig, path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_toml(ControllerConfig, tmp_path / "missing.toml")
    path.write_text("= broken")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(ControllerConfig, path)


def test_ush_layers_and_password_permissions(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".usher").mkdir(parents=True)
    (home / ".usher" / "ush.config").write_text('controller = "a:1"\nuser = "seuss"\n')
    env_file = tmp_path / "mine.config"
    env_file.write_text('controller = "b:2"\npassword = "s3cret!!"\n')
    os.chmod(env_file, 0o644)
    with pytest.raises(ConfigError, match=f"chmod 600 {env_file}"):
        load_ush_config({"USH_CONFIG": str(env_file)}, home)
    os.chmod(env_file, 0o600)
    cfg = load_ush_config({"USH_CONFIG": str(env_file)}, home)
    assert cfg == UshConfig(controller="b:2", user="seuss", password="s3cret!!")
    assert load_ush_config({}, home).controller == "a:1"
    with pytest.raises(ConfigError, match="does not exist"):
        load_ush_config({"USH_CONFIG": str(tmp_path / "nope")}, home)
