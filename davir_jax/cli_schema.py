"""The command line, generated from the config schema (the dataclasses of `davir_jax.config`).

Each key of a section a command reads becomes an option `--section.key VALUE`, listed by
`davir COMMAND --help` with its default and the first sentence of its doc (from the field's
`doc` metadata, the section's docstring or the comment on the field). A field's `cli` metadata
(`config.shorthand`) names short flags and the commands that offer them: `--data F` in
`davir score` is `--data.path=F`. A short flag on a bool field is a switch that sets it true; a
switch may set several keys (`--strict`), each key declaring it.

Parsed options become the `--section.key=value` overrides a user may type, so
`config.load_config` checks all of them in one place: unknown keys and bad values are errors
that name the key and the file. They apply in this order: shorthands, then dotted options in
command-line order, then the overrides argparse did not know (nested keys such as
`--model.arch.num_layers=2`, keys of sections the command does not list).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import io
import re
import textwrap
import tokenize
import types
import typing
from collections.abc import Sequence
from typing import Any, Union

import yaml

# Where the parsed options collect (namespace attributes; `config_overrides` reads them).
SHORTHANDS = "config_shorthands"
OVERRIDES = "config_overrides"
TOP_LEVEL = "top-level"  # the pseudo-section of the config's own scalar keys (`seed`)


@dataclasses.dataclass(frozen=True)
class Key:
    """One config key: its dotted path, field, resolved annotation and doc."""

    path: str
    section: str
    field: dataclasses.Field
    hint: Any
    doc: str

    @property
    def default(self) -> Any:
        f = self.field
        if f.default is not dataclasses.MISSING:
            return f.default
        if f.default_factory is not dataclasses.MISSING:
            return f.default_factory()
        return dataclasses.MISSING

    @property
    def is_bool(self) -> bool:
        return self.hint is bool

    def flags(self, command: str) -> list[str]:
        """The shorthand flags that set this key in `command`."""
        return [f for f, cmds in self.field.metadata.get("cli", {}).items() if command in cmds]


def sections(cls: type) -> dict[str, type]:
    """The config's sections (its dataclass-typed fields), by name."""
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    return {f.name: hints[f.name] for f in fields if dataclasses.is_dataclass(hints[f.name])}


