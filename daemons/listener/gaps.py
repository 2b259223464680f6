"""Revisions that never reach the audit log.

Every committed change takes the next global revision and is published as
one event, so the revisions the listener receives should have no holes.
Events from different portals arrive slightly out of order, so a revision is
only reported missing once a later revision has been waiting for it for
`grace` seconds. Causes: a portal that died between commit and publish, a
broker that lost the listener's session or dropped queued messages, events
published while no listener was subscribed.

Only revisions above the highest one in the audit log at start (or, on an
empty log, from the first event received) are tracked: holes older than that
are not known to this process. A revision that arrives after being reported
(a portal that was cut off from the broker for longer than `grace`) is
written like any other, and `seen` says so: `missing` counts the reported
revisions minus those that turned up later (recognised within the newest
MAX_HOLES holes).
"""

from __future__ import annotations

import bisect
import threading
import time
from typing import Callable

MAX_HOLES = 1000  # reported holes remembered for late arrivals (oldest forgotten)


class RevisionGaps:
    def __init__(self, grace: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.grace = grace
        self._clock = clock
        self._lock = threading.Lock()
        self._next: int | None = None  # lowest revision neither received nor reported
        self._ahead: dict[int, float] = {}  # received revisions above _next: arrival time
        self._holes: list[list[int]] = []  # reported [first, last] ranges, in order
        self.missing = 0  # revisions reported missing, less those that arrived later

    def start_after(self, revision: int) -> None:
        """Everything up to `revision` is accounted for (the log's highest at start)."""
        with self._lock:
            self._next = revision + 1

    def seen(self, revision: int) -> bool:
        """Note a received revision; True if it had been reported missing."""
        with self._lock:
            if self._next is None:
                self._next = revision  # the first event ever: nothing before it expected
            if revision < self._next:
                return self._arrived_late(revision)
            if revision not in self._ahead:
                self._ahead[revision] = self._clock()
                self._advance()
            return False

    def _arrived_late(self, revision: int) -> bool:
        at = bisect.bisect_right(self._holes, [revision, float("inf")]) - 1
        if at < 0 or self._holes[at][1] < revision:
            return False  # seen before, or older than what is tracked
        first, last = self._holes[at]
        if first == last:
            del self._holes[at]
        elif revision == first:
            self._holes[at][0] += 1
        elif revision == last:
            self._holes[at][1] -= 1
        else:
            self._holes[at:at + 1] = [[first, revision - 1], [revision + 1, last]]
            self._forget_old_holes()
        self.missing -= 1
        return True

    def _forget_old_holes(self) -> None:
        """Keep the newest MAX_HOLES holes (older ones stay counted in `missing`)."""
        del self._holes[:-MAX_HOLES]

    def _advance(self) -> None:
        assert self._next is not None
        while self._next in self._ahead:
            del self._ahead[self._next]
            self._next += 1

    def overdue(self) -> list[tuple[int, int]]:
        """Holes that later revisions have waited on for `grace` seconds, as
        (first, last) ranges; they are counted in `missing` and not reported again."""
        holes: list[tuple[int, int]] = []
        with self._lock:
            now = self._clock()
            while self._ahead:
                assert self._next is not None
                lowest = min(self._ahead)
                if now - self._ahead[lowest] < self.grace:
                    break
                holes.append((self._next, lowest - 1))
                self._holes.append([self._next, lowest - 1])
                self.missing += lowest - self._next
                self._next = lowest
                self._advance()
            self._forget_old_holes()
        return holes

    @property
    def waiting(self) -> int:
        """Revisions received ahead of a hole (not yet reported)."""
        with self._lock:
            return len(self._ahead)
