"""PortalCache and Coherence: revision rules, refuting forged marks, event dedupe."""

from __future__ import annotations

import logging

from daemons.core import events
from daemons.portal.cache import PortalCache, client_key, task_key
from daemons.portal.coherence import Coherence

CID = "7"
KEY = task_key(CID, "t")
AT = "2026-01-01T00:00:00.000Z"


def rec(revision: int, description: str = "x") -> dict:
    return {"cid": CID, "title": "t", "description": description, "status": "pending",
            "created_at": AT, "updated_at": AT, "revision": revision}


def test_a_read_older_than_a_mark_set_during_it_is_stale_and_not_cached() -> None:
    cache = PortalCache(100, 60)
    token = cache.read_token()
    cache.apply_change(KEY, rec(12), 12)  # arrives while the read is in flight
    assert cache.settle_read(KEY, rec(10), 10, token) == (False, [])
    assert cache.get(KEY).revision == 12 and cache.refuted == 0


def test_a_mark_set_before_the_read_and_above_its_store_revision_is_refuted() -> None:
    cache = PortalCache(100, 60)
    cache.apply_change(KEY, rec(10**12, "forged"), 10**12)
    token = cache.read_token()
    fresh, refuted = cache.settle_read(KEY, rec(10, "real"), 20, token)
    assert fresh and len(refuted) == 2 and cache.refuted == 2  # the mark and its entry
    assert cache.get(KEY).value["description"] == "real"
    assert cache.required_revision(KEY) == 20  # the forged mark is gone; the read's stays
    # a real later change applies normally again
    assert cache.apply_change(KEY, rec(21, "next"), 21)
    assert cache.get(KEY).value["description"] == "next"


def test_a_read_at_or_above_the_mark_refutes_nothing() -> None:
    cache = PortalCache(100, 60)
    cache.apply_change(KEY, rec(15), 15)
    token = cache.read_token()
    assert cache.settle_read(KEY, rec(15), 15, token) == (True, [])
    assert cache.required_revision(KEY) == 15


def test_a_forged_scope_mark_is_refuted_by_a_read_of_one_of_its_tasks() -> None:
    cache = PortalCache(100, 60)
    cache.drop_client(CID, 2 * 10**12)
    token = cache.read_token()
    fresh, refuted = cache.settle_read(KEY, rec(5), 30, token)
    assert fresh and refuted == [f"mark {('scope', CID)!r} at revision {2 * 10**12}"]
    assert cache.get(KEY).revision == 30


def test_a_floor_raised_by_a_forged_mark_is_lowered_by_a_read() -> None:
    cache = PortalCache(1, 60)  # 4 marks at most
    cache.apply_change(task_key(CID, "forged"), rec(10**12), 10**12)
    for n in range(4):
        cache.apply_change(task_key(CID, f"k{n}"), rec(n + 1), n + 1)
    assert cache.required_revision(KEY) == 10**12
    fresh, refuted = cache.settle_read(KEY, rec(3), 40, cache.read_token())
    assert fresh and refuted == [f"floor at revision {10**12}"]
    assert cache.required_revision(KEY) == 40


def test_a_read_without_a_store_revision_refutes_nothing() -> None:
    cache = PortalCache(100, 60)
    cache.apply_change(KEY, rec(10), 10)
    assert cache.settle_read(KEY, None, 0, cache.read_token()) == (False, [])


def test_an_own_write_below_an_unverified_mark_drops_the_entry() -> None:
    cache = PortalCache(100, 60)
    cache.settle_read(KEY, rec(5), 5, cache.read_token())
    cache.apply_change(KEY, rec(10**12, "forged"), 10**12)
    assert not cache.apply_change(KEY, rec(6, "mine"), 6, verified=True)
    assert cache.get(KEY) is None  # the next read goes to the replicas...
    fresh, refuted = cache.settle_read(KEY, rec(6, "mine"), 6, cache.read_token())
    assert fresh and refuted  # ...which refute the forged mark
    assert cache.get(KEY).value["description"] == "mine"


