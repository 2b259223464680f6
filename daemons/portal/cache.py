"""PortalCache: a bounded LRU of records with the revision logic, no I/O.

The invariant (DESIGN.md): a portal never serves a value older than one
whose change event it has already received or produced. So the cache keeps,
per key, the highest revision it has seen in an event or write (the
"high-water mark"), and refuses to cache a read taken at an older store
revision. Keys are ("client", cid), ("task", cid, title) or ("secret", cid)
(the client's secret record: salted hash, never the secret); deleting a
client or clearing its tasks raises a per-client "scope" mark that covers
every task of that client (the client and secret records have marks of
their own: clearing tasks must not hide a newer client change). A replica
read raises the key's mark to the store revision it was taken at, so a late
event older than what a read showed (a deletion included) is not cached.

High-water marks are kept in their own LRU (4x the entry bound); when one is
evicted its revision raises a global floor instead, so forgetting a mark
can only make the cache more cautious, never serve something stale: a change
at or below the floor, for a key whose own mark may have been folded into
it, drops the key's entry instead of caching an answer that may be older.

Entries are bounded in number (`max_entries`) and in estimated bytes
(`max_bytes`, see `record_bytes`); the least recently used go first.

Events are not authenticated, so a mark or an entry may come from a forged
event with a revision the store never reached. Such a revision is refuted by
the replicas: a real event is published only after its change committed, so
a linearizable read taken AFTER an event arrived answers a store revision at
least the event's. `settle_read` therefore compares each replica read with
the marks and the entry that were already there when the read started (every
change bumps a sequence number `read_token` captures): any above the read's
store revision is bogus and is dropped (the floor is lowered to the read's
revision), and the caller logs it. `verified` is the highest revision the
replicas have shown this portal (reads and its own writes); a change (its
own write or another portal's event) that arrives below a mark above
`verified` conflicts with it: the key's entry, if above `verified` too, is
dropped so the next read goes to the replicas and settles who is right.
"""

from __future__ import annotations

import json
import sys
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


def secret_key(cid: str) -> Key:
    return ("secret", cid)


def _scope(key: Key) -> Key:
    """The per-client mark raised by deleting a client or clearing its tasks."""
    return ("scope", key[1])


def _mark_keys(key: Key) -> tuple[Key, ...]:
    """The marks that bound `key`: its own, and for a task its client's scope."""
    return (key, _scope(key)) if key[0] == "task" else (key,)


# Parsed JSON costs far more than its text: up to ~15x for containers of small
# items (measured: a 64 KiB client data of tiny values took ~957 KiB parsed).
_CONTAINER_WEIGHT = 16
_ENTRY_OVERHEAD = 600  # the record dict, its keys, the Entry, the LRU node


def record_bytes(value: Any) -> int:
    """A cheap upper estimate of the memory a cached record holds."""
    size = _ENTRY_OVERHEAD
    if isinstance(value, dict):
        for item in value.values():
            if isinstance(item, str):
                size += sys.getsizeof(item)
            elif isinstance(item, (dict, list)):
                size += _CONTAINER_WEIGHT * len(json.dumps(item, ensure_ascii=False))
            else:
                size += 32
    return size


@dataclass
class Entry:
    value: Any
    revision: int
    stored_at: float
    seq: int = 0  # the cache's sequence number when stored
    size: int = 0  # record_bytes(value)


Token = tuple[int, int]  # (epoch, sequence number) when a replica read started


