"""Talking to a running control plane's HTTP API from the CLI."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import click

DEFAULT_CONTROLPLANE = "http://127.0.0.1:15014"


def controlplane_option(fn: Any) -> Any:
    return click.option(
        "--controlplane",
        envvar="ISTHMUS_CONTROLPLANE",
        default=DEFAULT_CONTROLPLANE,
        show_default=True,
        help="URL of the control plane's HTTP API (env ISTHMUS_CONTROLPLANE).",
    )(fn)


def request(base: str, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, Any]:
    url = base.rstrip("/") + path
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        payload = exc.read()
        try:
            return exc.code, json.loads(payload)
        except ValueError:
            return exc.code, {"error": payload.decode("utf-8", "replace")}
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise click.ClickException(
            f"cannot reach the control plane at {base} ({reason}): is `isthmus controlplane` running? "
            f"(set --controlplane or ISTHMUS_CONTROLPLANE)"
        ) from None
