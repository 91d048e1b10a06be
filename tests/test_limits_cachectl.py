"""``saslsmtp-cache flush [USER]`` against a real ``twistd -n saslsmtp`` (one process, and a
master with two workers) whose logins go to a slow HTTP auth API: a flushed user's next
login asks the API again, other users stay cached, and with no server running (or no
control socket configured) the command says so."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import threads
from twisted.web.server import NOT_DONE_YET

from saslsmtp import cachectl
from saslsmtp import control as control_module
from saslsmtp.cachectl import entries
from tests.limitsnet import auth_plain
from tests.support import ROOT, free_port, workers_daemon, write_config
from tests.upstreams import USERS, AuthAPI, WebServer

OTHER = next(user for user in USERS if user != "alice")
DELAY = 0.2  # seconds the API takes per answer: a cached login does not wait for it


class SlowAuthAPI(AuthAPI):
    """The test API, answering after ``DELAY``."""

    def render_POST(self, request: Any) -> bytes | int:
        from twisted.internet import reactor
        answer = super().render_POST(request)

        def finish() -> None:
            if isinstance(answer, bytes):
                request.write(answer)
                request.finish()
        reactor.callLater(DELAY, finish)
        return NOT_DONE_YET

    def asked(self, user: str) -> int:
        return sum(json.loads(r["raw"])["username"] == user for r in self.requests)


def run_cache(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``saslsmtp-cache --config CONFIG ARGS`` in its own process, as an operator runs it."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "saslsmtp.cachectl", "--config", str(config),
                           *args], capture_output=True, text=True, timeout=30, env=env)


@pytest.mark.parametrize("workers", [1, 2])
@pytest_twisted.ensureDeferred
async def test_flush_one_user_of_a_running_server(tmp_path: Path, workers: int) -> None:
    """Logins of alice and bob are cached (in each worker that served them); flushing
    alice drops exactly her entries in every process, and her next login asks the API
    again; bob's entries are all still there (a later flush of bob drops as many as the
    API was asked for him); a flush of everyone answers too.  Once the server stopped,
    the command says no server is running (exit 1)."""
    api = SlowAuthAPI()
    web = WebServer(api)
    web.start()
    port = free_port()
    control = tmp_path / "cache.sock"
    config = write_config(
        tmp_path, f'[backends.api]\ntype = "http"\nurl = "http://127.0.0.1:{web.port}/auth"\n',
        listen=[f"tcp:{port}:interface=127.0.0.1"],
        extra=f'[auth.cache]\nttl = 300\ncontrol_socket = "{control}"\n')
    log = tmp_path / "daemon.log"

    def login(user: str) -> int:
        return auth_plain(port, user, USERS[user]).code
    try:
        # Ready means the control sockets are bound: each process binds its own before
        # it says so.  The API is not asked before the first login, so the reactor may
        # wait meanwhile; logins run in a thread because they need it to answer.
        with workers_daemon(config, log, workers, "--workers", str(workers)) as proc:
            for _ in range(4):
                for user in ("alice", OTHER):
                    assert await threads.deferToThread(login, user) == 235
            alice, bob = api.asked("alice"), api.asked(OTHER)
            assert 1 <= alice <= workers and 1 <= bob <= workers

            flushed = run_cache(config, "flush", "Alice")
            assert flushed.returncode == 0, flushed.stderr
            processes = "1 process" if workers == 1 else f"{workers} processes"
            assert flushed.stdout.strip() == (f"auth cache flushed for user Alice: {entries(alice)}"
                                              f" dropped in {processes}")
            assert await threads.deferToThread(login, "alice") == 235
            assert api.asked("alice") == alice + 1  # not cached any more: the API was asked
            assert api.asked(OTHER) == bob

            flushed = run_cache(config, "flush", OTHER)
            assert flushed.returncode == 0, flushed.stderr
            assert f"{entries(bob)} dropped" in flushed.stdout  # all still cached until now
            everyone = run_cache(config, "flush")
            assert everyone.returncode == 0, everyone.stderr
            assert "flushed for every user: 1 entry dropped" in everyone.stdout  # alice's new login
            assert "auth cache flushed (user Alice)" in log.read_text()

            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0, log.read_text()
            # the control socket's factory said "Starting factory <twisted.internet.protocol
            # .Factory object at 0x...>" and "Stopping factory ..." in every process
            assert "factory <" not in log.read_text(), log.read_text()
            gone = run_cache(config, "flush", "alice")
            assert gone.returncode == 1
            assert gone.stderr.strip() == ("saslsmtp-cache: no saslsmtp server is running"
                                           f" (nothing answers on {control})")
    finally:
        await web.stop()


USERS_FILE = '[backends.users]\ntype = "file"\npath = "users"\n'


def test_without_a_control_socket_the_command_says_how_to_get_one(tmp_path: Path) -> None:
    """No control socket configured: exit 78 and a line saying what to set."""
    (tmp_path / "users").write_text("alice:{PLAIN}x\n")
    config = write_config(tmp_path, USERS_FILE, extra="[auth.cache]\nttl = 300\n")
    out, err = io.StringIO(), io.StringIO()
    assert cachectl.main(["--config", str(config), "flush"], stdout=out, stderr=err) == 78
    assert err.getvalue() == (f"saslsmtp-cache: {config} sets no [server] control_socket, so a"
                              " running server cannot be reached (SIGHUP empties the whole"
                              " cache)\n")
    assert out.getvalue() == ""


def test_a_control_socket_must_be_an_absolute_path(tmp_path: Path) -> None:
    """A relative ``control_socket`` is a configuration problem, reported by name."""
    (tmp_path / "users").write_text("alice:{PLAIN}x\n")
    config = write_config(tmp_path, USERS_FILE,
                          extra='[auth.cache]\nttl = 300\ncontrol_socket = "c.sock"\n')
    err = io.StringIO()
    assert cachectl.main(["--config", str(config), "flush"], stderr=err) == 78
    assert "auth.cache.control_socket: must be an absolute path" in err.getvalue()


def test_usage_errors_exit_64() -> None:
    """No command, or an unknown one: usage error."""
    err = io.StringIO()
    assert cachectl.main(["--config", "x.toml"], stderr=err) == 64
    assert cachectl.main(["--config", "x.toml", "purge"], stderr=err) == 64


def cache_config(tmp_path: Path, control: Path) -> Path:
    (tmp_path / "users").write_text("alice:{PLAIN}x\n")
    return write_config(tmp_path, USERS_FILE,
                        extra=f'[auth.cache]\nttl = 300\ncontrol_socket = "{control}"\n')


def test_a_server_that_does_not_answer_is_not_called_absent(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Something holds the socket but never answers (a stuck server): exit 75 and "did not
    answer", not exit 1 with "no saslsmtp server is running" after the timeout line (a
    script would start a second server)."""
    import socket
    control = tmp_path / "cache.sock"
    config = cache_config(tmp_path, control)
    monkeypatch.setattr(control_module, "TIMEOUT", 0.2)
    with socket.socket(socket.AF_UNIX) as stuck:
        stuck.bind(str(control))
        stuck.listen()
        out, err = io.StringIO(), io.StringIO()
        assert cachectl.main(["--config", str(config), "flush"], stdout=out, stderr=err) == 75
    assert err.getvalue() == (f"saslsmtp-cache: {control}: timed out\n"
                              "saslsmtp-cache: the server did not answer (nothing was flushed);"
                              " try again\n")
    assert out.getvalue() == ""


