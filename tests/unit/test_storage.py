"""Storage (daemons/replica/storage.py): reads, paging, snapshots and corruption handling."""

from __future__ import annotations

import glob
import os
import struct
import time

import pytest

from daemons.core import domain
from daemons.core.errors import StorageCorrupt
from daemons.replica.storage import META_RESTORING, SNAPSHOT_MAGIC, Storage

HEADER = (("raft", 41), ["cluster", "config"], {"term": 7})


def open_storage(tmp_path, name: str) -> Storage:
    return Storage(str(tmp_path / name))


@pytest.fixture
def store(tmp_path):
    s = open_storage(tmp_path, "a")
    yield s
    s.close()


@pytest.fixture
def other(tmp_path):
    s = open_storage(tmp_path, "b")
    yield s
    s.close()


def write(store: Storage, pairs: dict[bytes, bytes | None]) -> None:
    view = store.view()
    for key, value in pairs.items():
        if value is None:
            view.delete(key)
        else:
            view.put(key, value)
    store.commit(view)


def fill(store: Storage) -> dict[bytes, bytes]:
    pairs = {domain.META_APPLIED: b"41", domain.META_REVISION: b"17",
             domain.log_key(41): b'["r"]', domain.request_key("r"): b'{"ok":true}'}
    for cid in ("1", "12", "100"):
        pairs[domain.client_key(cid)] = b'{"cid":"%s"}' % cid.encode()
        for i in range(5):
            pairs[domain.task_key(cid, f"task/{i}")] = b"v" * i + b"\x00\xff"
    pairs[domain.task_key("1", "🚀")] = "é".encode() * 3
    write(store, pairs)
    return pairs


def everything(store: Storage) -> dict[bytes, bytes]:
    return dict(store.items())


# ---- basic reads and writes --------------------------------------------------------


def test_empty_store(store):
    assert store.applied_index() == 0 and store.revision() == 0
    assert store.read(b"c/00011") == (None, 0)
    assert everything(store) == {}


def test_read_returns_value_and_revision(store):
    write(store, {b"c/00011": b"one", domain.META_REVISION: b"9", domain.META_APPLIED: b"12"})
    assert store.read(b"c/00011") == (b"one", 9)
    assert store.read(b"c/00012") == (None, 9)
    assert store.applied_index() == 12 and store.revision() == 9
    write(store, {b"c/00011": None, domain.META_REVISION: b"10"})
    assert store.read(b"c/00011") == (None, 10)


def test_batch_view_reads_its_own_pending_writes(store):
    write(store, {b"t/00011/a": b"1", b"t/00011/b": b"2", b"t/000212/a": b"x"})
    view = store.view()
    view.delete(b"t/00011/a")
    view.put(b"t/00011/c", b"3")
    assert view.get(b"t/00011/a") is None and view.get(b"t/00011/c") == b"3"
    assert view.keys_with_prefix(b"t/00011/") == [b"t/00011/b", b"t/00011/c"]
    assert store.get(b"t/00011/a") == b"1"  # nothing written until commit
    store.commit(view)
    assert everything(store) == {b"t/00011/b": b"2", b"t/00011/c": b"3", b"t/000212/a": b"x"}


# ---- paging -----------------------------------------------------------------------------


@pytest.fixture
def tasks(store):
    # client 1 has 7 tasks; clients 12 and 2 surround it in key order.
    pairs = {domain.META_REVISION: b"30"}
    for cid in ("2", "12"):
        pairs[domain.task_key(cid, "x")] = b"pending"
    titles = ["a", "a/b", "b", "c", "d", "e", "🚀"]
    for i, title in enumerate(titles):
        pairs[domain.task_key("1", title)] = b"done" if i % 2 else b"pending"
    write(store, pairs)
    return [domain.task_key("1", t) for t in titles]


