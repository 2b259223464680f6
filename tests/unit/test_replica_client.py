"""ReplicaClient's answer when no replica answers in time: a write's outcome is
unknown (retry with the same request id), a read changed nothing. Fake stubs:
the retry loop and the messages are what is tested here; the real thing is
exercised by tests/integration/test_portal_stack.py."""

from __future__ import annotations

import asyncio
import os

import grpc
import pytest

from daemons.core.config import load_cluster
from daemons.core.errors import Unavailable
from daemons.portal.replicas import ReplicaClient
from proto import replica_pb2 as pb

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _RpcFailure(grpc.RpcError):
    """A failed call as grpc raises it: a status code and its details."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__()
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class _DownStub:
    """Every RPC fails as a member that is not there."""

    def __init__(self) -> None:
        self.calls = 0

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        async def rpc(request, timeout):  # type: ignore[no-untyped-def]
            self.calls += 1
            raise _RpcFailure(grpc.StatusCode.UNAVAILABLE, "connection refused")
        return rpc


def _client() -> tuple[ReplicaClient, list[_DownStub]]:
    client = ReplicaClient(load_cluster(os.path.join(ROOT, "config", "cluster.yaml")), "p")
    stubs = [_DownStub() for _ in client.ids]
    client._stubs = stubs  # type: ignore[assignment]
    return client, stubs


def test_a_write_nobody_answered_may_or_may_not_be_applied():
    client, stubs = _client()
    command = pb.Command(request_id="r1")
    with pytest.raises(Unavailable, match="may or may not be applied: retry with the same "
                                          "request id"):
        asyncio.run(client.apply(command, 0.2))
    assert all(stub.calls >= 1 for stub in stubs)  # every member was tried


@pytest.mark.parametrize("read", ["get", "scan"])
def test_a_read_nobody_answered_changed_nothing(read):
    client, stubs = _client()
    call = client.get(1, "7", "", 0.2) if read == "get" else client.scan(1, "", "", 10, "", 0.2)
    with pytest.raises(Unavailable) as info:
        asyncio.run(call)
    assert "nothing was changed" in str(info.value) and "request id" not in str(info.value)
    assert all(stub.calls >= 1 for stub in stubs)


class _BatchStub:
    """Answers ApplyBatch with one result per command from `answer(request_id)`:
    a CommandResult code ("" = committed). Records what it was sent."""

    def __init__(self, answer) -> None:  # type: ignore[no-untyped-def]
        self.answer = answer
        self.sent: list[tuple[list[str], float]] = []

    async def ApplyBatch(self, request, timeout):  # type: ignore[no-untyped-def]
        ids = [c.request_id for c in request.commands]
        self.sent.append((ids, timeout))
        results = []
        for rid in ids:
            code = self.answer(rid)
            if code:
                results.append(pb.CommandResult(code=code, message=f"{code} from a fake"))
            else:
                results.append(pb.CommandResult(response=pb.ApplyResponse(revision=7)))
        return pb.ApplyBatchResponse(results=results)


def _batch_client(*answers) -> tuple[ReplicaClient, list[_BatchStub]]:  # type: ignore[no-untyped-def]
    client = ReplicaClient(load_cluster(os.path.join(ROOT, "config", "cluster.yaml")), "p")
    stubs = [_BatchStub(answer) for answer in answers]
    assert len(stubs) == len(client.ids)
    client._stubs = stubs  # type: ignore[assignment]
    return client, stubs


def test_a_write_the_member_could_not_commit_goes_to_the_next_with_the_same_id():
    # The member answered, but its proposer reported the command itself
    # UNAVAILABLE (no leader, leader changed, no commit within the try): the
    # portal must try the next member with the same request id, and publish.
    client, stubs = _batch_client(lambda rid: "UNAVAILABLE", lambda rid: "", lambda rid: "")
    committed: list[int] = []
    answer = asyncio.run(client.apply(pb.Command(request_id="r1"), 2.0,
                                      lambda a: committed.append(a.revision)))
    assert answer.revision == 7 and committed == [7]
    assert [ids for ids, _ in stubs[0].sent] == [["r1"]]
    assert [ids for ids, _ in stubs[1].sent] == [["r1"]]


class _StoppingStub(_BatchStub):
    """A member whose gRPC server is stopping (SIGTERM): it cancels the call."""

    async def ApplyBatch(self, request, timeout):  # type: ignore[no-untyped-def]
        self.sent.append(([c.request_id for c in request.commands], timeout))
        raise _RpcFailure(grpc.StatusCode.CANCELLED, "CANCELLED")


def test_a_write_a_stopping_member_cancelled_goes_to_the_next_with_the_same_id():
    # Found by a fault test: a replica stopped by SIGTERM cancelled a portal's
    # write and the portal answered the client INTERNAL "CANCELLED".
    client, stubs = _batch_client(lambda rid: "", lambda rid: "", lambda rid: "")
    stubs[0] = _StoppingStub(lambda rid: "")
    client._stubs = stubs  # type: ignore[assignment]
    answer = asyncio.run(client.apply(pb.Command(request_id="r1"), 2.0))
    assert answer.revision == 7
    assert [ids for ids, _ in stubs[0].sent] == [["r1"]]
    assert [ids for ids, _ in stubs[1].sent] == [["r1"]]


def test_only_the_uncommitted_writes_of_a_group_are_sent_again():
    client, stubs = _batch_client(
        lambda rid: {"a": "", "b": "UNAVAILABLE", "c": "ALREADY_EXISTS"}[rid],
        lambda rid: "", lambda rid: "")

    async def three() -> list:
        calls = [client.apply(pb.Command(request_id=rid), 2.0) for rid in "abc"]
        return await asyncio.gather(*calls, return_exceptions=True)

    a, b, c = asyncio.run(three())
    assert a.revision == 7 and b.revision == 7
    assert type(c).__name__ == "AlreadyExists"  # a refusal is final: not sent again
    assert [ids for ids, _ in stubs[0].sent] == [["a", "b", "c"]]
    assert [ids for ids, _ in stubs[1].sent] == [["b"]]


def test_a_write_no_member_can_commit_fails_at_its_deadline():
    client, stubs = _batch_client(*[lambda rid: "UNAVAILABLE"] * 3)
    with pytest.raises(Unavailable, match="retry with the same request id"):
        asyncio.run(client.apply(pb.Command(request_id="r1"), 0.3))
    assert all(stub.sent for stub in stubs)


def test_a_caller_in_a_hurry_does_not_cut_short_the_others_of_its_group():
    # One group, one short and one long deadline: the group is sent with the
    # long one; the short caller alone gets UNAVAILABLE at its own deadline.
    release = asyncio.Event()

    class _Slow(_BatchStub):
        async def ApplyBatch(self, request, timeout):  # type: ignore[no-untyped-def]
            try:
                await asyncio.wait_for(release.wait(), timeout)
            except asyncio.TimeoutError:
                raise _RpcFailure(grpc.StatusCode.DEADLINE_EXCEEDED,
                                  "Deadline Exceeded") from None
            return await super().ApplyBatch(request, timeout)

    client = ReplicaClient(load_cluster(os.path.join(ROOT, "config", "cluster.yaml")), "p")
    stubs = [_Slow(lambda rid: "") for _ in client.ids]
    client._stubs = stubs  # type: ignore[assignment]
    committed: list[str] = []

    async def run() -> list:
        short = asyncio.ensure_future(client.apply(
            pb.Command(request_id="short"), 0.1, lambda a: committed.append("short")))
        long = asyncio.ensure_future(client.apply(
            pb.Command(request_id="long"), 1.0, lambda a: committed.append("long")))
        await asyncio.sleep(0.3)
        release.set()
        return await asyncio.gather(short, long, return_exceptions=True)

    short, long = asyncio.run(run())
    assert isinstance(short, Unavailable) and "may or may not be applied" in str(short)
    assert long.revision == 7
    assert committed == ["short", "long"]  # both committed, both published
    assert stubs[0].sent[0][0] == ["short", "long"] and stubs[0].sent[0][1] > 0.5


class _Slow(_BatchStub):
    """Answers after `delay` seconds."""

    def __init__(self, answer, delay: float) -> None:  # type: ignore[no-untyped-def]
        super().__init__(answer)
        self.delay = delay

    async def ApplyBatch(self, request, timeout):  # type: ignore[no-untyped-def]
        self.sent.append(([c.request_id for c in request.commands], timeout))
        await asyncio.sleep(self.delay)
        self.sent.pop()
        return await super().ApplyBatch(request, timeout)


def _slow_client(delay: float) -> tuple[ReplicaClient, list[_Slow]]:
    client = ReplicaClient(load_cluster(os.path.join(ROOT, "config", "cluster.yaml")), "p")
    stubs = [_Slow(lambda rid: "", delay) for _ in client.ids]
    client._stubs = stubs  # type: ignore[assignment]
    return client, stubs


@pytest.mark.parametrize("second_caller", ["cancelled", "waiting"])
def test_closing_drains_the_writes_in_flight_and_those_still_awaited(second_caller):
    # SIGTERM: server.stop(grace) cancels the handlers. A group already sent
    # may still commit: its commit must be published before the channels
    # close. A write queued behind it whose caller is gone is never sent; one
    # whose caller still waits goes in the next group, also drained.
    client, stubs = _slow_client(0.2)
    committed: list[str] = []

    async def run() -> None:
        a = asyncio.ensure_future(client.apply(pb.Command(request_id="a"), 5.0,
                                               lambda r: committed.append("a")))
        await asyncio.sleep(0.05)  # "a" is in flight now
        b = asyncio.ensure_future(client.apply(pb.Command(request_id="b"), 5.0,
                                               lambda r: committed.append("b")))
        await asyncio.sleep(0.01)
        a.cancel()
        if second_caller == "cancelled":
            b.cancel()
        await client.close(drain=2.0)
        if second_caller == "waiting":
            assert (await b).revision == 7

    asyncio.run(run())
    sent = [ids for stub in stubs for ids, _ in stub.sent]
    if second_caller == "cancelled":
        assert committed == ["a"] and sent == [["a"]]
    else:
        assert committed == ["a", "b"] and sent == [["a"], ["b"]]


def test_a_write_whose_caller_gave_up_in_the_queue_is_never_sent():
    # It timed out behind a slow group: sending it later, with another write's
    # group, would apply what its caller was told had failed.
    client, stubs = _slow_client(0.3)

    async def run() -> list:
        slow = asyncio.ensure_future(client.apply(pb.Command(request_id="slow"), 5.0))
        await asyncio.sleep(0.05)
        stale = asyncio.ensure_future(client.apply(pb.Command(request_id="stale"), 0.1))
        live = asyncio.ensure_future(client.apply(pb.Command(request_id="live"), 5.0))
        return await asyncio.gather(slow, stale, live, return_exceptions=True)

    slow, stale, live = asyncio.run(run())
    assert slow.revision == 7 and live.revision == 7 and isinstance(stale, Unavailable)
    assert [ids for stub in stubs for ids, _ in stub.sent] == [["slow"], ["live"]]


def test_writes_no_member_can_commit_are_sent_again_with_a_growing_pause():
    # "No Raft leader" comes back at once during an election: a group of up to
    # 256 commands must not be sent again and again without a pause.
    client, stubs = _batch_client(*[lambda rid: "UNAVAILABLE"] * 3)
    with pytest.raises(Unavailable):
        asyncio.run(client.apply(pb.Command(request_id="r1"), 0.6))
    sends = sum(len(stub.sent) for stub in stubs)
    assert 3 <= sends <= 7, sends  # 20, 40, 80, 160, 320 ms pauses in 0.6 s


class _BigAnswerStub(_BatchStub):
    """Commits every command, but cannot send an answer for more than two: each
    result carries its whole record (found by review with 64 KiB descriptions)."""

    def __init__(self) -> None:
        super().__init__(lambda rid: "")
        self.committed: set[str] = set()

    async def ApplyBatch(self, request, timeout):  # type: ignore[no-untyped-def]
        ids = [c.request_id for c in request.commands]
        self.sent.append((ids, timeout))
        fresh = [rid not in self.committed for rid in ids]
        self.committed.update(ids)
        if len(ids) > 2:
            raise _RpcFailure(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              "SERVER: Sent message larger than max (7474299 vs. 4194304)")
        return pb.ApplyBatchResponse(results=[pb.CommandResult(response=pb.ApplyResponse(
            revision=7, duplicate=not new)) for new in fresh])


def test_committed_writes_whose_answer_outgrew_the_limit_are_answered_in_parts():
    client, stubs = _batch_client(lambda rid: "", lambda rid: "", lambda rid: "")
    stubs[0] = _BigAnswerStub()
    client._stubs = stubs  # type: ignore[assignment]
    published: list[str] = []

    async def five() -> list:
        calls = [client.apply(pb.Command(request_id=rid), 5.0,
                              lambda a, rid=rid: published.append(rid)) for rid in "abcde"]
        return await asyncio.gather(*calls, return_exceptions=True)

    answers = asyncio.run(five())
    assert [type(a).__name__ for a in answers] == ["ApplyResponse"] * 5
    assert sorted(published) == list("abcde")  # every committed write is published
    # Halved until each part's answer fits, the same request ids each time.
    assert ["".join(ids) for ids, _ in stubs[0].sent] == ["abcde", "ab", "cde", "c", "de"]
    assert not stubs[1].sent and not stubs[2].sent


def test_a_busy_scrypt_pool_answers_unavailable_within_the_call_and_sends_nothing():
    """Found by review: CreateClient/RotateSecret waited for scrypt, then gave the
    write the call's whole timeout again, and the caller got DEADLINE_EXCEEDED."""
    from daemons.core.errors import Unavailable as Busy
    from daemons.portal.cache import PortalCache
    from daemons.portal.coherence import Coherence
    from daemons.portal.operations import PortalOperations

    class StuckHasher:  # every scrypt thread busy for longer than the call may take
        async def make(self, secret):  # type: ignore[no-untyped-def]
            await asyncio.Event().wait()

    class Replicas:
        sent: list = []

        async def apply(self, command, timeout, on_commit):  # type: ignore[no-untyped-def]
            self.sent.append(command)
            raise AssertionError("nothing may be sent")

    ops = PortalOperations("p", Replicas(), Coherence("p", "test", PortalCache(10, 60)),  # type: ignore[arg-type]
                           hasher=StuckHasher(), issue_secrets=True)  # type: ignore[arg-type]
    for call in (lambda: ops.create_client("7", "{}", "", 0.2),
                 lambda: ops.rotate_secret("7", "", 0.2)):
        with pytest.raises(Busy, match="scrypt.*nothing was changed"):
            asyncio.run(asyncio.wait_for(call(), 10))
    assert Replicas.sent == []