def test_an_own_write_below_a_verified_mark_keeps_the_newer_entry() -> None:
    cache = PortalCache(100, 60)
    cache.apply_change(KEY, rec(8, "newer"), 8)
    cache.settle_read(client_key(CID), {"cid": CID}, 9, cache.read_token())  # verified 9
    assert not cache.apply_change(KEY, rec(6, "mine"), 6, verified=True)
    assert cache.get(KEY).value["description"] == "newer"


def test_a_cleared_epoch_makes_a_read_uncacheable() -> None:
    cache = PortalCache(100, 60)
    token = cache.read_token()
    cache.clear()
    assert cache.settle_read(KEY, rec(3), 3, token) == (True, [])
    assert cache.get(KEY) is None


def _coherence() -> Coherence:
    coherence = Coherence("portal-1", "test", PortalCache(100, 60))
    coherence.on_connection(True)
    return coherence


def _task_event(title: str, revision: int, description: str, origin: str = "other") -> dict:
    return events.make_event("task.updated", CID, revision, origin, AT, title=title,
                             record={**rec(revision, description), "title": title})


def test_an_event_for_another_key_does_not_suppress_one_with_the_same_revision() -> None:
    coherence = _coherence()
    coherence.apply_event(_task_event("junk", 11, "junk", origin="intruder"))
    coherence.apply_event(_task_event("t", 11, "v2"))
    assert coherence.cache.get(KEY).value["description"] == "v2"


def test_a_redelivered_event_reaches_watchers_once() -> None:
    import asyncio

    async def run() -> int:
        coherence = _coherence()
        coherence.loop = asyncio.get_running_loop()
        watcher = coherence.watch(CID)
        event = _task_event("t", 11, "v2")
        coherence.apply_event(event)
        coherence.apply_event(dict(event))
        await asyncio.sleep(0.01)
        return watcher.queue.qsize()

    assert asyncio.run(run()) == 1


def test_settle_read_logs_a_warning_for_what_it_refutes(caplog) -> None:
    coherence = _coherence()
    coherence.on_message(events.event_topic("test", _task_event("t", 10**12, "forged")),
                         events.encode(_task_event("t", 10**12, "forged")))
    token = coherence.cache.read_token()
    with caplog.at_level(logging.WARNING):
        assert coherence.settle_read(KEY, rec(4), 4, token)
    assert any("refutes it" in r.getMessage() for r in caplog.records)


def test_a_real_event_below_an_unverified_mark_drops_the_entry() -> None:
    cache = PortalCache(100, 60)
    cache.settle_read(KEY, rec(5), 5, cache.read_token())
    cache.apply_change(KEY, rec(10**12, "forged"), 10**12)
    assert not cache.apply_change(KEY, rec(6, "real"), 6)  # another portal's event
    assert cache.get(KEY) is None
    fresh, refuted = cache.settle_read(KEY, rec(6, "real"), 6, cache.read_token())
    assert fresh and refuted and cache.get(KEY).value["description"] == "real"


def test_a_reordered_event_below_a_verified_mark_changes_nothing() -> None:
    cache = PortalCache(100, 60)
    cache.apply_change(KEY, rec(8, "newer"), 8, verified=True)
    assert not cache.apply_change(KEY, rec(7, "older"), 7)
    assert cache.get(KEY).value["description"] == "newer"


# ---- found by a review of the revision rules (each failed before its fix) --------------------


def crec(revision: int, name: str) -> dict:
    return {"cid": CID, "data": {"name": name}, "created_at": AT, "updated_at": AT,
            "revision": revision}


