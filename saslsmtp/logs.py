"""Log output: ``[server] log_format`` ("text" or "json" lines), ``log_level``, and the
one line written when an SMTP session ends.

twistd chooses the log file (``--logfile``, ``-n``, ``--syslog``); this module only
changes how events are written there and which are dropped.  JSON lines carry ``time``,
``level``, ``namespace``, ``message`` (the formatted text) and every plain field of
the event (``client``, ``user``, ``worker_pid`` ...), so they can be filtered without
parsing the message.

With workers (``workers = N``) every process writes its own lines to the same place:
``AppendLogFile`` (``O_APPEND``, one ``write(2)`` per line, so lines from several
processes never interleave) or the inherited standard output (``FdLineWriter``).  Only
the master renames the file (``rotate``: twistd's ``.1``, ``.2`` ... names, at 1 MB, on
SIGUSR1); it then tells each worker to ``reopen`` the path (nginx's scheme).  With
``--syslog`` or an explicit ``--logger`` workers still send their events to the master
(``RelayObserver``), which publishes them.
"""

from __future__ import annotations

import errno
import functools
import glob
import json
import os
import re
import stat
import string
import sys
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import IO, Any, Callable

from twisted.logger import (FilteringLogObserver, ILogFilterPredicate,
                            ILogObserver, LogLevel, Logger, PredicateResult, formatEvent, formatTime)
from zope.interface import implementer

from saslsmtp.opsconfig import LOG_ROTATE_SIZE

_log = Logger(namespace="saslsmtp")

_SKIP = {"message", "format", "isError", "system", "time"}


@functools.lru_cache(maxsize=512)
def _plain(log_format: str) -> bool:
    """Whether ``str.format_map`` formats ``log_format`` as twisted would: no ``{name()}``
    (twisted's call syntax) and no positional field."""
    try:
        return all(field is None or (field and not field[0].isdigit() and "()" not in field)
                   for _, field, _, _ in string.Formatter().parse(log_format))
    except ValueError:
        return False


def format_message(event: dict) -> str:
    """``twisted.logger.formatEvent(event)``, the same text, about ten times faster for the
    usual events (``str.format_map`` in C instead of twisted's pure-Python formatter, which
    is most of a log line's cost, two lines per session); anything unusual goes to twisted."""
    log_format = event.get("log_format")
    if type(log_format) is str and "log_flattened" not in event and _plain(log_format):
        try:
            return log_format.format_map(event)
        except Exception:  # a missing key and the like: twisted's own error text
            pass
    return formatEvent(event)


class _SecondClock:
    """twisted's ``formatTime`` (RFC 3339 to the second, local offset), computed once a second."""

    def __init__(self) -> None:
        self.second: int | None = None
        self.text = "-"

    def __call__(self, when: float | None) -> str:
        if when is None:
            return "-"
        second = int(when)
        if second != self.second:
            self.text, self.second = formatTime(when), second
        return self.text


def classic_text(event: dict, clock: _SecondClock | None = None) -> str | None:
    """twisted's ``formatEventAsClassicLogText``: ``TIME [SYSTEM] MESSAGE`` (a traceback
    after it, continuation lines indented by a tab), with ``format_message``."""
    text = format_message(event)
    failure = event.get("log_failure")
    if failure is not None:
        try:
            traceback = failure.getTraceback()
        except BaseException as e:
            traceback = "(UNABLE TO OBTAIN TRACEBACK FROM EVENT):" + str(e)
        text = "\n".join((text, traceback))
    if not text:
        return None
    system = event.get("log_system")
    if system is None:
        level = event.get("log_level")
        system = f"{event.get('log_namespace', '-')}#{'-' if level is None else level.name}"
    else:
        try:
            system = str(system)
        except Exception:
            system = "UNFORMATTABLE"
    return f"{(clock or formatTime)(event.get('log_time'))} [{system}] {text}".replace("\n", "\n\t") + "\n"


