"""Out of file descriptors: the daemon stays quiet and serves again at once.

A real ``twistd`` runs with its descriptor limit lowered (soft = hard, so it cannot raise
it); the test fills every descriptor with idle connections, keeps knocking, then lets go:
a legitimate client gets its greeting at once, and the log holds a handful of lines about
it, not one per attempt."""

from __future__ import annotations

import os
import re
import resource
import socket
import subprocess
import time
from pathlib import Path

import pytest

from twisted.internet import task

from saslsmtp.descriptors import AcceptFailureLog, raise_descriptor_limit
from tests.support import ROOT, Daemon, free_port, twistd_command, wait_for, write_config

LIMIT = 64


def _start(config: Path, port: int, log: Path) -> Daemon:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def lower_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, LIMIT))
    with open(log, "wb") as out:
        proc = subprocess.Popen(twistd_command(config), cwd=config.parent, stdout=out,
                                stderr=subprocess.STDOUT, env=env, preexec_fn=lower_limit)
    daemon = Daemon(proc, port, log)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert proc.poll() is None, daemon.log_text()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                if s.recv(100).startswith(b"220"):
                    return daemon
        except OSError:
            time.sleep(0.1)
    daemon.stop()
    raise AssertionError(f"saslsmtp did not listen:\n{daemon.log_text()}")


def _greeted(port: int, timeout: float = 2.0) -> socket.socket | None:
    """A connection that got its 220, or None if the server closed it or stayed silent."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        if s.recv(100).startswith(b"220"):
            return s
    except OSError:
        pass
    s.close()
    return None


@pytest.mark.alone
def test_full_descriptor_table_then_release(tmp_path: Path) -> None:
    """Hold every descriptor, knock 200 more times, release: the next client is greeted
    within a second and fewer than 10 log lines speak of the refusals."""
    port = free_port()
    (tmp_path / "users").write_text("alice:{PLAIN}secret\n")
    config = write_config(tmp_path, '[backends.u]\ntype = "file"\npath = "users"\n',
                          listen=[f"tcp:{port}:interface=127.0.0.1"])
    daemon = _start(config, port, tmp_path / "daemon.log")
    held: list[socket.socket] = []
    try:
        while len(held) < LIMIT:
            s = _greeted(port)
            if s is None:
                break
            held.append(s)
        assert 0 < len(held) < LIMIT, "the descriptor table never filled"
        refused = 0
        for _ in range(200):
            s = _greeted(port, timeout=1.0)
            if s is None:
                refused += 1
            else:
                held.append(s)
        assert refused > 150
        ended = daemon.log_text().count("session end")
        start = time.monotonic()  # the second counts from the release
        for s in held:
            s.close()
        closed, held = len(held), []
        # until the server has seen those closes, a new client is still refused
        wait_for(lambda: daemon.log_text().count("session end") >= ended + closed,
                 timeout=5.0, what="the released sessions to end")
        s = _greeted(port, timeout=5.0)
        assert s is not None and time.monotonic() - start < 1.0
        s.sendall(b"EHLO ok.example\r\n")
        assert s.recv(1000).startswith(b"250-")
        s.close()
        assert daemon.process.poll() is None
    finally:
        for s in held:
            s.close()
        daemon.stop()
    noisy = [line for line in daemon.log_text().splitlines()
             if re.search(r"EMFILE|accept", line, re.IGNORECASE)]
    assert 0 < len(noisy) < 10, noisy[:20]


def test_accept_failures_are_counted_and_reported_once_per_interval() -> None:
    """The port's log observer: the first refusal is one line, later ones a count per
    interval; other events pass through."""
    clock = task.Clock()
    forwarded: list[dict] = []
    lines: list[dict] = []
    from twisted.logger import globalLogPublisher
    globalLogPublisher.addObserver(lines.append)
    try:
        port = type("P", (), {"connected": True, "getHost": lambda self: "x"})()
        observer = AcceptFailureLog(port, clock, interval=60.0, forward=forwarded.append)
        for _ in range(500):
            observer({"log_format": "EMFILE encountered; releasing reserved file descriptor."})
            observer({"log_format": "EMFILE recovery: Closed socket from {address}"})
            observer({"log_format": "Re-reserving EMFILE recovery file descriptor."})
        observer({"log_format": "something else"})
        clock.advance(60)
        clock.advance(60)
    finally:
        globalLogPublisher.removeObserver(lines.append)
    ours = [e for e in lines if e.get("log_namespace") == "saslsmtp.listen"]
    assert len(ours) == 2 and ours[1]["count"] == 499
    assert forwarded == [{"log_format": "something else"}]


def test_soft_limit_is_raised_to_the_hard_limit() -> None:
    """At startup the soft RLIMIT_NOFILE becomes the hard one (restored afterwards)."""
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        if before[1] != resource.RLIM_INFINITY and before[1] > 256:
            resource.setrlimit(resource.RLIMIT_NOFILE, (256, before[1]))
        soft, new = raise_descriptor_limit()
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == new >= soft
        if before[1] != resource.RLIM_INFINITY:
            assert new == before[1]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, before)
