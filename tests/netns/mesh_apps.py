"""Tiny HTTP backends for the mesh tests (run inside pods): ``python mesh_apps.py MODE PORT``.

  good    200 "good <pod>"
  bad     500 always
  flaky   alternates 503 / 200 per request (a retry always recovers)
  slow    200 after 1 s (for circuit breaking)
``/health`` is always 200 and does not count as a request.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODE = sys.argv[1]
PORT = int(sys.argv[2])
POD = os.environ.get("HOSTNAME", "?")
_count = 0
_lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, status: int, text: str) -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        global _count
        if self.path == "/health":
            self._send(200, "ok\n")
            return
        with _lock:
            _count += 1
            n = _count
        if MODE == "bad":
            self._send(500, f"bad {POD}\n")
        elif MODE == "flaky":
            self._send(503 if n % 2 else 200, f"flaky {POD} {n}\n")
        elif MODE == "slow":
            time.sleep(1.0)
            self._send(200, f"slow {POD}\n")
        else:
            self._send(200, f"{MODE} {POD}\n")


ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer(("0.0.0.0", PORT), Handler).serve_forever()
