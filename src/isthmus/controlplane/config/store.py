"""ConfigStore: the versioned set of valid resources the control plane serves from.

Resources come from *sources*, each identified by a string (``file:<path>`` for files
of the watched directory, ``api`` for ``isthmus apply``). A source is replaced as a
whole on every update, with one rule that protects users: **invalid input never
replaces good config**. When a document fails validation, the last good version of
that resource (matched by kind/namespace/name) keeps serving and the error is kept
for ``status``; when a file does not parse at all, every resource it had keeps
serving. Subscribers are told which keys changed at each new version.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from isthmus.api.loader import LineMap, RawDocument, iter_documents
from isthmus.api.meta import Resource, ResourceKey, split_api_version
from isthmus.api.parse import DEFAULT_NAMESPACE, parse_document
from isthmus.core.errors import Diagnostic, Severity

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ConfigChange:
    version: int
    changed: frozenset[ResourceKey]


@dataclass
class SourceState:
    resources: dict[ResourceKey, Resource] = field(default_factory=dict)
    diagnostics: list[Diagnostic] = field(default_factory=list)


def same_content(a: Resource, b: Resource) -> bool:
    return (a.api_version == b.api_version and a.metadata == b.metadata and a.spec == b.spec
            and a.status == b.status)


def raw_key(data: Any, default_namespace: str = DEFAULT_NAMESPACE) -> ResourceKey | None:
    """The kind/namespace/name of a raw document, if it can be read even when invalid."""
    if not isinstance(data, dict):
        return None
    api_version, kind, meta = data.get("apiVersion"), data.get("kind"), data.get("metadata")
    if not isinstance(api_version, str) or not isinstance(kind, str) or not isinstance(meta, dict):
        return None
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        return None
    namespace = meta.get("namespace")
    group, _ = split_api_version(api_version)
    cluster_scoped = kind in ("Namespace", "GatewayClass")
    ns = "" if cluster_scoped else (namespace if isinstance(namespace, str) and namespace else default_namespace)
    return ResourceKey(group, kind, ns, name)


Listener = Callable[[ConfigChange], None]


class ConfigStore:
    """Thread-safe: file watching runs in its own thread, readers are asyncio code."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._sources: dict[str, SourceState] = {}
        self._merged: dict[ResourceKey, Resource] = {}
        self._version = 0
        self._listeners: list[Listener] = []

    # ------------------------------------------------------------------ reading
    @property
    def version(self) -> int:
        return self._version

    def resources(self) -> list[Resource]:
        with self._lock:
            return list(self._merged.values())

    def get(self, key: ResourceKey) -> Resource | None:
        with self._lock:
            return self._merged.get(key)

    def diagnostics(self) -> list[Diagnostic]:
        with self._lock:
            return [d for s in self._sources.values() for d in s.diagnostics]

    def sources(self) -> list[str]:
        with self._lock:
            return sorted(self._sources)

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    # ------------------------------------------------------------------ writing
    def update_source_text(self, source: str, text: str, file: str) -> list[Diagnostic]:
        """Replace ``source`` with the documents in ``text``; returns the diagnostics."""
        documents: list[RawDocument] = []
        diagnostics: list[Diagnostic] = []
        syntax_error = False
        for item in iter_documents(text, file):
            if isinstance(item, Diagnostic):
                diagnostics.append(item)
                syntax_error = True
            else:
                documents.append(item)
        with self._lock:
            previous = self._sources.get(source, SourceState())
            if syntax_error:
                # The file as a whole is unreadable: keep everything it had.
                kept = dict(previous.resources)
                diagnostics = [self._kept_note(d, len(kept)) for d in diagnostics]
                self._replace(source, SourceState(kept, diagnostics))
                return diagnostics
        return self.update_source_documents(source, documents, extra_diagnostics=diagnostics)

    def update_source_documents(
        self,
        source: str,
        documents: Iterable[RawDocument],
        extra_diagnostics: list[Diagnostic] | None = None,
    ) -> list[Diagnostic]:
        diagnostics = list(extra_diagnostics or [])
        new_resources: dict[ResourceKey, Resource] = {}
        with self._lock:
            previous = self._sources.get(source, SourceState())
            for doc in documents:
                resources, diags = parse_document(doc)
                failed = any(d.severity is Severity.ERROR for d in diags)
                if failed:
                    key = raw_key(doc.data)
                    old = previous.resources.get(key) if key else None
                    if old is not None:
                        new_resources[key] = old  # type: ignore[index]
                        diags = diags + [
                            Diagnostic(
                                Severity.WARNING,
                                "invalid update ignored; the last good version keeps serving",
                                file=doc.file, line=doc.line, resource=str(key),
                            )
                        ]
                for r in resources:
                    if r.key in new_resources and not failed:
                        diags.append(
                            Diagnostic(
                                Severity.WARNING, "defined twice in this source; the later one wins",
                                file=doc.file, line=r.source.line, resource=str(r.key),
                            )
                        )
                    old = previous.resources.get(r.key)
                    # Keep the old object when nothing but the source position changed,
                    # so an untouched resource is never reported (and pushed) as changed.
                    new_resources[r.key] = old if old is not None and same_content(old, r) else r
                diagnostics.extend(diags)
            self._replace(source, SourceState(new_resources, diagnostics))
        return diagnostics

    def apply(self, source: str, resources: Iterable[Resource]) -> None:
        """Upsert already-validated resources into ``source`` (the API layer)."""
        with self._lock:
            state = self._sources.get(source, SourceState())
            merged = dict(state.resources)
            for r in resources:
                old = merged.get(r.key)
                merged[r.key] = old if old is not None and same_content(old, r) else r
            self._replace(source, SourceState(merged, []))

    def delete(self, source: str, keys: Iterable[ResourceKey]) -> list[ResourceKey]:
        """Remove ``keys`` from ``source``; returns the keys that were actually removed."""
        with self._lock:
            state = self._sources.get(source, SourceState())
            merged = dict(state.resources)
            removed = [k for k in keys if merged.pop(k, None) is not None]
            if removed:
                self._replace(source, SourceState(merged, state.diagnostics))
            return removed

    def remove_source(self, source: str) -> None:
        with self._lock:
            if source in self._sources:
                self._replace(source, None)

    def owner_of(self, key: ResourceKey) -> str | None:
        with self._lock:
            for name, state in self._sources.items():
                if key in state.resources:
                    return name
            return None

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _kept_note(d: Diagnostic, kept: int) -> Diagnostic:
        if not kept:
            return d
        return Diagnostic(
            d.severity, f"{d.message}; the file's {kept} previously valid resource(s) keep serving",
            d.file, d.line, d.resource, d.field,
        )

    def _replace(self, source: str, state: SourceState | None) -> None:
        if state is None:
            self._sources.pop(source, None)
        else:
            self._sources[source] = state
        merged: dict[ResourceKey, Resource] = {}
        # Deterministic precedence: files in name order, the API layer last (it wins).
        for name in sorted(self._sources, key=lambda s: (s == "api", s)):
            merged.update(self._sources[name].resources)
        changed = {
            k for k in merged.keys() | self._merged.keys() if merged.get(k) is not self._merged.get(k)
        }
        self._merged = merged
        if not changed:
            return
        self._version += 1
        event = ConfigChange(self._version, frozenset(changed))
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # a broken subscriber must not break the store
                log.exception("config change listener failed")


def documents_from_data(items: list[Any], file: str) -> list[RawDocument]:
    """Wrap already-decoded objects (e.g. from the HTTP API) as RawDocuments."""
    docs = []
    for i, item in enumerate(items):
        data = item
        if isinstance(item, dict) and not isinstance(item, LineMap):
            data = LineMap(item)
        docs.append(RawDocument(data, file, 0, i))
    return docs
