"""Change events: topic layout and the JSON schema, shared by portal and listener.

Topics (QoS 1):

    tarefa/<cluster>/clients/<cid>
    tarefa/<cluster>/tasks/<cid>/<title, percent-encoded>

Titles are percent-encoded (RFC 3986, nothing kept but letters, digits and
`-._~`), so `/`, `+`, `#`, `%`, spaces and non-ASCII characters can never
add topic levels or act as MQTT wildcards.

Payload (JSON object, schema 1):

    {"schema": 1, "event": "task.updated", "cid": "7", "title": "buy milk",
     "revision": 42, "origin": "portal-client-1", "at": "2026-...Z",
     "record": {...the task after the change...}}

`"replay": true` marks a change published again: a retried request id that
the replicas had already applied gets the first attempt's answer, whose
record newer changes may have superseded (the attempt that committed it
usually reached no portal that published it, so it is published now).
Receivers take a replay as news of the revision only: they drop what they
cached of the record's key and never cache its record. The field is absent
otherwise.

`record` is absent for deletions (`client.deleted`, `task.deleted`,
`task.cleared`) and for `client.secret_rotated` (a rotation of the client's
secret: it carries the CID and revision only, never the secret or its hash;
portals drop their cached secret record of that client on it); `title` is
absent for client events and `task.cleared`.

`decode` validates everything a receiver relies on: the envelope (schema is
the integer 1, known event name, CID, title, revision in 1..2**63-1, origin
and at as text), the record's own schema (exactly the fields a replica
writes, with their types; see `_validate_record`), that the record agrees
with the event, that the event came on its own topic, and that the whole
payload nests at most `MAX_DEPTH` levels and holds only valid UTF-8 text and
finite numbers, so that nothing downstream (json.dumps, protobuf) can fail
on an accepted event. Payloads are not signed (only the broker's logins and
ACLs limit who may publish): a forged event that passes all this is still
trusted (README "Known limits").
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from daemons.core import domain
from daemons.core.errors import InvalidArgument

SCHEMA = 1
REVISION_MAX = 2**63 - 1
# An event object (1) holds a record (2) that holds client data (3..): the data
# may nest DATA_MAX_DEPTH levels itself.
MAX_DEPTH = domain.DATA_MAX_DEPTH + 2
TASK_FIELDS = ("cid", "title", "description", "status", "created_at", "updated_at",
               "revision")
CLIENT_FIELDS = ("cid", "data", "created_at", "updated_at", "revision")
CLIENT_EVENTS = ("client.created", "client.updated", "client.deleted", "client.secret_rotated")
TASK_EVENTS = ("task.created", "task.updated", "task.deleted", "task.cleared")
EVENTS = CLIENT_EVENTS + TASK_EVENTS
DELETIONS = ("client.deleted", "task.deleted", "task.cleared")
# Events that carry no record: deletions, and secret rotations (whose record,
# the hash, must never leave the replicas and the portals).
WITHOUT_RECORD = DELETIONS + ("client.secret_rotated",)


def topic_root(cluster_name: str) -> str:
    return f"tarefa/{quote(cluster_name, safe='')}"


def subscription(cluster_name: str) -> str:
    return f"{topic_root(cluster_name)}/#"


def client_subscription(cluster_name: str) -> str:
    return f"{topic_root(cluster_name)}/clients/#"


def event_topic(cluster_name: str, event: dict[str, Any]) -> str:
    root = topic_root(cluster_name)
    if event["event"] in CLIENT_EVENTS:
        return f"{root}/clients/{event['cid']}"
    if event["event"] == "task.cleared":
        return f"{root}/tasks/{event['cid']}"
    return f"{root}/tasks/{event['cid']}/{quote(event['title'], safe='')}"


def make_event(event: str, cid: str, revision: int, origin: str, at: str,
               title: str | None = None, record: dict | None = None,
               replay: bool = False) -> dict[str, Any]:
    payload: dict[str, Any] = {"schema": SCHEMA, "event": event, "cid": cid}
    if title is not None:
        payload["title"] = title
    payload.update(revision=revision, origin=origin, at=at)
    if replay:
        payload["replay"] = True
    if record is not None:
        payload["record"] = record
    return payload


def encode(event: dict[str, Any]) -> bytes:
    return _ENCODER.encode(event).encode("utf-8")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


# Built once (json.dumps/loads with options build a new coder per call): every
# portal and the listener decode every event.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)


def _parse(payload: bytes) -> tuple[Any, bool]:
    """The JSON value of `payload`, read as json.loads reads bytes, and whether its
    tree can skip _check_tree: strict UTF-8 without \\u escapes holds no lone
    surrogate, and at most MAX_DEPTH brackets cannot nest deeper (brackets inside
    strings only make the count larger). The events portals publish are such
    payloads."""
    encoding = json.detect_encoding(payload)
    simple = False
    if encoding == "utf-8":
        try:
            text = payload.decode("utf-8")
            simple = "\\u" not in text and text.count("{") + text.count("[") <= MAX_DEPTH
        except UnicodeDecodeError:
            text = payload.decode("utf-8", "surrogatepass")
    else:
        text = payload.decode(encoding, "surrogatepass")
    return _DECODER.decode(text), simple


def _check_tree(event: Any) -> None:
    """Depth at most MAX_DEPTH, every string (keys too) valid UTF-8; no recursion."""
    stack = [(event, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
            for key in item:
                _utf8(key)
        elif isinstance(item, list):
            children = item
        else:
            if isinstance(item, str):
                _utf8(item)
            continue
        if depth > MAX_DEPTH:
            raise InvalidArgument(f"payload: nested deeper than {MAX_DEPTH} levels")
        stack.extend((child, depth + 1) for child in children)


def _utf8(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument("payload: strings must be valid UTF-8 (lone surrogate "
                              "escape)") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate_record(kind: str, record: Any) -> None:
    """The record of a created/updated event: exactly the fields a replica writes."""
    if not isinstance(record, dict):
        raise InvalidArgument("record: must be an object")
    fields = TASK_FIELDS if kind in TASK_EVENTS else CLIENT_FIELDS
    for field in fields:
        if field not in record:
            raise InvalidArgument(f"record.{field}: missing")
    for field in record:
        if field not in fields:
            raise InvalidArgument(f"record.{str(field)[:64]!r}: unknown field")
    for field in ("created_at", "updated_at"):
        if not isinstance(record[field], str):
            raise InvalidArgument(f"record.{field}: must be a string")
    if not _is_int(record["revision"]):
        raise InvalidArgument("record.revision: must be an integer")
    if kind in TASK_EVENTS:
        if not isinstance(record["description"], str):
            raise InvalidArgument("record.description: must be a string")
        if len(record["description"].encode("utf-8")) > domain.DESCRIPTION_MAX_BYTES:
            raise InvalidArgument(f"record.description: at most "
                                  f"{domain.DESCRIPTION_MAX_BYTES} bytes")
        if record["status"] not in domain.STATUSES:
            raise InvalidArgument(f"record.status: must be one of "
                                  f"{', '.join(domain.STATUSES)}")
    else:
        data = record["data"]
        if not isinstance(data, dict):
            raise InvalidArgument("record.data: must be a JSON object")
        if domain.json_depth(data) > domain.DATA_MAX_DEPTH:
            raise InvalidArgument(f"record.data: nested deeper than "
                                  f"{domain.DATA_MAX_DEPTH} levels")


def decode(payload: bytes, topic: str | None = None,
           cluster_name: str | None = None) -> dict[str, Any]:
    """Parse and validate an event; raise InvalidArgument saying what is wrong."""
    try:
        event, simple = _parse(payload)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidArgument(f"not JSON: {exc}") from None
    if not isinstance(event, dict):
        raise InvalidArgument("not a JSON object")
    if not simple:
        _check_tree(event)
    schema = event.get("schema")
    if not _is_int(schema) or schema != SCHEMA:
        raise InvalidArgument(f"schema: expected {SCHEMA}, got {schema!r}")
    kind = event.get("event")
    if not isinstance(kind, str) or kind not in EVENTS:
        raise InvalidArgument(f"event: unknown {kind!r}")
    domain.validate_cid(event.get("cid"))
    revision = event.get("revision")
    if not _is_int(revision) or not 1 <= revision <= REVISION_MAX:
        raise InvalidArgument(f"revision: must be an integer from 1 to {REVISION_MAX}, "
                              f"got {revision!r}")
    for field in ("origin", "at"):
        if not isinstance(event.get(field), str):
            raise InvalidArgument(f"{field}: must be a string")
    if "replay" in event and event["replay"] is not True:
        raise InvalidArgument(f"replay: must be true when present, got {event['replay']!r}")
    needs_title = kind in TASK_EVENTS and kind != "task.cleared"
    if needs_title:
        domain.validate_title(event.get("title"))
    record = event.get("record")
    if kind in WITHOUT_RECORD:
        if record is not None:
            raise InvalidArgument(f"record: must be absent for {kind}")
    else:
        _validate_record(kind, record)
        if record["cid"] != event["cid"] or record["revision"] != revision:
            raise InvalidArgument("record: cid/revision disagree with the event")
        if needs_title and record["title"] != event["title"]:
            raise InvalidArgument("record: title disagrees with the event")
    if cluster_name is not None and topic is not None \
            and event_topic(cluster_name, event) != topic:
        raise InvalidArgument(f"published on {topic!r}, which is not this event's topic")
    return event
