"""Checker 1: no acknowledged write is lost and none is applied twice.

Compares the history with the final state read LINEARIZABLE after every
client stopped. Revisions carry the argument: the replicas number committed
changes with one global counter, a record keeps the revision of its last
change, and a refused or failed call consumes none. So for each key the final
revision R is the largest revision of any change to it, and the final value is
the one written by the change numbered R.

Rules (each sound: a correct system never breaks one, whatever the
indeterminate calls did). "Acked" means an ok completion with result "ok";
"info" calls (and calls without completion) may or may not have taken effect;
"fail" calls and refused calls ("exists"/"absent") had none.

1. Duplicate revision: two acked creates/writes/deletes (any keys) returned the
   same revision: one change acknowledged twice, or a revision reused.
2. Newer than final: an acked change to key k returned revision r > R, the
   final revision of k (k present): that change was lost.
3. Lost write, key present: an acked create/write of v at revision r, final
   (u, R) with u != v and R <= r: nothing overwrote it after r. (R == r with
   u != v is reported the same way: revision r cannot name two values.)
4. Lost write, key absent: an acked create/write at revision r and no delete
   of k that is info, or acked with revision > r: nothing deleted it after.
5. Final value: the final (v, R) of k must come from a create/write of v to k
   that was acked or info; if only failed or refused calls wrote v it is
   reported as "a call with no effect took effect", if none did as "never
   written". If acked writers of v exist, none returned R and no info call
   wrote v, v was applied again later (a duplicate), or R is wrong.
6. Missing key: a key the history acked a create/write for is absent from
   `final_state` (the caller must say None for absent keys); a key present in
   `final_state` that no call in the history wrote falls under rule 5.

When an acked call lacks a revision (the harness could not record one), rules
2-4 fall back to real time: the write is lost unless some other acked or info
change of the key did not finish before it began.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from tests.fault.checkers.verdict import Verdict
from tests.fault.history import Call, History, Op, as_calls, by_key

NAME = "no lost or duplicated writes"
_MAX_SHOWN = 10
FinalState = Mapping[str, "tuple[Any, int] | None"]


def check_no_lost_or_duplicated(history: History | Iterable[Op],
                                final_state: FinalState) -> Verdict:
    """Check the history's acknowledged changes against the final state; see the module doc."""
    calls = as_calls(history)
    problems: list[list[str]] = []
    problems += _duplicate_revisions(calls)
    keyed = by_key(calls)
    for key in sorted(set(keyed) | {k for k, v in final_state.items() if v is not None}):
        problems += _check_key(key, keyed.get(key, []), final_state)
    acked = sum(1 for c in calls if c.took_effect)
    if not problems:
        return Verdict(True, NAME, f"{acked} acknowledged changes on {len(keyed)} keys all "
                       "accounted for in the final state, no revision reused")
    details: list[str] = []
    for lines in problems[:_MAX_SHOWN]:
        details += lines
    if len(problems) > _MAX_SHOWN:
        details.append(f"... and {len(problems) - _MAX_SHOWN} more violations")
    count = f"{len(problems)} violation" + "s" * (len(problems) != 1)
    return Verdict(False, NAME, f"{count}; first: {problems[0][0]}", details)


def _duplicate_revisions(calls: list[Call]) -> list[list[str]]:
    seen: dict[int, list[Call]] = {}
    for call in calls:
        if call.took_effect and call.revision is not None:
            seen.setdefault(call.revision, []).append(call)
    return [[f"revision {rev} returned by {len(group)} acknowledged changes "
             "(applied twice, or a revision reused):"] + [f"  {c.summary()}" for c in group]
            for rev, group in sorted(seen.items()) if len(group) > 1]


def _final_line(key: str, final: tuple[Any, int] | None) -> str:
    if final is None:
        return f"  final state of {key}: absent"
    return f"  final state of {key}: {final[0]!r} rev {final[1]}"