#: What txredisapi says with ``twisted.python.log.msg`` (no namespace of its own: the
#: legacy bridge's ``log_legacy``) each time it finds a connection that was lost, again
#: and again while Redis is down or stopped.
_TXREDISAPI_NOISE = frozenset({("Discarding dead connection.",)})
#: Namespaces that hold such lines: only these events are looked at more closely.
_NOISY = frozenset({"log_legacy"})
_QUIET_BELOW = frozenset(level for level in LogLevel.iterconstants() if level < LogLevel.warn)


def library_noise(event: dict) -> bool:
    """txredisapi's info line, repeated during an outage that our own warning already
    reports, once a minute with a count (``limits.redisstore``): not written."""
    return (event.get("log_level") in _QUIET_BELOW and event.get("log_namespace") == "log_legacy"
            and event.get("message") in _TXREDISAPI_NOISE)


@implementer(ILogObserver)
class TextLinesObserver:
    """twistd's text lines (``textFileLogObserver``, formatted by ``classic_text``) at or
    above ``log_level``, without ``library_noise``: the level check, the text and the
    write in one call, where ``FilteringLogObserver`` over a ``FileLogObserver`` took
    three (two lines per session go through here, and the layers were a third of their
    cost)."""

    def __init__(self, out: Any, log_level: str) -> None:
        self.out = out
        self.passing = LevelFloor(log_level).passing
        self.clock = _SecondClock()

    def __call__(self, event: dict) -> None:
        namespace = event.get("log_namespace")
        if event.get("log_level") not in self.passing or not namespace \
                or namespace in _NOISY and library_noise(event):
            return
        text = classic_text(event, self.clock)
        if text:
            self.out.write(text)
            self.out.flush()


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
            "message": format_message(event),
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
        message = format_message(event)
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


