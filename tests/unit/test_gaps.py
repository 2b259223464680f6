"""RevisionGaps (daemons/listener/gaps.py): holes in the revisions the listener receives."""

from __future__ import annotations

from daemons.listener.gaps import RevisionGaps


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def tracker(grace: float = 10.0) -> tuple[RevisionGaps, Clock]:
    clock = Clock()
    return RevisionGaps(grace, clock), clock


def test_contiguous_and_reordered_revisions_leave_no_hole():
    gaps, clock = tracker()
    for revision in (5, 7, 6, 8, 10, 9, 9, 11):
        gaps.seen(revision)
    clock.now += 60
    assert gaps.overdue() == [] and gaps.missing == 0 and gaps.waiting == 0


def test_a_hole_is_reported_once_after_the_grace_of_the_revision_behind_it():
    gaps, clock = tracker()
    for revision in (1, 2, 5, 6):
        gaps.seen(revision)
    clock.now += 9.9
    assert gaps.overdue() == []
    clock.now += 0.2
    assert gaps.overdue() == [(3, 4)]
    assert gaps.missing == 2 and gaps.waiting == 0
    clock.now += 60
    assert gaps.overdue() == []
    gaps.seen(3)  # late: below the tracked range, nothing more to say
    gaps.seen(7)
    assert gaps.waiting == 0 and gaps.missing == 2


def test_a_late_revision_inside_the_grace_fills_the_hole():
    gaps, clock = tracker()
    for revision in (1, 3, 4):
        gaps.seen(revision)
    clock.now += 5
    gaps.seen(2)
    clock.now += 60
    assert gaps.overdue() == [] and gaps.missing == 0


def test_several_holes_each_wait_for_their_own_later_revision():
    gaps, clock = tracker()
    gaps.seen(1)
    gaps.seen(3)  # hole: 2
    clock.now += 8
    gaps.seen(6)  # hole: 4-5, noticed 8 s later
    clock.now += 3
    assert gaps.overdue() == [(2, 2)]
    clock.now += 6  # 6 has waited 9 s
    assert gaps.overdue() == []
    clock.now += 1
    assert gaps.overdue() == [(4, 5)]
    assert gaps.missing == 3


def test_start_after_the_log_s_highest_revision():
    gaps, clock = tracker()
    gaps.start_after(40)
    gaps.seen(39)  # an old straggler: not tracked
    gaps.seen(43)
    clock.now += 11
    assert gaps.overdue() == [(41, 42)]


def test_the_first_event_of_an_empty_log_expects_nothing_before_it():
    gaps, clock = tracker()
    gaps.seen(500)
    gaps.seen(501)
    clock.now += 60
    assert gaps.overdue() == [] and gaps.missing == 0
