"""The logger of the lines written on every session (the AUTH verdict, the session end).

``twisted.logger.Logger.emit`` checks each call's level against ``LogLevel.iterconstants()``,
which sorts every level on each call; at two lines per SMTP session that showed in the
daemon's profile.  The text itself is formatted by ``saslsmtp.logs``.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.logger import LogLevel
from twisted.logger import Logger as TwistedLogger

_LEVELS = frozenset(LogLevel.iterconstants())


class Logger(TwistedLogger):
    """``twisted.logger.Logger`` for the lines written on every session: the same events,
    without Twisted's per-call check of the level against a freshly sorted list of all
    levels."""

    def emit(self, level: Any, format: str | None = None, **kwargs: object) -> None:
        if level not in _LEVELS:
            return super().emit(level, format, **kwargs)  # Twisted reports the bad level
        event = kwargs
        event.update(log_logger=self, log_level=level, log_namespace=self.namespace,
                     log_source=self.source, log_format=format, log_time=time.time())
        if "log_trace" in event:
            event["log_trace"].append((self, self.observer))  # type: ignore[attr-defined]
        self.observer(event)


__all__ = ["Logger"]
