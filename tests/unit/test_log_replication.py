"""Regression: a follower truncated and re-appended entries it already held.

Found by the partition nemesis (tests/fault/test_partition.py soak): a
replica healed from a partition answered several heartbeats with the same
reset reply; the leader re-sent entries after the stale one, and PySyncObj's
follower deleted everything after prevLogIdx because it held more entries —
CRITICAL "truncating already-applied log entries", and for a moment fewer
entries than it had acknowledged. ReplicaStateMachine now truncates only
from the first entry whose term differs (Raft's rule).

These tests drive one real ReplicaStateMachine in-process (autoTick off, so
nothing runs behind the test's back) with hand-made append_entries messages.
"""

from __future__ import annotations

import logging
import os
import time

import pytest

from daemons.core.config import parse_cluster
from daemons.replica.storage import Storage
from daemons.replica.state_machine import ReplicaStateMachine

NOOP = b"\x01"


@pytest.fixture
def follower(tmp_path):
    yield from member(tmp_path, {})


def member(tmp_path, raft: dict):
    raw = {"security": {"auth": "cid-only"}, "raft": raft,
           "replicas": [{"id": f"r{i}", "host": "127.0.0.1", "raft_port": 1 + i,
                         "grpc_port": 11 + i, "data_dir": f"d{i}"} for i in range(3)]}
    cluster = parse_cluster(raw, "cluster.yaml", str(tmp_path))
    spec = cluster.replicas[0]
    os.makedirs(spec.data_dir)
    storage = Storage(spec.data_dir)
    fatal: list[Exception] = []
    sm = ReplicaStateMachine(cluster, spec, storage, fatal.append, auto_tick=False)
    sm.fatal_errors = fatal  # type: ignore[attr-defined]
    leader = next(iter(sm._SyncObj__otherNodes))
    sm.leader_node = leader  # type: ignore[attr-defined]
    yield sm
    sm.destroy()
    storage.close()


def entries(sm: ReplicaStateMachine) -> list[tuple[int, int]]:
    return [(e[1], e[2]) for e in sm._SyncObj__raftLog]  # type: ignore[attr-defined]


def append(sm: ReplicaStateMachine, prev: tuple[int, int], new: list[tuple[int, int]],
           commit: int, term: int = 1) -> None:
    sm._SyncObj__onMessageReceived(sm.leader_node, {  # type: ignore[attr-defined]
        "type": "append_entries", "term": term, "commit_index": commit,
        "prevLogIdx": prev[0], "prevLogTerm": prev[1],
        "entries": [(NOOP, index, t) for index, t in new]})


def test_bug_follower_truncated_entries_it_already_held(follower, caplog):
    append(follower, (1, 0), [(2, 1), (3, 1), (4, 1), (5, 1)], commit=1)
    assert entries(follower) == [(1, 0), (2, 1), (3, 1), (4, 1), (5, 1)]
    log_object = follower._SyncObj__raftLog  # type: ignore[attr-defined]
    held = list(log_object)
    with caplog.at_level(logging.WARNING):
        # A stale reset made the leader re-send from index 3 (entries 3..5 plus a new 6),
        # then a heartbeat from an even older position, with nothing new.
        append(follower, (2, 1), [(3, 1), (4, 1), (5, 1), (6, 1)], commit=4)
        append(follower, (2, 1), [], commit=4)
    assert entries(follower) == [(1, 0), (2, 1), (3, 1), (4, 1), (5, 1), (6, 1)]
    assert list(log_object)[:5] == held  # the very same entries, never deleted
    assert not [r for r in caplog.records if r.levelno >= logging.CRITICAL]
    assert follower.log_repairs_avoided == 2
    assert follower.raftCommitIndex == 4


def test_heartbeat_behind_the_log_does_not_commit_the_unconfirmed_tail(follower):
    append(follower, (1, 0), [(2, 1), (3, 1), (4, 1)], commit=1)
    # The leader confirms entries only up to 2 here; 3 and 4 are not known to match
    # its log, so even a leader commit index of 4 must not commit them.
    append(follower, (2, 1), [], commit=4)
    assert entries(follower) == [(1, 0), (2, 1), (3, 1), (4, 1)]
    assert follower.raftCommitIndex == 2