class FdLineWriter:
    """The stream a log observer writes to when several processes share one log: each
    ``write`` (one event, one line) is one ``write(2)`` on ``fd``, never split into
    buffer-sized pieces, so another process's line cannot land inside it (an inherited
    standard output: a file, a pipe, journald's stream socket)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        # events come from threads too, and reopen swaps the fd.  Re-entrant: a signal
        # handler that logs (twistd's SIGTERM handler does) runs in the main thread
        # between two bytecodes, possibly while that thread holds this lock: a plain
        # Lock would hang the process for good on its own stop signal.
        self._lock = threading.RLock()

    def write(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8", "backslashreplace"))

    def write_bytes(self, data: bytes) -> None:
        with self._lock:
            while data:
                try:
                    data = data[os.write(self.fd, data):]
                except BlockingIOError:  # a non-blocking pipe that is full: wait for room
                    import select
                    select.select([], [self.fd], [], 1.0)
                except OSError:  # nowhere to write (disk full, reader gone): drop the line
                    return

    def flush(self) -> None:
        """Nothing is buffered."""


class AppendLogFile(FdLineWriter):
    """A log file that a master and its workers append to at once (``O_APPEND``: every
    ``write(2)`` lands whole at the end of the file, whichever process makes it).

    Only the master rotates it (``rotate``, twistd's names: ``.1`` is the newest old
    file) or notices an outside rename (``moved``); every process then calls ``reopen``,
    which opens the path again and swaps the descriptor under the write lock."""

    def __init__(self, path: str, rotate_length: int | None = None) -> None:
        self.path = os.path.abspath(path)
        self.rotate_length = rotate_length
        super().__init__(self._open())

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def should_rotate(self) -> bool:
        """Past ``rotate_length`` (counting every process's lines, not only ours)."""
        return self.rotate_length is not None and self.size() >= self.rotate_length

    def moved(self) -> bool:
        """Whether the path names another file than ours (renamed away, e.g. by logrotate)."""
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return True
        own = os.fstat(self.fd)
        return (now.st_dev, now.st_ino) != (own.st_dev, own.st_ino)

    def reopen(self, owner: tuple[int, int] | None = None) -> None:
        """Write to the file the path names now (created with the old file's mode, and
        given to ``owner`` (uid, gid) so workers that dropped root can open it too)."""
        old = os.fstat(self.fd)
        fd = self._open()
        try:
            new = os.fstat(fd)
            if stat.S_ISREG(new.st_mode) and (new.st_dev, new.st_ino) != (old.st_dev, old.st_ino):
                os.fchmod(fd, stat.S_IMODE(old.st_mode))
                if owner is not None:
                    os.fchown(fd, *owner)
        except OSError:
            pass
        with self._lock:
            fd, self.fd = self.fd, fd
        os.close(fd)

    def rotate(self, owner: tuple[int, int] | None = None) -> bool:
        """``path.N`` -> ``path.N+1`` ..., ``path`` -> ``path.1``, and a new ``path``, like
        twistd's own log file; never for a device or FIFO (``/dev/null`` must not be
        renamed).  Returns whether it rotated."""
        directory = os.path.dirname(self.path)
        if not stat.S_ISREG(os.fstat(self.fd).st_mode) or self.moved() \
                or not (os.access(directory, os.W_OK) and os.access(self.path, os.W_OK)):
            return False
        numbers = sorted((int(name.rsplit(".", 1)[1]) for name in glob.glob(glob.escape(self.path) + ".*")
                          if name.rsplit(".", 1)[1].isdigit()), reverse=True)
        try:
            for n in numbers:
                if n:
                    os.rename(f"{self.path}.{n}", f"{self.path}.{n + 1}")
            os.rename(self.path, f"{self.path}.1")
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise
        self.reopen(owner)
        return True


class RotatingLogFile(AppendLogFile):
    """The log file of a daemon without workers: like twistd's own ``LogFile`` it renames
    itself (``rotate``) before the first write once it holds ``rotate_length`` bytes, and
    on SIGUSR1; each line is one unbuffered ``write(2)``, without ``LogFile``'s re-entrant
    lock and buffer flush per line."""

    def __init__(self, path: str, rotate_length: int | None = None) -> None:
        super().__init__(path, rotate_length)
        self._size = self.size()
        self._rotation = threading.Lock()

    def write(self, text: str) -> None:
        data = text.encode("utf-8", "backslashreplace")
        limit = self.rotate_length
        if limit is not None and self._size >= limit:
            with self._rotation:
                if self._size >= limit and not self.renew():  # (another thread may have)
                    self._size = 0  # could not (a read-only directory): again after as much
        self.write_bytes(data)
        self._size += len(data)

    def renew(self) -> bool:
        """SIGUSR1 and the size limit: rotate, or only reopen if the path was renamed
        away (logrotate, whose ``postrotate`` sends the signal).  ``False`` when neither
        could be done; the lines then go on into the file already open."""
        try:
            if self.moved():
                self.reopen()
                return True
            return self.rotate()
        except OSError:
            return False

    def reopen(self, owner: tuple[int, int] | None = None) -> None:
        super().reopen(owner)
        self._size = self.size()


@implementer(ILogObserver)
class WorkerTag:
    """Marks a worker's events the way its lines always looked: ``[namespace#level
    worker=PID]`` in text lines, ``worker_pid`` and ``worker_slot`` in JSON lines."""

    def __init__(self, observer: Callable[[dict], None], pid: int, slot: int) -> None:
        self.observer = observer
        self.pid = pid
        self.slot = slot

    def __call__(self, event: dict) -> None:
        level = getattr(event.get("log_level"), "name", "info")
        self.observer(dict(event, worker_pid=self.pid, worker_slot=self.slot,
                           log_system=f"{event.get('log_namespace', '-')}#{level} worker={self.pid}"))


@implementer(ILogFilterPredicate)
class LevelFloor:
    """The ``log_level`` filter: events at or above one level pass, whatever their namespace
    (but for ``library_noise``).

    What ``LogLevelFilterPredicate`` answers with only a default level, decided by a set
    lookup instead of a walk up the namespace and a ``NamedConstant`` comparison per event
    (the daemon logs two lines per session)."""

    def __init__(self, log_level: str) -> None:
        floor = LogLevel.levelWithName(log_level)
        self.passing = frozenset(level for level in LogLevel.iterconstants() if level >= floor)

    def __call__(self, event: dict) -> Any:
        namespace = event.get("log_namespace")
        if event.get("log_level") in self.passing and namespace \
                and not (namespace in _NOISY and library_noise(event)):
            return PredicateResult.maybe
        return PredicateResult.no


def worker_observer(out: Any, log_format: str, log_level: str, pid: int, slot: int) -> ILogObserver:
    """A worker's own observer, writing to the master's log file or standard output."""
    if log_format == "json":
        return FilteringLogObserver(WorkerTag(JSONLinesObserver(out), pid, slot),
                                    [LevelFloor(log_level)])
    # tagged first: the tag changes neither the level nor the namespace the filter reads
    return WorkerTag(TextLinesObserver(out, log_level), pid, slot)


def make_observer(out: IO[str], log_format: str = "text", log_level: str = "info") -> ILogObserver:
    """The observer for ``out``: text or JSON lines, without events below ``log_level``."""
    if log_format == "json":
        return FilteringLogObserver(JSONLinesObserver(out), [LevelFloor(log_level)])
    return TextLinesObserver(out, log_level)


#: What ``twistd_logger`` builds.  twistd takes ``--logger`` as a dotted name and calls it
#: without arguments, so the choice made while parsing the options waits here.
_TWISTD: dict[str, Any] = {}


def use_for_twistd(twistd_options: Any, log_format: str, log_level: str,
                   workers: int = 1, rotate_size: int = LOG_ROTATE_SIZE) -> str | None:
    """The ``--logger`` value making twistd write ``log_format`` lines at ``log_level``
    where its options say (stdout with ``-n`` or ``--logfile=-``, else the log file,
    rotated at ``rotate_size`` bytes (1 MB, like twistd's own; 0: never by size) and on
    SIGUSR1), or ``None`` to keep an explicit ``--logger``.  Text lines look like
    twistd's, made three times faster (``classic_text``).  With ``workers`` > 1 the
    output is one the workers can share (``shared_output``).  With ``--syslog`` it is
    twistd's own syslog observer behind ``log_level`` (``twistd_syslog_logger``)."""
    if twistd_options.get("logger"):
        return None
    if twistd_options.get("syslog"):
        _TWISTD.update(level=log_level, syslog_prefix=twistd_options.get("prefix") or "twisted")
        return f"{__name__}.twistd_syslog_logger"
    _TWISTD.update(format=log_format, level=log_level, logfile=twistd_options.get("logfile"),
                   nodaemon=twistd_options.get("nodaemon"), shared=workers > 1,
                   rotate_size=rotate_size)
    return f"{__name__}.twistd_logger"


def shared_output() -> FdLineWriter | None:
    """Where the workers write their own lines: the master's log file or standard output,
    as ``twistd_logger`` opened it; ``None``: they relay their events to the master."""
    out = _TWISTD.get("output")
    return out if _TWISTD.get("shared") and isinstance(out, FdLineWriter) else None


def _rotate_on_sigusr1(logfile: Any) -> None:
    """SIGUSR1 rotates the log file, as with twistd's own observer, or reopens it if it was
    renamed away (where nobody else handles the signal); ``None``, a device: the signal
    is ignored, never fatal."""
    import signal
    if signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, None):
        return

    def renew() -> None:
        try:
            moved = logfile.moved()
        except OSError:
            moved = False
        if not logfile.renew():
            _log.error(
                "log file {path}: cannot rotate or reopen it (its directory must be writable"
                " by the user saslsmtp runs as); lines go on into the file already open",
                path=logfile.path)
        else:  # the first line in the new file (logrotate's postrotate can be checked)
            _log.info("log file {path} {done}", path=logfile.path,
                      done="reopened" if moved else "rotated")

    def rotate(signum: int, frame: Any) -> None:
        from twisted.internet import reactor  # twistd's own handler does the same
        running: Any = reactor
        running.callFromThread(renew)
    signal.signal(signal.SIGUSR1, rotate if logfile is not None else signal.SIG_IGN)


