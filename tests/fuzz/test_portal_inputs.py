"""Hostile input on every portal RPC, against the real stack.

The property (`test_every_rpc_with_hostile_fields`): whatever the fields hold —
arbitrary text, CIDs with signs, leading zeros, other scripts' digits or 1,000
digits, invalid JSON, JSON arrays and scalars as client data, titles full of
`/ + # \\0` and control characters, empty and huge values — every call gets a
well-defined status code (OK, INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS; never
INTERNAL or UNKNOWN), a value the README's validation rules refuse gets
INVALID_ARGUMENT naming the field, no daemon dies or logs a traceback, and a
refused call (or any read) leaves the state as it was: every client, the
fuzzed client's tasks and every replica's revision, all read linearizably.

The oracle below is written from the README's rules, not from domain.py. It is
three-valued: a field is valid, invalid, or a case the README leaves open
(e.g. no-break spaces in titles, over-long request ids), where any of the
well-defined codes is accepted.

Strings that are not UTF-8 (lone surrogates) cannot be built with protobuf:
the Python client refuses to serialize them (`test_surrogates_cannot_be_sent_
through_a_protobuf_client`), so they are sent as hand-built wire bytes through
a generic `channel.unary_unary`.
"""

from __future__ import annotations

import base64
import itertools
import json
import math
import re
import unicodedata
import uuid
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from proto import portal_pb2 as pb
from proto import replica_pb2
from tests.fuzz.conftest import FuzzStack
from tests.harness import wait_for

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.data_too_large])

BASE_CID = "31415926535897932384626433832795"
BASE_TITLES = ["plain", "a/b+c#d %2F", "emoji 🎉 ação", "  spaced  "]
CALL_TIMEOUT = 10.0
WATCH_SECONDS = 0.3
FRESH = "<fresh request id>"  # replaced by a new uuid at call time: ids are never reused

Code = grpc.StatusCode
WELL_DEFINED = {Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.ALREADY_EXISTS}
WRITES = {"CreateClient", "UpdateClient", "DeleteClient", "CreateTask", "UpdateTask",
          "DeleteTask", "DeleteAllTasks"}
ADMIN = {"CreateClient": pb.CreateClientRequest, "GetClient": pb.ClientRef,
         "UpdateClient": pb.UpdateClientRequest, "DeleteClient": pb.DeleteClientRequest,
         "ListClients": pb.ListClientsRequest}
CLIENT = {"CreateTask": pb.CreateTaskRequest, "GetTask": pb.TaskRef,
          "UpdateTask": pb.UpdateTaskRequest, "ListTasks": pb.ListTasksRequest,
          "DeleteTask": pb.DeleteTaskRequest, "DeleteAllTasks": pb.DeleteAllTasksRequest,
          "WatchTasks": pb.WatchTasksRequest}

_fresh = itertools.count()


# ---- calling the portals -----------------------------------------------------------


def call(env: FuzzStack, method: str, request: Any, portal: int = 0,
         timeout: float = CALL_TIMEOUT) -> tuple[grpc.StatusCode, str, Any]:
    """(status code, details, answer) of one call; WatchTasks is read until its deadline."""
    if method in ADMIN:
        stub = env.admin
    else:
        stub = env.client_portals[portal].client
    try:
        if method == "WatchTasks":
            for _ in stub.WatchTasks(request, timeout=WATCH_SECONDS):
                pass
            return Code.OK, "", None
        return Code.OK, "", getattr(stub, method)(request, timeout=timeout)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", None


def raw_call(env: FuzzStack, service: str, method: str, payload: bytes,
             ) -> tuple[grpc.StatusCode, str]:
    """Send hand-built wire bytes, bypassing protobuf serialization on our side."""
    portal = env.stack.portal("portal-admin") if service == "AdminPortal" \
        else env.client_portals[0]
    rpc = portal.channel.unary_unary(f"/tarefa.portal.{service}/{method}")
    try:
        rpc(payload, timeout=CALL_TIMEOUT)
        return Code.OK, ""
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""


def list_clients(env: FuzzStack) -> list[pb.Client]:
    out: list[pb.Client] = []
    token = ""
    for _ in range(1000):
        page = env.admin.ListClients(pb.ListClientsRequest(page_token=token, limit=1000),
                                     timeout=CALL_TIMEOUT)
        out.extend(page.clients)
        token = page.next
        if not token:
            return out
    raise AssertionError("ListClients did not terminate")


