"""Writes while the replicas compact a large store: elections and latency.

    .venv/bin/python bench/compaction.py [--keys 1000000] [--every 1000]
                                         [--repeat 3] [--duration 10] [--json FILE]

Log compaction writes a snapshot of the whole LevelDB. Every member compacts
at about the same Raft index, so how the dump is written decides what writers
see while it runs. This benchmark starts 3 replicas whose LevelDBs already
hold `--keys` small filler records (tests/harness.preload; 10^6 keys is
~40 MB and a ~2-3 s dump here), then alternates, `--repeat` times, two
Apply(64) runs of `--duration` seconds to the leader (bench/replica.py's
client, CREATE_TASK):

  steady      a cluster that never compacts during the run
              (compaction_min_entries far above the run's entries)
  compacting  a cluster of the same data that compacts every `--every`
              Raft entries (compaction_min_seconds 3600)

Each run has its own fresh cluster (preloaded the same way), so both see the
same data and the same machine. Reported per kind, medians over the repeats:
writes/s, p50/p99/max latency, snapshots written during the run (summed over
the members, from their logs) and elections (Raft term changes seen by the
leader's Status between the window's start and end). Informational: there
is no target; the point is the ratio of compacting to steady and the
election count, which was one or more per compaction while dumps ran on
PySyncObj's tick thread.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.replica import apply_call, create_client, median, run_load  # noqa: E402
from tests.harness import ReplicaCluster, preload  # noqa: E402

SNAPSHOT_LINE = re.compile(r"snapshot at Raft index \d+: \d+ keys")


def one_run(kind: str, keys: int, every: int, warmup: float, duration: float) -> dict[str, Any]:
    workdir = tempfile.mkdtemp(prefix=f"tarefa-bench-compaction-{kind}-")
    raft = ({"compaction_min_entries": every, "compaction_min_seconds": 3600}
            if kind == "compacting" else
            {"compaction_min_entries": 10_000_000, "compaction_min_seconds": 3600})
    cluster = ReplicaCluster(workdir, size=3, raft=raft)
    try:
        preload(cluster, keys)
        cluster.start(timeout=120)
        leader = cluster.wait_leader(30)
        cid = str(int(time.time() * 1000))
        create_client(leader.stub, cid)
        snapshots_before = sum(len(SNAPSHOT_LINE.findall(m.logs())) for m in cluster.members)
        terms: dict[str, int] = {}

        def on_window(edge: str) -> None:
            terms[edge] = leader.status(timeout=5).term

        result = run_load(f"apply-{kind}", leader.grpc_address, 64,
                          apply_call(cid, f"{kind[0]}-{uuid.uuid4().hex[:6]}", 10.0),
                          warmup, duration, leader.proc.pid,
                          [m.proc.pid for m in cluster.members], on_window=on_window)
        snapshots = sum(len(SNAPSHOT_LINE.findall(m.logs())) for m in cluster.members)
        return {"ops_per_s": result.ops_per_s, "p50_ms": result.p50_ms,
                "p99_ms": result.p99_ms, "max_ms": result.max_ms, "errors": result.errors,
                "elections": terms["end"] - terms["begin"],
                "snapshots": snapshots - snapshots_before}
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Writes during log compaction (see docstring).")
    parser.add_argument("--keys", type=int, default=1_000_000, help="filler records preloaded")
    parser.add_argument("--every", type=int, default=1000,
                        help="compaction_min_entries of the compacting runs")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args(argv)

    runs: dict[str, list[dict[str, Any]]] = {"steady": [], "compacting": []}
    for rep in range(args.repeat):
        for kind in runs:
            r = one_run(kind, args.keys, args.every, args.warmup, args.duration)
            runs[kind].append(r)
            print(f"  run {rep + 1}/{args.repeat} {kind}: {r['ops_per_s']:.0f} writes/s, "
                  f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, "
                  f"max {r['max_ms']:.0f} ms, {r['snapshots']} snapshots, "
                  f"{r['elections']} elections, {r['errors']} errors", flush=True)
    summary = {kind: {k: median([r[k] for r in rs]) for k in rs[0]} for kind, rs in runs.items()}
    print(f"\n{args.keys:,} keys preloaded; Apply(64) to the leader, {args.duration:.0f} s runs, "
          f"medians of {args.repeat}")
    print(f"{'':12} {'writes/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} "
          f"{'snapshots':>9} {'elections':>9}")
    for kind, s in summary.items():
        print(f"{kind:12} {s['ops_per_s']:9.0f} {s['p50_ms']:7.1f} {s['p99_ms']:7.1f} "
              f"{s['max_ms']:7.0f} {s['snapshots']:9.0f} {s['elections']:9.0f}")
    steady = summary["steady"]["ops_per_s"]
    ratio = summary["compacting"]["ops_per_s"] / steady if steady else float("nan")
    print(f"compacting / steady writes/s: {ratio:.2f}")
    if args.json:
        import json

        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"keys": args.keys, "every": args.every, "runs": runs,
                       "summary": summary, "ratio": ratio}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
