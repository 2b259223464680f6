"""Start real Tarefa daemons for tests and benchmarks, and always clean up.

`ReplicaCluster` writes a temporary cluster file with free loopback ports,
starts each replica as its own process (Popen, by PID), waits for readiness
by polling Status with a deadline, and can kill -9, SIGSTOP/SIGCONT, restart
and stop members. Logs go to files in the work directory and are printed
when a test fails.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from typing import Any, Callable

import grpc
import yaml

from daemons.core.config import load_cluster
from daemons.core.provision import MOSQUITTO_ACL, MOSQUITTO_PASSWD, Provisioner
from daemons.core.security import CLI_CERT, load_tls, open_channel, read_secret_file
from proto import replica_pb2, replica_pb2_grpc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SECURE = {"auth": "token", "admin_token_file": "secrets/admin.token",
          "raft_password_file": "secrets/raft.password",
          "tls": {"ca_file": "secrets/tls/ca.crt", "cert_dir": "secrets/tls"}}


# Ports free_ports() already gave out in this process. A stack takes ports in
# several calls (broker and portals, then replicas); once the first call's
# sockets are closed the kernel may hand the same port out again, and the
# cluster file then names one port twice (seen in CI: replicas[0].grpc_port
# equal to broker.port). Never giving a port out twice rules that out.
_GIVEN_OUT: set[int] = set()


def _below_ephemeral() -> range:
    """Ports the kernel never picks for an outgoing connection's local end.

    A port bound to 0 comes from the ephemeral range, the same the kernel
    draws from for every outgoing connection (Raft peers, gRPC and MQTT
    clients): between the test taking a port and its daemon binding it, a
    connection could take it as its local port, and the daemon then refused
    to start, "Address already in use" (seen in CI: a robustness run's
    portal). Ports below that range are only ever taken by a bind."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as fh:
            low = int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default
    # From 10000: above the stack's own defaults (1883, 7001-7301), which a
    # running stack on this machine may hold.
    return range(min(10000, low - 1000), low)


_PICK = random.Random(os.getpid())


def free_ports(count: int) -> list[int]:
    """Distinct free TCP ports on 127.0.0.1 below the ephemeral range (bound
    briefly, then released), none of them given out before by this process."""
    candidates = _below_ephemeral()
    socks, ports = [], []
    try:
        for _ in range(count + 5000):
            if len(ports) == count:
                return ports
            port = _PICK.choice(candidates)
            if port in _GIVEN_OUT:
                continue
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            socks.append(s)  # held until the end, so one call never repeats a port
            ports.append(port)
            _GIVEN_OUT.add(port)
        raise RuntimeError(f"no {count} fresh free ports on 127.0.0.1")
    finally:
        for s in socks:
            s.close()


def cannot_run(reason: str) -> None:
    """A test that needs something this machine lacks: skipped on a developer's
    machine, but a FAILURE in CI (CI=true), where a skip would pass unseen."""
    import pytest

    if os.environ.get("CI"):
        pytest.fail(f"cannot run in CI: {reason}")
    pytest.skip(reason)


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll `condition` until it returns something truthy; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - keep polling, report the last one
            last_exc = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}"
                       + (f" (last error: {last_exc!r})" if last_exc else ""))


def new_request_id() -> str:
    return uuid.uuid4().hex


class DaemonProcess:
    """One process started by a test: by PID, log to a file, always stoppable."""

    def __init__(self, workdir: str, name: str) -> None:
        self.id = name
        self.log_path = os.path.join(workdir, f"{name}.log")
        self.proc: subprocess.Popen | None = None
        # Prepended to argv() at start, e.g. ["ip", "netns", "exec", NS] (which
        # execs, so the PID is still the daemon's): tests/fault/netns.py.
        self.prefix: list[str] = []

    def argv(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.prefix + self.argv(), cwd=ROOT, stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.alive:
            self.proc.kill()  # type: ignore[union-attr]
            self.proc.wait(10)  # type: ignore[union-attr]

    def terminate(self, timeout: float = 15) -> int:
        if not self.alive:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGCONT)  # a stopped process cannot handle SIGTERM
        self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise

    def logs(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as fh:
                return fh.read()
        except OSError:
            return ""


class ReplicaProcess(DaemonProcess):
    def __init__(self, cluster: "ReplicaCluster", spec: dict) -> None:
        super().__init__(cluster.workdir, spec["id"])
        self.cluster = cluster
        self.spec = spec
        self.grpc_address = f"{spec['host']}:{spec['grpc_port']}"
        # Replicas want mutual TLS when secured: tests present the CLI's pair.
        self.channel = open_channel(self.grpc_address, cluster.tls, present_certificate=True)
        self.stub = replica_pb2_grpc.ReplicaStub(self.channel)

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "daemons.replica", "--config", self.cluster.config_path,
                "--id", self.id]

    def status(self, timeout: float = 1.0) -> replica_pb2.StatusResponse:
        return self.stub.Status(replica_pb2.StatusRequest(), timeout=timeout)


