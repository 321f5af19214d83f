"""productpage: the bookinfo front end (Istio's bookinfo ``productpage``, Flask in the original).

Routes, as Istio's sample: ``/`` and ``/index.html`` (links to the page as a normal and as a
test user), ``/productpage`` (HTML: details and reviews, stars in the reviews' colour),
``POST /login`` (form field ``username``; sets the ``user`` cookie) and ``GET /logout``
(clears it), ``/api/v1/products``, ``/api/v1/products/<id>`` (details JSON),
``/api/v1/products/<id>/reviews`` (the reviews service's JSON as is),
``/api/v1/products/<id>/ratings``, ``/health``, ``/metrics``.

Calls: details and ratings once with a 3 s timeout, reviews up to twice with a 3 s timeout
each (the sample's deliberate retry "bug" that the fault-injection task relies on). Headers
forwarded: ``PROPAGATED_HEADERS`` of ``_http`` (x-request-id, W3C, B3, Datadog, Lightstep,
Cloud Trace, gRPC, SkyWalking, user-agent, cookie, authorization, jwt) plus
``end-user: <user>`` when a user is signed in. (Without a sign-in, an ``end-user`` header of
the incoming request is passed on; Istio's sample drops it.)

Environment: ``DETAILS_HOSTNAME``, ``REVIEWS_HOSTNAME``, ``RATINGS_HOSTNAME`` (defaults
details / reviews / ratings; ``host:port`` accepted, port otherwise 9080),
``SERVICES_DOMAIN``, ``FLOOD_FACTOR`` (extra concurrent reviews calls per page, for the
rate-limiting task). Port 9080 (``PORT``, ``--port`` or a positional port), bind ``BIND``.

Run: ``python -m examples.bookinfo.productpage`` or ``python examples/bookinfo/productpage.py``.
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
import os
import sys
import urllib.parse
from collections.abc import Mapping
from typing import Any

if __package__:
    from . import _http
else:  # run as a script
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _http  # type: ignore[no-redef]

log = logging.getLogger("bookinfo.productpage")

TIMEOUT = 3.0
REVIEWS_ATTEMPTS = 2
DETAILS_ERROR = "Sorry, product details are currently unavailable for this book."
REVIEWS_ERROR = "Sorry, product reviews are currently unavailable for this book."
RATINGS_ERROR = "Sorry, product ratings are currently unavailable for this book."
USER_COOKIE = "user"

PRODUCTS: list[dict[str, Any]] = [
    {
        "id": 0,
        "title": "The Comedy of Errors",
        "descriptionHtml": (
            '<a href="https://en.wikipedia.org/wiki/The_Comedy_of_Errors">Wikipedia Summary</a>: '
            "The Comedy of Errors is one of <b>William Shakespeare's</b> early plays. It is his "
            "shortest and one of his most farcical comedies, with a major part of the humour "
            "coming from slapstick and mistaken identity, in addition to puns and word play."
        ),
    }
]


# --------------------------------------------------------------------------- pure pieces


def forward_headers(incoming: _http.Headers, user: str | None) -> dict[str, str]:
    """What productpage sends on to details/reviews/ratings for this request."""
    headers = _http.propagation_headers(incoming)
    if user:
        headers["end-user"] = user
    return headers


def user_from_cookie(cookies: Mapping[str, str]) -> str | None:
    """The signed-in user (the ``user`` cookie, percent-decoded to its bytes), or None."""
    raw = cookies.get(USER_COOKIE)
    if not raw:
        return None
    value = urllib.parse.unquote(raw, encoding="latin-1")
    value = "".join(ch for ch in value if ch == "\t" or (" " <= ch and ch != "\x7f"))
    return value.strip() or None


def login_cookie(username: str) -> str:
    value = urllib.parse.quote(username.encode("utf-8"), safe="")
    return f"{USER_COOKIE}={value}; Path=/; HttpOnly; SameSite=Lax"


def logout_cookie() -> str:
    return (f"{USER_COOKIE}=; Expires=Thu, 01 Jan 1970 00:00:00 GMT; Max-Age=0; Path=/; "
            "HttpOnly; SameSite=Lax")


def redirect_target(referer: str | None) -> str:
    """Where /login and /logout send the browser back to: the referrer's path (as Flask's
    ``redirect(request.referrer)``, keeping only the path so it stays on this site)."""
    if referer:
        split = urllib.parse.urlsplit(referer)
        if split.path.startswith("/") and not split.path.startswith("//"):
            return split.path + (f"?{split.query}" if split.query else "")
    return "/productpage"


def _stars_count(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def render_stars(rating: Any) -> str:
    """A review's rating as the sample's template renders it (glyphicon stars in a
    ``<font color=...>``; the error text in italics; nothing without a rating)."""
    if not isinstance(rating, dict) or not rating:
        return ""
    stars = _stars_count(rating.get("stars"))
    if stars:
        color = html.escape(str(rating.get("color", "")), quote=True)
        full = '<span class="glyphicon glyphicon-star">&#9733;</span>\n' * max(0, stars)
        empty = '<span class="glyphicon glyphicon-star-empty">&#9734;</span>\n' * max(0, 5 - stars)
        return (f'<font color="{color}">\n<!-- full stars: -->\n{full}'
                f"<!-- empty stars: -->\n{empty}</font>\n")
    if rating.get("error"):
        return f"<p><i>{html.escape(str(rating['error']))}</i></p>\n"
    return ""


_STYLE = """
body{font-family:Helvetica,Arial,sans-serif;margin:0;color:#333}
.navbar{background:#222;color:#9d9d9d;padding:10px 20px;display:flex;
justify-content:space-between;align-items:center}
.navbar a{color:#fff}.navbar-brand{color:#fff;font-size:18px;text-decoration:none}
.container-fluid{padding:0 20px}.row{display:flex;flex-wrap:wrap;gap:20px}
.col-md-12{flex:1 1 100%}.col-md-6{flex:1 1 45%}
.text-center{text-align:center}.text-primary{color:#337ab7}
blockquote{border-left:5px solid #eee;margin:0 0 20px;padding:10px 20px}
blockquote small{display:block;color:#777}
.glyphicon{font-size:18px}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:4px 8px;vertical-align:top}
"""


def _page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n<html>\n<head>\n<meta charset=\"utf-8\">\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1.0">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n"
        f"<body>\n{body}</body>\n</html>\n"
    )


def render_productpage(*, product: Mapping[str, Any] | None, details_status: int, details: Any,
                       reviews_status: int, reviews: Any, user: str | None) -> str:
    """The /productpage HTML, with the sample template's structure and messages."""
    out: list[str] = []
    out.append('<nav class="navbar navbar-inverse navbar-static-top">\n'
               '<a class="navbar-brand" href="#">BookInfo Sample</a>\n')
    if user:
        out.append('<p class="navbar-text navbar-right"><i class="glyphicon glyphicon-user" '
                   f'aria-hidden="true"></i><span style="padding-left: 5px;">{html.escape(user)} '
                   '( <a href="logout">sign out</a> )</span></p>\n')
    else:
        out.append('<form method="post" action="login" name="login_form" class="navbar-right">\n'
                   '<input type="text" name="username" id="username" placeholder="User Name">\n'
                   '<input type="password" name="passwd" placeholder="Password">\n'
                   '<button type="submit" class="btn btn-primary">Sign in</button>\n</form>\n')
    out.append("</nav>\n")

    out.append('<div class="container-fluid">\n<div class="row">\n<div class="col-md-12">\n')
    if product:
        out.append(f'<h3 class="text-center text-primary">{html.escape(str(product["title"]))}</h3>\n')
        # descriptionHtml is our own constant HTML (autoescape false in the sample)
        out.append(f"<p>Summary: {product['descriptionHtml']}</p>\n")
    out.append("</div>\n</div>\n")

    out.append('<div class="row">\n<div class="col-md-6">\n')
    if details_status == 200 and isinstance(details, dict):
        out.append('<h4 class="text-center text-primary">Book Details</h4>\n<dl>\n')
        for label, key in (("Type", "type"), ("Pages", "pages"), ("Publisher", "publisher"),
                           ("Language", "language"), ("ISBN-10", "ISBN-10"),
                           ("ISBN-13", "ISBN-13")):
            value = details.get(key)
            out.append(f"<dt>{label}:</dt>{html.escape('' if value is None else str(value))}\n")
        out.append("</dl>\n")
    else:
        out.append('<h4 class="text-center text-primary">Error fetching product details!</h4>\n')
        if isinstance(details, dict) and details.get("error"):
            out.append(f"<p>{html.escape(str(details['error']))}</p>\n")
    out.append("</div>\n")

    out.append('<div class="col-md-6">\n')
    if reviews_status == 200 and isinstance(reviews, dict):
        out.append('<h4 class="text-center text-primary">Book Reviews</h4>\n')
        for review in reviews.get("reviews") or []:
            if not isinstance(review, dict):
                continue
            out.append(f"<blockquote>\n<p>{html.escape(str(review.get('text', '')))}</p>\n"
                       f"<small>{html.escape(str(review.get('reviewer', '')))}</small>\n")
            out.append(render_stars(review.get("rating")))
            out.append("</blockquote>\n")
    else:
        out.append('<h4 class="text-center text-primary">Error fetching product reviews!</h4>\n')
        if isinstance(reviews, dict) and reviews.get("error"):
            out.append(f"<p>{html.escape(str(reviews['error']))}</p>\n")
    out.append("</div>\n</div>\n</div>\n")
    return _page("Simple Bookstore App", "".join(out))


def _json_table(value: Any) -> str:
    """A small json2html: dicts as two-column tables, lists as lists."""
    if isinstance(value, dict):
        rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_json_table(v)}</td></tr>"
                       for k, v in value.items())
        return f'<table class="table table-condensed table-bordered table-hover">{rows}</table>'
    if isinstance(value, list):
        return "<ul>" + "".join(f"<li>{_json_table(v)}</li>" for v in value) + "</ul>"
    return html.escape(str(value))


def render_index(service_tree: Mapping[str, Any]) -> str:
    body = (
        '<div class="container-fluid">\n<h3 class="text-primary">Hello! This is a simple bookstore '
        "application consisting of three services as shown below</h3>\n"
        f"{_json_table(dict(service_tree))}\n"
        "<p>Click on one of the links below to auto generate a request to the backend as a real "
        "user or a tester</p>\n"
        '<p><a href="/productpage?u=normal">Normal user</a></p>\n'
        '<p><a href="/productpage?u=test">Test user</a></p>\n</div>\n'
    )
    return _page("Simple Bookstore App", body)


# --------------------------------------------------------------------------- the service


class ProductPage:
    def __init__(self, env: Mapping[str, str], client: _http.HTTPClient | None = None) -> None:
        domain = env.get("SERVICES_DOMAIN") or ""
        self.details_url = _http.service_url(env.get("DETAILS_HOSTNAME") or "details", domain)
        self.reviews_url = _http.service_url(env.get("REVIEWS_HOSTNAME") or "reviews", domain)
        self.ratings_url = _http.service_url(env.get("RATINGS_HOSTNAME") or "ratings", domain)
        flood = env.get("FLOOD_FACTOR") or "0"
        self.flood_factor = int(flood) if flood.isdigit() else 0
        self.client = client or _http.HTTPClient()
        self.requests_total: dict[tuple[str, int], int] = {}
        ratings = {"name": self.ratings_url, "endpoint": "ratings", "children": []}
        details = {"name": self.details_url, "endpoint": "details", "children": []}
        reviews = {"name": self.reviews_url, "endpoint": "reviews", "children": [ratings]}
        self.service_tree = {"name": self.details_url, "endpoint": "details",
                             "children": [details, reviews]}

    # ---- backends

    async def _get_json(self, url: str, headers: Mapping[str, str]) -> tuple[int | None, Any]:
        """(status, parsed JSON) — status None when no response arrived; JSON None if invalid."""
        try:
            resp = await self.client.get(url, headers, timeout=TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - timeouts, refused, reset, protocol errors
            log.info("GET %s failed: %r", url, exc)
            return None, None
        if resp.status != 200:
            return resp.status, None
        try:
            return 200, resp.json()
        except ValueError:
            return 500, None

    async def get_details(self, product_id: str, headers: Mapping[str, str]) -> tuple[int, Any]:
        status, body = await self._get_json(f"{self.details_url}/details/{product_id}", headers)
        if status == 200 and body is not None:
            return 200, body
        return status or 500, {"error": DETAILS_ERROR}

    async def get_reviews(self, product_id: str, headers: Mapping[str, str]) -> tuple[int, Any]:
        # Two attempts, as the sample ("bug introduced explicitly for illustration in the
        # fault injection task").
        status: int | None = None
        for _ in range(REVIEWS_ATTEMPTS):
            status, body = await self._get_json(f"{self.reviews_url}/reviews/{product_id}", headers)
            if status == 200 and body is not None:
                return 200, body
        return status or 500, {"error": REVIEWS_ERROR}

    async def get_ratings(self, product_id: str, headers: Mapping[str, str]) -> tuple[int, Any]:
        status, body = await self._get_json(f"{self.ratings_url}/ratings/{product_id}", headers)
        if status == 200 and body is not None:
            return 200, body
        return status or 500, {"error": RATINGS_ERROR}

    async def _flood(self, product_id: str, headers: Mapping[str, str]) -> None:
        if self.flood_factor > 0:
            await asyncio.gather(*(self.get_reviews(product_id, headers)
                                   for _ in range(self.flood_factor)))

    # ---- routes

    async def handle(self, req: _http.Request) -> _http.Response:
        resp = await self._route(req)
        key = (req.path if req.path in ("/productpage", "/health") else "other", resp.status)
        self.requests_total[key] = self.requests_total.get(key, 0) + 1
        return resp

    async def _route(self, req: _http.Request) -> _http.Response:
        path = req.path
        method = req.method
        if path == "/login":
            if method != "POST":
                return _http.Response.text("Method Not Allowed", 405)
            return self.login(req)
        if method not in ("GET", "HEAD"):
            return _http.Response.text("Method Not Allowed", 405)
        if path in ("/", "/index.html"):
            return _http.Response.html(render_index(self.service_tree))
        if path == "/health":
            return _http.Response.html("Product page is healthy")
        if path == "/logout":
            resp = _http.Response.redirect(redirect_target(req.headers.get("referer")))
            resp.headers.append(("Set-Cookie", logout_cookie()))
            return resp
        if path == "/productpage":
            return await self.productpage(req)
        if path == "/metrics":
            return _http.Response(200, self.metrics().encode(),
                                  [("Content-Type", "text/plain; version=0.0.4")])
        if path == "/api/v1/products":
            return _http.Response.json(json.dumps(PRODUCTS))
        parts = path.split("/")  # "", "api", "v1", "products", id[, what]
        if (len(parts) in (5, 6) and parts[1:4] == ["api", "v1", "products"]
                and parts[4] not in ("", ".", "..")):
            product_id = parts[4]
            headers = forward_headers(req.headers, self._user(req))
            if len(parts) == 5:
                status, body = await self.get_details(product_id, headers)
            elif parts[5] == "reviews":
                status, body = await self.get_reviews(product_id, headers)
            elif parts[5] == "ratings":
                status, body = await self.get_ratings(product_id, headers)
            else:
                return _not_found()
            return _http.Response.json(json.dumps(body), status)
        return _not_found()

    @staticmethod
    def _user(req: _http.Request) -> str | None:
        return user_from_cookie(req.cookies())

    def login(self, req: _http.Request) -> _http.Response:
        username = (req.form().get("username") or "").strip()
        resp = _http.Response.redirect(redirect_target(req.headers.get("referer")))
        resp.headers.append(("Set-Cookie", login_cookie(username) if username else logout_cookie()))
        return resp

    async def productpage(self, req: _http.Request) -> _http.Response:
        product_id = 0
        user = self._user(req)
        headers = forward_headers(req.headers, user)
        product = PRODUCTS[product_id] if product_id < len(PRODUCTS) else None
        if self.flood_factor > 0:
            (details_status, details), _, (reviews_status, reviews) = await asyncio.gather(
                self.get_details(str(product_id), headers), self._flood(str(product_id), headers),
                self.get_reviews(str(product_id), headers))
        else:
            (details_status, details), (reviews_status, reviews) = await asyncio.gather(
                self.get_details(str(product_id), headers),
                self.get_reviews(str(product_id), headers))
        page = render_productpage(product=product, details_status=details_status, details=details,
                                  reviews_status=reviews_status, reviews=reviews, user=user)
        return _http.Response.html(page)

    def metrics(self) -> str:
        lines = ["# HELP bookinfo_productpage_requests_total Requests served by productpage.",
                 "# TYPE bookinfo_productpage_requests_total counter"]
        for (path, status), n in sorted(self.requests_total.items()):
            lines.append(f'bookinfo_productpage_requests_total{{path="{path}",code="{status}"}} {n}')
        return "\n".join(lines) + "\n"


def _not_found() -> _http.Response:
    return _http.Response.html(
        "<!doctype html>\n<title>404 Not Found</title>\n<h1>Not Found</h1>\n"
        "<p>The requested URL was not found on the server.</p>\n", 404)


def make_handler(env: Mapping[str, str] | None = None) -> _http.Handler:
    return ProductPage(os.environ if env is None else env).handle


def main(argv: list[str] | None = None) -> None:
    _http.run_service("productpage", make_handler(), argv)


if __name__ == "__main__":
    main()