def test_page_walks_a_prefix_with_start_after_and_limit(store, tasks):
    prefix = domain.task_prefix("1")
    seen, start, pages = [], None, 0
    while True:
        pairs, more, revision = store.page(prefix, start, 3)
        assert revision == 30
        assert len(pairs) <= 3
        pages += 1
        seen.extend(key for key, _ in pairs)
        if not more:
            break
        start = pairs[-1][0]
    assert seen == tasks
    assert pages == 3


def test_page_more_is_exact(store, tasks):
    prefix = domain.task_prefix("1")
    pairs, more, _ = store.page(prefix, None, 7)
    assert [k for k, _ in pairs] == tasks and more is False
    pairs, more, _ = store.page(prefix, None, 6)
    assert [k for k, _ in pairs] == tasks[:6] and more is True
    pairs, more, _ = store.page(prefix, tasks[5], 1)
    assert [k for k, _ in pairs] == tasks[6:] and more is False
    pairs, more, _ = store.page(prefix, tasks[-1], 5)
    assert pairs == [] and more is False


def test_page_is_bounded_by_bytes_but_never_empty(store, tasks):
    prefix = domain.task_prefix("1")
    # values are b"pending" (7 bytes) or b"done" (4): 7 + 4 = 11 fits in 12, + 7 does not
    pairs, more, _ = store.page(prefix, None, 100, max_bytes=12)
    assert [k for k, _ in pairs] == tasks[:2] and more is True
    pairs, more, _ = store.page(prefix, None, 100, max_bytes=1)  # one pair even so
    assert [k for k, _ in pairs] == tasks[:1] and more is True
    pairs, more, _ = store.page(prefix, None, 100, max_bytes=10_000)
    assert [k for k, _ in pairs] == tasks and more is False


def test_page_does_not_leak_into_neighbouring_prefixes(store, tasks):
    prefix = domain.task_prefix("1")
    pairs, more, _ = store.page(prefix, tasks[-1], 10)
    assert pairs == [] and not more
    for _, value in store.page(prefix, None, 100)[0]:
        assert value in (b"done", b"pending")
    assert len(store.page(prefix, None, 100)[0]) == len(tasks)
    assert store.page(domain.task_prefix("12"), None, 10)[0] == [
        (domain.task_key("12", "x"), b"pending")]


def test_page_keep_filter(store, tasks):
    prefix = domain.task_prefix("1")
    done = [k for i, k in enumerate(tasks) if i % 2]
    keep = lambda value: value == b"done"  # noqa: E731
    pairs, more, _ = store.page(prefix, None, 2, keep)
    assert [k for k, _ in pairs] == done[:2] and more is True
    pairs, more, _ = store.page(prefix, pairs[-1][0], 2, keep)
    # one "done" task left; `more` must not count the rejected pending ones after it
    assert [k for k, _ in pairs] == done[2:] and more is False
    assert all(v == b"done" for _, v in pairs)


def test_page_revision_and_records_come_from_one_snapshot(store, tasks):
    pairs, _, revision = store.page(domain.task_prefix("1"), None, 100)
    assert revision == 30 and len(pairs) == 7


# ---- snapshots ---------------------------------------------------------------------


def test_dump_then_restore_gives_identical_digest(tmp_path, store, other):
    pairs = fill(store)
    filename = str(tmp_path / "snap")
    assert store.dump(filename, HEADER) == len(pairs)
    assert Storage.read_header(filename) == HEADER
    assert other.digest() != store.digest()
    other.restore(filename)
    assert other.digest() == store.digest()
    assert everything(other) == pairs
    assert other.applied_index() == 41 and other.revision() == 17
    assert other.get(META_RESTORING) is None


def test_digest_differs_when_any_value_differs(store, other):
    fill(store)
    fill(other)
    assert store.digest() == other.digest()
    write(other, {domain.task_key("1", "task/1"): b"changed"})
    assert store.digest() != other.digest()


