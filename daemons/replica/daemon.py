"""ReplicaDaemon: wires storage, the Raft member, the proposer and gRPC together."""

from __future__ import annotations

import asyncio
import logging
import os
import threading

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from daemons.core.claims import check_port_free, lock_file
from daemons.core.config import Cluster
from daemons.core.errors import StorageCorrupt, TarefaError
from daemons.core.lifecycle import Daemon, new_event_loop
from daemons.core.log import LevelCounter
from daemons.core.rpc import add_service
from daemons.core.security import add_port, load_tls, server_options
from daemons.replica import journal_file
from daemons.replica.proposer import Proposer
from daemons.replica.service import ReplicaServicer
from daemons.replica.state_machine import (RESYNC, ReplicaStateMachine, raft_password,
                                            snapshot_file)
from daemons.replica.storage import Storage
from proto import replica_pb2

log = logging.getLogger(__name__)

SERVICE_NAME = "tarefa.replica.Replica"
LOCK_FILE = "replica.lock"


def repair_journal(cluster: Cluster, replica_id: str) -> int:
    """--repair-journal: cut a journal torn by a power cut back to its whole records.

    Offline: holds the data dir's lock, so it refuses while the replica runs.
    See journal_file.py for what is whole and why the cut is safe.
    """
    spec = cluster.replica(replica_id)
    journal = os.path.join(spec.data_dir, "raft", "journal")
    if not os.path.exists(journal):
        print(f"{replica_id}: no Raft journal at {journal}: nothing to repair")
        return 0
    fd = lock_file(os.path.join(spec.data_dir, LOCK_FILE),
                   f"{replica_id} is running on data_dir {spec.data_dir}: stop it first")
    try:
        try:
            found = journal_file.scan(journal)
            _refuse_to_cut_applied_entries(spec.data_dir, journal, found)
            found, copy = journal_file.repair(journal, found)
        except ValueError as exc:
            raise StorageCorrupt(f"{journal}: {exc}: not a torn end, no repair; {RESYNC}") \
                from None
        except OSError as exc:
            raise TarefaError(f"{journal}: cannot repair the Raft journal: {exc}") from None
    finally:
        os.close(fd)
    kept = (f"{found.records} whole records (index {found.first}..{found.last}, "
            f"term {found.last_term})" if found.records else "no record")
    if copy is None:
        print(f"{replica_id}: {journal}: whole, {kept}: nothing to repair")
        return 0
    print(f"{replica_id}: {journal}: {found.problem}")
    counted = max(found.end - found.whole_end, 0)
    print(f"{replica_id}: kept {kept}; cut the {counted} bytes after them that the header "
          "counted as records")
    print(f"{replica_id}: the original is kept as {copy}; start the replica: it takes "
          "what it lacks from its peers")
    if not cluster.raft.fsync:
        print(f"{replica_id}: warning: raft.fsync is false, so entries this member had "
              "acknowledged may be among those cut: they survive only where another member "
              "still holds them")
    return 0


def _refuse_to_cut_applied_entries(data_dir: str, journal: str,
                                   found: journal_file.JournalScan) -> None:
    """Refuse a cut that would leave this member's log short of what its LevelDB applied.

    Entries are applied after they are in the journal and, with raft.fsync,
    synced there, so a power cut then cannot tear an applied record; one that
    is torn means damage of another kind (or, without raft.fsync, a power cut
    that wrote LevelDB's pages back and not the journal's). Cut anyway, the
    member would hold effects of entries its log lacks: it could reuse their
    indexes for other entries, or win an election without them (with other
    members cut too), and the members would then disagree without a word.
    """
    if found.whole or found.header_problem is not None:
        return  # nothing to cut, or no cut (refused by repair)
    held = found.last or 0
    snapshot = snapshot_file(data_dir)
    if os.path.exists(snapshot):
        try:
            held = max(held, Storage.read_header(snapshot)[0][1])
        except Exception:  # noqa: BLE001 - a damaged snapshot: then the LevelDB check decides
            pass
    storage = Storage(data_dir, verify=False)
    try:
        applied = storage.applied_index()
    finally:
        storage.close()
    if applied > held:
        raise StorageCorrupt(
            f"{journal}: not repaired: LevelDB at {data_dir} has applied Raft entries up to "
            f"index {applied}, but the journal's whole records (and the snapshot) end at "
            f"{held}: a cut would leave this member with effects of entries its log lacks, "
            f"and it could then disagree with its peers; {RESYNC}")


