"""MasterService without processes: what it starts a worker with, how long it waits
before restarting one that keeps dying, and that it does not restart during shutdown."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from twisted.internet.error import ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from saslsmtp.master import MasterService
from saslsmtp.service import load
from tests.support import write_config


class FakeTransport:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[int] = []
        self.written = b""

    def write(self, data: bytes) -> None:
        self.written += data

    def signalProcess(self, signum: int) -> None:
        self.signals.append(signum)


class FakeReactor(Clock):
    """A clock that records spawnProcess instead of forking."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, list[str], dict, dict]] = []
        self.next_pid = 1000

    def spawnProcess(self, proto: Any, executable: str, args: list[str], env: dict,
                     childFDs: dict) -> FakeTransport:
        self.next_pid += 1
        transport = FakeTransport(self.next_pid)
        proto.makeConnection(transport)
        self.spawned.append((proto, args, env, childFDs))
        return transport


def master(tmp_path: Path, log_output: Any = lambda: None, server: str = "",
           **kwargs: Any) -> tuple[MasterService, FakeReactor]:
    (tmp_path / "users").write_text("alice:{PLAIN}wonderland\n")
    config = write_config(tmp_path, f'[backends.users]\ntype = "file"\npath = "{tmp_path / "users"}"\n',
                          listen=["tcp:2600:interface=127.0.0.1", "haproxy:tcp:2601"])
    config.write_text(config.read_text().replace("[server]\n", "[server]\n" + server, 1))
    reactor = FakeReactor()
    return MasterService(str(config), load(str(config)), 2, reactor, log_output=log_output,
                         **kwargs), reactor


def killed(proto: Any) -> Failure:
    return Failure(ProcessTerminated(signal=signal.SIGKILL))


def test_worker_command_passes_each_listener_and_a_stdin_pipe(tmp_path: Path) -> None:
    """Listening fds keep their numbers in the worker; stdin is a pipe from the master."""
    service, reactor = master(tmp_path)

    class Sock:
        def __init__(self, fd: int) -> None:
            self.fd = fd

        def fileno(self) -> int:
            return self.fd
    service.sockets = [Sock(7), Sock(9)]  # type: ignore[list-item]
    args, fds, env = service.worker_command(1)
    assert args[1:] == ["-m", "saslsmtp.worker", "--config", str(tmp_path / "saslsmtp.toml"),
                        "--slot", "1", "--master-pid", str(os.getpid()),
                        "--listener", "7:tcp:2600:interface=127.0.0.1",
                        "--listener", "9:haproxy:tcp:2601", "--heartbeat", "10:5"]
    assert fds == {0: "w", 1: "r", 2: "r", 7: 7, 9: 9, 10: "r"}
    assert "PROMETHEUS_MULTIPROC_DIR" not in env  # no [metrics]


def test_restart_delay_doubles_while_crashing_and_resets_when_stable(tmp_path: Path) -> None:
    """0.5 s, 1 s, 2 s ... up to 30 s while the worker dies young; back to 0.5 s after a
    worker that lived 10 s or more."""
    service, reactor = master(tmp_path)
    service.spawn(0)
    delays = []
    for _ in range(8):
        proto = service.workers[0]
        service.worker_ended(proto, killed(proto).value)
        assert 0 not in service.workers
        call = service.pending[0]
        delays.append(call.getTime() - reactor.seconds())
        reactor.advance(delays[-1])
        assert service.workers[0] is not proto  # restarted
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    reactor.advance(10)
    proto = service.workers[0]
    service.worker_ended(proto, killed(proto).value)
    assert service.pending[0].getTime() - reactor.seconds() == 0.5


def test_no_restart_during_shutdown_and_stop_waits_for_every_worker(tmp_path: Path) -> None:
    """stopService sends SIGTERM to each worker and fires once the last has ended."""
    service, reactor = master(tmp_path)
    service.spawn(0)
    service.spawn(1)
    first, second = service.workers[0], service.workers[1]
    d = service.stopService()
    assert first.transport.signals == [signal.SIGTERM] and second.transport.signals == [signal.SIGTERM]
    fired: list[Any] = []
    d.addBoth(fired.append)
    service.worker_ended(first, killed(first).value)
    assert not fired and not service.pending
    service.worker_ended(second, killed(second).value)
    assert fired == [None] and not service.pending and len(reactor.spawned) == 2


def test_stragglers_are_killed_after_the_grace_period(tmp_path: Path) -> None:
    """A worker that ignores SIGTERM gets SIGKILL after grace + 5 seconds."""
    service, reactor = master(tmp_path)
    service.spawn(0)
    service.stopService()
    worker = service.workers[0]
    reactor.advance(service.grace + 5)
    assert worker.transport.signals == [signal.SIGTERM, signal.SIGKILL]


