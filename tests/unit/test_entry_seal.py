"""Sealed Raft entries (daemons/replica/entry_seal.py): a CRC-32 over every
entry's commands, checked before a member applies it and by the journal's
start check — a lost page inside a description still unpickles, as other
text, so without it a torn or rotten journal could be applied as a different
write on one member. Entries of older journals (apply_batch) still apply."""

from __future__ import annotations

import os
import struct
import zlib

import pytest
from pysyncobj.pickle import dumps

from daemons.replica import entry_seal, journal_file
from daemons.replica.state_machine import ReplicaStateMachine
from tests.unit.test_journal_file import record_start
from tests.unit.test_log_replication import member

CID = "123456789"


def commands(n: int = 3, description: str = "d") -> list[dict]:
    return [{"op": "create_client", "request_id": f"req-{CID}-{i}", "cid": f"{CID}{i}",
             "data": "{}", "at": "2026-11-28T00:00:00Z", "description": description}
            for i in range(n)]


def test_round_trip_and_every_flipped_byte_is_caught():
    cmds = commands()
    blob = entry_seal.seal(cmds)
    assert entry_seal.is_sealed(blob) and entry_seal.unseal(blob) == cmds
    for at in range(len(entry_seal.MAGIC), len(blob)):
        damaged = bytearray(blob)
        damaged[at] ^= 0x10
        with pytest.raises(entry_seal.CorruptEntry):
            entry_seal.unseal(bytes(damaged))
    with pytest.raises(entry_seal.CorruptEntry):
        entry_seal.unseal(dumps(cmds))  # not sealed at all


def test_a_lost_page_in_a_description_is_what_the_seal_catches():
    """The case that made the seal necessary: zeros where a page of a long
    string was still unpickle (to another string); only the CRC tells."""
    blob = entry_seal.seal(commands(1, description="x" * 20_000))
    damaged = blob[:8000] + b"\0" * 4096 + blob[12096:]
    import pickle
    body = pickle.loads(damaged[len(entry_seal.MAGIC) + 4:])
    assert body[0]["description"] != "x" * 20_000  # decodes, as other text
    with pytest.raises(entry_seal.CorruptEntry, match="CRC-32"):
        entry_seal.unseal(damaged)


@pytest.fixture
def sm(tmp_path):
    yield from member(tmp_path, {})


def journalled(sm: ReplicaStateMachine, method: str, arg: object) -> bytes:
    """A command as PySyncObj journals a call of `method` (type REGULAR)."""
    return b"\x00" + dumps((sm._methodToID[sm._getFuncName(method)], (arg,)))


def deliver(sm: ReplicaStateMachine, command: bytes) -> None:
    """Append `command` as entry 2 from the leader, committed, and tick to apply it."""
    sm._SyncObj__onMessageReceived(sm.leader_node, {  # type: ignore[attr-defined]
        "type": "append_entries", "term": 1, "commit_index": 2,
        "prevLogIdx": 1, "prevLogTerm": 0, "entries": [(command, 2, 1)]})
    sm._onTick(0.0)


def test_method_ids_keep_older_journals_readable(sm):
    # An older journal's entries name apply_batch by its number: it must not move.
    assert [sm._methodToID[sm._getFuncName(m)] for m in ("apply_batch", "apply_sealed")] == [0, 1]


@pytest.mark.parametrize("method", ["apply_sealed", "apply_batch"])
def test_a_sealed_entry_and_an_older_unsealed_one_both_apply(sm, method):
    cmds = commands()
    deliver(sm, journalled(sm, method, entry_seal.seal(cmds) if method == "apply_sealed"
                           else cmds))
    assert not sm.fatal_errors
    assert sm.storage.applied_index() == 2
    assert sm.storage.revision() == 3


def test_a_damaged_sealed_entry_stops_the_member_before_anything_is_applied(sm):
    blob = bytearray(entry_seal.seal(commands()))
    blob[-5] ^= 0x01
    deliver(sm, journalled(sm, "apply_sealed", bytes(blob)))
    assert len(sm.fatal_errors) == 1
    assert "Raft entry 2 is damaged" in str(sm.fatal_errors[0])
    assert sm.storage.applied_index() < 2 and sm.storage.revision() == 0


def test_the_start_check_verifies_sealed_records(tmp_path):
    """The journal's start check (journal_file) checks the seal of every record,
    so a damaged one is cut by --repair-journal instead of failing at apply."""
    from pysyncobj.journal import FileJournal
    os.makedirs(tmp_path / "raft")
    path = str(tmp_path / "raft" / "journal")
    journal = FileJournal(path)
    for index in range(1, 4):
        blob = entry_seal.seal(commands(1, description="y" * 9000))
        journal.add(b"\x00" + dumps((1, (blob,))), index, 1)
    journal._destroy()
    assert journal_file.scan(path).whole
    last = record_start(path, 2)
    with open(path, "r+b") as fh:
        fh.seek(last + 3000)
        fh.write(b"\0" * 4096)  # inside the description: still unpickles
        fh.seek(last)
        size = struct.unpack("<I", fh.read(4))[0]
    assert size > 3000 + 4096
    found = journal_file.scan(path)
    assert found.records == 2 and "CRC-32" in (found.problem or ""), found


def test_a_legacy_sealed_entry_still_applies_and_stores_results_without_index():
    cmds = [{"op": "create_client", "cid": "1"}]
    blob = entry_seal.seal(cmds)
    legacy = entry_seal.LEGACY_MAGIC + blob[len(entry_seal.MAGIC):]
    assert entry_seal.results_indexed(blob) and not entry_seal.results_indexed(legacy)
    with pytest.raises(entry_seal.CorruptEntry):  # the magic is covered by the CRC
        entry_seal.unseal(legacy)
    body = blob[len(entry_seal.MAGIC) + 4:]
    for magic, indexed in ((entry_seal.LEGACY_MAGIC, False), (entry_seal.INDEXED_MAGIC, True)):
        old_seal = magic + struct.pack("<I", zlib.crc32(body)) + body  # as earlier versions
        assert entry_seal.unseal(old_seal) == cmds
        assert entry_seal.results_indexed(old_seal) is indexed
