"""Operational logging: one line per event, each carrying the daemon's id.

Also counts the WARNING and CRITICAL lines PySyncObj emits so a replica can
report them in Status (PySyncObj logs problems it otherwise hides).
"""

from __future__ import annotations

import logging
import sys
import threading

FORMAT = "%(asctime)s %(levelname)s [{daemon}] %(name)s: %(message)s"


def setup_logging(daemon_id: str, level: str = "info") -> None:
    """Route every logger to stderr, one line per record, tagged with the daemon id."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT.format(daemon=daemon_id)))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


class LevelCounter(logging.Handler):
    """Counts records at WARNING and above from one logger tree."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self._lock_counts = threading.Lock()
        self.warnings = 0
        self.criticals = 0

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock_counts:
            if record.levelno >= logging.CRITICAL:
                self.criticals += 1
            else:
                self.warnings += 1

    @classmethod
    def attach(cls, logger_name: str) -> "LevelCounter":
        counter = cls()
        logging.getLogger(logger_name).addHandler(counter)
        return counter