def test_a_file_that_is_not_a_socket_is_named(tmp_path: Path) -> None:
    """A regular file where the socket should be: said so, then "no server running"."""
    control = tmp_path / "cache.sock"
    config = cache_config(tmp_path, control)
    control.write_text("")
    err = io.StringIO()
    assert cachectl.main(["--config", str(config), "flush"], stderr=err) == 1
    assert err.getvalue() == (f"saslsmtp-cache: {control}: is not a socket (is control_socket the"
                              f" server's?)\nsaslsmtp-cache: no saslsmtp server is running"
                              f" (nothing answers on {control})\n")


@pytest.mark.parametrize("user, said", [
    ("", "the user name is empty (leave USER out to flush every user)"),
    ("alice\nflush", "a user name cannot contain line breaks or NUL"),
    ("alice\r", "a user name cannot contain line breaks or NUL"),
    ("a" * 5000, "the user name is longer than 4089 bytes: no such login is cached"),
])
def test_a_user_that_cannot_be_sent_is_a_usage_error(tmp_path: Path, user: str, said: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty USER (``flush "$NAME"`` with NAME unset) sent ``flush `` and flushed every
    user, saying so; a line break sent a second command (two answers, exit 75); a USER
    longer than the server's line was dropped and reported as "did not answer; try
    again".  Now each is one line, exit 64, and nothing reaches the socket (a listener
    that records what it is sent stands in for the server)."""
    import socket
    import threading
    control = tmp_path / "cache.sock"
    config = cache_config(tmp_path, control)
    monkeypatch.setattr(control_module, "TIMEOUT", 0.5)  # the old code waited for an answer
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(control))
        server.listen()
        out, err = io.StringIO(), io.StringIO()
        status = cachectl.main(["--config", str(config), "flush", user], stdout=out, stderr=err)
        server.setblocking(False)
        with pytest.raises(BlockingIOError):  # no connection is waiting: nothing was sent
            server.accept()[0].close()
    assert (status, out.getvalue(), err.getvalue()) == (64, "", f"saslsmtp-cache: {said}\n")

    received: list[bytes] = []  # a name that can be sent still is, as it is
    control.unlink()
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(control))
        server.listen()

        def serve() -> None:
            connection, _ = server.accept()
            with connection:
                received.append(connection.recv(65536))
                connection.sendall(b"ok 0\n")
        listener = threading.Thread(target=serve)
        listener.start()
        out, err = io.StringIO(), io.StringIO()
        status = cachectl.main(["--config", str(config), "flush", "Alice"], stdout=out,
                               stderr=err)
        listener.join()
    assert status == 0, err.getvalue()
    assert received == [b"flush Alice\n"]
    assert out.getvalue() == "auth cache flushed for user Alice: 0 entries dropped in 1 process\n"
