"""PySyncObj's journal file: the structure check at start, the repair of a torn
end, and log compaction that a crash cannot leave half done (`compact_by_rename`,
`finish_compaction`).

The file (pysyncobj/journal.py, format 1) is a 40-byte header (name 24,
version 8, format 4, end of records 4), then records
`size(4) idx(8) term(8) command size(4)`, written through an mmap: the record
first, then the header's end field. PySyncObj has no checksums and never
syncs; with `raft.fsync: true` (durable_journal.py) a record is synced before
anything that depends on it leaves the process.

A power cut while the pages of the last tick were being written back can
leave any mix of them on disk: the header's end may count records whose bytes
never arrived (zeros, a cut-off record, a file shorter than the end). The
start check refuses such a journal. `repair` cuts it back to its last whole
record: with `raft.fsync: true` nothing after the last completed sync was
acknowledged by this member, so that is safe; without it this member may
lose entries it had acknowledged, which Raft survives only if the other
members still hold them (see the README, "Durability").

A record is whole when its two size fields agree, it fits before the end,
its index follows the previous one, its term does not go back, its command
decodes the way PySyncObj will decode it when it applies the entry (a type
byte, then a pickle for every type but NO_OP), and, for the replica's sealed
entries (entry_seal.py), its CRC-32 matches: a lost page inside a long text
field would otherwise still decode.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import shutil
import struct
import time
from dataclasses import dataclass
from typing import Any

from pysyncobj.pickle import loads

from daemons.core.files import fsync_parent
from daemons.replica import entry_seal

HEADER = 40
MAGIC = b"PYSYNCOBJ"
_END_AT = 36          # offset of the header's "end of records" field
_FORMAT = 1
_NO_OP = 1            # pysyncobj.syncobj._COMMAND_TYPE
_COMMAND_TYPES = range(4)
_RECORD_HEAD = struct.Struct("<IQQ")  # a record's size, then its Raft index and term
COMPACTING = ".compacting"  # beside the journal while a compaction writes its successor


@dataclass(frozen=True)
class JournalScan:
    """What a journal holds: its whole records, and why they stop early if they do."""

    path: str
    size: int               # bytes in the file
    end: int                # where the header says the records end
    whole_end: int          # the byte after the last whole record
    records: int            # whole records
    first: int | None       # Raft index of the first whole record
    last: int | None        # ... and of the last
    last_term: int | None
    problem: str | None     # why the records stop before `end`; None: the journal is whole
    header_problem: str | None = None  # a header no repair can trust (not a torn end)

    @property
    def whole(self) -> bool:
        return self.problem is None and self.header_problem is None


def _command_problem(command: bytes) -> str | None:
    if not command:
        return "an empty command"
    kind = command[0]
    if kind not in _COMMAND_TYPES:
        return f"an unknown command type {kind}"
    if kind == _NO_OP:
        return None  # PySyncObj never reads past the type byte of a no-op
    try:
        call = loads(command[1:])
    except Exception as exc:  # noqa: BLE001 - any failure means PySyncObj would fail too
        return f"a command that does not decode ({type(exc).__name__})"
    # A replicated call is (method id, args); the replica's entries are sealed.
    if isinstance(call, tuple) and len(call) >= 2 and isinstance(call[1], tuple) \
            and len(call[1]) == 1 and entry_seal.is_sealed(call[1][0]):
        try:
            entry_seal.verify(call[1][0])
        except entry_seal.CorruptEntry as exc:
            return f"a sealed entry that is damaged: {exc}"
    return None


def scan(path: str) -> JournalScan:
    """Walk the journal's records (OSError if it cannot be read).

    Mapped, not read: PySyncObj holds every entry in memory as well, and a
    journal can be large (up to compaction_min_entries entries of ~1 MiB)."""
    with open(path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size == 0:
            return _scan(path, b"")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _scan(path, data)


def _scan(path: str, data: bytes | mmap.mmap) -> JournalScan:
    size = len(data)
    header = data[:HEADER]
    if len(header) < HEADER or header.strip(b"\0") == b"":
        # Created, then cut off before its header reached the disk: it never
        # held a record that was synced.
        return JournalScan(path, size, HEADER, HEADER, 0, None, None, None,
                           f"{size} bytes, no header (cut off when it was created)"
                           if size < HEADER else "its header is all zeros")
    if not header.startswith(MAGIC):
        return JournalScan(path, size, HEADER, HEADER, 0, None, None, None, None,
                           "no PySyncObj journal header")
    fmt, end = struct.unpack_from("<II", header, 32)
    if fmt != _FORMAT:
        return JournalScan(path, size, end, HEADER, 0, None, None, None, None,
                           f"unknown journal format {fmt}")
    limit = min(end, size)
    pos, records, first, last, last_term = HEADER, 0, None, None, None
    problem = None
    if end < HEADER:
        problem = f"its header says the records end at byte {end}, inside the header"
    while problem is None and pos < end:
        if pos + 20 > limit:
            problem = f"record at byte {pos} is cut off"
            break
        length, idx, term = _RECORD_HEAD.unpack_from(data, pos)
        if length < 16 or pos + length + 8 > limit:
            problem = (f"record at byte {pos} has an impossible size {length}"
                       if length < 16 or pos + length + 8 > end else
                       f"record at byte {pos} is cut off")
            break
        if data[pos + 4 + length:pos + 8 + length] != data[pos:pos + 4]:
            problem = f"record at byte {pos}: its two size fields differ"
            break
        if last is not None and idx != last + 1:
            problem = f"record at byte {pos} has index {idx} after {last}"
            break
        if last_term is not None and term < last_term:
            problem = f"record at byte {pos} has term {term} after {last_term}"
            break
        why = _command_problem(data[pos + 20:pos + 4 + length])
        if why is not None:
            problem = f"record at byte {pos} (index {idx}) holds {why}"
            break
        if first is None:
            first = idx
        last, last_term = idx, term
        records += 1
        pos += length + 8
    if problem is not None and end > size:
        problem += f" (its records should end at byte {end} but the file has {size} bytes)"
    return JournalScan(path, size, end, pos, records, first, last, last_term, problem)


def _default_header() -> bytes:
    from pysyncobj.journal import APP_NAME, APP_VERSION, NAME_SIZE, VERSION_SIZE
    return (APP_NAME.ljust(NAME_SIZE, b"\0") + APP_VERSION.ljust(VERSION_SIZE, b"\0")
            + struct.pack("<II", _FORMAT, HEADER))


def repair(path: str, found: JournalScan | None = None) -> tuple[JournalScan, str | None]:
    """Cut a torn journal back to its last whole record; return its scan (before
    the cut) and where the original was copied (None: nothing was changed).
    `found`: the journal's scan, if the caller has it.

    The caller holds the data dir's lock. The original is copied first
    (`<journal>.torn-<UTC time>`, synced), then the header's end is moved back
    (or a fresh header written) and the journal synced: a crash in between
    leaves either the original or the cut journal, never a mix.
    """
    if found is None:
        found = scan(path)
    if found.header_problem is not None:
        raise ValueError(found.header_problem)
    if found.problem is None:
        return found, None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    copy = f"{path}.torn-{stamp}"
    shutil.copyfile(path, copy)
    with open(copy, "rb") as fh:
        os.fsync(fh.fileno())
    fsync_parent(copy)
    with open(path, "r+b") as fh:
        head = fh.read(HEADER)
        if len(head) < HEADER or not head.startswith(MAGIC):  # scan's no-header cases
            fh.seek(0)
            fh.write(_default_header())
        fh.seek(_END_AT)
        fh.write(struct.pack("<I", found.whole_end))
        fh.flush()
        os.fsync(fh.fileno())
    return found, copy


def finish_compaction(path: str, prev: tuple, last: tuple,
                      found: JournalScan | None = None) -> int:
    """Complete a log compaction a crash interrupted; return the entries dropped (0: none).

    PySyncObj compacts in two steps: the snapshot, labelled with the last two
    applied entries `prev` and `last`, is put in place, then the journal is cut
    to start at `prev`. A crash between the two leaves the new snapshot and the
    whole journal; at the next start PySyncObj, not finding `prev` and `last`
    at the journal's start, clears the journal entirely, and with it the
    entries after `last` this member had appended and acknowledged (its
    LevelDB has applied some of them, so the indexes then get reused: the
    replica stops). Cutting the journal to start at `prev` is the step the
    crash skipped. The cut journal is written beside it, synced and renamed
    over it: a crash meanwhile leaves the old one. `found`: the journal's
    scan, if the caller has it.
    """
    if found is None:
        found = scan(path)
    if not found.whole or found.first is None or found.first >= prev[1]:
        return 0
    with open(path, "rb") as fh:
        data = fh.read()
    # The journal is whole (scanned above) and starts before prev: walk to it.
    pos, dropped = HEADER, 0
    while pos < found.whole_end:
        length, idx, _ = _RECORD_HEAD.unpack_from(data, pos)
        if idx == prev[1]:
            break
        pos += length + 8
        dropped += 1
    entries, at = [], pos
    while at < found.whole_end and len(entries) < 2:
        length, idx, term = _RECORD_HEAD.unpack_from(data, at)
        entries.append((bytes(data[at + 20:at + 4 + length]), idx, term))
        at += length + 8
    if entries != [tuple(prev), tuple(last)]:
        return 0  # not there, or another history at those indexes: PySyncObj's clear is right
    body = data[pos:found.whole_end]
    tmp = path + COMPACTING
    with open(tmp, "wb") as out:
        out.write(data[:_END_AT] + struct.pack("<I", HEADER + len(body)) + body)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    fsync_parent(path)
    return dropped


def compact_by_rename(journal: Any, entry_to: int) -> None:
    """`FileJournal.deleteEntriesTo`, atomically: what `install` puts in its place.

    PySyncObj compacts by rewriting the journal in place: it sets the end back
    to the header, then appends the kept entries again from the first byte. A
    kill -9, not only a power cut, in the middle of that leaves a journal
    without some of the entries after the snapshot, which this member had
    acknowledged (a few ms every `compaction_min_entries` entries). Here the
    kept entries are written to `journal.compacting`, synced, and renamed over
    the journal (directory synced): a crash leaves the old journal whole, or the
    new one. A failure before the rename leaves the journal as it was and the
    compaction undone (PySyncObj logs the error; the next start finishes it,
    see finish_compaction).
    """
    from pysyncobj.journal import FileJournal, ResizableFile

    current = journal._FileJournal__journalFile  # noqa: SLF001 - see the module doc
    path = current._ResizableFile__fileName  # noqa: SLF001
    kept = journal._FileJournal__journal[entry_to:]  # noqa: SLF001
    tmp = path + COMPACTING
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fresh = FileJournal(tmp)
    try:
        for entry in kept:
            FileJournal.add(fresh, *entry)
        fresh_file = fresh._FileJournal__journalFile  # noqa: SLF001
        fresh_file.flush()
        os.fsync(fresh_file._ResizableFile__f.fileno())  # noqa: SLF001
        offset = fresh._FileJournal__currentOffset  # noqa: SLF001
    except BaseException:
        fresh._destroy()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fresh._destroy()
    os.replace(tmp, path)
    journal._FileJournal__journalFile = ResizableFile(path)  # noqa: SLF001
    journal._FileJournal__journal = list(kept)  # noqa: SLF001
    journal._FileJournal__currentOffset = offset  # noqa: SLF001
    current._destroy()  # the old, unlinked file
    fsync_parent(path)


def install(journal: Any) -> None:
    """Make a FileJournal compact by rename (compact_by_rename); idempotent."""
    if getattr(journal, "_tarefa_compacts_by_rename", False):
        return
    journal.deleteEntriesTo = lambda entry_to: compact_by_rename(journal, entry_to)
    journal._tarefa_compacts_by_rename = True