def _check_key(key: str, calls: list[Call], final_state: FinalState) -> list[list[str]]:
    acked_writes = [c for c in calls if c.took_effect and c.f in ("create", "write")]
    if key not in final_state:
        if acked_writes:
            return [[f"{key}: final state not given, but {len(acked_writes)} acknowledged "
                     "writes of it could be lost (give None for an absent key)"]]
        return []
    final = final_state[key]
    problems: list[list[str]] = []
    flagged: set[int] = set()
    if final is not None:
        problems += _check_final_value(key, calls, final)
        final_rev = final[1]
        for call in calls:
            if call.took_effect and call.revision is not None and final_rev is not None \
                    and call.revision > final_rev:
                flagged.add(call.start)
                problems.append([f"{key}: acknowledged change at revision {call.revision} is "
                                 f"newer than the final revision {final_rev}: lost",
                                 f"  {call.summary()}", _final_line(key, final)])
    for write in acked_writes:
        lost = None if write.start in flagged else _lost_write(key, write, calls, final)
        if lost:
            problems.append(lost)
    return problems


def _check_final_value(key: str, calls: list[Call], final: tuple[Any, int]) -> list[list[str]]:
    value, final_rev = final
    writers = [c for c in calls if c.f in ("create", "write") and c.argument == value]
    effective = [c for c in writers if c.may_have_effect]
    if not effective:
        if writers:
            return [[f"{key}: final value {value!r} was written only by calls with no effect "
                     "(failed or refused), yet it is there"]
                    + [f"  {c.summary()}" for c in writers] + [_final_line(key, final)]]
        return [[f"{key}: final value {value!r} was never written by any call in the history",
                 _final_line(key, final)]]
    acked = [c for c in effective if c.took_effect and c.revision is not None]
    if len(acked) != len(effective) or final_rev is None:
        return []  # an info or revision-less writer: cannot tell
    if any(c.revision == final_rev for c in acked):
        return []
    return [[f"{key}: final value {value!r} has revision {final_rev}, but its write was "
             "acknowledged at another revision: applied again later, or the revision is wrong"]
            + [f"  {c.summary()}" for c in acked] + [_final_line(key, final)]]


def _lost_write(key: str, write: Call, calls: list[Call],
                final: tuple[Any, int] | None) -> list[str] | None:
    """Lines describing why `write` is lost, or None if it is accounted for."""
    rev = write.revision
    if final is not None:
        value, final_rev = final
        if value == write.argument:
            return None  # still there; rule 5 checks the revision
        if rev is not None and final_rev is not None:
            if final_rev > rev:
                return None
            return [f"{key}: acknowledged write at revision {rev} is lost: the final value "
                    f"differs and its revision {final_rev} is not newer",
                    f"  {write.summary()}", _final_line(key, final)]
        later = [c for c in calls if c is not write and c.may_have_effect
                 and _not_before(c, write)]
        if later:
            return None
        return [f"{key}: acknowledged write is lost: the final value differs and no other "
                "change could have come after it", f"  {write.summary()}", _final_line(key, final)]
    deletes = _deletes(calls)
    if deletes.any_info or (rev is not None and deletes.max_revision > rev):
        return None
    for delete in deletes.without_revision if rev is not None else deletes.calls:
        if _not_before(delete, write):
            return None
    lines = [f"{key}: acknowledged write at revision {rev} is lost: the key is absent and no "
             "delete could have come after it", f"  {write.summary()}"]
    lines += [f"  (earlier delete) {d.summary()}" for d in deletes.calls[:_MAX_SHOWN]]
    return lines + [_final_line(key, final)]


class _Deletes:
    """A key's deletes that may have taken effect, summarised once (not per write:
    a soak history holds tens of thousands of writes per key)."""

    def __init__(self, calls: list[Call]) -> None:
        self.calls = [c for c in calls if c.f == "delete" and c.may_have_effect]
        self.any_info = any(c.type == "info" for c in self.calls)
        revisions = [c.revision for c in self.calls if c.revision is not None]
        self.max_revision = max(revisions, default=0)
        self.without_revision = [c for c in self.calls if c.revision is None]


_DELETES: dict[int, tuple[list[Call], _Deletes]] = {}


def _deletes(calls: list[Call]) -> _Deletes:
    cached = _DELETES.get(id(calls))
    if cached is None or cached[0] is not calls:
        cached = (calls, _Deletes(calls))
        _DELETES.clear()
        _DELETES[id(calls)] = cached
    return cached[1]


def _not_before(call: Call, other: Call) -> bool:
    """True unless `call` finished before `other` was invoked."""
    return call.end is None or call.end > other.start
