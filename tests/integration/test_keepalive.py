"""A client that vanishes without closing its connection (host gone, no TCP
reset; here: a client process stopped with SIGSTOP, so it answers nothing)
loses its server streams once the server's keepalive pings go unanswered.
Real gRPC over loopback, the daemons' own server options with short times."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap

import grpc

from daemons.core.config import Limits
from daemons.core.security import server_options
from tests.harness import free_ports

CLIENT = textwrap.dedent("""
    import sys, grpc
    channel = grpc.insecure_channel(sys.argv[1])
    stream = channel.unary_stream("/t.T/Watch")(b"")
    print("open", flush=True)
    for _ in stream:
        pass
""")


def test_a_vanished_client_loses_its_stream_to_keepalive():
    async def run() -> str:
        ended = asyncio.get_running_loop().create_future()

        async def watch(request: bytes, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
            try:
                await asyncio.sleep(60)  # a watch with nothing to say
                ended.set_result("still open after 60 s")
            except asyncio.CancelledError:
                ended.set_result("cancelled")
                raise
            yield b""

        # Short times, but generous for a loaded machine: a live client answers a
        # ping within 2 s; several pings go out before the stop.
        server = grpc.aio.server(options=server_options(Limits(), keepalive_ms=300,
                                                        keepalive_timeout_ms=2000))
        handler = grpc.unary_stream_rpc_method_handler(watch)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "t.T", {"Watch": handler}),))
        address = f"127.0.0.1:{free_ports(1)[0]}"
        server.add_insecure_port(address)
        await server.start()
        client = subprocess.Popen([sys.executable, "-c", CLIENT, address],
                                  stdout=subprocess.PIPE, text=True)
        try:
            line = await asyncio.wait_for(
                asyncio.get_running_loop().run_in_executor(None, client.stdout.readline), 20)
            assert line.strip() == "open"
            await asyncio.sleep(2.5)  # pings answered meanwhile: the stream stays
            assert not ended.done()
            os.kill(client.pid, signal.SIGSTOP)
            return await asyncio.wait_for(ended, 30)
        finally:
            os.kill(client.pid, signal.SIGKILL)
            client.wait(10)
            await server.stop(None)

    assert asyncio.run(run()) == "cancelled"