def list_tasks(env: FuzzStack, cid: str) -> list[pb.Task]:
    out: list[pb.Task] = []
    token = ""
    for _ in range(1000):
        page = env.client_portals[0].client.ListTasks(
            pb.ListTasksRequest(cid=cid, page_token=token, limit=1000), timeout=CALL_TIMEOUT)
        out.extend(page.tasks)
        token = page.next
        if not token:
            return out
    raise AssertionError("ListTasks did not terminate")


def replica_revisions(env: FuzzStack) -> tuple[int, ...]:
    """Each replica's revision after a Raft barrier (a LINEARIZABLE scan), then its Status."""
    out = []
    for member in env.stack.members:
        scan = member.stub.Scan(replica_pb2.ScanRequest(
            kind=replica_pb2.CLIENT, limit=1, consistency=replica_pb2.LINEARIZABLE),
            timeout=CALL_TIMEOUT)
        out.append(scan.revision)
        out.append(member.status(timeout=CALL_TIMEOUT).revision)
    return tuple(out)


def snapshot(env: FuzzStack) -> dict[str, Any]:
    """Linearizable view of what a call could change."""
    return {"revisions": replica_revisions(env), "clients": list_clients(env),
            "tasks": list_tasks(env, BASE_CID)}


def assert_same_state(before: dict[str, Any], after: dict[str, Any], what: str) -> None:
    assert after["revisions"] == before["revisions"], \
        f"{what}: replica revisions moved {before['revisions']} -> {after['revisions']}"
    assert after["clients"] == before["clients"], f"{what}: the client list changed"
    assert after["tasks"] == before["tasks"], f"{what}: client {BASE_CID}'s tasks changed"


@pytest.fixture(scope="module")
def world(fuzz_stack: FuzzStack) -> FuzzStack:
    """The fuzzed client and a few tasks with awkward titles."""
    env = fuzz_stack
    env.admin.CreateClient(pb.CreateClientRequest(cid=BASE_CID, data='{"name": "fuzz"}'),
                           timeout=CALL_TIMEOUT)
    for title in BASE_TITLES:
        env.client_portals[0].client.CreateTask(
            pb.CreateTaskRequest(cid=BASE_CID, title=title, description="d"),
            timeout=CALL_TIMEOUT)
    return env


# ---- the oracle (from the README's validation rules) -------------------------------

VALID, INVALID, OPEN = "valid", "invalid", "open"
_BIDI_OVERRIDES = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def cid_verdict(cid: str, generated_if_empty: bool = False) -> str:
    if cid == "" and generated_if_empty:
        return VALID
    ok = re.fullmatch(r"[1-9][0-9]*", cid) is not None and len(cid) <= 1000
    return VALID if ok else INVALID


def title_verdict(title: str) -> str:
    if not title or len(title) > 256:
        return INVALID
    if any(unicodedata.category(ch) in ("Cc", "Zl", "Zp") or ch in _BIDI_OVERRIDES
           for ch in title):
        return INVALID  # control characters, line separators, bidirectional overrides
    if all(ch == " " or unicodedata.category(ch)[0] in "LMNPS" for ch in title):
        return VALID  # letters, marks, digits, punctuation (/ + # …), symbols (emoji), space
    return OPEN  # other spaces, format characters, unassigned code points


def _refuse_constant(name: str) -> None:
    raise ValueError(name)


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(text)
    return value


def _has_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return any(0xD800 <= ord(ch) <= 0xDFFF for ch in value)
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    return False


def _depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    return 0


def data_verdict(data: str) -> str:
    """The text of a JSON object, at most 64 KiB, no NaN or out-of-range numbers."""
    if len(data.encode("utf-8")) > 64 * 1024:
        return INVALID
    try:
        value = json.loads(data, parse_constant=_refuse_constant, parse_float=_finite)
    except (ValueError, RecursionError):
        return INVALID
    if not isinstance(value, dict) or _has_lone_surrogate(value):
        return INVALID
    return VALID if _depth(value) < 100 else OPEN


def description_verdict(description: str | None) -> str:
    if description is None:
        return VALID
    return VALID if len(description.encode("utf-8")) <= 64 * 1024 else INVALID


