"""ReplicaClient: how a portal talks to the replica tier.

Writes go to the member believed to lead (a background poll of Status keeps
that belief current; a follower would forward anyway, at the cost of a hop).
UNAVAILABLE / DEADLINE_EXCEEDED from one member moves on to the next with the
SAME request id until the caller's deadline, so a leader change or a killed
member never applies a write twice and never hangs a call. Refusals
(NOT_FOUND, ALREADY_EXISTS, INVALID_ARGUMENT) come back at once.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Callable

import grpc

from daemons.core.config import Cluster
from daemons.core.errors import TarefaError, Unavailable, error_from_code
from proto import replica_pb2 as pb
from proto import replica_pb2_grpc

log = logging.getLogger(__name__)

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
PER_TRY_TIMEOUT = 1.5
REVISION_HEADER = "tarefa-revision"


class ReplicaClient:
    def __init__(self, cluster: Cluster, owner: str) -> None:
        self.owner = owner
        self.ids = [spec.id for spec in cluster.replicas]
        self._channels = [grpc.insecure_channel(spec.grpc_address) for spec in cluster.replicas]
        self._stubs = [replica_pb2_grpc.ReplicaStub(ch) for ch in self._channels]
        self._preferred = 0
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll_leader, name="leader-poll", daemon=True)

    def start(self) -> None:
        self._poller.start()

    def close(self) -> None:
        self._stop.set()
        for channel in self._channels:
            channel.close()

    # -- calls -----------------------------------------------------------------

    def _call(self, method: Callable[[Any, Any, float], Any], request: Any,
              timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        start = self._preferred
        last: grpc.RpcError | None = None
        attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0.001:
                break
            index = (start + attempt) % len(self._stubs)
            attempt += 1
            try:
                answer = method(self._stubs[index], request, min(remaining, PER_TRY_TIMEOUT))
                if attempt > 1:
                    self._preferred = index
                return answer
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE:
                    raise _as_error(exc) from None
                last = exc
            if attempt % len(self._stubs) == 0:
                time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        detail = f" (last: {last.code().name}: {last.details()})" if last is not None else ""
        raise Unavailable(f"no replica answered within {timeout:.1f}s{detail}; "
                          "the change may or may not be applied: retry with the same request id")

    def apply(self, command: pb.Command, timeout: float) -> pb.ApplyResponse:
        return self._call(lambda stub, req, t: stub.Apply(req, timeout=t), command, timeout)

    def get(self, kind: int, cid: str, title: str, timeout: float) -> tuple[dict | None, int]:
        """(record or None, store revision of the read), linearizable."""
        request = pb.GetRequest(kind=kind, cid=cid, title=title, consistency=pb.LINEARIZABLE)

        def call(stub: Any, req: Any, t: float) -> tuple[dict | None, int]:
            try:
                answer = stub.Get(req, timeout=t)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                meta = dict(exc.trailing_metadata() or ())
                return None, int(meta.get(REVISION_HEADER, 0))
            return json.loads(answer.record), answer.revision

        return self._call(call, request, timeout)

    def scan(self, kind: int, cid: str, page_token: str, limit: int, status: str,
             timeout: float) -> pb.ScanResponse:
        request = pb.ScanRequest(kind=kind, cid=cid, page_token=page_token, limit=limit,
                                 status=status, consistency=pb.LINEARIZABLE)
        return self._call(lambda stub, req, t: stub.Scan(req, timeout=t), request, timeout)

    # -- leader tracking ---------------------------------------------------------

    def _poll_leader(self) -> None:
        while not self._stop.wait(1.0):
            try:
                status = self._stubs[self._preferred].Status(pb.StatusRequest(), timeout=0.5)
            except grpc.RpcError:
                self._preferred = (self._preferred + 1) % len(self._stubs)
                continue
            except ValueError:  # channel closed during shutdown
                return
            if status.role != "leader" and status.leader in self.ids:
                self._preferred = self.ids.index(status.leader)


def _as_error(exc: grpc.RpcError) -> TarefaError:
    return error_from_code(exc.code().name, exc.details() or exc.code().name)
