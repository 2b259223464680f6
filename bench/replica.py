"""Benchmark the replica tier against a trivial gRPC echo server on the same machine.

    .venv/bin/python bench/replica.py [--repeat 3] [--duration 5] [--warmup 1]
                                      [--raft KEY=VALUE ...] [--raft-password]
                                      [--json FILE] [--keep]

What it does, in order (a full default run takes about two minutes):

1. Starts a 3-replica ReplicaCluster (tests/harness.py) in a temp dir with the
   default Raft settings (`raft: {}`; `--raft KEY=VALUE` overrides one key, the
   value parsed as YAML; `--raft-password` encrypts Raft traffic with a random
   password in <workdir>/raft.password), and bench/echo_server.py twice as
   separate processes: the sync grpc.server on ThreadPoolExecutor(128) ("echo")
   and the grpc.aio-on-uvloop server ("echo-aio", the replica daemon's shape,
   10-20 % faster here).
2. Measures, `--repeat` times, interleaved so drift hits every figure alike:
     echo(1), echo-aio(1),             /bench.Echo/Echo, 16 bytes each way
     echo(64), echo-aio(64)
     apply-leader(1), apply-leader(64) Replica.Apply CREATE_TASK to the leader
     apply-follower(1)                 Replica.Apply CREATE_TASK to a follower
   Each run: N client threads (N = in-flight count), each making blocking calls
   in a loop; `--warmup` seconds first, then `--duration` seconds measured.
   A call counts when it completes inside the measured window; ops/s = such
   successful calls / duration; p50/p99 are nearest-rank over their latencies.
   The report gives the median over the repeats of each figure.
3. Failover: 8 writer threads send Apply to live members (writer i starts on
   member i % 3, moves to the next live member on any error and retries with
   the SAME request id). After a steady phase, the leader is SIGKILLed by PID
   (harness ReplicaProcess.kill). Reported: seconds from the kill until the
   first acknowledged write that was *sent after the kill* (so a new leader
   must have committed it), and until the surviving members agree on a new
   leader that has a quorum (same rule as ReplicaCluster.wait_leader, polled
   every 20 ms). The killed member is then restarted and must catch up. All
   acknowledged writes are then checked to exist (one Scan of the test client).
4. Stops everything (try/finally; echo server killed by PID), counts WARNING /
   CRITICAL lines in <workdir>/replica-N.log, prints the report, and with
   `--json FILE` writes every figure as JSON.

Client design (one implementation for both targets, `run_load`): each
measurement opens ONE fresh grpc.insecure_channel to its target, shared by all
N threads (HTTP/2 multiplexes the calls on one connection). One channel per
4 or per 16 threads (separate connections, forced by distinct channel args)
was measured against echo(64) on the 2-core development machine: no
difference beyond run-to-run noise (about 3.0k-4.4k calls/s for every
variant), so the simplest setup was kept. The client is itself a Python
process sharing the machine's cores with the servers; its CPU use and the
target's are reported next to each figure so a CPU-bound result is visible.

Targets (printed as PASS/FAIL): Apply(64) ops/s >= 0.65 x the faster of
echo(64) and echo-aio(64) (both ratios are printed),
Apply(1) p50 <= 2 ms, failover (kill -> first write acknowledged by the new
leader) <= 3 s. Exit status: 0 all targets met, 1 a target missed, 2 the run
was aborted (time budget, see --budget); other failures raise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from typing import Any, Callable, Iterable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import grpc  # noqa: E402
import yaml  # noqa: E402

from daemons.core.config import RaftSettings  # noqa: E402
from proto import replica_pb2, replica_pb2_grpc  # noqa: E402
from tests.harness import DaemonProcess, ReplicaCluster, ReplicaProcess  # noqa: E402

ECHO_METHOD = "/bench.Echo/Echo"
ECHO_PAYLOAD = b"0123456789abcdef"
TARGET_RATIO = 0.65
TARGET_APPLY1_P50_MS = 2.0
TARGET_FAILOVER_S = 3.0
CLK_TCK = os.sysconf("SC_CLK_TCK")

Call = Callable[[int], Any]


# ---- small helpers -----------------------------------------------------------


def nproc() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (nan when empty)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads); nan if gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return math.nan


def self_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def median(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def json_safe(value: Any) -> Any:
    """NaN/inf become null so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def vs_faster_echo(ratios: Iterable[float]) -> float:
    """The ratio to the faster echo (the smallest of the ratios to each echo): the
    stricter reading of a "x echo" target. NaN ratios (no echo figure) are left out."""
    return min((x for x in ratios if not math.isnan(x)), default=math.nan)


