"""PortalOperations: what each admin and client call does, without gRPC.

Validates input (INVALID_ARGUMENT names the field), builds commands with a
request id and timestamp, sends them through the ReplicaClient, and after
commit updates the cache and publishes the change event. Reads come from the
cache when it may serve (connected to the broker, entry fresh) and otherwise
from the replicas with a linearizable read, cached only if no newer change
has been seen meanwhile.
"""

from __future__ import annotations

import json
import secrets
import uuid
from typing import Any

from daemons.core import domain, events
from daemons.core.clock import utc_now
from daemons.core.errors import AlreadyExists, InvalidArgument, NotFound, Unavailable
from daemons.portal.cache import Key, client_key, task_key
from daemons.portal.coherence import Coherence
from daemons.portal.replicas import ReplicaClient
from proto import replica_pb2 as pb

LIST_DEFAULT = 100
LIST_MAX = 1000
_READ_ATTEMPTS = 5


def _request_id(given: str) -> str:
    return domain.validate_request_id(given) if given else uuid.uuid4().hex


def _limit(limit: int) -> int:
    if limit > LIST_MAX:
        raise InvalidArgument(f"limit: at most {LIST_MAX}")
    return limit or LIST_DEFAULT


class PortalOperations:
    def __init__(self, portal_id: str, replicas: ReplicaClient, coherence: Coherence) -> None:
        self.portal_id = portal_id
        self.replicas = replicas
        self.coherence = coherence
        self.cache = coherence.cache

    # -- shared ------------------------------------------------------------------

    async def _apply(self, command: pb.Command, timeout: float) -> pb.ApplyResponse:
        command.at = command.at or utc_now()
        return await self.replicas.apply(command, timeout)

    def _changed(self, event: str, cid: str, answer: pb.ApplyResponse, at: str,
                 title: str | None = None) -> dict | None:
        record = json.loads(answer.record) if answer.record else None
        self.coherence.local_change(events.make_event(
            event, cid, answer.revision, self.portal_id, at, title=title, record=record))
        return record

    async def _read(self, key: Key, kind: int, cid: str, title: str, linearizable: bool,
              timeout: float) -> dict | None:
        """A record via the cache or a linearizable replica read; None if absent.

        A LINEARIZABLE read returns the replicas' answer whatever the cache
        believes. Every replica answer is settled against the cache's marks
        (which drops marks the answer refutes, e.g. from a forged event); a
        cached read whose answer is older than a change that arrived while it
        was in flight reads again.
        """
        use_cache = not linearizable and self.coherence.serving_cache
        if use_cache:
            entry = self.cache.get(key)
            if entry is not None:
                return entry.value
        for _ in range(_READ_ATTEMPTS):
            token = self.cache.read_token()
            record, read_revision = await self.replicas.get(kind, cid, title, timeout)
            if self.coherence.settle_read(key, record, read_revision, token) or linearizable:
                return record
            # A newer change of this key arrived while we read: the answer may be
            # older than what this portal already knows. Read again.
        raise Unavailable(f"{key[0]} changed too often to be read consistently; retry")

    # -- admin -------------------------------------------------------------------

    async def create_client(self, cid: str, data: str, request_id: str, timeout: float) -> dict:
        generated = not cid
        domain.parse_client_data(data)
        for _ in range(5 if generated else 1):
            the_cid = str(10**19 + secrets.randbelow(9 * 10**19)) if generated else cid
            domain.validate_cid(the_cid)
            command = pb.Command(request_id=_request_id(request_id), op=pb.CREATE_CLIENT,
                                 cid=the_cid, data=data)
            try:
                answer = await self._apply(command, timeout)
            except AlreadyExists:
                if generated and not request_id:
                    continue
                raise
            return self._changed("client.created", the_cid, answer, command.at)  # type: ignore[return-value]
        raise AlreadyExists("could not generate an unused CID; give one")

    async def get_client(self, cid: str, linearizable: bool, timeout: float) -> dict:
        domain.validate_cid(cid)
        record = await self._read(client_key(cid), pb.CLIENT, cid, "", linearizable, timeout)
        if record is None:
            raise NotFound(f"client {cid} not found")
        return record

    async def update_client(self, cid: str, data: str, request_id: str, timeout: float) -> dict:
        domain.validate_cid(cid)
        domain.parse_client_data(data)
        command = pb.Command(request_id=_request_id(request_id), op=pb.UPDATE_CLIENT, cid=cid,
                             data=data)
        answer = await self._apply(command, timeout)
        return self._changed("client.updated", cid, answer, command.at)  # type: ignore[return-value]

    async def delete_client(self, cid: str, request_id: str, timeout: float) -> pb.ApplyResponse:
        domain.validate_cid(cid)
        command = pb.Command(request_id=_request_id(request_id), op=pb.DELETE_CLIENT, cid=cid)
        answer = await self._apply(command, timeout)
        self._changed("client.deleted", cid, answer, command.at)
        return answer

    async def list_clients(self, page_token: str, limit: int,
                     timeout: float) -> tuple[list[dict], str]:
        page = await self.replicas.scan(pb.CLIENT, "", page_token, _limit(limit), "", timeout)
        return [json.loads(r) for r in page.records], page.next

    # -- client (tasks) ----------------------------------------------------------

    async def require_client(self, cid: str, timeout: float) -> None:
        """Refuse any call naming an unknown CID."""
        await self.get_client(cid, False, timeout)

    async def create_task(self, cid: str, title: str, description: str, request_id: str,
                    timeout: float) -> dict:
        domain.validate_cid(cid)
        domain.validate_title(title)
        domain.validate_description(description)
        command = pb.Command(request_id=_request_id(request_id), op=pb.CREATE_TASK, cid=cid,
                             title=title, description=description)
        answer = await self._apply(command, timeout)
        return self._changed("task.created", cid, answer, command.at, title)  # type: ignore[return-value]

    async def get_task(self, cid: str, title: str, linearizable: bool, timeout: float) -> dict:
        domain.validate_cid(cid)
        domain.validate_title(title)
        record = await self._read(task_key(cid, title), pb.TASK, cid, title, linearizable, timeout)
        if record is None:
            await self.get_client(cid, linearizable, timeout)  # NOT_FOUND names the client if absent
            raise NotFound(f"task {title!r} not found for client {cid}")
        return record

    async def update_task(self, cid: str, title: str, description: str | None, status: str | None,
                    request_id: str, timeout: float) -> dict:
        domain.validate_cid(cid)
        domain.validate_title(title)
        domain.validate_task_update(description, status)
        command = pb.Command(request_id=_request_id(request_id), op=pb.UPDATE_TASK, cid=cid,
                             title=title, description=description, status=status)
        answer = await self._apply(command, timeout)
        return self._changed("task.updated", cid, answer, command.at, title)  # type: ignore[return-value]

    async def delete_task(self, cid: str, title: str, request_id: str,
                    timeout: float) -> pb.ApplyResponse:
        domain.validate_cid(cid)
        domain.validate_title(title)
        command = pb.Command(request_id=_request_id(request_id), op=pb.DELETE_TASK, cid=cid,
                             title=title)
        answer = await self._apply(command, timeout)
        self._changed("task.deleted", cid, answer, command.at, title)
        return answer

    async def delete_all_tasks(self, cid: str, request_id: str, timeout: float) -> pb.ApplyResponse:
        domain.validate_cid(cid)
        command = pb.Command(request_id=_request_id(request_id), op=pb.DELETE_ALL_TASKS, cid=cid)
        answer = await self._apply(command, timeout)
        self._changed("task.cleared", cid, answer, command.at)
        return answer

    async def list_tasks(self, cid: str, page_token: str, limit: int, status: str,
                   timeout: float) -> tuple[list[dict], str]:
        domain.validate_cid(cid)
        if status:
            domain.validate_status(status)
        page = await self.replicas.scan(pb.TASK, cid, page_token, _limit(limit), status, timeout)
        return [json.loads(r) for r in page.records], page.next

    def status(self) -> dict[str, Any]:
        return {"cache_entries": len(self.cache), "cache_hits": self.cache.hits,
                "cache_misses": self.cache.misses,
                "broker_connected": self.coherence.serving_cache,
                "events_received": self.coherence.received,
                "events_published": self.coherence.published,
                "events_rejected": self.coherence.rejected}
