"""Log event text, cheaply: the exact line Twisted's classic text log writes
(``2026-11-29T16:35:18+0000 [saslsmtp.auth#info] message``), built without its per-event
``string.Formatter`` and ``strftime``.

Twisted formats each event through a Python-level ``Formatter`` (to support its
``{callable()}`` extension) and formats the time with ``strftime`` every time; at two
lines per SMTP session that was a sixth of the daemon's CPU.  Here the message is
``str.format_map`` (the same PEP 3101 syntax, in C), falling back to Twisted's own
formatter for anything else (``{x()}``, flattened events, a format that fails), and
the timestamp is computed once per second.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any, Mapping

from twisted.logger import LogLevel, formatEvent
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


def event_text(event: Mapping[str, Any]) -> str:
    """The event's message, as ``twisted.logger.formatEvent`` would write it."""
    fmt = event.get("log_format")
    if type(fmt) is str and "log_flattened" not in event:
        try:
            return fmt.format_map(event)
        except Exception:
            pass
    return formatEvent(dict(event))


class SecondClock:
    """``YYYY-MM-DDTHH:MM:SS+HHMM`` in local time (Twisted's ``timeFormatRFC3339``),
    recomputed only when the second changes."""

    __slots__ = ("_second", "_text")

    def __init__(self) -> None:
        self._second = -1
        self._text = "-"

    def __call__(self, when: float | None) -> str:
        if when is None:
            return "-"
        second = int(when)
        if second != self._second:
            local = datetime.fromtimestamp(second).astimezone()
            self._text = local.strftime("%Y-%m-%dT%H:%M:%S%z")
            self._second = second
        return self._text


def system_text(event: Mapping[str, Any]) -> str:
    """``log_system``, else ``namespace#level`` (as Twisted's classic text)."""
    system = event.get("log_system")
    if system is not None:
        try:
            return str(system)
        except Exception:
            return "UNFORMATTABLE"
    level = event.get("log_level")
    return f"{event.get('log_namespace', '-')}#{level.name if level is not None else '-'}"


def classic_line(event: Mapping[str, Any], clock: SecondClock) -> str | None:
    """The line (with its newline) ``twisted.logger.formatEventAsClassicLogText``
    returns for ``event``, or ``None`` for an event with no text."""
    text = event_text(event)
    failure = event.get("log_failure")
    if failure is not None:
        try:
            traceback = failure.getTraceback()
        except BaseException as e:
            traceback = "(UNABLE TO OBTAIN TRACEBACK FROM EVENT):" + str(e)
        text = text + "\n" + traceback
    if not text:
        return None
    line = f"{clock(event.get('log_time'))} [{system_text(event)}] {text}"
    if "\n" in line:
        line = line.replace("\n", "\n\t")
    return line + "\n"


__all__ = ["Logger", "SecondClock", "classic_line", "event_text"]
