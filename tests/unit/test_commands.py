"""EntryApplier (daemons/replica/applier.py) and the commands it runs, on a real LevelDB."""

from __future__ import annotations

import itertools
import json

import pytest

from daemons.core import domain
from daemons.core.errors import StorageCorrupt
from daemons.replica.commands import Outcome
from daemons.replica.applier import EntryApplier
from daemons.replica.storage import Storage

AT = "2024-05-01T12:00:00Z"
LATER = "2024-05-02T08:30:00Z"


class Harness:
    """An EntryApplier on a temporary Storage, with helpers to build commands."""

    def __init__(self, storage: Storage, window: int = 1000) -> None:
        self.storage = storage
        self.applier = EntryApplier(storage, dedupe_window=window)
        self.index = 0
        self._ids = itertools.count(1)

    def rid(self) -> str:
        return f"req-{next(self._ids)}"

    def cmd(self, op: str, **fields) -> dict:
        fields.setdefault("request_id", self.rid())
        return {"op": op, **fields}

    def entry(self, *commands: dict, index: int | None = None) -> list[Outcome]:
        """Apply one Raft entry at the next index (or at `index`)."""
        if index is None:
            self.index += 1
            index = self.index
        return self.applier.apply(index, list(commands))

    def one(self, command: dict) -> Outcome:
        (outcome,) = self.entry(command)
        return outcome

    # common commands
    def create_client(self, cid: str, data: str = '{"name": "x"}', at: str = AT) -> dict:
        return self.cmd("create_client", cid=cid, data=data, at=at)

    def create_task(self, cid: str, title: str, at: str = AT, **fields) -> dict:
        return self.cmd("create_task", cid=cid, title=title, at=at, **fields)

    # state
    def records(self) -> dict[bytes, bytes]:
        return {k: v for k, v in self.storage.items() if not k.startswith(b"m/")}

    def client(self, cid: str) -> dict | None:
        raw = self.storage.get(domain.client_key(cid))
        return None if raw is None else json.loads(raw)

    def task(self, cid: str, title: str) -> dict | None:
        raw = self.storage.get(domain.task_key(cid, title))
        return None if raw is None else json.loads(raw)

    def titles(self, cid: str) -> list[str]:
        prefix = domain.task_prefix(cid)
        return [domain.title_from_task_key(cid, k) for k in self.records() if k.startswith(prefix)]

    def revision(self) -> int:
        return self.storage.revision()


@pytest.fixture
def storage(tmp_path):
    store = Storage(str(tmp_path / "db"))
    yield store
    store.close()


@pytest.fixture
def h(storage):
    return Harness(storage)


def failed(outcome: Outcome, code: str, *words: str) -> None:
    assert not outcome.ok, outcome
    assert outcome.code == code, outcome
    assert outcome.revision == 0 and outcome.record == "" and outcome.deleted_tasks == 0
    for word in words:
        assert word in outcome.message, outcome.message


# ---- each operation, success ------------------------------------------------------


def test_create_client(h):
    out = h.one(h.create_client("42", '{"name": "Ana", "tags": ["a"]}'))
    assert out.ok and out.code == "" and out.revision == 1
    expected = {"cid": "42", "data": {"name": "Ana", "tags": ["a"]}, "created_at": AT,
                "updated_at": AT, "revision": 1}
    assert json.loads(out.record) == expected
    assert h.client("42") == expected
    assert h.revision() == 1


def test_update_client_keeps_created_at(h):
    h.one(h.create_client("7", '{"name": "old"}'))
    out = h.one(h.cmd("update_client", cid="7", data='{"name": "new"}', at=LATER))
    assert out.ok and out.revision == 2
    expected = {"cid": "7", "data": {"name": "new"}, "created_at": AT, "updated_at": LATER,
                "revision": 2}
    assert json.loads(out.record) == expected == h.client("7")


def test_delete_client_returns_deleted_task_count(h):
    h.one(h.create_client("5"))
    h.entry(*(h.create_task("5", t) for t in ("a", "b/c", "🚀")))
    out = h.one(h.cmd("delete_client", cid="5"))
    assert out.ok and out.revision == 5 and out.record == "" and out.deleted_tasks == 3
    assert h.client("5") is None and h.titles("5") == []
    assert h.records() == {}


