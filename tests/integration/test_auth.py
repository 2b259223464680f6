"""Credentials and limits against the real secured stack (auth: token, TLS,
MQTT logins, Raft password): missing, wrong and other clients' credentials
are refused with the right code and change nothing; a rotated secret is
refused on every portal within 1 s; limits answer RESOURCE_EXHAUSTED; and no
secret reaches a log, an event, the audit log, `cluster status` or an error
message."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import grpc
import pytest

from proto import portal_pb2 as pb
from proto import replica_pb2
from tests.harness import ROOT, ListenerProcess, Stack, free_ports, wait_for

Code = grpc.StatusCode
ROTATION_BOUND = 1.0  # seconds: the requirement


def bearer(value: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {value}"),)


def code_of(call, request, metadata=None) -> tuple[Code, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=10, metadata=metadata)
    return info.value.code(), info.value.details() or ""


def answer(call, request, metadata=None) -> Code:
    """The call's status code (OK when it succeeds)."""
    try:
        call(request, timeout=10, metadata=metadata)
    except grpc.RpcError as exc:
        return exc.code()
    return Code.OK


def stream_code(call, request, metadata=None) -> tuple[Code, str]:
    with pytest.raises(grpc.RpcError) as info:
        next(iter(call(request, timeout=10, metadata=metadata)))
    return info.value.code(), info.value.details() or ""


def revision(stack: Stack) -> int:
    return max(m.stub.Status(replica_pb2.StatusRequest(), timeout=5).revision
               for m in stack.members)


def cli(stack: Stack, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("TAREFA_TOKEN", "TAREFA_SECRET", "TAREFA_CREDENTIALS", "TAREFA_CID")}
    return subprocess.run([sys.executable, "-m", "client", "--config", stack.config_path, *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**clean, **(env or {})})


def start(stack: Stack, request, *extra_daemons) -> None:
    try:
        stack.start()
        for daemon in extra_daemons:
            daemon.start()
    except BaseException:
        stop(stack, request, *extra_daemons, failed=True)
        raise


def stop(stack: Stack, request, *extra_daemons, failed: bool | None = None) -> None:
    for daemon in extra_daemons:
        try:
            daemon.terminate()
        except Exception:  # noqa: BLE001 - keep stopping
            pass
    stack.stop()
    if failed is None:
        rep = getattr(request.node, "rep_call", None)
        failed = rep is None or rep.failed
    if failed:
        print(stack.dump_logs())
        for daemon in extra_daemons:
            print(f"===== {daemon.id} =====\n{daemon.logs()[-20000:]}")


@pytest.fixture
def secured(tmp_path, request):
    listener_port = free_ports(1)[0]
    s = Stack(str(tmp_path / "stack"), secure=True, extra={"listener": {
        "id": "listener-1", "host": "127.0.0.1", "port": listener_port,
        "audit_log": "audit/audit.jsonl", "fsync": "never"}})
    s.listener = ListenerProcess(s.workdir, s.config_path, listener_port)
    s.audit_log = os.path.join(s.workdir, "audit", "audit.jsonl")
    start(s, request, s.listener)
    try:
        wait_for(lambda: "connected to broker" in s.listener.logs(), 20,
                 "the listener's broker login")
    except BaseException:
        stop(s, request, s.listener, failed=True)
        raise
    yield s
    stop(s, request, s.listener)


class Clients:
    """Two clients with their secrets, made through the admin portal."""

    def __init__(self, stack: Stack) -> None:
        self.admin = stack.portal("portal-admin").admin
        self.token = bearer(stack.admin_token or "")
        a = self.admin.CreateClient(pb.CreateClientRequest(cid="7", data='{"name": "Ana"}'),
                                    timeout=10, metadata=self.token)
        b = self.admin.CreateClient(pb.CreateClientRequest(cid="8", data='{"name": "Bia"}'),
                                    timeout=10, metadata=self.token)
        assert len(a.secret) >= 40 and a.secret != b.secret
        self.secrets = {"7": a.secret, "8": b.secret}


