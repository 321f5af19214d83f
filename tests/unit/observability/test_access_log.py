"""Access log: Envoy's format language, response flags, the buffered sink."""

from __future__ import annotations

import calendar
import io
import time
from pathlib import Path

import pytest

from isthmus.observability.access_log import (
    ENVOY_DEFAULT_FORMAT,
    ISTIO_DEFAULT_FORMAT,
    AccessLog,
    code_details,
    compile_format,
    flags_text,
    start_time,
)
from isthmus.observability.records import TcpRecord

T0 = calendar.timegm((2016, 4, 15, 20, 17, 0)) + 0.310


class Rec:
    """An HTTP record as conn_manager.RecordingStream presents it."""

    def __init__(self, **kw: object) -> None:
        self.start_wall = T0
        self.protocol = "HTTP/1.1"
        self.code = 200
        self.flags: list[str] = []
        self.bytes_received = 0
        self.bytes_sent = 2
        self.duration_ms = 3.7
        self.upstream_host = "10.0.0.7:9080"
        self.cluster_name = "outbound|9080||reviews.default.svc.cluster.local"
        self.route_name = "default"
        self.downstream_local = ("10.0.0.5", 9080)
        self.downstream_remote = ("10.0.0.9", 51234)
        self.server_name = ""
        self.headers = {":method": "GET", ":path": "/reviews/0", ":authority": "reviews:9080",
                        "user-agent": "curl/8", "x-request-id": "rid-1"}
        self.resp_headers = {"x-envoy-upstream-service-time": "2"}
        self.__dict__.update(kw)

    def flags_text(self) -> str:
        return flags_text(self.flags)

    def code_details(self) -> str:
        return code_details(self.flags, self.code, bool(self.upstream_host))

    def req(self, name: str) -> str | None:
        return self.headers.get(name)

    def resp(self, name: str) -> str | None:
        return self.resp_headers.get(name)


def test_envoy_default_format_line() -> None:
    f = compile_format(ENVOY_DEFAULT_FORMAT)
    assert f.format(Rec()) == (
        '[2016-04-15T20:17:00.310Z] "GET /reviews/0 HTTP/1.1" 200 - 0 2 3 2 "-" "curl/8" '
        '"rid-1" "reviews:9080" "10.0.0.7:9080"\n')


def test_istio_default_format_with_flags() -> None:
    f = compile_format(ISTIO_DEFAULT_FORMAT)
    r = Rec(code=503, flags=["UF"], bytes_sent=91, resp_headers={}, duration_ms=1.2)
    line = f.format(r)
    assert line == (
        '[2016-04-15T20:17:00.310Z] "GET /reviews/0 HTTP/1.1" 503 UF '
        'upstream_reset_before_response_started{connection_failure} - "-" 0 91 1 - "-" '
        '"curl/8" "rid-1" "reviews:9080" "10.0.0.7:9080" '
        'outbound|9080||reviews.default.svc.cluster.local - 10.0.0.5:9080 10.0.0.9:51234 - '
        'default\n')
    nr = f.format(Rec(code=404, flags=["NR"], upstream_host="", cluster_name="", route_name=""))
    assert '" 404 NR route_not_found ' in nr and ' "-" - - 10.0.0.5:9080' in nr


def test_original_path_wins_and_truncation() -> None:
    r = Rec()
    r.headers["x-envoy-original-path"] = "/before/rewrite"
    assert compile_format("%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%").format(r) == "/before/rewrite"
    assert compile_format("%REQ(USER-AGENT):4%|%%|%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%").format(
        r) == "curl|%|10.0.0.9"


def test_unknown_operator_is_rejected() -> None:
    with pytest.raises(ValueError, match="NOPE"):
        compile_format("%NOPE%")


@pytest.mark.parametrize(("flags", "text"), [
    ([], "-"), (["UF"], "UF"), (["URX", "UF"], "UF,URX"), (["DI", "FI"], "DI,FI"),
    (["DC", "UH", "UH"], "UH,DC"), (["UAEX"], "UAEX"), (["RL", "NR", "UO"], "UO,NR,RL"),
])
def test_response_flags_in_envoy_order(flags: list[str], text: str) -> None:
    assert flags_text(flags) == text


def test_start_time_format() -> None:
    assert start_time(T0) == "2016-04-15T20:17:00.310Z"
    assert start_time(T0 + 1.005) == "2016-04-15T20:17:01.315Z"


def test_tcp_record() -> None:
    r = TcpRecord("virtualOutbound", ("10.0.0.5", 40000), ("10.0.0.9", 5555))
    r.start_wall = T0
    r.cluster_name = "outbound|3306||mysql.db.svc.cluster.local"
    r.upstream_host = "10.1.0.3:3306"
    r.bytes_received, r.bytes_sent, r.duration_ms = 120, 4096, 15.2
    line = compile_format(ISTIO_DEFAULT_FORMAT).format(r)
    assert line.startswith('[2016-04-15T20:17:00.310Z] "- - -" 0 - - - "-" 120 4096 15 - "-" "-" "-" "-" '
                           '"10.1.0.3:3306" outbound|3306||mysql.db.svc.cluster.local')
    r.flags.append("UF")
    assert '"- - -" 0 UF ' in compile_format(ISTIO_DEFAULT_FORMAT).format(r)


def test_sink_writes_a_file_off_the_caller(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    al = AccessLog(str(path), ENVOY_DEFAULT_FORMAT)
    for i in range(3):
        al.log(Rec(code=200 + i))  # no running loop: handed off at once
    assert al.flush(5)
    lines = path.read_text().splitlines()
    assert [ln.split('" ')[1].split()[0] for ln in lines] == ["200", "201", "202"]
    al.close()


def test_sink_drops_when_the_writer_is_behind() -> None:
    buf = io.StringIO()
    al = AccessLog(stream=buf, fmt="%RESPONSE_CODE%\n", max_pending_batches=0)
    al.log(Rec())
    assert al.dropped == 1
    assert al.flush(5) and buf.getvalue() == ""
    al.close()


def test_sink_batches_on_the_loop() -> None:
    import asyncio

    buf = io.StringIO()
    al = AccessLog(stream=buf, fmt="%RESPONSE_CODE%\n")

    async def main() -> None:
        for code in (200, 404):
            al.log(Rec(code=code))
        assert buf.getvalue() == ""  # nothing formatted or written inline
        t0 = time.monotonic()
        while buf.getvalue() != "200\n404\n" and time.monotonic() - t0 < 5:
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert buf.getvalue() == "200\n404\n"
    al.close()
