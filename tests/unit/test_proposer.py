"""Proposer (daemons/replica/proposer.py): group commit on an asyncio loop, over a fake Raft.

Every test body is a coroutine run on a fresh event loop (no plugin), in debug mode:
there asyncio raises if call_soon/call_later or a future's wake-up is done from a
thread other than the loop's, so a callback that forgot to cross to the loop fails
loudly instead of racing; a caller left never woken fails the test instead of hanging.
Anything the loop's exception handler sees (an error inside a callback, such as a late
Raft answer) and anything Raft's callback raises fails the test too.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from typing import Any, Awaitable, Callable

import pytest
from pysyncobj import FAIL_REASON

from daemons.core.errors import TarefaError, Unavailable
from daemons.replica.commands import Outcome
from daemons.replica.proposer import Proposer

LONG = 5.0    # bounds waits that should never elapse; only reached when a test fails
SHORT = 0.2   # timeouts that are meant to expire
TEST_BOUND = 15.0


# ---- running a test body on its own loop -------------------------------------------------

_rigs: list[tuple[Proposer, "FakeRaft"]] = []


def on_fresh_loop(body: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Turn `async def test_...` into a plain test that runs it on a new event loop."""

    @functools.wraps(body)
    def test(*args: Any, **kwargs: Any) -> None:
        loop = asyncio.new_event_loop()
        loop.set_debug(True)
        try:
            loop.run_until_complete(_main(body, args, kwargs))
        finally:
            try:
                _end_leftover_tasks(loop)
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                loop.close()

    return test


async def _main(body: Callable[..., Awaitable[None]], args: tuple, kwargs: dict) -> None:
    loop_errors: list[dict] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: loop_errors.append(ctx))
    _rigs.clear()
    try:
        async with asyncio.timeout(TEST_BOUND):
            await body(*args, **kwargs)
    finally:
        fakes = [fake for _, fake in _rigs]
        for proposer, fake in _rigs:
            fake.close()
            proposer.stop()
        _rigs.clear()
    callback_errors = [exc for fake in fakes for exc in fake.callback_errors]
    assert not callback_errors, f"Raft's callback raised: {callback_errors!r}"
    assert not loop_errors, f"the event loop reported errors: {loop_errors}"