def test_workers_get_the_log_file_and_reopen_it_after_a_rotation(tmp_path: Path) -> None:
    """With a shared log file each worker is told its path, format and level; a rotation
    (at the size limit, checked every second, or forced by SIGUSR1) or an outside rename
    makes the master reopen it and write ``R`` to every worker's standard input."""
    from saslsmtp.logs import AppendLogFile, FdLineWriter
    out = AppendLogFile(str(tmp_path / "saslsmtp.log"), rotate_length=100)
    service, reactor = master(tmp_path, log_output=lambda: out)
    args, fds, _ = service.worker_command(0)
    assert args[args.index("--log-file"):][:6] == ["--log-file", out.path, "--log-format", "text",
                                                  "--log-level", "info"]
    assert fds[1] == "r"
    service.spawn(0)
    service.spawn(1)
    transports = [service.workers[0].transport, service.workers[1].transport]
    service.logs_rotated(False, False)  # small: nothing to do
    assert [t.written for t in transports] == [b"", b""]
    out.write("x" * 100 + "\n")
    service.logs_rotated(False, False)
    assert (tmp_path / "saslsmtp.log.1").exists() and out.size() == 0
    assert [t.written for t in transports] == [b"R", b"R"]
    service.logs_rotated(True, True)  # SIGUSR1: rotates even when small
    assert (tmp_path / "saslsmtp.log.2").exists()
    (tmp_path / "saslsmtp.log").rename(tmp_path / "moved")
    service.logs_rotated(False, False)  # renamed away: reopened, not renamed again
    assert (tmp_path / "saslsmtp.log").exists() and not (tmp_path / "saslsmtp.log.3").exists()
    assert [t.written for t in transports] == [b"RRR", b"RRR"]
    stdout = FdLineWriter(1)
    service.log_output = lambda: stdout
    args, fds, _ = service.worker_command(0)
    assert "--log-fd" in args and args[args.index("--log-fd") + 1] == "1" and fds[1] == 1


def test_a_reload_is_counted_once_by_the_master_on_metrics(tmp_path: Path) -> None:
    """The master decides a SIGHUP, so it counts it: a refused file is one ``invalid``
    sample, a valid one one ``success`` however many workers follow it, both on the
    registry that sums the workers' files."""
    from saslsmtp.metrics import multiprocess_registry, prepare_multiprocess_dir
    service, reactor = master(tmp_path)
    service.spawn(0)
    service.spawn(1)
    registry = multiprocess_registry(prepare_multiprocess_dir(tmp_path / "metrics"), service.reloads)
    config = tmp_path / "saslsmtp.toml"
    good = config.read_text()
    config.write_text(good.replace("[auth]\n", "[auth]\nbogus = 1\n"))
    assert service.reload() is False
    config.write_text(good)
    assert service.reload() is True
    assert [w.transport.signals for w in service.workers.values()] == [[signal.SIGHUP]] * 2
    assert registry.get_sample_value("saslsmtp_reloads_total", {"result": "invalid"}) == 1
    assert registry.get_sample_value("saslsmtp_reloads_total", {"result": "success"}) == 1


def watched(tmp_path: Path, timeout: float = 4.0) -> tuple[MasterService, FakeReactor, list[dict]]:
    """A master with two workers whose stuck-worker check runs on the fake clock (also
    its monotonic clock), and the events it logs."""
    from twisted.logger import globalLogPublisher
    service, reactor = master(tmp_path, server=f"worker_timeout = {timeout}\n")
    service.monotonic = reactor.seconds
    service.spawn(0)
    service.spawn(1)
    assert service._stuck_check is None
    from twisted.internet import task
    service._stuck_check = task.LoopingCall(service.check_stuck)
    service._stuck_check.clock = reactor
    service._start_stuck_check()
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    return service, reactor, events


def beat(worker: Any) -> None:
    """What the worker's reactor writes on its heartbeat pipe."""
    from saslsmtp.worker import HEARTBEAT
    worker.childDataReceived(10, HEARTBEAT)


def stuck_lines(events: list[dict]) -> list[str]:
    from twisted.logger import formatEvent, globalLogPublisher
    globalLogPublisher.removeObserver(events.append)
    return [formatEvent(e) for e in events if "is stuck" in formatEvent(e)]


