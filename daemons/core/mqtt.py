"""EventBus: the only module that imports paho-mqtt.

Connects in the background and reconnects by itself (paho's network loop
thread), subscribes on every (re)connection, publishes at QoS 1, and tells
its owner when the connection comes and goes so a portal can stop serving
cached reads while it may be missing events.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

import paho.mqtt.client as mqtt

from daemons.core.config import Broker

log = logging.getLogger(__name__)

OnMessage = Callable[[str, bytes], None]
OnConnection = Callable[[bool], None]


class EventBus:
    def __init__(self, broker: Broker, client_id: str, subscriptions: list[str],
                 on_message: OnMessage, on_connection: OnConnection,
                 persistent_session: bool = False,
                 login: tuple[str, str] | None = None, no_local: bool = False) -> None:
        """`no_local`: the broker does not send this client its own publishes back
        (MQTT 5's No Local subscription option). A portal drops its own events
        anyway; not receiving them saves it a PUBLISH, a PUBACK and a JSON decode
        per write. Such a client speaks MQTT 5 with a clean session each time;
        the others (the listener's persistent session) stay on MQTT 3.1.1."""
        self.broker = broker
        self.client_id = client_id
        self._subscriptions = subscriptions
        self._on_message = on_message
        self._on_connection = on_connection
        self._connected = threading.Event()
        self._no_local = no_local
        if no_local:
            if persistent_session:
                raise ValueError("no_local clients use a clean session")
            self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                       protocol=mqtt.MQTTv5)
        else:
            self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                       clean_session=not persistent_session)
        if login is not None:
            self._client.username_pw_set(*login)
        self._client.reconnect_delay_set(min_delay=0.2, max_delay=2)
        self._client.max_inflight_messages_set(1000)
        self._client.max_queued_messages_set(100_000)
        self._client.on_connect = self._handle_connect
        self._client.on_disconnect = self._handle_disconnect
        self._client.on_subscribe = self._handle_subscribe
        self._subscribe_mid: int | None = None
        self._stopping = False
        self._client.on_message = self._handle_message

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> None:
        if self._no_local:
            self._client.connect_async(self.broker.host, self.broker.port, keepalive=5,
                                       clean_start=True)
        else:
            self._client.connect_async(self.broker.host, self.broker.port, keepalive=5)
        self._client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def stop(self) -> None:
        self._stopping = True
        self._client.disconnect()
        self._client.loop_stop()

    def publish(self, topic: str, payload: bytes) -> None:
        """Queue a QoS 1 message; paho sends it (again) once connected."""
        self._client.publish(topic, payload, qos=1)

    # -- paho callbacks (network thread) -------------------------------------

    def _handle_connect(self, client: mqtt.Client, userdata: object, flags: object,
                        reason: mqtt.ReasonCode, properties: object) -> None:
        if reason.is_failure:
            log.warning("%s: broker %s:%d refused the connection: %s", self.client_id,
                        self.broker.host, self.broker.port, reason)
            return
        if not self._subscriptions:
            self._mark_connected()
            return
        if self._no_local:
            options = mqtt.SubscribeOptions(qos=1, noLocal=True)
            _, self._subscribe_mid = client.subscribe([(t, options)
                                                       for t in self._subscriptions])
        else:
            _, self._subscribe_mid = client.subscribe([(t, 1) for t in self._subscriptions])

    def _handle_subscribe(self, client: mqtt.Client, userdata: object, mid: int,
                          reasons: list, properties: object) -> None:
        # Only once the broker confirmed the subscriptions can no event be missed.
        if mid == self._subscribe_mid:
            if any(r.is_failure for r in reasons):
                log.warning("%s: broker refused a subscription: %s", self.client_id, reasons)
            self._mark_connected()

    def _mark_connected(self) -> None:
        self._connected.set()
        log.info("%s: connected to broker %s:%d", self.client_id, self.broker.host,
                 self.broker.port)
        self._on_connection(True)

    def _handle_disconnect(self, client: mqtt.Client, userdata: object, flags: object,
                           reason: mqtt.ReasonCode, properties: object) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if was and not self._stopping:
            log.warning("%s: lost the broker %s:%d (%s); reconnecting", self.client_id,
                        self.broker.host, self.broker.port, reason)
            self._on_connection(False)

    def _handle_message(self, client: mqtt.Client, userdata: object,
                        message: mqtt.MQTTMessage) -> None:
        try:
            self._on_message(message.topic, message.payload)
        except Exception:  # noqa: BLE001 - one bad message must not kill the loop
            log.exception("%s: handling a message on %s failed", self.client_id, message.topic)
