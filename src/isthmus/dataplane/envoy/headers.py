"""Header mutations (headers_to_add / headers_to_remove) with Envoy's append_action.

``HeaderMutations.from_proto`` compiles one level (route config, virtual host, route or
weighted cluster); ``apply_mutations`` applies a sequence of levels to a header dict, in
order, as Envoy's HeaderParser does for each level: remove first, then evaluate every
value, then overwrite, then append.

append_action: APPEND_IF_EXISTS_OR_ADD (default; also legacy ``append: true``),
ADD_IF_ABSENT, OVERWRITE_IF_EXISTS_OR_ADD (legacy ``append: false``), OVERWRITE_IF_EXISTS.
Empty values are skipped unless ``keep_empty_value``.

Values may use a small set of Envoy's formatter variables (anything else is rejected):
  %DOWNSTREAM_REMOTE_ADDRESS%  %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%
  %DOWNSTREAM_LOCAL_ADDRESS%   %DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT%
  %DOWNSTREAM_LOCAL_PORT%      %UPSTREAM_REMOTE_ADDRESS%
  %PROTOCOL%  %HOSTNAME%  %REQ(header-name)%  and ``%%`` for a literal percent sign.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from isthmus.dataplane.envoy._proto import Ctx, join

APPEND_IF_EXISTS_OR_ADD = 0
ADD_IF_ABSENT = 1
OVERWRITE_IF_EXISTS_OR_ADD = 2
OVERWRITE_IF_EXISTS = 3

VARIABLES = frozenset(
    {
        "DOWNSTREAM_REMOTE_ADDRESS", "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT",
        "DOWNSTREAM_LOCAL_ADDRESS", "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT",
        "DOWNSTREAM_LOCAL_PORT", "UPSTREAM_REMOTE_ADDRESS", "PROTOCOL", "HOSTNAME",
    }
)
_VAR_RE = re.compile(r"%([A-Z_]+)(?:\(([^)]*)\))?%")


@dataclass(frozen=True, slots=True)
class FormatContext:
    """Values the formatter variables resolve to, supplied by the caller per request."""

    downstream_remote_address: str = ""  # "ip:port"
    downstream_local_address: str = ""  # "ip:port"
    upstream_remote_address: str = ""
    protocol: str = ""  # "HTTP/1.1", "HTTP/2"
    hostname: str = ""
    request_headers: Mapping[str, str | Sequence[str]] | None = None


def _without_port(addr: str) -> str:
    if addr.startswith("["):
        end = addr.find("]")
        return addr[1:end] if end > 0 else addr
    host, sep, port = addr.rpartition(":")
    return host if sep and port.isdigit() and ":" not in host else addr


def _port(addr: str) -> str:
    _, sep, port = addr.rpartition(":")
    return port if sep and port.isdigit() else ""


Part = str | tuple[str, str]  # literal, or (variable, argument)


def compile_template(ctx: Ctx, value: str, path: str) -> tuple[Part, ...]:
    parts: list[Part] = []
    i = 0
    lit: list[str] = []
    while i < len(value):
        c = value[i]
        if c != "%":
            lit.append(c)
            i += 1
            continue
        if value.startswith("%%", i):
            lit.append("%")
            i += 2
            continue
        m = _VAR_RE.match(value, i)
        if m is None:
            ctx.reject(path, f"unterminated or malformed formatter variable in {value!r}")
        name, arg = m.group(1), m.group(2)
        if name == "REQ":
            if not arg:
                ctx.reject(path, "%REQ(...)% needs a header name")
        elif name not in VARIABLES or arg is not None:
            ctx.reject(path, f"formatter variable %{name}% is not supported "
                             f"(supported: {', '.join(sorted(VARIABLES))}, REQ(h))")
        if lit:
            parts.append("".join(lit))
            lit = []
        parts.append((name, (arg or "").lower()))
        i = m.end()
    if lit:
        parts.append("".join(lit))
    return tuple(parts)


def render(parts: tuple[Part, ...], fc: FormatContext) -> str:
    out: list[str] = []
    for p in parts:
        if isinstance(p, str):
            out.append(p)
            continue
        name, arg = p
        if name == "DOWNSTREAM_REMOTE_ADDRESS":
            out.append(fc.downstream_remote_address)
        elif name == "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT":
            out.append(_without_port(fc.downstream_remote_address))
        elif name == "DOWNSTREAM_LOCAL_ADDRESS":
            out.append(fc.downstream_local_address)
        elif name == "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT":
            out.append(_without_port(fc.downstream_local_address))
        elif name == "DOWNSTREAM_LOCAL_PORT":
            out.append(_port(fc.downstream_local_address))
        elif name == "UPSTREAM_REMOTE_ADDRESS":
            out.append(fc.upstream_remote_address)
        elif name == "PROTOCOL":
            out.append(fc.protocol)
        elif name == "HOSTNAME":
            out.append(fc.hostname)
        elif name == "REQ":
            v = (fc.request_headers or {}).get(arg)
            if v is not None:
                out.append(v if isinstance(v, str) else ",".join(v))
    return "".join(out)


@dataclass(frozen=True, slots=True)
class HeaderAdd:
    key: str  # lower-case
    parts: tuple[Part, ...]
    action: int = APPEND_IF_EXISTS_OR_ADD
    keep_empty: bool = False


@dataclass(frozen=True, slots=True)
class HeaderMutations:
    """One level's headers_to_add + headers_to_remove."""

    add: tuple[HeaderAdd, ...] = ()
    remove: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.add or self.remove)

    @classmethod
    def from_proto(cls, ctx: Ctx, adds: Sequence[Any], removes: Sequence[str], path: str,
                   request: bool, adds_field: str, removes_field: str) -> HeaderMutations:
        out: list[HeaderAdd] = []
        for i, opt in enumerate(adds):
            p = f"{join(path, adds_field)}[{i}]"
            ctx.only(opt, {"header", "append", "append_action", "keep_empty_value"}, p)
            ctx.only(opt.header, {"key", "value", "raw_value"}, join(p, "header"))
            key = opt.header.key.lower()
            if not key:
                ctx.reject(join(p, "header.key"), "header key must not be empty")
            if key.startswith(":") or (request and key == "host"):
                ctx.reject(join(p, "header.key"), f"{key!r}: ':'-prefixed or host headers "
                                                  "may not be modified")
            if opt.HasField("append") and opt.append_action != 0:
                ctx.reject(p, "append and append_action are mutually exclusive")
            action = opt.append_action
            if opt.HasField("append"):
                action = APPEND_IF_EXISTS_OR_ADD if opt.append.value else \
                    OVERWRITE_IF_EXISTS_OR_ADD
            value = opt.header.value
            if opt.header.raw_value:
                if value:
                    ctx.reject(join(p, "header"), "value and raw_value are mutually exclusive")
                value = opt.header.raw_value.decode("latin-1")
            out.append(HeaderAdd(key, compile_template(ctx, value, join(p, "header.value")),
                                 action, opt.keep_empty_value))
        rm: list[str] = []
        for i, name in enumerate(removes):
            n = name.lower()
            if not n or n.startswith(":") or (request and n == "host"):
                ctx.reject(f"{join(path, removes_field)}[{i}]",
                           f"{name!r}: ':'-prefixed, host or empty headers may not be removed")
            rm.append(n)
        return cls(tuple(out), tuple(rm))


def apply_mutations(
    headers: Mapping[str, str | Sequence[str]],
    levels: Sequence[HeaderMutations],
    fc: FormatContext | None = None,
) -> dict[str, list[str]]:
    """Apply ``levels`` in order to a copy of ``headers`` (lower-case names)."""
    out: dict[str, list[str]] = {
        k: [v] if isinstance(v, str) else list(v) for k, v in headers.items()
    }
    fc = fc or FormatContext()
    for level in levels:
        for name in level.remove:
            out.pop(name, None)
        overwrite: list[tuple[str, str]] = []
        append: list[tuple[str, str]] = []
        for h in level.add:
            value = render(h.parts, fc)
            if not value and not h.keep_empty:
                continue
            if h.action == APPEND_IF_EXISTS_OR_ADD:
                append.append((h.key, value))
            elif h.action == ADD_IF_ABSENT:
                if not out.get(h.key):
                    append.append((h.key, value))
            elif h.action == OVERWRITE_IF_EXISTS:
                if out.get(h.key):
                    overwrite.append((h.key, value))
            else:
                overwrite.append((h.key, value))
        for k, v in overwrite:
            out[k] = [v]
        for k, v in append:
            out.setdefault(k, []).append(v)
    return out
