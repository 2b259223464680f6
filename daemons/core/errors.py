"""The one exception hierarchy of Tarefa.

Business code raises these; only boundaries catch them: servicers map
`TarefaError.code` to a gRPC status, `__main__` maps fatal ones to exit codes.
The codes are the names of gRPC status codes so the mapping is one lookup.
"""

from __future__ import annotations


class TarefaError(Exception):
    """Base of every error Tarefa raises on purpose."""

    code = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(TarefaError):
    code = "INVALID_ARGUMENT"


class NotFound(TarefaError):
    code = "NOT_FOUND"


class AlreadyExists(TarefaError):
    code = "ALREADY_EXISTS"


class Unavailable(TarefaError):
    """No quorum or no leader within the deadline: retry later (same request id)."""

    code = "UNAVAILABLE"


class DeadlineExceeded(TarefaError):
    """The outcome is unknown: the command may or may not have been applied."""

    code = "DEADLINE_EXCEEDED"


class ConfigError(TarefaError):
    """A cluster file that cannot be used; carries every problem found at once."""

    code = "INVALID_ARGUMENT"

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class StorageCorrupt(TarefaError):
    """The on-disk state contradicts itself; the replica must stop, loudly."""

    code = "DATA_LOSS"


ERRORS_BY_CODE = {
    cls.code: cls
    for cls in (InvalidArgument, NotFound, AlreadyExists, Unavailable, DeadlineExceeded)
}


def error_from_code(code: str, message: str) -> TarefaError:
    """Rebuild the exception a committed result recorded (for dedupe replies)."""
    return ERRORS_BY_CODE.get(code, TarefaError)(message)
