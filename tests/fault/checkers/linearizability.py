"""Checker 2: every key's history is linearizable as a register with an ABSENT state.

Keys are independent registers, so each key is checked on its own. The model:

    create(v): ABSENT -> v, "ok";  present: "exists", no change
    write(v):  present -> v, "ok"; ABSENT: "absent", no change
    delete:    present -> ABSENT, "ok"; ABSENT: "absent", no change
    read:      present: its value, "ok"; ABSENT: None, "absent"

With revisions=True (the default) the state also tracks the key's last-change
revision, because the replicas number changes with one global counter in
commit order: an acked change must return a revision greater than the
previous change's, and a read that found the record must return the revision
of the change that wrote it. An indeterminate change has an unknown revision,
known only to exceed the previous one, so the state keeps a lower bound until
a read reveals it.

The search is Wing & Gong's as improved by Lowe ("Testing for linearizability",
2017): walk the events in real-time order, linearize any pending call whose
model step matches its result, backtrack when a call's completion is reached
before it was linearized, and memoize (set of linearized calls, state) pairs
so no configuration is explored twice. "fail" calls are dropped; "info" calls
(and calls without completion) have no completion event, so they may be
linearized anywhere after their invoke or never, with whatever outcome the
model gives. Reductions that keep the search small, each exact (it never
changes the answer):

- info reads constrain nothing and are dropped;
- values no read returned are interchangeable (only reads compare values), so
  they become one UNREAD value, and an info write of one is dropped (it can
  only turn one unread value into another);
- identical info calls (same function and value) are taken in invoke order
  instead of in every subset;
- an info call that would change nothing is left pending;
- a determinate call that changes nothing (a read, a refusal) and fits now is
  linearized at once, without branching: moving such a call earlier, to a
  point where it fits, never breaks a valid order;
- with revisions, acked changes are linearized in revision order;
- a read of a value that no call could have written fails at once.

Each key's search has a step budget and the whole check a deadline; a key
that exceeds either is reported as unknown, which is not a pass.

On a violation the report shrinks the key's history to a small window that is
still non-linearizable, using only relaxations, so the window is itself a
witness against the full history: (1) the shortest failing prefix of events
(calls still running at the cut become indeterminate); (2) the latest start
of a window, with the state before it left open (any state an earlier change
could have produced) and calls that began before it made indeterminate;
(3) dropping reads and refused calls, which only ever constrain.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from tests.fault.checkers.verdict import Verdict
from tests.fault.history import EFFECTS, REFUSAL, Call, History, Op, as_calls, by_key

NAME = "linearizable"
# (present, value, revision bound, bound exact?, acked changes applied so far)
State = tuple
_EMPTY: State = (False, None, 0, False, 0)
_MAX_KEYS_SHOWN = 3
_MAX_INITIALS = 64
_SHRINK_STEPS = 200_000
_MAX_SHRINK_RUNS = 300


@dataclass(frozen=True)
class SearchOp:
    """A call as the search sees it. end=None: indeterminate (outcome unknown)."""

    start: float
    end: int | None
    f: str
    arg: Any
    result: str
    out: Any
    revision: int | None
    call: Call
    note: str = ""
    rank: int | None = None   # place of an acked change in revision order
    twin: int = -1            # an identical indeterminate call invoked earlier (its index)

    @property
    def determinate(self) -> bool:
        return self.end is not None

    @property
    def took_effect(self) -> bool:
        return self.determinate and self.f in EFFECTS and self.result == "ok"

    @property
    def may_have_effect(self) -> bool:
        return self.f in EFFECTS and (self.took_effect or not self.determinate)

    def relaxed(self, note: str, start: float | None = None) -> SearchOp:
        """The same call with its outcome forgotten."""
        return dataclasses.replace(self, end=None, result="", out=None, revision=None,
                                   note=note, start=self.start if start is None else start)


@dataclass
class SearchResult:
    outcome: str                 # "ok" | "violation" | "unknown"
    steps: int = 0
    backtracks: int = 0
    best: list[SearchOp] = dataclasses.field(default_factory=list)
    stuck: SearchOp | None = None   # first completion reached that `best` could not cover


def register_step(state: State, op: SearchOp, track: bool) -> State | None:
    """The state after linearizing `op` in `state`, or None if its result disagrees."""
    present, value, bound, exact, applied = state
    if op.f == "read":
        if not present:
            return state if op.result == "absent" else None
        if op.result != "ok" or op.out != value:
            return None
        rev = op.revision
        if rev is None:
            return state
        if exact:
            return state if rev == bound else None
        return (True, value, rev, True, applied) if rev >= bound else None
    if op.rank is not None and op.rank != applied:
        return None  # acked changes commit in revision order
    applies = (not present) if op.f == "create" else present
    if not applies:
        if not op.determinate:
            return state
        return state if op.result == REFUSAL[op.f] else None
    if op.determinate and op.result != "ok":
        return None
    now_present = op.f != "delete"
    now_value = op.arg if now_present else None
    rev = op.revision
    if rev is None:
        # Unknown revision, known to exceed the previous change's.
        return (now_present, now_value, bound + 1 if track else bound, False, applied)
    if rev <= bound:
        return None
    return (now_present, now_value, rev, True, applied + (op.rank is not None))


def check_register(ops: list[SearchOp], initials: list[State], track: bool, max_steps: int,
                   deadline: float | None = None) -> SearchResult:
    """Is there a linearization of `ops` from one of `initials`? Prepares the
    calls (see `prepared`), answers at once when a read returns a value no call
    or initial state could have produced, and otherwise runs the search."""
    ops, initials = prepared(ops, initials)
    producible = {op.arg for op in ops if op.f in ("create", "write")} \
        | {state[1] for state in initials if state[0]}
    for op in ops:
        if op.f == "read" and op.determinate and op.result == "ok" and op.out not in producible:
            return SearchResult("violation", stuck=op)
    return search(ops, initials, lambda state, op: register_step(state, op, track),
                  max_steps, deadline)


def prepared(ops: list[SearchOp], initials: list[State]) -> tuple[list[SearchOp], list[State]]:
    """The calls and initial states as the search needs them.

    - A value that no read among `ops` returned is replaced by UNREAD: such
      values are interchangeable, since only reads compare values.
    - An indeterminate write of such a value is dropped: it can only turn one
      unread value into another, or be refused, so it never helps.
    - Each acked change gets its place in revision order.
    - Each indeterminate call is linked to the identical one (same function and
      value) invoked just before it: neither ever completes, so they are
      interchangeable and the search takes them in invoke order instead of
      trying every subset.
    """
    observed = {op.out for op in ops if op.f == "read" and op.determinate and op.result == "ok"}
    kept = []
    for op in ops:
        if op.f in ("create", "write") and op.arg not in observed:
            if op.f == "write" and not op.determinate:
                continue
            op = dataclasses.replace(op, arg=UNREAD)
        kept.append(op)
    starts = [(s[0], s[1] if not s[0] or s[1] in observed else UNREAD, *s[2:]) for s in initials]
    revisions = sorted(op.revision for op in kept if op.took_effect and op.revision is not None)
    place: dict[int, int] = {}
    for i, rev in enumerate(revisions):
        place.setdefault(rev, i)
    twin: dict[int, int] = {}
    last: dict[tuple[str, Any], int] = {}
    for i in sorted(range(len(kept)), key=lambda i: kept[i].start):
        if not kept[i].determinate:
            kind = (kept[i].f, kept[i].arg)
            twin[i] = last.get(kind, -1)
            last[kind] = i
    return ([dataclasses.replace(op, twin=twin.get(i, -1),
                                 rank=place[op.revision] if op.took_effect
                                 and op.revision is not None else None)
             for i, op in enumerate(kept)], list(dict.fromkeys(starts)))


def search(ops: list[SearchOp], initials: list[State],
           step: Callable[[State, SearchOp], State | None],
           max_steps: int, deadline: float | None = None) -> SearchResult:
    """Lowe's WGL search with memoization over (linearized set, state).

    Succeeds if the calls linearize from any of `initials`; the memo is shared
    between them, since a configuration that failed fails however it was reached.
    """
    entries = [(op.start, 0, i) for i, op in enumerate(ops)]
    entries += [(op.end, 1, i) for i, op in enumerate(ops) if op.end is not None]
    entries.sort(key=lambda e: (e[0], e[1]))
    n = len(entries)
    # Doubly linked list over nodes 1..n; node 0 is the head; -1 ends it.
    nxt = list(range(1, n + 1)) + [-1]
    prv = [-1] + list(range(n))
    op_of = [-1] + [e[2] for e in entries]
    is_return = [False] + [e[1] == 1 for e in entries]
    return_node = {e[2]: node for node, e in enumerate(entries, 1) if e[1] == 1}
    match = [-1] + [return_node.get(e[2], -1) if e[1] == 0 else -1 for e in entries]
    result = SearchResult("ok")
    if not return_node:
        return result

    def lift(node: int) -> None:
        nxt[prv[node]] = nxt[node]
        if nxt[node] != -1:
            prv[nxt[node]] = prv[node]
        m = match[node]
        if m != -1:
            nxt[prv[m]] = nxt[m]
            if nxt[m] != -1:
                prv[nxt[m]] = prv[m]

    def unlift(node: int) -> None:
        m = match[node]
        if m != -1:
            nxt[prv[m]] = m
            if nxt[m] != -1:
                prv[nxt[m]] = m
        nxt[prv[node]] = node
        if nxt[node] != -1:
            prv[nxt[node]] = node

    seen: set[tuple[int, State]] = set()
    steps = backtracks = 0
    best_depth = -1
    for initial in initials:
        result.outcome = "ok"
        remaining = len(return_node)
        stack: list[tuple[int, State, bool]] = []  # (call node, state before it, forced?)
        state, linearized = initial, 0
        node, fresh = nxt[0], True
        while True:
            steps += 1
            if steps > max_steps or (deadline is not None and steps & 1023 == 0
                                     and time.monotonic() > deadline):
                result.outcome = "unknown"
                break
            take, forced, dead = -1, False, False
            if fresh:
                # A determinate call that leaves the state as it is (a read, a
                # refusal) may be linearized at once without loss of generality:
                # that never rules out an order that works. So take it and do not
                # branch here; if that fails, this configuration fails.
                fresh = False
                scan = nxt[0]
                while scan != -1 and not is_return[scan]:
                    op = ops[op_of[scan]]
                    if op.end is not None and step(state, op) == state:
                        take, forced = scan, True
                        break
                    scan = nxt[scan]
                if take == -1:
                    node = nxt[0]
                elif (linearized | (1 << op_of[take]), state) in seen:
                    dead = True
            if take == -1 and not dead:
                if node == -1:  # only indeterminate calls left; none has to take effect
                    break
                if is_return[node]:  # a call completed before we could linearize it
                    if len(stack) >= best_depth and result.stuck is None:
                        result.stuck = ops[op_of[node]]
                    dead = True
                else:
                    op = ops[op_of[node]]
                    if op.twin != -1 and not linearized >> op.twin & 1:
                        node = nxt[node]
                        continue
                    after = step(state, op)
                    # An indeterminate call that changes nothing is better left pending.
                    if after is None or (op.end is None and after == state) \
                            or (linearized | (1 << op_of[node]), after) in seen:
                        node = nxt[node]
                        continue
                    take = node
            if dead:
                resumed = False
                while stack:
                    node, state, was_forced = stack.pop()
                    linearized &= ~(1 << op_of[node])
                    unlift(node)
                    if match[node] != -1:
                        remaining += 1
                    backtracks += 1
                    if not was_forced:  # resume that configuration at its next candidate
                        resumed = True
                        break
                if not resumed:
                    result.outcome = "violation"
                    break
                node = nxt[node]
                continue
            after = step(state, ops[op_of[take]])
            config = (linearized | (1 << op_of[take]), after)
            seen.add(config)
            stack.append((take, state, forced))
            state, linearized = after, config[0]
            lift(take)
            if match[take] != -1:
                remaining -= 1
            if len(stack) > best_depth:
                best_depth = len(stack)
                result.best = [ops[op_of[nd]] for nd, _, _ in stack]
                result.stuck = None
            if remaining == 0:
                break
            node, fresh = nxt[0], True
        if result.outcome != "violation":
            break
    result.steps, result.backtracks = steps, backtracks
    return result


def check_linearizable(history: History | Iterable[Op], *, revisions: bool = True,
                       cached_reads: bool = False,
                       initial_state: Mapping[str, tuple[Any, int] | None] | None = None,
                       max_steps: int = 2_000_000, time_limit: float = 120.0,
                       shrink_seconds: float = 10.0) -> Verdict:
    """Check each key's calls against the register model; see the module doc.

    revisions: also check revision order (default). cached_reads: include reads
    whose invoke says consistency="cached" (by default only the others count,
    since a cache may lag other portals' writes). initial_state: key -> (value,
    revision) or None for keys that existed before the history (default: all
    absent). max_steps is per key; time_limit bounds the whole check.
    """
    started = time.monotonic()
    deadline = started + time_limit
    keyed = by_key(as_calls(history))
    failures: list[tuple[str, list[str]]] = []
    unknown: list[str] = []
    total_steps = 0
    for key in sorted(keyed):
        ops = normalize(keyed[key], revisions, cached_reads)
        init = _initial(key, initial_state, revisions)
        outcome = check_register(ops, [init], revisions, max_steps, deadline)
        total_steps += outcome.steps
        if outcome.outcome == "unknown":
            unknown.append(key)
        elif outcome.outcome == "violation":
            shrink_deadline = min(time.monotonic() + shrink_seconds, deadline + shrink_seconds)
            failures.append((key, explain(key, ops, init, revisions, outcome, shrink_deadline)))
    count = sum(len(c) for c in keyed.values())
    elapsed = time.monotonic() - started
    if failures:
        details = [line for _, lines in failures[:_MAX_KEYS_SHOWN] for line in lines]
        if len(failures) > _MAX_KEYS_SHOWN:
            details.append(f"... and {len(failures) - _MAX_KEYS_SHOWN} more keys: "
                           + ", ".join(k for k, _ in failures[_MAX_KEYS_SHOWN:]))
        if unknown:
            details.append(f"undecided within budget: {', '.join(unknown)}")
        return Verdict(False, NAME, f"{len(failures)} of {len(keyed)} keys not linearizable: "
                       + ", ".join(k for k, _ in failures), details)
    if unknown:
        return Verdict(False, NAME, f"unknown: {len(unknown)} of {len(keyed)} keys undecided "
                       f"within the budget ({max_steps} steps per key, {time_limit:.0f}s)",
                       [f"undecided: {', '.join(unknown)}"], unknown=True)
    return Verdict(True, NAME, f"{len(keyed)} keys, {count} calls linearizable "
                   f"({total_steps} search steps, {elapsed:.2f}s)")


def _initial(key: str, initial_state: Mapping[str, tuple[Any, int] | None] | None,
             track: bool) -> State:
    given = (initial_state or {}).get(key)
    if given is None:
        return _EMPTY
    value, rev = _hashable(given[0]), given[1]
    return (True, value, rev, True, 0) if track and rev is not None \
        else (True, value, 0, False, 0)


class _Unread:
    """Stands for any value no read returned: such values are interchangeable
    in the model (only reads compare values), so states that differ only in
    them are one state to the search."""

    def __repr__(self) -> str:
        return "<a value no read returned>"


UNREAD = _Unread()


def _hashable(value: Any) -> Any:
    try:
        hash(value)
        return value
    except TypeError:
        return json.dumps(value, sort_keys=True, default=repr)


def normalize(calls: list[Call], revisions: bool = True,
              cached_reads: bool = False) -> list[SearchOp]:
    """One key's calls as SearchOps, minus those that cannot matter (see module doc)."""
    def counted(call: Call) -> bool:
        return cached_reads or call.invoke.consistency != "cached"

    ops = []
    for call in calls:
        if call.type == "fail":
            continue
        if call.f == "read" and (call.type != "ok" or not counted(call)):
            continue
        ops.append(SearchOp(
            start=call.start, end=call.end, f=call.f, arg=_hashable(call.argument),
            result=call.result, out=_hashable(call.read_value),
            revision=call.revision if revisions else None, call=call))
    return ops


