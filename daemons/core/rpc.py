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
