"""ClientServicer.WatchTasks: which task events a stream delivers, around the
window between registering for events and reading the client's record.

The replicas are a fake whose client read waits for the test to let it go, so
events can arrive in that window deterministically (in a real portal it is
one replica read, or seconds of scrypt in token mode)."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from daemons.core import events
from daemons.core.config import Limits
from daemons.portal.auth import Authenticator, SecretHasher
from daemons.portal.cache import PortalCache
from daemons.portal.coherence import Coherence
from daemons.portal.limits import PortalLimits
from daemons.portal.operations import PortalOperations
from daemons.portal.service import ClientServicer
from proto import portal_pb2 as pb

CID = "7"
AT = "2026-01-01T00:00:00.000Z"
LATER = "2026-01-01T00:00:09.000Z"


class Ended(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, details)
        self.code = code


class Context:
    def time_remaining(self) -> float:
        return 60.0

    def invocation_metadata(self) -> tuple:
        return ()

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Ended(code, details)

    async def send_initial_metadata(self, metadata: tuple) -> None:
        pass


class Replicas:
    """The client read waits for `release`; then answers `record` at store revision `at`."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.record: dict[str, Any] = {}
        self.at = 0

    async def get(self, kind: int, cid: str, title: str, timeout: float) -> tuple[dict, int]:
        await asyncio.wait_for(self.release.wait(), 5)
        return self.record, self.at


def task_event(revision: int, title: str = "t") -> dict:
    record = {"cid": CID, "title": title, "description": f"r{revision}", "status": "pending",
              "created_at": AT, "updated_at": AT, "revision": revision}
    return events.make_event("task.updated", CID, revision, "portal-2", AT, title=title,
                             record=record)


def client_event(kind: str, revision: int, updated_at: str | None = None) -> dict:
    record = None if kind == "client.deleted" else {
        "cid": CID, "data": {}, "created_at": AT, "updated_at": updated_at or (
            AT if kind == "client.created" else LATER), "revision": revision}
    return events.make_event(kind, CID, revision, "portal-2", AT, record=record)


def watch(before: list[dict], during: list[dict], record: dict, after: list[dict],
          verified: int = 0, evict: bool = False) -> list[int]:
    """Revisions a stream delivers: `before` arrive before it opens, `during` between
    its registration and its read of `record` (from the replicas unless cached:
    `evict` drops what `before` cached), `after` once it runs."""
    async def run() -> list[int]:
        coherence = Coherence("portal-1", "test", PortalCache(100, 60))
        coherence.on_connection(True)
        coherence.loop = asyncio.get_running_loop()
        coherence.cache.verified = verified
        replicas = Replicas()
        ops = PortalOperations("portal-1", replicas, coherence)  # type: ignore[arg-type]
        auth = Authenticator("portal-1", "cid-only", None, SecretHasher(), ops.secret_record)
        servicer = ClientServicer("portal-1", ops, 5.0, auth, PortalLimits(Limits()))
        for event in before:
            coherence.apply_event(event)
        if evict:
            coherence.cache.clear()
        got: list[int] = []

        async def consume() -> None:
            async for message in servicer.WatchTasks(pb.WatchTasksRequest(cid=CID), Context()):
                got.append(message.revision)
        stream = asyncio.create_task(consume())
        await asyncio.sleep(0.01)
        assert coherence.watcher_count == 1  # registered, reading the client
        for event in during:
            coherence.apply_event(event)
        replicas.record, replicas.at = record, record["revision"]
        replicas.release.set()
        await asyncio.sleep(0.01)
        for event in after:
            coherence.apply_event(event)
        await asyncio.sleep(0.01)
        stream.cancel()
        try:
            await stream
        except asyncio.CancelledError:
            pass
        return got

    return asyncio.run(run())


def updated_client(revision: int) -> dict:
    return {"cid": CID, "data": {}, "created_at": AT, "updated_at": LATER, "revision": revision}


def created_client(revision: int) -> dict:
    return {"cid": CID, "data": {}, "created_at": AT, "updated_at": AT, "revision": revision}


def test_a_task_change_made_while_the_stream_reads_its_client_is_delivered() -> None:
    """Found by review: a task change at 3 after the stream registered, then a
    client update at 4 before its read of the client: the stream skipped
    everything at or below 4, so the change at 3 never reached it."""
    got = watch(before=[], during=[task_event(3), client_event("client.updated", 4)],
                record=updated_client(4), after=[task_event(5)], verified=2)
    assert got == [3, 5]


def test_changes_known_committed_before_the_stream_registered_are_not_delivered() -> None:
    got = watch(before=[], during=[task_event(2), task_event(3)],
                record=updated_client(4), after=[task_event(5)], verified=2)
    assert got == [3, 5]


def test_a_late_event_of_an_earlier_client_with_the_cid_is_not_delivered() -> None:
    # Deleted at 10, created again at 11 and updated at 12: a task event of the
    # first client (at 8) arriving late is not this client's, whether the
    # deletion came before the stream or comes late itself.
    for before, during in (([client_event("client.deleted", 10)], []),
                           ([], [client_event("client.deleted", 10)])):
        got = watch(before=before, during=during + [task_event(8)],
                    record=updated_client(12), after=[task_event(8, "other"), task_event(13)])
        assert got == [13], (before, during)
    # Known by its creation too, whether or not the deletion event came (found by
    # review: with the client updated since, cached here at 12, a late event of
    # the first client that came before the deletion event reached the stream).
    for before in ([client_event("client.created", 11), client_event("client.updated", 12)],
                   [client_event("client.deleted", 10), client_event("client.created", 11),
                    client_event("client.updated", 12)]):
        got = watch(before=before, during=[task_event(8)], record=updated_client(12),
                    after=[task_event(9, "late"), task_event(13)])
        assert got == [13], before


def test_a_record_updated_within_the_same_millisecond_as_its_creation_misses_nothing() -> None:
    """Found by review: "never updated" was told by equal timestamps, which an
    update within the same millisecond (or two portals' clocks) also gives."""
    got = watch(before=[client_event("client.created", 1)],
                during=[task_event(3), client_event("client.updated", 4, updated_at=AT)],
                record={**updated_client(4), "updated_at": AT}, after=[task_event(5)],
                verified=2, evict=True)
    assert got == [3, 5]
