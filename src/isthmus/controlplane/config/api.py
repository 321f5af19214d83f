"""The control plane's config API: apply / delete resources sent as YAML text.

Transport-free: the HTTP server calls ``apply_text`` / ``delete_text`` and returns
their ``ApiResult`` as JSON. Apply is all-or-nothing: if any document has an error,
nothing changes and every diagnostic is returned, so a half-applied change can never
reach the proxies.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from isthmus.api.loader import iter_documents
from isthmus.api.meta import ResourceKey
from isthmus.api.parse import load_text
from isthmus.controlplane.config.store import ConfigStore, raw_key
from isthmus.core.errors import Diagnostic, Severity

API_SOURCE = "api"


@dataclass
class ApiResult:
    ok: bool
    lines: list[str] = field(default_factory=list)  # "VirtualService/default/reviews configured"
    diagnostics: list[Diagnostic] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "ok": self.ok,
            "results": self.lines,
            "diagnostics": [
                {
                    "severity": d.severity.value, "message": d.message, "file": d.file,
                    "line": d.line, "resource": d.resource, "field": d.field, "text": str(d),
                }
                for d in self.diagnostics
            ],
        }


def apply_text(store: ConfigStore, text: str, file: str) -> ApiResult:
    loaded = load_text(text, file)
    if loaded.errors:
        return ApiResult(False, diagnostics=loaded.diagnostics)
    if not loaded.resources:
        return ApiResult(False, diagnostics=[Diagnostic(Severity.ERROR, "no resources found", file=file)])
    lines = []
    for r in loaded.resources:
        old = store.get(r.key)
        verb = "created" if old is None else "configured"
        lines.append(f"{r.key} {verb}")
    store.apply(API_SOURCE, loaded.resources)
    return ApiResult(True, lines, loaded.diagnostics)


def delete_text(store: ConfigStore, text: str, file: str) -> ApiResult:
    keys: list[ResourceKey] = []
    diagnostics: list[Diagnostic] = []
    for item in iter_documents(text, file):
        if isinstance(item, Diagnostic):
            return ApiResult(False, diagnostics=[item])
        key = raw_key(item.data)
        if key is None:
            diagnostics.append(
                Diagnostic(Severity.ERROR, "document needs apiVersion, kind and metadata.name", file=file, line=item.line)
            )
        else:
            keys.append(key)
    if diagnostics:
        return ApiResult(False, diagnostics=diagnostics)
    lines = []
    ok = True
    for key in keys:
        owner = store.owner_of(key)
        if owner is None:
            lines.append(f"{key} not found")
            ok = False
        elif owner != API_SOURCE:
            lines.append(f"{key} is defined in {owner.removeprefix('file:')}; remove it there")
            ok = False
        else:
            store.delete(API_SOURCE, [key])
            lines.append(f"{key} deleted")
    return ApiResult(ok, lines)
