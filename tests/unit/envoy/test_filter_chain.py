"""Filter chain selection per Envoy's filter_chain_match order, and listener hand-off."""

from __future__ import annotations

import pytest

from isthmus.dataplane.envoy import ConfigRejected
from isthmus.dataplane.envoy.filter_chain import ConnectionInfo, FilterChainMatcher
from isthmus.dataplane.envoy.listener_selection import ListenerAddress, ListenerIndex

from ._util import listener


def cidr(p):
    a, n = p.split("/")
    return {"address_prefix": a, "prefix_len": int(n)}


def matcher(chains, default=True):
    d = {"name": "l", "filter_chains": [{"name": n, "filter_chain_match": m} for n, m in chains]}
    if default:
        d["default_filter_chain"] = {"name": "default"}
    return FilterChainMatcher.from_listener(listener(d))


def conn(dst="10.0.0.1", dport=80, src="10.9.9.9", sport=5000, **kw):
    return ConnectionInfo(dst, dport, src, sport, **kw)


CHAINS = [
    ("port-9080-tls-istio", {"destination_port": 9080, "transport_protocol": "tls",
                             "application_protocols": ["istio", "istio-peer-exchange"]}),
    ("port-9080-raw", {"destination_port": 9080, "transport_protocol": "raw_buffer"}),
    ("ip-10/8", {"prefix_ranges": [cidr("10.0.0.0/8")]}),
    ("ip-10.1/16", {"prefix_ranges": [cidr("10.1.0.0/16")]}),
    ("sni-exact", {"prefix_ranges": [cidr("192.168.0.0/16")], "server_names": ["a.example.com"]}),
    ("sni-wild", {"prefix_ranges": [cidr("192.168.0.0/16")], "server_names": ["*.example.com"]}),
    ("sni-wild-short", {"prefix_ranges": [cidr("192.168.0.0/16")], "server_names": ["*.com"]}),
    ("sni-none", {"prefix_ranges": [cidr("192.168.0.0/16")]}),
    ("src-local", {"prefix_ranges": [cidr("172.16.0.0/12")], "source_type": "SAME_IP_OR_LOOPBACK"}),
    ("src-range", {"prefix_ranges": [cidr("172.16.0.0/12")],
                   "source_prefix_ranges": [cidr("172.20.0.0/16")]}),
    ("src-port", {"prefix_ranges": [cidr("172.16.0.0/12")],
                  "source_prefix_ranges": [cidr("172.20.0.0/16")], "source_ports": [1234]}),
    ("src-any", {"prefix_ranges": [cidr("172.16.0.0/12")]}),
    ("alpn-h2", {"prefix_ranges": [cidr("100.64.0.0/10")], "application_protocols": ["h2"]}),
    ("alpn-none", {"prefix_ranges": [cidr("100.64.0.0/10")]}),
    ("v6", {"prefix_ranges": [cidr("fd00::/8")]}),
    ("catch-all", {}),
]


@pytest.mark.parametrize("c,expected", [
    (conn(dport=9080, transport_protocol="tls", alpn=("istio",)), "port-9080-tls-istio"),
    (conn(dport=9080, transport_protocol="tls", alpn=("h2", "istio-peer-exchange")),
     "port-9080-tls-istio"),
    (conn(dport=9080), "port-9080-raw"),
    # A specific port subtree exists but nothing under it matches: default, not catch-all.
    (conn(dport=9080, transport_protocol="tls", alpn=("h2",)), "default"),
    (conn(dst="10.2.3.4"), "ip-10/8"),
    (conn(dst="10.1.3.4"), "ip-10.1/16"),  # longest prefix
    (conn(dst="11.0.0.1"), "catch-all"),
    (conn(dst="192.168.1.1", sni="a.example.com"), "sni-exact"),
    (conn(dst="192.168.1.1", sni="b.example.com"), "sni-wild"),
    (conn(dst="192.168.1.1", sni="x.y.example.com"), "sni-wild"),
    (conn(dst="192.168.1.1", sni="example.com"), "sni-wild-short"),
    (conn(dst="192.168.1.1", sni="other.org"), "sni-none"),
    (conn(dst="192.168.1.1"), "sni-none"),
    (conn(dst="172.16.0.5", src="127.0.0.1"), "src-local"),
    (conn(dst="172.16.0.5", src="172.16.0.5"), "src-local"),  # same IP counts as local
    (conn(dst="172.16.0.5", src="172.20.1.1", sport=1234), "src-port"),
    (conn(dst="172.16.0.5", src="172.20.1.1", sport=999), "src-range"),
    (conn(dst="172.16.0.5", src="8.8.8.8"), "src-any"),
    (conn(dst="100.64.0.1", transport_protocol="tls", alpn=("http/1.1", "h2")), "alpn-h2"),
    (conn(dst="100.64.0.1", alpn=("http/1.1",)), "alpn-none"),
    (conn(dst="fd00::1", src="fd00::2"), "v6"),
    (conn(dst="2001:db8::1", src="fd00::2"), "catch-all"),
])
def test_selection(c, expected):
    ref = matcher(CHAINS).select(c)
    assert ref is not None and ref.name == expected
    if expected == "default":
        assert ref.is_default and ref.index == -1
    else:
        assert CHAINS[ref.index][0] == expected


