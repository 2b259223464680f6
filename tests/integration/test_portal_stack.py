"""The whole stack with real processes: Mosquitto, three replicas, an admin
portal and two client portals. Every RPC, cache coherence across portals,
the cache invariant under a race, broker loss, and replica loss."""

from __future__ import annotations

import json
import select
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest

from proto import portal_pb2 as pb
from tests.harness import ROOT, Stack, new_request_id, wait_for


@pytest.fixture
def stack(tmp_path, request):
    s = Stack(str(tmp_path / "stack"))
    try:
        s.start()
        yield s
    finally:
        s.stop()
        rep = getattr(request.node, "rep_call", None)
        if rep is None or rep.failed:
            print(s.dump_logs())


def cli(stack: Stack, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "client", "--config", stack.config_path, *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def rpc_code(call, *args, **kwargs) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, timeout=10, **kwargs)
    return info.value.code()


def test_cli_every_verb_and_exit_codes(stack):
    r = cli(stack, "client", "add", '{"name": "Ana"}')
    assert r.returncode == 0, r.stderr
    generated = r.stdout.strip()
    assert generated.isdigit() and not generated.startswith("0")
    assert cli(stack, "client", "add", "--cid", "7", '{"name": "Bia"}').stdout.strip() == "7"
    r = cli(stack, "client", "add", "--cid", "7", "{}")
    assert r.returncode == 1 and "already exists" in r.stderr
    r = cli(stack, "client", "add", "--cid", "-7", "{}")
    assert r.returncode == 2 and "cid" in r.stderr
    r = cli(stack, "client", "add", "[1, 2]")
    assert r.returncode == 2 and "JSON object" in r.stderr
    r = cli(stack, "--json", "client", "get", "7")
    assert json.loads(r.stdout)["data"] == {"name": "Bia"}
    r = cli(stack, "--json", "client", "update", "7", '{"name": "Bia", "vip": true}')
    assert json.loads(r.stdout)["data"]["vip"] is True
    assert cli(stack, "client", "update", "8", "{}").returncode == 1
    r = cli(stack, "--json", "client", "ls")
    listed = json.loads(r.stdout)
    assert [c["cid"] for c in listed["clients"]] == ["7", generated] and listed["next"] is None

    r = cli(stack, "--json", "task", "add", "--cid", "7", "buy/milk #1", "2 L")
    task = json.loads(r.stdout)
    assert (task["title"], task["description"], task["status"]) == ("buy/milk #1", "2 L", "pending")
    assert cli(stack, "task", "add", "--cid", "7", "buy/milk #1").returncode == 1
    assert cli(stack, "task", "add", "--cid", "8", "x").returncode == 1
    r = cli(stack, "task", "add", "--cid", "7", "")
    assert r.returncode == 2 and "title" in r.stderr
    assert cli(stack, "task", "add", "--cid", "7", "second").returncode == 0
    r = cli(stack, "--json", "task", "done", "--cid", "7", "buy/milk #1")
    assert json.loads(r.stdout)["status"] == "done"
    r = cli(stack, "--json", "task", "update", "--cid", "7", "second", "--description", "d2")
    assert json.loads(r.stdout)["description"] == "d2"
    assert cli(stack, "task", "update", "--cid", "7", "nope", "--status", "done").returncode == 1
    r = cli(stack, "--json", "task", "ls", "--cid", "7", "--status", "done")
    assert [t["title"] for t in json.loads(r.stdout)["tasks"]] == ["buy/milk #1"]
    r = cli(stack, "task", "ls", "--cid", "7")
    assert "TITLE" in r.stdout and "buy/milk #1" in r.stdout and "second" in r.stdout
    r = cli(stack, "--json", "task", "get", "--cid", "7", "second", "--consistency",
            "linearizable")
    assert json.loads(r.stdout)["description"] == "d2"
    assert cli(stack, "task", "get", "--cid", "7", "nope").returncode == 1
    assert cli(stack, "task", "rm", "--cid", "7", "second").returncode == 0
    assert cli(stack, "task", "rm", "--cid", "7", "second").returncode == 1
    r = cli(stack, "--json", "task", "clear", "--cid", "7")
    assert json.loads(r.stdout)["deleted_tasks"] == 1
    r = cli(stack, "--json", "client", "rm", "7")
    assert json.loads(r.stdout)["cid"] == "7"
    assert cli(stack, "client", "get", "7").returncode == 1
    r = cli(stack, "task", "ls")
    assert r.returncode == 2 and "--cid" in r.stderr
    # A retry with the same --request-id is the same write: one client, the first answer,
    # also for a generated CID; the id with another command is refused.
    first = cli(stack, "--request-id", "retry-1", "client", "add", '{"n": 1}')
    again = cli(stack, "--request-id", "retry-1", "client", "add", '{"n": 1}')
    assert first.returncode == again.returncode == 0, again.stderr
    assert first.stdout.split()[0] == again.stdout.split()[0]
    r = cli(stack, "--json", "client", "ls")
    assert [c["cid"] for c in json.loads(r.stdout)["clients"]].count(first.stdout.split()[0]) == 1
    r = cli(stack, "--request-id", "retry-1", "client", "add", '{"n": 2}')
    assert r.returncode == 2 and "already used for a different command" in r.stderr
    r = cli(stack, "--portal", "127.0.0.1:1", "client", "ls")
    assert r.returncode == 3 and "127.0.0.1:1" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "client", "task", "frobnicate"], cwd=ROOT,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2


