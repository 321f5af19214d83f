"""Token authenticators: the runtime's static per-pod tokens, and Kubernetes TokenReview.

The TokenReview tests cannot reach a real Kubernetes API server here: they run
:class:`KubernetesTokenReviewAuthenticator` against a fake HTTP server on loopback that
speaks the ``authentication.k8s.io/v1`` TokenReview shape (POST
``/apis/authentication.k8s.io/v1/tokenreviews``, the reviewer's bearer token, a
``TokenReview`` body with ``spec.token`` and ``spec.audiences``, answered with
``status.authenticated``, ``status.user.username``, ``status.audiences``,
``status.error``). They check our side of that contract, not a cluster's behaviour.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from isthmus.controlplane.ca.authn import (
    AuthenticationError,
    Caller,
    KubernetesTokenReviewAuthenticator,
    StaticTokenAuthenticator,
)


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_static_tokens_issue_and_revoke():
    auth = StaticTokenAuthenticator()
    token = auth.issue("default", "bookinfo")
    assert len(token) >= 40
    assert run(auth.authenticate(token)) == Caller("default", "bookinfo")
    with pytest.raises(AuthenticationError, match="unknown token"):
        run(auth.authenticate("nope"))
    auth.revoke(token)
    with pytest.raises(AuthenticationError):
        run(auth.authenticate(token))


def test_static_tokens_are_not_kept_in_clear():
    auth = StaticTokenAuthenticator({"s3cret-token": Caller("a", "b")})
    assert "s3cret-token" not in repr(vars(auth))


def test_token_file_is_reloaded_and_bad_file_keeps_previous(tmp_path):
    import hashlib

    path = tmp_path / "tokens.json"
    hashed = "sha256:" + hashlib.sha256(b"hashed-token").hexdigest()
    path.write_text(json.dumps({"tok-1": {"namespace": "ns1", "serviceAccount": "sa1"},
                                hashed: {"namespace": "ns2", "serviceAccount": "sa2"}}))
    auth = StaticTokenAuthenticator.from_file(path)
    assert run(auth.authenticate("tok-1")) == Caller("ns1", "sa1")
    assert run(auth.authenticate("hashed-token")) == Caller("ns2", "sa2")
    path.write_text(json.dumps({"tok-2": {"namespace": "ns3", "serviceAccount": "sa3"}}))
    os.utime(path, ns=(1, 10**18))  # make sure the change is seen even within one mtime tick
    assert run(auth.authenticate("tok-2")) == Caller("ns3", "sa3")
    with pytest.raises(AuthenticationError):
        run(auth.authenticate("tok-1"))
    path.write_text("{not json")
    os.utime(path, ns=(1, 2 * 10**18))
    assert run(auth.authenticate("tok-2")) == Caller("ns3", "sa3")  # last good table kept


def test_caller_parts_are_validated():
    with pytest.raises(AuthenticationError):
        Caller("", "sa")
    with pytest.raises(AuthenticationError):
        Caller("ns/x", "sa")


# ------------------------------------------------------------------ TokenReview
class FakeApiServer:
    """Minimal TokenReview endpoint; ``reviews`` maps a token to the status to return."""

    def __init__(self) -> None:
        self.reviews: dict[str, dict] = {}
        self.requests: list[tuple[str, dict, dict]] = []
        self.status_code = 201
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append((self.path, dict(self.headers), body))
                if self.path != "/apis/authentication.k8s.io/v1/tokenreviews":
                    self.send_response(404)
                    self.end_headers()
                    return
                if self.headers.get("Authorization") != "Bearer reviewer-token":
                    self.send_response(401)
                    self.end_headers()
                    return
                status = fake.reviews.get(body["spec"]["token"], {"authenticated": False})
                out = json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                                  "status": status}).encode()
                self.send_response(fake.status_code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def api(tmp_path) -> Iterator[tuple[FakeApiServer, KubernetesTokenReviewAuthenticator]]:
    server = FakeApiServer()
    reviewer = tmp_path / "token"
    reviewer.write_text("reviewer-token\n")
    auth = KubernetesTokenReviewAuthenticator(server.url, reviewer_token_file=reviewer, ca_file=None, timeout=2)
    yield server, auth
    server.close()


def test_token_review_accepts_a_service_account_token(api):
    server, auth = api
    server.reviews["pod-token"] = {"authenticated": True, "audiences": ["istio-ca"],
                                   "user": {"username": "system:serviceaccount:default:bookinfo"}}
    assert run(auth.authenticate("pod-token")) == Caller("default", "bookinfo")
    _, headers, body = server.requests[0]
    assert body == {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                    "spec": {"token": "pod-token", "audiences": ["istio-ca"]}}
    assert headers["Content-Type"] == "application/json"
    # cached: no second review
    assert run(auth.authenticate("pod-token")) == Caller("default", "bookinfo")
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    ("status", "match"),
    [
        ({"authenticated": False}, "not authenticated"),
        ({"authenticated": False, "error": "token expired"}, "token expired"),
        ({"authenticated": True, "audiences": ["other"], "user": {"username": "system:serviceaccount:a:b"}},
         "audiences"),
        ({"authenticated": True, "audiences": ["istio-ca"], "user": {"username": "alice"}}, "not a service account"),
        ({"authenticated": True, "audiences": ["istio-ca"], "user": {"username": "system:serviceaccount:a"}},
         "unexpected"),
    ],
)
def test_token_review_rejections(api, status, match):
    server, auth = api
    server.reviews["t"] = status
    with pytest.raises(AuthenticationError, match=match):
        run(auth.authenticate("t"))


def test_token_review_http_errors_explain(api, tmp_path):
    _, auth = api
    (tmp_path / "token").write_text("wrong")
    with pytest.raises(AuthenticationError, match="HTTP 401.*RBAC"):
        run(auth.authenticate("t"))
    dead = KubernetesTokenReviewAuthenticator("http://127.0.0.1:1", reviewer_token_file=None, ca_file=None, timeout=1)
    with pytest.raises(AuthenticationError, match="failed"):
        run(dead.authenticate("t"))
