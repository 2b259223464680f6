"""Benchmark the portal tier (grpc.aio portals over the replicas) against a bare gRPC echo server.

    .venv/bin/python bench/portal.py [--repeat 3] [--duration 5] [--warmup 1]
                                     [--updates 500] [--loaded-seconds 5] [--json FILE] [--keep]

What it does, in order (a full default run takes about two and a half minutes):

1. Starts a whole Stack (tests/harness.py: Mosquitto, 3 replicas, portal-admin,
   portal-client-1, portal-client-2, each a real process) in a temp dir, and
   bench/echo_server.py twice (the baselines, started and measured exactly as
   by bench/replica.py: "echo" the sync server, "echo-aio" the grpc.aio server
   on uvloop that the portals are built like). Creates four clients through
   portal-admin: one for reads (with 100 tasks created through
   portal-client-1), one for write load, one watched, one for background
   write load.
2. Measures, `--repeat` times, interleaved so drift hits every figure alike,
   with the one client of bench/replica.py (`run_load`: N threads of blocking
   calls on one shared channel, `--warmup` s then `--duration` s measured):
     echo(1), echo(64)        /bench.Echo/Echo, 16 bytes each way (sync server)
     echo-aio(64)             the same on the grpc.aio server; the ratio targets
                              are judged against the faster of the two echoes
     get-hit(64)              ClientPortal.GetTask on portal-client-2, CACHED,
                              cycling over the 100 tasks. Right before each run
                              every task is read once on portal-client-2 (they
                              are normally already cached from portal-client-1's
                              events; the cache TTL and the 10k-entry LRU, which
                              the CreateTask runs churn, could have dropped them).
                              PortalStatus cache_hits/cache_misses are read at
                              the start and end of the measured window: the hit
                              ratio over the window is reported and checked.
     create(64), create(1)    ClientPortal.CreateTask on portal-client-1, unique
                              title and request id per call.
     watch                    Write-on-A -> event-on-B: a WatchTasks stream is
                              opened on portal-client-2 for the watched client;
                              `--updates` sequential UpdateTask calls go to
                              portal-client-1 (each waits for its event before
                              the next). Per update: send -> ack (the write),
                              ack -> arrival of the event with the acked revision
                              on B's stream, send -> arrival. The arrival time is
                              taken when this (Python, sync gRPC) client gets the
                              message from the stream, so the stream delivery
                              (portal-client-2's watcher queue + gRPC send + our
                              receive) is included: the figure slightly
                              overestimates "applied on B". An ack -> arrival
                              below zero means B's event came before A's answer.
     watch-loaded             The same during background write load: a separate
                              process (this file, hidden --background-load mode,
                              so it does not compete for our GIL) runs run_load
                              CreateTask with `--bg-inflight` in flight on
                              portal-client-1 for `--loaded-seconds`; updates go
                              out during its measured window (at most --updates).
     mqtt                     Reference: Mosquitto's own QoS 1 latency on the
                              same broker, paho publisher and subscriber (two
                              connections in this process, loop_start threads
                              like the portals), `--updates` sequential publishes
                              of an event-sized payload on a topic the portals do
                              not subscribe to: publish -> receive, PUBACK ->
                              receive.
   Each figure is the median over the repeats (p50/p99 are nearest-rank within
   one run; the medians of those are shown).
3. Stops everything (try/finally: stack processes and the echo server by PID,
   a still running background process by PID), scans every daemon's log
   (<workdir>/<id>.log) for WARNING/ERROR/CRITICAL/Traceback lines, prints the
   report, and with `--json FILE` writes every figure as JSON.

CPU columns: cores used during the measured window by this client process, the
portal called (or the echo server), all three replicas together, "rest" = the
broker plus the two other portals (an event fan-out costs there), the total
of those (compare with nproc: the whole stack shares the machine), and "other":
busy cores of the whole machine (/proc/stat) minus this client and every
process the benchmark started (echo server, broker, replicas, portals), i.e.
anything else that ran meanwhile (plus some kernel interrupt time); a run where
it exceeds 0.25 cores is reported as an anomaly (skewed by foreign load). For the
create runs the leader's Status is read at both ends of the window too: Raft
entries committed per second and writes per entry (how well the portal's
ApplyBatch grouping and the replica's group commit batch). Replica CRITICAL log
lines and leader elections are attributed to the benchmark phase (run) during
which they were logged; any election after the first is an anomaly.

Targets (PASS/FAIL), "echo" being the faster of echo(64) and echo-aio(64):
get-hit(64) ops/s >= 0.8 x echo; create(64) ops/s >= 0.5 x echo; create(64)
p99 <= 50 ms; watch (no background load) ack -> event p99 <= 10 ms; plus the
validity check that the get-hit windows were >= 99% cache hits. Exit status:
0 all targets met, 1 a target missed, 2 the run was aborted (time budget, see
--budget, or Ctrl-C); other failures raise.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import grpc  # noqa: E402
import paho.mqtt.client as mqtt  # noqa: E402

from bench.replica import (  # noqa: E402
    CLK_TCK, BudgetExceeded, Call, EchoServer, RunResult, echo_call, finish, fmt, json_safe, median,
    nproc,
    percentile, proc_cpu_seconds, run_load, scan_process_logs, summarize, vs_faster_echo)
from daemons.core import events  # noqa: E402
from proto import portal_pb2 as pb  # noqa: E402
from proto import portal_pb2_grpc  # noqa: E402
from tests.harness import PortalProcess, Stack  # noqa: E402

TARGET_GET_RATIO = 0.8
TARGET_CREATE_RATIO = 0.5
TARGET_CREATE_P99_MS = 50.0
TARGET_WATCH_P99_MS = 10.0
MIN_HIT_RATIO = 0.99
FOREIGN_CPU_WARN = 0.25  # cores busy outside our processes during a window
READ_TASKS = 100

MakeCall = Callable[[grpc.Channel, int], Call]


# ---- calls for run_load ----------------------------------------------------------------


def get_task_call(cid: str, titles: list[str], timeout: float) -> MakeCall:
    """GetTask (CACHED) cycling over `titles`, thread i starting at title i."""
    def make(channel: grpc.Channel, i: int) -> Call:
        get = portal_pb2_grpc.ClientPortalStub(channel).GetTask
        refs = [pb.TaskRef(cid=cid, title=t) for t in titles]
        n = len(refs)
        return lambda seq: get(refs[(i + seq) % n], timeout=timeout)
    return make


def create_task_call(cid: str, tag: str, timeout: float) -> MakeCall:
    """CreateTask with a unique title and request id per call (`tag` is unique per run)."""
    def make(channel: grpc.Channel, i: int) -> Call:
        create = portal_pb2_grpc.ClientPortalStub(channel).CreateTask
        prefix = f"{tag}-{i}-"

        def call(seq: int) -> Any:
            key = prefix + str(seq)
            return create(pb.CreateTaskRequest(cid=cid, title=key, request_id=key),
                          timeout=timeout)
        return call
    return make


def machine_busy_seconds() -> float:
    """Non-idle CPU seconds of the whole machine since boot (/proc/stat), nan if unknown."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = [int(x) for x in fh.readline().split()[1:9]]
    except (OSError, ValueError):
        return math.nan
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