def test_grpc_failures_of_every_rpc(stack):
    admin = stack.portal("portal-admin").admin
    tasks = stack.portal("portal-client-1").client
    bad = grpc.StatusCode.INVALID_ARGUMENT
    missing = grpc.StatusCode.NOT_FOUND
    assert rpc_code(admin.CreateClient, pb.CreateClientRequest(cid="1", data="nope")) == bad
    assert rpc_code(admin.CreateClient, pb.CreateClientRequest(
        cid="1", data=json.dumps({"x": "y" * 70_000}))) == bad
    admin.CreateClient(pb.CreateClientRequest(cid="1" * 200, data="{}"), timeout=10)
    assert rpc_code(admin.CreateClient, pb.CreateClientRequest(cid="1" * 200, data="{}")) \
        == grpc.StatusCode.ALREADY_EXISTS
    assert rpc_code(admin.GetClient, pb.ClientRef(cid="00")) == bad
    assert rpc_code(admin.GetClient, pb.ClientRef(cid="2")) == missing
    assert rpc_code(admin.UpdateClient, pb.UpdateClientRequest(cid="2", data="{}")) == missing
    assert rpc_code(admin.DeleteClient, pb.DeleteClientRequest(cid="2")) == missing
    assert rpc_code(admin.ListClients, pb.ListClientsRequest(limit=5000)) == bad
    assert rpc_code(admin.ListClients, pb.ListClientsRequest(page_token="garbage!")) == bad

    cid = "1" * 200
    assert rpc_code(tasks.CreateTask, pb.CreateTaskRequest(cid=cid, title="x" * 257)) == bad
    assert rpc_code(tasks.CreateTask, pb.CreateTaskRequest(cid=cid, title="a\nb")) == bad
    assert rpc_code(tasks.CreateTask, pb.CreateTaskRequest(
        cid=cid, title="t", description="d" * 70_000)) == bad
    assert rpc_code(tasks.CreateTask, pb.CreateTaskRequest(cid="3", title="t")) == missing
    tasks.CreateTask(pb.CreateTaskRequest(cid=cid, title="t"), timeout=10)
    assert rpc_code(tasks.CreateTask, pb.CreateTaskRequest(cid=cid, title="t")) \
        == grpc.StatusCode.ALREADY_EXISTS
    assert rpc_code(tasks.GetTask, pb.TaskRef(cid=cid, title="u")) == missing
    assert rpc_code(tasks.UpdateTask, pb.UpdateTaskRequest(cid=cid, title="t")) == bad
    assert rpc_code(tasks.UpdateTask, pb.UpdateTaskRequest(cid=cid, title="t", status="x")) == bad
    assert rpc_code(tasks.UpdateTask, pb.UpdateTaskRequest(cid=cid, title="u", status="done")) \
        == missing
    assert rpc_code(tasks.DeleteTask, pb.DeleteTaskRequest(cid=cid, title="u")) == missing
    assert rpc_code(tasks.DeleteAllTasks, pb.DeleteAllTasksRequest(cid="3")) == missing
    assert rpc_code(tasks.ListTasks, pb.ListTasksRequest(cid="3")) == missing
    assert rpc_code(tasks.ListTasks, pb.ListTasksRequest(cid=cid, status="later")) == bad
    with pytest.raises(grpc.RpcError) as info:
        next(iter(tasks.WatchTasks(pb.WatchTasksRequest(cid="3"), timeout=10)))
    assert info.value.code() == missing
    # The admin portal does not serve ClientPortal, nor the client portal AdminPortal.
    assert rpc_code(stack.portal("portal-admin").client.GetTask, pb.TaskRef(cid=cid, title="t")) \
        == grpc.StatusCode.UNIMPLEMENTED
    # A request id makes a client's own retry harmless.
    rid = new_request_id()
    first = tasks.CreateTask(pb.CreateTaskRequest(cid=cid, title="once", request_id=rid),
                             timeout=10)
    again = tasks.CreateTask(pb.CreateTaskRequest(cid=cid, title="once", request_id=rid),
                             timeout=10)
    assert again.revision == first.revision