@pytest.mark.parametrize("request_id, stored, expected", [
    ("", "other", "the-secret"),       # the call's own id: its own earlier attempt
    ("caller-1", "mine", "the-secret"),  # the caller's id, the hash stored is this call's
    ("caller-1", "other", "")])        # the caller's id applied by an earlier call
def test_a_secret_is_handed_back_unless_an_earlier_call_stored_another(
        request_id, stored, expected, monkeypatch):
    """Found by review: when the portal itself asked again (another member, or
    an answer too large for one message), the duplicate answer made CreateClient
    and RotateSecret return "" although the secret stored was this call's."""
    import json

    from daemons.portal import operations
    from daemons.portal.cache import PortalCache
    from daemons.portal.coherence import Coherence
    from daemons.portal.operations import PortalOperations

    monkeypatch.setattr(operations, "new_secret", lambda: "the-secret")
    mine = pb.SecretHash(salt=b"\x01" * 16, hash=b"\x02" * 32, n=2, r=1, p=1)

    class Hasher:
        async def make(self, secret):  # type: ignore[no-untyped-def]
            return mine

    class Replicas:  # the first attempt committed; its answer was lost
        async def apply(self, command, timeout, on_commit):  # type: ignore[no-untyped-def]
            record = json.dumps({"cid": "7", "data": {}, "created_at": "x",
                                 "updated_at": "x", "revision": 3})
            return pb.ApplyResponse(revision=3, record=record, duplicate=True)

        async def get(self, kind, cid, title, timeout):  # type: ignore[no-untyped-def]
            salt = mine.salt.hex() if stored == "mine" else "ab" * 16
            return {"cid": cid, "salt": salt, "hash": mine.hash.hex(), "n": 2, "r": 1,
                    "p": 1, "revision": 3}, 3

    ops = PortalOperations("p", Replicas(), Coherence("p", "test", PortalCache(10, 60)),  # type: ignore[arg-type]
                           hasher=Hasher(), issue_secrets=True)  # type: ignore[arg-type]
    assert asyncio.run(ops.create_client("7", "{}", request_id, 5))[1] == expected
    assert asyncio.run(ops.rotate_secret("7", request_id, 5))[0] == expected
