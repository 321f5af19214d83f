"""BodyChannel: a request body (or tunnel bytes) streaming from the downstream codec to the
router, with explicit backpressure.

The downstream protocol ``feed``s chunks as the codec emits them; when more than
``HIGH`` bytes wait, ``over_high`` turns True and the protocol pauses reading the socket;
``read()`` hands chunks to the router and calls ``on_drained`` once the backlog is under
``HIGH / 2`` so the protocol resumes reading. Nothing ever holds a whole body.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

HIGH = 1 << 20


class BodyReset(Exception):
    """The downstream went away (or reset the stream) before the body ended."""


class BodyChannel:
    __slots__ = (
        "_chunks",
        "_size",
        "_waiter",
        "consumed",
        "ended",
        "on_drained",
        "reset",
        "trailers",
    )

    def __init__(self, on_drained: Callable[[], None] | None = None) -> None:
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._waiter: asyncio.Future[None] | None = None
        self.ended = False  # the last chunk has been fed
        self.reset = False
        self.trailers: list[tuple[bytes, bytes]] | None = None
        self.on_drained = on_drained
        self.consumed = 0

    @property
    def over_high(self) -> bool:
        return self._size > HIGH

    def feed(self, data: bytes, end: bool = False) -> None:
        if data:
            self._chunks.append(data)
            self._size += len(data)
        if end:
            self.ended = True
        self._wake()

    def feed_reset(self) -> None:
        self.reset = True
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    @property
    def finished(self) -> bool:
        """Everything was fed and read."""
        return self.ended and not self._chunks

    async def read(self) -> tuple[bytes, bool]:
        """Next chunk and whether it is the last one; ``(b"", True)`` at the end."""
        while not self._chunks:
            if self.ended:
                return b"", True
            if self.reset:
                raise BodyReset("downstream reset the request")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        chunks = self._chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        was_high = self._size > HIGH // 2
        self._size = 0
        self.consumed += len(data)
        if was_high and self.on_drained is not None:
            self.on_drained()
        return data, self.ended