def test_no_match_without_default_is_none():
    m = matcher([("only", {"destination_port": 443})], default=False)
    assert m.select(conn(dport=80)) is None
    assert m.select(conn(dport=443)).name == "only"


def test_source_type_external_branch():
    m = matcher([("ext", {"source_type": "EXTERNAL"}), ("any", {"server_names": ["x.com"]})])
    assert m.select(conn(src="8.8.8.8")).name == "ext"
    # A local connection: no LOCAL branch, so ANY, where only the x.com chain lives.
    assert m.select(conn(src="127.0.0.1")).name == "default"


def test_direct_source_prefix():
    m = matcher([("proxy", {"direct_source_prefix_ranges": [cidr("10.0.0.0/8")]}),
                 ("rest", {})])
    assert m.select(conn(src="1.2.3.4", direct_src_ip="10.0.0.9")).name == "proxy"
    assert m.select(conn(src="10.0.0.9", direct_src_ip="1.2.3.4")).name == "rest"


@pytest.mark.parametrize("chains,msg", [
    ([("a", {"destination_port": 80}), ("b", {"destination_port": 80})], "overlapping"),
    ([("a", {"server_names": ["a.com", "b.com"]}), ("b", {"server_names": ["b.com"]})],
     "overlapping"),
    ([("a", {"server_names": ["foo*.com"]})], "partial wildcards"),
    ([("a", {"address_suffix": "x"})], "address_suffix"),
])
def test_rejections(chains, msg):
    with pytest.raises(ConfigRejected, match=msg) as e:
        matcher(chains)
    assert e.value.resource_name == "l"


def test_listener_hand_off():
    idx = ListenerIndex([
        ListenerAddress("virtualOutbound", "0.0.0.0", 15001),
        ListenerAddress("10.96.0.10_9080", "10.96.0.10", 9080),
        ListenerAddress("0.0.0.0_9080", "0.0.0.0", 9080),
        ListenerAddress("0.0.0.0_8080", "::", 8080, ipv4_compat=True),
        ListenerAddress("[::]_7070", "::", 7070),
    ])
    assert idx.select("10.96.0.10", 9080, "virtualOutbound") == "10.96.0.10_9080"
    assert idx.select("10.96.0.11", 9080, "virtualOutbound") == "0.0.0.0_9080"
    assert idx.select("10.96.0.11", 8080, "virtualOutbound") == "0.0.0.0_8080"  # dual stack
    assert idx.select("10.96.0.11", 7070, "virtualOutbound") is None  # v6-only wildcard
    assert idx.select("fd00::1", 7070, "virtualOutbound") == "[::]_7070"
    assert idx.select("1.2.3.4", 443, "virtualOutbound") is None  # passthrough
    assert idx.select("0.0.0.0", 15001, "virtualOutbound") is None  # never to itself


def test_listener_index_from_protos():
    ls = [listener({"name": "virtualOutbound", "address": {"socket_address": {
              "address": "0.0.0.0", "port_value": 15001}}, "use_original_dst": True}),
          listener({"name": "0.0.0.0_80", "address": {"socket_address": {
              "address": "0.0.0.0", "port_value": 80}}, "bind_to_port": False})]
    assert ListenerIndex.from_listeners(ls).select("10.0.0.1", 80, "virtualOutbound") == \
        "0.0.0.0_80"
