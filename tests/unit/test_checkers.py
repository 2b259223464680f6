"""The fault-suite history checkers on hand-made good and bad histories, and a
randomized self-test: histories generated from a sequential model with random
concurrency must pass, and the same histories with one read corrupted must fail."""

from __future__ import annotations

import random
import threading

import pytest

from tests.fault.checkers import (
    Verdict,
    check_cache_monotonic,
    check_converged,
    check_linearizable,
    check_no_lost_or_duplicated,
)
from tests.fault.checkers.linearizability import check_register, normalize
from tests.fault.history import History, Op, by_key


class Script:
    """Builds a hand-made history; every event gets the next clock tick."""

    def __init__(self) -> None:
        self.history = History()
        self.clock = 0.0
        self.open: dict[int, Op] = {}

    def _tick(self) -> float:
        self.clock += 1.0
        return self.clock

    def call(self, p: int, f: str, value: object = None, key: str = "k", portal: str = "a",
             consistency: str = "") -> Script:
        self.open[p] = self.history.invoke(p, f, key, value, portal, consistency=consistency,
                                           time=self._tick())
        return self

    def ok(self, p: int, result: str = "ok", value: object = None,
           rev: int | None = None) -> Script:
        self.history.complete(self.open.pop(p), "ok", result, value, rev, time=self._tick())
        return self

    def fail(self, p: int) -> Script:
        self.history.complete(self.open.pop(p), "fail", time=self._tick())
        return self

    def info(self, p: int) -> Script:
        self.history.complete(self.open.pop(p), "info", time=self._tick())
        return self

    def do(self, p: int, f: str, value: object = None, result: str = "ok", out: object = None,
           rev: int | None = None, key: str = "k", portal: str = "a") -> Script:
        """A call that completes before anything else happens."""
        self.call(p, f, value, key, portal)
        return self.ok(p, result, out, rev)


def passes(verdict: Verdict) -> bool:
    assert isinstance(verdict, Verdict)
    str(verdict)  # always printable
    return verdict.ok


def fails(verdict: Verdict) -> bool:
    assert isinstance(verdict, Verdict)
    assert not verdict.ok and not verdict.unknown, str(verdict)
    assert verdict.details, "a violation must show the offending sub-history"
    return True


# -- the history recorder --------------------------------------------------------------


def test_history_pairs_calls_and_round_trips_through_jsonl(tmp_path):
    s = Script().call(1, "create", "a").call(2, "read").ok(1, rev=7).ok(2, "absent")
    s.call(1, "write", "b").info(1).call(3, "delete")  # p3 never completes
    calls = s.history.calls()
    assert [(c.f, c.type, c.result, c.revision) for c in calls] == [
        ("create", "ok", "ok", 7), ("read", "ok", "absent", None), ("write", "info", "", None),
        ("delete", "info", "", None)]
    assert calls[0].took_effect and calls[2].may_have_effect and not calls[1].may_have_effect
    assert calls[3].end is None and calls[3].completion is None
    path = str(tmp_path / "h.jsonl")
    s.history.to_jsonl(path)
    again = History.from_jsonl(path)
    assert [(c.f, c.type, c.result, c.revision, c.start, c.end) for c in again.calls()] == \
        [(c.f, c.type, c.result, c.revision, c.start, c.end) for c in calls]


def test_history_pairs_by_process_when_ops_are_built_by_hand():
    ops = [Op(1, "invoke", "create", "k", "a"), Op(2, "invoke", "read", "k"),
           Op(2, "ok", "read", "k", "a", "ok", 1), Op(1, "ok", "create", "k", "a", "ok", 1)]
    calls = History(ops).calls()
    assert [(c.f, c.start, c.end, c.read_value) for c in calls] == [
        ("create", 0, 3, None), ("read", 1, 2, "a")]


@pytest.mark.parametrize("f, type_, result", [
    ("create", "ok", "absent"), ("write", "ok", "exists"), ("read", "ok", ""),
    ("write", "fail", "ok"), ("delete", "done", "")])
