"""Workers write their own log lines: whole lines in one file from several processes
(``AppendLogFile``), twistd's rotation names, never a rotated device, and the real
daemon with ``workers = 2`` and ``log_format = "json"``: every line of both workers
parses, and after SIGUSR1 (rotate) or a rename plus SIGHUP (logrotate) new lines go
to the new file."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from saslsmtp.logs import AppendLogFile, FdLineWriter, worker_observer
from tests.support import ROOT, alice_config, alive, wait_for, worker_pids
from tests.test_workers import Session

WRITER = """
import sys
from saslsmtp.logs import AppendLogFile
out = AppendLogFile(sys.argv[1])
tag = sys.argv[2]
for i in range(int(sys.argv[3])):
    out.write(f"{tag} {i} " + tag * (1 + (i * 7919) % 6000) + " end\\n")
"""


def test_lines_from_several_processes_never_interleave(tmp_path: Path) -> None:
    """Four processes append 400 lines each (up to 6 KB, more than a pipe's atomic size)
    to one file at once: every line arrives whole and none is lost."""
    path = tmp_path / "shared.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), tag, "400"], env=env)
               for tag in "abcd"]
    assert [w.wait(60) for w in writers] == [0, 0, 0, 0]
    seen: dict[str, list[int]] = {tag: [] for tag in "abcd"}
    for line in path.read_text().splitlines():
        tag, number, body, end = line.split(" ")
        assert end == "end" and body == tag * len(body) and len(body) == 1 + (int(number) * 7919) % 6000
        seen[tag].append(int(number))
    assert all(sorted(numbers) == list(range(400)) for numbers in seen.values())


def test_rotate_uses_twistds_names_and_keeps_the_mode(tmp_path: Path) -> None:
    """``rotate``: ``log`` -> ``log.1``, an older ``log.1`` -> ``log.2``; the new file has
    the old one's mode; ``reopen`` after an outside rename writes to the new path."""
    path = tmp_path / "saslsmtp.log"
    out = AppendLogFile(str(path), rotate_length=10)
    os.chmod(path, 0o640)
    out.write("first\n")
    assert out.should_rotate() is False
    out.write("second line\n")
    assert out.should_rotate() is True
    assert out.rotate() is True
    out.write("third\n")
    assert out.rotate() is True
    out.write("fourth\n")
    assert (path.with_name("saslsmtp.log.2").read_text(), path.with_name("saslsmtp.log.1").read_text(),
            path.read_text()) == ("first\nsecond line\n", "third\n", "fourth\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    path.rename(tmp_path / "renamed")
    assert out.moved() is True
    assert out.rotate() is False  # someone else renamed it: reopen, do not rename again
    out.reopen()
    out.write("fifth\n")
    assert (path.read_text(), (tmp_path / "renamed").read_text()) == ("fifth\n", "fourth\n")
    assert out.moved() is False


def test_a_device_or_fifo_is_never_rotated(tmp_path: Path) -> None:
    """``--logfile=/dev/null`` (a FIFO stands in for it): no rename, whatever the size."""
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        out = AppendLogFile(str(fifo), rotate_length=1)
        assert out.rotate() is False
        assert stat.S_ISFIFO(os.stat(fifo).st_mode) and not (tmp_path / "log.fifo.1").exists()
    finally:
        os.close(reader)


def test_worker_observer_marks_lines_with_the_worker(tmp_path: Path) -> None:
    """Text lines say ``worker=PID`` in the system field, JSON lines carry ``worker_pid``
    and ``worker_slot``, as when the master relayed them; the level filter applies."""
    from twisted.logger import Logger, LogPublisher
    path = tmp_path / "w.log"
    for log_format in ("text", "json"):
        out = FdLineWriter(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND))
        log = Logger(namespace="saslsmtp.auth",
                     observer=LogPublisher(worker_observer(out, log_format, "info", 4242, 1)))
        log.debug("hidden")
        log.info("auth succeeded: user={user}", user="alice")
        os.close(out.fd)
        text = path.read_text()
        if log_format == "text":
            assert text.endswith(" [saslsmtp.auth#info worker=4242] auth succeeded: user=alice\n")
        else:
            record = json.loads(text)
            assert (record["message"], record["worker_pid"], record["worker_slot"], record["user"]) == \
                ("auth succeeded: user=alice", 4242, 1, "alice")
        assert "hidden" not in text


def logins(port: int, count: int) -> None:
    """``count`` sessions (EHLO, AUTH PLAIN, QUIT), eight at a time."""
    def one(_: int) -> None:
        session = Session(port)
        assert session.login().startswith(b"235 ")
        session.send(b"QUIT")
        session.sock.close()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(count)))


