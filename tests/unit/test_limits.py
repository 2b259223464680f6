"""daemons/portal/limits.py: WatchTasks slots and the per-client write token bucket."""

from __future__ import annotations

import pytest

from daemons.core.config import Limits
from daemons.portal.limits import PortalLimits, ResourceExhausted, WatchSlots, WriteRateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_watch_slots_per_client_and_total():
    slots = WatchSlots(max_streams=3, max_per_client=2)
    slots.acquire("7")
    slots.acquire("7")
    with pytest.raises(ResourceExhausted, match="max_watch_streams_per_client") as info:
        slots.acquire("7")
    assert info.value.code == "RESOURCE_EXHAUSTED"
    slots.acquire("8")
    with pytest.raises(ResourceExhausted, match=r"limits\.max_watch_streams\)"):
        slots.acquire("9")
    assert slots.open == 3 and slots.refused == 2
    slots.release("7")
    slots.acquire("9")
    slots.release("9")
    slots.release("9")  # an extra release must not free someone else's slot
    assert slots.open == 2


def test_write_bucket_allows_burst_then_rate():
    clock = Clock()
    writes = WriteRateLimiter(rate=2.0, burst=3, clock=clock)
    for _ in range(3):
        writes.take("7")
    with pytest.raises(ResourceExhausted, match=r"client_write_rate \(2 writes/s, burst 3\)"):
        writes.take("7")
    writes.take("8")  # another client has its own bucket
    clock.now += 0.5  # one token back
    writes.take("7")
    with pytest.raises(ResourceExhausted, match="retry in 0.50 s"):
        writes.take("7")
    clock.now += 100  # refills up to the burst, no more
    for _ in range(3):
        writes.take("7")
    with pytest.raises(ResourceExhausted):
        writes.take("7")
    assert writes.refused == 3


def test_default_burst_is_two_seconds_of_rate_and_unlimited_takes_anything():
    assert WriteRateLimiter(rate=10.0).burst == 20
    assert WriteRateLimiter(rate=0.1).burst == 1
    unlimited = WriteRateLimiter(rate=None)
    for _ in range(10_000):
        unlimited.take("7")


def test_buckets_are_bounded():
    writes = WriteRateLimiter(rate=1.0, burst=1, clock=Clock(), max_buckets=10)
    for cid in range(100):
        writes.take(str(cid))
    assert len(writes._buckets) == 10


def test_portal_limits_from_the_cluster_file():
    limits = PortalLimits(Limits(max_watch_streams=5, max_watch_streams_per_client=1,
                                 client_write_rate=1.0, client_write_burst=1), Clock())
    limits.watch.acquire("7")
    with pytest.raises(ResourceExhausted):
        limits.watch.acquire("7")
    limits.writes.take("7")
    with pytest.raises(ResourceExhausted):
        limits.writes.take("7")
    assert limits.refused == 2
