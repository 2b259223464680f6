"""The Raft journal's structure check and the repair of an end torn by a power cut
(daemons/replica/journal_file.py), on journals written by PySyncObj's own FileJournal.

A power cut during the write-back of the last tick can leave the header's end
counting bytes that never reached the disk; each case below is one such
leftover. The repair keeps exactly the whole records before it and a copy of
the original, and PySyncObj then loads the cut journal."""

from __future__ import annotations

import os
import struct

import pytest
from pysyncobj.journal import FileJournal
from pysyncobj.pickle import dumps

from daemons.core.errors import StorageCorrupt
from daemons.replica import journal_file
from daemons.replica.state_machine import check_raft_files

RECORDS = 8


def regular(n: int) -> bytes:
    """A command as PySyncObj journals a @replicated call: type 0, then a pickle."""
    return b"\x00" + dumps((0, (b"batch %d " % n + b"x" * 300,)))


def write_journal(data_dir: str) -> tuple[str, list[tuple[bytes, int, int]]]:
    raft_dir = os.path.join(data_dir, "raft")
    os.makedirs(raft_dir, exist_ok=True)
    path = os.path.join(raft_dir, "journal")
    journal = FileJournal(path)
    entries = [(b"\x01", 1, 1)] + [(regular(i), i, 2) for i in range(2, RECORDS + 1)]
    for entry in entries:
        journal.add(*entry)
    journal._destroy()
    return path, entries


def header_end(path: str) -> int:
    with open(path, "rb") as fh:
        return struct.unpack_from("<I", fh.read(40), 36)[0]


def set_end(fh, end: int) -> None:  # type: ignore[no-untyped-def]
    fh.seek(36)
    fh.write(struct.pack("<I", end))


def loaded(path: str) -> list[tuple[bytes, int, int]]:
    journal = FileJournal(path)
    try:
        return [journal[i] for i in range(len(journal))]
    finally:
        journal._destroy()


def record_start(path: str, number: int) -> int:
    """Byte offset of the journal's `number`-th record (0-based)."""
    with open(path, "rb") as fh:
        data = fh.read()
    pos = 40
    for _ in range(number):
        pos += struct.unpack_from("<I", data, pos)[0] + 8
    return pos


def tear(path: str, kind: str) -> int:
    """Damage the journal as a power cut can; return how many records stay whole."""
    end = header_end(path)
    last = record_start(path, RECORDS - 1)
    with open(path, "r+b") as fh:
        if kind == "appended_record_lost":
            # the tick appended a record and moved the end; only the header arrived
            set_end(fh, end + 400)
            fh.seek(end)
            fh.write(b"\0" * 400)
            return RECORDS
        if kind == "record_cut_off":
            # the end arrived, the last record's second page did not
            fh.seek(last + 100)
            fh.write(b"\0" * (end - last - 100))
            return RECORDS - 1
        if kind == "middle_of_command_lost":
            # both size fields arrived, a page inside the command did not
            fh.seek(last + 30)
            fh.write(b"\0" * 100)
            return RECORDS - 1
        if kind == "file_shorter_than_end":
            # the file's growth (ftruncate) was lost, the end was not
            fh.truncate(last + 50)
            return RECORDS - 1
        if kind == "header_all_zeros":
            # created, records written, and only the header page never arrived
            fh.write(b"\0" * 40)
            return 0
        if kind == "shorter_than_header":
            fh.truncate(12)
            return 0
    raise AssertionError(kind)


TORN = ["appended_record_lost", "record_cut_off", "middle_of_command_lost",
        "file_shorter_than_end", "header_all_zeros", "shorter_than_header"]


@pytest.mark.parametrize("kind", TORN)
def test_a_torn_end_is_refused_at_start_and_repaired_to_its_whole_records(tmp_path, kind):
    data_dir = str(tmp_path / "d")
    path, entries = write_journal(data_dir)
    whole = tear(path, kind)
    with open(path, "rb") as fh:
        torn = fh.read()

    with pytest.raises(StorageCorrupt) as info:
        check_raft_files(data_dir)
    assert path in info.value.message and "--repair-journal" in info.value.message
    assert "data_dir" in info.value.message  # the other way out: resync from the peers

    found, copy = journal_file.repair(path)
    assert found.records == whole and copy is not None
    with open(copy, "rb") as fh:
        assert fh.read() == torn, "the copy is not the original"
    check_raft_files(data_dir)  # now accepted
    assert journal_file.scan(path).whole
    if whole:
        assert loaded(path) == entries[:whole]
    else:  # empty: SyncObj starts it like a new journal
        assert loaded(path) == []


