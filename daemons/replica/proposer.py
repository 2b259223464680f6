"""Group commit: many concurrent Apply calls become one Raft entry.

Every gRPC Apply (and every linearizable read, as a barrier) awaits a future
here. The proposer lives on the gRPC server's asyncio loop: whatever queued
during one loop iteration — up to max_batch_commands — is proposed as one
entry (`ReplicaStateMachine.propose`), with at most max_inflight_batches
entries between proposal and commit. Under load the queue fills while earlier entries
commit, so batches grow with concurrency; a lone call goes out at once.
PySyncObj's callback (on its tick thread) crosses back to the loop once per
batch, not once per caller, which is what keeps the leader's CPU per write
low enough for thousands of writes per second on two cores.

PySyncObj never calls back for a command forwarded over a dropped connection,
so every in-flight batch carries a deadline after which its waiters are told
the outcome is unknown; and a batch whose callers have all given up (their
own deadlines, usually shorter) stops holding its in-flight slot at the next
flush, so lost callbacks cannot stall the calls that come after them.

A batch is also capped by size: about MAX_BATCH_BYTES of UTF-8 in its
commands' string fields (one command always goes, however large). PySyncObj
splits an entry of appendEntriesBatchSizeBytes or more into chunks and its
chunking is broken (state_machine.APPEND_ENTRIES_BATCH_BYTES), so entries
must stay well below that.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any, Callable

from pysyncobj import FAIL_REASON

from daemons.core.errors import TarefaError, Unavailable
from daemons.replica.commands import Outcome

log = logging.getLogger(__name__)

SubmitFn = Callable[..., None]

MAX_BATCH_BYTES = 1024 * 1024
_COMMAND_OVERHEAD = 64  # pickled keys and framing of one command, roughly


def command_size(command: dict | None) -> int:
    """Estimated bytes of a command in a Raft entry: its string fields in UTF-8."""
    if not command:
        return 0
    size = _COMMAND_OVERHEAD
    for value in command.values():
        if isinstance(value, str):
            size += len(value) if value.isascii() else len(value.encode("utf-8", "surrogatepass"))
        elif isinstance(value, (bytes, bytearray)):
            size += 2 * len(value)
    return size


_NOT_APPLIED = {FAIL_REASON.QUEUE_FULL: "the Raft command queue is full",
                FAIL_REASON.MISSING_LEADER: "no Raft leader",
                FAIL_REASON.REQUEST_DENIED: "the leader denied the request"}


class _Batch:
    __slots__ = ("waiters", "done", "timer")

    def __init__(self, waiters: list[tuple[dict | None, asyncio.Future]]) -> None:
        self.waiters = waiters
        self.done = False
        self.timer: asyncio.TimerHandle | None = None


def _settle(future: asyncio.Future, outcome: Outcome | None,
            error: TarefaError | None) -> None:
    if not future.done():
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(outcome)


def _time_out(future: asyncio.Future, timeout: float, barrier: bool = False) -> None:
    """A caller's deadline passed (the error is built only then, not on every call)."""
    if not future.done():
        # A barrier (a linearizable read's) changes nothing: no outcome to doubt.
        then = "the read was not served: retry it" if barrier else \
            "the outcome is unknown: retry with the same request id"
        future.set_exception(Unavailable(
            f"no commit within {timeout:.2f}s (no quorum or no leader reachable); {then}"))


