"""Wall-clock timestamps as Tarefa writes them: ISO 8601, UTC, milliseconds.

Only callers outside the state machine use this (portals and the replica's
gRPC layer stamp commands before Raft), so apply stays deterministic.
"""

from __future__ import annotations

import time

# (whole second, its formatted prefix): strftime runs once a second, not once a
# write. One tuple, replaced whole, so threads never see a half-updated pair.
_second: tuple[int, str] = (-1, "")


def utc_now() -> str:
    """e.g. 2026-11-27T09:23:35.104Z; cheap, since it is on every write's path."""
    global _second
    now = time.time()
    second, prefix = _second
    if int(now) != second:
        second = int(now)
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _second = (second, prefix)
    return f"{prefix}.{int(now * 1000) % 1000:03d}Z"


def left(deadline: float) -> float:
    """Seconds until `deadline` (a time.monotonic() value), never below 0: what
    the next step of a call gets when its steps share one timeout."""
    return max(0.0, deadline - time.monotonic())