def test_restore_removes_keys_the_snapshot_does_not_have(tmp_path, store, other):
    fill(store)
    filename = str(tmp_path / "snap")
    store.dump(filename, HEADER)
    write(other, {domain.client_key("999"): b"stale", domain.task_key("999", "x"): b"stale",
                  domain.META_APPLIED: b"3", b"m/req/old": b"{}", b"zzz": b"1", b"\x00": b"0"})
    other.restore(filename)
    assert other.digest() == store.digest()
    assert other.get(domain.client_key("999")) is None
    assert other.get(b"zzz") is None and other.get(b"\x00") is None


def test_restore_of_an_empty_snapshot_empties_the_db(tmp_path, store, other):
    filename = str(tmp_path / "snap")
    assert store.dump(filename, HEADER) == 0
    fill(other)
    other.restore(filename)
    assert everything(other) == {}


def test_restore_many_keys_across_write_batches(tmp_path, store, other):
    write(store, {b"k%06d" % i: b"%d" % i for i in range(25_000)})
    write(other, {b"j%06d" % i: b"x" for i in range(12_000)})
    filename = str(tmp_path / "snap")
    store.dump(filename, HEADER)
    other.restore(filename)
    assert other.digest() == store.digest()


@pytest.mark.parametrize("keys", [1, 4095, 4096, 4097, 8192])
def test_dump_blocks_end_exactly(tmp_path, store, other, keys):
    """Pairs are written in blocks of 4096: a dump ending on, before or after a
    block boundary reads back whole, from a foreground and a background dump."""
    write(store, {b"k%06d" % i: b"v%d" % i for i in range(keys)})
    foreground, background = str(tmp_path / "fg"), str(tmp_path / "bg")
    assert store.dump(foreground, HEADER) == keys
    dump = store.start_dump(background, HEADER)
    deadline = time.monotonic() + 20
    while dump.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert dump.finish() == keys
    with open(foreground, "rb") as a, open(background, "rb") as b:
        assert a.read() == b.read()
    other.restore(background)
    assert other.digest() == store.digest()


def _snapshot(tmp_path, store) -> tuple[str, bytes]:
    fill(store)
    filename = str(tmp_path / "snap")
    store.dump(filename, HEADER)
    with open(filename, "rb") as f:
        return filename, f.read()


def _header_end(data: bytes) -> int:
    (size,) = struct.unpack(">I", data[len(SNAPSHOT_MAGIC):len(SNAPSHOT_MAGIC) + 4])
    return len(SNAPSHOT_MAGIC) + 4 + size


@pytest.mark.parametrize("keep", [0.25, 0.5, 0.9, -1, -32, -33])
def test_truncated_snapshot_is_refused_before_the_db_is_touched(tmp_path, store, other, keep):
    filename, data = _snapshot(tmp_path, store)
    cut = int(len(data) * keep) if keep > 0 else len(data) + keep
    bad = str(tmp_path / "bad")
    with open(bad, "wb") as f:
        f.write(data[:cut])
    write(other, {b"mine": b"1", domain.META_APPLIED: b"5"})
    digest = other.digest()
    with pytest.raises(StorageCorrupt, match="bad"):
        other.restore(bad)
    assert other.digest() == digest
    assert other.get(META_RESTORING) is None and other.applied_index() == 5


def test_flipped_byte_in_the_records_or_checksum_is_refused_before_the_db_is_touched(
        tmp_path, store, other):
    filename, data = _snapshot(tmp_path, store)
    write(other, {b"mine": b"1", domain.META_APPLIED: b"5"})
    digest = other.digest()
    body = _header_end(data)
    # every byte of the records and the checksum, except the end marker's unused length
    marker = len(data) - 32 - 8
    positions = [i for i in range(body, len(data)) if not marker + 4 <= i < marker + 8]
    bad = str(tmp_path / "bad")
    for i in positions:
        corrupted = bytearray(data)
        corrupted[i] ^= 0x01
        with open(bad, "wb") as f:
            f.write(corrupted)
        with pytest.raises(StorageCorrupt):
            other.restore(bad)
        assert other.digest() == digest, f"DB modified by a snapshot with byte {i} flipped"
    assert other.applied_index() == 5


