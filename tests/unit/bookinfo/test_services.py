"""Pure pieces of the bookinfo services: JSON shapes per version, header forwarding,
HTML star rendering, cookies, configuration from the environment, the image table."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from examples.bookinfo import _http, details, images, productpage, ratings, reviews

TEXT1 = "An extremely entertaining play by Shakespeare. The slapstick humour is refreshing!"
TEXT2 = ("Absolutely fun and entertaining. The play lacks thematic depth when compared to other "
         "plays by Shakespeare.")


def call(handler, method: str, target: str, headers=(), body: b"" = b"") -> _http.Response:
    req = _http.Request(method, target, "HTTP/1.1", _http.Headers(headers), body)
    return asyncio.run(handler(req))


# --------------------------------------------------------------------------- reviews


def test_reviews_v1_has_no_rating() -> None:
    body = reviews.reviews_body(0, podname="reviews-v1-abc", clustername="null",
                                ratings_enabled=False, star_color="black", stars=(5, 4))
    assert body == {
        "id": "0", "podname": "reviews-v1-abc", "clustername": "null",
        "reviews": [{"reviewer": "Reviewer1", "text": TEXT1},
                    {"reviewer": "Reviewer2", "text": TEXT2}],
    }
    assert list(body) == ["id", "podname", "clustername", "reviews"]


@pytest.mark.parametrize("color", ["black", "red"])
def test_reviews_v2_v3_rating_colour(color: str) -> None:
    body = reviews.reviews_body(0, podname="p", clustername="null", ratings_enabled=True,
                                star_color=color, stars=(5, 4))
    assert [r["rating"] for r in body["reviews"]] == [
        {"stars": 5, "color": color}, {"stars": 4, "color": color}]


def test_reviews_ratings_unavailable() -> None:
    body = reviews.reviews_body(3, podname="p", clustername="c", ratings_enabled=True,
                                star_color="red", stars=(-1, 2))
    assert body["id"] == "3"
    assert body["reviews"][0]["rating"] == {"error": "Ratings service is currently unavailable"}
    assert body["reviews"][1]["rating"] == {"stars": 2, "color": "red"}


@pytest.mark.parametrize("answer,stars", [
    ({"id": 0, "ratings": {"Reviewer1": 5, "Reviewer2": 4}}, (5, 4)),
    ({"id": 0, "ratings": {"Reviewer2": 1}}, (-1, 1)),
    ({"error": "Service unavailable"}, (-1, -1)),
    ({"ratings": {"Reviewer1": "5", "Reviewer2": True}}, (-1, -1)),
    ([1, 2], (-1, -1)),
])
def test_stars_from_ratings(answer, stars) -> None:
    assert reviews.stars_from_ratings(answer) == stars


def test_reviews_configuration_from_env() -> None:
    v1 = reviews.Reviews({"SERVICE_VERSION": "v1", "ENABLE_RATINGS": "false"})
    assert not v1.ratings_enabled
    v2 = reviews.Reviews({"ENABLE_RATINGS": "true", "STAR_COLOR": "black", "HOSTNAME": "pod-1"})
    assert v2.ratings_enabled and v2.ratings_timeout == 10.0 and v2.podname == "pod-1"
    assert v2.clustername == "null"
    assert v2.ratings_url == "http://ratings:9080/ratings"
    v3 = reviews.Reviews({"ENABLE_RATINGS": "TRUE", "STAR_COLOR": "red", "CLUSTER_NAME": "c1"})
    assert v3.ratings_enabled and v3.ratings_timeout == 2.5 and v3.clustername == "c1"
    assert reviews.Reviews({}).star_color == "black"
    assert not reviews.Reviews({"ENABLE_RATINGS": "yes"}).ratings_enabled  # Boolean.valueOf


@pytest.mark.parametrize("env,url", [
    ({}, "http://ratings:9080/ratings"),
    ({"RATINGS_HOSTNAME": "127.0.0.1:4567"}, "http://127.0.0.1:4567/ratings"),
    ({"RATINGS_HOSTNAME": "ratings", "SERVICES_DOMAIN": "bookinfo.svc.cluster.local"},
     "http://ratings.bookinfo.svc.cluster.local:9080/ratings"),
    ({"RATINGS_HOSTNAME": "ratings:81", "SERVICES_DOMAIN": "ns"}, "http://ratings.ns:81/ratings"),
    ({"RATINGS_SERVICE": "ratings2"}, "http://ratings2:9080/ratings"),
    ({"RATINGS_SERVICE": "http://r:1/ratings"}, "http://r:1/ratings"),
    ({"RATINGS_SERVICE": "http://r:1"}, "http://r:1/ratings"),
    ({"RATINGS_SERVICE_PORT": "9999"}, "http://ratings:9999/ratings"),
    ({"RATINGS_HOSTNAME": "[::1]:9000"}, "http://[::1]:9000/ratings"),
])
def test_ratings_endpoint(env, url) -> None:
    assert reviews.ratings_endpoint(env) == url


def test_reviews_routes_v1() -> None:
    handler = reviews.Reviews({"ENABLE_RATINGS": "false", "HOSTNAME": "h"}).handle
    resp = call(handler, "GET", "/reviews/7")
    assert resp.status == 200
    assert json.loads(resp.body)["id"] == "7"
    assert "rating" not in json.loads(resp.body)["reviews"][0]
    assert json.loads(call(handler, "GET", "/health").body) == {"status": "Reviews is healthy"}
    assert call(handler, "GET", "/reviews/abc").status == 404
    assert call(handler, "GET", "/reviews/99999999999").status == 404
    assert call(handler, "GET", "/nope").status == 404


def test_reviews_ratings_down_gives_error_rating() -> None:
    # nothing listens on port 1 of loopback: connection refused
    handler = reviews.Reviews({"ENABLE_RATINGS": "true", "STAR_COLOR": "red",
                               "RATINGS_HOSTNAME": "127.0.0.1:1"}).handle
    body = json.loads(call(handler, "GET", "/reviews/0").body)
    assert [r["rating"] for r in body["reviews"]] == [
        {"error": "Ratings service is currently unavailable"}] * 2


# --------------------------------------------------------------------------- header forwarding


def test_forward_headers_selection() -> None:
    incoming = _http.Headers([
        ("X-Request-Id", "rid"), ("traceparent", "00-abc-def-01"), ("tracestate", "k=v"),
        ("X-B3-TraceId", "t"), ("x-b3-spanid", "s"), ("x-b3-parentspanid", "p"),
        ("x-b3-sampled", "1"), ("x-b3-flags", "0"), ("b3", "t-s-1"), ("x-ot-span-context", "o"),
        ("x-datadog-trace-id", "d1"), ("x-datadog-parent-id", "d2"),
        ("x-datadog-sampling-priority", "1"), ("x-cloud-trace-context", "c"),
        ("grpc-trace-bin", "g"), ("sw8", "sw"), ("User-Agent", "curl/8"),
        ("Cookie", "a=1"), ("Authorization", "Bearer x"), ("jwt", "j"),
        ("Host", "productpage:9080"), ("Accept", "*/*"), ("x-unrelated", "no"),
        ("content-length", "0"), ("connection", "keep-alive"),
    ])
    out = productpage.forward_headers(incoming, None)
    assert out == {
        "x-request-id": "rid", "x-ot-span-context": "o", "x-datadog-trace-id": "d1",
        "x-datadog-parent-id": "d2", "x-datadog-sampling-priority": "1",
        "traceparent": "00-abc-def-01", "tracestate": "k=v", "x-cloud-trace-context": "c",
        "grpc-trace-bin": "g", "x-b3-traceid": "t", "x-b3-spanid": "s",
        "x-b3-parentspanid": "p", "x-b3-sampled": "1", "x-b3-flags": "0", "b3": "t-s-1",
        "sw8": "sw", "user-agent": "curl/8", "cookie": "a=1", "authorization": "Bearer x",
        "jwt": "j",
    }


def test_forward_headers_end_user() -> None:
    incoming = _http.Headers([("end-user", "mallory"), ("cookie", "user=jason")])
    assert productpage.forward_headers(incoming, "jason")["end-user"] == "jason"
    # without a signed-in user the incoming end-user passes through
    assert productpage.forward_headers(_http.Headers([("end-user", "x")]), None)["end-user"] == "x"
    assert "end-user" not in productpage.forward_headers(_http.Headers(), None)


def test_reviews_forwards_the_same_list() -> None:
    assert {"end-user", "x-request-id", "traceparent", "b3", "cookie", "jwt"} <= set(
        _http.PROPAGATED_HEADERS)


# --------------------------------------------------------------------------- login cookie


def test_user_cookie_round_trip() -> None:
    cookie = productpage.login_cookie("jason")
    assert cookie.startswith("user=jason;") and "Path=/" in cookie
    assert productpage.user_from_cookie({"user": "jason"}) == "jason"
    odd = productpage.login_cookie("a b;\r\nX: y")
    value = odd.split(";", 1)[0].split("=", 1)[1]
    assert "\r" not in value and ";" not in value and " " not in value
    user = productpage.user_from_cookie({"user": value})
    assert user == "a b;X: y"  # control characters dropped: safe as a header value
    assert productpage.user_from_cookie({}) is None
    assert productpage.user_from_cookie({"user": ""}) is None
    assert "Max-Age=0" in productpage.logout_cookie()


@pytest.mark.parametrize("referer,target", [
    (None, "/productpage"),
    ("http://gw:8080/productpage?u=normal", "/productpage?u=normal"),
    ("http://evil.example//other", "/productpage"),
    ("not a url", "/productpage"),
])
def test_redirect_target(referer, target) -> None:
    assert productpage.redirect_target(referer) == target


def test_login_logout_routes() -> None:
    handler = productpage.ProductPage({}).handle
    resp = call(handler, "POST", "/login", [("content-type", "application/x-www-form-urlencoded"),
                                            ("referer", "http://h/productpage")],
                b"username=jason&passwd=x")
    assert resp.status == 302
    assert ("Location", "/productpage") in resp.headers
    assert ("Set-Cookie", productpage.login_cookie("jason")) in resp.headers
    assert call(handler, "GET", "/login").status == 405
    out = call(handler, "GET", "/logout")
    assert out.status == 302 and ("Set-Cookie", productpage.logout_cookie()) in out.headers


# --------------------------------------------------------------------------- HTML


def _review(rating=None) -> dict:
    r = {"reviewer": "Reviewer1", "text": "<great>"}
    if rating is not None:
        r["rating"] = rating
    return r


@pytest.mark.parametrize("stars,color", [(5, "black"), (4, "red"), (1, "red")])
def test_render_stars(stars: int, color: str) -> None:
    out = productpage.render_stars({"stars": stars, "color": color})
    assert f'<font color="{color}">' in out
    assert out.count('class="glyphicon glyphicon-star"') == stars
    assert out.count('class="glyphicon glyphicon-star-empty"') == 5 - stars


def test_render_stars_none_and_error() -> None:
    assert productpage.render_stars(None) == ""
    assert productpage.render_stars({}) == ""
    assert productpage.render_stars({"stars": 0, "color": "red"}) == ""  # as the template
    err = productpage.render_stars({"error": "Ratings service is currently unavailable"})
    assert err == "<p><i>Ratings service is currently unavailable</i></p>\n"
    assert "glyphicon" not in err
    evil = productpage.render_stars({"stars": 2, "color": '"><script>'})
    assert "<script>" not in evil


def test_render_productpage() -> None:
    page = productpage.render_productpage(
        product=productpage.PRODUCTS[0], details_status=200,
        details=details.book_details(0), reviews_status=200,
        reviews={"reviews": [_review({"stars": 5, "color": "red"}), _review()]}, user="jason")
    assert "<title>Simple Bookstore App</title>" in page
    assert "The Comedy of Errors" in page and "<b>William Shakespeare's</b>" in page
    assert "<dt>ISBN-10:</dt>1234567890" in page
    assert page.count('<font color="red">') == 1
    assert "&lt;great&gt;" in page and "<great>" not in page
    assert 'jason ( <a href="logout">sign out</a> )' in page
    assert 'action="login"' not in page


def test_render_productpage_errors() -> None:
    page = productpage.render_productpage(
        product=productpage.PRODUCTS[0], details_status=503,
        details={"error": productpage.DETAILS_ERROR}, reviews_status=500,
        reviews={"error": productpage.REVIEWS_ERROR}, user=None)
    assert "Error fetching product details!" in page
    assert "Sorry, product details are currently unavailable for this book." in page
    assert "Error fetching product reviews!" in page
    assert "Sorry, product reviews are currently unavailable for this book." in page
    assert 'action="login"' in page


def test_productpage_backends_down() -> None:
    env = {"DETAILS_HOSTNAME": "127.0.0.1:1", "REVIEWS_HOSTNAME": "127.0.0.1:1",
           "RATINGS_HOSTNAME": "127.0.0.1:1"}
    handler = productpage.ProductPage(env).handle
    resp = call(handler, "GET", "/api/v1/products/0/reviews")
    assert resp.status == 500
    assert json.loads(resp.body) == {"error": productpage.REVIEWS_ERROR}
    assert json.loads(call(handler, "GET", "/api/v1/products/0").body) == {
        "error": productpage.DETAILS_ERROR}
    assert json.loads(call(handler, "GET", "/api/v1/products/0/ratings").body) == {
        "error": productpage.RATINGS_ERROR}
    page = call(handler, "GET", "/productpage")
    assert page.status == 200 and b"Error fetching product reviews!" in page.body


def test_productpage_static_routes() -> None:
    handler = productpage.ProductPage({}).handle
    resp = call(handler, "GET", "/api/v1/products")
    assert resp.status == 200 and json.loads(resp.body)[0]["title"] == "The Comedy of Errors"
    assert call(handler, "GET", "/health").body == b"Product page is healthy"
    assert b"Normal user" in call(handler, "GET", "/").body
    assert call(handler, "GET", "/index.html").status == 200
    assert call(handler, "GET", "/api/v1/products/0/other").status == 404
    assert call(handler, "GET", "/api/v1/products/../x").status == 404
    assert call(handler, "POST", "/productpage").status == 405
    assert b"bookinfo_productpage_requests_total" in call(handler, "GET", "/metrics").body


def test_productpage_service_urls() -> None:
    pp = productpage.ProductPage({"SERVICES_DOMAIN": "default.svc.cluster.local",
                                  "REVIEWS_HOSTNAME": "127.0.0.1:5000"})
    assert pp.details_url == "http://details.default.svc.cluster.local:9080"
    assert pp.reviews_url == "http://127.0.0.1.default.svc.cluster.local:5000"
    assert productpage.ProductPage({}).ratings_url == "http://ratings:9080"


# --------------------------------------------------------------------------- details, ratings


def test_details() -> None:
    handler = details.Details({}).handle
    resp = call(handler, "GET", "/details/0")
    assert resp.body == (b'{"id":0,"author":"William Shakespeare","year":1595,"type":"paperback",'
                         b'"pages":200,"publisher":"PublisherA","language":"English",'
                         b'"ISBN-10":"1234567890","ISBN-13":"123-1234567890"}')
    bad = call(handler, "GET", "/details/abc")
    assert bad.status == 400 and json.loads(bad.body) == {"error": "please provide numeric product id"}
    assert json.loads(call(handler, "GET", "/health").body) == {"status": "Details is healthy"}
    assert call(handler, "GET", "/other").status == 404


def test_details_from_google_books() -> None:
    volume = {"items": [{"volumeInfo": {
        "authors": ["William Shakespeare"], "publishedDate": "1995", "printType": "BOOK",
        "pageCount": 80, "publisher": "Dover", "language": "en",
        "industryIdentifiers": [{"type": "ISBN_13", "identifier": "9780486424613"},
                                {"type": "ISBN_10", "identifier": "0486424618"}]}}]}
    out = details.details_from_google_books(0, volume)
    assert out["type"] == "paperback" and out["ISBN-10"] == "0486424618"
    assert out["language"] == "English"


def test_ratings() -> None:
    r = ratings.Ratings({})
    resp = call(r.handle, "GET", "/ratings/0")
    assert resp.body == b'{"id":0,"ratings":{"Reviewer1":5,"Reviewer2":4}}'
    assert json.loads(call(r.handle, "GET", "/ratings/12?x=1").body)["id"] == 12
    assert call(r.handle, "GET", "/ratings/abc").status == 400
    assert json.loads(call(r.handle, "GET", "/health").body) == {"status": "Ratings is healthy"}
    posted = call(r.handle, "POST", "/ratings/1", body=b'{"Reviewer1": 1, "Reviewer2": 2}')
    assert json.loads(posted.body) == {"id": 1, "ratings": {"Reviewer1": 1, "Reviewer2": 2}}
    assert json.loads(call(r.handle, "GET", "/ratings/1").body)["ratings"]["Reviewer1"] == 1
    assert call(r.handle, "POST", "/ratings/1", body=b"{nope").status == 400
    assert call(r.handle, "GET", "/other").status == 404


def test_ratings_faulty_and_unavailable() -> None:
    faulty = ratings.Ratings({"SERVICE_VERSION": "v-faulty"}, rng=lambda: 0.2)
    assert call(faulty.handle, "GET", "/ratings/0").status == 503
    fine = ratings.Ratings({"SERVICE_VERSION": "v-faulty"}, rng=lambda: 0.9)
    assert call(fine.handle, "GET", "/ratings/0").status == 200
    now = [0.0]
    unavailable = ratings.Ratings({"SERVICE_VERSION": "v-unavailable"}, clock=lambda: now[0])
    assert call(unavailable.handle, "GET", "/ratings/0").status == 200
    now[0] = 61.0
    assert call(unavailable.handle, "GET", "/ratings/0").status == 503
    now[0] = 0.0
    unhealthy = ratings.Ratings({"SERVICE_VERSION": "v-unhealthy"}, clock=lambda: now[0])
    assert call(unhealthy.handle, "GET", "/health").status == 200
    now[0] = 901.0
    assert call(unhealthy.handle, "GET", "/ratings/0").status == 503
    assert call(unhealthy.handle, "GET", "/health").status == 500


@pytest.mark.parametrize("text,value", [("0", 0), ("12abc", 12), (" -3", -3), ("abc", None),
                                        ("", None), ("0?x=1", 0)])
def test_js_parse_int(text, value) -> None:
    assert ratings.js_parse_int(text) == value


# --------------------------------------------------------------------------- images


def test_image_commands() -> None:
    argv, env = images.IMAGE_COMMANDS["docker.io/istio/examples-bookinfo-reviews-v2"]
    assert argv[0] == sys.executable and Path(argv[1]).name == "reviews.py"
    assert Path(argv[1]).is_file()
    assert env == {"SERVICE_VERSION": "v2", "ENABLE_RATINGS": "true", "STAR_COLOR": "black"}
    assert images.IMAGE_COMMANDS["examples-bookinfo-reviews-v3"][1]["STAR_COLOR"] == "red"
    assert images.IMAGE_COMMANDS["examples-bookinfo-reviews-v1"][1]["ENABLE_RATINGS"] == "false"
    for name in ("productpage-v1", "details-v1", "ratings-v1"):
        assert f"registry.istio.io/release/examples-bookinfo-{name}" in images.IMAGE_COMMANDS
    for argv, _ in images.IMAGE_COMMANDS.values():
        assert Path(argv[1]).is_file()


def test_command_for_image() -> None:
    argv, env = images.command_for_image(
        "registry.istio.io/release/examples-bookinfo-reviews-v3:1.20.3")
    assert Path(argv[1]).name == "reviews.py" and env["STAR_COLOR"] == "red"
    assert images.command_for_image("quay.io/x/examples-bookinfo-ratings-v1@sha256:ab")[1] == {
        "SERVICE_VERSION": "v1"}
    assert images.command_for_image("nginx:1.25") is None


def test_manifest_images_are_all_known(istio_samples: Path) -> None:
    """Every bookinfo image in Istio's bookinfo.yaml (except databases) has a command."""
    text = (istio_samples / "bookinfo" / "platform-kube" / "bookinfo.yaml").read_text()
    refs = [line.split("image:", 1)[1].strip() for line in text.splitlines() if "image:" in line]
    assert len(refs) == 6
    for ref in refs:
        assert images.command_for_image(ref) is not None, ref


