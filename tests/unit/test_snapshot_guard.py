"""ReplicaStateMachine's snapshot hooks refuse a snapshot whose label is ahead
of its LevelDB. After a fatal apply error PySyncObj keeps counting entries as
applied; a compaction then would label the DB with a later index, and a
restart that restored it would skip the missing entries for good (a review
reproduced it with three in-process members: the restarted one ended with 24
tasks where the others had 34, and no CRITICAL line)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from daemons.core import domain
from daemons.core.errors import StorageCorrupt
from daemons.replica.state_machine import ReplicaStateMachine
from daemons.replica.storage import Storage


def machine(storage: Storage, fatal: Exception | None = None) -> SimpleNamespace:
    return SimpleNamespace(storage=storage, fatal=fatal, spec=SimpleNamespace(id="r1"),
                           snapshots_written=0, _die=lambda exc: None)


@pytest.fixture
def storage(tmp_path):
    store = Storage(str(tmp_path / "db"))
    view = store.view()
    view.put(domain.META_APPLIED, b"22")
    store.commit(view)
    yield store
    store.close()


def header(index: int) -> tuple:
    return (("raft", index), [], {})


def test_a_label_past_the_db_without_a_fatal_error_is_fine(tmp_path, storage):
    """PySyncObj's no-op entries (one per new leader) raise raftLastApplied
    without an apply: the label may be ahead of the stored index. Refusing that
    (as a first version of this guard did) failed every compaction after an
    election until the next write."""
    target = tmp_path / "snapshot"
    ReplicaStateMachine._write_snapshot(machine(storage), str(target), header(23))
    assert Storage.read_header(str(target)) == header(23)


def test_no_snapshot_after_a_fatal_error(tmp_path, storage):
    target = tmp_path / "snapshot"
    with pytest.raises(StorageCorrupt, match="refused after a fatal error"):
        ReplicaStateMachine._write_snapshot(machine(storage, RuntimeError("apply failed")),
                                            str(target), header(32))
    assert not target.exists()


def test_a_snapshot_at_the_db_index_is_written(tmp_path, storage):
    target = tmp_path / "snapshot"
    m = machine(storage)
    ReplicaStateMachine._write_snapshot(m, str(target), header(22))
    assert target.exists() and m.snapshots_written == 1
    assert Storage.read_header(str(target)) == header(22)