class WindowProbe:
    """run_load's on_window hook: CPU of extra processes and Status answers at both ends.

    `statuses` maps a name to a Status call (a portal's or the leader's).
    """

    def __init__(self, pids: list[int], statuses: dict[str, Callable[[], Any]] | None = None,
                 all_pids: list[int] | None = None) -> None:
        self.pids = pids
        self.all_pids = all_pids or []  # every server process we started (for "other")
        self.statuses = statuses or {}
        self.marks: dict[str, tuple[float, float, dict[str, Any]]] = {}
        self.machine: dict[str, tuple[float, float, float]] = {}

    def __call__(self, phase: str) -> None:
        t = time.perf_counter()
        cpu = sum(proc_cpu_seconds(p) for p in self.pids)
        self.machine[phase] = (t, machine_busy_seconds(),
                               sum(proc_cpu_seconds(p) for p in self.all_pids))
        answers = {}
        for name, call in self.statuses.items():
            try:
                answers[name] = call()
            except grpc.RpcError:
                answers[name] = None
        self.marks[phase] = (t, cpu, answers)

    @property
    def machine_cpu(self) -> float:
        """Busy cores of the whole machine (every process, ours or not) over the window."""
        if "begin" not in self.machine or "end" not in self.machine:
            return math.nan
        (t0, b0, _), (t1, b1, _) = self.machine["begin"], self.machine["end"]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else math.nan

    @property
    def servers_cpu(self) -> float:
        """Cores used by every server process we started (echo, broker, replicas, portals)."""
        if "begin" not in self.machine or "end" not in self.machine:
            return math.nan
        (t0, _, a0), (t1, _, a1) = self.machine["begin"], self.machine["end"]
        return (a1 - a0) / (t1 - t0) if t1 > t0 else math.nan

    @property
    def cpu(self) -> float:
        if "begin" not in self.marks or "end" not in self.marks or not self.pids:
            return math.nan
        (t0, c0, _), (t1, c1, _) = self.marks["begin"], self.marks["end"]
        return (c1 - c0) / (t1 - t0) if t1 > t0 else math.nan

    def _pair(self, name: str) -> tuple[Any, Any]:
        if "begin" not in self.marks or "end" not in self.marks:
            return None, None
        return self.marks["begin"][2].get(name), self.marks["end"][2].get(name)

    def cache_delta(self) -> tuple[int, int]:
        """(hits, misses) counted by the portal between the two marks."""
        s0, s1 = self._pair("portal")
        if s0 is None or s1 is None:
            return 0, 0
        return s1.cache_hits - s0.cache_hits, s1.cache_misses - s0.cache_misses

    def raft_entries(self) -> float:
        """Raft entries the leader committed between the two marks (nan if it changed)."""
        s0, s1 = self._pair("leader")
        if s0 is None or s1 is None or s0.term != s1.term or s1.role != "leader":
            return math.nan
        return float(s1.commit_index - s0.commit_index)


# ---- write on A -> event on B -----------------------------------------------------------


class EventStream:
    """One WatchTasks stream read by a thread that stamps each event's arrival."""

    def __init__(self, address: str, cid: str) -> None:
        self.channel = grpc.insecure_channel(address)
        grpc.channel_ready_future(self.channel).result(timeout=10)
        self.call = portal_pb2_grpc.ClientPortalStub(self.channel).WatchTasks(
            pb.WatchTasksRequest(cid=cid))
        self.cond = threading.Condition()
        self.arrivals: dict[int, tuple[float, str, str]] = {}  # revision -> (t, event, origin)
        self.error: str | None = None
        self.thread = threading.Thread(target=self._read, daemon=True, name="watch-reader")
        self.thread.start()

    def _read(self) -> None:
        try:
            for ev in self.call:
                t = time.perf_counter()
                with self.cond:
                    self.arrivals[ev.revision] = (t, ev.event, ev.origin)
                    self.cond.notify_all()
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                self.error = f"{exc.code().name}: {exc.details()}"
        with self.cond:
            self.cond.notify_all()

    def wait(self, revision: int, timeout: float) -> tuple[float, str, str] | None:
        with self.cond:
            self.cond.wait_for(lambda: revision in self.arrivals or self.error is not None
                               or not self.thread.is_alive(), timeout)
            return self.arrivals.get(revision)

    def close(self) -> None:
        self.call.cancel()
        self.thread.join(5)
        self.channel.close()


