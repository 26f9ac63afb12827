"""Typed configs from plain data: frozen dataclasses built from YAML (with `base:` chains) and
dotted overrides, where unknown keys, wrong types and impossible values raise `ConfigError`
naming the key (and, through `davir_jax.config.load_config`, the file). Each floor defines its
own section (`models.config`, `data.config`, `engine.config`, `core.sharding.MeshConfig`);
`davir_jax.config` joins them.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml

from davir_jax.core.errors import UserError

T = TypeVar("T")


class ConfigError(UserError):
    """A config key is unknown, mistyped or impossible; the message names the key and file."""


def shorthand(default: Any, flag: str, *commands: str) -> Any:
    """A field that `commands` also take as the short flag `flag` (`davir_jax.cli_schema` makes
    the option from this; a bool field's flag is a switch that sets it true, and one switch may
    set several fields)."""
    return dataclasses.field(default=default, metadata={"cli": {flag: commands}})


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` (recursing into dataclasses)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own, more precise error
            return _coerce(value, options[0], key)
        for a in options:
            try:
                return _coerce(value, a, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} is not a {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return build(tp, value, key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        kt, vt = typing.get_args(tp) or (Any, Any)
        return {_coerce(k, kt, f"{key}"): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        item = args[0] if args else Any
        return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "3e-3" (no dot) as a string; a researcher means the number.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported annotation {tp}")


def build(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Instantiate dataclass `cls` from a dict; unknown keys and bad values name the key."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown key {where}{unknown[0]} (known in {prefix or 'the top level'}: "
            f"{', '.join(fields)})"
        )
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else k
        kwargs[k] = _coerce(v, hints[k], key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        # Validation in __post_init__ starts its message with the field name.
        msg = str(e)
        field = msg.split(":", 1)[0] if ":" in msg else ""
        key = f"{prefix}.{field}" if prefix and field in fields else (prefix or field)
        raise ConfigError(
            f"{key}: {msg.split(':', 1)[1].strip() if field in fields else msg}"
        ) from e


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain data (for manifests and YAML dumps)."""
    return dataclasses.asdict(cfg)


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML mapping with its `base:` chain resolved (safe_load only)."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: base: cycle through {[str(p) for p in _seen]}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror})") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    base = data.pop("base", None)
    plugins = data.get("plugins")
    if isinstance(plugins, list):
        # A plugin file is found next to the config that names it, as `base:` is.
        data["plugins"] = [
            str(path.parent / p) if isinstance(p, str) and _is_relative_file(p) else p
            for p in plugins
        ]
    if base is not None:
        data = _deep_merge(read_yaml(path.parent / base, _seen + (path,)), data)
    return data


def _is_relative_file(spec: str) -> bool:
    """Whether a plugin spec is a relative path to a file (not a module name)."""
    return (spec.endswith(".py") or "/" in spec) and not Path(spec).expanduser().is_absolute()


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`--a.b=v` / `a.b=v` strings into a nested dict; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        if "=" not in text:
            raise ConfigError(f"override {item!r}: expected --key.path=value")
        key, raw = text.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            # e.g. --data.fields={a: (an unclosed flow mapping): name the key and the value.
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(
                f"override {item!r}: {key}: the value {raw!r} is not valid YAML ({problem})"
            ) from None
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        node[parts[-1]] = value
    return out
