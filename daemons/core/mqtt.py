"""EventBus: the only module that imports paho-mqtt.

Connects in the background and reconnects by itself, subscribes on every
(re)connection, publishes at QoS 1, and tells its owner when the connection
comes and goes so a portal can stop serving cached reads while it may be
missing events.

Two ways to run paho's network I/O:
- its own thread (`loop=None`, the listener): paho's loop_start();
- the owner's asyncio loop (`loop=...`, the portals): the socket is watched by
  the loop (add_reader/add_writer), a publish from the loop is written at once,
  keepalive runs from a 1 s timer, and only the blocking TCP connect runs in
  the loop's executor. A portal publishes one event per write from its loop;
  with paho's thread every publish also woke that thread through a socket pair
  and every PUBACK was handled there, both contending with the loop for the
  GIL. On the loop the portal's CPU per write went down (see README
  "Performance").
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from typing import Any, Callable

import paho.mqtt.client as mqtt

from daemons.core.config import Broker

log = logging.getLogger(__name__)

OnMessage = Callable[[str, bytes], None]
OnConnection = Callable[[bool], None]

RECONNECT_MIN_DELAY = 0.2
RECONNECT_MAX_DELAY = 2.0
KEEPALIVE = 5
MISC_PERIOD = 1.0  # loop mode: how often keepalive and timeouts are checked
# QoS 1 messages kept while the broker is away; then new ones drop (counted in
# `dropped`, logged). paho numbers messages with 16-bit ids and refuses one whose
# id is still pending, so it can never hold more than 65,535.
MAX_QUEUED = 65_000
DROP_WARNING_SECONDS = 10.0


class EventBus:
    def __init__(self, broker: Broker, client_id: str, subscriptions: list[str],
                 on_message: OnMessage, on_connection: OnConnection,
                 persistent_session: bool = False,
                 login: tuple[str, str] | None = None, no_local: bool = False,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
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
        self._client.reconnect_delay_set(min_delay=RECONNECT_MIN_DELAY,
                                         max_delay=RECONNECT_MAX_DELAY)
        self._client.max_inflight_messages_set(1000)
        self._client.max_queued_messages_set(MAX_QUEUED)
        self._client.on_connect = self._handle_connect
        self._client.on_disconnect = self._handle_disconnect
        self._client.on_subscribe = self._handle_subscribe
        self._subscribe_mid: int | None = None
        self._connections = 0  # CONNACKs and disconnects so far: ties a re-subscribe to one
        self._stopping = False
        self._client.on_message = self._handle_message
        self._loop = loop
        if loop is not None:
            self._client.on_socket_close = self._socket_closed
        self._fd: int | None = None  # the socket the loop watches (loop mode)
        self._writing = False
        self._reconnecting = False  # reconnect() runs in the executor: hands off paho
        self._held: collections.deque[tuple[str, bytes]] = collections.deque()
        # Loop mode: connected, but the CONNACK not handled yet. paho sends the
        # messages still waiting for a PUBACK again only then: what was
        # published meanwhile waits in _held, so that it goes after them (found
        # by review: after every broker outage a portal's older events reached
        # the broker after up to a whole outage's newer ones, and the listener
        # flagged them out of order).
        self._awaiting_connack = False
        self.dropped = 0  # publishes lost because too many waited for the broker
        self._dropped_logged = 0
        self._drop_logged_at = -DROP_WARNING_SECONDS
        self._delay = RECONNECT_MIN_DELAY
        self._timer: asyncio.TimerHandle | None = None
        self._begun = False
        # False if any CONNACK since the last confirmed subscription said the
        # broker had no session for us (subscriptions, queued messages): a
        # connection whose subscription was refused does not hide that the next
        # one (which finds the empty session it created) follows a loss.
        self.session_present: bool | None = None
        self._sessions_kept = True

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> None:
        if self._no_local:
            self._client.connect_async(self.broker.host, self.broker.port, keepalive=KEEPALIVE,
                                       clean_start=True)
        else:
            self._client.connect_async(self.broker.host, self.broker.port, keepalive=KEEPALIVE)
        if self._loop is None:
            self._client.loop_start()
        else:
            self._loop.call_soon_threadsafe(self._begin)

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def stop(self) -> None:
        self._stopping = True
        if self._loop is None:
            self._client.disconnect()
            self._client.loop_stop()
            return
        if self._loop.is_running() and not self._on_loop():
            done = threading.Event()

            def stop_on_loop() -> None:
                try:
                    self._stop_on_loop()
                finally:
                    done.set()

            self._loop.call_soon_threadsafe(stop_on_loop)
            if done.wait(5):
                return
            log.warning("%s: the event loop did not stop the broker connection in time",
                        self.client_id)
        self._stop_on_loop()

    def publish(self, topic: str, payload: bytes) -> None:
        """Queue a QoS 1 message; paho sends it (again) once connected."""
        if self._loop is None:
            self._send(topic, payload)
        elif not self._on_loop():
            self._loop.call_soon_threadsafe(self.publish, topic, payload)
        elif self._reconnecting or not self._begun or self._awaiting_connack:
            # not connecting yet, or paho belongs to the executor until
            # reconnect() returns, or its CONNACK is still to come: sent after
            if len(self._held) < MAX_QUEUED:
                self._held.append((topic, payload))
            else:
                self._drop()
        else:
            self._send(topic, payload)  # written now if connected
            self._sync()

    def _send(self, topic: str, payload: bytes) -> None:
        if self._client.publish(topic, payload, qos=1).rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            self._drop()

    def _drop(self) -> None:
        self.dropped += 1
        now = time.monotonic()
        if now - self._drop_logged_at >= DROP_WARNING_SECONDS:
            log.warning("%s: %d change event(s) dropped: more than %d wait for broker %s:%d "
                        "(other portals' caches miss them until cache_ttl; the listener "
                        "reports their revisions missing)", self.client_id,
                        self.dropped - self._dropped_logged, MAX_QUEUED, self.broker.host,
                        self.broker.port)
            self._dropped_logged, self._drop_logged_at = self.dropped, now

    # -- loop mode: paho's I/O on the owner's asyncio loop -------------------

    def _on_loop(self) -> bool:
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:  # no loop runs in this thread
            return False

    def _begin(self) -> None:
        self._begun = True
        self._timer = self._loop.call_later(MISC_PERIOD, self._misc)  # type: ignore[union-attr]
        self._connect_later(0.0)

    def _connect_later(self, delay: float | None = None) -> None:
        """Connect after `delay`, or after the next backoff step (0.2 s doubling to
        2 s, back to 0.2 s once the broker accepted us and our subscriptions)."""
        if self._stopping or self._reconnecting:
            return
        if delay is None:
            delay, self._delay = self._delay, min(self._delay * 2, RECONNECT_MAX_DELAY)
        self._reconnecting = True
        self._loop.call_later(delay, self._connect)  # type: ignore[union-attr]

    def _connect(self) -> None:
        if self._stopping:
            self._reconnecting = False
            return
        self._unwatch()
        # The TCP connect blocks (up to paho's connect timeout for a host that
        # does not answer): never on the loop. Until it returns the loop leaves
        # paho alone; publishes wait in self._held.
        future = self._loop.run_in_executor(None, self._client.reconnect)  # type: ignore
        future.add_done_callback(self._connect_done)

    def _connect_done(self, future: asyncio.Future) -> None:
        self._reconnecting = False
        error = future.exception()
        if error is not None or self._client.socket() is None:
            log.debug("%s: connecting to broker %s:%d failed: %r", self.client_id,
                      self.broker.host, self.broker.port, error)
            self._connect_later()
        elif self._stopping:
            self._client.disconnect()
        else:
            self._awaiting_connack = True
            self._watch()
        self._release_held()

    def _release_held(self) -> None:
        while self._held and not self._reconnecting and not self._awaiting_connack:
            topic, payload = self._held.popleft()
            self._send(topic, payload)
        self._sync()

    def _connack_handled(self) -> None:
        """After paho handled a successful CONNACK (and queued its resends)."""
        if self._awaiting_connack:
            self._awaiting_connack = False
            self._release_held()

    def _watch(self) -> None:
        sock = self._client.socket()
        if sock is None:
            return
        self._fd = sock.fileno()
        self._loop.add_reader(self._fd, self._readable)  # type: ignore[union-attr]

    def _unwatch(self) -> None:
        if self._fd is not None:
            self._loop.remove_reader(self._fd)  # type: ignore[union-attr]
            if self._writing:
                self._loop.remove_writer(self._fd)  # type: ignore[union-attr]
        self._fd, self._writing = None, False

    def _socket_closed(self, client: Any, userdata: object, sock: Any) -> None:
        # paho calls this just before it closes the socket: forget the fd now,
        # while it still names this socket.
        if self._on_loop():
            self._unwatch()

    def _readable(self) -> None:
        self._client.loop_read(max_packets=64)
        self._sync()

    def _writable(self) -> None:
        self._client.loop_write()
        self._sync()

    def _misc(self) -> None:
        if self._stopping:
            return
        if not self._reconnecting:
            self._client.loop_misc()  # keepalive ping, or give up on a silent broker
            self._sync()
        self._timer = self._loop.call_later(MISC_PERIOD, self._misc)  # type: ignore

    def _sync(self) -> None:
        """After paho ran on the loop: watch for writability iff paho has bytes to
        send; if the connection is gone, reconnect (with backoff)."""
        if self._reconnecting:
            return
        if self._client.socket() is None:
            self._unwatch()
            if not self._stopping:
                self._connect_later()  # also after a refused login: back off
            return
        if self._fd is None:
            return
        wants = self._client.want_write()
        if wants and not self._writing:
            self._loop.add_writer(self._fd, self._writable)  # type: ignore[union-attr]
        elif not wants and self._writing:
            self._loop.remove_writer(self._fd)  # type: ignore[union-attr]
        self._writing = wants

    def _stop_on_loop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if not self._reconnecting:
            self._client.disconnect()  # DISCONNECT written now if connected
            self._unwatch()

    # -- paho callbacks (its network thread, or the loop) --------------------

    def _handle_connect(self, client: mqtt.Client, userdata: object, flags: object,
                        reason: mqtt.ReasonCode, properties: object) -> None:
        self._connections += 1
        if reason.is_failure:
            log.warning("%s: broker %s:%d refused the connection: %s", self.client_id,
                        self.broker.host, self.broker.port, reason)
            return
        self._sessions_kept = self._sessions_kept and bool(getattr(flags, "session_present",
                                                                   False))
        if self._loop is not None:
            # paho sends again what waits for a PUBACK when this returns.
            self._loop.call_soon(self._connack_handled)
        if not self._subscriptions:
            self._mark_connected()
            return
        self._subscribe(client)

    def _subscribe(self, client: mqtt.Client) -> None:
        if self._no_local:
            options = mqtt.SubscribeOptions(qos=1, noLocal=True)
            _, self._subscribe_mid = client.subscribe([(t, options)
                                                       for t in self._subscriptions])
        else:
            _, self._subscribe_mid = client.subscribe([(t, 1) for t in self._subscriptions])

    def _handle_subscribe(self, client: mqtt.Client, userdata: object, mid: int,
                          reasons: list, properties: object) -> None:
        # Only once the broker confirmed the subscriptions can no event be missed.
        if mid != self._subscribe_mid:
            return
        if any(r.is_failure for r in reasons):
            # Not connected for our purposes: events would be missed (a portal
            # would serve cached reads no event keeps fresh). Ask again later.
            delay, self._delay = self._delay, min(self._delay * 2, RECONNECT_MAX_DELAY)
            log.warning("%s: broker refused a subscription (%s); not using the broker until "
                        "it accepts, asking again in %.1fs", self.client_id,
                        ", ".join(str(r) for r in reasons), delay)
            connection = self._connections
            if self._loop is None:
                timer = threading.Timer(delay, self._resubscribe, args=(connection,))
                timer.daemon = True
                timer.start()
            else:
                self._loop.call_later(delay, self._resubscribe, connection)
            return
        self._mark_connected()

    def _resubscribe(self, connection: int) -> None:
        """After a refused SUBSCRIBE, on the same connection only: after a
        disconnect, the reconnect subscribes by itself."""
        if self._stopping or self._reconnecting or connection != self._connections \
                or self._connected.is_set() or self._client.socket() is None:
            return
        self._subscribe(self._client)
        if self._loop is not None:
            self._sync()

    def _mark_connected(self) -> None:
        self.session_present, self._sessions_kept = self._sessions_kept, True
        self._delay = RECONNECT_MIN_DELAY
        self._connected.set()
        log.info("%s: connected to broker %s:%d", self.client_id, self.broker.host,
                 self.broker.port)
        self._on_connection(True)

    def _handle_disconnect(self, client: mqtt.Client, userdata: object, flags: object,
                           reason: mqtt.ReasonCode, properties: object) -> None:
        self._connections += 1
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
