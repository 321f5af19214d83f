"""CaptureConfig: every istio-iptables flag as one frozen, validated value.

The first stage of the capture pipeline (``CaptureConfig`` -> ``RuleSet`` -> iptables-restore
text -> ``Executor``). Field names follow istio-iptables' long flag names; ``FLAGS`` is the
single table of short flag, long flag(s), environment variable and default that both the CLI
(``isthmus.cli.iptables``) and ``CaptureConfig.from_strings`` read, so the two cannot drift.

Defaults are those the sidecar injector passes to ``istio-iptables`` for an ordinary pod
(``-p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x '' -b '*' -d 15090,15021,15020``), so
``CaptureConfig()`` is the bookinfo sidecar. ``BARE`` is istio-iptables with no flags at all
(nothing captured but the fixed rules), which is what Istio's own golden tests start from.

Errors name the flag to fix: ``--outbound-ip-ranges-include (-i): '10.0.0.300/8' is not
an IP range (CIDR)``.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields, replace
from enum import Enum
from typing import Any, Literal

from isthmus.core.errors import IsthmusError

WILDCARD: Literal["*"] = "*"

Ports = tuple[int, ...]
PortsOrAll = tuple[int, ...] | Literal["*"]
Cidrs = tuple[str, ...]
CidrsOrAll = tuple[str, ...] | Literal["*"]
NamesOrAll = tuple[str, ...] | Literal["*"]


class CaptureConfigError(IsthmusError):
    """A capture flag has an invalid value; the message names the flag."""


class InterceptionMode(str, Enum):
    REDIRECT = "REDIRECT"
    TPROXY = "TPROXY"


@dataclass(frozen=True, slots=True)
class Flag:
    """How one CaptureConfig field is spelled on the command line and in the environment."""

    field: str
    long: str  # primary long flag, without dashes
    short: str = ""  # one letter, without dash
    env: str = ""
    aliases: tuple[str, ...] = ()  # further long names (istio-iptables' own spellings)
    help: str = ""
    is_bool: bool = False

    @property
    def label(self) -> str:
        return f"--{self.long}" + (f" (-{self.short})" if self.short else "")


# The order here is the order of `isthmus iptables --help`.
FLAGS: tuple[Flag, ...] = (
    Flag("envoy_port", "envoy-port", "p", "ENVOY_PORT",
         help="Port to which all outbound TCP traffic is redirected (default 15001)"),
    Flag("inbound_capture_port", "inbound-capture-port", "z", "INBOUND_CAPTURE_PORT",
         help="Port to which all inbound TCP traffic is redirected (default 15006)"),
    Flag("inbound_tunnel_port", "inbound-tunnel-port", "e", "INBOUND_TUNNEL_PORT",
         help="HBONE tunnel port never captured inbound (default 15008)"),
    Flag("proxy_uid", "proxy-uid", "u", "PROXY_UID",
         help="Comma separated UIDs whose traffic is not captured (the proxy; default 1337)"),
    Flag("proxy_gid", "proxy-gid", "g", "PROXY_GID",
         help="Comma separated GIDs whose traffic is not captured (default: same as -u)"),
    Flag("inbound_interception_mode", "inbound-interception-mode", "m",
         "ISTIO_INBOUND_INTERCEPTION_MODE", ("istio-inbound-interception-mode",),
         help="How inbound connections reach the proxy: REDIRECT or TPROXY"),
    Flag("inbound_tproxy_mark", "inbound-tproxy-mark", "t", "ISTIO_INBOUND_TPROXY_MARK",
         ("istio-inbound-tproxy-mark",), help="fwmark for TPROXY-captured packets (default 1337)"),
    Flag("inbound_tproxy_route_table", "inbound-tproxy-route-table", "r",
         "ISTIO_INBOUND_TPROXY_ROUTE_TABLE", ("istio-inbound-tproxy-route-table",),
         help="Routing table for the TPROXY policy route (default 133)"),
    Flag("inbound_ports", "inbound-ports", "b", "ISTIO_INBOUND_PORTS", ("istio-inbound-ports",),
         help="Comma separated inbound ports to capture; '*' for all, empty for none"),
    Flag("local_exclude_ports", "local-exclude-ports", "d", "ISTIO_LOCAL_EXCLUDE_PORTS",
         ("istio-local-exclude-ports",),
         help="Comma separated inbound ports not captured (only with -b '*')"),
    Flag("outbound_ports", "outbound-ports", "q", "ISTIO_OUTBOUND_PORTS",
         ("istio-outbound-ports",),
         help="Comma separated outbound ports always captured, whatever the destination"),
    Flag("local_outbound_ports_exclude", "local-outbound-ports-exclude", "o",
         "ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE", ("istio-local-outbound-ports-exclude",),
         help="Comma separated outbound ports never captured"),
    Flag("outbound_ip_ranges_include", "outbound-ip-ranges-include", "i", "ISTIO_SERVICE_CIDR",
         ("istio-service-cidr",),
         help="Comma separated CIDRs captured outbound; '*' for all, empty for none"),
    Flag("outbound_ip_ranges_exclude", "outbound-ip-ranges-exclude", "x",
         "ISTIO_SERVICE_EXCLUDE_CIDR", ("istio-service-exclude-cidr",),
         help="Comma separated CIDRs never captured outbound"),
    Flag("kube_virt_interfaces", "kube-virt-interfaces", "k", "KUBE_VIRT_INTERFACES",
         help="Comma separated interfaces whose inbound traffic is treated as outbound"),
    Flag("exclude_interfaces", "exclude-interfaces", "c", "ISTIO_EXCLUDE_INTERFACES",
         ("istio-exclude-interfaces",),
         help="Comma separated interfaces whose traffic is never captured"),
    Flag("redirect_dns", "redirect-dns", "", "ISTIO_META_DNS_CAPTURE", is_bool=True,
         help="Capture DNS (port 53) to the agent's DNS proxy on 15053"),
    Flag("capture_all_dns", "capture-all-dns", "", "CAPTURE_ALL_DNS", is_bool=True,
         help="With --redirect-dns: capture all port-53 traffic, not only to --dns-servers"),
    Flag("dns_servers", "dns-servers", "", "ISTIO_DNS_SERVERS",
         help="Comma separated DNS server IPs to capture (default: from /etc/resolv.conf)"),
    Flag("drop_invalid", "drop-invalid", "", "INVALID_DROP", is_bool=True,
         help="Drop packets conntrack marks INVALID instead of resetting the connection"),
    Flag("outbound_owner_groups", "outbound-owner-groups", "", "ISTIO_OUTBOUND_OWNER_GROUPS",
         help="Comma separated groups (names or GIDs) whose outbound traffic is captured; '*' all"),
    Flag("outbound_owner_groups_exclude", "outbound-owner-groups-exclude", "",
         "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE",
         help="Comma separated groups whose outbound traffic is not captured (with groups '*')"),
    Flag("host_ipv4_loopback_cidr", "host-ipv4-loopback-cidr", "",
         "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR",
         help="IPv4 loopback range used by apps in the pod (default 127.0.0.1/32)"),
    Flag("enable_ipv6", "ipv6", "", "ISTIO_AGENT_DUAL_STACK", ("dual-stack",), is_bool=True,
         help="Also program ip6tables"),
)

FLAGS_BY_FIELD: dict[str, Flag] = {f.field: f for f in FLAGS}


def _label(field_name: str) -> str:
    flag = FLAGS_BY_FIELD.get(field_name)
    return flag.label if flag else field_name


def _fail(field_name: str, message: str) -> CaptureConfigError:
    return CaptureConfigError(f"{_label(field_name)}: {message}")


# ---------------------------------------------------------------- parsing helpers


def split_list(value: str) -> list[str]:
    """istio-iptables' split: comma separated, surrounding spaces and empty items dropped."""
    return [item.strip() for item in value.split(",") if item.strip()]


