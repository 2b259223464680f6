"""Cheaper Raft frames: PySyncObj's per-message zlib call, without its fixed cost.

PySyncObj 0.3.17 frames every Raft message as `zlib.compress(pickle.dumps(m), 3)`
(pysyncobj/tcp_connection.py, TcpConnection.send). `zlib.compress` sets up a
full deflate state for every call (a 32 KiB window and a 64 KiB hash table,
allocated and cleared), which costs 30-50 us even for a 64-byte message — more
than pickling, unpickling and decompressing it together (measured here:
~45 us against ~2 us). Every Raft entry takes at least four such messages (an
append_entries to each follower, each follower's answer) and under load six
(the commit index follows in a second round, whose repeated answer followers
skip: ReplicaStateMachine._SyncObj__sendNextNodeIdx), so this one call was a
large share of the Raft thread's CPU on all three replicas.

`install()` points tcp_connection's `zlib` at a shim whose `compress` emits a
zlib stream of *stored* (uncompressed) blocks with the smallest window and
memory level: about 1 us for a small message, plain memcpy + Adler-32 for a
large one. The stream is still standard zlib, so `zlib.decompress` on either
side reads it unchanged: members with and without the shim interoperate, and
with `security.raft_password_file` the Fernet layer wraps it as before. What is
given up is compression of Raft traffic, which on loopback or a LAN costs
nothing worth the CPU (a few MB/s at thousands of writes/s).
"""

from __future__ import annotations

import zlib
from types import SimpleNamespace

from pysyncobj import tcp_connection

# Stored blocks (level 0), a 512-byte window (wbits 9) and the smallest hash
# table (memLevel 1): what the decompressor needs, nothing it does not.
_LEVEL, _WBITS, _MEM_LEVEL = 0, 9, 1


def compress(data: bytes, level: int = -1) -> bytes:  # noqa: ARG001 - PySyncObj passes 3
    """A standard zlib stream of `data` in stored blocks (`level` is ignored)."""
    compressor = zlib.compressobj(_LEVEL, zlib.DEFLATED, _WBITS, _MEM_LEVEL)
    return compressor.compress(data) + compressor.flush()


_SHIM = SimpleNamespace(compress=compress, decompress=zlib.decompress, error=zlib.error)


def install() -> None:
    """Make PySyncObj's TcpConnection frame messages with `compress` (idempotent)."""
    tcp_connection.zlib = _SHIM  # type: ignore[attr-defined]


def installed() -> bool:
    return getattr(tcp_connection, "zlib", None) is _SHIM
