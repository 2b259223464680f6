"""The listener as a real process against a real Mosquitto: events reach the
audit log once each, malformed payloads land in the reject file without
stopping it, a restart loses and duplicates nothing, SIGTERM exits 0, and
--follow prints readable lines."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import uuid

import paho.mqtt.client as mqtt
import pytest
import yaml
from grpc_health.v1 import health_pb2

from daemons.core import events
from tests.harness import ROOT, ListenerProcess, MosquittoProcess, free_ports, wait_for

CLUSTER = "test"
AT = "2026-01-01T00:00:00Z"


class Env:
    def __init__(self, workdir: str, persistence: bool = False,
                 **listener_keys: object) -> None:
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        broker_port, self.listener_port, *replica_ports = free_ports(8)
        self.audit_log = os.path.join(workdir, "audit", "audit.jsonl")
        doc = {
            "cluster": {"name": CLUSTER},
            "log_level": "info",
            "grace_seconds": 2,
            "security": {"auth": "cid-only"},
            "broker": {"host": "127.0.0.1", "port": broker_port},
            # The listener needs none of them, but a cluster file always names its replicas.
            "replicas": [{"id": f"replica-{i + 1}", "host": "127.0.0.1",
                          "raft_port": replica_ports[2 * i], "grpc_port": replica_ports[2 * i + 1],
                          "data_dir": f"data/replica-{i + 1}"} for i in range(3)],
            "listener": {"id": "listener-1", "host": "127.0.0.1", "port": self.listener_port,
                         "audit_log": "audit/audit.jsonl", **listener_keys},
        }
        self.config_path = os.path.join(workdir, "cluster.yaml")
        with open(self.config_path, "w", encoding="utf-8") as fh:
            yaml.safe_dump(doc, fh, sort_keys=False)
        self.broker = MosquittoProcess(workdir, broker_port, persistence=persistence)
        self.listeners: list[ListenerProcess] = []
        self.publisher: mqtt.Client | None = None

    def listener(self, follow: bool = False, name: str = "listener") -> ListenerProcess:
        proc = ListenerProcess(self.workdir, self.config_path, self.listener_port, follow=follow,
                               name=name)
        self.listeners.append(proc)
        return proc

    def connect_publisher(self) -> None:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                             client_id=f"test-publisher-{uuid.uuid4().hex[:8]}")
        client.connect("127.0.0.1", self.broker.port, keepalive=10)
        client.loop_start()
        self.publisher = client

    def publish_raw(self, topic: str, payload: bytes) -> None:
        assert self.publisher is not None
        info = self.publisher.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout=10)
        assert info.is_published(), f"the broker did not acknowledge a publish on {topic}"

    def publish(self, event: dict) -> None:
        self.publish_raw(events.event_topic(CLUSTER, event), events.encode(event))

    def publish_many(self, batch: list[dict]) -> None:
        """Publish all, then wait for every acknowledgement (a burst, as portals send)."""
        assert self.publisher is not None
        infos = [self.publisher.publish(events.event_topic(CLUSTER, e), events.encode(e), qos=1)
                 for e in batch]
        for info in infos:
            info.wait_for_publish(timeout=60)
            assert info.is_published()

    def audit_lines(self) -> list[dict]:
        try:
            with open(self.audit_log, "rb") as fh:
                return [json.loads(line) for line in fh.read().splitlines()]
        except FileNotFoundError:
            return []

    def reject_lines(self) -> list[dict]:
        try:
            with open(self.audit_log + ".rejects", "rb") as fh:
                return [json.loads(line) for line in fh.read().splitlines()]
        except FileNotFoundError:
            return []

    def stop(self) -> None:
        if self.publisher is not None:
            self.publisher.disconnect()
            self.publisher.loop_stop()
        for proc in self.listeners:
            try:
                proc.close()
            except Exception:  # noqa: BLE001 - keep stopping the others
                pass
        try:
            self.broker.terminate()
        except Exception:  # noqa: BLE001
            pass

    def dump_logs(self) -> str:
        out = [f"===== broker =====\n{self.broker.logs()[-10000:]}"]
        for proc in self.listeners:
            out.append(f"===== {proc.id} ({proc.log_path}) =====\n{proc.logs()[-20000:]}")
            if proc.follow:
                out.append(f"===== {proc.id} stdout =====\n{proc.stdout()[-5000:]}")
        return "\n".join(out)


@pytest.fixture
def env(tmp_path, request):
    yield from running_env(tmp_path, request)


@pytest.fixture
def persistent_env(tmp_path, request):
    """A broker that keeps sessions across a restart, as config/mosquitto.conf does."""
    yield from running_env(tmp_path, request, persistence=True)


def running_env(tmp_path, request, persistence: bool = False,  # type: ignore[no-untyped-def]
                **listener_keys: object):
    e = Env(str(tmp_path / "env"), persistence=persistence, **listener_keys)
    try:
        e.broker.start()
        e.broker.wait_ready()
        e.connect_publisher()
        yield e
    finally:
        e.stop()
        rep = getattr(request.node, "rep_call", None)
        if rep is None or rep.failed:
            print(e.dump_logs())


def task_event(revision: int, title: str = "buy milk", kind: str = "task.updated",
               origin: str = "portal-client-1", cid: str = "7") -> dict:
    record = None
    if kind not in events.DELETIONS:
        record = {"cid": cid, "title": title, "description": "", "status": "pending",
                  "created_at": AT, "updated_at": AT, "revision": revision}
    return events.make_event(kind, cid, revision, origin, AT,
                             title=None if kind == "task.cleared" else title, record=record)


def client_event(revision: int, kind: str = "client.created", cid: str = "7") -> dict:
    record = None if kind == "client.deleted" else {
        "cid": cid, "data": {"name": "Ana"}, "created_at": AT, "updated_at": AT,
        "revision": revision}
    return events.make_event(kind, cid, revision, "portal-admin", AT, record=record)


def without_listener_keys(line: dict) -> dict:
    return {k: v for k, v in line.items() if k not in ("topic", "received_at", "out_of_order")}


def revisions(lines: list[dict]) -> list[int]:
    return [line["revision"] for line in lines]


def test_events_reach_the_audit_log_and_follow_prints_them(env):
    listener = env.listener(follow=True)
    listener.start()
    listener.wait_ready()
    assert listener.health() == health_pb2.HealthCheckResponse.SERVING
    assert listener.health("tarefa.listener.Audit") == health_pb2.HealthCheckResponse.SERVING

    published = [client_event(1), task_event(2, kind="task.created", title="buy/milk #1"),
                 task_event(3), task_event(4, kind="task.deleted"),
                 task_event(5, kind="task.cleared"), client_event(6, kind="client.deleted")]
    for event in published:
        env.publish(event)
    wait_for(lambda: len(env.audit_lines()) >= len(published), 15, "six audit lines")
    lines = env.audit_lines()
    assert [without_listener_keys(line) for line in lines] == published
    assert [line["topic"] for line in lines] == [events.event_topic(CLUSTER, e) for e in published]
    assert all(line["received_at"].endswith("Z") for line in lines)
    assert not any("out_of_order" in line for line in lines)

    wait_for(lambda: 'rev 3  task.updated  cid=7 title="buy milk"  by portal-client-1'
             in listener.stdout(), 10, "--follow to print the readable line")
    out = listener.stdout()
    assert 'rev 2  task.created  cid=7 title="buy/milk #1"  by portal-client-1' in out
    assert "rev 6  client.deleted  cid=7  by portal-admin" in out

    # a late event from the same origin is written, flagged, and warned about
    env.publish(task_event(1, kind="task.updated", title="late"))
    wait_for(lambda: len(env.audit_lines()) == len(published) + 1, 10, "the late event")
    late = env.audit_lines()[-1]
    assert late["out_of_order"] is True and late["title"] == "late"
    wait_for(lambda: "out-of-order event: revision 1 from portal-client-1" in listener.logs(),
             5, "the out-of-order WARNING")
    assert "WARNING [listener-1]" in listener.logs()

    status = listener.status()
    assert (status.id, status.events_written, status.out_of_order, status.rejects) == (
        "listener-1", 7, 1, 0)
    assert status.audit_log == env.audit_log
    assert listener.terminate() == 0


def test_malformed_payloads_go_to_the_reject_file_and_the_listener_goes_on(env):
    listener = env.listener()
    listener.start()
    listener.wait_ready()
    root = events.topic_root(CLUSTER)
    bad_schema = {**task_event(1), "schema": 2}
    mismatched = task_event(2)  # valid, but published on another task's topic
    garbage = [
        (f"{root}/tasks/7/x", b"\xff\xfe\x00 not json at all"),
        (f"{root}/tasks/7/buy%20milk", json.dumps(bad_schema).encode()),
        (f"{root}/tasks/7/other", events.encode(mismatched)),
        (f"{root}/clients/7", b"[1, 2, 3]"),
        (f"{root}/clients/7", b'{"schema": 1, "event": "client.created", "cid": "007"}'),
        (f"{root}/clients/7", b"{" * 100_000),  # deep nesting must not crash the decoder
        (f"{root}/clients/7", b""),
    ]
    for topic, payload in garbage:
        env.publish_raw(topic, payload)
    good = task_event(3)
    env.publish(good)
    wait_for(lambda: len(env.audit_lines()) == 1, 15, "the valid event after the garbage")
    assert without_listener_keys(env.audit_lines()[0]) == good
    wait_for(lambda: len(env.reject_lines()) == len(garbage), 10, "every reject to be kept")

    rejects = env.reject_lines()
    assert [r["topic"] for r in rejects] == [t for t, _ in garbage]
    for reject, (_, payload) in zip(rejects, garbage):
        assert reject["reason"], reject
        kept = (base64.b64decode(reject["payload"]) if reject["payload_encoding"] == "base64"
                else reject["payload"].encode())
        assert kept == payload[:len(kept)] and reject["payload_bytes"] == len(payload)
    assert rejects[0]["payload_encoding"] == "base64" and "not JSON" in rejects[0]["reason"]
    assert "schema" in rejects[1]["reason"]
    assert "not this event's topic" in rejects[2]["reason"]
    assert "cid" in rejects[4]["reason"]

    logs = listener.logs()
    assert logs.count("rejected a malformed event") == len(garbage), logs
    assert "WARNING [listener-1] daemons.listener.daemon: listener-1: rejected" in logs
    assert "Traceback" not in logs
    assert listener.alive
    status = listener.status()
    assert (status.rejects, status.events_written) == (len(garbage), 1)
    assert listener.terminate() == 0


def test_restart_loses_nothing_and_duplicates_nothing(env):
    listener = env.listener()
    listener.start()
    listener.wait_ready()
    for rev in range(1, 11):
        env.publish(task_event(rev, title=f"t{rev}"))
    wait_for(lambda: len(env.audit_lines()) == 10, 15, "the first ten events")

    assert listener.terminate() == 0, listener.logs()
    assert "listener-1: stopped" in listener.logs()
    for rev in range(11, 31):  # the broker keeps these for the listener's session
        env.publish(task_event(rev, title=f"t{rev}"))

    listener.start()
    wait_for(lambda: len(env.audit_lines()) >= 30, 20, "the 20 events published while down")
    listener.wait_ready()
    # Redeliveries of events already written (what the broker does for an event
    # whose acknowledgement was lost) are dropped.
    for rev in range(5, 11):
        env.publish(task_event(rev, title=f"t{rev}"))
    env.publish(task_event(31, title="t31"))
    wait_for(lambda: listener.status().duplicates == 6, 10, "six duplicates to be dropped")
    wait_for(lambda: len(env.audit_lines()) >= 31, 10, "event 31")

    lines = env.audit_lines()
    assert sorted(revisions(lines)) == list(range(1, 32)), revisions(lines)
    assert revisions(lines)[:10] == list(range(1, 11))
    assert not any(line.get("out_of_order") for line in lines)
    status = listener.status()
    assert (status.events_written, status.duplicates) == (21, 6)
    assert listener.terminate() == 0


def test_rotation_in_a_running_listener_keeps_each_event_once(tmp_path, request):
    e = Env(str(tmp_path / "env"), rotate_bytes=2000, keep_files=50, fsync="interval",
            fsync_interval=0.2)
    try:
        e.broker.start()
        e.broker.wait_ready()
        e.connect_publisher()
        listener = e.listener()
        listener.start()
        listener.wait_ready()
        for rev in range(1, 41):
            e.publish(task_event(rev, title=f"t{rev}"))
        wait_for(lambda: listener.status().events_written == 40, 15, "40 events")
        assert listener.terminate() == 0
        from daemons.listener.audit import rotated_paths

        files = [*reversed(rotated_paths(e.audit_log)), e.audit_log]
        assert len(files) > 3
        found = []
        for path in files:
            with open(path, "rb") as fh:
                found.extend(json.loads(line)["revision"] for line in fh.read().splitlines())
        assert found == list(range(1, 41))
    finally:
        e.stop()
        rep = getattr(request.node, "rep_call", None)
        if rep is None or rep.failed:
            print(e.dump_logs())


def test_a_second_listener_on_the_same_audit_log_is_refused(env):
    first = env.listener()
    first.start()
    first.wait_ready()
    second = env.listener(name="listener-again")
    second.start()
    assert second.proc.wait(20) == 1
    assert "another listener is writing this audit log" in second.logs()
    # Tagged with the listener's id from the cluster file (it said "tarefa-listener").
    assert "CRITICAL [listener-1] daemons.core.lifecycle: listener-1: fatal:" in second.logs()
    env.publish(task_event(1))
    wait_for(lambda: len(env.audit_lines()) == 1, 10, "the first listener to keep working")
    assert first.status().broker_connected
    first.signal(signal.SIGTERM)
    assert first.proc.wait(15) == 0


def test_check_config_and_a_missing_listener_section(tmp_path):
    e = Env(str(tmp_path / "env"))
    run = [sys.executable, "-m", "daemons.listener", "--config"]
    done = subprocess.run([*run, e.config_path, "--check-config"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr
    with open(e.config_path, encoding="utf-8") as fh:
        doc = yaml.safe_load(fh)
    del doc["listener"]
    with open(e.config_path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(doc, fh)
    for extra in (["--check-config"], []):
        done = subprocess.run([*run, e.config_path, *extra], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2
        assert f"Error: {e.config_path}: listener: missing" in done.stderr


def restart_broker(env: Env) -> None:
    """SIGTERM (a broker with persistence saves its sessions on the way out), start,
    and wait for the test's publisher to be back (paho refuses a publish meanwhile)."""
    assert env.broker.terminate() == 0, env.broker.logs()
    env.broker.start()
    env.broker.wait_ready()
    assert env.publisher is not None
    wait_for(env.publisher.is_connected, 30, "the test publisher reconnected")


