"""Verdict: what a checker found, printable as a report."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Verdict:
    """ok is True only for a pass; a check that ran out of budget is not ok and
    has unknown=True. On a violation `details` holds the minimal offending
    sub-history as readable lines."""

    ok: bool
    name: str
    summary: str
    details: list[str] = field(default_factory=list)
    unknown: bool = False

    @property
    def status(self) -> str:
        return "PASS" if self.ok else "UNKNOWN" if self.unknown else "FAIL"

    def __str__(self) -> str:
        lines = [f"[{self.status}] {self.name}: {self.summary}"]
        lines += [f"    {line}" for line in self.details]
        return "\n".join(lines)
