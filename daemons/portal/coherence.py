"""Coherence: change events <-> the portal's cache and its WatchTasks streams.

Every committed change this portal makes, and every valid event another
portal publishes, goes through `apply_event`: it updates the cache under the
revision rules of cache.py and feeds the watchers of that client. Own writes
are also published (QoS 1). While the broker connection is down the portal
serves no cached reads; when it comes back the cache is emptied, since
events may have been missed.

Events are deduplicated by the change they describe (event, CID, title,
revision) — a QoS 1 redelivery, or a change published again by the portal
that answered a retried request id, must not reach watchers twice — never by
revision alone, so an event (forged or not) for one key cannot suppress the
real change of another key that carries the same revision. Changes this
portal committed are applied as `verified` (see cache.py), and reads from
the replicas are reconciled with the marks by `settle_read`, which drops
marks a forged event left above the store's revision, with a WARNING.

A client's cached secret record (see auth.py) is dropped, and its mark
raised, by `client.created`, `client.deleted` and `client.secret_rotated`:
a read of the record older than such an event is never cached nor used.
WatchTasks streams of that client are told of each of these (they end: the
client is gone, or another client now has its CID, or its secret changed),
and every stream is told when the broker connection goes down or comes back
(`BROKER_CHANGED`: events may have been missed, so they end too).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from typing import Any

from daemons.core import events
from daemons.core.errors import InvalidArgument
from daemons.portal.cache import Key, PortalCache, Token, client_key, secret_key, task_key

log = logging.getLogger(__name__)

WATCH_QUEUE = 1000
_SEEN_EVENTS = 50_000
_LIVES = 10_000  # clients whose latest creation and deletion revisions are remembered
# Offered to every watcher when the broker connection goes down or comes back.
BROKER_CHANGED: dict[str, Any] = {"event": "_broker_changed"}
# Client events a WatchTasks stream of that client must see (each ends it).
_CLIENT_EVENTS_FOR_WATCHERS = ("client.created", "client.deleted", "client.secret_rotated")


class Watcher:
    """One WatchTasks stream's queue (on the loop); `overflowed` once it fell behind."""

    def __init__(self, cid: str, after: int = 0) -> None:
        self.cid = cid
        # Every change at or below this revision committed before the watcher
        # registered: the highest revision the replicas had shown this portal.
        self.after = after
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(WATCH_QUEUE)
        self.overflowed = False

    def offer(self, event: dict[str, Any]) -> None:
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.overflowed = True


