"""Corrupted, truncated or missing replica files at start.

One three-member ReplicaCluster (with log compaction early enough that every
kind of file exists) serves the whole module. A follower — the victim — is stopped
cleanly once its data directory holds LevelDB tables AND a non-empty LevelDB
write-ahead log, a Raft journal, its `.meta` and a snapshot; that directory is
kept as the pristine copy. Each scenario restores the pristine copy, lets the
cluster acknowledge a few more writes while the victim is down, damages one
file, starts the victim and waits (bounded) for one of the two acceptable
outcomes:

- REFUSED: the process exits non-zero and its log has a CRITICAL (or `Error:`)
  line naming the damaged path — the LevelDB directory for LevelDB's own files
  (README: "corrupt LevelDB files ... stop the replica at start with a message
  naming the path"), the file itself for the Raft journal and snapshot;
- RECOVERED: the victim catches up — same applied index as the leader, the
  same records as the leader (local reads), and every acknowledged write
  readable LINEARIZABLY through the victim. Never silent data loss.

Anything else fails with what was seen. Scenarios whose outcome is a bug today
are named `bug_*`; what each one does today is in SCENARIOS' notes.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import plyvel
import pytest

from proto import replica_pb2 as pb
from tests.harness import ReplicaCluster, apply_with_retry, new_request_id, scan_all, wait_for

CID = "6180339887498948482045868343656"
# Compaction by entry count only: the setup's ~230 entries leave every member with a
# snapshot (at ~200) and a journal of the entries after it, and no member compacts
# again during the scenarios — so a restarted victim catches up from the log, never
# from a snapshot install that would rewrite (and so mask) its damaged LevelDB.
RAFT = {"compaction_min_entries": 200, "compaction_min_seconds": 3600}
OUTCOME_SECONDS = 8.0  # a refusal or a catch-up takes 1-3 s here


# ---- the module's cluster ----------------------------------------------------------


class CorruptEnv:
    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.cluster = ReplicaCluster(os.path.join(workdir, "cluster"), raft=RAFT)
        self.acked: list[str] = []
        self.victim: Any = None
        self.pristine = os.path.join(workdir, "pristine")
        self._n = 0

    @property
    def data_dir(self) -> str:
        return os.path.abspath(self.cluster.data_dir(self.victim))

    def others(self) -> list[Any]:
        return [m for m in self.cluster.members if m is not self.victim]

    def write(self, count: int) -> None:
        for _ in range(count):
            self._n += 1
            title = f"acknowledged write {self._n:05d}"
            apply_with_retry(self.cluster, pb.Command(
                request_id=new_request_id(), op=pb.CREATE_TASK, cid=CID, title=title,
                description=f"acknowledged write number {self._n} of the corruption tests"),
                time.monotonic() + 20)
            self.acked.append(title)

    def leader(self) -> Any:
        def live_leader() -> Any:
            for member in self.others():
                st = member.status(timeout=1)
                if st.role == "leader" and st.has_quorum:
                    return member
            return None
        return wait_for(live_leader, 20, "a leader among the healthy members")

    def setup(self) -> None:
        self.cluster.start()
        apply_with_retry(self.cluster, pb.Command(request_id=new_request_id(),
                                                  op=pb.CREATE_CLIENT, cid=CID, data="{}"),
                         time.monotonic() + 20)
        self.write(150)
        self.victim = self.cluster.followers()[-1]
        # LevelDB turns its write-ahead log into a table when it opens: restart once,
        # then write more, so the victim has tables AND a non-empty log.
        assert self.victim.terminate() == 0
        self.victim.start()
        self.cluster.wait_ready(self.victim)
        self.write(80)
        self.cluster.wait_converged(timeout=30)
        assert self.victim.terminate() == 0, self.victim.logs()[-3000:]
        shutil.copytree(self.data_dir, self.pristine)
        found = {name: glob.glob(os.path.join(self.pristine, pattern)) for name, pattern in [
            ("table", "*.ldb"), ("log", "*.log"), ("manifest", "MANIFEST-*"),
            ("current", "CURRENT"), ("journal", "raft/journal"),
            ("meta", "raft/journal.meta"), ("snapshot", "raft/snapshot")]}
        assert all(found.values()), f"the pristine copy lacks files: {found}"
        assert any(os.path.getsize(p) > 0 for p in found["log"]), "empty LevelDB log"
        commands = [r for r in journal_records(found["journal"][0]) if r[1] > 8]
        assert len(commands) >= 5, f"only {len(commands)} commands in the journal"

    def stop(self) -> None:
        self.cluster.stop()


@pytest.fixture(scope="module")
def corrupt_env(tmp_path_factory: pytest.TempPathFactory) -> Any:
    env = CorruptEnv(str(tmp_path_factory.mktemp("corrupt")))
    try:
        env.setup()
        yield env
    finally:
        env.stop()


# ---- damage ---------------------------------------------------------------------------


def one(data_dir: str, pattern: str) -> str:
    files = sorted(glob.glob(os.path.join(data_dir, pattern)))
    assert files, f"no {pattern} in {data_dir}"
    return max(files, key=os.path.getsize)


def truncate(path: str, size: int) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(size)


def overwrite(path: str, content: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(content)


def flip(path: str, offset: int, count: int = 1) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        data = bytearray(fh.read(count))
        fh.seek(offset)
        fh.write(bytes(b ^ 0xFF for b in data))


def journal_end(path: str) -> int:
    """PySyncObj's journal header: name(24) version(8) format(4) end-of-records(4)."""
    with open(path, "rb") as fh:
        return struct.unpack_from("<I", fh.read(40), 36)[0]


