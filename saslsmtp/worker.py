"""A worker process: ``python -m saslsmtp.worker --config F --listener FD:ENDPOINT ...``.

Started by the master (``saslsmtp.master``), never by hand.  It inherits the listening
sockets already bound by the master, adopts them, and serves SMTP on them with its own
wiring (thread pools, backends, script, TLS context).  It writes its own log lines
where the master writes (``--log-file``: appending to the file, reopened when the master
writes ``R`` on its standard input after a rotation; ``--log-fd``: the inherited
standard output), else it sends its events as compact JSON lines on standard output
(``logs.RelayObserver``) for the master to publish.  With ``--heartbeat FD:S`` it writes
``HEARTBEAT`` on the pipe FD every S seconds from the reactor, so the master can
tell a worker whose reactor stopped turning (an AUTH script looping forever) and
replace it.  It stops when standard input reaches end of file (the master is gone), on
SIGTERM (like the single-process daemon: 421 to idle sessions) and reloads on SIGHUP.
On Linux the kernel also sends it ``MASTER_GONE_SIGNAL`` when the master dies
(``parentdeath``): a worker whose reactor is held then, and so never reads that end of
file, exits at once (``MasterGone``) instead of keeping the listening sockets forever.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
import traceback
from typing import Any, Callable, Sequence

from twisted.internet import abstract, fdesc, task
from twisted.logger import Logger

log = Logger(namespace="saslsmtp")

#: What a worker's reactor writes on its heartbeat pipe to say it still turns.
HEARTBEAT = b"."
#: The kernel's word that the master is dying (``PR_SET_PDEATHSIG``): a signal of its
#: own, never the SIGTERM the master forwards.  It comes when the master's thread that
#: started the worker ends, and a master with other threads (its thread pool, after a
#: /metrics scrape) still has them for a moment: ``getppid()`` names the master then, and
#: a SIGTERM was taken for an ordinary stop, so the worker never said its master was gone.
#: Its default action ends the process, as SIGTERM's did, while the worker starts.
MASTER_GONE_SIGNAL = signal.SIGUSR2
#: Seconds the reactor of a worker whose master is gone gets to answer at all; one that
#: does not is held (stuck), and the worker exits at once.
ORPHAN_ANSWER = 2.0
#: Seconds such a worker gets to stop in order: the master would kill it then too (its
#: grace, 10 s, and 5 more).
ORPHAN_STOP = 15.0


class Heartbeat:
    """``HEARTBEAT`` on the pipe ``fd`` every ``interval`` seconds, from the reactor (a
    thread could go on writing while the reactor is stuck).  ``last``: when it last
    beat (``time.monotonic``), for ``stale``."""

    def __init__(self, clock: Any, interval: float, fd: int,
                 now: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.fd = fd
        self.now = now
        self.last = now()
        os.set_blocking(fd, False)  # a master that stopped reading must not stop us
        os.set_inheritable(fd, False)  # nor a child of ours keep the master from our end
        self.loop = task.LoopingCall(self.beat)
        self.loop.clock = clock

    def start(self) -> "Heartbeat":
        self.loop.start(self.interval, now=True)
        return self

    def beat(self) -> None:
        self.last = self.now()
        try:
            os.write(self.fd, HEARTBEAT)
        except OSError:  # full (the master is held) or gone (the stdin watcher stops us)
            pass

    def stale(self) -> bool:
        """The reactor missed two beats: it is held (or stuck) right now."""
        return self.now() - self.last > 2 * self.interval


def parse_heartbeat(value: str) -> tuple[int, float]:
    """``FD:SECONDS`` -> (fd, interval)."""
    fd, _, seconds = value.partition(":")
    return int(fd), float(seconds)


def stuck_at(frame: Any) -> str:
    """``FILE:LINE in FUNCTION`` of the innermost frame the main thread was running when a
    signal interrupted it: where a stuck worker is stuck (no locals, so no password)."""
    stack = traceback.extract_stack(frame) if frame is not None else []
    if not stack:
        return "an unknown place"
    innermost = stack[-1]
    return f"{innermost.filename}:{innermost.lineno} in {innermost.name}"


class StdinWatcher(abstract.FileDescriptor):
    """Calls ``on_eof`` when fd 0 reaches end of file: the master holds the other end of
    this pipe, and the kernel closes it when the master dies, however it dies.  What the
    master writes on it goes to ``on_data`` (``R``: reopen the log file)."""

    def __init__(self, reactor: Any, on_eof: Callable[[], None], fd: int = 0,
                 on_data: Callable[[bytes], None] = lambda data: None) -> None:
        super().__init__(reactor)
        self.fd = fd
        self.on_eof = on_eof
        self.on_data = on_data
        fdesc.setNonBlocking(fd)

    def fileno(self) -> int:
        return self.fd

    def doRead(self) -> Any:
        return fdesc.readFromFD(self.fd, self.on_data)

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        self.on_eof()


class MasterGone:
    """What a worker does when its master dies, told from a signal handler (the kernel's
    parent-death ``MASTER_GONE_SIGNAL``), in the main thread: the reactor is asked to stop as at the end
    of standard input (``on_gone``), and a thread watches.  A reactor that has not
    answered within ``answer`` seconds is held (an AUTH script looping forever), so
    nothing would ever stop it: the worker says where it is stuck and exits (``exit``).  One
    that answered gets ``stop`` seconds in all to finish its sessions, as the master
    would have given it."""

    def __init__(self, reactor: Any, on_gone: Callable[[], None], slot: int,
                 answer: float = ORPHAN_ANSWER, stop: float = ORPHAN_STOP,
                 exit: Callable[[int], Any] = os._exit) -> None:
        self.reactor = reactor
        self.on_gone = on_gone
        self.slot = slot
        self.answer = answer
        self.stop = stop
        self.exit = exit
        self.answered = threading.Event()
        self.watcher: threading.Thread | None = None

    def __call__(self, frame: Any) -> None:
        if self.watcher is not None:
            return
        where = stuck_at(frame)
        self.reactor.callFromThread(self._answer)
        self.watcher = threading.Thread(target=self._watch, args=(where,), daemon=True,
                                        name="saslsmtp-master-gone")
        self.watcher.start()

    def _answer(self) -> None:
        self.answered.set()
        self.on_gone()

    def _watch(self, where: str) -> None:
        if not self.answered.wait(self.answer):
            self._end("worker {slot} (pid {pid}): the master is gone and the reactor is held:"
                      " stuck at {where}; exiting now", where=where)
            return
        time.sleep(max(0.0, self.stop - self.answer))
        self._end("worker {slot} (pid {pid}): the master is gone and the sessions did not"
                  " end within {stop:g}s; exiting now", stop=self.stop)

    def _end(self, text: str, **fields: Any) -> None:
        try:
            log.error(text, slot=self.slot, pid=os.getpid(), **fields)
            sys.stdout.flush()  # (events relayed to a master: nobody reads them, but try)
        except Exception:
            pass
        self.exit(1)


def metric_file_failed(name: str, error: OSError) -> None:
    """A metric file that cannot have its disk space (``metricfiles``): said once per file."""
    log.error("metrics: cannot write {file}: {reason}; this worker keeps those values in"
              " memory, missing from /metrics until it is restarted", file=name,
              reason=error.strerror or str(error))


class StartStatus:
    """The master's view of this worker's start: one line on ``--status-fd``, ``ready``
    once it serves or ``failed REASON`` when it cannot, so a start that cannot work
    stops the whole server with the reason instead of being restarted forever."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    def ready(self) -> None:
        self._say("ready")

    def failed(self, reason: str) -> None:
        self._say("failed " + " ".join(reason.split()))

    def _say(self, line: str) -> None:
        fd, self.fd = self.fd, None
        if fd is None:
            return
        try:
            os.write(fd, line.encode("utf-8", "replace") + b"\n")
        except OSError:  # the master stopped listening: it no longer waits
            pass
        finally:
            os.close(fd)


