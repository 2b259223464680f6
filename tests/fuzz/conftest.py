"""Fixtures of the hostile-input tests.

`fuzz_stack`: ONE real stack for the whole tests/fuzz package (broker, three
replicas, an admin and two client portals, and a listener whose cluster file
is the stack's plus a `listener:` section), started once because hypothesis
calls it thousands of times. Modules keep to their own CIDs so they cannot
disturb each other.

`watch`: marks every daemon's log at the start of a test; `assert_clean()`
then fails if a daemon died or wrote "Traceback" or "INTERNAL" since the mark,
quoting the lines. On failure the new part of every log is printed.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml

from tests.harness import DaemonProcess, ListenerProcess, Stack, free_ports, wait_for

CLUSTER = "test"  # the cluster name tests.harness writes
BAD_WORDS = ("Traceback", "INTERNAL")


class Publisher:
    """A paho client that publishes straight to the broker, as an intruder would."""

    def __init__(self, port: int) -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"fuzz-intruder-{uuid.uuid4().hex[:8]}")
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes) -> None:
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout=10)
        assert info.is_published(), f"the broker did not acknowledge a publish on {topic!r}"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class FuzzStack:
    """The package's stack, its listener and an MQTT publisher."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.stack = Stack(workdir)
        (listener_port,) = free_ports(1)
        with open(self.stack.config_path, encoding="utf-8") as fh:
            doc = yaml.safe_load(fh)
        doc["listener"] = {"id": "listener", "host": "127.0.0.1", "port": listener_port,
                           "audit_log": "audit/audit.jsonl"}
        self.listener_config = os.path.join(workdir, "cluster-with-listener.yaml")
        with open(self.listener_config, "w", encoding="utf-8") as fh:
            yaml.safe_dump(doc, fh, sort_keys=False)
        self.listener = ListenerProcess(workdir, self.listener_config, listener_port)
        self.publisher: Publisher | None = None

    @property
    def admin(self) -> Any:
        return self.stack.portal("portal-admin").admin

    @property
    def client_portals(self) -> list[Any]:
        return [self.stack.portal("portal-client-1"), self.stack.portal("portal-client-2")]

    @property
    def daemons(self) -> list[DaemonProcess]:
        return [*self.stack.members, *self.stack.portals, self.listener, self.stack.broker]

    def start(self) -> None:
        self.stack.start()
        self.listener.start()
        self.listener.wait_ready()
        self.publisher = Publisher(self.stack.broker.port)

    def stop(self) -> None:
        if self.publisher is not None:
            self.publisher.close()
        try:
            self.listener.close()
        finally:
            self.stack.stop()

    def counters(self) -> dict[str, tuple[int, int]]:
        """Per daemon (accepted, rejected) events: portals and listener."""
        out = {}
        for portal in self.stack.portals:
            st = portal.status(timeout=5)
            out[portal.id] = (st.events_received, st.events_rejected)
        st = self.listener.status(timeout=5)
        out[self.listener.id] = (st.events_written + st.duplicates, st.rejects)
        return out


class DaemonWatch:
    """What the daemons logged since `mark()`, and whether they are all alive."""

    def __init__(self, daemons: list[DaemonProcess]) -> None:
        self.daemons = daemons
        self.marks: dict[str, int] = {}
        self.mark()

    def mark(self) -> None:
        self.marks = {d.id: _size(d.log_path) for d in self.daemons}

    def new_text(self, daemon: DaemonProcess) -> str:
        try:
            with open(daemon.log_path, "rb") as fh:
                fh.seek(self.marks.get(daemon.id, 0))
                return fh.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def problems(self) -> list[str]:
        found = []
        for daemon in self.daemons:
            if not daemon.alive:
                code = daemon.proc.returncode if daemon.proc is not None else None
                found.append(f"{daemon.id} is not running (exit code {code})")
            lines = self.new_text(daemon).splitlines()
            for i, line in enumerate(lines):
                if any(word in line for word in BAD_WORDS):
                    context = "\n      ".join(lines[max(0, i - 1):i + 14])
                    found.append(f"{daemon.id} logged:\n      {context}")
                    break  # the first one per daemon, with its context, is enough
        return found

    def assert_clean(self) -> None:
        problems = self.problems()
        assert not problems, "daemons died or logged tracebacks:\n  " + "\n  ".join(problems)

    def dump(self) -> str:
        return "\n".join(f"===== {d.id} (new lines of {d.log_path}) =====\n"
                         f"{self.new_text(d)[-15000:]}" for d in self.daemons)


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


@pytest.fixture(scope="package")
def fuzz_stack(tmp_path_factory: pytest.TempPathFactory) -> Any:
    env = FuzzStack(str(tmp_path_factory.mktemp("fuzz-stack")))
    try:
        env.start()
        yield env
    finally:
        env.stop()


@pytest.fixture
def watch(fuzz_stack: FuzzStack, request: pytest.FixtureRequest) -> Any:
    w = DaemonWatch(fuzz_stack.daemons)
    yield w
    rep = getattr(request.node, "rep_call", None)
    if rep is None or rep.failed:
        print(w.dump())


def receivers(env: FuzzStack, topic: str) -> set[str]:
    """The daemons subscribed to `topic`: the listener and client portals take every
    event, an admin-only portal only client events (`tarefa/<cluster>/clients/#`)."""
    root = f"tarefa/{CLUSTER}"
    ids = {env.listener.id}
    for portal in env.stack.portals:
        if "client" in portal.spec["services"] or topic == f"{root}/clients" \
                or topic.startswith(f"{root}/clients/"):
            ids.add(portal.id)
    return ids


def wait_counted(env: FuzzStack, before: dict[str, tuple[int, int]], topic: str,
                 accepted: int, rejected: int,
                 timeout: float = 10) -> dict[str, tuple[int, int]]:
    """Wait until every daemon subscribed to `topic` counted `accepted` + `rejected` more
    events (portals do not count events of their own origin; callers use a foreign one)."""
    targets = receivers(env, topic)

    def settled() -> dict[str, tuple[int, int]] | None:
        now = env.counters()
        done = all(now[k][0] - before[k][0] >= accepted and now[k][1] - before[k][1] >= rejected
                   for k in targets)
        return now if done else None
    return wait_for(settled, timeout, f"{accepted} accepted and {rejected} rejected events "
                    f"counted by {sorted(targets)}", interval=0.01)
