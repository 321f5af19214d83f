"""Added latency of the waypoint's single pass: ~500 sequential keep-alive requests
client -> waypoint -> destination vs client -> destination directly over HBONE (same
client, same destination HBONE server and app). Prints p50/p99 (run with ``-s``)."""

from __future__ import annotations

import time

from tests.integration.waypoint.fixtures import mesh

N = 500


def _pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p * len(s)))]


async def _measure(c, path: str, n: int) -> list[float]:  # type: ignore[no-untyped-def]
    out = []
    for i in range(50):  # warm up: connections, tunnels, contexts
        await c.request("GET", f"{path}{i}")
    for i in range(n):
        t0 = time.perf_counter()
        status, _, _ = await c.request("GET", f"{path}{i}")
        out.append((time.perf_counter() - t0) * 1e6)
        assert status == 200
    return out


async def test_waypoint_added_latency() -> None:
    async with mesh() as m:
        direct = await m.direct("reviews-1")
        via = await m.client()
        d = await _measure(direct, "/d/", N)
        w = await _measure(via, "/w/", N)
        d2 = await _measure(direct, "/d2/", N)  # again: noise check
        line = (f"waypoint latency over {N} sequential requests (us): "
                f"direct p50 {_pct(d, .5):.0f} p99 {_pct(d, .99):.0f} | "
                f"via waypoint p50 {_pct(w, .5):.0f} p99 {_pct(w, .99):.0f} | "
                f"added p50 {_pct(w, .5) - _pct(d, .5):.0f} p99 {_pct(w, .99) - _pct(d, .99):.0f}"
                f" | direct again p50 {_pct(d2, .5):.0f}")
        print("\n" + line)
        # loose sanity bound (shared CI machines): the single pass adds milliseconds at most
        assert _pct(w, .5) < _pct(d, .5) + 20_000, line
        direct.close()
        via.close()