def parse_raft_overrides(items: list[str]) -> dict[str, Any]:
    known = {f.name for f in dataclasses.fields(RaftSettings)}
    raft: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in known:
            raise SystemExit(f"--raft {item!r}: expected KEY=VALUE with KEY one of "
                             f"{', '.join(sorted(known))}")
        raft[key] = yaml.safe_load(value)
    return raft


# ---- the echo server process ---------------------------------------------------


class EchoServer:
    """bench/echo_server.py as a child process, killed by PID.

    `asyncio`: the grpc.aio-on-uvloop shape of the daemons instead of the sync server.
    """

    def __init__(self, asyncio: bool = False) -> None:
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.asyncio = asyncio

    def start(self, timeout: float = 15.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "bench", "echo_server.py"), "--port", "0",
             *(["--asyncio"] if self.asyncio else [])],
            cwd=ROOT, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line.startswith("PORT "):
            raise RuntimeError(f"echo server did not report its port within {timeout}s "
                               f"(got {line!r}, exit code {self.proc.poll()})")
        self.port = int(line.split()[1])
        channel = grpc.insecure_channel(self.address)
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout)
            channel.unary_unary(ECHO_METHOD)(b"ping", timeout=timeout)
        finally:
            channel.close()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(3)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


# ---- the one load generator --------------------------------------------------------


@dataclasses.dataclass
class RunResult:
    name: str
    inflight: int
    ops_per_s: float
    p50_ms: float
    p99_ms: float
    calls: int
    errors: int
    error_codes: dict[str, int]
    client_cpu: float   # cores used by this (client) process during the window
    server_cpu: float   # cores used by the target process
    cluster_cpu: float  # cores used by all replica processes (nan for echo)
    max_ms: float = math.nan  # the slowest successful call in the window


def run_load(name: str, target: str, inflight: int, make_call: Callable[[grpc.Channel, int], Call],
             warmup: float, duration: float, server_pid: int,
             cluster_pids: list[int] | None = None,
             on_window: Callable[[str], None] | None = None) -> RunResult:
    """N threads of blocking calls over one shared channel; latencies in the window only.

    `make_call(channel, thread_index)` returns `call(seq)`, one blocking RPC that
    raises grpc.RpcError on failure. Identical for every target.
    `on_window`, if given, is called with "begin" right before the CPU counters
    are sampled at the start of the measured window and with "end" right after
    they are sampled at its end (e.g. to read a server's own counters), so the
    CPU figures are not affected by what it does.
    """
    channel = grpc.insecure_channel(target)
    grpc.channel_ready_future(channel).result(timeout=10)
    calls = [make_call(channel, i) for i in range(inflight)]
    latencies: list[list[float]] = [[] for _ in range(inflight)]
    errors: list[Counter] = [Counter() for _ in range(inflight)]
    start_gate = threading.Barrier(inflight + 1)
    window: dict[str, float] = {}

    def worker(i: int) -> None:
        call, lat, err = calls[i], latencies[i], errors[i]
        perf = time.perf_counter
        start_gate.wait()
        begin, end = window["begin"], window["end"]
        seq = 0
        while True:
            t0 = perf()
            if t0 >= end:
                return
            try:
                call(seq)
            except grpc.RpcError as exc:
                t1 = perf()
                if begin <= t1 <= end:
                    err[exc.code().name if exc.code() else "UNKNOWN"] += 1
                time.sleep(0.01)  # do not spin on a failing target
            else:
                t1 = perf()
                if begin <= t1 <= end:
                    lat.append(t1 - t0)
            seq += 1

    threads = [threading.Thread(target=worker, args=(i,), daemon=True, name=f"load-{i}")
               for i in range(inflight)]
    for t in threads:
        t.start()
    now = time.perf_counter()
    window["begin"] = now + warmup
    window["end"] = now + warmup + duration
    start_gate.wait()
    # Sample CPU over the measured window only.
    time.sleep(max(0.0, window["begin"] - time.perf_counter()))
    if on_window is not None:
        on_window("begin")
    c0, s0 = self_cpu_seconds(), proc_cpu_seconds(server_pid)
    k0 = sum(proc_cpu_seconds(p) for p in cluster_pids or [])
    w0 = time.perf_counter()
    time.sleep(max(0.0, window["end"] - time.perf_counter()))
    c1, s1 = self_cpu_seconds(), proc_cpu_seconds(server_pid)
    k1 = sum(proc_cpu_seconds(p) for p in cluster_pids or [])
    elapsed = time.perf_counter() - w0
    if on_window is not None:
        on_window("end")
    for t in threads:
        t.join(timeout=15)
    stuck = sum(t.is_alive() for t in threads)
    channel.close()

    lat = sorted(x for per in latencies for x in per)
    errs: Counter = Counter()
    for e in errors:
        errs.update(e)
    if stuck:
        errs["THREAD_STUCK"] += stuck
    return RunResult(
        name=name, inflight=inflight, ops_per_s=len(lat) / duration,
        p50_ms=percentile(lat, 0.50) * 1e3, p99_ms=percentile(lat, 0.99) * 1e3,
        calls=len(lat), errors=sum(errs.values()), error_codes=dict(errs),
        client_cpu=(c1 - c0) / elapsed, server_cpu=(s1 - s0) / elapsed,
        cluster_cpu=(k1 - k0) / elapsed if cluster_pids else math.nan,
        max_ms=lat[-1] * 1e3 if lat else math.nan)


