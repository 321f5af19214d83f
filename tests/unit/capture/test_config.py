"""CaptureConfig: defaults, parsing of flag strings and env, and errors that name the flag."""

from __future__ import annotations

import pytest

from isthmus.capture import BARE, DEFAULT, FLAGS, CaptureConfig, CaptureConfigError
from isthmus.capture.config import InterceptionMode


def test_defaults_are_the_injected_sidecar() -> None:
    c = CaptureConfig()
    assert (c.envoy_port, c.inbound_capture_port, c.inbound_tunnel_port) == (15001, 15006, 15008)
    assert c.proxy_uid == ("1337",) and c.proxy_gid == ("1337",)
    assert c.inbound_interception_mode is InterceptionMode.REDIRECT
    assert c.inbound_ports == "*" and c.outbound_ip_ranges_include == "*"
    assert c.local_exclude_ports == (15090, 15021, 15020)
    assert (c.inbound_tproxy_mark, c.inbound_tproxy_route_table) == (1337, 133)
    assert c.host_ipv4_loopback_cidr == "127.0.0.1/32"
    assert BARE.inbound_ports == () and BARE.outbound_ip_ranges_include == ()


def test_loose_values_are_normalised() -> None:
    c = CaptureConfig(inbound_ports="80, 443,", proxy_uid="3,4", outbound_ip_ranges_include=
                      ["10.0.0.0/8", "fd00::1"], inbound_interception_mode="tproxy")
    assert c.inbound_ports == (80, 443)
    assert c.proxy_uid == ("3", "4")
    assert c.outbound_ip_ranges_include == ("10.0.0.0/8", "fd00::1/128")
    assert c.tproxy
    assert CaptureConfig(inbound_ports="").inbound_ports == ()


@pytest.mark.parametrize(("field", "value", "flag"), [
    ("inbound_ports", "80,http", "--inbound-ports (-b)"),
    ("local_exclude_ports", "0", "--local-exclude-ports (-d)"),
    ("outbound_ports", "65536", "--outbound-ports (-q)"),
    ("local_outbound_ports_exclude", "*", "--local-outbound-ports-exclude (-o)"),
    ("envoy_port", "abc", "--envoy-port (-p)"),
    ("outbound_ip_ranges_include", "10.0.0.0/33", "--outbound-ip-ranges-include (-i)"),
    ("outbound_ip_ranges_include", "10.0.0.0/8,*", "--outbound-ip-ranges-include (-i)"),
    ("outbound_ip_ranges_exclude", "*", "--outbound-ip-ranges-exclude (-x)"),
    ("outbound_ip_ranges_exclude", "not-an-ip", "--outbound-ip-ranges-exclude (-x)"),
    ("inbound_interception_mode", "NAT", "--inbound-interception-mode (-m)"),
    ("inbound_tproxy_mark", "0", "--inbound-tproxy-mark (-t)"),
    ("inbound_tproxy_route_table", "x", "--inbound-tproxy-route-table (-r)"),
    ("kube_virt_interfaces", "eth0;rm", "--kube-virt-interfaces (-k)"),
    ("proxy_uid", "", "--proxy-uid (-u)"),
    ("host_ipv4_loopback_cidr", "::1/128", "--host-ipv4-loopback-cidr"),
    ("dns_servers_v4", ("fd00::1",), "--dns-servers"),
])
def test_bad_values_name_the_flag(field: str, value: object, flag: str) -> None:
    with pytest.raises(CaptureConfigError) as err:
        CaptureConfig(**{field: value})
    assert str(err.value).startswith(flag + ":"), str(err.value)


def test_from_strings_precedence_flag_env_default() -> None:
    env = {"ENVOY_PORT": "16001", "ISTIO_INBOUND_PORTS": "9080", "PROXY_UID": "7"}
    c = CaptureConfig.from_strings({"envoy_port": "17001"}, env=env)
    assert c.envoy_port == 17001  # flag beats env
    assert c.inbound_ports == (9080,)  # env beats default
    assert c.proxy_uid == ("7",) and c.proxy_gid == ("7",)  # gid follows uid
    assert c.inbound_capture_port == 15006  # default
    c2 = CaptureConfig.from_strings({"proxy_uid": "7", "proxy_gid": "8"}, env={})
    assert (c2.proxy_uid, c2.proxy_gid) == (("7",), ("8",))


def test_empty_flag_values_disable_capture_like_istio() -> None:
    c = CaptureConfig.from_strings({"inbound_ports": "", "outbound_ip_ranges_include": "",
                                    "local_exclude_ports": ""}, env={})
    assert c == BARE


def test_dns_servers_come_from_flag_or_resolv_conf() -> None:
    c = CaptureConfig.from_strings({"redirect_dns": True, "dns_servers": "10.96.0.10,fd00::a"},
                                   env={})
    assert (c.dns_servers_v4, c.dns_servers_v6) == (("10.96.0.10",), ("fd00::a",))
    c = CaptureConfig.from_strings({"redirect_dns": True}, env={},
                                   read_resolv_conf=lambda: ("127.0.0.53",))
    assert c.dns_servers_v4 == ("127.0.0.53",) and c.dns_capture_enabled
    c = CaptureConfig.from_strings({"redirect_dns": True, "capture_all_dns": True}, env={},
                                   read_resolv_conf=lambda: pytest.fail("must not read"))
    assert c.dns_capture_enabled and c.dns_servers_v4 == ()
    # redirect without any server and without capture-all: DNS capture is off (istio-iptables)
    c = CaptureConfig.from_strings({"redirect_dns": True}, env={}, read_resolv_conf=lambda: ())
    assert not c.dns_capture_enabled


def test_env_booleans() -> None:
    c = CaptureConfig.from_strings({}, env={"ISTIO_META_DNS_CAPTURE": "true",
                                            "CAPTURE_ALL_DNS": "1", "INVALID_DROP": "yes"})
    assert c.redirect_dns and c.capture_all_dns and c.drop_invalid
    with pytest.raises(CaptureConfigError, match="--drop-invalid"):
        CaptureConfig.from_strings({}, env={"INVALID_DROP": "maybe"})


def test_to_flags_round_trips() -> None:
    c = DEFAULT.replace(inbound_interception_mode="TPROXY", redirect_dns=True,
                        dns_servers_v4=("10.0.0.10",), kube_virt_interfaces="eth1",
                        proxy_gid="2")
    argv = c.to_flags()
    values: dict[str, str | bool] = {}
    by_long = {f.long: f for f in FLAGS}
    for arg in argv:
        name, _, value = arg[2:].partition("=")
        flag = by_long[name]
        values[flag.field] = True if flag.is_bool else value
    assert CaptureConfig.from_strings(values, env={}) == c