def exit_reason(error: BaseException) -> str:
    """What a start failure says in one line: a ``SystemExit``'s own text (the message
    a single process would print), else the exception's type and text."""
    if isinstance(error, SystemExit) and isinstance(error.code, str):
        return error.code
    return f"worker cannot listen: {type(error).__name__}: {error}"


def parse_listener(value: str) -> tuple[int, str]:
    """``FD:ENDPOINT`` -> (fd, endpoint string)."""
    fd, _, description = value.partition(":")
    return int(fd), description


def build_worker_service(config_path: str, listeners: Sequence[tuple[int, str]], reactor: Any,
                         metrics: Any = None) -> Any:
    """The worker's service: the wiring from ``config_path`` serving each inherited fd."""
    from twisted.application.internet import StreamServerEndpointService

    from saslsmtp import listeners as socks
    from saslsmtp.serving import (LiveTLSContext, ReloadableService, build_factory,
                                  listening_factory)
    from saslsmtp.service import load
    config = load(config_path)
    factory = build_factory(config, reactor, metrics)
    top = ReloadableService(factory, config_path, reactor, metrics)
    # this worker may have started after a reload: the master, which bound the sockets
    # and started the workers, says what a reload cannot change
    top.reloader.warn_restart_only = False
    # ... and it counts each reload once, where it decides (saslsmtp_reloads_total)
    top.reloader.metrics = None
    live = LiveTLSContext(factory) if factory.wiring.tls_context is not None else None
    for fd, description in listeners:
        spec = socks.parse(description)
        endpoint, wrapped = socks.adopt(reactor, fd, spec, listening_factory(factory, description), live)
        StreamServerEndpointService(endpoint, wrapped).setServiceParent(top)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    from saslsmtp.heldsignals import STARTING
    STARTING.hold()  # a SIGHUP or SIGUSR1 for every process (systemctl kill) while it starts
    parser = argparse.ArgumentParser(prog="saslsmtp.worker", description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--listener", action="append", default=[], type=parse_listener,
                        metavar="FD:ENDPOINT")
    parser.add_argument("--slot", type=int, default=0)
    parser.add_argument("--master-pid", type=int,
                        help="the master's pid: another parent means the master is gone")
    parser.add_argument("--log-file", help="append log lines to this file (the master's)")
    parser.add_argument("--log-fd", type=int, help="write log lines to this inherited descriptor")
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--status-fd", type=int,
                        help="write 'ready' or 'failed REASON' here once started (the master waits)")
    parser.add_argument("--heartbeat", type=parse_heartbeat, metavar="FD:SECONDS",
                        help="write HEARTBEAT on the pipe FD this often, from the reactor")
    args = parser.parse_args(argv)
    status = StartStatus(args.status_fd)

    from twisted.internet import reactor as global_reactor
    from twisted.logger import globalLogBeginner
    reactor: Any = global_reactor  # the entry point owns the process's reactor

    from saslsmtp import privileges
    from saslsmtp.config import ConfigError
    from saslsmtp.parentdeath import signal_when_parent_dies
    from saslsmtp import metricfiles
    from saslsmtp.metrics import Metrics, multiprocess_enabled
    from saslsmtp.logs import AppendLogFile, FdLineWriter, RelayObserver, worker_observer
    out: FdLineWriter | None = None
    log_problem = None
    try:
        if args.log_file:
            out = AppendLogFile(args.log_file)
        elif args.log_fd is not None:
            out = FdLineWriter(args.log_fd)
    except OSError as e:
        log_problem = f"cannot open {args.log_file}: {e.strerror}; sending log events to the master"
    observer: Any = (RelayObserver(sys.stdout) if out is None else  # ILogObservers (zope)
                     worker_observer(out, args.log_format, args.log_level, os.getpid(), args.slot))
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    if log_problem:
        log.error("worker {slot}: {problem}", slot=args.slot, problem=log_problem)

    def reopen_log(data: bytes = b"R") -> None:
        if isinstance(out, AppendLogFile) and b"R" in data:
            try:
                out.reopen()
            except OSError as e:
                log.error("worker {slot}: cannot reopen {path}: {error}", slot=args.slot,
                          path=out.path, error=e.strerror)
            else:  # the first line in the new file: this worker writes there from now on
                log.info("worker {slot}: log file {path} reopened", slot=args.slot, path=out.path)
    # The master asks for a reopen on standard input; a SIGUSR1 sent to every process
    # (systemctl kill) must not end a worker: it reopens if the file was renamed away.
    signal.signal(signal.SIGUSR1, lambda *_: reactor.callFromThread(
        lambda: reopen_log() if isinstance(out, AppendLogFile) and out.moved() else None))
    # Until it serves, the default action of MASTER_GONE_SIGNAL ends a worker: so does its
    # master's death meanwhile (an AUTH script whose import never ends), told by the
    # kernel.  A master already gone sends nothing: there is nobody to start for.
    signal_when_parent_dies(MASTER_GONE_SIGNAL)
    if args.master_pid is not None and os.getppid() != args.master_pid:
        log.warn("worker {slot} (pid {pid}): the master (pid {master}) is gone; not starting",
                 slot=args.slot, pid=os.getpid(), master=args.master_pid)
        return 1
    try:
        metrics = None
        if multiprocess_enabled():
            metricfiles.install(metric_file_failed)
            metrics = Metrics(None)
        service = build_worker_service(args.config, args.listener, reactor, metrics)
        service.control_suffix = f".{args.slot}"  # its own control socket
        service.watch_certificate = args.slot == 0  # one daily expiry warning, not one per worker
    except ConfigError as e:
        for problem in e.problems:
            log.critical("worker cannot start: {problem}", problem=str(problem))
        status.failed("; ".join(str(problem) for problem in e.problems))
        return 1
    except Exception as e:
        log.critical("worker cannot start: {error}", error=f"{type(e).__name__}: {e}")
        status.failed(f"worker cannot start: {type(e).__name__}: {e}")
        return 1

    stopping: list[bool] = []
    failed: list[bool] = []
    heartbeat: list[Heartbeat] = []

    def stop() -> None:
        if reactor.running and not stopping:
            stopping.append(True)
            reactor.stop()

    def stop_again() -> None:
        if stopping:
            log.info("worker {slot}: already shutting down", slot=args.slot)
        stop()

    master_pid = args.master_pid if args.master_pid is not None else os.getppid()
    gone: list[bool] = []

    def eof() -> None:
        if not stopping and not gone:  # (at shutdown the reactor closes fd 0 itself)
            gone.append(True)
            log.warn("worker {slot} (pid {pid}): the master is gone; stopping", slot=args.slot,
                     pid=os.getpid())
            stop()

    master_gone = MasterGone(reactor, eof, args.slot)

    def on_stop_signal(signum: int, frame: Any) -> None:
        if os.getppid() != master_pid:  # e.g. systemd's SIGTERM after the master died
            master_gone(frame)
            return
        # A reactor that missed its beats cannot run the stop: the master is replacing
        # this worker.  Where it is stuck is the one thing the operator needs to know.
        if heartbeat and heartbeat[0].stale():
            try:  # (raised here, it would land in the stuck code)
                log.error("worker {slot} (pid {pid}): {signal} while the reactor is held:"
                          " stuck at {where}", slot=args.slot, pid=os.getpid(),
                          signal=signal.Signals(signum).name, where=stuck_at(frame))
            except Exception:
                pass
        reactor.callFromThread(stop_again)

    def start() -> None:
        # The master forwards SIGTERM, and systemd may send its own: stop once (also
        # when it comes while this start fails and stops the reactor itself).
        signal.signal(signal.SIGTERM, on_stop_signal)
        signal.signal(signal.SIGINT, on_stop_signal)
        signal.signal(MASTER_GONE_SIGNAL, lambda signum, frame: master_gone(frame))
        try:
            service.privilegedStartService()
            privileges.drop(privileges.resolve(service.config.ops.user, service.config.ops.group))
            # after the drop, which clears it; a master gone before is the end of stdin
            signal_when_parent_dies(MASTER_GONE_SIGNAL)
            service.startService()
        except BaseException as e:  # SystemExit included: its text is the reason
            log.critical("worker cannot listen: {error}", error=f"{type(e).__name__}: {e}")
            status.failed(exit_reason(e))
            failed.append(True)
            stop()
            return
        reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
        StdinWatcher(reactor, eof, on_data=reopen_log).startReading()
        log.info("worker {slot} (pid {pid}) serving {listeners}", slot=args.slot,
                 pid=os.getpid(), listeners=" ".join(d for _, d in args.listener))
        status.ready()
        STARTING.report(log)
        if args.heartbeat is not None:
            fd, interval = args.heartbeat
            heartbeat.append(Heartbeat(reactor, interval, fd).start())

    reactor.callWhenRunning(start)
    reactor.run()
    for late in (signal.SIGTERM, MASTER_GONE_SIGNAL):  # a late one must not kill the exit
        signal.signal(late, signal.SIG_IGN)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
