"""Network namespaces for the partition nemesis: a private network the test
creates, breaks, heals and deletes, never touching the host's own.

`Topology.create(replicas)` builds, with unique names (random suffix):

    hub namespace  tarefa-<id>-hub : lo, bridge br0 10.213.0.1/24, ports v1..vN
    replica i      tarefa-<id>-r<i>: lo, eth0 10.213.0.<10+i>/24, the other
                                     end of veth pair v<i>

Every command runs as `ip -n NS ...` or `ip netns exec NS ...` on the
namespaces created here; nothing is added to the root namespace (the veth
pairs are created in the hub, their replica end moved straight into the
replica's namespace). The broker, portals and the test's clients run in the
hub, each replica in its own namespace, so:

- `isolate(i)`: eth0 of replica i down — it reaches nobody and nobody reaches
  it (the bridge drops what is sent to it: TCP peers hang, not reset);
- `cut(i, j)`: blackhole routes both ways between replicas i and j only —
  with `cut` from i to every other replica, i is cut off from its peers but
  still answers the portals (a deposed leader still serving clients);
- `heal()`: every link up, every blackhole route removed;
- `limit_rate(i, rate)`: a slow link towards replica i (tc on the hub's v<i>).

`destroy()` kills by PID every process still in one of these namespaces
(`ip netns pids`), then deletes the namespaces (which deletes the bridge and
the veth pairs). Every command has a timeout.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field

SUBNET = "10.213.0"
PREFIX = "tarefa-"
IP_TIMEOUT = 10.0


class NetnsError(RuntimeError):
    pass


def ip(*args: str, check: bool = True, timeout: float = IP_TIMEOUT) -> str:
    """Run `ip ARGS`; raise NetnsError (with stderr) when check and it fails."""
    try:
        done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise NetnsError(f"ip {' '.join(args)}: timed out after {timeout}s") from exc
    if check and done.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def unavailable_reason() -> str | None:
    """None when this machine can run the partition nemesis, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    probe = f"{PREFIX}probe-{secrets.token_hex(4)}"
    try:
        ip("netns", "add", probe)
    except (NetnsError, OSError) as exc:
        return f"ip netns is unavailable here: {exc}"
    try:
        ip("-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1")
        ip("-n", probe, "link", "add", "b0", "type", "bridge")
    except NetnsError as exc:
        return f"veth pairs or bridges cannot be created in a namespace: {exc}"
    finally:
        ip("netns", "del", probe, check=False)
    return None


