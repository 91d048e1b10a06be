"""The master's own metrics folder (``saslsmtp-metrics-PID-*`` in ``$TMPDIR``): removed
when a start fails, and, when a master was SIGKILLed, by the next master that starts;
never a live master's folder, nor one that cannot be proved stale (``metricsdir``)."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from saslsmtp import metricsdir
from tests.support import (ROOT, alive, free_port, kill_leftovers, twistd_command, wait_for,
                           worker_pids, write_config)

BACKEND = '[backends.users]\ntype = "file"\npath = "{path}"\n'


def folders(tmp: Path) -> list[Path]:
    return sorted(tmp.glob(metricsdir.PREFIX + "*"))


def a_dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


_made = itertools.count(1)


def stamped(tmp: Path, pid: int, start: str, name_pid: int | None = None) -> Path:
    """A folder as a master ``pid`` (started at ``start``) would have made it."""
    path = tmp / f"{metricsdir.PREFIX}{pid if name_pid is None else name_pid}-abcd{next(_made)}"
    path.mkdir()
    (path / metricsdir.STAMP).write_text(f"{pid} {start}\n")
    (path / "counter_1.db").write_bytes(b"\0" * 16)
    return path


@pytest.fixture
def sleeper():
    """A live process whose command line says it is a worker (``saslsmtp.worker``)."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                                "saslsmtp.worker"])
    yield process
    process.kill()
    process.wait()


def test_only_folders_proved_stale_are_removed(tmp_path: Path, sleeper) -> None:
    """Removed: a dead master's folder; one whose pid now names another process (its
    start time differs).  Kept: a live master's (same start time); a dead master's whose
    worker still runs; one without the ``master`` file (an older saslsmtp's, or not
    ours); one whose name and file disagree; one of another owner; this process's own."""
    me = os.geteuid()
    live_start = metricsdir.process_start(sleeper.pid)
    assert live_start is not None
    dead = stamped(tmp_path, a_dead_pid(), "12345")
    reused = stamped(tmp_path, sleeper.pid, str(int(live_start) + 1))
    live = stamped(tmp_path, sleeper.pid, live_start, name_pid=sleeper.pid)
    with_worker = stamped(tmp_path, a_dead_pid(), "1")
    (with_worker / f"gauge_livesum_{sleeper.pid}.db").write_bytes(b"\0" * 16)
    unstamped = tmp_path / f"{metricsdir.PREFIX}{a_dead_pid()}-zzzz"
    unstamped.mkdir()
    disagreeing = stamped(tmp_path, a_dead_pid(), "1", name_pid=a_dead_pid())
    own = metricsdir.make(str(tmp_path))

    removed = metricsdir.remove_stale({me}, str(tmp_path))
    assert sorted(removed) == sorted([dead, reused]), removed
    assert not dead.exists() and not reused.exists()
    for kept in (live, with_worker, unstamped, disagreeing, own):
        assert kept.is_dir(), kept
    later = stamped(tmp_path, a_dead_pid(), "1")
    assert metricsdir.remove_stale({me + 1}, str(tmp_path)) == []  # not its owner's
    assert metricsdir.remove_stale({me}, str(tmp_path)) == [later]
    assert (own / metricsdir.STAMP).read_text() == \
        f"{os.getpid()} {metricsdir.process_start(os.getpid())}\n"


def start(config: Path, log: Path, tmp: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(tmp))
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    with open(log, "wb") as out:
        return subprocess.Popen(twistd_command(config, "--workers", "2", *extra),
                                cwd=config.parent, stdout=out, stderr=subprocess.STDOUT, env=env)


def server(tmp_path: Path, name: str, metrics_port: int | None = None) -> tuple[Path, Path]:
    """A config with ``[metrics]`` in its own folder, and its log's path."""
    home = tmp_path / name
    home.mkdir()
    (home / "users").write_text("alice:{PLAIN}wonderland\n")
    metrics_port = metrics_port or free_port()
    config = write_config(home, BACKEND.format(path=home / "users"), mechanisms=["PLAIN"],
                          listen=[f"tcp:{free_port()}:interface=127.0.0.1"],
                          extra=f'[metrics]\nlisten = "tcp:{metrics_port}:interface=127.0.0.1"\n')
    return config, home / "master.log"


def serving(log: Path) -> bool:
    return len(worker_pids(log)) == 2 and log.read_text().count(" serving ") == 2


def test_a_start_that_fails_leaves_no_metrics_folder(tmp_path: Path) -> None:
    """``[metrics] listen`` on a port in use: the start ends with one line and status 1,
    and the folder the master had made for its workers' metric files is gone (each
    failed start left one in /tmp)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config, log = server(tmp_path, "a", metrics_port=taken.getsockname()[1])
        for _ in range(2):
            master = start(config, log, tmp)
            try:
                assert master.wait(60) == 1, log.read_text()
            finally:
                kill_leftovers(master, log)
            assert "address already in use" in log.read_text().lower(), log.read_text()
            assert folders(tmp) == [], folders(tmp)


def test_a_killed_masters_folder_is_removed_by_the_next_start(tmp_path: Path) -> None:
    """Two masters run with ``[metrics]`` in one ``$TMPDIR``; one is SIGKILLed, so its
    folder stays (it had no chance to remove it).  A third master that starts removes
    that folder, says so, and keeps the live master's, which still serves /metrics; its
    own goes when it stops."""
    import urllib.request
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    masters = []
    try:
        (live_config, live_log), (killed_config, killed_log) = \
            server(tmp_path, "live"), server(tmp_path, "killed")
        live = start(live_config, live_log, tmp)
        masters.append((live, live_log))
        killed = start(killed_config, killed_log, tmp)
        masters.append((killed, killed_log))
        wait_for(lambda: serving(live_log) and serving(killed_log), timeout=60,
                 what="both masters' workers serving")
        assert len(folders(tmp)) == 2
        killed_folder, = [f for f in folders(tmp) if f.name.startswith(
            f"{metricsdir.PREFIX}{killed.pid}-")]
        workers = list(worker_pids(killed_log).values())
        killed.send_signal(signal.SIGKILL)
        killed.wait(10)
        wait_for(lambda: not any(alive(pid) for pid in workers), what="the orphans to stop")
        assert killed_folder.is_dir()

        third_config, third_log = server(tmp_path, "third")
        third = start(third_config, third_log, tmp)
        masters.append((third, third_log))
        wait_for(lambda: serving(third_log), timeout=60, what="the third master's workers")
        assert f"removed {killed_folder}, left by a master that is no longer running" \
            in third_log.read_text(), third_log.read_text()
        assert not killed_folder.exists()
        assert len(folders(tmp)) == 2  # the live master's and the third's
        metrics_port = int(live_config.read_text().split('listen = "tcp:')[-1].split(":")[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            assert b"saslsmtp_worker_sessions" in r.read()

        third.send_signal(signal.SIGTERM)
        assert third.wait(30) == 0, third_log.read_text()
        live.send_signal(signal.SIGTERM)
        assert live.wait(30) == 0, live_log.read_text()
        assert folders(tmp) == []
        assert "Traceback" not in third_log.read_text() + live_log.read_text()
    finally:
        for master, log in masters:
            kill_leftovers(master, log)