def echo_call(timeout: float) -> Callable[[grpc.Channel, int], Call]:
    def make(channel: grpc.Channel, i: int) -> Call:
        rpc = channel.unary_unary(ECHO_METHOD)  # no (de)serializers: bytes in/out
        return lambda seq: rpc(ECHO_PAYLOAD, timeout=timeout)
    return make


def apply_call(cid: str, tag: str, timeout: float) -> Callable[[grpc.Channel, int], Call]:
    """CREATE_TASK with a unique request id and title per call (`tag` is unique per run)."""
    def make(channel: grpc.Channel, i: int) -> Call:
        apply = replica_pb2_grpc.ReplicaStub(channel).Apply
        prefix = f"{tag}-{i}-"

        def call(seq: int) -> Any:
            key = prefix + str(seq)
            return apply(replica_pb2.Command(request_id=key, op=replica_pb2.CREATE_TASK,
                                             cid=cid, title=key), timeout=timeout)
        return call
    return make


# ---- failover ------------------------------------------------------------------------


def create_client(stub: replica_pb2_grpc.ReplicaStub, cid: str) -> None:
    stub.Apply(replica_pb2.Command(request_id=uuid.uuid4().hex, op=replica_pb2.CREATE_CLIENT,
                                   cid=cid, data='{"bench": true}'), timeout=10)


def count_tasks(stub: replica_pb2_grpc.ReplicaStub, cid: str, prefix: str) -> int:
    total, token = 0, ""
    for _ in range(10_000):
        page = stub.Scan(replica_pb2.ScanRequest(kind=replica_pb2.TASK, cid=cid, page_token=token,
                                                 limit=1000), timeout=10)
        total += sum(1 for r in page.records if json.loads(r)["title"].startswith(prefix))
        token = page.next
        if not token:
            break
    return total


def agreed_leader(members: list[ReplicaProcess], dead: set[str]) -> str | None:
    """Same rule as ReplicaCluster.wait_leader, over the members not killed."""
    leaders = set()
    for m in members:
        if m.id in dead:
            continue
        st = m.status(timeout=0.3)
        leaders.add(st.leader)
        if st.role == "leader" and not st.has_quorum:
            return None
    if len(leaders) == 1:
        leader = leaders.pop()
        if leader and leader not in dead:
            return leader
    return None