def test_create_task_defaults_and_explicit_fields(h):
    h.one(h.create_client("1"))
    out = h.one(h.create_task("1", "buy milk"))
    assert out.ok and out.revision == 2
    expected = {"cid": "1", "title": "buy milk", "description": "", "status": "pending",
                "created_at": AT, "updated_at": AT, "revision": 2}
    assert json.loads(out.record) == expected == h.task("1", "buy milk")
    out = h.one(h.create_task("1", "a/b", description="d", status="done"))
    assert out.ok and h.task("1", "a/b")["description"] == "d"
    assert h.task("1", "a/b")["status"] == "done"


def test_same_title_in_two_clients(h):
    h.entry(h.create_client("1"), h.create_client("2"))
    assert h.one(h.create_task("1", "t")).ok
    assert h.one(h.create_task("2", "t")).ok
    assert h.titles("1") == ["t"] == h.titles("2")


@pytest.mark.parametrize("fields,description,status", [
    ({"description": "new"}, "new", "pending"),
    ({"status": "done"}, "old", "done"),
    ({"description": "", "status": "done"}, "", "done"),
])
def test_update_task(h, fields, description, status):
    h.one(h.create_client("1"))
    h.one(h.create_task("1", "t", description="old"))
    out = h.one(h.cmd("update_task", cid="1", title="t", at=LATER, **fields))
    assert out.ok and out.revision == 3
    expected = {"cid": "1", "title": "t", "description": description, "status": status,
                "created_at": AT, "updated_at": LATER, "revision": 3}
    assert json.loads(out.record) == expected == h.task("1", "t")


def test_delete_task(h):
    h.one(h.create_client("1"))
    h.entry(h.create_task("1", "a"), h.create_task("1", "b"))
    out = h.one(h.cmd("delete_task", cid="1", title="a"))
    assert out.ok and out.revision == 4 and out.record == "" and out.deleted_tasks == 0
    assert h.titles("1") == ["b"]


def test_delete_all_tasks_only_touches_that_client(h):
    h.entry(h.create_client("1"), h.create_client("12"), h.create_client("10"))
    h.entry(h.create_task("1", "x"), h.create_task("1", "2/x"), h.create_task("12", "x"),
            h.create_task("10", "x"), h.create_task("1", "0/x"))
    out = h.one(h.cmd("delete_all_tasks", cid="1"))
    assert out.ok and out.deleted_tasks == 3 and out.record == ""
    assert h.titles("1") == []
    assert h.titles("12") == ["x"] and h.titles("10") == ["x"]
    assert h.client("1") is not None  # the client itself stays
    again = h.one(h.cmd("delete_all_tasks", cid="1"))
    assert again.ok and again.deleted_tasks == 0


def test_delete_client_keeps_tasks_of_a_client_whose_cid_it_prefixes(h):
    h.entry(h.create_client("1"), h.create_client("12"), h.create_client("11"))
    h.entry(h.create_task("1", "2/x"), h.create_task("1", "a"),
            h.create_task("12", "x"), h.create_task("12", "a"), h.create_task("11", "a"))
    before_12 = {k: v for k, v in h.records().items() if b"0002" in k}
    out = h.one(h.cmd("delete_client", cid="1"))
    assert out.ok and out.deleted_tasks == 2
    assert h.client("1") is None and h.titles("1") == []
    assert h.titles("12") == ["a", "x"] and h.titles("11") == ["a"]
    assert h.client("12") is not None and h.client("11") is not None
    assert {k: v for k, v in h.records().items() if b"0002" in k} == before_12


# ---- each failure kind ------------------------------------------------------------


def test_create_client_that_exists(h):
    h.one(h.create_client("1", '{"v": 1}'))
    out = h.one(h.create_client("1", '{"v": 2}'))
    failed(out, "ALREADY_EXISTS", "1")
    assert h.client("1")["data"] == {"v": 1}


@pytest.mark.parametrize("op,fields", [
    ("update_client", {"data": "{}", "at": AT}),
    ("delete_client", {}),
    ("create_task", {"title": "t", "at": AT}),
    ("update_task", {"title": "t", "status": "done", "at": AT}),
    ("delete_task", {"title": "t"}),
    ("delete_all_tasks", {}),
])
def test_operations_on_an_unknown_client_are_not_found(h, op, fields):
    h.one(h.create_client("1"))
    h.one(h.create_task("1", "t"))
    out = h.one(h.cmd(op, cid="12", **fields))
    failed(out, "NOT_FOUND", "client 12")


