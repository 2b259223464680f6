"""ReplicaDaemon: wires storage, the Raft member, the proposer and gRPC together."""

from __future__ import annotations

import logging
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from daemons.core.config import Cluster
from daemons.core.errors import TarefaError
from daemons.core.lifecycle import Daemon
from daemons.core.log import LevelCounter
from daemons.replica.proposer import Proposer
from daemons.replica.service import ReplicaServicer
from daemons.replica.state_machine import ReplicaStateMachine
from daemons.replica.storage import Storage
from proto import replica_pb2_grpc

log = logging.getLogger(__name__)

GRPC_WORKERS = 128
SERVICE_NAME = "tarefa.replica.Replica"


class ReplicaDaemon(Daemon):
    def __init__(self, cluster: Cluster, replica_id: str) -> None:
        super().__init__(replica_id, cluster)
        self.spec = cluster.replica(replica_id)
        self.raft_log = LevelCounter.attach("pysyncobj")
        self.storage: Storage | None = None
        self.node: ReplicaStateMachine | None = None
        self.proposer: Proposer | None = None
        self.server: grpc.Server | None = None
        self.health = health.HealthServicer()
        self.fatal: Exception | None = None

    @staticmethod
    def check(cluster: Cluster, replica_id: str) -> None:
        cluster.replica(replica_id)

    def _on_fatal(self, exc: Exception) -> None:
        self.fatal = exc
        self.request_stop()

    def start(self) -> None:
        raft = self.cluster.raft
        self.storage = Storage(self.spec.data_dir)
        log.info("%s: LevelDB %s at applied index %d, revision %d", self.daemon_id,
                 self.spec.data_dir, self.storage.applied_index(), self.storage.revision())
        self.node = ReplicaStateMachine(self.cluster, self.spec, self.storage, self._on_fatal)
        self.proposer = Proposer(self.node.apply_batch, raft.max_batch_commands,
                                 raft.max_inflight_batches, batch_timeout=2 * raft.apply_timeout)
        self.proposer.start()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=GRPC_WORKERS,
                                                             thread_name_prefix="grpc"))
        replica_pb2_grpc.add_ReplicaServicer_to_server(
            ReplicaServicer(self.daemon_id, self.node, self.storage, self.proposer,
                            raft.apply_timeout,
                            lambda: (self.raft_log.warnings, self.raft_log.criticals)),
            self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        address = self.spec.grpc_address
        if self.server.add_insecure_port(address) == 0:
            raise TarefaError(f"cannot bind gRPC {address}")
        self.server.start()
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        log.info("%s: serving gRPC on %s, Raft on %s", self.daemon_id, address,
                 self.spec.raft_address)

    def stop(self, grace: float) -> None:
        self.health.enter_graceful_shutdown()
        if self.server is not None:
            # Refuse new calls; in-flight applies get `grace` to commit.
            self.server.stop(grace).wait(grace + 1)
        if self.proposer is not None:
            self.proposer.stop()
        if self.node is not None:
            self.node.destroy_synchronous()
        if self.storage is not None:
            self.storage.close()
        if self.fatal is not None:
            raise TarefaError(f"stopped after a fatal error: {self.fatal}")
