"""Debouncer: the pure timing rule with a fake clock, and the asyncio runner with small
real delays (synchronised on push events, not sleeps)."""

from __future__ import annotations

import asyncio

import pytest

from isthmus.controlplane.xds.debounce import Debouncer, DebounceState


def test_state_quiet_period() -> None:
    s = DebounceState(quiet=0.1, max_delay=1.0)
    assert s.deadline() is None and not s.due(5)
    s.event(10.0)
    assert s.deadline() == pytest.approx(10.1)
    s.event(10.05)
    assert s.deadline() == pytest.approx(10.15)
    assert not s.due(10.14) and s.due(10.15)
    s.reset()
    assert not s.active


def test_state_max_delay_caps_a_trickle() -> None:
    s = DebounceState(quiet=0.1, max_delay=1.0)
    t = 0.0
    s.event(t)
    while t < 0.95:
        t += 0.05
        s.event(t)
        assert not s.due(t)
    t += 0.05  # 1.0 s after the first event, though events keep coming
    s.event(t)
    assert s.due(t)
    assert s.deadline() == pytest.approx(1.0)


def test_state_rejects_negative() -> None:
    with pytest.raises(ValueError):
        DebounceState(quiet=-1, max_delay=1)


class Recorder:
    def __init__(self) -> None:
        self.batches: list[frozenset[str]] = []
        self.event = asyncio.Event()

    async def push(self, batch: frozenset[str]) -> None:
        self.batches.append(batch)
        self.event.set()

    async def next(self, timeout: float = 2.0) -> frozenset[str]:
        await asyncio.wait_for(self.event.wait(), timeout)
        self.event.clear()
        return self.batches[-1]


async def test_burst_is_merged_into_one_push() -> None:
    rec = Recorder()
    d: Debouncer[str] = Debouncer(rec.push, quiet=0.05, max_delay=1.0)
    for i in range(20):
        d.add(f"svc-{i % 5}")
    assert await rec.next() == {f"svc-{i}" for i in range(5)}
    assert d.pushes == 1 and d.events == 20
    d.add("later")
    assert await rec.next() == {"later"}
    await d.close()


async def test_max_delay_forces_push_during_trickle() -> None:
    rec = Recorder()
    loop = asyncio.get_running_loop()
    d: Debouncer[int] = Debouncer(rec.push, quiet=0.2, max_delay=0.1)
    start = loop.time()
    stop = asyncio.Event()

    async def trickle() -> None:
        i = 0
        while not stop.is_set():
            d.add(i)
            i += 1
            await asyncio.sleep(0.01)  # the trickle itself, not synchronisation

    task = asyncio.create_task(trickle())
    batch = await rec.next()
    elapsed = loop.time() - start
    stop.set()
    await task
    assert batch and elapsed < 0.2  # pushed before any quiet period happened
    await d.close()


async def test_flush_and_failed_push_does_not_stop_later_pushes() -> None:
    calls: list[frozenset[str]] = []
    done = asyncio.Event()

    async def push(batch: frozenset[str]) -> None:
        calls.append(batch)
        if len(calls) == 1:
            raise RuntimeError("translation failed")
        done.set()

    d: Debouncer[str] = Debouncer(push, quiet=10.0, max_delay=10.0)
    d.add("a")
    await d.flush()  # immediate, raises inside and is logged
    assert calls == [frozenset({"a"})]
    d.add("b")
    await d.flush()
    await asyncio.wait_for(done.wait(), 1)
    assert calls[-1] == {"b"}
    d.add("c")
    await d.close()  # flushes what is pending
    assert calls[-1] == {"c"}
    with pytest.raises(RuntimeError):
        d.add("d")


async def test_events_during_push_start_next_burst() -> None:
    gate = asyncio.Event()
    batches: list[frozenset[str]] = []
    second = asyncio.Event()
    started = asyncio.Event()

    async def push(batch: frozenset[str]) -> None:
        batches.append(batch)
        if len(batches) == 1:
            started.set()
            await gate.wait()
        else:
            second.set()

    d: Debouncer[str] = Debouncer(push, quiet=0.01, max_delay=0.5)
    d.add("x")
    await asyncio.wait_for(started.wait(), 2)  # the first push is running
    d.add("y")
    d.add("z")
    gate.set()
    await asyncio.wait_for(second.wait(), 2)
    assert batches == [frozenset({"x"}), frozenset({"y", "z"})]
    await d.close()