def test_a_broker_restart_keeps_the_listeners_session_with_persistence(persistent_env):
    """Events queued for a stopped listener survive a restart of a broker with
    persistence and reach the audit log when the listener returns; a restart
    while the listener is connected loses nothing either, and no gap is reported."""
    env = persistent_env
    listener = env.listener()
    listener.start()
    listener.wait_ready()
    for rev in range(1, 6):
        env.publish(task_event(rev, title=f"t{rev}"))
    wait_for(lambda: len(env.audit_lines()) == 5, 15, "the first five events")
    assert listener.terminate() == 0, listener.logs()
    for rev in range(6, 16):  # queued in the listener's session at the broker
        env.publish(task_event(rev, title=f"t{rev}"))
    restart_broker(env)
    listener.start()
    listener.wait_ready()
    wait_for(lambda: len(env.audit_lines()) >= 15, 20, "the ten events queued across the restart")

    restart_broker(env)  # now with the listener connected
    wait_for(lambda: listener.status().broker_connected, 30, "the listener back at the broker")
    env.publish(task_event(16, title="t16"))
    wait_for(lambda: len(env.audit_lines()) >= 16, 20, "an event after the second restart")
    assert sorted(revisions(env.audit_lines())) == list(range(1, 17))
    assert listener.status().sessions_lost == 0
    assert "kept no session" not in listener.logs()
    assert listener.terminate() == 0


