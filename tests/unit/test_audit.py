"""AuditLog (daemons/listener/audit.py) on tmp_path: append, dedupe across reopen,
rotation, retention, out-of-order flags, rejects, torn-line repair, fsync policy;
plus the listener's config keys and its readable --follow line."""

from __future__ import annotations

import base64
import copy
import glob
import json
import os

import pytest
import yaml

from daemons.core import events
from daemons.core.config import parse_cluster
from daemons.core.errors import ConfigError, TarefaError
from daemons.listener import audit as audit_module
from daemons.listener.audit import AuditLog, rotated_paths
from daemons.listener.daemon import readable_line

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOPIC = "tarefa/test/tasks/7/buy%20milk"


def task_event(revision: int, origin: str = "portal-client-1", title: str = "buy milk",
               **record_extra: object) -> dict:
    record = {"cid": "7", "title": title, "description": "", "status": "pending",
              "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z",
              "revision": revision, **record_extra}
    return events.make_event("task.updated", "7", revision, origin, "2026-01-01T00:00:00Z",
                             title=title, record=record)


def read_lines(path: str) -> list[dict]:
    with open(path, "rb") as handle:
        data = handle.read()
    assert data == b"" or data.endswith(b"\n"), f"{path} does not end with a newline"
    return [json.loads(line) for line in data.splitlines()]


def all_keys(path: str) -> list[tuple[str, int]]:
    """(origin, revision) of every line of the current and rotated files, oldest first."""
    keys = []
    for p in [*reversed(rotated_paths(path)), path]:
        keys.extend((e["origin"], e["revision"]) for e in read_lines(p))
    return keys


@pytest.fixture
def path(tmp_path) -> str:
    return str(tmp_path / "audit" / "audit.jsonl")


@pytest.fixture
def opened():
    logs: list[AuditLog] = []

    def open_log(path: str, **kwargs: object) -> AuditLog:
        log = AuditLog(path, **kwargs)  # type: ignore[arg-type]
        log.open()
        logs.append(log)
        return log

    yield open_log
    for log in logs:
        log.close()


# ---- append and dedupe ----------------------------------------------------------------------


def test_append_writes_the_event_plus_topic_and_received_at(path, opened):
    log = opened(path, now=lambda: "2026-02-03T04:05:06.789Z")
    event = task_event(42)
    entry = log.append(event, TOPIC)
    assert entry is not None
    (line,) = read_lines(path)
    assert line == {**event, "topic": TOPIC, "received_at": "2026-02-03T04:05:06.789Z"}
    assert "out_of_order" not in line
    assert log.status()["events_written"] == 1
    assert os.path.exists(path + ".lock")


def test_duplicate_in_the_same_run_is_dropped(path, opened):
    log = opened(path)
    assert log.append(task_event(1), TOPIC) is not None
    assert log.append(task_event(1), TOPIC) is None
    # same revision from another origin is another event
    assert log.append(task_event(1, origin="portal-client-2"), TOPIC) is not None
    assert all_keys(path) == [("portal-client-1", 1), ("portal-client-2", 1)]
    assert (log.written, log.duplicates) == (2, 1)


def test_dedupe_survives_reopen(path, opened):
    first = opened(path)
    for rev in range(1, 6):
        first.append(task_event(rev), TOPIC)
    first.close()
    second = opened(path)
    for rev in range(1, 9):  # 1..5 are redeliveries, 6..8 new
        second.append(task_event(rev), TOPIC)
    assert second.duplicates == 5 and second.written == 3
    assert all_keys(path) == [("portal-client-1", r) for r in range(1, 9)]


def test_a_different_change_under_a_reused_revision_is_not_a_duplicate(path, opened):
    # Same origin and revision, another change (a wiped cluster counting again,
    # or a forged event that came first): both are written, in a run and
    # across a reopen; a true redelivery of either is still dropped.
    first = opened(path)
    assert first.append(task_event(5, title="buy milk"), TOPIC) is not None
    assert first.append(task_event(5, title="pay rent"), TOPIC) is not None
    first.close()
    second = opened(path)
    assert second.append(task_event(5, title="buy milk"), TOPIC) is None
    assert second.append(task_event(5, title="pay rent"), TOPIC) is None
    assert second.append(task_event(5, title="call mum"), TOPIC) is not None
    # The very same change made again after a wipe: only its time differs.
    again = {**task_event(5, title="buy milk"), "at": "2026-06-01T00:00:00Z"}
    assert second.append(again, TOPIC) is not None
    second.close()
    third = opened(path)
    assert third.append(copy.deepcopy(again), TOPIC) is None  # a redelivery, after a restart
    assert [line["title"] for line in read_lines(path)] == \
        ["buy milk", "pay rent", "call mum", "buy milk"]


