"""PortalDaemon: wires the replica client, cache, event bus and gRPC services."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from daemons.core import events
from daemons.core.config import Cluster, PortalSpec
from daemons.core.errors import ConfigError
from daemons.core.lifecycle import Daemon, new_event_loop
from daemons.core.mqtt import EventBus
from daemons.core.rpc import add_service
from daemons.core.security import add_port, load_tls, mqtt_login, server_options
from daemons.portal.auth import Authenticator, SecretHasher, admin_token
from daemons.portal.cache import PortalCache
from daemons.portal.coherence import Coherence
from daemons.portal.limits import PortalLimits
from daemons.portal.operations import PortalOperations
from daemons.portal.replicas import ReplicaClient
from daemons.portal.service import AdminServicer, ClientServicer, StatusServicer
from proto import portal_pb2

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 5.0


def portal_spec(cluster: Cluster, portal_id: str) -> PortalSpec:
    for spec in cluster.portals:
        if spec.id == portal_id:
            return spec
    known = ", ".join(p.id for p in cluster.portals) or "none"
    raise ConfigError([f"{cluster.path}: no portal with id {portal_id!r} (known: {known})"])


class PortalDaemon(Daemon):
    def __init__(self, cluster: Cluster, portal_id: str) -> None:
        super().__init__(portal_id, cluster)
        self.spec = portal_spec(cluster, portal_id)
        self.tls = load_tls(cluster.security.tls, portal_id)
        self.cache = PortalCache(self.spec.cache_entries, self.spec.cache_ttl,
                                 max_bytes=self.spec.cache_bytes)
        self.coherence = Coherence(portal_id, cluster.name, self.cache)
        self.replicas = ReplicaClient(cluster, portal_id, self.tls)
        security = cluster.security
        self.hasher = SecretHasher()
        self.ops = PortalOperations(portal_id, self.replicas, self.coherence, self.hasher,
                                    issue_secrets=security.auth == "token")
        # Only a portal serving admin needs (and reads) the admin token: read
        # once here, a missing or readable-by-others file is a ConfigError (exit 2).
        token = admin_token(security) if "admin" in self.spec.services else None
        self.auth = Authenticator(portal_id, security.auth, token, self.hasher,
                                  self.ops.secret_record)
        self.limits = PortalLimits(cluster.limits)
        # A portal that serves no tasks has no use for task events.
        topics = [events.subscription(cluster.name)] if "client" in self.spec.services \
            else [events.client_subscription(cluster.name)]
        self.health: health.aio.HealthServicer | None = None
        self.server: grpc.aio.Server | None = None
        # gRPC (servers and the replica client) and the broker connection run on
        # an asyncio loop in its own thread; run() keeps the main thread for signals.
        self.loop = new_event_loop()
        self.bus = EventBus(cluster.broker, f"tarefa-{cluster.name}-{portal_id}", topics,
                            self.coherence.on_message, self.coherence.on_connection,
                            login=mqtt_login(cluster.broker, portal_id), no_local=True,
                            loop=self.loop)
        self.coherence.bus = self.bus
        self.coherence.loop = self.loop
        self._loop_thread = threading.Thread(target=self.loop.run_forever, name="grpc-loop",
                                             daemon=True)

    @staticmethod
    def check(cluster: Cluster, portal_id: str) -> None:
        """--check-config: the spec and every secret this portal would read."""
        spec = portal_spec(cluster, portal_id)
        load_tls(cluster.security.tls, portal_id)
        mqtt_login(cluster.broker, portal_id)
        if "admin" in spec.services:
            admin_token(cluster.security)

    def start(self) -> None:
        self._loop_thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self.loop).result(timeout=30)
        self.bus.start()
        log.info("%s: serving %s on %s", self.daemon_id, "+".join(self.spec.services),
                 self.spec.address)

    async def _serve(self) -> None:
        await self.replicas.start()
        self.server = grpc.aio.server(options=server_options(self.cluster.limits))
        names = ["tarefa.portal.PortalStatus"]
        if "admin" in self.spec.services:
            add_service(self.server, portal_pb2, "AdminPortal",
                        AdminServicer(self.daemon_id, self.ops, DEFAULT_TIMEOUT, self.auth,
                                      self.limits))
            names.append("tarefa.portal.AdminPortal")
        if "client" in self.spec.services:
            add_service(self.server, portal_pb2, "ClientPortal",
                        ClientServicer(self.daemon_id, self.ops, DEFAULT_TIMEOUT, self.auth,
                                       self.limits))
            names.append("tarefa.portal.ClientPortal")
        add_service(self.server, portal_pb2, "PortalStatus",
                    StatusServicer(self.daemon_id, self.spec.services, self.ops, self.auth,
                                   self.limits))
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        add_port(self.server, self.spec.address, self.tls)
        await self.server.start()
        for name in ["", *names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def _shutdown(self, grace: float) -> None:
        started = time.monotonic()
        if self.health is not None:
            await self.health.enter_graceful_shutdown()
        if self.server is not None:
            await self.server.stop(grace)
        # Writes whose callers were cancelled by the stop may still commit:
        # give their groups the rest of the grace (at least a second) to be
        # answered and published.
        await self.replicas.close(drain=max(1.0, grace - (time.monotonic() - started)))

    def reload(self) -> None:
        log.info("%s: SIGHUP: nothing to reload (cache size and TTL are fixed at start)",
                 self.daemon_id)

    def stop(self, grace: float) -> None:
        try:
            if self._loop_thread.is_alive():
                asyncio.run_coroutine_threadsafe(self._shutdown(grace), self.loop).result(
                    timeout=grace + 5)
        finally:
            self.bus.stop()
            self.hasher.close()
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._loop_thread.join(5)
