"""The master process of ``workers = N`` (N > 1): binds, spawns, supervises, forwards.

It binds every listener itself (before dropping privileges; a ``systemd:`` listener is
the socket systemd passed it instead), then starts N workers
(``python -m saslsmtp.worker``) that inherit the sockets and accept from the same
queue.  It never serves SMTP and does nothing per connection.  Workers write their own
lines to the master's log file or standard output (``logs.AppendLogFile``); the master
alone rotates the file (at 1 MB, checked every second, and on SIGUSR1) or notices that
it was renamed away (SIGUSR1; SIGHUP, which reloads too), and then asks every worker to
reopen it.  With ``--syslog`` or a custom ``--logger`` it relays the workers' events
instead.  It restarts a worker that died (with a growing delay while it keeps dying)
and replaces one whose reactor stopped turning (no heartbeat for
``server.worker_timeout``), validates the configuration on SIGHUP before forwarding the
signal (and counts that reload, once), serves ``/metrics`` summed over the workers, and
on shutdown forwards SIGTERM and waits for every worker to end.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from twisted.application import service
from twisted.internet import defer, error, protocol, task
from twisted.logger import Logger, globalLogPublisher

import saslsmtp
from saslsmtp import listeners, metricsdir, privileges
from saslsmtp.config import Config, ConfigError
from saslsmtp.daemon import clean_exit, configured_listeners, guard_stop_signals, harmless_sigusr1
from saslsmtp.logs import AppendLogFile, FdLineWriter, relayed_event, shared_output
from saslsmtp.metrics import (MULTIPROC_ENV, ReloadCounts, mark_dead, metrics_service,
                              multiprocess_registry, prepare_multiprocess_dir)
from saslsmtp.serving import install_sighup
from saslsmtp.worker import HEARTBEAT

log = Logger(namespace="saslsmtp")

#: Seconds the master waits at startup for every worker to say it serves.
STARTUP_TIMEOUT = 60.0
#: Seconds a stuck worker gets between SIGTERM and SIGKILL: its reactor cannot run an
#: orderly stop, the signal only lets it log where it is stuck.
STUCK_KILL_GRACE = 2.0


def heartbeat_interval(timeout: float) -> float:
    """How often a worker says it is alive for a ``worker_timeout`` of ``timeout``:
    four times per timeout, at least every 5 s (a write per beat, nothing else)."""
    return min(timeout / 4, 5.0)


class WorkerProcess(protocol.ProcessProtocol):
    """One worker as the master sees it: its log lines and its end."""

    def __init__(self, master: "MasterService", slot: int) -> None:
        self.master = master
        self.slot = slot
        self.pid: int | None = None
        self.started = 0.0
        self.heard = 0.0  # master.monotonic() of its last heartbeat (or of its start)
        self.beating = False  # a heartbeat came: it runs its reactor (startup is over)
        self.stuck = False  # found stuck: being killed
        self._out = b""
        self._err = b""

    def connectionMade(self) -> None:
        self.pid = getattr(self.transport, "pid", None)

    def outReceived(self, data: bytes) -> None:
        self._out += data
        *lines, self._out = self._out.split(b"\n")
        for line in lines:
            self.master.relay(self, line)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD > 2:  # the one other pipe we read: the heartbeat (the worker's reactor turns)
            if HEARTBEAT in data:
                self.heard = self.master.monotonic()
                self.beating = True
            return
        super().childDataReceived(childFD, data)

    def errReceived(self, data: bytes) -> None:
        self._err += data
        *lines, self._err = self._err.split(b"\n")
        for line in lines:
            if line.strip():
                log.error("worker {slot} (pid {worker_pid}): {line}", slot=self.slot,
                          worker_pid=self.pid, line=line.decode("utf-8", "replace"))

    def processEnded(self, reason: Any) -> None:
        self.master.worker_ended(self, reason.value)


class StartInterrupted(Exception):
    """A stop signal arrived while the master waited for its workers to start."""


class StartSignals:
    """SIGTERM and SIGINT while the master starts its workers, before the reactor (and
    with it twistd's own handlers) runs: Python would die at once on SIGTERM, leaving the
    workers behind, and raise ``KeyboardInterrupt`` (a traceback) on SIGINT.  Here the
    first one is noted in ``received`` and wakes ``await_ready`` through a pipe
    (``wake``); later ones are only noted.  ``restore`` puts the previous handlers back."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.wake, self._wake_write = os.pipe()
        os.set_blocking(self._wake_write, False)
        self._previous = {signum: signal.signal(signum, self._noted)
                          for signum in (signal.SIGTERM, signal.SIGINT)}

    def _noted(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signum
            try:
                os.write(self._wake_write, b"!")
            except OSError:  # the pipe is full or closed: a wake-up is pending anyway
                pass

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""

    def restore(self) -> None:
        """The previous handlers back, the pipe closed."""
        previous, self._previous = self._previous, {}
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        self.close()

    def close(self) -> None:
        """Only the pipe closed (once): the reactor has installed its own handlers."""
        self._previous = {}
        if self.wake >= 0:
            os.close(self.wake)
            os.close(self._wake_write)
            self.wake = self._wake_write = -1


def await_ready(pipes: dict[int, int], timeout: float,
                clock: Callable[[], float] = time.monotonic,
                wake: int | None = None) -> tuple[int, str] | None:
    """Read each worker's status pipe (fd -> slot) until every one said ``ready``:
    ``None``, or ``(slot, reason)`` for the first that said ``failed REASON``, ended
    without a word, or said nothing for ``timeout`` seconds.  ``wake`` readable (a stop
    signal, ``StartSignals``) raises ``StartInterrupted``."""
    waiting = dict(pipes)
    heard: dict[int, bytes] = {fd: b"" for fd in pipes}
    deadline = clock() + timeout
    while waiting:
        left = deadline - clock()
        if left <= 0:
            slot = min(waiting.values())
            return slot, f"worker {slot} did not start within {timeout:.0f} seconds"
        watched = [*waiting, *([wake] if wake is not None else [])]
        readable, _, _ = select.select(watched, [], [], min(left, 1.0))
        if wake is not None and wake in readable:
            raise StartInterrupted()
        for fd in readable:
            chunk = os.read(fd, 4096)
            heard[fd] += chunk
            line, newline, _ = heard[fd].partition(b"\n")
            if not newline and chunk:
                continue
            slot = waiting.pop(fd)
            text = line.decode("utf-8", "replace")
            if text == "ready":
                continue
            if text.startswith("failed "):
                return slot, text[len("failed "):]
            return slot, ended_unready(slot)
    return None


def ended_unready(slot: int, status: int | None = None) -> str:
    """The start's reason when worker ``slot`` ended without saying ``ready`` or
    ``failed``: with its wait ``status`` when known, a signal is named (a SIGKILL from the
    OOM killer, a SIGBUS, a SIGSEGV end it with no log line of its own)."""
    if status is not None and os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            name = f" ({signal.Signals(number).name})"
        except ValueError:
            name = ""
        return (f"worker {slot} was killed by signal {number}{name} before it was ready"
                " (no log line of its own can say why)")
    if status is not None and os.WIFEXITED(status):
        return (f"worker {slot} ended with exit status {os.WEXITSTATUS(status)} before it was"
                " ready (its log lines say why)")
    return f"worker {slot} ended before it was ready (its log lines say why)"


def describe_end(value: Any) -> str:
    """``exit status 1`` / ``signal 9`` / ``exit status 0`` from a processEnded reason."""
    if getattr(value, "signal", None):
        return f"signal {value.signal}"
    return f"exit status {getattr(value, 'exitCode', '?')}"


class MasterService(service.MultiService):
    """The supervisor of ``workers`` worker processes (see the module docstring)."""

    def __init__(self, config_path: str, config: Config, workers: int, reactor: Any, *,
                 load_config: Callable[[str], Config] | None = None,
                 python: str = sys.executable, grace: float = 10.0,
                 backoff: tuple[float, float] = (0.5, 30.0), stable_after: float = 10.0,
                 publish: Callable[[dict], None] | None = None,
                 log_output: Callable[[], FdLineWriter | None] = shared_output,
                 log_check: float = 1.0, startup_timeout: float = STARTUP_TIMEOUT,
                 monotonic: Callable[[], float] = time.monotonic,
                 passed: Mapping[str, int] | None = None) -> None:
        super().__init__()
        self.config_path = os.path.abspath(config_path)
        self.config = config
        self.count = workers
        self.reactor = reactor
        self.load_config = load_config
        self.python = python
        self.grace = grace
        self.backoff = backoff
        self.stable_after = stable_after
        self.publish = publish or globalLogPublisher
        self.log_output = log_output  # what the workers write their lines to (None: relay)
        self.log_check = log_check
        self.startup_timeout = startup_timeout
        self.monotonic = monotonic  # stuck workers are timed on it, not on the wall clock
        self.worker_timeout = config.ops.worker_timeout  # 0: never
        self._stuck_check: task.LoopingCall | None = None
        self._last_check = 0.0
        self._kills: dict[int, Any] = {}  # slot -> the SIGKILL call for a stuck worker
        self._log_size_check: task.LoopingCall | None = None
        self._restore_sigusr1: Callable[[], None] | None = None
        self.identity: privileges.Identity | None = None
        self.specs = [listeners.parse(d) for d in config.server.listen]
        self.passed = dict(passed or {})  # systemd: entry -> the fd systemd passed
        self.sockets: list[socket.socket] = []
        self.metrics_dir: Path | None = None
        self._own_metrics_dir: str | None = None  # made here: removed at exit
        self.reloads = ReloadCounts()  # saslsmtp_reloads_total: decided, so counted, here
        self.workers: dict[int, WorkerProcess] = {}
        self.failures: dict[int, int] = {}
        self.pending: dict[int, Any] = {}
        self.stopping = False
        self._all_ended: list[defer.Deferred[None]] = []
        self._restore_sighup: Callable[[], None] | None = None

    # -- start ---------------------------------------------------------------------------

    def privilegedStartService(self) -> None:
        try:
            self.sockets = [listeners.open_socket(spec, self.passed) for spec in self.specs]
        except listeners.ListenError as e:
            raise SystemExit(f"saslsmtp: {e}") from None
        # The master keeps its identity (like Postfix's and Dovecot's masters) so it can
        # start workers from the same interpreter; each worker drops to server.user /
        # server.group itself right after adopting the sockets, before it serves.
        identity = self.identity = privileges.resolve(self.config.ops.user, self.config.ops.group)
        privileges.check(identity)
        try:
            if self.config.ops.metrics is not None:
                where = os.environ.get(MULTIPROC_ENV)
                if not where:
                    self._remove_stale_metrics_dirs(identity)
                    where = self._own_metrics_dir = str(metricsdir.make())
                self.metrics_dir = prepare_multiprocess_dir(where)
                if identity is not None and os.getuid() == 0:
                    os.chown(self.metrics_dir, identity.uid, identity.gid)
                registry = multiprocess_registry(self.metrics_dir, self.reloads)
                metrics_service(self.config.ops.metrics.listen, self.reactor, registry).setServiceParent(self)
            listeners.start_or_exit(super().privilegedStartService, configured_listeners(self.config))
        except BaseException:  # the metrics port in use...: nothing may stay behind in /tmp
            self._remove_metrics_dir()
            raise

    def _remove_stale_metrics_dirs(self, identity: privileges.Identity | None) -> None:
        """The folders that masters killed before they could remove them left behind."""
        owners = {os.geteuid(), *([identity.uid] if identity is not None else [])}
        for path in metricsdir.remove_stale(owners):
            log.info("removed {path}, left by a master that is no longer running", path=str(path))

    def startService(self) -> None:
        try:
            self._start()
        except BaseException:  # (abort_start has removed it already)
            self._remove_metrics_dir()
            raise

    def _start(self) -> None:
        super().startService()
        self._restore_sighup = install_sighup(self.reactor, self.reload)
        if isinstance(self.log_output(), AppendLogFile):
            previous = signal.signal(signal.SIGUSR1,
                                     lambda *_: self.reactor.callFromThread(self.logs_rotated, True, True))

            def restore() -> None:
                signal.signal(signal.SIGUSR1, previous)
            self._restore_sigusr1 = restore
            self._log_size_check = task.LoopingCall(self.logs_rotated, False, False)
            self._log_size_check.clock = self.reactor
            self._log_size_check.start(self.log_check, now=False)
        else:
            harmless_sigusr1(self.reactor)
        self.start_workers()
        if self.worker_timeout > 0:
            self._stuck_check = task.LoopingCall(self.check_stuck)
            self._stuck_check.clock = self.reactor
            self.reactor.callWhenRunning(self._start_stuck_check)
        self.reactor.callWhenRunning(guard_stop_signals, self.reactor)
        log.info("saslsmtp master (pid {pid}) started {n} workers", pid=os.getpid(), n=self.count)

    def start_workers(self) -> None:
        """Start every worker and wait (before the reactor runs) until each says it
        serves.  One that cannot start (a Maildir it cannot make, a control socket it
        cannot bind...) would fail the same way at every restart: the start stops with
        its reason in one line and exit status 1, as one process's would, before
        anything says it is ready.  So does a SIGTERM or SIGINT (Ctrl-C) meanwhile: the
        workers are stopped first.  One that comes after the wait, before twistd's own
        handlers, stops the running server as soon as the reactor runs."""
        pipes: dict[int, int] = {}
        signals = StartSignals()
        try:
            problem = None
            for slot in range(self.count):
                read, write = os.pipe()
                pipes[read] = slot
                try:
                    self.spawn(slot, status=write)
                except OSError as e:  # the interpreter cannot be run (as this user)
                    problem = (slot, self.cannot_spawn(e))
                    break
                finally:
                    os.close(write)
            if problem is None:
                problem = await_ready(pipes, self.startup_timeout, wake=signals.wake)
        except StartInterrupted:
            log.warn("{signal} received while the workers were starting; stopping them",
                     signal=signals.name)
            self.abort_start(None, f"start interrupted by {signals.name}; the workers were stopped",
                             signals)
        except BaseException:
            signals.restore()
            raise
        finally:
            for fd in pipes:
                os.close(fd)
        if problem is not None:
            slot, reason = problem
            if reason == ended_unready(slot):
                reason = ended_unready(slot, self._end_status(slot))
            self.abort_start(slot, reason, signals)
        self.reactor.callWhenRunning(self._stop_if_signalled, signals)

    def _end_status(self, slot: int, wait: float = 2.0) -> int | None:
        """The wait status of worker ``slot``, which closed its status pipe, once it has
        ended (within ``wait`` seconds; before the reactor runs nothing else reaps it);
        ``None`` when it is not known."""
        worker = self.workers.get(slot)
        if worker is None or worker.pid is None:
            return None
        deadline = time.monotonic() + wait
        while True:
            try:
                pid, status = os.waitpid(worker.pid, os.WNOHANG)
            except ChildProcessError:
                return None
            if pid:
                return status
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.02)

    def _stop_if_signalled(self, signals: StartSignals) -> None:
        """Running now, with twistd's handlers: a stop signal that came just before is
        obeyed (an orderly stop, as if it came now)."""
        received = signals.name
        signals.close()
        if received:
            log.info("{signal} received while starting; shutting down", signal=received)
            self.reactor.stop()

    def abort_start(self, slot: int | None, reason: str, signals: StartSignals | None = None) -> None:
        """A worker could not start (``slot``), or the start was interrupted (``None``):
        stop the workers and wait until they ended (killed after ``grace``), free what
        the master holds, and end the start with ``reason`` (``SystemExit``: twistd
        prints it); a stop signal meanwhile changes nothing."""
        if slot is not None:
            worker = self.workers.get(slot)
            if worker is not None:
                log.critical("worker {slot} (pid {worker_pid}) could not start; stopping",
                             slot=slot, worker_pid=worker.pid)
            else:
                log.critical("worker {slot} could not be started: {reason}; stopping", slot=slot,
                             reason=reason)
        self.stopping = True
        self.signal_workers(signal.SIGTERM)
        self._reap_workers(self.grace)
        if signals is not None:
            signals.restore()
        if self._restore_sighup is not None:
            self._restore_sighup()
        self._close_sockets(None)
        raise SystemExit(reason if reason.startswith("saslsmtp: ") else f"saslsmtp: {reason}")

    def _reap_workers(self, grace: float, clock: Callable[[], float] = time.monotonic) -> None:
        """Before the reactor runs (nothing reaps them for us): wait until every worker
        has ended, SIGKILL those left after ``grace`` seconds."""
        left = {w.pid for w in self.workers.values() if w.pid is not None}
        deadline = clock() + grace
        while left:
            for pid in list(left):
                try:
                    ended, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:  # reaped already
                    ended = pid
                if ended:
                    left.discard(pid)
            if left and clock() >= deadline:
                for pid in left:
                    try:
                        os.kill(pid, signal.SIGKILL)
                        os.waitpid(pid, 0)
                    except (ProcessLookupError, ChildProcessError):
                        pass
                log.warn("{n} workers did not stop in time; killed them", n=len(left))
                return
            if left:
                time.sleep(0.02)

    def worker_command(self, slot: int, status: int | None = None
                       ) -> tuple[list[str], dict[int, Any], dict[str, str]]:
        """(argv, childFDs, environment) of a worker; ``status``: the write end of a pipe
        on which it says ``ready`` or ``failed REASON`` (``--status-fd``)."""
        args = [self.python, "-m", "saslsmtp.worker", "--config", self.config_path,
                "--slot", str(slot), "--master-pid", str(os.getpid())]
        fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        out = self.log_output()
        if out is not None:
            if isinstance(out, AppendLogFile):
                args += ["--log-file", out.path]
            else:  # the master's standard output, inherited
                args += ["--log-fd", str(out.fd)]
                fds[out.fd] = out.fd
            args += ["--log-format", self.config.ops.log_format, "--log-level", self.config.ops.log_level]
        for sock, spec in zip(self.sockets, self.specs):
            args += ["--listener", f"{sock.fileno()}:{spec.description}"]
            fds[sock.fileno()] = sock.fileno()
        env = dict(os.environ)
        package_root = str(Path(saslsmtp.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        env.pop(MULTIPROC_ENV, None)
        if self.metrics_dir is not None:
            env[MULTIPROC_ENV] = str(self.metrics_dir)
        if self.worker_timeout > 0:  # a pipe of its own: standard output may be the log
            beat = max([*fds, *(v for v in fds.values() if isinstance(v, int))]) + 1
            args += ["--heartbeat", f"{beat}:{heartbeat_interval(self.worker_timeout):g}"]
            fds[beat] = "r"
        if status is not None:  # a number nothing else uses in the worker, nor the pipe here
            child = max([*fds, *(v for v in fds.values() if isinstance(v, int)), status]) + 1
            args += ["--status-fd", str(child)]
            fds[child] = status
        return args, fds, env

    def spawn(self, slot: int, status: int | None = None) -> None:
        self.pending.pop(slot, None)
        if self.stopping:
            return
        args, fds, env = self.worker_command(slot, status)
        worker = WorkerProcess(self, slot)
        worker.started = self.reactor.seconds()
        worker.heard = self.monotonic()
        try:
            self.reactor.spawnProcess(worker, self.python, args, env=env, childFDs=fds)
        except OSError as e:
            if status is not None:  # at start: start_workers stops the start with it
                raise
            # a restart: the interpreter went away (a virtual environment rebuilt) or this
            # user may not run it; try again later, as for a worker that dies young
            failures = self.failures[slot] = self.failures.get(slot, 0) + 1
            delay = min(self.backoff[1], self.backoff[0] * 2 ** (failures - 1))
            log.error("worker {slot}: {reason}; trying again in {delay:.1f}s", slot=slot,
                      reason=self.cannot_spawn(e), delay=delay)
            self.pending[slot] = self.reactor.callLater(delay, self.spawn, slot)
            return
        self.workers[slot] = worker
        log.info("worker {slot} started (pid {worker_pid})", slot=slot, worker_pid=worker.pid)

    def cannot_spawn(self, error: OSError) -> str:
        """Why a worker process could not be made, in one line."""
        return f"cannot run {self.python} for a worker: {error.strerror or error}"

    # -- running ---------------------------------------------------------------------------

    def relay(self, worker: WorkerProcess, line: bytes) -> None:
        """A log event from a worker (``logs.RelayObserver``), published in the master's log."""
        text = line.strip(b"\x1e \r\n")
        if not text:
            return
        try:
            event = relayed_event(text.decode("utf-8"))
        except (ValueError, TypeError):
            log.info("worker {slot} (pid {worker_pid}): {line}", slot=worker.slot,
                     worker_pid=worker.pid, line=text.decode("utf-8", "replace"))
            return
        event["worker_pid"] = worker.pid
        event["worker_slot"] = worker.slot
        level = getattr(event.get("log_level"), "name", "info")
        event["log_system"] = f"{event.get('log_namespace', '-')}#{level} worker={worker.pid}"
        self.publish(event)

    def logs_rotated(self, rotate: bool, tell: bool) -> None:
        """Rotate the shared log file (``rotate``: SIGUSR1, like twistd; else only when it
        is past its size) or, if it was renamed away (logrotate), reopen it; then have
        every worker reopen the path (a byte on its standard input).  Workers write to
        the old file only until they read that byte: each line lands whole in one of the
        two files."""
        out = self.log_output()
        if not isinstance(out, AppendLogFile):
            return
        identity = self.identity
        owner = (identity.uid, identity.gid) if identity is not None and os.getuid() == 0 else None
        try:
            if out.moved():
                out.reopen(owner)
                done = "reopened"
            elif (rotate or out.should_rotate()) and out.rotate(owner):
                done = "rotated"
            else:
                return
        except OSError as e:
            log.error("log file {path}: cannot reopen it: {error}", path=out.path, error=str(e))
            return
        for worker in list(self.workers.values()):
            transport: Any = worker.transport
            try:
                transport.write(b"R")
            except Exception:  # a worker that is ending
                pass
        if tell:
            log.info("log file {path} {done}; {n} workers reopen it", path=out.path, done=done,
                     n=len(self.workers))

    def _start_stuck_check(self) -> None:
        """Running now: whatever the workers said during the start counts from here."""
        now = self._last_check = self.monotonic()
        for worker in self.workers.values():
            worker.heard = max(worker.heard, now)
        if self._stuck_check is not None and not self._stuck_check.running and not self.stopping:
            self._stuck_check.start(min(1.0, self.worker_timeout / 4), now=False)

    def check_stuck(self) -> None:
        """Replace every worker that has not said it is alive for ``worker_timeout``
        seconds (``startup_timeout`` before its first heartbeat: importing a script
        takes a while).  A check that itself comes late means the master was held,
        not the workers: their heartbeats wait unread in the pipes, so count again."""
        now = self.monotonic()
        interval = min(1.0, self.worker_timeout / 4)
        late, self._last_check = now - self._last_check > 2 * interval + 1.0, now
        if self.stopping:
            return
        for worker in list(self.workers.values()):
            if late:
                worker.heard = max(worker.heard, now)
                continue
            limit = self.worker_timeout if worker.beating else max(self.worker_timeout,
                                                                   self.startup_timeout)
            silent = now - worker.heard
            if not worker.stuck and silent > limit:
                self.replace_stuck(worker, silent)

    def replace_stuck(self, worker: WorkerProcess, silent: float) -> None:
        """SIGTERM (the worker logs where it is stuck), SIGKILL ``STUCK_KILL_GRACE``
        seconds later; its end restarts it as any other end does."""
        worker.stuck = True
        log.error("worker {slot} (pid {worker_pid}) is stuck: its reactor has not turned for"
                  " {silent:.1f}s (server.worker_timeout = {timeout:g}s); killing it and"
                  " starting another", slot=worker.slot, worker_pid=worker.pid, silent=silent,
                  timeout=self.worker_timeout)
        transport: Any = worker.transport
        try:
            transport.signalProcess(signal.SIGTERM)
        except (error.ProcessExitedAlready, OSError):
            return
        self._kills[worker.slot] = self.reactor.callLater(STUCK_KILL_GRACE, self._kill_stuck, worker)

    def _kill_stuck(self, worker: WorkerProcess) -> None:
        self._kills.pop(worker.slot, None)
        if self.workers.get(worker.slot) is worker:
            transport: Any = worker.transport
            try:
                transport.signalProcess(signal.SIGKILL)
            except (error.ProcessExitedAlready, OSError):
                pass

    def worker_ended(self, worker: WorkerProcess, value: Any) -> None:
        kill = self._kills.pop(worker.slot, None) if worker.stuck else None
        if kill is not None and kill.active():
            kill.cancel()
        if self.workers.get(worker.slot) is worker:
            del self.workers[worker.slot]
        if self.metrics_dir is not None and worker.pid is not None:
            mark_dead(worker.pid, self.metrics_dir)
        if self.stopping:
            log.info("worker {slot} (pid {worker_pid}) ended: {how}", slot=worker.slot,
                     worker_pid=worker.pid, how=describe_end(value))
            if not self.workers:
                waiting, self._all_ended = self._all_ended, []
                for d in waiting:
                    d.callback(None)
            return
        lived = self.reactor.seconds() - worker.started
        failures = 1 if lived >= self.stable_after else self.failures.get(worker.slot, 0) + 1
        self.failures[worker.slot] = failures
        base, most = self.backoff
        delay = min(most, base * 2 ** (failures - 1))
        log.warn("worker {slot} (pid {worker_pid}) {what} ({how}) after {lived:.1f}s;"
                 " restarting it in {delay:.1f}s", slot=worker.slot, worker_pid=worker.pid,
                 what="was killed as stuck" if worker.stuck else "ended unexpectedly",
                 how=describe_end(value), lived=lived, delay=delay)
        self.pending[worker.slot] = self.reactor.callLater(delay, self.spawn, worker.slot)

    def reload(self) -> bool:
        """SIGHUP: validate the configuration here, then let every worker reload it; one
        ``saslsmtp_reloads_total`` sample per SIGHUP, whatever the number of workers."""
        ok = self._reload()
        self.reloads.reloaded(ok)
        return ok

    def _reload(self) -> bool:
        from saslsmtp.serving import reload_config, restart_only_changes, stop_wiring
        from saslsmtp.service import wire
        self.logs_rotated(False, True)  # a log file renamed away (logrotate's postrotate)
        try:
            if self.load_config is not None:
                config = self.load_config(self.config_path)
            else:  # what a start and --check would say about it
                config = reload_config(self.config_path, self.reactor)
            stop_wiring(wire(config, self.reactor))  # the script, backends, certificate load
        except ConfigError as e:
            for problem in e.problems:
                log.error("reload refused, workers keep the running configuration: {problem}",
                          problem=str(problem))
            return False
        except Exception as e:  # what no check foresaw: still one line, never a traceback
            log.error("reload refused, workers keep the running configuration: {path}: {error}",
                      path=self.config_path, error=f"{type(e).__name__}: {e}")
            return False
        for key in restart_only_changes(self.config, config):  # self.config: what runs
            log.warn("reload: {key} changed; it takes effect at the next restart", key=key)
        self.signal_workers(signal.SIGHUP)
        log.info("reload: configuration valid; SIGHUP sent to {n} workers", n=len(self.workers))
        return True

    def signal_workers(self, signum: int) -> None:
        for worker in list(self.workers.values()):
            transport: Any = worker.transport
            try:
                transport.signalProcess(signum)
            except (error.ProcessExitedAlready, OSError):
                pass

    # -- stop ------------------------------------------------------------------------------

    def stopService(self) -> "defer.Deferred[None]":
        self.stopping = True
        if self._restore_sighup is not None:
            self._restore_sighup()
        if self._restore_sigusr1 is not None:
            self._restore_sigusr1()
            self._restore_sigusr1 = None
        if self._log_size_check is not None and self._log_size_check.running:
            self._log_size_check.stop()
        if self._stuck_check is not None and self._stuck_check.running:
            self._stuck_check.stop()
        for call in self.pending.values():
            if call.active():
                call.cancel()
        self.pending.clear()
        d = defer.maybeDeferred(super().stopService)
        d.addCallback(lambda _: self._stop_workers())
        d.addBoth(self._close_sockets)
        return d.addCallback(clean_exit, self.reactor)

    def _stop_workers(self) -> "defer.Deferred[None]":
        if not self.workers:
            return defer.succeed(None)
        ended: defer.Deferred[None] = defer.Deferred()
        self._all_ended.append(ended)
        self.signal_workers(signal.SIGTERM)
        kill = self.reactor.callLater(self.grace + 5.0, self._kill_remaining)

        def done(result: Any) -> Any:
            if kill.active():
                kill.cancel()
            return result
        return ended.addBoth(done)

    def _kill_remaining(self) -> None:
        log.warn("{n} workers did not stop in time; killing them", n=len(self.workers))
        self.signal_workers(signal.SIGKILL)

    def _close_sockets(self, result: Any) -> Any:
        for sock in self.sockets:
            sock.close()
        self.sockets = []
        self._remove_metrics_dir()
        return result

    def _remove_metrics_dir(self) -> None:
        """The metrics folder this master made (not one ``PROMETHEUS_MULTIPROC_DIR`` named)."""
        if self._own_metrics_dir is not None:
            shutil.rmtree(self._own_metrics_dir, ignore_errors=True)
            self._own_metrics_dir = None
