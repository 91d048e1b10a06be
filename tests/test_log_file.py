"""The log file of a daemon without workers (``RotatingLogFile``): renamed to ``.1`` once
it holds ``rotate_length`` bytes and on SIGUSR1, reopened (not renamed again) after an
outside rename; a log file that cannot be opened is a one-line error, not a traceback;
the real logrotate with ``etc/logrotate.d/saslsmtp``, with and without workers."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from saslsmtp.logs import RotatingLogFile
from tests.conftest import require_binary
from tests.support import ROOT, alice_config, kill_leftovers, wait_for
from tests.test_workers import Session


def test_rotates_before_the_write_past_the_size(tmp_path: Path) -> None:
    """As twistd's ``LogFile``: the write that finds the file at or past the limit goes to
    a new file; the older one becomes ``.1``, the one before ``.2``."""
    path = tmp_path / "saslsmtp.log"
    out = RotatingLogFile(str(path), rotate_length=10)
    out.write("first\n")
    out.write("second line\n")  # 6 bytes written before: not yet at 10
    out.write("third\n")  # 18 bytes: rotate first
    out.write("fourth line\n")
    out.write("fifth\n")
    assert [p.read_text() for p in (path.with_name("saslsmtp.log.2"),
                                     path.with_name("saslsmtp.log.1"), path)] \
        == ["first\nsecond line\n", "third\nfourth line\n", "fifth\n"]


def test_an_existing_file_counts_from_its_size(tmp_path: Path) -> None:
    path = tmp_path / "saslsmtp.log"
    path.write_text("x" * 20 + "\n")
    out = RotatingLogFile(str(path), rotate_length=10)
    out.write("new\n")
    assert (path.read_text(), path.with_name("saslsmtp.log.1").read_text()) == ("new\n", "x" * 20 + "\n")


def test_renew_reopens_after_an_outside_rename(tmp_path: Path) -> None:
    """logrotate renames the file, then signals: the path is reopened, nothing renamed
    again, and the size limit counts from the new file."""
    path = tmp_path / "saslsmtp.log"
    out = RotatingLogFile(str(path), rotate_length=100)
    out.write("before\n")
    path.rename(tmp_path / "saslsmtp.log-20261130")
    assert out.renew() is True
    out.write("after\n")
    assert path.read_text() == "after\n"
    assert (tmp_path / "saslsmtp.log-20261130").read_text() == "before\n"
    assert not path.with_name("saslsmtp.log.1").exists()
    assert out.renew() is True  # not renamed: rotate now
    assert path.with_name("saslsmtp.log.1").read_text() == "after\n"


def test_no_rotation_without_a_limit(tmp_path: Path) -> None:
    path = tmp_path / "saslsmtp.log"
    out = RotatingLogFile(str(path), rotate_length=None)
    for _ in range(100):
        out.write("a line of text\n")
    assert path.read_text().count("\n") == 100 and not path.with_name("saslsmtp.log.1").exists()


def login(port: int) -> None:
    session = Session(port)
    assert session.login().startswith(b"235 ")
    session.send(b"QUIT")
    session.close()


def _daemon_logging_to(log: Path, config: Path) -> subprocess.Popen:
    """``twistd -n saslsmtp --logfile=LOG`` in one process, in the config's folder."""
    return subprocess.Popen(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
         f"--logfile={log}", "saslsmtp", "--config", str(config)],
        cwd=config.parent, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT)


def test_the_daemon_rotates_its_log_file_on_sigusr1(tmp_path: Path) -> None:
    """The real daemon (one process, ``--logfile``): the lines before SIGUSR1 are in
    ``.1``, a session after it is logged in the new file only."""
    config, port = alice_config(tmp_path)
    log = tmp_path / "saslsmtp.log"
    proc = _daemon_logging_to(log, config)
    try:
        wait_for(lambda: log.exists() and "saslsmtp ready" in log.read_text(), what="ready")
        login(port)
        wait_for(lambda: "session end" in log.read_text(), what="the first session's line")
        proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: not log.exists() or "saslsmtp ready" not in log.read_text(),
                 what="the rotation")
        login(port)
        wait_for(lambda: log.exists() and "session end" in log.read_text(), what="the new file's line")
        old = log.with_name("saslsmtp.log.1").read_text()
        assert "saslsmtp ready" in old and old.count("session end") == 1
        assert log.read_text().count("session end") == 1
    finally:
        kill_leftovers(proc, log)


