"""A worker whose reactor never turns again (an AUTH script looping forever) is noticed
and replaced by the master, on a real ``twistd -n saslsmtp`` with two workers; a slow
backend, which waits without holding the reactor, is not taken for one.  Under systemd
(``WATCHDOG_USEC``) the process says ``WATCHDOG=1`` from its reactor, and stops saying
it when the reactor is stuck, so ``WatchdogSec=`` replaces it."""

from __future__ import annotations

import base64
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.support import (ROOT, alive, free_port, kill_leftovers, twistd_command, wait_for,
                           worker_pids, workers_daemon, write_config)

SCRIPT = '''\
from twisted.internet import reactor, task

from saslsmtp.script import Accept, Reject


async def auth(arguments, context):
    if arguments["username"] == "loop":
        while True:  # the mistake: nothing ever preempts it
            pass
    if arguments["username"] == "slow":  # a slow backend: waits, the reactor turns
        await task.deferLater(reactor, float(arguments["password"]), lambda: None)
        return Accept()
    ok = (arguments["username"], arguments["password"]) == ("alice", "wonderland")
    return Accept() if ok else Reject()
'''
LOOP_LINES = "(8|9)"  # the loop above: its "while True:" or its "pass"
TIMEOUT = 5  # server.worker_timeout for these tests (a loaded machine may hold a reactor 1-2 s)


def configure(tmp_path: Path, server: str = "") -> tuple[Path, int]:
    (tmp_path / "auth.py").write_text(SCRIPT)
    port = free_port()
    config = write_config(tmp_path, mechanisms=["PLAIN"], backends=[], script="auth.py",
                          listen=[f"tcp:{port}:interface=127.0.0.1"],
                          extra_auth="script_timeout = 30.0")
    config.write_text(config.read_text().replace("[server]\n", "[server]\n" + server, 1))
    return config, port


def auth_plain(sock: socket.socket, user: str, password: str) -> None:
    sock.sendall(b"EHLO client.example\r\nAUTH PLAIN "
                 + base64.b64encode(f"\0{user}\0{password}".encode()) + b"\r\n")