# --------------------------------------------------------------------------- productpage retry


def _with_backend(handler, fn):
    async def main():
        server = _http.HTTPServer(handler, access_log=False)
        port = await server.start("127.0.0.1", 0)
        try:
            return await fn(port)
        finally:
            await server.close()
    return asyncio.run(main())


def test_productpage_tries_reviews_twice_on_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sample's two 3 s attempts (here shortened): a 7 s ratings delay behind reviews v2
    makes the page give up on reviews after two attempts, with its error message."""
    monkeypatch.setattr(productpage, "TIMEOUT", 0.2)
    hits: list[str] = []

    async def slow_reviews(req: _http.Request) -> _http.Response:
        hits.append(req.headers.get("end-user") or "")
        await asyncio.sleep(1.0)
        return _http.Response.json("{}")

    async def fn(port: int):
        pp = productpage.ProductPage({"REVIEWS_HOSTNAME": f"127.0.0.1:{port}"})
        req = _http.Request("GET", "/api/v1/products/0/reviews", "HTTP/1.1",
                            _http.Headers([("cookie", "user=jason")]))
        return await pp.handle(req)

    resp = _with_backend(slow_reviews, fn)
    assert resp.status == 500
    assert json.loads(resp.body) == {"error": productpage.REVIEWS_ERROR}
    assert hits == ["jason", "jason"]


def test_productpage_passes_reviews_error_status() -> None:
    hits: list[int] = []

    async def failing_reviews(req: _http.Request) -> _http.Response:
        hits.append(1)
        return _http.Response.json('{"error": "fault filter abort"}', 503)

    async def fn(port: int):
        pp = productpage.ProductPage({"REVIEWS_HOSTNAME": f"127.0.0.1:{port}"})
        req = _http.Request("GET", "/api/v1/products/0/reviews", "HTTP/1.1", _http.Headers())
        return await pp.handle(req)

    resp = _with_backend(failing_reviews, fn)
    assert resp.status == 503 and len(hits) == 2
    assert json.loads(resp.body) == {"error": productpage.REVIEWS_ERROR}
