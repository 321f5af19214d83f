"""Typed conversion from YAML data to frozen dataclasses, rejecting unknown fields.

The dataclasses *are* the schema: each API message is a frozen slotted dataclass whose
attribute names are the snake_case of the wire (JSON/YAML) names, so ``from_data`` can
map ``retryOn`` to ``retry_on`` without per-class code. A field may override its wire
name with ``wire("name")``. Conversion never stops at the first problem: it records
every error with its field path and line in a ``ConvertContext`` and returns the best
value it could build, so a user sees all mistakes at once.

Supported annotations: str, int, float, bool, timedelta (Istio/Go duration strings),
tuple[T, ...], dict[str, T], dict[int, T] (numeric keys; quoted numbers accepted), Optional/``T | None``, ``int | str``, Literal[...],
str Enums, nested dataclasses, and ``Any`` (kept as plain data, for free-form parts).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from datetime import timedelta
from enum import Enum
from functools import lru_cache
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from isthmus.api.loader import LineList, LineMap
from isthmus.core.errors import Diagnostic, Severity

T = TypeVar("T")

_MISSING = dataclasses.MISSING


def wire(name: str, **kwargs: Any) -> Any:
    """A dataclass field whose YAML/JSON name is ``name`` (default None unless given)."""
    kwargs.setdefault("default", None)
    return dataclasses.field(metadata={"wire": name}, **kwargs)


def required(**kwargs: Any) -> Any:
    """Mark a field as required at parse time (absent -> error)."""
    return dataclasses.field(metadata={"required": True, **kwargs.pop("metadata", {})}, **kwargs)


def camel(name: str) -> str:
    name = name.rstrip("_")
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


@dataclasses.dataclass
class ConvertContext:
    """Collects diagnostics during conversion; knows which file/resource it is in."""

    file: str = ""
    resource: str = ""
    diagnostics: list[Diagnostic] = dataclasses.field(default_factory=list)

    def error(self, path: str, line: int, message: str) -> None:
        self.diagnostics.append(
            Diagnostic(Severity.ERROR, message, file=self.file, line=line, resource=self.resource, field=path)
        )

    def warning(self, path: str, line: int, message: str) -> None:
        self.diagnostics.append(
            Diagnostic(Severity.WARNING, message, file=self.file, line=line, resource=self.resource, field=path)
        )

    @property
    def has_errors(self) -> bool:
        return any(d.severity is Severity.ERROR for d in self.diagnostics)


@dataclasses.dataclass(frozen=True, slots=True)
class _FieldSpec:
    attr: str
    wire: str
    tp: Any
    required: bool
    has_default: bool


@lru_cache(maxsize=None)
def _fields(cls: type) -> tuple[dict[str, _FieldSpec], tuple[_FieldSpec, ...]]:
    hints = typing.get_type_hints(cls)
    by_wire: dict[str, _FieldSpec] = {}
    ordered = []
    for f in dataclasses.fields(cls):
        spec = _FieldSpec(
            attr=f.name,
            wire=f.metadata.get("wire") or camel(f.name),
            tp=hints[f.name],
            required=bool(f.metadata.get("required")),
            has_default=f.default is not _MISSING or f.default_factory is not _MISSING,  # type: ignore[misc]
        )
        by_wire[spec.wire] = spec
        ordered.append(spec)
    return by_wire, tuple(ordered)


def wire_name(cls: type, attr: str) -> str:
    """The YAML name of ``cls.attr`` (for messages that cite a field)."""
    for spec in _fields(cls)[1]:
        if spec.attr == attr:
            return spec.wire
    raise KeyError(attr)


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean"}


def _kind_of(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "list"
    if value is None:
        return "null"
    return type(value).__name__


_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> timedelta:
    """Parse a Go/protobuf duration (``1s``, ``0.5s``, ``1m30s``, ``250ms``).

    Raises ValueError with the expected syntax on anything else (negative too).
    """
    s = text.strip()
    if not s:
        raise ValueError("empty duration")
    if s == "0":
        return timedelta(0)
    pos = 0
    total = 0.0
    for m in _DURATION_RE.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if pos != len(s) or pos == 0:
        raise ValueError(f"invalid duration {text!r} (want e.g. 1s, 0.5s, 250ms, 1m30s)")
    return timedelta(seconds=total)


def _line_of(container: Any, key: Any, fallback: int) -> int:
    if isinstance(container, LineMap):
        return container.key_lines.get(key, container.line or fallback)
    if isinstance(container, LineList) and isinstance(key, int) and key < len(container.item_lines):
        return container.item_lines[key]
    return fallback


def from_data(cls: type[T], data: Any, ctx: ConvertContext, path: str = "", line: int = 0) -> T:
    """Convert ``data`` (from YAML) into ``cls``; errors go to ``ctx``."""
    return _convert(cls, data, ctx, path, line)


def _convert(tp: Any, value: Any, ctx: ConvertContext, path: str, line: int) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        if len(args) == 1:
            return _convert(args[0], value, ctx, path, line)
        return _convert_union(args, value, ctx, path, line)
    if value is None:
        return None
    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(tp, value, ctx, path, line)
    if origin is tuple or origin is list:
        item_tp = get_args(tp)[0]
        if not isinstance(value, list):
            ctx.error(path, line, f"expected a list, got {_kind_of(value)}")
            return ()
        return tuple(
            _convert(item_tp, item, ctx, f"{path}[{i}]", _line_of(value, i, line)) for i, item in enumerate(value)
        )
    if origin is dict:
        key_tp, val_tp = get_args(tp)
        if not isinstance(value, dict):
            ctx.error(path, line, f"expected a map, got {_kind_of(value)}")
            return {}
        out = {}
        for k, v in value.items():
            kline = _line_of(value, k, line)
            if key_tp is str and not isinstance(k, str):
                ctx.error(f"{path}.{k}", kline, f"map keys must be strings, got {_kind_of(k)} {k!r}")
                k = str(k)
            elif key_tp is int and not (isinstance(k, int) and not isinstance(k, bool)):
                # Proto maps keyed by uint32 (e.g. portLevelMtls): YAML may quote the key.
                if isinstance(k, str) and k.strip().isdigit():
                    k = int(k)
                else:
                    ctx.error(f"{path}.{k}", kline, f"map keys must be integers, got {_kind_of(k)} {k!r}")
                    continue
            out[k] = _convert(val_tp, v, ctx, f"{path}.{k}", kline)
        return out
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            ctx.error(path, line, f"invalid value {value!r}; expected one of: {', '.join(map(str, allowed))}")
            return allowed[0]
        return value
    if isinstance(tp, type) and issubclass(tp, Enum):
        try:
            return tp(value)
        except ValueError:
            allowed = ", ".join(str(m.value) for m in tp)
            ctx.error(path, line, f"invalid value {value!r}; expected one of: {allowed}")
            return None
    if tp is timedelta:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            ctx.error(path, line, f"duration {value!r} needs a unit (e.g. {value}s)")
            return None
        if not isinstance(value, str):
            ctx.error(path, line, f"expected a duration string, got {_kind_of(value)}")
            return None
        try:
            return parse_duration(value)
        except ValueError as exc:
            ctx.error(path, line, str(exc))
            return None
    if tp is bool:
        if not isinstance(value, bool):
            ctx.error(path, line, f"expected a boolean, got {_kind_of(value)} {value!r}")
            return None
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float):
                ctx.error(path, line, f"expected an integer, got {value!r}")
            else:
                ctx.error(path, line, f"expected an integer, got {_kind_of(value)} {value!r}")
            return None
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            ctx.error(path, line, f"expected a number, got {_kind_of(value)} {value!r}")
            return None
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            ctx.error(path, line, f"expected a string, got {_kind_of(value)} {value!r}")
            return str(value)
        return value
    raise TypeError(f"schema: unsupported annotation {tp!r} at {path}")  # a bug in our schema


def _convert_union(args: list[Any], value: Any, ctx: ConvertContext, path: str, line: int) -> Any:
    # Only scalar unions are used (IntOrString): take the first that matches exactly.
    for arg in args:
        if arg is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if arg is str and isinstance(value, str):
            return value
        if arg is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    names = " or ".join(_TYPE_NAMES.get(a, getattr(a, "__name__", str(a))) for a in args)
    ctx.error(path, line, f"expected {names}, got {_kind_of(value)} {value!r}")
    return None


def _convert_dataclass(cls: type, value: Any, ctx: ConvertContext, path: str, line: int) -> Any:
    by_wire, ordered = _fields(cls)
    if not isinstance(value, dict):
        ctx.error(path, line, f"expected an object, got {_kind_of(value)} {value!r}")
        value = {}
    line = getattr(value, "line", 0) or line
    kwargs: dict[str, Any] = {}
    for key, item in value.items():
        spec = by_wire.get(key)
        key_path = f"{path}.{key}" if path else str(key)
        key_line = _line_of(value, key, line)
        if spec is None:
            close = _closest(str(key), by_wire)
            hint = f"; did you mean {close!r}?" if close else ""
            ctx.error(key_path, key_line, f"unknown field {key!r}{hint}")
            continue
        converted = _convert(spec.tp, item, ctx, key_path, key_line)
        if converted is not None:
            kwargs[spec.attr] = converted
    for spec in ordered:
        if spec.attr in kwargs:
            continue
        if spec.required:
            ctx.error(f"{path}.{spec.wire}" if path else spec.wire, line, f"missing required field {spec.wire!r}")
        if not spec.has_default:
            kwargs[spec.attr] = _empty(spec.tp)
    return cls(**kwargs)


def _empty(tp: Any) -> Any:
    origin = get_origin(tp)
    if origin in (tuple, list):
        return ()
    if origin is dict:
        return {}
    if tp is str:
        return ""
    if tp is int:
        return 0
    if tp is bool:
        return False
    return None


def _closest(key: str, options: dict[str, Any]) -> str | None:
    import difflib

    matches = difflib.get_close_matches(key, list(options), n=1, cutoff=0.75)
    return matches[0] if matches else None


def to_plain(value: Any) -> Any:
    """Turn LineMap/LineList (and nested) into plain dicts/lists, e.g. for JSON output."""
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value