# -- explaining a violation ------------------------------------------------------


@dataclass
class _Window:
    ops: list[SearchOp]
    initials: list[State]
    first: int          # first event index in the window (-1: from the start)
    cut: int            # events before this index only
    result: SearchResult | None = None
    # For each initial state, the calls that could have left it (None: the initial state).
    sources: dict = dataclasses.field(default_factory=dict)


class _Shrinker:
    """Bounded search for a small window that is still non-linearizable."""

    def __init__(self, track: bool, deadline: float) -> None:
        self.track = track
        self.deadline = deadline
        self.runs = 0

    def fails(self, window: _Window) -> bool:
        """True only if the window fails from every initial state (never on 'unknown')."""
        if not window.initials or len(window.initials) > _MAX_INITIALS \
                or self.runs >= _MAX_SHRINK_RUNS or time.monotonic() > self.deadline:
            return False
        self.runs += 1
        result = check_register(window.ops, window.initials, self.track, _SHRINK_STEPS,
                                self.deadline)
        if result.outcome != "violation":
            return False
        window.result = result
        return True


def _prefix(ops: list[SearchOp], cut: int) -> list[SearchOp]:
    """Calls invoked before event `cut`; those still running at the cut become
    indeterminate, and reads and refusals among them are dropped."""
    out = []
    for op in ops:
        if op.start >= cut:
            continue
        if op.end is not None and op.end >= cut:
            if not op.took_effect:
                continue  # a read or a refusal: dropping it only removes a constraint
            op = op.relaxed("completed after the window; outcome ignored")
        out.append(op)
    return out