class ReplicaDaemon(Daemon):
    def __init__(self, cluster: Cluster, replica_id: str) -> None:
        super().__init__(replica_id, cluster)
        self.spec = cluster.replica(replica_id)
        # Replicas take calls only from holders of a certificate of the
        # cluster CA (portals, the operator's CLI): mutual TLS.
        self.tls = load_tls(cluster.security.tls, replica_id)
        # Read before anything opens or binds: a missing, empty or too-readable
        # file exits 2 naming it (never its content).
        self.raft_password = raft_password(cluster)
        self.raft_log = LevelCounter.attach("pysyncobj")
        self.storage: Storage | None = None
        self.node: ReplicaStateMachine | None = None
        self.proposer: Proposer | None = None
        self.server: grpc.aio.Server | None = None
        self.health: health.aio.HealthServicer | None = None
        # gRPC runs on an asyncio loop in its own thread (cheaper per call than
        # a thread pool, and the proposer batches on it); run() keeps the main
        # thread for signals.
        self.loop = new_event_loop()
        self._loop_thread = threading.Thread(target=self.loop.run_forever, name="grpc-loop",
                                             daemon=True)
        self.fatal: Exception | None = None
        self._lock_fd: int | None = None

    @staticmethod
    def check(cluster: Cluster, replica_id: str) -> None:
        """--check-config: the spec and every secret this replica would read."""
        cluster.replica(replica_id)
        load_tls(cluster.security.tls, replica_id)
        raft_password(cluster)

    def _on_fatal(self, exc: Exception) -> None:
        if self.fatal is None:
            self.fatal = exc
        self.request_stop()

    def _on_corrupt(self, exc: StorageCorrupt) -> None:
        """LevelDB found damaged after start (a read, an apply): stop, never serve it."""
        log.critical("%s: %s", self.daemon_id, exc)
        self._on_fatal(exc)

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            # Refused at start (StorageCorrupt names the damaged file): release
            # what was opened; daemon_main logs the CRITICAL line and exits 1.
            try:
                if self.node is not None:
                    self.node.destroy_synchronous()
                if self.storage is not None:
                    self.storage.close()
            except Exception:  # noqa: BLE001 - the original error is what matters
                log.exception("%s: cleanup after a failed start", self.daemon_id)
            self.node = self.storage = None
            self._release_data_dir()
            raise

    def _claim_data_dir(self) -> None:
        """Create the data dir and hold its lock for the process's life: a second
        replica on it stops here, before LevelDB or the journal are touched."""
        data_dir = self.spec.data_dir
        try:
            os.makedirs(data_dir, exist_ok=True)
        except OSError as exc:
            raise TarefaError(f"data_dir {data_dir}: cannot create it: {exc.strerror}") from None
        self._lock_fd = lock_file(os.path.join(data_dir, LOCK_FILE),
                                  f"data_dir {data_dir} is in use by another replica")

    def _release_data_dir(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _start(self) -> None:
        raft = self.cluster.raft
        self._claim_data_dir()
        # PySyncObj binds its port in the background and retries forever: a port
        # held by another process would leave this member silently cut off.
        check_port_free(self.spec.host, self.spec.raft_port, "Raft")
        # The gRPC port too, before seconds of opening LevelDB (add_port checks again).
        check_port_free(self.spec.host, self.spec.grpc_port, "gRPC")
        # Opening reads every LevelDB block with checksums on (StorageCorrupt if damaged).
        self.storage = Storage(self.spec.data_dir, on_corrupt=self._on_corrupt)
        log.info("%s: LevelDB %s at applied index %d, revision %d", self.daemon_id,
                 self.spec.data_dir, self.storage.applied_index(), self.storage.revision())
        self.node = ReplicaStateMachine(self.cluster, self.spec, self.storage, self._on_fatal,
                                        self.raft_password)
        self.proposer = Proposer(self.loop, self.node.propose, raft.max_batch_commands,
                                 raft.max_inflight_batches, batch_timeout=2 * raft.apply_timeout)
        self._loop_thread.start()
        self._on_loop(self._serve()).result(timeout=30)
        address = self.spec.grpc_address
        log.info("%s: serving gRPC on %s, Raft on %s", self.daemon_id, address,
                 self.spec.raft_address)

    def _on_loop(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    async def _serve(self) -> None:
        assert self.node is not None and self.storage is not None and self.proposer is not None
        self.server = grpc.aio.server(options=server_options(self.cluster.limits))
        # add_service, not the generated add_*: a request that does not parse
        # gets INVALID_ARGUMENT, not UNKNOWN and a traceback (see rpc.py).
        add_service(
            self.server, replica_pb2, "Replica",
            ReplicaServicer(self.daemon_id, self.node, self.storage, self.proposer,
                            self.cluster.raft.apply_timeout,
                            lambda: (self.raft_log.warnings, self.raft_log.criticals),
                            page_bytes=self.cluster.limits.max_message_bytes // 2))
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        add_port(self.server, self.spec.grpc_address, self.tls, require_client_auth=True)
        await self.server.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)

    async def _shutdown(self, grace: float) -> None:
        if self.health is not None:
            await self.health.enter_graceful_shutdown()
        if self.server is not None:
            # Refuse new calls; in-flight applies get `grace` to commit.
            await self.server.stop(grace)
        if self.proposer is not None:
            self.proposer.stop()

    def stop(self, grace: float) -> None:
        if self._loop_thread.is_alive():
            try:
                self._on_loop(self._shutdown(grace)).result(timeout=grace + 5)
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
                self._loop_thread.join(5)
        if self.node is not None:
            self.node.destroy_synchronous()
        if self.storage is not None:
            self.storage.close()
        self._release_data_dir()
        if self.fatal is not None:
            raise TarefaError(f"stopped after a fatal error: {self.fatal}")
