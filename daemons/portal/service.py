"""The portal's gRPC servicers: proto <-> PortalOperations, errors -> status codes."""

from __future__ import annotations

import json
import logging
from typing import Any, AsyncIterator

import grpc

from daemons.core.errors import TarefaError
from daemons.core.rpc import boundary, call_timeout, grpc_code, reject_undecodable
from daemons.portal.operations import PortalOperations
from proto import portal_pb2 as pb
from proto import portal_pb2_grpc

log = logging.getLogger(__name__)


def client_message(record: dict) -> pb.Client:
    return pb.Client(cid=record["cid"], data=json.dumps(record["data"], ensure_ascii=False),
                     created_at=record["created_at"], updated_at=record["updated_at"],
                     revision=record["revision"])


def task_message(record: dict) -> pb.Task:
    return pb.Task(cid=record["cid"], title=record["title"], description=record["description"],
                   status=record["status"], created_at=record["created_at"],
                   updated_at=record["updated_at"], revision=record["revision"])


class _Servicer:
    def __init__(self, portal_id: str, ops: PortalOperations, default_timeout: float) -> None:
        self.daemon_id = portal_id
        self.ops = ops
        self.default_timeout = default_timeout

    def timeout(self, context: Any) -> float:
        return call_timeout(context, self.default_timeout)


class AdminServicer(_Servicer, portal_pb2_grpc.AdminPortalServicer):
    @boundary
    async def CreateClient(self, request: pb.CreateClientRequest, context: Any) -> pb.Client:
        return client_message(await self.ops.create_client(request.cid, request.data,
                                                     request.request_id, self.timeout(context)))

    @boundary
    async def GetClient(self, request: pb.ClientRef, context: Any) -> pb.Client:
        return client_message(await self.ops.get_client(
            request.cid, request.consistency == pb.LINEARIZABLE, self.timeout(context)))

    @boundary
    async def UpdateClient(self, request: pb.UpdateClientRequest, context: Any) -> pb.Client:
        return client_message(await self.ops.update_client(request.cid, request.data,
                                                     request.request_id, self.timeout(context)))

    @boundary
    async def DeleteClient(self, request: pb.DeleteClientRequest, context: Any) -> pb.DeleteResponse:
        answer = await self.ops.delete_client(request.cid, request.request_id, self.timeout(context))
        return pb.DeleteResponse(revision=answer.revision, deleted_tasks=answer.deleted_tasks)

    @boundary
    async def ListClients(self, request: pb.ListClientsRequest, context: Any) -> pb.ListClientsResponse:
        records, next_token = await self.ops.list_clients(request.page_token, request.limit,
                                                    self.timeout(context))
        return pb.ListClientsResponse(clients=[client_message(r) for r in records],
                                      next=next_token)


class ClientServicer(_Servicer, portal_pb2_grpc.ClientPortalServicer):
    @boundary
    async def CreateTask(self, request: pb.CreateTaskRequest, context: Any) -> pb.Task:
        return task_message(await self.ops.create_task(request.cid, request.title, request.description,
                                                 request.request_id, self.timeout(context)))

    @boundary
    async def GetTask(self, request: pb.TaskRef, context: Any) -> pb.Task:
        return task_message(await self.ops.get_task(request.cid, request.title,
                                              request.consistency == pb.LINEARIZABLE,
                                              self.timeout(context)))

    @boundary
    async def UpdateTask(self, request: pb.UpdateTaskRequest, context: Any) -> pb.Task:
        return task_message(await self.ops.update_task(
            request.cid, request.title,
            request.description if request.HasField("description") else None,
            request.status if request.HasField("status") else None,
            request.request_id, self.timeout(context)))

    @boundary
    async def ListTasks(self, request: pb.ListTasksRequest, context: Any) -> pb.ListTasksResponse:
        records, next_token = await self.ops.list_tasks(request.cid, request.page_token, request.limit,
                                                  request.status, self.timeout(context))
        return pb.ListTasksResponse(tasks=[task_message(r) for r in records], next=next_token)

    @boundary
    async def DeleteTask(self, request: pb.DeleteTaskRequest, context: Any) -> pb.DeleteResponse:
        answer = await self.ops.delete_task(request.cid, request.title, request.request_id,
                                      self.timeout(context))
        return pb.DeleteResponse(revision=answer.revision)

    @boundary
    async def DeleteAllTasks(self, request: pb.DeleteAllTasksRequest,
                       context: Any) -> pb.DeleteResponse:
        answer = await self.ops.delete_all_tasks(request.cid, request.request_id, self.timeout(context))
        return pb.DeleteResponse(revision=answer.revision, deleted_tasks=answer.deleted_tasks)

    async def WatchTasks(self, request: pb.WatchTasksRequest,
                         context: Any) -> AsyncIterator[pb.TaskEvent]:
        await reject_undecodable(request, context)
        try:
            await self.ops.require_client(request.cid, self.default_timeout)
        except TarefaError as exc:
            await context.abort(grpc_code(exc), exc.message)
        coherence = self.ops.coherence
        watcher = coherence.watch(request.cid)
        try:
            while True:
                event = await watcher.queue.get()
                if watcher.overflowed:
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                        "watcher fell too far behind; watch again and re-list")
                record = event.get("record")
                yield pb.TaskEvent(
                    event=event["event"], cid=event["cid"], title=event.get("title", ""),
                    revision=event["revision"], origin=event["origin"], at=event["at"],
                    task=task_message(record) if record and "title" in record else None)
        finally:  # the caller went away (the task is cancelled) or we aborted
            coherence.unwatch(watcher)


class StatusServicer(portal_pb2_grpc.PortalStatusServicer):
    def __init__(self, portal_id: str, services: tuple[str, ...], ops: PortalOperations) -> None:
        self.portal_id = portal_id
        self.services = services
        self.ops = ops

    async def Status(self, request: pb.PortalStatusRequest,
                     context: Any) -> pb.PortalStatusResponse:
        await reject_undecodable(request, context)
        return pb.PortalStatusResponse(id=self.portal_id, services=list(self.services),
                                       **self.ops.status())
