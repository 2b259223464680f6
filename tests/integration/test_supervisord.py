"""The real supervisord.conf starts the real stack.

The repository's supervisord.conf, config/cluster.yaml and
config/mosquitto.conf are copied into a temporary directory with every port
replaced by a free one (nothing else changes; `.venv` is linked), so the
test exercises the shipped files without colliding with a stack an operator
may be running on the default ports.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import yaml

from tests.harness import ROOT, free_ports, wait_for


def render(tmp: str) -> str:
    os.makedirs(os.path.join(tmp, "config"))
    os.symlink(os.path.join(ROOT, ".venv"), os.path.join(tmp, ".venv"))
    with open(os.path.join(ROOT, "config", "cluster.yaml"), encoding="utf-8") as fh:
        cluster = yaml.safe_load(fh)
    ports = iter(free_ports(20))
    broker_port = next(ports)
    cluster["broker"]["port"] = broker_port
    for replica in cluster["replicas"]:
        replica["raft_port"], replica["grpc_port"] = next(ports), next(ports)
    for portal in cluster["portals"]:
        portal["port"] = next(ports)
    cluster["listener"]["port"] = next(ports)
    with open(os.path.join(tmp, "config", "cluster.yaml"), "w", encoding="utf-8") as fh:
        yaml.safe_dump(cluster, fh, sort_keys=False)
    with open(os.path.join(ROOT, "config", "mosquitto.conf"), encoding="utf-8") as fh:
        mosquitto = fh.read()
    mosquitto, n = re.subn(r"^listener 1883 ", f"listener {broker_port} ", mosquitto, flags=re.M)
    assert n == 1, "config/mosquitto.conf no longer has 'listener 1883'"
    # The default of 1000 silently dropped audit events (test_listener.py's burst test).
    assert re.search(r"^max_queued_messages 1000000$", mosquitto, flags=re.M)
    with open(os.path.join(tmp, "config", "mosquitto.conf"), "w", encoding="utf-8") as fh:
        fh.write(mosquitto)
    with open(os.path.join(ROOT, "supervisord.conf"), encoding="utf-8") as src, \
            open(os.path.join(tmp, "supervisord.conf"), "w", encoding="utf-8") as dst:
        dst.write(src.read())
    os.makedirs(os.path.join(tmp, "run", "log"))
    # What install.sh does after creating .venv: the secured default stack's material.
    subprocess.run([os.path.join(ROOT, ".venv", "bin", "tarefa-secrets"), "--config",
                    os.path.join(tmp, "config", "cluster.yaml")], check=True,
                   capture_output=True, timeout=60)
    return os.path.join(tmp, "config", "cluster.yaml")


def _runs_from(pid: int, directory: str) -> bool:
    """Whether `pid` is alive and one of this test's programs (every command
    line of the rendered supervisord.conf names a path under `directory`)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return directory.encode() in handle.read()
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_stack_under_supervisord(tmp_path):
    tmp = str(tmp_path / "a checkout")  # a name with a space: paths must be quoted
    config = render(tmp)
    conf = os.path.join(tmp, "supervisord.conf")
    ctl = [os.path.join(ROOT, ".venv", "bin", "supervisorctl"), "-c", conf]
    supervisord = subprocess.Popen(
        [os.path.join(ROOT, ".venv", "bin", "supervisord"), "-n", "-c", conf],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    secret: dict[str, str] = {}  # the client's secret once made, for task verbs (TAREFA_SECRET)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "client", "--config", config, *args],
                              cwd=ROOT, capture_output=True, text=True, timeout=60,
                              env={**os.environ, **secret})

    def supervisorctl(*args: str) -> str:
        return subprocess.run(ctl + list(args), capture_output=True, text=True,
                              timeout=60).stdout

    pids: list[int] = []
    try:
        # The shipped stack runs auth: token; the operator's CLI finds the admin
        # token through the cluster file, and the new client's secret is printed once.
        added = json.loads(wait_for(lambda: cli("--json", "client", "add",
                                                '{"name": "Ana"}').stdout.strip(), 30,
                                    "the stack to answer the CLI"))
        cid = added["cid"]
        secret["TAREFA_SECRET"] = added["secret"]
        names = ("broker", "replica-1", "replica-2", "replica-3", "portal-admin",
                 "portal-client-1", "portal-client-2", "listener")
        # supervisord says RUNNING once a program has stayed up `startsecs`.
        wait_for(lambda: all(re.search(rf"^{n}\s+RUNNING", supervisorctl("status"), re.M)
                             for n in names), 30, "every program RUNNING")
        pids = [int(p) for p in supervisorctl("pid", "all").split() if p.isdigit()]
        assert len(pids) == 8
        assert cli("task", "add", "--cid", cid, "buy milk").returncode == 0

        assert "stopped" in supervisorctl("stop", "replica-2", "portal-client-1")
        r = cli("--json", "task", "done", "--cid", cid, "buy milk")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["status"] == "done"
        r = cli("--json", "cluster", "status")
        assert r.returncode == 3  # two daemons are down, and the table says which
        down = {d["id"] for d in json.loads(r.stdout)["daemons"] if not d["reachable"]}
        assert down == {"replica-2", "portal-client-1"}

        assert "started" in supervisorctl("start", "replica-2", "portal-client-1")
        wait_for(lambda: cli("cluster", "status").returncode == 0, 30, "every daemon back")
        r = cli("--json", "task", "ls", "--cid", cid)
        assert [t["status"] for t in json.loads(r.stdout)["tasks"]] == ["done"]
        pids += [int(p) for p in supervisorctl("pid", "replica-2", "portal-client-1").split()
                 if p.isdigit()]
        tail = supervisorctl("tail", "replica-1")
        assert "[replica-1]" in tail
        audit = os.path.join(tmp, "run", "audit", "audit.jsonl")
        wait_for(lambda: os.path.exists(audit) and sum(1 for _ in open(audit)) >= 3, 10,
                 "the listener to write the audit log")
        # Found by review: replica data was 0644 in 0755 directories, readable by
        # every local user. The daemons' own files are for no "others" now (the
        # logs supervisord writes follow its umask=027 once daemonized; this
        # test runs it in the foreground, where supervisord applies none).
        for top in ("data", "audit"):
            for where, dirs, files in os.walk(os.path.join(tmp, "run", top)):
                for name in [*dirs, *files]:
                    mode = os.stat(os.path.join(where, name)).st_mode & 0o777
                    assert not mode & 0o007, (os.path.join(where, name), oct(mode))
        supervisorctl("shutdown")
        supervisord.wait(60)
    finally:
        if supervisord.poll() is None:
            supervisord.send_signal(signal.SIGTERM)
            try:
                supervisord.wait(60)
            except subprocess.TimeoutExpired:
                supervisord.kill()
        for pid in pids:  # nothing may outlive supervisord
            if not _runs_from(pid, tmp):
                continue  # gone (a PID reused since is not ours: never signalled)
            os.kill(pid, signal.SIGKILL)
            pytest.fail(f"process {pid} outlived supervisord")
