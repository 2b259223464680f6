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

`record` is absent for deletions (`client.deleted`, `task.deleted`,
`task.cleared`); `title` is absent for client events and `task.cleared`.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from daemons.core import domain
from daemons.core.errors import InvalidArgument

SCHEMA = 1
CLIENT_EVENTS = ("client.created", "client.updated", "client.deleted")
TASK_EVENTS = ("task.created", "task.updated", "task.deleted", "task.cleared")
EVENTS = CLIENT_EVENTS + TASK_EVENTS
DELETIONS = ("client.deleted", "task.deleted", "task.cleared")


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
               title: str | None = None, record: dict | None = None) -> dict[str, Any]:
    payload: dict[str, Any] = {"schema": SCHEMA, "event": event, "cid": cid}
    if title is not None:
        payload["title"] = title
    payload.update(revision=revision, origin=origin, at=at)
    if record is not None:
        payload["record"] = record
    return payload


def encode(event: dict[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def decode(payload: bytes, topic: str | None = None,
           cluster_name: str | None = None) -> dict[str, Any]:
    """Parse and validate an event; raise InvalidArgument saying what is wrong."""
    try:
        event = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidArgument(f"not JSON: {exc}") from None
    if not isinstance(event, dict):
        raise InvalidArgument("not a JSON object")
    if event.get("schema") != SCHEMA:
        raise InvalidArgument(f"schema: expected {SCHEMA}, got {event.get('schema')!r}")
    kind = event.get("event")
    if kind not in EVENTS:
        raise InvalidArgument(f"event: unknown {kind!r}")
    domain.validate_cid(event.get("cid"))
    revision = event.get("revision")
    if not isinstance(revision, int) or isinstance(revision, bool) or revision < 1:
        raise InvalidArgument(f"revision: must be a positive integer, got {revision!r}")
    for field in ("origin", "at"):
        if not isinstance(event.get(field), str):
            raise InvalidArgument(f"{field}: must be a string")
    needs_title = kind in TASK_EVENTS and kind != "task.cleared"
    if needs_title:
        domain.validate_title(event.get("title"))
    record = event.get("record")
    if kind in DELETIONS:
        if record is not None:
            raise InvalidArgument(f"record: must be absent for {kind}")
    else:
        if not isinstance(record, dict):
            raise InvalidArgument("record: must be an object")
        if record.get("cid") != event["cid"] or record.get("revision") != revision:
            raise InvalidArgument("record: cid/revision disagree with the event")
        if needs_title and record.get("title") != event["title"]:
            raise InvalidArgument("record: title disagrees with the event")
    if cluster_name is not None and topic is not None \
            and event_topic(cluster_name, event) != topic:
        raise InvalidArgument(f"published on {topic!r}, which is not this event's topic")
    return event