def test_a_conflicting_entry_still_truncates_from_itself(follower):
    append(follower, (1, 0), [(2, 1), (3, 1), (4, 1)], commit=1)
    # A leader of term 2 holds a different entry 3: Raft deletes 3.. and appends its own.
    append(follower, (2, 1), [(3, 2)], commit=1, term=2)
    assert entries(follower) == [(1, 0), (2, 1), (3, 2)]
    # The same after a matching prefix: 3 matches, 4 conflicts.
    append(follower, (3, 2), [(4, 2)], commit=1, term=2)
    append(follower, (2, 1), [(3, 2), (4, 3)], commit=1, term=3)
    assert entries(follower) == [(1, 0), (2, 1), (3, 2), (4, 3)]


def test_a_gap_still_gets_a_reset(follower):
    append(follower, (1, 0), [(2, 1)], commit=1)
    append(follower, (5, 1), [(6, 1)], commit=1)  # the follower lacks 3..5
    assert entries(follower) == [(1, 0), (2, 1)]


# -- replies the leader learns nothing from ------------------------------------------


@pytest.fixture
def replies(follower, monkeypatch):
    sent: list[dict] = []
    transport = follower._SyncObj__transport  # type: ignore[attr-defined]
    monkeypatch.setattr(transport, "send", lambda node, message: sent.append(message))
    return sent


def reply_view(sent: list[dict]) -> list[tuple[int, bool, bool]]:
    return [(m["next_node_idx"], m["success"], m["reset"]) for m in sent
            if m["type"] == "next_node_idx"]


def test_the_commit_only_message_gets_no_repeated_reply(follower, replies):
    # The entry, then the bare commit index once a majority held it: the second
    # reply would repeat the first (next index 3, success), so it is skipped.
    append(follower, (1, 0), [(2, 1)], commit=1)
    append(follower, (2, 1), [], commit=2)
    assert reply_view(replies) == [(3, True, False)]
    assert follower.replies_skipped == 1
    assert follower.raftCommitIndex == 2  # the message itself was handled
    # News always goes: the next entry, and a reset for a gap.
    append(follower, (2, 1), [(3, 1)], commit=2)
    append(follower, (7, 1), [(8, 1)], commit=2)
    assert reply_view(replies) == [(3, True, False), (4, True, False), (4, False, True)]


def test_a_repeat_still_goes_once_half_a_heartbeat_passed(follower, replies):
    append(follower, (1, 0), [(2, 1)], commit=1)
    follower._last_reply_at -= follower._reply_repeat_window  # as if that much time passed
    append(follower, (2, 1), [], commit=2)  # e.g. a heartbeat: the leader hears from us
    assert reply_view(replies) == [(3, True, False), (3, True, False)]
    assert follower.replies_skipped == 0


def test_a_new_term_gets_its_reply_even_when_the_index_is_the_same(follower, replies):
    append(follower, (1, 0), [(2, 1)], commit=1)
    append(follower, (2, 1), [], commit=2, term=2)  # a new leader's first heartbeat
    assert reply_view(replies) == [(3, True, False), (3, True, False)]


def test_after_a_dropped_connection_the_repeat_goes(follower, replies):
    append(follower, (1, 0), [(2, 1)], commit=1)
    # The first reply may have died with the connection: the leader must hear again.
    # (The transport calls the override: PySyncObj registered it by its mangled name.)
    transport = follower._SyncObj__transport  # type: ignore[attr-defined]
    transport._onNodeDisconnectedCallback(follower.leader_node)
    append(follower, (2, 1), [], commit=2)
    assert reply_view(replies) == [(3, True, False), (3, True, False)]


# -- a snapshot being received ----------------------------------------------------------


def snapshot_chunk(sm: ReplicaStateMachine, first: bool, term: int = 1) -> None:
    sm._SyncObj__onMessageReceived(sm.leader_node, {  # type: ignore[attr-defined]
        "type": "append_entries", "term": term, "commit_index": 0,
        "serialized": (b"x" * 100, first, False)})


def test_snapshot_chunks_are_answered_every_half_heartbeat(follower, replies):
    # Without an answer the leader, reading nothing for connection_timeout,
    # dropped the connection and began the snapshot again (tests/fault:
    # test_a_snapshot_slower_to_send_than_connection_timeout_still_arrives).
    follower._reply_repeat_window = 60.0  # "half a heartbeat" that a slow machine cannot pass
    snapshot_chunk(follower, first=True)
    snapshot_chunk(follower, first=False)  # within the window: no second answer
    assert [(m["success"], m["reset"]) for m in replies] == [(False, False)]
    follower._snapshot_ack_at -= follower._reply_repeat_window
    snapshot_chunk(follower, first=False)
    assert [(m["success"], m["reset"]) for m in replies] == [(False, False)] * 2
    follower._snapshot_ack_at -= follower._reply_repeat_window
    snapshot_chunk(follower, first=False, term=0)  # an old leader's: not answered
    assert len(replies) == 2


