"""Which process layout to run: one process, or a master and N workers.

``make_service(config, reactor, workers)`` is what ``twistd saslsmtp`` runs.  With one
process it is the SMTP service (metrics, SIGHUP reload) under ``SingleProcess``, which
binds, serves ``/metrics`` and then drops privileges; with more it is the
``MasterService``.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any, Callable

from twisted.application import service
from twisted.logger import Logger

from saslsmtp import privileges
from saslsmtp.config import Config, ConfigError, ConfigProblem, file_key_line
from saslsmtp.listeners import ListenError, parse, start_or_exit
from saslsmtp.metrics import Metrics, metrics_service

log = Logger(namespace="saslsmtp")


class SingleProcess(service.MultiService):
    """The SMTP service and the metrics endpoint; root is dropped once both are bound."""

    def __init__(self, config: Config, reactor: Any) -> None:
        super().__init__()
        self.reactor = reactor
        self.identity = privileges.resolve(config.ops.user, config.ops.group)
        self.configured = configured_listeners(config)

    def privilegedStartService(self) -> None:
        start_or_exit(super().privilegedStartService, self.configured)
        privileges.drop(self.identity)

    def startService(self) -> None:
        super().startService()
        harmless_sigusr1(self.reactor)
        self.reactor.callWhenRunning(guard_stop_signals, self.reactor)

    def stopService(self) -> Any:
        from twisted.internet import defer
        return defer.maybeDeferred(super().stopService).addCallback(clean_exit, self.reactor)


def configured_listeners(config: Config) -> list[str]:
    """Every endpoint the daemon listens on, as configured: a start that cannot listen
    on one names it so."""
    metrics = [config.ops.metrics.listen] if config.ops.metrics is not None else []
    return [*config.server.listen, *metrics]


class ReportedStart(service.MultiService):
    """What twistd runs: the daemon (``inner``), whose start failures reach the operator.

    A start that fails (a port in use, a worker that cannot start...) ends with
    ``SystemExit`` and one line.  twistd handles ``Exception`` there, not ``SystemExit``:
    daemonized, its parent process then waits for the child's word forever, and with
    ``--pidfile`` the file of a process that never ran stays behind.  So here, before
    the ``SystemExit`` goes on: the line goes to twistd's status pipe (the parent prints
    it and exits 1), the pid file this process wrote is removed, and when the log goes
    to a file or syslog the line is printed on the original standard error too (twistd
    sends standard error to the log once logging starts).  ``twistd``: twistd's options.

    A start that succeeded tells systemd ``READY=1`` once the reactor runs (``Type=notify``:
    only then does ``systemctl start`` return; nothing outside systemd), and then
    ``WATCHDOG=1`` from the reactor when the unit has ``WatchdogSec=``."""

    def __init__(self, inner: service.IService, twistd: Any, reactor: Any) -> None:
        super().__init__()
        self.twistd = twistd
        self.reactor = reactor
        self.watchdog: Any = None  # sdnotify.Watchdog, under systemd's WatchdogSec=
        inner.setServiceParent(self)

    def privilegedStartService(self) -> None:
        from saslsmtp.heldsignals import STARTING
        STARTING.take_back()  # the log is open: its SIGUSR1 handler, if any, is installed
        try:
            super().privilegedStartService()
        except SystemExit as e:
            raise self._failed(e) from None

    def startService(self) -> None:
        from saslsmtp.heldsignals import STARTING
        try:
            super().startService()
        except SystemExit as e:
            raise self._failed(e) from None
        STARTING.report(log)  # a SIGHUP or SIGUSR1 during the start: one line each
        from saslsmtp.sdnotify import notify
        self.reactor.callWhenRunning(notify, f"READY=1\nMAINPID={os.getpid()}")
        self.reactor.callWhenRunning(self._watch)

    def _watch(self) -> None:
        from saslsmtp.sdnotify import start_watchdog
        self.watchdog = start_watchdog(self.reactor)

    def _failed(self, error: SystemExit) -> SystemExit:
        """Tell the operator; the exception to end the process with."""
        line = error.code if isinstance(error.code, str) else f"saslsmtp: exit status {error.code}"
        options = self.twistd
        # first the pid file and the log: the waiting parent exits as soon as it reads
        # the line below, and the operator (or a script) looks at both at once
        remove_own_pidfile(options.get("pidfile"))
        pipe = options.get("statusPipe")
        if pipe is not None:  # daemonized: the waiting parent prints it ("1 " = failed)
            options["statusPipe"] = None
            if isinstance(error.code, str) and sys.stderr is not None:
                print(line, file=sys.stderr, flush=True)  # the log, as Python's exit would
                error = SystemExit(1)  # (which would now print it a second time)
            try:
                os.write(pipe, b"1 " + line.encode("utf-8", "replace")[:98])
                os.close(pipe)
            except OSError:
                pass
        elif logs_elsewhere(options) and sys.__stderr__ is not None:
            print(line, file=sys.__stderr__, flush=True)
        return error


def wait_for_the_daemon(read_pipe: int, stderr: Any = None) -> int:
    """What twistd's parent does after it forked the daemon (no ``-n``): wait for the
    daemon's word on ``read_pipe`` and return the exit status (0: started).

    twistd's own wait keeps the pipe's write end open in the parent too, so a daemon
    killed before it reports (SIGKILL, the OOM killer, a worker start that hangs and is
    killed) never closes the last write end, and the parent waits forever.  Here every
    descriptor of this process on the same pipe but ``read_pipe`` is closed first: the
    daemon's death is then end of file, and one line."""
    from twisted.python.util import untilConcludes
    close_other_ends(read_pipe)
    data = untilConcludes(os.read, read_pipe, 100)
    out = stderr or sys.__stderr__
    if data == b"0":
        return 0
    if data:  # twistd's words for a failed start (the line ReportedStart wrote)
        message = (f"An error has occurred: {data[2:]!r}\nPlease look at log file for more"
                   " information.\n")
    else:
        message = ("saslsmtp: the daemon process ended before it was ready (killed?);"
                   " its log may say why\n")
    if out is not None:
        untilConcludes(out.write, message)
        out.flush()
    return 1


