"""ListenerDaemon: wires the event bus, the audit log, health and status.

Every change event published on the cluster's topics arrives here (QoS 1,
persistent MQTT session under a client id made of the cluster name and the
listener id, so the broker keeps what is published while the listener
restarts). Valid events go to the AuditLog, anything else to its reject file
with a WARNING. paho acknowledges a QoS 1 message only after this callback
returns, so an event is acknowledged only once it is in the audit log.

If the audit log cannot be written (disk full, I/O error) the listener stops
at once with exit code 1 *without* returning from the callback: the event
stays unacknowledged and the broker redelivers it to the next run, whereas
going on would acknowledge events that were never written. Every message
ends either written, rejected (any other failure to validate or encode it
sends it to the reject file) or unacknowledged in a stopped listener: none
is acknowledged and lost.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent import futures
from typing import Any, Callable, TextIO

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from daemons.core import events
from daemons.core.config import Cluster, ListenerSpec
from daemons.core.errors import ConfigError, InvalidArgument
from daemons.core.lifecycle import EXIT_FAILURE, Daemon
from daemons.core.mqtt import EventBus
from daemons.core.security import add_port, load_tls, mqtt_login, server_options
from daemons.core.terminal import terminal_safe
from daemons.listener.audit import AuditLog
from daemons.listener.gaps import CONFIRM, MAX_JUMP, RevisionGaps
from proto import listener_pb2 as pb
from proto import listener_pb2_grpc

log = logging.getLogger(__name__)

HOLES_SHOWN = 10  # holes named in one WARNING line

GRPC_WORKERS = 4
SUMMARY_EVERY = 1000  # events written between two INFO summary lines
STATUS_SERVICE = "tarefa.listener.ListenerStatus"
AUDIT_SERVICE = "tarefa.listener.Audit"  # health: SERVING only while subscribed


def listener_spec(cluster: Cluster, _daemon_id: str = "") -> ListenerSpec:
    if cluster.listener is None:
        raise ConfigError([f"{cluster.path}: listener: missing; tarefa-listener needs a "
                           "`listener:` section (id, host, port, audit_log; see "
                           "config/cluster.yaml)"])
    return cluster.listener


def session_client_id(cluster: Cluster, spec: ListenerSpec) -> str:
    """Stable across restarts, so the broker resumes the same persistent session."""
    return f"tarefa-{cluster.name}-{spec.id}"


def readable_line(entry: dict[str, Any]) -> str:
    """`rev 42  task.updated  cid=7 title="buy milk"  by portal-client-1`"""
    subject = f"cid={entry['cid']}"
    if "title" in entry:
        subject += f" title={json.dumps(entry['title'], ensure_ascii=False)}"
    line = f"rev {entry['revision']}  {entry['event']}  {subject}  by {entry['origin']}"
    if entry.get("out_of_order"):
        line += "  (out of order)"
    return terminal_safe(line)  # every field may come from a forged event


class StatusServicer(listener_pb2_grpc.ListenerStatusServicer):
    def __init__(self, daemon: "ListenerDaemon") -> None:
        self.daemon = daemon

    def Status(self, request: pb.ListenerStatusRequest,
               context: Any) -> pb.ListenerStatusResponse:
        return pb.ListenerStatusResponse(id=self.daemon.daemon_id, **self.daemon.status())


class ListenerDaemon(Daemon):
    def __init__(self, cluster: Cluster, follow: TextIO | None = None,
                 fatal: Callable[[int], Any] = os._exit) -> None:
        self.spec = listener_spec(cluster)
        super().__init__(self.spec.id, cluster)
        self.tls = load_tls(cluster.security.tls, self.spec.id)
        self.follow = follow
        self._fatal = fatal
        self.audit = AuditLog(self.spec.audit_log, fsync=self.spec.fsync,
                              fsync_interval=self.spec.fsync_interval,
                              rotate_bytes=self.spec.rotate_bytes,
                              keep_files=self.spec.keep_files,
                              dedupe_window=self.spec.dedupe_window)
        self.bus = EventBus(cluster.broker, session_client_id(cluster, self.spec),
                            [events.subscription(cluster.name)], self.on_message,
                            self.on_connection, persistent_session=True,
                            login=mqtt_login(cluster.broker, self.spec.id))
        self.health = health.HealthServicer()
        self.server: grpc.Server | None = None
        self.gaps = RevisionGaps(self.spec.missing_after)
        self._ignored_logged = 0
        # The broker should hold a session for us once we have had one: since
        # our first subscription, or before (the audit log holds events).
        self._expect_session = False
        self.sessions_lost = 0

    @staticmethod
    def check(cluster: Cluster, _daemon_id: str = "") -> None:
        """--check-config: the spec and every secret the listener would read."""
        spec = listener_spec(cluster)
        load_tls(cluster.security.tls, spec.id)
        mqtt_login(cluster.broker, spec.id)

    def start(self) -> None:
        self.audit.open()
        history, replayed = self.audit.remembered_revisions()
        self._expect_session = bool(history or replayed)
        self.gaps.resume(history, replayed)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=GRPC_WORKERS,
                                                             thread_name_prefix="grpc"),
                                  options=server_options(self.cluster.limits))
        listener_pb2_grpc.add_ListenerStatusServicer_to_server(StatusServicer(self), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        add_port(self.server, self.spec.address, self.tls)
        self.server.start()
        for name in ("", STATUS_SERVICE):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.health.set(AUDIT_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.bus.start()
        log.info("%s: auditing %s to %s (fsync %s), status on %s", self.daemon_id,
                 events.subscription(self.cluster.name), self.audit.path, self.spec.fsync,
                 self.spec.address)

    def tick(self) -> None:
        self._write(self.audit.sync_if_due)
        self._report_gaps()

    def _report_gaps(self) -> None:
        """At most one line of each kind per tick, however many holes."""
        holes = self.gaps.overdue()
        if holes:
            count = sum(last - first + 1 for first, last in holes)
            shown = ", ".join(str(first) if first == last else f"{first}-{last}"
                              for first, last in holes[:HOLES_SHOWN])
            more = f" and {len(holes) - HOLES_SHOWN} more holes" \
                if len(holes) > HOLES_SHOWN else ""
            what = f"revision {shown} never arrived" if count == 1 else \
                f"{count} revisions never arrived ({shown}{more})"
            log.warning("%s: %s, a later one has waited %.0fs: %s missing from the audit "
                        "log (a portal that died before publishing, or a broker that lost or "
                        "dropped queued events); %d missing now", self.daemon_id, what,
                        self.gaps.grace, "that change is" if count == 1 else
                        "those changes are", self.gaps.missing)
        late = self.gaps.take_late()
        if late:
            log.info("%s: %d revision(s) reported missing arrived late (written); %d "
                     "missing now", self.daemon_id, late, self.gaps.missing)
        if self.gaps.ignored > self._ignored_logged:
            log.warning("%s: %d event(s) with a revision more than %d above the expected "
                        "one: written, set aside from the search for missing revisions "
                        "(forged; or this listener missed that many changes, which is "
                        "reported once %d such revisions agree)", self.daemon_id,
                        self.gaps.ignored - self._ignored_logged, MAX_JUMP, CONFIRM)
            self._ignored_logged = self.gaps.ignored

    def stop(self, grace: float) -> None:
        self.health.enter_graceful_shutdown()
        # Once the bus is stopped paho's thread is joined: no event is being written.
        self.bus.stop()
        self.audit.close()
        if self.server is not None:
            self.server.stop(grace).wait(grace + 1)
        log.info("%s: %s", self.daemon_id, self._summary())

    def status(self) -> dict[str, Any]:
        return {"broker_connected": self.bus.connected, "sessions_lost": self.sessions_lost,
                "missing_revisions": self.gaps.missing, **self.audit.status()}

    # -- the event bus (paho's network thread) -----------------------------------

    def on_connection(self, up: bool) -> None:
        if up:
            if self._expect_session and not self.bus.session_present:
                self.sessions_lost += 1
                log.warning("%s: the broker kept no session for %s: events published while "
                            "this listener was not subscribed are missing from the audit log "
                            "(the broker restarted without persistence, or lost its data); "
                            "%d such gap(s) since this listener started", self.daemon_id,
                            self.bus.client_id, self.sessions_lost)
            self._expect_session = True
        self.health.set(AUDIT_SERVICE, health_pb2.HealthCheckResponse.SERVING if up
                        else health_pb2.HealthCheckResponse.NOT_SERVING)

    def on_message(self, topic: str, payload: bytes) -> None:
        """Write the event or reject it; never return (acknowledge) having done neither."""
        try:
            event = events.decode(payload, topic, self.cluster.name)
        except InvalidArgument as exc:
            self._reject(topic, payload, exc.message)
            return
        except Exception as exc:  # noqa: BLE001 - a validator bug must not lose the event
            self._reject(topic, payload, f"cannot be validated ({type(exc).__name__}: {exc})")
            return
        try:
            entry = self.audit.append(event, topic, self.gaps.plausible(event["revision"]))
        except OSError as exc:
            self._fail_stop(exc)
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. an entry that cannot be encoded
            self._reject(topic, payload, "cannot be written to the audit log "
                         f"({type(exc).__name__}: {exc})")
            return
        tracking = self.gaps.tracking
        self.gaps.seen(event["revision"], replay=event.get("replay") is True)
        if not tracking and self.gaps.tracking:
            self.audit.retrust_highest()
        if entry is None:
            log.debug("%s: dropped a redelivered event (origin %s, revision %d)",
                      self.daemon_id, event["origin"], event["revision"])
            return
        if entry.get("out_of_order"):
            log.warning("%s: out-of-order event: revision %d from %s is below a revision "
                        "already seen from it (written, flagged out_of_order)",
                        self.daemon_id, event["revision"], event["origin"])
        if self.follow is not None:
            self._print(readable_line(entry))
        if self.audit.written % SUMMARY_EVERY == 0:
            log.info("%s: %s", self.daemon_id, self._summary())

    def _reject(self, topic: str, payload: bytes, reason: str) -> None:
        log.warning("%s: rejected a malformed event on %r (%d bytes): %s; kept in %s",
                    self.daemon_id, topic, len(payload), reason[:500], self.audit.reject_path)
        self._write(lambda: self.audit.reject(topic, payload, reason), any_error=True)

    def _write(self, action: Callable[[], Any], any_error: bool = False) -> Any:
        """Run a write; on OSError (or any error, with `any_error`) stop without acking."""
        try:
            return action()
        except Exception as exc:
            if any_error or isinstance(exc, OSError):
                self._fail_stop(exc)
            raise

    def _fail_stop(self, exc: BaseException) -> None:
        """Exit at once: returning would let paho acknowledge an event never written."""
        log.critical("%s: cannot write the audit log %s: %s; exiting without "
                     "acknowledging the event, the broker will deliver it again",
                     self.daemon_id, self.audit.path, exc)
        try:
            for handler in logging.getLogger().handlers:
                handler.flush()  # may fail too (stderr on the same full disk)
        finally:
            self._fatal(EXIT_FAILURE)

    def _print(self, line: str) -> None:
        assert self.follow is not None
        try:
            print(line, file=self.follow, flush=True)
        except (OSError, ValueError) as exc:
            log.warning("%s: --follow output failed (%s); no longer printing events",
                        self.daemon_id, exc)
            self.follow = None

    def _summary(self) -> str:
        st = self.audit.status()
        return (f"{st['events_written']} events written, {st['duplicates']} duplicates "
                f"dropped, {st['out_of_order']} out of order, {st['rejects']} rejected")