@functools.cache
def schema_keys(cls: type) -> tuple[Key, ...]:
    """Every key of `cls`: the top-level scalars, then each section's fields (one level: a
    dataclass-typed field inside a section, such as `model.arch`, is one key)."""
    out = []
    hints = typing.get_type_hints(cls)
    nested = sections(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name not in nested:
            out.append(Key(f.name, TOP_LEVEL, f, _plain(hints[f.name]), docs.get(f.name, "")))
    for name, sec in nested.items():
        sec_hints = typing.get_type_hints(sec)
        sec_docs = field_docs(sec)
        for f in dataclasses.fields(sec):
            if f.init:
                hint = _plain(sec_hints[f.name])
                out.append(Key(f"{name}.{f.name}", name, f, hint, sec_docs.get(f.name, "")))
    return tuple(out)


def _plain(tp: Any) -> Any:
    """`X | None` -> X (None is a value the option takes, not a type)."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(options) == 1:
            return options[0]
    return tp


def _metavar(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is tuple or origin is list:
        return "LIST"
    if origin is dict or dataclasses.is_dataclass(tp):
        return "MAPPING"
    return {bool: "BOOL", int: "INT", float: "FLOAT", str: "STR"}.get(tp, "VALUE")


def show(value: Any) -> str:
    """A default as YAML, the way it is typed on the command line (`null`, `true`, `[a, b]`)."""
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if isinstance(value, tuple):
        value = list(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=1_000_000).strip()
    return text.removesuffix("...").strip()


# -- docs: metadata, the section's docstring, comments on the field --------------------------

# A docstring splits into clauses at a sentence end (not e.g., i.e.) or semicolon before a capital
# or a backticked name, at a blank line, and before a line that starts a "`name`:" definition.
_CLAUSE = re.compile(r"(?<=[.;])(?<!e\.g\.)(?<!i\.e\.)\s+(?=[A-Z`])|\n\s*\n|\n(?=\s*`\w+`:)")


def _clauses(text: str) -> list[str]:
    return [" ".join(c.split()) for c in _CLAUSE.split(text) if c.strip()]


def _comments(cls: type) -> dict[str, str]:
    """Each field's comment: on its line, else the comment lines right above it."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (e.g. a frozen build): docstrings only
        return {}
    by_line: dict[int, tuple[str, bool]] = {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            whole_line = tok.line.lstrip().startswith("#")
            by_line[tok.start[0]] = (tok.string.lstrip("#").strip(), whole_line)
    out = {}
    for node in ast.parse(src).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        text, whole_line = by_line.get(node.end_lineno, ("", True))
        if not text or whole_line:
            above, line = [], node.lineno - 1
            while line in by_line and by_line[line][1]:
                above.insert(0, by_line[line][0])
                line -= 1
            text = " ".join(above)
        if text:
            out[node.target.id] = text
    return out


# "`a`, `b`: doc" defines a and b.
_DEFINES = re.compile(r"((?:`\w+`(?:, | and | or )?)+):\s*(.*)", re.S)


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The first sentence of each documented field's doc: its `doc` metadata; else the clause of
    the class docstring that defines it ("`name`: ..."), with the comment on the field added;
    else that comment; else the first clause of the docstring that names it."""
    clauses = _clauses(cls.__dict__.get("__doc__") or "")
    defined: dict[str, str] = {}
    for c in clauses:
        m = _DEFINES.match(c)
        if m:
            for name in re.findall(r"`(\w+)`", m.group(1)):
                defined.setdefault(name, m.group(2).strip())
    comments = _comments(cls)
    out = {}
    for f in dataclasses.fields(cls):
        note = _clauses(comments[f.name])[0] if f.name in comments else ""
        doc = f.metadata.get("doc") or defined.get(f.name, "")
        if doc and note and note not in doc:
            doc = f"{doc} ({note})"
        doc = doc or note or next((c for c in clauses if f"`{f.name}`" in c), "")
        if doc:
            out[f.name] = doc.replace("`", "").rstrip(".;:")
    return out


# -- argparse -------------------------------------------------------------------------------


class _Override(argparse.Action):
    """Records `--key=value` for each of `keys` (a switch, nargs=0, records `--key=true`)."""

    def __init__(self, option_strings: list[str], dest: str, keys: tuple[str, ...], **kw: Any):
        super().__init__(option_strings, dest, **kw)
        self.keys = keys

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None) -> None:
        items = list(getattr(namespace, self.dest, None) or [])  # a copy, as argparse's append
        value = "true" if self.nargs == 0 else values
        items += [f"--{k}={value}" for k in self.keys]
        setattr(namespace, self.dest, items)


def _help(text: str) -> str:
    return text.replace("%", "%%")  # argparse %-formats help strings


def add_config_options(
    parser: argparse.ArgumentParser, command: str, names: Sequence[str] | None, cls: type
) -> None:
    """Give `parser` (the parser of `command`) an option for every key of the sections `names`
    (None: all) of config class `cls` and of its top level, and the shorthands the schema
    declares for `command`."""
    names = list(sections(cls)) if names is None else list(names)
    unknown = [n for n in names if n not in sections(cls)]
    if unknown:
        known = ", ".join(sections(cls))
        raise ValueError(f"{command}: no config section {unknown[0]} (known: {known})")
    keys = schema_keys(cls)
    _add_shorthands(parser, command, [k for k in keys if k.flags(command)], {TOP_LEVEL, *names})
    for name in (TOP_LEVEL, *names):
        doc = _clauses(sections(cls).get(name, cls).__doc__ or "")[:1]
        group = parser.add_argument_group(
            f"config: {name}" if name != TOP_LEVEL else "config: top level",
            _help(doc[0]) if doc else None,
        )
        for k in keys:
            if k.section == name:
                group.add_argument(
                    f"--{k.path}",
                    action=_Override,
                    dest=OVERRIDES,
                    keys=(k.path,),
                    metavar=_metavar(k.hint),
                    help=_help(f"{k.doc} (default: {show(k.default)})".lstrip()),
                )


def _add_shorthands(
    parser: argparse.ArgumentParser, command: str, keys: list[Key], offered: set[str]
) -> None:
    """The short flags of `command` that set `keys`: one option per flag, a switch when every
    key it sets is a bool; a flag must set a key of a section the command lists."""
    by_flag: dict[str, list[Key]] = {}
    for key in keys:
        for flag in key.flags(command):
            if key.section not in offered:
                raise ValueError(f"{command}: {flag} sets {key.path}, a section it does not list")
            by_flag.setdefault(flag, []).append(key)
    for flag, targets in by_flag.items():
        paths = tuple(k.path for k in targets)
        if all(k.is_bool for k in targets):
            sets = " ".join(f"--{p}=true" for p in paths)
            doc = "; ".join(k.doc for k in targets if k.doc)
            parser.add_argument(
                flag,
                action=_Override,
                dest=SHORTHANDS,
                keys=paths,
                nargs=0,
                help=_help(f"same as {sets}" + (f": {doc}" if doc else "")),
            )
        elif len(targets) == 1:
            (k,) = targets
            parser.add_argument(
                flag,
                action=_Override,
                dest=SHORTHANDS,
                keys=paths,
                metavar=_metavar(k.hint),
                help=_help(f"same as --{k.path}: {k.doc} (default: {show(k.default)})"),
            )
        else:
            raise ValueError(f"{command}: {flag} names several keys {paths}; only switches may")


def config_overrides(args: argparse.Namespace) -> list[str]:
    """The overrides the generated options parsed: shorthands first (so that a dotted option
    given as well wins, as it did when shorthands were hand-written), then dotted ones."""
    return [*(getattr(args, SHORTHANDS, None) or []), *(getattr(args, OVERRIDES, None) or [])]


__all__ = [
    "Key",
    "add_config_options",
    "config_overrides",
    "field_docs",
    "schema_keys",
    "sections",
    "show",
]