def login(port: int, user: str = "alice", password: str = "wonderland") -> bytes:
    """The reply to AUTH PLAIN on a new connection (its last line)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        auth_plain(sock, user, password)
        data = b""
        while not re.search(rb"(^|\r\n)(235|[45]\d\d) [^\r\n]*\r\n$", data):
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        return data.split(b"\r\n")[-2]


def test_a_stuck_worker_is_replaced_and_the_next_client_logs_in(tmp_path: Path) -> None:
    """AUTH for "loop" freezes the worker that took it.  Within worker_timeout the master
    logs one line with its pid and how long it was stuck, the worker logs where it is
    stuck (the script's file:line), it is killed and another takes its slot; the stuck
    client's connection is closed, and alice logs in, again and again."""
    config, port = configure(tmp_path, f"workers = 2\nworker_timeout = {TIMEOUT}\n")
    log = tmp_path / "daemon.log"
    with workers_daemon(config, log, 2) as master:
        before = worker_pids(log)
        stuck_client = socket.create_connection(("127.0.0.1", port), timeout=60)
        auth_plain(stuck_client, "loop", "x")
        found = wait_for(lambda: re.search(
            r"worker (\d) \(pid (\d+)\) is stuck: its reactor has not turned for ([\d.]+)s"
            rf" \(server\.worker_timeout = {TIMEOUT}s\); killing it and starting another",
            log.read_text()), timeout=30, what="the stuck worker found")
        slot, pid, silent = int(found.group(1)), int(found.group(2)), float(found.group(3))
        assert before[slot] == pid and TIMEOUT <= silent < TIMEOUT + 5
        wait_for(lambda: re.search(rf"worker {slot} \(pid {pid}\): SIGTERM while the reactor is"
                                   rf" held: stuck at \S+auth\.py:{LOOP_LINES} in auth",
                                   log.read_text()), what="where it is stuck")
        wait_for(lambda: not alive(pid), what="the stuck worker killed")
        wait_for(lambda: re.search(rf"worker {slot} \(pid {pid}\) was killed as stuck \(signal 9\)",
                                   log.read_text()), what="its end")
        wait_for(lambda: worker_pids(log)[slot] != pid and log.read_text().count(" serving ") == 3,
                 what="a replacement serving")
        stuck_client.settimeout(10)
        heard = b""
        try:  # until the kill closed it: the greeting (and EHLO's reply), never an answer
            while chunk := stuck_client.recv(4096):
                heard += chunk
        except ConnectionResetError:
            pass
        stuck_client.close()
        assert heard.startswith(b"220 ") and not re.search(rb"(^|\n)(235|334|[45]\d\d)[ -]", heard)
        for _ in range(6):
            assert login(port).startswith(b"235 ")
        assert log.read_text().count("is stuck") == 1
        master.terminate()
        assert master.wait(30) == 0, log.read_text()


def test_a_slow_backend_is_no_stuck_worker(tmp_path: Path) -> None:
    """A login that waits longer than worker_timeout (asynchronously, as every backend
    waits) gets its 235; no worker is taken for stuck meanwhile."""
    config, port = configure(tmp_path, f"workers = 2\nworker_timeout = {TIMEOUT}\n")
    log = tmp_path / "daemon.log"
    with workers_daemon(config, log, 2):
        pids = worker_pids(log)
        started = time.monotonic()
        assert login(port, "slow", str(TIMEOUT + 3)).startswith(b"235 ")
        assert time.monotonic() - started >= TIMEOUT + 3
        assert "is stuck" not in log.read_text() and worker_pids(log) == pids
        assert all(alive(pid) for pid in pids.values())


def watchdog_daemon(tmp_path: Path, usec: int, owner: str | None = None
                    ) -> tuple[subprocess.Popen, socket.socket, int, Path]:
    """One process with systemd's notify socket and ``WATCHDOG_USEC`` (``WATCHDOG_PID``:
    ``owner``, by default its own pid as systemd sets it: unset here, which means any)."""
    address = str(tmp_path / "notify")
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listening.bind(address)
    config, port = configure(tmp_path)
    log = tmp_path / "daemon.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT), NOTIFY_SOCKET=address, WATCHDOG_USEC=str(usec))
    if owner is not None:
        env["WATCHDOG_PID"] = owner
    with open(log, "wb") as out:
        proc = subprocess.Popen(twistd_command(config), cwd=tmp_path, stdout=out,
                                stderr=subprocess.STDOUT, env=env)
    return proc, listening, port, log


def datagrams(sock: socket.socket, seconds: float) -> list[tuple[float, bytes]]:
    """What arrives within ``seconds``, each with its arrival time."""
    got = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            got.append((time.monotonic(), sock.recv(4096)))
        except socket.timeout:
            break
    return got


def test_watchdog_pings_from_the_reactor_and_stop_when_it_is_stuck(tmp_path: Path) -> None:
    """WATCHDOG_USEC = 1 s: READY=1, then WATCHDOG=1 about every half second; once an
    AUTH script holds the reactor for good, none (systemd would now kill and restart
    the service)."""
    proc, listening, port, log = watchdog_daemon(tmp_path, 1_000_000)
    try:
        listening.settimeout(30)
        assert listening.recv(4096).startswith(b"READY=1"), log.read_text()
        pings = [t for t, data in datagrams(listening, 2.6) if data == b"WATCHDOG=1"]
        assert 3 <= len(pings) <= 7, pings  # (a loaded machine may skip a tick)
        stuck = socket.create_connection(("127.0.0.1", port), timeout=30)
        auth_plain(stuck, "loop", "x")
        assert stuck.recv(100).startswith(b"220 ")
        datagrams(listening, 0.6)  # a ping already on its way
        assert datagrams(listening, 2.0) == []
        stuck.close()
    finally:
        kill_leftovers(proc, log)
        listening.close()


def test_no_watchdog_pings_for_another_process(tmp_path: Path) -> None:
    """``WATCHDOG_PID`` naming another process (inherited from a parent): no pings."""
    proc, listening, port, log = watchdog_daemon(tmp_path, 1_000_000, owner="1")
    try:
        listening.settimeout(30)
        assert listening.recv(4096).startswith(b"READY=1"), log.read_text()
        assert datagrams(listening, 1.5) == []
    finally:
        proc.send_signal(signal.SIGTERM)
        kill_leftovers(proc, log)
        listening.close()


#: The loop of ``SCRIPT``, saying (in the file ``looping``) that a worker is in it.
SAYS_IT_LOOPS = SCRIPT.replace(
    '    if arguments["username"] == "loop":\n',
    '    if arguments["username"] == "loop":\n'
    '        import os\n'
    '        open(os.path.join(os.path.dirname(__file__), "looping"), "w").close()\n')


def test_a_stuck_worker_dies_with_its_master(tmp_path: Path) -> None:
    """kill -9 of the master while a worker loops in an AUTH script (``worker_timeout =
    0``: nobody replaces it).  Its reactor never read the end of its standard input, so it
    kept the listening socket and accepted connections it never answered, forever.  Now
    the kernel's parent-death signal ends it within seconds, saying where it was stuck;
    the other worker stops as before (a warning, not routine), and the port is free."""
    config, port = configure(tmp_path, "workers = 2\nworker_timeout = 0\n")
    (tmp_path / "auth.py").write_text(SAYS_IT_LOOPS)
    log = tmp_path / "daemon.log"
    with workers_daemon(config, log, 2) as master:
        pids = worker_pids(log)
        stuck_client = socket.create_connection(("127.0.0.1", port), timeout=30)
        auth_plain(stuck_client, "loop", "x")
        wait_for(lambda: (tmp_path / "looping").exists(), what="a worker in the loop")
        master.kill()
        master.wait(10)
        wait_for(lambda: not any(alive(pid) for pid in pids.values()), timeout=10,
                 what="both workers gone")
        stuck_client.close()
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0  # nobody listens
        text = log.read_text()
        stuck = re.findall(r"worker (\d) \(pid (\d+)\): the master is gone and the reactor is"
                           rf" held: stuck at \S+auth\.py:\d+ in auth; exiting now", text)
        assert len(stuck) == 1 and int(stuck[0][1]) == pids[int(stuck[0][0])], text
        other = 1 - int(stuck[0][0])
        assert re.search(rf"\[saslsmtp#warn worker={pids[other]}\] worker {other} \(pid"
                         rf" {pids[other]}\): the master is gone; stopping", text), text
        assert "Traceback" not in text
