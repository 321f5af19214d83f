"""Which connections an LDS update drains (``io.listeners.ListenerManager`` drain groups),
on compiled listeners without sockets: only changed/removed chains, all chains on a
listener-level change, none for a protobuf-equal resend; members are closed when the
drain time ends, a group ends early once empty, and a connection accepted under a
replaced config drains when it joins."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2

from isthmus.dataplane.io.listeners import ListenerManager
from isthmus.dataplane.proxy.config import CompiledListener, compile_listener
from isthmus.dataplane.proxy.stats import Stats
from tests.integration.proxy.fixtures import addr, pack


class Member:
    def __init__(self) -> None:
        self.drains: list[float | None] = []
        self.aborted = False

    def start_drain(self, grace: float | None = None) -> None:
        self.drains.append(grace)

    def abort(self) -> None:
        self.aborted = True


def two_chains(cluster0: str = "c0", timeout_ms: int = 0) -> CompiledListener:
    lis = listener_pb2.Listener(name="lis", address=addr("127.0.0.1", 15006))
    if timeout_ms:
        lis.listener_filters_timeout.FromMilliseconds(timeout_ms)
    for i, cluster in enumerate((cluster0, "c1")):
        fc = lis.filter_chains.add(name=f"chain{i}")
        fc.filter_chain_match.destination_port.value = 80 + i
        fc.filters.add(name="envoy.filters.network.tcp_proxy", typed_config=pack(
            tcp_proxy_pb2.TcpProxy(stat_prefix=f"s{i}", cluster=cluster)))
    return compile_listener("lis", lis)


def runtime(*listeners: CompiledListener) -> Any:
    return SimpleNamespace(listeners={lis.name: lis for lis in listeners})


def manager(drain_time_s: float = 0.2) -> ListenerManager:
    m = ListenerManager(SimpleNamespace(stats=Stats(), reuse_port=True))
    m.drain_time_s = drain_time_s
    return m


def join(m: ListenerManager, lis: CompiledListener, i: int) -> Member:
    g = m.drain_group(lis, lis.chains[i])
    assert g is not None
    member = Member()
    g.add(member)
    return member


def test_only_changed_chains_drain_then_close_after_drain_time() -> None:
    async def body() -> None:
        m = manager()
        v1 = two_chains()
        m._drain_changed(runtime(v1))
        a, b = join(m, v1, 0), join(m, v1, 1)

        resend = two_chains()  # new objects, same protos: nothing drains
        m._drain_changed(runtime(resend))
        assert a.drains == b.drains == []
        assert m.drain_group(resend, resend.chains[0]) is m.drain_group(v1, v1.chains[0])

        v2 = two_chains(cluster0="other")  # chain 0 changed
        m._drain_changed(runtime(v2))
        assert a.drains == [0.0] and b.drains == []
        assert len(m.draining_groups) == 1
        c = join(m, v2, 0)  # a new connection on the new chain 0 is not drained
        await asyncio.sleep(0.3)
        assert a.aborted and not b.aborted and not c.aborted and c.drains == []
        assert not m.draining_groups
        assert m.core.stats.get("listener_manager.total_filter_chains_draining") == 0

        v3 = two_chains(cluster0="other", timeout_ms=500)  # listener-level change: all
        m._drain_changed(runtime(v3))
        assert b.drains == [0.0] and c.drains == [0.0]

    asyncio.run(asyncio.wait_for(body(), 10))


def test_removed_listener_drains_empty_group_ends_early_late_join_drains() -> None:
    async def body() -> None:
        m = manager(drain_time_s=30)
        v1 = two_chains()
        m._drain_changed(runtime(v1))
        a = join(m, v1, 0)
        g = m.drain_group(v1, v1.chains[0])
        assert g is not None
        m._drain_changed(runtime())  # the listener is removed
        assert a.drains == [0.0] and m.draining_groups == {g}
        g.discard(a)  # its last connection ended: the drain is over
        assert not m.draining_groups and not a.aborted
        # accepted under v1 (captured before the update), joins afterwards: drains
        late = join(m, v1, 1)
        assert late.drains == [0.0]
        assert len(m.draining_groups) == 1

    asyncio.run(asyncio.wait_for(body(), 10))


def test_reordered_map_inside_typed_config_is_not_a_change() -> None:
    """RBAC policies are a map: a control plane may serialize its entries in another
    order on the next push. The digest must not see a change (nothing drains)."""
    from envoy.config.rbac.v3 import rbac_pb2
    from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as net_rbac_pb2

    from isthmus.dataplane.io.listeners import listener_signature

    def build(order: list[str], extra: str = "") -> CompiledListener:
        rules = rbac_pb2.RBAC(action=rbac_pb2.RBAC.DENY)
        for n in order:
            pol = rules.policies[n]
            pol.permissions.add(destination_port=8000 + int(n[1:]))
            pol.principals.add(any=True)
        if extra:
            rules.policies[extra].permissions.add(any=True)
            rules.policies[extra].principals.add(any=True)
        lis = listener_pb2.Listener(name="lis", address=addr("127.0.0.1", 15006))
        fc = lis.filter_chains.add(name="c")
        fc.filters.add(name="envoy.filters.network.rbac", typed_config=pack(
            net_rbac_pb2.RBAC(rules=rules, stat_prefix="tcp.")))
        fc.filters.add(name="envoy.filters.network.tcp_proxy", typed_config=pack(
            tcp_proxy_pb2.TcpProxy(stat_prefix="s", cluster="c")))
        return compile_listener("lis", lis)

    names = [f"p{i}" for i in range(20)]
    a, b = build(names), build(names[::-1])
    assert a.proto.SerializeToString() != b.proto.SerializeToString()  # bytes differ
    sa, sb = listener_signature(a), listener_signature(b)
    assert sa.listener == sb.listener
    assert list(sa.chains.values()) == list(sb.chains.values())
    sc = listener_signature(build(names, extra="p99"))  # a real change is one
    assert list(sc.chains.values()) != list(sa.chains.values())