def measure_failover(cluster: ReplicaCluster, cid: str, writers: int, steady: float,
                     call_timeout: float, limit: float) -> dict[str, Any]:
    members = cluster.members
    old_leader = cluster.wait_leader(20)
    channels = {m.id: grpc.insecure_channel(m.grpc_address) for m in members}
    stubs = {mid: replica_pb2_grpc.ReplicaStub(ch) for mid, ch in channels.items()}
    tag = "fo-" + uuid.uuid4().hex[:8]
    dead: set[str] = set()
    lock = threading.Lock()
    stop = threading.Event()
    acks: list[tuple[float, float, str, int]] = []  # (ack time, attempt start, member, retries)
    errors: Counter = Counter()
    final_errors: Counter = Counter()  # non-retryable answers (e.g. ALREADY_EXISTS = dedupe broke)
    abandoned = [0]
    hard_end = time.perf_counter() + steady + limit + 10

    def writer(i: int) -> None:
        idx = i
        seq = 0
        while not stop.is_set():
            key = f"{tag}-{i}-{seq}"
            cmd = replica_pb2.Command(request_id=key, op=replica_pb2.CREATE_TASK, cid=cid,
                                      title=key)
            retries = 0
            while True:
                if time.perf_counter() > hard_end:
                    abandoned[0] += 1
                    return
                live = [m for m in members if m.id not in dead]
                member = live[idx % len(live)]
                a0 = time.perf_counter()
                try:
                    stubs[member.id].Apply(cmd, timeout=call_timeout)
                except grpc.RpcError as exc:
                    code = exc.code()
                    with lock:
                        errors[code.name if code else "UNKNOWN"] += 1
                    if code in (grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.INVALID_ARGUMENT,
                                grpc.StatusCode.NOT_FOUND):
                        with lock:
                            final_errors[code.name] += 1
                        break
                    idx += 1
                    retries += 1
                    time.sleep(0.01)
                    continue
                a1 = time.perf_counter()
                with lock:
                    acks.append((a1, a0, member.id, retries))
                break
            seq += 1

    threads = [threading.Thread(target=writer, args=(i,), daemon=True, name=f"writer-{i}")
               for i in range(writers)]
    result: dict[str, Any] = {"writers": writers, "call_timeout_s": call_timeout,
                              "old_leader": old_leader.id}
    t_kill = math.inf
    before = 0
    killed_pid: int | None = None
    t_agreed: float | None = None
    new_leader: str | None = None
    t_first_new: float | None = None
    try:
        for t in threads:
            t.start()
        time.sleep(steady)
        with lock:
            before = len(acks)
        dead.add(old_leader.id)
        t_kill = time.perf_counter()
        old_leader.kill()  # SIGKILL by PID, then reaps it
        killed_pid = old_leader.proc.pid if old_leader.proc else None
        deadline = t_kill + limit
        while time.perf_counter() < deadline:
            if t_agreed is None:
                try:
                    new_leader = agreed_leader(members, dead)
                except grpc.RpcError:
                    new_leader = None
                if new_leader:
                    t_agreed = time.perf_counter()
            if t_first_new is None:
                with lock:
                    sent_after = [a for a in acks if a[1] > t_kill]
                if sent_after:
                    t_first_new = min(a[0] for a in sent_after)
            if t_agreed is not None and t_first_new is not None:
                break
            time.sleep(0.02)
        time.sleep(0.5)  # a little steady state under the new leader
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=call_timeout + 5)
    with lock:
        post = [a for a in acks if a[1] > t_kill]
        max_gap = max((b[0] - a[0] for a, b in zip(sorted(acks), sorted(acks)[1:])),
                      default=math.nan)
    result.update({
        "killed_pid": killed_pid,
        "acks_before_kill": before,
        "acks_total": len(acks),
        "acks_sent_after_kill": len(post),
        "kill_to_first_new_leader_ack_s": (t_first_new - t_kill) if t_first_new else None,
        "kill_to_agreed_leader_s": (t_agreed - t_kill) if t_agreed else None,
        "new_leader": new_leader,
        "max_ack_gap_s": max_gap,
        "max_retries_one_request": max((a[3] for a in acks), default=0),
        "retryable_errors": dict(errors),
        "final_errors": dict(final_errors),
        "abandoned_requests": abandoned[0],
        "writers_stuck": sum(t.is_alive() for t in threads),
    })

    # Restart the killed member and let it catch up.
    t0 = time.perf_counter()
    old_leader.start()
    cluster.wait_ready(old_leader, 30)
    result["restart_to_serving_s"] = time.perf_counter() - t0
    dead.discard(old_leader.id)
    try:
        cluster.wait_converged(60)
        result["restart_to_converged_s"] = time.perf_counter() - t0
    except TimeoutError as exc:
        result["restart_to_converged_s"] = None
        result["converge_error"] = str(exc)
    # Every acknowledged write must exist (linearizable scan on the current leader).
    leader = cluster.wait_leader(20)
    stored = count_tasks(stubs[leader.id], cid, tag + "-")
    result["acked_writes_stored"] = stored
    result["acked_writes_missing"] = max(0, len(acks) - stored)
    for ch in channels.values():
        ch.close()
    return result


