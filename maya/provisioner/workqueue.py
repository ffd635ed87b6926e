"""A work queue with the guarantees of client-go's: an item queued many times is handled
once; an item is never handled by two workers at once (one added while it is being handled
is handled again after); failed items come back after an exponential backoff."""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Hashable


class WorkQueue:
    def __init__(self, base_delay: float = 0.5, max_delay: float = 300.0) -> None:
        self.base_delay, self.max_delay = base_delay, max_delay
        self._cond = threading.Condition()
        self._queue: deque[Hashable] = deque()
        self._dirty: set[Hashable] = set()
        self._processing: set[Hashable] = set()
        self._delayed: list[tuple[float, int, Hashable]] = []
        self._seq = itertools.count()
        self._failures: dict[Hashable, int] = {}
        self._shutdown = False

    def add(self, item: Hashable) -> None:
        with self._cond:
            self._add(item)

    def _add(self, item: Hashable) -> None:
        if self._shutdown or item in self._dirty:
            return
        self._dirty.add(item)
        if item not in self._processing:
            self._queue.append(item)
            self._cond.notify()

    def add_after(self, item: Hashable, delay: float) -> None:
        if delay <= 0:
            self.add(item)
            return
        with self._cond:
            heapq.heappush(self._delayed, (time.monotonic() + delay, next(self._seq), item))
            self._cond.notify()

    def add_rate_limited(self, item: Hashable) -> float:
        """Queue a failed item again after its backoff (doubling per failure); the delay."""
        with self._cond:
            n = self._failures.get(item, 0)
            self._failures[item] = n + 1
        delay = min(self.base_delay * 2**n, self.max_delay)
        self.add_after(item, delay)
        return delay

    def forget(self, item: Hashable) -> None:
        with self._cond:
            self._failures.pop(item, None)

    def get(self) -> Hashable | None:
        """The next item (mark it done() after), or None once shut down."""
        with self._cond:
            while True:
                now = time.monotonic()
                while self._delayed and self._delayed[0][0] <= now:
                    self._add(heapq.heappop(self._delayed)[2])
                if self._queue:
                    item = self._queue.popleft()
                    self._processing.add(item)
                    self._dirty.discard(item)
                    return item
                if self._shutdown:
                    return None
                timeout = self._delayed[0][0] - now if self._delayed else None
                self._cond.wait(timeout)

    def done(self, item: Hashable) -> None:
        with self._cond:
            self._processing.discard(item)
            if item in self._dirty:
                self._queue.append(item)
                self._cond.notify()

    def shut_down(self) -> None:
        with self._cond:
            self._shutdown = True
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._queue)