def status_verdict(status: str | None, empty_ok: bool) -> str:
    if status is None or (empty_ok and status == ""):
        return VALID
    return VALID if status in ("pending", "done") else INVALID


def request_id_verdict(request_id: str) -> str:
    # The README says only that a write may carry one; limits are not documented.
    return VALID if request_id in ("", FRESH) else OPEN


def field_verdicts(method: str, f: dict[str, Any]) -> dict[str, str]:
    v: dict[str, str] = {}
    if "cid" in f:
        v["cid"] = cid_verdict(f["cid"], generated_if_empty=(method == "CreateClient"))
    if "title" in f:
        v["title"] = title_verdict(f["title"])
    if "data" in f:
        v["data"] = data_verdict(f["data"])
    if "description" in f:
        v["description"] = description_verdict(f["description"])
    if "status" in f:
        v["status"] = status_verdict(f["status"], empty_ok=(method == "ListTasks"))
    if "request_id" in f:
        v["request_id"] = request_id_verdict(f["request_id"])
    if "limit" in f:
        v["limit"] = INVALID if f["limit"] > 1000 else VALID
    if "page_token" in f:
        v["page_token"] = VALID if f["page_token"] == "" else OPEN
    if "consistency" in f:
        v["consistency"] = VALID if f["consistency"] in (0, 1) else OPEN
    if method == "UpdateTask" and f.get("description") is None and f.get("status") is None:
        v["description"] = INVALID  # nothing to update
    return v


# ---- strategies ----------------------------------------------------------------------

CID_SAMPLES = ["", "0", "00", "07", "007", "+7", "-7", " 7", "7 ", "7\n", "7\x00", "\u0667",
               "\uff17", "\u00b2", "1e3", "0x7", "7.0", "1_000", "-0", "+0", "9" * 1000,
               "9" * 1001, "0" + "9" * 999, "1" + "0" * 999, "1" * 5000, BASE_CID,
               "0" + BASE_CID, "+" + BASE_CID, BASE_CID + " "]
hostile_cids = st.one_of(
    st.sampled_from(CID_SAMPLES),
    st.text(max_size=12),
    st.from_regex(r"[+\- 0]{0,2}[0-9]{1,25}[ \n]?", fullmatch=True),
    st.integers(min_value=1, max_value=10**30).map(str),
)
any_cid = st.one_of(st.just(BASE_CID), st.just(BASE_CID), hostile_cids)
foreign_cid = hostile_cids.filter(lambda c: c != BASE_CID)

TITLE_CHARS = ("/+#\x00 \t\n\r\x1b\x7f\x85\u00a0\u200b\u200d\u2028\u2029\u202e\u2066\ufeff"
               "%.~aZ9é🎉\U000e0001")
TITLE_SAMPLES = ["", " ", "/", "#", "+", "%2F", "a/b", "a/b+c#d %2F", "\x00", "a\x00b",
                 "x" * 256, "x" * 257, "🎉" * 256, "🎉" * 257, "e\u0301" * 128, "\u202eevil",
                 "line\nbreak", "tab\tin", "\u2028", "../..", "t/0000/x", *BASE_TITLES]
valid_titles = st.text(st.characters(categories=["L", "M", "N", "P", "S"],
                                     include_characters=" /+#%"), min_size=1, max_size=64)
titles = st.one_of(valid_titles, valid_titles, st.sampled_from(TITLE_SAMPLES),
                   st.text(max_size=300),
                   st.text(alphabet=st.sampled_from(TITLE_CHARS), min_size=0, max_size=40))

DESCRIPTION_SAMPLES = ["", "\x00" * 10, "x" * 65536, "x" * 65537, "é" * 32768, "é" * 32769,
                       "🎉" * 16384, "🎉" * 16385, "\r\n\t\x1b[31m red"]
descriptions = st.one_of(st.text(max_size=100), st.sampled_from(DESCRIPTION_SAMPLES))

json_leaves = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20),
                        st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
json_values = st.recursive(
    json_leaves,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.text(max_size=8), children, max_size=4)),
    max_leaves=15)
