"""Capture with real iptables in throwaway network namespaces (root only).

Topology per test, all inside namespaces this file creates (the host's rules are never
touched):

    [pod ns] 10.250.N.2/24 --veth-- 10.250.N.1/24, 10.250.N.3/24 [peer ns]

In the pod: the capture rules, "proxy" listeners on 15001/15006 that answer with the
original destination they recover (SO_ORIGINAL_DST, or the local address under TPROXY
with IP_TRANSPARENT), and "app" servers. In the peer: "peer" servers. Every server answers
one line ``<tag> <host>:<port>`` and closes, so a client learns who answered and for what
destination. Clients run as chosen UID/GIDs (the app as 1000, the proxy as 1337).
"""

from __future__ import annotations

import json
import os
import random
import re
import selectors
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from isthmus.capture import (
    CaptureConfig,
    SubprocessExecutor,
    apply_ruleset,
    build_sidecar_rules,
    cleanup_ruleset,
)

pytestmark = [pytest.mark.root, pytest.mark.netns, pytest.mark.timeout(90)]

APP_UID = 1000
PROXY_UID = 1337

# A server: listen, print "ready", answer each connection with "<tag> <dst>" and close.
SERVER_SRC = r"""
import socket, sys
from isthmus.dataplane.io.sockopts import local_dst, recover_original_dst, set_transparent
port, mode, tag = int(sys.argv[1]), sys.argv[2], sys.argv[3]
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)  # dual-stack: IPv4 and IPv6
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if mode == "tproxy":
    set_transparent(s)
s.bind(("::", port))
s.listen(64)
print("ready", flush=True)
while True:
    conn, _ = s.accept()
    try:
        if mode == "plain":
            host, dport = local_dst(conn)
        else:
            host, dport = recover_original_dst(conn, tproxy=(mode == "tproxy"))
        conn.sendall(f"{tag} {host}:{dport}\n".encode())
    except OSError as exc:
        conn.sendall(f"{tag} error {exc}\n".encode())
    finally:
        conn.close()
"""

# A client: drop to uid/gid, connect to each target ([src@]host:port), print JSON replies.
CLIENT_SRC = r"""
import encodings.idna, json, os, socket, sys  # import all before losing read access
uid, gid = int(sys.argv[1]), int(sys.argv[2])
os.setgroups([])
os.setgid(gid)
os.setuid(uid)
out = {}
for target in sys.argv[3:]:
    src, _, dst = target.rpartition("@")
    host, port = dst.rsplit(":", 1)
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as c:
            c.settimeout(3)
            if src:
                c.bind((src, 0))
            c.connect((host, int(port)))
            data = b""
            while not data.endswith(b"\n"):
                chunk = c.recv(256)
                if not chunk:
                    break
                data += chunk
        out[target] = data.decode().strip()
    except OSError as exc:
        out[target] = f"ERR {type(exc).__name__}: {exc}"
print(json.dumps(out))
"""


def sh(*argv: str, input: str | None = None, check: bool = True,
       timeout: float = 15) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), input=input, capture_output=True, text=True,
                          timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr}")
    return proc