def preload(cluster: ReplicaCluster, keys: int) -> None:
    """The same `keys` small filler records (keys `t/99/bulk-N`, in no client's
    key range) in every member's LevelDB, written before the members start:
    much faster than through Raft, and the members stay identical."""
    from daemons.replica.storage import Storage

    for member in cluster.members:
        store = Storage(cluster.data_dir(member), verify=False)
        try:
            for start in range(0, keys, 100_000):
                view = store.view()
                for i in range(start, min(keys, start + 100_000)):
                    view.put(b"t/99/bulk-%07d" % i, b"%d" % i)
                store.commit(view)
        finally:
            store.close()


class ReplicaCluster:
    """Three (or more) real replica processes on loopback.

    `hosts` (one address per replica, default 127.0.0.1) and `prefixes` (one
    argv prefix per replica) let tests/fault/netns.py run each replica in its
    own network namespace.
    """

    def __init__(self, workdir: str, size: int = 3, raft: dict | None = None,
                 extra: dict | None = None, secure: bool = False,
                 hosts: list[str] | None = None,
                 prefixes: list[list[str]] | None = None) -> None:
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        ports = free_ports(2 * size)
        self.extra = extra or {}
        self.specs = [
            {"id": f"replica-{i + 1}", "host": hosts[i] if hosts else "127.0.0.1",
             "raft_port": ports[2 * i],
             "grpc_port": ports[2 * i + 1], "data_dir": f"data/replica-{i + 1}"}
            for i in range(size)
        ]
        # Tests of other features run in the explicit unauthenticated mode;
        # tests/integration/test_security.py runs the secured stack.
        doc: dict[str, Any] = {"cluster": {"name": "test"}, "log_level": "info",
                               "security": {"auth": "cid-only"},
                               "raft": dict(raft or {}), "replicas": self.specs}
        doc.update(self.extra)
        if secure:
            # Everything the shipped cluster file turns on, with tarefa-secrets'
            # material under <workdir>/secrets.
            doc["security"] = SECURE
            doc.setdefault("broker", {})["password_dir"] = "secrets/mqtt"
        self.config_path = os.path.join(workdir, "cluster.yaml")
        with open(self.config_path, "w", encoding="utf-8") as fh:
            yaml.safe_dump(doc, fh, sort_keys=False)
        self.config = load_cluster(self.config_path)
        self.tls = None
        self.admin_token: str | None = None
        if secure:
            Provisioner(self.config).run()
            self.tls = load_tls(self.config.security.tls, CLI_CERT)
            self.admin_token = read_secret_file(self.config.security.admin_token_file or "",
                                                "admin token")
        self.members = [ReplicaProcess(self, spec) for spec in self.specs]
        for member, prefix in zip(self.members, prefixes or []):
            member.prefix = list(prefix)

    def data_dir(self, member: ReplicaProcess) -> str:
        return os.path.join(self.workdir, member.spec["data_dir"])

    def start(self, timeout: float = 20) -> None:
        for member in self.members:
            member.start()
        self.wait_leader(timeout)

    def member(self, replica_id: str) -> ReplicaProcess:
        return next(m for m in self.members if m.id == replica_id)

    def wait_ready(self, member: ReplicaProcess, timeout: float = 20) -> None:
        wait_for(lambda: member.status().id == member.id, timeout, f"{member.id} to serve")

    def wait_leader(self, timeout: float = 20) -> ReplicaProcess:
        """Wait until the live members agree on one leader that has a quorum."""
        def agreed() -> ReplicaProcess | None:
            leaders = set()
            for m in self.members:
                if not m.alive:
                    continue
                st = m.status(timeout=0.5)
                leaders.add(st.leader)
                if st.role == "leader" and not st.has_quorum:
                    return None
            if len(leaders) == 1 and "" not in leaders:
                leader = self.member(leaders.pop())
                return leader if leader.alive else None
            return None
        return wait_for(agreed, timeout, "an agreed Raft leader")

    def followers(self) -> list[ReplicaProcess]:
        leader = self.wait_leader()
        return [m for m in self.members if m is not leader and m.alive]

    def wait_converged(self, timeout: float = 30) -> int:
        """Wait until every live member applied the same index, at least the
        leader's commit index after a linearizable read; return it.

        The read matters after a restart: PySyncObj restores each member's
        commit index from journal.meta (saved about once a second), so until the
        new leader commits an entry of its own term every member can report the
        same stale commit and applied index while some hold more entries than
        others. The read commits a barrier in the leader's term.
        """
        deadline = time.monotonic() + timeout

        def barrier() -> int | None:
            leader = self.wait_leader(max(0.1, deadline - time.monotonic()))
            try:
                leader.stub.Get(replica_pb2.GetRequest(
                    kind=replica_pb2.CLIENT, cid="1",
                    consistency=replica_pb2.LINEARIZABLE), timeout=2)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    return None  # no quorum yet, or a leader change: again
            return leader.status().commit_index

        target = wait_for(barrier, timeout, "a linearizable read on the leader", interval=0.1)

        def same() -> int | None:
            applied = {m.status().applied_index for m in self.members if m.alive}
            commits = {m.status().commit_index for m in self.members if m.alive}
            if len(applied) == 1 and applied == commits and min(applied) >= target:
                return applied.pop() or None
            return None
        return wait_for(same, max(0.1, deadline - time.monotonic()), "replicas to converge",
                        interval=0.1)

    def stop_and_digest(self) -> dict[str, str]:
        """Wait until the members converge, stop them (exit 0 required), digest each LevelDB."""
        from daemons.replica.storage import Storage

        self.wait_converged(timeout=60)
        for member in self.members:
            code = member.terminate()
            assert code == 0, f"{member.id} exited {code}:\n{member.logs()[-3000:]}"
        digests = {}
        for member in self.members:
            storage = Storage(self.data_dir(member))
            digests[member.id] = storage.digest()
            storage.close()
        return digests

    def stop(self) -> None:
        for member in self.members:
            try:
                member.terminate()
            except Exception:  # noqa: BLE001 - keep stopping the others
                pass
            member.channel.close()

    def dump_logs(self) -> str:
        return "\n".join(f"===== {m.id} ({m.log_path}) =====\n{m.logs()[-20000:]}"
                         for m in self.members)


RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def apply_with_retry(cluster: ReplicaCluster, command: replica_pb2.Command,
                     deadline: float, call_timeout: float = 2.0,
                     start: int = 0) -> replica_pb2.ApplyResponse:
    """Send `command` to live members in turn, retrying with the SAME request id.

    Returns the first answer; raises the last RpcError once `deadline` (a
    time.monotonic() value) passes, or at once for a non-retryable status.
    """
    attempt = start
    last: grpc.RpcError | None = None
    while time.monotonic() < deadline:
        live = [m for m in cluster.members if m.alive]
        member = live[attempt % len(live)] if live else None
        attempt += 1
        if member is None:
            time.sleep(0.05)
            continue
        try:
            return member.stub.Apply(command, timeout=call_timeout)
        except grpc.RpcError as exc:
            if exc.code() not in RETRYABLE:
                raise
            last = exc
            time.sleep(0.02)
    if last is not None:
        raise last
    raise TimeoutError("no live replica before the deadline")


def scan_all(member: ReplicaProcess, kind: int, cid: str = "",
             consistency: int = replica_pb2.LINEARIZABLE, timeout: float = 5.0) -> list[str]:
    """Every record of a listing, following page tokens."""
    records: list[str] = []
    token = ""
    for _ in range(100_000):
        page = member.stub.Scan(replica_pb2.ScanRequest(
            kind=kind, cid=cid, page_token=token, limit=1000, consistency=consistency),
            timeout=timeout)
        records.extend(page.records)
        token = page.next
        if not token:
            return records
    raise AssertionError("scan did not terminate")