def journal_records(path: str) -> list[tuple[int, int]]:
    """(offset of the command bytes, their length) of each record: size idx term cmd size."""
    with open(path, "rb") as fh:
        data = fh.read()
    end, pos, out = journal_end(path), 40, []
    while pos < end:
        (size,) = struct.unpack_from("<I", data, pos)
        out.append((pos + 4 + 16, size - 16))
        pos += size + 8
    return out


def garble_journal_record(data_dir: str) -> str:
    """Break the pickle of the last replicated command (byte 0 is PySyncObj's command type)."""
    path = os.path.join(data_dir, "raft", "journal")
    records = [r for r in journal_records(path) if r[1] > 8]
    assert records, "no command in the journal"
    offset, _ = records[-1]
    flip(path, offset + 1, 2)
    return path


def alter_journal_text(data_dir: str) -> str:
    """Change one letter of a task's description inside the last journalled write:
    the entry still unpickles, as another write; only the entry's seal (its CRC-32,
    daemons/replica/entry_seal.py) can tell. LevelDB's write-ahead log loses its
    torn tail as well, so the entry is applied again from the journal at start."""
    log = one(data_dir, "*.log")
    truncate(log, os.path.getsize(log) // 2)
    path = os.path.join(data_dir, "raft", "journal")
    with open(path, "rb") as fh:
        data = fh.read()
    found = [data.find(b"of the corruption tests", offset, offset + length)
             for offset, length in journal_records(path)]
    found = [at for at in found if at >= 0]
    assert found, "no description in the journal"
    at = found[-1]  # the last write (barriers of linearizable reads may follow it)
    with open(path, "r+b") as fh:
        fh.seek(at)
        fh.write(b"OF")
    return path


def flip_table_byte_silently(data_dir: str) -> str:
    """Flip one byte of a LevelDB table so that a task's value changes WITHOUT any error on
    a normal read (LevelDB verifies block checksums only when asked to), and check that a
    read with verify_checksums=True would have caught it. Searched on a scratch copy."""
    table = one(data_dir, "*.ldb")
    scratch = data_dir.rstrip("/") + ".search"
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(data_dir, scratch)
    try:
        db = plyvel.DB(scratch)
        original = dict(db.iterator(prefix=b"t/"))
        db.close()
        with open(table, "rb") as fh:
            content = fh.read()
        # Task records follow the m/ keys; try the bytes from a little before the first
        # task key on (a block's first value is a literal even when Snappy-compressed).
        first_task = content.find(b"t/" + f"{len(CID):04d}{CID}"[:8].encode())
        candidates = range(max(0, first_task - 2048), len(content))
        scratch_table = os.path.join(scratch, os.path.basename(table))
        for offset in candidates:
            damaged = bytearray(content)
            damaged[offset] ^= 0x01
            with open(scratch_table, "wb") as fh:
                fh.write(damaged)
            try:
                db = plyvel.DB(scratch, paranoid_checks=True)
                try:
                    now = dict(db.iterator(prefix=b"t/"))
                finally:
                    db.close()
            except plyvel.Error:
                continue
            if set(now) != set(original) or now == original:
                continue
            db = plyvel.DB(scratch, paranoid_checks=True)
            try:
                dict(db.iterator(prefix=b"t/", verify_checksums=True))
                detectable = False
            except plyvel.Error:
                detectable = True
            finally:
                db.close()
            assert detectable, "a checksummed read would not catch this flip either"
            with open(table, "r+b") as fh:
                fh.seek(offset)
                fh.write(bytes([content[offset] ^ 0x01]))
            return os.path.dirname(table)
        raise AssertionError("no silent single-byte change found in the table")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@dataclass
class Scenario:
    name: str
    damage: Callable[[str], str]  # damages the data dir; returns the path a refusal must name
    note: str  # what happens today


def _leveldb(fn: Callable[[str], None]) -> Callable[[str], str]:
    def damage(data_dir: str) -> str:
        fn(data_dir)
        return data_dir
    return damage


def _raft(name: str, fn: Callable[[str], None]) -> Callable[[str], str]:
    def damage(data_dir: str) -> str:
        path = os.path.join(data_dir, "raft", name)
        fn(path)
        return path
    return damage


SCENARIOS = [
    # Raft files (order matters: these want the pristine copy close to the leader's log)
    Scenario("bug_snapshot_deleted", _raft("snapshot", os.remove),
             "ZOMBIE: the compacted journal starts past index 1 and no snapshot tells "
             "PySyncObj where: last_applied stays 1, nothing is applied or logged, the "
             "replica serves stale SERIALIZABLE reads and UNAVAILABLE linearizable ones"),
    Scenario("bug_journal_record_garbled", lambda d: garble_journal_record(d),
             "refused: the start check decodes every journalled command as PySyncObj "
             "will (before: a ZOMBIE that failed every tick, ~75 tracebacks a second)"),
    Scenario("journal_record_text_altered", alter_journal_text,
             "refused: the entry's CRC-32 does not match (before entries were sealed, "
             "the altered write was applied on this member alone: it served other data "
             "than its peers at the same applied index)"),
    Scenario("bug_journal_emptied", _raft("journal", lambda p: truncate(p, 0)),
             "exit 1 with an uncaught 'ValueError: cannot mmap an empty file' traceback; "
             "no line names the journal"),
    Scenario("bug_journal_truncated", _raft("journal", lambda p: truncate(p, journal_end(p) // 2)),
             "exit 1 with an uncaught 'struct.error: unpack requires a buffer' traceback; "
             "no line names the journal"),
    Scenario("journal_deleted", _raft("journal", os.remove),
             "recovers: LevelDB is at its applied index, the leader sends the log again"),
    Scenario("journal_meta_garbled", _raft("journal.meta", lambda p: overwrite(p, b"garbage")),
             "refused: CRITICAL naming journal.meta (before: recovered silently, PySyncObj "
             "forgetting the term and the vote, so the member could vote twice in a term)"),
    Scenario("snapshot_header_garbled", _raft("snapshot", lambda p: flip(p, 0, 4)),
             "refused: CRITICAL '<path>/raft/snapshot: not a Tarefa snapshot', exit 1"),
    Scenario("snapshot_body_garbled",
             _raft("snapshot", lambda p: flip(p, os.path.getsize(p) // 2, 8)),
             "recovers: LevelDB is past the snapshot; its checksum is checked at start, "
             "an ERROR says it is damaged, and a compaction is forced to replace it"),
    # LevelDB
    Scenario("leveldb_current_emptied", _leveldb(
        lambda d: truncate(os.path.join(d, "CURRENT"), 0)),
        "refused: 'CURRENT file does not end with newline', exit 1"),
    Scenario("bug_leveldb_current_deleted",
             _leveldb(lambda d: os.remove(os.path.join(d, "CURRENT"))),
             "SILENT DATA LOSS: create_if_missing=True makes LevelDB start a new database; "
             "it replays only the write-ahead log (which holds m/applied), drops the tables, "
             "and the replica serves with its earlier records gone — client and tasks "
             "NOT_FOUND even LINEARIZABLY — at the same applied index as its peers"),
    Scenario("leveldb_manifest_garbled", _leveldb(
        lambda d: flip(one(d, "MANIFEST-*"), os.path.getsize(one(d, "MANIFEST-*")) // 2)),
        "refused: 'Corruption: checksum mismatch', exit 1"),
    Scenario("leveldb_log_garbled", _leveldb(
        lambda d: flip(one(d, "*.log"), os.path.getsize(one(d, "*.log")) // 2)),
        "refused: 'Corruption: checksum mismatch', exit 1"),
    Scenario("leveldb_log_truncated", _leveldb(
        lambda d: truncate(one(d, "*.log"), os.path.getsize(one(d, "*.log")) // 2)),
        "recovers: LevelDB drops the torn tail silently (m/applied goes back), the Raft "
        "journal replays the lost entries exactly once"),
    Scenario("leveldb_table_deleted", _leveldb(lambda d: os.remove(one(d, "*.ldb"))),
             "refused: 'Corruption: 1 missing files; e.g.: <path>.ldb', exit 1"),
    Scenario("bug_leveldb_table_truncated", _leveldb(
        lambda d: truncate(one(d, "*.ldb"), os.path.getsize(one(d, "*.ldb")) // 2)),
        "exit 1 with an uncaught plyvel IOError traceback ('IO error: <path>.ldb: Invalid "
        "argument') raised by the first read in ReplicaDaemon.start, not the StorageCorrupt "
        "message"),
    Scenario("bug_leveldb_table_byte_flipped", flip_table_byte_silently,
             "SILENT CORRUPTION: LevelDB does not verify block checksums on reads "
             "(verify_checksums defaults to False, paranoid_checks only covers opening and "
             "compactions): the replica starts and serves the altered task, even "
             "LINEARIZABLY; if a compaction later reads the block, the next apply fails "
             "('apply of Raft entry N failed: CorruptionError(block checksum mismatch)') and "
             "the replica exits 1 — late, with a message naming no file"),
]


# ---- the test ---------------------------------------------------------------------------


def _records(member: Any, consistency: int) -> tuple[list[str], list[str]]:
    clients = scan_all(member, pb.CLIENT, consistency=consistency)
    try:
        tasks = scan_all(member, pb.TASK, CID, consistency=consistency)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:
            raise
        tasks = []  # the client itself is gone
    return clients, tasks


def _clear_refusal(log: str, path: str) -> bool:
    return any(("CRITICAL" in line or line.startswith("Error")) and path in line
               for line in log.splitlines())


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_damaged_file_is_refused_or_recovered(corrupt_env: CorruptEnv,
                                              scenario: Scenario) -> None:
    env = corrupt_env
    victim = env.victim
    if victim.alive:
        victim.terminate()
    shutil.rmtree(env.data_dir)
    shutil.copytree(env.pristine, env.data_dir)
    env.write(3)  # acknowledged by the two others while the victim is down
    named = scenario.damage(env.data_dir)
    mark = os.path.getsize(victim.log_path) if os.path.exists(victim.log_path) else 0
    victim.start()
    try:
        outcome = _observe(env, victim)
        with open(victim.log_path, "rb") as fh:
            fh.seek(mark)
            log = fh.read().decode("utf-8", errors="replace")
        context = f"\n--- {scenario.name} (today: {scenario.note})\n--- victim log:\n" + \
            "\n".join(log.splitlines()[-40:])
        if outcome == "exited":
            code = victim.proc.returncode
            assert code != 0, f"exited 0 on damaged storage{context}"
            assert _clear_refusal(log, named), \
                f"refused to start (exit {code}) without a CRITICAL/Error line naming " \
                f"{named}{context}"
        elif outcome == "caught up":
            _assert_recovered(env, victim, context)
        else:
            pytest.fail(f"neither refused nor recovered after {OUTCOME_SECONDS}s: {outcome}"
                        f"{context}")
    finally:
        if victim.alive:
            victim.terminate()
    # The healthy members never lost anything either.
    leader = env.leader()
    titles = {json.loads(r)["title"] for r in _records(leader, pb.LINEARIZABLE)[1]}
    assert not set(env.acked) - titles, "the healthy members lost acknowledged writes"


def _observe(env: CorruptEnv, victim: Any) -> str:
    """'exited', 'caught up', or a description of what the victim is doing instead."""
    deadline = time.monotonic() + OUTCOME_SECONDS
    last = "not serving"
    while time.monotonic() < deadline:
        if not victim.alive:
            return "exited"
        try:
            leader = env.leader().status(timeout=1)
            st = victim.status(timeout=1)
            last = (f"alive, applied index {st.applied_index} vs the leader's commit index "
                    f"{leader.commit_index}, revision {st.revision} vs {leader.revision}")
            if st.applied_index >= leader.commit_index:
                return "caught up"
        except grpc.RpcError as exc:
            last = f"alive, Status answers {exc.code().name}"
        time.sleep(0.1)
    return "exited" if not victim.alive else last


def _assert_recovered(env: CorruptEnv, victim: Any, context: str) -> None:
    leader = env.leader()
    wait_for(lambda: victim.status().applied_index >= leader.status().commit_index, 10,
             "the victim to apply what the leader committed")
    mine, theirs = _records(victim, pb.SERIALIZABLE), _records(leader, pb.SERIALIZABLE)
    revisions = victim.status().revision, leader.status().revision
    if mine != theirs or revisions[0] != revisions[1]:
        lost = {json.loads(r)["title"] for r in theirs[1]} - \
            {json.loads(r)["title"] for r in mine[1]}
        changed = sorted(set(mine[1]) - set(theirs[1]))[:2]
        pytest.fail(f"serves other data than its peers at the same applied index: "
                    f"revision {revisions[0]} vs {revisions[1]}, {len(mine[0])} vs "
                    f"{len(theirs[0])} clients, {len(lost)} acknowledged tasks missing, "
                    f"altered records {changed}{context}")
    try:
        titles = {json.loads(r)["title"] for r in _records(victim, pb.LINEARIZABLE)[1]}
    except grpc.RpcError as exc:
        pytest.fail(f"a LINEARIZABLE read through the recovered victim failed: "
                    f"{exc.code().name} {exc.details()}{context}")
    missing = set(env.acked) - titles
    assert not missing, f"{len(missing)} acknowledged writes not readable LINEARIZABLY " \
                        f"through the victim{context}"
