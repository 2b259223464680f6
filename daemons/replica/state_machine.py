"""The Raft member: a PySyncObj SyncObj whose state lives in LevelDB.

`apply_sealed` is the replicated method every entry is proposed with (`propose`;
`apply_batch`, its predecessor without a checksum, still applies entries
journalled before it: see entry_seal.py). Each Raft entry carries a batch
of commands (see proposer.py) and is applied as ONE WriteBatch that also
stores the applied index, the new revision, the request ids of the entry and
each request id's result. The guard `index <= stored applied index -> skip`
makes journal replay after a crash a no-op; the request-id table makes client
retries return the first answer. Facts behind these choices:
shared/notes/pysyncobj.md.

With `security.raft_password_file` every Raft message is encrypted and
authenticated (PySyncObj's `password`, Fernet). PySyncObj closes a connection
that fails to decrypt without a word; this module logs, rate-limited, that
such connections happen and that no peer has been reachable for a while, so a
member with the wrong password is diagnosable from either side.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

from pysyncobj import SyncObj, SyncObjConf, replicated
from pysyncobj.monotonic import monotonic as raft_clock
from pysyncobj.pickle import loads as raft_loads

from daemons.core.config import Cluster, RaftSettings, ReplicaSpec
from daemons.core.errors import ConfigError, StorageCorrupt, TarefaError
from daemons.core.files import remove_if_present
from daemons.core.security import read_secret_file
from daemons.replica import entry_seal, journal_file, raft_wire
from daemons.replica.applier import EntryApplier
from daemons.replica.commands import Outcome
from daemons.replica.durable_journal import DurableJournal
from daemons.replica.snapshots import SnapshotWriter
from daemons.replica.storage import Storage

log = logging.getLogger(__name__)

raft_wire.install()  # cheaper framing of every Raft message (see raft_wire.py)

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

# PySyncObj sends an entry of appendEntriesBatchSizeBytes or more in chunks, and
# its chunking is broken (it labels the last chunk by comparing the offset with
# the command's length instead of the pickled entry's: the follower unpickles a
# truncated entry and logs a traceback). So no entry may ever reach this size:
# the proposer caps a batch at proposer.MAX_BATCH_BYTES (1 MiB of UTF-8 string
# fields) plus one command, and one command is below gRPC's 4 MiB message limit.
APPEND_ENTRIES_BATCH_BYTES = 16 * 1024 * 1024

# A tick that keeps failing (e.g. an entry of the journal that no longer
# unpickles: the journal has no checksums) makes PySyncObj log a traceback
# every tick forever; after this long of nothing but failures the replica stops.
TICK_FAILURE_SECONDS = 2.0
TICK_FAILURE_MIN_COUNT = 10
RESYNC = ("stop this replica, remove its data_dir and start it again to resync it from "
          "its peers")

# A connection that fails the password handshake, and a member that reaches no
# peer, are logged at most once per this many seconds (a port scanner or a
# misconfigured member retries every connection_retry seconds).
PEER_WARNING_SECONDS = 30.0
NO_PEER_WARNING_SECONDS = 10.0


def snapshot_file(data_dir: str) -> str:
    """PySyncObj's full dump file: the latest snapshot of this member's LevelDB."""
    return os.path.join(data_dir, "raft", "snapshot")


def check_raft_files(data_dir: str) -> None:
    """Refuse (StorageCorrupt naming the file) a damaged journal or a missing snapshot.

    PySyncObj would fail on these with an unexplained traceback (an empty or a
    truncated journal) or silently stop applying (a compacted journal whose
    snapshot is gone: nothing says where its first entry belongs).
    """
    journal = os.path.join(data_dir, "raft", "journal")
    snapshot = snapshot_file(data_dir)
    meta = journal + ".meta"
    problem = _meta_problem(meta)
    if problem is not None:
        # PySyncObj would start from term 0 with no vote, without a word (found
        # by review): Raft's one vote per term would no longer hold here.
        raise StorageCorrupt(
            f"{meta}: {problem}: this member would forget the Raft term and the vote it "
            f"stored, and could vote a second time in a term (two leaders in it). As for a "
            f"lost disk: check that the other members have a leader (tarefa cluster status), "
            f"then move this file aside and start the replica again")
    if not os.path.exists(journal):
        return  # a fresh log: the LevelDB applied index and the peers fill it in
    try:
        # What a crash in the middle of a compaction left beside the journal.
        remove_if_present(journal + journal_file.COMPACTING)
        found = journal_file.scan(journal)
    except PermissionError as exc:
        raise TarefaError(f"{journal}: cannot read the Raft journal: {exc.strerror} (check that "
                          "the data_dir belongs to the user the replica runs as)") from None
    except OSError as exc:
        raise StorageCorrupt(f"{journal}: cannot read the Raft journal: {exc}; {RESYNC}") from None
    if found.header_problem is not None:
        raise StorageCorrupt(f"{journal}: damaged Raft journal: {found.header_problem}; {RESYNC}")
    if found.problem is not None:
        kept = (f"index {found.first}..{found.last}" if found.records else "no record")
        raise StorageCorrupt(
            f"{journal}: damaged Raft journal: {found.problem}. If a power cut tore its end, "
            f"`tarefa-replica --config FILE --id ID --repair-journal` cuts it back to its "
            f"whole records ({kept}; a copy is kept); otherwise {RESYNC}")
    if found.first is not None and found.first > 1 and not os.path.exists(snapshot):
        raise StorageCorrupt(
            f"{snapshot} is missing: the Raft journal {journal} was compacted (it starts at "
            f"index {found.first}), so the snapshot holding the entries before it is required; "
            f"{RESYNC}")
    if found.first is not None and os.path.exists(snapshot):
        try:
            last, prev = Storage.read_header(snapshot)[:2]
        except Exception:  # noqa: BLE001 - refused when PySyncObj loads it (_read_snapshot)
            return
        dropped = journal_file.finish_compaction(journal, prev, last, found)
        if dropped:
            log.warning("%s: a crash had interrupted a log compaction after its snapshot "
                        "(Raft index %d) was in place: the journal now starts at index %d, "
                        "as the compaction would have left it (%d entries dropped, all in "
                        "the snapshot)", journal, last[1], prev[1], dropped)


def _meta_problem(path: str) -> str | None:
    """Why PySyncObj's term-and-vote file cannot be read (None: readable, or absent)."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot read it ({exc.strerror or exc})"
    try:
        meta = raft_loads(raw)
    except Exception as exc:  # noqa: BLE001 - whatever the unpickler makes of the bytes
        return f"unreadable ({type(exc).__name__})"
    if not isinstance(meta, dict):
        return f"unreadable (holds {type(meta).__name__}, not the term and vote)"
    return None


