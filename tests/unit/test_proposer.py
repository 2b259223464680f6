"""Proposer (daemons/replica/proposer.py): group commit over a fake PySyncObj submit."""

from __future__ import annotations

import math
import threading
import time
from typing import Any, Callable

import pytest
from pysyncobj import FAIL_REASON

from daemons.core.errors import TarefaError, Unavailable
from daemons.replica.commands import Outcome
from daemons.replica.proposer import Proposer

LONG = 5.0  # bounds waits that should never elapse; only reached when a test fails


def wait_until(condition: Callable[[], bool], cond: threading.Condition, timeout: float = LONG,
               what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    with cond:
        while not condition():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {what}")
            cond.wait(min(left, 0.005))


class FakeRaft:
    """Stands in for `SyncObj.apply_batch`: records submits and answers them on demand.

    mode "sync": answer inside submit (same thread, like a local failure);
    mode "hold": keep the callback until answer_next()/answer_all()/a responder thread.
    Each command's outcome carries its request id (record) and a revision that
    grows in commit order, so callers can check they got their own result.
    """

    def __init__(self, mode: str = "hold", reason: int = FAIL_REASON.SUCCESS,
                 raise_on_submit: Exception | None = None) -> None:
        self.mode = mode
        self.reason = reason
        self.raise_on_submit = raise_on_submit
        self.cond = threading.Condition()
        self.submits: list[list[Any]] = []
        self.pending: list[tuple[list[Any], Callable]] = []
        self.outstanding = 0
        self.max_outstanding = 0
        self.revision = 0
        self._responder: threading.Thread | None = None
        self._stop = False

    def __call__(self, commands: list, callback: Callable) -> None:
        assert isinstance(commands, list)
        with self.cond:
            self.submits.append(list(commands))
            if self.raise_on_submit is not None:
                raise self.raise_on_submit
            self.outstanding += 1
            self.max_outstanding = max(self.max_outstanding, self.outstanding)
            self.pending.append((list(commands), callback))
            self.cond.notify_all()
        if self.mode == "sync":
            self.answer_next()

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
        with self.cond:
            commands, callback = self.pending.pop(0)
            self.outstanding -= 1
            if isinstance(results, str):
                results = self._results(commands)
        callback(results, self.reason if reason is None else reason)

    def wait_submits(self, n: int) -> None:
        wait_until(lambda: len(self.submits) >= n, self.cond, what=f"{n} submits")

    def start_responder(self) -> None:
        """Answer every held submit from another thread, as PySyncObj's tick thread does."""
        def run() -> None:
            while True:
                with self.cond:
                    while not self.pending and not self._stop:
                        self.cond.wait(0.05)
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


@pytest.fixture
def make():
    made: list[tuple[Proposer, FakeRaft]] = []

    def build(fake: FakeRaft | None = None, max_batch: int = 8, max_inflight: int = 2,
              batch_timeout: float = LONG) -> tuple[Proposer, FakeRaft]:
        fake = fake or FakeRaft()
        proposer = Proposer(fake, max_batch=max_batch, max_inflight=max_inflight,
                            batch_timeout=batch_timeout)
        proposer.start()
        made.append((proposer, fake))
        return proposer, fake

    yield build
    for proposer, fake in made:
        fake.close()
        proposer.stop()


def cmd(rid: str) -> dict:
    return {"op": "create_client", "cid": "1", "data": "{}", "at": "t", "request_id": rid}


class Caller(threading.Thread):
    """One propose() on its own thread; keeps the outcome or the exception."""

    def __init__(self, proposer: Proposer, command: dict | None, timeout: float = LONG) -> None:
        super().__init__(daemon=True)
        self.proposer, self.command, self.timeout = proposer, command, timeout
        self.outcome: Outcome | None = None
        self.error: BaseException | None = None
        self.returned = False
        self.elapsed = 0.0

    def run(self) -> None:
        start = time.monotonic()
        try:
            self.outcome = self.proposer.propose(self.command, self.timeout)
            self.returned = True
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            self.error = exc
        self.elapsed = time.monotonic() - start

    def result(self) -> "Caller":
        self.join(LONG + 1)
        assert not self.is_alive(), "propose() did not return"
        return self


def queued(proposer: Proposer) -> int:
    return len(proposer._queue)  # private, but the only way to know a caller is queued


def start_in_order(proposer: Proposer, fake: FakeRaft, commands: list[dict | None]) -> list[Caller]:
    """Start callers one by one, each only once the previous one sits in the queue."""
    callers = []
    for command in commands:
        before = queued(proposer)
        caller = Caller(proposer, command)
        caller.start()
        wait_until(lambda: queued(proposer) == before + 1, fake.cond, what="caller queued")
        callers.append(caller)
    return callers


# ---- the basics ------------------------------------------------------------------------


def test_a_lone_command_goes_out_at_once_and_gets_its_outcome(make):
    proposer, fake = make(FakeRaft("sync"))
    outcome = proposer.propose(cmd("r1"), timeout=LONG)
    assert outcome == Outcome(ok=True, revision=1, record="r1")
    assert fake.submits == [[cmd("r1")]]
    assert proposer.batches == 1 and proposer.commands == 1


def test_sequential_calls_each_get_their_own_outcome(make):
    proposer, fake = make(FakeRaft("sync"))
    outcomes = [proposer.propose(cmd(f"r{i}"), timeout=LONG) for i in range(5)]
    assert [(o.record, o.revision) for o in outcomes] == [(f"r{i}", i + 1) for i in range(5)]
    assert len(fake.submits) == 5


def test_a_lone_barrier_returns_none_without_sending_a_command(make):
    proposer, fake = make(FakeRaft("sync"))
    assert proposer.propose(None, timeout=LONG) is None
    assert fake.submits == [[]]


def test_callback_from_another_thread(make):
    fake = FakeRaft("hold")
    fake.start_responder()
    proposer, _ = make(fake)
    callers = [Caller(proposer, cmd(f"r{i}")) for i in range(20)]
    for c in callers:
        c.start()
    for i, c in enumerate(callers):
        assert c.result().returned, c.error
        assert c.outcome.ok and c.outcome.record == f"r{i}"
    assert sorted(o.outcome.revision for o in callers) == list(range(1, 21))


# ---- batching ---------------------------------------------------------------------------


def test_concurrent_calls_are_batched_within_limits(make):
    max_batch, max_inflight, total = 8, 2, 50
    proposer, fake = make(FakeRaft("hold"), max_batch=max_batch, max_inflight=max_inflight)
    callers = [Caller(proposer, cmd(f"r{i}")) for i in range(total)]
    for c in callers:
        c.start()
    fake.wait_submits(max_inflight)
    # every caller is either in a held batch or queued behind them
    wait_until(lambda: sum(map(len, fake.submits)) + queued(proposer) == total, fake.cond,
               what="all callers queued")
    assert len(fake.submits) == max_inflight  # no more than max_inflight outstanding
    sent_first = sum(map(len, fake.submits))
    fake.start_responder()
    for c in callers:
        assert c.result().returned, c.error

    sizes = [len(s) for s in fake.submits]
    assert sum(sizes) == total
    assert max(sizes) <= max_batch
    assert fake.max_outstanding <= max_inflight
    assert len(sizes) == max_inflight + math.ceil((total - sent_first) / max_batch), sizes
    assert len(sizes) < total
    assert proposer.batches == len(sizes) and proposer.commands == total
    # results routed to the right callers, in commit order
    order = [command["request_id"] for batch in fake.submits for command in batch]
    assert sorted(order) == sorted(f"r{i}" for i in range(total))
    for c in callers:
        assert c.outcome.record == c.command["request_id"]
        assert c.outcome.revision == order.index(c.command["request_id"]) + 1


def test_max_inflight_is_respected_under_a_slow_raft(make):
    proposer, fake = make(FakeRaft("hold"), max_batch=3, max_inflight=1)
    callers = [Caller(proposer, cmd(f"r{i}")) for i in range(10)]
    for c in callers:
        c.start()
    while any(c.is_alive() for c in callers):
        wait_until(lambda: fake.pending or not any(c.is_alive() for c in callers), fake.cond)
        with fake.cond:
            assert fake.outstanding <= 1
            has_pending = bool(fake.pending)
        if has_pending:
            fake.answer_next()
    assert fake.max_outstanding == 1
    assert all(len(s) <= 3 for s in fake.submits)
    assert all(c.result().returned for c in callers)


def test_queue_order_is_kept_and_barriers_get_none(make):
    proposer, fake = make(FakeRaft("hold"), max_batch=10, max_inflight=1)
    head = Caller(proposer, cmd("head"))
    head.start()
    fake.wait_submits(1)  # the only in-flight slot is now taken
    plan = [cmd("a"), None, cmd("b"), cmd("c"), None, cmd("d")]
    callers = start_in_order(proposer, fake, plan)
    fake.answer_next()                       # head commits; the rest go as one batch
    fake.wait_submits(2)
    assert fake.submits[1] == [cmd("a"), cmd("b"), cmd("c"), cmd("d")]  # order kept, no barriers
    fake.answer_next()
    assert head.result().outcome.record == "head"
    got = [(c.result().returned, c.outcome and c.outcome.record) for c in callers]
    assert got == [(True, "a"), (True, None), (True, "b"), (True, "c"), (True, None), (True, "d")]


def test_batches_never_exceed_max_batch(make):
    proposer, fake = make(FakeRaft("hold"), max_batch=4, max_inflight=1)
    head = Caller(proposer, cmd("head"))
    head.start()
    fake.wait_submits(1)
    callers = start_in_order(proposer, fake, [cmd(f"r{i}") for i in range(10)])
    fake.start_responder()
    assert all(c.result().returned for c in callers) and head.result().returned
    assert [len(s) for s in fake.submits] == [1, 4, 4, 2]
    assert [c["request_id"] for s in fake.submits[1:] for c in s] == [f"r{i}" for i in range(10)]


# ---- failures --------------------------------------------------------------------------


@pytest.mark.parametrize("reason,words", [
    (FAIL_REASON.QUEUE_FULL, "not applied"),
    (FAIL_REASON.MISSING_LEADER, "not applied"),
    (FAIL_REASON.REQUEST_DENIED, "not applied"),
    (FAIL_REASON.DISCARDED, "outcome is unknown"),
    (FAIL_REASON.NOT_LEADER, "outcome is unknown"),
    (FAIL_REASON.LEADER_CHANGED, "outcome is unknown"),
    (FAIL_REASON.UNKNOWN_OUTCOME, "outcome is unknown"),
])
def test_fail_reasons_become_unavailable_for_every_waiter(make, reason, words):
    proposer, fake = make(FakeRaft("hold", reason=reason), max_inflight=1)
    head = Caller(proposer, cmd("head"))
    head.start()
    fake.wait_submits(1)
    callers = start_in_order(proposer, fake, [cmd("a"), None, cmd("b")])
    fake.answer_next()
    fake.wait_submits(2)
    fake.answer_next()
    for c in [head, *callers]:
        c.result()
        assert not c.returned
        assert isinstance(c.error, Unavailable), c.error
        assert c.error.code == "UNAVAILABLE" and words in c.error.message


def test_success_without_results_is_an_internal_error(make):
    proposer, fake = make(FakeRaft("hold"))
    caller = Caller(proposer, cmd("a"))
    caller.start()
    fake.wait_submits(1)
    fake.answer_next(results=None)
    caller.result()
    assert type(caller.error) is TarefaError and caller.error.code == "INTERNAL"


def test_a_submit_that_raises_fails_its_waiters_and_the_proposer_goes_on(make):
    fake = FakeRaft("sync", raise_on_submit=RuntimeError("boom"))
    proposer, _ = make(fake, max_inflight=1)
    with pytest.raises(Unavailable, match="proposal failed.*boom"):
        proposer.propose(cmd("a"), timeout=LONG)
    fake.raise_on_submit = None
    assert proposer.propose(cmd("b"), timeout=LONG).record == "b"


def test_lost_callback_fails_waiters_after_batch_timeout_and_frees_the_slot(make):
    proposer, fake = make(FakeRaft("hold"), max_inflight=1, batch_timeout=0.2)
    lost = Caller(proposer, cmd("lost"), timeout=LONG)
    lost.start()
    fake.wait_submits(1)
    barrier = start_in_order(proposer, fake, [None])[0]  # queued behind the stuck batch
    lost.result()
    assert isinstance(lost.error, Unavailable), lost.error
    assert "no answer in time" in lost.error.message
    assert 0.15 <= lost.elapsed < 2.0, lost.elapsed  # the batch deadline, not the caller's
    # the slot was freed: the barrier went out as the next batch
    fake.wait_submits(2)
    with fake.cond:
        held = list(fake.pending)
    assert [commands for commands, _ in held] == [[cmd("lost")], []]
    fake.answer_next()      # the late answer for the expired batch is ignored...
    fake.answer_next()      # ...and the barrier's batch commits normally
    assert barrier.result().returned and barrier.outcome is None
    assert lost.error is not None and lost.outcome is None
    fake.start_responder()
    assert proposer.propose(cmd("after"), timeout=LONG).record == "after"


def test_caller_timeout_shorter_than_the_batch(make):
    proposer, fake = make(FakeRaft("hold"), batch_timeout=LONG)
    start = time.monotonic()
    with pytest.raises(Unavailable, match="no commit within 0.20s"):
        proposer.propose(cmd("a"), timeout=0.2)
    assert time.monotonic() - start < 2.0
    fake.answer_next()  # a late answer does not overwrite anything or crash


# ---- stopping -----------------------------------------------------------------------------


def test_propose_after_stop_is_unavailable(make):
    proposer, fake = make(FakeRaft("sync"))
    assert proposer.propose(cmd("a"), timeout=LONG).ok
    proposer.stop()
    with pytest.raises(Unavailable, match="shutting down"):
        proposer.propose(cmd("b"), timeout=0.5)
    assert len(fake.submits) == 1


def test_stop_fails_queued_callers(make):
    proposer, fake = make(FakeRaft("hold"), max_inflight=1)
    head = Caller(proposer, cmd("head"), timeout=0.5)
    head.start()
    fake.wait_submits(1)
    queued_callers = start_in_order(proposer, fake, [cmd("a"), None])
    proposer.stop()
    for c in queued_callers:
        c.result()
        assert isinstance(c.error, Unavailable) and "shutting down" in c.error.message
        assert c.elapsed < 2.0
    assert len(fake.submits) == 1  # nothing queued was proposed after stop
    head.result()
    assert isinstance(head.error, Unavailable)