class Coherence:
    def __init__(self, portal_id: str, cluster_name: str, cache: PortalCache) -> None:
        self.portal_id = portal_id
        self.cluster_name = cluster_name
        self.cache = cache
        self.bus: Any = None  # an EventBus, attached by the daemon
        self.loop: asyncio.AbstractEventLoop | None = None  # the gRPC loop (watchers live there)
        self._connected = False
        self._lock = threading.Lock()
        self._watchers: dict[str, list[Watcher]] = collections.defaultdict(list)
        self._seen: collections.OrderedDict[tuple, None] = collections.OrderedDict()
        # cid -> [latest creation, latest deletion] revision heard of (0: none)
        self._lives: collections.OrderedDict[str, list[int]] = collections.OrderedDict()
        self.received = 0
        self.published = 0
        self.rejected = 0

    # -- connection state ----------------------------------------------------

    @property
    def serving_cache(self) -> bool:
        return self._connected

    def on_connection(self, up: bool) -> None:
        # Either way the cache may miss events from now on (down) or from the
        # time we were away (up): start from empty, and so must watchers.
        self.cache.clear()
        self._connected = up
        with self._lock:
            watchers = [w for group in self._watchers.values() for w in group]
        for watcher in watchers:
            self._offer(watcher, BROKER_CHANGED)

    # -- events ----------------------------------------------------------------

    def on_message(self, topic: str, payload: bytes) -> None:
        """A message from the broker (paho's thread)."""
        try:
            event = events.decode(payload, topic, self.cluster_name)
        except InvalidArgument as exc:
            self.rejected += 1
            log.warning("%s: ignored a malformed event on %r: %s", self.portal_id, topic,
                        exc.message[:500])
            return
        if event["origin"] == self.portal_id:
            return
        self.received += 1
        self.apply_event(event)

    def local_change(self, event: dict[str, Any], cache_record: bool = True) -> None:
        """A change this portal committed: update the cache, feed watchers, publish.

        `cache_record` False: the record may be older than what the cluster
        holds (see apply_event), e.g. the cache was emptied while the write
        was in flight (events may have been missed meanwhile)."""
        self.apply_event(event, verified=True, cache_record=cache_record)
        if self.bus is not None:
            self.bus.publish(events.event_topic(self.cluster_name, event), events.encode(event))
            self.published += 1

    def apply_event(self, event: dict[str, Any], verified: bool = False,
                    cache_record: bool = True) -> None:
        """Apply a change to the cache and feed watchers, once per event identity.

        `verified`: this portal committed the change itself (the revision is real).
        A replay (events.py), or `cache_record` False, is news of the revision
        only: its record may have been superseded by changes this portal never
        heard of (it restarted, or missed them while off the broker), so the
        key's entry is dropped and its mark raised as for a deletion, and the
        record is never cached (found by review: a retried UpdateTask's first
        answer was cached, and served for the TTL, over a newer value).
        """
        identity = (event["event"], event["cid"], event.get("title"), event["revision"])
        with self._lock:
            if identity in self._seen:
                return
            self._seen[identity] = None
            if len(self._seen) > _SEEN_EVENTS:
                self._seen.popitem(last=False)
        kind, cid, revision = event["event"], event["cid"], event["revision"]
        record = event.get("record") if cache_record and not event.get("replay") else None
        if kind == "client.secret_rotated":
            self.cache.apply_change(secret_key(cid), None, revision, verified)
        elif kind.startswith("client."):
            self.cache.apply_change(client_key(cid), record, revision, verified)
            if kind != "client.updated":  # the secret record changed with the client
                self.cache.apply_change(secret_key(cid), None, revision, verified)
            if kind == "client.deleted":
                self.cache.drop_client(cid, revision, verified)
            if kind in ("client.created", "client.deleted"):
                self._note_life(cid, kind == "client.deleted", revision)
        elif kind == "task.cleared":
            self.cache.drop_client(cid, revision, verified)
        else:
            self.cache.apply_change(task_key(cid, event["title"]), record, revision, verified)
        if kind.startswith("task.") or kind in _CLIENT_EVENTS_FOR_WATCHERS:
            with self._lock:
                watchers = list(self._watchers.get(cid, ()))
            for watcher in watchers:
                self._offer(watcher, event)

    def _note_life(self, cid: str, deleted: bool, revision: int) -> None:
        with self._lock:
            life = self._lives.setdefault(cid, [0, 0])
            life[deleted] = max(life[deleted], revision)
            self._lives.move_to_end(cid)
            if len(self._lives) > _LIVES:
                self._lives.popitem(last=False)

    def life(self, cid: str) -> tuple[int, int]:
        """(creation, deletion): the revisions of the latest client.created and
        client.deleted of `cid` this portal heard of (0: none, or forgotten)."""
        with self._lock:
            created, deleted = self._lives.get(cid, (0, 0))
            return created, deleted

    def _offer(self, watcher: Watcher, event: dict[str, Any]) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(watcher.offer, event)

    def settle_read(self, key: Key, record: dict | None, read_revision: int,
                    token: Token) -> bool:
        """A replica read of `key` (see PortalCache.settle_read); False if stale."""
        fresh, refuted = self.cache.settle_read(key, record, read_revision, token,
                                                cache=self.serving_cache)
        for what in refuted:
            log.warning("%s: dropped the cached %s: a read of the replicas at store revision "
                        "%d refutes it (a forged or corrupt change event?)", self.portal_id,
                        what, read_revision)
        return fresh

    # -- watchers --------------------------------------------------------------

    def watch(self, cid: str) -> Watcher:
        watcher = Watcher(cid, after=self.cache.verified)
        with self._lock:
            self._watchers[cid].append(watcher)
        return watcher

    def unwatch(self, watcher: Watcher) -> None:
        with self._lock:
            group = self._watchers.get(watcher.cid, [])
            if watcher in group:
                group.remove(watcher)
            if not group:
                self._watchers.pop(watcher.cid, None)

    @property
    def watcher_count(self) -> int:
        with self._lock:
            return sum(len(g) for g in self._watchers.values())