def test_clearing_tasks_does_not_hide_an_older_client_change() -> None:
    """task.cleared@10 from one portal may arrive before client.updated@8 and
    client.secret_rotated@9 from another: both must still apply."""
    from daemons.portal.cache import secret_key
    cache = PortalCache(100, 60)
    cache.settle_read(client_key(CID), crec(3, "old"), 5, cache.read_token())
    cache.settle_read(secret_key(CID), {"cid": CID, "hash": "OLD"}, 5, cache.read_token())
    cache.drop_client(CID, 10)  # task.cleared@10
    assert cache.apply_change(client_key(CID), crec(8, "new"), 8)
    cache.apply_change(secret_key(CID), None, 9)
    assert cache.get(client_key(CID)).value["data"] == {"name": "new"}
    assert cache.get(secret_key(CID)) is None  # the rotated secret's old hash is gone
    assert cache.required_revision(KEY) == 10  # tasks stay covered by the clear


def test_an_old_event_after_its_keys_mark_was_evicted_is_not_cached() -> None:
    cache = PortalCache(2, 60)  # 8 marks at most
    cache.apply_change(KEY, rec(10), 10)
    cache.apply_change(KEY, None, 20)  # task.deleted@20
    for n in range(8):  # other keys' events push KEY's mark out (into the floor)
        cache.apply_change(task_key(CID, f"k{n}"), rec(21 + n), 21 + n)
    assert not cache.apply_change(KEY, rec(10, "resurrected"), 10)  # e.g. a QoS 1 resend
    assert cache.get(KEY) is None


def test_an_event_older_than_a_read_is_not_cached() -> None:
    """A restarted portal read NOT_FOUND at store revision 25; a late event @10 follows."""
    cache = PortalCache(100, 60)
    assert cache.settle_read(KEY, None, 25, cache.read_token()) == (True, [])
    assert not cache.apply_change(KEY, rec(10, "late"), 10)
    assert cache.get(KEY) is None


def test_refuting_a_forged_floor_keeps_a_real_mark_that_arrived_meanwhile() -> None:
    cache = PortalCache(1, 60)  # 4 marks at most
    cache.apply_change(task_key(CID, "forged"), rec(10**12), 10**12)
    for n in range(4):  # the forged mark is folded into the floor
        cache.apply_change(task_key(CID, f"f{n}"), rec(n + 1), n + 1)
    other, key = task_key(CID, "a"), task_key(CID, "k")
    token_other, token_key = cache.read_token(), cache.read_token()
    cache.apply_change(key, rec(100), 100)  # a real event for `key` arrives
    for n in range(4):
        cache.apply_change(task_key(CID, f"g{n}"), rec(101 + n), 101 + n)
    cache.settle_read(other, rec(1), 90, token_other)  # may refute the forged floor ...
    fresh, _ = cache.settle_read(key, rec(50, "old"), 95, token_key)
    assert not fresh and cache.get(key) is None  # ... but never below the event seen for key


def test_the_cache_is_bounded_in_bytes() -> None:
    cache = PortalCache(10_000, 60, max_bytes=1_000_000)
    big = "x" * 100_000
    for n in range(30):
        key = task_key(CID, f"t{n}")
        cache.apply_change(key, {**rec(n + 1, big), "title": f"t{n}"}, n + 1)
    assert cache.bytes <= 1_000_000 and 5 <= len(cache) <= 10
    assert cache.get(task_key(CID, "t29")) is not None  # the newest stayed
    assert cache.get(task_key(CID, "t0")) is None
    # Parsed JSON weighs more than its text: a client data of small items counts so.
    tiny = {str(n): {} for n in range(8000)}  # ~70 KB of JSON
    cache.apply_change(client_key(CID), crec(100, "x") | {"data": tiny}, 100)
    assert cache.get(client_key(CID)) is None  # its estimate is above the whole budget
    cache.clear()
    assert cache.bytes == 0