def client_calls(cid: str) -> list[tuple[str, object]]:
    return [("CreateTask", pb.CreateTaskRequest(cid=cid, title="t2", description="x")),
            ("GetTask", pb.TaskRef(cid=cid, title="t1")),
            ("GetTask", pb.TaskRef(cid=cid, title="t1", consistency=pb.LINEARIZABLE)),
            ("UpdateTask", pb.UpdateTaskRequest(cid=cid, title="t1", status="done")),
            ("ListTasks", pb.ListTasksRequest(cid=cid)),
            ("DeleteTask", pb.DeleteTaskRequest(cid=cid, title="t1")),
            ("DeleteAllTasks", pb.DeleteAllTasksRequest(cid=cid))]


def test_admin_calls_refused_without_the_token_and_change_nothing(secured):
    admin = secured.portal("portal-admin").admin
    Clients(secured)
    before = revision(secured)
    calls = [("CreateClient", pb.CreateClientRequest(cid="9", data="{}")),
             ("GetClient", pb.ClientRef(cid="7")),
             ("UpdateClient", pb.UpdateClientRequest(cid="7", data='{"x": 1}')),
             ("DeleteClient", pb.DeleteClientRequest(cid="7")),
             ("ListClients", pb.ListClientsRequest()),
             ("RotateSecret", pb.RotateSecretRequest(cid="7"))]
    for method, request in calls:
        assert code_of(getattr(admin, method), request)[0] == Code.UNAUTHENTICATED, method
        assert code_of(getattr(admin, method), request, (("authorization", "Basic x"),))[0] \
            == Code.UNAUTHENTICATED, method
        for wrong in ("wrong", secured.admin_token + "x", secured.admin_token[:-1]):
            assert code_of(getattr(admin, method), request, bearer(wrong))[0] \
                == Code.PERMISSION_DENIED, method
    assert revision(secured) == before
    listed = admin.ListClients(pb.ListClientsRequest(), timeout=10,
                               metadata=bearer(secured.admin_token))
    assert [(c.cid, json.loads(c.data)) for c in listed.clients] == \
        [("7", {"name": "Ana"}), ("8", {"name": "Bia"})]
    assert all(not c.secret for c in listed.clients)
    log = secured.portal("portal-admin").logs()
    assert "refused RotateSecret from ipv4:127.0.0.1:" in log


def test_client_calls_need_that_clients_own_secret(secured):
    clients = Clients(secured)
    for portal_id in ("portal-client-1", "portal-client-2"):
        stub = secured.portal(portal_id).client
        stub.CreateTask(pb.CreateTaskRequest(cid="7", title="t1"), timeout=10,
                        metadata=bearer(clients.secrets["7"]))
        before = revision(secured)
        for method, request in client_calls("7"):
            call = getattr(stub, method)
            assert code_of(call, request)[0] == Code.UNAUTHENTICATED, method
            wrong = code_of(call, request, bearer("x" * 43))
            other = code_of(call, request, bearer(clients.secrets["8"]))  # B's secret, A's CID
            assert wrong[0] == other[0] == Code.PERMISSION_DENIED, method
            assert wrong[1] == other[1]
        # An unknown CID gets exactly the answer of a wrong secret.
        unknown = code_of(stub.GetTask, pb.TaskRef(cid="9", title="t1"),
                          bearer(clients.secrets["7"]))
        assert unknown == other
        watch = pb.WatchTasksRequest(cid="7")
        assert stream_code(stub.WatchTasks, watch)[0] == Code.UNAUTHENTICATED
        assert stream_code(stub.WatchTasks, watch, bearer(clients.secrets["8"]))[0] \
            == Code.PERMISSION_DENIED
        assert revision(secured) == before
        task = stub.GetTask(pb.TaskRef(cid="7", title="t1", consistency=pb.LINEARIZABLE),
                            timeout=10, metadata=bearer(clients.secrets["7"]))
        assert task.status == "pending"
        stub.DeleteTask(pb.DeleteTaskRequest(cid="7", title="t1"), timeout=10,
                        metadata=bearer(clients.secrets["7"]))
        log = secured.portal(portal_id).logs()
        assert "refused GetTask from ipv4:127.0.0.1:" in log and "cid='9'" in log