# ---- logs -------------------------------------------------------------------------------


def scan_logs(cluster: ReplicaCluster) -> dict[str, Any]:
    """Per replica log: CRITICAL lines, pysyncobj WARNING lines, other WARNING/ERROR lines."""
    return scan_process_logs(cluster.members)


def scan_process_logs(processes: list[DaemonProcess]) -> dict[str, Any]:
    """scan_logs over any harness processes (keyed by their id)."""
    out: dict[str, Any] = {}
    for m in processes:
        counts: Counter = Counter()
        samples: dict[str, list[str]] = {}
        for line in m.logs().splitlines():
            parts = line.split(" ", 5)  # date time LEVEL [id] logger: message
            level = parts[2] if len(parts) > 4 else ""
            logger = parts[4].rstrip(":") if len(parts) > 4 else ""
            if "CRITICAL" in line:
                kind = "critical"
            elif level == "WARNING" and logger.startswith("pysyncobj"):
                kind = "pysyncobj_warning"
            elif level in ("WARNING", "ERROR"):
                kind = f"other_{level.lower()}"
            elif line.startswith("Traceback"):
                kind = "traceback"
            else:
                continue
            counts[kind] += 1
            bucket = samples.setdefault(kind, [])
            text = " ".join(parts[2:]) if len(parts) > 4 else line
            if len(bucket) < 3 and text not in bucket:
                bucket.append(text[:300])
        out[m.id] = {"counts": dict(counts), "samples": samples, "log": m.log_path}
    return out


# ---- report -----------------------------------------------------------------------------