def test_sighup_reopens_a_renamed_log_file_and_reloads(tmp_path: Path) -> None:
    """One process: logrotate renames the file and its ``postrotate`` sends SIGHUP (the
    usual snippet).  That is a reload, and the path is reopened too, as the master does:
    the lines after it went on into the renamed file, which logrotate later compresses
    and deletes."""
    config, port = alice_config(tmp_path)
    log = tmp_path / "saslsmtp.log"
    proc = _daemon_logging_to(log, config)
    try:
        wait_for(lambda: log.exists() and "saslsmtp ready" in log.read_text(), what="ready")
        rotated = log.with_name("saslsmtp.log-20261130")
        log.rename(rotated)
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: log.exists() and "reloaded" in log.read_text(), what="the reload's line")
        login(port)
        wait_for(lambda: "session end" in log.read_text(), what="the session's line")
        assert log.read_text().splitlines()[0].endswith(f"log file {log} reopened")
        assert "reloaded" not in rotated.read_text() and "session end" not in rotated.read_text()
        assert not log.with_name("saslsmtp.log.1").exists()  # reopened, never rotated
    finally:
        kill_leftovers(proc, log)


def test_a_log_file_that_cannot_be_opened_is_one_line(tmp_path: Path) -> None:
    """``--logfile`` in a missing directory: exit 1 and one line saying why, no traceback."""
    config, _ = alice_config(tmp_path)
    missing = tmp_path / "no-such-dir" / "saslsmtp.log"
    done = subprocess.run(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
         f"--logfile={missing}", "saslsmtp", "--config", str(config)],
        cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
        timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip() == f"saslsmtp: cannot open the log file {missing}: No such file or directory"
    assert "Traceback" not in done.stdout + done.stderr


