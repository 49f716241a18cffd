"""The reference part of ``docs/protocol.md``, rendered from the protocol's tables.

``docs/protocol.md`` is a hand-written introduction followed by a reference
that this module renders from :data:`~usher.protocol.ops.OPS`,
:data:`~usher.protocol.ops.PUSHES`, the msgspec schemas they name and
:func:`usher.errors.all_codes`. The reference sits between two markers; a test
checks that it equals :func:`render_reference`, so the document cannot drift
from the code. After changing the protocol, regenerate it::

    python -m usher.protocol.doc --write docs/protocol.md

Field notes come from the comments beside the fields in ``ops.py``
(``ram: int | None = None  # MiB``), read with :mod:`tokenize`.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import io
import sys
import textwrap
import tokenize
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import msgspec
import msgspec.inspect as mi

from usher.errors import ConfigError, UsherError, all_codes
from usher.protocol.frames import MAX_FRAME, PRELOGIN_MAX_FRAME, PROTOCOL_VERSIONS
from usher.protocol.ops import OPS, PUSHES, TIMEOUTS, Op, PushSpec

BEGIN = "<!-- BEGIN GENERATED -->"
END = "<!-- END GENERATED -->"

_CALLERS = (
    ("client", "Client operations", "Sent by a client (a person's shell or a program) "
     "to the controller."),
    ("node", "Node manager operations", "Sent by a node manager to the controller."),
    ("controller", "Controller to node operations", "Sent by the controller to a node "
     "manager, which runs them on its hypervisor."),
)
_SERVED_BY = {"client": "controller", "node": "controller", "controller": "node manager"}
_TIMEOUT_USE = {
    "fast": "ordinary calls; a mutation waits only until it is accepted",
    "node": "calls that wrap a hypervisor operation on a host",
    "wait": "calls that wait for something to finish",
}


# ------------------------------------------------------------------ types
def _anchor(kind: str, name: str) -> str:
    return f"{kind}-{name.lower().replace('.', '-')}"


def _type(t: mi.Type) -> str:
    """A schema type for people, with struct names linked to their section."""
    if isinstance(t, mi.StructType):
        return f"[`{t.cls.__name__}`](#{_anchor('type', t.cls.__name__)})"
    if isinstance(t, mi.UnionType):
        parts = sorted(t.types, key=lambda x: isinstance(x, mi.NoneType))
        return " or ".join(_type(p) for p in parts)
    if isinstance(t, mi.ListType):
        return f"list of {_type(t.item_type)}"
    if isinstance(t, mi.DictType):
        return f"map of {_type(t.key_type)} to {_type(t.value_type)}"
    if isinstance(t, mi.LiteralType):
        return " or ".join(f'`"{v}"`' if isinstance(v, str) else f"`{v}`" for v in t.values)
    names = {mi.IntType: "int", mi.FloatType: "float", mi.StrType: "str",
             mi.BoolType: "bool", mi.NoneType: "nil", mi.AnyType: "any", mi.RawType: "any",
             mi.BytesType: "bytes"}
    for cls, name in names.items():
        if isinstance(t, cls):
            return f"`{name}`"
    raise TypeError(f"no documentation rendering for schema type {t!r}")


def _structs(types: Iterable[mi.Type], found: dict[type, mi.StructType]) -> None:
    """Collect every struct reachable from ``types``, in order of first use."""
    for t in types:
        if isinstance(t, mi.StructType):
            if t.cls not in found:
                found[t.cls] = t
                _structs((f.type for f in t.fields), found)
        elif isinstance(t, mi.UnionType):
            _structs(t.types, found)
        elif isinstance(t, mi.ListType):
            _structs([t.item_type], found)
        elif isinstance(t, mi.DictType):
            _structs([t.key_type, t.value_type], found)


def _default(field: mi.Field) -> str:
    if field.required:
        return "required"
    if field.default is not msgspec.NODEFAULT:
        value = field.default
    else:
        value = field.default_factory()
    if isinstance(value, msgspec.Struct):
        return "`{}` (all defaults)"
    return f"`{_literal(value)}`"


def _literal(value: Any) -> str:
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


@functools.cache
def _field_notes(cls: type) -> dict[str, str]:
    """The comment beside each field in the class's source, if any."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    notes: dict[str, str] = {}
    lines: dict[int, list[tokenize.TokenInfo]] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        lines.setdefault(tok.start[0], []).append(tok)
    for toks in lines.values():
        words = [t for t in toks if t.type not in (tokenize.INDENT, tokenize.DEDENT)]
        comments = [t.string for t in words if t.type == tokenize.COMMENT]
        if (len(words) > 2 and comments and words[0].type == tokenize.NAME
                and words[1].string == ":" and words[0].start[1] > 0):
            notes[words[0].string] = comments[0].lstrip("#").strip()
    return notes


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _fields_table(struct: mi.StructType) -> list[str]:
    if not struct.fields:
        return ["No fields: an empty map."]
    notes = _field_notes(struct.cls)
    rows = ["| Field | Type | Default | Notes |", "|---|---|---|---|"]
    for f in struct.fields:
        rows.append(f"| `{f.encode_name}` | {_cell(_type(f.type))} | {_cell(_default(f))} "
                    f"| {_cell(notes.get(f.name, ''))} |")
    return rows


