"""``server.workers = 2``: a master and two workers sharing one listening socket, as a
real ``twistd -n saslsmtp`` on loopback.

Which worker serves a connection is made deterministic with SIGSTOP: a stopped worker
cannot accept, so the other one must.  The per-process session gauge of ``/metrics``
then shows one open session under each worker's pid.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import (ROOT, alive, free_port, kill_leftovers, twistd_command, wait_for,
                           worker_pids, write_config)

USERS = "alice:{PLAIN}wonderland\n"
BACKEND = '[backends.users]\ntype = "file"\npath = "{path}"\n'


class Session:
    """A raw SMTP client socket: send a line, read one reply."""

    def __init__(self, port: int, preamble: bytes = b"") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.sendall(preamble)  # e.g. a PROXY protocol header
        self.buffer = b""
        self.greeting = self.reply()

    def reply(self) -> bytes:
        while True:
            lines = self.buffer.split(b"\r\n")
            for i, line in enumerate(lines[:-1]):
                if len(line) >= 4 and line[3:4] == b" ":
                    out = b"\r\n".join(lines[:i + 1]) + b"\r\n"
                    self.buffer = b"\r\n".join(lines[i + 1:])
                    return out
            data = self.sock.recv(4096)
            if not data:
                raise ConnectionError(f"closed; pending {self.buffer!r}")
            self.buffer += data

    def send(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def login(self) -> bytes:
        import base64
        self.send(b"EHLO client.example")
        return self.send(b"AUTH PLAIN " + base64.b64encode(b"\0alice\0wonderland"))

    def close(self) -> None:
        self.sock.close()


def worker_sessions(metrics_port: int) -> dict[int, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {int(s.labels["pid"]): s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == "saslsmtp_worker_sessions"}


def reloads(metrics_port: int) -> dict[str, float]:
    """``saslsmtp_reloads_total`` by result, as /metrics shows it."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {s.labels["result"]: s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == "saslsmtp_reloads_total"}