def measure_watch(a: PortalProcess, b: PortalProcess, cid: str, title: str, count: int,
                  tag: str, until: Callable[[], bool] | None = None,
                  timeout: float = 5.0) -> dict[str, Any]:
    """`count` sequential UpdateTask on A, each timed until its event arrives on B's stream."""
    stream = EventStream(b.address, cid)
    channel = grpc.insecure_channel(a.address)
    update = portal_pb2_grpc.ClientPortalStub(channel).UpdateTask
    samples: list[tuple[float, float, float]] = []  # (send, ack, arrival)
    errors: Counter = Counter()
    lost = mismatched = 0
    try:
        # The watcher is registered asynchronously: update until one event comes back.
        primed = False
        prime_deadline = time.perf_counter() + 10
        while not primed and time.perf_counter() < prime_deadline:
            reply = update(pb.UpdateTaskRequest(cid=cid, title=title, description=f"{tag} prime",
                                                request_id=uuid.uuid4().hex), timeout=timeout)
            primed = stream.wait(reply.revision, 0.5) is not None
        if not primed:
            raise RuntimeError(f"no event on {b.id}'s WatchTasks stream within 10 s "
                               f"(stream error: {stream.error})")
        perf = time.perf_counter
        for k in range(count):
            if until is not None and until():
                break
            request = pb.UpdateTaskRequest(cid=cid, title=title, description=f"{tag} {k}",
                                           request_id=f"{tag}-{k}")
            t0 = perf()
            try:
                reply = update(request, timeout=timeout)
            except grpc.RpcError as exc:
                errors[exc.code().name if exc.code() else "UNKNOWN"] += 1
                time.sleep(0.01)
                continue
            t1 = perf()
            got = stream.wait(reply.revision, 2.0)
            if got is None:
                lost += 1
                continue
            if got[1] != "task.updated" or got[2] != a.id:
                mismatched += 1
            samples.append((t0, t1, got[0]))
    finally:
        stream.close()
        channel.close()
    write = sorted(t1 - t0 for t0, t1, _ in samples)
    ack_ev = sorted(t2 - t1 for _, t1, t2 in samples)
    send_ev = sorted(t2 - t0 for t0, _, t2 in samples)
    ms = 1e3
    return {
        "samples": len(samples), "lost": lost, "mismatched": mismatched,
        "errors": dict(errors), "stream_error": stream.error,
        "write_p50_ms": percentile(write, 0.5) * ms, "write_p99_ms": percentile(write, 0.99) * ms,
        "ack_to_event_p50_ms": percentile(ack_ev, 0.5) * ms,
        "ack_to_event_p99_ms": percentile(ack_ev, 0.99) * ms,
        "ack_to_event_max_ms": (ack_ev[-1] * ms) if ack_ev else math.nan,
        "ack_to_event_min_ms": (ack_ev[0] * ms) if ack_ev else math.nan,
        "event_before_ack": sum(1 for x in ack_ev if x < 0),
        "send_to_event_p50_ms": percentile(send_ev, 0.5) * ms,
        "send_to_event_p99_ms": percentile(send_ev, 0.99) * ms,
    }