def test_create_task_title_exists(h):
    h.one(h.create_client("1"))
    h.one(h.create_task("1", "t", description="first"))
    failed(h.one(h.create_task("1", "t", description="second")), "ALREADY_EXISTS", "'t'")
    assert h.task("1", "t")["description"] == "first"


@pytest.mark.parametrize("op,fields", [
    ("update_task", {"status": "done", "at": AT}),
    ("delete_task", {}),
])
def test_missing_task_is_not_found(h, op, fields):
    h.one(h.create_client("1"))
    h.one(h.create_task("1", "other"))
    failed(h.one(h.cmd(op, cid="1", title="t", **fields)), "NOT_FOUND", "'t'")


def test_update_task_with_neither_description_nor_status(h):
    h.one(h.create_client("1"))
    h.one(h.create_task("1", "t"))
    failed(h.one(h.cmd("update_task", cid="1", title="t", at=AT)), "INVALID_ARGUMENT",
           "description", "status")


@pytest.mark.parametrize("op,fields", [
    ("create_task", {"status": "finished"}),
    ("update_task", {"status": "finished"}),
    ("update_task", {"status": "Done"}),
    ("update_task", {"status": ""}),
])
def test_bad_status(h, op, fields):
    h.one(h.create_client("1"))
    h.one(h.create_task("1", "t"))
    title = "t" if op == "update_task" else "new"
    failed(h.one(h.cmd(op, cid="1", title=title, at=AT, **fields)), "INVALID_ARGUMENT",
           "status")
    assert h.task("1", "t")["status"] == "pending"


@pytest.mark.parametrize("op,fields", [
    ("create_client", {"cid": "2", "data": "{}"}),
    ("update_client", {"cid": "1", "data": "{}"}),
    ("create_task", {"cid": "1", "title": "new"}),
    ("update_task", {"cid": "1", "title": "t", "status": "done"}),
])
@pytest.mark.parametrize("at", [None, "", 5])
def test_missing_at(h, op, fields, at):
    h.one(h.create_client("1"))
    h.one(h.create_task("1", "t"))
    command = h.cmd(op, **fields)
    if at is not None:
        command["at"] = at
    failed(h.one(command), "INVALID_ARGUMENT", "at:")


@pytest.mark.parametrize("command", [
    {"op": "drop_database", "cid": "1"},
    {"op": None},
    {"cid": "1"},
    {"op": "CREATE_CLIENT", "cid": "2", "data": "{}", "at": AT},
])
def test_unknown_op(h, command):
    h.one(h.create_client("1"))
    failed(h.one({**command, "request_id": h.rid()}), "INVALID_ARGUMENT", "op")


@pytest.mark.parametrize("op,fields,word", [
    ("create_client", {"cid": "01", "data": "{}"}, "cid"),
    ("create_client", {"cid": "2", "data": "[]"}, "data"),
    ("create_client", {"cid": "2", "data": "{"}, "data"),
    ("create_task", {"cid": "1", "title": "a\nb"}, "title"),
    ("create_task", {"cid": "1", "title": ""}, "title"),
    ("create_task", {"cid": "1", "title": "x", "description": "d" * 65537}, "description"),
    ("update_task", {"cid": "1", "title": "t", "description": "\ud800"}, "description"),
])
def test_invalid_fields(h, op, fields, word):
    h.one(h.create_client("1"))
    h.one(h.create_task("1", "t"))
    failed(h.one(h.cmd(op, at=AT, **fields)), "INVALID_ARGUMENT", word)


@pytest.mark.parametrize("rid", [None, "", 17, "x" * 129, "a\nb"])
def test_missing_or_bad_request_id_refuses_the_command(h, rid):
    command = {"op": "create_client", "cid": "1", "data": "{}", "at": AT}
    if rid is not None:
        command["request_id"] = rid
    failed(h.one(command), "INVALID_ARGUMENT", "request_id")
    assert h.client("1") is None and h.records() == {}
    assert h.revision() == 0


def test_command_that_is_not_a_mapping(h):
    (out,) = h.entry(["create_client", "1"])  # type: ignore[arg-type]
    failed(out, "INVALID_ARGUMENT")
    assert h.records() == {}


