"""EventBus with paho's I/O on an asyncio loop (the portals' mode), against a real Mosquitto.

What the portal relies on: publishes from the loop (and, handed over, from any
thread) reach subscribers at QoS 1; the owner hears the connection go and come
back; QoS 1 messages published while the broker is away are delivered once it
returns; the loop never blocks on the broker; stop() leaves nothing running.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from daemons.core.config import Broker
from daemons.core.mqtt import EventBus
from tests.harness import MosquittoProcess, free_ports, wait_for

TOPIC = "tarefa/test/bus"


class Recorder:
    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.states: list[bool] = []
        self.lock = threading.Lock()

    def on_message(self, topic: str, payload: bytes) -> None:
        with self.lock:
            self.messages.append(payload)

    def on_connection(self, up: bool) -> None:
        with self.lock:
            self.states.append(up)

    def got(self) -> list[bytes]:
        with self.lock:
            return list(self.messages)


@pytest.fixture
def broker(tmp_path):
    proc = MosquittoProcess(str(tmp_path), free_ports(1)[0])
    proc.start()
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.kill()


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-loop", daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    assert not thread.is_alive()
    loop.close()


def on_loop(loop: asyncio.AbstractEventLoop, fn, *args) -> None:  # type: ignore[no-untyped-def]
    done = threading.Event()

    def run() -> None:
        try:
            fn(*args)
        finally:
            done.set()

    loop.call_soon_threadsafe(run)
    assert done.wait(5)


def make_pair(broker: MosquittoProcess, loop: asyncio.AbstractEventLoop, name: str):  # type: ignore[no-untyped-def]
    """A loop-mode publisher (No Local, like a portal) and a threaded subscriber."""
    settings = Broker(host="127.0.0.1", port=broker.port)
    pub_rec, sub_rec = Recorder(), Recorder()
    publisher = EventBus(settings, f"{name}-pub", [], pub_rec.on_message, pub_rec.on_connection,
                         no_local=True, loop=loop)
    subscriber = EventBus(settings, f"{name}-sub", [TOPIC], sub_rec.on_message,
                          sub_rec.on_connection)
    return publisher, pub_rec, subscriber, sub_rec


def test_publishes_from_the_loop_and_other_threads_arrive_in_order(broker, loop):
    publisher, _, subscriber, sub_rec = make_pair(broker, loop, "order")
    subscriber.start()
    publisher.start()
    try:
        assert subscriber.wait_connected(10) and publisher.wait_connected(10)
        on_loop(loop, lambda: [publisher.publish(TOPIC, b"loop-%d" % i) for i in range(500)])
        publisher.publish(TOPIC, b"from-a-thread")  # handed to the loop
        wait_for(lambda: len(sub_rec.got()) == 501, 10, "501 messages")
        got = sub_rec.got()
        assert got[:500] == [b"loop-%d" % i for i in range(500)]
        assert got[500] == b"from-a-thread"
    finally:
        publisher.stop()
        subscriber.stop()


def test_broker_loss_is_reported_and_queued_messages_arrive_after_it_returns(broker, loop):
    publisher, pub_rec, subscriber, sub_rec = make_pair(broker, loop, "loss")
    acked: list[int] = []  # mids the broker acknowledged (PUBACK), via paho's own hook
    publisher._client.on_publish = lambda client, userdata, mid, *rest: acked.append(mid)
    subscriber.start()
    publisher.start()
    try:
        assert subscriber.wait_connected(10) and publisher.wait_connected(10)
        broker.kill()
        wait_for(lambda: not publisher.connected, 15, "the publisher to notice")
        assert pub_rec.states[-1] is False
        on_loop(loop, lambda: [publisher.publish(TOPIC, b"while-away-%d" % i)
                               for i in range(20)])
        broker.start()
        broker.wait_ready()
        assert publisher.wait_connected(15) and subscriber.wait_connected(15)
        assert pub_rec.states[-1] is True
        on_loop(loop, lambda: publisher.publish(TOPIC, b"after"))
        wait_for(lambda: b"after" in sub_rec.got(), 10, "the message sent after the return")
        # Every QoS 1 message queued while the broker was away was taken by the
        # broker (PUBACKed) once it returned: 20 of them, then "after".
        wait_for(lambda: len(acked) == 21, 10, "the broker to acknowledge the queued messages")
        assert not publisher._client._out_messages
        # The subscriber's session is clean and the broker kept none: whichever of
        # them reached it after it subscribed again came once and in order.
        queued = [m for m in sub_rec.got() if m.startswith(b"while-away-")]
        expected = [b"while-away-%d" % i for i in range(20)]
        assert queued == expected[len(expected) - len(queued):]
    finally:
        publisher.stop()
        subscriber.stop()


def test_messages_unacknowledged_when_the_broker_died_go_before_those_held_since(tmp_path,
                                                                                 loop):
    """Found by review: the messages published during an outage were sent as
    soon as the TCP connection was back, but paho sends again the ones still
    waiting for a PUBACK only when it handles the CONNACK, so a portal's older
    events reached the broker after newer ones (the listener flagged them out
    of order after every broker outage). Each message has its own topic, as
    events do (MQTT orders per topic only)."""
    import signal

    import paho.mqtt.client as mqtt

    broker = MosquittoProcess(str(tmp_path), free_ports(1)[0], persistence=True)
    broker.start()
    got: list[str] = []
    lock = threading.Lock()
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="order-sub",
                      clean_session=False)
    sub.on_connect = lambda c, u, f, rc, p: c.subscribe("order/#", qos=1)
    sub.on_message = lambda c, u, m: [lock.acquire(), got.append(m.payload.decode()),
                                      lock.release()]
    sub.reconnect_delay_set(0.1, 0.5)
    publisher = EventBus(Broker(host="127.0.0.1", port=broker.port), "order-pub", [],
                         lambda *a: None, lambda up: None, no_local=True, loop=loop)
    try:
        broker.wait_ready()
        sub.connect("127.0.0.1", broker.port, keepalive=5)
        sub.loop_start()
        wait_for(lambda: sub.is_connected(), 10, "the subscriber")
        time.sleep(0.5)  # its SUBSCRIBE handled
        assert broker.terminate() == 0  # its session saved on disk
        broker.start()
        broker.wait_ready()
        publisher.start()
        assert publisher.wait_connected(10)
        broker.signal(signal.SIGSTOP)  # alive, answering nothing: no PUBACK
        on_loop(loop, lambda: [publisher.publish(f"order/in-flight/{i}", b"in-flight-%d" % i)
                               for i in range(5)])
        time.sleep(0.5)
        broker.kill()
        wait_for(lambda: not publisher.connected, 15, "the publisher to notice")
        on_loop(loop, lambda: [publisher.publish(f"order/held/{i}", b"held-%d" % i)
                               for i in range(5)])
        broker.start()
        broker.wait_ready()
        wait_for(lambda: len(got) >= 10, 20, "the ten messages")
        with lock:
            assert got == [f"in-flight-{i}" for i in range(5)] + [f"held-{i}" for i in range(5)]
    finally:
        publisher.stop()
        sub.disconnect()
        sub.loop_stop()
        broker.kill()


def test_the_loop_keeps_running_while_the_broker_is_away_and_stop_is_prompt(tmp_path, loop):
    port = free_ports(1)[0]  # nobody listens yet
    rec = Recorder()
    bus = EventBus(Broker(host="127.0.0.1", port=port), "away", [TOPIC], rec.on_message,
                   rec.on_connection, no_local=True, loop=loop)
    gaps: list[float] = []
    last = [time.monotonic()]

    def beat() -> None:
        now = time.monotonic()
        gaps.append(now - last[0])
        last[0] = now
        loop.call_later(0.01, beat)

    loop.call_soon_threadsafe(beat)
    bus.start()
    time.sleep(2.5)  # several refused connects with backoff
    assert not bus.connected
    broker = MosquittoProcess(str(tmp_path), port)
    broker.start()
    try:
        broker.wait_ready()
        assert bus.wait_connected(10), "connected once the broker appeared"
        started = time.monotonic()
        bus.stop()
        assert time.monotonic() - started < 2
    finally:
        broker.kill()
    assert max(gaps) < 0.5, f"the loop stalled {max(gaps):.2f}s"
    assert rec.states == [True]
    assert [t for t in threading.enumerate() if t.name.startswith("paho")] == []


def test_events_published_before_the_first_connection_are_sent_after_it(broker, loop):
    publisher, _, subscriber, sub_rec = make_pair(broker, loop, "early")
    subscriber.start()
    try:
        assert subscriber.wait_connected(10)
        # A portal serves gRPC (and may commit writes) before its bus has started.
        on_loop(loop, lambda: [publisher.publish(TOPIC, b"early-%d" % i) for i in range(3)])
        publisher.start()
        assert publisher.wait_connected(10)
        wait_for(lambda: len(sub_rec.got()) == 3, 10, "the early messages")
        assert sub_rec.got() == [b"early-0", b"early-1", b"early-2"]
    finally:
        publisher.stop()
        subscriber.stop()


def test_a_broker_that_drops_every_connection_is_retried_with_backoff(loop):
    """A listener that accepts and closes at once (like a broker refusing our login):
    the bus backs off (0.2 s doubling to 2 s) instead of retrying every 0.2 s."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.2)
    accepted: list[float] = []
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            accepted.append(time.monotonic())
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    rec = Recorder()
    bus = EventBus(Broker(host="127.0.0.1", port=server.getsockname()[1]), "dropped", [TOPIC],
                   rec.on_message, rec.on_connection, no_local=True, loop=loop)
    try:
        bus.start()
        time.sleep(4.0)
    finally:
        bus.stop()
        done.set()
        thread.join(5)
        server.close()
    # 0, 0.2, 0.6, 1.4, 3.0 s (+ connect time): 4-6 attempts; without backoff ~20
    assert 3 <= len(accepted) <= 7, accepted
    assert not bus.connected and rec.states == []


def test_a_silent_broker_is_noticed_by_keepalive_and_left_for_a_new_connection(broker, loop):
    """SIGSTOP: the TCP connection stays up but nothing answers. The bus must see it
    (paho's keepalive, driven by the loop's timer), report it, and reconnect once
    the broker answers again."""
    import signal

    publisher, pub_rec, subscriber, _ = make_pair(broker, loop, "silent")
    publisher.start()
    subscriber.start()
    try:
        assert publisher.wait_connected(10) and subscriber.wait_connected(10)
        broker.signal(signal.SIGSTOP)
        try:
            on_loop(loop, lambda: publisher.publish(TOPIC, b"into-the-void"))
            # keepalive 5 s: a ping after 5 s without traffic, given up 5 s later
            wait_for(lambda: not publisher.connected, 20, "keepalive to give up on the broker")
            assert pub_rec.states[-1] is False
        finally:
            broker.signal(signal.SIGCONT)
        assert publisher.wait_connected(20), "reconnected once the broker answered"
        assert pub_rec.states[-1] is True
    finally:
        publisher.stop()
        subscriber.stop()
