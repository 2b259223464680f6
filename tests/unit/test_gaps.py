"""RevisionGaps (daemons/listener/gaps.py): holes in the revisions the listener receives."""

from __future__ import annotations

from daemons.listener import gaps as module
from daemons.listener.gaps import MAX_JUMP, RevisionGaps, trusted


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
    gaps.start_after(0)  # a log with history up to 0
    for revision in (1, 2, 5, 6):
        gaps.seen(revision)
    clock.now += 9.9
    assert gaps.overdue() == []
    clock.now += 0.2
    assert gaps.overdue() == [(3, 4)]
    assert gaps.missing == 2 and gaps.waiting == 0
    clock.now += 60
    assert gaps.overdue() == []
    gaps.seen(3)  # late: written, and no longer missing
    gaps.seen(7)
    assert gaps.waiting == 0 and gaps.missing == 1 and gaps.take_late() == 1


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
    gaps.start_after(0)  # a log with history up to 0
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


def test_the_first_events_of_an_empty_log_expect_nothing_before_them():
    gaps, clock = tracker()
    for revision in (501, 500, 502, 503, 504, 505, 506, 507, 508, 509, 511):
        gaps.seen(revision)
    clock.now += 60
    assert gaps.overdue() == [(510, 510)] and gaps.missing == 1


def test_a_reported_revision_that_arrives_late_is_no_longer_missing():
    gaps, clock = tracker()
    gaps.start_after(0)  # a log with history up to 0
    for revision in (1, 9, 10):
        gaps.seen(revision)
    clock.now += 11
    assert gaps.overdue() == [(2, 8)] and gaps.missing == 7
    for revision in (5, 2, 8, 5):  # 5 splits the hole; the second 5 is a duplicate
        gaps.seen(revision)
    assert gaps.missing == 4 and gaps.take_late() == 3 and gaps.take_late() == 0
    for revision in (3, 4, 6, 7):
        gaps.seen(revision)
    assert gaps.missing == 0 and gaps.take_late() == 4
    gaps.seen(1)  # an old, never-missing revision
    assert gaps.take_late() == 0


def test_only_the_newest_holes_are_remembered_but_all_stay_counted():
    gaps, clock = tracker()
    gaps.seen(0)
    for n in range(module.MAX_HOLES + 5):
        gaps.seen(2 * n + 2)  # a hole at every odd revision
        clock.now += 11
        gaps.overdue()
    assert gaps.missing == module.MAX_HOLES + 5
    gaps.seen(1)  # the oldest holes are forgotten
    assert gaps.take_late() == 0
    gaps.seen(2 * (module.MAX_HOLES + 4) + 1)
    assert gaps.take_late() == 1 and gaps.missing == module.MAX_HOLES + 4


def test_many_holes_are_reported_in_linear_time():
    """One portal that cannot publish makes every other revision a hole: the
    first version scanned all waiting revisions once per hole, under the lock
    paho's thread needs (a review: 2.2 s per tick at 4,000 events/s)."""
    gaps, clock = tracker()
    gaps.seen(0)
    for revision in range(2, 400_002, 2):
        gaps.seen(revision)
    clock.now += 11
    holes = gaps.overdue()
    assert len(holes) == 200_000 and holes[0] == (1, 1) and holes[-1] == (399_999, 399_999)
    assert gaps.missing == 200_000 and gaps.waiting == 0


def test_a_forged_huge_revision_is_not_tracked():
    """A forged event (any login allowed to publish) with revision 2**63-1 was
    reported as a hole of 9.2e18 revisions and made every real one look old."""
    gaps, clock = tracker()
    for revision in range(1, 101):
        gaps.seen(revision)
    gaps.seen(2**63 - 1)
    gaps.seen(101)
    gaps.seen(104)
    clock.now += 11
    assert gaps.overdue() == [(102, 103)]
    assert gaps.missing == 2 and gaps.ignored == 1


def test_tracking_resumes_only_from_a_group_of_confirmed_revisions():
    confirm = module.CONFIRM
    real = list(range(1, 21))
    assert trusted([]) == [] and trusted([5, 3, 4]) == []  # too few to tell from forgeries
    assert trusted(real + [2**63 - 1]) == real  # an isolated forged revision
    assert trusted(real + [10**12, 10**12 + 1]) == real  # two close forged ones
    jumped = [10 + MAX_JUMP + i for i in range(confirm)]
    assert trusted(real + jumped) == real + jumped  # a real jump within the bound
    far = [10**12 + i for i in range(confirm)]
    assert trusted(real + far) == far  # CONFIRM agreeing: a real loss of over MAX_JUMP


def test_a_restart_reports_the_holes_among_the_remembered_revisions():
    # The previous run stopped within `grace` of a hole: it must not be forgotten.
    gaps, clock = tracker()
    gaps.resume([r for r in range(1, 41) if r != 33] + [10**12, 10**12 + 1])
    gaps.seen(41)
    gaps.seen(43)
    clock.now += 11
    assert gaps.overdue() == [(33, 33), (42, 42)]
    assert gaps.missing == 2


