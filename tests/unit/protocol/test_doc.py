"""docs/protocol.md is checked against the protocol's tables, so it cannot drift."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import msgspec
import pytest

from usher.config import ControllerConfig
from usher.errors import ConfigError, all_codes
from usher.protocol import doc, frames
from usher.protocol.ops import OPS, PUSHES

DOC = Path(__file__).resolve().parents[3] / "docs" / "protocol.md"
REGENERATE = "python -m usher.protocol.doc --write docs/protocol.md"


@pytest.fixture(scope="module")
def text() -> str:
    return DOC.read_text()


@pytest.fixture(scope="module")
def intro(text: str) -> str:
    return text.partition(doc.BEGIN)[0]


@pytest.fixture(scope="module")
def reference() -> str:
    return doc.render_reference()


def test_generated_part_matches_the_tables(text: str, reference: str) -> None:
    assert doc.generated_part(text) == reference, (
        f"docs/protocol.md is out of date with usher/protocol/ops.py or usher/errors.py; "
        f"run: {REGENERATE}")


def test_rendering_is_stable(reference: str) -> None:
    assert doc.render_reference() == reference


@pytest.mark.parametrize("name", list(OPS))
def test_every_operation_is_documented(name: str, reference: str) -> None:
    assert OPS[name].doc.strip(), f"operation {name} has no doc in usher/protocol/ops.py"
    assert f"#### `{name}`" in reference


@pytest.mark.parametrize("topic", list(PUSHES))
def test_every_push_is_documented(topic: str, reference: str) -> None:
    assert PUSHES[topic].doc.strip(), f"push {topic} has no doc in usher/protocol/ops.py"
    assert f"### `{topic}`" in reference


def test_every_error_code_is_listed(reference: str) -> None:
    for code, cls in all_codes().items():
        assert f"| `{code}` | " in reference, code
        assert f"| {cls.exit_code} | `{cls.__name__}` |" in reference, code


ENVELOPES = [frames.Hello, frames.Welcome, frames.Refuse, frames.Request, frames.Reply,
             frames.Push, frames.Ping, frames.Pong, frames.Bye, frames.ErrorBody]


@pytest.mark.parametrize("envelope", ENVELOPES, ids=lambda e: e.__name__)
def test_hand_written_envelopes_list_every_field(intro: str, envelope: type) -> None:
    # The envelope tables are written by hand: at least keep them complete.
    info = msgspec.inspect.type_info(envelope)
    assert isinstance(info, msgspec.inspect.StructType)
    headings = [line for line in intro.splitlines() if line.startswith("### ")]
    assert any(f"`{envelope.__name__}`" in h for h in headings), envelope.__name__
    if info.tag is not None:
        assert f'`t = "{info.tag}"`' in intro
    for field in info.fields:
        assert f"| `{field.encode_name}` |" in intro, f"{envelope.__name__}.{field.name}"


def test_hand_written_limits_match_the_code(intro: str) -> None:
    assert frames.MAX_FRAME == 4 * 1024 * 1024 and "**`MAX_FRAME`** (4 MiB)" in intro
    assert frames.PRELOGIN_MAX_FRAME == 16 * 1024
    assert "**`PRELOGIN_MAX_FRAME`** (16 KiB)" in intro


SETTINGS = ["hello_timeout_s", "max_unauthenticated", "max_connections", "heartbeat_s",
            "login_max_failures", "login_max_failures_per_address", "login_window_s",
            "join_token_ttl_s"]


@pytest.mark.parametrize("name", SETTINGS)
def test_hand_written_settings_and_defaults_match_the_config(intro: str, name: str) -> None:
    defaults = {f.name: f.default for f in dataclasses.fields(ControllerConfig)}
    assert name in defaults, f"docs/protocol.md names a setting {name} that does not exist"
    assert f"`{name}`" in intro
    mentioned = re.findall(rf"`{name}`[^`]*?default ([\d.]+)", intro, flags=re.S)
    value = defaults[name]
    assert isinstance(value, int | float)
    assert [float(m) for m in mentioned] in ([], [float(value)], [float(value)] * 2), (
        f"docs/protocol.md gives another default for {name} than usher/config.py")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_internal_links_resolve(text: str) -> None:
    anchors = set(re.findall(r'<a id="([^"]+)"></a>', text))
    seen: dict[str, int] = {}
    in_code = False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        slug = _slug(line.lstrip("#"))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    links = set(re.findall(r"\]\(#([^)]+)\)", text))
    assert links - anchors == set()


def test_splice_replaces_only_the_generated_part() -> None:
    document = f"intro\n{doc.BEGIN}\nold\n{doc.END}\ntail\n"
    spliced = doc.splice(document, "new\n")
    assert spliced == f"intro\n{doc.BEGIN}\nnew\n{doc.END}\ntail\n"
    assert doc.generated_part(spliced) == "new\n"


def test_missing_markers_are_an_error() -> None:
    with pytest.raises(ConfigError):
        doc.generated_part("no markers here")
    with pytest.raises(ConfigError):
        doc.splice(f"{doc.END} before {doc.BEGIN}", "x")


def test_command_line_checks_and_writes(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "protocol.md"
    path.write_text(f"# Intro\n\n{doc.BEGIN}\nstale\n{doc.END}\n")
    assert doc.main(["--check", str(path)]) == 1
    assert "out of date" in capsys.readouterr().err
    assert doc.main(["--write", str(path)]) == 0
    assert doc.main(["--check", str(path)]) == 0
    assert path.read_text().startswith("# Intro\n\n")
    assert doc.generated_part(path.read_text()) == doc.render_reference()
    assert doc.main([]) == 0
    assert capsys.readouterr().out == doc.render_reference()
    assert doc.main(["--check", str(tmp_path / "missing.md")]) == 1