def _port(field_name: str, item: Any) -> int:
    text = str(item).strip()
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise _fail(field_name, f"{item!r} is not a port number (1-65535)")
    return int(text)


def _ports(field_name: str, value: str | Iterable[Any], allow_all: bool = False) -> Any:
    items = split_list(value) if isinstance(value, str) else [str(v) for v in value]
    if items == [WILDCARD] and allow_all:
        return WILDCARD
    if WILDCARD in items:
        raise _fail(field_name, "'*' is not allowed here" if not allow_all
                    else "'*' must be the only item")
    return tuple(_port(field_name, item) for item in items)


def _cidr(field_name: str, item: str) -> str:
    """Validate an IP range; keep the user's spelling of the address (as istio-iptables does)."""
    text = item.strip()
    try:
        if "/" in text:
            ipaddress.ip_network(text, strict=False)
            return text
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise _fail(field_name, f"{item!r} is not an IP range (CIDR, e.g. 10.0.0.0/8)") from None
    return f"{text}/{addr.max_prefixlen}"


def _cidrs(field_name: str, value: str | Iterable[str], allow_all: bool = False) -> Any:
    items = split_list(value) if isinstance(value, str) else [str(v) for v in value]
    if items == [WILDCARD]:
        if allow_all:
            return WILDCARD
        raise _fail(field_name, "'*' is not allowed here (it would exclude everything)")
    if WILDCARD in items:
        raise _fail(field_name, "'*' must be the only item")
    return tuple(_cidr(field_name, item) for item in items)


