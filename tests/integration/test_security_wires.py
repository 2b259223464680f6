"""The secured stack's wires: TLS on every gRPC hop, MQTT logins and ACLs.

One real stack started like the default one (Stack(secure=True): tokens,
TLS with a local CA, mutual TLS to replicas, a Raft password, per-daemon
Mosquitto logins with ACLs) is probed from outside the way an intruder on
the machine would: plaintext gRPC, a certificate from another CA, no client
certificate, anonymous or wrong MQTT logins, and a daemon login that may
only read publishing forged events.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid

import grpc
import paho.mqtt.client as mqtt
import pytest
import yaml

from daemons.core import events
from daemons.core.config import load_cluster
from daemons.core.provision import Provisioner
from daemons.core.security import CLI_CERT, load_tls, open_channel, read_secret_file
from proto import portal_pb2 as pb
from proto import portal_pb2_grpc, replica_pb2, replica_pb2_grpc
from tests.harness import ROOT, SECURE, ListenerProcess, Stack, free_ports, wait_for

TIMEOUT = 5


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    port = free_ports(1)[0]
    listener = {"id": "listener", "host": "127.0.0.1", "port": port,
                "audit_log": "audit/audit.jsonl"}
    s = Stack(str(tmp_path_factory.mktemp("secure")), secure=True,
              extra={"listener": listener})
    s.listener = ListenerProcess(s.workdir, s.config_path, port, tls=s.tls)  # type: ignore[attr-defined]
    try:
        s.start()
        s.listener.start()  # type: ignore[attr-defined]
        s.listener.wait_ready()  # type: ignore[attr-defined]
        yield s
    except BaseException:
        print(s.dump_logs())
        raise
    finally:
        s.listener.terminate()  # type: ignore[attr-defined]
        s.listener.channel.close()  # type: ignore[attr-defined]
        s.stop()


@pytest.fixture(scope="module")
def foreign_dir(tmp_path_factory):
    """A cluster file with a complete, valid TLS setup from ANOTHER CA."""
    work = tmp_path_factory.mktemp("foreign")
    doc = {"security": {"auth": "cid-only", "tls": SECURE["tls"]},
           "replicas": [{"id": f"replica-{i}", "host": "127.0.0.1", "raft_port": 1000 + i,
                         "grpc_port": 2000 + i, "data_dir": f"d{i}"} for i in (1, 2, 3)]}
    (work / "cluster.yaml").write_text(yaml.safe_dump(doc))
    Provisioner(load_cluster(str(work / "cluster.yaml"))).run()
    return work


@pytest.fixture(scope="module")
def foreign_tls(foreign_dir):
    """A complete, valid TLS setup from ANOTHER CA, with the same daemon names."""
    cluster = load_cluster(str(foreign_dir / "cluster.yaml"))
    return load_tls(cluster.security.tls, CLI_CERT)


def code_of(call) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def portal_status(address: str, material, **kw) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with open_channel(address, material, **kw) as channel:
        stub = portal_pb2_grpc.PortalStatusStub(channel)
        return code_of(lambda: stub.Status(pb.PortalStatusRequest(), timeout=TIMEOUT))


def replica_status(address: str, material, **kw) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with open_channel(address, material, **kw) as channel:
        stub = replica_pb2_grpc.ReplicaStub(channel)
        return code_of(lambda: stub.Status(replica_pb2.StatusRequest(), timeout=TIMEOUT))


# ---- gRPC ----------------------------------------------------------------------------------


def test_portal_answers_tls_and_refuses_plaintext(stack):
    portal = stack.portal("portal-client-1")
    assert portal_status(portal.address, stack.tls) == grpc.StatusCode.OK
    assert portal_status(portal.address, None) == grpc.StatusCode.UNAVAILABLE


def test_portal_certificate_is_checked_against_the_cluster_ca(stack, foreign_tls):
    # A client trusting another CA refuses the portal: no man in the middle either way.
    portal = stack.portal("portal-client-1")
    assert portal_status(portal.address, foreign_tls) == grpc.StatusCode.UNAVAILABLE


def test_replica_requires_a_client_certificate_of_the_cluster_ca(stack, foreign_tls):
    address = stack.members[0].grpc_address
    assert replica_status(address, stack.tls, present_certificate=True) == grpc.StatusCode.OK
    # TLS without a client certificate, or with one from another CA, or plaintext: refused.
    assert replica_status(address, stack.tls) == grpc.StatusCode.UNAVAILABLE
    assert replica_status(address, None) == grpc.StatusCode.UNAVAILABLE
    # trust the cluster CA but present the foreign certificate
    creds = grpc.ssl_channel_credentials(stack.tls.ca, foreign_tls.key, foreign_tls.cert)
    with grpc.secure_channel(address, creds) as channel:
        stub = replica_pb2_grpc.ReplicaStub(channel)
        assert code_of(lambda: stub.Status(replica_pb2.StatusRequest(), timeout=TIMEOUT)) \
            == grpc.StatusCode.UNAVAILABLE


def test_cli_cluster_status_speaks_tls_to_every_daemon(stack):
    done = subprocess.run([sys.executable, "-m", "client", "--config", stack.config_path,
                           "--json", "cluster", "status"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    rows = {r["id"]: r for r in json.loads(done.stdout)["daemons"]}
    for daemon in ("replica-1", "replica-2", "replica-3", "portal-admin", "portal-client-1"):
        assert rows[daemon]["reachable"], (daemon, rows[daemon], done.stderr)
    # No secret of any kind in what the operator sees.
    for secret in secrets_of(stack):
        assert secret not in done.stdout and secret not in done.stderr


def test_the_cli_names_a_tls_handshake_failure(stack, foreign_dir, tmp_path):
    """Certificates the daemons do not trust (the CA re-issued by tarefa-secrets,
    daemons not restarted yet) are named as such, not as a daemon that is down,
    without gRPC's own log lines (found by review: "not reachable", and three
    "Handshake failed" lines per try; `cluster status` showed every daemon False
    with the cause cut off)."""
    with open(stack.config_path, encoding="utf-8") as fh:
        doc = yaml.safe_load(fh)
    doc["security"]["tls"] = {"ca_file": str(foreign_dir / SECURE["tls"]["ca_file"]),
                              "cert_dir": str(foreign_dir / SECURE["tls"]["cert_dir"])}
    # Relative paths of the stack's file stay relative to its directory.
    config = os.path.join(os.path.dirname(stack.config_path), "foreign-ca.yaml")
    with open(config, "w", encoding="utf-8") as fh:
        yaml.safe_dump(doc, fh)
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    portal = stack.portal("portal-client-1")
    done = subprocess.run([sys.executable, "-m", "client", "--config", config, "--portal",
                           portal.address, "task", "ls", "--cid", "7"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stderr
    assert f"portal {portal.address} is not reachable" in done.stderr
    assert "TLS handshake failed: this CLI and the daemon do not trust each other's " \
           "certificates" in done.stderr
    assert "SSL_ERROR" not in done.stderr and "Traceback" not in done.stderr
    done = subprocess.run([sys.executable, "-m", "client", "--config", config, "cluster",
                           "status"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 3, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("portal-client-1")]
    assert rows and "UNAVAILABLE: TLS handshake failed" in rows[0], done.stdout


def secrets_of(stack: Stack) -> list[str]:
    directory = os.path.join(stack.workdir, "secrets")
    found = []
    for path in [os.path.join(directory, "admin.token"), os.path.join(directory, "raft.password"),
                 *[os.path.join(directory, "mqtt", p.id) for p in stack.portals]]:
        found.append(read_secret_file(path, "secret"))
    return found


# ---- MQTT ----------------------------------------------------------------------------------


class Login:
    """One paho session as a given user; records the CONNACK and what it receives."""

    def __init__(self, port: int, username: str | None, password: str | None) -> None:
        self.connack = threading.Event()
        self.reason: mqtt.ReasonCode | None = None
        self.received: list[bytes] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"probe-{uuid.uuid4().hex[:8]}")
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda c, u, m: self.received.append(m.payload)
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        assert self.connack.wait(TIMEOUT), "no CONNACK from the broker"

    def _on_connect(self, client, userdata, flags, reason, properties) -> None:  # type: ignore[no-untyped-def]
        self.reason = reason
        self.connack.set()

    @property
    def accepted(self) -> bool:
        return self.reason is not None and not self.reason.is_failure

    def publish(self, topic: str, payload: bytes) -> None:
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout=TIMEOUT)
        assert info.is_published()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def password_of(stack: Stack, daemon_id: str) -> str:
    return read_secret_file(os.path.join(stack.workdir, "secrets", "mqtt", daemon_id), "password")


@pytest.mark.parametrize("username, password", [
    (None, None), ("portal-client-1", "wrong"), ("nobody", "x"), ("listener", "")])
def test_broker_refuses_anonymous_and_wrong_logins(stack, username, password):
    login = Login(stack.broker.port, username, password)
    try:
        assert not login.accepted, f"{username!r} was let in"
        assert login.reason is not None and login.reason.is_failure
    finally:
        login.close()


def test_a_login_that_may_only_read_cannot_feed_portals_forged_events(stack):
    """The listener's login (read-only ACL) publishes a well-formed event far in the
    future; the broker drops it. A garbage sentinel sent afterwards by a portal's
    login shows the portals would have seen it by then."""
    watcher = stack.portal("portal-client-1")
    before = watcher.status()
    forger = Login(stack.broker.port, "listener", password_of(stack, "listener"))
    sentinel = Login(stack.broker.port, "portal-client-2", password_of(stack, "portal-client-2"))
    try:
        assert forger.accepted and sentinel.accepted
        record = {"cid": "7", "title": "t", "description": "forged", "status": "done",
                  "revision": 10**12, "created_at": "2026-01-01T00:00:00Z",
                  "updated_at": "2026-01-01T00:00:00Z"}
        event = events.make_event("task.updated", "7", 10**12, "intruder",
                                  "2026-01-01T00:00:00Z", title="t", record=record)
        forger.publish(events.event_topic("test", event), json.dumps(event).encode())
        sentinel.publish(events.event_topic("test", event), b"not json: sentinel")
        wait_for(lambda: watcher.status().events_rejected > before.events_rejected, TIMEOUT,
                 "the sentinel to reach portal-client-1")
        after = watcher.status()
        # The sentinel was rejected (garbage); the forged event never arrived at all.
        assert after.events_rejected == before.events_rejected + 1
        assert after.events_received == before.events_received
    finally:
        forger.close()
        sentinel.close()


def test_the_read_only_login_still_receives_events(stack):
    reader = Login(stack.broker.port, "listener", password_of(stack, "listener"))
    writer = Login(stack.broker.port, "portal-client-2", password_of(stack, "portal-client-2"))
    try:
        # No wait for the SUBACK: the publish below is retried until one arrives.
        reader.client.subscribe(events.subscription("test"), qos=1)
        payload = b"probe " + uuid.uuid4().hex.encode()

        def arrived() -> bool:
            writer.publish("tarefa/test/clients/1", payload)
            return payload in reader.received
        wait_for(arrived, TIMEOUT, "a portal's event to reach the listener's login",
                 interval=0.2)
    finally:
        reader.close()
        writer.close()


# ---- secrets at start -----------------------------------------------------------------------


def test_daemon_refuses_a_secret_file_others_can_read(tmp_path):
    ports = free_ports(9)
    doc = {"cluster": {"name": "test"}, "security": SECURE,
           "broker": {"host": "127.0.0.1", "port": ports[0], "password_dir": "secrets/mqtt"},
           "replicas": [{"id": f"replica-{i}", "host": "127.0.0.1", "raft_port": ports[i],
                         "grpc_port": ports[3 + i], "data_dir": f"data/{i}"} for i in (1, 2, 3)],
           "portals": [{"id": "portal-admin", "host": "127.0.0.1", "port": ports[7],
                        "services": ["admin"]}],
           "listener": {"id": "listener", "host": "127.0.0.1", "port": ports[8],
                        "audit_log": "audit/audit.jsonl"}}
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump(doc))
    Provisioner(load_cluster(str(config))).run()
    for name, argv, secret in (
            ("tls/replica-1.key", ["daemons.replica", "--id", "replica-1"], None),
            ("mqtt/portal-admin", ["daemons.portal", "--id", "portal-admin"], "mqtt"),
            ("raft.password", ["daemons.replica", "--id", "replica-1"], "raft.password"),
            ("admin.token", ["daemons.portal", "--id", "portal-admin"], "admin.token"),
            # The listener's --check-config said OK here, then its start exited 2.
            ("tls/listener.key", ["daemons.listener"], None),
            ("mqtt/listener", ["daemons.listener"], "mqtt")):
        path = tmp_path / "secrets" / name
        command = [sys.executable, "-m", argv[0], "--config", str(config), *argv[1:]]
        checked = subprocess.run([*command, "--check-config"], cwd=ROOT, capture_output=True,
                                 text=True, timeout=60)
        assert checked.returncode == 0, checked.stderr
        os.chmod(path, 0o644)
        try:
            # --check-config reads the same secrets, so it catches this before a start does.
            checked = subprocess.run([*command, "--check-config"], cwd=ROOT,
                                     capture_output=True, text=True, timeout=60)
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                                  timeout=60)
        finally:
            os.chmod(path, 0o600)
        for result in (checked, done):
            assert result.returncode == 2, (name, result.stderr)
            assert str(path) in result.stderr and "group or others" in result.stderr
            if secret is not None:
                assert read_secret_file(str(path), "x") not in result.stderr + result.stdout