# ---- revisions and atomicity ----------------------------------------------------


def test_revision_increments_only_on_success(h):
    outs = h.entry(
        h.create_client("1"),                 # ok -> 1
        h.create_client("1"),                 # exists
        h.create_task("9", "t"),              # unknown client
        h.create_task("1", "t"),              # ok -> 2
        h.cmd("bogus"),                       # unknown op
        h.create_task("1", "u"),              # ok -> 3
    )
    assert [o.ok for o in outs] == [True, False, False, True, False, True]
    assert [o.revision for o in outs] == [1, 0, 0, 2, 0, 3]
    assert h.revision() == 3
    failures = h.entry(h.create_client("1"), h.cmd("delete_task", cid="1", title="zzz"))
    assert not any(o.ok for o in failures)
    assert h.revision() == 3
    out = h.one(h.cmd("delete_task", cid="1", title="t"))
    assert out.revision == 4 == h.revision()
    assert h.task("1", "u")["revision"] == 3 and h.client("1")["revision"] == 1


@pytest.mark.parametrize("make", [
    lambda h: h.create_client("1"),
    lambda h: h.cmd("update_client", cid="3", data="{}", at=AT),
    lambda h: h.cmd("update_client", cid="1", data="[1]", at=AT),
    lambda h: h.cmd("delete_client", cid="3"),
    lambda h: h.create_task("3", "t"),
    lambda h: h.create_task("1", "t"),
    lambda h: h.cmd("update_task", cid="1", title="t", at=AT),
    lambda h: h.cmd("update_task", cid="1", title="t", status="x", at=AT),
    lambda h: h.cmd("update_task", cid="1", title="nope", status="done", at=AT),
    lambda h: h.cmd("update_task", cid="1", title="t", status="done"),
    lambda h: h.cmd("delete_task", cid="1", title="nope"),
    lambda h: h.cmd("delete_all_tasks", cid="3"),
    lambda h: h.cmd("nope", cid="1"),
    lambda h: {"op": "delete_client", "cid": "1"},
])
def test_a_failed_command_changes_no_record(h, make):
    h.entry(h.create_client("1"), h.create_client("2"))
    h.entry(h.create_task("1", "t"), h.create_task("2", "t"))
    before = h.records()
    revision = h.revision()
    out = h.one(make(h))
    assert not out.ok
    assert h.records() == before
    assert h.revision() == revision


def test_commands_in_one_entry_see_each_others_effects(h):
    outs = h.entry(
        h.create_client("1"),
        h.create_task("1", "t"),
        h.cmd("update_task", cid="1", title="t", status="done", at=LATER),
        h.create_task("1", "t"),                  # already exists (created above)
        h.cmd("delete_task", cid="1", title="t"),
        h.cmd("update_task", cid="1", title="t", status="pending", at=LATER),  # gone again
        h.create_task("1", "t", description="second life"),
    )
    assert [o.ok for o in outs] == [True, True, True, False, True, False, True]
    assert outs[3].code == "ALREADY_EXISTS" and outs[5].code == "NOT_FOUND"
    assert json.loads(outs[2].record)["status"] == "done"
    assert h.task("1", "t") == {"cid": "1", "title": "t", "description": "second life",
                                "status": "pending", "created_at": AT, "updated_at": AT,
                                "revision": 5}
    assert h.revision() == 5


def test_delete_client_in_the_same_entry_as_its_task_creation(h):
    outs = h.entry(h.create_client("1"), h.create_task("1", "a"), h.create_task("1", "b"),
                   h.cmd("delete_client", cid="1"), h.create_task("1", "c"))
    assert [o.ok for o in outs] == [True, True, True, True, False]
    assert outs[3].deleted_tasks == 2
    assert h.records() == {}


