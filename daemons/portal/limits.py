"""Per-portal limits from the cluster file's `limits:` section, no I/O.

- `WatchSlots`: at most `max_watch_streams` WatchTasks streams open on this
  portal, and at most `max_watch_streams_per_client` for one CID.
- `WriteRateLimiter`: a token bucket per CID for ClientPortal writes,
  `client_write_rate` writes/s with bursts of `client_write_burst` (default
  2 s worth). Buckets live in each portal: a client that spreads its writes
  over k portals gets up to k times the rate.

Both refuse with ResourceExhausted (gRPC RESOURCE_EXHAUSTED) and a message
naming the limit.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from typing import Callable

from daemons.core.config import Limits
from daemons.core.errors import TarefaError

MAX_BUCKETS = 100_000


class ResourceExhausted(TarefaError):
    code = "RESOURCE_EXHAUSTED"


class WatchSlots:
    """Counts open WatchTasks streams, in total and per CID."""

    def __init__(self, max_streams: int, max_per_client: int) -> None:
        self.max_streams = max_streams
        self.max_per_client = max_per_client
        self._per_client: collections.Counter[str] = collections.Counter()
        self._open = 0
        self._lock = threading.Lock()
        self.refused = 0

    @property
    def open(self) -> int:
        return self._open

    def acquire(self, cid: str) -> None:
        """Take a slot for a stream of `cid`, or raise ResourceExhausted."""
        with self._lock:
            if self._open >= self.max_streams:
                self.refused += 1
                raise ResourceExhausted(
                    f"this portal already serves {self.max_streams} WatchTasks streams "
                    "(limits.max_watch_streams); retry later or use another portal")
            if self._per_client[cid] >= self.max_per_client:
                self.refused += 1
                raise ResourceExhausted(
                    f"client {cid} already has {self.max_per_client} WatchTasks streams on this "
                    "portal (limits.max_watch_streams_per_client); close one first")
            self._per_client[cid] += 1
            self._open += 1

    def release(self, cid: str) -> None:
        with self._lock:
            if self._per_client[cid] <= 0:
                return
            self._per_client[cid] -= 1
            if not self._per_client[cid]:
                del self._per_client[cid]
            self._open -= 1


class WriteRateLimiter:
    """A token bucket per CID; `rate` None means unlimited."""

    def __init__(self, rate: float | None, burst: int | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 max_buckets: int = MAX_BUCKETS) -> None:
        self.rate = rate
        self.burst = float(burst if burst is not None
                           else max(1, math.ceil(2 * rate)) if rate else 0)
        self._clock = clock
        self.max_buckets = max_buckets
        # cid -> (tokens, time of the last refill); least recently used first.
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = \
            collections.OrderedDict()
        self._lock = threading.Lock()
        self.refused = 0

    def take(self, cid: str) -> None:
        """Spend one write of `cid`, or raise ResourceExhausted saying when to retry."""
        if self.rate is None:
            return
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.pop(cid, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens < 1.0:
                self._buckets[cid] = (tokens, now)
                self.refused += 1
                wait = (1.0 - tokens) / self.rate
                raise ResourceExhausted(
                    f"client {cid} exceeds limits.client_write_rate ({self.rate:g} writes/s, "
                    f"burst {self.burst:g}) on this portal; retry in {wait:.2f} s")
            self._buckets[cid] = (tokens - 1.0, now)
            # Forgetting a bucket refills it: only when more clients than
            # max_buckets write at once can one get more than its rate.
            while len(self._buckets) > self.max_buckets:
                self._buckets.popitem(last=False)


class PortalLimits:
    """The limits one portal enforces, built from the cluster file."""

    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic) -> None:
        self.watch = WatchSlots(limits.max_watch_streams, limits.max_watch_streams_per_client)
        self.writes = WriteRateLimiter(limits.client_write_rate, limits.client_write_burst, clock)

    @property
    def refused(self) -> int:
        return self.watch.refused + self.writes.refused
