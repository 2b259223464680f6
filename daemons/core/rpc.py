"""What every gRPC servicer shares: exceptions -> status codes, deadlines.

Servicers are the boundary where TarefaError becomes a gRPC status; anything
else is a bug, logged with its traceback and answered INTERNAL. Servicer
classes carry `daemon_id` for the log line.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import grpc

from daemons.core.errors import TarefaError

log = logging.getLogger(__name__)


def grpc_code(exc: TarefaError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, exc.code, grpc.StatusCode.INTERNAL)


def boundary(method: Callable) -> Callable:
    """Decorate an async servicer method: map TarefaError to its status code."""
    async def wrapper(self: Any, request: Any, context: Any) -> Any:
        await reject_undecodable(request, context)
        try:
            return await method(self, request, context)
        except TarefaError as exc:
            await context.abort(grpc_code(exc), exc.message)
        except Exception:
            log.exception("%s: %s failed", self.daemon_id, method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL,
                                "internal error (see the daemon's log)")
    wrapper.__name__ = method.__name__
    return wrapper


def call_timeout(context: Any, default: float) -> float:
    """Seconds this call may take: a little less than the caller's deadline, so
    that the caller gets our UNAVAILABLE rather than its own DEADLINE_EXCEEDED."""
    remaining = context.time_remaining()
    if remaining is None or remaining > 1e6:
        return default
    return max(0.0, remaining - max(0.02, 0.05 * remaining))


class UndecodableRequest:
    """Stands in for a request protobuf could not parse (e.g. invalid UTF-8)."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    @property
    def message(self) -> str:
        return f"request is not a valid protobuf message: {self.error}"


def _lenient(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(raw: bytes) -> Any:
        try:
            return parse(raw)
        except Exception as exc:  # noqa: BLE001 - DecodeError and friends, answered below
            return UndecodableRequest(exc)
    return deserialize


def add_service(server: Any, module: Any, service_name: str, servicer: Any) -> None:
    """Register `servicer` for `service_name` (from the generated `module`).

    Unlike the generated add_*_to_server, a request that does not parse reaches
    the servicer as an UndecodableRequest, which `boundary` (and streaming
    methods, via `reject_undecodable`) answer with INVALID_ARGUMENT; grpc's own
    path would answer UNKNOWN and log a traceback.
    """
    service = module.DESCRIPTOR.services_by_name[service_name]
    handlers = {}
    for method in service.methods:
        request_type = getattr(module, method.input_type.name)
        response_type = getattr(module, method.output_type.name)
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming \
            else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(getattr(servicer, method.name),
                                     request_deserializer=_lenient(request_type.FromString),
                                     response_serializer=response_type.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name,
                                                                          handlers),))


async def reject_undecodable(request: Any, context: Any) -> None:
    if isinstance(request, UndecodableRequest):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
