"""PortalCache: a bounded LRU of records with the revision logic, no I/O.

The invariant (DESIGN.md): a portal never serves a value older than one
whose change event it has already received or produced. So the cache keeps,
per key, the highest revision it has seen in an event or write (the
"high-water mark"), and refuses to cache a read taken at an older store
revision. Keys are ("client", cid) or ("task", cid, title); deleting a
client or clearing its tasks raises a per-client mark that covers every
task of that client.

High-water marks are kept in their own LRU (4x the entry bound); when one is
evicted its revision raises a global floor instead, so forgetting a mark
can only make the cache more cautious, never serve something stale.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Hashable

Key = tuple[Hashable, ...]


def client_key(cid: str) -> Key:
    return ("client", cid)


def task_key(cid: str, title: str) -> Key:
    return ("task", cid, title)


def _scope(key: Key) -> Key:
    """The per-client mark that covers a key (itself for clients)."""
    return ("scope", key[1])


@dataclass
class Entry:
    value: Any
    revision: int
    stored_at: float


class PortalCache:
    def __init__(self, max_entries: int, ttl: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self.ttl = ttl
        self._clock = clock
        self._entries: OrderedDict[Key, Entry] = OrderedDict()
        self._marks: OrderedDict[Key, int] = OrderedDict()
        self._floor = 0
        self.epoch = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    # -- reads -----------------------------------------------------------------

    def get(self, key: Key) -> Entry | None:
        """The cached entry if fresh (within TTL); counts hits and misses."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and self._clock() - entry.stored_at > self.ttl:
                del self._entries[key]
                entry = None
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def required_revision(self, key: Key) -> int:
        """A read of `key` must be taken at least at this store revision to be cached."""
        with self._lock:
            return self._required_locked(key)

    def _required_locked(self, key: Key) -> int:
        return max(self._floor, self._marks.get(key, 0), self._marks.get(_scope(key), 0))

    # -- writes ----------------------------------------------------------------

    def store_read(self, key: Key, value: Any, read_revision: int, epoch: int) -> bool:
        """Cache a replica read taken at store revision `read_revision`, if not stale.

        `epoch` is `self.epoch` as seen before the read started: a clear() since
        then (events may have been missed) makes the read uncacheable.
        """
        with self._lock:
            if epoch != self.epoch or read_revision < self._required_locked(key):
                return False
            current = self._entries.get(key)
            if current is not None and current.revision > read_revision:
                return False
            self._put_locked(key, value, read_revision)
            return True

    def apply_change(self, key: Key, value: Any | None, revision: int) -> bool:
        """A change at `revision` (our write or another portal's event).

        `value` None means the record is gone. Returns False for a change older
        than what is already known (duplicate or reordered event).
        """
        with self._lock:
            if revision <= max(self._marks.get(key, 0), self._marks.get(_scope(key), 0)):
                return False
            self._mark_locked(key, revision)
            current = self._entries.get(key)
            if current is not None and current.revision >= revision:
                return False
            if value is None:
                self._entries.pop(key, None)
            else:
                self._put_locked(key, value, revision)
            return True

    def drop_client(self, cid: str, revision: int) -> None:
        """The client was deleted or its tasks cleared at `revision`: forget its tasks."""
        with self._lock:
            scope = ("scope", cid)
            self._mark_locked(scope, max(revision, self._marks.get(scope, 0)))
            for key in [k for k in self._entries if k[0] == "task" and k[1] == cid]:
                del self._entries[key]

    def clear(self) -> None:
        """Forget every entry (e.g. after missing events); marks stay valid bounds."""
        with self._lock:
            self._entries.clear()
            self.epoch += 1

    def resize(self, max_entries: int) -> None:
        with self._lock:
            self.max_entries = max_entries
            while len(self._entries) > max_entries:
                self._entries.popitem(last=False)

    # -- internals -------------------------------------------------------------

    def _put_locked(self, key: Key, value: Any, revision: int) -> None:
        self._entries[key] = Entry(value, revision, self._clock())
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def _mark_locked(self, key: Key, revision: int) -> None:
        self._marks[key] = revision
        self._marks.move_to_end(key)
        while len(self._marks) > 4 * self.max_entries:
            _, evicted = self._marks.popitem(last=False)
            self._floor = max(self._floor, evicted)
