"""One base exception for the project; each layer raises a subclass."""

from __future__ import annotations


def one_line(exc: BaseException | str) -> str:
    """An exception's message on one line. Some libraries put a whole traceback in it
    (scikit-learn's "All the N fits failed."): then its first and last lines, the cause."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__ if isinstance(exc, BaseException) else "(no message)"
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"


class ClvError(Exception):
    """Base of every error this project raises on purpose."""


class InvalidEvent(ClvError):
    """An order event that breaks the contract; ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class StoreError(ClvError):
    """The feature store could not apply or read state."""


class StoreUnavailable(StoreError):
    """Redis is away for now (down, restarting, not answering, loading its data, a replica in a
    failover), not refusing the request itself: the same request may succeed later."""


class ModelError(ClvError):
    """A model artifact is missing, corrupt, or does not match what the caller expects."""


class StackError(ClvError):
    """The local stack (redis-server, broker) could not be started."""


class Terminated(BaseException):
    """SIGTERM arrived (``timeout``, ``docker stop``, Kubernetes). Raised in the main thread by
    :func:`clv.files.stops_unwind` so that every ``finally`` and ``with`` on the way out
    removes what the run had half written, as Ctrl-C does; a ``BaseException`` so that no
    ``except Exception`` swallows it."""
