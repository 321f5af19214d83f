"""Socket options for transparent capture: where was this connection really going?

Neighbours: ``isthmus.capture`` installs the iptables rules; the sidecar/ztunnel listeners
(``dataplane.io`` listeners) call these helpers on accepted sockets.

- REDIRECT (nat) rewrites the destination to the proxy's port; the kernel remembers the
  original one in conntrack and returns it through ``SO_ORIGINAL_DST``
  (``IP6T_SO_ORIGINAL_DST`` for IPv6).
- TPROXY (mangle) delivers the connection untouched to a socket with ``IP_TRANSPARENT``;
  the original destination is simply the accepted socket's local address.
- ``SO_MARK`` tags the proxy's own upstream packets (policy routing, TPROXY loops).

Linux only; the constants are from <linux/in.h>, <linux/in6.h>,
<linux/netfilter_ipv4.h> and <linux/netfilter_ipv6/ip6_tables.h>.
"""

from __future__ import annotations

import errno
import socket
import struct

SO_ORIGINAL_DST = 80  # SOL_IP
IP6T_SO_ORIGINAL_DST = 80  # SOL_IPV6
IP_TRANSPARENT = 19  # SOL_IP
IPV6_TRANSPARENT = 75  # SOL_IPV6
IP_FREEBIND = 15  # SOL_IP
SO_MARK = 36  # SOL_SOCKET

SOL_IP = getattr(socket, "SOL_IP", 0)
SOL_IPV6 = getattr(socket, "SOL_IPV6", 41)

Address = tuple[str, int]


class NoOriginalDestination(OSError):
    """The socket was not redirected by iptables (no conntrack NAT entry)."""


def _sockaddr_in(raw: bytes) -> Address:
    # struct sockaddr_in { sa_family_t (host order); in_port_t (net order); in_addr; zero[8] }
    port = struct.unpack_from("!H", raw, 2)[0]
    return socket.inet_ntop(socket.AF_INET, raw[4:8]), port


def _sockaddr_in6(raw: bytes) -> Address:
    # struct sockaddr_in6 { family; port (net order); flowinfo; in6_addr[16]; scope_id }
    port = struct.unpack_from("!H", raw, 2)[0]
    return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port


def original_dst(sock: socket.socket) -> Address:
    """The pre-REDIRECT destination (host, port) of an accepted TCP connection.

    Raises ``NoOriginalDestination`` when the connection was not NATed (e.g. a client
    connected to the proxy port directly).
    """
    try:
        if sock.family == socket.AF_INET6:
            try:
                raw = sock.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, 28)
                return _sockaddr_in6(raw)
            except OSError as exc:
                # An IPv4 connection on a dual-stack socket: ask the IPv4 table.
                if exc.errno not in (errno.ENOENT, errno.ENOPROTOOPT, errno.EINVAL):
                    raise
            raw = sock.getsockopt(SOL_IP, SO_ORIGINAL_DST, 16)
            return _sockaddr_in(raw)
        raw = sock.getsockopt(SOL_IP, SO_ORIGINAL_DST, 16)
        return _sockaddr_in(raw)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise NoOriginalDestination(
                errno.ENOENT, "connection was not redirected by iptables (no conntrack entry); "
                "did it arrive on the capture port directly?") from None
        raise


def local_dst(sock: socket.socket) -> Address:
    """The destination a TPROXY'd connection was sent to: the socket's local address."""
    host, port = sock.getsockname()[:2]
    if host.startswith("::ffff:") and "." in host:
        host = host[len("::ffff:"):]
    return host, port


def recover_original_dst(sock: socket.socket, tproxy: bool = False) -> Address:
    """Original destination for either capture mode (REDIRECT: SO_ORIGINAL_DST)."""
    if tproxy:
        return local_dst(sock)
    return original_dst(sock)


def set_transparent(sock: socket.socket, enabled: bool = True) -> None:
    """Allow binding/accepting non-local addresses (TPROXY listeners, original_src)."""
    value = 1 if enabled else 0
    if sock.family == socket.AF_INET6:
        sock.setsockopt(SOL_IPV6, IPV6_TRANSPARENT, value)
        try:  # dual-stack sockets also need the IPv4 option for v4-mapped traffic
            sock.setsockopt(SOL_IP, IP_TRANSPARENT, value)
        except OSError:
            pass
    else:
        sock.setsockopt(SOL_IP, IP_TRANSPARENT, value)


def is_transparent(sock: socket.socket) -> bool:
    if sock.family == socket.AF_INET6:
        return bool(sock.getsockopt(SOL_IPV6, IPV6_TRANSPARENT))
    return bool(sock.getsockopt(SOL_IP, IP_TRANSPARENT))


def set_freebind(sock: socket.socket, enabled: bool = True) -> None:
    """Bind to an address not (yet) configured on this host."""
    sock.setsockopt(SOL_IP, IP_FREEBIND, 1 if enabled else 0)


def set_mark(sock: socket.socket, mark: int) -> None:
    """Set the fwmark on packets this socket sends (needs CAP_NET_ADMIN)."""
    sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)


def get_mark(sock: socket.socket) -> int:
    return int(sock.getsockopt(socket.SOL_SOCKET, SO_MARK))


__all__ = [
    "IP6T_SO_ORIGINAL_DST",
    "IPV6_TRANSPARENT",
    "IP_TRANSPARENT",
    "SO_MARK",
    "SO_ORIGINAL_DST",
    "NoOriginalDestination",
    "get_mark",
    "is_transparent",
    "local_dst",
    "original_dst",
    "recover_original_dst",
    "set_freebind",
    "set_mark",
    "set_transparent",
]