DATA_SAMPLES = ["", " ", "null", "[]", "[1, 2]", "1", "-0", '"text"', "true", "{", '{"a":}',
                '{"a": NaN}', '{"a": Infinity}', '{"a": -Infinity}', '{"a": 1e999}',
                '{"a": -1e999}', '{"a": 1e308}', '{"a": "\\ud800"}', '{"\\udfff": 1}',
                "{'a': 1}", '{"a": 1,}', '{"a": 1}{}', '{"a": 1} x', " {} ", "{}\x00",
                '{"a": 1, "a": 2}', "\ufeff{}", '{"a": "\\u0000"}', '{"": 0}',
                '{"n": ' + "9" * 5000 + "}", '{"n": ' + "9" * 4000 + "}",
                json.dumps({"x": "y" * 70_000}), json.dumps({"x": "y" * 65_520}),
                "{" * 5000, "[" * 5000, "[" * 100 + "]" * 100,
                '{"a": ' + "[" * 50 + "]" * 50 + "}"]
client_data = st.one_of(
    st.dictionaries(st.text(max_size=10), json_values, max_size=5).map(json.dumps),
    st.dictionaries(st.text(max_size=10), json_values, max_size=5).map(
        lambda d: json.dumps(d, ensure_ascii=False)),
    json_values.map(json.dumps),
    st.text(max_size=40),
    st.sampled_from(DATA_SAMPLES),
)
request_ids = st.one_of(st.just(FRESH), st.just(""),
                        st.sampled_from(["x" * 129, "a\nb", "\x00", "\u2028", " " * 3,
                                         "é" * 128]))
statuses = st.one_of(st.sampled_from(["pending", "done", "", "PENDING", "Done", "pending ",
                                      "done\x00", "all", "*"]), st.text(max_size=10))
limits = st.one_of(st.sampled_from([0, 1, 2, 1000, 1001, 2**31, 2**32 - 1]),
                   st.integers(0, 2**32 - 1))
page_tokens = st.one_of(st.just(""), st.text(max_size=40),
                        st.sampled_from(["=", "====", "Yy8=", "dC8=", "////", "YQ",
                                         base64.urlsafe_b64encode(b"c/").decode(),
                                         base64.urlsafe_b64encode(b"m/applied").decode(),
                                         base64.urlsafe_b64encode(b"c/\xff\xff").decode()]))
consistencies = st.sampled_from([0, 1, 0, 1, 7])


def maybe(strategy: st.SearchStrategy) -> st.SearchStrategy:
    """An optional proto3 field: absent or a value."""
    return st.one_of(st.none(), strategy)


CALLS = st.one_of(
    st.tuples(st.just("CreateClient"), st.fixed_dictionaries(
        {"cid": st.one_of(st.just(""), any_cid), "data": client_data, "request_id": request_ids})),
    st.tuples(st.just("GetClient"), st.fixed_dictionaries(
        {"cid": any_cid, "consistency": consistencies})),
    st.tuples(st.just("UpdateClient"), st.fixed_dictionaries(
        {"cid": any_cid, "data": client_data, "request_id": request_ids})),
    st.tuples(st.just("DeleteClient"), st.fixed_dictionaries(
        {"cid": foreign_cid, "request_id": request_ids})),
    st.tuples(st.just("ListClients"), st.fixed_dictionaries(
        {"page_token": page_tokens, "limit": limits})),
    st.tuples(st.just("CreateTask"), st.fixed_dictionaries(
        {"cid": any_cid, "title": titles, "description": descriptions,
         "request_id": request_ids})),
    st.tuples(st.just("GetTask"), st.fixed_dictionaries(
        {"cid": any_cid, "title": titles, "consistency": consistencies})),
    st.tuples(st.just("UpdateTask"), st.fixed_dictionaries(
        {"cid": any_cid, "title": titles, "description": maybe(descriptions),
         "status": maybe(statuses), "request_id": request_ids})),
    st.tuples(st.just("ListTasks"), st.fixed_dictionaries(
        {"cid": any_cid, "page_token": page_tokens, "limit": limits, "status": statuses})),
    st.tuples(st.just("DeleteTask"), st.fixed_dictionaries(
        {"cid": any_cid, "title": titles.filter(lambda t: t not in BASE_TITLES),
         "request_id": request_ids})),
    st.tuples(st.just("DeleteAllTasks"), st.fixed_dictionaries(
        {"cid": foreign_cid, "request_id": request_ids})),
    st.tuples(st.just("WatchTasks"), st.fixed_dictionaries({"cid": any_cid})),
)