def _post_state(op: SearchOp) -> State:
    rev = op.revision if op.determinate else None
    present = op.f != "delete"
    return (present, op.arg if present else None, rev or 0, rev is not None, 0)


def _window(prefix: list[SearchOp], first: int, cut: int, initial: State) -> _Window:
    """Calls invoked at or after event `first`, starting from any state the calls
    before it could have left; calls running across `first` become indeterminate."""
    done = [op for op in prefix if op.end is not None and op.end < first]
    finished = {id(op) for op in done}
    across = [op for op in prefix if op.start < first and id(op) not in finished]
    inside = [op for op in prefix if op.start >= first]
    acked = [op.start for op in done if op.took_effect]
    latest = max(acked) if acked else None
    # The state at the window's start was set by the last change before it; a
    # change that finished before another acked change began cannot be last.
    producers = [op for op in done + across if op.may_have_effect
                 and (latest is None or op.end is None or op.end > latest)]
    sources: dict[State, list[SearchOp | None]] = {}
    if latest is None:
        sources[initial] = [None]
    for op in producers:
        sources.setdefault(_post_state(op), []).append(op)
    carried = [op.relaxed("started before the window; outcome ignored", start=first - 0.5)
               for op in across if op.may_have_effect]
    return _Window(carried + inside, list(sources), first, cut, sources=sources)


