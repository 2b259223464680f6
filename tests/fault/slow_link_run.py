"""A replica catching up from a snapshot over a slow link, inside the hub
namespace of a tests/fault/netns.Topology (started by
test_replica_faults.py as `ip netns exec HUB python -m tests.fault.slow_link_run ...`).

Three replicas, each in its own namespace; one follower is stopped while
compactions pass, the link towards it is limited to 8 Mbit/s, and it is
started again: the ~9 MB snapshot takes several times connection_timeout
(1.5 s) to arrive, and it must arrive, be restored, and leave the member
holding every acknowledged write exactly once with a digest equal to the
others'. With --other-down the third replica is down meanwhile: the
leader and the restored member must then take a write on their own before
the third comes back. Prints "restored over the slow link" and exits 0, or
prints the error and the replicas' logs and exits 1.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback

from proto import replica_pb2 as pb
from tests.fault.netns import Topology
from tests.fault.test_replica_faults import CID, catch_up_from_a_large_snapshot
from tests.harness import ReplicaCluster, apply_with_retry, new_request_id

KEYS = 300_000   # a snapshot of ~9 MB
RATE = "8mbit"   # ~1 MB/s: ~9 s to send it, six times connection_timeout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--topology", required=True, help="Topology.to_json()")
    parser.add_argument("--other-down", action="store_true",
                        help="the third replica is down while the snapshot is sent")
    args = parser.parse_args(argv)
    topo = Topology.from_json(args.topology)
    cluster = ReplicaCluster(args.workdir, raft={"compaction_min_entries": 300,
                                                 "compaction_min_seconds": 3600},
                             hosts=topo.addresses,
                             prefixes=[topo.exec_prefix(ns) for ns in topo.replicas])
    down = []

    def before_restart(lagging) -> None:  # type: ignore[no-untyped-def]
        topo.limit_rate(cluster.members.index(lagging), RATE)
        if args.other_down:
            other = next(m for m in cluster.followers() if m is not lagging)
            other.kill()
            down.append(other)

    def after_restore() -> None:
        if down:  # the leader and the restored member alone: a majority again
            apply_with_retry(cluster, pb.Command(
                request_id=new_request_id(), op=pb.CREATE_TASK, cid=CID,
                title="with one member down"), time.monotonic() + 60)
            down[0].start()
            cluster.wait_ready(down[0])

    try:
        catch_up_from_a_large_snapshot(cluster, KEYS, before_restart, after_restore)
        digests = cluster.stop_and_digest()
        assert len(set(digests.values())) == 1, digests
    except BaseException:  # noqa: BLE001 - reported to the parent
        traceback.print_exc()
        print(cluster.dump_logs())
        return 1
    finally:
        cluster.stop()
    print("restored over the slow link")
    return 0


if __name__ == "__main__":
    sys.exit(main())
