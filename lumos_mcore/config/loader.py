"""Build a tree of config dataclasses from a YAML file plus dotted ``key=value`` overrides.

Generic on purpose: nothing here knows which sections exist. The dataclass annotations are the
schema; values are parsed with ``yaml.safe_load`` (never ``eval``) and coerced to the annotated
type, so ``train.steps=20``, ``model.name=Lumos-B/2`` and ``data.shards=[a,b]`` all work.

Precedence: dataclass defaults < YAML file < overrides (left to right). A nested dataclass section
given only partly keeps its default values for the rest — including defaults the *parent* sets via
``default_factory``; a plain ``dict`` field given a value is replaced, not merged with its default.
A mapping given as an override (``train={steps: 9}``) merges into what the YAML file set at that
key. Every dataclass is constructed through its ``__init__``, so each
``__post_init__`` validates, and its exceptions propagate unchanged.

Supported annotations: ``int``, ``float``, ``bool``, ``str``, ``pathlib.Path``, ``Any``, ``Enum``
subclasses (by name or value), ``Literal[...]``, ``Optional[X]`` / ``X | None`` and other unions
(first member that accepts the value), ``list[X]``, ``tuple[X, ...]`` / ``tuple[X, Y]``,
``dict[K, V]`` and nested dataclasses. Strings that YAML reads as another type keep their text for
``str`` fields when they come from an override (``model.name=1.0`` gives ``"1.0"``).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import enum
import pathlib
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

_MISSING = dataclasses.MISSING


class ConfigError(ValueError):
    """A config key is unknown, missing or has a value of the wrong type."""


@dataclasses.dataclass(frozen=True)
class _Override:
    """A scalar from the command line: YAML-parsed value plus the original text."""

    raw: str
    value: Any


def _unwrap(value: Any) -> Any:
    return value.value if isinstance(value, _Override) else value


def _describe(value: Any) -> str:
    value = _plain_value(value)
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "None"
    if isinstance(tp, type) and typing.get_origin(tp) is None:
        return tp.__name__
    return str(tp).replace("typing.", "")


# ---- reading ---------------------------------------------------------------------------------


def _parse_override(item: str) -> tuple[list[str], _Override | Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    if isinstance(value, (dict, list)):
        return parts, value
    return parts, _Override(raw=raw, value=value)


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``update`` over ``base``; nested mappings merge, anything else replaces."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def _set_path(tree: dict[str, Any], parts: list[str], value: Any) -> None:
    node = tree
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None or (isinstance(child, _Override) and child.value is None):
            child = {}
        elif not isinstance(child, Mapping):
            section = ".".join(parts[: depth + 1])
            raise ConfigError(
                f"config key '{'.'.join(parts)}': '{section}' holds a value, not a section"
            )
        node[part] = child = dict(child)
        node = child
    last = parts[-1]
    if isinstance(value, Mapping) and isinstance(node.get(last), Mapping):
        node[last] = _deep_merge(dict(node[last]), value)
    else:
        node[last] = value


# ---- coercion --------------------------------------------------------------------------------


def _field_types(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except NameError as err:  # e.g. a forward reference to a class defined inside a function
        raise ConfigError(f"cannot resolve the annotations of {cls.__name__}: {err}") from err


def _type_error(key: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(f"config key '{key}' expects {_type_name(tp)}, got {_describe(value)}")


def _coerce_dataclass(cls: type, value: Any, key: str, base: Any = None) -> Any:
    value = _unwrap(value)
    if isinstance(value, cls) and base is None:
        return value
    if not isinstance(value, Mapping):
        raise _type_error(key or "<root>", cls, value)
    data: dict[str, Any] = dict(value)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    prefix = f"{key}." if key else ""
    for name in data:
        if name not in fields:
            full = f"{prefix}{name}"
            close = difflib.get_close_matches(str(name), list(fields), n=1)
            hint = (
                f"did you mean '{prefix}{close[0]}'?"
                if close
                else f"valid keys: {', '.join(prefix + f for f in fields) or 'none'}"
            )
            raise ConfigError(f"unknown config key '{full}' ({hint})")
    hints = _field_types(cls)
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        sub_key = f"{prefix}{name}"
        if name in data:
            # a partly-given nested section starts from the value it would have had otherwise
            default = getattr(base, name) if base is not None else _default_of(f)
            kwargs[name] = _coerce(hints[name], data[name], sub_key, default=default)
        elif base is not None:
            kwargs[name] = getattr(base, name)
        elif f.default is _MISSING and f.default_factory is _MISSING:
            raise ConfigError(f"missing required config key '{sub_key}'")
    return cls(**kwargs)


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:
        return f.default_factory()
    return None


_TRUE = {"true", "yes", "on"}
_FALSE = {"false", "no", "off"}


def _coerce_scalar(tp: type, value: Any, key: str) -> Any:
    raw = value.raw if isinstance(value, _Override) else None
    v = _unwrap(value)
    if tp is bool:
        if isinstance(v, bool):
            return v
        if isinstance(v, str) and v.strip().lower() in _TRUE | _FALSE:
            return v.strip().lower() in _TRUE
    elif tp is int:
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        if isinstance(v, float) and v.is_integer():
            return int(v)
        if isinstance(v, str):
            text = v.strip().replace("_", "")
            try:
                return int(text)
            except ValueError:
                pass
            try:  # "1e3": PyYAML only reads exponents with a dot and a sign as floats
                as_float = float(text)
            except ValueError:
                as_float = None
            if as_float is not None and as_float.is_integer():
                return int(as_float)
    elif tp is float:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        if isinstance(v, str):
            try:  # PyYAML reads "1e-4" (no dot) as a string
                return float(v.strip())
            except ValueError:
                pass
    elif tp is str:
        if isinstance(v, str):
            return v
        if raw is not None:
            return raw.strip()
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return str(v)
    elif tp is pathlib.Path and isinstance(v, (str, pathlib.PurePath)):
        return pathlib.Path(v)
    raise _type_error(key, tp, value)


def _is_none_text(value: Any) -> bool:
    """``None`` / ``none`` for an optional key means null (YAML's spellings are null, ``~`` and
    empty), not the text "None" (``checkpoint.dir=None`` would write to ``./None``)."""
    v = _unwrap(value)
    return isinstance(v, str) and v.strip() in ("None", "none")


def _coerce(tp: Any, value: Any, key: str, default: Any = None) -> Any:
    """Coerce ``value`` to annotation ``tp``; ``default`` seeds partly-given nested dataclasses."""
    if tp is Any or tp is typing.Any:
        return _plain_value(value)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if origin is typing.Union or origin is types.UnionType:
        if type(None) in args and (_unwrap(value) is None or _is_none_text(value)):
            return None
        members = [m for m in args if m is not type(None)]
        if len(members) == 1:  # Optional[X]: keep X's own, more specific error
            m = members[0]
            return _coerce(m, value, key, default if _fits_default(m, default) else None)
        for member in members:
            candidate = _try(
                lambda m=member: _coerce(
                    m, value, key, default if _fits_default(m, default) else None
                )
            )
            if candidate is not _FAIL:
                return candidate
        raise _type_error(key, tp, value)

    if origin is typing.Literal:
        for option in args:
            if isinstance(option, str):
                candidate = _try(lambda: _coerce_scalar(str, value, key))
            elif isinstance(option, enum.Enum):
                candidate = _try(lambda o=option: _coerce(type(o), value, key))
            else:
                candidate = _try(lambda o=option: _coerce_scalar(type(o), value, key))
            if candidate is not _FAIL and candidate == option and type(candidate) is type(option):
                return option
        choices = ", ".join(repr(a) for a in args)
        raise ConfigError(f"config key '{key}' expects one of {choices}, got {_describe(value)}")

    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        base = default if isinstance(default, tp) else None
        return _coerce_dataclass(tp, value, key, base)

    v = _unwrap(value)
    if origin in (list, Sequence, typing.Sequence) or tp in (list, Sequence):
        if not isinstance(v, (list, tuple)):
            raise _type_error(key, tp, value)
        item_tp = args[0] if args else Any
        return [_coerce(item_tp, item, f"{key}[{i}]") for i, item in enumerate(v)]

    if origin is tuple or tp is tuple:
        if not isinstance(v, (list, tuple)):
            raise _type_error(key, tp, value)
        if not args:
            return tuple(_plain_value(x) for x in v)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], item, f"{key}[{i}]") for i, item in enumerate(v))
        if len(args) != len(v):
            raise ConfigError(
                f"config key '{key}' expects {_type_name(tp)} with {len(args)} items, got {len(v)}"
            )
        return tuple(_coerce(a, item, f"{key}[{i}]") for i, (a, item) in enumerate(zip(args, v)))

    if origin in (dict, Mapping, typing.Mapping) or tp in (dict, Mapping):
        if not isinstance(v, Mapping):
            raise _type_error(key, tp, value)
        k_tp, v_tp = args if args else (Any, Any)
        return {
            _coerce(k_tp, k, f"{key}.{k}"): _coerce(v_tp, item, f"{key}.{k}")
            for k, item in v.items()
        }

    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        for member in tp:
            if v == member.value or v == member.name:
                return member
        choices = ", ".join(repr(m.name) for m in tp)
        raise ConfigError(f"config key '{key}' expects one of {choices}, got {_describe(value)}")

    if tp in (bool, int, float, str, pathlib.Path):
        return _coerce_scalar(tp, value, key)

    if isinstance(tp, type):
        if isinstance(v, tp):
            return v
        raise _type_error(key, tp, value)
    raise ConfigError(f"config key '{key}': unsupported annotation {_type_name(tp)}")


_FAIL = object()


def _try(fn: Any) -> Any:
    try:
        return fn()
    except ConfigError:
        return _FAIL


def _fits_default(tp: Any, default: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp) and isinstance(default, tp)


def _plain_value(value: Any) -> Any:
    """Strip override wrappers from an untyped (``Any``) value tree."""
    value = _unwrap(value)
    if isinstance(value, Mapping):
        return {k: _plain_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_value(v) for v in value]
    return value


# ---- writing ---------------------------------------------------------------------------------


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, enum.Enum):
        return _to_plain(obj.value)
    if isinstance(obj, pathlib.PurePath):
        return str(obj)
    if isinstance(obj, Mapping):
        return {_to_plain(k): _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


# ---- public API ------------------------------------------------------------------------------


def load_config(cls: type[T], yaml_path: str | pathlib.Path | None, overrides: Sequence[str]) -> T:
    """Construct ``cls`` from defaults, then the YAML file, then ``key=value`` overrides in order."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"load_config needs a dataclass type, got {cls!r}")
    tree: dict[str, Any] = {}
    if yaml_path is not None:
        with open(yaml_path, encoding="utf-8") as fh:
            loaded = yaml.safe_load(fh)
        if loaded is not None and not isinstance(loaded, Mapping):
            raise ConfigError(
                f"{yaml_path}: top level must be a mapping of sections, got {type(loaded).__name__}"
            )
        tree = dict(loaded or {})
    return load_config_tree(cls, tree, overrides)


def load_config_tree(cls: type[T], tree: Mapping[str, Any], overrides: Sequence[str] = ()) -> T:
    """:func:`load_config` from an already-parsed mapping (e.g. some sections of a recipe)."""
    tree = copy.deepcopy(dict(tree))
    for item in overrides:
        parts, value = _parse_override(item)
        _set_path(tree, parts, value)
    return _coerce_dataclass(cls, tree, "")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config tree (init fields only; tuples as lists, enums as values)."""
    if not (dataclasses.is_dataclass(cfg) and not isinstance(cfg, type)):
        raise TypeError(f"config_to_dict needs a dataclass instance, got {type(cfg).__name__}")
    return _to_plain(cfg)


def save_config(cfg: Any, path: str | pathlib.Path) -> None:
    """Write ``cfg`` as YAML that ``load_config(type(cfg), path, [])`` reads back equal."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)
    pathlib.Path(path).write_text(text, encoding="utf-8")
