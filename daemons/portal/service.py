"""The portal's gRPC servicers: proto <-> PortalOperations, errors -> status codes.

Every AdminPortal and ClientPortal call first proves who calls (auth.py:
the admin token, or the secret of the request's client), then passes the
limits (limits.py: WatchTasks streams, client write rate), and only then
does anything else.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, AsyncIterator, Callable

import grpc

from daemons.core import domain
from daemons.core.errors import TarefaError
from daemons.core.rpc import boundary, call_timeout, grpc_code, reject_undecodable
from daemons.portal.auth import Authenticator
from daemons.portal.coherence import BROKER_CHANGED, Watcher
from daemons.portal.limits import PortalLimits
from daemons.portal.operations import PortalOperations
from proto import portal_pb2 as pb
from proto import portal_pb2_grpc

log = logging.getLogger(__name__)

# How long a WatchTasks stream still delivers its client's earlier changes after
# the deletion event (events from different portals can arrive out of order;
# measured apart by a few milliseconds here) before it ends with NOT_FOUND.
DELETION_DRAIN = 0.5


def client_message(record: dict, secret: str = "") -> pb.Client:
    return pb.Client(cid=record["cid"], data=json.dumps(record["data"], ensure_ascii=False),
                     created_at=record["created_at"], updated_at=record["updated_at"],
                     revision=record["revision"], secret=secret)


def task_message(record: dict) -> pb.Task:
    return pb.Task(cid=record["cid"], title=record["title"], description=record["description"],
                   status=record["status"], created_at=record["created_at"],
                   updated_at=record["updated_at"], revision=record["revision"])


class _Servicer:
    def __init__(self, portal_id: str, ops: PortalOperations, default_timeout: float,
                 auth: Authenticator, limits: PortalLimits) -> None:
        self.daemon_id = portal_id
        self.ops = ops
        self.default_timeout = default_timeout
        self.auth = auth
        self.limits = limits

    def timeout(self, context: Any) -> float:
        return call_timeout(context, self.default_timeout)


def admin_only(method: Callable) -> Callable:
    """An AdminPortal method: the admin token is checked first, even before the
    request is decoded; then `boundary` as for any call."""
    inner = boundary(method)

    async def wrapper(self: Any, request: Any, context: Any) -> Any:
        try:
            self.auth.admin(context, method.__name__)
        except TarefaError as exc:
            await context.abort(grpc_code(exc), exc.message)
        return await inner(self, request, context)
    wrapper.__name__ = method.__name__
    return wrapper


class AdminServicer(_Servicer, portal_pb2_grpc.AdminPortalServicer):
    @admin_only
    async def CreateClient(self, request: pb.CreateClientRequest, context: Any) -> pb.Client:
        record, secret = await self.ops.create_client(request.cid, request.data,
                                                      request.request_id, self.timeout(context))
        return client_message(record, secret)

    @admin_only
    async def GetClient(self, request: pb.ClientRef, context: Any) -> pb.Client:
        return client_message(await self.ops.get_client(
            request.cid, request.consistency == pb.LINEARIZABLE, self.timeout(context)))

    @admin_only
    async def UpdateClient(self, request: pb.UpdateClientRequest, context: Any) -> pb.Client:
        return client_message(await self.ops.update_client(request.cid, request.data,
                                                     request.request_id, self.timeout(context)))

    @admin_only
    async def DeleteClient(self, request: pb.DeleteClientRequest, context: Any) -> pb.DeleteResponse:
        answer = await self.ops.delete_client(request.cid, request.request_id, self.timeout(context))
        return pb.DeleteResponse(revision=answer.revision, deleted_tasks=answer.deleted_tasks)

    @admin_only
    async def ListClients(self, request: pb.ListClientsRequest, context: Any) -> pb.ListClientsResponse:
        records, next_token = await self.ops.list_clients(request.page_token, request.limit,
                                                    self.timeout(context))
        return pb.ListClientsResponse(clients=[client_message(r) for r in records],
                                      next=next_token)

    @admin_only
    async def RotateSecret(self, request: pb.RotateSecretRequest,
                           context: Any) -> pb.RotateSecretResponse:
        secret, revision = await self.ops.rotate_secret(request.cid, request.request_id,
                                                        self.timeout(context))
        return pb.RotateSecretResponse(cid=request.cid, secret=secret, revision=revision)


# Why a WatchTasks stream opened with a secret since rotated ends.
ROTATED = "the client's secret was rotated; watch again with the new one"


class ClientServicer(_Servicer, portal_pb2_grpc.ClientPortalServicer):
    async def _caller(self, context: Any, method: str, cid: str, write: bool = False) -> None:
        """The call must carry client `cid`'s secret; a write must fit its rate."""
        await self.auth.client(context, method, cid, self.timeout(context))
        if write:
            domain.validate_cid(cid)  # a bucket only for a well-formed CID
            self.limits.writes.take(cid)

    @boundary
    async def CreateTask(self, request: pb.CreateTaskRequest, context: Any) -> pb.Task:
        await self._caller(context, "CreateTask", request.cid, write=True)
        return task_message(await self.ops.create_task(request.cid, request.title, request.description,
                                                 request.request_id, self.timeout(context)))

    @boundary
    async def GetTask(self, request: pb.TaskRef, context: Any) -> pb.Task:
        await self._caller(context, "GetTask", request.cid)
        return task_message(await self.ops.get_task(request.cid, request.title,
                                              request.consistency == pb.LINEARIZABLE,
                                              self.timeout(context)))

    @boundary
    async def UpdateTask(self, request: pb.UpdateTaskRequest, context: Any) -> pb.Task:
        await self._caller(context, "UpdateTask", request.cid, write=True)
        return task_message(await self.ops.update_task(
            request.cid, request.title,
            request.description if request.HasField("description") else None,
            request.status if request.HasField("status") else None,
            request.request_id, self.timeout(context)))

    @boundary
    async def ListTasks(self, request: pb.ListTasksRequest, context: Any) -> pb.ListTasksResponse:
        await self._caller(context, "ListTasks", request.cid)
        records, next_token = await self.ops.list_tasks(request.cid, request.page_token, request.limit,
                                                  request.status, self.timeout(context))
        return pb.ListTasksResponse(tasks=[task_message(r) for r in records], next=next_token)

    @boundary
    async def DeleteTask(self, request: pb.DeleteTaskRequest, context: Any) -> pb.DeleteResponse:
        await self._caller(context, "DeleteTask", request.cid, write=True)
        answer = await self.ops.delete_task(request.cid, request.title, request.request_id,
                                      self.timeout(context))
        return pb.DeleteResponse(revision=answer.revision)

    @boundary
    async def DeleteAllTasks(self, request: pb.DeleteAllTasksRequest,
                       context: Any) -> pb.DeleteResponse:
        await self._caller(context, "DeleteAllTasks", request.cid, write=True)
        answer = await self.ops.delete_all_tasks(request.cid, request.request_id, self.timeout(context))
        return pb.DeleteResponse(revision=answer.revision, deleted_tasks=answer.deleted_tasks)

    async def WatchTasks(self, request: pb.WatchTasksRequest,
                         context: Any) -> AsyncIterator[pb.TaskEvent]:
        await reject_undecodable(request, context)
        # Registered before the secret is checked: a rotation or deletion whose
        # event arrives while the check runs (scrypt, seconds when its pool is
        # busy) is in the queue, and ends the stream (found by review: it
        # reached nobody, and the stream went on with the old secret).
        watcher = self.ops.coherence.watch(request.cid)
        try:
            try:
                secret_revision = await self.auth.client(context, "WatchTasks", request.cid,
                                                         self.default_timeout)
                self.limits.watch.acquire(request.cid)
            except TarefaError as exc:
                await context.abort(grpc_code(exc), exc.message)
            try:
                async for message in self._watch(request, context, watcher, secret_revision):
                    yield message
            finally:
                self.limits.watch.release(request.cid)
        finally:  # the caller went away (the task is cancelled) or we aborted
            self.ops.coherence.unwatch(watcher)

    async def _watch(self, request: pb.WatchTasksRequest, context: Any, watcher: Watcher,
                     secret_revision: int) -> AsyncIterator[pb.TaskEvent]:
        try:
            client = await self.ops.require_client(request.cid, self.default_timeout)
        except TarefaError as exc:
            await context.abort(grpc_code(exc), exc.message)
        # Client events at or below the revision of the record seen here are
        # not news: the record tells them.
        seen = client["revision"]
        coherence = self.ops.coherence
        # Token mode: the secret was checked against the record of this
        # revision; a rotation, deletion or re-creation of the CID after it
        # means the stream was opened with a secret that no longer holds,
        # whatever the client record read afterwards says.
        checked = secret_revision if self.auth.enforcing else seen
        # Checked once registered: a broker change from now on reaches the queue.
        if not coherence.serving_cache:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                "this portal is not connected to the event broker; try "
                                "another portal or watch again shortly")
        # The response headers say the stream is live: a caller that waits for
        # them, then lists, misses no change.
        await context.send_initial_metadata(())
        deleted_at = 0  # the revision of this client's deletion, once seen
        ends_at = 0.0
        loop = asyncio.get_running_loop()
        while True:
            if not deleted_at:
                event = await watcher.queue.get()
            else:
                try:
                    event = await asyncio.wait_for(watcher.queue.get(),
                                                   max(0.0, ends_at - loop.time()))
                except asyncio.TimeoutError:
                    await context.abort(grpc.StatusCode.NOT_FOUND,
                                        f"client {request.cid} was deleted")
            kind = event["event"]
            if watcher.overflowed:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    "watcher fell too far behind; watch again and re-list")
            if event is BROKER_CHANGED:
                await context.abort(grpc.StatusCode.UNAVAILABLE,
                                    "this portal's event broker connection changed and "
                                    "events may have been missed; watch again and re-list")
            if checked < event["revision"] <= seen:
                if kind == "client.secret_rotated":
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, ROTATED)
                if kind in ("client.deleted", "client.created"):
                    await context.abort(grpc.StatusCode.NOT_FOUND,
                                        f"client {request.cid} was deleted")
            if kind.startswith("task."):
                # Not news: changes committed before the stream registered
                # (`watcher.after`), and those of an earlier client with this
                # CID arriving late, below this client's creation or the earlier
                # one's deletion when this portal heard of them. Not the client
                # record's revision: an update puts it above task changes made
                # after the stream registered (found by review: one such change
                # never reached the stream).
                if event["revision"] <= _task_floor(watcher, coherence.life(request.cid), seen):
                    continue
            elif event["revision"] <= seen:
                continue
            if deleted_at and event["revision"] > deleted_at:
                # After the deletion: the CID may belong to another client now.
                await context.abort(grpc.StatusCode.NOT_FOUND,
                                    f"client {request.cid} was deleted")
            if kind == "client.secret_rotated":
                # Above secret_revision: the stream was opened with the old
                # secret. At or below it: the rotation that made the one used.
                if self.auth.enforcing and event["revision"] > secret_revision:
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, ROTATED)
                continue
            if kind == "client.created":
                # Only after the watched client was deleted (its event may come
                # later, from another portal): this is another client now.
                await context.abort(grpc.StatusCode.NOT_FOUND,
                                    f"client {request.cid} was deleted and created again")
            record = event.get("record")
            yield pb.TaskEvent(
                event=kind, cid=event["cid"], title=event.get("title", ""),
                revision=event["revision"], origin=event["origin"], at=event["at"],
                task=task_message(record) if record and "title" in record else None)
            if kind == "client.deleted" and not deleted_at:
                # Events from other portals may arrive out of order: the
                # client's own changes from before its deletion still come
                # for a moment, then the stream ends.
                deleted_at, ends_at = event["revision"], loop.time() + DELETION_DRAIN


def _task_floor(watcher: Watcher, life: tuple[int, int], seen: int) -> int:
    """Task events at or below this are not news to a stream (see `_watch`):
    `life` is the client's latest creation and deletion revisions the portal
    heard of; only those at or below `seen`, the watched client's record,
    can be of this client's creation or of an earlier client (a higher one,
    real or forged, ends the stream or is ignored)."""
    return max([watcher.after, *(r for r in life if r <= seen)])


class StatusServicer(portal_pb2_grpc.PortalStatusServicer):
    def __init__(self, portal_id: str, services: tuple[str, ...], ops: PortalOperations,
                 auth: Authenticator, limits: PortalLimits) -> None:
        self.portal_id = portal_id
        self.services = services
        self.ops = ops
        self.auth = auth
        self.limits = limits

    async def Status(self, request: pb.PortalStatusRequest,
                     context: Any) -> pb.PortalStatusResponse:
        await reject_undecodable(request, context)
        return pb.PortalStatusResponse(id=self.portal_id, services=list(self.services),
                                       auth_refused=self.auth.refused,
                                       # streams past their checks (each holds a
                                       # slot; its events queue from before them)
                                       watch_streams=self.limits.watch.open,
                                       limited=self.limits.refused, **self.ops.status())