def test_one_entry_is_one_write_batch_with_its_meta_keys(h, monkeypatch):
    h.one(h.create_client("1"))
    commits = []
    real_commit = h.storage.commit
    digest_before = h.storage.digest()

    def spy(view):
        assert h.storage.digest() == digest_before, "something was written outside the batch"
        commits.append(dict(view.pending))
        real_commit(view)

    monkeypatch.setattr(h.storage, "commit", spy)
    first, second = h.create_task("1", "t"), h.create_client("1")
    outs = h.applier.apply(2, [first, second])
    assert len(commits) == 1
    batch = commits[0]
    assert batch[domain.META_APPLIED] == b"2"
    assert batch[domain.META_REVISION] == b"2"
    assert json.loads(batch[domain.log_key(2)]) == [first["request_id"], second["request_id"]]
    assert Outcome.from_json(batch[domain.request_key(first["request_id"])]) == outs[0]
    assert Outcome.from_json(batch[domain.request_key(second["request_id"])]) == outs[1]
    assert domain.task_key("1", "t") in batch
    assert h.storage.applied_index() == 2 and h.storage.revision() == 2


def test_an_empty_entry_advances_the_applied_index_only(h):
    h.one(h.create_client("1"))
    before = h.records()
    assert h.entry() == []
    assert h.storage.applied_index() == 2 and h.revision() == 1
    assert h.storage.get(domain.log_key(2)) is None
    assert h.records() == before


# ---- exactly once -----------------------------------------------------------------


def test_replay_of_an_applied_index_has_no_effect_and_returns_first_outcomes(h):
    create = h.create_client("1")
    entry2 = [h.create_task("1", "t"), h.create_task("1", "t"), h.create_task("2", "x")]
    first1 = h.entry(create)
    first2 = h.entry(*entry2)
    h.one(h.cmd("delete_task", cid="1", title="t"))  # index 3
    digest = h.storage.digest()
    assert h.applier.apply(2, entry2) == first2      # replay after a crash
    assert h.applier.apply(1, [create]) == first1
    assert h.storage.digest() == digest
    assert h.task("1", "t") is None
    assert h.storage.applied_index() == 3


def test_replay_of_the_current_index_is_a_no_op(h):
    entry = [h.create_client("1"), h.create_task("1", "t")]
    first = h.applier.apply(1, entry)
    digest = h.storage.digest()
    assert h.applier.apply(1, entry) == first
    assert h.storage.digest() == digest


def test_same_request_id_in_a_later_entry_returns_first_outcome_without_second_effect(h):
    h.one(h.create_client("1"))
    create = h.create_task("1", "t", description="v1")
    first = h.one(create)
    assert first.ok and first.revision == 2
    h.one(h.cmd("delete_task", cid="1", title="t"))  # revision 3
    records = h.records()
    retry = h.one(dict(create))  # a client retry: same request id, new Raft entry
    assert retry == first
    assert h.task("1", "t") is None  # not created a second time
    assert h.revision() == 3
    assert h.storage.applied_index() == 4
    assert h.records() == records  # only meta keys moved


def test_a_failed_outcome_is_also_remembered(h):
    command = h.create_task("1", "t")
    first = h.one(command)
    failed(first, "NOT_FOUND")
    h.one(h.create_client("1"))
    assert h.one(dict(command)) == first  # same answer even though it would now succeed
    assert h.task("1", "t") is None


def test_same_request_id_twice_in_one_entry(h):
    command = h.create_client("1")
    outs = h.entry(command, dict(command), h.create_task("1", "t"))
    assert outs[0].ok and outs[1] == outs[0] and outs[2].revision == 2
    assert h.revision() == 2


def test_index_reused_with_different_request_ids_raises_storage_corrupt(h):
    h.entry(h.create_client("1"))
    h.entry(h.create_task("1", "t"))
    digest = h.storage.digest()
    with pytest.raises(StorageCorrupt, match="Raft index 2"):
        h.applier.apply(2, [h.create_task("1", "other")])
    with pytest.raises(StorageCorrupt):
        h.applier.apply(1, [])
    assert h.storage.digest() == digest


def stored(storage, prefix: bytes) -> list[bytes]:
    return [k for k, _ in storage.items() if k.startswith(prefix)]