def start(config: Path, log: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open(log, "wb") as out:
        return subprocess.Popen(twistd_command(config, *extra), cwd=config.parent, stdout=out,
                                stderr=subprocess.STDOUT, env=env)


def serving(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            return s.recv(100).startswith(b"220 ")
    except OSError:
        return False


@pytest.fixture
def two_workers(tmp_path: Path):
    (tmp_path / "users").write_text(USERS)
    port, metrics_port = free_port(), free_port()
    config = write_config(tmp_path, BACKEND.format(path=tmp_path / "users"),
                          mechanisms=["PLAIN"], listen=[f"tcp:{port}:interface=127.0.0.1"],
                          extra=f'[metrics]\nlisten = "tcp:{metrics_port}:interface=127.0.0.1"\n')
    log = tmp_path / "master.log"
    master = start(config, log, "--workers", "2")
    try:
        wait_for(lambda: len(worker_pids(log)) == 2 and log.read_text().count(" serving ") == 2,
                 what="two workers serving")
        yield master, port, metrics_port, log
    finally:
        kill_leftovers(master, log)


def served_by(pid_serving: int, others: list[int], port: int) -> Session:
    """Open a session while every other worker is stopped, so ``pid_serving`` accepts it."""
    for pid in others:
        os.kill(pid, signal.SIGSTOP)
    try:
        session = Session(port)
        assert session.login().startswith(b"235 ")
    finally:
        for pid in others:
            os.kill(pid, signal.SIGCONT)
    return session


def test_two_workers_serve_survive_a_kill_and_stop_cleanly(two_workers) -> None:
    """Both workers serve (one session each, under different pids in /metrics); kill -9
    of one leaves the other's established session working; the master starts a
    replacement that serves; SIGTERM to the master ends everything with exit status 0."""
    master, port, metrics_port, log = two_workers
    first, second = worker_pids(log)[0], worker_pids(log)[1]
    assert first != second and alive(first) and alive(second)
    on_first = served_by(first, [second], port)
    on_second = served_by(second, [first], port)
    assert wait_for(lambda: worker_sessions(metrics_port).get(first) == 1
                    and worker_sessions(metrics_port).get(second) == 1 and worker_sessions(metrics_port),
                    what="one session per worker in /metrics")

    os.kill(first, signal.SIGKILL)
    wait_for(lambda: not alive(first), what="the killed worker to go")
    with pytest.raises(OSError):  # the killed worker's session is gone ...
        on_first.send(b"NOOP")
        on_first.send(b"NOOP")
    # ... the other worker's established session is untouched and delivers a message
    assert on_second.send(b"MAIL FROM:<alice@example.test>").startswith(b"250 ")
    assert on_second.send(b"RCPT TO:<bob@example.test>").startswith(b"250 ")
    assert on_second.send(b"DATA").startswith(b"354 ")
    assert on_second.send(b"Subject: survived\r\n\r\nhello\r\n.").startswith(b"250 ")

    replacement = wait_for(lambda: worker_pids(log).get(0) not in (None, first)
                           and worker_pids(log)[0], what="a replacement worker")
    assert "worker 0 (pid %d) ended unexpectedly (signal 9)" % first in log.read_text()
    wait_for(lambda: log.read_text().count(" serving ") == 3, what="the replacement serving")
    on_replacement = served_by(replacement, [second], port)
    assert wait_for(lambda: worker_sessions(metrics_port).get(replacement) == 1,
                    what="the replacement's session in /metrics")
    assert first not in worker_sessions(metrics_port)  # the dead worker's gauge is forgotten

    master.send_signal(signal.SIGTERM)
    assert master.wait(30) == 0, log.read_text()
    for session in (on_second, on_replacement):
        assert session.reply().startswith(b"421 4.3.2")
    assert not alive(second) and not alive(replacement)
    assert "Traceback" not in log.read_text()


def test_workers_exit_when_the_master_dies(two_workers) -> None:
    """kill -9 of the master: the workers see EOF on stdin and stop by themselves."""
    master, port, _, log = two_workers
    pids = list(worker_pids(log).values())
    master.kill()
    master.wait(10)
    wait_for(lambda: not any(alive(p) for p in pids), what="the orphaned workers to exit")
    assert not serving(port)


def test_each_worker_says_once_that_the_master_is_gone(tmp_path: Path) -> None:
    """kill -9 of a master whose /metrics was scraped (its thread pool then has threads):
    the kernel's parent-death signal comes as the master's main thread ends, while its
    other threads still run, and a worker took it for the master's own SIGTERM, stopping
    without a word (one or both only logged "Main loop terminated").  Each worker now says
    ``the master is gone; stopping`` exactly once.  That order of the master's threads'
    ends is the kernel's choice, so a few masters are killed in a row."""
    import concurrent.futures
    (tmp_path / "users").write_text(USERS)
    for attempt in range(5):
        home = tmp_path / str(attempt)
        home.mkdir()
        port, metrics_port = free_port(), free_port()
        config = write_config(home, BACKEND.format(path=tmp_path / "users"), mechanisms=["PLAIN"],
                              listen=[f"tcp:{port}:interface=127.0.0.1"],
                              extra=f'[metrics]\nlisten = "tcp:{metrics_port}:interface=127.0.0.1"\n')
        log = home / "master.log"
        master = start(config, log, "--workers", "2")
        try:
            wait_for(lambda: log.read_text().count(" serving ") == 2, what="two workers serving")
            pids = worker_pids(log)
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                assert all(pool.map(lambda _: worker_sessions(metrics_port) is not None, range(16)))
            master.kill()
            master.wait(10)
            wait_for(lambda: not any(alive(p) for p in pids.values()), what="the workers' end")
        finally:
            kill_leftovers(master, log)
        text = log.read_text()
        for slot, pid in pids.items():
            said = f"worker {slot} (pid {pid}): the master is gone; stopping"
            assert text.count(said) == 1, text
        assert "Traceback" not in text


def test_sighup_with_a_broken_config_keeps_serving(two_workers, tmp_path: Path) -> None:
    """The master validates before forwarding: a broken file is logged as
    file:line: key: message and the workers keep the running configuration.  /metrics
    counts each SIGHUP once, as the master decided it (not once per worker)."""
    master, port, metrics_port, log = two_workers
    config = tmp_path / "saslsmtp.toml"
    good = config.read_text()
    config.write_text(good.replace("[auth]\n", "[auth]\nbogus = 1\n"))
    master.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in log.read_text(), what="the refusal")
    assert re.search(rf"{re.escape(str(config))}:\d+: auth.bogus: unknown key", log.read_text())
    session = Session(port)
    assert session.login().startswith(b"235 ")
    session.close()
    config.write_text(good)
    master.send_signal(signal.SIGHUP)
    wait_for(lambda: log.read_text().count("new sessions use it") == 2, what="both workers reloading")
    assert reloads(metrics_port) == {"invalid": 1, "success": 1}
    assert master.poll() is None


def test_haproxy_listener_is_wrapped_in_the_workers(tmp_path: Path) -> None:
    """``haproxy:tcp:...`` shared by two workers: the PROXY v1 header is parsed in the
    worker, and the AUTH log line names the proxied client, not 127.0.0.1."""
    (tmp_path / "users").write_text(USERS)
    port = free_port()
    config = write_config(tmp_path, BACKEND.format(path=tmp_path / "users"), mechanisms=["PLAIN"],
                          listen=[f"haproxy:tcp:{port}:interface=127.0.0.1"])
    log = tmp_path / "master.log"
    master = start(config, log, "--workers", "2")
    try:
        wait_for(lambda: log.read_text().count(" serving ") == 2, what="two workers serving")
        session = Session(port, b"PROXY TCP4 203.0.113.9 127.0.0.1 40000 587\r\n")
        assert session.greeting.startswith(b"220 ")
        assert session.login().startswith(b"235 ")
        session.close()
        wait_for(lambda: 'auth succeeded: client=203.0.113.9 mechanism=PLAIN user="alice"'
                 in log.read_text(),
                 what="the proxied address in the log")
        master.send_signal(signal.SIGTERM)
        assert master.wait(30) == 0
    finally:
        kill_leftovers(master, log)


#: An AUTH script whose import blocks in the workers (not in the master, which imports it
#: for its checks) until the test creates ``go``; each worker says it got there.
SLOW_WORKER_SCRIPT = '''\
import os, sys, time
HERE = os.path.dirname(os.path.abspath(__file__))
if sys.argv[0].endswith("worker.py"):
    open(os.path.join(HERE, "importing.%d" % os.getpid()), "w").close()
    while not os.path.exists(os.path.join(HERE, "go")):
        time.sleep(0.02)

def auth(arguments, context):
    return None
'''


def two_workers_with_script(tmp_path: Path, script: str, name: str,
                            start_new_session: bool = False
                            ) -> tuple[int, Path, subprocess.Popen]:
    """A master started with two workers whose AUTH script is ``script`` (written to
    ``name``), its output in ``saslsmtp.log``: (port, log, master)."""
    (tmp_path / "users").write_text(USERS)
    (tmp_path / name).write_text(script)
    port = free_port()
    config = write_config(tmp_path, BACKEND.format(path=tmp_path / "users"), script=name,
                          listen=[f"tcp:{port}:interface=127.0.0.1"])
    log = tmp_path / "saslsmtp.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(twistd_command(config, "--workers", "2"), cwd=tmp_path,
                                stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=start_new_session,
                                env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return port, log, proc


def workers_importing_a_slow_script(tmp_path: Path, start_new_session: bool = False
                                     ) -> tuple[int, Path, subprocess.Popen]:
    """A master whose two workers are importing ``SLOW_WORKER_SCRIPT`` (it waits for a
    ``go`` file): (port, log, master)."""
    port, log, proc = two_workers_with_script(tmp_path, SLOW_WORKER_SCRIPT, "slow.py",
                                              start_new_session)
    try:
        wait_for(lambda: len(list(tmp_path.glob("importing.*"))) == 2 or proc.poll() is not None,
                 what="both workers importing the script")
        assert proc.poll() is None, log.read_text()
    except BaseException:
        (tmp_path / "go").touch()
        kill_leftovers(proc, log)
        raise
    return port, log, proc


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_while_the_workers_start_stops_the_start(tmp_path: Path, signum: int) -> None:
    """The master waits for its workers before its reactor (and twistd's handlers) runs:
    a SIGTERM there killed it silently and left the workers holding the port, a Ctrl-C
    printed a traceback.  Now the workers are stopped, the master exits 1 with one line,
    the port is free, and nothing said it was ready."""
    port, log, proc = workers_importing_a_slow_script(tmp_path)
    try:
        workers = [int(p.suffix[1:]) for p in tmp_path.glob("importing.*")]
        proc.send_signal(signum)
        assert proc.wait(30) == 1, log.read_text()
        text = log.read_text()
        name = signal.Signals(signum).name
        assert f"saslsmtp: start interrupted by {name}; the workers were stopped" in text, text
        assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
        assert "saslsmtp ready" not in text, text
        assert not any(alive(pid) for pid in workers), text
        with socket.socket() as again:  # nobody holds the listening socket any more
            again.bind(("127.0.0.1", port))
    finally:
        (tmp_path / "go").touch()
        kill_leftovers(proc, log)


def test_a_sighup_to_every_process_while_the_workers_start(tmp_path: Path) -> None:
    """``systemctl kill -s HUP`` (every process of the unit) while the workers import a
    slow AUTH script: a worker's SIGHUP had no handler yet and ended it, and with it the
    whole start ("worker 1 ended before it was ready", exit 1).  Now each worker starts,
    one line says the signal was ignored, and the server serves."""
    port, log, proc = workers_importing_a_slow_script(tmp_path, start_new_session=True)
    try:
        os.killpg(proc.pid, signal.SIGHUP)  # the master and both workers
        (tmp_path / "go").touch()
        wait_for(lambda: proc.poll() is not None or "started 2 workers" in log.read_text(),
                 what="the master's start")
        assert proc.poll() is None, log.read_text()
        assert serving(port)
        # the workers' lines; the master's own SIGHUP is a reload once its reactor runs
        wait_for(lambda: log.read_text().count("SIGHUP received while starting: ignored") == 2,
                 what="each worker's line")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
        assert "Traceback" not in log.read_text(), log.read_text()
    finally:
        (tmp_path / "go").touch()
        kill_leftovers(proc, log)


#: An AUTH script that kills the worker importing it (not the master, which imports it
#: for its checks) with SIGBUS: a worker ended by a signal, which writes no line of its own.
SIGNALLED_WORKER_SCRIPT = '''\
import os, signal, sys
if sys.argv[0].endswith("worker.py"):
    os.kill(os.getpid(), signal.SIGBUS)

def auth(arguments, context):
    return None
'''


def test_a_worker_killed_by_a_signal_at_start_is_named_with_it(tmp_path: Path) -> None:
    """A worker that a signal ends before it is ready (a SIGBUS, the OOM killer's SIGKILL)
    writes nothing; the start said "ended before it was ready (its log lines say why)",
    and no line did.  Now the start's one line names the signal, exit status 1."""
    _, log, proc = two_workers_with_script(tmp_path, SIGNALLED_WORKER_SCRIPT, "dies.py")
    try:
        assert proc.wait(60) == 1
        text = log.read_text()
        assert re.search(r"saslsmtp: worker [01] was killed by signal 7 \(SIGBUS\) before it was"
                         r" ready \(no log line of its own can say why\)$", text, re.M), text
        assert "its log lines say why" not in text, text
        assert "Traceback" not in text, text
    finally:
        kill_leftovers(proc, log)