def fmt(value: Any, spec: str = ".1f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def summarize(runs: list[RunResult]) -> dict[str, Any]:
    return {
        "name": runs[0].name, "inflight": runs[0].inflight,
        "ops_per_s": median([r.ops_per_s for r in runs]),
        "p50_ms": median([r.p50_ms for r in runs]),
        "p99_ms": median([r.p99_ms for r in runs]),
        "errors": sum(r.errors for r in runs),
        "client_cpu": median([r.client_cpu for r in runs]),
        "server_cpu": median([r.server_cpu for r in runs]),
        "cluster_cpu": median([r.cluster_cpu for r in runs]),
        "runs": [dataclasses.asdict(r) for r in runs],
    }


def print_report(report: dict[str, Any]) -> None:
    p = print
    p("")
    p("=" * 78)
    p(f"Tarefa replica benchmark  (nproc={report['nproc']}, python {report['python']}, "
      f"grpcio {report['grpcio']})")
    p(f"workdir: {report['workdir']}")
    raft = report["raft"]
    p(f"Raft settings ({'defaults' if not report['raft_overrides'] else 'overrides: ' + json.dumps(report['raft_overrides'])}):")
    p("  " + ", ".join(f"{k}={v}" for k, v in raft.items()))
    p("Raft traffic: " + ("encrypted (security.raft_password_file)"
                          if report.get("raft_password") else "clear text"))
    p(f"repeats={report['repeat']} (medians shown), warmup={report['warmup_s']}s, "
      f"duration={report['duration_s']}s per run; one shared channel per run")
    p("")
    hdr = (f"{'measurement':<22}{'in-flight':>9}{'ops/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
           f"{'errors':>8}{'cli cpu':>8}{'srv cpu':>8}{'all repl':>9}")
    p(hdr)
    p("-" * len(hdr))
    for s in report["measurements"].values():
        p(f"{s['name']:<22}{s['inflight']:>9}{fmt(s['ops_per_s'], '.0f'):>10}"
          f"{fmt(s['p50_ms'], '.2f'):>9}{fmt(s['p99_ms'], '.2f'):>9}{s['errors']:>8}"
          f"{fmt(s['client_cpu'], '.2f'):>8}{fmt(s['server_cpu'], '.2f'):>8}"
          f"{fmt(s['cluster_cpu'], '.2f'):>9}")
    p("  (cpu columns: cores used during the window by the client process, the target")
    p("   process [echo server / the replica called], and all three replicas together)")
    p("")
    p("per-run ops/s:  " + "; ".join(
        f"{s['name']}({s['inflight']}): " + ", ".join(fmt(r['ops_per_s'], '.0f') for r in s['runs'])
        for s in report["measurements"].values()))
    p("")
    p("Targets:")
    for t in report["targets"]:
        if t["target"] == "info":
            p(f"  {t['what']:<52} {fmt(t['value'], '.3f'):>8}")
            continue
        p(f"  {t['what']:<52} {fmt(t['value'], '.3f'):>8}  (target {t['target']})  "
          f"{'PASS' if t['pass'] else 'FAIL'}")
    fo = report.get("failover")
    if fo:
        p("")
        p(f"Failover ({fo['writers']} writers, call timeout {fo['call_timeout_s']}s, "
          f"killed {fo['old_leader']} pid {fo['killed_pid']} -> new leader {fo['new_leader']}):")
        p(f"  kill -> first write acked by new leader: {fmt(fo['kill_to_first_new_leader_ack_s'], '.3f')} s")
        p(f"  kill -> agreed new leader with quorum:   {fmt(fo['kill_to_agreed_leader_s'], '.3f')} s")
        p(f"  longest gap between two acks:            {fmt(fo['max_ack_gap_s'], '.3f')} s")
        p(f"  acks: {fo['acks_total']} ({fo['acks_before_kill']} before kill, "
          f"{fo['acks_sent_after_kill']} sent after); max retries of one request "
          f"{fo['max_retries_one_request']}; retried errors {fo['retryable_errors']}; "
          f"non-retryable {fo['final_errors']}; abandoned {fo['abandoned_requests']}")
        p(f"  restart of killed member: serving after {fmt(fo.get('restart_to_serving_s'), '.2f')} s, "
          f"converged after {fmt(fo.get('restart_to_converged_s'), '.2f')} s")
        p(f"  acknowledged writes found by Scan: {fo.get('acked_writes_stored')} "
          f"(missing {fo.get('acked_writes_missing')})")
    p("")
    p("Replica logs (line counts):")
    for rid, info in report.get("logs", {}).items():
        p(f"  {rid}: {info['counts'] or 'clean'}   ({info['log']})")
        for kind, samples in info["samples"].items():
            for s in samples:
                p(f"      {kind}: {s}")
    if report.get("status_counters"):
        p("  Status raft_warnings/raft_criticals before stop: " + ", ".join(
            f"{k}={v[0]}/{v[1]}" for k, v in report["status_counters"].items()))
    if report.get("exit_codes"):
        p("  exit codes on SIGTERM: " + ", ".join(f"{k}={v}" for k, v in report["exit_codes"].items()))
    for a in report.get("anomalies", []):
        p(f"ANOMALY: {a}")
    p(f"total wall time: {report['wall_s']:.1f} s")
    p("=" * 78)


# ---- main -------------------------------------------------------------------------------


def finish(report: dict[str, Any], ok: bool, print_report: Callable[[dict[str, Any]], None],
           json_path: str | None, keep: bool, workdir: str) -> None:
    """Print the report, write --json, keep or remove the work directory."""
    if ok:
        print_report(report)
    if json_path:
        with open(json_path, "w", encoding="utf-8") as fh:
            json.dump(json_safe(report), fh, indent=2, default=str)
        print(f"figures written to {json_path}")
    if keep or report["anomalies"] or not ok:
        print(f"work directory kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)


class BudgetExceeded(Exception):
    pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Replica tier benchmark (see module docstring).")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (median)")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per run")
    parser.add_argument("--inflight", type=int, default=64, help="the high in-flight count")
    parser.add_argument("--raft", action="append", default=[], metavar="KEY=VALUE",
                        help="override one Raft setting (repeatable; value parsed as YAML)")
    parser.add_argument("--call-timeout", type=float, default=10.0,
                        help="deadline of each measured call (s)")
    parser.add_argument("--failover-writers", type=int, default=8)
    parser.add_argument("--failover-call-timeout", type=float, default=1.0,
                        help="deadline of each failover write attempt (s)")
    parser.add_argument("--no-failover", action="store_true")
    parser.add_argument("--raft-password", action="store_true",
                        help="encrypt Raft traffic (security.raft_password_file, a random "
                             "password written in the work directory)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--budget", type=float, default=0,
                        help="abort after this many seconds (default: derived from the options)")
    args = parser.parse_args(argv)
    raft_overrides = parse_raft_overrides(args.raft)
    settings = dataclasses.asdict(RaftSettings(**raft_overrides))

    per_run = args.warmup + args.duration + 1.5
    budget = args.budget or (90 + args.repeat * 5 * per_run + (0 if args.no_failover else 120))

    def on_alarm(*_: Any) -> None:
        raise BudgetExceeded(f"benchmark exceeded its {budget:.0f}s budget")
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(int(math.ceil(budget)))

    wall0 = time.perf_counter()
    workdir = tempfile.mkdtemp(prefix="tarefa-bench-")
    report: dict[str, Any] = {
        "nproc": nproc(), "python": sys.version.split()[0], "grpcio": grpc.__version__,
        "workdir": workdir, "raft": settings, "raft_overrides": raft_overrides,
        "repeat": args.repeat, "warmup_s": args.warmup, "duration_s": args.duration,
        "raft_password": args.raft_password, "measurements": {}, "anomalies": [],
    }
    extra = None
    if args.raft_password:
        password_file = os.path.join(workdir, "raft.password")
        fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(uuid.uuid4().hex + uuid.uuid4().hex + "\n")
        extra = {"security": {"auth": "cid-only", "raft_password_file": password_file}}
    cluster = ReplicaCluster(workdir, size=3, raft=raft_overrides, extra=extra)
    echo = EchoServer()
    echo_aio = EchoServer(asyncio=True)
    ok = False
    try:
        print(f"starting 3 replicas in {workdir} and the echo server ...", flush=True)
        cluster.start(timeout=30)
        echo.start()
        echo_aio.start()
        leader = cluster.wait_leader(20)
        follower = cluster.followers()[0]
        cid = str(int(time.time() * 1000))
        create_client(leader.stub, cid)
        print(f"leader {leader.id}, follower used {follower.id}, client cid {cid}, "
              f"echo server pid {echo.pid} on {echo.address}", flush=True)

        hi = args.inflight
        plan = [("echo", 1), ("echo-aio", 1), ("echo", hi), ("echo-aio", hi),
                ("apply-leader", 1), ("apply-leader", hi), ("apply-follower", 1)]
        runs: dict[str, list[RunResult]] = {f"{n}({k})": [] for n, k in plan}
        replica_pids = [m.proc.pid for m in cluster.members if m.proc]
        for rep in range(args.repeat):
            for name, k in plan:
                if name.startswith("echo"):
                    server = echo if name == "echo" else echo_aio
                    target, pid, make, pids = (server.address, server.pid,
                                               echo_call(args.call_timeout), None)
                else:
                    member = leader if name == "apply-leader" else follower
                    tag = f"{name[6]}{k}r{rep}-{uuid.uuid4().hex[:6]}"
                    target, pid, pids = member.grpc_address, member.proc.pid, replica_pids
                    make = apply_call(cid, tag, args.call_timeout)
                r = run_load(name, target, k, make, args.warmup, args.duration, pid, pids)
                runs[f"{name}({k})"].append(r)
                print(f"  run {rep + 1}/{args.repeat} {name}({k}): {r.ops_per_s:.0f} ops/s, "
                      f"p50 {r.p50_ms:.2f} ms, p99 {r.p99_ms:.2f} ms, errors {r.error_codes or 0}",
                      flush=True)
            now_leader = cluster.wait_leader(20)
            if now_leader is not leader:
                report["anomalies"].append(
                    f"leader changed during the measurements: {leader.id} -> {now_leader.id}")
                leader = now_leader
                follower = cluster.followers()[0]
        report["measurements"] = {key: summarize(rs) for key, rs in runs.items()}
        m = report["measurements"]
        apply_hi = m[f"apply-leader({hi})"]["ops_per_s"]
        ratios = {name: apply_hi / m[f"{name}({hi})"]["ops_per_s"]
                  if m[f"{name}({hi})"]["ops_per_s"] else math.nan
                  for name in ("echo", "echo-aio")}
        ratio = vs_faster_echo(ratios.values())
        p50 = m["apply-leader(1)"]["p50_ms"]
        report["ratio_apply_to_echo"] = ratios["echo"]
        report["ratio_apply_to_echo_aio"] = ratios["echo-aio"]
        report["apply1_leader_p50_ms"] = p50
        report["targets"] = [
            {"what": f"Apply({hi}) / echo({hi}) ops/s (sync echo)", "value": ratios["echo"],
             "target": "info", "pass": True},
            {"what": f"Apply({hi}) / echo-aio({hi}) ops/s", "value": ratios["echo-aio"],
             "target": "info", "pass": True},
            {"what": f"Apply({hi}) / faster echo({hi}) ops/s", "value": ratio,
             "target": f">= {TARGET_RATIO}", "pass": ratio >= TARGET_RATIO},
            {"what": "Apply(1) to leader p50 (ms)", "value": p50,
             "target": f"<= {TARGET_APPLY1_P50_MS}", "pass": p50 <= TARGET_APPLY1_P50_MS},
            # The replica serves gRPC as echo-aio does: what a lone write adds to
            # a bare call of that server is Raft's and the apply's share.
            {"what": "Apply(1) p50 - echo-aio(1) p50 (ms)",
             "value": p50 - m["echo-aio(1)"]["p50_ms"], "target": "info", "pass": True},
        ]
        for key, s in m.items():
            if s["errors"]:
                report["anomalies"].append(f"{key}: {s['errors']} failed calls: "
                                           f"{[r['error_codes'] for r in s['runs']]}")

        if not args.no_failover:
            print("failover: 8 writers, SIGKILL of the leader ...", flush=True)
            fo_cid = str(int(cid) + 1)
            create_client(cluster.wait_leader(20).stub, fo_cid)
            fo = measure_failover(cluster, fo_cid, args.failover_writers, steady=2.0,
                                  call_timeout=args.failover_call_timeout, limit=20.0)
            report["failover"] = fo
            secs = fo["kill_to_first_new_leader_ack_s"]
            report["failover_s"] = secs
            report["targets"].append(
                {"what": "failover: kill -> first write acked by new leader (s)", "value": secs,
                 "target": f"<= {TARGET_FAILOVER_S}",
                 "pass": secs is not None and secs <= TARGET_FAILOVER_S})
            if fo["final_errors"]:
                report["anomalies"].append(f"failover: non-retryable errors {fo['final_errors']}")
            if fo["acked_writes_missing"]:
                report["anomalies"].append(
                    f"failover: {fo['acked_writes_missing']} acknowledged writes missing")
            if fo["abandoned_requests"] or fo["writers_stuck"]:
                report["anomalies"].append(f"failover: {fo['abandoned_requests']} requests "
                                           f"abandoned, {fo['writers_stuck']} writers stuck")
        counters = {}
        for member in cluster.members:
            if member.alive:
                st = member.status(timeout=2)
                counters[member.id] = (st.raft_warnings, st.raft_criticals)
        report["status_counters"] = counters
        ok = True
    except BudgetExceeded as exc:
        report["anomalies"].append(str(exc))
        print(f"ERROR: {exc}", file=sys.stderr)
    finally:
        signal.alarm(0)
        echo.stop()
        echo_aio.stop()
        exit_codes = {}
        for member in cluster.members:
            try:
                if member.alive:
                    exit_codes[member.id] = member.terminate()
            except Exception as exc:  # noqa: BLE001 - keep stopping the others
                exit_codes[member.id] = repr(exc)
        cluster.stop()
        report["exit_codes"] = exit_codes
        for rid, rc in exit_codes.items():
            if rc != 0:
                report["anomalies"].append(f"{rid} exited with {rc} on SIGTERM")
        report["logs"] = scan_logs(cluster)
        for rid, info in report["logs"].items():
            if info["counts"].get("critical"):
                report["anomalies"].append(f"{rid}: {info['counts']['critical']} CRITICAL log lines")
        report["wall_s"] = time.perf_counter() - wall0
        finish(report, ok, print_report, args.json, args.keep, workdir)
    all_pass = all(t["pass"] for t in report.get("targets", []))
    return 0 if ok and all_pass else (1 if ok else 2)


if __name__ == "__main__":
    sys.exit(main())