def test_dedupe_window_prunes_old_request_and_log_keys(storage):
    # Each entry with commands forgets the oldest beyond the last `window` of them.
    h = Harness(storage, window=3)
    commands = [h.create_client(str(i)) for i in range(1, 8)]
    for command in commands[:3]:
        h.one(command)                                         # indexes 1..3
    assert stored(storage, domain.META_LOG_PREFIX) == [domain.log_key(i) for i in (1, 2, 3)]
    h.entry()                                                  # index 4: a barrier
    for command in commands[3:6]:
        h.one(command)                                         # indexes 5..7
    assert stored(storage, domain.META_LOG_PREFIX) == [domain.log_key(i) for i in (5, 6, 7)]
    assert set(stored(storage, domain.META_REQ_PREFIX)) == {
        domain.request_key(c["request_id"]) for c in commands[3:6]}
    # Within the window a retry still gets its first answer...
    assert h.one(dict(commands[4])).duplicate                 # index 8 (forgets 5)
    # ...past it the request id is forgotten and the command runs again.
    failed(h.one(dict(commands[0])), "ALREADY_EXISTS")


def test_pruning_an_entry_keeps_the_results_a_later_entry_stored(storage):
    """Found by review: an entry lists every request id it carried, also a retry
    it answered from the table. Pruning it deleted that id's result even when a
    later entry had stored it (the id applied afresh once its first entry left
    the window): remembered for one entry instead of `dedupe_window`, and the
    next retry was applied a second time, undoing a change made in between."""
    h = Harness(storage, window=5)
    h.one(h.create_client("1"))                                # index 1
    h.one(h.create_task("1", "t", description="v0"))           # 2

    def update(description: str, rid: str | None = None) -> Outcome:
        fields = {"request_id": rid} if rid else {}
        return h.one(h.cmd("update_task", cid="1", title="t", description=description,
                           at=AT, **fields))

    assert update("v1", "R").ok                                # 3: R applied
    assert update("v1", "R").duplicate                         # 4: R answered, listed in 4
    for i in range(2, 6):
        h.one(h.create_client(str(i)))                         # 5..8: 3 leaves the window
    again = update("v1", "R")                                  # 9: R applied afresh (by design)
    assert again.ok and not again.duplicate
    assert update("v3").ok                                     # 10: 4 leaves the window
    retry = update("v1", "R")                                  # 11: R stored at 9, in the window
    assert retry.duplicate and retry.revision == again.revision
    assert h.task("1", "t")["description"] == "v3"             # not undone


def test_outcomes_say_which_entry_stored_them():
    outcome = Outcome(ok=True, revision=3, record='{"a": "b,c"}', fingerprint="f")
    assert Outcome.stored_index(outcome.to_json(42)) == 42
    assert Outcome.from_json(outcome.to_json(42)) == outcome
    assert Outcome.stored_index(outcome.to_json()) == 0  # as earlier versions stored it
    assert Outcome.from_json(outcome.to_json()) == outcome


def test_a_lowered_dedupe_window_is_reached_64_entries_at_a_time(storage):
    h = Harness(storage, window=1000)
    for i in range(1, 151):
        h.one(h.create_client(str(i)))
    h.applier.dedupe_window = 10
    h.one(h.create_client("151"))
    assert len(stored(storage, domain.META_LOG_PREFIX)) == 87  # 151 - 64
    h.one(h.create_client("152"))
    h.one(h.create_client("153"))
    assert len(stored(storage, domain.META_LOG_PREFIX)) == 10


def test_entries_without_commands_do_not_shorten_the_dedupe_window(storage):
    """Bug: the window counted Raft entries, also the empty ones (a barrier per
    group of linearizable reads, PySyncObj's no-ops), so a read-heavy load made
    the replicas forget a write's request id within minutes, and a retry of it
    (`--request-id`) was applied a second time."""
    h = Harness(storage, window=4)
    first = h.create_client("1")
    assert h.one(first).ok
    for _ in range(200):
        h.entry()                                              # barriers
    for i in range(2, 4):
        assert h.one(h.create_client(str(i))).ok
    assert h.one(h.cmd("delete_client", cid="1")).ok
    again = h.one(dict(first))                                 # the retry of the first write
    assert again.ok and again.duplicate
    assert h.client("1") is None                               # not created a second time


def test_what_is_remembered_follows_from_the_stored_keys(storage):
    """The number of entries remembered is counted from the m/log keys at
    start, not kept in the store: a member whose keys came by another rule
    (an earlier version counted every Raft entry; a snapshot from a leader
    running it) prunes down to the same last `window` entries as the others."""
    h = Harness(storage, window=100)
    for i in range(1, 41):
        h.one(h.create_client(str(i)))
    again = Harness(storage, window=3)                          # a restart, window lowered
    again.index = h.index
    again.one(again.create_client("41"))
    assert stored(storage, domain.META_LOG_PREFIX) == [domain.log_key(i) for i in (39, 40, 41)]


