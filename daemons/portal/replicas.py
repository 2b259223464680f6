"""ReplicaClient: how a portal talks to the replica tier (asyncio).

Writes: concurrent calls are grouped — whatever queued while the previous
group was in flight goes out as ONE ApplyBatch RPC (bounded in commands and
bytes), so the replica's per-call gRPC
cost is paid once per group and the whole group lands in as few Raft entries
as possible. Each group goes to the member believed to lead (a background
poll of Status keeps that belief current; a follower would forward anyway).

UNAVAILABLE / DEADLINE_EXCEEDED from one member moves on to the next with the
SAME request ids until the deadline, so a leader change or a killed member
never applies a write twice and never hangs a call. That holds for a failed
RPC and for a command the member answered it could not commit (no leader,
leader changed, no commit within the try): only those commands of the group
go again. A group runs until the latest deadline of its writes; each write
fails alone at its own. Refusals (NOT_FOUND, ALREADY_EXISTS,
INVALID_ARGUMENT) come back at once.

A write's `on_commit` runs when its group's answer says it committed, in the
group's task: also when its caller has gone meanwhile (cancelled, Ctrl-C),
so a committed change is always published.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from typing import Any, Awaitable, Callable

import grpc

from daemons.core.clock import left
from daemons.core.config import Cluster
from daemons.core.errors import TarefaError, Unavailable, error_from_code
from daemons.core.security import TlsMaterial, message_options, open_channel
from proto import replica_pb2 as pb
from proto import replica_pb2_grpc

log = logging.getLogger(__name__)

# CANCELLED: a replica's gRPC server cancels the calls that arrive while it
# stops (SIGTERM), and those still running after its grace (maybe applied);
# the portal never cancels its own calls to replicas (a write goes on when
# its caller has gone), so it comes from the member, and a retry with the
# same request id is applied at most once.
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
             grpc.StatusCode.CANCELLED)
# The same, as a command's own result in an ApplyBatch answer.
RETRYABLE_CODES = frozenset(code.name for code in RETRYABLE)
PER_TRY_TIMEOUT = 1.5
RETRY_FIRST_PAUSE = 0.02  # before sending again writes a member could not commit
RETRY_MAX_PAUSE = 0.5
REVISION_HEADER = "tarefa-revision"
MAX_GROUP = 256
# One group in flight: what queues meanwhile travels in the next, larger group.
# Measured (bench/portal.py, CreateTask(64), same session): 1 in flight gave
# 12.9 writes per Raft entry and 1,335 writes/s with 0.49 ms of replica CPU per
# write; 2 gave 5.9, 1,125/s and 0.68 ms; 4 gave 3.7, 1,113/s. A lone writer is
# not slowed (its group is sent at once either way).
MAX_GROUPS_IN_FLIGHT = 1

OnCommit = Callable[[pb.ApplyResponse], Any]


class AnswerTooLarge(Unavailable):
    """A write's answer exceeded the gRPC message limit: it may be committed."""

    def __init__(self, details: str) -> None:
        super().__init__(f"the replicas' answer was too large ({details}); the change may or "
                         "may not be applied: retry with the same request id")