def test_dedupe_window_is_bounded_and_rebuilt_from_the_tail(path, opened):
    first = opened(path, dedupe_window=3)
    for rev in range(1, 6):
        first.append(task_event(rev), TOPIC)
    first.close()
    second = opened(path, dedupe_window=3)
    assert second.append(task_event(5), TOPIC) is None
    assert second.append(task_event(3), TOPIC) is None
    # revision 2 fell out of the window: written again, flagged as out of order
    entry = second.append(task_event(2), TOPIC)
    assert entry is not None and entry["out_of_order"] is True


def test_a_second_writer_is_refused(path, opened):
    opened(path)
    with pytest.raises(TarefaError, match="another listener"):
        AuditLog(path).open()


# ---- rotation -------------------------------------------------------------------------------


def test_rotation_keeps_every_event_exactly_once_across_files_and_restarts(path, opened):
    log = opened(path, rotate_bytes=1000, keep_files=100)
    for rev in range(1, 61):
        log.append(task_event(rev), TOPIC)
    rotated = rotated_paths(path)
    assert len(rotated) >= 5, rotated
    for p in rotated:
        assert os.path.getsize(p) <= 1000
    # .1 is newer than .2, which is newer than .3 ...
    firsts = [read_lines(p)[0]["revision"] for p in rotated]
    assert firsts == sorted(firsts, reverse=True)
    assert all_keys(path) == [("portal-client-1", r) for r in range(1, 61)]
    log.close()

    again = opened(path, rotate_bytes=1000, keep_files=100)
    for rev in range(1, 71):
        again.append(task_event(rev), TOPIC)
    assert again.duplicates == 60 and again.written == 10
    assert all_keys(path) == [("portal-client-1", r) for r in range(1, 71)]


def test_rotation_deletes_beyond_keep_files(path, opened):
    log = opened(path, rotate_bytes=1000, keep_files=2)
    for rev in range(1, 61):
        log.append(task_event(rev), TOPIC)
    assert [os.path.basename(p) for p in rotated_paths(path)] == ["audit.jsonl.1", "audit.jsonl.2"]
    keys = all_keys(path)
    # what is kept is the newest events, contiguous, each once
    assert keys == [("portal-client-1", r) for r in range(keys[0][1], 61)]


def test_a_rotation_touches_only_the_files_that_exist(path, opened, monkeypatch):
    # keep_files may be large: a rotation must not look at every possible slot,
    # by whatever means: os.path.exists, isfile, isdir, pathlib and os.stat
    # itself all come down to os.stat or os.lstat, which are counted here.
    log = opened(path, rotate_bytes=1000, keep_files=10**5)
    checked: list[str] = []
    for name in ("stat", "lstat"):
        def counting(p, *args, _real=getattr(os, name), **kwargs):  # type: ignore[no-untyped-def]
            if isinstance(p, str) and p.startswith(path):
                checked.append(p)
            return _real(p, *args, **kwargs)
        monkeypatch.setattr(os, name, counting)
    for rev in range(1, 61):
        log.append(task_event(rev), TOPIC)
    assert len(rotated_paths(path)) >= 5 and len(checked) < 100
    assert all_keys(path) == [("portal-client-1", r) for r in range(1, 61)]


