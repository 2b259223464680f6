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

`install()` also makes each connection's send buffer a bytearray. PySyncObj
keeps unsent bytes in `bytes`, appends each message with `+=` and drops
sent bytes by slicing: both copy the whole backlog, so a backlog grows in
quadratic time. A leader sends a snapshot in chunks of
logCompactionBatchSize (64 KiB) for up to an append-entries period every
tick, far faster than the socket drains: for a 30 MB snapshot the backlog
reached megabytes and the copying took seconds of the leader's tick thread,
heartbeats fell behind and elections followed. A bytearray appends in
place and `del buf[:n]` only moves its start: linear.
"""

from __future__ import annotations

import errno
import zlib
from types import SimpleNamespace
from typing import Any

from pysyncobj import tcp_connection
from pysyncobj.tcp_connection import TcpConnection

# Stored blocks (level 0), a 512-byte window (wbits 9) and the smallest hash
# table (memLevel 1): what the decompressor needs, nothing it does not.
_LEVEL, _WBITS, _MEM_LEVEL = 0, 9, 1


def compress(data: bytes, level: int = -1) -> bytes:  # noqa: ARG001 - PySyncObj passes 3
    """A standard zlib stream of `data` in stored blocks (`level` is ignored)."""
    compressor = zlib.compressobj(_LEVEL, zlib.DEFLATED, _WBITS, _MEM_LEVEL)
    return compressor.compress(data) + compressor.flush()


_SHIM = SimpleNamespace(compress=compress, decompress=zlib.decompress, error=zlib.error)


_ORIGINAL_SEND = TcpConnection.send


def _send(self: Any, message: Any) -> None:
    """TcpConnection.send, appending to a bytearray (PySyncObj's `+=` then works in place)."""
    if type(self._TcpConnection__writeBuffer) is not bytearray:  # reset to bytes() elsewhere
        self._TcpConnection__writeBuffer = bytearray(self._TcpConnection__writeBuffer)
    _ORIGINAL_SEND(self, message)


def _process_send(self: Any) -> bool:
    """TcpConnection.__processSend, dropping sent bytes without copying the rest."""
    buffer = self._TcpConnection__writeBuffer
    if not buffer:
        return False
    try:
        sent = self._TcpConnection__socket.send(buffer)
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
            self.disconnect()
        return False
    if sent < 0:
        self.disconnect()
        return False
    if sent == 0:
        return False
    if type(buffer) is bytearray:
        del buffer[:sent]
    else:
        self._TcpConnection__writeBuffer = buffer[sent:]
    return True


def install() -> None:
    """Make PySyncObj's TcpConnection frame messages with `compress` and keep its
    send buffer in a bytearray (idempotent)."""
    tcp_connection.zlib = _SHIM  # type: ignore[attr-defined]
    TcpConnection.send = _send  # type: ignore[method-assign]
    TcpConnection._TcpConnection__processSend = _process_send  # type: ignore[attr-defined]


def installed() -> bool:
    return (getattr(tcp_connection, "zlib", None) is _SHIM and TcpConnection.send is _send
            and getattr(TcpConnection, "_TcpConnection__processSend", None) is _process_send)