def test_a_whole_journal_is_left_alone(tmp_path):
    path, entries = write_journal(str(tmp_path / "d"))
    with open(path, "rb") as fh:
        before = fh.read()
    found, copy = journal_file.repair(path)
    assert copy is None and found.whole and (found.first, found.last) == (1, RECORDS)
    with open(path, "rb") as fh:
        assert fh.read() == before
    assert os.listdir(os.path.dirname(path)) == ["journal"]
    assert loaded(path) == entries


@pytest.mark.parametrize("header", [b"NOTAJOURNAL!", None], ids=["foreign", "format"])
def test_a_header_that_is_not_torn_is_not_repaired(tmp_path, header):
    """Another file or another format: cutting it would throw away a journal the
    repair does not understand; it is refused and left as it was."""
    data_dir = str(tmp_path / "d")
    path, _ = write_journal(data_dir)
    with open(path, "r+b") as fh:
        if header is None:
            fh.seek(32)
            fh.write(struct.pack("<I", 7))
        else:
            fh.write(header)
    with open(path, "rb") as fh:
        before = fh.read()
    with pytest.raises(StorageCorrupt) as info:
        check_raft_files(data_dir)
    assert "--repair-journal" not in info.value.message
    with pytest.raises(ValueError):
        journal_file.repair(path)
    with open(path, "rb") as fh:
        assert fh.read() == before
    assert os.listdir(os.path.dirname(path)) == ["journal"]


@pytest.mark.parametrize("damage", ["index_gap", "term_goes_back", "unknown_type"])
def test_records_that_cannot_follow_their_predecessor_end_the_whole_part(tmp_path, damage):
    data_dir = str(tmp_path / "d")
    path, entries = write_journal(data_dir)
    last = record_start(path, RECORDS - 1)
    with open(path, "r+b") as fh:
        if damage == "index_gap":
            fh.seek(last + 4)
            fh.write(struct.pack("<Q", RECORDS + 5))
        elif damage == "term_goes_back":
            fh.seek(last + 12)
            fh.write(struct.pack("<Q", 1))
        else:
            fh.seek(last + 20)
            fh.write(b"\x09")
    found = journal_file.scan(path)
    assert found.records == RECORDS - 1 and found.whole_end == last
    assert f"byte {last}" in (found.problem or "")
    journal_file.repair(path)
    assert loaded(path) == entries[:-1]


# ---- a compaction a crash interrupted (journal_file.finish_compaction) ------------------


def test_an_interrupted_compaction_is_finished_at_the_snapshots_entries(tmp_path):
    path, entries = write_journal(str(tmp_path / "d"))
    prev, last = entries[4], entries[5]  # the snapshot's label: entries 5 and 6
    assert journal_file.finish_compaction(path, prev, last) == 4
    assert loaded(path) == entries[4:]  # what PySyncObj's cut would have left
    assert journal_file.scan(path).whole
    assert os.listdir(os.path.dirname(path)) == ["journal"]
    assert journal_file.finish_compaction(path, prev, last) == 0  # done: nothing more


@pytest.mark.parametrize("case", ["other_term", "other_command", "beyond_the_end"])
def test_a_journal_without_the_snapshots_entries_is_left_to_pysyncobj(tmp_path, case):
    """Another history at those indexes (a snapshot installed from a leader),
    or a journal that ends before them: PySyncObj's clear is right there."""
    path, entries = write_journal(str(tmp_path / "d"))
    prev, last = entries[4], entries[5]
    if case == "other_term":
        last = (last[0], last[1], last[2] + 1)
    elif case == "other_command":
        prev = (regular(99), prev[1], prev[2])
    else:
        prev, last = (b"\x01", RECORDS + 3, 2), (b"\x01", RECORDS + 4, 2)
    with open(path, "rb") as fh:
        before = fh.read()
    assert journal_file.finish_compaction(path, prev, last) == 0
    with open(path, "rb") as fh:
        assert fh.read() == before


# ---- compaction by rename (journal_file.compact_by_rename) ------------------------------


def open_journal(path: str):  # type: ignore[no-untyped-def]
    journal = FileJournal(path)
    journal_file.install(journal)
    return journal