def test_history_refuses_malformed_completions(f, type_, result):
    history = History()
    op = history.invoke(1, f, "k", "v")
    with pytest.raises(ValueError):
        history.complete(op, type_, result)


def test_history_records_from_many_threads():
    history = History()

    def client(p: int) -> None:
        for n in range(200):
            op = history.invoke(p, "write", "k", f"{p}-{n}")
            history.complete(op, "ok", "ok", revision=None)

    threads = [threading.Thread(target=client, args=(p,)) for p in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    calls = history.calls()
    assert len(calls) == 1600 and all(c.end is not None and c.end > c.start for c in calls)
    assert [op.index for op in history.ops] == list(range(3200))


def test_histories_of_two_recorders_merge_by_time():
    linear, cached = History(), History()
    w = linear.invoke(1, "create", "k", "a", "a", time=1.0)
    r = cached.invoke(2, "read", "k", portal="a", consistency="cached", time=2.0)
    linear.complete(w, "ok", "ok", revision=1, time=3.0)
    cached.complete(r, "ok", "ok", value="a", revision=1, time=4.0)
    merged = History.merged(linear, cached)
    assert [(c.f, c.start, c.end) for c in merged.calls()] == [("create", 0, 2), ("read", 1, 3)]
    assert passes(check_cache_monotonic(merged, []))


# -- checker 2: linearizability ---------------------------------------------------------


def test_sequential_cycles_of_create_write_delete_are_linearizable():
    s = Script()
    s.do(1, "read", result="absent").do(1, "write", "x", result="absent")
    s.do(1, "create", "a", rev=1).do(2, "read", out="a", rev=1).do(2, "create", "z", "exists")
    s.do(1, "write", "b", rev=2).do(2, "read", out="b", rev=2)
    s.do(1, "delete", rev=3).do(2, "read", result="absent").do(2, "delete", result="absent")
    s.do(1, "create", "c", rev=5).do(2, "read", out="c", rev=5)  # rev 4 went to another key
    s.do(1, "delete", rev=6).do(1, "create", "d", rev=7).do(2, "read", out="d", rev=7)
    assert passes(check_linearizable(s.history))


@pytest.mark.parametrize("revs, seen", [((2, 3), "b"), ((3, 2), "a")])
def test_concurrent_writes_linearize_in_either_order(revs, seen):
    s = Script().do(0, "create", "init", rev=1)
    s.call(1, "write", "a").call(2, "write", "b").ok(2, rev=revs[1]).ok(1, rev=revs[0])
    s.do(3, "read", out=seen, rev=3)
    assert passes(check_linearizable(s.history))


def test_revisions_decide_the_order_of_concurrent_writes():
    s = Script().do(0, "create", "init", rev=1)
    s.call(1, "write", "a").call(2, "write", "b").ok(1, rev=2).ok(2, rev=3)
    s.do(3, "read", out="a", rev=2)  # a value, but b came later
    assert fails(check_linearizable(s.history))
    assert passes(check_linearizable(s.history, revisions=False))


def test_read_must_return_the_revision_of_its_write():
    s = Script().do(1, "create", "a", rev=4).do(2, "read", out="a", rev=5)
    assert fails(check_linearizable(s.history))


def test_stale_read_after_a_completed_write_is_not_linearizable():
    s = Script().do(1, "create", "a", rev=1).do(1, "write", "b", rev=2)
    s.do(2, "read", out="a", rev=1)
    verdict = check_linearizable(s.history)
    assert fails(verdict)
    text = str(verdict)
    assert "read k -> 'a' rev 1" in text and "write k 'b' -> ok rev 2" in text


def test_read_of_a_value_never_written_is_not_linearizable():
    s = Script().do(1, "create", "a", rev=1).do(2, "read", out="ghost", rev=1)
    verdict = check_linearizable(s.history)
    assert fails(verdict)
    assert "'ghost'" in str(verdict)


def test_read_concurrent_with_a_write_may_see_either_value():
    for seen, rev in (("a", 1), ("b", 2)):
        s = Script().do(1, "create", "a", rev=1)
        s.call(1, "write", "b").call(2, "read").ok(2, value=seen, rev=rev).ok(1, rev=2)
        assert passes(check_linearizable(s.history))


def test_info_write_that_later_appears_is_fine():
    s = Script().do(1, "create", "a", rev=1)
    s.call(1, "write", "b").info(1)
    s.do(2, "read", out="a", rev=1).do(2, "read", out="b", rev=3)  # took effect late
    assert passes(check_linearizable(s.history))


def test_info_write_that_never_appears_is_fine():
    s = Script().do(1, "create", "a", rev=1)
    s.call(1, "write", "b").info(1).call(3, "delete")  # p3 never completes
    s.do(2, "read", out="a", rev=1).do(2, "write", "c", rev=4).do(2, "read", out="c", rev=4)
    assert passes(check_linearizable(s.history))


def test_info_write_cannot_take_effect_before_its_invoke():
    s = Script().do(1, "create", "a", rev=1).do(2, "read", out="b", rev=2)
    s.call(1, "write", "b").info(1)
    assert fails(check_linearizable(s.history))


def test_failed_write_must_have_no_effect():
    s = Script().do(1, "create", "a", rev=1)
    s.call(1, "write", "b").fail(1).do(2, "read", out="b", rev=2)
    assert fails(check_linearizable(s.history))


def test_refusals_must_match_the_state():
    bad_exists = Script().do(1, "create", "a", "exists")
    assert fails(check_linearizable(bad_exists.history))
    bad_absent = Script().do(1, "create", "a", rev=1).do(2, "delete", result="absent")
    assert fails(check_linearizable(bad_absent.history))
    twice = Script().do(1, "create", "a", rev=1).do(2, "create", "b", rev=2)
    assert fails(check_linearizable(twice.history))


def test_delete_create_cycles_with_concurrency():
    s = Script().do(1, "create", "a", rev=1)
    s.call(1, "delete").call(2, "create", "b").call(3, "read")
    s.ok(1, rev=2).ok(3, "absent").ok(2, rev=3)  # delete, read, create
    s.do(3, "read", out="b", rev=3)
    s.call(1, "delete").call(2, "write", "c").ok(2, "absent").ok(1, rev=4)  # delete first
    s.do(3, "read", result="absent")
    assert passes(check_linearizable(s.history))
    s.do(1, "create", "d", "exists")  # but the key is absent
    assert fails(check_linearizable(s.history))


def test_search_backtracks_when_the_first_order_tried_fails():
    # Both writes are pending when the reads run; trying a before b (invoke
    # order) fails at the second read, so the search must back up.
    s = Script().do(0, "create", "init", rev=1)
    s.call(1, "write", "a").call(2, "write", "b")
    s.do(3, "read", out="b").do(4, "read", out="a")
    s.ok(1).ok(2)
    ops = normalize(by_key(s.history.calls())["k"], revisions=False)
    result = check_register(ops, [(False, None, 0, False, 0)], False, 10_000)
    assert result.outcome == "ok" and result.backtracks > 0
    assert passes(check_linearizable(s.history, revisions=False))
    s.do(5, "read", out="b")  # b after a after b: impossible
    assert fails(check_linearizable(s.history, revisions=False))


def test_exhausted_budget_is_unknown_not_a_pass():
    s = Script()
    for p in range(6):
        s.call(p, "write", f"v{p}")
    for p in range(6):
        s.ok(p, "absent")
    verdict = check_linearizable(s.history, max_steps=3)
    assert not verdict.ok and verdict.unknown and verdict.status == "UNKNOWN"
    assert passes(check_linearizable(s.history))


def test_cached_reads_are_left_out_unless_asked_for():
    s = Script().do(1, "create", "a", rev=1).do(1, "write", "b", rev=2)
    s.call(2, "read", consistency="cached").ok(2, value="a", rev=1)
    assert passes(check_linearizable(s.history))
    assert fails(check_linearizable(s.history, cached_reads=True))


def test_initial_state_is_honoured():
    s = Script().do(1, "read", out="old", rev=9).do(1, "write", "new", rev=10)
    assert fails(check_linearizable(s.history))
    assert passes(check_linearizable(s.history, initial_state={"k": ("old", 9)}))


def test_keys_are_independent_registers():
    s = Script().do(1, "create", "a", rev=1, key="x").do(1, "create", "b", rev=2, key="y")
    s.do(2, "read", out="a", rev=1, key="x").do(2, "read", result="absent", key="z")
    assert passes(check_linearizable(s.history))
    s.do(2, "read", out="b", rev=2, key="x")
    verdict = check_linearizable(s.history)
    assert fails(verdict) and "1 of 3 keys" in verdict.summary


def test_violation_is_shrunk_to_a_small_window():
    s = Script().do(0, "create", "v0", rev=1)
    rev = 1
    for n in range(1, 60):  # a long, busy, valid history
        rev += 1
        s.call(1, "write", f"v{n}").call(2, "read").ok(2, value=f"v{n - 1}", rev=rev - 1)
        s.ok(1, rev=rev).do(3, "read", out=f"v{n}", rev=rev)
    s.do(4, "read", out="v30", rev=31)  # stale
    verdict = check_linearizable(s.history)
    assert fails(verdict)
    window = [line for line in verdict.details if line.strip().startswith("#")]
    assert len(window) <= 4, str(verdict)
    assert any("read k -> 'v30' rev 31" in line for line in window)
    assert any("v59" in line for line in verdict.details), "names the state it should see"


# -- randomized self-test --------------------------------------------------------------


def simulate(seed: int, processes: int = 4, calls: int = 48, keys: int = 2,
             p_info: float = 0.1, p_fail: float = 0.05):
    """A history from a sequential model with random concurrency windows: each
    call takes effect at one instant between its invoke and its completion.
    Returns the history, the final state and the events each portal received."""
    rng = random.Random(seed)
    plans = []
    for p in range(processes):
        t = rng.random()
        for _ in range(calls // processes):
            start = t + rng.random()
            point = start + rng.random() * 2
            end = point + rng.random() * 2
            t = end
            kind = "fail" if rng.random() < p_fail else "info" if rng.random() < p_info else "ok"
            plans.append({"p": p, "start": start, "point": point, "end": end, "kind": kind,
                          "key": f"k{rng.randrange(keys)}",
                          "f": rng.choices(["create", "write", "delete", "read"], [3, 3, 2, 4])[0],
                          "effect": kind == "ok" or (kind == "info" and rng.random() < 0.5)})
    state: dict[str, tuple[str, int]] = {}
    received = []
    revision = 0
    for n, plan in enumerate(sorted(plans, key=lambda x: x["point"])):
        plan["value"] = f"v{n}" if plan["f"] in ("create", "write") else None
        if not plan["effect"]:
            continue
        key, f, now = plan["key"], plan["f"], state.get(plan["key"])
        if f == "read":
            plan["out"] = ("ok", now[0], now[1]) if now else ("absent", None, None)
        elif (f == "create") == (now is None):
            revision += 1
            if f == "delete":
                del state[key]
            else:
                state[key] = (plan["value"], revision)
            plan["out"] = ("ok", None, revision)
            for portal in ("a", "b"):
                received.append((portal, key, revision, plan["point"] + rng.random() * 3))
        else:
            plan["out"] = ("exists" if f == "create" else "absent", None, None)
    events = [(x["start"], 0, i) for i, x in enumerate(plans)]
    events += [(x["end"], 1, i) for i, x in enumerate(plans)]
    history = History()
    for when, is_end, i in sorted(events):
        plan = plans[i]
        if not is_end:
            plan["op"] = history.invoke(plan["p"], plan["f"], plan["key"], plan["value"],
                                        portal="ab"[plan["p"] % 2], time=when)
        elif plan["kind"] != "ok":
            history.complete(plan["op"], plan["kind"], time=when)
        else:
            result, value, rev = plan["out"]
            history.complete(plan["op"], "ok", result, value, rev, time=when)
    final = {f"k{k}": state.get(f"k{k}") for k in range(keys)}
    return history, final, received


def corrupt_one_read(history: History, rng: random.Random) -> bool:
    """Make one found read stale: return a value that a later completed write had
    already replaced before the read began. False if the history has no such read."""
    calls = history.calls()
    writer = {c.argument: c for c in calls if c.took_effect and c.f in ("create", "write")}
    choices = []
    for read in calls:
        if read.f != "read" or read.type != "ok" or read.result != "ok":
            continue
        newer = writer.get(read.read_value)
        if newer is None or newer.end is None or newer.end > read.start:
            continue
        older = [c for c in calls if c.took_effect and c.f in ("create", "write")
                 and c.key == read.key and c.end < newer.start]
        if older:
            choices.append((read, rng.choice(older)))
    if not choices:
        return False
    read, older = rng.choice(choices)
    read.completion.value = older.argument  # type: ignore[union-attr]
    read.completion.revision = older.revision  # type: ignore[union-attr]
    return True


@pytest.mark.parametrize("seed", range(40))
def test_random_histories_pass_and_a_corrupted_read_fails(seed):
    history, final, received = simulate(seed)
    assert passes(check_linearizable(history)), str(check_linearizable(history))
    assert passes(check_linearizable(history, revisions=False))
    assert passes(check_no_lost_or_duplicated(history, final)), \
        str(check_no_lost_or_duplicated(history, final))
    assert passes(check_cache_monotonic(history, received)), \
        str(check_cache_monotonic(history, received))
    if corrupt_one_read(history, random.Random(seed)):
        assert fails(check_linearizable(history))
        assert fails(check_linearizable(history, revisions=False))


def test_random_busy_key_with_sixteen_clients_is_checked_quickly():
    history, _, _ = simulate(7, processes=16, calls=300, keys=1, p_info=0.15)
    verdict = check_linearizable(history, time_limit=5)
    assert passes(verdict), str(verdict)
    assert corrupt_one_read(history, random.Random(7))
    assert fails(check_linearizable(history, time_limit=5, shrink_seconds=2))


# -- checker 1: no lost or duplicated writes --------------------------------------------


def test_every_acknowledged_write_accounted_for():
    s = Script().do(1, "create", "a", rev=1).do(1, "write", "b", rev=2)
    s.do(1, "create", "x", rev=3, key="gone").do(1, "delete", rev=4, key="gone")
    assert passes(check_no_lost_or_duplicated(s.history, {"k": ("b", 2), "gone": None}))


def test_concurrent_overwrite_accounts_for_a_write():
    s = Script().call(1, "create", "a").call(2, "create", "b")
    s.ok(1, rev=1).ok(2, "exists").do(2, "write", "c", rev=2)
    assert passes(check_no_lost_or_duplicated(s.history, {"k": ("c", 2)}))


def test_lost_acknowledged_write():
    s = Script().do(1, "create", "a", rev=1).do(1, "write", "b", rev=2)
    verdict = check_no_lost_or_duplicated(s.history, {"k": ("a", 1)})
    assert fails(verdict)
    assert any("write k 'b' -> ok rev 2" in line for line in verdict.details)
    assert any("final state of k: 'a' rev 1" in line for line in verdict.details)


def test_lost_write_when_key_is_absent_and_nothing_deleted_it():
    s = Script().do(1, "create", "a", rev=1).do(2, "delete", result="absent")
    assert fails(check_no_lost_or_duplicated(s.history, {"k": None}))
    s.call(2, "delete").fail(2)  # a failed delete does not explain it either
    assert fails(check_no_lost_or_duplicated(s.history, {"k": None}))


def test_delete_create_cycles_against_the_final_state():
    s = Script().do(1, "create", "a", rev=1).do(1, "delete", rev=2).do(1, "create", "b", rev=3)
    assert passes(check_no_lost_or_duplicated(s.history, {"k": ("b", 3)}))
    assert fails(check_no_lost_or_duplicated(s.history, {"k": None}))  # b lost
    assert fails(check_no_lost_or_duplicated(s.history, {"k": ("a", 1)}))  # a resurrected
    s.do(2, "delete", rev=4)
    assert passes(check_no_lost_or_duplicated(s.history, {"k": None}))
    early = Script().do(1, "create", "a", rev=5).call(2, "delete").ok(2, rev=4)
    assert fails(check_no_lost_or_duplicated(early.history, {"k": None}))  # delete came first


def test_indeterminate_calls_may_or_may_not_have_happened():
    s = Script().do(1, "create", "a", rev=1)
    s.call(2, "write", "b").info(2)
    assert passes(check_no_lost_or_duplicated(s.history, {"k": ("a", 1)}))  # never applied
    assert passes(check_no_lost_or_duplicated(s.history, {"k": ("b", 9)}))  # applied
    s.call(3, "delete")  # never completed
    assert passes(check_no_lost_or_duplicated(s.history, {"k": None}))


def test_duplicate_revision_is_reported():
    s = Script().do(1, "create", "a", rev=1, key="x").do(2, "create", "b", rev=1, key="y")
    verdict = check_no_lost_or_duplicated(s.history, {"x": ("a", 1), "y": ("b", 1)})
    assert fails(verdict) and "revision 1 returned by 2" in verdict.summary


def test_write_applied_twice_shows_in_the_final_revision():
    s = Script().do(1, "create", "a", rev=1).do(1, "write", "b", rev=2).do(2, "write", "c", rev=3)
    verdict = check_no_lost_or_duplicated(s.history, {"k": ("b", 4)})  # b re-applied at 4
    assert fails(verdict) and "applied again" in verdict.summary


def test_final_value_from_nowhere_or_from_a_failed_call():
    s = Script().do(1, "create", "a", rev=1)
    s.call(2, "write", "b").fail(2)
    assert fails(check_no_lost_or_duplicated(s.history, {"k": ("b", 2)}))
    assert fails(check_no_lost_or_duplicated(s.history, {"k": ("zzz", 2)}))
    assert fails(check_no_lost_or_duplicated(s.history, {"k": ("a", 1), "other": ("q", 3)}))


def test_missing_final_state_for_a_written_key_is_reported():
    s = Script().do(1, "create", "a", rev=1)
    assert fails(check_no_lost_or_duplicated(s.history, {}))


def test_revisionless_acks_fall_back_to_real_time():
    s = Script().do(1, "create", "a").do(1, "write", "b")
    assert passes(check_no_lost_or_duplicated(s.history, {"k": ("b", 2)}))
    assert fails(check_no_lost_or_duplicated(s.history, {"k": ("a", 1)}))


@pytest.mark.parametrize("seed", range(10))
def test_random_final_state_with_a_lost_write_fails(seed):
    history, final, _ = simulate(seed, p_info=0.0)
    assert passes(check_no_lost_or_duplicated(history, final))
    acked = [c for c in history.calls() if c.took_effect and c.f in ("create", "write")]
    last = max(acked, key=lambda c: c.revision)
    damaged = dict(final)
    damaged[last.key] = None if final[last.key] else ("v-other", last.revision)
    assert fails(check_no_lost_or_duplicated(history, damaged))


# -- checker 3: convergence --------------------------------------------------------------


def test_converged_replicas_pass():
    assert passes(check_converged({"r1": "abc", "r2": "abc", "r3": "abc"}))


def test_diverged_replica_is_named_with_the_differing_keys():
    contents = {"r1": {"k": ("a", 1), "j": ("x", 2)}, "r2": {"k": ("a", 1), "j": ("x", 2)},
                "r3": {"k": ("b", 3), "j": ("x", 2)}}
    verdict = check_converged({"r1": "abc", "r2": "abc", "r3": "def"}, contents)
    assert fails(verdict)
    assert "r3 differ from r1, r2" in verdict.summary
    assert any("k: r1=('a', 1) r3=('b', 3)" in line for line in verdict.details)


def test_no_digests_is_not_a_pass():
    assert not check_converged({}).ok


# -- checker 4: cache monotonic ----------------------------------------------------------


def test_cache_read_older_than_an_ack_on_the_same_portal():
    s = Script().do(1, "create", "a", rev=1, portal="a").do(1, "write", "b", rev=2, portal="a")
    s.do(2, "read", out="a", rev=1, portal="a")
    verdict = check_cache_monotonic(s.history, [])
    assert fails(verdict)
    assert any("already knew revision 2" in line for line in verdict.details)
    assert any("write k 'b'" in line for line in verdict.details)


def test_cache_read_older_than_an_ack_on_another_portal_is_allowed():
    s = Script().do(1, "create", "a", rev=1, portal="a").do(1, "write", "b", rev=2, portal="b")
    s.do(2, "read", out="a", rev=1, portal="a")
    assert passes(check_cache_monotonic(s.history, []))


def test_cache_read_older_than_a_received_event():
    s = Script().do(1, "create", "a", rev=1, portal="a").do(1, "write", "b", rev=2, portal="b")
    received_after = [("a", "k", 2, s.clock + 100)]
    s.do(2, "read", out="a", rev=1, portal="a")
    assert passes(check_cache_monotonic(s.history, received_after))
    assert fails(check_cache_monotonic(s.history, [("a", "k", 2, 4.5)]))
    assert passes(check_cache_monotonic(s.history, [("b", "k", 2, 4.5)]))  # other portal


def test_read_concurrent_with_the_ack_may_be_older():
    s = Script().do(1, "create", "a", rev=1, portal="a")
    s.call(2, "read", portal="a").do(1, "write", "b", rev=2, portal="a").ok(2, value="a", rev=1)
    assert passes(check_cache_monotonic(s.history, []))


def test_absent_after_an_acknowledged_create_is_stale_unless_deleted_since():
    s = Script().do(1, "create", "a", rev=1, portal="a")
    s.do(2, "read", result="absent", portal="a")
    assert fails(check_cache_monotonic(s.history, []))
    # A deletion through another portal, before the read ended, explains it:
    # the read saw something newer than portal a knew, not older.
    s2 = Script().do(1, "create", "a", rev=1, portal="a").do(1, "delete", rev=2, portal="b")
    s2.do(2, "read", result="absent", portal="a")
    assert passes(check_cache_monotonic(s2.history, []))
    # One invoked only after the read ended does not.
    s4 = Script().do(1, "create", "a", rev=1, portal="a")
    s4.do(2, "read", result="absent", portal="a").do(1, "delete", rev=2, portal="b")
    assert fails(check_cache_monotonic(s4.history, []))
    s3 = Script().do(1, "create", "a", rev=1, portal="a")
    s3.do(2, "read", result="absent", portal="a")
    # A received revision no acked call returned might be a deletion.
    assert passes(check_cache_monotonic(s3.history, [("a", "k", 5, 2.5)]))


def test_monotonic_reads_per_portal_on_request():
    s = Script().do(1, "create", "a", rev=1, portal="b").do(1, "write", "b", rev=2, portal="b")
    s.do(2, "read", out="b", rev=2, portal="a").do(2, "read", out="a", rev=1, portal="a")
    assert passes(check_cache_monotonic(s.history, []))
    assert fails(check_cache_monotonic(s.history, [], include_reads=True))

