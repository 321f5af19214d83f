"""reviews: book reviews (Istio's bookinfo ``reviews``, Java in the original).

``GET /reviews/<id>`` → ``{"id": "0", "podname": ..., "clustername": ..., "reviews": [...]}``;
``GET /health``. Port 9080 (``PORT``, ``--port`` or a positional port), bind ``BIND``.

Environment, as Istio's images set it:

* ``SERVICE_VERSION`` v1 / v2 / v3 (informational; behaviour follows the two below);
* ``ENABLE_RATINGS`` ``true`` to call ratings and add a ``rating`` to each review (v2, v3);
* ``STAR_COLOR`` the rating colour, default ``black`` (v2 black, v3 red); the call to
  ratings times out after 10 s with black stars and after 2.5 s otherwise, as in the sample;
* ``RATINGS_HOSTNAME`` (default ``ratings``; ``host:port`` accepted), ``SERVICES_DOMAIN``,
  ``RATINGS_SERVICE_PORT`` (default 9080); ``RATINGS_SERVICE`` is accepted as another name
  for the hostname, or as a full URL of the ratings endpoint (``http://h:p/ratings``);
* ``HOSTNAME`` → ``podname`` (default: the host name), ``CLUSTER_NAME`` → ``clustername``
  (``"null"`` when unset, as the Java service prints it).

Run: ``python -m examples.bookinfo.reviews`` or ``python examples/bookinfo/reviews.py``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import sys
from collections.abc import Mapping
from typing import Any

if __package__:
    from . import _http
else:  # run as a script
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _http  # type: ignore[no-redef]

log = logging.getLogger("bookinfo.reviews")

REVIEWS = (
    ("Reviewer1", "An extremely entertaining play by Shakespeare. The slapstick humour is refreshing!"),
    ("Reviewer2", ("Absolutely fun and entertaining. The play lacks thematic depth when compared "
                   "to other plays by Shakespeare.")),
)
RATINGS_UNAVAILABLE = "Ratings service is currently unavailable"
_INT32 = re.compile(r"[+-]?\d{1,10}")


def reviews_body(product_id: int | str, *, podname: str, clustername: str, ratings_enabled: bool,
                 star_color: str, stars: tuple[int, int] = (-1, -1)) -> dict[str, Any]:
    """The reviews JSON, as the Java service builds it (``-1`` stars: ratings unavailable)."""
    reviews = []
    for (reviewer, text), n in zip(REVIEWS, stars, strict=True):
        review: dict[str, Any] = {"reviewer": reviewer, "text": text}
        if ratings_enabled:
            if n != -1:
                review["rating"] = {"stars": n, "color": star_color}
            else:
                review["rating"] = {"error": RATINGS_UNAVAILABLE}
        reviews.append(review)
    return {"id": str(product_id), "podname": podname, "clustername": clustername,
            "reviews": reviews}


def stars_from_ratings(answer: Any) -> tuple[int, int]:
    """(Reviewer1, Reviewer2) stars from a ratings answer; -1 where missing."""
    out = [-1, -1]
    ratings = answer.get("ratings") if isinstance(answer, dict) else None
    if isinstance(ratings, dict):
        for i, name in enumerate(("Reviewer1", "Reviewer2")):
            value = ratings.get(name)
            if isinstance(value, int) and not isinstance(value, bool):
                out[i] = value
    return out[0], out[1]


def parse_java_int(text: str) -> int | None:
    """A JAX-RS ``int`` path parameter: Integer.parseInt, else None (→ 404)."""
    if not _INT32.fullmatch(text):
        return None
    value = int(text)
    return value if -(2**31) <= value < 2**31 else None


def ratings_endpoint(env: Mapping[str, str]) -> str:
    """The ratings URL prefix, ``http://ratings:9080/ratings`` by default."""
    service = env.get("RATINGS_SERVICE") or ""
    if not env.get("RATINGS_HOSTNAME") and service.startswith(("http://", "https://")):
        service = service.rstrip("/")
        return service if service.split("://", 1)[1].count("/") else service + "/ratings"
    hostname = env.get("RATINGS_HOSTNAME") or service or "ratings"
    port_text = env.get("RATINGS_SERVICE_PORT") or ""
    default_port = int(port_text) if port_text.isdigit() else 9080
    return _http.service_url(hostname, env.get("SERVICES_DOMAIN") or "", default_port) + "/ratings"


class Reviews:
    def __init__(self, env: Mapping[str, str], client: _http.HTTPClient | None = None) -> None:
        self.version = env.get("SERVICE_VERSION", "")
        self.ratings_enabled = _http.env_flag(env.get("ENABLE_RATINGS"))
        self.star_color = env.get("STAR_COLOR") or "black"
        self.ratings_url = ratings_endpoint(env)
        self.ratings_timeout = 10.0 if self.star_color == "black" else 2.5
        self.podname = env.get("HOSTNAME") or socket.gethostname()
        self.clustername = env.get("CLUSTER_NAME") or "null"
        self.client = client or _http.HTTPClient()

    async def handle(self, req: _http.Request) -> _http.Response:
        path = req.path
        if req.method not in ("GET", "HEAD"):
            return _http.Response.text("Method Not Allowed", 405)
        if path == "/health":
            return _http.Response.json(json.dumps({"status": "Reviews is healthy"}))
        parts = path.split("/")
        if len(parts) == 3 and parts[1] == "reviews":
            product_id = parse_java_int(parts[2])
            if product_id is not None:
                return await self.book_reviews(product_id, req.headers)
        return _http.Response.text("Not Found", 404)

    async def book_reviews(self, product_id: int, incoming: _http.Headers) -> _http.Response:
        stars = (-1, -1)
        if self.ratings_enabled:
            answer = await self.get_ratings(product_id, incoming)
            if answer is not None:
                stars = stars_from_ratings(answer)
        body = reviews_body(product_id, podname=self.podname, clustername=self.clustername,
                            ratings_enabled=self.ratings_enabled, star_color=self.star_color,
                            stars=stars)
        return _http.Response.json(json.dumps(body))

    async def get_ratings(self, product_id: int, incoming: _http.Headers) -> Any:
        headers = _http.propagation_headers(incoming)
        headers["Accept"] = "application/json"
        url = f"{self.ratings_url}/{product_id}"
        try:
            resp = await self.client.get(url, headers, timeout=self.ratings_timeout)
        except Exception as exc:  # noqa: BLE001 - any failure means "ratings unavailable"
            log.warning("Error: unable to contact %s got exception %r", self.ratings_url, exc)
            return None
        if resp.status != 200:
            log.warning("Error: unable to contact %s got status of %d", self.ratings_url, resp.status)
            return None
        try:
            return resp.json()
        except ValueError:
            log.warning("Error: invalid JSON from %s", self.ratings_url)
            return None


def make_handler(env: Mapping[str, str] | None = None) -> _http.Handler:
    return Reviews(os.environ if env is None else env).handle


def main(argv: list[str] | None = None) -> None:
    _http.run_service("reviews", make_handler(), argv)


if __name__ == "__main__":
    main()