def _doc(obj: Any) -> str:
    """The docstring of ``obj`` (not inherited) in Markdown."""
    doc = obj.__dict__.get("__doc__") if isinstance(obj, type) else obj.__doc__
    return inspect.cleandoc(doc).replace("``", "`") if doc else ""


# -------------------------------------------------------------- sections
def _op_section(op: Op) -> list[str]:
    args = mi.type_info(op.args)
    result = mi.type_info(op.result)
    lines = [f'<a id="{_anchor("op", op.name)}"></a>', "", f"#### `{op.name}`", "", op.doc, ""]
    if not op.mutation:
        mutation = "no"
    elif op.caller == "client":
        mutation = ("yes; idempotent by request id: a repeat of the id by the same user "
                    "gets the first call's reply")
    else:
        mutation = "yes"
    lines += [
        f"- Caller: `{op.caller}`, served by the {_SERVED_BY[op.caller]}",
        f"- Arguments: {_type(args)}",
        f"- Result: {_type(result)}",
        f"- Timeout class: `{op.timeout}` ({op.timeout_s:g} s)",
        f"- Mutation: {mutation}",
    ]
    if op.admin_only:
        lines.append("- Site admin only: yes")
    lines += [f"- Since: protocol version {op.since}", ""]
    if isinstance(args, mi.StructType):
        lines += ["Arguments:", "", *_fields_table(args), ""]
    return lines


def _push_section(push: PushSpec) -> list[str]:
    return [f'<a id="{_anchor("push", push.topic)}"></a>', "", f"### `{push.topic}`", "",
            push.doc, "",
            f"- Sender: `{push.sender}`",
            f"- Body: {_type(mi.type_info(push.body))}",
            f"- Since: protocol version {push.since}", ""]


def _type_section(struct: mi.StructType) -> list[str]:
    name = struct.cls.__name__
    lines = [f'<a id="{_anchor("type", name)}"></a>', "", f"### `{name}`", ""]
    if _doc(struct.cls):
        lines += [_doc(struct.cls), ""]
    return [*lines, *_fields_table(struct), ""]


def _family(cls: type[UsherError]) -> str:
    for klass in cls.__mro__:
        if klass.__bases__ == (UsherError,):
            return klass.code  # type: ignore[attr-defined]
    return UsherError.code


def _errors_section() -> list[str]:
    codes = all_codes()
    rows = sorted(codes.items(), key=lambda kv: (kv[1].exit_code, _family(kv[1]) != kv[0],
                                                 kv[0]))
    lines = ["## Error codes", "",
             "Every code an error reply or a refusal may carry. A code this build does "
             "not know is read as its family; the exit code is what a command line tool "
             "exits with when the error ends it.", "",
             "| Code | Family | Exit code | Class | Meaning |", "|---|---|---|---|---|"]
    for code, cls in rows:
        meaning = _doc(cls).split("\n\n")[0]
        lines.append(f"| `{code}` | `{_family(cls)}` | {cls.exit_code} | `{cls.__name__}` "
                     f"| {_cell(meaning)} |")
    return [*lines, ""]


