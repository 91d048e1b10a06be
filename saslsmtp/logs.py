"""Log output: ``[server] log_format`` ("text" or "json" lines), ``log_level``, and the
one line written when an SMTP session ends.

twistd chooses the log file (``--logfile``, ``-n``, ``--syslog``); this module only
changes how events are written there and which are dropped.  JSON lines carry ``time``,
``level``, ``namespace``, ``message`` (the formatted text) and every plain field of
the event (``client``, ``user``, ``worker_pid`` ...), so they can be filtered without
parsing the message.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import IO, Any

from twisted.logger import FilteringLogObserver, ILogObserver, LogLevel, LogLevelFilterPredicate
from zope.interface import implementer

from saslsmtp.logformat import SecondClock, classic_line, event_text

_SKIP = {"message", "format", "isError", "system", "time"}


@implementer(ILogObserver)
class JSONLinesObserver:
    """One JSON object per line (no record separator: ``jq`` and log shippers read it)."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def __call__(self, event: dict) -> None:
        record: dict[str, Any] = {
            "time": datetime.fromtimestamp(event.get("log_time") or 0, timezone.utc)
                            .isoformat(timespec="milliseconds"),
            "level": getattr(event.get("log_level"), "name", "info"),
            "namespace": event.get("log_namespace", "-"),
            "message": event_text(event),
        }
        for key, value in event.items():
            if key.startswith("log_") or key in _SKIP or key in record:
                continue
            if isinstance(value, (str, int, float, bool)) or value is None:
                record[key] = value
        failure = event.get("log_failure")
        if failure is not None:
            try:
                record["traceback"] = failure.getTraceback()
            except Exception:  # a flattened failure relayed from a worker
                record["traceback"] = str(failure)
        self.out.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.out.flush()


@implementer(ILogObserver)
class RelayObserver:
    """A worker's events for its master, one compact JSON object per line: ``time``,
    ``level``, ``namespace``, ``message`` (already formatted, with a traceback if any)
    and the event's plain fields.  Cheaper on both sides than twisted's own JSON form,
    which carries the format string and every key for a faithful rebuild; the master
    only needs to write the line (``relayed_event``)."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def __call__(self, event: dict) -> None:
        message = event_text(event)
        failure = event.get("log_failure")
        if failure is not None:
            try:
                message += "\n" + failure.getTraceback()
            except Exception:
                message += "\n" + str(failure)
        record: dict[str, Any] = {
            "time": event.get("log_time") or 0,
            "level": getattr(event.get("log_level"), "name", "info"),
            "namespace": event.get("log_namespace", "-"),
            "message": message,
        }
        for key, value in event.items():
            if key.startswith("log_") or key in _SKIP or key in record:
                continue
            if isinstance(value, (str, int, float, bool)) or value is None:
                record[key] = value
        self.out.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.out.flush()


def relayed_event(line: str) -> dict:
    """The event for a ``RelayObserver`` line (``ValueError`` if it is not one): it
    formats to the worker's message, with the worker's fields beside it."""
    record = json.loads(line)
    if not isinstance(record, dict) or not isinstance(record.get("message"), str):
        raise ValueError("not a relayed event")
    event = {key: value for key, value in record.items()
             if key not in ("time", "level", "namespace", "message")}
    try:
        level = LogLevel.levelWithName(str(record.get("level")))
    except Exception:
        level = LogLevel.info
    event.update(log_format="{log_text}", log_text=record["message"], log_level=level,
                 log_namespace=str(record.get("namespace", "-")),
                 log_time=float(record.get("time") or 0))
    return event


@implementer(ILogObserver)
class TextLinesObserver:
    """Twisted's classic text lines (``time [namespace#level] message``), byte for byte,
    formatted by ``saslsmtp.logformat`` at a fraction of the cost."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.clock = SecondClock()

    def __call__(self, event: dict) -> None:
        line = classic_line(event, self.clock)
        if line:
            self.out.write(line)
            self.out.flush()


def make_observer(out: IO[str], log_format: str = "text", log_level: str = "info") -> ILogObserver:
    """The observer for ``out``: text or JSON lines, without events below ``log_level``."""
    inner = JSONLinesObserver(out) if log_format == "json" else TextLinesObserver(out)
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(log_level))
    return FilteringLogObserver(inner, [predicate])


#: What ``twistd_logger`` builds.  twistd takes ``--logger`` as a dotted name and calls it
#: without arguments, so the choice made while parsing the options waits here.
_TWISTD: dict[str, Any] = {}


def use_for_twistd(twistd_options: Any, log_format: str, log_level: str) -> str | None:
    """The ``--logger`` value making twistd write ``log_format`` lines at ``log_level``
    where its options say (stdout with ``-n`` or ``--logfile=-``, else the log file), or
    ``None`` to keep twistd's own observer (the defaults, ``--syslog``, an explicit
    ``--logger``)."""
    if twistd_options.get("logger") or twistd_options.get("syslog"):
        return None
    _TWISTD.update(format=log_format, level=log_level, logfile=twistd_options.get("logfile"),
                   nodaemon=twistd_options.get("nodaemon"))
    return f"{__name__}.twistd_logger"


def _is_special_file(path: str | None) -> bool:
    """An existing path that is not a regular file: ``/dev/null``, a FIFO, a terminal."""
    if not path or path == "-":
        return False
    try:
        return not stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def twistd_logger() -> ILogObserver:
    """twistd's ``--logger``: the observer ``use_for_twistd`` chose, writing where twistd's
    own would (stdout, or the log file, rotated every megabyte and on SIGUSR1)."""
    filename = _TWISTD.get("logfile")
    if filename == "-" or (_TWISTD.get("nodaemon") and not filename):
        out: IO[str] = sys.stdout
    else:
        from twisted.python.logfile import LogFile
        # twistd's log file renames itself every megabyte; done to /dev/null (or a FIFO)
        # that would replace the device with a regular file, so those are never rotated
        rotate = None if _is_special_file(filename) else 1000000
        logfile = LogFile.fromFullPath(filename or "twistd.log", rotateLength=rotate)
        if rotate is not None:
            _rotate_on_sigusr1(logfile)
        out = logfile
    return make_observer(out, _TWISTD.get("format", "text"), _TWISTD.get("level", "info"))


def _rotate_on_sigusr1(logfile: Any) -> None:
    """What twistd does for its own log file: SIGUSR1 rotates it (from the reactor
    thread), unless something else already handles the signal."""
    import signal
    if signal.getsignal(signal.SIGUSR1):
        return

    def rotate(signum: int, frame: Any) -> None:
        from twisted.internet import reactor
        reactor.callFromThread(logfile.rotate)  # type: ignore[attr-defined]
    signal.signal(signal.SIGUSR1, rotate)


@dataclass(frozen=True)
class SessionSummary:
    """What one SMTP session did (never a password, never message content)."""

    client: str
    user: str | None
    mechanism: str | None
    tls: str | None  # "TLSv1.3" or None
    messages: int
    bytes: int
    duration: float


def session_ended(log: Any, summary: SessionSummary) -> None:
    """The one line per session, at connection loss: fields for JSON, readable as text."""
    log.info("session end client={client} user={user} mechanism={mechanism} tls={tls}"
             " messages={messages} bytes={bytes} duration={duration:.3f}s",
             client=summary.client, user=summary.user or "-",
             mechanism=summary.mechanism or "-", tls=summary.tls or "none",
             messages=summary.messages, bytes=summary.bytes, duration=summary.duration)
