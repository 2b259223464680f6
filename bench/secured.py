"""What the secured default stack costs, next to the same stack unsecured.

    .venv/bin/python bench/secured.py

Starts two stacks from tests/harness.py side by side: `plain` (auth: cid-only,
plaintext gRPC, no Raft password, anonymous MQTT) and `secured` (what
config/cluster.yaml runs: admin token and client secrets, TLS with mutual TLS
to the replicas, Raft password, per-daemon MQTT logins and ACLs). Then, three
times, alternating stacks so drift hits both alike: CreateTask with 1 and 64
calls in flight and cached GetTask with 64, each 1 s warm-up + 4 s measured,
threads of blocking calls on the harness's channel to portal-client-1.
Prints the median ops/s, p50 and p99 of each, and every run's ops/s.
"""
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from proto import portal_pb2 as pb  # noqa: E402
from tests.harness import Stack  # noqa: E402

WARMUP, DURATION, REPEAT = 1.0, 4.0, 3


def load(make_call, inflight: int) -> tuple[float, float, float]:
    """`inflight` threads of blocking calls; (ops/s, p50 ms, p99 ms) of the window."""
    latencies: list[float] = []
    lock = threading.Lock()
    begin = time.perf_counter() + WARMUP
    end = begin + DURATION

    def worker(index: int) -> None:
        call, seq, mine = make_call(index), 0, []
        while (t0 := time.perf_counter()) < end:
            call(seq)
            t1 = time.perf_counter()
            seq += 1
            if begin <= t1 <= end:
                mine.append(t1 - t0)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(inflight)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=DURATION + WARMUP + 30)
    latencies.sort()
    return (len(latencies) / DURATION, latencies[len(latencies) // 2] * 1e3,
            latencies[int(len(latencies) * 0.99)] * 1e3)


def prepare(stack: Stack) -> tuple:
    """A client with one task on portal-client-1; its credentials if the stack wants them."""
    admin_md = (("authorization", f"Bearer {stack.admin_token}"),) if stack.admin_token else None
    client = stack.portal("portal-admin").admin.CreateClient(
        pb.CreateClientRequest(data="{}"), timeout=10, metadata=admin_md)
    md = (("authorization", f"Bearer {client.secret}"),) if client.secret else None
    stub = stack.portal("portal-client-1").client
    stub.CreateTask(pb.CreateTaskRequest(cid=client.cid, title="hot"), timeout=10, metadata=md)
    return stub, client.cid, md


def measurements(stub, cid: str, md) -> list[tuple[str, int, object]]:  # type: ignore[no-untyped-def]
    tag = uuid.uuid4().hex[:6]

    def create(inflight: int):  # type: ignore[no-untyped-def]
        return lambda i: lambda seq: stub.CreateTask(pb.CreateTaskRequest(
            cid=cid, title=f"{tag}-{inflight}-{i}-{seq}"), timeout=10, metadata=md)

    def get_hit(i: int):  # type: ignore[no-untyped-def]
        return lambda seq: stub.GetTask(pb.TaskRef(cid=cid, title="hot"), timeout=10, metadata=md)

    return [("create(1)", 1, create(1)), ("create(64)", 64, create(64)),
            ("get-hit(64)", 64, get_hit)]


def main() -> int:
    stacks: dict[str, Stack] = {}
    try:
        for name, secure in (("plain", False), ("secured", True)):
            stacks[name] = Stack(tempfile.mkdtemp(prefix=f"tarefa-bench-{name}-"), secure=secure)
            stacks[name].start()
        setups = {name: prepare(stack) for name, stack in stacks.items()}
        results: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
        for _ in range(REPEAT):
            for name, setup in setups.items():
                for label, inflight, make_call in measurements(*setup):
                    results.setdefault((label, name), []).append(load(make_call, inflight))
        for (label, name), runs in sorted(results.items()):
            ops, p50, p99 = (statistics.median(run[k] for run in runs) for k in range(3))
            print(f"{label:12s} {name:8s} ops/s {ops:7.0f}  p50 {p50:6.2f} ms  "
                  f"p99 {p99:6.2f} ms   runs {[round(run[0]) for run in runs]}")
    finally:
        for stack in stacks.values():
            stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