def build(method: str, fields: dict[str, Any]) -> Any:
    kwargs = {k: v for k, v in fields.items() if v is not None}
    if kwargs.get("request_id") == FRESH:
        kwargs["request_id"] = f"fuzz-{next(_fresh)}-{uuid.uuid4().hex}"
    return {**ADMIN, **CLIENT}[method](**kwargs)


# ---- the property --------------------------------------------------------------------


@FUZZ
@given(call_spec=CALLS, portal=st.sampled_from([0, 1]))
def test_every_rpc_with_hostile_fields(world: FuzzStack, watch: Any, call_spec: tuple,
                                       portal: int) -> None:
    env = world
    method, fields = call_spec
    before = snapshot(env)
    watch.mark()
    request = build(method, fields)
    code, details, answer = call(env, method, request, portal)
    event(f"{method} -> {code.name}")

    verdicts = field_verdicts(method, fields)
    invalid = sorted(name for name, v in verdicts.items() if v == INVALID)
    allowed = WELL_DEFINED | ({Code.DEADLINE_EXCEEDED} if method == "WatchTasks" else set())
    assert code in allowed, f"{method}: {code.name}: {details}"
    if invalid:
        assert code == Code.INVALID_ARGUMENT, \
            f"{method}: {invalid} break the README's rules, yet {code.name} {details!r}"
        doubtful = [name for name, v in verdicts.items() if v != VALID]
        assert any(name in details for name in doubtful), \
            f"{method}: INVALID_ARGUMENT should name one of {doubtful}: {details!r}"
    elif all(v == VALID for v in verdicts.values()):
        assert code != Code.INVALID_ARGUMENT, f"{method}: valid input refused: {details!r}"

    if code == Code.OK and method in WRITES:
        check_answer(env, method, fields, answer)
    else:
        assert_same_state(before, snapshot(env), f"{method} answered {code.name}")
    watch.assert_clean()


def check_answer(env: FuzzStack, method: str, fields: dict[str, Any], answer: Any) -> None:
    """An accepted write answers with what was asked, and a linearizable read agrees."""
    lin = pb.LINEARIZABLE
    if method in ("CreateTask", "UpdateTask"):
        assert (answer.cid, answer.title) == (fields["cid"], fields["title"])
        if fields.get("description") is not None:
            assert answer.description == fields["description"]
        if fields.get("status") is not None:
            assert answer.status == fields["status"]
        read = env.client_portals[1].client.GetTask(
            pb.TaskRef(cid=fields["cid"], title=fields["title"], consistency=lin),
            timeout=CALL_TIMEOUT)
        assert read == answer
    elif method in ("CreateClient", "UpdateClient"):
        if fields["cid"]:
            assert answer.cid == fields["cid"]
        assert json.loads(answer.data) == json.loads(fields["data"])
        read = env.admin.GetClient(pb.ClientRef(cid=answer.cid, consistency=lin),
                                   timeout=CALL_TIMEOUT)
        assert read == answer


@settings(FUZZ, max_examples=60)
@given(title=valid_titles.filter(lambda t: t not in BASE_TITLES),
       description=st.one_of(st.text(max_size=100),
                             st.sampled_from(["", "\x00" * 10, "\r\n\t\x1b[31m red",
                                              "é" * 16_000, "🎉" * 8_000, "x" * 30_000])))
def test_accepted_awkward_titles_round_trip_through_every_portal(
        world: FuzzStack, watch: Any, title: str, description: str) -> None:
    """Titles with `/ + # %`, accents, marks and emoji, descriptions with NUL and control
    characters (kept under 64 KiB per Raft entry: larger ones hit the bug of
    `test_bug_large_non_ascii_write_makes_every_follower_log_a_traceback`): created
    through one portal, read back identical through both portals (cached and
    linearizable) and in the listing; deleted through the other portal and then gone
    from both caches (the event went over MQTT with the title percent-encoded)."""
    env = world
    watch.mark()
    first, second = (p.client for p in env.client_portals)
    # test_every_rpc_with_hostile_fields shares the stack and keeps the tasks its
    # accepted CreateTask calls made (e.g. '0'); start this title from nothing.
    call(env, "DeleteTask", pb.DeleteTaskRequest(cid=BASE_CID, title=title))
    code, details, created = call(env, "CreateTask", pb.CreateTaskRequest(
        cid=BASE_CID, title=title, description=description))
    assert code == Code.OK, f"{title!r}: {code.name} {details}"
    for stub in (first, second):
        for consistency in (pb.CACHED, pb.LINEARIZABLE):
            read = stub.GetTask(pb.TaskRef(cid=BASE_CID, title=title, consistency=consistency),
                                timeout=CALL_TIMEOUT)
            assert read == created
    assert created in list_tasks(env, BASE_CID)
    second.DeleteTask(pb.DeleteTaskRequest(cid=BASE_CID, title=title), timeout=CALL_TIMEOUT)
    assert call(env, "GetTask", pb.TaskRef(cid=BASE_CID, title=title), portal=1)[0] == \
        Code.NOT_FOUND
    wait_for(lambda: call(env, "GetTask", pb.TaskRef(cid=BASE_CID, title=title),
                          portal=0)[0] == Code.NOT_FOUND,
             5, "the deletion event to reach the other portal's cache")
    watch.assert_clean()


