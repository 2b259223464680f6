"""PortalOperations: what each admin and client call does, without gRPC.

Validates input (INVALID_ARGUMENT names the field), builds commands with a
request id and timestamp, sends them through the ReplicaClient, and after
commit updates the cache and publishes the change event. Reads come from the
cache when it may serve (connected to the broker, entry fresh) and otherwise
from the replicas with a linearizable read, cached only if no newer change
has been seen meanwhile.

Client secrets: CreateClient (when `issue_secrets`, i.e. `auth: token`) and
RotateSecret make a new secret here and send only its salted scrypt hash to
the replicas; the secret is returned to the caller once and kept nowhere.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
import uuid
from typing import Any

from daemons.core import domain, events
from daemons.core.clock import left, utc_now
from daemons.core.errors import (AlreadyExists, InvalidArgument, NotFound, TarefaError,
                                  Unavailable)
from daemons.portal.auth import SecretHasher, new_secret
from daemons.portal.cache import Key, client_key, secret_key, task_key
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
    def __init__(self, portal_id: str, replicas: ReplicaClient, coherence: Coherence,
                 hasher: SecretHasher | None = None, issue_secrets: bool = False) -> None:
        self.portal_id = portal_id
        self.replicas = replicas
        self.coherence = coherence
        self.cache = coherence.cache
        self.hasher = hasher or SecretHasher()
        self.issue_secrets = issue_secrets

    # -- shared ------------------------------------------------------------------

    async def _commit(self, event: str, op: int, request_id: str, timeout: float, cid: str,
                      title: str | None = None, **fields: Any) -> tuple[pb.ApplyResponse, Any]:
        """Commit one command, then update the cache and publish `event`.

        Returns the replicas' answer and the record after the change (None for
        deletions)."""
        at = utc_now()
        command = pb.Command(request_id=_request_id(request_id), op=op, cid=cid,
                             title=title or "", at=at, **fields)
        records: list[Any] = []
        epoch = self.cache.epoch  # changes when the cache is emptied (broker lost or back)

        def committed(answer: pb.ApplyResponse) -> None:
            # Runs as soon as the replicas answer, even if our caller has gone
            # (ReplicaClient): a committed change is always published. A
            # duplicate (a retry of a request id already applied) gets the first
            # answer and is published too, as a replay: the attempt that
            # committed it almost never reached a portal that published it (a
            # per-try timeout, a failover, the caller's retry after
            # UNAVAILABLE). Its record may be older than the key's current one,
            # so no cache takes it (coherence.apply_event); where the change was
            # published already, watchers get it once (events are deduplicated
            # by change, not by origin).
            record = json.loads(answer.record) if answer.record else None
            records.append(record)
            # The change's own time: a duplicate answer carries the first
            # attempt's record, so its event tells the time of that attempt's.
            # A deletion has no record: its `at` is now.
            stamp = record.get("updated_at") if isinstance(record, dict) else None
            self.coherence.local_change(
                events.make_event(event, cid, answer.revision, self.portal_id,
                                  stamp if isinstance(stamp, str) and stamp else at,
                                  title=title, record=record, replay=answer.duplicate),
                # Emptied while the write was in flight: a newer change of the
                # key may have come and gone unheard.
                cache_record=self.cache.epoch == epoch)

        answer = await self.replicas.apply(command, timeout, committed)
        if not records:  # `committed` failed (logged by ReplicaClient)
            records.append(json.loads(answer.record) if answer.record else None)
        return answer, records[0]

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
        deadline = time.monotonic() + timeout  # for all attempts together
        for _ in range(_READ_ATTEMPTS):
            token = self.cache.read_token()
            record, read_revision = await self.replicas.get(
                kind, cid, title, left(deadline))
            if self.coherence.settle_read(key, record, read_revision, token) or linearizable:
                return record
            # A newer change of this key arrived while we read: the answer may be
            # older than what this portal already knows. Read again.
        raise Unavailable(f"{key[0]} changed too often to be read consistently; retry")

    # -- admin -------------------------------------------------------------------

    async def create_client(self, cid: str, data: str, request_id: str,
                            timeout: float) -> tuple[dict, str]:
        """(the new client's record, its secret): the secret is "" in cid-only mode
        and when the replicas answer a retry of an already applied request id."""
        deadline = time.monotonic() + timeout  # scrypt and every try share it
        generated = not cid
        domain.parse_client_data(data)
        if not generated:
            domain.validate_cid(cid)
        secret, hashed = "", None
        if self.issue_secrets:
            secret, hashed = await self._new_secret(deadline)
        for _ in range(5 if generated else 1):
            # With the caller's request id the CID comes from it, so that a retry
            # with the same id is the same command (and gets the first answer).
            the_cid = _generated_cid(request_id) if generated else cid
            try:
                answer, record = await self._commit("client.created", pb.CREATE_CLIENT,
                                                    request_id, left(deadline), the_cid,
                                                    data=data, secret=hashed)
            except AlreadyExists:
                if generated and not request_id:
                    continue
                raise
            return record, await self._secret_given(answer, request_id, secret, hashed,
                                                    the_cid, deadline)
        raise AlreadyExists("could not generate an unused CID; give one")

    async def rotate_secret(self, cid: str, request_id: str, timeout: float) -> tuple[str, int]:
        """Give client `cid` a new secret; (the secret, or "" for a duplicate; revision)."""
        deadline = time.monotonic() + timeout
        domain.validate_cid(cid)
        secret, hashed = await self._new_secret(deadline)
        answer, _ = await self._commit("client.secret_rotated", pb.ROTATE_SECRET, request_id,
                                       left(deadline), cid, secret=hashed)
        return (await self._secret_given(answer, request_id, secret, hashed, cid, deadline),
                answer.revision)

    async def _secret_given(self, answer: pb.ApplyResponse, request_id: str, secret: str,
                            hashed: pb.SecretHash | None, cid: str, deadline: float) -> str:
        """The secret to hand back: "" for a retry of a call the replicas had
        applied (its answer gave the secret; this call's was not stored).

        A duplicate answer is either that, or this call's own earlier attempt
        (a retry on another member, a group asked again in parts: found by
        review, the secret was lost, and RotateSecret locked the client out).
        Without a caller's request id the id is this call's own; with one, the
        stored hash tells (a linearizable read; "" if it cannot be read)."""
        if not answer.duplicate or not secret or not request_id:
            return secret
        try:
            stored = await self.secret_record(cid, left(deadline), True)
        except TarefaError:
            return ""
        mine = hashed is not None and stored is not None \
            and stored.get("salt") == hashed.salt.hex() and stored.get("hash") == hashed.hash.hex()
        return secret if mine else ""

    async def _new_secret(self, deadline: float) -> tuple[str, pb.SecretHash]:
        """A new secret and its scrypt hash, within the call's time: the hash
        waits for a free scrypt thread (2, shared with every secret check), and
        the write must still fit after it (found by review: under load the
        caller got DEADLINE_EXCEEDED instead of this portal's UNAVAILABLE)."""
        secret = new_secret()
        try:
            hashed = await asyncio.wait_for(self.hasher.make(secret), left(deadline))
        except asyncio.TimeoutError:
            raise Unavailable("this portal's secret hashing is busy (scrypt); nothing was "
                              "changed: retry") from None
        return secret, hashed

    async def secret_record(self, cid: str, timeout: float, linearizable: bool = False
                            ) -> dict | None:
        """Client `cid`'s secret record (salt, hash, parameters), None if it has none."""
        return await self._read(secret_key(cid), pb.SECRET, cid, "", linearizable, timeout)

    async def get_client(self, cid: str, linearizable: bool, timeout: float) -> dict:
        domain.validate_cid(cid)
        record = await self._read(client_key(cid), pb.CLIENT, cid, "", linearizable, timeout)
        if record is None:
            raise NotFound(f"client {cid} not found")
        return record

    async def update_client(self, cid: str, data: str, request_id: str, timeout: float) -> dict:
        domain.validate_cid(cid)
        domain.parse_client_data(data)
        _, record = await self._commit("client.updated", pb.UPDATE_CLIENT, request_id, timeout,
                                       cid, data=data)
        return record

    async def delete_client(self, cid: str, request_id: str, timeout: float) -> pb.ApplyResponse:
        domain.validate_cid(cid)
        answer, _ = await self._commit("client.deleted", pb.DELETE_CLIENT, request_id, timeout, cid)
        return answer

    async def list_clients(self, page_token: str, limit: int,
                     timeout: float) -> tuple[list[dict], str]:
        page = await self.replicas.scan(pb.CLIENT, "", page_token, _limit(limit), "", timeout)
        return [json.loads(r) for r in page.records], page.next

    # -- client (tasks) ----------------------------------------------------------

    async def require_client(self, cid: str, timeout: float) -> dict:
        """Refuse any call naming an unknown CID; the client's record otherwise."""
        return await self.get_client(cid, False, timeout)

    async def create_task(self, cid: str, title: str, description: str, request_id: str,
                    timeout: float) -> dict:
        domain.validate_cid(cid)
        domain.validate_title(title)
        domain.validate_description(description)
        _, record = await self._commit("task.created", pb.CREATE_TASK, request_id, timeout, cid,
                                       title, description=description)
        return record

    async def get_task(self, cid: str, title: str, linearizable: bool, timeout: float) -> dict:
        domain.validate_cid(cid)
        domain.validate_title(title)
        deadline = time.monotonic() + timeout
        record = await self._read(task_key(cid, title), pb.TASK, cid, title, linearizable, timeout)
        if record is None:
            # NOT_FOUND names the client if absent; within what is left of the timeout
            await self.get_client(cid, linearizable, left(deadline))
            raise NotFound(f"task {title!r} not found for client {cid}")
        return record

    async def update_task(self, cid: str, title: str, description: str | None, status: str | None,
                    request_id: str, timeout: float) -> dict:
        domain.validate_cid(cid)
        domain.validate_title(title)
        domain.validate_task_update(description, status)
        _, record = await self._commit("task.updated", pb.UPDATE_TASK, request_id, timeout, cid,
                                       title, description=description, status=status)
        return record

    async def delete_task(self, cid: str, title: str, request_id: str,
                    timeout: float) -> pb.ApplyResponse:
        domain.validate_cid(cid)
        domain.validate_title(title)
        answer, _ = await self._commit("task.deleted", pb.DELETE_TASK, request_id, timeout, cid,
                                       title)
        return answer

    async def delete_all_tasks(self, cid: str, request_id: str, timeout: float) -> pb.ApplyResponse:
        domain.validate_cid(cid)
        answer, _ = await self._commit("task.cleared", pb.DELETE_ALL_TASKS, request_id, timeout,
                                       cid)
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
                "events_rejected": self.coherence.rejected,
                "events_dropped": self.coherence.bus.dropped if self.coherence.bus else 0}


def _generated_cid(request_id: str) -> str:
    """A 20-digit CID: random, or derived from `request_id` when there is one."""
    if not request_id:
        return str(10**19 + secrets.randbelow(9 * 10**19))
    digest = int.from_bytes(hashlib.sha256(request_id.encode("utf-8")).digest()[:16], "big")
    return str(10**19 + digest % (9 * 10**19))
