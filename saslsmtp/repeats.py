"""When a warning that repeats is worth a log line again.

Some conditions recur on every attempt until an operator acts: a Redis store that is
down (every call fails open), a TLS peer whose certificate is refused (every reconnect,
every login through it).  A line per attempt fills the log; no line hides the problem.
``RepeatedWarning`` says a line is due the first time, when what it would say changes,
and then at most once per ``interval`` seconds, with the number of occurrences left out
since the previous line.  Occurrences are keyed (a peer, a store), so one condition
never silences another.  Only the clock is injected; nothing here logs.
"""

from __future__ import annotations

from typing import Callable, Hashable


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