class BackgroundLoad:
    """This file in --background-load mode: run_load CreateTask in its own process."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.proc: subprocess.Popen | None = None
        self.window_end = math.inf

    def start(self, timeout: float = 20.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--background-load", json.dumps(self.spec)],
            cwd=ROOT, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if line.strip() != "WINDOW":
            raise RuntimeError(f"background load did not start its window within {timeout}s "
                               f"(got {line!r}, exit code {self.proc.poll()})")
        self.window_end = time.perf_counter() + self.spec["duration"]

    def result(self, timeout: float = 30.0) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        out, _ = self.proc.communicate(timeout=timeout)
        for line in out.splitlines():
            if line.startswith("RESULT "):
                return json.loads(line[7:])
        raise RuntimeError(f"background load gave no result (exit code {self.proc.returncode})")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(5)


def background_main(spec_json: str) -> int:
    spec = json.loads(spec_json)

    def on_window(phase: str) -> None:
        if phase == "begin":
            print("WINDOW", flush=True)

    r = run_load("bg-create", spec["address"], spec["inflight"],
                 create_task_call(spec["cid"], spec["tag"], spec["timeout"]),
                 spec["warmup"], spec["duration"], spec["server_pid"], spec["cluster_pids"],
                 on_window=on_window)
    print("RESULT " + json.dumps(json_safe(dataclasses.asdict(r))), flush=True)
    return 0


# ---- Mosquitto reference ----------------------------------------------------------------


def measure_mqtt(host: str, port: int, count: int, payload: bytes) -> dict[str, Any]:
    """Sequential QoS 1 publishes, publisher and subscriber on separate connections."""
    topic = f"bench/mqtt-latency/{uuid.uuid4().hex[:8]}"
    cond = threading.Condition()
    arrivals: dict[int, float] = {}
    subscribed = threading.Event()

    def on_message(client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        t = time.perf_counter()
        with cond:
            arrivals[int(message.payload[:10])] = t
            cond.notify_all()

    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-sub-{uuid.uuid4().hex[:8]}")
    sub.on_message = on_message
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.on_connect = lambda client, *a: client.subscribe(topic, qos=1)
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{uuid.uuid4().hex[:8]}")
    pub.max_inflight_messages_set(1000)
    samples: list[tuple[float, float, float]] = []
    lost = 0
    try:
        sub.connect(host, port, keepalive=10)
        sub.loop_start()
        pub.connect(host, port, keepalive=10)
        pub.loop_start()
        if not subscribed.wait(10):
            raise RuntimeError("mqtt reference: no SUBACK within 10 s")
        for k in range(-20, count):  # 20 unmeasured warm-up messages
            seq = k + 20
            t0 = time.perf_counter()
            info = pub.publish(topic, b"%010d" % seq + payload, qos=1)
            info.wait_for_publish(5)
            t1 = time.perf_counter()
            with cond:
                cond.wait_for(lambda: seq in arrivals, 2.0)
                t2 = arrivals.get(seq)
            if k < 0:
                continue
            if t2 is None:
                lost += 1
            else:
                samples.append((t0, t1, t2))
    finally:
        for c in (pub, sub):
            try:
                c.disconnect()
                c.loop_stop()
            except Exception:  # noqa: BLE001 - best effort
                pass
    pub_rx = sorted(t2 - t0 for t0, _, t2 in samples)
    ack_rx = sorted(t2 - t1 for _, t1, t2 in samples)
    ms = 1e3
    return {"samples": len(samples), "lost": lost, "payload_bytes": len(payload) + 10,
            "publish_to_receive_p50_ms": percentile(pub_rx, 0.5) * ms,
            "publish_to_receive_p99_ms": percentile(pub_rx, 0.99) * ms,
            "puback_to_receive_p50_ms": percentile(ack_rx, 0.5) * ms,
            "puback_to_receive_p99_ms": percentile(ack_rx, 0.99) * ms}


def sample_event_payload() -> bytes:
    """An event as a portal publishes it (task.updated with its record), for size."""
    record = {"cid": "1700000000000", "title": "w-task", "description": "w-abcdef 123",
              "status": "pending", "created_at": "2026-01-01T00:00:00.000000Z",
              "updated_at": "2026-01-01T00:00:00.000000Z", "revision": 123456}
    return events.encode(events.make_event("task.updated", "1700000000000", 123456,
                                           "portal-client-1", "2026-01-01T00:00:00.000000Z",
                                           title="w-task", record=record))


# ---- logs ---------------------------------------------------------------------------------


def scan_broker_log(broker: Any) -> dict[str, Any]:
    counts: Counter = Counter()
    samples: list[str] = []
    for line in broker.logs().splitlines():
        low = line.lower()
        if "error" in low or "warning" in low or "exceeded" in low:
            counts["error_or_warning"] += 1
            if len(samples) < 3:
                samples.append(line[:300])
    return {"counts": dict(counts), "samples": {"error_or_warning": samples} if samples else {},
            "log": broker.log_path}


def attribute_log_events(stack: Stack, timeline: list[tuple[str, float, float]]
                         ) -> dict[str, dict[str, int]]:
    """Replica CRITICAL lines and leader elections, counted per benchmark phase."""
    out: dict[str, Counter] = {}
    for m in stack.members:
        for line in m.logs().splitlines():
            if "CRITICAL" in line:
                kind = "critical"
            elif "-> leader" in line:
                kind = "elections"
            else:
                continue
            try:
                t = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            except ValueError:
                continue
            phase = next((name for name, t0, t1 in timeline if t0 <= t <= t1 + 0.5),
                         "between phases")
            out.setdefault(phase, Counter())[kind] += 1
    return {k: dict(v) for k, v in out.items()}


# ---- report ---------------------------------------------------------------------------------


def median_of(runs: list[dict[str, Any]], key: str) -> float:
    return median([r[key] for r in runs if r.get(key) is not None])


def summarize_watch(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [k for k in runs[0] if k.endswith("_ms")]
    out: dict[str, Any] = {k: median_of(runs, k) for k in keys}
    out.update(samples=sum(r["samples"] for r in runs), lost=sum(r.get("lost", 0) for r in runs),
               runs=runs)
    if "ack_to_event_max_ms" in runs[0]:
        out["ack_to_event_max_ms"] = max(r["ack_to_event_max_ms"] for r in runs)
        out["event_before_ack"] = sum(r["event_before_ack"] for r in runs)
        out["errors"] = sum(sum(r["errors"].values()) for r in runs)
        out["mismatched"] = sum(r["mismatched"] for r in runs)
    return out


def print_report(report: dict[str, Any]) -> None:
    p = print
    p("")
    p("=" * 96)
    p(f"Tarefa portal benchmark  (nproc={report['nproc']}, python {report['python']}, "
      f"grpcio {report['grpcio']})")
    p(f"workdir: {report['workdir']}")
    p(f"repeats={report['repeat']} (medians shown), warmup={report['warmup_s']}s, "
      f"duration={report['duration_s']}s per run; one shared channel per run; "
      f"portals on grpc.aio; echo = sync grpc server, echo-aio = grpc.aio on uvloop")
    p("")
    hdr = (f"{'measurement':<16}{'in-flight':>9}{'ops/s':>9}{'x echo':>8}{'x aio':>7}{'p50 ms':>9}"
           f"{'p99 ms':>9}{'errors':>7}{'cli cpu':>8}{'srv cpu':>8}{'all repl':>9}{'rest':>6}"
           f"{'total':>6}{'other':>6}")
    p(hdr)
    p("-" * len(hdr))
    for s in report["measurements"].values():
        p(f"{s['name']:<16}{s['inflight']:>9}{fmt(s['ops_per_s'], '.0f'):>9}"
          f"{fmt(s.get('vs_echo'), '.2f'):>8}{fmt(s.get('vs_echo_aio'), '.2f'):>7}"
          f"{fmt(s['p50_ms'], '.2f'):>9}{fmt(s['p99_ms'], '.2f'):>9}{s['errors']:>7}"
          f"{fmt(s['client_cpu'], '.2f'):>8}{fmt(s['server_cpu'], '.2f'):>8}"
          f"{fmt(s['cluster_cpu'], '.2f'):>9}{fmt(s.get('rest_cpu'), '.2f'):>6}"
          f"{fmt(s.get('total_cpu'), '.2f'):>6}{fmt(s.get('foreign_cpu'), '.2f'):>6}")
    p("  (x echo / x aio: ops/s over the sync / grpc.aio echo with the same in-flight count")
    p("   [x aio only at the high count], same run order; cpu columns:")
    p("   cores used in the window by the client process, the target [echo server / the portal")
    p("   called], all three replicas together, rest = broker + the two other portals, their")
    p(f"   total, out of nproc={report['nproc']}, and other = busy cores of the machine minus this")
    p("   client and every process the benchmark started: anything else running meanwhile")
    p("   (plus some kernel interrupt time); a high value means the row was skewed)")
    for s in report["measurements"].values():
        if "writes_per_raft_entry" in s:
            p(f"  {s['name']}({s['inflight']}): leader committed "
              f"{fmt(s['raft_entries_per_s'], '.0f')} Raft entries/s, "
              f"{fmt(s['writes_per_raft_entry'], '.1f')} writes per entry")
    g = report["measurements"].get("get-hit(64)") or {}
    if g:
        p(f"  get-hit: portal-client-2 cache hit ratio over the windows: "
          f"{', '.join(fmt(x, '.4f') for x in g['hit_ratios'])} "
          f"(hits {g['hits']}, misses {g['misses']}; client-side calls in the windows "
          f"{sum(r['calls'] for r in g['runs'])})")
    p("")
    p("per-run ops/s:  " + "; ".join(
        f"{s['name']}: " + ", ".join(fmt(r['ops_per_s'], '.0f') for r in s['runs'])
        for s in report["measurements"].values()))
    p("")
    p("Write on portal-client-1 -> event on portal-client-2's WatchTasks stream (sequential "
      "UpdateTask; medians of per-run p50/p99, max over all runs):")
    hdr = f"{'':<50}{'samples':>8}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"
    p(hdr)
    p("-" * len(hdr))
    for key, label in (("watch", "idle"), ("watch_loaded", "under background load")):
        w = report.get(key)
        if not w:
            continue
        p(f"{'UpdateTask send -> ack (' + label + ')':<50}{w['samples']:>8}"
          f"{fmt(w['write_p50_ms'], '.2f'):>9}{fmt(w['write_p99_ms'], '.2f'):>9}")
        p(f"{'A ack -> event on B (' + label + ')':<50}{w['samples']:>8}"
          f"{fmt(w['ack_to_event_p50_ms'], '.2f'):>9}{fmt(w['ack_to_event_p99_ms'], '.2f'):>9}"
          f"{fmt(w['ack_to_event_max_ms'], '.2f'):>9}")
        p(f"{'A send -> event on B (' + label + ')':<50}{w['samples']:>8}"
          f"{fmt(w['send_to_event_p50_ms'], '.2f'):>9}{fmt(w['send_to_event_p99_ms'], '.2f'):>9}")
    m = report.get("mqtt")
    if m:
        p(f"{'mosquitto QoS1 publish -> receive (paho)':<50}{m['samples']:>8}"
          f"{fmt(m['publish_to_receive_p50_ms'], '.2f'):>9}"
          f"{fmt(m['publish_to_receive_p99_ms'], '.2f'):>9}")
        p(f"{'mosquitto QoS1 PUBACK -> receive (paho)':<50}{m['samples']:>8}"
          f"{fmt(m['puback_to_receive_p50_ms'], '.2f'):>9}"
          f"{fmt(m['puback_to_receive_p99_ms'], '.2f'):>9}")
    for key in ("watch", "watch_loaded"):
        w = report.get(key)
        if w:
            p(f"  {key}: lost events {w['lost']}, failed updates {w['errors']}, wrong "
              f"event/origin {w['mismatched']}, events before the ack {w['event_before_ack']}")
    bg = report.get("background_load")
    if bg:
        p(f"  background load: CreateTask({bg[0]['inflight']}) on portal-client-1 in its own "
          f"process: " + ", ".join(f"{fmt(r['ops_per_s'], '.0f')} ops/s p99 "
                                   f"{fmt(r['p99_ms'], '.1f')} ms" for r in bg))
    p("")
    p("Targets:")
    for t in report["targets"]:
        p(f"  {t['what']:<58} {fmt(t['value'], '.3f'):>8}  (target {t['target']})  "
          f"{'PASS' if t['pass'] else 'FAIL'}")
    p("")
    p("Daemon logs (WARNING/ERROR/CRITICAL/Traceback line counts):")
    for rid, info in report.get("logs", {}).items():
        p(f"  {rid}: {info['counts'] or 'clean'}   ({info['log']})")
        for kind, samples in info["samples"].items():
            for s in samples:
                p(f"      {kind}: {s}")
    events_by_phase = {k: v for k, v in report.get("log_events_by_phase", {}).items() if v}
    if events_by_phase:
        p("  replica log events by benchmark phase: " + "; ".join(
            f"{k}: " + ", ".join(f"{n}={c}" for n, c in v.items())
            for k, v in events_by_phase.items()))
    if report.get("portal_status"):
        p("  PortalStatus before stop: " + "; ".join(
            f"{k}: " + ", ".join(f"{f}={v}" for f, v in st.items())
            for k, st in report["portal_status"].items()))
    if report.get("exit_codes"):
        p("  exit codes on SIGTERM: " + ", ".join(f"{k}={v}" for k, v in report["exit_codes"].items()))
    for a in report.get("anomalies", []):
        p(f"ANOMALY: {a}")
    p(f"total wall time: {report['wall_s']:.1f} s")
    p("=" * 96)


# ---- main -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Portal tier benchmark (see module docstring).")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (median)")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per run")
    parser.add_argument("--inflight", type=int, default=64, help="the high in-flight count")
    parser.add_argument("--updates", type=int, default=500,
                        help="sequential UpdateTask calls per watch run (and MQTT publishes)")
    parser.add_argument("--loaded-seconds", type=float, default=5.0,
                        help="measured seconds of background load per watch-loaded run (0: skip)")
    parser.add_argument("--bg-inflight", type=int, default=8,
                        help="in-flight CreateTask calls of the background load")
    parser.add_argument("--call-timeout", type=float, default=10.0,
                        help="deadline of each measured call (s)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--budget", type=float, default=0,
                        help="abort after this many seconds (default: derived from the options)")
    parser.add_argument("--background-load", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.background_load:
        return background_main(args.background_load)

    per_run = args.warmup + args.duration + 1.5
    per_watch = 10 + args.updates * 0.01 + (args.loaded_seconds + 10 if args.loaded_seconds else 0)
    budget = args.budget or (90 + args.repeat * (5 * per_run + per_watch + 10))

    def on_alarm(*_: Any) -> None:
        raise BudgetExceeded(f"benchmark exceeded its {budget:.0f}s budget")
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(int(math.ceil(budget)))

    wall0 = time.perf_counter()
    workdir = tempfile.mkdtemp(prefix="tarefa-bench-portal-")
    report: dict[str, Any] = {
        "nproc": nproc(), "python": sys.version.split()[0], "grpcio": grpc.__version__,
        "workdir": workdir, "repeat": args.repeat, "warmup_s": args.warmup,
        "duration_s": args.duration, "updates": args.updates, "measurements": {},
        "anomalies": [], "targets": [],
    }
    stack = Stack(workdir)
    echo = EchoServer()
    echo_aio = EchoServer(asyncio=True)
    bg: BackgroundLoad | None = None
    timeline: list[tuple[str, float, float]] = []  # (phase, wall clock start, end)
    wall_t0 = time.time()
    ok = False
    try:
        print(f"starting the stack (broker, 3 replicas, 3 portals) in {workdir} and the echo "
              "server ...", flush=True)
        stack.start(timeout=40)
        echo.start()
        echo_aio.start()
        admin, p1, p2 = (stack.portal(n) for n in ("portal-admin", "portal-client-1",
                                                  "portal-client-2"))
        base = int(time.time() * 1000)
        cids = {k: str(base + i) for i, k in enumerate(("read", "write", "watch", "bg"))}
        for name, cid in cids.items():
            admin.admin.CreateClient(pb.CreateClientRequest(
                cid=cid, data=json.dumps({"bench": name}), request_id=uuid.uuid4().hex),
                timeout=10)
        titles = [f"read-{i:03d}" for i in range(READ_TASKS)]
        for t in titles:
            p1.client.CreateTask(pb.CreateTaskRequest(cid=cids["read"], title=t,
                                                      description="bench read set",
                                                      request_id=uuid.uuid4().hex), timeout=10)
        watch_title = "watched"
        p1.client.CreateTask(pb.CreateTaskRequest(cid=cids["watch"], title=watch_title,
                                                  request_id=uuid.uuid4().hex), timeout=10)
        st0 = p2.status()
        for t in titles:  # read once on portal-client-2
            p2.client.GetTask(pb.TaskRef(cid=cids["read"], title=t), timeout=10)
        st1 = p2.status()
        report["warm_read"] = {"hits": st1.cache_hits - st0.cache_hits,
                               "misses": st1.cache_misses - st0.cache_misses}
        replica_pids = [m.proc.pid for m in stack.members if m.proc]
        portal_pids = {pp.id: pp.proc.pid for pp in stack.portals if pp.proc}
        broker_pid = stack.broker.proc.pid if stack.broker.proc else 0
        all_pids = [echo.pid, echo_aio.pid, broker_pid, *replica_pids, *portal_pids.values()]
        print(f"clients {cids}; echo pid {echo.pid}; portal pids {portal_pids}; "
              f"first read of the {READ_TASKS} tasks on portal-client-2: {report['warm_read']}",
              flush=True)

        hi = args.inflight
        plan = [("echo", 1), ("echo", hi), ("echo-aio", hi), ("get-hit", hi), ("create", hi),
                ("create", 1)]
        runs: dict[str, list[RunResult]] = {f"{n}({k})": [] for n, k in plan}
        probes: dict[str, list[WindowProbe]] = {key: [] for key in runs}
        watch_runs: list[dict[str, Any]] = []
        loaded_runs: list[dict[str, Any]] = []
        bg_results: list[dict[str, Any]] = []
        mqtt_runs: list[dict[str, Any]] = []
        payload = sample_event_payload()
        timeline.append(("setup", wall_t0, time.time()))
        for rep in range(args.repeat):
            for name, k in plan:
                key = f"{name}({k})"
                tag = f"c{k}r{rep}-{uuid.uuid4().hex[:6]}"
                t_phase = time.time()
                if name.startswith("echo"):
                    server = echo if name == "echo" else echo_aio
                    probe = WindowProbe([], all_pids=all_pids)
                    r = run_load(key, server.address, k, echo_call(args.call_timeout),
                                 args.warmup, args.duration, server.pid, None, on_window=probe)
                elif name == "get-hit":
                    for t in titles:  # make sure every task is cached (TTL, LRU churn)
                        p2.client.GetTask(pb.TaskRef(cid=cids["read"], title=t), timeout=10)
                    probe = WindowProbe([broker_pid, portal_pids["portal-admin"],
                                         portal_pids["portal-client-1"]],
                                        {"portal": lambda: p2.status(timeout=5)}, all_pids)
                    r = run_load(key, p2.address, k,
                                 get_task_call(cids["read"], titles, args.call_timeout),
                                 args.warmup, args.duration, portal_pids["portal-client-2"],
                                 replica_pids, on_window=probe)
                else:
                    leader = stack.wait_leader(10)
                    probe = WindowProbe([broker_pid, portal_pids["portal-admin"],
                                         portal_pids["portal-client-2"]],
                                        {"leader": lambda: leader.status(timeout=5)}, all_pids)
                    r = run_load(key, p1.address, k,
                                 create_task_call(cids["write"], tag, args.call_timeout),
                                 args.warmup, args.duration, portal_pids["portal-client-1"],
                                 replica_pids, on_window=probe)
                runs[key].append(r)
                probes[key].append(probe)
                timeline.append((f"{key} r{rep + 1}", t_phase, time.time()))
                extra = ""
                if name == "get-hit":
                    hits, misses = probe.cache_delta()
                    extra = f", window cache hits {hits} misses {misses}"
                elif name == "create":
                    entries = probe.raft_entries()
                    extra = (f", {entries / args.duration:.0f} Raft entries/s, "
                             f"{r.calls / entries:.1f} writes/entry" if entries else "")
                print(f"  run {rep + 1}/{args.repeat} {key}: {r.ops_per_s:.0f} ops/s, "
                      f"p50 {r.p50_ms:.2f} ms, p99 {r.p99_ms:.2f} ms, errors "
                      f"{r.error_codes or 0}{extra}", flush=True)

            t_phase = time.time()
            w = measure_watch(p1, p2, cids["watch"], watch_title, args.updates,
                              tag=f"w{rep}-{uuid.uuid4().hex[:6]}")
            watch_runs.append(w)
            timeline.append((f"watch r{rep + 1}", t_phase, time.time()))
            print(f"  run {rep + 1}/{args.repeat} watch: {w['samples']} updates, ack->event "
                  f"p50 {w['ack_to_event_p50_ms']:.2f} ms p99 {w['ack_to_event_p99_ms']:.2f} ms, "
                  f"send->event p50 {w['send_to_event_p50_ms']:.2f} ms, lost {w['lost']}",
                  flush=True)
            if args.loaded_seconds > 0:
                t_phase = time.time()
                bg = BackgroundLoad({
                    "address": p1.address, "cid": cids["bg"], "inflight": args.bg_inflight,
                    "tag": f"bg{rep}-{uuid.uuid4().hex[:6]}", "timeout": args.call_timeout,
                    "warmup": 0.5, "duration": args.loaded_seconds,
                    "server_pid": portal_pids["portal-client-1"], "cluster_pids": replica_pids})
                bg.start()
                end = bg.window_end - 0.2
                w = measure_watch(p1, p2, cids["watch"], watch_title, args.updates,
                                  tag=f"l{rep}-{uuid.uuid4().hex[:6]}",
                                  until=lambda: time.perf_counter() >= end)
                bg_results.append(bg.result())
                bg = None
                loaded_runs.append(w)
                timeline.append((f"watch-loaded r{rep + 1}", t_phase, time.time()))
                print(f"  run {rep + 1}/{args.repeat} watch-loaded: {w['samples']} updates, "
                      f"ack->event p50 {w['ack_to_event_p50_ms']:.2f} ms p99 "
                      f"{w['ack_to_event_p99_ms']:.2f} ms; background "
                      f"{bg_results[-1]['ops_per_s']:.0f} ops/s", flush=True)
            t_phase = time.time()
            mq = measure_mqtt("127.0.0.1", stack.broker.port, args.updates, payload)
            mqtt_runs.append(mq)
            timeline.append((f"mqtt r{rep + 1}", t_phase, time.time()))
            print(f"  run {rep + 1}/{args.repeat} mqtt: publish->receive p50 "
                  f"{mq['publish_to_receive_p50_ms']:.2f} ms p99 "
                  f"{mq['publish_to_receive_p99_ms']:.2f} ms", flush=True)

        # -- summaries ----------------------------------------------------------------
        m: dict[str, Any] = {}
        for key, rs in runs.items():
            s = summarize(rs)
            s["name"] = key.split("(")[0]
            s["rest_cpu"] = median([pr.cpu for pr in probes[key]])
            totals = [r.client_cpu + r.server_cpu + sum(x for x in (r.cluster_cpu, pr.cpu)
                                                         if not math.isnan(x))
                      for r, pr in zip(rs, probes[key])]
            s["total_cpu"] = median(totals)
            s["machine_cpu"] = median([pr.machine_cpu for pr in probes[key]])
            # Everything on the machine but this client and the processes we started.
            s["foreign_cpu_runs"] = [pr.machine_cpu - r.client_cpu - pr.servers_cpu
                                     for r, pr in zip(rs, probes[key])]
            s["foreign_cpu"] = median(s["foreign_cpu_runs"])
            if key.startswith("create"):
                entries = [pr.raft_entries() for pr in probes[key]]
                s["raft_entries_per_s"] = median([e / args.duration for e in entries])
                s["writes_per_raft_entry"] = median([r.calls / e if e else math.nan
                                                     for r, e in zip(rs, entries)])
            m[key] = s
        for key, s in m.items():
            for name in ("echo", "echo-aio"):
                echo_s = m.get(f"{name}({s['inflight']})")
                s[f"vs_{name.replace('-', '_')}"] = (
                    s["ops_per_s"] / echo_s["ops_per_s"]
                    if echo_s and echo_s["ops_per_s"] else math.nan)
        g = m[f"get-hit({hi})"]
        deltas = [pr.cache_delta() for pr in probes[f"get-hit({hi})"]]
        g["hit_ratios"] = [h / (h + x) if h + x else math.nan for h, x in deltas]
        g["hits"] = sum(h for h, _ in deltas)
        g["misses"] = sum(x for _, x in deltas)
        report["measurements"] = m
        report["watch"] = summarize_watch(watch_runs)
        if loaded_runs:
            report["watch_loaded"] = summarize_watch(loaded_runs)
            report["background_load"] = bg_results
        report["mqtt"] = summarize_watch(mqtt_runs)

        echo_hi = m[f"echo({hi})"]["ops_per_s"]
        get_ratio = vs_faster_echo((m[f"get-hit({hi})"]["vs_echo"],
                                    m[f"get-hit({hi})"]["vs_echo_aio"]))
        create_ratio = vs_faster_echo((m[f"create({hi})"]["vs_echo"],
                                       m[f"create({hi})"]["vs_echo_aio"]))
        create_p99 = m[f"create({hi})"]["p99_ms"]
        watch_p99 = report["watch"]["ack_to_event_p99_ms"]
        hit_ratio = min((x for x in g["hit_ratios"] if not math.isnan(x)), default=math.nan)
        report["echo_hi_ops_per_s"] = echo_hi
        report["echo_aio_hi_ops_per_s"] = m[f"echo-aio({hi})"]["ops_per_s"]

        def target(what: str, value: float, op: str, bound: float) -> dict[str, Any]:
            ok_ = (not math.isnan(value)) and (value >= bound if op == ">=" else value <= bound)
            return {"what": what, "value": value, "target": f"{op} {bound}", "pass": ok_}

        report["targets"] = [
            target(f"GetTask cache hit({hi}) / faster echo({hi}) ops/s", get_ratio, ">=",
                   TARGET_GET_RATIO),
            target("GetTask windows: lowest cache hit ratio (validity)", hit_ratio, ">=",
                   MIN_HIT_RATIO),
            target(f"CreateTask({hi}) / faster echo({hi}) ops/s", create_ratio, ">=",
                   TARGET_CREATE_RATIO),
            target(f"CreateTask({hi}) p99 (ms)", create_p99, "<=", TARGET_CREATE_P99_MS),
            target("write on A -> event on B p99, idle (ms)", watch_p99, "<=",
                   TARGET_WATCH_P99_MS),
        ]
        for key, s in m.items():
            if any(x > FOREIGN_CPU_WARN for x in s["foreign_cpu_runs"]):
                report["anomalies"].append(
                    f"{key}: foreign load, cores busy outside the benchmark's processes per run: "
                    f"{[round(x, 2) for x in s['foreign_cpu_runs']]} (ops/s per run: "
                    f"{[round(r['ops_per_s']) for r in s['runs']]})")
            if s["errors"]:
                report["anomalies"].append(f"{key}: {s['errors']} failed calls: "
                                           f"{[r['error_codes'] for r in s['runs']]}")
        for key in ("watch", "watch_loaded"):
            w = report.get(key)
            if w and (w["lost"] or w["errors"] or w["mismatched"]):
                report["anomalies"].append(f"{key}: {w['lost']} events lost, {w['errors']} "
                                           f"updates failed, {w['mismatched']} wrong event/origin")
            if w and any(r["stream_error"] for r in w["runs"]):
                report["anomalies"].append(f"{key}: stream errors "
                                           f"{[r['stream_error'] for r in w['runs']]}")
        if report["mqtt"]["lost"]:
            report["anomalies"].append(f"mqtt: {report['mqtt']['lost']} messages lost")
        for r in bg_results:
            if r["errors"]:
                report["anomalies"].append(f"background load: {r['error_codes']}")
        statuses = {}
        for pp in stack.portals:
            st = pp.status(timeout=2)
            statuses[pp.id] = {"broker_connected": st.broker_connected,
                               "cache_entries": st.cache_entries, "cache_hits": st.cache_hits,
                               "cache_misses": st.cache_misses,
                               "events_received": st.events_received,
                               "events_published": st.events_published,
                               "events_rejected": st.events_rejected}
            if st.events_rejected:
                report["anomalies"].append(f"{pp.id}: {st.events_rejected} events rejected")
            if not st.broker_connected:
                report["anomalies"].append(f"{pp.id}: not connected to the broker at the end")
        report["portal_status"] = statuses
        ok = True
    except (BudgetExceeded, KeyboardInterrupt) as exc:
        report["anomalies"].append(str(exc) or type(exc).__name__)
        print(f"ERROR: aborted: {exc!r}", file=sys.stderr)
    finally:
        signal.alarm(0)
        if bg is not None:
            bg.stop()
        echo.stop()
        echo_aio.stop()
        exit_codes: dict[str, Any] = {}
        for proc in [*stack.portals, *stack.members]:
            try:
                if proc.alive:
                    exit_codes[proc.id] = proc.terminate()
            except Exception as exc:  # noqa: BLE001 - keep stopping the others
                exit_codes[proc.id] = repr(exc)
        stack.stop()  # closes channels, stops the broker; the others are already gone
        report["exit_codes"] = exit_codes
        for pid, rc in exit_codes.items():
            if rc != 0:
                report["anomalies"].append(f"{pid} exited with {rc} on SIGTERM")
        logs = scan_process_logs([*stack.members, *stack.portals])
        logs[stack.broker.id] = scan_broker_log(stack.broker)
        report["logs"] = logs
        for pid, info in logs.items():
            c = info["counts"]
            if c.get("critical") or c.get("traceback") or c.get("other_error"):
                report["anomalies"].append(f"{pid}: log lines {c}")
        report["timeline"] = timeline
        report["log_events_by_phase"] = attribute_log_events(stack, timeline)
        elections = sum(v.get("elections", 0) for v in report["log_events_by_phase"].values())
        if elections > 1:
            report["anomalies"].append(
                f"{elections - 1} leader election(s) after the first (see log events by phase)")
        report["wall_s"] = time.perf_counter() - wall0
        finish(report, ok, print_report, args.json, args.keep, workdir)
    all_pass = all(t["pass"] for t in report.get("targets", []))
    return 0 if ok and all_pass else (1 if ok else 2)


if __name__ == "__main__":
    sys.exit(main())
