"""The robustness run under the partition nemesis, end to end, inside the hub
namespace of a tests/fault/netns.Topology (started by test_partition.py as
`ip netns exec HUB python -m tests.fault.partition_run ...`).

It starts the stack (broker and portals here in the hub, each replica in its
own namespace at its own address), checks the network is what it should be,
runs the workload under partitions, heals, judges the history with the four
checkers and writes a JSON report:

    {"summary": "...", "faults": {...}, "acknowledged": N,
     "verdicts": [{"name", "ok", "unknown", "summary", "details"}], "error": null}

Histories are written to the work directory (history.jsonl,
cached-reads.jsonl). Exit 0 when the report was written (whatever the
verdicts), 1 when the run itself failed (the report then has "error"). The
daemons it started are stopped here; the parent also kills whatever is left in
the namespaces before deleting them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import traceback

from tests.fault.netns import Topology
from tests.fault.robustness import PARTITION_KINDS, judge, run_robustness, summary
from tests.harness import Stack


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--topology", required=True, help="Topology.to_json()")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--kinds", default=",".join(PARTITION_KINDS),
                        help="comma-separated fault kinds (tests/fault/robustness.py)")
    parser.add_argument("--report", required=True)
    args = parser.parse_args(argv)

    topo = Topology.from_json(args.topology)
    stack = Stack(args.workdir, hosts=topo.addresses,
                  prefixes=[topo.exec_prefix(ns) for ns in topo.replicas])
    report: dict = {"error": None}
    run = None
    try:
        check_network(stack, topo)
        stack.start()
        run = run_robustness(stack, args.seconds, clients=args.clients, seed=args.seed,
                             kinds=tuple(args.kinds.split(",")), network=topo)
        verdicts = judge(stack, run)
        report.update(
            summary=summary(run), faults=dict(run.faults),
            acknowledged=sum(1 for o in run.history.ops if o.type == "ok"),
            verdicts=[dataclasses.asdict(v) for v in verdicts])
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        report["error"] = f"{exc!r}\n{traceback.format_exc()}"
        if run is not None:
            report.update(summary=summary(run), faults=dict(run.faults))
    finally:
        try:
            topo.heal()
        except Exception:  # noqa: BLE001 - the parent deletes the namespaces anyway
            pass
        stack.stop()
        if run is not None:
            run.history.to_jsonl(os.path.join(args.workdir, "history.jsonl"))
            run.cached.to_jsonl(os.path.join(args.workdir, "cached-reads.jsonl"))
        with open(args.report, "w", encoding="utf-8") as fh:
            json.dump(report, fh)
    return 1 if report["error"] else 0


def check_network(stack: Stack, topo: Topology) -> None:
    """Fail early and clearly if we are not in the hub or a replica address is wrong."""
    with open("/proc/self/net/dev", encoding="ascii") as fh:
        interfaces = fh.read()
    if "br0:" not in interfaces:
        raise RuntimeError(f"not running in the hub namespace {topo.hub} (no br0)")
    for spec, address in zip(stack.specs, topo.addresses):
        assert spec["host"] == address, (spec, address)


if __name__ == "__main__":
    sys.exit(main())