def test_a_retried_write_answered_from_the_dedupe_table_is_published_once() -> None:
    """A duplicate answer (the attempt that committed never reached a portal that
    published it: a per-try timeout, a failover) is applied and published, so no
    cache, watcher or audit log misses the change; where the change had been
    published already, watchers still get it once (dedupe by change, not origin)."""
    import asyncio
    import json

    from daemons.portal.operations import PortalOperations
    from proto import replica_pb2

    first = rec(10, "first")

    class Replicas:
        async def apply(self, command, timeout, on_commit):  # type: ignore[no-untyped-def]
            answer = replica_pb2.ApplyResponse(revision=10, record=json.dumps(first),
                                               duplicate=True)
            on_commit(answer)  # as ReplicaClient does, before the caller resumes
            return answer

    class Bus:
        sent: list = []

        def publish(self, topic: str, payload: bytes) -> None:
            self.sent.append(topic)

    async def retry() -> list:
        coherence = Coherence("portal-client-2", "test", PortalCache(100, 60))
        coherence.on_connection(True)
        coherence.loop = asyncio.get_running_loop()
        coherence.bus = Bus()
        watcher = coherence.watch(CID)
        # The first attempt's portal did publish it here: the retry must not
        # give watchers the same change twice.
        coherence.apply_event(_task_event("t", 10, "first", origin="portal-client-1"))
        ops = PortalOperations("portal-client-2", Replicas(), coherence)  # type: ignore[arg-type]
        record = await ops.update_task(CID, "t", "first", None, "req-1", 5)
        assert record["description"] == "first" and coherence.published == 1
        assert coherence.cache.get(KEY).revision == 10
        await asyncio.sleep(0.01)
        return [watcher.queue.get_nowait() for _ in range(watcher.queue.qsize())]

    seen = asyncio.run(retry())
    assert [(e["event"], e["revision"]) for e in seen] == [("task.updated", 10)]
    assert len(Bus.sent) == 1


def test_a_replay_or_an_own_write_across_a_cache_reset_is_never_cached() -> None:
    """Either record may be older than the key's current one, which this
    portal may never have heard of (it restarted, or was off the broker): the
    entry is dropped and the mark raised, the record not cached (found by
    review: a retry's first answer was served for the whole TTL)."""
    import asyncio
    import json

    from daemons.portal.operations import PortalOperations
    from proto import replica_pb2

    coherence = _coherence()
    coherence.apply_event({**_task_event("t", 10, "first"), "replay": True})
    assert coherence.cache.get(KEY) is None and coherence.cache.required_revision(KEY) == 10
    coherence.apply_event(_task_event("t", 12, "newer"))
    assert coherence.cache.get(KEY).value["description"] == "newer"
    coherence.apply_event({**_task_event("t", 11, "older"), "replay": True})
    entry = coherence.cache.get(KEY)  # kept, or dropped (unverified, cache.apply_change)
    assert entry is None or entry.value["description"] == "newer"
    assert coherence.cache.required_revision(KEY) == 12

    class Replicas:  # the broker connection comes back while the write is in flight
        async def apply(self, command, timeout, on_commit):  # type: ignore[no-untyped-def]
            coherence.on_connection(False)
            coherence.on_connection(True)
            answer = replica_pb2.ApplyResponse(revision=20, record=json.dumps(rec(20, "own")))
            on_commit(answer)
            return answer

    async def write() -> dict:
        coherence.loop = asyncio.get_running_loop()
        ops = PortalOperations("portal-1", Replicas(), coherence)  # type: ignore[arg-type]
        return await ops.update_task(CID, "t", "own", None, "req-2", 5)

    assert asyncio.run(write())["revision"] == 20
    assert coherence.cache.get(KEY) is None and coherence.cache.required_revision(KEY) == 20


