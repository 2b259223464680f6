"""Wall-clock timestamps as Tarefa writes them: ISO 8601, UTC, milliseconds.

Only callers outside the state machine use this (portals and the replica's
gRPC layer stamp commands before Raft), so apply stays deterministic.
"""

from __future__ import annotations

import time


def utc_now() -> str:
    """e.g. 2026-11-27T09:23:35.104Z; cheap, since it is on every write's path."""
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"
