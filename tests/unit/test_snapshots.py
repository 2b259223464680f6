"""SnapshotWriter (daemons/replica/snapshots.py): PySyncObj's snapshot hooks with
the dump in a background thread, driven through PySyncObj's own Serializer.

Two properties matter beyond "a snapshot gets written":
- the snapshot file is never replaced by a half-written or older dump (a
  crash mid-dump, PySyncObj's rename of `<snapshot>.tmp`, a snapshot installed
  from the leader while a dump runs);
- no snapshot is labelled past the LevelDB after a fatal apply error: PySyncObj
  counts the entries it could not apply as applied, and a restart that
  restored such a snapshot would skip them for good (a review reproduced it
  with three in-process members: 24 tasks where the others had 34).
"""

from __future__ import annotations

import logging
import time

import pytest
from pysyncobj.config import SERIALIZER_STATE
from pysyncobj.serializer import Serializer

from daemons.core import domain
from daemons.core.errors import StorageCorrupt
from daemons.replica.snapshots import SnapshotWriter
from daemons.replica.storage import PARTIAL_SUFFIX, Storage


@pytest.fixture
def storage(tmp_path):
    store = Storage(str(tmp_path / "db"))
    write(store, {domain.META_APPLIED: b"22", b"t/a": b"1"})
    yield store
    store.close()


def write(store: Storage, pairs: dict[bytes, bytes]) -> None:
    view = store.view()
    for key, value in pairs.items():
        view.put(key, value)
    store.commit(view)


def raft_data(index: int) -> tuple:
    """What PySyncObj passes: (data, last applied entry, the one before, cluster)."""
    return (None, (b"cmd", index, 3), (b"cmd", index - 1, 3), {"nodes"})