def test_flipped_byte_in_the_header_is_detected(tmp_path, store, other):
    """The header carries PySyncObj's Raft state (its index, term, membership);
    a corrupted header must not be accepted silently any more than a record."""
    filename, data = _snapshot(tmp_path, store)
    bad = str(tmp_path / "bad")
    silently_accepted = []
    for i in range(0, _header_end(data)):
        corrupted = bytearray(data)
        corrupted[i] ^= 0x01
        with open(bad, "wb") as f:
            f.write(corrupted)
        try:
            header = Storage.read_header(bad)
            other.restore(bad)
        except StorageCorrupt:
            continue
        except Exception:  # noqa: BLE001 - an unpickling error is detection too
            continue
        if header != HEADER:
            silently_accepted.append((i, header))
    assert silently_accepted == [], (
        f"{len(silently_accepted)} single-byte corruptions changed the snapshot header and "
        f"were accepted, e.g. {silently_accepted[:3]} instead of {HEADER}")


def test_not_a_snapshot(tmp_path, other):
    bad = tmp_path / "bad"
    bad.write_bytes(b"hello world, not a snapshot at all" * 10)
    with pytest.raises(StorageCorrupt, match="not a Tarefa snapshot"):
        Storage.read_header(str(bad))


def test_applied_index_is_zero_while_restoring_marker_is_present(store):
    write(store, {domain.META_APPLIED: b"41", domain.META_REVISION: b"17"})
    assert store.applied_index() == 41
    write(store, {META_RESTORING: b"1"})
    assert store.applied_index() == 0
    assert store.revision() == 17
    write(store, {META_RESTORING: None})
    assert store.applied_index() == 41


def test_an_interrupted_restore_is_visible_after_reopening(tmp_path, store):
    write(store, {domain.META_APPLIED: b"41", META_RESTORING: b"1"})
    store.close()
    reopened = open_storage(tmp_path, "a")
    try:
        assert reopened.applied_index() == 0
    finally:
        reopened.close()


# ---- opening ----------------------------------------------------------------------------


def test_data_survives_close_and_reopen(tmp_path, store):
    pairs = fill(store)
    digest = store.digest()
    store.close()
    reopened = open_storage(tmp_path, "a")
    try:
        assert everything(reopened) == pairs and reopened.digest() == digest
    finally:
        reopened.close()


@pytest.mark.parametrize("victim", ["CURRENT", "MANIFEST-*"])
def test_corrupted_leveldb_files_raise_storage_corrupt_with_the_path(tmp_path, victim):
    path = str(tmp_path / "db")
    s = Storage(path)
    write(s, {b"k%03d" % i: b"v" * 100 for i in range(100)})
    s.close()
    files = glob.glob(os.path.join(path, victim))
    assert files, os.listdir(path)
    for name in files:
        with open(name, "wb") as f:
            f.write(b"\x00garbage\xff" * 64)
    with pytest.raises(StorageCorrupt) as info:
        Storage(path)
    assert path in info.value.message
    assert info.value.code == "DATA_LOSS"


# ---- damaged LevelDB files: refused, never silently replaced or served --------------------


def _tables_with_random_values(path: str, count: int = 200) -> dict[bytes, bytes]:
    """A closed DB whose pairs live in .ldb tables (random values: stored uncompressed)."""
    pairs = {b"k%04d" % i: os.urandom(200) for i in range(count)}
    s = Storage(path)
    write(s, pairs)
    s.close()
    Storage(path).close()  # reopening turns the write-ahead log into a table
    assert glob.glob(os.path.join(path, "*.ldb")), os.listdir(path)
    return pairs


def test_missing_current_beside_leveldb_files_is_refused_not_recreated(tmp_path):
    path = str(tmp_path / "db")
    _tables_with_random_values(path)
    os.remove(os.path.join(path, "CURRENT"))
    before = sorted(os.listdir(path))
    with pytest.raises(StorageCorrupt) as info:
        Storage(path)
    assert path in info.value.message and "CURRENT" in info.value.message
    assert sorted(os.listdir(path)) == before  # no new, empty database was created