def test_bug_large_non_ascii_write_makes_every_follower_log_a_traceback(
        world: FuzzStack, watch: Any) -> None:
    """Regression: a valid write whose Raft entry is 64 KiB or more (here a description of
    32,768 x "é" = 64 KiB of UTF-8, the documented maximum) makes every follower log
    "ERROR pysyncobj.syncobj: failed _onTick in _autoTickThread" with a traceback
    (UnpicklingError / UnicodeDecodeError "unexpected end of data"). PySyncObj sends such
    an entry in 64 KiB chunks and labels the 'finish' chunk by comparing the offset with
    len(command) instead of len(pickled entry); its pickle (protocol 2) stores bytes as
    latin-1 text, so non-ASCII content nearly doubles the pickled size and the follower
    unpickles a truncated entry. It recovers on the next chunk, so the write succeeds,
    but every such entry (also a large group-commit batch) costs a traceback per
    follower. Fix: an appendEntriesBatchSizeBytes larger than any entry, or a patched
    PySyncObj."""
    env = world
    watch.mark()
    code, details, created = call(env, "CreateTask", pb.CreateTaskRequest(
        cid=BASE_CID, title="large non-ASCII description", description="é" * 32_768))
    assert code == Code.OK, (code, details)
    for member in env.stack.members:  # every replica has applied it
        wait_for(lambda m=member: m.status().revision >= created.revision, 10,
                 f"{member.id} to apply revision {created.revision}")
    watch.assert_clean()


# ---- raw wire bytes ------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def wire_fields(fields: list[tuple[int, bytes]]) -> bytes:
    """Length-delimited fields (string/bytes wire type) with arbitrary contents."""
    return b"".join(_varint(number << 3 | 2) + _varint(len(value)) + value
                    for number, value in fields)


RAW_METHODS = [("AdminPortal", m) for m in ADMIN] + \
    [("ClientPortal", m) for m in CLIENT if m != "WatchTasks"]
raw_payloads = st.one_of(
    st.binary(max_size=64),
    st.lists(st.tuples(st.integers(1, 6), st.one_of(
        st.binary(max_size=16),
        st.sampled_from([b"\xff", b"\xed\xa0\x80", b"\xc0\x80", b"7\xff", b"\xf4\x90\x80\x80",
                         b"{}", b"7", BASE_CID.encode()]))), max_size=4).map(wire_fields),
)


@FUZZ
@given(method=st.sampled_from(RAW_METHODS), payload=raw_payloads)
def test_raw_wire_bytes_get_a_well_defined_status(world: FuzzStack, watch: Any,
                                                  method: tuple[str, str],
                                                  payload: bytes) -> None:
    """Undecodable requests (bad UTF-8, surrogates, broken wire format) are refused too."""
    service, name = method
    before = snapshot(world)
    watch.mark()
    code, details = raw_call(world, service, name, payload)
    event(f"{name} -> {code.name}")
    assert code in WELL_DEFINED, f"{service}/{name} {payload!r}: {code.name}: {details}"
    if code != Code.OK or name not in WRITES:
        assert_same_state(before, snapshot(world), f"{name} answered {code.name}")
    watch.assert_clean()