@dataclass
class Topology:
    """The namespaces of one run; JSON-serialisable so a child can reuse it."""

    hub: str
    replicas: list[str]                      # namespace of replica i (0-based)
    addresses: list[str]                     # its address
    cuts: set[tuple[int, int]] = field(default_factory=set)
    down: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    # -- building and tearing down ---------------------------------------------

    @classmethod
    def create(cls, replicas: int = 3) -> "Topology":
        run_id = secrets.token_hex(4)
        topo = cls(hub=f"{PREFIX}{run_id}-hub",
                   replicas=[f"{PREFIX}{run_id}-r{i + 1}" for i in range(replicas)],
                   addresses=[f"{SUBNET}.{11 + i}" for i in range(replicas)])
        created: list[str] = []
        try:
            ip("netns", "add", topo.hub)
            created.append(topo.hub)
            hub = ["-n", topo.hub]
            ip(*hub, "link", "set", "lo", "up")
            ip(*hub, "link", "add", "br0", "type", "bridge")
            ip(*hub, "addr", "add", f"{SUBNET}.1/24", "dev", "br0")
            ip(*hub, "link", "set", "br0", "up")
            for i, (ns, address) in enumerate(zip(topo.replicas, topo.addresses)):
                ip("netns", "add", ns)
                created.append(ns)
                ip("-n", ns, "link", "set", "lo", "up")
                ip(*hub, "link", "add", f"v{i + 1}", "type", "veth",
                   "peer", "name", "eth0", "netns", ns)
                ip(*hub, "link", "set", f"v{i + 1}", "master", "br0")
                ip(*hub, "link", "set", f"v{i + 1}", "up")
                ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
                ip("-n", ns, "link", "set", "eth0", "up")
        except BaseException:
            destroy_namespaces(created)
            raise
        return topo

    @property
    def namespaces(self) -> list[str]:
        return [self.hub, *self.replicas]

    def exec_prefix(self, ns: str) -> list[str]:
        """argv prefix running a command in `ns` (ip execs: the PID is the command's)."""
        return ["ip", "netns", "exec", ns]

    def destroy(self) -> list[int]:
        """Kill every process left in our namespaces, delete them; return the PIDs killed."""
        return destroy_namespaces(self.namespaces)

    def to_json(self) -> str:
        return json.dumps({"hub": self.hub, "replicas": self.replicas,
                           "addresses": self.addresses})

    @classmethod
    def from_json(cls, text: str) -> "Topology":
        doc = json.loads(text)
        return cls(hub=doc["hub"], replicas=doc["replicas"], addresses=doc["addresses"])

    # -- faults ----------------------------------------------------------------

    def isolate(self, i: int) -> None:
        """Replica i loses its only link: cut off from replicas, portals and broker."""
        with self._lock:
            ip("-n", self.replicas[i], "link", "set", "eth0", "down")
            self.down.add(i)

    def reconnect(self, i: int) -> None:
        with self._lock:
            ip("-n", self.replicas[i], "link", "set", "eth0", "up")
            self.down.discard(i)

    def cut(self, i: int, j: int) -> None:
        """Replicas i and j no longer reach each other (silently dropped both ways)."""
        with self._lock:
            pair = (min(i, j), max(i, j))
            if pair in self.cuts:
                return
            ip("-n", self.replicas[i], "route", "add", "blackhole", f"{self.addresses[j]}/32")
            ip("-n", self.replicas[j], "route", "add", "blackhole", f"{self.addresses[i]}/32")
            self.cuts.add(pair)

    def join(self, i: int, j: int) -> None:
        with self._lock:
            pair = (min(i, j), max(i, j))
            for a, b in (pair, pair[::-1]):
                ip("-n", self.replicas[a], "route", "del", "blackhole",
                   f"{self.addresses[b]}/32", check=False)
            self.cuts.discard(pair)

    def limit_rate(self, i: int, rate: str) -> None:
        """What the hub sends to replica i (from every peer, and the test's
        calls) at most `rate` (tc's syntax, e.g. "8mbit"): a slow link."""
        subprocess.run(["ip", "netns", "exec", self.hub, "tc", "qdisc", "replace", "dev",
                        f"v{i + 1}", "root", "tbf", "rate", rate, "burst", "64kb",
                        "latency", "1s"],
                       check=True, capture_output=True, timeout=IP_TIMEOUT,
                       stdin=subprocess.DEVNULL)

    def heal(self) -> None:
        """Every link up and every cut joined (also those a failed step left behind)."""
        for i in range(len(self.replicas)):
            self.reconnect(i)
            for j in range(i + 1, len(self.replicas)):
                self.join(i, j)

    def wait_reachable(self, host: str, port: int, timeout: float = 10.0) -> None:
        """From this process's namespace, wait until host:port accepts TCP."""
        import socket

        deadline = time.monotonic() + timeout
        while True:
            with socket.socket() as s:
                s.settimeout(0.3)
                if s.connect_ex((host, port)) == 0:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{host}:{port} not reachable after {timeout}s")
            time.sleep(0.1)


def namespace_pids(ns: str) -> list[int]:
    try:
        out = ip("netns", "pids", ns, check=False)
    except NetnsError:
        return []
    return [int(p) for p in out.split() if p.strip().isdigit()]


def destroy_namespaces(namespaces: list[str], timeout: float = 15.0) -> list[int]:
    """Kill (by PID) what runs in each namespace, then delete it. Bounded."""
    killed: list[int] = []
    existing = set(ip("netns", "list", check=False).split())
    namespaces = [ns for ns in namespaces if ns in existing]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = [p for ns in namespaces for p in namespace_pids(ns) if p != os.getpid()]
        if not pids:
            break
        for pid in pids:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            if pid not in killed:
                killed.append(pid)
        time.sleep(0.1)
    for ns in namespaces:
        ip("netns", "del", ns, check=False)
    return killed