def test_a_session_the_broker_lost_is_reported(env):
    """Without persistence a broker restart drops the listener's session: what
    is published before the listener re-subscribes never reaches it. The gap
    cannot be filled, but it must not pass silently: a WARNING and
    ListenerStatus.sessions_lost. A listener starting on an empty audit log
    has no session to expect and reports nothing."""
    listener = env.listener()
    listener.start()
    listener.wait_ready()
    assert listener.status().sessions_lost == 0
    env.publish(task_event(1, title="t1"))
    wait_for(lambda: len(env.audit_lines()) == 1, 15, "the first event")
    restart_broker(env)
    wait_for(lambda: listener.status().sessions_lost == 1, 30, "the lost session reported")
    assert "kept no session" in listener.logs()
    wait_for(lambda: listener.status().broker_connected, 30, "the listener re-subscribed")
    env.publish(task_event(2, title="t2"))
    wait_for(lambda: len(env.audit_lines()) == 2, 15, "an event after the restart")
    # A restart of the listener itself finds its session at the broker.
    assert listener.terminate() == 0
    listener.start()
    listener.wait_ready()
    assert listener.status().sessions_lost == 0
    assert listener.terminate() == 0


def test_bursts_beyond_the_brokers_default_queue_reach_the_audit_log(env):
    """Mosquitto's default keeps at most 1000 QoS 1 messages queued per client
    and drops the rest silently: a 5,000-event burst to a connected listener
    (which fsyncs each event, so it falls behind) lost 2,389, and a listener
    away during 3,000 events got 1,000. The harness's broker queues up to 10^6
    as config/mosquitto.conf does (test_supervisord.py checks that file)."""
    listener = env.listener()
    listener.start()
    listener.wait_ready()
    env.publish_many([task_event(rev, title=f"t{rev}") for rev in range(1, 3001)])
    wait_for(lambda: len(env.audit_lines()) == 3000, 60, "the connected burst")
    assert listener.terminate() == 0
    env.publish_many([task_event(rev, title=f"t{rev}") for rev in range(3001, 5001)])
    listener.start()
    wait_for(lambda: len(env.audit_lines()) == 5000, 60, "the burst while it was away")
    assert sorted(revisions(env.audit_lines())) == list(range(1, 5001))
    assert listener.terminate() == 0