def test_caches_coherent_across_portals(stack):
    admin = stack.portal("portal-admin").admin
    a = stack.portal("portal-client-1")
    b = stack.portal("portal-client-2")
    admin.CreateClient(pb.CreateClientRequest(cid="42", data='{"n": 1}'), timeout=10)
    for portal in (a, b):  # usable on both client portals at once
        portal.client.CreateTask(pb.CreateTaskRequest(cid="42", title=f"from {portal.id}"),
                                 timeout=10)
    for version in range(3):
        written = a.client.UpdateTask(pb.UpdateTaskRequest(
            cid="42", title="from portal-client-1", description=f"v{version}"), timeout=10)

        def hit_with_new_value() -> bool:
            hits = b.status().cache_hits
            got = b.client.GetTask(pb.TaskRef(cid="42", title="from portal-client-1"),
                                   timeout=10)
            return b.status().cache_hits == hits + 1 and got.revision == written.revision \
                and got.description == f"v{version}"
        wait_for(hit_with_new_value, 1.0, "portal B to serve A's write from its cache")

    admin.DeleteClient(pb.DeleteClientRequest(cid="42"), timeout=10)
    for portal in (a, b):
        # Writes are refused at once (the replicas check); cached reads stop as
        # soon as the portal has the client.deleted event.
        assert rpc_code(portal.client.CreateTask, pb.CreateTaskRequest(cid="42", title="z")) \
            == grpc.StatusCode.NOT_FOUND

        def refused(p=portal) -> bool:
            try:
                p.client.GetTask(pb.TaskRef(cid="42", title="from portal-client-1"), timeout=5)
            except grpc.RpcError as exc:
                return exc.code() == grpc.StatusCode.NOT_FOUND
            return False
        wait_for(refused, 1.0, f"{portal.id} to refuse the deleted client's CID")


def test_a_retried_write_never_puts_its_first_answer_over_a_newer_value(stack):
    """A retried request id gets its first answer (exactly once), which is
    published again as a replay: no cache may take that record, since newer
    changes may have superseded it. Found by review: portal-client-2, restarted
    since (no revision mark for the key), cached the first answer of a retry,
    made on itself or on portal-client-1, and served it for the whole TTL
    while the replicas held a newer value."""
    admin = stack.portal("portal-admin").admin
    a = stack.portal("portal-client-1")
    b = stack.portal("portal-client-2")
    admin.CreateClient(pb.CreateClientRequest(cid="12", data="{}"), timeout=10)
    a.client.CreateTask(pb.CreateTaskRequest(cid="12", title="t", description="v0"), timeout=10)
    ref = pb.TaskRef(cid="12", title="t")
    for retried_on in (b, a):
        request_id = f"retried-on-{retried_on.id}"
        first = a.client.UpdateTask(pb.UpdateTaskRequest(
            cid="12", title="t", description="first", request_id=request_id), timeout=10)
        newer = a.client.UpdateTask(pb.UpdateTaskRequest(
            cid="12", title="t", description="newer"), timeout=10)
        b.terminate()
        b.start()
        b.wait_ready(30)
        received = b.status().events_received
        again = retried_on.client.UpdateTask(pb.UpdateTaskRequest(
            cid="12", title="t", description="first", request_id=request_id), timeout=10)
        assert (again.revision, again.description) == (first.revision, "first")
        if retried_on is a:
            wait_for(lambda: b.status().events_received > received, 10,
                     "portal-client-2 to get the replayed event")
        for _ in range(2):  # the first read may fill the cache, the second is served from it
            got = b.client.GetTask(ref, timeout=10)
            assert (got.description, got.revision) == ("newer", newer.revision), retried_on.id