class Proposer:
    """Queues commands, proposes them in batches, hands each caller its outcome.

    All methods but the PySyncObj callback run on `loop`.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, submit: SubmitFn, max_batch: int,
                 max_inflight: int, batch_timeout: float,
                 max_batch_bytes: int = MAX_BATCH_BYTES) -> None:
        self._loop = loop
        self._submit = submit
        self._max_batch = max_batch
        self._max_batch_bytes = max_batch_bytes
        self._max_inflight = max_inflight
        self._batch_timeout = batch_timeout
        self._queue: collections.deque[tuple[dict | None, asyncio.Future]] = collections.deque()
        self._inflight: set[_Batch] = set()
        self._flush_scheduled = False
        self._stopping = False
        self.batches = 0
        self.commands = 0

    def stop(self) -> None:
        """Refuse new calls and fail those still queued (call on the loop)."""
        self._stopping = True
        while self._queue:
            _, future = self._queue.popleft()
            _settle(future, None, Unavailable("replica shutting down; not applied"))

    @property
    def idle(self) -> bool:
        return not self._queue and not self._inflight

    # -- callers -------------------------------------------------------------

    async def propose(self, command: dict | None, timeout: float) -> Outcome | None:
        """Commit `command` (None = a barrier) and return its outcome; raise on failure."""
        if self._stopping:
            raise Unavailable("replica shutting down; not applied")
        future: asyncio.Future = self._loop.create_future()
        self._queue.append((command, future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        timer = self._loop.call_later(timeout, _time_out, future, timeout, command is None)
        try:
            return await future
        finally:
            timer.cancel()

    async def propose_many(self, commands: list[dict], timeout: float
                           ) -> list[Outcome | TarefaError]:
        """Commit independent commands together; each gets its outcome or its error."""
        if self._stopping:
            raise Unavailable("replica shutting down; not applied")
        futures = [self._loop.create_future() for _ in commands]
        self._queue.extend(zip(commands, futures))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        timer = self._loop.call_later(timeout, lambda: [_time_out(f, timeout) for f in futures])
        try:
            await asyncio.wait(futures)
        finally:
            timer.cancel()
            # Cancelled (the caller went away): what is still queued is never
            # proposed, and a batch in flight no longer holds its slot for it
            # (as a cancelled propose does, whose future the await cancels).
            for future in futures:
                future.cancel()
        return [f.exception() or f.result() for f in futures]  # type: ignore[misc]

    # -- batching ------------------------------------------------------------

    def _release_abandoned(self) -> None:
        """Free the slots of in-flight batches nobody waits for any more."""
        for batch in [b for b in self._inflight if all(f.done() for _, f in b.waiters)]:
            batch.done = True  # a late callback for it is ignored (_finish)
            self._inflight.discard(batch)
            if batch.timer is not None:
                batch.timer.cancel()

    def _flush(self) -> None:
        self._flush_scheduled = False
        if len(self._inflight) >= self._max_inflight:
            self._release_abandoned()
        while self._queue and len(self._inflight) < self._max_inflight:
            waiters = []
            size = 0
            while self._queue and len(waiters) < self._max_batch:
                command, future = self._queue[0]
                if future.done():  # its caller gave up while it queued
                    self._queue.popleft()
                    continue
                cost = command_size(command)
                if waiters and size + cost > self._max_batch_bytes:
                    break  # the next batch takes it
                self._queue.popleft()
                size += cost
                waiters.append((command, future))
            if not waiters:
                continue
            batch = _Batch(waiters)
            self._inflight.add(batch)
            batch.timer = self._loop.call_later(self._batch_timeout, self._expire, batch)
            commands = [c for c, _ in waiters if c is not None]
            self.batches += 1
            self.commands += len(commands)
            try:
                self._submit(commands, callback=lambda res, err, b=batch:
                             self._loop.call_soon_threadsafe(self._done, b, res, err))
            except Exception as exc:  # noqa: BLE001 - report to the callers, keep going
                log.exception("proposing a batch failed")
                self._finish(batch, None, Unavailable(f"proposal failed: {exc!r}"))

    def _expire(self, batch: _Batch) -> None:
        self._finish(batch, None, Unavailable(
            "Raft gave no answer in time (lost leader connection?); the outcome is "
            "unknown: retry with the same request id"))

    def _done(self, batch: _Batch, results: Any, err: int) -> None:
        error: TarefaError | None = None
        if err != FAIL_REASON.SUCCESS:
            if err in _NOT_APPLIED:
                error = Unavailable(f"{_NOT_APPLIED[err]}: not applied, retry later")
            else:
                error = Unavailable(f"leader changed before commit (reason {err}); the outcome "
                                    "is unknown: retry with the same request id")
        elif results is None:
            # Committed by Raft, maybe applied by the other members: not a refusal.
            error = Unavailable("this replica stopped applying (see its log); the outcome is "
                                "unknown: retry with the same request id on another replica")
        self._finish(batch, results, error)

    def _finish(self, batch: _Batch, results: Any, error: TarefaError | None) -> None:
        if batch.done:
            return
        batch.done = True
        self._inflight.discard(batch)
        if batch.timer is not None:
            batch.timer.cancel()
        position = 0
        for command, future in batch.waiters:
            if command is None and error is not None:
                # A barrier (a linearizable read's) changes nothing: no outcome to doubt.
                what = error.message.split("; ")[0]
                _settle(future, None, Unavailable(f"{what}; the read was not served: retry it"))
                continue
            if command is None or error is not None:
                _settle(future, None, error)
                continue
            _settle(future, results[position], None)
            position += 1
        if self._queue and not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