def test_bug_bad_utf8_in_a_string_field_answers_unknown_and_logs_a_traceback(
        world: FuzzStack, watch: Any) -> None:
    """Regression: a string field holding bytes that are not UTF-8 (here a lone surrogate
    encoded as ED A0 80, and FF) fails protobuf parsing inside grpc's server, which answers
    UNKNOWN ("Unexpected <class DecodeError>") and logs an ERROR with a traceback. It should
    be INVALID_ARGUMENT with a message, and nothing in the log but a warning at most."""
    before = snapshot(world)
    cases = [("AdminPortal", "GetClient", wire_fields([(1, b"\xff")])),
             ("AdminPortal", "CreateClient",
              wire_fields([(1, b"7"), (2, b'{"a": "\xed\xa0\x80"}')])),
             ("ClientPortal", "CreateTask",
              wire_fields([(1, BASE_CID.encode()), (2, b"t\xed\xa0\x80")])),
             ("ClientPortal", "ListTasks", b"\x0a\x05"),  # a field cut short
             ]
    answers = [(name, *raw_call(world, service, name, payload)) for service, name, payload in cases]
    assert_same_state(before, snapshot(world), "undecodable requests")
    wrong = [(name, code.name, details[:100]) for name, code, details in answers
             if code != Code.INVALID_ARGUMENT]
    assert not wrong, f"undecodable requests must be INVALID_ARGUMENT: {wrong}"
    watch.assert_clean()


def test_surrogates_cannot_be_sent_through_a_protobuf_client() -> None:
    """Documents why lone surrogates only reach a portal as raw bytes: protobuf refuses
    to serialize them on the client side, for every string field of every request."""
    for request_type in [*ADMIN.values(), *CLIENT.values()]:
        for field in request_type.DESCRIPTOR.fields:
            if field.type != field.TYPE_STRING:
                continue
            with pytest.raises((UnicodeEncodeError, ValueError)):
                request_type(**{field.name: "a\ud800b"}).SerializeToString()


# ---- targeted cases ------------------------------------------------------------------


def test_oversized_request_is_refused_cleanly(world: FuzzStack, watch: Any) -> None:
    """A 5 MiB description is past gRPC's 4 MiB receive limit: a clean refusal."""
    before = snapshot(world)
    code, details, _ = call(world, "CreateTask", pb.CreateTaskRequest(
        cid=BASE_CID, title="huge", description="x" * (5 * 1024 * 1024)))
    assert code in (Code.RESOURCE_EXHAUSTED, Code.INVALID_ARGUMENT), (code, details)
    assert_same_state(before, snapshot(world), "an oversized request")
    watch.assert_clean()


def test_bug_client_data_nested_near_the_recursion_limit(world: FuzzStack,
                                                          watch: Any) -> None:
    """Regression: client data nested ~980 deep passes the portal's validation (json.loads
    at its stack depth) and is committed by the replicas, but encoding the change event
    (two levels deeper) raises RecursionError: the caller gets INTERNAL for a write that
    WAS applied, no event is published, the portal logs a traceback, and LINEARIZABLE
    GetClient of that client answers INTERNAL from then on. Every depth must be either
    accepted and readable, or refused with INVALID_ARGUMENT and not applied."""
    env = world
    wrong = []
    for depth in range(940, 1001):
        cid = f"2718281828{depth:04d}"
        data = '{"a": ' + "[" * depth + "]" * depth + "}"
        revisions = replica_revisions(env)
        code, details, _ = call(env, "CreateClient", pb.CreateClientRequest(cid=cid,
                                                                          data=data))
        reads = {c: call(env, "GetClient", pb.ClientRef(cid=cid, consistency=c))[0]
                 for c in (pb.CACHED, pb.LINEARIZABLE)}
        if code == Code.OK:
            if set(reads.values()) != {Code.OK}:
                wrong.append(f"depth {depth}: created, but reads answer {reads}")
        elif code == Code.INVALID_ARGUMENT:
            if reads[pb.LINEARIZABLE] != Code.NOT_FOUND or replica_revisions(env) != revisions:
                wrong.append(f"depth {depth}: refused, yet applied (reads {reads})")
        else:
            wrong.append(f"depth {depth}: {code.name} {details!r}; then reads answer "
                         f"{ {k: v.name for k, v in reads.items()} }")
    problems = watch.problems()  # the listener cannot audit some of these events either
    assert not wrong and not problems, "\n".join(wrong + problems)