def test_a_watch_opened_with_the_new_secret_outlives_the_late_rotation_event(secured):
    # The rotation's event reaches this portal after a watch was opened with
    # the new secret (authenticated by a fresh read): that event is the one
    # that made the secret in use, not a reason to end the stream.
    clients = Clients(secured)
    portal = secured.portal("portal-client-1")
    portal.client.ListTasks(pb.ListTasksRequest(cid="7"), timeout=10,
                            metadata=bearer(clients.secrets["7"]))  # old record cached

    def received() -> int:
        return portal.status_stub.Status(pb.PortalStatusRequest(), timeout=5).events_received

    secured.broker.signal(signal.SIGSTOP)  # holds the rotation's event back
    try:
        before = received()
        new = bearer(clients.admin.RotateSecret(pb.RotateSecretRequest(cid="7"), timeout=10,
                                                metadata=clients.token).secret)
        watch = portal.client.WatchTasks(pb.WatchTasksRequest(cid="7"), timeout=30,
                                         metadata=new)
        wait_for(lambda: portal.status_stub.Status(pb.PortalStatusRequest(), timeout=5)
                 .watch_streams == 1, 10, "the watch to open")
    finally:
        secured.broker.signal(signal.SIGCONT)
    wait_for(lambda: received() > before, 10, "the rotation event to reach the portal")
    portal.client.CreateTask(pb.CreateTaskRequest(cid="7", title="after"), timeout=10,
                             metadata=new)
    event = next(watch)
    assert (event.event, event.title) == ("task.created", "after")
    watch.cancel()


def test_rotated_secret_is_refused_on_every_portal_within_a_second(secured):
    clients = Clients(secured)
    old = bearer(clients.secrets["7"])
    stubs = [secured.portal(p).client for p in ("portal-client-1", "portal-client-2")]
    for stub in stubs:  # each portal has the old record cached and the old secret memoized
        stub.CreateTask(pb.CreateTaskRequest(cid="7", title=f"t{id(stub)}"), timeout=10,
                        metadata=old)
        stub.ListTasks(pb.ListTasksRequest(cid="7"), timeout=10, metadata=old)
    watch = stubs[0].WatchTasks(pb.WatchTasksRequest(cid="7"), timeout=30, metadata=old)
    wait_for(lambda: secured.portal("portal-client-1").status_stub.Status(
        pb.PortalStatusRequest(), timeout=5).watch_streams == 1, 10, "the watch to open")

    started = time.monotonic()
    rotated = clients.admin.RotateSecret(pb.RotateSecretRequest(cid="7"), timeout=10,
                                         metadata=clients.token)
    refused_after = {}
    while len(refused_after) < len(stubs) and time.monotonic() - started < 10:
        for i, stub in enumerate(stubs):
            if i in refused_after:
                continue
            try:
                stub.ListTasks(pb.ListTasksRequest(cid="7"), timeout=10, metadata=old)
            except grpc.RpcError as exc:
                assert exc.code() == Code.PERMISSION_DENIED
                refused_after[i] = time.monotonic() - started
    worst = max(refused_after.values())
    print(f"\nrotation: old secret refused on every client portal after {worst * 1000:.0f} ms "
          f"(per portal: {', '.join(f'{v * 1000:.0f} ms' for v in refused_after.values())})")
    assert len(refused_after) == len(stubs) and worst < ROTATION_BOUND
    for stub in stubs:
        assert stub.ListTasks(pb.ListTasksRequest(cid="7"), timeout=10,
                              metadata=bearer(rotated.secret)).tasks
    with pytest.raises(grpc.RpcError) as info:
        list(watch)
    assert info.value.code() == Code.UNAUTHENTICATED and "rotated" in info.value.details()
    # The other client is untouched.
    stubs[1].ListTasks(pb.ListTasksRequest(cid="8"), timeout=10,
                       metadata=bearer(clients.secrets["8"]))
    # A rotation of an unknown client is NOT_FOUND.
    assert code_of(clients.admin.RotateSecret, pb.RotateSecretRequest(cid="99"),
                   clients.token)[0] == Code.NOT_FOUND