def test_a_directory_without_leveldb_files_gets_a_new_database(tmp_path):
    path = str(tmp_path / "db")
    os.makedirs(os.path.join(path, "raft"))  # the Raft files live beside LevelDB's
    for name in ("LOCK", "LOG"):  # left by an open attempt that never created the DB
        open(os.path.join(path, name), "wb").close()
    s = Storage(path)
    try:
        assert s.applied_index() == 0 and everything(s) == {}
    finally:
        s.close()


def test_truncated_table_is_refused_at_open_with_the_path(tmp_path):
    path = str(tmp_path / "db")
    _tables_with_random_values(path)
    table = max(glob.glob(os.path.join(path, "*.ldb")), key=os.path.getsize)
    with open(table, "r+b") as fh:
        fh.truncate(os.path.getsize(table) // 2)
    with pytest.raises(StorageCorrupt) as info:
        Storage(path)
    assert path in info.value.message and info.value.code == "DATA_LOSS"


def _flip_a_value_byte(path: str, pairs: dict[bytes, bytes]) -> bytes:
    """Flip one byte inside a stored value; return that value's key."""
    table = max(glob.glob(os.path.join(path, "*.ldb")), key=os.path.getsize)
    with open(table, "rb") as fh:
        content = fh.read()
    for key, value in pairs.items():
        at = content.find(value)
        if at >= 0:
            with open(table, "r+b") as fh:
                fh.seek(at + 100)
                fh.write(bytes([content[at + 100] ^ 0x01]))
            return key
    raise AssertionError("no value found verbatim in the table")


def test_flipped_table_byte_is_refused_at_open(tmp_path):
    path = str(tmp_path / "db")
    _flip_a_value_byte(path, _tables_with_random_values(path))
    with pytest.raises(StorageCorrupt) as info:
        Storage(path)
    assert path in info.value.message and "checksum" in info.value.message


def test_flipped_table_byte_is_never_served_by_any_read(tmp_path):
    path = str(tmp_path / "db")
    key = _flip_a_value_byte(path, _tables_with_random_values(path))
    reported: list[StorageCorrupt] = []
    s = Storage(path, on_corrupt=reported.append, verify=False)
    try:
        reads = [lambda: s.get(key), lambda: s.read(key), lambda: everything(s),
                 lambda: s.page(b"k", None, 1000), lambda: s.view().get(key),
                 lambda: s.view().keys_with_prefix(b"k"), s.digest, s.verify]
        for read in reads:
            with pytest.raises(StorageCorrupt) as info:
                read()
            assert path in info.value.message
        assert len(reported) == 1 and path in reported[0].message  # told once
    finally:
        s.close()


def test_undamaged_store_opens_with_the_checksum_scan(tmp_path):
    path = str(tmp_path / "db")
    pairs = _tables_with_random_values(path)
    s = Storage(path)
    try:
        assert s.verify() == len(pairs) and everything(s) == pairs
    finally:
        s.close()


# ---- Raft files at start (state_machine.check_raft_files) ---------------------------------


def _journal(data_dir: str, first: int = 1, count: int = 6) -> str:
    from pysyncobj.journal import FileJournal
    raft_dir = os.path.join(data_dir, "raft")
    os.makedirs(raft_dir, exist_ok=True)
    path = os.path.join(raft_dir, "journal")
    journal = FileJournal(path)
    for idx in range(1, first + count):
        journal.add(b"\x01" + b"command %d" % idx, idx, 1)
    if first > 1:  # what log compaction leaves
        journal.deleteEntriesTo(first - 1)
    journal._destroy()
    return path


def test_intact_journal_and_no_journal_pass(tmp_path):
    from daemons.replica.state_machine import check_raft_files
    check_raft_files(str(tmp_path / "none"))
    _journal(str(tmp_path / "d"))
    check_raft_files(str(tmp_path / "d"))


@pytest.mark.parametrize("damage", ["emptied", "half", "header", "record_size"])
def test_damaged_journal_is_refused_naming_it(tmp_path, damage):
    from daemons.replica.state_machine import check_raft_files
    data_dir = str(tmp_path / "d")
    path = _journal(data_dir)
    end = struct.unpack_from("<I", open(path, "rb").read(40), 36)[0]
    with open(path, "r+b") as fh:
        if damage == "emptied":
            fh.truncate(0)
        elif damage == "half":
            fh.truncate(end // 2)
        elif damage == "header":
            fh.write(b"garbage!")
        else:
            fh.seek(40)
            fh.write(struct.pack("<I", 10_000))
    with pytest.raises(StorageCorrupt) as info:
        check_raft_files(data_dir)
    assert path in info.value.message and "data_dir" in info.value.message


def test_compacted_journal_without_its_snapshot_is_refused_naming_the_snapshot(tmp_path):
    from daemons.replica.state_machine import check_raft_files
    data_dir = str(tmp_path / "d")
    _journal(data_dir, first=5)
    snapshot = os.path.join(data_dir, "raft", "snapshot")
    with pytest.raises(StorageCorrupt) as info:
        check_raft_files(data_dir)
    assert snapshot in info.value.message and "missing" in info.value.message
    open(snapshot, "wb").close()  # present: PySyncObj and _read_snapshot take it from here
    check_raft_files(data_dir)


def test_a_half_restored_db_is_not_read(tmp_path, store, other):
    """A restore cut short by a crash leaves the marker: reads answer UNAVAILABLE
    (the service's Get/Scan) until the restore is redone, instead of serving a DB
    with only part of the snapshot in it."""
    from daemons.core.errors import Unavailable
    fill(store)
    filename = str(tmp_path / "snap")
    store.dump(filename, HEADER)
    fill(other)
    path = other.path
    other._db.put(META_RESTORING, b"1")  # what a crash mid-restore leaves
    other.close()
    reopened = Storage(path)
    try:
        key = domain.client_key("1")
        with pytest.raises(Unavailable, match="restoring a snapshot"):
            reopened.read(key)
        with pytest.raises(Unavailable):
            reopened.page(domain.TASK_PREFIX, None, 10)
        reopened.restore(filename)
        assert reopened.read(key)[0] == store.read(key)[0]
        assert reopened.page(domain.TASK_PREFIX, None, 10)[0]
    finally:
        reopened.close()


def test_a_read_that_overlaps_a_restore_is_refused(tmp_path, store, other):
    from daemons.core.errors import Unavailable
    fill(store)
    filename = str(tmp_path / "snap")
    store.dump(filename, HEADER)
    original = other._restore_pairs
    during: list = []

    def restore_and_read(name: str, tick) -> None:  # type: ignore[no-untyped-def]
        original(name, tick)  # the DB is whole again, but the generation moved meanwhile
        try:
            other.read(domain.client_key("1"))
        except Unavailable as exc:
            during.append(exc)

    other._restore_pairs = restore_and_read  # type: ignore[method-assign]
    other.restore(filename)
    assert len(during) == 1  # refused while the restore was still in progress
    other.read(domain.client_key("1"))  # fine once it finished


def test_a_snapshot_length_field_damaged_to_gigabytes_is_refused_without_reading_them(tmp_path):
    """Found by review: file.read(n) allocates n bytes before reading, so a
    flipped high bit in a record's length asked for up to 8 GiB (MemoryError,
    not StorageCorrupt, on a small machine)."""
    import struct

    from daemons.core.errors import StorageCorrupt
    from daemons.replica import storage as storage_module

    store = Storage(str(tmp_path / "db"))
    view = store.view()
    view.put(b"t/a", b"1")
    store.commit(view)
    path = str(tmp_path / "snap")
    store.dump(path, ("header",))
    store.close()
    raw = bytearray(open(path, "rb").read())
    header = len(storage_module.SNAPSHOT_MAGIC)
    (size,) = struct.unpack(">I", raw[header:header + 4])
    first = header + 4 + size  # the first record's lengths
    raw[first:first + 4] = struct.pack(">I", 0x7FFFFFF0)
    open(path, "wb").write(bytes(raw))
    class SmallMachine:  # a file whose read(n) allocates n bytes, as CPython's does
        def __init__(self, *args):  # type: ignore[no-untyped-def]
            self.f = open(*args)

        def read(self, n: int) -> bytes:
            if n > 2**30:
                raise MemoryError(f"cannot allocate {n} bytes")
            return self.f.read(n)

        def __getattr__(self, name):  # type: ignore[no-untyped-def]
            return getattr(self.f, name)

        def __enter__(self):  # type: ignore[no-untyped-def]
            return self

        def __exit__(self, *exc):  # type: ignore[no-untyped-def]
            self.f.close()

    storage_module.open = SmallMachine  # type: ignore[attr-defined]
    try:
        with pytest.raises(StorageCorrupt, match="truncated snapshot"):
            list(Storage.snapshot_pairs(path))  # what a restore reads, pair by pair
        # The check reads the file in chunks, lengths unread: the checksum fails.
        with pytest.raises(StorageCorrupt, match="checksum mismatch"):
            Storage.verify_snapshot(path)
    finally:
        del storage_module.open  # type: ignore[attr-defined]


def test_every_flipped_bit_and_every_truncation_of_a_snapshot_is_refused(tmp_path):
    """verify_snapshot hashes the file in chunks without walking its records;
    the length field before the header, which the checksum does not cover,
    must not let a damaged file through either."""
    from daemons.core.errors import StorageCorrupt

    store = Storage(str(tmp_path / "db"))
    view = store.view()
    for i in range(20):  # more bytes after the header than its length field's bits span
        view.put(b"t/%d" % i, b"value %d" % i)
    store.commit(view)
    path = str(tmp_path / "snap")
    store.dump(path, ("header", 42))
    store.close()
    good = open(path, "rb").read()
    Storage.verify_snapshot(path)
    seen = []

    def refused(data: bytes) -> bool:
        with open(path, "wb") as f:
            f.write(data)
        try:
            Storage.verify_snapshot(path, lambda: seen.append(1))
        except StorageCorrupt:
            return True
        return False

    passed = [(i, bit) for i in range(len(good)) for bit in (1, 2, 4, 8, 16, 32, 64, 128)
              if not refused(good[:i] + bytes([good[i] ^ bit]) + good[i + 1:])]
    assert passed == []
    assert [n for n in range(len(good)) if not refused(good[:n])] == []
    assert not refused(good + b"") and seen  # the intact file passes, with progress calls


def test_a_damaged_header_is_never_unpickled(tmp_path, monkeypatch):
    """Found by review: the check unpickled the header before comparing the
    checksum, and one changed byte (EMPTY_DICT to LONG_BINPUT) made CPython's
    unpickler zero-fill a 2.3 GB memo, holding the GIL for seconds."""
    from daemons.core.errors import StorageCorrupt
    from daemons.replica import storage as storage_module

    store = Storage(str(tmp_path / "db"))
    view = store.view()
    view.put(b"t/a", b"1")
    store.commit(view)
    path = str(tmp_path / "snap")
    store.dump(path, ("header", {}))
    store.close()
    raw = bytearray(open(path, "rb").read())
    at = raw.index(b"}", len(storage_module.SNAPSHOT_MAGIC) + 4)
    raw[at:at + 1] = b"r"
    open(path, "wb").write(bytes(raw))
    unpickled = []
    real = storage_module.pickle.Unpickler
    monkeypatch.setattr(storage_module.pickle, "Unpickler",
                        lambda f: unpickled.append(f) or real(f))
    with pytest.raises(StorageCorrupt, match="checksum mismatch"):
        Storage.verify_snapshot(path)
    assert unpickled == []