def test_a_retried_write_is_published_with_the_time_of_its_change() -> None:
    """The event of a duplicate answer carries the change's time (the first
    attempt's record), not the retry's: otherwise the same change from the same
    portal reached the audit log twice, differing only in `at` (found by
    review: two task.created lines for one revision from portal-client-1)."""
    import asyncio
    import json

    from daemons.core import events
    from daemons.portal.operations import PortalOperations
    from proto import replica_pb2

    first = {**rec(10, "first"), "updated_at": "2026-01-02T03:04:05.678Z"}

    class Replicas:
        async def apply(self, command, timeout, on_commit):  # type: ignore[no-untyped-def]
            assert command.at != first["updated_at"]  # the retry's own time
            answer = replica_pb2.ApplyResponse(revision=10, record=json.dumps(first),
                                               duplicate=True)
            on_commit(answer)
            return answer

    class Bus:
        sent: list = []

        def publish(self, topic: str, payload: bytes) -> None:
            self.sent.append(events.decode(payload))

    async def retry() -> None:
        coherence = Coherence("portal-client-1", "test", PortalCache(100, 60))
        coherence.on_connection(True)
        coherence.loop = asyncio.get_running_loop()
        coherence.bus = Bus()
        ops = PortalOperations("portal-client-1", Replicas(), coherence)  # type: ignore[arg-type]
        await ops.update_task(CID, "t", "first", None, "req-1", 5)

    asyncio.run(retry())
    assert [e["at"] for e in Bus.sent] == ["2026-01-02T03:04:05.678Z"]


def test_reads_retried_for_newer_changes_share_the_call_s_timeout() -> None:
    """A read whose answer keeps being overtaken by newer events reads again,
    up to 5 times: all of them within the one timeout of the call, not 5 x it."""
    import asyncio

    import pytest

    from daemons.core.errors import Unavailable
    from daemons.portal.operations import PortalOperations

    given: list[float] = []
    coherence = Coherence("portal-client-2", "test", PortalCache(100, 60))

    class Replicas:
        async def get(self, kind, cid, title, timeout):  # type: ignore[no-untyped-def]
            given.append(timeout)
            await asyncio.sleep(0.05)
            coherence.apply_event(_task_event("t", 100 + len(given), "newer"))
            return rec(1, "old"), 1  # always older than what arrived meanwhile

    ops = PortalOperations("portal-client-2", Replicas(), coherence)  # type: ignore[arg-type]
    with pytest.raises(Unavailable, match="changed too often"):
        asyncio.run(ops.get_task(CID, "t", False, 0.12))
    # Each attempt is given what is left of the one timeout (the fake takes 50 ms).
    assert len(given) == 5 and 0 < given[0] <= 0.12
    assert given == sorted(given, reverse=True) and given[-1] < 0.12 - 0.1


def test_a_missing_task_s_client_check_gets_what_is_left_of_the_timeout() -> None:
    import asyncio

    import pytest

    from daemons.core.errors import NotFound
    from daemons.portal.operations import PortalOperations

    given: list[float] = []

    class Replicas:
        async def get(self, kind, cid, title, timeout):  # type: ignore[no-untyped-def]
            given.append(timeout)
            await asyncio.sleep(0.05)
            return (None, 1) if title else ({"cid": cid, "revision": 1}, 1)

    coherence = Coherence("portal-client-2", "test", PortalCache(100, 60))
    ops = PortalOperations("portal-client-2", Replicas(), coherence)  # type: ignore[arg-type]
    with pytest.raises(NotFound, match="task 't' not found"):
        asyncio.run(ops.get_task(CID, "t", False, 1.0))
    assert len(given) == 2 and given[1] <= 1.0 - 0.04, given


def test_portal_status_counts_the_events_its_bus_dropped() -> None:
    from daemons.portal.operations import PortalOperations

    class Bus:
        dropped = 3

    coherence = Coherence("portal-client-2", "test", PortalCache(100, 60))
    ops = PortalOperations("portal-client-2", None, coherence)  # type: ignore[arg-type]
    assert ops.status()["events_dropped"] == 0  # no bus yet
    coherence.bus = Bus()
    assert ops.status()["events_dropped"] == 3