def test_watch_streams_changes_from_other_portals(stack):
    admin = stack.portal("portal-admin").admin
    a = stack.portal("portal-client-1")
    b = stack.portal("portal-client-2")
    admin.CreateClient(pb.CreateClientRequest(cid="5", data="{}"), timeout=10)
    call, seen, reader = _watch_in_background(b, "5")
    made = a.client.CreateTask(pb.CreateTaskRequest(cid="5", title="w/1"), timeout=10)
    done = a.client.UpdateTask(pb.UpdateTaskRequest(cid="5", title="w/1", status="done"),
                               timeout=10)
    gone = a.client.DeleteTask(pb.DeleteTaskRequest(cid="5", title="w/1"), timeout=10)
    wait_for(lambda: len(seen) >= 3, 5, "three watch events")
    call.cancel()
    reader.join(5)
    assert not reader.is_alive()
    assert [(e.event, e.revision) for e in seen[:3]] == [
        ("task.created", made.revision), ("task.updated", done.revision),
        ("task.deleted", gone.revision)]
    assert seen[1].task.status == "done" and seen[0].origin == "portal-client-1"
    wait_for(lambda: b.status().events_received >= 3, 5, "B counted the events")


def test_cli_task_verbs_and_watch_go_to_the_next_client_portal(stack):
    """With the first client portal of the cluster file down, the CLI uses the second."""
    stack.portal("portal-admin").admin.CreateClient(pb.CreateClientRequest(cid="6", data="{}"),
                                                    timeout=10)
    stack.portal("portal-client-1").kill()
    r = cli(stack, "task", "add", "--cid", "6", "first")
    assert r.returncode == 0, r.stderr
    watch = subprocess.Popen([sys.executable, "-m", "client", "--config", stack.config_path,
                              "--json", "task", "watch", "--cid", "6"], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        b = stack.portal("portal-client-2")
        wait_for(lambda: b.status().watch_streams >= 1, 10, "the CLI's watch stream on portal-client-2")
        made = b.client.CreateTask(pb.CreateTaskRequest(cid="6", title="second"), timeout=10)
        assert select.select([watch.stdout], [], [], 10)[0], "no event from task watch"
        event = json.loads(watch.stdout.readline())
        assert (event["event"], event["revision"]) == ("task.created", made.revision)
        watch.send_signal(signal.SIGINT)
        assert watch.wait(10) == 0, watch.stderr.read()
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait(10)


def test_a_watch_ends_when_its_client_is_deleted(stack):
    """The stream must not outlive its client, nor carry on for a new client that
    gets the same CID (another owner's data)."""
    admin = stack.portal("portal-admin").admin
    a, b = stack.portal("portal-client-1"), stack.portal("portal-client-2")
    admin.CreateClient(pb.CreateClientRequest(cid="4", data="{}"), timeout=10)
    stream = b.client.WatchTasks(pb.WatchTasksRequest(cid="4"), timeout=30)
    wait_for(lambda: b.status().watch_streams == 1, 5, "the watch stream")
    a.client.CreateTask(pb.CreateTaskRequest(cid="4", title="mine"), timeout=10)
    received = b.status().events_received
    gone = admin.DeleteClient(pb.DeleteClientRequest(cid="4"), timeout=10)
    admin.CreateClient(pb.CreateClientRequest(cid="4", data="{}"), timeout=10)
    # Events from different portals can arrive in any order; a new client's change
    # that overtook the deletion would be delivered (README "Watch streams"). Here
    # it comes after B has the deletion and the re-creation.
    wait_for(lambda: b.status().events_received >= received + 2, 5, "B to get both")
    a.client.CreateTask(pb.CreateTaskRequest(cid="4", title="theirs"), timeout=10)
    seen = []
    with pytest.raises(grpc.RpcError) as ended:
        for event in stream:
            seen.append((event.event, event.title))
    assert ended.value.code() == grpc.StatusCode.NOT_FOUND
    # The two events come from different portals and may arrive in either order;
    # nothing of the new client with the same CID comes at all.
    assert sorted(seen) == [("client.deleted", ""), ("task.created", "mine")]
    assert gone.revision > 0


def test_a_watch_skips_a_late_task_event_of_its_cids_earlier_life(stack):
    """A task event of an earlier client with the same CID that arrives late (a
    QoS 1 redelivery, a portal cut off from the broker for a while) is older
    than the watched client's record: not this client's change. Found by review:
    only client events were checked against that revision."""
    import paho.mqtt.client as mqtt

    from daemons.core import events

    admin = stack.portal("portal-admin").admin
    a, b = stack.portal("portal-client-1"), stack.portal("portal-client-2")
    admin.CreateClient(pb.CreateClientRequest(cid="41", data="{}"), timeout=10)
    old = a.client.CreateTask(pb.CreateTaskRequest(cid="41", title="old"), timeout=10)
    admin.DeleteClient(pb.DeleteClientRequest(cid="41"), timeout=10)
    admin.CreateClient(pb.CreateClientRequest(cid="41", data="{}"), timeout=10)
    call, seen, reader = _watch_in_background(b, "41")
    late = events.make_event("task.created", "41", old.revision, "portal-client-1",
                             "2026-01-01T00:00:00.000Z", title="ghost",
                             record={"cid": "41", "title": "ghost", "description": "",
                                     "status": "pending", "created_at": "2026-01-01T00:00:00.000Z",
                                     "updated_at": "2026-01-01T00:00:00.000Z",
                                     "revision": old.revision})
    publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    publisher.connect("127.0.0.1", stack.broker.port, keepalive=10)
    publisher.loop_start()
    try:
        received = b.status().events_received
        info = publisher.publish(events.event_topic("test", late), events.encode(late), qos=1)
        info.wait_for_publish(timeout=10)
        wait_for(lambda: b.status().events_received > received, 5, "B to get the late event")
    finally:
        publisher.disconnect()
        publisher.loop_stop()
    new = a.client.CreateTask(pb.CreateTaskRequest(cid="41", title="new"), timeout=10)
    wait_for(lambda: any(e.title == "new" for e in seen), 5, "the new client's task")
    call.cancel()
    reader.join(5)
    assert [(e.event, e.title, e.revision) for e in seen] == [
        ("task.created", "new", new.revision)]


def _watch_in_background(portal, cid: str):  # type: ignore[no-untyped-def]
    """A live WatchTasks stream on `portal` read by a thread into a list: (call, events, thread)."""
    call = portal.client.WatchTasks(pb.WatchTasksRequest(cid=cid))
    seen: list = []
    reader = threading.Thread(target=lambda: [seen.append(e) for e in _until_cancel(call)])
    reader.start()
    _wait_live(call)
    return call, seen, reader


def _wait_live(call) -> None:  # type: ignore[no-untyped-def]
    """Until the portal sent the stream's headers: it is registered and past its checks."""
    live = threading.Event()
    call.add_done_callback(lambda _: live.set())  # ended early: the reader raises
    threading.Thread(target=lambda: (call.initial_metadata(), live.set()), daemon=True).start()
    assert live.wait(10), "the watch stream's headers within 10 s"


def _until_cancel(call):
    try:
        yield from call
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.CANCELLED:
            raise


def test_cache_invariant_under_racing_writes_and_reads(stack):
    """Once B's watch stream delivered revision r, no later read on B returns older."""
    admin = stack.portal("portal-admin").admin
    a = stack.portal("portal-client-1")
    b = stack.portal("portal-client-2")
    admin.CreateClient(pb.CreateClientRequest(cid="9", data="{}"), timeout=10)
    titles = [f"k{i}" for i in range(3)]
    for t in titles:
        a.client.CreateTask(pb.CreateTaskRequest(cid="9", title=t), timeout=10)
    seen_by_b: dict[str, int] = {t: 0 for t in titles}
    lock = threading.Lock()
    call = b.client.WatchTasks(pb.WatchTasksRequest(cid="9"))

    def watch() -> None:
        for event in _until_cancel(call):
            with lock:
                seen_by_b[event.title] = max(seen_by_b[event.title], event.revision)
    watcher = threading.Thread(target=watch)
    watcher.start()
    _wait_live(call)
    stop = time.monotonic() + 8
    violations: list = []
    reads = [0]

    errors: list[BaseException] = []

    def recording(target):  # type: ignore[no-untyped-def]
        def run(*args):  # type: ignore[no-untyped-def]
            try:
                target(*args)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
        return run

    def writer(n: int) -> None:
        i = 0
        while time.monotonic() < stop:
            a.client.UpdateTask(pb.UpdateTaskRequest(cid="9", title=titles[i % 3],
                                                     description=f"{n}-{i}"), timeout=10)
            i += 1

    def reader() -> None:
        i = 0
        while time.monotonic() < stop:
            title = titles[i % 3]
            i += 1
            with lock:
                floor = seen_by_b[title]
            got = b.client.GetTask(pb.TaskRef(cid="9", title=title), timeout=10)
            reads[0] += 1
            if got.revision < floor:
                violations.append((title, got.revision, floor))
    threads = [threading.Thread(target=recording(writer), args=(n,)) for n in range(2)] + \
              [threading.Thread(target=recording(reader)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    call.cancel()
    watcher.join(5)
    assert not errors, errors[:3]
    assert reads[0] > 100
    # The floors moved: B's watch delivered the writes, so the check had teeth.
    assert all(seen_by_b[t] > 0 for t in titles), seen_by_b
    assert not violations, violations[:5]
    status = b.status()
    assert status.cache_hits > 0, "the race never exercised the cache"


def test_broker_loss_and_return(stack):
    admin = stack.portal("portal-admin").admin
    a = stack.portal("portal-client-1")
    b = stack.portal("portal-client-2")
    admin.CreateClient(pb.CreateClientRequest(cid="3", data="{}"), timeout=10)
    a.client.CreateTask(pb.CreateTaskRequest(cid="3", title="t", description="v0"), timeout=10)
    wait_for(lambda: b.client.GetTask(pb.TaskRef(cid="3", title="t"), timeout=5), 5, "read")
    stream = b.client.WatchTasks(pb.WatchTasksRequest(cid="3"), timeout=120)
    wait_for(lambda: b.status().watch_streams == 1, 5, "the watch stream")
    stack.broker.kill()
    wait_for(lambda: not b.status().broker_connected and not a.status().broker_connected, 15,
             "portals to notice the broker is gone")
    # Events may be missed from now on: the stream ends instead of going quiet,
    # and a new one is refused until the broker is back.
    with pytest.raises(grpc.RpcError) as ended:
        next(iter(stream))
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "events may have been missed" in ended.value.details()
    with pytest.raises(grpc.RpcError) as refused:
        next(iter(b.client.WatchTasks(pb.WatchTasksRequest(cid="3"), timeout=10)))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    for i in range(3):  # no events flow, yet B must not serve its stale cache
        a.client.UpdateTask(pb.UpdateTaskRequest(cid="3", title="t", description=f"v{i + 1}"),
                            timeout=10)
        got = b.client.GetTask(pb.TaskRef(cid="3", title="t"), timeout=10)
        assert got.description == f"v{i + 1}"
    stack.broker.start()
    stack.broker.wait_ready()
    wait_for(lambda: b.status().broker_connected and a.status().broker_connected, 20,
             "portals to reconnect")
    assert b.status().cache_entries == 0  # emptied on reconnection
    assert b.client.GetTask(pb.TaskRef(cid="3", title="t"), timeout=5).description == "v3"
    written = a.client.UpdateTask(pb.UpdateTaskRequest(cid="3", title="t", description="after"),
                                  timeout=10)
    wait_for(lambda: b.client.GetTask(pb.TaskRef(cid="3", title="t"), timeout=5).revision
             == written.revision, 2, "B to see A's write after the broker returned")


@pytest.mark.parametrize("stop", ["kill", "sigterm"])
def test_replica_killed_while_writing_through_portals(stack, stop):
    """The leader killed, or stopped by SIGTERM (whose gRPC server cancels the
    calls that arrive while it stops: CANCELLED, which the portal now retries
    with the same request id), while clients write through both portals."""
    cid = "11" if stop == "kill" else "12"
    admin = stack.portal("portal-admin").admin
    portals = [stack.portal("portal-client-1"), stack.portal("portal-client-2")]
    admin.CreateClient(pb.CreateClientRequest(cid=cid, data="{}"), timeout=10)
    acked: dict[str, int] = {}
    errors: list = []
    lock = threading.Lock()

    def writer(w: int) -> None:
        for n in range(60):
            title = f"w{w}/n{n}"
            rid = new_request_id()
            for _attempt in range(10):  # the CLI-style retry: same request id
                try:
                    answer = portals[(w + _attempt) % 2].client.CreateTask(
                        pb.CreateTaskRequest(cid=cid, title=title, request_id=rid), timeout=10)
                except grpc.RpcError as exc:
                    if exc.code() in (grpc.StatusCode.UNAVAILABLE,
                                      grpc.StatusCode.DEADLINE_EXCEEDED):
                        continue
                    errors.append((title, exc.code(), exc.details()))
                    break
                with lock:
                    acked[title] = answer.revision
                break
    threads = [threading.Thread(target=writer, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    wait_for(lambda: len(acked) >= 60, 60, "60 writes before the kill")
    leader = stack.wait_leader()
    if stop == "kill":
        leader.kill()
    else:
        leader.signal(signal.SIGTERM)
        assert leader.proc.wait(20) == 0
    for t in threads:
        t.join(120)
    leader.start()
    stack.wait_ready(leader)
    assert not errors, errors[:5]
    assert len(acked) == 360
    assert len(set(acked.values())) == 360, "two writes share a revision"
    listed, token = [], ""
    for _ in range(100):  # 360 tasks in pages of up to 1000: bounded, whatever the paging
        page = portals[0].client.ListTasks(pb.ListTasksRequest(cid=cid, page_token=token,
                                                               limit=1000), timeout=10)
        listed += [(t.title, t.revision) for t in page.tasks]
        token = page.next
        if not token:
            break
    assert dict(listed) == acked
    stack.wait_converged()
    revisions = {m.status().revision for m in stack.members}
    assert revisions == {max(acked.values())}, revisions


def test_bug_concurrent_large_writes_exceeded_the_message_limit_together(tmp_path, request):
    """A portal groups concurrent writes into one ApplyBatch message. Groups were
    bounded by count only, so enough concurrent writes with large descriptions
    made a message over the replicas' limit (limits.max_message_bytes) and every
    write of the group failed with RESOURCE_EXHAUSTED, though each was valid.
    Groups are now bounded by bytes too (half the limit), and so are list pages."""
    s = Stack(str(tmp_path / "stack"), extra={"limits": {"max_message_bytes": 524_288}})
    try:
        s.start()
        admin, portal = s.portal("portal-admin").admin, s.portal("portal-client-1").client
        cid = admin.CreateClient(pb.CreateClientRequest(data="{}"), timeout=10).cid
        calls = [portal.CreateTask.future(pb.CreateTaskRequest(
            cid=cid, title=f"big {i}", description=f"{i}" + "x" * 60_000), timeout=30)
            for i in range(32)]  # ~1.9 MB at once, over three times the limit
        codes = []
        for c in calls:
            try:
                c.result()
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
        assert codes == [grpc.StatusCode.OK] * 32, codes
        # Listing them: a page of all such tasks was over the limit too (INTERNAL
        # "Sent message larger than max"); pages are now bounded by bytes as well.
        titles, token = [], ""
        for _ in range(20):
            page = portal.ListTasks(pb.ListTasksRequest(cid=cid, page_token=token), timeout=10)
            titles += [t.title for t in page.tasks]
            token = page.next
            if not token:
                break
        assert sorted(titles) == sorted(f"big {i}" for i in range(32))
    except BaseException:
        print(s.dump_logs())
        raise
    finally:
        s.stop()


def test_a_change_whose_caller_went_away_is_still_published(stack):
    """A caller that goes away (Ctrl-C, its own cancel) after sending a write
    that then commits: the portal used to drop the answer, so no event went
    out (other portals' caches stale until their TTL, watchers and the audit
    log missed the change). Here the replicas lose their quorum while the call
    is in flight, the caller cancels, the quorum returns and the write commits."""
    admin = stack.portal("portal-admin").admin
    a = stack.portal("portal-client-1")
    b = stack.portal("portal-client-2")
    admin.CreateClient(pb.CreateClientRequest(cid="6", data="{}"), timeout=10)
    call, seen, reader = _watch_in_background(b, "6")
    followers = stack.followers()
    try:
        for member in followers:
            member.signal(signal.SIGSTOP)
        pending = a.client.CreateTask.future(pb.CreateTaskRequest(cid="6", title="orphan"),
                                             timeout=20)
        time.sleep(0.3)
        pending.cancel()
        time.sleep(0.3)
    finally:
        for member in followers:
            member.signal(signal.SIGCONT)
    assert pending.cancelled()
    wait_for(lambda: any(e.task.title == "orphan" for e in seen), 10,
             "the event of the orphaned write on portal B")
    call.cancel()
    reader.join(5)
    assert not reader.is_alive()
    got = b.client.GetTask(pb.TaskRef(cid="6", title="orphan"), timeout=10)
    assert got.revision == next(e.revision for e in seen if e.task.title == "orphan")
