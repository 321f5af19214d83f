"""Matchers never raise on arbitrary request/connection input."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from isthmus.dataplane.envoy.filter_chain import ConnectionInfo, FilterChainMatcher

from ._util import listener, table

TABLE = table([
    {"name": "a", "domains": ["a.com", "*.b.com", "c.*"], "routes": [
        {"match": {"safe_regex": {"regex": "/r/[a-z]+"}}, "route": {"cluster": "r"}},
        {"match": {"path_separated_prefix": "/p", "case_sensitive": False,
                   "query_parameters": [{"name": "q", "present_match": True}],
                   "headers": [{"name": "x", "range_match": {"start": 0, "end": 9}}]},
         "route": {"cluster": "p"}},
        {"match": {"prefix": "/"}, "redirect": {"prefix_rewrite": "/z", "strip_query": True}},
    ]},
    {"name": "d", "domains": ["*"], "routes": [
        {"match": {"prefix": "/"}, "route": {"cluster": "d", "regex_rewrite": {
            "pattern": {"regex": "(.)"}, "substitution": "\\1\\1"}}}]},
], ignore_port_in_host_matching=True)

MATCHER = FilterChainMatcher.from_listener(listener({"name": "l", "filter_chains": [
    {"name": "a", "filter_chain_match": {"destination_port": 80, "server_names": ["*.x.io"]}},
    {"name": "b", "filter_chain_match": {"source_type": "EXTERNAL", "source_ports": [1]}},
    {"name": "c", "filter_chain_match": {"application_protocols": ["h2"]}},
]}))

text = st.text(max_size=40)


@settings(max_examples=300, deadline=None)
@given(authority=text, path=text.map(lambda s: "/" + s), header=text,
       rv=st.integers(0, 2**64 - 1))
def test_route_match_total(authority, path, header, rv):
    d = TABLE.match(authority, path, headers={"x": header}, random_value=rv)
    assert d is not None  # '*' catches everything
    assert d.cluster in (None, "r", "p", "d")


ips = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str)


@settings(max_examples=300, deadline=None)
@given(dst=ips, src=ips, dport=st.integers(0, 65535), sport=st.integers(0, 65535),
       sni=text, alpn=st.lists(text, max_size=3))
def test_filter_chain_select_total(dst, src, dport, sport, sni, alpn):
    ref = MATCHER.select(ConnectionInfo(dst, dport, src, sport, sni=sni, alpn=tuple(alpn)))
    if ref is not None:
        assert ref.name in ("a", "b", "c")


@settings(max_examples=100, deadline=None)
@given(dst=ips, src=ips, label=st.from_regex(r"[a-z0-9-]{1,10}(\.[a-z0-9-]{1,10})?", fullmatch=True))
def test_wildcard_sni_always_wins_on_its_port(dst, src, label):
    ref = MATCHER.select(ConnectionInfo(dst, 80, src, 1, sni=f"{label}.x.io"))
    assert ref is not None and ref.name == "a"