def explain(key: str, ops: list[SearchOp], initial: State, track: bool, found: SearchResult,
            deadline: float) -> list[str]:
    """Readable lines: the smallest failing window of `key` found within the effort bound."""
    shrinker = _Shrinker(track, deadline)
    positions = sorted({int(op.start) for op in ops} | {op.end for op in ops
                                                        if op.end is not None})
    best = _Window(ops, [initial], -1, positions[-1] + 1 if positions else 0, found)

    # (1) The shortest failing prefix; failing prefixes are upward closed, so bisect.
    lo, hi = 0, len(positions) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        trial = _Window(_prefix(ops, positions[mid] + 1), [initial], -1, positions[mid] + 1)
        if shrinker.fails(trial):
            hi, best = mid, trial
        else:
            lo = mid + 1

    # (2) The latest window start that still fails: step back from the call the
    # search could not place, doubling the distance, then bisect.
    prefix = best.ops
    starts = sorted({int(op.start) for op in prefix if op.start >= 0})
    stuck = best.result.stuck if best.result is not None else None
    anchor = int(stuck.start) if stuck is not None else best.cut
    upper = max((i for i, st in enumerate(starts) if st <= anchor), default=0)
    failing, passing, back = 0, None, 0
    i = upper
    while i > 0:
        trial = _window(prefix, starts[i], best.cut, initial)
        if shrinker.fails(trial):
            failing, best = i, trial
            break
        passing = i
        back = back * 2 + 1
        i = max(0, upper - back)
    lo, hi = failing, (passing - 1 if passing is not None else failing)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        trial = _window(prefix, starts[mid], best.cut, initial)
        if shrinker.fails(trial):
            lo, best = mid, trial
        else:
            hi = mid - 1

    # (3) Drop reads and refusals one at a time while it still fails.
    for op in list(best.ops):
        if op.determinate and not op.took_effect:
            trial = dataclasses.replace(best, ops=[o for o in best.ops if o is not op],
                                        result=None)
            if shrinker.fails(trial):
                best = trial
    return _report(key, ops, best)


