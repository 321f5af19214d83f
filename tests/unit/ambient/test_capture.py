"""The in-pod ztunnel redirection rules (``capture/ambient.py``): golden text, and the
orderings that make the design work, checked on the replayed rules."""

from __future__ import annotations

import pytest

from isthmus.capture import RecordingExecutor, apply_ruleset, cleanup_ruleset, render_plan
from isthmus.capture.ambient import AmbientCaptureConfig, build_ambient_rules
from isthmus.capture.render import render_restore
from isthmus.capture.rules import Family, parse_rules_text

from .helpers import GOLDEN

CASES = {
    "capture-default": AmbientCaptureConfig(),
    "capture-ipv6-excludes": AmbientCaptureConfig(enable_ipv6=True, exclude_inbound_ports=(15021,),
                                                  exclude_outbound_ports=(53,)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_capture_golden(case: str) -> None:
    import os

    text = render_plan(build_ambient_rules(CASES[case]))
    path = GOLDEN / f"{case}.golden"
    if os.environ.get("REFRESH_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()


def _chain(table: str, chain: str) -> list[str]:
    parsed = parse_rules_text(render_restore(build_ambient_rules(), Family.V4))
    return [" ".join(r) for r in parsed[table].rules(chain)]


def test_outbound_is_tproxied_to_15001_on_loopback_with_the_seed_mark() -> None:
    out = _chain("mangle", "ISTIO_ZT_OUTPUT")
    assert out[-1] == "-p tcp -j MARK --set-xmark 0x100/0x100"
    prert = _chain("mangle", "ISTIO_ZT_PRERT")
    tproxy = [r for r in prert if "--on-port 15001" in r]
    assert tproxy == [("-i lo -p tcp -m mark --mark 0x100/0x100 -j TPROXY --on-port 15001 "
                      "--on-ip 127.0.0.1 --tproxy-mark 0x100/0x100")]
    rs = build_ambient_rules()
    assert [(r.mark, r.table) for r in rs.routes] == [(0x100, 100)]


def test_order_of_prerouting() -> None:
    prert = _chain("mangle", "ISTIO_ZT_PRERT")
    idx = {k: next(i for i, r in enumerate(prert) if k in r) for k in
           ("0x539", "--transparent", "--on-port 15001", "ESTABLISHED", "--on-port 15008", "--on-port 15006")}
    # ztunnel's own mark (0x539 has the 0x100 bit) leaves before anything matches 0x100
    assert idx["0x539"] == 0
    # replies and pre-enrolment flows are not taken over; HBONE before plaintext
    assert idx["--on-port 15001"] < idx["ESTABLISHED"] < idx["--on-port 15008"] < idx["--on-port 15006"]


def test_kube_proxy_dnat_skipped_for_diverted_packets() -> None:
    nat = _chain("nat", "OUTPUT")
    assert nat == ["-p tcp -m mark --mark 0x100/0xfff -m comment --comment isthmus-ambient -j ACCEPT"]
    rs = build_ambient_rules()
    (chain,) = [c for t in rs.ipv4 if t.name == "nat" for c in t.chains]
    assert chain.head and not chain.tail  # inserted at the top: before ISTHMUS-SERVICES


def test_apply_and_cleanup_through_an_executor() -> None:
    rs = build_ambient_rules()
    ex = RecordingExecutor(simulate=True)
    apply_ruleset(rs, ex)
    prert = [" ".join(r) for r in ex.state[Family.V4]["mangle"].rules("ISTIO_ZT_PRERT")]
    assert any("--on-port 15006" in r for r in prert)
    assert ex.ip_rules and ex.ip_routes
    apply_ruleset(rs, ex)  # idempotent: re-enrolling changes nothing
    assert [" ".join(r) for r in ex.state[Family.V4]["mangle"].rules("ISTIO_ZT_PRERT")] == prert
    cleanup_ruleset(rs, ex)  # un-enrolment removes exactly ours
    assert not ex.state[Family.V4]["mangle"].rules("PREROUTING")
    assert "ISTIO_ZT_PRERT" not in ex.state[Family.V4]["mangle"].chains


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="not a TCP port"):
        AmbientCaptureConfig(outbound_port=0)
    with pytest.raises(ValueError, match="must differ"):
        AmbientCaptureConfig(divert_mark=0x539)