def _end_leftover_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel the callers a failed test left behind, without hanging if one is never woken."""
    tasks = asyncio.all_tasks(loop)
    if not tasks:
        return
    for task in tasks:
        task.cancel()
    done, stuck = loop.run_until_complete(asyncio.wait(tasks, timeout=LONG))
    for task in done:
        if not task.cancelled():
            task.exception()  # retrieved: a failed test has already said what went wrong
    assert not stuck, f"{len(stuck)} caller(s) never woke up (a future settled off the loop?)"


def make(fake: FakeRaft | None = None, max_batch: int = 8, max_inflight: int = 2,
         batch_timeout: float = LONG) -> tuple[Proposer, FakeRaft]:
    """A Proposer on the running loop, submitting to `fake`; stopped when the test ends."""
    fake = fake or FakeRaft()
    proposer = Proposer(asyncio.get_running_loop(), fake, max_batch=max_batch,
                        max_inflight=max_inflight, batch_timeout=batch_timeout)
    _rigs.append((proposer, fake))
    return proposer, fake


# ---- the fake PySyncObj ------------------------------------------------------------------


def _wake(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class FakeRaft:
    """Stands in for `ReplicaStateMachine.propose`: records submits and answers them on demand.

    mode "sync": answer inside submit (on the loop's thread, like a local failure);
    mode "hold": keep the callback until answer()/answer_next()/the responder thread.
    Each command's outcome carries its request id (record) and a revision that grows
    in commit order, so callers can check they got their own result.
    """

    def __init__(self, mode: str = "hold", reason: int = FAIL_REASON.SUCCESS,
                 raise_on_submit: list[Exception] | None = None) -> None:
        self.mode = mode
        self.reason = reason
        self.raise_on_submit = list(raise_on_submit or [])  # one per submit, in order
        self.cond = threading.Condition()
        self.submits: list[list[Any]] = []
        self.pending: list[tuple[list[Any], Callable]] = []
        self.outstanding = 0
        self.max_outstanding = 0
        self.revision = 0
        self.callback_threads: set[int] = set()
        self.callback_errors: list[BaseException] = []
        self._watchers: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._responder: threading.Thread | None = None
        self._stop = False

    def __call__(self, commands: list, callback: Callable) -> None:
        assert isinstance(commands, list)
        with self.cond:
            self.submits.append(list(commands))
            if self.raise_on_submit:
                exc = self.raise_on_submit.pop(0)
                self._changed()
                raise exc
            self.outstanding += 1
            self.max_outstanding = max(self.max_outstanding, self.outstanding)
            self.pending.append((list(commands), callback))
            self._changed()
        if self.mode == "sync":
            self.answer_next()

    def _changed(self) -> None:
        """Wake threads and coroutines waiting for a change (call with self.cond held)."""
        self.cond.notify_all()
        for loop, future in self._watchers:
            loop.call_soon_threadsafe(_wake, future)
        self._watchers.clear()

    def _results(self, commands: list) -> list[Outcome] | None:
        if self.reason != FAIL_REASON.SUCCESS:
            return None
        out = []
        for command in commands:
            assert command is not None, "a barrier was sent to Raft as a command"
            self.revision += 1
            out.append(Outcome(ok=True, revision=self.revision, record=command["request_id"]))
        return out

    def answer_next(self, results: Any = "auto", reason: int | None = None) -> None:
        """Answer the oldest held submit, on the calling thread."""
        with self.cond:
            commands, callback = self.pending.pop(0)
            self.outstanding -= 1
            if isinstance(results, str):
                results = self._results(commands)
            self._changed()
        self.callback_threads.add(threading.get_ident())
        try:
            callback(results, self.reason if reason is None else reason)
        except BaseException as exc:  # PySyncObj would log it and carry on; the test fails
            self.callback_errors.append(exc)
            raise

    async def answer(self, results: Any = "auto", reason: int | None = None) -> None:
        """Answer the oldest held submit from another thread, as PySyncObj's tick thread does."""
        await asyncio.wait_for(asyncio.to_thread(self.answer_next, results, reason), LONG)

    async def until(self, predicate: Callable[[], bool], what: str,
                    timeout: float = LONG) -> None:
        """Await a condition on this fake's state (it signals every change)."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                while True:
                    with self.cond:
                        if predicate():
                            return
                        future = loop.create_future()
                        self._watchers.append((loop, future))
                    await future
        except TimeoutError:
            raise AssertionError(f"timed out waiting for {what}") from None

    async def wait_submits(self, n: int) -> None:
        await self.until(lambda: len(self.submits) >= n, f"{n} submits")

    def start_responder(self) -> None:
        """Answer every held submit from another thread, as PySyncObj's tick thread does."""
        def run() -> None:
            while True:
                with self.cond:
                    while not self.pending and not self._stop:
                        self.cond.wait(LONG)
                    if self._stop and not self.pending:
                        return
                self.answer_next()
        self._responder = threading.Thread(target=run, name="fake-raft", daemon=True)
        self._responder.start()

    def close(self) -> None:
        with self.cond:
            self._stop = True
            self.cond.notify_all()
        if self._responder is not None:
            self._responder.join(LONG)


# ---- callers -----------------------------------------------------------------------------


def cmd(rid: str) -> dict:
    return {"op": "create_client", "cid": "1", "data": "{}", "at": "t", "request_id": rid}


class Call:
    """One propose() as a task on the running loop; remembers how long it took."""

    def __init__(self, proposer: Proposer, command: dict | None, timeout: float = LONG) -> None:
        self.command = command
        self.elapsed: float | None = None
        self.task = asyncio.create_task(self._run(proposer, timeout))

    async def _run(self, proposer: Proposer, timeout: float) -> Outcome | None:
        start = time.monotonic()
        try:
            return await proposer.propose(self.command, timeout)
        finally:
            self.elapsed = time.monotonic() - start

    async def _finished(self) -> None:
        done, _ = await asyncio.wait({self.task}, timeout=LONG)
        assert done, "propose() did not return"

    async def outcome(self) -> Outcome | None:
        """What propose() returned (re-raises what it raised)."""
        await self._finished()
        return self.task.result()

    async def error(self) -> BaseException:
        """What propose() raised; fails the test if it returned."""
        await self._finished()
        if self.task.cancelled():
            return asyncio.CancelledError()
        exc = self.task.exception()
        assert exc is not None, f"propose() returned {self.task.result()!r} instead of raising"
        return exc


def queued(proposer: Proposer) -> int:
    return len(proposer._queue)  # private, but the only way to know a caller is queued


async def loop_until(predicate: Callable[[], bool], what: str, timeout: float = LONG) -> None:
    """Let the loop run, one iteration at a time, until a loop-local condition holds.

    For state only the loop changes and nothing signals (the proposer's queue);
    conditions on the fake are awaited with FakeRaft.until instead.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0)


async def enqueue(proposer: Proposer, commands: list[dict | None],
                  timeout: float = LONG) -> list[Call]:
    """Start one caller per command and return once all of them sit in the queue, in order."""
    before = queued(proposer)
    calls = [Call(proposer, command, timeout) for command in commands]
    await loop_until(lambda: queued(proposer) == before + len(commands), "callers queued")
    return calls


# ---- the basics --------------------------------------------------------------------------


@on_fresh_loop
async def test_a_lone_command_goes_out_at_once_and_gets_its_outcome():
    proposer, fake = make(FakeRaft("sync"))
    assert proposer.idle
    outcome = await asyncio.wait_for(proposer.propose(cmd("r1"), timeout=LONG), LONG)
    assert outcome == Outcome(ok=True, revision=1, record="r1")
    assert fake.submits == [[cmd("r1")]]
    assert proposer.batches == 1 and proposer.commands == 1
    assert proposer.idle


@on_fresh_loop
async def test_sequential_calls_each_get_their_own_outcome():
    proposer, fake = make(FakeRaft("sync"))
    outcomes = [await Call(proposer, cmd(f"r{i}")).outcome() for i in range(5)]
    assert [(o.record, o.revision) for o in outcomes] == [(f"r{i}", i + 1) for i in range(5)]
    assert fake.submits == [[cmd(f"r{i}")] for i in range(5)]
    assert proposer.idle


@on_fresh_loop
async def test_a_lone_barrier_returns_none_without_sending_a_command():
    proposer, fake = make(FakeRaft("sync"))
    assert await Call(proposer, None).outcome() is None
    assert fake.submits == [[]]
    assert proposer.batches == 1 and proposer.commands == 0
    assert proposer.idle


@on_fresh_loop
async def test_calls_queued_in_one_loop_iteration_go_out_as_one_batch():
    proposer, fake = make(FakeRaft("sync"), max_batch=8)
    calls = [Call(proposer, cmd(f"r{i}")) for i in range(5)]
    outcomes = [await c.outcome() for c in calls]
    assert fake.submits == [[cmd(f"r{i}") for i in range(5)]]
    assert [(o.record, o.revision) for o in outcomes] == [(f"r{i}", i + 1) for i in range(5)]
    assert proposer.batches == 1 and proposer.commands == 5


@on_fresh_loop
async def test_callback_from_another_thread():
    fake = FakeRaft("hold")
    fake.start_responder()
    proposer, _ = make(fake)
    calls = [Call(proposer, cmd(f"r{i}")) for i in range(20)]
    outcomes = [await c.outcome() for c in calls]
    for i, outcome in enumerate(outcomes):
        assert outcome.ok and outcome.record == f"r{i}"
    assert sorted(o.revision for o in outcomes) == list(range(1, 21))
    # the answers really came from a thread other than the loop's
    assert fake.callback_threads and threading.get_ident() not in fake.callback_threads
    assert proposer.idle


# ---- batching ----------------------------------------------------------------------------


@on_fresh_loop
async def test_concurrent_calls_are_batched_within_limits():
    max_batch, max_inflight, total = 8, 2, 50
    proposer, fake = make(FakeRaft("hold"), max_batch=max_batch, max_inflight=max_inflight)
    calls = [Call(proposer, cmd(f"r{i}")) for i in range(total)]
    await fake.wait_submits(max_inflight)
    # every caller is either in a held batch or queued behind them
    await loop_until(lambda: sum(map(len, fake.submits)) + queued(proposer) == total,
                     "all callers queued")
    assert [len(s) for s in fake.submits] == [max_batch] * max_inflight  # no more in flight
    assert not proposer.idle
    fake.start_responder()
    outcomes = [await c.outcome() for c in calls]

    sizes = [len(s) for s in fake.submits]
    # all 50 queued before the first flush, so every batch is full but the last
    assert sizes == [8, 8, 8, 8, 8, 8, 2], sizes
    assert fake.max_outstanding == max_inflight
    assert proposer.batches == len(sizes) and proposer.commands == total
    # results routed to the right callers, in commit order (queue order is kept)
    order = [command["request_id"] for batch in fake.submits for command in batch]
    assert order == [f"r{i}" for i in range(total)]
    assert [(o.record, o.revision) for o in outcomes] == [(f"r{i}", i + 1) for i in range(total)]
    assert proposer.idle


@on_fresh_loop
async def test_max_inflight_is_respected_under_a_slow_raft():
    proposer, fake = make(FakeRaft("hold"), max_batch=3, max_inflight=1)
    calls = [Call(proposer, cmd(f"r{i}")) for i in range(10)]
    for n, size in enumerate([3, 3, 3, 1], start=1):
        await fake.until(lambda n=n: len(fake.submits) == n and fake.pending, f"batch {n}")
        with fake.cond:
            assert fake.outstanding == 1
            assert len(fake.submits[-1]) == size
        await fake.answer()
    outcomes = [await c.outcome() for c in calls]
    assert [o.record for o in outcomes] == [f"r{i}" for i in range(10)]
    assert fake.max_outstanding == 1
    assert len(fake.submits) == 4
    assert proposer.idle


@on_fresh_loop
async def test_queue_order_is_kept_and_barriers_get_none():
    proposer, fake = make(FakeRaft("hold"), max_batch=10, max_inflight=1)
    head = Call(proposer, cmd("head"))
    await fake.wait_submits(1)  # the only in-flight slot is now taken
    plan = [cmd("a"), None, cmd("b"), cmd("c"), None, cmd("d")]
    calls = await enqueue(proposer, plan)
    await fake.answer()                      # head commits; the rest go as one batch
    await fake.wait_submits(2)
    assert fake.submits[1] == [cmd("a"), cmd("b"), cmd("c"), cmd("d")]  # order kept, no barriers
    await fake.answer()
    assert (await head.outcome()).record == "head"
    got = [await c.outcome() for c in calls]
    assert [o and o.record for o in got] == ["a", None, "b", "c", None, "d"]
    assert [o and o.revision for o in got] == [2, None, 3, 4, None, 5]
    assert proposer.commands == 5 and proposer.idle


@on_fresh_loop
async def test_batches_never_exceed_max_batch():
    proposer, fake = make(FakeRaft("hold"), max_batch=4, max_inflight=1)
    head = Call(proposer, cmd("head"))
    await fake.wait_submits(1)
    calls = await enqueue(proposer, [cmd(f"r{i}") for i in range(10)])
    fake.start_responder()
    assert (await head.outcome()).record == "head"
    assert [(await c.outcome()).record for c in calls] == [f"r{i}" for i in range(10)]
    assert [len(s) for s in fake.submits] == [1, 4, 4, 2]
    assert [c["request_id"] for s in fake.submits[1:] for c in s] == [f"r{i}" for i in range(10)]


@on_fresh_loop
async def test_results_reach_the_right_callers_when_some_in_the_batch_gave_up():
    proposer, fake = make(FakeRaft("hold"), max_batch=10, max_inflight=1)
    timed_out = Call(proposer, cmd("a"), timeout=SHORT)
    cancelled = Call(proposer, cmd("b"))
    c, barrier, d = Call(proposer, cmd("c")), Call(proposer, None), Call(proposer, cmd("d"))
    await fake.wait_submits(1)
    assert fake.submits == [[cmd("a"), cmd("b"), cmd("c"), cmd("d")]]
    cancelled.task.cancel()
    assert isinstance(await cancelled.error(), asyncio.CancelledError)
    assert isinstance(await timed_out.error(), Unavailable)
    await fake.answer()
    assert await c.outcome() == Outcome(ok=True, revision=3, record="c")
    assert await barrier.outcome() is None
    assert await d.outcome() == Outcome(ok=True, revision=4, record="d")
    assert proposer.idle


@on_fresh_loop
async def test_a_caller_that_gave_up_while_queued_is_not_proposed():
    proposer, fake = make(FakeRaft("hold"), max_batch=10, max_inflight=1)
    head = Call(proposer, cmd("head"))
    await fake.wait_submits(1)
    gone, = await enqueue(proposer, [cmd("gone")], timeout=SHORT)
    kept, = await enqueue(proposer, [cmd("kept")])
    error = await gone.error()
    assert isinstance(error, Unavailable) and "no commit within 0.20s" in error.message
    await fake.answer()
    await fake.wait_submits(2)
    assert fake.submits[1] == [cmd("kept")]
    await fake.answer()
    assert (await head.outcome()).record == "head"
    assert await kept.outcome() == Outcome(ok=True, revision=2, record="kept")
    assert proposer.idle


@on_fresh_loop
async def test_a_cancelled_propose_many_frees_its_slot_and_skips_what_is_still_queued():
    """ApplyBatch's propose_many, its call cancelled (the portal gave up): its
    commands used to stay pending, so its batch held the only in-flight slot
    until Raft answered or batch_timeout, and its commands still queued went
    out although nobody waited for them any more."""
    proposer, fake = make(FakeRaft("hold"), max_batch=2, max_inflight=1, batch_timeout=LONG)
    many = asyncio.create_task(proposer.propose_many([cmd("a"), cmd("b"), cmd("c")], LONG))
    await fake.wait_submits(1)
    assert fake.submits == [[cmd("a"), cmd("b")]] and queued(proposer) == 1  # "c" waits
    many.cancel()
    await asyncio.wait({many}, timeout=LONG)
    assert many.cancelled()
    after = Call(proposer, cmd("after"))
    await fake.wait_submits(2)  # not after batch_timeout (LONG): the slot was free
    assert fake.submits[1] == [cmd("after")]  # "c" was never proposed
    await fake.answer()  # the late answer for "a" and "b" is harmless
    await fake.answer()
    assert (await after.outcome()).record == "after"
    assert proposer.idle


# ---- failures ----------------------------------------------------------------------------


@pytest.mark.parametrize("reason,words", [
    (FAIL_REASON.QUEUE_FULL, "not applied"),
    (FAIL_REASON.MISSING_LEADER, "not applied"),
    (FAIL_REASON.REQUEST_DENIED, "not applied"),
    (FAIL_REASON.DISCARDED, "outcome is unknown"),
    (FAIL_REASON.NOT_LEADER, "outcome is unknown"),
    (FAIL_REASON.LEADER_CHANGED, "outcome is unknown"),
    (FAIL_REASON.UNKNOWN_OUTCOME, "outcome is unknown"),
])
@on_fresh_loop
async def test_fail_reasons_become_unavailable_for_every_waiter(reason, words):
    proposer, fake = make(FakeRaft("hold", reason=reason), max_inflight=1)
    head = Call(proposer, cmd("head"))
    await fake.wait_submits(1)
    calls = await enqueue(proposer, [cmd("a"), None, cmd("b")])
    await fake.answer()
    await fake.wait_submits(2)
    assert fake.submits[1] == [cmd("a"), cmd("b")]
    await fake.answer()
    for call in [head, *calls]:
        error = await call.error()
        assert isinstance(error, Unavailable), error
        if call is calls[1]:  # the barrier: a read, no outcome to doubt
            assert error.code == "UNAVAILABLE" and "the read was not served" in error.message
            assert "request id" not in error.message
            continue
        assert error.code == "UNAVAILABLE" and words in error.message
    # the proposer goes on once Raft recovers
    fake.reason = FAIL_REASON.SUCCESS
    after = Call(proposer, cmd("after"))
    await fake.wait_submits(3)
    await fake.answer()
    assert (await after.outcome()).record == "after"
    assert proposer.idle


@on_fresh_loop
async def test_success_without_results_is_an_unknown_outcome():
    # This replica stopped applying, but Raft committed the entry: the others
    # may have applied it, so the caller must retry elsewhere, not give up.
    proposer, fake = make(FakeRaft("hold"))
    calls = [Call(proposer, cmd("a")), Call(proposer, None)]
    await fake.wait_submits(1)
    await fake.answer(results=None)
    for call in calls:
        error = await call.error()
        assert type(error) is Unavailable, error
        assert "stopped applying" in error.message
        assert ("same request id" if call is calls[0] else "the read was not served") \
            in error.message
    assert proposer.idle


@on_fresh_loop
async def test_a_submit_that_raises_fails_its_waiters_and_the_proposer_goes_on():
    fake = FakeRaft("sync", raise_on_submit=[RuntimeError("boom")])
    proposer, _ = make(fake, max_batch=2, max_inflight=1)
    a, b, c = (Call(proposer, cmd(rid)) for rid in "abc")
    for call in (a, b):
        error = await call.error()
        assert isinstance(error, Unavailable) and "proposal failed" in error.message
        assert "boom" in error.message
    # the slot was freed at once: the rest of the queue went out in the same flush
    assert await c.outcome() == Outcome(ok=True, revision=1, record="c")
    assert fake.submits == [[cmd("a"), cmd("b")], [cmd("c")]]
    assert (await Call(proposer, cmd("d")).outcome()).record == "d"
    assert proposer.idle


@on_fresh_loop
async def test_lost_callback_fails_waiters_after_batch_timeout_and_frees_the_slot():
    proposer, fake = make(FakeRaft("hold"), max_inflight=1, batch_timeout=SHORT)
    lost = Call(proposer, cmd("lost"), timeout=LONG)
    await fake.wait_submits(1)
    barrier, = await enqueue(proposer, [None])  # queued behind the stuck batch
    error = await lost.error()
    assert isinstance(error, Unavailable), error
    assert "no answer in time" in error.message
    assert SHORT * 0.75 <= lost.elapsed < LONG, lost.elapsed  # the batch deadline, not the caller's
    # the slot was freed: the barrier went out as the next batch
    await fake.wait_submits(2)
    with fake.cond:
        held = [commands for commands, _ in fake.pending]
    assert held == [[cmd("lost")], []]
    await fake.answer()      # the late answer for the expired batch is ignored...
    await fake.answer()      # ...and the barrier's batch commits normally
    assert await barrier.outcome() is None
    fake.start_responder()
    assert (await Call(proposer, cmd("after")).outcome()).record == "after"
    assert proposer.idle


@on_fresh_loop
async def test_caller_timeout_shorter_than_the_batch():
    proposer, fake = make(FakeRaft("hold"), max_inflight=1, batch_timeout=LONG)
    call = Call(proposer, cmd("a"), timeout=SHORT)
    error = await call.error()
    assert isinstance(error, Unavailable) and "no commit within 0.20s" in error.message
    assert "outcome is unknown" in error.message
    assert SHORT * 0.75 <= call.elapsed < LONG, call.elapsed
    assert fake.submits == [[cmd("a")]]  # it was proposed: the outcome really is unknown
    assert not proposer.idle             # its batch is still in flight in Raft ...
    started = time.monotonic()
    after = Call(proposer, cmd("after"))
    # ... but with its caller gone it no longer holds the only slot: a Raft that
    # lost the callback (a forward over a dropped connection) cannot stall "after"
    # until the batch timeout (LONG).
    await fake.wait_submits(2)
    assert time.monotonic() - started < LONG / 2
    await fake.answer()                  # a late answer for "a" does not overwrite anything
    await fake.answer()
    assert await after.outcome() == Outcome(ok=True, revision=2, record="after")
    assert proposer.idle


@on_fresh_loop
async def test_a_barrier_that_times_out_says_the_read_was_not_served():
    """Its message said "the outcome is unknown: retry with the same request id",
    which a portal passed on to a caller whose write had not even been sent."""
    proposer, fake = make(FakeRaft("hold"), max_inflight=1, batch_timeout=LONG)
    error = await Call(proposer, None, timeout=SHORT).error()
    assert isinstance(error, Unavailable) and "no commit within 0.20s" in error.message
    assert "the read was not served: retry it" in error.message
    assert "request id" not in error.message and "outcome" not in error.message
    await fake.answer()


@on_fresh_loop
async def test_a_barrier_whose_leader_changed_says_the_read_was_not_served():
    """Found by review: a linearizable read whose barrier lost its leader said
    "retry with the same request id", meaningless for a read."""
    proposer, fake = make(FakeRaft("sync", reason=FAIL_REASON.LEADER_CHANGED))
    read, write = Call(proposer, None), Call(proposer, cmd("a"))
    error = await read.error()
    assert error.message.startswith("leader changed before commit")
    assert error.message.endswith("; the read was not served: retry it")
    assert "request id" not in error.message
    assert "retry with the same request id" in (await write.error()).message


# ---- stopping ----------------------------------------------------------------------------


@on_fresh_loop
async def test_propose_after_stop_is_unavailable():
    proposer, fake = make(FakeRaft("sync"))
    assert (await Call(proposer, cmd("a")).outcome()).ok
    proposer.stop()
    error = await Call(proposer, cmd("b"), timeout=SHORT).error()
    assert isinstance(error, Unavailable) and "shutting down" in error.message
    assert len(fake.submits) == 1
    assert proposer.idle


@on_fresh_loop
async def test_stop_fails_queued_callers():
    proposer, fake = make(FakeRaft("hold"), max_inflight=1)
    head = Call(proposer, cmd("head"))
    await fake.wait_submits(1)
    queued_calls = await enqueue(proposer, [cmd("a"), None])
    proposer.stop()
    for call in queued_calls:
        error = await call.error()
        assert isinstance(error, Unavailable) and "shutting down" in error.message
        assert call.elapsed < 1.0, call.elapsed
    # the batch Raft already holds still reaches its caller; nothing queued is proposed
    await fake.answer()
    assert (await head.outcome()).record == "head"
    assert fake.submits == [[cmd("head")]]
    assert proposer.idle


@on_fresh_loop
async def test_stop_before_the_first_flush_proposes_nothing():
    proposer, fake = make(FakeRaft("sync"))
    calls = await enqueue(proposer, [cmd("a"), None])  # the flush is scheduled, not yet run
    proposer.stop()
    for call in calls:
        error = await call.error()
        assert isinstance(error, Unavailable) and "shutting down" in error.message
    # the flush was scheduled before the callers were woken, so it has run by now
    assert fake.submits == []
    assert proposer.idle and proposer.batches == 0


# ---- batches capped by size (PySyncObj's chunked send of large entries is broken) ----------


def big(rid: str, chars: int, char: str = "é") -> dict:
    return {**cmd(rid), "op": "create_task", "title": rid, "description": char * chars}


def test_command_size_counts_string_fields_in_utf8():
    from daemons.replica.proposer import command_size
    assert command_size(None) == 0
    ascii_size = command_size(big("r", 1000, "e"))
    assert command_size(big("r", 1000, "é")) == ascii_size + 1000  # é is 2 bytes
    assert command_size(big("r", 1000, "🚀")) == ascii_size + 3000  # 4 bytes
    assert command_size(big("r", 1, "\ud800")) > 0  # a lone surrogate does not raise


@on_fresh_loop
async def test_batches_are_capped_by_their_estimated_size():
    from daemons.replica.proposer import command_size
    fake = FakeRaft("hold")
    cap = 3 * command_size(big("r0", 10_000)) + 10
    proposer = Proposer(asyncio.get_running_loop(), fake, max_batch=100, max_inflight=1,
                        batch_timeout=LONG, max_batch_bytes=cap)
    _rigs.append((proposer, fake))
    head = Call(proposer, cmd("head"))
    await fake.wait_submits(1)
    calls = await enqueue(proposer, [big(f"r{i}", 10_000) for i in range(8)])
    fake.start_responder()
    assert (await head.outcome()).record == "head"
    assert [(await c.outcome()).record for c in calls] == [f"r{i}" for i in range(8)]
    assert [len(s) for s in fake.submits] == [1, 3, 3, 2]
    assert all(sum(command_size(c) for c in s) <= cap for s in fake.submits)


@on_fresh_loop
async def test_a_command_larger_than_the_cap_still_goes_alone():
    fake = FakeRaft("hold")
    proposer = Proposer(asyncio.get_running_loop(), fake, max_batch=100, max_inflight=1,
                        batch_timeout=LONG, max_batch_bytes=1000)
    _rigs.append((proposer, fake))
    head = Call(proposer, cmd("head"))
    await fake.wait_submits(1)
    calls = await enqueue(proposer, [cmd("small"), big("huge", 5000), cmd("after"), None])
    fake.start_responder()
    await head.outcome()
    assert [await c.outcome() and (await c.outcome()).record for c in calls] == \
        ["small", "huge", "after", None]
    assert [[c["request_id"] for c in s] for s in fake.submits[1:]] == \
        [["small"], ["huge"], ["after"]]


def test_default_cap_keeps_every_entry_far_below_pysyncobjs_chunking_size():
    from daemons.replica.proposer import MAX_BATCH_BYTES
    from daemons.replica.state_machine import APPEND_ENTRIES_BATCH_BYTES
    # one entry: the cap, plus one command (< gRPC's 4 MiB message), pickling overhead
    assert MAX_BATCH_BYTES + 4 * 1024 * 1024 < APPEND_ENTRIES_BATCH_BYTES // 2
