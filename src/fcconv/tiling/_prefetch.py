"""Read the next blocks while the model runs: a source whose planned reads run ahead in a thread.

The local run computes tiles one at a time per worker; reading a tile's block (decoding a slide's
JPEG tiles, say) and running the model then alternate. :class:`Prefetching` wraps a
:class:`~fcconv.tiling._source.Source` with the list of blocks the run will read, in order, and
keeps the next ``depth`` of them read ahead by one background thread (a standard
``ThreadPoolExecutor``). The scheduler may run the tiles in either order (dask's threads run
the last submitted first): the blocks read ahead are the next ones in the direction of the last
two reads. A block asked for before its turn is read directly, never twice; pixels are those of
the wrapped source, so the map is the same bit for bit.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

__all__ = ["Prefetching"]

Block = tuple[tuple[int, ...], tuple[int, ...]]


class Prefetching:
    """A source whose reads of ``blocks`` run ahead, ``depth`` at a time (local runs only)."""

    def __init__(self, source: Any, blocks: Iterable[Block], depth: int = 2) -> None:
        self.source = source
        self._order = [(tuple(a), tuple(b)) for a, b in blocks]
        self._position = {block: i for i, block in enumerate(self._order)}
        self._last: int | None = None
        self._depth = depth
        self._pending: dict[Block, Future[np.ndarray]] = {}
        self._claimed: set[Block] = set()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fcconv-prefetch")

    def __getattr__(self, name: str) -> Any:  # shape, dtype, identity, ...: the wrapped source's
        return getattr(self.__dict__["source"], name)

    def _schedule(self, position: int | None) -> None:
        if position is None:
            return
        if self._last is None:  # the first read: towards the far end of the plan
            step = 1 if position < len(self._order) / 2 else -1
        else:
            step = 1 if position > self._last else -1
        self._last = position
        ahead = position + step
        while len(self._pending) < self._depth and 0 <= ahead < len(self._order):
            block = self._order[ahead]
            ahead += step
            if block not in self._claimed:
                self._claimed.add(block)
                self._pending[block] = self._pool.submit(self.source.read, *block)

    def read(self, start: Sequence[int], stop: Sequence[int]) -> np.ndarray:
        """The block ``[start, stop)``: read ahead if it was planned, else now."""
        block = (tuple(int(s) for s in start), tuple(int(s) for s in stop))
        with self._lock:
            future = self._pending.pop(block, None)
            if future is None:
                self._claimed.add(block)
            self._schedule(self._position.get(block))
        return future.result() if future is not None else self.source.read(*block)

    def close(self) -> None:
        """Stop reading ahead (blocks not yet asked for are dropped)."""
        with self._lock:
            for future in self._pending.values():
                future.cancel()
            self._pending.clear()
        self._pool.shutdown(wait=True)
