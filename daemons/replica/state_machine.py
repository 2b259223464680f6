"""The Raft member: a PySyncObj SyncObj whose state lives in LevelDB.

`apply_batch` is the one replicated method. Each Raft entry carries a batch
of commands (see proposer.py) and is applied as ONE WriteBatch that also
stores the applied index, the new revision, the request ids of the entry and
each request id's result. The guard `index <= stored applied index -> skip`
makes journal replay after a crash a no-op; the request-id table makes client
retries return the first answer. Facts behind these choices:
shared/notes/pysyncobj.md.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

from pysyncobj import SyncObj, SyncObjConf, replicated

from daemons.core.config import Cluster, RaftSettings, ReplicaSpec
from daemons.core.errors import StorageCorrupt
from daemons.replica.applier import EntryApplier
from daemons.replica.commands import Outcome
from daemons.replica.storage import Storage

log = logging.getLogger(__name__)

# Our snake_case keys -> PySyncObj's SyncObjConf options (one table, one place).
RAFT_OPTIONS = {
    "election_timeout_min": "raftMinTimeout",
    "election_timeout_max": "raftMaxTimeout",
    "heartbeat_period": "appendEntriesPeriod",
    "leader_fallback_timeout": "leaderFallbackTimeout",
    "connection_timeout": "connectionTimeout",
    "connection_retry": "connectionRetryTime",
    "batched_append": "appendEntriesUseBatch",
    "compaction_min_entries": "logCompactionMinEntries",
    "compaction_min_seconds": "logCompactionMinTime",
}

ROLES = {0: "follower", 1: "candidate", 2: "leader"}
_PRUNE_PER_APPLY = 64


def syncobj_conf(raft: RaftSettings, data_dir: str, **hooks: Any) -> SyncObjConf:
    options = {theirs: getattr(raft, ours) for ours, theirs in RAFT_OPTIONS.items()}
    raft_dir = os.path.join(data_dir, "raft")
    os.makedirs(raft_dir, exist_ok=True)
    return SyncObjConf(
        journalFile=os.path.join(raft_dir, "journal"),
        fullDumpFile=os.path.join(raft_dir, "snapshot"),
        dynamicMembershipChange=False,
        autoTick=True,
        # A lone tick waits at most this long for I/O; the pipe notifier wakes it
        # early when a command is queued, so this does not add write latency.
        autoTickPeriod=0.01,
        **options,
        **hooks,
    )


class ReplicaStateMachine(SyncObj):
    """One Raft member applying Tarefa commands to its LevelDB."""

    def __init__(self, cluster: Cluster, spec: ReplicaSpec, storage: Storage,
                 on_fatal: Callable[[Exception], None]) -> None:
        self.spec = spec
        self.storage = storage
        self.applier = EntryApplier(storage, cluster.raft.dedupe_window)
        self.fatal: Exception | None = None
        self._on_fatal = on_fatal
        self.journal_path = os.path.join(spec.data_dir, "raft", "journal")
        self.snapshots_written = 0
        conf = syncobj_conf(cluster.raft, spec.data_dir,
                            serializer=self._write_snapshot,
                            deserializer=self._read_snapshot,
                            onStateChanged=self._on_state_changed)
        peers = [r.raft_address for r in cluster.replicas if r.id != spec.id]
        self.peer_ids = {r.raft_address: r.id for r in cluster.replicas}
        super().__init__(spec.raft_address, peers, conf)

    # -- the replicated method ----------------------------------------------

    @replicated
    def apply_batch(self, commands: list) -> list[Outcome] | None:
        """Apply one Raft entry. Never raises: a raise would make PySyncObj retry it."""
        index = self.raftLastApplied + 1
        if self.fatal is not None:
            return None
        try:
            return self.applier.apply(index, commands)
        except Exception as exc:  # noqa: BLE001 - must not escape into PySyncObj
            self._die(exc if isinstance(exc, StorageCorrupt)
                      else StorageCorrupt(f"apply of Raft entry {index} failed: {exc!r}"))
            return None

    # -- a fix to PySyncObj's leader ---------------------------------------------

    def _SyncObj__onMessageReceived(self, node: Any, message: Any) -> None:  # noqa: N802
        """Keep a follower's next index from moving backwards on a success reply.

        PySyncObj 0.3.17 advances next index when it sends entries, then sets it
        back to the acknowledged position when an older success reply arrives
        (syncobj.py, 'next_node_idx' handling). The leader then re-sends entries
        the follower already holds, and the follower truncates and re-appends
        them — logging CRITICAL "truncating already-applied log entries", and
        for a moment holding fewer entries than it acknowledged. In Raft, next
        index only moves back on a failed (reset) reply; this override restores
        that. (PySyncObj registers this method by its mangled name, so a
        subclass method of that name replaces it.)
        """
        before = None
        if isinstance(message, dict) and message.get("type") == "next_node_idx" \
                and message.get("success") and not message.get("reset"):
            before = self._SyncObj__raftNextIndex.get(node)  # type: ignore[attr-defined]
        SyncObj._SyncObj__onMessageReceived(self, node, message)  # type: ignore[attr-defined]
        if before is not None:
            next_index = self._SyncObj__raftNextIndex  # type: ignore[attr-defined]
            if next_index.get(node, before) < before:
                next_index[node] = before

    # -- snapshots (log compaction) ------------------------------------------

    def _write_snapshot(self, filename: str, raft_data: Any) -> None:
        """Runs on the tick thread, between applies: the DB is exactly at raftLastApplied."""
        try:
            count = self.storage.dump(filename, raft_data)
        except Exception:
            log.exception("%s: writing snapshot %s failed", self.spec.id, filename)
            raise
        self.snapshots_written += 1
        log.info("%s: snapshot at Raft index %s: %d keys", self.spec.id, raft_data[0][1], count)

    def _read_snapshot(self, filename: str) -> Any:
        try:
            header = Storage.read_header(filename)
            snap_index = header[0][1]
            applied = self.storage.applied_index()
            if applied >= snap_index:
                log.info("%s: snapshot at %d not restored: LevelDB already at %d",
                         self.spec.id, snap_index, applied)
            else:
                log.warning("%s: restoring snapshot at Raft index %d (LevelDB was at %d)",
                            self.spec.id, snap_index, applied)
                self.storage.restore(filename)
            return header
        except Exception as exc:
            self._die(exc if isinstance(exc, StorageCorrupt)
                      else StorageCorrupt(f"{filename}: cannot load snapshot: {exc!r}"))
            raise

    # -- status --------------------------------------------------------------

    def _on_state_changed(self, old: int, new: int) -> None:
        log.info("%s: raft role %s -> %s", self.spec.id, ROLES.get(old, old), ROLES.get(new, new))

    def _die(self, exc: Exception) -> None:
        if self.fatal is None:
            self.fatal = exc
            log.critical("%s: %s", self.spec.id, exc)
            self._on_fatal(exc)

    def status(self) -> dict[str, Any]:
        raw = self.getStatus()
        leader = raw.get("leader")
        peers = []
        for address, rid in self.peer_ids.items():
            if rid == self.spec.id:
                continue
            peers.append({"id": rid, "address": address,
                          "reachable": raw.get(f"partner_node_status_server_{address}") == 2})
        try:
            journal_bytes = os.path.getsize(self.journal_path)
        except OSError:
            journal_bytes = 0
        return {
            "role": ROLES.get(raw["state"], str(raw["state"])),
            "leader": self.peer_ids.get(leader.id, leader.id) if leader is not None else "",
            "term": raw["raft_term"],
            "commit_index": raw["commit_idx"],
            "applied_index": raw["last_applied"],
            "has_quorum": bool(raw["has_quorum"]),
            "log_entries": raw["log_len"],
            "journal_bytes": journal_bytes,
            "peers": peers,
        }

    def leader_id(self) -> str | None:
        leader = self._getLeader()
        return None if leader is None else self.peer_ids.get(leader.id, leader.id)