class ReplicaClient:
    """Create and use on the portal's event loop."""

    def __init__(self, cluster: Cluster, owner: str, tls: TlsMaterial | None = None) -> None:
        self.owner = owner
        self._tls = tls
        self._options = message_options(cluster.limits)
        # A group is one gRPC message: keep it well under the message limit
        # (replicas refuse larger ones), whatever the size of its commands.
        self._group_bytes = cluster.limits.max_message_bytes // 2
        self.ids = [spec.id for spec in cluster.replicas]
        self._addresses = [spec.grpc_address for spec in cluster.replicas]
        self._channels: list[grpc.aio.Channel] = []
        self._stubs: list[replica_pb2_grpc.ReplicaStub] = []
        self._preferred = 0
        self._queue: collections.deque[tuple[pb.Command, asyncio.Future, float, int,
                                             OnCommit | None]] = collections.deque()
        self._groups_in_flight = 0
        self._send_scheduled = False
        self._poller: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._closing = False

    async def start(self) -> None:
        # Mutual TLS when configured: the portal proves itself with its own certificate.
        self._channels = [open_channel(a, self._tls, aio=True, present_certificate=True,
                                       options=self._options) for a in self._addresses]
        self._stubs = [replica_pb2_grpc.ReplicaStub(ch) for ch in self._channels]
        self._poller = asyncio.get_running_loop().create_task(self._poll_leader())

    async def close(self, drain: float = 0.0) -> None:
        """Stop; first wait up to `drain` seconds for the writes already sent or
        still awaited (the groups that follow included), so that what the
        replicas commit meanwhile is still published."""
        if self._poller is not None:
            self._poller.cancel()
        deadline = time.monotonic() + drain
        while True:
            self._drop_abandoned()
            if not (self._tasks or self._queue) or left(deadline) <= 0:
                break
            if self._tasks:
                await asyncio.wait(set(self._tasks), timeout=left(deadline))
            else:
                await asyncio.sleep(min(0.01, left(deadline)))  # a send is scheduled
        self._closing = True
        for task in list(self._tasks):  # past the drain: their outcome stays unknown
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=1.0)
        for channel in self._channels:
            await channel.close()

    # -- retries -------------------------------------------------------------

    async def _call(self, method: Callable[[Any, float], Awaitable[Any]], deadline: float,
                    write: bool = False) -> Any:
        """Try members in turn (preferred first) until one answers or `deadline` passes."""
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
                answer = await method(self._stubs[index], min(remaining, PER_TRY_TIMEOUT))
                if attempt > 1:
                    self._preferred = index
                return answer
            except grpc.RpcError as exc:
                if write and exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise AnswerTooLarge(exc.details() or "RESOURCE_EXHAUSTED") from None
                if exc.code() not in RETRYABLE:
                    raise _as_error(exc) from None
                last = exc
            if attempt % len(self._stubs) == 0:
                await asyncio.sleep(min(0.05, left(deadline)))
        detail = f" (last: {last.code().name}: {last.details()})" if last is not None else ""
        if write:
            raise Unavailable(f"no replica answered in time{detail}; the change may or may "
                              "not be applied: retry with the same request id")
        # Also the reads a write makes first (the caller's secret, the client's
        # existence): the write was then never sent.
        raise Unavailable(f"no replica answered in time{detail}; nothing was changed: retry")

    # -- writes (grouped) ------------------------------------------------------

    async def apply(self, command: pb.Command, timeout: float,
                    on_commit: OnCommit | None = None) -> pb.ApplyResponse:
        """Commit `command`; `on_commit(answer)` runs first, whether or not the
        caller still waits (see the module doc)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        self._queue.append((command, future, time.monotonic() + timeout, command.ByteSize(),
                            on_commit))
        if not self._send_scheduled:
            # Send at the end of this loop iteration, so that the writes of
            # every handler the loop runs now travel in one group.
            self._send_scheduled = True
            loop.call_soon(self._send_groups)
        # Each write keeps its own deadline: its group goes on until the latest
        # deadline of its members (so a caller in a hurry does not cut short
        # the others), and its on_commit still runs if it commits after this.
        timer = loop.call_later(timeout, _write_timed_out, future)
        try:
            return await future
        finally:
            timer.cancel()

    def _drop_abandoned(self) -> None:
        """Forget queued writes whose caller is gone (cancelled, or told UNAVAILABLE
        at its deadline): never sent, so never applied. Sending them later, when
        another write's group goes, would apply what its caller took as failed."""
        while self._queue and self._queue[0][1].done():
            self._queue.popleft()

    def _send_groups(self) -> None:
        self._send_scheduled = False
        if self._closing:
            return
        while self._groups_in_flight < MAX_GROUPS_IN_FLIGHT:
            self._drop_abandoned()
            if not self._queue:
                return
            command, future, deadline, size, on_commit = self._queue.popleft()
            group = [(command, future, deadline, on_commit)]
            while len(group) < MAX_GROUP:
                self._drop_abandoned()
                if not self._queue or size + self._queue[0][3] >= self._group_bytes:
                    break
                command, future, deadline, cost, on_commit = self._queue.popleft()
                group.append((command, future, deadline, on_commit))
                size += cost
            self._groups_in_flight += 1
            task = asyncio.get_running_loop().create_task(self._send_group(group))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send_group(self, group: list[tuple[pb.Command, asyncio.Future, float,
                                                  OnCommit | None]]) -> None:
        try:
            deadline = max(d for _, _, d, _ in group)
            parts = [group]
            while parts:
                await self._send_part(parts, deadline)
        finally:
            self._groups_in_flight -= 1
            self._send_groups()

    async def _send_part(self, parts: list[list[tuple[pb.Command, asyncio.Future, float,
                                                        OnCommit | None]]],
                         deadline: float) -> None:
        """Send parts[0] (taken off the list) until each of its writes is settled."""
        pending = parts.pop(0)
        attempt = 0
        while pending:
            request = pb.CommandBatch(commands=[c for c, _, _, _ in pending])
            try:
                answer = await self._call(
                    lambda stub, t: stub.ApplyBatch(request, timeout=t), deadline,
                    write=True)
            except TarefaError as exc:
                if isinstance(exc, AnswerTooLarge) and len(pending) > 1:
                    # The answer outgrew the message limit (each result
                    # carries its whole record: a status-only update answers
                    # with 64 KiB) although the commands fit, so the writes
                    # may all be committed (found by review: 39 of 40
                    # committed writes were answered INTERNAL and never
                    # published). Ask again in halves with the same request
                    # ids: what committed is answered from the replicas' memory.
                    half = len(pending) // 2
                    parts[:0] = [pending[:half], pending[half:]]
                    return
                for _, future, _, _ in pending:
                    if not future.done():
                        future.set_exception(exc)
                return
            pending = self._settle_group(pending, answer.results, deadline)
            if pending:
                # The member answered, but could not commit these (no leader,
                # leader changed, no quorum within the try): the next member
                # gets them, with the same request ids, after a backoff
                # (20 ms doubling to 0.5 s: "no leader" comes back at once
                # during an election, and the group may be large).
                self._preferred = (self._preferred + 1) % len(self._stubs)
                pause = min(RETRY_MAX_PAUSE, RETRY_FIRST_PAUSE * 2 ** attempt)
                attempt += 1
                await asyncio.sleep(min(pause, left(deadline)))

    def _settle_group(self, group: list[tuple[pb.Command, asyncio.Future, float,
                                              OnCommit | None]],
                      results: Any, deadline: float
                      ) -> list[tuple[pb.Command, asyncio.Future, float, OnCommit | None]]:
        """Hand each write its result; return those to try again on another member."""
        retry = []
        again = time.monotonic() < deadline - 0.001
        for item, result in zip(group, results):
            command, future, _, on_commit = item
            if result.code:
                if result.code in RETRYABLE_CODES and again:
                    # Also if its caller has gone: should it commit, on_commit
                    # still publishes it.
                    retry.append(item)
                elif not future.done():
                    future.set_exception(error_from_code(result.code, result.message))
                continue
            if on_commit is not None:
                try:
                    on_commit(result.response)
                except Exception:  # noqa: BLE001 - the others of the group go on
                    log.exception("%s: handling the commit of request %s failed",
                                  self.owner, command.request_id)
            if not future.done():
                future.set_result(result.response)
        return retry

    # -- reads ---------------------------------------------------------------

    async def get(self, kind: int, cid: str, title: str, timeout: float
                  ) -> tuple[dict | None, int]:
        """(record or None, store revision of the read), linearizable."""
        request = pb.GetRequest(kind=kind, cid=cid, title=title, consistency=pb.LINEARIZABLE)

        async def call(stub: Any, t: float) -> tuple[dict | None, int]:
            try:
                answer = await stub.Get(request, timeout=t)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                meta = dict(exc.trailing_metadata() or ())
                return None, int(meta.get(REVISION_HEADER, 0))
            return json.loads(answer.record), answer.revision

        return await self._call(call, time.monotonic() + timeout)

    async def scan(self, kind: int, cid: str, page_token: str, limit: int, status: str,
                   timeout: float) -> pb.ScanResponse:
        request = pb.ScanRequest(kind=kind, cid=cid, page_token=page_token, limit=limit,
                                 status=status, consistency=pb.LINEARIZABLE)
        return await self._call(lambda stub, t: stub.Scan(request, timeout=t),
                                time.monotonic() + timeout)

    # -- leader tracking -------------------------------------------------------

    async def _poll_leader(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                status = await self._stubs[self._preferred].Status(pb.StatusRequest(),
                                                                   timeout=0.5)
            except grpc.RpcError:
                self._preferred = (self._preferred + 1) % len(self._stubs)
                continue
            if status.role != "leader" and status.leader in self.ids:
                self._preferred = self.ids.index(status.leader)
            elif status.role != "leader" and not status.leader:
                # It knows no leader (cut off, or an election): try another.
                self._preferred = (self._preferred + 1) % len(self._stubs)


def _write_timed_out(future: asyncio.Future) -> None:
    if not future.done():
        future.set_exception(Unavailable(
            "no replica committed the change in time; the change may or may not be applied: "
            "retry with the same request id"))


def _as_error(exc: grpc.RpcError) -> TarefaError:
    return error_from_code(exc.code().name, exc.details() or exc.code().name)