def reopen_if_moved() -> None:
    """SIGHUP in a daemon without workers: if twistd's log file was renamed away (a
    ``postrotate`` that sends SIGHUP, the signal most daemons reopen their logs on),
    write to the path again, as the master does at SIGHUP; never rotate.  Otherwise its
    lines went on into the renamed file, which logrotate compresses and later deletes."""
    out = _TWISTD.get("output")
    if not isinstance(out, RotatingLogFile):
        return
    try:
        if not out.moved():
            return
        out.reopen()
    except OSError as e:
        _log.error("log file {path}: cannot reopen it: {error}", path=out.path, error=str(e))
        return
    _log.info("log file {path} reopened", path=out.path)


def _is_special_file(path: str | None) -> bool:
    """An existing path that is not a regular file: ``/dev/null``, a FIFO, a terminal."""
    if not path or path == "-":
        return False
    try:
        return not stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def twistd_logger() -> ILogObserver:
    """twistd's ``--logger``: the observer ``use_for_twistd`` chose."""
    filename = _TWISTD.get("logfile")
    shared = _TWISTD.get("shared")
    out: Any
    if filename == "-" or (_TWISTD.get("nodaemon") and not filename):
        if shared:
            sys.stdout.flush()
            out = FdLineWriter(sys.stdout.fileno())
        else:
            out = sys.stdout
    else:
        # twistd's log file renames itself every megabyte; done to /dev/null (or a FIFO)
        # that would replace the device with a regular file, so those are never rotated
        special = _is_special_file(filename)
        rotate = None if special else (_TWISTD.get("rotate_size", LOG_ROTATE_SIZE) or None)
        path = filename or "twistd.log"
        try:  # the master rotates a shared file and has the workers reopen it
            out = AppendLogFile(path, rotate) if shared else RotatingLogFile(path, rotate)
        except OSError as e:
            raise SystemExit(f"saslsmtp: cannot open the log file {path}: {e.strerror}") from None
        if not shared:
            _rotate_on_sigusr1(None if special else out)
    _TWISTD["output"] = out
    return make_observer(out, _TWISTD.get("format", "text"), _TWISTD.get("level", "info"))


