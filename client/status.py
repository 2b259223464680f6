"""`tarefa cluster status`: ask every daemon of the cluster file how it is."""

from __future__ import annotations

import socket
from typing import Any

import grpc

from daemons.core.config import Cluster
from daemons.core.security import TlsMaterial, open_channel
from proto import listener_pb2, listener_pb2_grpc, portal_pb2, portal_pb2_grpc
from proto import replica_pb2, replica_pb2_grpc


def _call(address: str, make_stub: Any, method: str, request: Any, timeout: float,
          tls: TlsMaterial | None) -> Any:
    with open_channel(address, tls, present_certificate=True) as channel:
        return getattr(make_stub(channel), method)(request, timeout=timeout)


def _row(daemon_id: str, kind: str, address: str) -> dict[str, Any]:
    return {"id": daemon_id, "kind": kind, "address": address, "reachable": False, "role": ""}


def connect_failure(details: str) -> str | None:
    """The cause of a failed gRPC connection in an operator's words, from the
    call's details (gRPC's last connection error); None if it names none."""
    text = details.lower()
    if any(word in text for word in ("handshake", "ssl", "certificate", "tsi_")):
        return ("TLS handshake failed: this CLI and the daemon do not trust each other's "
                "certificates (from different CAs? after tarefa-secrets issued new ones, "
                "restart the daemons so they load them)")
    if "connection refused" in text:
        return "connection refused: nothing listens there (is the daemon running?)"
    return None


def _failed(row: dict[str, Any], exc: grpc.RpcError) -> dict[str, Any]:
    details = exc.details() or ""
    cause = connect_failure(details)
    # The cause first: the table shows the start of it.
    row["error"] = f"{exc.code().name}: " + (f"{cause} [{details}]" if cause else details)
    return row


# MQTT 3.1.1 CONNECT: clean session, keepalive 5 s, client id "tarefa-status", no
# login. Any CONNACK (accepted, or "not authorized" from a broker that wants
# one) shows the broker answers; a TCP connect alone is accepted by the kernel
# for a broker that is frozen.
_MQTT_CONNECT = bytes([0x10, 25, 0, 4]) + b"MQTT" + bytes([4, 0x02, 0, 5, 0, 13]) + \
    b"tarefa-status"
_MQTT_DISCONNECT = bytes([0xE0, 0])


def mqtt_answers(host: str, port: int, timeout: float) -> str | None:
    """None if an MQTT broker at host:port answers a CONNECT within `timeout`,
    else why not."""
    try:
        with socket.create_connection((host, port), timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(_MQTT_CONNECT)
            answer = b""
            while len(answer) < 4:
                chunk = sock.recv(4 - len(answer))
                if not chunk:
                    return "the broker closed the connection without answering MQTT CONNECT"
                answer += chunk
            if answer[0] != 0x20:
                return f"not an MQTT CONNACK: {answer!r}"
            if answer[3] == 0:
                sock.sendall(_MQTT_DISCONNECT)
            return None
    except TimeoutError:
        return f"no MQTT answer within {timeout:g}s (broker hung?)"
    except OSError as exc:
        return str(exc)


def collect_status(cluster: Cluster, timeout: float,
                   tls: TlsMaterial | None = None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    broker = _row("broker", "broker", f"{cluster.broker.host}:{cluster.broker.port}")
    error = mqtt_answers(cluster.broker.host, cluster.broker.port, timeout)
    if error is None:
        broker["reachable"] = True
    else:
        broker["error"] = error
    rows.append(broker)
    for spec in cluster.replicas:
        row = _row(spec.id, "replica", spec.grpc_address)
        try:
            st = _call(spec.grpc_address, replica_pb2_grpc.ReplicaStub, "Status",
                       replica_pb2.StatusRequest(), timeout, tls)
            row.update(reachable=True, role=st.role, leader=st.leader, term=st.term,
                       commit_index=st.commit_index, applied_index=st.applied_index,
                       revision=st.revision, journal_bytes=st.journal_bytes,
                       has_quorum=st.has_quorum, raft_warnings=st.raft_warnings,
                       raft_criticals=st.raft_criticals,
                       peers={p.id: p.reachable for p in st.peers})
        except grpc.RpcError as exc:
            _failed(row, exc)
        rows.append(row)
    for portal in cluster.portals:
        row = _row(portal.id, "portal", portal.address)
        try:
            st = _call(portal.address, portal_pb2_grpc.PortalStatusStub, "Status",
                       portal_pb2.PortalStatusRequest(), timeout, tls)
            lookups = st.cache_hits + st.cache_misses
            row.update(reachable=True, role="+".join(st.services),
                       broker_connected=st.broker_connected, cache_entries=st.cache_entries,
                       cache_hits=st.cache_hits, cache_misses=st.cache_misses,
                       cache_hit_rate=st.cache_hits / lookups if lookups else 0.0,
                       events_received=st.events_received,
                       events_published=st.events_published,
                       events_rejected=st.events_rejected, auth_refused=st.auth_refused,
                       watch_streams=st.watch_streams, limited=st.limited,
                       events_dropped=st.events_dropped)
        except grpc.RpcError as exc:
            _failed(row, exc)
        rows.append(row)
    if cluster.listener is not None:
        spec = cluster.listener
        address = f"{spec.host}:{spec.port}"
        row = _row(spec.id, "listener", address)
        try:
            st = _call(address, listener_pb2_grpc.ListenerStatusStub, "Status",
                       listener_pb2.ListenerStatusRequest(), timeout, tls)
            row.update(reachable=True, broker_connected=st.broker_connected,
                       events_written=st.events_written, rejects=st.rejects,
                       duplicates=st.duplicates, out_of_order=st.out_of_order,
                       sessions_lost=st.sessions_lost,
                       missing_revisions=st.missing_revisions)
        except grpc.RpcError as exc:
            _failed(row, exc)
        rows.append(row)
    return rows
