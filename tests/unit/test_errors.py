"""Tests of usher.errors: one tree, stable codes, errors as data, exit codes."""

from __future__ import annotations

import pytest

import usher.errors as errors
from usher.errors import UsherError, all_codes, error_class

FAMILY_EXIT_CODES = {
    "internal": 1,
    "invalid_request": 2,
    "not_found": 3,
    "conflict": 4,
    "permission_denied": 5,
    "unavailable": 6,
    "hypervisor": 7,
    "directory": 8,
    "protocol": 9,
    "config": 10,
    "dns": 11,
}

ALL = sorted(all_codes().items())


def subclasses(cls: type[UsherError]) -> list[type[UsherError]]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *subclasses(sub)]
    return found


def test_codes_are_unique_and_match_their_classes() -> None:
    codes = all_codes()
    assert len(set(codes.values())) == len(codes)
    for code, cls in codes.items():
        assert cls.__dict__["code"] == code
        assert code.isidentifier() and code == code.lower()
        assert error_class(code) is cls
    assert error_class("no_such_code") is None


def test_every_error_class_is_registered() -> None:
    registered = set(all_codes().values())
    assert UsherError in registered
    for cls in subclasses(UsherError):
        if cls.__module__ == errors.__name__:
            assert cls in registered, cls
    public = {obj for obj in vars(errors).values()
              if isinstance(obj, type) and issubclass(obj, UsherError)}
    assert public <= registered
    assert all(issubclass(cls, UsherError) for cls in registered)


def test_module_docstring_draws_every_code() -> None:
    tree = errors.__doc__ or ""
    for code, cls in ALL:
        assert f"{cls.__name__} ({code}" in tree, f"{code} missing from the tree in usher.errors"


def test_a_class_must_bring_its_own_unused_code() -> None:
    with pytest.raises(TypeError, match="own code"):
        type("NoCode", (errors.NotFound,), {})
    with pytest.raises(TypeError, match="used twice"):
        type("Twice", (errors.NotFound,), {"code": "vm_not_found"})
    assert error_class("vm_not_found") is errors.VmNotFound


@pytest.mark.parametrize(("code", "cls"), ALL, ids=[code for code, _ in ALL])
def test_wire_round_trip_keeps_the_class(code: str, cls: type[UsherError]) -> None:
    err = cls("something went wrong", details={"vm": "web", "count": 2})
    wire = err.to_wire()
    assert wire == {"code": code, "family": err.family, "message": "something went wrong",
                    "details": {"vm": "web", "count": 2}}
    back = UsherError.from_wire(**wire)
    assert type(back) is cls
    assert back.message == str(back) == "something went wrong"
    assert back.details == {"vm": "web", "count": 2}
    assert back.family == err.family
    assert back.exit_code == err.exit_code


@pytest.mark.parametrize(("code", "cls"), ALL, ids=[code for code, _ in ALL])
def test_exit_code_belongs_to_the_family(code: str, cls: type[UsherError]) -> None:
    err = cls("x")
    assert err.family in FAMILY_EXIT_CODES
    assert cls.exit_code == FAMILY_EXIT_CODES[err.family]
    family_class = all_codes()[err.family]
    assert isinstance(err, family_class)


def test_families_are_the_direct_children_of_the_root() -> None:
    direct = {cls.code for cls in UsherError.__subclasses__()
              if cls.__module__ == errors.__name__}
    assert direct | {"internal"} == set(FAMILY_EXIT_CODES)
    assert len(set(FAMILY_EXIT_CODES.values())) == len(FAMILY_EXIT_CODES)


def test_unknown_code_rebuilds_as_its_family() -> None:
    err = UsherError.from_wire("vm_on_fire", "the VM is on fire", family="hypervisor",
                               details={"vm": "web"})
    assert type(err) is errors.HypervisorError
    assert err.message == "the VM is on fire" and err.details == {"vm": "web"}
    assert err.exit_code == 7


def test_unknown_code_and_family_rebuild_as_the_root() -> None:
    assert type(UsherError.from_wire("vm_on_fire", "m")) is UsherError
    assert type(UsherError.from_wire("vm_on_fire", "m", family="weather")) is UsherError
    assert UsherError.from_wire("vm_on_fire", "m").exit_code == 1


def test_known_code_wins_over_a_stale_family() -> None:
    err = UsherError.from_wire("vm_not_found", "m", family="conflict")
    assert type(err) is errors.VmNotFound


def test_details_default_to_an_empty_dict_not_shared() -> None:
    a, b = errors.Conflict("a"), errors.Conflict("b")
    a.details["x"] = 1
    assert b.details == {}
    assert UsherError.from_wire("conflict", "m").details == {}


def test_repr_and_str() -> None:
    err = errors.InvalidName("bad name 'x y'")
    assert str(err) == "bad name 'x y'"
    assert repr(err) == "InvalidName(\"bad name 'x y'\")"
    assert err.family == "invalid_request"
    assert UsherError("boom").family == "internal"
