"""Revisions that never reach the audit log.

Every committed change takes the next global revision and is published as an
event (once; twice, under two origins, when a retried request id is answered
by a second portal), so the revisions the listener receives should have no
holes. Events from different portals arrive slightly out of order, so a
revision is only reported missing once a later revision has been waiting for
it for `grace` seconds. Causes: a broker that lost the listener's session or
dropped queued messages, a portal that died between commit and publish,
events published while no listener was subscribed.

Only revisions from those the audit log remembers at start (its dedupe
window; on an empty log, from the first events received) are tracked: holes
older than that are not known to this process. A revision that arrives after being reported
(a portal that was cut off from the broker for longer than `grace`) is
written like any other and taken off `missing` (recognised within the
newest MAX_HOLES holes).

A revision more than MAX_JUMP above the next expected one is set aside
(counted in `ignored`): any login allowed to publish can forge an event, and
one with a huge revision would otherwise be reported as a hole of billions
and make every real revision look old from then on. A forged revision stays
alone; real ones keep coming: once CONFIRM set-aside revisions lie within
MAX_JUMP of each other they are tracked after all (the listener really
missed more than MAX_JUMP changes, and that hole is reported). Tracking on
an empty log starts the same way, from the first CONFIRM revisions that
agree, so a forged first event cannot anchor it. At start, tracking resumes
from the revisions the audit log remembers (`resume`), from its highest
group of at least CONFIRM revisions without a jump over MAX_JUMP: holes
among them are reported; a few forged revisions above them are left out.
Both start from the first of those revisions to arrive (or to be written),
not the lowest, so that a late or forged low one cannot anchor tracking
below changes this process never had to see.
"""

from __future__ import annotations

import bisect
import heapq
import threading
import time
from typing import Callable, Iterable

MAX_HOLES = 1000  # reported holes remembered for late arrivals (oldest forgotten)
MAX_JUMP = 1_000_000  # a revision this far above the expected one is set aside
CONFIRM = 10  # set-aside revisions within MAX_JUMP of each other that are tracked
MAX_ASIDE = 1000  # set-aside revisions remembered


def trusted(revisions: Iterable[int]) -> list[int]:
    """The revisions of `revisions` tracking can resume from after a restart:
    the highest group of at least CONFIRM of them with no gap over MAX_JUMP
    inside, sorted; [] if there is none. Forged revisions stay few (one
    forged event, or two close ones, cannot anchor tracking: before, they
    could, and every real revision after them looked old)."""
    ordered = sorted(set(revisions))
    end = len(ordered)
    while end > 0:
        start = end - 1
        while start > 0 and ordered[start] - ordered[start - 1] <= MAX_JUMP:
            start -= 1
        if end - start >= CONFIRM:
            return ordered[start:end]
        end = start
    return []


def _first_arrived(order: list[int], members: set[int]) -> int:
    """The first of `members` in `order` (arrival, or the log's order).

    Tracking starts there, not at the lowest: a late or forged low revision
    among them (a retry answered by a portal that was cut off, a forgery
    within MAX_JUMP) is the lowest, and starting from it reported every
    revision between it and the others missing — on an empty log, changes
    made before the listener ever subscribed; after a restart, revisions
    written but no longer remembered (found by review: "131 revisions never
    arrived", all in the audit log). Revisions a little below the first that
    arrive right after it, out of order, are then not tracked: no hole is
    reported among them, none wrongly."""
    return next(r for r in order if r in members)


