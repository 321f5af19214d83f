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


def _own(mesh, proxy):  # type: ignore[no-untyped-def]
    """The LDS/RDS part of generate(), built without the upstream (clusters/endpoints) side."""
    listeners = build_listeners(mesh, proxy)
    routes = build_routes(mesh, proxy, referenced_route_names(listeners))
    return {
        gen.LISTENER_TYPE: {x.name: x for x in listeners},
        gen.ROUTE_TYPE: {r.name: r for r in routes},
    }


def _compare(case: str, got: dict, want: dict, types: tuple[str, ...]) -> None:  # type: ignore[type-arg]
    for type_name in types:
        w, g = want.get(type_name, {}), got.get(type_name, {})
        assert sorted(g) == sorted(w), f"{case}: {type_name} names differ"
        for name in sorted(w):
            assert dump(g[name]) == dump(w[name]), (
                f"{case}: {type_name} {name!r} differs from golden"
            )


def _golden(case: str) -> dict:  # type: ignore[type-arg]
    golden = GOLDEN_DIR / f"{case}.golden.yaml"
    if not golden.exists():
        pytest.fail(f"{golden} missing: run with REFRESH_GOLDEN=1 and review it")
    return yaml.safe_load(golden.read_text()) or {}


@pytest.mark.parametrize("case", CASES)
def test_golden(case: str, istio_samples: Path) -> None:
    """Listeners and routes (this package) against the golden file."""
    mesh, proxy = load_case(GOLDEN_DIR / f"{case}-in.yaml", istio_samples)
    got = to_data(_own(mesh, proxy))
    if os.environ.get("REFRESH_GOLDEN"):
        golden = GOLDEN_DIR / f"{case}.golden.yaml"
        old = yaml.safe_load(golden.read_text()) if golden.exists() else {}
        keep = {k: v for k, v in (old or {}).items() if k not in OWN_TYPES}
        golden.write_text(dump({**keep, **got}))
        return
    _compare(case, got, _golden(case), OWN_TYPES)


@pytest.mark.skipif(
    not HAVE_UPSTREAM, reason="translate.clusters / translate.endpoints not there yet"
)
@pytest.mark.parametrize("case", CASES)
def test_golden_generate(case: str, istio_samples: Path) -> None:
    """The whole generate() output: clusters and endpoints too, and LDS/RDS unchanged by it."""
    mesh, proxy = load_case(GOLDEN_DIR / f"{case}-in.yaml", istio_samples)
    got = to_data(gen.generate(mesh, proxy))
    if os.environ.get("REFRESH_GOLDEN"):
        (GOLDEN_DIR / f"{case}.golden.yaml").write_text(dump(got))
        return
    _compare(case, got, _golden(case), tuple(sorted(set(got) | set(_golden(case)))))


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
