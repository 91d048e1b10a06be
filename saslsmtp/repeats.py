"""When a warning that repeats is worth a log line again.

Some conditions recur on every attempt until an operator acts: a Redis store that is
down (every call fails open), a TLS peer whose certificate is refused (every reconnect,
every login through it).  A line per attempt fills the log; no line hides the problem.
``RepeatedWarning`` says a line is due the first time, when what it would say changes,
and then at most once per ``interval`` seconds, with the number of occurrences left out
since the previous line.  Occurrences are keyed (a peer, a store), so one condition
never silences another.

``PacedWarning`` is for floods rather than outages (peers refused at the accept, bytes
that are no PROXY header): the first occurrence gets its line at once, the others within
``interval`` seconds are counted, and the count is told when the interval ends, on a
timer, so a flood that stops is still reported whole; a quiet interval ends it, and the
next occurrence gets its own line again.  ``RepeatedWarning`` needs no timer (its count
waits for the next occurrence), which is what a verify callback without a reactor can
use; the two say different things at different times, so both stay.  Only the clock is
injected; the lines are the caller's callbacks, nothing here logs.
"""

from __future__ import annotations

from typing import Any, Callable, Generic, Hashable, TypeVar

T = TypeVar("T")


class RepeatedWarning:
    """The line-or-not decision for warnings that repeat (see the module docstring)."""

    def __init__(self, seconds: Callable[[], float], interval: float = 60.0) -> None:
        self._seconds = seconds
        self.interval = interval
        self._last: dict[Hashable, tuple[float, str]] = {}  # key -> (time, text) of its line
        self._left_out: dict[Hashable, int] = {}

    def due(self, key: Hashable = None, text: str = "") -> int | None:
        """Count one occurrence of ``key`` saying ``text``: ``None`` when it gets no line
        (counted), else how many occurrences got none since ``key``'s previous line."""
        now = self._seconds()
        last = self._last.get(key)
        if last is not None and last[1] == text and 0 <= now - last[0] < self.interval:
            self._left_out[key] = self._left_out.get(key, 0) + 1
            return None
        self._last[key] = (now, text)
        return self._left_out.pop(key, 0)


class PacedWarning(Generic[T]):
    """A line for the first occurrence, then one per ``interval`` counting the others
    (see the module docstring): ``first(what)`` and ``more(count, last what)`` write
    them; ``clock`` is an ``IReactorTime``."""

    def __init__(self, clock: Any, first: Callable[[T], None],
                 more: Callable[[int, T], None], interval: float = 60.0) -> None:
        self.clock = clock
        self.interval = interval
        self._first = first
        self._more = more
        self.count = 0  # occurrences since the last line
        self._last: T | None = None
        self._report: Any = None  # the pending summary

    def occurred(self, what: T) -> None:
        """One occurrence, described by ``what`` (the summary names the last one)."""
        self._last = what
        if self._report is None:
            self._first(what)
            self._report = self.clock.callLater(self.interval, self._summary)
        else:
            self.count += 1

    def _summary(self) -> None:
        self._report = None
        if self.count and self._last is not None:
            self._more(self.count, self._last)
            self.count = 0
            self._report = self.clock.callLater(self.interval, self._summary)

    def stop(self) -> None:
        """Cancel the pending summary (the listener stops)."""
        if self._report is not None and self._report.active():
            self._report.cancel()
        self._report = None
