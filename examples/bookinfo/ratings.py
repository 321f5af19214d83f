"""ratings: book ratings (Istio's bookinfo ``ratings``, Node.js in the original).

``GET /ratings/<id>`` → ``{"id": 0, "ratings": {"Reviewer1": 5, "Reviewer2": 4}}``;
``POST /ratings/<id>`` with a JSON object stores ratings for that product (in memory);
``GET /health``. Port 9080 (``PORT``, ``--port`` or a positional port), bind ``BIND``.

``SERVICE_VERSION`` as Istio's image: ``v1`` (default); ``v2`` is database-backed in Istio —
here it serves the same in-memory ratings (no MongoDB/MySQL); ``v-faulty`` answers half of
the requests with 503; ``v-delayed`` delays half of them by 7 s; ``v-unavailable`` is
unavailable every other minute; ``v-unhealthy`` is unhealthy and unavailable every other
15 minutes.

Run: ``python -m examples.bookinfo.ratings`` or ``python examples/bookinfo/ratings.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

if __package__:
    from . import _http
else:  # run as a script
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _http  # type: ignore[no-redef]

_RATINGS_PATH = re.compile(r"^/ratings/[0-9]*")


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))  # like JSON.stringify


def js_parse_int(text: str) -> int | None:
    """JavaScript's ``parseInt(text)`` for base 10; None for NaN."""
    m = re.match(r"\s*([+-]?\d+)", text)
    return int(m.group(1)) if m else None


def default_ratings(product_id: int) -> dict[str, Any]:
    return {"id": product_id, "ratings": {"Reviewer1": 5, "Reviewer2": 4}}


class Ratings:
    def __init__(self, env: Mapping[str, str], *, rng: Callable[[], float] = random.random,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.version = env.get("SERVICE_VERSION", "v1")
        self.user_ratings: dict[int, dict[str, Any]] = {}
        self.rng = rng
        self.clock = clock
        self.started = clock()
        self.delay_seconds = 7.0

    # The Node service flips flags with setInterval; the same states from elapsed time.
    def unavailable(self) -> bool:
        elapsed = self.clock() - self.started
        if self.version == "v-unavailable":
            return int(elapsed // 60) % 2 == 1
        if self.version == "v-unhealthy":
            return int(elapsed // 900) % 2 == 1
        return False

    def healthy(self) -> bool:
        if self.version == "v-unhealthy":
            return int((self.clock() - self.started) // 900) % 2 == 0
        return True

    def get_local(self, product_id: int) -> dict[str, Any]:
        return self.user_ratings.get(product_id) or default_ratings(product_id)

    async def handle(self, req: _http.Request) -> _http.Response:
        url = req.target
        if req.method in ("GET", "HEAD") and req.path == "/health":
            if self.healthy():
                return _http.Response.json(_dumps({"status": "Ratings is healthy"}))
            return _http.Response.json(_dumps({"status": "Ratings is not healthy"}), 500)
        if _RATINGS_PATH.match(url) and req.method in ("GET", "HEAD", "POST"):
            product_id = js_parse_int(url.split("/")[-1])
            if product_id is None:
                return _http.Response.json(_dumps({"error": "please provide numeric product ID"}), 400)
            if req.method == "POST":
                return self._post(product_id, req.body)
            return await self._get(product_id)
        return _http.Response.text("Page Not Found", 404)

    def _post(self, product_id: int, body: bytes) -> _http.Response:
        try:
            ratings = json.loads(body)
        except ValueError:
            return _http.Response.json(_dumps({"error": "please provide valid ratings JSON"}), 400)
        self.user_ratings[product_id] = {"id": product_id, "ratings": ratings}
        return _http.Response.json(_dumps(self.get_local(product_id)))

    async def _get(self, product_id: int) -> _http.Response:
        if self.version == "v-faulty" and self.rng() <= 0.5:
            return self._unavailable_response()
        if self.version == "v-delayed" and self.rng() <= 0.5:
            await asyncio.sleep(self.delay_seconds)
        if self.unavailable():
            return self._unavailable_response()
        return _http.Response.json(_dumps(self.get_local(product_id)))

    @staticmethod
    def _unavailable_response() -> _http.Response:
        return _http.Response.json(_dumps({"error": "Service unavailable"}), 503)


def make_handler(env: Mapping[str, str] | None = None) -> _http.Handler:
    return Ratings(os.environ if env is None else env).handle


def main(argv: list[str] | None = None) -> None:
    _http.run_service("ratings", make_handler(), argv)


if __name__ == "__main__":
    main()