def render_reference() -> str:
    """The generated reference: operations, pushes, message types and error codes."""
    lines = [
        "<!-- Generated by usher.protocol.doc from usher/protocol/ops.py and usher/errors.py;"
        " do not edit by hand. Regenerate: python -m usher.protocol.doc --write"
        " docs/protocol.md -->",
        "",
        "## Operations",
        "",
        f"Protocol versions of this build: {', '.join(map(str, PROTOCOL_VERSIONS))}. "
        f"Frame limits: {MAX_FRAME} bytes after hello, {PRELOGIN_MAX_FRAME} before.",
        "",
        "Timeout classes (how long a caller waits for the reply):",
        "",
        "| Class | Seconds | Used for |",
        "|---|---|---|",
        *(f"| `{name}` | {seconds:g} | {_TIMEOUT_USE.get(name, '')} |"
          for name, seconds in TIMEOUTS.items()),
        "",
        "| Operation | Caller | Timeout | Mutation | Site admin | Since |",
        "|---|---|---|---|---|---|",
        *(f"| [`{op.name}`](#{_anchor('op', op.name)}) | `{op.caller}` | `{op.timeout}` "
          f"| {'yes' if op.mutation else 'no'} | {'yes' if op.admin_only else 'no'} "
          f"| {op.since} |" for op in OPS.values()),
        "",
    ]
    for caller, title, blurb in _CALLERS:
        ops = [op for op in OPS.values() if op.caller == caller]
        if ops:
            lines += [f"### {title}", "", blurb, ""]
            for op in ops:
                lines += _op_section(op)
    lines += ["## Pushes", "",
              "Pushes are one-way: no reply, no request id. A push from a sender the "
              "table does not name, of an unknown topic or with a body that does not fit "
              "its schema is dropped.", ""]
    for push in PUSHES.values():
        lines += _push_section(push)
    structs: dict[type, mi.StructType] = {}
    _structs([mi.type_info(t) for op in OPS.values() for t in (op.args, op.result)], structs)
    _structs([mi.type_info(p.body) for p in PUSHES.values()], structs)
    lines += ["## Message types", "",
              "Argument, result and push body schemas. Each is a MessagePack map keyed by "
              "field name; a field at its default may be left out, and an unknown field "
              "is an error (`bad_frame`).", ""]
    for struct in sorted(structs.values(), key=lambda s: s.cls.__name__):
        lines += _type_section(struct)
    lines += _errors_section()
    return "\n".join(lines).rstrip("\n") + "\n"


# ------------------------------------------------------------ the file
def generated_part(document: str) -> str:
    """The text between the markers of ``document``.

    Raises:
        ConfigError: the markers are missing or out of order.
    """
    start, end = document.find(BEGIN), document.find(END)
    if start < 0 or end < start:
        raise ConfigError(f"the document has no {BEGIN} ... {END} section")
    return document[start + len(BEGIN):end].strip("\n") + "\n"


def splice(document: str, reference: str) -> str:
    """``document`` with the text between its markers replaced by ``reference``."""
    generated_part(document)  # check the markers
    head, _, rest = document.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{reference.rstrip()}\n{END}{tail}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m usher.protocol.doc",
        description="Render the protocol reference from the operation table.")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", metavar="FILE",
                       help="replace the generated section of FILE (docs/protocol.md)")
    group.add_argument("--check", metavar="FILE",
                       help="exit 1 if the generated section of FILE is out of date")
    args = parser.parse_args(argv)
    reference = render_reference()
    try:
        if args.write:
            path = Path(args.write)
            path.write_text(splice(path.read_text(), reference))
        elif args.check:
            if generated_part(Path(args.check).read_text()) != reference:
                print(f"{args.check} is out of date; run: python -m usher.protocol.doc "
                      f"--write {args.check}", file=sys.stderr)
                return 1
        else:
            sys.stdout.write(reference)
    except (OSError, ConfigError) as exc:
        print(f"usher.protocol.doc: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