def raft_password(cluster: Cluster) -> str | None:
    """The Raft password named by the cluster file, or None (clear-text Raft).

    Read once, before anything binds; ConfigError names the file, never its content.
    """
    path = cluster.security.raft_password_file
    return None if path is None else read_secret_file(path, "Raft password")


def syncobj_conf(raft: RaftSettings, data_dir: str, password: str | None = None,
                 auto_tick: bool = True, **hooks: Any) -> SyncObjConf:
    options = {theirs: getattr(raft, ours) for ours, theirs in RAFT_OPTIONS.items()}
    raft_dir = os.path.join(data_dir, "raft")
    os.makedirs(raft_dir, exist_ok=True)
    return SyncObjConf(
        journalFile=os.path.join(raft_dir, "journal"),
        fullDumpFile=snapshot_file(data_dir),
        dynamicMembershipChange=False,
        autoTick=auto_tick,  # False only in in-process tests, which tick by hand
        # A lone tick waits at most this long for I/O; the pipe notifier wakes it
        # early when a command is queued, so this does not add write latency.
        autoTickPeriod=0.01,
        appendEntriesBatchSizeBytes=APPEND_ENTRIES_BATCH_BYTES,
        # None: clear text. Otherwise every message is a Fernet token under a key
        # derived from it (PBKDF2, PySyncObj's fixed salt): see README.
        password=password,
        **options,
        **hooks,
    )