def test_a_restart_with_too_little_history_starts_as_on_an_empty_log():
    gaps, clock = tracker()
    gaps.resume([10**12, 10**12 + 1])  # e.g. only forged events so far
    for revision in (5, 6, 8, 9, 10, 11, 12, 13, 14, 15, 16):
        gaps.seen(revision)
    clock.now += 11
    assert gaps.overdue() == [(7, 7)]


def test_a_loss_of_more_than_max_jump_is_reported_and_tracking_goes_on():
    """A listener that missed more than MAX_JUMP changes: the revisions after
    the loss are real (they keep coming), so after CONFIRM of them they are
    tracked and the loss is reported; it used to stop tracking for good."""
    gaps, clock = tracker()
    gaps.start_after(1000)
    start = 1000 + MAX_JUMP + 5
    for revision in range(start, start + module.CONFIRM):
        gaps.seen(revision)
    clock.now += 11
    assert gaps.overdue() == [(1001, start - 1)]
    gaps.seen(start + module.CONFIRM + 1)  # and the next hole is found as usual
    clock.now += 11
    assert gaps.overdue() == [(start + module.CONFIRM, start + module.CONFIRM)]


def test_after_a_confirmed_loss_the_revisions_that_follow_are_not_counted_missing():
    """Revisions arriving while the hole below a confirmed far-ahead group waits
    for `grace` were set aside again, and counted missing once it was reported
    (5 received revisions too many in a review's run)."""
    gaps, clock = tracker()
    gaps.start_after(100)
    for revision in range(101, 111):
        gaps.seen(revision)
    start = 100 + MAX_JUMP + 500
    for revision in range(start, start + 25):  # the stream after the loss, within grace
        gaps.seen(revision)
        clock.now += 0.3
    clock.now += 11
    assert gaps.overdue() == [(111, start - 1)]
    for revision in range(start + 25, start + 30):
        gaps.seen(revision)
    clock.now += 11
    assert gaps.overdue() == [] and gaps.missing == start - 111  # the true loss only


def test_a_forged_first_event_on_an_empty_log_does_not_anchor_tracking():
    gaps, clock = tracker()
    gaps.seen(2**63 - 1)
    for revision in (1, 2, 5, 6, 7, 8, 9, 10, 11, 12):
        gaps.seen(revision)
    clock.now += 11
    assert gaps.overdue() == [(3, 4)]


def test_a_late_low_revision_does_not_anchor_tracking_on_an_empty_log():
    """Found by review: 1001-1005, then a late 50, then 1006-: "950 revisions
    never arrived (51-1000)", changes made before the listener subscribed."""
    gaps, clock = tracker()
    for revision in (1001, 1002, 1003, 1004, 1005, 50, *range(1006, 1020)):
        gaps.seen(revision)
    clock.now += 11
    assert gaps.overdue() == [] and gaps.missing == 0


def test_a_late_low_revision_in_the_remembered_window_does_not_anchor_a_restart():
    """Found by review: 1-200 written, the window remembers the last 50 (151-200)
    and a late 20; after a restart "131 revisions never arrived (21-151)"."""
    gaps, clock = tracker()
    gaps.resume([*range(151, 201), 20])  # the log's order
    gaps.seen(201)
    clock.now += 11
    assert gaps.overdue() == [] and gaps.missing == 0
    gaps.seen(203)
    clock.now += 11
    assert gaps.overdue() == [(202, 202)]  # holes after the start are still reported


def test_a_replay_received_first_does_not_start_tracking_but_fills_a_hole():
    """Found by review: a replay of revision 100 received first on an empty log,
    then the live 500..511, reported "399 revisions never arrived"."""
    gaps, clock = tracker()
    gaps.seen(100, replay=True)
    for revision in range(500, 512):
        gaps.seen(revision)
    clock.now += 60
    assert gaps.overdue() == [] and gaps.missing == 0
    gaps.seen(512)
    gaps.seen(514)
    clock.now += 60
    assert gaps.overdue() == [(513, 513)]
    gaps.seen(513, replay=True)  # the change announced again fills its hole
    assert gaps.missing == 0



def test_a_change_announced_only_as_a_replay_is_not_missing():
    """Found by review: a replay received before tracking started was dropped,
    and after a restart replays were left out, so a revision the log held only
    as a replay was reported "never arrived"."""
    gaps, clock = tracker()
    for revision in range(1, 21):
        if revision == 5:
            gaps.seen(5, replay=True)  # before tracking starts (10 agreeing)
        else:
            gaps.seen(revision)
    clock.now += 60
    assert gaps.overdue() == [] and gaps.missing == 0
    restarted, clock = tracker()
    restarted.resume([r for r in range(1, 21) if r != 15], replayed=[15])
    clock.now += 60
    assert restarted.overdue() == [] and restarted.missing == 0