class RevisionGaps:
    def __init__(self, grace: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.grace = grace
        self._clock = clock
        self._lock = threading.Lock()
        self._next: int | None = None  # lowest revision neither received nor reported
        self._arrived: dict[int, float] = {}  # received revisions above _next: arrival time
        self._ahead: list[int] = []  # the same revisions, as a heap
        self._holes: list[list[int]] = []  # reported [first, last] ranges, in order
        self.missing = 0  # revisions reported missing, less those that arrived later
        self.ignored = 0  # revisions set aside as too far ahead (MAX_JUMP)
        self._aside: list[int] = []  # those, and those received before tracking began
        self._replayed: list[int] = []  # replays received before tracking began
        self._late = 0  # reported revisions that arrived since take_late()
        # The highest revision of a group confirmed far ahead (CONFIRM agreeing),
        # while the hole below it waits for `grace`: revisions near it are real
        # too and tracked, not set aside again (they were, then counted missing
        # although received, when the hole was reported).
        self._anchor: int | None = None

    def start_after(self, revision: int) -> None:
        """Everything up to `revision` is accounted for."""
        with self._lock:
            self._next = revision + 1

    def resume(self, revisions: Iterable[int], replayed: Iterable[int] = ()) -> None:
        """Pick up after a restart from the revisions the audit log remembers
        (in the log's order): from the first of the trusted ones (see `trusted`
        and `_first_arrived`), so that holes among them
        are reported `grace` seconds from now, like any other (a hole the
        previous run had not yet reported used to be forgotten; one it had
        reported is reported again, and counted in `missing` again). With no
        trusted revisions, tracking starts as on an empty log. `replayed`: the
        revisions the log holds only as replays, which fill holes but never
        choose where tracking starts."""
        order = list(revisions)
        group = trusted(order)
        with self._lock:
            self._replayed.extend(replayed)
            del self._replayed[:-MAX_ASIDE]
            if not group:
                return
            self._next = _first_arrived(order, set(group))
            now = self._clock()
            for revision in group:
                if revision >= self._next:
                    self._track(revision, now)
            self._track_replayed(now)

    def plausible(self, revision: int) -> bool:
        """Whether `revision` is not far ahead of what is tracked (True before
        tracking starts: nothing to compare with yet)."""
        with self._lock:
            return self._next is None or not self._far_ahead(revision)

    def seen(self, revision: int, replay: bool = False) -> None:
        """Note a received revision (called for every event, duplicates included).

        A replay (an old change announced again) fills a hole, but never starts
        tracking: found by review, one received first on an empty log made
        every revision between it and the live ones "never arrived"."""
        with self._lock:
            if replay and self._next is None:
                self._replayed.append(revision)  # tracked once tracking starts
                del self._replayed[:-MAX_ASIDE]
                return
            if self._next is None or self._far_ahead(revision):
                self._set_aside(revision)
            elif revision < self._next:
                self._arrived_late(revision)
            else:
                if self._anchor is not None:
                    self._anchor = max(self._anchor, revision)
                self._track(revision, self._clock())

    def _far_ahead(self, revision: int) -> bool:
        """More than MAX_JUMP above the next expected revision and not near a
        confirmed group (see _anchor). Call with the lock held, tracking begun."""
        assert self._next is not None
        if self._anchor is not None and self._next > self._anchor:
            self._anchor = None  # caught up with the confirmed group
        near_anchor = self._anchor is not None and abs(revision - self._anchor) <= MAX_JUMP
        return revision - self._next > MAX_JUMP and not near_anchor

    def _track(self, revision: int, arrived: float) -> None:
        if revision not in self._arrived:
            self._arrived[revision] = arrived
            heapq.heappush(self._ahead, revision)
            self._advance()

    def _set_aside(self, revision: int) -> None:
        if self._next is not None:
            self.ignored += 1
        self._aside.append(revision)
        del self._aside[:-MAX_ASIDE]
        agreeing = {r for r in self._aside if abs(r - revision) <= MAX_JUMP}
        if len(agreeing) < CONFIRM:
            return
        arrived = self._aside
        self._aside = [r for r in arrived if r not in agreeing]
        if self._next is None:
            # The first events: nothing before them expected.
            self._next = _first_arrived(arrived, agreeing)
        else:
            self._anchor = max(agreeing)
        now = self._clock()
        for r in agreeing:  # the hole below them is reported after `grace`
            if r >= self._next:
                self._track(r, now)
        self._track_replayed(now)

    def _track_replayed(self, now: float) -> None:
        """Replays received before tracking started: they fill holes (a change
        announced only as a replay is not missing), never choose the start."""
        replayed, self._replayed = self._replayed, []
        for r in replayed:
            if r >= self._next and not self._far_ahead(r):  # type: ignore[operator]
                self._track(r, now)

    def _advance(self) -> None:
        assert self._next is not None
        while self._ahead and self._ahead[0] == self._next:
            del self._arrived[heapq.heappop(self._ahead)]
            self._next += 1

    def _arrived_late(self, revision: int) -> None:
        at = bisect.bisect_right(self._holes, [revision, float("inf")]) - 1
        if at < 0 or self._holes[at][1] < revision:
            return  # seen before, or older than what is tracked
        first, last = self._holes[at]
        if first == last:
            del self._holes[at]
        elif revision == first:
            self._holes[at][0] += 1
        elif revision == last:
            self._holes[at][1] -= 1
        else:
            self._holes[at:at + 1] = [[first, revision - 1], [revision + 1, last]]
            del self._holes[:-MAX_HOLES]
        self.missing -= 1
        self._late += 1

    def overdue(self) -> list[tuple[int, int]]:
        """Holes that later revisions have waited on for `grace` seconds, as
        (first, last) ranges; they are counted in `missing` and not reported again."""
        holes: list[tuple[int, int]] = []
        with self._lock:
            now = self._clock()
            while self._ahead and now - self._arrived[self._ahead[0]] >= self.grace:
                assert self._next is not None
                lowest = self._ahead[0]
                holes.append((self._next, lowest - 1))
                self._holes.append([self._next, lowest - 1])
                self.missing += lowest - self._next
                self._next = lowest
                self._advance()
            del self._holes[:-MAX_HOLES]
        return holes

    def take_late(self) -> int:
        """Reported revisions that arrived since the last call."""
        with self._lock:
            late, self._late = self._late, 0
            return late

    @property
    def tracking(self) -> bool:
        """Whether tracking has started (see the module doc)."""
        with self._lock:
            return self._next is not None

    @property
    def waiting(self) -> int:
        """Revisions received ahead of a hole (not yet reported)."""
        with self._lock:
            return len(self._ahead)
