"""A trivial gRPC echo server: the baseline bench/replica.py compares Replica.Apply with.

Same server shape as the replica daemon (daemons/replica/daemon.py): a sync
`grpc.server` on a `ThreadPoolExecutor(128)`, insecure port on loopback. One
unary method, `/bench.Echo/Echo`, returns its request bytes unchanged. It is
registered through a generic handler with identity (de)serializers (None =
bytes in, bytes out), so no .proto is needed.

    python bench/echo_server.py [--host 127.0.0.1] [--port 0] [--workers 128]

Prints `PORT <n>` on stdout (flushed) once it serves; runs until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
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


def build_server(host: str, port: int, workers: int) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers,
                                                    thread_name_prefix="grpc"))
    handler = grpc.method_handlers_generic_handler(SERVICE, {
        METHOD: grpc.unary_unary_rpc_method_handler(
            _echo, request_deserializer=None, response_serializer=None),
    })
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise SystemExit(f"echo_server: cannot bind {host}:{port}")
    return server, bound


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 = any free port (printed)")
    parser.add_argument("--workers", type=int, default=128)
    args = parser.parse_args(argv)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server, port = build_server(args.host, args.port, args.workers)
    server.start()
    print(f"PORT {port}", flush=True)
    while not stop.wait(0.5):
        pass
    server.stop(0.5).wait(2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