def test_pruning_after_a_snapshot_restore_matches_a_member_that_never_restored(tmp_path):
    """The applier keeps how many entries are remembered and where pruning
    stopped; a restore brings back other keys (here more of them, and below
    that point), which must be pruned all the same (digests equal)."""
    def run(path, restore: bool) -> str:
        store = Storage(str(path))
        try:
            h = Harness(store, window=100)
            for i in range(1, 11):
                h.one(h.create_client(str(i)))
            snapshot = str(tmp_path / f"{path.name}.snapshot")
            store.dump(snapshot, "header")                      # 10 entries remembered
            h.applier.dedupe_window = 3
            replay = [h.create_client(str(i)) for i in range(11, 21)]
            if restore:
                for command in replay:
                    h.one(dict(command))                        # pruning moves past index 10
                store.restore(snapshot)                         # back at index 10
                h.index = 10
            for command in replay:
                h.one(dict(command))
            for i in range(21, 25):
                h.one(h.create_client(str(i)))
            assert stored(store, domain.META_LOG_PREFIX) == [domain.log_key(i)
                                                             for i in (22, 23, 24)]
            return store.digest()
        finally:
            store.close()

    assert run(tmp_path / "restored", True) == run(tmp_path / "plain", False)


# ---- bad input never crashes the state machine ------------------------------


@pytest.mark.parametrize("data", ['{"k": "\\ud800"}', '{"\\udc80": 1}'])
def test_data_with_escaped_lone_surrogate_does_not_crash_apply(h, data):
    # The text is valid ASCII JSON; the escape decodes to a lone surrogate.
    # apply() raising would make every replica declare itself corrupt and stop.
    h.one(h.create_client("1"))
    commands = [h.create_client("2", data), h.cmd("update_client", cid="1", data=data, at=AT)]
    outs = h.entry(*commands)
    for out in outs:
        assert out.ok or out.code == "INVALID_ARGUMENT", out
    assert h.storage.applied_index() == 2
    assert h.one(h.create_client("3")).ok


def test_stored_records_are_strict_json(h):
    # Python's json reads 1e400 as inf and would write it back as Infinity,
    # which is not JSON: such data is refused; large finite numbers are kept.
    outs = h.entry(h.create_client("1", '{"big": 1e400}'), h.create_client("2", '{"n": -1e999}'),
                   h.create_client("3", '{"f": 1e300, "z": -0.0, "i": 12345678901234567890123}'))
    assert [out.code for out in outs[:2]] == ["INVALID_ARGUMENT", "INVALID_ARGUMENT"], outs
    assert outs[2].ok, outs[2]
    records = h.records()
    assert list(records) == [domain.client_key("3")]
    for raw in (outs[2].record, *records.values()):
        data = json.loads(raw, parse_constant=lambda name: pytest.fail(f"{name} in {raw!r}"))
        assert data.get("data", data)["i"] == 12345678901234567890123


def test_outcomes_stored_before_fingerprints_still_load():
    """Data dirs of earlier versions hold 6-field outcomes; a replica replaying
    their journal must read them (it stopped with 'expected 7, got 6')."""
    from daemons.replica.commands import Outcome

    old = b'[true,12,"{}",0,"",""]'
    outcome = Outcome.from_json(old, duplicate=True)
    assert (outcome.ok, outcome.revision, outcome.fingerprint, outcome.duplicate) == \
        (True, 12, "", True)


def test_an_entry_sealed_the_earlier_way_stores_its_results_without_index(storage):
    """Found by review: whether a result carries its index must follow from the
    entry (entry_seal's magic), not from the code of the member applying it, or
    members upgraded at different indexes store different bytes and later
    prune differently (a retry then applied on one member only)."""
    h = Harness(storage, window=3)
    (legacy,) = h.applier.apply(1, [h.create_client("1")], indexed=False)
    (indexed,) = h.applier.apply(2, [h.create_client("2")], indexed=True)
    stored = {k: v for k, v in storage.items() if k.startswith(domain.META_REQ_PREFIX)}
    assert sorted(Outcome.stored_index(v) for v in stored.values()) == [0, 2]