def _show_state(state: State) -> str:
    present, value, bound, exact, _ = state
    what = repr(value) if present else "absent"
    return f"{what} (rev {bound})" if exact else what


def _report(key: str, ops: list[SearchOp], window: _Window) -> list[str]:
    background = [op for op in window.ops if op.call.type == "info"
                  and op.call.start < window.first]
    shown = [op for op in window.ops if all(op is not b for b in background)]
    lines = [f"{key}: not linearizable; smallest failing window found: {len(shown)} of "
             f"{len(ops)} calls"]
    observed = {op.out for op in shown if op.f == "read" and op.determinate and op.result == "ok"}
    unread = "a value no read in the window returned"
    if window.first >= 0:
        lines.append(f"  window: events #{window.first}..#{window.cut - 1}; the state before "
                     "it, left by the last change before it, is one of:")
        labels: dict[str, list[SearchOp | None]] = {}
        # Many states holding values no read returned are shown as one line.
        many = sum(1 for st in window.initials if st[0] and st[1] not in observed) > 4
        for state in window.initials:
            grouped = many and state[0] and state[1] not in observed
            label = unread if grouped else _show_state(state)
            labels.setdefault(label, []).extend(window.sources.get(state, []))
        for label, makers in labels.items():
            acked = [m for m in makers if m is not None and m.call.type == "ok"]
            others = len(makers) - len(acked) - makers.count(None)
            parts = ["the initial state"] * (None in makers) + [m.call.summary()
                                                                for m in acked[:3]]
            if len(acked) > 3:
                parts.append(f"{len(acked) - 3} more acknowledged calls")
            if others:
                parts.append(f"{others} indeterminate call" + "s" * (others != 1))
            lines.append(f"    {label}: " + "; ".join(parts))
    if background:
        groups: dict[str, list[str]] = {}
        for op in background:
            if op.f == "delete":
                what = "delete"
            elif op.arg in observed:
                what = f"{op.f} {op.call.argument!r}"
            else:
                what = f"{op.f} of an unread value"
            groups.setdefault(what, []).append(f"p{op.call.process} #{op.call.start}")
        lines.append(f"  also free to take effect anywhere in it: {len(background)} "
                     "indeterminate calls invoked earlier: " + "; ".join(
                         f"{what} x{len(who)} ({', '.join(who[:5])}{', ...' * (len(who) > 5)})"
                         for what, who in groups.items()))
    events: list[tuple[int, str]] = []
    for op in shown:
        note = f"   <- {op.note}" if op.note else ""
        events.append((op.call.invoke.index, f"  {op.call.invoke.describe()}{note}"))
        done = op.call.completion
        if done is not None and done.index < window.cut:
            events.append((done.index, f"  {done.describe()}"))
    lines += [text for _, text in sorted(events)]
    result = window.result
    if result is not None and result.outcome == "violation":
        order = [op for op in result.best if any(op.call is s.call for s in shown)]
        tail = order[-8:]
        more = f" (last {len(tail)} of {len(order)})" if len(order) > len(tail) else ""
        if tail:
            lines.append(f"  longest linearization found{more}: "
                         + "; ".join(op.call.summary() for op in tail))
        if result.stuck is not None:
            lines.append(f"  then no order fits: {result.stuck.call.summary()}")
    return lines
