"""PySyncObj's snapshot hooks, with the dump written in the background.

PySyncObj 0.3.17 runs a custom `serializer` on its tick thread and, as soon
as it returns, renames `<snapshot>.tmp` over the snapshot file
(pysyncobj/serializer.py, Serializer.serialize). Dumping the whole LevelDB
there stalled the tick thread — heartbeats, applies, everything — for the
length of the dump: ~3 s at a few hundred MB, and every member compacts at
about the same index, so each compaction was followed by an election.

Here the serializer only takes a LevelDB snapshot (consistent at the applied
index: it runs between two applies) and starts a thread that streams it to
`<snapshot>.partial` (Storage.start_dump). PySyncObj's `serializeChecker`
(`state`, polled every tick) answers SERIALIZING until the thread is done,
then moves the file into place and answers SUCCESS once; only then does
PySyncObj truncate its journal. Meanwhile the previous snapshot file stays
intact, also across a crash.

Nothing is left at `<snapshot>.tmp`, so PySyncObj's rename fails (silently:
it catches the error) and replaces nothing; a stale `.tmp` of an older
version is removed first for that reason.

Two adjustments to PySyncObj's Serializer (`attach`), which assumes a dump
that ends within the tick:
- It refuses to send any snapshot while it serializes (`__pid != 0`), and
  its leader then loops for a whole append-entries period sending a lagging
  follower empty snapshot messages, every tick, for the length of the dump
  (a review measured 50 ms per tick and ~26,000 messages per call). While
  the dump runs the previous snapshot and the journal behind it are intact,
  so `state` clears that flag and the previous snapshot is sent instead.
- It does not restart transmissions in flight when a checker reports
  SUCCESS: the leader would finish sending the old file and then point the
  follower past the new log start. `state` drops them (closing their files)
  so the next message starts the new snapshot from its first byte.

A snapshot installed from the leader (the deserializer) cancels a dump in
progress: the older dump must not replace the newer snapshot afterwards.

A damaged snapshot file must not spread (found by review: a bit flipped in
the leader's file, which its own start skipped since LevelDB was past it,
was sent to a resynced member, which exited 1 at every start, and to a
lagging member, whose own good snapshot PySyncObj had already replaced with
it by the time the restore found the checksum wrong). So:
- a received snapshot is checked before PySyncObj renames it into place
  (`attach` wraps setTransmissionData): a damaged one is deleted and the
  transfer refused, the member's own snapshot and journal stay as they are,
  and the leader starts it again;
- a member checks its own snapshot when it starts without restoring it, and
  when it starts sending it to a member (`check_in_background`, once per
  file: a background thread, since a check of a large file on the tick
  thread outlasted the election timeout and cost an election, found by
  review; a check walking the file record by record then held the GIL
  long enough beside the tick thread to cost one too, in CI, so
  Storage.verify_snapshot hashes it in large chunks); a damaged one is
  `mark_damaged` (an ERROR in this member's log), and ReplicaStateMachine
  then forces a compaction on every tick, proposing an empty entry if need
  be, until a new snapshot is in place.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable

from pysyncobj.config import SERIALIZER_STATE

from daemons.core.errors import StorageCorrupt, TarefaError
from daemons.core.files import remove_if_present
from daemons.replica.storage import PARTIAL_SUFFIX, Dump, Storage

log = logging.getLogger(__name__)

RECHECK_SECONDS = 30.0  # a snapshot file found whole is not read again sooner


class SnapshotWriter:
    """PySyncObj's `serializer` (`serialize`) and `serializeChecker` (`state`).

    `refusal()` returns an error when no snapshot may be written now (after a
    fatal apply error, see ReplicaStateMachine). All methods run on the tick
    thread (at shutdown, Storage.close() stops a dump still running).
    """

    def __init__(self, storage: Storage, path: str, name: str,
                 refusal: Callable[[], Exception | None]) -> None:
        self.storage = storage
        self.path = path
        self.name = name
        self._refusal = refusal
        self._dump: Dump | None = None
        self._serializer: Any = None  # PySyncObj's Serializer, once attached
        self._index: Any = None
        self._report_failure = False
        self.written = 0
        self.cancelled = 0
        self.damaged = False  # the snapshot file failed its check: replace it (module doc)
        self.refused_transfers = 0
        # (identity, when) of the file last found whole; identity of the one being checked
        self._checked: tuple[tuple, float] | None = None
        self._checking: tuple | None = None
        # Left by a crash during a dump; the snapshot file itself is intact.
        remove_if_present(path + PARTIAL_SUFFIX)

    def attach(self, serializer: Any, progress: Callable[[], None] | None = None) -> None:
        """PySyncObj's Serializer (SyncObj's `_SyncObj__serializer`), see the module doc.
        `progress()` is called while a received snapshot is checked."""
        self._serializer = serializer
        receive = serializer.setTransmissionData
        send = serializer.getTransmissionData

        def checked(data: Any) -> bool:
            if data is not None and data[2] and not self._received_whole(progress):
                return False
            return bool(receive(data))

        def sending(transmission_id: Any) -> Any:
            transmissions = serializer._Serializer__transmissions  # noqa: SLF001
            if transmission_id not in transmissions:  # a transfer starts
                self.check_in_background()
            return send(transmission_id)
        serializer.setTransmissionData = checked
        serializer.getTransmissionData = sending

    def _identity(self, path: str | None = None) -> tuple | None:
        """What tells one snapshot file from another (a rename keeps it)."""
        try:
            st = os.stat(path or self.path)
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def check_in_background(self) -> None:
        """Check the snapshot file off the tick thread (the same file at most every
        RECHECK_SECONDS); a damaged one is reported and replaced (module doc)."""
        identity = self._identity()
        if identity is None or identity == self._checking:
            return
        # A bit flipped in place keeps the file's inode, size and mtime (found
        # by review): the same file is checked again, at most every RECHECK_SECONDS.
        if self._checked is not None and self._checked[0] == identity \
                and time.monotonic() - self._checked[1] < RECHECK_SECONDS:
            return
        self._checking = identity

        def check() -> None:
            try:
                Storage.verify_snapshot(self.path)
            except (StorageCorrupt, OSError) as exc:
                if self._identity() == identity:  # not replaced meanwhile
                    self.mark_damaged(str(exc))
            except Exception:  # noqa: BLE001 - a check must never stop the member
                log.exception("%s: checking the snapshot file failed", self.name)
            else:
                self._checked = (identity, time.monotonic())
            finally:
                if self._checking == identity:
                    self._checking = None
        threading.Thread(target=check, name="snapshot-check", daemon=True).start()

    def _received_whole(self, progress: Callable[[], None] | None) -> bool:
        """The last chunk of a snapshot from the leader came: check the file PySyncObj
        wrote (`<snapshot>.1.tmp`) before it renames it over ours."""
        incoming = self._serializer._Serializer__incomingTransmissionFile  # noqa: SLF001
        if incoming is None:
            return True  # PySyncObj refuses the chunk itself
        tmp = self.path + ".1.tmp"
        try:
            incoming.flush()
            Storage.verify_snapshot(tmp, progress)
            # The rename keeps its identity: no second check at the install.
            self._checked = (self._identity(tmp), time.monotonic())
            return True
        except (StorageCorrupt, OSError) as exc:
            self.refused_transfers += 1
            log.error("%s: refused the snapshot the leader sent: %s; this member keeps its "
                      "own data (the leader sends it again; a damaged snapshot file on the "
                      "leader is replaced at its next compaction, see the leader's log)",
                      self.name, exc)
            incoming.close()
            self._serializer._Serializer__incomingTransmissionFile = None  # noqa: SLF001
            remove_if_present(tmp)
            return False

    def mark_damaged(self, why: str) -> None:
        """This member's own snapshot file failed its check (LevelDB is past it)."""
        self.damaged = True
        log.error("%s: the snapshot file is damaged (%s); LevelDB is past it, so nothing "
                  "is lost here, but a member that needs a snapshot would refuse it: a new "
                  "one is written as soon as an entry newer than it is applied", self.name,
                  why)

    def _allow_transmissions(self) -> None:
        if self._serializer is not None:
            self._serializer._Serializer__pid = 0  # noqa: SLF001 - see the module doc

    def _restart_transmissions(self) -> None:
        if self._serializer is None:
            return
        transmissions = self._serializer._Serializer__transmissions  # noqa: SLF001
        for transmission in transmissions.values():
            if "file" in transmission:
                transmission["file"].close()
        transmissions.clear()

    def serialize(self, tmp_filename: str, raft_data: Any) -> None:
        """Start a dump labelled with `raft_data` (PySyncObj's last two applied
        entries and the cluster). Raising makes PySyncObj keep its journal;
        `state` then reports FAILED once, whatever the error (PySyncObj would
        wait forever for an outcome otherwise).

        Runs on the tick thread between two applies, so the LevelDB snapshot
        taken here holds every entry up to raftLastApplied (PySyncObj's own
        no-op entries, which never reach the apply, leave the stored index
        below the label: harmless, a restore skips nothing real)."""
        index = raft_data[0][1]
        try:
            remove_if_present(tmp_filename)  # PySyncObj renames it over the snapshot on return
            refused = self._refusal()
            if refused is not None:
                log.error("%s: not writing a snapshot labelled Raft index %s: %s", self.name,
                          index, refused)
                raise StorageCorrupt(f"snapshot at {index} refused: {refused}")
            self._dump = self.storage.start_dump(self.path, raft_data)
        except StorageCorrupt:
            self._report_failure = True
            raise
        except Exception:
            self._report_failure = True
            log.exception("%s: starting the snapshot dump at Raft index %s failed",
                          self.name, index)
            raise
        self._index = index

    def state(self) -> int:
        """SERIALIZING while the dump runs; then SUCCESS (file in place) or FAILED, once."""
        if self._report_failure:
            self._report_failure = False
            return SERIALIZER_STATE.FAILED
        dump = self._dump
        if dump is None:
            return SERIALIZER_STATE.NOT_SERIALIZING
        if dump.running:
            self._allow_transmissions()
            return SERIALIZER_STATE.SERIALIZING
        self._dump = None
        try:
            count = dump.finish()
        except TarefaError as exc:
            if dump.cancelled:
                log.info("%s: snapshot dump at Raft index %s discarded: %s", self.name,
                         self._index, exc)
            else:
                log.error("%s: snapshot dump at Raft index %s failed: %s", self.name,
                          self._index, exc)
            return SERIALIZER_STATE.FAILED
        except Exception:  # noqa: BLE001 - PySyncObj keeps its journal, we keep going
            log.exception("%s: snapshot dump at Raft index %s failed", self.name, self._index)
            return SERIALIZER_STATE.FAILED
        self.written += 1
        if self.damaged:
            self.damaged = False
            log.info("%s: the damaged snapshot file is replaced", self.name)
        self._restart_transmissions()
        log.info("%s: snapshot at Raft index %s: %d keys", self.name, self._index, count)
        return SERIALIZER_STATE.SUCCESS

    def cancel(self, why: str) -> None:
        """Stop a dump in progress (its file is discarded; `state` reports FAILED)."""
        if self._dump is not None and not self._dump.cancelled:
            log.info("%s: cancelling the snapshot dump at Raft index %s: %s", self.name,
                     self._index, why)
            self._dump.cancel()
            self.cancelled += 1
