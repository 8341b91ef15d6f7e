"""Typed dataclasses from plain data: checked conversion, dotted overrides, YAML out.

Generic over any dataclass tree; :mod:`preftune.config.schema` holds preftune's own. A key that is not
a field is an error naming the nearest valid key; a value of the wrong type is an error naming
the key and the expected type.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable
from typing import Any, Literal

from preftune.errors import ConfigError


# --------------------------------------------------------------------------- conversion
def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else f" Valid keys: {', '.join(options)}."


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str, hint: KeyHint | None = None) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert the few safe cases."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key, hint)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"'{key}': expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"'{key}': expected {_type_name(tp)}, got {value!r}.")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}': expected a mapping of {tp.__name__} settings, got {value!r}.")
        return from_dict(tp, value, prefix=key + ".", hint=hint)
    if origin is list:
        if isinstance(value, (str, int, float)) and args and args[0] is str:
            value = [value]  # `train: data.jsonl` means a list of one file
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{key}': expected a list, got {value!r}.")
        return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}': expected a mapping, got {value!r}.")
        return {_convert(k, args[0], key): _convert(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"'{key}': expected true or false, got {value!r}.")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"'{key}': expected an integer, got {value!r}.")
        return value
    if tp is float:
        # YAML 1.1 reads `1e-6` (no dot) as a string: accept any string Python reads as a float.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"'{key}': expected a number, got {value!r}.")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"'{key}': expected a string, got {value!r}.")
        return str(value)
    if tp is Any:
        return value
    raise ConfigError(f"'{key}': unsupported config type {tp!r}")  # a bug in this module


#: A hook that may explain an unknown key better than a lookalike (preftune's: TRL's names).
KeyHint = Callable[[str], "str | None"]


def from_dict(cls: type, data: dict[str, Any], *, prefix: str = "", hint: KeyHint | None = None) -> Any:
    """Build the dataclass ``cls`` from a plain mapping, checking keys and types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            explained = hint(str(key)) if hint else None
            raise ConfigError(f"unknown config key '{prefix}{key}'.{explained or _closest(str(key), names)}")
        kwargs[key] = _convert(value, hints[key], prefix + key, hint)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain data (every default written out)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            keys.extend(_all_keys(tp, prefix + f.name + "."))
        else:
            keys.append(prefix + f.name)
    return keys


def parse_overrides(items: list[str], cls: type, hint: KeyHint | None = None) -> dict[str, Any]:
    """Turn ``["--train.lr=1e-6", "--data.max_length", "512"]`` into a nested mapping.

    Values are read as YAML scalars (``true``, ``512``, ``[a, b]``, ``null``). A key that is
    not a config key is an error naming the closest one.
    """
    import yaml

    valid = _all_keys(cls)
    nested: dict[str, Any] = {}
    i = 0
    while i < len(items):
        item = items[i]
        if not item.startswith("--"):
            raise ConfigError(f"unexpected argument '{item}': overrides look like --section.key=value.")
        body = item[2:]
        if "=" in body:
            key, raw = body.split("=", 1)
        elif i + 1 < len(items) and not items[i + 1].startswith("--"):
            key, raw = body, items[i + 1]
            i += 1
        else:
            explained = hint(body) if hint and body not in valid else None
            if explained:  # a TRL flag such as --use_peft: say preftune's setting, not how to give a value
                raise ConfigError(f"unknown config key '{body}' in override '{item}'.{explained}")
            raise ConfigError(f"override '{item}' has no value: write --{body}=VALUE.")
        if key not in valid:
            match = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
            explained = (hint(key) if hint else None) or (f" Did you mean '--{match[0]}'?" if match else "")
            raise ConfigError(f"unknown config key '{key}' in override '{item}'.{explained}")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
        i += 1
    return nested


def merge_nested(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_nested(out[key], value)
        else:
            out[key] = value
    return out
