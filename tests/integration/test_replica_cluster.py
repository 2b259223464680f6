"""Three real replica processes on loopback: every command through Apply on
the leader and on a follower, reads, status, health, convergence, shutdown."""

from __future__ import annotations

import json
import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from daemons.replica.storage import Storage
from proto import replica_pb2 as pb
from tests.harness import apply_with_retry, new_request_id, scan_all, wait_for


@pytest.fixture
def cluster(replica_cluster_factory):
    c = replica_cluster_factory()
    c.start()
    return c


def cmd(op: int, **fields) -> pb.Command:
    return pb.Command(request_id=new_request_id(), op=op, **fields)


def expect_error(stub, command: pb.Command, code: grpc.StatusCode, text: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.Apply(command, timeout=5)
    assert info.value.code() == code, info.value.details()
    assert text in info.value.details()


@pytest.mark.parametrize("target", ["leader", "follower"])
def test_every_command_succeeds_and_fails_properly(cluster, target):
    member = cluster.wait_leader() if target == "leader" else cluster.followers()[0]
    stub = member.stub
    cid = "123456789012345678901234567890"  # more than 64 bits

    created = stub.Apply(cmd(pb.CREATE_CLIENT, cid=cid, data='{"name": "Ana"}'), timeout=5)
    record = json.loads(created.record)
    assert record["cid"] == cid and record["data"] == {"name": "Ana"}
    assert record["revision"] == created.revision > 0
    expect_error(stub, cmd(pb.CREATE_CLIENT, cid=cid, data="{}"),
                 grpc.StatusCode.ALREADY_EXISTS, "already exists")
    expect_error(stub, cmd(pb.CREATE_CLIENT, cid="0123", data="{}"),
                 grpc.StatusCode.INVALID_ARGUMENT, "cid")
    expect_error(stub, cmd(pb.CREATE_CLIENT, cid="5", data="[1]"),
                 grpc.StatusCode.INVALID_ARGUMENT, "data")

    updated = stub.Apply(cmd(pb.UPDATE_CLIENT, cid=cid, data='{"name": "Bia"}'), timeout=5)
    assert updated.revision == created.revision + 1
    assert json.loads(updated.record)["data"] == {"name": "Bia"}
    expect_error(stub, cmd(pb.UPDATE_CLIENT, cid="99", data="{}"),
                 grpc.StatusCode.NOT_FOUND, "client 99")

    title = "buy/milk + #eggs é"
    task = stub.Apply(cmd(pb.CREATE_TASK, cid=cid, title=title, description="2 L"), timeout=5)
    assert json.loads(task.record)["status"] == "pending"
    expect_error(stub, cmd(pb.CREATE_TASK, cid=cid, title=title),
                 grpc.StatusCode.ALREADY_EXISTS, "already exists")
    expect_error(stub, cmd(pb.CREATE_TASK, cid="99", title=title),
                 grpc.StatusCode.NOT_FOUND, "client 99")
    expect_error(stub, cmd(pb.CREATE_TASK, cid=cid, title="bad\x00title"),
                 grpc.StatusCode.INVALID_ARGUMENT, "title")

    done = stub.Apply(cmd(pb.UPDATE_TASK, cid=cid, title=title, status="done"), timeout=5)
    assert json.loads(done.record)["status"] == "done"
    assert json.loads(done.record)["description"] == "2 L"
    expect_error(stub, cmd(pb.UPDATE_TASK, cid=cid, title="nope", status="done"),
                 grpc.StatusCode.NOT_FOUND, "not found")
    expect_error(stub, cmd(pb.UPDATE_TASK, cid=cid, title=title),
                 grpc.StatusCode.INVALID_ARGUMENT, "at least one")
    expect_error(stub, cmd(pb.UPDATE_TASK, cid=cid, title=title, status="later"),
                 grpc.StatusCode.INVALID_ARGUMENT, "status")

    got = stub.Get(pb.GetRequest(kind=pb.TASK, cid=cid, title=title), timeout=5)
    assert json.loads(got.record)["revision"] == done.revision
    assert got.revision >= done.revision

    stub.Apply(cmd(pb.DELETE_TASK, cid=cid, title=title), timeout=5)
    expect_error(stub, cmd(pb.DELETE_TASK, cid=cid, title=title),
                 grpc.StatusCode.NOT_FOUND, "not found")
    with pytest.raises(grpc.RpcError) as info:
        stub.Get(pb.GetRequest(kind=pb.TASK, cid=cid, title=title), timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND

    for i in range(3):
        stub.Apply(cmd(pb.CREATE_TASK, cid=cid, title=f"t{i}"), timeout=5)
    cleared = stub.Apply(cmd(pb.DELETE_ALL_TASKS, cid=cid), timeout=5)
    assert cleared.deleted_tasks == 3
    expect_error(stub, cmd(pb.DELETE_ALL_TASKS, cid="99"), grpc.StatusCode.NOT_FOUND, "99")

    stub.Apply(cmd(pb.CREATE_TASK, cid=cid, title="kept until the client goes"), timeout=5)
    gone = stub.Apply(cmd(pb.DELETE_CLIENT, cid=cid), timeout=5)
    assert gone.deleted_tasks == 1
    expect_error(stub, cmd(pb.DELETE_CLIENT, cid=cid), grpc.StatusCode.NOT_FOUND, cid)
    with pytest.raises(grpc.RpcError) as info:
        stub.Scan(pb.ScanRequest(kind=pb.TASK, cid=cid), timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    expect_error(stub, pb.Command(request_id="", op=pb.CREATE_CLIENT, cid="5", data="{}"),
                 grpc.StatusCode.INVALID_ARGUMENT, "request_id")

    # A batch with nothing valid in it: each command's refusal, nothing applied.
    assert list(stub.ApplyBatch(pb.CommandBatch(), timeout=5).results) == []
    refused = stub.ApplyBatch(pb.CommandBatch(commands=[
        pb.Command(request_id="", op=pb.CREATE_CLIENT, cid="5", data="{}")]), timeout=5)
    assert [r.code for r in refused.results] == ["INVALID_ARGUMENT"]
    assert "request_id" in refused.results[0].message
    # A request that does not parse (invalid UTF-8 in a string field).
    raw_get = member.channel.unary_unary("/tarefa.replica.Replica/Get")
    with pytest.raises(grpc.RpcError) as info:
        raw_get(b"\x08\x01\x12\x02\xff\xfe", timeout=5)  # kind=CLIENT, cid=b"\xff\xfe"
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert "not a valid protobuf message" in info.value.details()


def test_scan_pages_and_filters(cluster):
    stub = cluster.followers()[0].stub
    stub.Apply(cmd(pb.CREATE_CLIENT, cid="7", data="{}"), timeout=5)
    for i in range(25):
        stub.Apply(cmd(pb.CREATE_TASK, cid="7", title=f"task {i:02d}",
                       status="done" if i % 5 == 0 else "pending"), timeout=5)
    titles, token = [], ""
    for _ in range(100):  # 25 tasks in pages of 10: bounded, whatever the paging
        page = stub.Scan(pb.ScanRequest(kind=pb.TASK, cid="7", limit=10, page_token=token),
                         timeout=5)
        assert len(page.records) <= 10
        titles += [json.loads(r)["title"] for r in page.records]
        token = page.next
        if not token:
            break
    assert titles == [f"task {i:02d}" for i in range(25)]
    done = stub.Scan(pb.ScanRequest(kind=pb.TASK, cid="7", status="done"), timeout=5)
    assert [json.loads(r)["title"] for r in done.records] == [f"task {i:02d}" for i in (0, 5, 10, 15, 20)]
    with pytest.raises(grpc.RpcError) as info:
        stub.Scan(pb.ScanRequest(kind=pb.TASK, cid="7", page_token="!!notatoken"), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for cid in ("10", "9", "100"):
        stub.Apply(cmd(pb.CREATE_CLIENT, cid=cid, data="{}"), timeout=5)
    clients = [json.loads(r)["cid"] for r in scan_all(cluster.members[0], pb.CLIENT)]
    assert clients == ["7", "9", "10", "100"]
    # Found by review: a status filter on clients answered INTERNAL (KeyError),
    # and an unknown consistency value was served as a local, maybe stale, read.
    for request in (pb.ScanRequest(kind=pb.CLIENT, status="done"),
                    pb.ScanRequest(kind=pb.TASK, cid="7", consistency=7)):
        with pytest.raises(grpc.RpcError) as info:
            stub.Scan(request, timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        stub.Get(pb.GetRequest(kind=pb.CLIENT, cid="7", consistency=7), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "consistency" in info.value.details()


def test_a_command_larger_than_any_valid_one_is_refused_before_raft(cluster):
    """A 3 MB description reached Raft, stalled the leader into elections and
    answered UNAVAILABLE (found by review); it is refused before it is proposed."""
    leader = cluster.wait_leader()
    leader.stub.Apply(cmd(pb.CREATE_CLIENT, cid="8", data="{}"), timeout=5)
    term = leader.status().term
    for member in (leader, cluster.followers()[0]):
        expect_error(member.stub, cmd(pb.CREATE_TASK, cid="8", title="big",
                                      description="x" * 3_000_000),
                     grpc.StatusCode.INVALID_ARGUMENT, "larger than any valid command")
    assert cluster.wait_leader() is leader and leader.status().term == term
    # The largest valid command still goes.
    leader.stub.Apply(cmd(pb.CREATE_TASK, cid="8", title="t" * 256,
                          description="é" * 32 * 1024), timeout=10)


def test_linearizable_read_on_follower_sees_acknowledged_write(cluster):
    leader = cluster.wait_leader()
    follower = cluster.followers()[0]
    leader.stub.Apply(cmd(pb.CREATE_CLIENT, cid="1", data="{}"), timeout=5)
    for i in range(50):
        ack = leader.stub.Apply(cmd(pb.CREATE_TASK, cid="1", title=f"x{i}"), timeout=5)
        got = follower.stub.Get(pb.GetRequest(kind=pb.TASK, cid="1", title=f"x{i}",
                                              consistency=pb.LINEARIZABLE), timeout=5)
        assert json.loads(got.record)["revision"] == ack.revision


def test_status_and_health(cluster):
    leader = cluster.wait_leader()
    # A leader with a quorum does not mean every follower-to-follower link is up
    # yet: PySyncObj dials each peer from one side only and retries every
    # connection_retry (0.5 s) if that peer was not listening yet.
    wait_for(lambda: all(p.reachable for m in cluster.members for p in m.status().peers),
             10, "every member to reach both peers")
    statuses = [m.status() for m in cluster.members]
    assert sorted(s.id for s in statuses) == ["replica-1", "replica-2", "replica-3"]
    assert [s.role for s in statuses].count("leader") == 1
    assert {s.leader for s in statuses} == {leader.id}
    for s in statuses:
        assert s.term >= 1 and s.journal_bytes > 0
        assert len(s.peers) == 2 and all(p.reachable for p in s.peers)
    for member in cluster.members:
        health = health_pb2_grpc.HealthStub(member.channel)
        for service in ("", "tarefa.replica.Replica"):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_mixed_workload_leaves_identical_leveldbs(cluster):
    deadline = time.monotonic() + 60
    for c in range(1, 6):
        apply_with_retry(cluster, cmd(pb.CREATE_CLIENT, cid=str(c), data=f'{{"n": {c}}}'),
                         deadline, start=c)
        for t in range(20):
            apply_with_retry(cluster, cmd(pb.CREATE_TASK, cid=str(c), title=f"t/{t}"),
                             deadline, start=t)
        for t in range(0, 20, 3):
            apply_with_retry(cluster, cmd(pb.UPDATE_TASK, cid=str(c), title=f"t/{t}",
                                          status="done"), deadline, start=t)
        for t in range(0, 20, 4):
            apply_with_retry(cluster, cmd(pb.DELETE_TASK, cid=str(c), title=f"t/{t}"),
                             deadline, start=t)
    apply_with_retry(cluster, cmd(pb.DELETE_CLIENT, cid="2"), deadline)
    apply_with_retry(cluster, cmd(pb.DELETE_ALL_TASKS, cid="3"), deadline)
    digests = cluster.stop_and_digest()
    assert len(set(digests.values())) == 1, digests


def test_no_quorum_answers_unavailable_within_deadline(cluster):
    leader = cluster.wait_leader()
    leader.stub.Apply(cmd(pb.CREATE_CLIENT, cid="1", data="{}"), timeout=5)
    followers = cluster.followers()
    for f in followers:
        f.signal(signal.SIGSTOP)
    try:
        for member in (leader,):
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                member.stub.Apply(cmd(pb.CREATE_TASK, cid="1", title="no quorum"), timeout=2)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
            assert "retry" in info.value.details()
            assert time.monotonic() - started < 2.5
            with pytest.raises(grpc.RpcError) as info:
                member.stub.Get(pb.GetRequest(kind=pb.CLIENT, cid="1"), timeout=2)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        for f in followers:
            f.signal(signal.SIGCONT)
    # A stale-but-serializable read still answers from the local copy.
    got = leader.stub.Get(pb.GetRequest(kind=pb.CLIENT, cid="1", consistency=pb.SERIALIZABLE),
                          timeout=5)
    assert json.loads(got.record)["cid"] == "1"
    wait_for(lambda: cluster.wait_leader(), 20, "a leader after SIGCONT")


def test_sigterm_stops_cleanly_with_exit_0(cluster):
    leader = cluster.wait_leader()
    leader.stub.Apply(cmd(pb.CREATE_CLIENT, cid="1", data="{}"), timeout=5)
    for member in cluster.members:
        assert member.terminate() == 0
        assert "stopped" in member.logs()
    for member in cluster.members:  # LevelDB was closed: it opens again at once
        Storage(cluster.data_dir(member)).close()