def close_other_ends(fd: int, listing: str = "/proc/self/fd") -> None:
    """Close this process's other descriptors on the pipe ``fd`` belongs to."""
    import stat
    try:
        mine = os.fstat(fd)
        others = [int(name) for name in os.listdir(listing)]
    except OSError:
        return
    for other in others:
        if other == fd:
            continue
        try:
            st = os.fstat(other)
        except OSError:  # (the listing's own descriptor, closed by now)
            continue
        if stat.S_ISFIFO(st.st_mode) and (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
            os.close(other)


def watch_the_daemon() -> None:
    """twistd's parent waits with ``wait_for_the_daemon`` (installed before twistd forks;
    only ``twistd saslsmtp`` without ``-n`` calls this)."""
    from twisted.scripts._twistd_unix import UnixApplicationRunner
    setattr(UnixApplicationRunner, "_waitForStart",
            lambda runner, read_pipe: wait_for_the_daemon(read_pipe))


def logs_elsewhere(twistd: Any) -> bool:
    """Whether twistd logs somewhere the terminal does not show: a file, syslog, another
    ``--logger`` than saslsmtp's own (which writes where ``--logfile`` says)."""
    from saslsmtp.logs import twistd_logger
    logger = twistd.get("logger")
    if twistd.get("syslog") or logger not in (None, twistd_logger, f"{twistd_logger.__module__}."
                                                                    f"{twistd_logger.__name__}"):
        return True
    logfile = twistd.get("logfile")
    return bool(logfile) and logfile != "-" or not logfile and not twistd.get("nodaemon")


def remove_own_pidfile(pidfile: str | None) -> None:
    """twistd's pid file, if it names this process (twistd wrote it before the start)."""
    if not pidfile:
        return
    try:
        with open(pidfile) as f:
            mine = f.read().strip() == str(os.getpid())
        if mine:
            os.unlink(pidfile)
    except OSError:
        pass


def harmless_sigusr1(reactor: Any) -> None:
    """SIGUSR1 rotates the log file (saslsmtp's log file, twistd's, the master's); where
    nothing handles it because the log is no file (standard output: ``-n``, systemd's
    journal; ``--syslog``), its default action ended the daemon: a ``systemctl kill -s
    USR1`` or a logrotate snippet meant for a log file stopped the server.  Then it is
    one log line and nothing else."""
    from saslsmtp.heldsignals import STARTING
    if signal.getsignal(signal.SIGUSR1) is not signal.SIG_DFL and not STARTING.holding(signal.SIGUSR1):
        return

    def noted(signum: int, frame: Any) -> None:
        reactor.callFromThread(log.info, "SIGUSR1 received: the log is not a file (standard"
                                         " output or syslog); nothing to rotate")
    signal.signal(signal.SIGUSR1, noted)


def guard_stop_signals(reactor: Any) -> None:
    """A second SIGTERM or SIGINT while the sessions drain is logged and ignored.

    twistd's handlers call ``reactor.stop()`` at every signal, and the second call, on a
    reactor already stopping, is logged as a critical ``ReactorNotRunning`` traceback.
    Only the reactor's own handlers are wrapped (not a test runner's, say)."""
    stopping: list[bool] = []
    reactor.addSystemEventTrigger("before", "shutdown", stopping.append, True)
    for signum in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(signum)
        if callable(previous) and getattr(previous, "__self__", None) is reactor:
            signal.signal(signum, _once(reactor, previous, stopping))


def _once(reactor: Any, handler: Callable[..., Any], stopping: list[bool]) -> Callable[..., None]:
    def on_signal(signum: int, frame: Any) -> None:
        if stopping:
            reactor.callFromThread(log.info, "{signal} received: already shutting down",
                                   signal=signal.Signals(signum).name)
            return
        stopping.append(True)
        # in the reactor's thread, not here: twistd's handler logs, and a handler runs
        # wherever the main thread was (inside a log write, holding the writer's lock)
        reactor.callFromThread(handler, signum, frame)
    return on_signal


def clean_exit(result: Any, reactor: Any) -> Any:
    """A SIGTERM/SIGINT shutdown that completed is a success: exit 0, not the signal.

    twistd re-raises the signal that stopped the reactor once the service has stopped
    (so the exit status would say "killed by SIGTERM"); operators and the contract
    expect 0 from an orderly stop."""
    if getattr(reactor, "_exitSignal", None) in (signal.SIGTERM, signal.SIGINT):
        reactor._exitSignal = None
    return result


def make_service(config: Config, reactor: Any, workers: int | None = None) -> service.IService:
    """The daemon for ``config``; ``workers`` (``--workers``) overrides ``server.workers``."""
    from saslsmtp.descriptors import raise_descriptor_limit
    from saslsmtp.serving import build_service
    from saslsmtp.service import wire
    raise_descriptor_limit()  # one descriptor per session: the soft default is far too low
    count = config.ops.worker_count(workers)
    passed = activated_sockets(config)
    if count == 1:
        top = SingleProcess(config, reactor)
        metrics = None
        if config.ops.metrics is not None:
            from prometheus_client import CollectorRegistry
            registry = CollectorRegistry()
            metrics = Metrics(registry)
            metrics_service(config.ops.metrics.listen, reactor, registry).setServiceParent(top)
        build_service(config, reactor, metrics, passed).setServiceParent(top)
        return top
    from saslsmtp.master import MasterService
    try:
        for description in config.server.listen:
            parse(description)
    except ListenError as e:  # (preflight says so first; this is for callers without it)
        raise ConfigError([ConfigProblem(config.path, "server.listen",
                                         file_key_line(config.path, "server.listen"), str(e))]) from None
    wire(config, reactor)  # the same checks a worker makes, reported once, at startup
    return MasterService(config.path, config, count, reactor, passed=passed)


def activated_sockets(config: Config) -> dict[str, int]:
    """The sockets systemd passed for the ``systemd:`` listeners (entry -> fd), taken
    once (``activation.take``: no child sees ``LISTEN_FDS``).  None passed: none here
    (``--check`` builds the service too); the start stops where it would bind
    (``listeners.not_passed``).  Sockets that do not fit end the start in one line
    (``--check`` and a start with the sockets said so earlier, ``check_activated``)."""
    from saslsmtp import activation
    specs = [parse(d) for d in config.server.listen
             if d.removeprefix("haproxy:").startswith("systemd:")]
    try:
        passed = activation.take()
    except activation.ActivationError as e:
        raise SystemExit(f"saslsmtp: socket activation: {e}") from None
    if not specs or passed is None:
        return {}
    matched = activation.match([spec.wanted() for spec in specs], passed)
    for description, message in matched.problems:
        raise SystemExit(f"saslsmtp: cannot listen on {description}: {message}")
    activation.hand_over()
    return dict(matched.fds)


def versions() -> str:
    """``saslsmtp 0.1.0 (Twisted 26.10.0, Python 3.11.7)``."""
    import platform

    import twisted

    import saslsmtp
    return f"saslsmtp {saslsmtp.__version__} (Twisted {twisted.__version__}, Python {platform.python_version()})"