def test_delete_and_recreate_makes_the_old_secret_useless(secured):
    clients = Clients(secured)
    stub = secured.portal("portal-client-1").client
    old = bearer(clients.secrets["7"])
    stub.ListTasks(pb.ListTasksRequest(cid="7"), timeout=10, metadata=old)
    clients.admin.DeleteClient(pb.DeleteClientRequest(cid="7"), timeout=10,
                               metadata=clients.token)
    again = clients.admin.CreateClient(pb.CreateClientRequest(cid="7", data="{}"), timeout=10,
                                       metadata=clients.token)
    assert again.secret != clients.secrets["7"]
    wait_for(lambda: answer(stub.ListTasks, pb.ListTasksRequest(cid="7"), old)
             == Code.PERMISSION_DENIED, ROTATION_BOUND, "the old secret to be refused")
    stub.ListTasks(pb.ListTasksRequest(cid="7"), timeout=10, metadata=bearer(again.secret))


def test_cli_credentials_and_no_secret_anywhere(secured, tmp_path):
    # The operator's CLI finds the admin token through the cluster file's admin_token_file.
    r = cli(secured, "--json", "client", "add", "--cid", "7", '{"name": "Ana"}')
    assert r.returncode == 0, r.stderr
    added = json.loads(r.stdout)
    secret = added["secret"]
    assert added["cid"] == "7" and len(secret) >= 40 and "only this once" in r.stderr
    r = cli(secured, "client", "add", "--cid", "8", "{}")
    assert r.returncode == 0 and r.stdout.splitlines()[0] == "8"
    other = r.stdout.splitlines()[1].removeprefix("secret: ")

    r = cli(secured, "--json", "task", "add", "--cid", "7", "from env",
            env={"TAREFA_SECRET": secret})
    assert r.returncode == 0, r.stderr
    r = cli(secured, "task", "ls", "--cid", "7")
    assert r.returncode == 1 and "UNAUTHENTICATED" not in r.stdout
    assert "secret required" in r.stderr and "TAREFA_SECRET" in r.stderr
    r = cli(secured, "task", "ls", "--cid", "7", env={"TAREFA_SECRET": other})
    assert r.returncode == 1 and "refused" in r.stderr and other not in r.stderr

    creds = tmp_path / "creds"
    creds.write_text(f"# Ana\ncid=7\nsecret={secret}\n")
    creds.chmod(0o644)
    r = cli(secured, "--credentials", str(creds), "task", "ls")
    assert r.returncode == 2 and str(creds) in r.stderr and "chmod 600" in r.stderr
    assert secret not in r.stderr
    creds.chmod(0o600)
    r = cli(secured, "--json", "task", "ls", env={"TAREFA_CREDENTIALS": str(creds)})
    assert r.returncode == 0, r.stderr
    assert [t["title"] for t in json.loads(r.stdout)["tasks"]] == ["from env"]
    r = cli(secured, "--insecure-secret", secret, "task", "get", "--cid", "7", "from env")
    assert r.returncode == 0, r.stderr

    r = cli(secured, "client", "ls", env={"TAREFA_TOKEN": "wrong-token"})
    assert r.returncode == 1 and "admin token refused" in r.stderr
    r = cli(secured, "--json", "client", "rotate-secret", "7",
            env={"TAREFA_TOKEN": secured.admin_token})
    assert r.returncode == 0, r.stderr
    rotated = json.loads(r.stdout)
    assert rotated["cid"] == "7" and rotated["secret"] not in (secret, "")
    r = cli(secured, "task", "ls", "--cid", "7", env={"TAREFA_SECRET": secret})
    assert r.returncode == 1
    r = cli(secured, "task", "ls", "--cid", "7", env={"TAREFA_SECRET": rotated["secret"]})
    assert r.returncode == 0, r.stderr
    r = cli(secured, "--json", "cluster", "status")
    status = r.stdout

    # Every event reached the audit log (the rotation included, without secret or hash).
    wait_for(lambda: os.path.exists(secured.audit_log) and "client.secret_rotated"
             in open(secured.audit_log, encoding="utf-8").read(), 10,
             "the rotation event in the audit log")
    with open(secured.audit_log, encoding="utf-8") as fh:
        audit = fh.read()
    rotation = [json.loads(line) for line in audit.splitlines()
                if '"client.secret_rotated"' in line][0]
    assert set(rotation) - {"topic", "received_at"} == \
        {"schema", "event", "cid", "revision", "origin", "at"}

    everything = "\n".join([audit, status, secured.dump_logs(), secured.listener.logs()])
    for value in (secret, other, rotated["secret"], secured.admin_token):
        assert value not in everything
    assert "wrong-token" not in everything


