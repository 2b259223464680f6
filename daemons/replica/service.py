"""The Replica gRPC servicer: proto <-> domain, exceptions -> status codes.

No business logic here: writes go to the Proposer (Raft), reads to Storage,
behind a Raft barrier when the caller asks for LINEARIZABLE.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from typing import Any, Callable

from daemons.core import domain
from daemons.core.clock import utc_now
from daemons.core.errors import InvalidArgument, NotFound, TarefaError, error_from_code
from daemons.core.rpc import boundary, call_timeout
from daemons.replica.proposer import Proposer
from daemons.replica.state_machine import ReplicaStateMachine
from daemons.replica.storage import Storage
from proto import replica_pb2, replica_pb2_grpc

log = logging.getLogger(__name__)

SCAN_DEFAULT_LIMIT = 100
SCAN_MAX_LIMIT = 1000
_OP_NAMES = {value: name.lower() for name, value in replica_pb2.Op.items()
             if name != "OP_UNSPECIFIED"}


# Above any valid command (a client's data or a task's description of 64 KiB,
# a title of 256 characters, a CID of 1,000 digits, a request id, a time, a
# secret hash), with room to spare: anything larger is refused before it is
# proposed. A 2-4 MB command reached Raft, was refused by the apply, and
# meanwhile its replication stalled the leader's ticks: elections, UNAVAILABLE.
MAX_COMMAND_BYTES = 256 * 1024


def command_from_proto(msg: replica_pb2.Command) -> dict[str, Any]:
    """The dict the state machine applies; `at` is filled here, outside Raft."""
    size = msg.ByteSize()
    if size > MAX_COMMAND_BYTES:
        raise InvalidArgument(
            f"command: {size} bytes, larger than any valid command (data and description "
            f"are at most {domain.DATA_MAX_BYTES} bytes, a title {domain.TITLE_MAX_CHARS} "
            "characters)")
    op = _OP_NAMES.get(msg.op)
    if op is None:
        raise InvalidArgument(f"op: unknown operation {msg.op}")
    command: dict[str, Any] = {"op": op, "request_id": domain.validate_request_id(msg.request_id),
                               "cid": msg.cid, "at": msg.at or utc_now()}
    if op in ("create_client", "update_client"):
        command["data"] = msg.data
    if op in ("create_task", "update_task", "delete_task"):
        command["title"] = msg.title
    if msg.HasField("description"):
        command["description"] = msg.description
    if msg.HasField("status"):
        command["status"] = msg.status
    if op in ("create_client", "rotate_secret") and msg.HasField("secret"):
        # Hex text: the command must survive JSON (dedupe table) and the Raft log.
        command["secret"] = {"salt": msg.secret.salt.hex(), "hash": msg.secret.hash.hex(),
                             "n": msg.secret.n, "r": msg.secret.r, "p": msg.secret.p}
    return command


def _encode_token(key: bytes) -> str:
    return base64.urlsafe_b64encode(key).decode("ascii")


def _decode_token(token: str, prefix: bytes) -> bytes | None:
    if not token:
        return None
    try:
        key = base64.urlsafe_b64decode(token.encode("ascii"))
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise InvalidArgument("page_token: not a token this service issued") from None
    if not key.startswith(prefix):
        raise InvalidArgument("page_token: belongs to another listing")
    return key


class ReplicaServicer(replica_pb2_grpc.ReplicaServicer):
    def __init__(self, replica_id: str, node: ReplicaStateMachine, storage: Storage,
                 proposer: Proposer, default_timeout: float,
                 counters: Callable[[], tuple[int, int]],
                 page_bytes: int | None = None) -> None:
        self.daemon_id = replica_id
        # A Scan page stays within this many bytes of records (half the message
        # limit), so a page of large records never exceeds the gRPC limit of the
        # replica's answer or of the portal's.
        self.page_bytes = page_bytes
        self.node = node
        self.storage = storage
        self.proposer = proposer
        self.default_timeout = default_timeout
        self.counters = counters

    def _timeout(self, context: Any) -> float:
        return call_timeout(context, self.default_timeout)

    async def _barrier(self, consistency: int, context: Any) -> None:
        if consistency == replica_pb2.LINEARIZABLE:
            await self.proposer.propose(None, self._timeout(context))
        elif consistency != replica_pb2.SERIALIZABLE:
            # An unknown value was served as a local read, possibly stale.
            raise InvalidArgument(f"consistency: LINEARIZABLE or SERIALIZABLE (got {consistency})")

    @boundary
    async def Apply(self, request: replica_pb2.Command, context: Any) -> Any:
        command = command_from_proto(request)
        outcome = await self.proposer.propose(command, self._timeout(context))
        assert outcome is not None
        if not outcome.ok:
            raise error_from_code(outcome.code, outcome.message)
        return replica_pb2.ApplyResponse(revision=outcome.revision, record=outcome.record,
                                         deleted_tasks=outcome.deleted_tasks,
                                         duplicate=outcome.duplicate)

    @boundary
    async def ApplyBatch(self, request: replica_pb2.CommandBatch, context: Any) -> Any:
        results: list[replica_pb2.CommandResult | None] = [None] * len(request.commands)
        commands, positions = [], []
        for i, msg in enumerate(request.commands):
            try:
                commands.append(command_from_proto(msg))
                positions.append(i)
            except TarefaError as exc:
                results[i] = replica_pb2.CommandResult(code=exc.code, message=exc.message)
        if not commands:  # nothing valid to commit: the refusals are the answer
            return replica_pb2.ApplyBatchResponse(results=results)
        outcomes = await self.proposer.propose_many(commands, self._timeout(context))
        for i, outcome in zip(positions, outcomes):
            if isinstance(outcome, TarefaError):
                results[i] = replica_pb2.CommandResult(code=outcome.code, message=outcome.message)
            elif not outcome.ok:
                results[i] = replica_pb2.CommandResult(code=outcome.code, message=outcome.message)
            else:
                results[i] = replica_pb2.CommandResult(response=replica_pb2.ApplyResponse(
                    revision=outcome.revision, record=outcome.record,
                    deleted_tasks=outcome.deleted_tasks, duplicate=outcome.duplicate))
        return replica_pb2.ApplyBatchResponse(results=results)

    @boundary
    async def Get(self, request: replica_pb2.GetRequest, context: Any) -> Any:
        cid = domain.validate_cid(request.cid)
        if request.kind == replica_pb2.CLIENT:
            key, what = domain.client_key(cid), f"client {cid}"
        elif request.kind == replica_pb2.TASK:
            title = domain.validate_title(request.title)
            key, what = domain.task_key(cid, title), f"task {title!r} of client {cid}"
        elif request.kind == replica_pb2.SECRET:
            key, what = domain.secret_key(cid), f"secret record of client {cid}"
        else:
            raise InvalidArgument("kind: CLIENT, TASK or SECRET")
        await self._barrier(request.consistency, context)
        value, revision = self.storage.read(key)
        if value is None:
            # The revision lets a portal tell a stale "not found" from a fresh one.
            context.set_trailing_metadata((("tarefa-revision", str(revision)),))
            raise NotFound(f"{what} not found")
        return replica_pb2.GetResponse(record=value.decode("utf-8"), revision=revision)

    @boundary
    async def Scan(self, request: replica_pb2.ScanRequest, context: Any) -> Any:
        limit = request.limit or SCAN_DEFAULT_LIMIT
        if limit > SCAN_MAX_LIMIT:
            raise InvalidArgument(f"limit: at most {SCAN_MAX_LIMIT}")
        if request.kind == replica_pb2.CLIENT:
            prefix = domain.CLIENT_PREFIX
        elif request.kind == replica_pb2.TASK:
            prefix = domain.task_prefix(domain.validate_cid(request.cid))
        else:
            raise InvalidArgument("kind: CLIENT or TASK")
        if request.status:
            if request.kind != replica_pb2.TASK:
                # Client records have no status (it answered INTERNAL: KeyError).
                raise InvalidArgument("status: a filter of TASK scans only")
            domain.validate_status(request.status)
        start_after = _decode_token(request.page_token, prefix)
        await self._barrier(request.consistency, context)
        if request.kind == replica_pb2.TASK:  # on every page: the client may be gone since
            value, _ = self.storage.read(domain.client_key(request.cid))
            if value is None:
                raise NotFound(f"client {request.cid} not found")
        pairs, more, revision = self.storage.page(
            prefix, start_after, limit,
            keep=(lambda raw: json.loads(raw)["status"] == request.status)
            if request.status else None, max_bytes=self.page_bytes)
        return replica_pb2.ScanResponse(
            records=[value.decode("utf-8") for _, value in pairs],
            next=_encode_token(pairs[-1][0]) if more and pairs else "",
            revision=revision)

    @boundary
    async def Status(self, request: replica_pb2.StatusRequest, context: Any) -> Any:
        status = self.node.status()
        warnings, criticals = self.counters()
        return replica_pb2.StatusResponse(
            id=self.daemon_id, role=status["role"], leader=status["leader"],
            term=status["term"], commit_index=status["commit_index"],
            applied_index=status["applied_index"], revision=self.storage.revision(),
            journal_bytes=status["journal_bytes"], has_quorum=status["has_quorum"],
            log_entries=status["log_entries"], raft_warnings=warnings,
            raft_criticals=criticals,
            peers=[replica_pb2.PeerStatus(**p) for p in status["peers"]])