class WriterPool:
    """`writers` threads each applying its own list of commands with retries.

    Records every acknowledged command with its answer and every refusal, so
    a test can check that nothing acknowledged was lost and nothing was
    applied twice.
    """

    def __init__(self, cluster: ReplicaCluster, commands: list[list[replica_pb2.Command]],
                 deadline_seconds: float = 120.0) -> None:
        import threading

        self.cluster = cluster
        self.commands = commands
        self.deadline = time.monotonic() + deadline_seconds
        self.acked: dict[str, replica_pb2.ApplyResponse] = {}
        self.refused: dict[str, grpc.RpcError] = {}
        self.failed: dict[str, Exception] = {}
        self.ack_times: list[float] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i, cmds), daemon=True)
                         for i, cmds in enumerate(commands)]

    def _run(self, index: int, commands: list[replica_pb2.Command]) -> None:
        for n, command in enumerate(commands):
            try:
                answer = apply_with_retry(self.cluster, command, self.deadline,
                                          start=index + n)
            except grpc.RpcError as exc:
                with self._lock:
                    if exc.code() in RETRYABLE:
                        self.failed[command.request_id] = exc
                    else:
                        self.refused[command.request_id] = exc
                continue
            except Exception as exc:  # noqa: BLE001 - recorded, checked by the test
                with self._lock:
                    self.failed[command.request_id] = exc
                continue
            with self._lock:
                self.acked[command.request_id] = answer
                self.ack_times.append(time.monotonic())

    def start(self) -> "WriterPool":
        for thread in self._threads:
            thread.start()
        return self

    def join(self) -> None:
        for thread in self._threads:
            thread.join(max(0.0, self.deadline - time.monotonic()) + 5)
        assert not any(t.is_alive() for t in self._threads), "writers did not finish"

    @property
    def done_count(self) -> int:
        with self._lock:
            return len(self.acked) + len(self.refused) + len(self.failed)


def mosquitto_binary() -> str:
    import shutil

    for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if candidate and os.path.exists(candidate):
            return candidate
    raise RuntimeError("mosquitto not installed: run ./install.sh")


class MosquittoProcess(DaemonProcess):
    """A real Mosquitto broker on a free loopback port."""

    def __init__(self, workdir: str, port: int, auth_dir: str | None = None,
                 persistence: bool = False) -> None:
        super().__init__(workdir, "broker")
        self.port = port
        self.conf_path = os.path.join(workdir, "mosquitto.conf")
        # auth_dir: tarefa-secrets' MQTT directory -> logins and ACLs, no anonymous access.
        access = "allow_anonymous true\n" if auth_dir is None else (
            f"allow_anonymous false\npassword_file {os.path.join(auth_dir, MOSQUITTO_PASSWD)}\n"
            f"acl_file {os.path.join(auth_dir, MOSQUITTO_ACL)}\n")
        # persistence: sessions and queued messages survive a restart by SIGTERM
        # (saved on exit), as with config/mosquitto.conf.
        store = "persistence false\n"
        if persistence:
            data_dir = os.path.join(workdir, "broker-data")
            os.makedirs(data_dir, exist_ok=True)
            store = f"persistence true\npersistence_location {data_dir}/\n"
        with open(self.conf_path, "w", encoding="utf-8") as fh:
            # max_queued_messages as in config/mosquitto.conf (why: there).
            fh.write(f"listener {port} 127.0.0.1\n{access}{store}"
                     "max_queued_messages 1000000\nlog_dest stdout\nuser root\n")

    def argv(self) -> list[str]:
        return [mosquitto_binary(), "-c", self.conf_path]

    def wait_ready(self, timeout: float = 10) -> None:
        def accepting() -> bool:
            with socket.socket() as s:
                s.settimeout(0.2)
                return s.connect_ex(("127.0.0.1", self.port)) == 0
        wait_for(accepting, timeout, f"mosquitto on port {self.port}")


class PortalProcess(DaemonProcess):
    def __init__(self, stack: "Stack", spec: dict) -> None:
        super().__init__(stack.workdir, spec["id"])
        self.stack = stack
        self.spec = spec
        self.address = f"127.0.0.1:{spec['port']}"
        self.channel = open_channel(self.address, stack.tls)
        from proto import portal_pb2_grpc

        self.admin = portal_pb2_grpc.AdminPortalStub(self.channel)
        self.client = portal_pb2_grpc.ClientPortalStub(self.channel)
        self.status_stub = portal_pb2_grpc.PortalStatusStub(self.channel)

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "daemons.portal", "--config", self.stack.config_path,
                "--id", self.id]

    def status(self, timeout: float = 1.0):  # type: ignore[no-untyped-def]
        from proto import portal_pb2

        return self.status_stub.Status(portal_pb2.PortalStatusRequest(), timeout=timeout)

    def wait_ready(self, timeout: float = 20) -> None:
        wait_for(lambda: self.status().broker_connected, timeout,
                 f"{self.id} to serve and reach the broker")