class PortalCache:
    def __init__(self, max_entries: int, ttl: float,
                 clock: Callable[[], float] = time.monotonic,
                 max_bytes: int = 256 * 1024 * 1024) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0  # record_bytes of every entry held
        self.ttl = ttl
        self._clock = clock
        self._entries: OrderedDict[Key, Entry] = OrderedDict()
        self._marks: OrderedDict[Key, tuple[int, int]] = OrderedDict()  # revision, seq
        self._floor = 0
        self._floor_seq = 0
        self._seq = 0
        self.epoch = 0
        self.verified = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.refuted = 0  # marks and entries dropped because the replicas refuted them

    def __len__(self) -> int:
        return len(self._entries)

    # -- reads -----------------------------------------------------------------

    def get(self, key: Key) -> Entry | None:
        """The cached entry if fresh (within TTL); counts hits and misses."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and self._clock() - entry.stored_at > self.ttl:
                self._drop_locked(key)
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

    def _mark_of(self, key: Key) -> int:
        return self._marks.get(key, (0, 0))[0]

    def _required_locked(self, key: Key) -> int:
        return max(self._floor, *(self._mark_of(k) for k in _mark_keys(key)))

    def read_token(self) -> Token:
        """Take before a replica read starts; give to `settle_read` with its answer."""
        with self._lock:
            return self.epoch, self._seq

    # -- writes ----------------------------------------------------------------

    def settle_read(self, key: Key, value: Any | None, read_revision: int, token: Token,
                    cache: bool = True) -> tuple[bool, list[str]]:
        """Reconcile a linearizable replica read of `key` taken at store revision
        `read_revision`, started at `token`, with the marks.

        First drops every mark and entry covering `key` that was there before
        the read started and lies above `read_revision` (the replicas refute
        it: see the module doc). Then returns (fresh, refuted): `fresh` False
        means a change newer than the read arrived while it was in flight (the
        answer may be older than what this portal knows: read again);
        `refuted` describes what was dropped, for the caller to log. A fresh
        read of a present record is cached when `cache` and no clear()
        happened since `token`.
        """
        epoch, started = token
        refuted: list[str] = []
        with self._lock:
            self.verified = max(self.verified, read_revision)
            if read_revision > 0:
                for mark_key in _mark_keys(key):
                    revision, seq = self._marks.get(mark_key, (0, 0))
                    if revision > read_revision and seq <= started:
                        del self._marks[mark_key]
                        refuted.append(f"mark {mark_key!r} at revision {revision}")
                if self._floor > read_revision and self._floor_seq <= started:
                    refuted.append(f"floor at revision {self._floor}")
                    self._floor = read_revision
                entry = self._entries.get(key)
                if entry is not None and entry.revision > read_revision \
                        and entry.seq <= started:
                    self._drop_locked(key)
                    refuted.append(f"entry {key!r} at revision {entry.revision}")
                if refuted:
                    self.refuted += len(refuted)
                    self._seq += 1
            if read_revision < self._required_locked(key):
                return False, refuted
            if read_revision > self._mark_of(key):
                # What the replicas showed: a later event older than this (a
                # QoS 1 resend, a publish held while the broker was away) is stale.
                self._mark_locked(key, read_revision)
            current = self._entries.get(key)
            if current is None or current.revision <= read_revision:
                if cache and value is not None and epoch == self.epoch:
                    self._put_locked(key, value, read_revision)
                elif current is not None and current.revision < read_revision:
                    # The read is newer (a deletion, say) and is not cached: the
                    # old entry must not outlive it (the raised mark would make
                    # the change event that follows look old and be ignored).
                    self._drop_locked(key)
            return True, refuted

    def store_read(self, key: Key, value: Any, read_revision: int, epoch: int) -> bool:
        """Cache a replica read taken at store revision `read_revision`, if not stale.

        `epoch` is `self.epoch` as seen before the read started: a clear() since
        then (events may have been missed) makes the read uncacheable.
        """
        with self._lock:
            if epoch != self.epoch or read_revision < self._required_locked(key):
                return False
            self.verified = max(self.verified, read_revision)
            current = self._entries.get(key)
            if current is not None and current.revision > read_revision:
                return False
            self._put_locked(key, value, read_revision)
            return True

    def apply_change(self, key: Key, value: Any | None, revision: int,
                     verified: bool = False) -> bool:
        """A change at `revision`: this portal's committed write (`verified`) or an event.

        `value` None means the record is gone. Returns False for a change older
        than what is already known (duplicate or reordered event). A change
        at or below an unverified mark (one above every revision the replicas
        have shown: maybe forged) drops the key's entry if that is unverified
        too, so the next read asks the replicas, which settle who is right.
        This portal's own committed write (`verified`) thus never stays hidden
        behind a forged entry, nor does a real change another portal made.
        """
        with self._lock:
            if verified:
                self.verified = max(self.verified, revision)
            mark = max(self._mark_of(k) for k in _mark_keys(key))
            if revision <= mark:
                current = self._entries.get(key)
                if current is not None and (current.revision < revision or (
                        mark > self.verified and current.revision > self.verified)):
                    # Older than this change (which is itself not news), or an
                    # unverified entry in conflict with it: ask the replicas.
                    self._drop_locked(key)
                return False
            if revision <= self._floor:
                # The key's own mark may have been evicted into the floor (a
                # deletion at a higher revision, say): this change may be older
                # than what was seen. Cache nothing (the next read asks the
                # replicas), but keep the mark: a forged floor may be refuted later.
                self._drop_locked(key)
                self._mark_locked(key, revision)
                return False
            self._mark_locked(key, revision)
            current = self._entries.get(key)
            if current is not None and current.revision >= revision:
                return False
            if value is None:
                self._drop_locked(key)
            else:
                self._put_locked(key, value, revision)
            return True

    def drop_client(self, cid: str, revision: int, verified: bool = False) -> None:
        """The client was deleted or its tasks cleared at `revision`: forget its tasks."""
        with self._lock:
            if verified:
                self.verified = max(self.verified, revision)
            scope = ("scope", cid)
            if revision > self._mark_of(scope):
                self._mark_locked(scope, revision)
            for key in [k for k in self._entries if k[0] == "task" and k[1] == cid]:
                self._drop_locked(key)

    def clear(self) -> None:
        """Forget every entry (e.g. after missing events); marks stay valid bounds."""
        with self._lock:
            self._entries.clear()
            self.bytes = 0
            self.epoch += 1
            self._seq += 1

    def resize(self, max_entries: int) -> None:
        with self._lock:
            self.max_entries = max_entries
            self._evict_locked()

    # -- internals -------------------------------------------------------------

    def _put_locked(self, key: Key, value: Any, revision: int) -> None:
        self._seq += 1
        size = record_bytes(value)
        self._drop_locked(key)
        if size > self.max_bytes:
            return  # larger than the whole budget: served from the replicas
        self._entries[key] = Entry(value, revision, self._clock(), self._seq, size)
        self.bytes += size
        self._evict_locked()

    def _drop_locked(self, key: Key) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= entry.size

    def _evict_locked(self) -> None:
        while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
            _, entry = self._entries.popitem(last=False)
            self.bytes -= entry.size

    def _mark_locked(self, key: Key, revision: int) -> None:
        self._seq += 1
        self._marks[key] = (revision, self._seq)
        self._marks.move_to_end(key)
        while len(self._marks) > 4 * self.max_entries:
            _, (evicted, _seq) = self._marks.popitem(last=False)
            self._floor = max(self._floor, evicted)
            # Even when the floor does not rise (it is above `evicted`, perhaps
            # from a forged mark): a read that started before this eviction must
            # not lower the floor below the mark folded into it now.
            self._floor_seq = self._seq
