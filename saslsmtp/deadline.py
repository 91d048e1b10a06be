"""One way to bound an operation in time: ``with_deadline``.

It is ``Deferred.addTimeout`` with one difference that matters for network clients: when
the deadline passes, cancelling the operation often fails it with something other than
``CancelledError`` (treq: ``ResponseNeverReceived`` wrapping it; a protocol's own
canceller: its own error), which ``addTimeout`` would pass through as if the operation had
failed by itself.  Here any failure after the deadline becomes ``DeadlineExceeded`` (or
what ``on_timeout`` makes of it), and a result that still arrived is kept.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

T = TypeVar("T")


class DeadlineExceeded(Exception):
    """The operation was cancelled because ``timeout`` seconds passed."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        super().__init__(f"no answer within {timeout:g}s")


def _exceeded(result: Any, timeout: float) -> Any:
    return Failure(DeadlineExceeded(timeout)) if isinstance(result, Failure) else result


def with_deadline(d: "Deferred[T]", timeout: float, clock: IReactorTime,
                  on_timeout: Callable[[Any, float], Any] | None = None) -> "Deferred[T]":
    """Cancel ``d`` after ``timeout`` seconds of ``clock``; return ``d``.

    After the deadline, ``on_timeout(result, timeout)`` replaces the result (default: a
    failure becomes ``DeadlineExceeded``).  The timer is cancelled when ``d`` fires first.
    """
    return d.addTimeout(timeout, clock, onTimeoutCancel=on_timeout or _exceeded)