def records(path: Path) -> list[dict]:
    """Every line of ``path`` as JSON (a line that is not JSON fails the test); none in
    the instant between a rotation's rename and the reopened file's creation.  A line
    still being written is left for the next look: the kernel may show a write that
    crosses a page boundary one page at a time, so a reader can see its first part."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines()]


def session_ends(path: Path) -> int:
    return sum(1 for r in records(path) if r["message"].startswith("session end "))


def workers_reopened(path: Path) -> int:
    """Workers that said, in ``path`` itself, that they write there now."""
    return sum(1 for r in records(path) if r["message"].startswith("worker ")
               and r["message"].endswith(f"log file {path} reopened"))


def test_two_workers_share_the_log_file_and_reopen_it(tmp_path: Path) -> None:
    """workers = 2, log_format = "json", ``--logfile``: both workers' lines land whole in
    the file; SIGUSR1 rotates it (``.1``) and SIGHUP after an outside rename reopens it,
    and the sessions after each land in the new file only."""
    config, port = alice_config(tmp_path, 'log_format = "json"\nworkers = 2\n')
    log = tmp_path / "saslsmtp.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
         f"--logfile={log}", "saslsmtp", "--config", str(config)],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    pids: set[int] = set()
    try:
        wait_for(lambda: log.exists() and log.read_text().count("saslsmtp ready") == 2,
                 what="two ready workers")
        pids = set(worker_pids(log).values())
        logins(port, 120)
        wait_for(lambda: session_ends(log) == 120, what="120 session lines")
        first = records(log)
        assert {r.get("worker_pid") for r in first if "worker_pid" in r} == pids

        proc.send_signal(signal.SIGUSR1)  # twistd's meaning: rotate now
        wait_for(lambda: any("rotated; 2 workers reopen it" in r["message"] for r in records(log)),
                 what="the rotation")
        wait_for(lambda: workers_reopened(log) == 2, what="both workers in the new file")
        logins(port, 40)
        wait_for(lambda: session_ends(log) == 40, what="40 session lines in the new file")
        assert session_ends(tmp_path / "saslsmtp.log.1") == 120

        log.rename(tmp_path / "saslsmtp.log.old")  # logrotate, then its postrotate SIGHUP
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: log.exists() and "reopened; 2 workers reopen it" in log.read_text(),
                 what="the reopen")
        wait_for(lambda: workers_reopened(log) == 2, what="both workers in the reopened file")
        logins(port, 40)
        wait_for(lambda: session_ends(log) == 40, what="40 session lines after the reopen")
        assert session_ends(tmp_path / "saslsmtp.log.old") == 40
        assert all(alive(pid) for pid in pids)  # nobody died of a signal it did not expect
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    for path in (log, tmp_path / "saslsmtp.log.1", tmp_path / "saslsmtp.log.old"):
        assert all(r["level"] and r["message"] for r in records(path))


REENTRANT = """
import os, signal, sys, threading, time, fcntl
from saslsmtp.logs import FdLineWriter
r, w = os.pipe()
fcntl.fcntl(w, fcntl.F_SETFL, os.O_NONBLOCK)
try:
    while True:
        os.write(w, b"f" * 65536)  # fill the pipe: the next line waits for room
except BlockingIOError:
    pass
writer = FdLineWriter(w)
signal.signal(signal.SIGALRM, lambda *_: writer.write_bytes(b"from the handler\\n"))
got = []
def drain():
    time.sleep(0.5)
    while (data := os.read(r, 1 << 20)):
        got.append(data)
        if b"outer line" in b"".join(got):
            break
drainer = threading.Thread(target=drain, daemon=True)
drainer.start()
signal.setitimer(signal.ITIMER_REAL, 0.2)  # arrives while the outer line waits
writer.write_bytes(b"outer line\\n")
drainer.join(5)
text = b"".join(got)
assert b"from the handler\\n" in text and text.endswith(b"outer line\\n"), text[-80:]
print("ok")
"""


def test_a_signal_handler_that_logs_while_a_line_is_written_does_not_hang() -> None:
    """twistd's SIGTERM handler logs, and a handler runs in the main thread wherever it
    was: here inside a line's write, holding the writer's lock while a full pipe makes
    it wait.  With a plain lock the process hung for good on its own stop signal."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    try:
        done = subprocess.run([sys.executable, "-c", REENTRANT], env=env, capture_output=True,
                              text=True, timeout=15)
    except subprocess.TimeoutExpired:
        raise AssertionError("the process hung: the handler waits for the lock its own"
                             " thread holds") from None
    assert (done.returncode, done.stdout) == (0, "ok\n"), done.stderr
