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
    assert cache.required_revision(KEY) == 0
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
