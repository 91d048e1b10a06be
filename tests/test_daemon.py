"""The real daemon: ``twistd -n saslsmtp`` started as users start it.

--help, --check on good and broken configurations, startup errors for a broken AUTH
script and for a mechanism nobody serves, the shipped example config, and the scripted
CRAM-MD5 example with swaks and smtplib.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
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
    ("--pidfile={folder}", "--pidfile {folder}: is a folder; name a file in it"),
    ("--nodaemon=no --logfile=-", "--logfile=- writes to standard output, which a daemon"
                                  " closes: add --nodaemon (-n), or give a file"),
])
def test_twistd_options_that_cannot_work_are_one_line(tmp_path: Path, option: str,
                                                      message: str) -> None:
    """twistd writes its pid file and changes to its run folder after the service is built,
    and fails there with a traceback (a pid file that is a folder too); a daemon logging to
    standard output loses every line once it has forked: checked first, one line and exit
    status 1."""
    missing = tmp_path / "no-such-folder"
    given = option.format(missing=missing, folder=tmp_path).split()
    nodaemon = [] if "--nodaemon=no" in given else ["-n"]
    given = [o for o in given if o != "--nodaemon=no"]
    argv = ["-c", "from twisted.scripts.twistd import run; run()", *nodaemon, "--pidfile=",
            "--logfile=-", *given, "saslsmtp", "--config", str(ETC / "saslsmtp.toml")]
    out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=30,
                         cwd=ETC, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 1
    assert out.stderr.strip() == "saslsmtp: cannot start: " + message.format(
        missing=missing, folder=tmp_path)
    assert "Traceback" not in out.stdout + out.stderr


def test_a_pidfile_the_file_system_refuses_is_one_line() -> None:
    """``/proc`` passes root's mode check (``os.access``) yet refuses a new file: twistd
    then failed writing its pid file, after saslsmtp was built, with a traceback.  A
    start now tries first: one line, exit status 1.  (Not root: the folder's mode is
    checked before, also one line.)"""
    pidfile = f"/proc/saslsmtp-test-{os.getpid()}.pid"
    argv = ["-c", "from twisted.scripts.twistd import run; run()", "-n", f"--pidfile={pidfile}",
            "--logfile=-", "saslsmtp", "--config", str(ETC / "saslsmtp.toml")]
    out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=30,
                         cwd=ETC, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    reason = "cannot be written: No such file or directory" if os.geteuid() == 0 else "/proc is not writable"
    assert (out.returncode, out.stderr) == (1, f"saslsmtp: cannot start: --pidfile {pidfile}: {reason}\n")
    assert "Traceback" not in out.stdout + out.stderr


@pytest.mark.parametrize("option, name, lookup", [("--uid", "nosuchuser", "getpwnam"),
                                                  ("--gid", "nosuchgroup", "getgrnam")])
def test_an_unknown_uid_name_is_twistds_own_error_before_saslsmtp_loads(
        option: str, name: str, lookup: str) -> None:
    """``--uid nosuchuser`` and ``--gid nosuchgroup`` fail inside twistd's own option
    parsing, before the plugin is imported (no saslsmtp module in ``-X importtime``): a
    traceback saslsmtp cannot replace.  The docs give the check to run instead
    (``getent``), and this test notices the day twistd lets a plugin run first."""
    argv = ["-X", "importtime", "-c", "from twisted.scripts.twistd import run; run()", "-n",
            "--pidfile=", "--logfile=-", option, name, "saslsmtp", "--config",
            str(ETC / "saslsmtp.toml")]
    out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=30,
                         cwd=ETC, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 1
    assert out.stderr.rstrip().endswith(f"KeyError: \"{lookup}(): name not found: '{name}'\"")
    imported = [line for line in out.stderr.splitlines() if line.startswith("import time:")]
    assert imported and not [line for line in imported if "saslsmtp" in line]
    operations = (ROOT / "docs" / "operations.md").read_text()
    database = "passwd" if option == "--uid" else "group"
    assert f"getent {database} saslsmtp >/dev/null ||" in operations


def start_with_pidfile(config: Path, pidfile: Path, log: Path) -> subprocess.Popen:
    argv = ["-c", "from twisted.scripts.twistd import run; run()", "-n", f"--pidfile={pidfile}",
            "--logfile=-", "saslsmtp", "--config", str(config)]
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, *argv], cwd=config.parent, stdout=out,
                                stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_a_second_start_on_the_same_pidfile_is_one_line(tmp_path: Path) -> None:
    """The pid file names a running twistd (this server, started twice): one line and
    exit 1 (twistd's own refusal was five lines); the first server runs on."""
    from tests.support import alice_config, kill_leftovers, wait_for
    config, _ = alice_config(tmp_path)
    pidfile, first_log = tmp_path / "twistd.pid", tmp_path / "first.log"
    first = start_with_pidfile(config, pidfile, first_log)
    try:
        wait_for(lambda: "saslsmtp ready" in first_log.read_text() or first.poll() is not None,
                 what="the first server")
        second = start_with_pidfile(config, pidfile, tmp_path / "second.log")
        assert second.wait(30) == 1
        text = (tmp_path / "second.log").read_text()
        assert text == (f"saslsmtp: cannot start: --pidfile {pidfile}: twistd is running as PID"
                        f" {first.pid}: stop it first, or give this server another --pidfile\n")
        assert first.poll() is None and pidfile.read_text() == str(first.pid)
    finally:
        kill_leftovers(first, first_log)


def test_a_pidfile_naming_another_program_is_stale(tmp_path: Path) -> None:
    """After a crash the pid in the file was reused by something else: twistd would refuse
    to start for ever (and logrotate's USR1 would go to that process).  The file is stale:
    removed with a warning, the server starts, the other process is left alone."""
    from tests.support import alice_config, kill_leftovers, wait_for
    config, _ = alice_config(tmp_path)
    pidfile, log = tmp_path / "twistd.pid", tmp_path / "daemon.log"
    other = subprocess.Popen(["sleep", "300"])
    try:
        pidfile.write_text(str(other.pid))
        daemon = start_with_pidfile(config, pidfile, log)
        try:
            wait_for(lambda: "saslsmtp ready" in log.read_text() or daemon.poll() is not None,
                     what="the server")
            assert daemon.poll() is None, log.read_text()
            assert (f"saslsmtp: warning: removed the stale pid file {pidfile}: PID {other.pid} is"
                    f" 'sleep 300', not twistd") in log.read_text()
            assert pidfile.read_text() == str(daemon.pid)
        finally:
            kill_leftovers(daemon, log)
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_a_pidfile_naming_this_very_process_is_stale(tmp_path: Path) -> None:
    """A container's server is PID 1 at every start: a pid file left with "1" names the
    new process itself, which twistd took for another server running."""
    from saslsmtp.preflight import pidfile_in_the_way
    pidfile = tmp_path / "twistd.pid"
    pidfile.write_text("1\n")
    problem, warning = pidfile_in_the_way(str(pidfile), pid=1, command=lambda pid: "init")
    assert problem is None and not pidfile.exists()
    assert warning == f"saslsmtp: warning: removed the stale pid file {pidfile}: PID 1 is this process"
    pidfile.write_text("1\n")  # PID 1 is someone else's twistd: refused, kept
    problem, warning = pidfile_in_the_way(str(pidfile), pid=7, command=lambda pid: "python twistd -n")
    assert problem and "twistd is running as PID 1" in problem and pidfile.exists()


def test_uid_of_another_user_without_root_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """twistd switches user after binding and, unable to, exits there (a daemonized
    twistd's parent then waited for ever): refused before anything is built."""
    from saslsmtp import preflight
    monkeypatch.setattr(preflight.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(preflight.os, "getuid", lambda: 1000)
    monkeypatch.setattr(preflight.os, "getgid", lambda: 1000)
    assert preflight.twistd_problems({"uid": 65534, "gid": None}) == [
        "--uid/--gid 65534/None: switching user needs root (this is uid 1000); start as"
        " root, or leave them out"]
    assert preflight.twistd_problems({"uid": 1000, "gid": 1000}) == []  # itself: fine


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


def test_syslog_with_a_logfile_warns_that_the_file_is_ignored(tmp_path: Path) -> None:
    """twistd logs to syslog and silently never opens ``--logfile``: said once, at start
    and at ``--check``."""
    out = subprocess.run(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
         "--syslog", f"--logfile={tmp_path / 'x.log'}", "saslsmtp", "--config",
         str(ETC / "saslsmtp.toml"), "--check"], capture_output=True, text=True, timeout=30,
        cwd=ETC, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr
    assert f"saslsmtp: warning: --logfile {tmp_path / 'x.log'} is ignored: --syslog wins\n" \
        in out.stderr


def test_syslog_without_a_syslog_daemon_warns(tmp_path: Path) -> None:
    """No ``/dev/log`` (a container): twistd's syslog lines go nowhere, silently."""
    from saslsmtp.preflight import twistd_warnings
    missing = str(tmp_path / "log")
    assert twistd_warnings({"syslog": True}, missing) == [
        f"saslsmtp: warning: --syslog, but no syslog daemon listens ({missing} does not exist):"
        " every log line will be lost"]
    (tmp_path / "log").touch()
    assert twistd_warnings({"syslog": True}, missing) == []
    assert twistd_warnings({"syslog": False}, str(tmp_path / "none")) == []


@pytest.mark.parametrize("given, message", [
    ("-", "standard input cannot be the configuration: each worker and every SIGHUP reload"
          " read the file again; give its path"),
    ("{folder}", "is a folder; give the configuration file (e.g. {folder}/saslsmtp.toml)"),
    ("{folder}/fifo", "is not a regular file (a pipe or a device): each worker and every SIGHUP"
                      " reload read the file again; give a file"),
])
def test_a_configuration_that_is_not_a_file_is_one_line(tmp_path: Path, given: str,
                                                         message: str) -> None:
    """``--config -``, a folder (``/etc/saslsmtp``) or a pipe: --check and a start say what
    to give instead (standard input was looked up as a file named "-"; a pipe passed
    --check and then every worker and reload found it empty)."""
    os.mkfifo(tmp_path / "fifo")
    path = given.format(folder=tmp_path)
    for extra in (("--check",), ()):
        out = run_twistd(Path(path), *extra)
        assert out.returncode == 1, out.stdout + out.stderr
        assert out.stderr == ("saslsmtp: configuration is not valid:\n"
                              f"{path}: {message.format(folder=tmp_path)}\n"), out.stderr


def test_a_configuration_saved_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    """Notepad writes a UTF-8 BOM first: the file is read (tomllib refused it as "Invalid
    statement" at line 1) and problems keep their lines."""
    text = (ETC / "saslsmtp.toml").read_text().replace('path = "users"', f'path = "{ETC / "users"}"')
    text = text.replace('path = "../var/mail"', f'path = "{tmp_path / "mail"}"')
    config = tmp_path / "saslsmtp.toml"
    config.write_bytes(b"\xef\xbb\xbf" + text.encode())
    out = run_twistd(config, "--check")
    assert out.returncode == 0 and out.stdout.strip() == f"{config}: OK", out.stderr
    config.write_bytes(b"\xef\xbb\xbf" + text.replace("[server]\n", "[server]\nbogus = 1\n", 1).encode())
    out = run_twistd(config, "--check")
    assert out.returncode == 1 and f"{config}:12: server.bogus: unknown key" in out.stderr, out.stderr


#: An AUTH script whose import waits until the test creates ``go`` (a slow import: a
#: script reading a big file, asking a server...), after saying it got there.
WAITING_SCRIPT = '''\
import os, time
HERE = os.path.dirname(os.path.abspath(__file__))
open(os.path.join(HERE, "importing"), "w").close()
while not os.path.exists(os.path.join(HERE, "go")):
    time.sleep(0.02)

def auth(arguments, context):
    return None
'''


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("extra", [("--check",), ()], ids=["check", "start"])
def test_ctrl_c_while_the_configuration_is_checked(tmp_path: Path, extra: tuple[str, ...],
                                                   signum: int) -> None:
    """Ctrl-C while the AUTH script is imported: exit 130 and one line.  The import's
    KeyboardInterrupt was taken for the script's own error; the check then imported the
    script again and said OK (exit 0), as if nobody had pressed it.  A SIGTERM then
    (``systemctl stop`` during a slow start) ended the process without a word: now it
    is the same line, and exit 143."""
    (tmp_path / "slow.py").write_text(WAITING_SCRIPT)
    (tmp_path / "users").write_text("demo:{PLAIN}pw\n")
    config = write_config(tmp_path, f'[backends.u]\ntype = "file"\npath = "{tmp_path / "users"}"\n',
                          script="slow.py", listen=[f"tcp:{free_port()}:interface=127.0.0.1"])
    proc = subprocess.Popen(twistd_command(config, *extra), cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        from tests.support import wait_for
        wait_for(lambda: (tmp_path / "importing").exists() or proc.poll() is not None,
                 what="the script's import")
        proc.send_signal(signum)
        (tmp_path / "go").touch()  # a second import (the old behaviour) would not wait
        out, err = proc.communicate(timeout=30)
    finally:
        (tmp_path / "go").touch()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signum, out + err
    assert err == (f"saslsmtp: interrupted ({signal.Signals(signum).name}) while checking the"
                   " configuration; nothing was started\n"), err
    assert "OK" not in out and "ready" not in out, out


def test_the_stop_signal_runs_twistds_handler_in_the_reactor_thread() -> None:
    """twistd's SIGTERM handler logs; run inside the signal handler, it could land in the
    middle of a log line being written.  The guard hands it to the reactor instead, and a
    second signal is only noted."""
    import signal as signals

    from saslsmtp.daemon import _once

    class Reactor:
        def __init__(self) -> None:
            self.queued: list[tuple] = []

        def callFromThread(self, f, *args, **kwargs) -> None:
            self.queued.append((f, args))

    ran: list[int] = []
    reactor = Reactor()
    on_signal = _once(reactor, lambda signum, frame: ran.append(signum), [])
    on_signal(signals.SIGTERM, None)
    assert ran == [] and len(reactor.queued) == 1
    f, args = reactor.queued.pop()
    f(*args)
    assert ran == [signals.SIGTERM]
    on_signal(signals.SIGTERM, None)
    assert ran == [signals.SIGTERM] and reactor.queued[0][1][0].startswith("{signal} received")


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGUSR1], ids=["SIGHUP", "SIGUSR1"])
@pytest.mark.parametrize("logfile", ["-", "saslsmtp.log"], ids=["stdout", "file"])
def test_a_sighup_or_sigusr1_while_the_configuration_is_checked(tmp_path: Path, signum: int,
                                                                logfile: str) -> None:
    """logrotate's postrotate or a config-management run sends SIGHUP or SIGUSR1 while
    the start imports a slow AUTH script: their default action ended the daemon
    (killed by the signal, nothing said).  Now it starts, says once that the signal was
    ignored, serves, and later signals do their usual job (a SIGUSR1 rotates a log file:
    the log's own handler took it over)."""
    from tests.support import wait_for
    (tmp_path / "slow.py").write_text(WAITING_SCRIPT)
    (tmp_path / "users").write_text("demo:{PLAIN}pw\n")
    port = free_port()
    config = write_config(tmp_path, f'[backends.u]\ntype = "file"\npath = "{tmp_path / "users"}"\n',
                          script="slow.py", listen=[f"tcp:{port}:interface=127.0.0.1"])
    command = [arg if arg != "--logfile=-" else f"--logfile={logfile}"
               for arg in twistd_command(config)]
    output = tmp_path / "output"
    log = output if logfile == "-" else tmp_path / logfile
    with open(output, "wb") as out:
        proc = subprocess.Popen(command, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONPATH=str(ROOT)))
    name = signal.Signals(signum).name
    try:
        wait_for(lambda: (tmp_path / "importing").exists() or proc.poll() is not None,
                 what="the script's import")
        proc.send_signal(signum)
        (tmp_path / "go").touch()
        wait_for(lambda: proc.poll() is not None or log.exists()
                 and f"{name} received while starting: ignored" in log.read_text(),
                 what="the line about the signal")
        assert proc.poll() is None, output.read_text()
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            assert client.noop()[0] == 250
        if logfile != "-":  # the log file's own SIGUSR1 handler is in place
            proc.send_signal(signal.SIGUSR1)
            wait_for(lambda: (tmp_path / f"{logfile}.1").exists(), what="the rotated log")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, output.read_text()
    finally:
        (tmp_path / "go").touch()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text() + ((tmp_path / f"{logfile}.1").read_text() if logfile != "-" else "")
    assert text.count(f"{name} received while starting") == 1, text
    assert "Traceback" not in text + output.read_text(), text
