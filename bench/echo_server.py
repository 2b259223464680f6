"""A trivial gRPC echo server: the baseline bench/replica.py and bench/portal.py compare with.

Two shapes, the same method:

- default: a sync `grpc.server` on a `ThreadPoolExecutor(128)`, the classic
  Python gRPC server (the only echo measured before 2026-11-27's third session);
- `--asyncio`: a `grpc.aio` server on a uvloop event loop in its own thread,
  the shape of the replica and portal daemons (daemons/replica/daemon.py).
  On these machines it serves 10-20 % more calls per second than the sync
  one with the same client, so ratios against it are the stricter ones.

One unary method, `/bench.Echo/Echo`, returns its request bytes unchanged. It is
registered through a generic handler with identity (de)serializers (None =
bytes in, bytes out), so no .proto is needed.

    python bench/echo_server.py [--host 127.0.0.1] [--port 0] [--workers 128] [--asyncio]

Prints `PORT <n>` on stdout (flushed) once it serves; runs until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import threading
from concurrent import futures

import grpc

SERVICE = "bench.Echo"
METHOD = "Echo"
FULL_METHOD = f"/{SERVICE}/{METHOD}"


def _echo(request: bytes, context: grpc.ServicerContext) -> bytes:
    return request


def _echo_handler(behaviour):  # type: ignore[no-untyped-def]
    return grpc.method_handlers_generic_handler(SERVICE, {
        METHOD: grpc.unary_unary_rpc_method_handler(
            behaviour, request_deserializer=None, response_serializer=None),
    })


async def _echo_async(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


def build_server(host: str, port: int, workers: int) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers,
                                                    thread_name_prefix="grpc"))
    server.add_generic_rpc_handlers((_echo_handler(_echo),))
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise SystemExit(f"echo_server: cannot bind {host}:{port}")
    return server, bound


def serve_asyncio(host: str, port: int, stop: threading.Event) -> int:
    """The daemons' shape: grpc.aio on uvloop, the loop in its own thread."""
    import uvloop

    loop = uvloop.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="grpc-loop", daemon=True)
    thread.start()

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((_echo_handler(_echo_async),))
        bound = server.add_insecure_port(f"{host}:{port}")
        if bound == 0:
            raise SystemExit(f"echo_server: cannot bind {host}:{port}")
        await server.start()
        return server, bound

    server, bound = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=30)
    print(f"PORT {bound}", flush=True)
    while not stop.wait(0.5):
        pass
    asyncio.run_coroutine_threadsafe(server.stop(0.5), loop).result(timeout=5)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 = any free port (printed)")
    parser.add_argument("--workers", type=int, default=128)
    parser.add_argument("--asyncio", action="store_true",
                        help="grpc.aio on uvloop (the daemons' shape) instead of the sync server")
    args = parser.parse_args(argv)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if args.asyncio:
        return serve_asyncio(args.host, args.port, stop)
    server, port = build_server(args.host, args.port, args.workers)
    server.start()
    print(f"PORT {port}", flush=True)
    while not stop.wait(0.5):
        pass
    server.stop(0.5).wait(2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
