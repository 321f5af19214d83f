"""From YAML documents to typed ``Resource`` values, with every problem reported.

``parse_document`` handles one document (and ``List`` kinds, which hold many);
``load_text`` / ``load_paths`` handle files and directories. Each returns resources
and diagnostics; a document with errors yields no resource, so callers can keep the
last good version of it.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from isthmus.api import kinds as _kinds  # noqa: F401  (registers every kind)
from isthmus.api.loader import LineMap, RawDocument, config_files, iter_documents, read_config_file
from isthmus.api.meta import KINDS, GroupKind, ObjectMeta, Resource, Source, split_api_version
from isthmus.api.schema import ConvertContext, from_data
from isthmus.core.errors import Diagnostic, Severity

DEFAULT_NAMESPACE = "default"


def _known_groups() -> frozenset[str]:
    return frozenset(k.group for k in KINDS)


_KNOWN_GROUPS = _known_groups()


@dataclass
class LoadResult:
    resources: list[Resource] = field(default_factory=list)
    diagnostics: list[Diagnostic] = field(default_factory=list)

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity is Severity.ERROR]

    def extend(self, other: "LoadResult") -> None:
        self.resources.extend(other.resources)
        self.diagnostics.extend(other.diagnostics)


def _describe(data: LineMap) -> str:
    kind = data.get("kind", "?")
    meta = data.get("metadata") if isinstance(data.get("metadata"), dict) else {}
    name = meta.get("name", "?") if meta else "?"
    ns = meta.get("namespace", "") if meta else ""
    return f"{kind}/{ns}/{name}" if ns else f"{kind}/{name}"


def parse_document(
    doc: RawDocument, default_namespace: str = DEFAULT_NAMESPACE
) -> tuple[list[Resource], list[Diagnostic]]:
    data = doc.data
    if not isinstance(data, dict):
        return [], [
            Diagnostic(
                Severity.ERROR,
                f"a document must be a mapping with apiVersion and kind, got {type(data).__name__}",
                file=doc.file,
                line=doc.line,
            )
        ]
    if data.get("kind") == "List" and isinstance(data.get("items"), list):
        resources: list[Resource] = []
        diags: list[Diagnostic] = []
        items = data["items"]
        for i, item in enumerate(items):
            line = items.item_lines[i] if hasattr(items, "item_lines") else doc.line
            r, d = parse_document(RawDocument(item, doc.file, line, doc.index), default_namespace)
            resources += r
            diags += d
        return resources, diags

    ctx = ConvertContext(file=doc.file, resource=_describe(data))
    line = getattr(data, "line", doc.line) or doc.line
    api_version = data.get("apiVersion")
    kind = data.get("kind")
    if not isinstance(api_version, str) or not api_version:
        ctx.error("apiVersion", line, "missing apiVersion")
    if not isinstance(kind, str) or not kind:
        ctx.error("kind", line, "missing kind")
    if ctx.has_errors:
        return [], ctx.diagnostics
    assert isinstance(api_version, str) and isinstance(kind, str)
    group, version = split_api_version(api_version)
    info = KINDS.get(GroupKind(group, kind))
    if info is None:
        kline = data.key_lines.get("kind", line) if isinstance(data, LineMap) else line
        known = sorted(str(k) for k in KINDS if k.kind == kind)
        if not known and group not in _KNOWN_GROUPS:
            # Another project's kind (cert-manager, Ingress, ...): not ours to judge; skip it.
            ctx.warning("kind", kline, f"skipped: kind {kind} in apiVersion {api_version} is not a mesh kind")
            return [], ctx.diagnostics
        hint = f" (known groups for {kind}: {', '.join(known)})" if known else ""
        close = difflib.get_close_matches(kind, sorted({k.kind for k in KINDS if k.group == group}), n=1)
        if close and not known:
            hint = f"; did you mean {close[0]!r}?"
        ctx.error("kind", kline, f"unsupported kind {kind} in apiVersion {api_version}{hint}")
        return [], ctx.diagnostics
    if version not in info.versions:
        ctx.error("apiVersion", data.key_lines.get("apiVersion", line) if isinstance(data, LineMap) else line,
                  f"unsupported version {version!r} for {kind}; supported: {', '.join(info.api_versions())}")
        return [], ctx.diagnostics

    allowed = {"apiVersion", "kind", "metadata", *info.extra_fields}
    if info.spec_field:
        allowed.add(info.spec_field)
        body = data.get(info.spec_field)
        body_line = data.key_lines.get(info.spec_field, line) if isinstance(data, LineMap) else line
        body_path = info.spec_field
    else:
        body = LineMap({k: v for k, v in data.items() if k not in allowed})
        body.line = line
        body.key_lines = {k: l for k, l in getattr(data, "key_lines", {}).items() if k in body}
        body_line = line
        body_path = ""
    if info.spec_field:
        for key in data:
            if key not in allowed:
                kline = data.key_lines.get(key, line) if isinstance(data, LineMap) else line
                ctx.error(str(key), kline, f"unknown top-level field {key!r}")

    meta_line = data.key_lines.get("metadata", line) if isinstance(data, LineMap) else line
    metadata = from_data(ObjectMeta, data.get("metadata") or {}, ctx, "metadata", meta_line)
    if not metadata.name:
        ctx.error("metadata.name", meta_line, "missing metadata.name")
    if info.namespaced and not metadata.namespace:
        metadata = _with_namespace(metadata, default_namespace)
    spec = from_data(info.spec_type, body if body is not None else {}, ctx, body_path, body_line)
    resource = Resource(
        api_version=api_version,
        kind=kind,
        group=group,
        metadata=metadata,
        spec=spec,
        source=Source(doc.file, line),
        status=data.get("status"),
        raw=data,
    )
    from isthmus.api.validation import validate_resource  # late: validation imports kinds

    if ctx.has_errors:
        # Still run the semantic rules on the best-effort value, so users see every
        # mistake at once; a rule tripping over a half-built value must not hide the
        # conversion errors already found.
        try:
            semantic = validate_resource(resource)
        except Exception:  # noqa: BLE001 - partial values may break a rule's assumptions
            semantic = []
        return [], ctx.diagnostics + semantic
    diags = ctx.diagnostics + validate_resource(resource)
    if any(d.severity is Severity.ERROR for d in diags):
        return [], diags
    return [resource], diags


def _with_namespace(meta: ObjectMeta, namespace: str) -> ObjectMeta:
    from dataclasses import replace

    return replace(meta, namespace=namespace)


def load_text(text: str, file: str = "<input>", default_namespace: str = DEFAULT_NAMESPACE) -> LoadResult:
    result = LoadResult()
    for item in iter_documents(text, file):
        if isinstance(item, Diagnostic):
            result.diagnostics.append(item)
            continue
        resources, diags = parse_document(item, default_namespace)
        result.resources += resources
        result.diagnostics += diags
    return result


def load_file(path: Path, default_namespace: str = DEFAULT_NAMESPACE) -> LoadResult:
    text, problem = read_config_file(path)
    if problem is not None:
        return LoadResult(diagnostics=[problem])
    assert text is not None
    return load_text(text, str(path), default_namespace)


def load_paths(paths: list[Path] | list[str], default_namespace: str = DEFAULT_NAMESPACE) -> LoadResult:
    result = LoadResult()
    for path in config_files([Path(p) for p in paths]):
        if not path.exists():
            result.diagnostics.append(Diagnostic(Severity.ERROR, "no such file or directory", file=str(path)))
            continue
        result.extend(load_file(path, default_namespace))
    return result


def parse_data(data: Any, file: str = "<api>", default_namespace: str = DEFAULT_NAMESPACE) -> LoadResult:
    """Parse an already-decoded object (e.g. from the control plane's HTTP API)."""
    resources, diags = parse_document(RawDocument(data, file, 0, 0), default_namespace)
    return LoadResult(resources, diags)
