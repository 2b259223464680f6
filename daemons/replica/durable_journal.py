"""`raft.fsync: true`: PySyncObj's journal made durable before it is relied on.

PySyncObj 0.3.17 keeps its Raft log in an mmap'ed file (journal.py,
ResizableFile) that it never syncs, and stores term and vote in
`journal.meta` by writing a temporary file and renaming it, without an
fsync: a power cut or kernel crash can take back entries a member had
acknowledged, and a vote it had cast. This module adds the syncs Raft
requires, at the points where PySyncObj relies on the log:

- a follower syncs its journal before any reply to the leader
  (`ReplicaStateMachine._SyncObj__sendNextNodeIdx`): an acknowledged entry
  is on disk;
- every member syncs at the start of each tick (`ReplicaStateMachine._onTick`),
  before the leader counts its own log towards a commit (PySyncObj computes
  the commit index only there, from entries appended in earlier ticks);
- `journal.meta` is written, fsynced, renamed and its directory fsynced on
  every store (a term and vote change, and the commit index once a second).

A sync is skipped when nothing was appended, truncated or cleared since the
last one, so an idle member does not sync; under load one fsync covers every
entry of a tick or of a message. A snapshot received from the leader is
fsynced (with its directory) before it is installed and acknowledged
(`ReplicaStateMachine._read_snapshot`): PySyncObj only renames it.

A failed fsync is final: Linux reports a write-back error once and may drop
the pages, so a retry could "succeed" and acknowledge what never reached the
disk. Every later sync raises too, `on_failure` (the replica stops with a
CRITICAL line) is called, and the reply or commit that waited for it never
happens.

PySyncObj compacts by rewriting the journal in place (clear, then re-append
the entries after the snapshot); journal_file.compact_by_rename replaces that
with a synced file renamed over the journal, in every mode, so neither a
kill nor a power cut in the middle of a compaction loses those entries.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Callable

from pysyncobj.pickle import dumps  # the format PySyncObj's MetaStorer writes

from daemons.core.files import fsync_parent


class DurableJournal:
    """Wraps one PySyncObj FileJournal instance: marks changes, syncs on demand."""

    def __init__(self, journal: Any, on_failure: Callable[[OSError], None]) -> None:
        self.journal = journal
        self._on_failure = on_failure
        self.failed: OSError | None = None
        # The first sync also covers what was appended before this wrapper
        # (the journal as loaded at start).
        self.dirty = True
        self.syncs = 0
        for name in ("add", "clear", "deleteEntriesFrom"):
            original = getattr(journal, name)
            setattr(journal, name, self._marking(original))
        meta = journal._FileJournal__metaStorer  # noqa: SLF001 - see the module doc
        meta.storeMeta = self._durable_store(meta.getPath())

    def _marking(self, method: Any) -> Any:
        def marked(*args: Any, **kwargs: Any) -> Any:
            self.dirty = True
            return method(*args, **kwargs)
        return marked

    def sync(self) -> None:
        """fsync the journal file if it changed since the last sync."""
        if self.failed is not None:
            raise self.failed
        if not self.dirty:
            return
        resizable = self.journal._FileJournal__journalFile  # noqa: SLF001
        # The mmap is MAP_SHARED: an fsync of the file writes its dirty pages
        # and the file's size (it grows by ftruncate).
        self._guarded(os.fsync, resizable._ResizableFile__f.fileno())  # noqa: SLF001
        self.dirty = False
        self.syncs += 1

    def sync_file(self, path: str) -> None:
        """fsync a file PySyncObj wrote (a received snapshot) and its directory."""
        if self.failed is not None:
            raise self.failed
        with open(path, "rb") as fh:
            self._guarded(os.fsync, fh.fileno())
        self._guarded(fsync_parent, path)

    def _guarded(self, sync: Callable[..., None], *args: Any) -> None:
        try:
            sync(*args)
        except OSError as exc:
            self.failed = exc
            self._on_failure(exc)
            raise

    def _durable_store(self, path: str) -> Any:
        def store(meta: dict) -> None:
            if self.failed is not None:
                raise self.failed
            tmp = path + ".tmp"
            with open(tmp, "wb") as fh:
                fh.write(dumps(meta))
                fh.flush()
                self._guarded(os.fsync, fh.fileno())
            shutil.move(tmp, path)
            self._guarded(fsync_parent, path)
        return store