def test_a_deletion_read_before_its_own_event_leaves_no_old_entry() -> None:
    """Regression (the partition fault run, after reads started raising marks): a
    read showed the deletion (NOT_FOUND at 25) before the portal applied its own
    delete@22; the mark from the read made that change look old, and the entry
    @18 stayed cached: stale reads after the deletion was acknowledged."""
    cache = PortalCache(100, 60)
    cache.apply_change(KEY, rec(18), 18)
    assert cache.settle_read(KEY, None, 25, cache.read_token()) == (True, [])
    assert cache.get(KEY) is None
    cache.apply_change(KEY, rec(18), 18)  # even if an old value came back somehow ...
    cache.apply_change(KEY, None, 22, verified=True)
    assert cache.get(KEY) is None  # ... the deletion, below the read's mark, drops it


def _model_run(seed: int, steps: int = 400, keys: int = 4, max_entries: int = 2) -> None:
    """One random history against PortalCache, checked after every step.

    A store commits changes (set, delete, clear a client's tasks) at growing
    revisions; their events reach the cache in any order, some twice, some as
    the portal's own (verified) writes; reads take the store's state at its
    current revision and settle later, interleaved with everything else; the
    cache is tiny, so entries and marks are evicted all the time, and it is
    cleared now and then (a broker reconnect). Invariant: a cached entry is the
    store's value at the entry's revision, and that revision is at least every
    revision of the key the cache was told of (events delivered, fresh reads)."""
    import random
    rnd = random.Random(seed)
    cache = PortalCache(max_entries, 10**9)
    names = [task_key(CID, f"k{i}") for i in range(keys)]
    history: dict = {k: [(0, None)] for k in names}
    pending: list = []
    known = dict.fromkeys(names, 0)
    reads: list = []
    revision = 0

    def value_at(key: tuple, at: int) -> object:
        return [v for r, v in history[key] if r <= at][-1]

    for step in range(steps):
        roll = rnd.random()
        if roll < 0.35:  # a change commits
            revision += 1
            key = rnd.choice(names)
            if rnd.random() < 0.1:  # DeleteAllTasks
                for k in names:
                    history[k].append((revision, None))
                pending.append((None, revision, None))
            else:
                value = None if rnd.random() < 0.3 else f"v{revision}"
                history[key].append((revision, value))
                pending.append((key, revision, value))
        elif roll < 0.65 and pending:  # an event arrives (any order; some twice)
            i = rnd.randrange(len(pending))
            key, at, value = pending[i] if rnd.random() < 0.15 else pending.pop(i)
            verified = rnd.random() < 0.3
            if key is None:
                cache.drop_client(CID, at, verified)
                for k in names:
                    known[k] = max(known[k], at)
            else:
                cache.apply_change(key, value, at, verified)
                known[key] = max(known[key], at)
        elif roll < 0.8:  # a replica read starts
            key = rnd.choice(names)
            reads.append((key, cache.read_token(), revision, value_at(key, revision)))
        elif roll < 0.9 and reads:  # ... and settles
            key, token, at, value = reads.pop(rnd.randrange(len(reads)))
            fresh, refuted = cache.settle_read(key, value, at, token)
            assert not refuted
            if fresh:
                known[key] = max(known[key], at)
        elif roll < 0.93:
            cache.clear()
        for key in names:
            entry = cache._entries.get(key)
            if entry is not None:
                assert entry.revision >= known[key], (seed, step, key)
                assert entry.value == value_at(key, entry.revision), (seed, step, key)


def test_randomized_histories_never_serve_an_old_value() -> None:
    """1000 random histories. Measured when written: the cache of 5fa0513 (before
    this file's review fixes) failed 758 of them, that of 14c135d (with the
    read-mark regression) 456, the fixed one none."""
    for seed in range(1000):
        _model_run(seed)