def test_bug_request_id_reused_for_another_command(world: FuzzStack, watch: Any) -> None:
    """Regression: a request id is remembered with its first answer only, not with the
    command it belonged to. Sent again with ANOTHER command, the portal gets the first
    command's stored answer: CreateTask answers INTERNAL (it turns a client record into a
    Task: KeyError 'title', traceback in the log), DeleteClient answers OK although
    nothing was deleted, CreateClient of another CID answers OK with the first client,
    UpdateClient answers OK without updating; and the portal publishes events whose
    record contradicts them, which every other portal rejects. A reused id with a
    different command must be refused (or really do what it says)."""
    env = world
    first, second = "161803398874989484820", "161803398874989484821"
    rid = f"reused-{uuid.uuid4().hex}"
    created = env.admin.CreateClient(pb.CreateClientRequest(cid=first, data="{}",
                                                            request_id=rid),
                                     timeout=CALL_TIMEOUT)
    assert created.cid == first
    lin = pb.LINEARIZABLE
    wrong = []

    code, details, _ = call(env, "CreateTask", pb.CreateTaskRequest(
        cid=first, title="t", request_id=rid))
    if code not in WELL_DEFINED:
        wrong.append(f"CreateTask with a reused id: {code.name} {details!r}")
    elif code == Code.OK and call(env, "GetTask", pb.TaskRef(cid=first, title="t",
                                                             consistency=lin))[0] != Code.OK:
        wrong.append("CreateTask with a reused id answered OK but created nothing")

    code, details, _ = call(env, "UpdateClient", pb.UpdateClientRequest(
        cid=first, data='{"v": 2}', request_id=rid))
    if code not in WELL_DEFINED:
        wrong.append(f"UpdateClient with a reused id: {code.name} {details!r}")
    elif code == Code.OK:
        read = env.admin.GetClient(pb.ClientRef(cid=first, consistency=lin),
                                   timeout=CALL_TIMEOUT)
        if json.loads(read.data) != {"v": 2}:
            wrong.append(f"UpdateClient with a reused id answered OK; data is {read.data}")

    code, details, _ = call(env, "CreateClient", pb.CreateClientRequest(
        cid=second, data="{}", request_id=rid))
    if code not in WELL_DEFINED:
        wrong.append(f"CreateClient with a reused id: {code.name} {details!r}")
    elif code == Code.OK and call(env, "GetClient", pb.ClientRef(cid=second,
                                                                 consistency=lin))[0] != Code.OK:
        wrong.append(f"CreateClient {second} with a reused id answered OK, "
                     "but the client does not exist")

    code, details, _ = call(env, "DeleteClient", pb.DeleteClientRequest(cid=first,
                                                                        request_id=rid))
    if code not in WELL_DEFINED:
        wrong.append(f"DeleteClient with a reused id: {code.name} {details!r}")
    elif code == Code.OK and call(env, "GetClient", pb.ClientRef(cid=first,
                                                                 consistency=lin))[0] != \
            Code.NOT_FOUND:
        wrong.append("DeleteClient with a reused id answered OK, but the client still exists")

    problems = watch.problems()
    assert not wrong and not problems, "\n".join(wrong + problems)


def test_bug_list_tasks_page_token_of_a_deleted_client_is_not_refused(
        world: FuzzStack, watch: Any) -> None:
    """Regression: "every call names the CID; an unknown CID is refused with NOT_FOUND",
    but ListTasks with a page token skips the client check (the replica's Scan checks the
    client only on the first page): paging through a client deleted meanwhile answers OK
    with no tasks and no next token, as if the listing had simply ended."""
    env = world
    cid = "141421356237309504880"
    env.admin.CreateClient(pb.CreateClientRequest(cid=cid, data="{}"), timeout=CALL_TIMEOUT)
    tasks = env.client_portals[0].client
    for title in ("one", "two", "three"):
        tasks.CreateTask(pb.CreateTaskRequest(cid=cid, title=title), timeout=CALL_TIMEOUT)
    page = tasks.ListTasks(pb.ListTasksRequest(cid=cid, limit=1), timeout=CALL_TIMEOUT)
    assert len(page.tasks) == 1 and page.next
    env.admin.DeleteClient(pb.DeleteClientRequest(cid=cid), timeout=CALL_TIMEOUT)
    code, _, answer = call(env, "ListTasks", pb.ListTasksRequest(
        cid=cid, limit=1, page_token=page.next))
    assert code == Code.NOT_FOUND, \
        f"ListTasks of deleted client {cid} with a page token: {code.name} {answer}"
    watch.assert_clean()
