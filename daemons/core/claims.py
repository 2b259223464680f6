"""What a daemon holds exclusively on its machine: a lock file, a listening port.

Taken before anything is opened or bound, so that a second daemon started on
the same data dir, audit log or port stops at once with one clear line
(TarefaError: CRITICAL, exit 1) instead of half-starting beside the first.
"""

from __future__ import annotations

import fcntl
import os
import socket

from daemons.core.errors import TarefaError


def lock_file(path: str, in_use: str) -> int:
    """An exclusive flock on `path` (created if missing), held until the returned
    fd is closed or the process ends. `in_use` says what a held lock means."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
    except OSError as exc:
        raise TarefaError(f"{path}: cannot create the lock file: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise TarefaError(f"{in_use} (it holds {path})") from None
    return fd


def check_port_free(host: str, port: int, what: str) -> None:
    """Refuse a TCP port that cannot be bound (another process listens on it, or
    `host` is not an address of this machine). For servers that would otherwise
    retry binding in the background and look healthy meanwhile (PySyncObj)."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise TarefaError(f"{what} {host}:{port}: cannot resolve {host!r} ({exc.strerror})") \
            from None
    family, kind, proto, _, address = found[0]
    with socket.socket(family, kind, proto) as probe:
        # As the real server will: TIME_WAIT leftovers of a previous run do not count.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise TarefaError(f"cannot listen on {host}:{port} for {what}: {exc.strerror} "
                              "(another daemon running?)") from None