@dataclass
class Net:
    pod: str
    peer: str
    subnet: int
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    @property
    def pod_ip(self) -> str:
        return f"10.250.{self.subnet}.2"

    @property
    def peer_ip(self) -> str:
        return f"10.250.{self.subnet}.1"

    @property
    def peer_ip2(self) -> str:
        return f"10.250.{self.subnet}.3"

    @property
    def pod_ip6(self) -> str:
        return f"fd00:250:{self.subnet:x}::2"

    @property
    def peer_ip6(self) -> str:
        return f"fd00:250:{self.subnet:x}::1"

    def run(self, ns: str, *argv: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", ns, *argv, **kw)  # type: ignore[arg-type]

    def server(self, ns: str, port: int, mode: str, tag: str) -> None:
        """Start a server in ``ns`` and wait (bounded) until it listens."""
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", SERVER_SRC, str(port), mode, tag],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(proc)
        assert proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        ready = sel.select(timeout=10)
        sel.close()
        line = proc.stdout.readline() if ready else ""
        if line.strip() != "ready":
            proc.kill()
            raise AssertionError(f"server {tag}:{port} in {ns} did not start: "
                                 f"{proc.stderr.read() if proc.stderr else ''}")

    def connect(self, ns: str, uid: int, gid: int, *targets: str) -> dict[str, str]:
        out = self.run(ns, sys.executable, "-S", "-c", CLIENT_SRC, str(uid), str(gid),
                       *targets, timeout=30)
        return json.loads(out.stdout)

    def save(self, family: int = 4) -> str:
        cmd = "iptables-save" if family == 4 else "ip6tables-save"
        return normalise_save(self.run(self.pod, cmd).stdout)


def normalise_save(text: str) -> str:
    """iptables-save without timestamps and counters."""
    lines = [re.sub(r"\[\d+:\d+\]", "[0:0]", line) for line in text.splitlines()
             if not line.startswith("#")]
    return "\n".join(lines)


@pytest.fixture
def net() -> Iterator[Net]:
    tag = f"{os.getpid() % 100000}{random.randrange(16**4):04x}"
    n = Net(pod=f"isth-pod-{tag}", peer=f"isth-peer-{tag}", subnet=random.randrange(256))
    try:
        sh("ip", "netns", "add", n.pod)
        sh("ip", "netns", "add", n.peer)
        sh("ip", "link", "add", f"vp{tag}", "netns", n.pod, "type", "veth",
           "peer", "name", f"vq{tag}", "netns", n.peer)
        for ns, dev, addrs, addr6 in ((n.pod, f"vp{tag}", [n.pod_ip], n.pod_ip6),
                                      (n.peer, f"vq{tag}", [n.peer_ip, n.peer_ip2], n.peer_ip6)):
            n.run(ns, "ip", "link", "set", "lo", "up")
            for addr in addrs:
                n.run(ns, "ip", "addr", "add", f"{addr}/24", "dev", dev)
            n.run(ns, "ip", "-6", "addr", "add", f"{addr6}/64", "dev", dev, "nodad")
            n.run(ns, "ip", "link", "set", dev, "up")
        yield n
    finally:
        for proc in n.procs:
            proc.kill()
        for proc in n.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for ns in (n.pod, n.peer):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def start_servers(n: Net, tproxy: bool = False) -> None:
    n.server(n.pod, 15001, "redirect", "outbound")
    n.server(n.pod, 15006, "tproxy" if tproxy else "redirect", "inbound")
    for port in (8080, 8081, 15008):
        n.server(n.pod, port, "plain", "app")
    for port in (7777, 7778):
        n.server(n.peer, port, "plain", "peer")


FOREIGN_V4 = """*filter
-A INPUT -p tcp --dport 2222 -j ACCEPT
COMMIT
*nat
-A PREROUTING -p udp --dport 9 -j RETURN
-A OUTPUT -p udp --dport 9 -j RETURN
COMMIT
*mangle
-A PREROUTING -p udp --dport 9 -j RETURN
-A OUTPUT -p udp --dport 9 -j RETURN
COMMIT
*raw
-A PREROUTING -p udp --dport 9 -j RETURN
-A OUTPUT -p udp --dport 9 -j RETURN
COMMIT
"""


def install_foreign_rules(n: Net) -> None:
    """Someone else's rules in every table we touch (also makes iptables-nft create the
    tables, so "state before" is comparable with "state after cleanup")."""
    n.run(n.pod, "iptables-restore", "--noflush", input=FOREIGN_V4)
    n.run(n.pod, "ip6tables-restore", "--noflush", input=FOREIGN_V4)


def test_redirect_mode_captures_and_recovers_original_destination(net: Net) -> None:
    n = net
    start_servers(n)
    config = CaptureConfig(
        local_exclude_ports="15090,15021,15020,8081",
        outbound_ip_ranges_exclude=f"{n.peer_ip2}/32",
        local_outbound_ports_exclude="7778",
        enable_ipv6=True,
    )
    apply_ruleset(build_sidecar_rules(config), SubprocessExecutor(netns=n.pod))

    app = n.connect(n.pod, APP_UID, APP_UID,
                    f"{n.peer_ip}:9999", f"{n.peer_ip}:7777", f"{n.peer_ip2}:7777",
                    f"{n.peer_ip}:7778", "127.0.0.1:8080", f"{n.pod_ip}:8080")
    # captured outbound: the proxy on 15001 recovers where the app was going
    assert app[f"{n.peer_ip}:9999"] == f"outbound {n.peer_ip}:9999"
    assert app[f"{n.peer_ip}:7777"] == f"outbound {n.peer_ip}:7777"
    # excluded CIDR and excluded outbound port go straight to the peer
    assert app[f"{n.peer_ip2}:7777"] == f"peer {n.peer_ip2}:7777"
    assert app[f"{n.peer_ip}:7778"] == f"peer {n.peer_ip}:7778"
    # the app talking to itself (localhost or its own pod IP) is not captured
    assert app["127.0.0.1:8080"] == "app 127.0.0.1:8080"
    assert app[f"{n.pod_ip}:8080"] == f"app {n.pod_ip}:8080"

    proxy = n.connect(n.pod, PROXY_UID, PROXY_UID,
                      f"{n.peer_ip}:7777", f"127.0.0.6@{n.pod_ip}:8080", f"{n.pod_ip}:8080")
    # the proxy's own upstream traffic is never captured (no loop)
    assert proxy[f"{n.peer_ip}:7777"] == f"peer {n.peer_ip}:7777"
    # inbound passthrough from 127.0.0.6 reaches the app, not the inbound listener
    assert proxy[f"127.0.0.6@{n.pod_ip}:8080"] == f"app {n.pod_ip}:8080"
    # the proxy calling its own pod IP from elsewhere goes through inbound capture
    assert proxy[f"{n.pod_ip}:8080"] == f"inbound {n.pod_ip}:8080"

    # the proxy GID alone is enough to be exempt
    by_gid = n.connect(n.pod, 2000, PROXY_UID, f"{n.peer_ip}:7777")
    assert by_gid[f"{n.peer_ip}:7777"] == f"peer {n.peer_ip}:7777"

    inbound = n.connect(n.peer, 0, 0, f"{n.pod_ip}:8080", f"{n.pod_ip}:8081",
                        f"{n.pod_ip}:15008")
    assert inbound[f"{n.pod_ip}:8080"] == f"inbound {n.pod_ip}:8080"
    assert inbound[f"{n.pod_ip}:8081"] == f"app {n.pod_ip}:8081"  # -d 8081
    assert inbound[f"{n.pod_ip}:15008"] == f"app {n.pod_ip}:15008"  # tunnel port

    # IPv6 (ip6tables, IP6T_SO_ORIGINAL_DST), both directions
    app6 = n.connect(n.pod, APP_UID, APP_UID, f"{n.peer_ip6}:9999")
    assert app6[f"{n.peer_ip6}:9999"] == f"outbound {n.peer_ip6}:9999"
    proxy6 = n.connect(n.pod, PROXY_UID, PROXY_UID, f"{n.peer_ip6}:7777")
    assert proxy6[f"{n.peer_ip6}:7777"] == f"peer {n.peer_ip6}:7777"
    inbound6 = n.connect(n.peer, 0, 0, f"{n.pod_ip6}:8080", f"{n.pod_ip6}:8081")
    assert inbound6[f"{n.pod_ip6}:8080"] == f"inbound {n.pod_ip6}:8080"
    assert inbound6[f"{n.pod_ip6}:8081"] == f"app {n.pod_ip6}:8081"


def test_tproxy_mode_keeps_destination_and_installs_policy_route(net: Net) -> None:
    n = net
    start_servers(n, tproxy=True)
    config = CaptureConfig(inbound_interception_mode="TPROXY",
                           local_exclude_ports="15090,15021,15020,8081", enable_ipv6=True)
    ruleset = build_sidecar_rules(config)
    executor = SubprocessExecutor(netns=n.pod)
    install_foreign_rules(n)
    before, before6 = n.save(4), n.save(6)
    apply_ruleset(ruleset, executor)

    rules = n.run(n.pod, "ip", "-4", "rule", "show").stdout
    assert re.search(r"fwmark 0x539 lookup 133", rules), rules
    assert "local default dev lo" in n.run(n.pod, "ip", "-4", "route", "show",
                                           "table", "133").stdout

    inbound = n.connect(n.peer, 0, 0, f"{n.pod_ip}:8080", f"{n.pod_ip}:9443",
                        f"{n.pod_ip}:8081")
    # TPROXY: the listener on 15006 sees the original destination as its local address
    assert inbound[f"{n.pod_ip}:8080"] == f"inbound {n.pod_ip}:8080"
    assert inbound[f"{n.pod_ip}:9443"] == f"inbound {n.pod_ip}:9443"
    assert inbound[f"{n.pod_ip}:8081"] == f"app {n.pod_ip}:8081"
    inbound6 = n.connect(n.peer, 0, 0, f"{n.pod_ip6}:8080")
    assert inbound6[f"{n.pod_ip6}:8080"] == f"inbound {n.pod_ip6}:8080"
    assert re.search(r"fwmark 0x539 lookup 133", n.run(n.pod, "ip", "-6", "rule", "show").stdout)
    # outbound stays REDIRECT
    app = n.connect(n.pod, APP_UID, APP_UID, f"{n.peer_ip}:9999")
    assert app[f"{n.peer_ip}:9999"] == f"outbound {n.peer_ip}:9999"

    cleanup_ruleset(ruleset, executor)
    assert (n.save(4), n.save(6)) == (before, before6)
    assert "lookup 133" not in n.run(n.pod, "ip", "-4", "rule", "show").stdout
    assert "lookup 133" not in n.run(n.pod, "ip", "-6", "rule", "show").stdout
    assert n.run(n.pod, "ip", "-4", "route", "show", "table", "133").stdout.strip() == ""
    # and traffic flows uncaptured again
    inbound = n.connect(n.peer, 0, 0, f"{n.pod_ip}:8080")
    assert inbound[f"{n.pod_ip}:8080"] == f"app {n.pod_ip}:8080"


def isthmus_iptables(n: Net, *args: str) -> subprocess.CompletedProcess[str]:
    return sh(sys.executable, "-m", "isthmus", "iptables", "--network-namespace", n.pod, *args)


def test_cli_apply_is_idempotent_and_cleanup_restores_exact_state(net: Net) -> None:
    n = net
    install_foreign_rules(n)  # they must survive untouched
    before_v4, before_v6 = n.save(4), n.save(6)

    # Many built-in-chain rules: excluded NIC, VM interface, DNS (raw), invalid drop, TPROXY.
    flags = ["-m", "TPROXY", "-c", "eth9", "-k", "eth8", "--redirect-dns",
             "--dns-servers", "10.96.0.10,fd00::10", "--drop-invalid", "--ipv6",
             "-i", "10.0.0.0/8,fd00::/64", "-x", "10.0.5.0/24"]
    isthmus_iptables(n, *flags)
    first_v4, first_v6 = n.save(4), n.save(6)
    assert "ISTIO_TPROXY" in first_v4 and "ISTIO_OUTPUT_DNS" in first_v6
    # head rules go above the foreign rules, tail rules below them
    nat_pre = [line for line in first_v4.split("*nat")[1].splitlines()
               if line.startswith("-A PREROUTING")]
    foreign = next(i for i, line in enumerate(nat_pre) if "--dport 9" in line)
    assert all("-i eth8" in line for line in nat_pre[:foreign]) and foreign == 2, nat_pre
    assert any("-i eth9 " in line for line in nat_pre[foreign + 1:]), nat_pre

    isthmus_iptables(n, *flags)
    assert (n.save(4), n.save(6)) == (first_v4, first_v6), "second apply changed the rules"

    # Switching mode removes the other mode's chains (no leftovers).
    isthmus_iptables(n, "-m", "REDIRECT", "--ipv6")
    switched = n.save(4)
    assert "ISTIO_TPROXY" not in switched and "ISTIO_DIVERT" not in switched
    assert "ISTIO_OUTPUT_DNS" not in switched and "eth8" not in switched

    isthmus_iptables(n, "--cleanup", *flags)
    assert (n.save(4), n.save(6)) == (before_v4, before_v6)
    assert "lookup 133" not in n.run(n.pod, "ip", "-4", "rule", "show").stdout
    # cleanup when nothing is installed is a no-op, not an error
    isthmus_iptables(n, "--cleanup")
    assert n.save(4) == before_v4


def test_cli_rejects_bad_input_without_touching_rules(net: Net) -> None:
    n = net
    before = n.save(4)
    proc = sh(sys.executable, "-m", "isthmus", "iptables", "--network-namespace", n.pod,
              "-x", "10.0.0.0/33", check=False)
    assert proc.returncode == 2
    assert "--outbound-ip-ranges-exclude (-x)" in proc.stderr
    assert n.save(4) == before

