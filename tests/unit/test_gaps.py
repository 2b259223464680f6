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
    assert gaps.seen(3) is True  # late: written, and no longer missing
    gaps.seen(7)
    assert gaps.waiting == 0 and gaps.missing == 1


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


def test_a_reported_revision_that_arrives_late_is_no_longer_missing():
    gaps, clock = tracker()
    for revision in (1, 9, 10):
        gaps.seen(revision)
    clock.now += 11
    assert gaps.overdue() == [(2, 8)] and gaps.missing == 7
    assert gaps.seen(5) is True  # splits the hole
    assert gaps.seen(2) is True and gaps.seen(8) is True
    assert gaps.seen(5) is False  # a duplicate of a late one
    assert gaps.missing == 4
    for revision in (3, 4, 6, 7):
        assert gaps.seen(revision) is True
    assert gaps.missing == 0
    assert gaps.seen(1) is False  # an old, never-missing revision


def test_only_the_newest_holes_are_remembered_but_all_stay_counted():
    from daemons.listener import gaps as module

    gaps, clock = tracker()
    gaps.seen(0)
    for n in range(module.MAX_HOLES + 5):
        gaps.seen(2 * n + 2)  # a hole at every odd revision
        clock.now += 11
        gaps.overdue()
    assert gaps.missing == module.MAX_HOLES + 5
    assert gaps.seen(1) is False  # the oldest holes are forgotten
    assert gaps.seen(2 * (module.MAX_HOLES + 4) + 1) is True
    assert gaps.missing == module.MAX_HOLES + 4
