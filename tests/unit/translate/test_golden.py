"""Golden tests for generate(): ``tests/golden/translate/<case>-in.yaml`` → ``<case>.golden.yaml``.

``REFRESH_GOLDEN=1`` rewrites the golden files; review the diff by eye against Istio's
shapes (virtualOutbound/virtualInbound, ``0.0.0.0_9080``, route ``"9080"``, vhosts with
domain lists) before committing. Listeners and routes are this package's; clusters and
endpoints (``translate.clusters`` / ``translate.endpoints``) are compared too once they exist.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import yaml

from isthmus.controlplane.translate import generate as gen
from isthmus.controlplane.translate.listeners import build_listeners, referenced_route_names
from isthmus.controlplane.translate.routes import build_routes

from .harness import GOLDEN_DIR, dump, load_case, to_data

CASES = sorted(p.name[: -len("-in.yaml")] for p in GOLDEN_DIR.glob("*-in.yaml"))
HAVE_UPSTREAM = all(
    importlib.util.find_spec(f"isthmus.controlplane.translate.{m}") is not None
    for m in ("clusters", "endpoints")
)
OWN_TYPES = ("Listener", "RouteConfiguration")


def _generate(mesh, proxy):  # type: ignore[no-untyped-def]
    if HAVE_UPSTREAM:
        return gen.generate(mesh, proxy)
    listeners = build_listeners(mesh, proxy)
    routes = build_routes(mesh, proxy, referenced_route_names(listeners))
    return {
        gen.LISTENER_TYPE: {l.name: l for l in listeners},
        gen.ROUTE_TYPE: {r.name: r for r in routes},
    }


@pytest.mark.parametrize("case", CASES)
def test_golden(case: str, istio_samples: Path) -> None:
    mesh, proxy = load_case(GOLDEN_DIR / f"{case}-in.yaml", istio_samples)
    got = to_data(_generate(mesh, proxy))
    golden = GOLDEN_DIR / f"{case}.golden.yaml"
    if os.environ.get("REFRESH_GOLDEN"):
        golden.write_text(dump(got))
        return
    if not golden.exists():
        pytest.fail(f"{golden} missing: run with REFRESH_GOLDEN=1 and review it")
    want = yaml.safe_load(golden.read_text())
    if not HAVE_UPSTREAM:  # compare what this package owns
        want = {k: v for k, v in want.items() if k in OWN_TYPES}
    for type_name in sorted(set(want) | set(got)):
        w, g = want.get(type_name, {}), got.get(type_name, {})
        assert sorted(g) == sorted(w), f"{case}: {type_name} names differ"
        for name in sorted(w):
            assert dump(g[name]) == dump(w[name]), (
                f"{case}: {type_name} {name!r} differs from the golden file"
            )


def test_cases_present() -> None:
    assert {
        "bookinfo-productpage",
        "bookinfo-jason",
        "bookinfo-fault",
        "tcp-service",
        "sidecar-scoped",
        "ingress-gateway",
        "grpc-proxyless",
    } <= set(CASES)
