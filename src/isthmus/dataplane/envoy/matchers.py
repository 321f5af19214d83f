"""Compiled Envoy matchers: StringMatcher, HeaderMatcher, QueryParameterMatcher, regex.

Semantics follow Envoy's ``Matchers::StringMatcherImpl`` and ``HeaderUtility``:
- regexes are RE2 and always *full* matches;
- ``ignore_case`` is ASCII case folding for exact/prefix/suffix/contains;
- a header that appears several times is matched as its values joined with ",";
- a missing header matches only ``present_match: false`` (or, inverted,
  ``present_match: true``) unless ``treat_missing_header_as_empty`` is set; every other
  matcher on a missing header is false, inverted or not (Envoy's behaviour);
- a HeaderMatcher with no specifier means "present";
- legacy ``exact_match: ""`` matches any value;
- range is ``[start, end)`` over a signed 64-bit integer value.

Used by routes.py (route match, CORS origins) and reusable by policy code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import re2

from isthmus.dataplane.envoy._proto import Ctx, join

_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False


def compile_regex(ctx: Ctx, regex_matcher: Any, path: str) -> Any:
    """envoy.type.matcher.v3.RegexMatcher -> compiled RE2 (google_re2 engine only)."""
    ctx.only(regex_matcher, {"regex", "google_re2"}, path)
    return compile_pattern(ctx, regex_matcher.regex, join(path, "regex"))


def compile_pattern(ctx: Ctx, pattern: str, path: str) -> Any:
    try:
        return re2.compile(pattern, options=_RE2_OPTIONS)
    except re2.error as exc:  # type: ignore[attr-defined]
        msg = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        ctx.reject(path, f"invalid RE2 regex {pattern!r}: {msg}")


# A compiled string predicate: value -> bool.
StrPred = Callable[[str], bool]


@dataclass(frozen=True, slots=True)
class StringMatcher:
    """envoy.type.matcher.v3.StringMatcher, compiled."""

    kind: str  # exact | prefix | suffix | contains | safe_regex
    value: str  # lowered when ignore_case
    ignore_case: bool
    regex: Any = None

    def __call__(self, s: str) -> bool:
        return self.match(s)

    def match(self, s: str) -> bool:
        kind = self.kind
        if kind == "safe_regex":
            return self.regex.fullmatch(s) is not None
        if self.ignore_case:
            s = s.lower()
        if kind == "exact":
            return s == self.value
        if kind == "prefix":
            return s.startswith(self.value)
        if kind == "suffix":
            return s.endswith(self.value)
        return self.value in s

    @classmethod
    def from_proto(cls, ctx: Ctx, m: Any, path: str) -> StringMatcher:
        ctx.only(m, {"exact", "prefix", "suffix", "contains", "safe_regex", "ignore_case"}, path)
        which = m.WhichOneof("match_pattern")
        if which is None:
            ctx.reject(path, "StringMatcher needs one of exact/prefix/suffix/contains/safe_regex")
        if which == "safe_regex":
            if m.ignore_case:
                ctx.reject(join(path, "ignore_case"), "ignore_case has no effect on safe_regex")
            return cls("safe_regex", "", False, compile_regex(ctx, m.safe_regex, join(path, which)))
        value = getattr(m, which)
        if which in ("prefix", "suffix", "contains") and not value:
            ctx.reject(join(path, which), f"{which} must not be empty")
        return cls(which, value.lower() if m.ignore_case else value, m.ignore_case)


HEADER_PRESENT = "present"


@dataclass(frozen=True, slots=True)
class HeaderMatcher:
    """envoy.config.route.v3.HeaderMatcher, compiled (name lower-cased)."""

    name: str
    kind: str  # value | regex | range | present | prefix | suffix | contains | string
    value: str = ""
    regex: Any = None
    range_start: int = 0
    range_end: int = 0
    present: bool = True
    string: StringMatcher | None = None
    invert: bool = False
    treat_missing_as_empty: bool = False

    @classmethod
    def from_proto(cls, ctx: Ctx, m: Any, path: str) -> HeaderMatcher:
        ctx.only(
            m,
            {
                "name", "exact_match", "safe_regex_match", "range_match", "present_match",
                "prefix_match", "suffix_match", "contains_match", "string_match",
                "invert_match", "treat_missing_header_as_empty",
            },
            path,
        )
        if not m.name:
            ctx.reject(join(path, "name"), "header name must not be empty")
        common = {
            "name": m.name.lower(),
            "invert": m.invert_match,
            "treat_missing_as_empty": m.treat_missing_header_as_empty,
        }
        which = m.WhichOneof("header_match_specifier")
        p = join(path, which or "")
        if which == "exact_match":
            return cls(kind="value", value=m.exact_match, **common)
        if which == "safe_regex_match":
            return cls(kind="regex", regex=compile_regex(ctx, m.safe_regex_match, p), **common)
        if which == "range_match":
            if m.range_match.start >= m.range_match.end:
                ctx.reject(p, "range start must be below end")
            return cls(kind="range", range_start=m.range_match.start,
                       range_end=m.range_match.end, **common)
        if which == "present_match":
            return cls(kind="present", present=m.present_match, **common)
        if which in ("prefix_match", "suffix_match", "contains_match"):
            val = getattr(m, which)
            if not val:
                ctx.reject(p, f"{which} must not be empty")
            return cls(kind=which.removesuffix("_match"), value=val, **common)
        if which == "string_match":
            return cls(kind="string", string=StringMatcher.from_proto(ctx, m.string_match, p),
                       **common)
        return cls(kind="present", present=True, **common)

    def matches_value(self, value: str | None) -> bool:
        """Match against the (comma-joined) header value, ``None`` when absent."""
        if value is None:
            if not self.treat_missing_as_empty:
                if self.invert:
                    return self.kind == "present" and self.present
                return self.kind == "present" and not self.present
            value = ""
        kind = self.kind
        if kind == "value":
            m = not self.value or value == self.value
        elif kind == "string":
            m = self.string.match(value)  # type: ignore[union-attr]
        elif kind == "prefix":
            m = value.startswith(self.value)
        elif kind == "suffix":
            m = value.endswith(self.value)
        elif kind == "contains":
            m = self.value in value
        elif kind == "regex":
            m = self.regex.fullmatch(value) is not None
        elif kind == "range":
            m = False
            v = _parse_int64(value)
            if v is not None:
                m = self.range_start <= v < self.range_end
        else:  # present
            m = self.present
        return m != self.invert


def _parse_int64(s: str) -> int | None:
    # absl::SimpleAtoi: optional surrounding whitespace, optional sign, decimal digits.
    t = s.strip()
    body = t[1:] if t[:1] in ("+", "-") else t
    if not body.isdigit() or not body.isascii():
        return None
    v = int(t)
    return v if -(2**63) <= v < 2**63 else None


def header_value(headers: Mapping[str, str | Sequence[str]], name: str) -> str | None:
    """Value of ``name`` in a lower-case-keyed header mapping; lists joined with ","."""
    v = headers.get(name)
    if v is None or isinstance(v, str):
        return v
    if not v:
        return None
    return ",".join(v)


@dataclass(frozen=True, slots=True)
class QueryParameterMatcher:
    """envoy.config.route.v3.QueryParameterMatcher: first value of the key only."""

    name: str
    string: StringMatcher | None
    present: bool | None

    @classmethod
    def from_proto(cls, ctx: Ctx, m: Any, path: str) -> QueryParameterMatcher:
        ctx.only(m, {"name", "string_match", "present_match"}, path)
        if not m.name:
            ctx.reject(join(path, "name"), "query parameter name must not be empty")
        which = m.WhichOneof("query_parameter_match_specifier")
        if which == "string_match":
            return cls(m.name, StringMatcher.from_proto(ctx, m.string_match,
                                                        join(path, which)), None)
        if which == "present_match":
            return cls(m.name, None, m.present_match)
        return cls(m.name, None, None)

    def matches(self, first_values: Mapping[str, str]) -> bool:
        v = first_values.get(self.name)
        if v is None:
            return False
        if self.present is not None:
            return self.present
        if self.string is None:
            return True
        return self.string.match(v)


def parse_query_first(query: str) -> dict[str, str]:
    """Query string -> {key: first value}; raw (not percent-decoded), like Envoy's
    ``QueryParamsMulti::parseQueryString``; ``?a`` gives ``a`` = ""."""
    out: dict[str, str] = {}
    if not query:
        return out
    for part in query.split("&"):
        if not part:
            continue
        k, _, v = part.partition("=")
        if k not in out:
            out[k] = v
    return out