@pytest.mark.parametrize("workers", [1, 2])
def test_logrotate_with_the_example_config(tmp_path: Path, workers: int) -> None:
    """The real logrotate with ``etc/logrotate.d/saslsmtp`` (its paths moved into the test
    folder) against the real daemon with ``log_rotate_size = 0``: the sessions before are
    in ``.1``, the sessions after in the new file, none lost, none in both."""
    logrotate = require_binary(shutil.which("logrotate") or "/usr/sbin/logrotate", "logrotate")
    config, port = alice_config(tmp_path, f"log_rotate_size = 0\nworkers = {workers}\n")
    logs = tmp_path / "log"
    logs.mkdir(mode=0o755)
    log, pidfile = logs / "saslsmtp.log", tmp_path / "twistd.pid"
    example = (ROOT / "etc" / "logrotate.d" / "saslsmtp").read_text()
    assert "/var/log/saslsmtp/saslsmtp.log" in example and "/run/saslsmtp/twistd.pid" in example
    conf = tmp_path / "logrotate.conf"
    assert "create 0640 saslsmtp adm" in example  # made for the test's own user here
    me = f"{pwd.getpwuid(os.getuid()).pw_name} {grp.getgrgid(os.getgid()).gr_name}"
    conf.write_text(example.replace("/var/log/saslsmtp/saslsmtp.log", str(log))
                    .replace("/run/saslsmtp/twistd.pid", str(pidfile))
                    .replace("create 0640 saslsmtp adm", f"create 0640 {me}"))
    proc = subprocess.Popen(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
         f"--pidfile={pidfile}", f"--logfile={log}", "saslsmtp", "--config", str(config)],
        cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: log.exists() and log.read_text().count("saslsmtp ready") == workers,
                 what="ready")
        for _ in range(6):
            login(port)
        wait_for(lambda: log.read_text().count("session end") == 6, what="six session lines")
        done = subprocess.run([logrotate, "-f", "-s", str(tmp_path / "state"), str(conf)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        rotated = logs / "saslsmtp.log.1"
        assert rotated.read_text().count("session end") == 6
        # logrotate's ``create`` made the new file; each process says when it writes there
        reopened = f"log file {log} reopened"
        wait_for(lambda: log.exists() and log.read_text().count(reopened)
                 == (1 if workers == 1 else 1 + workers), what="every process in the new file")
        for _ in range(4):
            login(port)
        wait_for(lambda: log.read_text().count("session end") == 4, what="four lines in the new file")
        assert rotated.read_text().count("session end") == 6
        assert sorted(p.name for p in logs.iterdir()) == ["saslsmtp.log", "saslsmtp.log.1"]
    finally:
        kill_leftovers(proc, log)


@pytest.mark.parametrize("pid_file", ["another program", "a dead process", "none"])
def test_logrotate_without_a_running_daemon_is_no_error(tmp_path: Path, pid_file: str) -> None:
    """The example's ``postrotate`` when saslsmtp is not running: logrotate exits 0 (its
    ``kill`` failed, and cron mailed an error every night), and when the pid file left by
    a crash names another program now, that program does not get SIGUSR1 (which ends it)."""
    logrotate = require_binary(shutil.which("logrotate") or "/usr/sbin/logrotate", "logrotate")
    logs = tmp_path / "log"
    logs.mkdir(mode=0o755)
    log, pidfile = logs / "saslsmtp.log", tmp_path / "twistd.pid"
    log.write_text("a line\n")
    me = f"{pwd.getpwuid(os.getuid()).pw_name} {grp.getgrgid(os.getgid()).gr_name}"
    conf = tmp_path / "logrotate.conf"
    conf.write_text((ROOT / "etc" / "logrotate.d" / "saslsmtp").read_text()
                    .replace("/var/log/saslsmtp/saslsmtp.log", str(log))
                    .replace("/run/saslsmtp/twistd.pid", str(pidfile))
                    .replace("create 0640 saslsmtp adm", f"create 0640 {me}"))
    other = subprocess.Popen(["sleep", "300"])
    try:
        if pid_file == "another program":
            pidfile.write_text(str(other.pid))
        elif pid_file == "a dead process":
            gone = subprocess.Popen(["true"])
            gone.wait()
            pidfile.write_text(str(gone.pid))
        done = subprocess.run([logrotate, "-f", "-s", str(tmp_path / "state"), str(conf)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert (logs / "saslsmtp.log.1").read_text() == "a line\n"
        assert other.poll() is None, "SIGUSR1 went to another program"
    finally:
        other.kill()
        other.wait()


@pytest.mark.parametrize("workers", [1, 2])
def test_sigusr1_without_a_log_file_is_harmless(tmp_path: Path, workers: int) -> None:
    """``-n`` with the log on standard output (systemd's journal): nothing handled SIGUSR1,
    so its default action ended the daemon (one process, or the master, whose workers
    then stopped).  Now it is one log line, and the daemon serves on."""
    config, port = alice_config(tmp_path)
    log = tmp_path / "stdout.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
             "--pidfile=", "saslsmtp", "--config", str(config), "--workers", str(workers)],
            cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=out,
            stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: log.read_text().count("saslsmtp ready") == workers, what="ready")
        proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: "SIGUSR1 received" in log.read_text() or proc.poll() is not None,
                 what="the signal's line")
        assert proc.poll() is None, log.read_text()
        login(port)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
        assert log.read_text().count("SIGUSR1 received: the log is not a file (standard output"
                                     " or syslog); nothing to rotate") == 1
    finally:
        kill_leftovers(proc, log)
