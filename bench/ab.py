"""Before/after: the same write loads on two checkouts, alternated, medians.

    .venv/bin/python bench/ab.py --base REV [--rounds 4] [--duration 5]

On these shared 2-core machines absolute figures drift by ±20 % within
minutes, so a change is judged by alternating it with its base: each round
runs, on a fresh stack of each checkout in turn (base first), the two write
loads the targets are about:

  apply(64)   Replica.Apply CREATE_TASK, 64 in flight, to the leader of a
              3-replica cluster (as bench/replica.py)
  apply(1)    the same, one call in flight (p50 is the figure)
  create(64)  CreateTask, 64 in flight, through portal-client-1 of the test
              stack (replicas, broker, three portals; as bench/portal.py)

and prints per round, then as medians over the rounds: ops/s, p50/p99, and
CPU per write (ms) of the process called and of the three replicas.

`--base REV` is checked out (detached) in a temporary git worktree that is
removed afterwards; `--base-dir DIR` uses an existing checkout instead. Each
checkout's daemons run from its own tree (the harness starts them with the
checkout as the working directory), with this repository's .venv.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOADS = ("apply64", "apply1", "create64")

# Runs inside a checkout: prints one JSON line per load.
_CHILD = r"""
import json, shutil, sys, tempfile, uuid
from bench.portal import create_task_call
from bench.replica import apply_call, create_client, run_load
from proto import portal_pb2 as pb
from tests.harness import ReplicaCluster, Stack

warmup, duration = float(sys.argv[1]), float(sys.argv[2])

def report(name, r):
    print(json.dumps({"load": name, "ops": r.ops_per_s, "p50": r.p50_ms, "p99": r.p99_ms,
                      "errors": r.errors, "server_ms": 1000 * r.server_cpu / max(r.ops_per_s, 1),
                      "replicas_ms": 1000 * r.cluster_cpu / max(r.ops_per_s, 1)}), flush=True)

work = tempfile.mkdtemp(prefix="tarefa-ab-")
cluster = ReplicaCluster(work)
try:
    cluster.start()
    leader = cluster.wait_leader()
    create_client(leader.stub, "1")
    pids = [m.proc.pid for m in cluster.members]
    for name, n in (("apply64", 64), ("apply1", 1)):
        report(name, run_load(name, leader.grpc_address, n,
                              apply_call("1", uuid.uuid4().hex[:6], 5), warmup, duration,
                              leader.proc.pid, pids))
finally:
    cluster.stop()
    shutil.rmtree(work, ignore_errors=True)
work = tempfile.mkdtemp(prefix="tarefa-ab-")
stack = Stack(work)
try:
    stack.start()
    portal = stack.portal("portal-client-1")
    cid = stack.portal("portal-admin").admin.CreateClient(
        pb.CreateClientRequest(data="{}"), timeout=10).cid
    report("create64", run_load("create64", portal.address, 64,
                                create_task_call(cid, uuid.uuid4().hex[:6], 5), warmup,
                                duration, portal.proc.pid, [m.proc.pid for m in stack.members]))
finally:
    stack.stop()
    shutil.rmtree(work, ignore_errors=True)
"""


def run_checkout(root: str, warmup: float, duration: float) -> dict[str, dict]:
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(warmup), str(duration)], cwd=root,
                          env={**os.environ, "PYTHONPATH": root}, capture_output=True,
                          text=True, timeout=300)
    if proc.returncode != 0:
        raise SystemExit(f"bench/ab.py: the run in {root} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {row["load"]: row for row in rows}


def line(label: str, row: dict) -> str:
    return (f"{label:<10} {row['ops']:8.0f} {row['p50']:8.2f} {row['p99']:8.2f} "
            f"{row['server_ms']:9.3f} {row['replicas_ms']:9.3f} {row['errors']:6.0f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--base", help="git revision to compare with (temporary worktree)")
    where.add_argument("--base-dir", help="an existing checkout to compare with")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args(argv)

    worktree = None
    if args.base:
        worktree = tempfile.mkdtemp(prefix="tarefa-ab-base-")
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", "-f", worktree,
                        args.base], check=True, capture_output=True)
    base = worktree or os.path.abspath(args.base_dir)
    results: dict[str, list[dict[str, dict]]] = {"base": [], "this": []}
    header = (f"{'':<10} {'ops/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'ms/write':>9} "
              f"{'repl ms':>9} {'errors':>6}   (ms/write: CPU of the process called)")
    try:
        for n in range(args.rounds):
            for label, root in (("base", base), ("this", ROOT)):
                results[label].append(run_checkout(root, args.warmup, args.duration))
            print(f"round {n + 1}/{args.rounds}\n{header}")
            for load in LOADS:
                for label in ("base", "this"):
                    print(line(f"{load} {label}", results[label][-1][load]))
            sys.stdout.flush()
    finally:
        if worktree:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", worktree],
                           capture_output=True)
            shutil.rmtree(worktree, ignore_errors=True)
    print(f"\nmedians over {args.rounds} rounds (base = {args.base or base}, this = {ROOT})")
    print(header)
    for load in LOADS:
        for label in ("base", "this"):
            runs = [r[load] for r in results[label]]
            print(line(f"{load} {label}", {k: statistics.median(r[k] for r in runs)
                                          for k in runs[0] if k != "load"}))
    for load, key in (("apply64", "ops"), ("apply1", "p50"), ("create64", "ops"),
                      ("create64", "p99")):
        before = statistics.median(r[load][key] for r in results["base"])
        after = statistics.median(r[load][key] for r in results["this"])
        print(f"{load} {key}: {before:.2f} -> {after:.2f} ({after / before:.2f} x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
