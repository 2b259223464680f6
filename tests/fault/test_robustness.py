"""The robustness suite: a full stack under a nemesis, the history checked.

Runs for TAREFA_SOAK_SECONDS (default 60) — set it to 600 or more for a soak —
and on, at most as long again, until the nemesis has injected one fault per
6 s (a fault waits for its daemon's restart, slower on a busy machine).
Prints one summary line (ops, faults by kind, verdicts). On a violation the
work directory (daemon logs, data) and the histories are kept and named in
the failure message.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest

from tests.fault.robustness import judge, run_robustness, summary, verdict_line
from tests.harness import Stack

SECONDS = float(os.environ.get("TAREFA_SOAK_SECONDS", "60"))
MIN_FAULTS = max(1, int(SECONDS // 6))  # ~13 come in 60 s here


@pytest.mark.timeout(2 * SECONDS + 300)  # the run (longer until MIN_FAULTS), start, heal, checks
def test_history_under_faults_is_correct(tmp_path, capsys):
    workdir = str(tmp_path / "stack")
    stack = Stack(workdir)
    run = None
    # TAREFA_SEED=N replays a run's fault and workload schedule (as far as timing allows).
    seed = int(os.environ.get("TAREFA_SEED") or time.time()) % 1000
    try:
        stack.start()
        run = run_robustness(stack, SECONDS, clients=6, seed=seed, min_faults=MIN_FAULTS)
        verdicts = judge(stack, run)
    except BaseException as exc:
        stack.stop()
        kept = keep(workdir, run)
        raise AssertionError(f"the robustness run (seed {seed}) failed: {exc!r}\n"
                             f"logs and histories kept in {kept}") from exc
    finally:
        stack.stop()
    line = verdict_line(summary(run), verdicts)
    with capsys.disabled():  # the summary line belongs in every run's output
        print(f"\nrobustness ({SECONDS:.0f}s, seed {seed}): {line}")
    assert sum(run.faults.values()) >= MIN_FAULTS, "the nemesis hardly ran"
    acknowledged = sum(1 for o in run.history.ops if o.type == "ok")
    assert acknowledged >= 50, f"only {acknowledged} operations completed: {line}"
    failed = [v for v in verdicts if not v.ok]
    if failed:
        kept = keep(workdir, run)
        details = "\n\n".join(str(v) for v in failed)
        raise AssertionError(f"{line}\n{details}\nlogs and histories kept in {kept}")


def keep(workdir: str, run) -> str:  # type: ignore[no-untyped-def]
    """Copy the daemons' logs (and the histories) somewhere pytest will not delete."""
    kept = f"/tmp/tarefa-robustness-{int(time.time())}"
    shutil.copytree(workdir, kept, ignore=shutil.ignore_patterns("*.ldb", "journal"))
    if run is not None:
        run.history.to_jsonl(os.path.join(kept, "history.jsonl"))
        run.cached.to_jsonl(os.path.join(kept, "cached-reads.jsonl"))
    return kept
