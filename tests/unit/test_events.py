"""events.decode: what a receiver accepts and what it rejects (and names)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from daemons.core import events
from daemons.core.errors import InvalidArgument

CID = "7"
AT = "2026-01-01T00:00:00.000Z"


def task_event(revision: int = 42, **record_changes: Any) -> dict:
    record = {"cid": CID, "title": "buy milk", "description": "3 litres", "status": "done",
              "created_at": AT, "updated_at": AT, "revision": revision, **record_changes}
    return events.make_event("task.updated", CID, revision, "portal-1", AT, title="buy milk",
                             record=record)


def client_event(revision: int = 42, **record_changes: Any) -> dict:
    record = {"cid": CID, "data": {"name": "Ana"}, "created_at": AT, "updated_at": AT,
              "revision": revision, **record_changes}
    return events.make_event("client.updated", CID, revision, "portal-1", AT, record=record)


def raw(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def rejected(payload: bytes) -> str:
    with pytest.raises(InvalidArgument) as info:
        events.decode(payload)
    return info.value.message


def test_valid_events_round_trip() -> None:
    for ev in (task_event(), client_event(),
               events.make_event("task.cleared", CID, 5, "p", AT),
               events.make_event("task.deleted", CID, 5, "p", AT, title="x"),
               events.make_event("client.deleted", CID, 5, "p", AT)):
        assert events.decode(events.encode(ev), events.event_topic("c", ev), "c") == ev


def test_a_replay_says_so_and_nothing_else_passes_for_one() -> None:
    ev = events.make_event("task.updated", CID, 42, "portal-1", AT, title="buy milk",
                           record=task_event()["record"], replay=True)
    assert ev["replay"] is True and events.decode(events.encode(ev)) == ev
    assert "replay" not in task_event()
    for value in (False, 1, "true", None):
        assert rejected(raw({**task_event(), "replay": value})).startswith("replay:")


@pytest.mark.parametrize("revision", [1, 2**63 - 1])
def test_revision_bounds_accepted(revision: int) -> None:
    assert events.decode(raw(task_event(revision)))["revision"] == revision


@pytest.mark.parametrize("revision", [0, -1, 2**63, 2**64, True])
def test_revision_out_of_range_rejected(revision: Any) -> None:
    assert rejected(raw(task_event(revision))).startswith("revision:")


def test_schema_must_be_the_integer_one() -> None:
    for schema in (True, 1.0, "1", 2):
        ev = task_event()
        ev["schema"] = schema
        assert rejected(raw(ev)).startswith("schema:")


@pytest.mark.parametrize("field", events.TASK_FIELDS)
def test_task_record_field_missing_is_named(field: str) -> None:
    ev = task_event()
    del ev["record"][field]
    assert f"record.{field}" in rejected(raw(ev))


@pytest.mark.parametrize("field", events.CLIENT_FIELDS)
def test_client_record_field_missing_is_named(field: str) -> None:
    ev = client_event()
    del ev["record"][field]
    assert f"record.{field}" in rejected(raw(ev))


@pytest.mark.parametrize("make,field,value", [
    (task_event, "description", 5), (task_event, "description", None),
    (task_event, "description", "x" * (64 * 1024 + 1)),
    (task_event, "status", "exploded"), (task_event, "status", None),
    (task_event, "created_at", 5), (task_event, "updated_at", None),
    (task_event, "revision", "42"), (task_event, "extra", 1),
    (client_event, "data", '{"name": "Ana"}'), (client_event, "data", [1, 2]),
    (client_event, "data", None), (client_event, "created_at", []),
])
def test_record_field_wrong_is_named(make: Any, field: str, value: Any) -> None:
    ev = make()
    ev["record"][field] = value
    message = rejected(raw(ev))
    assert field in message, message


def test_nesting_is_bounded_without_recursion_error() -> None:
    ok = client_event()
    nested: Any = {}
    for _ in range(events.MAX_DEPTH - 3):  # event > record > data > ... levels
        nested = {"n": nested}
    ok["record"]["data"] = nested
    events.decode(raw(ok))
    for depth in (events.MAX_DEPTH + 1, 500, 990, 5000):
        ev = task_event()
        text = json.dumps(ev)[:-2] + ', "nested": ' + "[" * depth + "]" * depth + "}}"
        message = rejected(text.encode())
        assert "nested deeper" in message or "not JSON" in message or "unknown" in message
    ev = client_event()
    ev["record"]["data"] = {"a": json.loads("[" * 80 + "]" * 80)}
    assert "nested deeper" in rejected(raw(ev))


def test_lone_surrogates_and_non_finite_numbers_rejected() -> None:
    ev = client_event()
    ev["record"]["data"] = {"x": "\ud800"}
    assert "UTF-8" in rejected(json.dumps(ev).encode())
    ev = task_event()
    ev["record"]["description"] = "\udfff"
    assert "UTF-8" in rejected(json.dumps(ev).encode())
    for number in (b"NaN", b"Infinity", b"1e400"):
        text = json.dumps(client_event()).replace('"Ana"', number.decode()).encode()
        assert rejected(text).startswith("not JSON")
