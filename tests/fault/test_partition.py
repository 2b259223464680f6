"""The robustness suite under the partition nemesis (issue 5): each replica in
its own network namespace, broker, portals and clients in a hub namespace
joined to them by a bridge; replicas are isolated, cut off from their peers
or from one peer, and healed, while clients record a history the four
checkers judge.

Needs root and `ip netns` (skipped otherwise, with the reason). Nothing is
added to the host's own network namespace. Runs for TAREFA_SOAK_SECONDS
(default 60) — set it to 600 or more for a soak. Prints the same summary line
as test_robustness.py; on a violation the work directory (daemon logs, data,
histories) is kept and named in the failure message.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.fault.checkers import Verdict
from tests.fault.netns import Topology, unavailable_reason
from tests.fault.robustness import verdict_line
from tests.fault.test_robustness import keep
from tests.harness import ROOT, cannot_run

SECONDS = float(os.environ.get("TAREFA_SOAK_SECONDS", "60"))


@pytest.mark.timeout(SECONDS + 360)  # the run, plus start, heal, checks and clean-up
def test_history_under_partitions_is_correct(tmp_path, capsys):
    why_not = unavailable_reason()  # probes with a namespace of its own, deleted at once
    if why_not is not None:
        cannot_run(f"partition nemesis: {why_not}")
    workdir = str(tmp_path / "stack")
    os.makedirs(workdir)
    report_path = str(tmp_path / "report.json")
    seed = int(os.environ.get("TAREFA_SEED") or time.time()) % 1000  # TAREFA_SEED=N replays
    topo = Topology.create(3)
    runner = None
    try:
        with open(os.path.join(workdir, "runner.log"), "ab") as log:
            runner = subprocess.Popen(
                [*topo.exec_prefix(topo.hub), sys.executable, "-m", "tests.fault.partition_run",
                 "--workdir", workdir, "--topology", topo.to_json(), "--seconds", str(SECONDS),
                 "--seed", str(seed), "--report", report_path],
                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            code = runner.wait(SECONDS + 300)
        except subprocess.TimeoutExpired:
            runner.kill()
            runner.wait(10)
            raise AssertionError(f"the partition run did not finish in {SECONDS + 300:.0f}s; "
                                 f"logs kept in {keep(workdir, None)}") from None
    finally:
        if runner is not None and runner.poll() is None:
            runner.kill()
            runner.wait(10)
        leftovers = topo.destroy()  # by PID, then the namespaces themselves
    try:
        with open(report_path, encoding="utf-8") as fh:
            report = json.load(fh)
    except (OSError, ValueError) as exc:
        report = {"error": f"no report from the run ({exc!r}); see runner.log"}
    if report["error"] or code != 0:
        raise AssertionError(f"the partition run failed (exit {code}): {report['error']}\n"
                             f"logs and histories kept in {keep(workdir, None)}")
    verdicts = [Verdict(**v) for v in report["verdicts"]]
    line = verdict_line(report["summary"], verdicts)
    with capsys.disabled():  # the summary line belongs in every run's output
        print(f"\npartition ({SECONDS:.0f}s, seed {seed}): {line}")
    assert not leftovers, f"processes were left in the namespaces: {leftovers}"
    faults = report["faults"]
    assert sum(faults.values()) >= max(1, int(SECONDS // 10)), f"the nemesis hardly ran: {line}"
    acknowledged = report["acknowledged"]
    assert acknowledged >= 50, f"only {acknowledged} operations completed: {line}"
    failed = [v for v in verdicts if not v.ok]
    if failed:
        details = "\n\n".join(str(v) for v in failed)
        raise AssertionError(f"{line}\n{details}\nlogs and histories kept in "
                             f"{keep(workdir, None)}")
