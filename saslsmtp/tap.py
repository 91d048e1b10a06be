"""``twistd saslsmtp``: the command line.  Everything else is ``saslsmtp.service``."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Any, Iterator

from twisted.application.service import IService
from twisted.python import usage

from saslsmtp.config import ConfigError
from saslsmtp.opsconfig import MAX_WORKERS
from saslsmtp.service import load


def _worker_count(value: str) -> int:
    """The same range as ``server.workers``."""
    if not value.isdigit() or int(value) > MAX_WORKERS:
        raise ValueError(f"--workers must be between 0 (one per CPU) and {MAX_WORKERS}")
    return int(value)


class Options(usage.Options):
    """``twistd saslsmtp`` options."""

    synopsis = "[--config FILE] [--check]"
    longdesc = ("An SMTP submission server with scriptable SASL authentication. "
                "Configuration: a TOML file (see etc/saslsmtp.toml and the README).")
    optParameters = [
        ["config", "c", "etc/saslsmtp.toml", "The TOML configuration file."],
        ["workers", "w", None, "Worker processes sharing the listeners (overrides server.workers;"
                               " 0 = one per CPU, 1 = a single process).", _worker_count],
    ]
    optFlags = [
        ["check", None, "Validate the configuration (and the users file, script and backends "
                        "it names, without contacting servers), print problems, exit 0 or 1."],
    ]

    def opt_version(self) -> None:
        """Print saslsmtp's and Twisted's versions and exit."""
        from saslsmtp.daemon import versions
        print(versions())
        raise SystemExit(0)

    def postOptions(self) -> None:
        from saslsmtp.preflight import (pidfile_in_the_way, pidfile_unwritable, twistd_problems,
                                        twistd_warnings)
        if self.parent is not None and not self["check"]:  # a start: a SIGHUP (logrotate...)
            from saslsmtp.heldsignals import STARTING  # until the daemon serves must not end it
            STARTING.hold()
        parent: Any = self.parent or {}
        problems = twistd_problems(parent)
        notes = twistd_warnings(parent)
        if not problems and not self["check"]:  # an earlier run's pid file
            problem, note = pidfile_in_the_way(parent.get("pidfile"))
            problems += [problem] if problem else []
            notes += [note] if note else []
        if not problems and not self["check"]:  # one the file system refuses, root or not
            problem = pidfile_unwritable(parent.get("pidfile"))
            problems += [problem] if problem else []
        if problems:
            print("saslsmtp: cannot start: " + "; ".join(problems), file=sys.stderr)
            raise SystemExit(1)
        for note in notes:
            print(note, file=sys.stderr)
        try:
            with interruptible():
                warnings = self._build(parent)
        except Interrupted as e:
            print(f"saslsmtp: interrupted ({e.signal.name}) while checking the configuration;"
                  " nothing was started", file=sys.stderr)
            raise SystemExit(128 + e.signal)
        for warning in warnings:
            print(warning, file=sys.stderr)
        if self["check"]:
            print(f"{self['config']}: OK")
            raise SystemExit(0)
        if self.parent is not None:
            log_start_warnings(self.parent, notes + warnings)

    def _build(self, parent: Any) -> list[str]:
        """Check the configuration and build the service (``self["service"]``); the
        warnings to print.  A problem ends the command with its lines."""
        from twisted.internet import reactor

        from saslsmtp.daemon import make_service
        from saslsmtp.preflight import checked_config, run_as
        try:
            config = load(self["config"])
            # the same checks for --check, a real start and a reload, before anything is built
            config, warnings = checked_config(
                self["config"], reactor, run_as(config, parent.get("uid"), parent.get("gid")),
                parent.get("pidfile"), load=lambda _: config, workers=self["workers"])
            self["service"] = make_service(config, reactor, self["workers"])
            if self.parent is not None:  # twistd runs it: start failures reach the operator
                from saslsmtp.daemon import ReportedStart, watch_the_daemon
                self["service"] = ReportedStart(self["service"], self.parent, reactor)
                if not self.parent.get("nodaemon"):  # ... and so does a daemon's death
                    watch_the_daemon()
            if self.parent is not None:  # [server] log_format / log_level, via twistd's --logger
                from saslsmtp.logs import use_for_twistd
                self.parent["logger"] = self.parent.get("logger") or use_for_twistd(
                    self.parent, config.ops.log_format, config.ops.log_level,
                    config.ops.worker_count(self["workers"]), config.ops.log_rotate_size)
        except ConfigError as e:
            print(f"saslsmtp: configuration is not valid:\n{e}", file=sys.stderr)
            raise SystemExit(1)
        return warnings


def log_start_warnings(twistd: Any, warnings: list[str]) -> None:
    """The start's warnings in the log too, when the log is not where they were printed.

    They are printed on standard error before twistd starts logging; an operator who
    reads the log file (``--logfile``, a daemon's ``twistd.log``, syslog) saw none of
    them.  Events logged now wait in Twisted's buffer and reach the log once it opens.
    With the log on the terminal or standard output (``-n``, systemd's journal) the
    printed lines are enough: logging them too would show each twice."""
    from twisted.logger import Logger

    from saslsmtp.daemon import logs_elsewhere
    if not logs_elsewhere(twistd):
        return
    log = Logger(namespace="saslsmtp")
    for warning in warnings:
        log.warn("{warning}", warning=warning.removeprefix("saslsmtp: warning: "))


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM while the configuration is checked (importing an AUTH script can
    take a while): not one of the script's errors, which its loader reports as a problem."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signal = signal.Signals(signum)


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """SIGINT and SIGTERM raise ``Interrupted`` meanwhile (in the main thread; elsewhere
    nothing changes): Python's ``KeyboardInterrupt`` was taken for the script's own, the
    check then imported it again and said OK, or a traceback ended it; a SIGTERM
    (``systemctl stop`` during a slow start) ended the process without a word."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupted(signum: int, frame: Any) -> None:
        raise Interrupted(signum)
    previous = {signum: signal.signal(signum, interrupted)
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def makeService(options: Options) -> IService:
    """The twistd entry point: the service ``Options`` built from the configuration.
    twistd opens its log next: SIGUSR1 is handed over to the log's rotation."""
    from saslsmtp.heldsignals import STARTING
    STARTING.hand_over_sigusr1()
    return options["service"]
