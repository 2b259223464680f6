"""daemons/core/log.py: what reaches a daemon's log."""

from __future__ import annotations

import io
import logging
import sys

from daemons.core import log as daemon_log


def test_a_metadata_value_grpc_cannot_decode_is_not_logged(monkeypatch):
    """grpcio logs a call's metadata value that is not valid UTF-8 whole, with
    a traceback, twice per call: a security review sent `authorization: Bearer
    <secret>` plus one stray byte and found the secret in the portal's log."""
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        daemon_log.setup_logging("portal-client-1")
        daemon_log.setup_logging("portal-client-1")  # the filter is installed once
        cygrpc = logging.getLogger(daemon_log.GRPC_CYTHON_LOGGER)
        assert len(cygrpc.filters) == 1
        secret = b"Bearer caf\xe9aAQ2wuLieV04Gl3ZqYnXNBoAgBrpN"
        try:
            secret.decode("utf-8")
        except UnicodeDecodeError:
            cygrpc.exception("Invalid encoding on %s", secret)
        cygrpc.error("another grpc error")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert "WARNING [portal-client-1] grpc._cython.cygrpc: a call's metadata value is not " \
           "valid UTF-8 (not shown: it may be a credential)" in lines[0]
    assert "aAQ2wuLieV04Gl3ZqYnXNBoAgBrpN" not in out.getvalue()
    assert "ERROR [portal-client-1] grpc._cython.cygrpc: another grpc error" in lines[1]