class Stack(ReplicaCluster):
    """Broker + three replicas + an admin portal + two client portals."""

    def __init__(self, workdir: str, raft: dict | None = None, cache_ttl: float = 30.0,
                 secure: bool = False, extra: dict | None = None,
                 hosts: list[str] | None = None,
                 prefixes: list[list[str]] | None = None) -> None:
        broker_port, admin, client1, client2 = free_ports(4)
        portals = [
            {"id": "portal-admin", "host": "127.0.0.1", "port": admin, "services": ["admin"]},
            {"id": "portal-client-1", "host": "127.0.0.1", "port": client1,
             "services": ["client"], "cache_ttl": cache_ttl},
            {"id": "portal-client-2", "host": "127.0.0.1", "port": client2,
             "services": ["client"], "cache_ttl": cache_ttl},
        ]
        super().__init__(workdir, raft=raft, secure=secure, extra={
            "broker": {"host": "127.0.0.1", "port": broker_port}, "portals": portals,
            **(extra or {})}, hosts=hosts, prefixes=prefixes)
        self.broker = MosquittoProcess(workdir, broker_port,
                                       self.config.broker.password_dir if secure else None)
        self.portals = [PortalProcess(self, spec) for spec in portals]

    def portal(self, portal_id: str) -> PortalProcess:
        return next(p for p in self.portals if p.id == portal_id)

    def start(self, timeout: float = 30) -> None:
        self.broker.start()
        self.broker.wait_ready()
        super().start(timeout)
        for portal in self.portals:
            portal.start()
        for portal in self.portals:
            portal.wait_ready(timeout)

    def stop(self) -> None:
        for portal in self.portals:
            try:
                portal.terminate()
            except Exception:  # noqa: BLE001 - keep stopping the others
                pass
            portal.channel.close()
        super().stop()
        try:
            self.broker.terminate()
        except Exception:  # noqa: BLE001
            pass

    def dump_logs(self) -> str:
        extra = [self.broker, *self.portals]
        return super().dump_logs() + "\n" + "\n".join(
            f"===== {p.id} ({p.log_path}) =====\n{p.logs()[-20000:]}" for p in extra)


class ListenerProcess(DaemonProcess):
    """`tarefa-listener` as a real process; with follow=True its stdout goes to its own file."""

    def __init__(self, workdir: str, config_path: str, port: int, follow: bool = False,
                 name: str = "listener", tls: Any = None) -> None:
        super().__init__(workdir, name)
        self.config_path = config_path
        self.follow = follow
        self.stdout_path = os.path.join(workdir, f"{name}.stdout")
        self.address = f"127.0.0.1:{port}"
        self.channel = open_channel(self.address, tls)
        from grpc_health.v1 import health_pb2_grpc

        from proto import listener_pb2_grpc

        self.status_stub = listener_pb2_grpc.ListenerStatusStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "daemons.listener", "--config", self.config_path,
                *(["--follow"] if self.follow else [])]

    def start(self) -> None:
        if not self.follow:
            super().start()
            return
        log = open(self.log_path, "ab")
        out = open(self.stdout_path, "ab")
        self.proc = subprocess.Popen(self.argv(), cwd=ROOT, stdout=out, stderr=log,
                                     stdin=subprocess.DEVNULL)
        log.close()
        out.close()

    def stdout(self) -> str:
        try:
            with open(self.stdout_path, encoding="utf-8", errors="replace") as fh:
                return fh.read()
        except OSError:
            return ""

    def status(self, timeout: float = 1.0):  # type: ignore[no-untyped-def]
        from proto import listener_pb2

        return self.status_stub.Status(listener_pb2.ListenerStatusRequest(), timeout=timeout)

    def health(self, service: str = "", timeout: float = 1.0) -> int:
        from grpc_health.v1 import health_pb2

        return self.health_stub.Check(health_pb2.HealthCheckRequest(service=service),
                                      timeout=timeout).status

    def wait_ready(self, timeout: float = 20) -> None:
        wait_for(lambda: self.status().broker_connected, timeout,
                 f"{self.id} to serve and subscribe at the broker")

    def close(self) -> None:
        try:
            self.terminate()
        finally:
            self.channel.close()