@pytest.fixture
def quick_gaps_env(tmp_path, request):
    """A listener that reports a missing revision after 1 s instead of 10."""
    yield from running_env(tmp_path, request, missing_after=1.0)


def test_revisions_that_never_arrive_are_reported(quick_gaps_env):
    """Every change takes the next revision and is published once: a hole a
    later revision has waited on for `missing_after` seconds is a change the
    audit log misses. Reported once, in the log and in ListenerStatus, and
    withdrawn if it turns up late; after a restart, tracking resumes above the
    log's highest revision."""
    env = quick_gaps_env
    listener = env.listener()
    listener.start()
    listener.wait_ready()
    # An empty log: tracking starts once 10 revisions agree (a forged first
    # event cannot anchor it), here at revision 1.
    env.publish_many([task_event(rev, title=f"t{rev}") for rev in (1, 2, 5, 4, *range(6, 13))])
    wait_for(lambda: listener.status().missing_revisions == 1, 15, "revision 3 reported")
    assert "revision 3 never arrived" in listener.logs()
    env.publish(task_event(3, title="t3"))  # late: written, and no longer missing
    wait_for(lambda: len(env.audit_lines()) == 12, 15, "the late revision written")
    wait_for(lambda: listener.status().missing_revisions == 0, 15, "the report withdrawn")
    wait_for(lambda: "1 revision(s) reported missing arrived late" in listener.logs(), 10,
             "the late arrival logged (next tick)")
    assert listener.terminate() == 0

    listener.start()
    listener.wait_ready()
    env.publish_many([task_event(rev, title=f"t{rev}") for rev in (13, 16)])
    wait_for(lambda: listener.status().missing_revisions == 2, 15, "revisions 14-15")  # new process
    assert "2 revisions never arrived (14-15)" in listener.logs()
    assert listener.terminate() == 0


def test_a_forged_first_event_far_ahead_stops_flagging_real_ones(env):
    """Found by review: on an empty audit log a forged first event with a huge
    revision became its origin's highest, and every real event after it was
    flagged out of order until a restart. Once ten real revisions agree the
    listener tracks them, and the highest revision comes from them."""
    listener = env.listener()
    listener.start()
    listener.wait_ready()
    env.publish(task_event(9 * 10**9, title="forged"))
    for rev in range(1, 13):
        env.publish(task_event(rev, title=f"t{rev}"))
    wait_for(lambda: len(env.audit_lines()) == 13, 15, "thirteen audit lines")
    flagged = {line["revision"] for line in env.audit_lines() if line.get("out_of_order")}
    assert flagged <= set(range(1, 11)) and not flagged & {11, 12}, sorted(flagged)