def test_compaction_by_rename_keeps_the_entries_after_the_cut_and_appends_after_them(tmp_path):
    path, entries = write_journal(str(tmp_path / "d"))
    journal = open_journal(path)
    journal.deleteEntriesTo(3)  # PySyncObj's call after a snapshot
    assert [journal[i] for i in range(len(journal))] == entries[3:]
    journal.add(regular(RECORDS + 1), RECORDS + 1, 2)
    journal.deleteEntriesFrom(len(journal) - 2)  # and the other journal calls still work
    journal.add(regular(RECORDS + 2), RECORDS, 3)
    expected = entries[3:-1] + [(regular(RECORDS + 2), RECORDS, 3)]
    assert [journal[i] for i in range(len(journal))] == expected
    journal._destroy()
    assert loaded(path) == expected
    assert journal_file.scan(path).whole
    assert sorted(os.listdir(os.path.dirname(path))) == ["journal"]


def test_a_compaction_that_fails_before_the_rename_leaves_the_journal_whole(tmp_path, monkeypatch):
    """Where PySyncObj's in-place rewrite had already cleared the journal, a
    failure (or a kill) part-way leaves the old journal, every entry in it."""
    path, entries = write_journal(str(tmp_path / "d"))
    journal = open_journal(path)
    calls = []

    def failing_add(self, *entry):  # type: ignore[no-untyped-def]
        calls.append(entry)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return original_add(self, *entry)

    original_add = FileJournal.add
    monkeypatch.setattr(FileJournal, "add", failing_add)
    with pytest.raises(OSError):
        journal.deleteEntriesTo(2)
    monkeypatch.setattr(FileJournal, "add", original_add)
    assert [journal[i] for i in range(len(journal))] == entries
    journal._destroy()
    assert loaded(path) == entries
    assert os.listdir(os.path.dirname(path)) == ["journal"]


def _offline_cluster(data_dir: str):  # type: ignore[no-untyped-def]
    """What repair_journal reads of the cluster: the member's data_dir and raft.fsync."""
    from types import SimpleNamespace
    return SimpleNamespace(replica=lambda _id: SimpleNamespace(data_dir=data_dir),
                           raft=SimpleNamespace(fsync=True))


@pytest.mark.parametrize("applied", [RECORDS - 1, RECORDS])
def test_the_repair_refuses_to_cut_entries_leveldb_has_applied(tmp_path, capsys, applied):
    """A torn record that LevelDB applied is not a power cut's tear (entries are
    journalled first): cutting it would leave the member holding effects its log
    lacks, free to reuse the index or lead without it. Found by review: two
    damaged journals repaired, and the members then disagreed without a word."""
    from daemons.replica.applier import EntryApplier
    from daemons.replica.daemon import repair_journal
    from daemons.replica.storage import Storage

    data_dir = str(tmp_path / "d")
    path, _ = write_journal(data_dir)
    whole = tear(path, "record_cut_off")
    storage = Storage(data_dir)
    EntryApplier(storage, 100).apply(applied, [])
    storage.close()
    with open(path, "rb") as fh:
        torn = fh.read()

    if applied <= whole:
        assert repair_journal(_offline_cluster(data_dir), "replica-1") == 0
        assert journal_file.scan(path).whole
        return
    with pytest.raises(StorageCorrupt) as info:
        repair_journal(_offline_cluster(data_dir), "replica-1")
    message = info.value.message
    assert f"applied Raft entries up to index {applied}" in message
    assert f"end at {whole}" in message and "remove its data_dir" in message
    with open(path, "rb") as fh:
        assert fh.read() == torn, "the refused repair changed the journal"
    assert not [f for f in os.listdir(os.path.dirname(path)) if ".torn-" in f]


@pytest.mark.parametrize("content", [b"garbage", b"", dumps([1, 2])])
def test_an_unreadable_term_and_vote_file_is_refused_at_start(tmp_path, content):
    """PySyncObj reads an unreadable journal.meta as {}: term 0 and no vote,
    without a word, and the member could vote twice in one term."""
    data_dir = str(tmp_path / "d")
    path, _ = write_journal(data_dir)
    with open(path + ".meta", "wb") as fh:
        fh.write(dumps({"term": 3, "votedFor": "r2"}))
    check_raft_files(data_dir)  # readable: accepted
    with open(path + ".meta", "wb") as fh:
        fh.write(content)
    with pytest.raises(StorageCorrupt) as info:
        check_raft_files(data_dir)
    assert info.value.message.startswith(path + ".meta: ")
    assert "vote a second time" in info.value.message and "have a leader" in info.value.message
