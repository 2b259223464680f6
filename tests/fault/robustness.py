"""A Jepsen-style robustness run: clients record a history while a nemesis
injects faults into a full stack; checkers then judge the history.

`run_robustness(stack, seconds, ...)` drives:

- clients: threads doing a mixed workload on a few task keys of one client
  through the two client portals — creates, writes (UpdateTask description),
  deletes, LINEARIZABLE reads (checked as a register) and cached reads
  (checked for staleness per portal) — each recording invoke/complete
  events with timestamps (tests/fault/history.py);
- watchers: a WatchTasks stream per client portal recording which revisions
  each portal is known to have received;
- the nemesis: every few seconds one fault — SIGKILL a replica (leader
  favoured) and restart it, SIGSTOP the leader past the election timeout
  then SIGCONT, kill and restart the broker, kill and restart a client
  portal;
- with `network` (a tests/fault/netns.Topology, the replicas each in its own
  network namespace) and `kinds=PARTITION_KINDS`, partitions instead:
  isolate a replica from everyone (leader favoured), cut a replica off from
  its peers while the portals still reach it (leader favoured: a deposed
  leader keeps getting reads and writes), or cut the link between two
  replicas only (a partial partition); each healed after a few seconds.
  tests/fault/partition_run.py runs this inside the namespaces.

Every loop is bounded in count and time.
"""

from __future__ import annotations

import collections
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import grpc

from proto import portal_pb2 as pb
from tests.fault.checkers import (check_cache_monotonic, check_converged,
                                  check_linearizable, check_no_lost_or_duplicated)
from tests.fault.checkers.verdict import Verdict
from tests.fault.history import History
from tests.harness import PortalProcess, Stack, wait_for

CID = "31415926535897932384626"
KEYS_PER_GENERATION = 6
# Clients move to fresh keys every GENERATION_SECONDS, which keeps each key's
# history small enough for the linearizability search even in a long soak.
GENERATION_SECONDS = 20.0
PROCESS_KINDS = ("kill_replica", "pause_leader", "kill_broker", "kill_portal")
PARTITION_KINDS = ("isolate_replica", "isolate_from_peers", "cut_link")
UNCERTAIN = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
             grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED)


@dataclass
class Run:
    history: History = field(default_factory=History)      # linearizable ops
    cached: History = field(default_factory=History)       # cached reads
    received: list[tuple[str, str, int, float]] = field(default_factory=list)
    faults: collections.Counter = field(default_factory=collections.Counter)
    stop: threading.Event = field(default_factory=threading.Event)
    ending: threading.Event = field(default_factory=threading.Event)  # the nemesis is done


def _key(title: str) -> str:
    return f"{CID}/{title}"