# -- raft.fsync ---------------------------------------------------------------------------


@pytest.fixture
def durable(tmp_path):
    yield from member(tmp_path, {"fsync": True})


@pytest.fixture
def order(durable, monkeypatch):
    """What reaches the disk and the wire, in order: "fsync" or a message type."""
    events: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        events.append("fsync")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    transport = durable._SyncObj__transport  # type: ignore[attr-defined]
    monkeypatch.setattr(transport, "send", lambda node, message: events.append(message["type"]))
    durable._onTick(0)  # the first tick installs the syncs and syncs what start-up wrote
    assert durable.durable is not None and durable.durable.syncs == 1
    events.clear()
    return events


def test_fsync_a_follower_syncs_its_journal_before_acknowledging(durable, order):
    append(durable, (1, 0), [(2, 1)], commit=1)  # term 0 -> 1: journal.meta, then the entry
    assert order == ["fsync", "fsync", "fsync", "next_node_idx"]
    order.clear()
    append(durable, (2, 1), [(3, 1)], commit=2)
    assert order == ["fsync", "next_node_idx"]
    order.clear()
    durable._last_reply_at -= durable._reply_repeat_window
    append(durable, (3, 1), [], commit=3)  # nothing new to store: no sync
    assert order == ["next_node_idx"]
    order.clear()
    append(durable, (3, 1), [(4, 2)], commit=3, term=2)  # a new term: journal.meta too
    assert order.count("fsync") >= 3 and order[-1] == "next_node_idx"  # meta, its dir, journal
    assert durable._SyncObj__raftLog.getCurrentTerm() == 2  # type: ignore[attr-defined]


def test_fsync_every_tick_syncs_what_was_appended_before_it(durable, order):
    durable._SyncObj__raftLog.add(NOOP, 2, 1)  # type: ignore[attr-defined]
    durable._onTick(0)
    assert order[:1] == ["fsync"]
    order.clear()
    durable._onTick(0)  # nothing appended since
    assert "fsync" not in order


def test_without_fsync_nothing_is_synced(follower, replies, monkeypatch):
    synced: list[int] = []
    monkeypatch.setattr(os, "fsync", synced.append)
    append(follower, (1, 0), [(2, 1)], commit=1)
    follower._onTick(0)
    assert follower.durable is None and synced == []


def test_fsync_a_failed_sync_stops_the_replica_and_nothing_is_acknowledged(
        durable, order, monkeypatch):
    """Linux reports a write-back error once: a retried fsync could succeed and
    acknowledge what never reached the disk. The first failure is final."""
    def fail(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError):
        append(durable, (1, 0), [(2, 1)], commit=1)
    assert "next_node_idx" not in order
    assert durable.fatal is not None and "fsync failed" in str(durable.fatal)
    assert durable.fatal_errors  # the daemon was told to stop
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # the disk "recovers"
    with pytest.raises(OSError):
        durable._onTick(0)
    assert "next_node_idx" not in order


def test_fsync_a_received_snapshot_is_synced_before_it_is_installed(durable, order,
                                                                      tmp_path):
    snapshot = tmp_path / "received"
    snapshot.write_bytes(b"not a snapshot")
    with pytest.raises(Exception):  # noqa: B017 - the content is refused afterwards
        durable._read_snapshot(str(snapshot))
    assert order[:2] == ["fsync", "fsync"]  # the file, then its directory


def test_fsync_a_leader_syncs_its_own_entries_before_counting_them(durable, order,
                                                                    monkeypatch):
    """PySyncObj's leader counts its own log towards a commit in the tick; the
    entry it appended (here the new leader's no-op) must be on disk first."""
    journal = durable._SyncObj__raftLog._FileJournal__journalFile  # type: ignore[attr-defined]
    synced: list[int] = []  # the commit index each time the journal itself was synced
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if fd == journal._ResizableFile__f.fileno():
            synced.append(durable.raftCommitIndex)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    durable._SyncObj__setCurrentTerm(1, None)  # type: ignore[attr-defined]
    durable._SyncObj__onBecomeLeader()  # type: ignore[attr-defined]
    noop = durable._SyncObj__getCurrentLogIndex()  # type: ignore[attr-defined]
    follower_node = durable.leader_node  # one of the two others: it acknowledged the no-op
    durable._SyncObj__raftMatchIndex[follower_node] = noop  # type: ignore[attr-defined]
    assert durable.raftCommitIndex < noop and not synced
    durable._onTick(0)
    assert durable.raftCommitIndex == noop  # committed in this tick...
    assert synced and synced[0] < noop       # ...after the journal holding it was synced


