"""The operation history the fault-injection workload records and the checkers read.

A history is a list of `Op` events in recording order: each client call is an
"invoke" event, then at most one completion ("ok", "fail" or "info"). The
recorder takes a lock around each append, and the harness invokes before it
sends a call and completes after the answer arrives, so recording order is a
valid real-time order: if A's completion comes before B's invoke in the list,
A really finished before B began. The checkers rely on that order, not on the
`time` stamps (which only the cache checker compares with stream events).

Conventions the checkers rely on:

- One Op per logical request. If the harness retries a call with the same
  request id (the replicas answer a retry with the first result), the retries
  belong to that one op: one invoke, one completion.
- "fail" means the call definitely had no effect; "info" means its outcome is
  unknown: it may take effect at any time after its invoke, or never. An
  invoke that never gets a completion counts as "info".
- A refused call ("exists" for create, "absent" for write/delete/read) is an
  "ok" completion: it happened and saw the state, with no effect.
- Values written are unique per key, so a value read names its write.
- A read served from a portal cache (Consistency CACHED) should be invoked
  with consistency="cached": the linearizability checker leaves such reads out
  by default, the cache checker checks every read.
- A replica answer "already applied; result no longer remembered" means the
  call took effect with an unknown revision: complete it as "info", not "fail".

`Call` pairs an invoke with its completion; the checkers work on calls.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time as _time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

TYPES = ("invoke", "ok", "fail", "info")
FUNCTIONS = ("create", "write", "delete", "read")
EFFECTS = ("create", "write", "delete")
REFUSAL = {"create": "exists", "write": "absent", "delete": "absent", "read": "absent"}


@dataclass
class Op:
    process: int          # client thread id
    type: str             # "invoke" | "ok" | "fail" | "info"
    f: str                # "create" | "write" | "delete" | "read"
    key: str              # e.g. f"{cid}/{title}"
    # invoke: value to create/write; completion of a read: value read (None if absent)
    value: Any = None
    # completion: "ok" | "exists" | "absent" | "" for fail/info
    result: str = ""
    # completion: revision returned (ok creates/writes/deletes and found reads)
    revision: int | None = None
    portal: str = ""      # portal that served the call
    time: float = 0.0     # time.monotonic() at the event
    # Added for the checkers; the fields above are the shared interface.
    index: int = -1       # position in the history (set by History)
    invoke_index: int = -1  # on a completion: index of its invoke (-1: pair by process)
    consistency: str = ""   # reads: "linearizable" | "cached" | "" (unknown)

    def describe(self) -> str:
        """One readable line, e.g. `#12 p3 ok write 'v7' -> ok rev 41 @portal-1`."""
        where = f" @{self.portal}" if self.portal else ""
        head = f"#{self.index} p{self.process} {self.type:<6} {self.f} {self.key}"
        if self.type == "invoke":
            arg = f" {self.value!r}" if self.f in ("create", "write") else ""
            mode = f" ({self.consistency})" if self.f == "read" and self.consistency else ""
            return f"{head}{arg}{mode}{where} t={self.time:.3f}"
        if self.type != "ok":
            return f"{head}{where} t={self.time:.3f}"
        out = self.result
        if self.f == "read" and self.result == "ok":
            out = repr(self.value)
        elif self.f in ("create", "write") and self.value is not None:
            out = f"{self.value!r} {self.result}"
        rev = f" rev {self.revision}" if self.revision is not None else ""
        return f"{head} -> {out}{rev}{where} t={self.time:.3f}"


@dataclass(frozen=True)
class Call:
    """One client call: its invoke and its completion (None if it never completed)."""

    invoke: Op
    completion: Op | None

    @property
    def type(self) -> str:
        """ "ok" | "fail" | "info"; a call that never completed is "info"."""
        return self.completion.type if self.completion is not None else "info"

    @property
    def process(self) -> int:
        return self.invoke.process

    @property
    def f(self) -> str:
        return self.invoke.f

    @property
    def key(self) -> str:
        return self.invoke.key

    @property
    def portal(self) -> str:
        return self.invoke.portal

    @property
    def start(self) -> int:
        return self.invoke.index

    @property
    def end(self) -> int | None:
        """Index of an ok or fail completion; None when the call never (knowingly) ended."""
        if self.completion is None or self.completion.type == "info":
            return None
        return self.completion.index

    @property
    def result(self) -> str:
        return self.completion.result if self.type == "ok" else ""  # type: ignore[union-attr]

    @property
    def revision(self) -> int | None:
        return self.completion.revision if self.type == "ok" else None  # type: ignore[union-attr]

    @property
    def argument(self) -> Any:
        """The value a create/write tried to store (None for reads and deletes)."""
        return self.invoke.value if self.f in ("create", "write") else None

    @property
    def read_value(self) -> Any:
        """What an ok read returned: the value, or None if the key was absent."""
        if self.f != "read" or self.type != "ok" or self.result != "ok":
            return None
        return self.completion.value  # type: ignore[union-attr]

    @property
    def took_effect(self) -> bool:
        """An acknowledged create/write/delete that changed the key."""
        return self.type == "ok" and self.f in EFFECTS and self.result == "ok"

    @property
    def may_have_effect(self) -> bool:
        """Acknowledged, or indeterminate, create/write/delete."""
        return self.f in EFFECTS and (self.took_effect or self.type == "info")

    def events(self) -> list[Op]:
        return [self.invoke] + ([self.completion] if self.completion is not None else [])

    def lines(self, indent: str = "  ") -> list[str]:
        """Readable lines: the invoke and the completion (or a note that none came)."""
        out = [indent + self.invoke.describe()]
        if self.completion is not None:
            out.append(indent + self.completion.describe())
        else:
            out.append(f"{indent}   (p{self.process} {self.f} {self.key}: no completion recorded)")
        return out

    def summary(self) -> str:
        """One line: `p3 write c/t 'v7' -> ok rev 41 @portal-1 [#12..#15]`."""
        arg = f" {self.argument!r}" if self.f in ("create", "write") else ""
        if self.type != "ok":
            out = self.type
        elif self.f == "read" and self.result == "ok":
            out = repr(self.read_value)
        else:
            out = self.result
        rev = f" rev {self.revision}" if self.revision is not None else ""
        where = f" @{self.portal}" if self.portal else ""
        end = f"#{self.completion.index}" if self.completion is not None else "…"
        span = f"[#{self.start}..{end}]"
        return f"p{self.process} {self.f} {self.key}{arg} -> {out}{rev}{where} {span}"


def _validate_completion(invoke: Op, type: str, result: str) -> None:
    if invoke.type != "invoke":
        raise ValueError(f"complete() needs an invoke op, got {invoke.type!r}")
    if type not in ("ok", "fail", "info"):
        raise ValueError(f"completion type must be ok, fail or info, got {type!r}")
    if type == "ok":
        allowed = ("ok", REFUSAL[invoke.f])
        if result not in allowed:
            raise ValueError(f"an ok {invoke.f} has result {' or '.join(allowed)}, got {result!r}")
    elif result:
        raise ValueError(f"a {type} completion has no result, got {result!r}")


class History:
    """A thread-safe recorder of invoke/completion events, in recording order."""

    def __init__(self, ops: Iterable[Op] = ()) -> None:
        self._lock = threading.Lock()
        self.ops: list[Op] = _reindexed(list(ops))

    def invoke(self, process: int, f: str, key: str, value: Any = None, portal: str = "",
               *, consistency: str = "", time: float | None = None) -> Op:
        """Record that `process` is about to call `f` on `key`; returns the invoke op."""
        if f not in FUNCTIONS:
            raise ValueError(f"f must be one of {', '.join(FUNCTIONS)}, got {f!r}")
        op = Op(process, "invoke", f, key, value, portal=portal, consistency=consistency,
                time=_time.monotonic() if time is None else time)
        with self._lock:
            op.index = len(self.ops)
            self.ops.append(op)
        return op

    def complete(self, invoke_op: Op, type: str, result: str = "", value: Any = None,
                 revision: int | None = None, *, time: float | None = None) -> Op:
        """Record the completion of `invoke_op`; returns the completion op.

        For creates and writes the completion repeats the invoke's value unless
        one is given; for reads `value` is what was read (None if absent).
        """
        _validate_completion(invoke_op, type, result)
        if value is None and invoke_op.f in ("create", "write"):
            value = invoke_op.value
        op = Op(invoke_op.process, type, invoke_op.f, invoke_op.key, value, result, revision,
                invoke_op.portal, _time.monotonic() if time is None else time,
                invoke_index=invoke_op.index, consistency=invoke_op.consistency)
        with self._lock:
            op.index = len(self.ops)
            self.ops.append(op)
        return op

    def __len__(self) -> int:
        return len(self.ops)

    def __iter__(self) -> Iterator[Op]:
        return iter(self.snapshot())

    def snapshot(self) -> list[Op]:
        with self._lock:
            return list(self.ops)

    def calls(self) -> list[Call]:
        """Every invoke paired with its completion, in invoke order."""
        return pair_calls(self.snapshot())

    def to_jsonl(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as out:
            for op in self.snapshot():
                out.write(json.dumps(dataclasses.asdict(op), sort_keys=True) + "\n")

    @classmethod
    def merged(cls, *histories: History) -> History:
        """One history of several recorders' events, ordered by time, each
        completion still paired with its own invoke."""
        tagged = []
        for source, history in enumerate(histories):
            for op in history.snapshot():
                tagged.append((op.time, source, op.index, op))
        tagged.sort(key=lambda t: t[:3])
        where = {(source, index): pos for pos, (_, source, index, _) in enumerate(tagged)}
        ops = [dataclasses.replace(op, index=pos,
                                   invoke_index=where.get((source, op.invoke_index), -1))
               for pos, (_, source, _, op) in enumerate(tagged)]
        return cls(ops)

    @classmethod
    def from_jsonl(cls, path: str) -> History:
        fields = {f.name for f in dataclasses.fields(Op)}
        with open(path, encoding="utf-8") as src:
            ops = [Op(**{k: v for k, v in json.loads(line).items() if k in fields})
                   for line in src if line.strip()]
        return cls(ops)


def _reindexed(ops: list[Op]) -> list[Op]:
    """Copies of `ops` with index = position; invoke links kept when they can be mapped."""
    old = [op.index for op in ops]
    mappable = all(i >= 0 for i in old) and len(set(old)) == len(old)
    where = {i: pos for pos, i in enumerate(old)} if mappable else {}
    out = []
    for pos, op in enumerate(ops):
        link = where.get(op.invoke_index, -1) if op.type != "invoke" else -1
        out.append(dataclasses.replace(op, index=pos, invoke_index=link))
    return out


def pair_calls(ops: list[Op]) -> list[Call]:
    """Pair completions with invokes: by invoke_index when set, else the latest
    open invoke of the same process. Unpaired completions raise ValueError."""
    completion_of: dict[int, Op] = {}
    open_by_process: dict[int, list[int]] = {}
    invokes: dict[int, Op] = {}
    for op in ops:
        if op.type == "invoke":
            invokes[op.index] = op
            open_by_process.setdefault(op.process, []).append(op.index)
            continue
        target = op.invoke_index
        if target < 0:
            stack = open_by_process.get(op.process, [])
            while stack and stack[-1] in completion_of:
                stack.pop()
            if not stack:
                raise ValueError(f"completion {op.describe()} has no open invoke")
            target = stack[-1]
        if target not in invokes or target in completion_of:
            raise ValueError(f"completion {op.describe()} matches no open invoke")
        completion_of[target] = op
    return [Call(op, completion_of.get(op.index)) for op in ops if op.type == "invoke"]


def as_calls(history: History | Iterable[Op]) -> list[Call]:
    """The calls of a History or of a plain list of ops."""
    if isinstance(history, History):
        return history.calls()
    return History(history).calls()


def by_key(calls: Iterable[Call]) -> dict[str, list[Call]]:
    grouped: dict[str, list[Call]] = {}
    for call in calls:
        grouped.setdefault(call.key, []).append(call)
    return grouped
