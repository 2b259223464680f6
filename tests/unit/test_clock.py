"""utc_now: ISO 8601 UTC with milliseconds, right across second boundaries."""

from __future__ import annotations

import calendar
import re

from daemons.core import clock


def test_format_is_iso_utc_with_milliseconds() -> None:
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z", clock.utc_now())


def test_the_cached_second_follows_the_clock(monkeypatch) -> None:
    # 2026-11-27T09:23:59.999 then 09:24:00.001 then back 1 s (clock stepped):
    # each answer must be what a fresh strftime would give.
    base = calendar.timegm((2026, 11, 27, 9, 23, 59, 0, 0, 0))
    for now, expected in ((base + 0.9995, "2026-11-27T09:23:59.999Z"),
                          (base + 1.0015, "2026-11-27T09:24:00.001Z"),
                          (base + 1.5, "2026-11-27T09:24:00.500Z"),
                          (base + 0.25, "2026-11-27T09:23:59.250Z")):
        monkeypatch.setattr(clock.time, "time", lambda now=now: now)
        assert clock.utc_now() == expected