@pytest.fixture
def limited(tmp_path, request):
    s = Stack(str(tmp_path / "stack"), secure=True, extra={"limits": {
        "max_watch_streams": 3, "max_watch_streams_per_client": 2,
        "client_write_rate": 2, "client_write_burst": 4, "max_message_bytes": 524_288}})
    start(s, request)
    yield s
    stop(s, request)


def test_limits_answer_resource_exhausted(limited):
    clients = Clients(limited)
    portal = limited.portal("portal-client-1")
    stub = portal.client
    a, b = bearer(clients.secrets["7"]), bearer(clients.secrets["8"])

    def open_streams() -> int:
        return portal.status_stub.Status(pb.PortalStatusRequest(), timeout=5).watch_streams

    streams = [stub.WatchTasks(pb.WatchTasksRequest(cid="7"), timeout=60, metadata=a)
               for _ in range(2)]
    wait_for(lambda: open_streams() == 2, 10, "two streams of client 7")
    code, message = stream_code(stub.WatchTasks, pb.WatchTasksRequest(cid="7"), a)
    assert code == Code.RESOURCE_EXHAUSTED and "max_watch_streams_per_client" in message
    streams.append(stub.WatchTasks(pb.WatchTasksRequest(cid="8"), timeout=60, metadata=b))
    wait_for(lambda: open_streams() == 3, 10, "a stream of client 8")
    code, message = stream_code(stub.WatchTasks, pb.WatchTasksRequest(cid="8"), b)
    assert code == Code.RESOURCE_EXHAUSTED and "limits.max_watch_streams)" in message
    # The other portal counts its own streams.
    other = limited.portal("portal-client-2").client
    extra = other.WatchTasks(pb.WatchTasksRequest(cid="7"), timeout=60, metadata=a)
    streams[0].cancel()
    wait_for(lambda: open_streams() == 2, 10, "a cancelled stream to free its slot")
    streams.append(stub.WatchTasks(pb.WatchTasksRequest(cid="7"), timeout=60, metadata=a))
    wait_for(lambda: open_streams() == 3, 10, "the freed slot to be taken")
    for call in [*streams, extra]:
        call.cancel()

    # Writes: a burst of 4, then 2/s; reads are not limited; each client has its own bucket.
    before = revision(limited)
    for i in range(4):
        stub.CreateTask(pb.CreateTaskRequest(cid="7", title=f"w{i}"), timeout=10, metadata=a)
    code, message = code_of(stub.CreateTask, pb.CreateTaskRequest(cid="7", title="w4"), a)
    assert code == Code.RESOURCE_EXHAUSTED and "client_write_rate" in message
    assert revision(limited) == before + 4
    for _ in range(10):
        stub.ListTasks(pb.ListTasksRequest(cid="7"), timeout=10, metadata=a)
    stub.CreateTask(pb.CreateTaskRequest(cid="8", title="w0"), timeout=10, metadata=b)
    wait_for(lambda: stub.CreateTask(pb.CreateTaskRequest(cid="7", title="w4"), timeout=10,
                                     metadata=a), 3, "a token to come back", interval=0.2)
    status = portal.status_stub.Status(pb.PortalStatusRequest(), timeout=5)
    assert status.limited >= 3

    # Messages: limits.max_message_bytes (512 KiB here, the least allowed) bounds
    # what a portal accepts, before the 64 KiB-description rule; nothing is written.
    before = revision(limited)
    code, message = code_of(stub.CreateTask, pb.CreateTaskRequest(
        cid="8", title="big", description="x" * 600_000), b)
    assert code == Code.RESOURCE_EXHAUSTED, (code, message)
    assert answer(stub.CreateTask, pb.CreateTaskRequest(
        cid="8", title="fits", description="x" * 60_000), b) == Code.OK
    assert revision(limited) == before + 1
