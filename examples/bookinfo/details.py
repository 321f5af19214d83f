"""details: book information (Istio's bookinfo ``details``, Ruby in the original).

``GET /details/<id>`` → the book's details as JSON; ``GET /health``. Port 9080 (``PORT``,
``--port`` or a positional port), bind ``BIND`` (default 0.0.0.0).

Environment, as Istio's image: ``SERVICE_VERSION`` (v1/v2, informational),
``ENABLE_EXTERNAL_BOOK_SERVICE=true`` (details-v2) fetches the book from the Google Books API;
with ``DO_NOT_ENCRYPT=true`` or ``WITH_ISTIO=true`` over plain HTTP to port 80 (the sidecar
originates TLS, Istio's egress task), otherwise over HTTPS.

Run: ``python -m examples.bookinfo.details`` or ``python examples/bookinfo/details.py``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Mapping
from typing import Any

if __package__:
    from . import _http
else:  # run as a script
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _http  # type: ignore[no-redef]

log = logging.getLogger("bookinfo.details")

# Headers details copies onto its (optional) external request, as Istio's details.rb.
DETAILS_FORWARD_HEADERS = (
    "x-request-id",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "x-ot-span-context",
)

EXTERNAL_ISBN = "0486424618"  # a Comedy of Errors edition with Shakespeare as single author


def book_details(product_id: int) -> dict[str, Any]:
    """The built-in details, key order as the Ruby service emits them."""
    return {
        "id": product_id,
        "author": "William Shakespeare",
        "year": 1595,
        "type": "paperback",
        "pages": 200,
        "publisher": "PublisherA",
        "language": "English",
        "ISBN-10": "1234567890",
        "ISBN-13": "123-1234567890",
    }


def parse_product_id(path: str) -> int | None:
    """The last non-empty path segment as an integer (Ruby's ``Integer(parts[-1])``)."""
    parts = [p for p in path.split("/") if p]
    if not parts:
        return None
    text = parts[-1].strip()
    if not re.fullmatch(r"[+-]?\d{1,18}", text):
        return None
    return int(text)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def details_from_google_books(product_id: int, volume: Mapping[str, Any]) -> dict[str, Any]:
    """Map a Google Books API answer to the details shape (as details.rb does)."""
    book = volume["items"][0]["volumeInfo"]

    def isbn(kind: str) -> str | None:
        ids = [i["identifier"] for i in book.get("industryIdentifiers", []) if i.get("type") == kind]
        return ids[0] if ids else None

    return {
        "id": product_id,
        "author": book["authors"][0],
        "year": book.get("publishedDate"),
        "type": "paperback" if book.get("printType") == "BOOK" else "unknown",
        "pages": book.get("pageCount"),
        "publisher": book.get("publisher"),
        "language": "English" if book.get("language") == "en" else "unknown",
        "ISBN-10": isbn("ISBN_10"),
        "ISBN-13": isbn("ISBN_13"),
    }


class Details:
    def __init__(self, env: Mapping[str, str], client: _http.HTTPClient | None = None) -> None:
        self.version = env.get("SERVICE_VERSION", "v1")
        self.external = env.get("ENABLE_EXTERNAL_BOOK_SERVICE", "") == "true"
        plain = env.get("DO_NOT_ENCRYPT", "") == "true" or env.get("WITH_ISTIO", "") == "true"
        self.external_url = (
            f"{'http' if plain else 'https'}://www.googleapis.com/books/v1/volumes?q=isbn:"
            f"{EXTERNAL_ISBN}"
        )
        self.client = client or _http.HTTPClient()

    async def handle(self, req: _http.Request) -> _http.Response:
        path = req.path
        if path == "/health":
            return _http.Response.json(_dumps({"status": "Details is healthy"}))
        if path == "/details" or path.startswith("/details/"):
            product_id = parse_product_id(path)
            if product_id is None:
                return _http.Response.json(
                    _dumps({"error": "please provide numeric product id"}), 400)
            try:
                details = await self.get_book_details(product_id, req.headers)
            except Exception as exc:  # noqa: BLE001 - the Ruby service answers 400 with the error
                log.warning("fetching external book details failed: %r", exc)
                return _http.Response.json(_dumps({"error": str(exc) or type(exc).__name__}), 400)
            return _http.Response.json(_dumps(details))
        return _http.Response.html("<h1>Not Found</h1>", 404)

    async def get_book_details(self, product_id: int, incoming: _http.Headers) -> dict[str, Any]:
        if not self.external:
            return book_details(product_id)
        headers = _http.propagation_headers(incoming, DETAILS_FORWARD_HEADERS)
        resp = await self.client.get(self.external_url, headers, timeout=5.0)
        return details_from_google_books(product_id, resp.json())


def make_handler(env: Mapping[str, str] | None = None) -> _http.Handler:
    return Details(os.environ if env is None else env).handle


def main(argv: list[str] | None = None) -> None:
    _http.run_service("details", make_handler(), argv)


if __name__ == "__main__":
    main()
