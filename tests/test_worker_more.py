"""A worker process that cannot start says why in one JSON log line and exits 1
(the master then reports it), instead of a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_worker(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "saslsmtp.worker", *args], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)


def critical_lines(stdout: str) -> list[str]:
    """The messages of the worker's critical events (its compact JSON relay lines)."""
    events = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return [e.get("message", "") for e in events if e.get("level") == "critical"]


def test_worker_with_an_invalid_config_exits_1_naming_the_problem(tmp_path: Path) -> None:
    """Config problems come out as ``file:line: key: message``."""
    config = tmp_path / "c.toml"
    config.write_text("[server]\nmax_recipients = 0\n")
    done = run_worker("--config", str(config))
    assert done.returncode == 1, done.stderr
    problem = f"{config}:2: server.max_recipients: must be at least 1"
    assert any(problem in line for line in critical_lines(done.stdout)), done.stdout
    assert "Traceback" not in done.stdout + done.stderr


def test_worker_with_an_unreadable_config_exits_1(tmp_path: Path) -> None:
    """A missing file is a config problem too."""
    done = run_worker("--config", str(tmp_path / "absent.toml"))
    assert done.returncode == 1, done.stderr
    assert any("cannot read" in line for line in critical_lines(done.stdout))


class HeldReactor:
    """A reactor that never runs what it is handed (a worker stuck in an AUTH script), or,
    with ``turning``, runs it at once."""

    def __init__(self, turning: bool) -> None:
        self.turning = turning

    def callFromThread(self, f, *args) -> None:
        if self.turning:
            f(*args)


def test_a_worker_whose_master_is_gone_exits_at_once_when_its_reactor_is_held() -> None:
    """No answer from the reactor within ``answer`` seconds: one error line saying where
    the main thread is stuck, and exit 1 (nothing else would ever stop it)."""
    import sys as _sys
    from twisted.logger import formatEvent, globalLogPublisher

    from saslsmtp.worker import MasterGone
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    exits: list[int] = []
    gone: list[bool] = []
    try:
        watch = MasterGone(HeldReactor(turning=False), lambda: gone.append(True), 1,
                           answer=0.05, stop=5.0, exit=exits.append)
        watch(_sys._getframe())
        watch(_sys._getframe())  # a second signal: one watch
        assert watch.watcher is not None
        watch.watcher.join(5)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert exits == [1] and gone == []
    lines = [formatEvent(e) for e in events if "master is gone" in formatEvent(e)]
    assert len(lines) == 1 and events[-1]["log_level"].name == "error"
    assert lines[0].startswith(f"worker 1 (pid {os.getpid()}): the master is gone and the reactor"
                               " is held: stuck at ") and "test_worker_more.py:" in lines[0]


def test_a_worker_whose_master_is_gone_stops_in_order_when_its_reactor_turns() -> None:
    """The reactor answers: it stops as at the end of standard input, and only a stop
    that takes longer than ``stop`` seconds in all ends the process."""
    from saslsmtp.worker import MasterGone
    exits: list[int] = []
    gone: list[bool] = []
    watch = MasterGone(HeldReactor(turning=True), lambda: gone.append(True), 0,
                       answer=0.05, stop=0.2, exit=exits.append)
    watch(None)
    assert gone == [True] and exits == []
    assert watch.watcher is not None
    watch.watcher.join(5)
    assert exits == [1]


def test_a_worker_whose_master_is_already_gone_does_not_start(tmp_path: Path) -> None:
    """``--master-pid`` is not its parent (the master died before the worker ran): one
    warning and exit 1, nothing built, nothing served."""
    done = run_worker("--config", str(tmp_path / "absent.toml"), "--slot", "1",
                      "--master-pid", str(os.getpid() + 1_000_000))
    assert done.returncode == 1, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [(e["level"], e["message"]) for e in events] == [
        ("warn", f"worker 1 (pid {events[0]['pid']}): the master (pid {os.getpid() + 1_000_000})"
                 " is gone; not starting")], done.stdout


#: An AUTH script whose import never ends in a worker (the test starts no master).
ENDLESS_IMPORT = """\
import os
import time

open(os.path.join(os.path.dirname(__file__), "importing"), "w").close()
while True:
    time.sleep(0.05)
"""

#: A stand-in master: starts the worker (argv) with its own pid, prints the worker's pid.
PARENT = """\
import os, subprocess, sys
child = subprocess.Popen([*sys.argv[1:], "--master-pid", str(os.getpid())], stdin=subprocess.PIPE,
                         stdout=subprocess.DEVNULL)
print(child.pid, flush=True)
child.wait()
"""


def test_a_worker_still_starting_dies_with_its_master(tmp_path: Path) -> None:
    """The master is SIGKILLed while a worker imports an AUTH script that never finishes:
    the worker does not watch its standard input yet, and lived on as an orphan.  The
    kernel's parent-death signal ends it."""
    import signal
    import subprocess

    from tests.support import alive, wait_for, write_config
    (tmp_path / "auth.py").write_text(ENDLESS_IMPORT)
    config = write_config(tmp_path, mechanisms=["PLAIN"], backends=[], script="auth.py")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    parent = subprocess.Popen([sys.executable, "-c", PARENT, sys.executable, "-m", "saslsmtp.worker",
                               "--config", str(config)], env=env, stdout=subprocess.PIPE,
                              text=True)
    worker = int(parent.stdout.readline())
    try:
        wait_for(lambda: (tmp_path / "importing").exists(), what="the worker importing the script")
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        wait_for(lambda: not alive(worker), timeout=10, what="the worker's end")
    finally:
        if alive(worker):
            os.kill(worker, signal.SIGKILL)
        parent.stdout.close()