class ReplicaStateMachine(SyncObj):
    """One Raft member applying Tarefa commands to its LevelDB."""

    def __init__(self, cluster: Cluster, spec: ReplicaSpec, storage: Storage,
                 on_fatal: Callable[[Exception], None], password: str | None = None,
                 auto_tick: bool = True) -> None:
        self.spec = spec
        self.storage = storage
        self.applier = EntryApplier(storage, cluster.raft.dedupe_window)
        self.fatal: Exception | None = None
        self._on_fatal = on_fatal
        self.journal_path = os.path.join(spec.data_dir, "raft", "journal")
        # append_entries whose already-held entries were skipped instead of
        # truncated and re-appended (see _skip_matching_entries)
        self.log_repairs_avoided = 0
        self._keep_tail_after: int | None = None
        # Follower: the last success reply sent (leader node, term, next index) and
        # when; replies repeating it within half a heartbeat are skipped.
        self._last_reply: tuple[Any, int, int] | None = None
        self._last_reply_at = 0.0
        self._reply_repeat_window = cluster.raft.heartbeat_period / 2
        self._snapshot_ack_at = 0.0  # see _ack_snapshot_chunk
        self._fsync = cluster.raft.fsync
        self.durable: DurableJournal | None = None  # raft.fsync: see _onTick
        self._compacts_by_rename = False  # journal_file.install: see _onTick
        self._damaged_nudged = 0.0  # when an entry was last proposed to replace a snapshot
        self.replies_skipped = 0
        self._tick_failures = 0
        self._tick_failing_since = 0.0
        self.encrypted = password is not None
        self.handshake_drops = 0
        self._drops_logged = 0
        self._drops_logged_at = 0.0
        self._peers_checked_at = 0.0
        self._alone_since: float | None = time.monotonic()
        self._alone_warned = False
        check_raft_files(spec.data_dir)
        if self.encrypted:
            log.info("%s: Raft traffic is encrypted and authenticated with the password "
                     "in %s", spec.id, cluster.security.raft_password_file)
        else:
            log.warning("%s: Raft traffic is in clear text and unauthenticated "
                        "(security.raft_password_file is not set)", spec.id)
        # Dumps run in the background (snapshots.py); after a fatal apply error
        # PySyncObj counts the entries it could not apply as applied and would
        # label this LevelDB with a later index: restoring that snapshot would
        # skip them for good, so none is written then.
        self.snapshots = SnapshotWriter(
            storage, snapshot_file(spec.data_dir), spec.id,
            refusal=lambda: None if self.fatal is None else StorageCorrupt(
                f"a fatal error stopped the applies ({self.fatal}); LevelDB is at "
                f"{self.storage.applied_index()}"))
        conf = syncobj_conf(cluster.raft, spec.data_dir, password, auto_tick,
                            serializer=self.snapshots.serialize,
                            serializeChecker=self.snapshots.state,
                            deserializer=self._read_snapshot,
                            onStateChanged=self._on_state_changed)
        peers = [r.raft_address for r in cluster.replicas if r.id != spec.id]
        self.peer_ids = {r.raft_address: r.id for r in cluster.replicas}
        try:
            conf.validate()
        except AssertionError:
            # config.py checks every relation PySyncObj asserts; a new one in a
            # PySyncObj upgrade lands here, not in the "damaged journal" branch.
            raise ConfigError([f"{cluster.path}: raft: PySyncObj refuses these settings "
                               "(SyncObjConf.validate failed)"]) from None
        try:
            super().__init__(spec.raft_address, peers, conf)
        except OSError as exc:
            raise TarefaError(f"{self.journal_path}: cannot open the Raft journal: "
                              f"{exc.strerror or exc} (check that the data_dir belongs to the "
                              "user the replica runs as)") from exc
        except Exception as exc:  # noqa: BLE001 - the journal is read here
            raise StorageCorrupt(f"{self.journal_path}: cannot start Raft from this journal "
                                 f"({exc!r}); {RESYNC}") from exc
        self.snapshots.attach(self._SyncObj__serializer,  # type: ignore[attr-defined]
                              progress=self._say_alive_to_leader)
        if self._fsync:
            log.info("%s: raft.fsync: the Raft journal is fsynced before an entry is "
                     "acknowledged or counted", spec.id)
        self._count_handshake_drops()

    # -- connections that never authenticate -----------------------------------

    def _count_handshake_drops(self) -> None:
        """Count incoming Raft connections closed before the peer identified itself.

        With a password that is what a peer with another password (or none)
        looks like: PySyncObj's TcpConnection fails to decrypt its first message
        and disconnects in a bare `except:` without logging (pysyncobj
        tcp_connection.py, __processParseMessage). The transport keeps such a
        connection in `_unknownConnections` until it names its node, and looks
        up `_onDisconnected` when it accepts one, so wrapping it here sees them.
        """
        transport = self._SyncObj__transport  # type: ignore[attr-defined]
        unknown = getattr(transport, "_unknownConnections", None)
        original = getattr(transport, "_onDisconnected", None)
        if unknown is None or original is None:
            return  # another PySyncObj version: lose the diagnostic, not the replica

        def on_disconnected(conn: Any) -> None:
            if conn in unknown:
                self.handshake_drops += 1
            original(conn)

        transport._onDisconnected = on_disconnected

    def _check_peers(self) -> None:
        """At most once a second: warn (rate-limited) about unauthenticated
        connections and about reaching no peer at all."""
        now = time.monotonic()
        if now - self._peers_checked_at < 1.0:
            return
        self._peers_checked_at = now
        drops = self.handshake_drops
        if drops > self._drops_logged and now - self._drops_logged_at >= PEER_WARNING_SECONDS:
            log.warning("%s: %d incoming Raft connection(s) closed before the peer identified "
                        "itself%s", self.spec.id, drops - self._drops_logged,
                        " (a member with another Raft password or none, or not a Raft peer)"
                        if self.encrypted else "")
            self._drops_logged, self._drops_logged_at = drops, now
        if not self.otherNodes:
            return
        if any(self.isNodeConnected(node) for node in self.otherNodes):
            if self._alone_warned:
                log.info("%s: Raft peers reachable again", self.spec.id)
            self._alone_since, self._alone_warned = None, False
        elif self._alone_since is None:
            self._alone_since = now
        elif not self._alone_warned and now - self._alone_since >= NO_PEER_WARNING_SECONDS:
            self._alone_warned = True
            log.warning("%s: no Raft peer connected for %.0fs: peers down or unreachable%s",
                        self.spec.id, now - self._alone_since,
                        ", or their Raft password differs from ours" if self.encrypted
                        else ", or they use a Raft password and we do not")

    # -- a tick that fails forever -------------------------------------------

    def _onTick(self, timeToWait: float = 0.0) -> None:  # noqa: N802, N803
        """PySyncObj's tick, stopping the replica when it fails on every tick for a while.

        PySyncObj's tick thread logs a failed tick and retries it: a journal entry
        that no longer unpickles fails every tick, forever, with nothing applied.
        With raft.fsync the journal is synced first: the leader counts its own
        entries towards a commit only in the tick (see durable_journal.py). The
        first tick also makes the journal compact by rename (journal_file.py).
        """
        try:
            if not self._compacts_by_rename:
                # Also by the first tick, before any compaction can run.
                journal_file.install(self._SyncObj__raftLog)  # type: ignore[attr-defined]
                self._compacts_by_rename = True
            if self._fsync:
                if self.durable is None:
                    # Installed by the first tick, before any message is read:
                    # SyncObj.__init__ starts the tick thread before it returns.
                    self.durable = DurableJournal(
                        self._SyncObj__raftLog, self._fsync_failed)  # type: ignore[attr-defined]
                self.durable.sync()
            if self.snapshots.damaged:
                self._replace_damaged_snapshot()
            super()._onTick(timeToWait)
        except Exception as exc:
            now = time.monotonic()
            if self._tick_failures == 0:
                self._tick_failing_since = now
            self._tick_failures += 1
            failing = now - self._tick_failing_since
            if self._tick_failures >= TICK_FAILURE_MIN_COUNT and failing >= TICK_FAILURE_SECONDS:
                self._die(StorageCorrupt(
                    f"{self.journal_path}: every Raft tick failed for {failing:.1f}s "
                    f"({self._tick_failures} times, last: {exc!r}); the Raft journal is "
                    f"most likely damaged, or holds an entry written by a newer Tarefa version "
                    f"(then upgrade this replica): {RESYNC}"))
            raise
        self._tick_failures = 0
        self._check_peers()

    # -- the replicated methods ---------------------------------------------

    def propose(self, commands: list, callback: Callable[[Any, Any], None]) -> None:
        """Propose one entry of `commands` (any member: a follower forwards it)."""
        self.apply_sealed(entry_seal.seal(commands), callback=callback)

    # PySyncObj numbers replicated methods by their sorted names: apply_batch
    # is 0 as before, apply_sealed 1. A member without apply_sealed fails its
    # tick on such an entry, applying nothing, and stops (TICK_FAILURE_SECONDS).

    @replicated
    def apply_batch(self, commands: list) -> list[Outcome] | None:
        """An entry proposed before entries were sealed (a journal of an older version)."""
        return self._apply(commands)

    @replicated
    def apply_sealed(self, blob: bytes) -> list[Outcome] | None:
        """Apply one Raft entry, after checking its CRC. Never raises."""
        try:
            commands = entry_seal.unseal(blob)
        except entry_seal.CorruptEntry as exc:
            self._die(StorageCorrupt(f"Raft entry {self.raftLastApplied + 1} is damaged: "
                                     f"{exc}; {RESYNC}"))
            return None
        return self._apply(commands, indexed=entry_seal.results_indexed(blob))

    def _apply(self, commands: list, indexed: bool = False) -> list[Outcome] | None:
        """Apply one Raft entry. Never raises: a raise would make PySyncObj retry it."""
        index = self.raftLastApplied + 1
        if self.fatal is not None:
            return None
        try:
            return self.applier.apply(index, commands, indexed)
        except Exception as exc:  # noqa: BLE001 - must not escape into PySyncObj
            self._die(exc if isinstance(exc, StorageCorrupt)
                      else StorageCorrupt(f"apply of Raft entry {index} failed: {exc!r}"))
            return None

    # -- two fixes to PySyncObj's log replication ------------------------------------

    def _SyncObj__onMessageReceived(self, node: Any, message: Any) -> None:  # noqa: N802
        """Follower: truncate only on a real conflict. Leader: keep a follower's
        next index from moving backwards on a success reply.

        Follower side: PySyncObj deletes every entry after prevLogIdx whenever
        it holds more, even when they equal the entries being sent (or when a
        heartbeat carries none). A leader re-sends entries after a stale reset
        reply (e.g. a replica healed from a partition answers several
        heartbeats with the same reset before the entries arrive), and the
        follower then truncated and re-appended entries it had acknowledged
        and applied — CRITICAL "truncating already-applied log entries", and
        for a moment fewer entries than it acknowledged. Raft's rule is to
        delete only from the first entry whose term differs; see
        `_skip_matching_entries`.

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
        if isinstance(message, dict) and message.get("type") == "append_entries" \
                and "prevLogIdx" in message and message.get("transmission") is None \
                and message.get("term", -1) >= self.raftCurrentTerm:
            message = self._skip_matching_entries(message)
        try:
            SyncObj._SyncObj__onMessageReceived(self, node, message)  # type: ignore[attr-defined]
        finally:
            self._keep_tail_after = None
        self._ack_snapshot_chunk(node, message)
        if before is not None:
            next_index = self._SyncObj__raftNextIndex  # type: ignore[attr-defined]
            if next_index.get(node, before) < before:
                next_index[node] = before

    def _ack_snapshot_chunk(self, node: Any, message: Any) -> None:
        """Follower: answer the chunks of a snapshot being received, at most
        every half heartbeat.

        PySyncObj's follower says nothing until the last chunk of a snapshot
        has arrived, and the leader drops a connection on which it read
        nothing for connection_timeout (tcp_connection.py), cancelling the
        transmission, which then starts again from the first byte. A snapshot
        that takes longer than connection_timeout to send (30 MB on a loaded
        machine, or far less over a slow link) was therefore never received
        and its member never caught up. The answer is the one PySyncObj's
        follower already sends for each chunk of a large entry: a failure
        without reset, which only tells the leader this member is alive."""
        if not (isinstance(message, dict) and message.get("type") == "append_entries"):
            return
        chunk = message.get("serialized")
        if not isinstance(chunk, tuple) or len(chunk) != 3 or chunk[2]:
            return  # none, or the last chunk (answered by PySyncObj after the install)
        if message.get("term", -1) < self.raftCurrentTerm:
            return
        self._say_alive(node)

    def _say_alive_to_leader(self) -> None:
        """Follower, restoring a snapshot (seconds at 10^6 keys, on the tick
        thread, reading no message): tell the leader it is alive, as for the
        chunks. With the third member down it was the leader's only partner,
        and the leader stepped down after leader_fallback_timeout (2 s) of
        silence, which cost an election before the pair took writes again."""
        leader = self._SyncObj__raftLeader  # type: ignore[attr-defined]
        if leader is None or leader is self._SyncObj__selfNode:  # type: ignore[attr-defined]
            return
        try:
            # PySyncObj's connection drops itself, when it sends, after
            # connection_timeout without reading; nothing is read during a
            # restore, whoever is silent. Not reading is this member's doing:
            # the timeout counts again from the end of the restore.
            transport = self._SyncObj__transport  # type: ignore[attr-defined]
            connection = transport._connections.get(leader)
            if connection is not None:
                connection._TcpConnection__lastReadTime = raft_clock()
            self._say_alive(leader)
        except Exception:  # noqa: BLE001 - a courtesy to the leader must not fail the restore
            log.debug("%s: could not tell the leader during a restore", self.spec.id,
                      exc_info=True)

    def _say_alive(self, node: Any) -> None:
        """A failure without reset, at most every half heartbeat: the answer
        PySyncObj's follower sends for each chunk of a large entry, which moves
        no index and only refreshes the leader's last response from this member."""
        now = time.monotonic()
        if now - self._snapshot_ack_at < self._reply_repeat_window:
            return
        self._snapshot_ack_at = now
        self._last_reply = None  # the next success reply must go: this one replaced it
        SyncObj._SyncObj__sendNextNodeIdx(self, node, reset=False,  # type: ignore[attr-defined]
                                          success=False)

    def _SyncObj__sendNextNodeIdx(self, node: Any, reset: bool = False,  # noqa: N802
                                  nextNodeIdx: Any = None,  # noqa: N803
                                  success: bool = False) -> None:
        """Follower: skip a success reply that repeats one just sent to the same leader.

        A PySyncObj leader sends each follower two append_entries per Raft entry:
        the entry, then (once a majority holds it) the bare new commit index. The
        follower answers both, and the second answer repeats the first (same next
        index, success) and tells the leader nothing new: it only refreshes the
        leader's last-response time, which a reply at least every half heartbeat
        still does (the leader steps down only after leader_fallback_timeout).
        Skipping it saves, per Raft entry, one message out of each follower and
        two into the leader. Replies that carry news (another next index, a
        failure, a reset, a new term or leader) always go, and so does the
        first one after a connection dropped (_SyncObj__onNodeDisconnected).
        """
        if success and not reset and nextNodeIdx is not None:
            now = time.monotonic()
            reply = (node, self.raftCurrentTerm, nextNodeIdx)
            if reply == self._last_reply and now - self._last_reply_at < self._reply_repeat_window:
                self.replies_skipped += 1
                return
            self._last_reply, self._last_reply_at = reply, now
        else:
            self._last_reply = None
        if self.durable is not None:
            self.durable.sync()  # what this reply acknowledges is on disk first
        SyncObj._SyncObj__sendNextNodeIdx(self, node, reset=reset,  # type: ignore[attr-defined]
                                          nextNodeIdx=nextNodeIdx, success=success)

    def _SyncObj__onNodeDisconnected(self, node: Any) -> None:  # noqa: N802
        """A reply sent just before a connection dropped may never have arrived:
        after a reconnection the first reply always goes."""
        self._last_reply = None
        SyncObj._SyncObj__onNodeDisconnected(self, node)  # type: ignore[attr-defined]

    def _skip_matching_entries(self, message: dict) -> dict:
        """Drop the entries of an append_entries this follower already holds.

        Entries are (command, index, term). Those matching the local log by
        index and term are removed and prevLogIdx/prevLogTerm move to the last
        of them, so PySyncObj's handler truncates only from the first
        conflicting entry, as Raft prescribes. When nothing new remains but
        the local log goes on past prevLogIdx, the handler is shown only the
        entry at prevLogIdx (`_SyncObj__getEntries` below) so it keeps that
        tail, and the leader's commit index is capped at prevLogIdx: the tail
        is not yet known to match the leader's log, so it must not be
        committed on this message's word (Raft: commit up to the last new
        entry).
        """
        prev = message["prevLogIdx"]
        local = self._SyncObj__getEntries(prev)  # type: ignore[attr-defined]
        if not local or local[0][2] != message["prevLogTerm"] or len(local) == 1:
            return message  # a reset reply or a plain append: PySyncObj's path is right
        entries = message.get("entries") or []
        matched = 0
        while matched < len(entries) and matched + 1 < len(local) \
                and local[matched + 1][1] == entries[matched][1] \
                and local[matched + 1][2] == entries[matched][2]:
            matched += 1
        if entries and matched == 0:
            return message  # the first entry conflicts: truncating from it is Raft
        fixed = dict(message)
        if matched:
            fixed["entries"] = entries[matched:]
            fixed["prevLogIdx"] = entries[matched - 1][1]
            fixed["prevLogTerm"] = entries[matched - 1][2]
        if not fixed.get("entries"):
            self._keep_tail_after = fixed["prevLogIdx"]
            fixed["commit_index"] = min(fixed["commit_index"], fixed["prevLogIdx"])
        self.log_repairs_avoided += 1
        return fixed

    def _SyncObj__getEntries(self, from_index: Any, count: Any = None,  # noqa: N802
                             maxSizeBytes: Any = None) -> Any:  # noqa: N803
        entries = SyncObj._SyncObj__getEntries(self, from_index, count,  # type: ignore[attr-defined]
                                               maxSizeBytes)
        if from_index == self._keep_tail_after and count is None and maxSizeBytes is None:
            return entries[:1]
        return entries

    # -- snapshots (log compaction) ------------------------------------------

    def _read_snapshot(self, filename: str) -> Any:
        """PySyncObj's deserializer: at start, and when the leader sent a snapshot."""
        try:
            # The leader's snapshot is newer than any dump of ours still running.
            self.snapshots.cancel("a snapshot from the leader is being installed")
            if self.durable is not None:
                # PySyncObj renamed a received snapshot into place without a sync;
                # installing it clears the journal behind it (synced next tick).
                self.durable.sync_file(filename)
            header = Storage.read_header(filename)
            snap_index = header[0][1]
            applied = self.storage.applied_index()
            if applied >= snap_index or self._holds(filename):
                log.info("%s: snapshot at %d not restored: LevelDB already at %d%s",
                         self.spec.id, snap_index, applied, "" if applied >= snap_index else
                         f" and holding it (the entries after {applied} were PySyncObj no-ops)")
                # Not needed here, but sent to any member that needs a snapshot.
                self.snapshots.check_in_background()
            else:
                log.warning("%s: restoring snapshot at Raft index %d (LevelDB was at %d)",
                            self.spec.id, snap_index, applied)
                started = time.monotonic()
                self.storage.restore(filename, progress=self._say_alive_to_leader)
                log.info("%s: snapshot restored in %.1fs", self.spec.id,
                         time.monotonic() - started)
                # The leader's message that carried the snapshot restarted the
                # election timer before the restore; PySyncObj checks the timer
                # first thing next tick, before reading the heartbeats that came
                # meanwhile, so a restore longer than the timeout made this member
                # start an election at once and unseat a healthy leader. The
                # leader was heard from just now, in effect: restart the timer.
                # PySyncObj's clock, CLOCK_MONOTONIC_RAW: time.monotonic() drifts
                # from it by NTP's corrections (65 ms here after 20 h of uptime;
                # at 50 ppm, over a minute a month), which would make this
                # deadline that much early (an election at once) or late.
                self._SyncObj__raftElectionDeadline = (  # type: ignore[attr-defined]
                    raft_clock() + self._SyncObj__generateRaftTimeout())  # type: ignore[attr-defined]
            return header
        except Exception as exc:
            self._die(exc if isinstance(exc, StorageCorrupt)
                      else StorageCorrupt(f"{filename}: cannot load snapshot: {exc!r}"))
            raise

    def _replace_damaged_snapshot(self) -> None:
        """Force a compaction (PySyncObj drops the request when no entry is newer
        than the snapshot: then propose an empty one, at most every 5 s)."""
        self.forceLogCompaction()
        now = time.monotonic()
        if now - self._damaged_nudged >= 5.0 and self.fatal is None:
            self._damaged_nudged = now
            try:
                self.propose([], callback=lambda result, error: None)
            except Exception:  # noqa: BLE001 - no leader now: the next tick tries again
                log.debug("%s: proposing an entry to replace the snapshot failed",
                          self.spec.id, exc_info=True)

    def _holds(self, filename: str) -> bool:
        try:
            return self.storage.holds_snapshot(filename)
        except StorageCorrupt:
            return False  # damaged before the applied index: the restore refuses it

    # -- status --------------------------------------------------------------

    def _on_state_changed(self, old: int, new: int) -> None:
        log.info("%s: raft role %s -> %s", self.spec.id, ROLES.get(old, old), ROLES.get(new, new))

    def _fsync_failed(self, exc: OSError) -> None:
        self._die(StorageCorrupt(f"{self.journal_path}: fsync failed ({exc}); what it "
                                 f"covered may not be on disk, so this replica stops. "
                                 f"Check the disk, then {RESYNC}"))

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