def snapshot_of_batches(tmp_path, batches: int) -> tuple[Storage, str]:  # type: ignore[no-untyped-def]
    """A LevelDB of a little more than `batches` restore batches, and its snapshot at 41."""
    from daemons.replica import storage as storage_module

    source = Storage(str(tmp_path / "source"))
    view = source.view()
    for i in range(batches * storage_module._RESTORE_BATCH + 10):
        view.put(b"t/%08d" % i, b"x")
    view.put(b"m/applied", b"41")
    source.commit(view)
    snapshot = str(tmp_path / "snapshot")
    source.dump(snapshot, (("raft", 41), ["cluster"], {}))
    return source, snapshot


def test_a_member_restoring_a_snapshot_tells_the_leader_it_is_alive(follower, tmp_path,
                                                                    monkeypatch):
    """A restore takes seconds at 10^6 keys, on the tick thread, reading no
    message. The leader, whose only partner the member may be (the third one
    down), stepped down after leader_fallback_timeout without a word from it;
    and answering was not enough: PySyncObj's connection drops itself, when
    it sends, once it has read nothing for connection_timeout. So the member
    answers every _RESTORE_BATCH keys and keeps that connection's read clock
    current. The election deadline set after the restore is on PySyncObj's
    clock (CLOCK_MONOTONIC_RAW), not time.monotonic (here moved 1000 s on)."""
    from pysyncobj.monotonic import monotonic as raft_clock

    source, snapshot = snapshot_of_batches(tmp_path, 3)

    leader = follower.leader_node
    follower._SyncObj__raftLeader = leader  # type: ignore[attr-defined]
    follower._reply_repeat_window = 0.0  # every chance to answer, answered
    transport = follower._SyncObj__transport  # type: ignore[attr-defined]

    class Connection:
        _TcpConnection__lastReadTime = raft_clock() - 100

    connection = Connection()
    monkeypatch.setitem(transport._connections, leader, connection)
    sent: list = []
    monkeypatch.setattr(transport, "send", lambda node, message: sent.append(
        (node, message, connection._TcpConnection__lastReadTime)) or True)
    real_monotonic = time.monotonic
    monkeypatch.setattr(time, "monotonic", lambda: real_monotonic() + 1000)

    started = raft_clock()
    follower._read_snapshot(snapshot)

    assert follower.storage.digest() == source.digest()
    alive = [(node, message, read_at) for node, message, read_at in sent
             if message.get("type") == "next_node_idx"]
    # The pass writing three batches or more; the check before it hashes
    # this ~0.5 MB file in one chunk (one call per MiB, nothing sent here).
    assert len(alive) >= 3, sent
    assert all(node is leader and not message["success"] and not message["reset"]
               for node, message, _ in alive)
    assert all(read_at >= started for _, _, read_at in alive), "the connection would drop"
    deadline = follower._SyncObj__raftElectionDeadline - raft_clock()  # type: ignore[attr-defined]
    assert 0 < deadline <= follower._SyncObj__conf.raftMaxTimeout, deadline  # type: ignore[attr-defined]
    source.close()


def test_a_restore_goes_on_when_telling_the_leader_fails(follower, tmp_path, monkeypatch):
    """Telling the leader is a courtesy: a send that fails (a dropped
    connection, another PySyncObj version) must not fail the restore."""
    source, snapshot = snapshot_of_batches(tmp_path, 2)
    follower._SyncObj__raftLeader = follower.leader_node  # type: ignore[attr-defined]
    follower._reply_repeat_window = 0.0
    transport = follower._SyncObj__transport  # type: ignore[attr-defined]
    calls = []

    def broken(node, message):  # type: ignore[no-untyped-def]
        calls.append(message)
        raise OSError("connection reset")

    monkeypatch.setattr(transport, "send", broken)
    follower._read_snapshot(snapshot)
    assert calls, "the restore never tried to tell the leader"
    assert not follower.fatal_errors and follower.storage.digest() == source.digest()
    source.close()