_NAME = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.-]*$")


def _names(field_name: str, value: str | Iterable[str], what: str, allow_all: bool = False) -> Any:
    items = split_list(value) if isinstance(value, str) else [str(v) for v in value]
    if items == [WILDCARD] and allow_all:
        return WILDCARD
    for item in items:
        if not _NAME.match(item):
            raise _fail(field_name, f"{item!r} is not a valid {what}")
    return tuple(items)


def _ip(field_name: str, item: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(item.strip())
    except ValueError:
        raise _fail(field_name, f"{item!r} is not an IP address") from None


def _bool(field_name: str, value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    text = value.strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("", "0", "false", "no", "off"):
        return False
    raise _fail(field_name, f"{value!r} is not a boolean (true/false)")


def _int(field_name: str, value: str | int, lo: int, hi: int, what: str) -> int:
    text = str(value).strip()
    if not text.isdigit() or not lo <= int(text) <= hi:
        raise _fail(field_name, f"{value!r} is not {what} ({lo}-{hi})")
    return int(text)


def split_dns_servers(servers: Iterable[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Split DNS server addresses into (IPv4, IPv6), keeping the user's spelling."""
    v4: list[str] = []
    v6: list[str] = []
    for server in servers:
        addr = _ip("dns_servers", server)
        (v4 if addr.version == 4 else v6).append(server.strip())
    return tuple(v4), tuple(v6)


def resolv_conf_servers(path: str = "/etc/resolv.conf") -> tuple[str, ...]:
    """Nameservers listed in resolv.conf (what istio-iptables captures with --redirect-dns)."""
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except OSError as exc:
        raise CaptureConfigError(
            f"--redirect-dns needs DNS servers: cannot read {path} ({exc}); "
            "pass --dns-servers or --capture-all-dns") from None
    servers = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            servers.append(parts[1].split("%")[0])
    return tuple(servers)


# ---------------------------------------------------------------- the config


@dataclass(frozen=True, slots=True)
class CaptureConfig:
    """All istio-iptables flags, parsed and validated (see module docstring for defaults)."""

    envoy_port: int = 15001
    inbound_capture_port: int = 15006
    inbound_tunnel_port: int = 15008
    proxy_uid: tuple[str, ...] = ("1337",)
    proxy_gid: tuple[str, ...] = ("1337",)
    inbound_interception_mode: InterceptionMode = InterceptionMode.REDIRECT
    inbound_tproxy_mark: int = 1337
    inbound_tproxy_route_table: int = 133
    inbound_ports: PortsOrAll = WILDCARD
    local_exclude_ports: Ports = (15090, 15021, 15020)
    outbound_ports: Ports = ()
    local_outbound_ports_exclude: Ports = ()
    outbound_ip_ranges_include: CidrsOrAll = WILDCARD
    outbound_ip_ranges_exclude: Cidrs = ()
    kube_virt_interfaces: tuple[str, ...] = ()
    exclude_interfaces: tuple[str, ...] = ()
    redirect_dns: bool = False
    capture_all_dns: bool = False
    dns_servers_v4: tuple[str, ...] = ()
    dns_servers_v6: tuple[str, ...] = ()
    drop_invalid: bool = False
    outbound_owner_groups: NamesOrAll = WILDCARD
    outbound_owner_groups_exclude: tuple[str, ...] = ()
    host_ipv4_loopback_cidr: str = "127.0.0.1/32"
    enable_ipv6: bool = False

    def __post_init__(self) -> None:
        # Normalise loosely typed input (lists, strings) into the declared shapes, so a
        # config built in code is validated exactly like one parsed from flags.
        set_ = object.__setattr__
        set_(self, "inbound_interception_mode", _mode(self.inbound_interception_mode))
        for name in ("envoy_port", "inbound_capture_port", "inbound_tunnel_port"):
            set_(self, name, _port(name, getattr(self, name)))
        set_(self, "inbound_tproxy_mark",
             _int("inbound_tproxy_mark", self.inbound_tproxy_mark, 1, 2**32 - 1, "a fwmark"))
        set_(self, "inbound_tproxy_route_table",
             _int("inbound_tproxy_route_table", self.inbound_tproxy_route_table, 1,
                  2**32 - 1, "a routing table id"))
        set_(self, "inbound_ports", _ports("inbound_ports", self.inbound_ports, allow_all=True))
        for name in ("local_exclude_ports", "outbound_ports", "local_outbound_ports_exclude"):
            set_(self, name, _ports(name, getattr(self, name)))
        set_(self, "outbound_ip_ranges_include",
             _cidrs("outbound_ip_ranges_include", self.outbound_ip_ranges_include, True))
        set_(self, "outbound_ip_ranges_exclude",
             _cidrs("outbound_ip_ranges_exclude", self.outbound_ip_ranges_exclude))
        for name in ("kube_virt_interfaces", "exclude_interfaces"):
            set_(self, name, _names(name, getattr(self, name), "interface name"))
        for name in ("proxy_uid", "proxy_gid"):
            value = _names(name, getattr(self, name), "user/group id")
            if not value:
                raise _fail(name, "at least one id is needed (the proxy's)")
            set_(self, name, value)
        set_(self, "outbound_owner_groups",
             _names("outbound_owner_groups", self.outbound_owner_groups, "group", True))
        set_(self, "outbound_owner_groups_exclude",
             _names("outbound_owner_groups_exclude", self.outbound_owner_groups_exclude, "group"))
        for name, version in (("dns_servers_v4", 4), ("dns_servers_v6", 6)):
            servers = tuple(getattr(self, name))
            for server in servers:
                if _ip("dns_servers", server).version != version:
                    raise _fail("dns_servers", f"{server!r} is not an IPv{version} address")
            set_(self, name, servers)
        loop = _cidr("host_ipv4_loopback_cidr", self.host_ipv4_loopback_cidr)
        if ipaddress.ip_network(loop, strict=False).version != 4:
            raise _fail("host_ipv4_loopback_cidr", f"{loop!r} is not an IPv4 range")
        set_(self, "host_ipv4_loopback_cidr", loop)
        for name in ("redirect_dns", "capture_all_dns", "drop_invalid", "enable_ipv6"):
            set_(self, name, _bool(name, getattr(self, name)))

    # -- derived views used by the builder

    @property
    def tproxy(self) -> bool:
        return self.inbound_interception_mode is InterceptionMode.TPROXY

    @property
    def dns_capture_enabled(self) -> bool:
        """istio-iptables disables DNS capture when it would capture nothing."""
        return self.redirect_dns and (
            self.capture_all_dns or bool(self.dns_servers_v4) or bool(self.dns_servers_v6))

    def replace(self, **changes: Any) -> CaptureConfig:
        return replace(self, **changes)

    # -- construction from flag strings / environment

    @classmethod
    def from_strings(
        cls,
        values: Mapping[str, str | bool | None],
        env: Mapping[str, str] | None = None,
        base: CaptureConfig | None = None,
        read_resolv_conf: Callable[[], tuple[str, ...]] = resolv_conf_servers,
    ) -> CaptureConfig:
        """Build from flag values keyed by field name (``None`` = flag not given).

        Precedence: flag, then environment variable, then ``base`` (default: the sidecar
        defaults). ``proxy_gid`` defaults to ``proxy_uid``; with ``redirect_dns`` and no
        explicit servers, servers come from resolv.conf (unless ``capture_all_dns``).
        """
        env = os.environ if env is None else env
        base = base or cls()
        raw: dict[str, str | bool] = {}
        for flag in FLAGS:
            value = values.get(flag.field)
            if value is None and flag.env and flag.env in env:
                value = env[flag.env]
            if value is not None:
                raw[flag.field] = value

        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in raw:
                kwargs[f.name] = raw[f.name]
        if "proxy_uid" in raw and "proxy_gid" not in raw:
            kwargs["proxy_gid"] = raw["proxy_uid"]
        for name in ("proxy_uid", "proxy_gid"):
            if name in kwargs and not split_list(str(kwargs[name])):
                kwargs.pop(name)  # empty means "default", as in istio-iptables
        if "inbound_interception_mode" in kwargs and not str(kwargs["inbound_interception_mode"]):
            kwargs.pop("inbound_interception_mode")

        dns = raw.get("dns_servers")
        redirect = _bool("redirect_dns", kwargs.get("redirect_dns", base.redirect_dns))
        capture_all = _bool("capture_all_dns", kwargs.get("capture_all_dns", base.capture_all_dns))
        if dns is not None:
            kwargs["dns_servers_v4"], kwargs["dns_servers_v6"] = split_dns_servers(
                split_list(str(dns)))
        elif redirect and not capture_all and not (base.dns_servers_v4 or base.dns_servers_v6):
            kwargs["dns_servers_v4"], kwargs["dns_servers_v6"] = split_dns_servers(
                read_resolv_conf())
        return replace(base, **kwargs)

    def to_flags(self) -> list[str]:
        """The istio-iptables command line that reproduces this config (long flags)."""
        out: list[str] = []
        for flag in FLAGS:
            if flag.field == "dns_servers":
                servers = self.dns_servers_v4 + self.dns_servers_v6
                if servers:
                    out.append(f"--dns-servers={','.join(servers)}")
                continue
            value = getattr(self, flag.field)
            if flag.is_bool:
                if value:
                    out.append(f"--{flag.long}")
                continue
            if isinstance(value, InterceptionMode):
                text = value.value
            elif isinstance(value, tuple):
                text = ",".join(str(v) for v in value)
            else:
                text = str(value)
            out.append(f"--{flag.long}={text}")
        return out


def _mode(value: Any) -> InterceptionMode:
    if isinstance(value, InterceptionMode):
        return value
    text = str(value).strip().upper()
    try:
        return InterceptionMode(text)
    except ValueError:
        raise _fail("inbound_interception_mode",
                    f"{value!r} is not an interception mode (REDIRECT or TPROXY)") from None


# istio-iptables run with no flags: nothing captured but the fixed rules.
BARE = CaptureConfig(
    inbound_ports=(),
    local_exclude_ports=(),
    outbound_ip_ranges_include=(),
)

DEFAULT = CaptureConfig()

__all__ = [
    "BARE",
    "DEFAULT",
    "FLAGS",
    "FLAGS_BY_FIELD",
    "WILDCARD",
    "CaptureConfig",
    "CaptureConfigError",
    "Flag",
    "InterceptionMode",
    "resolv_conf_servers",
    "split_dns_servers",
    "split_list",
]