def test_a_silent_worker_is_killed_and_restarted_a_beating_one_is_not(tmp_path: Path) -> None:
    """Worker 1 keeps beating (every second), worker 0 stops: after worker_timeout (4 s)
    one error line names worker 0's pid and how long it was silent; SIGTERM, then
    SIGKILL 2 s later; its end restarts it.  Worker 1 is never signalled."""
    service, reactor, events = watched(tmp_path)
    first, second = service.workers[0], service.workers[1]
    beat(first)
    beat(second)
    for _ in range(6):
        reactor.advance(1.0)
        beat(second)
    assert first.transport.signals == [signal.SIGTERM] and second.transport.signals == []
    lines = stuck_lines(events)
    assert lines == [f"worker 0 (pid {first.pid}) is stuck: its reactor has not turned for 5.0s"
                     " (server.worker_timeout = 4s); killing it and starting another"]
    reactor.advance(2.0)
    assert first.transport.signals == [signal.SIGTERM, signal.SIGKILL]
    service.worker_ended(first, killed(first).value)
    reactor.advance(service.pending[0].getTime() - reactor.seconds())
    assert service.workers[0] is not first and second.transport.signals == []


def test_a_worker_that_ends_at_sigterm_is_not_killed_again(tmp_path: Path) -> None:
    """The SIGKILL is only for a worker still there after the grace."""
    service, reactor, events = watched(tmp_path)
    first = service.workers[0]
    beat(first)
    for _ in range(5):
        reactor.advance(1.0)
    assert first.transport.signals == [signal.SIGTERM]
    service.worker_ended(first, killed(first).value)
    reactor.advance(2.0)
    assert first.transport.signals == [signal.SIGTERM]
    stuck_lines(events)


def test_a_held_master_does_not_take_its_workers_for_stuck(tmp_path: Path) -> None:
    """The master's own reactor held for 30 s (a slow reload): the workers' heartbeats
    wait unread in the pipes, so the first check after it counts again instead of
    killing every worker."""
    service, reactor, events = watched(tmp_path)
    for worker in service.workers.values():
        beat(worker)
    reactor.advance(30.0)  # one late tick of the check loop, nothing read meanwhile
    assert [w.transport.signals for w in service.workers.values()] == [[], []]
    for worker in service.workers.values():
        beat(worker)
    reactor.advance(3.0)
    assert [w.transport.signals for w in service.workers.values()] == [[], []]
    assert stuck_lines(events) == []


def test_a_starting_worker_gets_the_startup_timeout(tmp_path: Path) -> None:
    """Before its first heartbeat a worker may be importing a slow script: it is stuck
    only after startup_timeout (60 s), not worker_timeout."""
    service, reactor, events = watched(tmp_path)
    second = service.workers[1]
    for _ in range(59):
        reactor.advance(1.0)
        beat(second)
    assert service.workers[0].transport.signals == []
    reactor.advance(2.0)
    assert service.workers[0].transport.signals == [signal.SIGTERM]
    assert len(stuck_lines(events)) == 1


def test_worker_timeout_zero_turns_the_check_off(tmp_path: Path) -> None:
    """No heartbeat asked of the workers, no check."""
    service, reactor = master(tmp_path, server="worker_timeout = 0\n")
    assert "--heartbeat" not in service.worker_command(0)[0]


class NoInterpreter(FakeReactor):
    """spawnProcess fails as it does when the interpreter cannot be run (by this user)."""

    def __init__(self) -> None:
        super().__init__()
        self.failing = True

    def spawnProcess(self, proto: Any, executable: str, args: list[str], env: dict,
                     childFDs: dict) -> FakeTransport:
        if self.failing:
            raise PermissionError(13, "Permission denied", executable)
        return super().spawnProcess(proto, executable, args, env, childFDs)


def test_a_worker_that_cannot_be_spawned_at_start_is_one_line(tmp_path: Path) -> None:
    """twistd's ``--uid`` with workers, the interpreter under a folder that user may not
    enter: a ``PermissionError`` traceback ended the start.  Now it is one line."""
    import pytest
    service, _ = master(tmp_path)
    service.reactor = NoInterpreter()
    with pytest.raises(SystemExit) as raised:
        service.start_workers()
    assert raised.value.code == (f"saslsmtp: cannot run {service.python} for a worker:"
                                 " Permission denied")
    assert not service.workers


def test_a_worker_that_cannot_be_respawned_is_tried_again_later(tmp_path: Path) -> None:
    """A restart that cannot run the interpreter (the virtual environment was rebuilt
    meanwhile) was an unhandled error in a timed call, and the slot stayed empty for
    good.  Now it is one error line and another try, with the growing delay."""
    from twisted.logger import formatEvent, globalLogPublisher
    service, _ = master(tmp_path)
    reactor = service.reactor = NoInterpreter()
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        service.spawn(0)
        reactor.advance(0.5)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert [formatEvent(e) for e in events if e.get("log_namespace") == "saslsmtp"] == [
        f"worker 0: cannot run {service.python} for a worker: Permission denied; trying"
        f" again in {delay}s" for delay in ("0.5", "1.0")]
    assert service.pending[0].getTime() - reactor.seconds() == 1.0
    reactor.failing = False
    reactor.advance(1.0)
    assert 0 in service.workers and 0 not in service.pending
