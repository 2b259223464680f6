"""EventBus (daemons/core/mqtt.py): a subscription the broker refuses is not
"connected" (a portal would otherwise serve cached reads that no event keeps
fresh); it is asked for again. A fake paho client stands in for the broker,
which here (Mosquitto 2.0) grants even ACL-denied subscriptions, so a real
refusal cannot be provoked; tests/integration/test_event_bus.py runs the rest
against a real Mosquitto."""

from __future__ import annotations

import time

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from daemons.core.config import Broker
from daemons.core.mqtt import EventBus


class _FakeClient:
    def __init__(self) -> None:
        self.subscribed: list = []

    def subscribe(self, topics):  # type: ignore[no-untyped-def]
        self.subscribed.append(topics)
        return 0, 100 + len(self.subscribed)

    def socket(self) -> object:
        return object()


def _bus(delay: float) -> tuple[EventBus, _FakeClient, list[bool]]:
    """A thread-mode bus on a fake client; the list records on_connection calls."""
    states: list[bool] = []
    bus = EventBus(Broker(), "t", ["tarefa/test/#"], lambda topic, payload: None,
                   states.append)
    fake = _FakeClient()
    bus._client = fake  # type: ignore[assignment]
    bus._delay = delay  # the first re-subscribe's backoff
    return bus, fake, states


def test_a_refused_subscription_is_not_connected_and_is_asked_again():
    bus, fake, states = _bus(0.01)
    bus._handle_connect(fake, None, {}, ReasonCode(PacketTypes.CONNACK, identifier=0), None)
    assert len(fake.subscribed) == 1
    refused = ReasonCode(PacketTypes.SUBACK, identifier=0x87)  # not authorized
    bus._handle_subscribe(fake, None, 101, [refused], None)
    assert not bus.connected and states == []
    deadline = time.monotonic() + 5
    while len(fake.subscribed) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(fake.subscribed) == 2, "the subscription was not asked for again"
    granted = ReasonCode(PacketTypes.SUBACK, identifier=1)
    bus._handle_subscribe(fake, None, 102, [granted], None)
    assert bus.connected and states == [True]


def test_a_re_subscribe_scheduled_on_a_lost_connection_is_dropped():
    """Refused, then the connection dropped and a reconnect subscribed fine: the
    old timer must not subscribe again (its SUBACK would 'reconnect' the bus,
    emptying the cache and ending every watch stream for nothing)."""
    bus, fake, states = _bus(0.05)
    ok = ReasonCode(PacketTypes.CONNACK, identifier=0)
    bus._handle_connect(fake, None, {}, ok, None)
    bus._handle_subscribe(fake, None, 101, [ReasonCode(PacketTypes.SUBACK, identifier=0x87)],
                          None)
    bus._handle_disconnect(fake, None, {}, ReasonCode(PacketTypes.DISCONNECT, identifier=0),
                           None)
    bus._handle_connect(fake, None, {}, ok, None)
    bus._handle_subscribe(fake, None, 102, [ReasonCode(PacketTypes.SUBACK, identifier=1)], None)
    assert states == [True] and len(fake.subscribed) == 2
    time.sleep(0.3)  # well past the stale timer's delay
    assert len(fake.subscribed) == 2 and states == [True]



def test_a_session_lost_before_a_refused_subscription_is_still_told():
    """The broker lost its data (no session), refused the re-subscription, the
    connection dropped, and the next CONNACK found the empty session that the
    refused connection had created: session_present must still say False at
    the first confirmed subscription, or the listener would not report the loss."""
    from types import SimpleNamespace

    bus, fake, states = _bus(60)  # no automatic re-subscribe during the test
    ok = ReasonCode(PacketTypes.CONNACK, identifier=0)
    bus._handle_connect(fake, None, SimpleNamespace(session_present=True), ok, None)
    bus._handle_subscribe(fake, None, 101, [ReasonCode(PacketTypes.SUBACK, identifier=1)], None)
    assert bus.session_present is True
    bus._handle_disconnect(fake, None, {}, ReasonCode(PacketTypes.DISCONNECT, identifier=0),
                           None)
    bus._handle_connect(fake, None, SimpleNamespace(session_present=False), ok, None)
    bus._handle_subscribe(fake, None, 102, [ReasonCode(PacketTypes.SUBACK, identifier=0x87)],
                          None)
    bus._handle_disconnect(fake, None, {}, ReasonCode(PacketTypes.DISCONNECT, identifier=0),
                           None)
    bus._handle_connect(fake, None, SimpleNamespace(session_present=True), ok, None)
    bus._handle_subscribe(fake, None, 103, [ReasonCode(PacketTypes.SUBACK, identifier=1)], None)
    assert states == [True, False, True] and bus.session_present is False
    bus._handle_disconnect(fake, None, {}, ReasonCode(PacketTypes.DISCONNECT, identifier=0),
                           None)
    bus._handle_connect(fake, None, SimpleNamespace(session_present=True), ok, None)
    bus._handle_subscribe(fake, None, 104, [ReasonCode(PacketTypes.SUBACK, identifier=1)], None)
    assert bus.session_present is True  # reported once, then back to normal


def test_publishes_beyond_what_can_wait_for_the_broker_are_counted_and_logged(caplog):
    # The real paho client, never connected: it keeps QoS 1 messages until
    # MAX_QUEUED (its 16-bit message ids allow no more than 65,535), then
    # refuses them. Each refusal is counted and logged, never silent.
    from daemons.core import mqtt as mqtt_module

    bus = EventBus(Broker(), "portal-x", ["tarefa/test/#"], lambda topic, payload: None,
                   lambda connected: None)
    for i in range(mqtt_module.MAX_QUEUED + 25):
        bus.publish("tarefa/test/e", b"%d" % i)
    assert bus.dropped == 25
    warnings = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(warnings) == 1  # rate-limited
    assert "portal-x: 1 change event(s) dropped: more than 65000 wait for broker" in warnings[0]
    assert mqtt_module.MAX_QUEUED < 65_536
