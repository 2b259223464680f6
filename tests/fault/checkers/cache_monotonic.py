"""Checker 4: a portal never serves a value older than one it already knew.

What portal P knows about key k at time t: the revision of every change to k
that P acknowledged (an ok create/write/delete served by P, known from its
completion time) and every revision P is known to have received (events seen
on WatchTasks streams of P), up to t. Only events strictly before a read's
invoke count: one at the same instant may race it. A read served by P is
stale when:

- it found the record at revision r and P already knew a revision > r of k
  (a change or a deletion): the record it returned had been superseded; or
- it found k absent, the newest revision P knew of k (say r) was a
  create/write, and no deletion newer than r could have been committed before
  the read completed.

The second rule is weaker than "P must also have known of a deletion": a
read that misses the cache goes to the replicas and may rightly see a
deletion made through another portal that P has not heard of yet; that answer
is newer, not older. Deletions that count: an acked delete of k (any portal)
with a revision > r invoked before the read completed, an indeterminate
delete of k invoked before then, and any received revision > r of k (any
portal) that no acked create/write returned, since it might be a deletion.
A received revision is classified by the acked call that returned it.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Iterable, Sequence

from tests.fault.checkers.verdict import Verdict
from tests.fault.history import Call, History, Op, as_calls

NAME = "cache monotonic"
_MAX_SHOWN = 10

PRESENT, ABSENT, UNKNOWN = "record", "deletion", "change of unknown kind"


@dataclass(frozen=True)
class _Known:
    time: float
    revision: int
    kind: str            # PRESENT | ABSENT | UNKNOWN
    source: str          # readable: the acknowledging call, or the received event


def check_cache_monotonic(history: History | Iterable[Op],
                          received: Sequence[tuple[str, str, int, float]],
                          include_reads: bool = False) -> Verdict:
    """Find reads that a portal answered with something older than it knew.

    `received` holds (portal, key, revision, time) events a portal is known to
    have received. With include_reads=True, a found record that an earlier
    completed read on the same portal returned also counts as known (monotonic
    reads per portal), which is stronger than the stated property.
    """
    calls = as_calls(history)
    kind_of_revision = {(c.key, c.revision): (ABSENT if c.f == "delete" else PRESENT)
                        for c in calls if c.took_effect and c.revision is not None}
    known: dict[tuple[str, str], list[_Known]] = {}
    for call in calls:
        if call.took_effect and call.revision is not None:
            kind = ABSENT if call.f == "delete" else PRESENT
            known.setdefault((call.portal, call.key), []).append(
                _Known(call.completion.time, call.revision, kind,  # type: ignore[union-attr]
                       f"acknowledged: {call.summary()}"))
        elif include_reads and call.f == "read" and call.type == "ok" and call.result == "ok" \
                and call.revision is not None:
            known.setdefault((call.portal, call.key), []).append(
                _Known(call.completion.time, call.revision, PRESENT,  # type: ignore[union-attr]
                       f"served earlier: {call.summary()}"))
    for portal, key, revision, when in received:
        known.setdefault((portal, key), []).append(
            _Known(when, revision, kind_of_revision.get((key, revision), UNKNOWN),
                   f"received on {portal}: {key} rev {revision} t={when:.3f}"))
    newest = {pk: _newest_so_far(events) for pk, events in known.items()}
    # Deletions that might have been committed: (earliest time, revision or None).
    deletions: dict[str, list[tuple[float, int | None]]] = {}
    for call in calls:
        if call.f == "delete" and call.may_have_effect:
            deletions.setdefault(call.key, []).append((call.invoke.time, call.revision))
    for _, key, revision, when in received:
        if kind_of_revision.get((key, revision), UNKNOWN) != PRESENT:
            deletions.setdefault(key, []).append((when, revision))

    reads = [c for c in calls if c.f == "read" and c.type == "ok"]
    problems: list[list[str]] = []
    for read in reads:
        times, best = newest.get((read.portal, read.key), ([], []))
        at = bisect.bisect_left(times, read.invoke.time)  # events strictly before the invoke
        if at == 0:
            continue
        top = best[at - 1]
        if read.result == "ok":
            if read.revision is None or read.revision >= top.revision:
                continue
            why = f"found revision {read.revision}, but {read.portal} already knew revision " \
                  f"{top.revision} ({top.kind})"
        elif top.kind == PRESENT and not _deleted_since(deletions.get(read.key, []),
                                                        top.revision, read):
            why = f"found the key absent, but {read.portal} already knew the record at " \
                  f"revision {top.revision} and no deletion after it could explain the answer"
        else:
            continue
        problems.append([f"{read.key}: stale read on {read.portal}: {why}",
                         *read.lines("  "), f"  known before it: {top.source}"])
    checked = len(reads)
    if not problems:
        return Verdict(True, NAME, f"{checked} reads on {len({c.portal for c in calls})} portals "
                       "never older than what their portal knew")
    details = [line for p in problems[:_MAX_SHOWN] for line in p]
    if len(problems) > _MAX_SHOWN:
        details.append(f"... and {len(problems) - _MAX_SHOWN} more stale reads")
    return Verdict(False, NAME, f"{len(problems)} of {checked} reads were stale; first: "
                   f"{problems[0][0]}", details)


def _newest_so_far(events: list[_Known]) -> tuple[list[float], list[_Known]]:
    """Times in order, and for each prefix the event with the highest revision."""
    events = sorted(events, key=lambda e: e.time)
    times, best = [], []
    top: _Known | None = None
    for event in events:
        if top is None or event.revision > top.revision:
            top = event
        times.append(event.time)
        best.append(top)
    return times, best


def _deleted_since(deletions: list[tuple[float, int | None]], revision: int, read: Call) -> bool:
    """Could a deletion newer than `revision` have been committed before `read` completed?"""
    done = read.completion.time  # type: ignore[union-attr]
    return any(when < done and (rev is None or rev > revision) for when, rev in deletions)
