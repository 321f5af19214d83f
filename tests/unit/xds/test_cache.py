"""SnapshotCache: consistency gate, watchers (same loop and other threads), clear."""

from __future__ import annotations

import asyncio
import threading

import pytest

from isthmus.controlplane.xds import types
from isthmus.controlplane.xds.cache import InconsistentSnapshotError, SnapshotCache
from isthmus.controlplane.xds.snapshot import XdsSnapshot
from tests.integration.xds.fixtures import bookinfo, eds_cluster


def test_set_get_clear_and_reject_inconsistent() -> None:
    cache = SnapshotCache()
    good = bookinfo()
    cache.set_snapshot("n1", good)
    assert cache.get("n1") is good and cache.node_ids() == ["n1"]
    bad = XdsSnapshot.from_resources({types.CLUSTER: [eds_cluster("lonely")]})
    with pytest.raises(InconsistentSnapshotError) as err:
        cache.set_snapshot("n1", bad)
    assert err.value.node_id == "n1" and len(err.value.problems) == 1
    assert "keeps its previous snapshot" in str(err.value)
    assert cache.get("n1") is good
    cache.set_snapshot("n1", bad, check=False)  # explicit opt-out
    assert cache.get("n1") is bad
    assert cache.versions("n1") == bad.versions
    cache.clear("n1")
    assert cache.get("n1") is None and cache.versions("n1") is None


async def test_watch_wakes_on_change_and_clear() -> None:
    cache = SnapshotCache()
    ev = asyncio.Event()
    w = cache.watch("n1", ev)
    other = asyncio.Event()
    cache.watch("n2", other)
    snap = bookinfo()
    cache.set_snapshot("n1", snap)
    await asyncio.wait_for(ev.wait(), 1)
    assert not other.is_set()
    ev.clear()
    cache.set_snapshot("n1", snap)  # same object: no wake-up
    assert not ev.is_set()
    cache.clear("n1")
    assert ev.is_set()
    assert cache.watch_count("n1") == 1 and cache.watch_count() == 2
    w.close()
    assert cache.watch_count("n1") == 0


async def test_set_snapshot_from_another_thread_wakes_loop() -> None:
    cache = SnapshotCache()
    ev = asyncio.Event()
    cache.watch("n1", ev)
    t = threading.Thread(target=cache.set_snapshot, args=("n1", bookinfo()))
    t.start()
    await asyncio.wait_for(ev.wait(), 2)
    t.join()
    assert cache.get("n1") is not None
