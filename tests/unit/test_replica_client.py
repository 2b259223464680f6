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


class _Down(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "connection refused"


class _DownStub:
    """Every RPC fails as a member that is not there."""

    def __init__(self) -> None:
        self.calls = 0

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        async def rpc(request, timeout):  # type: ignore[no-untyped-def]
            self.calls += 1
            raise _Down()
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
