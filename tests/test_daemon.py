"""The real daemon: ``twistd -n saslsmtp`` started as users start it.

--help, --check on good and broken configurations, startup errors for a broken AUTH
script and for a mechanism nobody serves, the shipped example config, and the scripted
CRAM-MD5 example with swaks and smtplib.
"""

from __future__ import annotations

import base64
import os
import shutil
import smtplib
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_binary
from tests.support import ROOT, free_port, start_daemon, twistd_command, write_config

ETC = ROOT / "etc"


def run_twistd(config: Path, *extra: str, timeout: float = 30) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(twistd_command(config, *extra), capture_output=True, text=True,
                          timeout=timeout, cwd=config.parent, env=env)


def test_help_lists_every_option(tmp_path: Path) -> None:
    out = run_twistd(tmp_path / "unused.toml", "--help")
    assert out.returncode == 0
    for option in ("--config", "--check"):
        assert option in out.stdout


def test_check_accepts_the_example_config() -> None:
    out = run_twistd(ETC / "saslsmtp.toml", "--check")
    assert out.returncode == 0, out.stderr
    assert "OK" in out.stdout


def test_check_reports_file_key_and_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[server]\nhostname = 42\n\n[auth]\nmechanisms = ["PLAIN"]\n'
                      'backends = ["missing"]\nbogus = true\n')
    out = run_twistd(config, "--check")
    assert out.returncode == 1
    assert f"{config}:2: server.hostname: must be a string, not an integer" in out.stderr
    assert f"{config}:6: auth.backends: backend 'missing' is not defined" in out.stderr
    assert f"{config}:7: auth.bogus: unknown key" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout


@pytest.mark.parametrize("option, message", [
    ("--pidfile={missing}/twistd.pid", "--pidfile {missing}/twistd.pid: no such folder {missing}"),
    ("--rundir={missing}", "--rundir {missing}: no such folder"),
])
def test_twistd_options_that_cannot_work_are_one_line(tmp_path: Path, option: str,
                                                      message: str) -> None:
    """twistd writes its pid file and changes to its run folder after the service is built,
    and fails there with a traceback: checked first, one line and exit status 1."""
    missing = tmp_path / "no-such-folder"
    argv = ["-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
            "--logfile=-", option.format(missing=missing), "saslsmtp",
            "--config", str(ETC / "saslsmtp.toml")]
    out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=30,
                         cwd=ETC, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 1
    assert out.stderr.strip() == "saslsmtp: cannot start: " + message.format(missing=missing)
    assert "Traceback" not in out.stdout + out.stderr


def broken_script_config(tmp_path: Path) -> Path:
    script = tmp_path / "auth.py"
    script.write_text("from saslsmtp.script import Accept\n\ndef auth(arguments, context)\n"
                      "    return Accept()\n")
    return write_config(tmp_path, mechanisms=["PLAIN", "X-CUSTOM"], backends=[],
                        script=str(script), listen=[f"tcp:{free_port()}:interface=127.0.0.1"])


def unserved_mechanism_config(tmp_path: Path) -> Path:
    script = tmp_path / "auth.py"
    script.write_text("MECHANISMS = ['X-ONE']\n\ndef auth(arguments, context):\n    return None\n")
    return write_config(tmp_path, mechanisms=["PLAIN", "X-TWO"], backends=[], script=str(script),
                        listen=[f"tcp:{free_port()}:interface=127.0.0.1"])


def test_broken_script_fails_check_and_start(tmp_path: Path) -> None:
    """A syntax error in the script: --check and a real start both exit 1 naming file:line."""
    config = broken_script_config(tmp_path)
    for extra in (("--check",), ()):
        out = run_twistd(config, *extra)
        assert out.returncode == 1, (extra, out.stdout, out.stderr)
        assert f"{tmp_path / 'auth.py'}:3: auth.script: syntax error" in out.stderr
        assert "Traceback" not in out.stderr


def test_mechanism_nobody_serves_fails_check_and_start(tmp_path: Path) -> None:
    config = unserved_mechanism_config(tmp_path)
    for extra in (("--check",), ()):
        out = run_twistd(config, *extra)
        assert out.returncode == 1, (extra, out.stdout, out.stderr)
        assert "X-TWO is not built in and" in out.stderr


def test_mechanism_without_script_fails_check(tmp_path: Path) -> None:
    config = write_config(tmp_path, '[backends.u]\ntype = "file"\npath = "/dev/null"\n',
                          mechanisms=["PLAIN", "X-NOBODY"])
    out = run_twistd(config, "--check")
    assert out.returncode == 1
    assert "auth.mechanisms: X-NOBODY is not built in and no auth.script is set" in out.stderr


