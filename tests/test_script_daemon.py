"""The AUTH script on a real ``twistd -n saslsmtp``, as an administrator runs it: swaks
and smtplib as clients, ``saslsmtp-authtest`` on the same configuration, the daemon's log.

* a script that lists PLAIN and LOGIN in ``MECHANISMS`` still gets their username and
  password (it got raw bytes it did not expect: every login 454);
* a script that blocks the reactor past ``script_timeout`` answers 454 with one log line
  saying so (its verdict used to count, after every connection had waited);
* a script whose exception quotes the password logs one line with its file:line and
  without the password (the password used to reach the log), and authtest prints that
  line, not a traceback;
* SIGHUP with a script that does not compile keeps the old one serving, file:line logged.
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import require_binary
from tests.support import ROOT, Daemon, free_port, start_daemon, wait_for, write_config

SCRIPT = '''\
import time

from saslsmtp.script import Accept, Reject

MECHANISMS = {"PLAIN": {}, "LOGIN": {}, "X-BLOCK": {"plaintext": False}}


def auth(arguments, context):
    if arguments["mechanism"] == "X-BLOCK":
        time.sleep(float(arguments["response"]))  # what a script must not do
        return Accept(username="alice")
    if arguments["password"].startswith("int:"):
        return Accept() if int(arguments["password"]) else Reject()  # raises, quoting it
    ok = (arguments["username"], arguments["password"]) == ("alice", "wonderland")
    return Accept() if ok else Reject()
'''
RAISING_LINE = 13  # the int(...) line above
CANARY = "int:log-canary-Pw-1"  # tests/conftest.py checks every log event for it too


def configure(tmp_path: Path) -> tuple[Path, int]:
    (tmp_path / "auth.py").write_text(SCRIPT)
    port = free_port()
    config = write_config(tmp_path, mechanisms=["PLAIN", "LOGIN", "X-BLOCK"], backends=[],
                          script="auth.py", listen=[f"tcp:{port}:interface=127.0.0.1"],
                          extra_auth="script_timeout = 1.0")
    return config, port


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp_path = tmp_path_factory.mktemp("script-daemon")
    config, port = configure(tmp_path)
    running = start_daemon(config, port, tmp_path / "daemon.log")
    yield running
    running.stop()


def swaks(port: int, mechanism: str, user: str, password: str) -> str:
    """The server's reply to swaks' AUTH (its last 235, 4xx or 5xx line)."""
    out = subprocess.run([require_binary("swaks"), "--server", f"127.0.0.1:{port}", "--auth",
                          mechanism, "--auth-user", user, "--auth-password", password,
                          "--quit-after", "AUTH"], capture_output=True, text=True, timeout=60)
    replies = [line for line in out.stdout.splitlines() if re.match(r"^<[-~*]* +(235|[45]\d\d) ", line)]
    return re.sub(r"^<[-~*]* +", "", replies[-1])


def authtest(config: Path, user: str, password: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "saslsmtp.authtest", "--config", str(config),
                           *args, user], input=password + "\n", capture_output=True, text=True,
                          env=env, timeout=60)


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_plain_and_login_named_in_mechanisms_log_in(daemon: Daemon, mechanism: str) -> None:
    """swaks logs in (235) and is refused with a wrong password (535); authtest says the
    same (exit 0 and 1), as it did before while the daemon answered 454."""
    assert swaks(daemon.port, mechanism, "alice", "wonderland").startswith("235 2.7.0")
    assert swaks(daemon.port, mechanism, "alice", "wrong").startswith("535 5.7.8")
    config = daemon.log.parent / "saslsmtp.toml"
    assert authtest(config, "alice", "wonderland", "--mechanism", mechanism).returncode == 0
    assert authtest(config, "alice", "wrong", "--mechanism", mechanism).returncode == 1


def block(port: int, seconds: float) -> tuple[tuple[int, bytes], tuple[int, bytes]]:
    """AUTH X-BLOCK with a script that sleeps ``seconds``: its reply, then NOOP's."""
    import base64
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("client.example")
        return (s.docmd("AUTH", "X-BLOCK " + base64.b64encode(str(seconds).encode()).decode()),
                s.docmd("NOOP"))


def test_a_script_blocking_past_script_timeout_is_a_454(daemon: Daemon) -> None:
    """A 1.3 s time.sleep() under a 1 s script_timeout: 454, one error line, the session
    goes on; 0.6 s: the verdict counts, and a warning says every connection waited."""
    assert block(daemon.port, 1.3) == ((454, b"4.7.0 Temporary authentication failure"),
                                       (250, b"2.0.0 OK"))
    line = wait_for(lambda: re.search(r".*auth\(\) held the server for 1\.[3-9] s, past"
                                      r" script_timeout \(1 s\) \(X-BLOCK state 0\).*",
                                      daemon.log_text()), what="the error line")
    assert "[saslsmtp.script#error]" in line.group(0)
    assert block(daemon.port, 0.6)[0] == (235, b"2.7.0 Authentication successful")
    wait_for(lambda: re.search(r"\[saslsmtp\.script#warn\] AUTH script \S+auth\.py: auth\(\) held"
                               r" the server for 0\.\d\d s without awaiting", daemon.log_text()),
             what="the warning")


def test_a_script_quoting_the_password_in_an_exception_never_logs_it(daemon: Daemon) -> None:
    """int(password) raises with the password in its message: the client gets 454, the
    log one line with the script's file:line and the password redacted; authtest exits 2
    and prints that line, no traceback, no password."""
    assert swaks(daemon.port, "PLAIN", "alice", CANARY).startswith("454 4.7.0")
    where = f"{daemon.log.parent / 'auth.py'}:{RAISING_LINE}"
    wait_for(lambda: f"AUTH script {where}: auth() raised ValueError: invalid literal for int()"
             " with base 10: '<redacted>'"
             in daemon.log_text(), what="the error line")
    assert "log-canary" not in daemon.log_text()
    assert "Traceback" not in daemon.log_text()
    result = authtest(daemon.log.parent / "saslsmtp.toml", "alice", CANARY)
    assert result.returncode == 2, result.stdout + result.stderr
    assert (f"  logged: AUTH script {where}: auth() raised ValueError: invalid literal for"
            " int() with base 10: '<redacted>' (PLAIN state 0)") in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    assert "log-canary" not in result.stdout + result.stderr


def test_sighup_with_a_script_that_does_not_compile_keeps_the_old_one(tmp_path: Path) -> None:
    """The reload is refused with the script's file:line; logins go on with the old one."""
    config, port = configure(tmp_path)
    running = start_daemon(config, port, tmp_path / "daemon.log")
    try:
        (tmp_path / "auth.py").write_text(SCRIPT.replace("    ok = (", "    ok = ((", 1))
        running.process.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload refused" in running.log_text(), what="the refusal")
        assert re.search(rf"reload refused, [a-z ]+ the running configuration: "
                         rf"{re.escape(str(tmp_path / 'auth.py'))}:\d+: auth\.script: syntax error",
                         running.log_text())
        assert swaks(port, "PLAIN", "alice", "wonderland").startswith("235 2.7.0")
    finally:
        running.stop()