class Harness:
    """A SnapshotWriter wired into PySyncObj's Serializer as SyncObj wires it."""

    def __init__(self, tmp_path, storage: Storage, fatal: Exception | None = None) -> None:
        self.path = str(tmp_path / "snapshot")
        self.fatal = fatal
        self.writer = SnapshotWriter(storage, self.path, "r1", refusal=lambda: self.fatal)
        self.serializer = Serializer(self.path, 1024, False, self.writer.serialize,
                                     lambda name: None, self.writer.state)
        self.writer.attach(self.serializer)

    def serialize(self, index: int) -> None:
        self.serializer.serialize(raft_data(index), index)

    def settle(self, timeout: float = 20.0) -> tuple[int, int | None]:
        """Poll checkSerializing (as each tick does) until it reports an outcome."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state, index = self.serializer.checkSerializing()
            if state != SERIALIZER_STATE.SERIALIZING:
                return state, index
            time.sleep(0.005)
        raise TimeoutError("the dump did not finish")


def test_a_snapshot_is_written_in_the_background_and_reported_once(tmp_path, storage):
    h = Harness(tmp_path, storage)
    assert h.serializer.checkSerializing()[0] == SERIALIZER_STATE.NOT_SERIALIZING
    h.serialize(22)
    assert h.settle() == (SERIALIZER_STATE.SUCCESS, 22)
    assert h.serializer.checkSerializing()[0] == SERIALIZER_STATE.NOT_SERIALIZING
    assert Storage.read_header(h.path) == raft_data(22)[1:]
    assert dict(Storage.snapshot_pairs(h.path)) == dict(storage.items())
    assert h.writer.written == 1
    h.serialize(23)  # PySyncObj may start the next one
    assert h.settle() == (SERIALIZER_STATE.SUCCESS, 23)


def test_a_label_past_the_db_without_a_fatal_error_is_fine(tmp_path, storage):
    """PySyncObj's no-op entries (one per new leader) raise raftLastApplied
    without an apply: the label may be ahead of the stored index. Refusing that
    (as a first version of the fatal-error guard did) failed every compaction
    after an election until the next write."""
    h = Harness(tmp_path, storage)
    h.serialize(23)
    assert h.settle() == (SERIALIZER_STATE.SUCCESS, 23)
    assert Storage.read_header(h.path) == raft_data(23)[1:]


def test_a_db_whose_own_snapshot_ends_in_no_ops_holds_it(tmp_path, storage):
    """The label (23) is past the stored index (22) only by a no-op: the DB
    holds the snapshot, so a restart need not restore it (it restored the
    whole DB at every start). Another DB, or one behind, does not hold it."""
    h = Harness(tmp_path, storage)
    h.serialize(23)
    assert h.settle() == (SERIALIZER_STATE.SUCCESS, 23)
    assert storage.holds_snapshot(h.path)
    write(storage, {domain.META_APPLIED: b"21"})  # behind what the snapshot holds
    assert not storage.holds_snapshot(h.path)
    empty = Storage(str(tmp_path / "empty"))
    try:
        assert not empty.holds_snapshot(h.path)
    finally:
        empty.close()


def test_no_snapshot_after_a_fatal_error(tmp_path, storage):
    h = Harness(tmp_path, storage, fatal=StorageCorrupt("apply failed"))
    with pytest.raises(StorageCorrupt, match="refused"):
        h.writer.serialize(h.path + ".tmp", raft_data(32)[1:])
    assert h.writer.state() == SERIALIZER_STATE.FAILED  # once, so PySyncObj moves on
    assert h.writer.state() == SERIALIZER_STATE.NOT_SERIALIZING
    h.serialize(32)  # through PySyncObj, which swallows the error
    assert h.settle() == (SERIALIZER_STATE.FAILED, 32)
    assert not (tmp_path / "snapshot").exists()


def test_the_dump_holds_the_db_as_of_the_serializer_call(tmp_path, storage):
    """Applies go on while the thread writes: the file must not see them."""
    write(storage, {b"k%06d" % i: b"x" * 100 for i in range(50_000)})
    before = dict(storage.items())
    h = Harness(tmp_path, storage)
    h.serialize(22)
    write(storage, {b"k000001": b"changed", b"later": b"1", domain.META_APPLIED: b"30"})
    assert h.settle() == (SERIALIZER_STATE.SUCCESS, 22)
    assert dict(Storage.snapshot_pairs(h.path)) == before


def test_a_stale_tmp_file_never_replaces_the_snapshot(tmp_path, storage):
    """PySyncObj renames <snapshot>.tmp over the snapshot when the serializer
    returns: a leftover .tmp (an older version's crash) must not get there."""
    h = Harness(tmp_path, storage)
    h.serialize(22)
    assert h.settle()[0] == SERIALIZER_STATE.SUCCESS
    good = (tmp_path / "snapshot").read_bytes()
    (tmp_path / "snapshot.tmp").write_bytes(b"garbage from an older crash")
    write(storage, {b"t/b": b"2"})
    h.serialize(23)
    assert (tmp_path / "snapshot").read_bytes() == good  # untouched while it dumps
    assert not (tmp_path / "snapshot.tmp").exists()
    assert h.settle() == (SERIALIZER_STATE.SUCCESS, 23)
    assert Storage.read_header(h.path) == raft_data(23)[1:]


def test_a_cancelled_dump_keeps_the_previous_snapshot(tmp_path, storage):
    """A snapshot installed from the leader cancels our older dump, which then
    must never be moved over it; PySyncObj hears FAILED and keeps its journal."""
    h = Harness(tmp_path, storage)
    h.serialize(22)
    assert h.settle()[0] == SERIALIZER_STATE.SUCCESS
    good = (tmp_path / "snapshot").read_bytes()
    write(storage, {b"k%06d" % i: b"x" * 100 for i in range(100_000)})
    h.serialize(40)
    h.writer.cancel("a snapshot from the leader is being installed")
    assert h.settle() == (SERIALIZER_STATE.FAILED, 40)
    assert (tmp_path / "snapshot").read_bytes() == good
    assert not (tmp_path / ("snapshot" + PARTIAL_SUFFIX)).exists()
    assert h.writer.cancelled == 1
    h.serialize(41)  # and the next compaction works
    assert h.settle() == (SERIALIZER_STATE.SUCCESS, 41)


def test_a_partial_file_left_by_a_crash_is_removed_at_start(tmp_path, storage):
    partial = tmp_path / ("snapshot" + PARTIAL_SUFFIX)
    partial.write_bytes(b"half a dump")
    Harness(tmp_path, storage)
    assert not partial.exists()


def test_closing_the_storage_stops_a_running_dump(tmp_path):
    store = Storage(str(tmp_path / "db"))
    write(store, {b"k%06d" % i: b"x" * 100 for i in range(100_000)})
    dump = store.start_dump(str(tmp_path / "snapshot"), raft_data(5)[1:])
    store.close()  # must not leave the thread reading a closed DB
    assert not dump.running
    assert not (tmp_path / ("snapshot" + PARTIAL_SUFFIX)).exists()


def receive(h: Harness, node: str) -> bytes:
    """A whole transmission to `node`, as the leader sends it chunk by chunk."""
    chunks = []
    for _ in range(100_000):
        data = h.serializer.getTransmissionData(node)
        assert data, "no snapshot to send"
        chunk, _first, last = data
        chunks.append(chunk)
        if last:
            return b"".join(chunks)
    raise AssertionError("the transmission did not end")


def test_the_previous_snapshot_is_sent_while_a_dump_runs(tmp_path, storage):
    """PySyncObj sends no snapshot while it serializes; with a dump of seconds
    its leader then spun a whole append-entries period per tick sending a
    lagging follower empty messages (a review: 50 ms per tick, ~26,000
    messages). The previous snapshot, intact meanwhile, is sent instead."""
    h = Harness(tmp_path, storage)
    h.serialize(22)
    assert h.settle()[0] == SERIALIZER_STATE.SUCCESS
    previous = (tmp_path / "snapshot").read_bytes()
    write(storage, {b"k%06d" % i: b"x" * 100 for i in range(200_000)})
    h.serialize(40)
    assert h.serializer.checkSerializing()[0] == SERIALIZER_STATE.SERIALIZING
    assert receive(h, "follower") == previous
    assert h.settle() == (SERIALIZER_STATE.SUCCESS, 40)


def test_a_transmission_in_flight_restarts_with_the_new_snapshot(tmp_path, storage):
    """After SUCCESS the journal behind the old file is gone: finishing the old
    file would leave the follower short of the new log start."""
    h = Harness(tmp_path, storage)
    h.serialize(22)
    assert h.settle()[0] == SERIALIZER_STATE.SUCCESS
    write(storage, {b"k%06d" % i: b"x" * 100 for i in range(2_000)})
    first = h.serializer.getTransmissionData("follower")
    assert first is not None and first[1]  # the old file's first chunk went out
    h.serialize(40)
    assert h.settle() == (SERIALIZER_STATE.SUCCESS, 40)
    assert receive(h, "follower") == (tmp_path / "snapshot").read_bytes()
    assert Storage.read_header(h.path) == raft_data(40)[1:]


def test_any_failure_to_start_a_dump_is_reported_and_the_next_one_works(tmp_path, storage):
    """An error the serializer did not expect (here its .tmp path is a
    directory) used to leave PySyncObj waiting for an outcome forever: no
    compaction, no snapshot sent, ever again."""
    h = Harness(tmp_path, storage)
    (tmp_path / "snapshot.tmp").mkdir()
    h.serialize(22)
    assert h.settle() == (SERIALIZER_STATE.FAILED, 22)
    (tmp_path / "snapshot.tmp").rmdir()
    h.serialize(23)
    assert h.settle() == (SERIALIZER_STATE.SUCCESS, 23)


def test_a_damaged_snapshot_from_the_leader_never_replaces_this_members_own(tmp_path, storage):
    """Found by review: PySyncObj renamed a received snapshot over the member's
    own before anything checked it, so a damaged one from the leader left a
    healthy member unable to restart. It is checked before the rename now."""
    (tmp_path / "leader").mkdir()
    leader = Harness(tmp_path / "leader", storage)
    leader.serialize(22)
    assert leader.settle()[0] == SERIALIZER_STATE.SUCCESS
    (tmp_path / "follower").mkdir()
    follower = Harness(tmp_path / "follower", storage)
    follower.serialize(22)
    assert follower.settle()[0] == SERIALIZER_STATE.SUCCESS
    own = (tmp_path / "follower" / "snapshot").read_bytes()

    def send(damage: bool) -> list[bool]:
        results = []
        first = True
        while True:
            data = leader.serializer.getTransmissionData("follower")
            chunk, _, last = data
            if damage and first:
                chunk = chunk[:-1] + bytes([chunk[-1] ^ 0x01])
            results.append(follower.serializer.setTransmissionData((chunk, first, last)))
            first = False
            if last:
                return results

    assert send(damage=True)[-1] is False
    assert (tmp_path / "follower" / "snapshot").read_bytes() == own
    assert not (tmp_path / "follower" / "snapshot.1.tmp").exists()
    assert follower.writer.refused_transfers == 1
    assert send(damage=False)[-1] is True  # the next, whole transfer is taken
    assert (tmp_path / "follower" / "snapshot").read_bytes() == \
        (tmp_path / "leader" / "snapshot").read_bytes()


def test_a_damaged_own_snapshot_is_reported_and_replaced_by_the_next_dump(tmp_path, storage,
                                                                          caplog):
    caplog.set_level(logging.INFO, logger="daemons.replica.snapshots")
    h = Harness(tmp_path, storage)
    h.writer.mark_damaged("snapshot checksum mismatch")
    assert h.writer.damaged and "the snapshot file is damaged" in caplog.text
    h.serialize(22)
    assert h.settle()[0] == SERIALIZER_STATE.SUCCESS
    assert not h.writer.damaged and "the damaged snapshot file is replaced" in caplog.text
    Storage.verify_snapshot(h.path)


def test_a_bit_flipped_in_place_is_found_when_a_later_transfer_starts(tmp_path, storage,
                                                                      monkeypatch):
    """Found by review: the file was checked once per (inode, size, mtime), which
    a bit flipped in place keeps: every later transfer sent it unchecked, and a
    resynced member refused it forever with nothing in the sender's log."""
    import os

    from daemons.replica import snapshots as snapshots_module
    h = Harness(tmp_path, storage)
    h.serialize(22)
    assert h.settle()[0] == SERIALIZER_STATE.SUCCESS

    def checked() -> None:  # start a transfer, wait for the background check
        h.serializer.getTransmissionData("follower")
        h.serializer.cancelTransmisstion("follower")
        deadline = time.monotonic() + 10
        while h.writer._checking is not None and time.monotonic() < deadline:
            time.sleep(0.01)
    checked()
    assert not h.writer.damaged
    st = os.stat(h.path)
    with open(h.path, "r+b") as fh:
        fh.seek(st.st_size // 2)
        byte = fh.read(1)[0]
        fh.seek(st.st_size // 2)
        fh.write(bytes([byte ^ 0x01]))
    os.utime(h.path, ns=(st.st_atime_ns, st.st_mtime_ns))  # the same identity
    monkeypatch.setattr(snapshots_module, "RECHECK_SECONDS", 0.0)
    checked()
    assert h.writer.damaged
