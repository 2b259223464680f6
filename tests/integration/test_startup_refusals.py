"""A daemon that cannot own what it needs stops at once with one clear line and
exit 1, and leaves a running daemon untouched: a data dir held by another
replica, a Raft or gRPC port that is taken, a data dir that is a file, the
same portal started twice. Real processes on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import yaml

from tests.harness import ROOT, ReplicaCluster, Stack


def run_daemon(module: str, config_path: str, daemon_id: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, "--config", config_path,
                           "--id", daemon_id], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def refused(done: subprocess.CompletedProcess, words: str) -> None:
    assert done.returncode == 1, done.stderr
    assert words in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert "add_port.cc" not in done.stderr, done.stderr  # gRPC's raw line, before ours


def test_a_second_replica_on_a_running_replicas_data_dir(tmp_path):
    cluster = ReplicaCluster(str(tmp_path / "c"))
    first = cluster.members[0]
    try:
        first.start()
        cluster.wait_ready(first)
        data_dir = os.path.join(cluster.workdir, "data", "replica-1")
        done = run_daemon("daemons.replica", cluster.config_path, "replica-1")
        refused(done, f"data_dir {data_dir} is in use by another replica")
        # Refused before LevelDB was opened: it did not even rotate the first one's log.
        assert not os.path.exists(os.path.join(data_dir, "LOG.old"))
        assert first.alive and first.status().id == "replica-1"
    finally:
        cluster.stop()


def test_a_taken_raft_port_and_a_taken_grpc_port(tmp_path):
    cluster = ReplicaCluster(str(tmp_path / "c"))
    spec = cluster.specs[0]
    for key in ("raft_port", "grpc_port"):
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", spec[key]))
            holder.listen(1)
            done = run_daemon("daemons.replica", cluster.config_path, "replica-1")
        refused(done, f"cannot listen on 127.0.0.1:{spec[key]}")
    # Both refusals released the data dir: the replica starts now.
    cluster.members[0].start()
    try:
        cluster.wait_ready(cluster.members[0])
    finally:
        cluster.stop()


def test_a_data_dir_that_is_a_file(tmp_path):
    cluster = ReplicaCluster(str(tmp_path / "c"))
    os.makedirs(os.path.join(cluster.workdir, "data"))
    path = os.path.join(cluster.workdir, "data", "replica-1")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("not a directory\n")
    refused(run_daemon("daemons.replica", cluster.config_path, "replica-1"),
            f"data_dir {path}: cannot create it")


def test_the_same_portal_started_twice(tmp_path):
    stack = Stack(str(tmp_path / "s"))
    try:
        stack.start()
        portal = stack.portal("portal-client-1")
        done = run_daemon("daemons.portal", stack.config_path, "portal-client-1")
        refused(done, f"cannot listen on {portal.address}")
        assert portal.alive and portal.status().id == "portal-client-1"
    finally:
        stack.stop()


def test_a_cluster_file_with_settings_pysyncobj_refuses_exits_2(tmp_path):
    cluster = ReplicaCluster(str(tmp_path / "c"))
    with open(cluster.config_path, encoding="utf-8") as fh:
        doc = yaml.safe_load(fh)
    doc["raft"] = {"election_timeout_max": 2.0, "leader_fallback_timeout": 2.0}
    with open(cluster.config_path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(doc, fh)
    done = run_daemon("daemons.replica", cluster.config_path, "replica-1")
    assert done.returncode == 2 and "raft.connection_timeout: must be at least" in done.stderr
    assert not os.path.exists(os.path.join(cluster.workdir, "data")), "it touched the data dir"
