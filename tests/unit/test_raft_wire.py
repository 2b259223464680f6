"""raft_wire: PySyncObj's frames stay standard zlib, readable by members with or without it."""

from __future__ import annotations

import os
import pickle
import zlib

import pytest
from pysyncobj import tcp_connection

from daemons.replica import raft_wire
import daemons.replica.state_machine  # noqa: F401 - installs the shim on import


def test_the_replica_installs_the_shim_into_pysyncobj():
    assert raft_wire.installed()
    assert tcp_connection.zlib.compress is raft_wire.compress


@pytest.mark.parametrize("size", [0, 1, 64, 511, 512, 513, 70_000, 3 * 1024 * 1024])
def test_frames_are_standard_zlib_both_ways(size):
    data = os.urandom(size // 2) + b"a" * (size - size // 2)
    # ours -> a member without the shim (plain zlib.decompress)
    assert zlib.decompress(raft_wire.compress(data, 3)) == data
    # a member without the shim (level 3, full window) -> ours
    assert tcp_connection.zlib.decompress(zlib.compress(data, 3)) == data


def test_a_pysyncobj_message_round_trips_through_the_shim():
    message = {"type": "append_entries", "term": 7, "commit_index": 41, "prevLogIdx": 41,
               "prevLogTerm": 7, "entries": [(pickle.dumps({"op": "create_task"}), 42, 7)]}
    frame = tcp_connection.zlib.compress(pickle.dumps(message), 3)
    assert pickle.loads(zlib.decompress(frame)) == message
    assert frame[0] == 0x18  # zlib header: deflate with a 512-byte window (2 ** (1 + 8))


def test_corrupt_frames_still_raise_zlib_error():
    frame = bytearray(raft_wire.compress(b"hello world" * 10))
    frame[-1] ^= 0xFF  # the Adler-32 checksum
    with pytest.raises(tcp_connection.zlib.error):
        tcp_connection.zlib.decompress(bytes(frame))


def test_a_large_burst_arrives_whole_and_in_order_through_the_bytearray_buffer():
    """A leader sends a whole snapshot in one tick: hundreds of 64 KiB messages,
    far more than the socket takes at once. The send buffer (a bytearray, see
    raft_wire) must deliver every byte, in order, as the socket drains."""
    import socket
    import time

    from pysyncobj.poller import createPoller

    assert tcp_connection.TcpConnection.send is raft_wire._send
    left, right = socket.socketpair()
    for sock in (left, right):
        sock.setblocking(False)
    got: list = []
    poll_a, poll_b = createPoller("select"), createPoller("select")
    sender = tcp_connection.TcpConnection(poll_a, socket=left)
    receiver = tcp_connection.TcpConnection(poll_b, socket=right,
                                            onMessageReceived=got.append)
    messages = [{"type": "append_entries", "n": n, "serialized": (os.urandom(64 * 1024),
                                                                    n == 0, n == 299)}
                for n in range(300)]
    try:
        for message in messages:
            sender.send(message)
        assert type(sender._TcpConnection__writeBuffer) is bytearray
        assert sender.getSendBufferSize() > 0  # most of it waits in the buffer
        deadline = time.monotonic() + 30
        while len(got) < len(messages) and time.monotonic() < deadline:
            poll_a.poll(0.001)
            poll_b.poll(0.001)
        assert got == messages
        assert sender.getSendBufferSize() == 0
    finally:
        sender.disconnect()
        receiver.disconnect()
