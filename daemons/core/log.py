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
    cygrpc = logging.getLogger(GRPC_CYTHON_LOGGER)
    if not any(isinstance(f, _NoMetadataValues) for f in cygrpc.filters):
        cygrpc.addFilter(_NoMetadataValues())


GRPC_CYTHON_LOGGER = "grpc._cython.cygrpc"


class _NoMetadataValues(logging.Filter):
    """grpcio logs a call's metadata value that is not valid UTF-8 whole, at
    ERROR with a traceback, twice per call: an `authorization: Bearer <secret>`
    with one stray byte put the secret in the log (found by review; 121 kB
    of log per call). The line stays, without the value or the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith("Invalid encoding on"):
            record.msg = ("a call's metadata value is not valid UTF-8 (not shown: it may be a "
                          "credential)")
            record.args = ()
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


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
