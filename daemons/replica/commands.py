"""What each command does to the data: pure functions over a BatchView.

`execute(view, command, revision)` validates one command (the replica never
trusts its caller) and either stages its effects in `view` and returns an
`Outcome` carrying the new revision, or stages nothing and returns the
failure. Deterministic: no clock, no randomness, no I/O but the view.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable

from daemons.core import domain
from daemons.core.errors import AlreadyExists, InvalidArgument, NotFound, TarefaError
from daemons.replica.storage import BatchView

OPS = ("create_client", "update_client", "delete_client", "create_task", "update_task",
       "delete_task", "delete_all_tasks", "rotate_secret")


@dataclass(frozen=True)
class Outcome:
    """The result of one command, as stored in the dedupe table."""

    ok: bool
    revision: int = 0
    record: str = ""
    deleted_tasks: int = 0
    code: str = ""
    message: str = ""
    # True when answering a retry from the dedupe table; never stored.
    duplicate: bool = field(default=False, compare=False)
    # fingerprint() of the command that produced this outcome (stored).
    fingerprint: str = field(default="", compare=False)

    def to_json(self, index: int = 0) -> bytes:
        """As stored in the dedupe table; `index`: the Raft entry that applied it
        (last, so that `stored_index` reads it without parsing the record)."""
        fields = [self.ok, self.revision, self.record, self.deleted_tasks, self.code,
                  self.message, self.fingerprint]
        if index:
            fields.append(index)
        return _OUTCOME_JSON.encode(fields).encode()

    @classmethod
    def from_json(cls, raw: bytes, duplicate: bool = False) -> "Outcome":
        fields = json.loads(raw)
        if len(fields) == 6:
            # Written before outcomes carried a fingerprint (data dirs of earlier
            # versions): "" means unknown, see EntryApplier.
            fields.append("")
        ok, revision, record, deleted, code, message, fingerprint = fields[:7]
        return cls(ok, revision, record, deleted, code, message, duplicate, fingerprint)

    @staticmethod
    def stored_index(raw: bytes) -> int:
        """The Raft index that applied a stored outcome; 0 if it was stored by an
        earlier version, which did not record it."""
        tail = raw[raw.rfind(b",") + 1:-1]
        return int(tail) if tail.isdigit() else 0

    @classmethod
    def failure(cls, exc: TarefaError, fingerprint: str = "") -> "Outcome":
        return cls(ok=False, code=exc.code, message=exc.message, fingerprint=fingerprint)


def fingerprint(cmd: Any) -> str:
    """What a request id stands for: the command without its timestamp.

    A secret record is left out on purpose: a portal makes a new one for every
    call, so a caller's retry of CreateClient/RotateSecret with the same request
    id must still count as the same command (it gets the first answer)."""
    if not isinstance(cmd, dict):
        return ""
    what = [cmd.get(k) for k in ("op", "cid", "title", "data", "description", "status")]
    return hashlib.sha256(json.dumps(what, ensure_ascii=True).encode()).hexdigest()[:32]


# Built once: json.dumps with any option builds a new JSONEncoder per call, a
# noticeable share of an apply that runs on every replica for every write.
_OUTCOME_JSON = json.JSONEncoder(separators=(",", ":"))
_RECORD_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _dump(record: dict) -> bytes:
    return _RECORD_JSON.encode(record).encode("utf-8")


def _put(view: BatchView, key: bytes, record: dict) -> bytes:
    """Stage `record` under `key`; return its stored bytes (the caller's answer too)."""
    raw = _dump(record)
    view.put(key, raw)
    return raw


def _load(raw: bytes) -> dict:
    return json.loads(raw)


def _client_raw(view: BatchView, cid: str) -> bytes:
    raw = view.get(domain.client_key(cid))
    if raw is None:
        raise NotFound(f"client {cid} not found")
    return raw


def _require_client(view: BatchView, cid: str) -> None:
    """The client must exist (its record is not parsed: most commands need only that)."""
    _client_raw(view, cid)


def _field(cmd: dict, name: str, default: str) -> object:
    value = cmd.get(name)
    return default if value is None else value


def _require_at(cmd: dict) -> str:
    at = cmd.get("at")
    if not isinstance(at, str) or not at:
        raise InvalidArgument("at: required (the change's timestamp)")
    return at


def _secret_record(cmd: dict, cid: str, revision: int) -> dict | None:
    """The stored form of the command's secret hash (hex), validated; None if absent."""
    secret = cmd.get("secret")
    if secret is None:
        return None
    if not isinstance(secret, dict):
        raise InvalidArgument("secret: must be a mapping")
    try:
        salt, digest = bytes.fromhex(secret.get("salt")), bytes.fromhex(secret.get("hash"))
    except (TypeError, ValueError):
        raise InvalidArgument("secret.salt, secret.hash: must be hexadecimal text") from None
    n, r, p = secret.get("n"), secret.get("r"), secret.get("p")
    domain.validate_secret_hash(salt, digest, n, r, p)
    return {"cid": cid, "salt": salt.hex(), "hash": digest.hex(), "n": n, "r": r, "p": p,
            "revision": revision}


def create_client(view: BatchView, cmd: dict, revision: int) -> tuple[bytes, int]:
    cid = domain.validate_cid(cmd.get("cid"))
    data = domain.parse_client_data(cmd.get("data"))
    at = _require_at(cmd)
    secret = _secret_record(cmd, cid, revision)  # absent in auth: cid-only mode
    key = domain.client_key(cid)
    if view.get(key) is not None:
        raise AlreadyExists(f"client {cid} already exists")
    record = {"cid": cid, "data": data, "created_at": at, "updated_at": at, "revision": revision}
    raw = _put(view, key, record)
    if secret is not None:
        view.put(domain.secret_key(cid), _dump(secret))
    return raw, 0


def rotate_secret(view: BatchView, cmd: dict, revision: int) -> tuple[bytes | None, int]:
    """Replace the client's secret record; the client record itself is unchanged."""
    cid = domain.validate_cid(cmd.get("cid"))
    secret = _secret_record(cmd, cid, revision)
    if secret is None:
        raise InvalidArgument("secret: required")
    _require_client(view, cid)
    view.put(domain.secret_key(cid), _dump(secret))
    return None, 0


def update_client(view: BatchView, cmd: dict, revision: int) -> tuple[bytes, int]:
    cid = domain.validate_cid(cmd.get("cid"))
    data = domain.parse_client_data(cmd.get("data"))
    at = _require_at(cmd)
    record = _load(_client_raw(view, cid))
    record.update(data=data, updated_at=at, revision=revision)
    return _put(view, domain.client_key(cid), record), 0


def _delete_tasks(view: BatchView, cid: str) -> int:
    keys = view.keys_with_prefix(domain.task_prefix(cid))
    for key in keys:
        view.delete(key)
    return len(keys)


def delete_client(view: BatchView, cmd: dict, revision: int) -> tuple[bytes | None, int]:
    cid = domain.validate_cid(cmd.get("cid"))
    _require_client(view, cid)
    view.delete(domain.client_key(cid))
    view.delete(domain.secret_key(cid))
    return None, _delete_tasks(view, cid)


def create_task(view: BatchView, cmd: dict, revision: int) -> tuple[bytes, int]:
    cid = domain.validate_cid(cmd.get("cid"))
    title = domain.validate_title(cmd.get("title"))
    description = domain.validate_description(_field(cmd, "description", ""))
    status = domain.validate_status(_field(cmd, "status", "pending"))
    at = _require_at(cmd)
    _require_client(view, cid)
    key = domain.task_key(cid, title)
    if view.get(key) is not None:
        raise AlreadyExists(f"task {title!r} already exists for client {cid}")
    record = {"cid": cid, "title": title, "description": description, "status": status,
              "created_at": at, "updated_at": at, "revision": revision}
    return _put(view, key, record), 0


def update_task(view: BatchView, cmd: dict, revision: int) -> tuple[bytes, int]:
    cid = domain.validate_cid(cmd.get("cid"))
    title = domain.validate_title(cmd.get("title"))
    description = cmd.get("description")
    status = cmd.get("status")
    domain.validate_task_update(description, status)
    at = _require_at(cmd)
    _require_client(view, cid)
    key = domain.task_key(cid, title)
    raw = view.get(key)
    if raw is None:
        raise NotFound(f"task {title!r} not found for client {cid}")
    record = _load(raw)
    if description is not None:
        record["description"] = description
    if status is not None:
        record["status"] = status
    record.update(updated_at=at, revision=revision)
    return _put(view, key, record), 0


def delete_task(view: BatchView, cmd: dict, revision: int) -> tuple[bytes | None, int]:
    cid = domain.validate_cid(cmd.get("cid"))
    title = domain.validate_title(cmd.get("title"))
    _require_client(view, cid)
    key = domain.task_key(cid, title)
    if view.get(key) is None:
        raise NotFound(f"task {title!r} not found for client {cid}")
    view.delete(key)
    return None, 0


def delete_all_tasks(view: BatchView, cmd: dict, revision: int) -> tuple[bytes | None, int]:
    cid = domain.validate_cid(cmd.get("cid"))
    _require_client(view, cid)
    return None, _delete_tasks(view, cid)


# A handler stages its effects and returns (the stored bytes of the record it
# wrote or None, the number of tasks it deleted).
HANDLERS: dict[str, Callable[[BatchView, dict, int], tuple[bytes | None, int]]] = {
    "create_client": create_client,
    "update_client": update_client,
    "delete_client": delete_client,
    "create_task": create_task,
    "update_task": update_task,
    "delete_task": delete_task,
    "delete_all_tasks": delete_all_tasks,
    "rotate_secret": rotate_secret,
}


def execute(view: BatchView, cmd: Any, revision: int, mark: str = "") -> Outcome:
    """Stage one command's effects at `revision`; on failure stage nothing.

    `mark` is the command's fingerprint(), carried by the outcome either way."""
    if not isinstance(cmd, dict):
        return Outcome.failure(InvalidArgument("command: must be a mapping"), mark)
    handler = HANDLERS.get(cmd.get("op"))  # type: ignore[arg-type]
    if handler is None:
        return Outcome.failure(InvalidArgument(f"op: unknown operation {cmd.get('op')!r}"),
                               mark)
    try:
        raw, deleted = handler(view, cmd, revision)
        encoded = raw.decode("utf-8") if raw is not None else ""
    except TarefaError as exc:
        return Outcome.failure(exc, mark)
    except (ValueError, TypeError, UnicodeError, RecursionError, ArithmeticError) as exc:
        # Handlers stage nothing before they are sure to succeed, so refusing
        # here leaves the view as it was; the same input fails on every replica.
        return Outcome.failure(InvalidArgument(f"command cannot be applied: {exc}"), mark)
    return Outcome(ok=True, revision=revision, record=encoded, deleted_tasks=deleted,
                   fingerprint=mark)