class Client(threading.Thread):
    def __init__(self, run: Run, process: int, portals: list[PortalProcess], seed: int,
                 started: float) -> None:
        super().__init__(name=f"client-{process}", daemon=True)
        self.run_ = run
        self.process = process
        self.portals = portals
        self.rng = random.Random(seed)
        self.started = started
        self.count = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not (self.run_.stop.is_set() or self.run_.ending.is_set()):
                self.one()
                self.count += 1
        except BaseException as exc:  # noqa: BLE001 - an unexpected answer fails the run
            self.error = exc

    def one(self) -> None:
        portal = self.portals[(self.process + self.count) % len(self.portals)] \
            if self.rng.random() < 0.2 else self.portals[self.process % len(self.portals)]
        generation = int((time.monotonic() - self.started) // GENERATION_SECONDS)
        title = f"key/{generation}/{self.rng.randrange(KEYS_PER_GENERATION)}"
        f = self.rng.choices(["create", "write", "delete", "read", "cached"],
                             weights=[2, 3, 1, 3, 3])[0]
        value = f"p{self.process}-{self.count}"
        history = self.run_.cached if f == "cached" else self.run_.history
        op = history.invoke(self.process, "read" if f == "cached" else f, _key(title),
                            value if f in ("create", "write") else None, portal.id)
        stub = portal.client
        try:
            if f == "create":
                t = stub.CreateTask(pb.CreateTaskRequest(cid=CID, title=title, description=value),
                                    timeout=3)
                history.complete(op, "ok", "ok", revision=t.revision)
            elif f == "write":
                t = stub.UpdateTask(pb.UpdateTaskRequest(cid=CID, title=title, description=value),
                                    timeout=3)
                history.complete(op, "ok", "ok", revision=t.revision)
            elif f == "delete":
                d = stub.DeleteTask(pb.DeleteTaskRequest(cid=CID, title=title), timeout=3)
                history.complete(op, "ok", "ok", revision=d.revision)
            else:
                consistency = pb.CACHED if f == "cached" else pb.LINEARIZABLE
                t = stub.GetTask(pb.TaskRef(cid=CID, title=title, consistency=consistency),
                                 timeout=3)
                history.complete(op, "ok", "ok", value=t.description, revision=t.revision)
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.ALREADY_EXISTS:
                history.complete(op, "ok", "exists")
            elif code == grpc.StatusCode.NOT_FOUND:
                history.complete(op, "ok", "absent")
            elif code in UNCERTAIN:
                # A read has no effect: a failed one is simply a failure.
                history.complete(op, "fail" if op.f == "read" else "info")
                time.sleep(0.05)
            else:
                history.complete(op, "fail")
                raise


class Watcher(threading.Thread):
    """Records (portal, key, revision, time) for every event a portal streams."""

    def __init__(self, run: Run, portal: PortalProcess) -> None:
        super().__init__(name=f"watch-{portal.id}", daemon=True)
        self.run_ = run
        self.portal = portal
        self.call: Any = None

    def run(self) -> None:
        for _ in range(10_000):
            if self.run_.stop.is_set():
                return
            try:
                self.call = self.portal.client.WatchTasks(pb.WatchTasksRequest(cid=CID))
                for event in self.call:
                    if event.title:
                        self.run_.received.append((self.portal.id, _key(event.title),
                                                   event.revision, time.monotonic()))
            except grpc.RpcError:
                time.sleep(0.1)

    def cancel(self) -> None:
        if self.call is not None:
            self.call.cancel()


class Nemesis(threading.Thread):
    """Injects faults until `deadline` and until it has injected `min_faults`,
    but not past `last`; then sets run.ending, which stops the clients."""

    def __init__(self, run: Run, stack: Stack, seed: int, deadline: float,
                 kinds: tuple[str, ...] = PROCESS_KINDS, network: Any = None,
                 min_faults: int = 0, last: float | None = None) -> None:
        super().__init__(name="nemesis", daemon=True)
        self.run_ = run
        self.stack = stack
        self.rng = random.Random(seed)
        self.deadline = deadline
        self.min_faults = min_faults
        self.last = deadline if last is None else last
        self.kinds = kinds
        self.network = network
        self.error: BaseException | None = None

    def leader_or_random(self):  # type: ignore[no-untyped-def]
        live = [m for m in self.stack.members if m.alive]
        if self.rng.random() < 0.6:
            for m in live:
                try:
                    if m.status(timeout=0.5).role == "leader":
                        return m
                except grpc.RpcError:
                    pass
        return self.rng.choice(live)

    def run(self) -> None:
        try:
            while not self.run_.stop.wait(self.rng.uniform(1.5, 3.0)):
                now = time.monotonic()
                if now > self.deadline and (sum(self.run_.faults.values()) >= self.min_faults
                                            or now > self.last):
                    return
                self.inject(self.rng.choice(self.kinds))
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        finally:
            self.run_.ending.set()

    def inject(self, kind: str) -> None:
        self.run_.faults[kind] += 1
        pause = self.rng.uniform(1.0, 2.5)
        if kind in PARTITION_KINDS:
            self.partition(kind)
        elif kind == "kill_replica":
            member = self.leader_or_random()
            member.kill()
            time.sleep(pause)
            member.start()
            self.stack.wait_ready(member, timeout=30)
        elif kind == "pause_leader":
            member = self.leader_or_random()
            member.signal(signal.SIGSTOP)
            time.sleep(max(pause, 1.6))  # past election_timeout_max (1.4 s)
            member.signal(signal.SIGCONT)
        elif kind == "kill_broker":
            self.stack.broker.kill()
            time.sleep(pause)
            self.stack.broker.start()
            self.stack.broker.wait_ready()
        else:
            portal = self.rng.choice([p for p in self.stack.portals if "client" in p.spec["services"]])
            portal.kill()
            time.sleep(pause)
            portal.start()
            portal.wait_ready(timeout=30)

    def partition(self, kind: str) -> None:
        """Break the network for longer than leader_fallback_timeout (2 s) plus an
        election, so a cut-off leader steps down and the others elect anew; heal."""
        net = self.network
        assert net is not None, "partition faults need a network (tests/fault/netns.py)"
        members = self.stack.members
        hold = self.rng.uniform(2.5, 5.0)
        if kind == "cut_link":
            i, j = self.rng.sample(range(len(members)), 2)
            _note(f"{kind} {members[i].id} x {members[j].id} for {hold:.1f}s")
            net.cut(i, j)
            time.sleep(hold)
            net.join(i, j)
            return
        i = members.index(self.leader_or_random())
        _note(f"{kind} {members[i].id} for {hold:.1f}s")
        if kind == "isolate_replica":
            net.isolate(i)
            time.sleep(hold)
            net.reconnect(i)
        else:  # isolate_from_peers: still reachable from the portals
            others = [j for j in range(len(members)) if j != i]
            try:
                for j in others:
                    net.cut(i, j)
                time.sleep(hold)
            finally:
                for j in others:
                    net.join(i, j)


def _note(what: str) -> None:
    """A timestamped line on stdout (the partition runner's log) to match with daemon logs."""
    print(f"{time.strftime('%H:%M:%S')}.{int(time.time() * 1000) % 1000:03d} nemesis: {what}",
          flush=True)


def run_robustness(stack: Stack, seconds: float, clients: int = 6, seed: int = 1,
                   kinds: tuple[str, ...] = PROCESS_KINDS, network: Any = None,
                   min_faults: int = 0) -> Run:
    """Create the client, run the workload under faults, heal, and return the record.

    The workload runs `seconds`, and on until the nemesis has injected
    `min_faults` (each fault waits for its daemon to restart, which takes
    longer on a busy machine), at most twice as long."""
    run = Run()
    admin = stack.portal("portal-admin").admin
    wait_for(lambda: admin.CreateClient(pb.CreateClientRequest(cid=CID, data="{}"), timeout=5),
             30, "the test client to be created")
    portals = [p for p in stack.portals if "client" in p.spec["services"]]
    started = time.monotonic()
    deadline = started + seconds
    watchers = [Watcher(run, p) for p in portals]
    workers = [Client(run, i, portals, seed * 1000 + i, started) for i in range(clients)]
    last = started + 2 * seconds if min_faults else deadline
    nemesis = Nemesis(run, stack, seed, deadline, kinds, network, min_faults, last)
    for thread in [*watchers, *workers, nemesis]:
        thread.start()
    # The last fault may begin just before `last` and wait up to 30 s for its daemon.
    nemesis.join(max(0.0, last - time.monotonic()) + 60)
    run.ending.set()
    for worker in workers:
        worker.join(30)  # each call has a 3 s timeout
    run.stop.set()
    for watcher in watchers:
        watcher.cancel()
        watcher.join(10)
    assert not any(t.is_alive() for t in workers), "clients did not stop"
    if network is not None:
        network.heal()
    assert not nemesis.is_alive(), "the nemesis did not stop (still injecting faults)"
    if nemesis.error is not None:
        raise nemesis.error
    for worker in workers:  # e.g. INTERNAL from a portal: a bug, whatever the checkers say
        if worker.error is not None:
            raise AssertionError(f"{worker.name} stopped on an unexpected answer: "
                                 f"{worker.error!r}") from worker.error
    heal(stack)
    return run


def heal(stack: Stack) -> None:
    """Every daemon running and un-paused; the replicas agreed and caught up."""
    for daemon in [stack.broker, *stack.members, *stack.portals]:
        if daemon.alive:
            daemon.signal(signal.SIGCONT)
        else:
            daemon.start()
    stack.broker.wait_ready()
    for portal in stack.portals:
        portal.wait_ready(timeout=30)
    stack.wait_leader(timeout=30)
    stack.wait_converged(timeout=60)


def final_state(stack: Stack, run: Run) -> dict[str, tuple[Any, int] | None]:
    """Every key's value and revision, read LINEARIZABLE after the run."""
    portal = next(p for p in stack.portals if "client" in p.spec["services"])
    state: dict[str, tuple[Any, int] | None] = {}
    titles = sorted({op.key.split("/", 1)[1] for op in run.history.ops})
    for title in titles:
        try:
            t = portal.client.GetTask(pb.TaskRef(cid=CID, title=title,
                                                 consistency=pb.LINEARIZABLE), timeout=10)
            state[_key(title)] = (t.description, t.revision)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
            state[_key(title)] = None
    return state


def check_no_critical_lines(stack: Stack) -> Verdict:
    """No daemon logged a CRITICAL line (PySyncObj's "truncating already-applied
    log entries", a replica's fatal stop, ...): each is a real fault of ours or
    of PySyncObj, even when the other checkers pass. Run after the stack stopped."""
    lines = []
    for process in [*stack.members, *stack.portals]:
        lines += [f"{process.id}: {line}" for line in process.logs().splitlines()
                  if " CRITICAL " in line]
    return Verdict(ok=not lines, name="no CRITICAL log lines",
                   summary=f"{len(lines)} CRITICAL lines in the daemons' logs",
                   details=lines[:20])


def judge(stack: Stack, run: Run) -> list[Verdict]:
    """Every checker's verdict on a finished run; stops the replicas (to digest them)."""
    state = final_state(stack, run)
    return [
        check_no_lost_or_duplicated(run.history, state),
        check_linearizable(run.history),
        check_cache_monotonic(History.merged(run.history, run.cached), run.received),
        check_converged(stack.stop_and_digest()),
        check_no_critical_lines(stack),
    ]


def verdict_line(summary_text: str, verdicts: list[Verdict]) -> str:
    """The one line every fault run prints: its summary, then each verdict."""
    return summary_text + "; verdicts: " + ", ".join(
        f"{v.name}={'ok' if v.ok else 'UNKNOWN' if v.unknown else 'VIOLATION'}"
        for v in verdicts)


def summary(run: Run) -> str:
    ops = [o for o in run.history.ops + run.cached.ops if o.type != "invoke"]
    by_type = collections.Counter(o.type for o in ops)
    faults = ", ".join(f"{k}={v}" for k, v in sorted(run.faults.items())) or "none"
    return (f"ops attempted={len(ops)} acknowledged={by_type['ok']} "
            f"failed-definitely={by_type['fail']} indeterminate={by_type['info']}; "
            f"faults: {faults}")
