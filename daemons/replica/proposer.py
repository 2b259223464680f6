"""Group commit: many concurrent Apply calls become one Raft entry.

Every gRPC Apply (and every linearizable read, as a barrier) queues here. A
single proposer thread takes whatever has queued — up to max_batch_commands —
and proposes it as one `apply_batch` entry, keeping at most
max_inflight_batches entries between proposal and commit. Under load the
queue fills while earlier entries commit, so batches grow with concurrency;
a lone call goes out at once. This is what lets a 2-core machine commit
thousands of writes per second through PySyncObj, whose per-entry cost is
high.

PySyncObj never calls back for a command forwarded over a dropped connection,
so every in-flight batch carries a deadline after which its waiters are told
the outcome is unknown.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Callable

from pysyncobj import FAIL_REASON

from daemons.core.errors import TarefaError, Unavailable
from daemons.replica.commands import Outcome

log = logging.getLogger(__name__)

SubmitFn = Callable[..., None]

_NOT_APPLIED = {FAIL_REASON.QUEUE_FULL: "the Raft command queue is full",
                FAIL_REASON.MISSING_LEADER: "no Raft leader",
                FAIL_REASON.REQUEST_DENIED: "the leader denied the request"}


class _Waiter:
    __slots__ = ("command", "event", "outcome", "error")

    def __init__(self, command: dict | None) -> None:
        self.command = command
        self.event = threading.Event()
        self.outcome: Outcome | None = None
        self.error: TarefaError | None = None

    def finish(self, outcome: Outcome | None, error: TarefaError | None) -> None:
        if not self.event.is_set():
            self.outcome, self.error = outcome, error
            self.event.set()


class _Batch:
    __slots__ = ("waiters", "deadline", "done")

    def __init__(self, waiters: list[_Waiter], deadline: float) -> None:
        self.waiters = waiters
        self.deadline = deadline
        self.done = False


class Proposer:
    """Queues commands, proposes them in batches, hands each caller its outcome."""

    def __init__(self, submit: SubmitFn, max_batch: int, max_inflight: int,
                 batch_timeout: float) -> None:
        self._submit = submit
        self._max_batch = max_batch
        self._max_inflight = max_inflight
        self._batch_timeout = batch_timeout
        self._queue: collections.deque[_Waiter] = collections.deque()
        self._inflight: list[_Batch] = []
        self._cond = threading.Condition()
        self._stopping = False
        self.batches = 0
        self.commands = 0
        self._thread = threading.Thread(target=self._run, name="proposer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=5)
        for waiter in list(self._queue):
            waiter.finish(None, Unavailable("replica shutting down; not applied"))

    # -- callers -------------------------------------------------------------

    def propose(self, command: dict | None, timeout: float) -> Outcome | None:
        """Commit `command` (None = a barrier) and return its outcome; raise on failure."""
        waiter = _Waiter(command)
        with self._cond:
            if self._stopping:
                raise Unavailable("replica shutting down; not applied")
            self._queue.append(waiter)
            self._cond.notify()
        if not waiter.event.wait(timeout):
            waiter.finish(None, Unavailable(
                f"no commit within {timeout:.2f}s (no quorum or no leader reachable); the "
                "outcome is unknown: retry with the same request id"))
        if waiter.error is not None:
            raise waiter.error
        return waiter.outcome

    # -- the proposer thread -------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not (
                        self._queue and len(self._inflight) < self._max_inflight):
                    self._expire_locked()
                    self._cond.wait(0.05)
                if self._stopping:
                    return
                waiters = [w for w in self._take_locked() if not w.event.is_set()]
                if not waiters:
                    continue
                batch = _Batch(waiters, time.monotonic() + self._batch_timeout)
                self._inflight.append(batch)
            commands = [w.command for w in waiters if w.command is not None]
            self.batches += 1
            self.commands += len(commands)
            try:
                self._submit(commands, callback=lambda res, err, b=batch: self._done(b, res, err))
            except Exception as exc:  # noqa: BLE001 - report to the callers, keep going
                log.exception("proposing a batch failed")
                self._done(batch, None, -1, Unavailable(f"proposal failed: {exc!r}"))

    def _take_locked(self) -> list[_Waiter]:
        taken: list[_Waiter] = []
        while self._queue and len(taken) < self._max_batch:
            taken.append(self._queue.popleft())
        return taken

    def _expire_locked(self) -> None:
        now = time.monotonic()
        for batch in [b for b in self._inflight if b.deadline < now]:
            self._finish_locked(batch, None, Unavailable(
                "Raft gave no answer in time (lost leader connection?); the outcome is "
                "unknown: retry with the same request id"))

    def _done(self, batch: _Batch, results: Any, err: int,
              error: TarefaError | None = None) -> None:
        """PySyncObj's callback (tick thread): hand each waiter its result."""
        if error is None and err != FAIL_REASON.SUCCESS:
            if err in _NOT_APPLIED:
                error = Unavailable(f"{_NOT_APPLIED[err]}: not applied, retry later")
            else:
                error = Unavailable(f"leader changed before commit (reason {err}); the outcome "
                                    "is unknown: retry with the same request id")
        elif error is None and results is None:
            error = TarefaError("this replica stopped applying (see its log)")
        with self._cond:
            self._finish_locked(batch, results, error)

    def _finish_locked(self, batch: _Batch, results: Any, error: TarefaError | None) -> None:
        if batch.done:
            return
        batch.done = True
        self._inflight.remove(batch)
        self._cond.notify()
        position = 0
        for waiter in batch.waiters:
            if waiter.command is None:
                waiter.finish(None, error)
                continue
            waiter.finish(None if error else results[position], error)
            position += 1