def test_an_audit_log_that_names_a_directory_is_refused_clearly(tmp_path):
    (tmp_path / "audit.jsonl").mkdir()
    with pytest.raises(TarefaError, match=r"audit log .*audit.jsonl: cannot open it: .*"
                                          r"[Ii]s a directory"):
        AuditLog(str(tmp_path / "audit.jsonl")).open()
    # Nothing left behind (the lock and rejects files were created first).
    assert os.listdir(tmp_path) == ["audit.jsonl"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(TarefaError, match=r"cannot open it: .*[Nn]ot a directory"):
        AuditLog(str(tmp_path / "file" / "audit.jsonl")).open()


def test_rejects_rotate_too(path, opened):
    log = opened(path, rotate_bytes=500, keep_files=3)
    for n in range(30):
        log.reject("tarefa/test/x", b"garbage %d" % n, "not JSON")
    assert rotated_paths(path + ".rejects")
    assert rotated_paths(path) == []  # the audit log's rotation ignores the reject files


# ---- out of order ---------------------------------------------------------------------------


def test_a_replay_is_written_as_such_not_as_out_of_order(path, opened):
    log = opened(path)
    log.append(task_event(5), TOPIC)
    replay = {**task_event(3), "replay": True}
    line = log.append(replay, TOPIC)
    assert line is not None and line["replay"] is True and "out_of_order" not in line
    assert log.out_of_order == 0
    # ...and it does not lower its origin's highest revision (5): 4 is still late.
    assert log.append(task_event(4), TOPIC)["out_of_order"] is True


def test_after_a_restart_a_replay_still_counts_for_nothing(path, opened):
    """Found by review: the rebuild at start counted a replay towards its
    origin's highest revision, so 20 after a replay of 40 was flagged out of
    order after a restart and not before; nor may a replay anchor gap tracking."""
    log = opened(path)
    for rev in range(1, 13):
        log.append(task_event(rev), TOPIC)
    log.append({**task_event(40), "replay": True}, TOPIC)
    log.close()
    again = opened(path)
    assert "out_of_order" not in again.append(task_event(20), TOPIC)
    live, replayed = again.remembered_revisions()
    assert 40 not in live and 12 in live and replayed == [40]


def test_out_of_order_is_flagged_and_still_written(path, opened):
    log = opened(path)
    log.append(task_event(5), TOPIC)
    late = log.append(task_event(3), TOPIC)
    assert late is not None and late["out_of_order"] is True
    # another origin has its own order
    assert "out_of_order" not in log.append(task_event(4, origin="portal-client-2"), TOPIC)
    # the highest stays 5, so 4 from the first origin is late too
    assert log.append(task_event(4), TOPIC)["out_of_order"] is True
    assert "out_of_order" not in log.append(task_event(6), TOPIC)
    lines = read_lines(path)
    assert [(e["revision"], e.get("out_of_order", False)) for e in lines] == [
        (5, False), (3, True), (4, False), (4, True), (6, False)]
    assert log.out_of_order == 2
    # An event that carries the field itself (forged) gets the listener's verdict
    # only (found by review: it was kept, and --follow said "out of order").
    assert "out_of_order" not in log.append({**task_event(7), "out_of_order": True}, TOPIC)
    assert "out_of_order" not in read_lines(path)[-1]


def test_a_forged_far_revision_does_not_make_later_real_events_out_of_order(path, opened):
    # The listener passes plausible=False for a revision far above the tracked
    # ones (gaps.py); at open, only trusted revisions (gaps.trusted) count.
    log = opened(path)
    for revision in range(1, 21):
        log.append(task_event(revision), TOPIC)
    forged = log.append(task_event(10**12), TOPIC, plausible=False)
    assert forged is not None and "out_of_order" not in forged  # written as it came
    assert "out_of_order" not in log.append(task_event(21), TOPIC)
    log.close()
    again = opened(path)
    assert "out_of_order" not in again.append(task_event(22), TOPIC)
    assert again.append(task_event(19), TOPIC) is None  # a redelivery, still known
    assert again.append(task_event(7, title="other"), TOPIC)["out_of_order"] is True
    assert log.out_of_order == 0 and again.out_of_order == 1


def test_highest_revision_per_origin_is_rebuilt_on_open(path, opened):
    first = opened(path)
    first.append(task_event(10), TOPIC)
    first.close()
    second = opened(path)
    assert second.append(task_event(9), TOPIC)["out_of_order"] is True


# ---- rejects --------------------------------------------------------------------------------


def test_reject_file_keeps_topic_payload_and_reason(path, opened):
    log = opened(path)
    log.reject("tarefa/test/clients/7", b'{"schema": 2}', "schema: expected 1, got 2")
    binary = b"\xff\xfe\x00garbage\n\x1b[31m"
    log.reject("tarefa/test/x", binary, "not JSON: ...")
    log.reject("tarefa/test/big", b"x" * (audit_module.REJECT_PAYLOAD_MAX + 10), "too long")
    text, raw, big = read_lines(path + ".rejects")
    assert text["topic"] == "tarefa/test/clients/7"
    assert text["payload"] == '{"schema": 2}' and text["payload_encoding"] == "utf-8"
    assert text["reason"] == "schema: expected 1, got 2" and "received_at" in text
    assert raw["payload_encoding"] == "base64"
    assert base64.b64decode(raw["payload"]) == binary
    assert big["truncated"] is True and big["payload_bytes"] == audit_module.REJECT_PAYLOAD_MAX + 10
    assert read_lines(path) == []  # nothing went to the audit log
    assert log.rejects == 3


# ---- crash repair ---------------------------------------------------------------------------


def test_a_torn_last_line_moves_to_the_rejects_and_its_event_can_be_written_again(path, opened):
    log = opened(path)
    log.append(task_event(1), TOPIC)
    log.close()
    whole = audit_module.encode_line({**task_event(2), "topic": TOPIC, "received_at": "x"})
    with open(path, "ab") as handle:
        handle.write(whole[:25])  # the listener died mid-write
    again = opened(path)
    assert [e["revision"] for e in read_lines(path)] == [1]
    (torn,) = read_lines(path + ".rejects")
    assert torn["reason"].startswith("torn write") and torn["payload"] == whole[:25].decode()
    assert again.rejects == 1  # counted like any other reject
    assert again.append(task_event(2), TOPIC) is not None  # the broker's redelivery
    assert [e["revision"] for e in read_lines(path)] == [1, 2]


def test_a_whole_last_line_missing_only_its_newline_is_kept(path, opened):
    log = opened(path)
    log.append(task_event(1), TOPIC)
    log.close()
    whole = audit_module.encode_line({**task_event(2), "topic": TOPIC, "received_at": "x"})
    with open(path, "ab") as handle:
        handle.write(whole[:-1])
    again = opened(path)
    assert [e["revision"] for e in read_lines(path)] == [1, 2]
    assert read_lines(path + ".rejects") == []
    assert again.append(task_event(2), TOPIC) is None


def test_lone_surrogates_in_a_record_are_written_as_escapes(path, opened):
    log = opened(path)
    log.append(task_event(1, description="bad \ud800 text"), TOPIC)
    log.append(task_event(2, description="ação"), TOPIC)
    with open(path, "rb") as handle:
        raw = handle.read()
    assert "ação".encode() in raw  # ordinary text stays readable
    first, second = read_lines(path)
    assert first["record"]["description"] == "bad \ud800 text"


# ---- fsync policy ---------------------------------------------------------------------------


@pytest.fixture
def fsyncs(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = os.fsync
    monkeypatch.setattr(audit_module.os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    return calls


def test_fsync_always_syncs_every_event(path, opened, fsyncs):
    log = opened(path, fsync="always")
    fsyncs.clear()
    for rev in range(1, 4):
        log.append(task_event(rev), TOPIC)
    log.reject("t", b"x", "bad")
    assert len(fsyncs) == 4


def test_fsync_never_does_not_sync(path, opened, fsyncs):
    log = opened(path, fsync="never")
    fsyncs.clear()
    for rev in range(1, 4):
        log.append(task_event(rev), TOPIC)
    log.sync_if_due()
    log.close()
    assert fsyncs == []
    assert len(read_lines(path)) == 3  # flushed all the same


def test_fsync_interval_syncs_at_most_once_per_interval(path, opened, fsyncs):
    now = [100.0]
    log = opened(path, fsync="interval", fsync_interval=1.0, clock=lambda: now[0])
    fsyncs.clear()
    log.append(task_event(1), TOPIC)
    log.append(task_event(2), TOPIC)
    log.sync_if_due()
    assert fsyncs == []
    now[0] += 1.5
    log.sync_if_due()  # a quiet period after a burst still gets synced
    synced = len(fsyncs)
    assert synced >= 1
    log.sync_if_due()
    assert len(fsyncs) == synced  # nothing new to sync
    log.append(task_event(3), TOPIC)
    assert len(fsyncs) == synced
    now[0] += 1.0
    log.append(task_event(4), TOPIC)
    assert len(fsyncs) > synced


# ---- the listener's config keys -------------------------------------------------------------


@pytest.fixture
def raw() -> dict:
    with open(os.path.join(ROOT, "config", "cluster.yaml"), encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def test_listener_keys_parse_with_defaults(raw):
    cluster = parse_cluster(copy.deepcopy(raw), "cluster.yaml", "/etc/tarefa")
    spec = cluster.listener
    assert (spec.fsync, spec.fsync_interval, spec.rotate_bytes, spec.keep_files,
            spec.dedupe_window) == ("always", 1.0, 64 * 1024 * 1024, 10, 100_000)
    assert spec.audit_log == "/etc/run/audit/audit.jsonl" and spec.address == "127.0.0.1:7301"
    minimal = copy.deepcopy(raw)
    minimal["listener"] = {"audit_log": "a.jsonl"}
    spec = parse_cluster(minimal, "cluster.yaml", "/etc/tarefa").listener
    assert (spec.id, spec.fsync, spec.keep_files) == ("listener", "always", 10)


def test_bad_listener_keys_are_all_reported(raw):
    bad = copy.deepcopy(raw)
    bad["listener"].update(fsync="sometimes", fsync_interval=0, rotate_bytes=-1,
                           keep_files="ten", dedupe_window=True)
    with pytest.raises(ConfigError) as info:
        parse_cluster(bad, "cluster.yaml", "/etc/tarefa")
    paths = sorted(p.split(": ")[1] for p in info.value.problems)
    assert paths == ["listener.dedupe_window", "listener.fsync", "listener.fsync_interval",
                     "listener.keep_files", "listener.rotate_bytes"]


# ---- --follow -------------------------------------------------------------------------------


def test_readable_line():
    entry = {**task_event(42), "topic": TOPIC, "received_at": "x"}
    assert readable_line(entry) == ('rev 42  task.updated  cid=7 title="buy milk"  '
                                    'by portal-client-1')
    client = events.make_event("client.deleted", "9", 43, "portal-admin", "t")
    assert readable_line(client) == "rev 43  client.deleted  cid=9  by portal-admin"
    late = {**task_event(3, title='say "hi"'), "out_of_order": True}
    assert readable_line(late) == ('rev 3  task.updated  cid=7 title="say \\"hi\\""  '
                                   "by portal-client-1  (out of order)")


def test_no_stray_files(path, opened):
    log = opened(path, rotate_bytes=1000)
    for rev in range(1, 30):
        log.append(task_event(rev), TOPIC)
    names = {os.path.basename(p) for p in glob.glob(os.path.dirname(path) + "/*")}
    assert names <= {"audit.jsonl", "audit.jsonl.lock", "audit.jsonl.rejects"} | {
        f"audit.jsonl.{n}" for n in range(1, 11)}


# ---- the daemon's message handler (no sockets: the bus is built, never started) -------------


class Fatal(Exception):
    pass


@pytest.fixture
def daemon(raw, tmp_path):
    from daemons.listener.daemon import ListenerDaemon

    doc = copy.deepcopy(raw)
    doc["cluster"]["name"] = "test"
    doc["listener"]["audit_log"] = str(tmp_path / "audit.jsonl")
    # No secrets in tmp_path: the handler under test needs no TLS or broker login.
    doc["security"] = {"auth": "cid-only"}
    doc["broker"]["password_dir"] = None
    codes: list[int] = []

    def fatal(code: int) -> None:
        codes.append(code)
        raise Fatal(code)

    d = ListenerDaemon(parse_cluster(doc, "cluster.yaml", str(tmp_path)), fatal=fatal)
    d.audit.open()
    d.fatal_codes = codes  # type: ignore[attr-defined]
    yield d
    d.audit.close()


def test_handler_writes_valid_events_and_rejects_the_rest(daemon, caplog):
    event = task_event(1)
    daemon.on_message(events.event_topic("test", event), events.encode(event))
    daemon.on_message("tarefa/test/clients/7", b"\x00garbage")
    assert [e["revision"] for e in read_lines(daemon.audit.path)] == [1]
    (reject,) = read_lines(daemon.audit.reject_path)
    assert reject["topic"] == "tarefa/test/clients/7" and "not JSON" in reject["reason"]
    assert any(r.levelname == "WARNING" and "malformed" in r.getMessage() for r in caplog.records)


def test_handler_stops_without_acknowledging_when_the_audit_log_cannot_be_written(
        daemon, monkeypatch, caplog):
    def full(*_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(daemon.audit, "append", full)
    event = task_event(1)
    # paho acknowledges only when the callback returns; it must not return
    with pytest.raises(Fatal):
        daemon.on_message(events.event_topic("test", event), events.encode(event))
    assert daemon.fatal_codes == [1]
    assert any(r.levelname == "CRITICAL" and "No space left" in r.getMessage()
               for r in caplog.records)


def test_handler_rejects_an_event_nested_near_the_recursion_limit(daemon):
    """Deep nesting is refused by events.decode, so the entry never fails to encode."""
    event = task_event(1)
    text = events.encode(event).decode()[:-2]
    for depth in (100, 990, 5000):
        payload = (text + ',"nested":' + "[" * depth + "]" * depth + "}}").encode()
        daemon.on_message(events.event_topic("test", event), payload)
    assert read_lines(daemon.audit.path) == []
    assert len(read_lines(daemon.audit.reject_path)) == 3 and daemon.audit.rejects == 3


def test_handler_rejects_an_event_it_cannot_write(daemon, monkeypatch):
    """Any failure but an OSError while writing an entry: the event goes to the rejects."""
    def broken(*_: object) -> None:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(daemon.audit, "append", broken)
    event = task_event(1)
    daemon.on_message(events.event_topic("test", event), events.encode(event))
    (reject,) = read_lines(daemon.audit.reject_path)
    assert "cannot be written" in reject["reason"] and "RecursionError" in reject["reason"]
    assert daemon.fatal_codes == []


def test_handler_rejects_an_event_the_validator_fails_on(daemon, monkeypatch):
    def broken(*_: object, **__: object) -> None:
        raise KeyError("bug")

    monkeypatch.setattr(events, "decode", broken)
    daemon.on_message("tarefa/test/clients/7", b"{}")
    (reject,) = read_lines(daemon.audit.reject_path)
    assert "cannot be validated" in reject["reason"]


def test_handler_stops_when_a_reject_cannot_be_written(daemon, monkeypatch):
    def broken(*_: object) -> None:
        raise ValueError("cannot encode")

    monkeypatch.setattr(daemon.audit, "reject", broken)
    with pytest.raises(Fatal):
        daemon.on_message("tarefa/test/clients/7", b"\x00garbage")
    assert daemon.fatal_codes == [1]


# ---- found by a review of the listener (each failed before its fix) ---------------------------


def test_stops_even_when_flushing_the_log_fails_too(daemon, monkeypatch):
    """stderr on the same full disk: the flush before the exit raised, the exit
    never happened, and paho acknowledged the event that was never written."""
    import logging

    class Broken(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            pass

        def flush(self) -> None:
            raise OSError(28, "No space left on device")

    def full(*_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(daemon.audit, "append", full)
    broken = Broken()
    logging.getLogger().addHandler(broken)
    try:
        event = task_event(1)
        with pytest.raises((Fatal, OSError)):
            daemon.on_message(events.event_topic("test", event), events.encode(event))
    finally:
        logging.getLogger().removeHandler(broken)
    assert daemon.fatal_codes == [1]


def test_a_torn_last_reject_line_is_ended_before_the_next(path, opened):
    log = opened(path)
    log.reject("t", b"first", "bad")
    log.close()
    with open(path + ".rejects", "ab") as handle:
        handle.write(b'{"received_at":"2026","topic":"t","rea')  # died mid-write
    again = opened(path)
    again.reject("t", b"second", "bad")
    with open(path + ".rejects", "rb") as handle:
        lines = handle.read().splitlines()
    assert len(lines) == 3 and json.loads(lines[2])["payload"] == "second"


def test_origins_tracked_for_out_of_order_are_bounded(path, opened, monkeypatch):
    monkeypatch.setattr(audit_module, "MAX_ORIGINS", 50)
    log = opened(path, dedupe_window=10)
    for n in range(200):
        event = {**task_event(n + 1), "origin": f"origin-{n}"}
        log.append(event, TOPIC)
    assert len(log._highest) == 50 and "origin-199" in log._highest


def test_a_forged_first_revision_stops_counting_once_the_real_ones_agree(path, opened):
    """Found by review: on an empty log a forged first event far above the real
    ones became its origin's highest revision, and every real event after it
    was flagged out of order until a restart. Once ten real revisions agree
    (gap tracking starts), the highest is recomputed from them."""
    log = opened(path)
    log.append(task_event(9 * 10**9), TOPIC)
    for rev in range(1, 11):
        log.append(task_event(rev), TOPIC)  # flagged: nothing tells them real yet
    log.retrust_highest()
    assert "out_of_order" not in log.append(task_event(11), TOPIC)
    assert log.append(task_event(5, title="again"), TOPIC)["out_of_order"] is True
