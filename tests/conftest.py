"""Shared pytest wiring: make each test's outcome visible to fixtures so they
can print the logs of the daemons they started when the test failed."""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


def failed(request: pytest.FixtureRequest) -> bool:
    rep = getattr(request.node, "rep_call", None)
    return rep is None or rep.failed


@pytest.fixture
def replica_cluster_factory(tmp_path, request):  # type: ignore[no-untyped-def]
    """Build ReplicaClusters in tmp_path; stop them all and print logs on failure."""
    from tests.harness import ReplicaCluster

    made: list[ReplicaCluster] = []

    def make(**kwargs):  # type: ignore[no-untyped-def]
        cluster = ReplicaCluster(str(tmp_path / f"c{len(made)}"), **kwargs)
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.stop()
        if failed(request):
            print(cluster.dump_logs())
