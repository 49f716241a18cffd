"""usher's layers point one way, checked by reading every module's imports.

Imports are read with :mod:`ast`, not by importing: a lazy import inside a
function and one under ``TYPE_CHECKING`` count as much as one at the top,
because each ties the two layers together all the same.

* the core (``usher.errors``, ``usher.names``, ``usher.config``,
  ``usher.failpoints`` and ``usher.protocol``) imports nothing above it;
* ``usher.protocol`` and ``usher.dns`` import only ``usher.errors`` of the
  rest of usher;
* the controller, the node manager and the shell never import each other;
* the client library imports none of them;
* hypervisor drivers and domain XML know nothing of the controller or the DB.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

import usher

ROOT = Path(usher.__file__).parent
CORE = ("usher.errors", "usher.names", "usher.config", "usher.failpoints", "usher.protocol",
        "usher.directory", "usher.dns")
SERVICES = ("usher.controller", "usher.lnm", "usher.ush")
ABOVE_CORE = (*SERVICES, "usher.client", "usher.usertools", "usher.cli", "usher.demo")
DATABASE = ("sqlalchemy", "alembic")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


@cache
def imports_of(module: str) -> frozenset[str]:
    """Every module ``module`` imports, anywhere in its text.

    ``from a import b`` counts as importing ``a`` and ``a.b``, since ``b`` may
    be a submodule.
    """
    path = modules()[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[:len(base_parts) - (node.level - 1)]
                base = ".".join([*base_parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return frozenset(found)


def within(name: str, prefixes: tuple[str, ...] | str) -> bool:
    if isinstance(prefixes, str):
        prefixes = (prefixes,)
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def modules_under(prefixes: tuple[str, ...] | str) -> list[str]:
    return [m for m in modules() if within(m, prefixes)]


def violations(importers: list[str], forbidden: tuple[str, ...] | str) -> list[str]:
    return [f"{m} imports {i}" for m in importers for i in sorted(imports_of(m))
            if within(i, forbidden)]


# ------------------------------------------------------------ the collector
def test_collector_sees_imports() -> None:
    # Guards the checks below against passing because nothing was found.
    assert "usher.controller.server" in imports_of("usher.controller.app")
    assert "usher.controller.app" in imports_of("usher.controller.cli")  # inside a function
    assert "usher.ush.shell" in imports_of("usher.ush.completion")  # under TYPE_CHECKING
    assert "usher.errors" in imports_of("usher.protocol.frames")
    for layer in (*CORE, *SERVICES, "usher.client", "usher.lnm.drivers", "usher.lnm.domxml"):
        assert modules_under(layer), f"no modules found under {layer}"


def test_relative_imports_are_resolved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "usher" / "pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import sibling\n")
    (pkg / "mod.py").write_text("from .sibling import x\nfrom .. import errors\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path / "usher")
    modules.cache_clear()
    imports_of.cache_clear()
    try:
        assert imports_of("usher.pkg") >= {"usher.pkg", "usher.pkg.sibling"}
        assert imports_of("usher.pkg.mod") >= {"usher.pkg.sibling", "usher.errors"}
    finally:
        modules.cache_clear()
        imports_of.cache_clear()


# ------------------------------------------------------------------ layers
def test_core_imports_nothing_above_it() -> None:
    assert violations(modules_under(CORE), ABOVE_CORE) == []


@pytest.mark.parametrize("package", ["usher.protocol", "usher.dns"])
def test_protocol_and_dns_import_only_errors(package: str) -> None:
    bad = [f"{m} imports {i}" for m in modules_under(package)
           for i in sorted(imports_of(m))
           if within(i, "usher") and i != "usher"
           and not within(i, ("usher.errors", package))]
    assert bad == []


@pytest.mark.parametrize("service", SERVICES)
def test_services_never_import_each_other(service: str) -> None:
    others = tuple(s for s in SERVICES if s != service)
    assert violations(modules_under(service), others) == []


def test_client_imports_no_service() -> None:
    assert violations(modules_under("usher.client"), (*SERVICES, "usher.cli", "usher.demo")) \
        == []


def test_usertools_use_only_the_core_and_client() -> None:
    assert violations(modules_under("usher.usertools"),
                      (*SERVICES, "usher.cli", "usher.demo")) == []


def test_hypervisor_code_knows_no_controller_or_database() -> None:
    hypervisor = modules_under(("usher.lnm.drivers", "usher.lnm.domxml"))
    assert violations(hypervisor, ("usher.controller", *DATABASE)) == []


def test_directory_library_knows_no_protocol_or_database() -> None:
    """The directory library serves the controller and the usher_* tools alike."""
    assert violations(modules_under("usher.directory"), ("usher.protocol", *DATABASE)) == []