@pytest.fixture
def example_daemon(tmp_path: Path):
    """The shipped etc/ files, copied, with a free port and the CRAM-MD5 script on."""
    for name in ("users", "auth_cram_md5.py"):
        shutil.copy(ETC / name, tmp_path / name)
    for attempt in range(3):  # another process may take the free port first
        port = free_port()
        text = (ETC / "saslsmtp.toml").read_text()
        text = text.replace("tcp:2525:interface=127.0.0.1", f"tcp:{port}:interface=127.0.0.1")
        text = text.replace('mechanisms = ["PLAIN", "LOGIN"]', 'mechanisms = ["CRAM-MD5", "PLAIN", "LOGIN"]')
        text = text.replace('# script = "auth_cram_md5.py"', 'script = "auth_cram_md5.py"')
        text = text.replace('path = "../var/mail"', 'path = "mail"')
        (tmp_path / "saslsmtp.toml").write_text(text)
        try:
            daemon = start_daemon(tmp_path / "saslsmtp.toml", port, tmp_path / "daemon.log")
            break
        except RuntimeError as e:
            if "cannot listen" not in str(e) or attempt == 2:
                raise
    yield daemon, tmp_path
    daemon.stop()


def test_example_daemon_with_smtplib_cram_md5(example_daemon) -> None:
    """smtplib prefers CRAM-MD5 when announced: it logs in through the script and sends."""
    daemon, folder = example_daemon
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as s:
        s.ehlo("client.example")
        assert "CRAM-MD5" in s.esmtp_features["auth"]
        assert s.login("demo", "demo-password") == (235, b"2.7.0 Authentication successful")
        s.sendmail("demo@example.test", ["x@example.test"], b"Subject: hi\r\n\r\nvia cram\r\n")
    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as s:
        s.ehlo("client.example")
        with pytest.raises(smtplib.SMTPAuthenticationError) as e:
            s.auth("CRAM-MD5", s.auth_cram_md5) if not setattr(s, "user", "demo") and not setattr(
                s, "password", "wrong") else None
        assert e.value.smtp_code == 535 and e.value.smtp_error == b"5.7.8 Authentication credentials invalid"
    [message] = list((folder / "mail" / "new").iterdir())
    assert b"(authenticated user demo)" in message.read_bytes()


@pytest.mark.parametrize("mechanism", ["CRAM-MD5", "PLAIN", "LOGIN"])
def test_example_daemon_with_swaks(example_daemon, mechanism: str) -> None:
    """swaks --auth CRAM-MD5 (the script), PLAIN and LOGIN (the script asks the users file)."""
    require_binary("/usr/bin/swaks")
    daemon, _ = example_daemon
    base = ["/usr/bin/swaks", "--server", f"127.0.0.1:{daemon.port}", "--to", "x@example.test",
            "--from", "demo@example.test", "--auth", mechanism, "--auth-user", "demo"]
    ok = subprocess.run(base + ["--auth-password", "demo-password"], capture_output=True,
                        text=True, timeout=30)
    assert ok.returncode == 0, ok.stdout
    assert "235 2.7.0 Authentication successful" in ok.stdout
    bad = subprocess.run(base + ["--auth-password", "wrong"], capture_output=True, text=True,
                         timeout=30)
    assert "535 5.7.8 Authentication credentials invalid" in bad.stdout
    log = daemon.log_text()
    for secret in ("demo-password", base64.b64encode(b"\0demo\0demo-password").decode()):
        assert secret not in log


def test_sigterm_closes_idle_sessions_with_421(example_daemon) -> None:
    """On shutdown the daemon tells connected clients 421 4.3.2 and exits cleanly."""
    import signal
    import socket
    daemon, _ = example_daemon
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as s:
        assert s.recv(200).startswith(b"220 ")
        s.sendall(b"EHLO client.example\r\n")
        s.recv(1000)
        daemon.process.send_signal(signal.SIGTERM)
        rest = b""
        while True:
            data = s.recv(1000)
            if not data:
                break
            rest += data
    assert rest == b"421 4.3.2 Service shutting down, closing connection\r\n"
    # twistd re-raises the signal it stopped for, so "killed by SIGTERM" is a clean exit
    assert daemon.process.wait(10) in (0, -signal.SIGTERM)
    assert "Server Shut Down." in daemon.log_text() and "Traceback" not in daemon.log_text()


def test_check_reads_the_users_file(tmp_path: Path) -> None:
    """--check reports unusable users-file lines with their line numbers, no content."""
    users = tmp_path / "users"
    users.write_text("# comment\nalice:{PLAIN}ok\nbob:{NOPE}secret-value\nnocolon\n")
    config = write_config(tmp_path, f'[backends.users]\ntype = "file"\npath = "{users}"\n')
    out = run_twistd(config, "--check")
    assert out.returncode == 1
    assert f"{users}:3: backends.users:" in out.stderr and "NOPE" in out.stderr
    assert f"{users}:4: backends.users: no ':'" in out.stderr
    assert "secret-value" not in out.stderr