def twistd_syslog_logger() -> ILogObserver:
    """twistd's ``--logger`` for ``--syslog``: twistd's own syslog observer (its
    ``--prefix``, its priorities, the message text only) behind ``log_level`` and the
    library-noise filter, which twistd's would not apply: a ``log_level = "warn"`` daemon
    sent every info line, and debug ones too, to syslog.  ``log_format`` does not apply:
    syslog stamps its own lines."""
    from twisted.logger import LegacyLogObserverWrapper
    from twisted.python.syslog import SyslogObserver
    syslog = SyslogObserver(_TWISTD.get("syslog_prefix", "twisted"))
    legacy: Any = syslog.emit  # a legacy observer: a callable of the old event dict
    return FilteringLogObserver(LegacyLogObserverWrapper(legacy),
                                [LevelFloor(_TWISTD.get("level", "info"))])


#: A ``key=value`` value that needs no quotes: no space, quote, backslash, ``=`` or control.
_BARE_VALUE = re.compile(r'[^\s"\\=\x00-\x1f\x7f-\x9f]+')


class LoggedName(str):
    """A login name in a ``key=value`` log line (``session end``, ``message accepted``):
    the text shows it bare when it is one plain word (``user=alice``), else as a JSON
    string (``user="john doe tls=TLSv1.3"``), so that no name can pass for more fields
    or for no login (``-``); JSON lines and the master get the name itself (a ``str``)."""

    __slots__ = ()

    def __format__(self, spec: str) -> str:
        text = str(self)
        if text == "-" or not _BARE_VALUE.fullmatch(text):
            text = json.dumps(text, ensure_ascii=False)
        return format(text, spec)


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
             client=summary.client,
             user=LoggedName(summary.user) if summary.user is not None else "-",
             mechanism=summary.mechanism or "-", tls=summary.tls or "none",
             messages=summary.messages, bytes=summary.bytes, duration=summary.duration)
