"""Bookinfo end to end on loopback: every service a real process on 127.0.0.1.

Services are started the ways the runtime and users start them: reviews from the image table
(``IMAGE_COMMANDS``: script path + the image's env), ratings and details as
``python -m examples.bookinfo.<service>``, productpages as scripts. Each listens on port 0
and the test reads the bound port from its "listening on" log line. A stub ratings server in
this process records the headers reviews sends it, and can delay or fail on cue (standing
in for Istio's ratings fault injection, which matches on ``end-user``).
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from examples.bookinfo.images import IMAGE_COMMANDS

pytestmark = [pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[3]
BOOKINFO = ROOT / "examples" / "bookinfo"
RATINGS_ERROR = {"error": "Ratings service is currently unavailable"}
REVIEWS_ERROR = {"error": "Sorry, product reviews are currently unavailable for this book."}
TRACE_HEADERS = {
    "x-request-id": "req-123",
    "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "tracestate": "congo=t61rcWkgMzE",
    "x-b3-traceid": "80f198ee56343ba864fe8b2a57d3eff7",
    "x-b3-spanid": "e457b5a2e4d86bd1",
    "x-b3-sampled": "1",
    "b3": "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1",
    "x-datadog-trace-id": "42",
    "sw8": "1-abc",
    "authorization": "Bearer token",
    "user-agent": "bookinfo-test/1.0",
}


class Proc:
    def __init__(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.name = name
        full_env = {**os.environ, **env, "PORT": "0", "BIND": "127.0.0.1",
                    "PYTHONUNBUFFERED": "1"}
        self.popen = subprocess.Popen(argv, cwd=ROOT, env=full_env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True)
        self.port = 0
        self.lines: list[str] = []

    def wait_listening(self, deadline: float) -> None:
        assert self.popen.stdout is not None
        while time.monotonic() < deadline:
            line = self.popen.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            m = re.search(r"listening on \S+:(\d+)", line)
            if m:
                self.port = int(m.group(1))
                # keep draining the pipe so the child never blocks on a full pipe
                threading.Thread(target=self._drain, daemon=True).start()
                return
        raise RuntimeError(f"{self.name} did not start: {''.join(self.lines)}")

    def _drain(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


class RatingsStub:
    """Records request headers; ``end-user: slow`` → 3 s delay, ``end-user: abort`` → 500."""

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                headers = {k.lower(): v for k, v in self.headers.items()}
                stub.seen.append(headers)
                user = headers.get("end-user")
                if user == "slow":
                    time.sleep(3.0)
                if user == "abort":
                    body, status = b"fault filter abort", 500
                else:
                    body, status = b'{"id": 0, "ratings": {"Reviewer1": 3, "Reviewer2": 1}}', 200
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def module(service: str) -> list[str]:
    return [sys.executable, "-m", f"examples.bookinfo.{service}"]


def script(service: str) -> list[str]:
    return [sys.executable, str(BOOKINFO / f"{service}.py")]


def image(name: str) -> tuple[list[str], dict[str, str]]:
    argv, env = IMAGE_COMMANDS[f"docker.io/istio/examples-bookinfo-{name}"]
    return list(argv), dict(env)


class Mesh:
    def __init__(self) -> None:
        self.procs: dict[str, Proc] = {}
        self.stub = RatingsStub()

    def start(self, wave: dict[str, tuple[list[str], dict[str, str]]]) -> None:
        deadline = time.monotonic() + 10
        started = {name: Proc(name, argv, env) for name, (argv, env) in wave.items()}
        self.procs.update(started)
        for proc in started.values():
            proc.wait_listening(deadline)

    def port(self, name: str) -> int:
        return self.procs[name].port

    def addr(self, name: str) -> str:
        return f"127.0.0.1:{self.port(name)}"

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.stop()
        self.stub.stop()


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    m = Mesh()
    try:
        m.start({"ratings": (module("ratings"), {"SERVICE_VERSION": "v1"}),
                 "details": (module("details"), {})})
        ratings = m.addr("ratings")
        stub = f"127.0.0.1:{m.stub.port}"
        down = f"127.0.0.1:{closed_port()}"
        reviews = {}
        for name, version, ratings_host in (
            ("reviews-v1", "reviews-v1", ratings), ("reviews-v2", "reviews-v2", ratings),
            ("reviews-v3", "reviews-v3", ratings), ("reviews-v2-stub", "reviews-v2", stub),
            ("reviews-v3-stub", "reviews-v3", stub), ("reviews-v2-down", "reviews-v2", down),
        ):
            argv, env = image(version)
            env.update(RATINGS_HOSTNAME=ratings_host, HOSTNAME=f"{name}-pod")
            reviews[name] = (argv, env)
        m.start(reviews)
        pages = {}
        for suffix in ("v1", "v2", "v3", "v2-stub", "v3-stub", "v2-down"):
            pages[f"productpage-{suffix}"] = (script("productpage"), {
                "DETAILS_HOSTNAME": m.addr("details"),
                "REVIEWS_HOSTNAME": m.addr(f"reviews-{suffix}"),
                "RATINGS_HOSTNAME": ratings,
            })
        pages["productpage-nobackends"] = (script("productpage"), {
            "DETAILS_HOSTNAME": down, "REVIEWS_HOSTNAME": down, "RATINGS_HOSTNAME": down})
        m.start(pages)
        yield m
    finally:
        m.stop()


def request(port: int, path: str, headers: dict[str, str] | None = None, method: str = "GET",
            body: bytes | None = None, timeout: float = 15) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def reviews_json(mesh: Mesh, page: str, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    status, _, body = request(mesh.port(page), "/api/v1/products/0/reviews", headers)
    return status, json.loads(body)


# --------------------------------------------------------------------------- versions


def test_reviews_api_per_version(mesh: Mesh) -> None:
    status, v1 = reviews_json(mesh, "productpage-v1")
    assert status == 200
    assert v1["id"] == "0" and v1["podname"] == "reviews-v1-pod" and v1["clustername"] == "null"
    assert [r["reviewer"] for r in v1["reviews"]] == ["Reviewer1", "Reviewer2"]
    assert all("rating" not in r for r in v1["reviews"])

    status, v2 = reviews_json(mesh, "productpage-v2")
    assert status == 200
    assert [r["rating"] for r in v2["reviews"]] == [{"stars": 5, "color": "black"},
                                                   {"stars": 4, "color": "black"}]
    status, v3 = reviews_json(mesh, "productpage-v3")
    assert status == 200
    assert [r["rating"] for r in v3["reviews"]] == [{"stars": 5, "color": "red"},
                                                   {"stars": 4, "color": "red"}]
    # productpage passes the reviews JSON through unchanged
    status, _, direct = request(mesh.port("reviews-v3"), "/reviews/0")
    assert status == 200 and json.loads(direct) == v3


@pytest.mark.parametrize("page,color", [("productpage-v1", None), ("productpage-v2", "black"),
                                        ("productpage-v3", "red")])
def test_productpage_html_stars(mesh: Mesh, page: str, color: str | None) -> None:
    status, headers, body = request(mesh.port(page), "/productpage?u=normal")
    html = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "The Comedy of Errors" in html and "Book Details" in html and "Book Reviews" in html
    assert "<dt>ISBN-13:</dt>123-1234567890" in html
    if color is None:
        assert "<font" not in html and "glyphicon-star" not in html
    else:
        assert html.count(f'<font color="{color}">') == 2
        assert html.count('class="glyphicon glyphicon-star"') == 9  # 5 + 4
        assert html.count('class="glyphicon glyphicon-star-empty"') == 1


def test_other_routes(mesh: Mesh) -> None:
    port = mesh.port("productpage-v1")
    status, _, body = request(port, "/api/v1/products/0")
    assert status == 200 and json.loads(body)["ISBN-10"] == "1234567890"
    status, _, body = request(port, "/api/v1/products/0/ratings")
    assert status == 200 and json.loads(body) == {"id": 0, "ratings": {"Reviewer1": 5,
                                                                       "Reviewer2": 4}}
    status, _, body = request(port, "/api/v1/products")
    assert status == 200 and json.loads(body)[0]["id"] == 0
    assert request(port, "/health")[2] == b"Product page is healthy"
    assert request(port, "/")[0] == 200
    for name in ("details", "ratings", "reviews-v2"):
        status, _, body = request(mesh.port(name), "/health")
        assert status == 200 and "healthy" in json.loads(body)["status"]


# --------------------------------------------------------------------------- headers


def test_tracing_headers_forwarded_to_reviews_and_ratings(mesh: Mesh) -> None:
    mesh.stub.seen.clear()
    headers = {**TRACE_HEADERS, "x-not-forwarded": "1"}
    status, body = reviews_json(mesh, "productpage-v2-stub", headers)
    assert status == 200
    assert [r["rating"] for r in body["reviews"]] == [{"stars": 3, "color": "black"},
                                                     {"stars": 1, "color": "black"}]
    assert len(mesh.stub.seen) == 1
    seen = mesh.stub.seen[0]
    for name, value in TRACE_HEADERS.items():
        assert seen.get(name) == value, name
    assert "x-not-forwarded" not in seen and "end-user" not in seen


def test_login_sends_end_user(mesh: Mesh) -> None:
    port = mesh.port("productpage-v2-stub")
    status, headers, _ = request(
        port, "/login", {"Content-Type": "application/x-www-form-urlencoded",
                         "Referer": f"http://127.0.0.1:{port}/productpage"},
        method="POST", body=b"username=jason&passwd=jason")
    assert status == 302 and headers["location"] == "/productpage"
    cookie = headers["set-cookie"].split(";", 1)[0]
    assert cookie == "user=jason"

    mesh.stub.seen.clear()
    status, _, body = request(port, "/productpage", {"Cookie": cookie, **TRACE_HEADERS})
    assert status == 200 and b"jason ( <a href=\"logout\">sign out</a> )" in body
    assert mesh.stub.seen[-1]["end-user"] == "jason"  # productpage → reviews → ratings
    assert mesh.stub.seen[-1]["cookie"] == "user=jason"
    assert mesh.stub.seen[-1]["x-request-id"] == "req-123"

    status, headers, _ = request(port, "/logout", {"Cookie": cookie})
    assert status == 302 and "Max-Age=0" in headers["set-cookie"]
    mesh.stub.seen.clear()
    request(port, "/api/v1/products/0/reviews")
    assert "end-user" not in mesh.stub.seen[-1]


# --------------------------------------------------------------------------- failures


def test_ratings_down_gives_error_json(mesh: Mesh) -> None:
    status, body = reviews_json(mesh, "productpage-v2-down")
    assert status == 200
    assert [r["rating"] for r in body["reviews"]] == [RATINGS_ERROR, RATINGS_ERROR]
    status, _, page = request(mesh.port("productpage-v2-down"), "/productpage")
    assert status == 200 and page.count(b"<i>Ratings service is currently unavailable</i>") == 2


def test_ratings_abort_gives_error_json(mesh: Mesh) -> None:
    # what Istio's virtual-service-ratings-test-abort.yaml does for end-user jason
    status, body = reviews_json(mesh, "productpage-v2-stub", {"end-user": "abort"})
    assert status == 200
    assert [r["rating"] for r in body["reviews"]] == [RATINGS_ERROR, RATINGS_ERROR]


def test_ratings_delay_beyond_v3_timeout(mesh: Mesh) -> None:
    # reviews v3 gives up on ratings after 2.5 s (the stub takes 3 s)
    started = time.monotonic()
    status, body = reviews_json(mesh, "productpage-v3-stub", {"end-user": "slow"})
    elapsed = time.monotonic() - started
    assert status == 200
    assert [r["rating"] for r in body["reviews"]] == [RATINGS_ERROR, RATINGS_ERROR]
    assert 2.3 < elapsed < 2.95


def test_backends_down(mesh: Mesh) -> None:
    port = mesh.port("productpage-nobackends")
    status, _, body = request(port, "/api/v1/products/0/reviews")
    assert status == 500 and json.loads(body) == REVIEWS_ERROR
    status, _, body = request(port, "/productpage")
    assert status == 200
    assert b"Error fetching product details!" in body
    assert b"Sorry, product reviews are currently unavailable for this book." in body


def test_graceful_stop() -> None:
    proc = Proc("details-stop", script("details"), {})
    proc.wait_listening(time.monotonic() + 10)
    assert request(proc.port, "/details/1")[0] == 200
    proc.popen.terminate()
    assert proc.popen.wait(5) == 0
