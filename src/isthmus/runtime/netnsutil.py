"""Sockets inside another network namespace, from a process that stays in its own.

A thread's network namespace is its own (``setns(CLONE_NEWNET)`` is per thread), and a
socket belongs to the namespace it was created in for its whole life. So
``socket_in_netns`` runs ``setns`` + ``socket()`` + ``setns`` back in a short-lived
helper thread and hands the socket to the caller; the caller's threads never change
namespace. The supervisor uses this for readiness probes (inside each pod) and the port
forwarder (host 127.0.0.1 -> inside the node namespace).

Python 3.11 has no ``os.setns``, so libc's is called through ctypes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import socket
import threading
from pathlib import Path

CLONE_NEWNET = 0x40000000
NETNS_RUN = Path("/var/run/netns")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _setns(fd: int, nstype: int) -> None:
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def netns_path(netns: str) -> str:
    return netns if "/" in netns else str(NETNS_RUN / netns)


def socket_in_netns(netns: str, family: int = socket.AF_INET,
                    type: int = socket.SOCK_STREAM) -> socket.socket:
    """A new socket living in network namespace ``netns`` (a name or a path)."""
    result: list[socket.socket | BaseException] = []

    def work() -> None:
        try:
            own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
            try:
                target = os.open(netns_path(netns), os.O_RDONLY)
                try:
                    _setns(target, CLONE_NEWNET)
                    try:
                        result.append(socket.socket(family, type))
                    finally:
                        _setns(own, CLONE_NEWNET)
                finally:
                    os.close(target)
            finally:
                os.close(own)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            result.append(exc)

    t = threading.Thread(target=work, name=f"netns-{netns}", daemon=True)
    t.start()
    t.join()
    value = result[0]
    if isinstance(value, BaseException):
        if isinstance(value, FileNotFoundError):
            raise OSError(f"network namespace {netns} does not exist") from None
        raise value
    return value
