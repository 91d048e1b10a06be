"""Startup refusals as an operator meets them: real ``twistd -n saslsmtp`` processes.

A listener that cannot bind stops the start before "ready" (one process and workers = 2,
a port in use and a privileged port as a non-root user).  Every configuration that would
pass and then break, or break with a traceback, is refused by ``--check`` AND by a real
start with the same ``file:line: key: message`` (one table, both commands per case).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.conftest import require_binary
from tests.support import ROOT, check_here, free_port, run_each, twistd_command
from tests.tlsutil import issue_cert, make_ca

USERS = "demo:{PLAIN}demo-password\n"


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A folder the ``nobody`` user can enter (pytest's tmp_path is under a 0700 folder)."""
    path = Path(tempfile.mkdtemp(prefix="saslsmtp-startup-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def config_text(folder: Path, *, server: str = "", auth: str = "", tls: str = "",
                delivery: str = "", port: int | None = None, workers: int = 1) -> str:
    port = port or free_port()
    return "\n".join([
        "[server]",
        'hostname = "mx.example.test"',
        f'listen = ["tcp:{port}:interface=127.0.0.1"]',
        f"workers = {workers}",
        server,
        "[auth]",
        'backends = ["users"]',
        "require_tls = false" if "require_tls" not in auth else "",
        auth,
        tls,
        "[backends.users]",
        'type = "file"',
        'path = "users"',
        "[delivery]",
        delivery or f'path = "{folder / "mail"}"',
        "",
    ])


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int | None, str]:
    """(exit status or None if still running after ``timeout``, output)."""
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, _ = proc.communicate(timeout=15)
        return None, out


def start(config: Path, *extra: str, prefix: tuple[str, ...] = ()) -> subprocess.Popen:
    return subprocess.Popen([*prefix, *twistd_command(config, *extra)], cwd=config.parent,
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("which", ["smtp", "metrics"])
def test_a_port_in_use_stops_the_start(shared_dir: Path, workers: int, which: str) -> None:
    """A second server on a busy port exits 1 with one line, never says ready, no
    traceback; the line names the listener as configured and the reason, the same with
    and without workers (one process said ``127.0.0.1:P: [Errno 98] ...``, workers
    ``tcp:P:interface=127.0.0.1: ...``), for an SMTP and for the metrics listener."""
    (shared_dir / "users").write_text(USERS)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        port = busy.getsockname()[1]
        listener = f"tcp:{port}:interface=127.0.0.1"
        config = shared_dir / "saslsmtp.toml"
        if which == "smtp":
            config.write_text(config_text(shared_dir, port=port, workers=workers))
        else:
            config.write_text(config_text(shared_dir, workers=workers)
                              + f'[metrics]\nlisten = "{listener}"\n')
        status, out = finish(start(config), 20)
    finally:
        busy.close()
    assert status == 1, out
    lines = [line for line in out.splitlines() if "cannot listen on" in line]
    assert len(lines) == 1, out
    assert lines[0].endswith(f" saslsmtp: cannot listen on {listener}: Address already in use"), out
    assert "saslsmtp ready" not in out and "Traceback" not in out, out
    assert "started" not in out, out  # no worker was spawned


@pytest.mark.parametrize("workers", [1, 2])
def test_a_privileged_port_as_non_root_stops_the_start(shared_dir: Path, workers: int) -> None:
    """Port 465 without the right to bind it (what a non-root user meets; simulated by
    dropping CAP_NET_BIND_SERVICE, as the interpreter under /root is not for ``nobody``):
    EACCES is one line and exit 1, before "ready"."""
    require_binary("setpriv")
    (shared_dir / "users").write_text(USERS)
    config = shared_dir / "saslsmtp.toml"
    config.write_text(config_text(shared_dir, port=465, workers=workers))
    status, out = finish(start(config, prefix=("setpriv", "--bounding-set=-net_bind_service")), 20)
    assert status == 1, out
    assert "cannot listen on" in out and "Permission denied" in out, out
    assert "saslsmtp ready" not in out and "Traceback" not in out, out


# ---------------------------------------------------------------------------------------
# One table: each configuration, --check and a real start, the same file:line refusal
# ---------------------------------------------------------------------------------------


def _tls(folder: Path, cert: str, key: str) -> str:
    return f'[tls]\ncertificate = "{cert}"\nprivate_key = "{key}"'


def _certs(folder: Path) -> tuple[str, str, str]:
    ca = make_ca(folder)
    one, other = issue_cert(ca, folder), issue_cert(ca, folder)
    return one.cert_path, one.key_path, other.key_path


def _unreadable_users(folder: Path) -> dict[str, str]:
    (folder / "users").chmod(0o600)
    return {"server": 'user = "nobody"'}


def _unwritable_maildir(folder: Path) -> dict[str, str]:
    (folder / "mail").mkdir()
    (folder / "mail").chmod(0o755)  # root's
    return {"server": 'user = "nobody"', "delivery": f'path = "{folder / "mail"}"'}


def _path_under_a_file(folder: Path) -> dict[str, str]:
    (folder / "afile").write_text("x")
    return {"delivery": f'path = "{folder / "afile" / "mail"}"'}


def _non_pem_cert(folder: Path) -> dict[str, str]:
    cert, key, _ = _certs(folder)
    (folder / "notpem.pem").write_text("this is not a certificate\n")
    return {"tls": _tls(folder, str(folder / "notpem.pem"), key)}


def _key_is_cert(folder: Path) -> dict[str, str]:
    cert, _, _ = _certs(folder)
    return {"tls": _tls(folder, cert, cert)}


def _mismatch(folder: Path) -> dict[str, str]:
    cert, _, other_key = _certs(folder)
    return {"tls": _tls(folder, cert, other_key)}


#: (case, what to write (a dict of config parts, or a function of the folder making one),
#:  the key the refusal names)
CASES: list[tuple[str, Callable[[Path], dict[str, str]], str]] = [
    ("non-PEM certificate", _non_pem_cert, "tls.certificate"),
    ("key file holds a certificate", _key_is_cert, "tls.private_key"),
    ("certificate/key mismatch", _mismatch, "tls.private_key"),
    ("listen tcp:notaport", lambda f: {"listen": '["tcp:notaport"]'},
     "server.listen"),
    ("listen foo:2525", lambda f: {"listen": '["foo:2525"]'}, "server.listen"),
    ("non-ASCII hostname", lambda f: {"hostname": '"mäil.example.test"'}, "server.hostname"),
    ("CRLF in hostname", lambda f: {"hostname": '"mx.example.test\\r\\n250 evil"'},
     "server.hostname"),
    ("idle_timeout = -5", lambda f: {"server": "idle_timeout = -5"}, "server.idle_timeout"),
    ("idle_timeout = 0", lambda f: {"server": "idle_timeout = 0"}, "server.idle_timeout"),
    ("hash_threads = 0", lambda f: {"auth": "hash_threads = 0"}, "auth.hash_threads"),
    ("max_recipients = 0", lambda f: {"server": "max_recipients = 0"}, "server.max_recipients"),
    ("delivery path cannot be created", _path_under_a_file, "delivery.path"),
    ("users file unreadable by server.user", _unreadable_users, "backends.users.path"),
    ("Maildir unwritable by server.user", _unwritable_maildir, "delivery.path"),
    ("require_tls without any TLS", lambda f: {"auth": "require_tls = true"},
     "auth.require_tls"),
]


def write_case(folder: Path, make: Callable[[Path], dict[str, str]]) -> Path:
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    (folder / "users").write_text(USERS)
    parts = make(folder)
    text = config_text(folder, server=parts.get("server", ""), auth=parts.get("auth", ""),
                       tls=parts.get("tls", ""), delivery=parts.get("delivery", ""))
    if "listen" in parts:
        text = "\n".join(f"listen = {parts['listen']}" if line.startswith("listen =") else line
                         for line in text.splitlines()) + "\n"
    if "hostname" in parts:
        text = text.replace('hostname = "mx.example.test"', f"hostname = {parts['hostname']}")
    config = folder / "saslsmtp.toml"
    config.write_text(text, encoding="utf-8")
    return config


def key_line(config: Path, key: str) -> int:
    """The line of ``key`` (``section.name``) in ``config``, or of its table."""
    from saslsmtp.config import key_lines
    lines = key_lines(config.read_text(encoding="utf-8"))
    while key not in lines:
        key = key.rsplit(".", 1)[0]
    return lines[key]


def test_every_broken_configuration_is_refused_by_check_and_by_a_start(shared_dir: Path) -> None:
    """Each case: ``--check`` exits 1 and a real start exits non-zero, both naming
    ``file:line: key``, neither with a traceback, the start never saying "ready"."""
    cases = []
    for n, (name, make, key) in enumerate(CASES):
        config = write_case(shared_dir / f"case{n}", make)
        cases.append((name, config, key))
    starts = run_each([twistd_command(config) for _, config, _ in cases], 30, env=env())
    failures = []
    for (name, config, key), start in zip(cases, starts):
        where = f"{config}:{key_line(config, key)}: {key}: "
        for what, (status, out) in (("--check", check_here(config)), ("start", start)):
            if status in (0, None) or where not in out or "Traceback" in out or "saslsmtp ready" in out:
                failures.append(f"{name} ({what}): exit {status}, want {where!r} in:\n{out}")
    assert not failures, "\n\n".join(failures)


def test_check_passes_the_same_layout_when_it_is_right(shared_dir: Path) -> None:
    """The table's base configuration (and nobody's readable users file, writable Maildir,
    real TLS with require_tls) passes ``--check``: the refusals above are the changes."""
    folder = shared_dir / "good"
    cert, key, _ = _certs(shared_dir)
    config = write_case(folder, lambda f: {"server": 'user = "nobody"',
                                           "auth": "require_tls = true",
                                           "tls": _tls(f, cert, key)})
    (folder / "mail").mkdir()
    (folder / "mail").chmod(0o777)
    os.chmod(key, 0o644)
    status, out = finish(start(config, "--check"), 30)
    assert status == 0 and out.strip().endswith(f"{config}: OK"), out


# ---------------------------------------------------------------------------------------
# The README's production deployment, first time, with swaks and curl
# ---------------------------------------------------------------------------------------


def test_production_deployment_as_the_readme_says(shared_dir: Path) -> None:
    """Started as root with server.user = "nobody", STARTTLS required, a users file:
    ``--check`` passes, swaks and curl (``--ssl-reqd``) log in and deliver, SIGTERM exits 0
    with no traceback and no pid-file complaint."""
    require_binary("swaks")
    require_binary("curl")
    ca = make_ca(shared_dir)
    cert = issue_cert(ca, shared_dir, names=["mx.example.test", "localhost", "127.0.0.1"])
    port = free_port()
    config = shared_dir / "saslsmtp.toml"
    config.write_text("\n".join([
        "[server]", 'hostname = "mx.example.test"',
        f'listen = ["tcp:{port}:interface=127.0.0.1"]', 'user = "nobody"',
        "[tls]", f'certificate = "{cert.chain_path}"', f'private_key = "{cert.key_path}"',
        "[auth]", 'backends = ["users"]',  # require_tls = true: the default
        "[backends.users]", 'type = "file"', 'path = "users"',
        "[delivery]", 'path = "mail"', ""]))
    users = shared_dir / "users"
    users.write_text(USERS)
    for private in (users, Path(cert.key_path)):  # root:nogroup 0640, as the README says
        os.chown(private, 0, 65534)
        private.chmod(0o640)
    (shared_dir / "mail").mkdir(mode=0o700)
    os.chown(shared_dir / "mail", 65534, 65534)

    status, out = finish(start(config, "--check"), 30)
    assert status == 0 and "warning" not in out, out
    daemon = start(config)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and daemon.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.1)
        swaks = subprocess.run(
            ["swaks", "--server", f"127.0.0.1:{port}", "-tls", "--auth", "PLAIN",
             "--auth-user", "demo", "--auth-password", "demo-password",
             "--from", "demo@example.test", "--to", "someone@example.test"],
            capture_output=True, text=True, timeout=30, cwd=shared_dir)
        assert swaks.returncode == 0, swaks.stdout + swaks.stderr
        message = shared_dir / "message.eml"
        message.write_bytes(b"Subject: from curl\r\n\r\nhello\r\n")
        curl = subprocess.run(
            ["curl", "-sS", f"smtp://127.0.0.1:{port}", "--ssl-reqd", "--cacert", ca.cert_path,
             "--user", "demo:demo-password", "--mail-from", "demo@example.test",
             "--mail-rcpt", "someone@example.test", "--upload-file", str(message)],
            capture_output=True, text=True, timeout=30, cwd=shared_dir)
        assert curl.returncode == 0, curl.stderr
    finally:
        daemon.terminate()
        status, out = finish(daemon, 20)
    stored = sorted((shared_dir / "mail" / "new").iterdir())
    assert len(stored) == 2 and all(p.stat().st_uid == 65534 for p in stored), out
    assert b"Subject: from curl" in b"".join(p.read_bytes() for p in stored)
    assert "running as uid 65534" in out and "saslsmtp ready" in out, out
    assert status == 0 and "Traceback" not in out and "pid file" not in out, out


# ---------------------------------------------------------------------------------------
# A failed start told where the operator looks: daemonized, --pidfile, --logfile, --syslog
# ---------------------------------------------------------------------------------------


def twistd(*argv: str, cwd: Path) -> subprocess.Popen:
    """``twistd ARGV`` (any twistd options, then ``saslsmtp ...``), output captured."""
    import sys
    return subprocess.Popen([sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                             *argv], cwd=cwd, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@contextlib.contextmanager
def busy_port() -> Iterator[int]:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        yield busy.getsockname()[1]
    finally:
        busy.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_daemonized_start_that_fails_says_so_and_exits(shared_dir: Path, workers: int) -> None:
    """Without ``-n`` twistd forks and its parent waits for the child's word: a port in use
    (``SystemExit``, which twistd does not handle there) left that parent waiting forever
    and the pid file behind.  Now it prints the reason and exits 1, the file is gone."""
    (shared_dir / "users").write_text(USERS)
    config, pidfile, log = (shared_dir / "saslsmtp.toml", shared_dir / "twistd.pid",
                            shared_dir / "saslsmtp.log")
    with busy_port() as port:
        config.write_text(config_text(shared_dir, port=port, workers=workers))
        proc = twistd(f"--pidfile={pidfile}", f"--logfile={log}", "saslsmtp", "--config",
                      str(config), cwd=shared_dir)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"twistd's parent still waits: {out}{err}")
    assert proc.returncode == 1, out + err
    assert "An error has occurred: b'saslsmtp: cannot listen on" in err, err
    assert "Address already in use" in err and "Traceback" not in out + err, err
    assert not pidfile.exists()
    assert "Address already in use" in log.read_text()


SLOW_WORKER_SCRIPT = """\
import sys
import time

from saslsmtp.script import Reject

if sys.argv[0].endswith("worker.py"):  # a worker starting: slow (--check imports it fast)
    time.sleep(float(open("slow").read()))


def auth(arguments, context):
    return Reject()
"""


def test_a_daemon_killed_before_it_is_ready_ends_the_waiting_parent(shared_dir: Path) -> None:
    """Without ``-n``: the daemon (a master waiting for its workers) is SIGKILLed before
    it reports.  twistd's parent kept the status pipe's write end open itself, so it never
    saw the end of file and waited forever; now it exits 1 with one line."""
    from tests.support import alive, wait_for, worker_pids
    (shared_dir / "users").write_text(USERS)
    (shared_dir / "auth.py").write_text(SLOW_WORKER_SCRIPT)
    (shared_dir / "slow").write_text("60")
    config, pidfile, log = (shared_dir / "saslsmtp.toml", shared_dir / "twistd.pid",
                            shared_dir / "saslsmtp.log")
    config.write_text(config_text(shared_dir, auth='script = "auth.py"', workers=2))
    proc = twistd(f"--pidfile={pidfile}", f"--logfile={log}", "saslsmtp", "--config",
                  str(config), cwd=shared_dir)
    try:
        wait_for(lambda: len(worker_pids(log)) == 2 if log.exists() else False,
                 what="the workers started")
        os.kill(int(pidfile.read_text()), 9)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"twistd's parent still waits: {out}{err}")
    finally:
        (shared_dir / "slow").write_text("0")
        for pid in worker_pids(log).values() if log.exists() else ():
            if alive(pid):
                os.kill(pid, 9)
    assert proc.returncode == 1, out + err
    assert err.splitlines() == ["saslsmtp: the daemon process ended before it was ready"
                                " (killed?); its log may say why"], err


@pytest.mark.parametrize("where", ["logfile", "syslog"])
def test_a_failed_start_logging_elsewhere_says_why_on_the_terminal_too(shared_dir: Path,
                                                                       where: str) -> None:
    """``-n`` with ``--logfile`` or ``--syslog``: the reason went only to the log (twistd
    had taken standard error); it is printed on the terminal too, and the pid file this
    process wrote is removed."""
    (shared_dir / "users").write_text(USERS)
    config, pidfile, log = (shared_dir / "saslsmtp.toml", shared_dir / "twistd.pid",
                            shared_dir / "saslsmtp.log")
    logging = f"--logfile={log}" if where == "logfile" else "--syslog"
    with busy_port() as port:
        config.write_text(config_text(shared_dir, port=port))
        proc = twistd("-n", f"--pidfile={pidfile}", logging, "saslsmtp", "--config", str(config),
                      cwd=shared_dir)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, out + err
    *before, last = err.splitlines()  # (a warning first, without a syslog daemon here)
    assert last == f"saslsmtp: cannot listen on tcp:{port}:interface=127.0.0.1: Address already in use"
    assert all(line.startswith("saslsmtp: warning: ") for line in before), err
    assert not pidfile.exists()
    if where == "logfile":
        assert "Address already in use" in log.read_text()


START_WARNING = "server.worker_timeout: warning: has no effect with one process"


def serving(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            return s.recv(100).startswith(b"220 ")
    except OSError:
        return False


@pytest.mark.parametrize("how", ["-n --logfile", "daemonized", "-n, log on stdout"])
def test_start_warnings_reach_the_log_once(shared_dir: Path, how: str) -> None:
    """A start's warnings were printed on standard error only: an operator reading the
    log file (``--logfile``, a daemon's) never saw them.  Now they are in the log too,
    once; with the log on standard output (a terminal, the journal) they show once, not
    printed and logged."""
    from tests.support import wait_for
    (shared_dir / "users").write_text(USERS)
    config, pidfile, log = (shared_dir / "saslsmtp.toml", shared_dir / "twistd.pid",
                            shared_dir / "saslsmtp.log")
    port = free_port()
    config.write_text(config_text(shared_dir, server="worker_timeout = 30", port=port))
    argv = {"-n --logfile": ("-n", "--pidfile=", f"--logfile={log}"),
            "daemonized": (f"--pidfile={pidfile}", f"--logfile={log}"),
            "-n, log on stdout": ("-n", "--pidfile=", "--logfile=-")}[how]
    proc = twistd(*argv, "saslsmtp", "--config", str(config), cwd=shared_dir)
    try:
        if how == "daemonized":
            out, err = proc.communicate(timeout=30)  # the parent exits once the daemon is up
            assert proc.returncode == 0, out + err
        wait_for(lambda: serving(port), what="the daemon serving")
    finally:
        if how == "daemonized":
            os.kill(int(pidfile.read_text()), 15)
            wait_for(lambda: not pidfile.exists(), what="the daemon's end")
        else:
            proc.terminate()
            out, err = proc.communicate(timeout=30)
    assert (out + err).count(START_WARNING) == 1, out + err
    if how != "-n, log on stdout":
        assert err.count(START_WARNING) == 1, err
        logged = [line for line in log.read_text().splitlines() if START_WARNING in line]
        assert len(logged) == 1 and "[saslsmtp#warn] " in logged[0], log.read_text()


def unused_uid() -> int:
    """A uid that no user has."""
    import pwd
    taken = {entry.pw_uid for entry in pwd.getpwall()}
    return next(uid for uid in range(61000, 65000) if uid not in taken)


@pytest.mark.parametrize("with_gid", [False, True], ids=["--uid", "--uid --gid"])
def test_a_uid_that_names_no_user_is_one_line(shared_dir: Path, with_gid: bool) -> None:
    """``--uid N`` where no user has N: twistd bound the port, then failed to switch with
    a ``KeyError`` traceback (it looks the user up for its groups).  Now the start is
    refused before anything is bound, in one line."""
    from tests.conftest import require
    require(os.geteuid() == 0, "needs root: only root may ask twistd to switch user")
    (shared_dir / "users").write_text(USERS)
    config = shared_dir / "saslsmtp.toml"
    config.write_text(config_text(shared_dir))
    uid = unused_uid()
    gid = ("--gid", str(uid)) if with_gid else ()
    proc = twistd("-n", "--pidfile=", "--uid", str(uid), *gid, "saslsmtp", "--config",
                  str(config), cwd=shared_dir)
    out, err = proc.communicate(timeout=60)
    groups = "its groups)" if with_gid else "its groups and its primary group)"
    assert (proc.returncode, out, err) == (
        1, "", f"saslsmtp: cannot start: --uid {uid}: no such user (twistd looks up {groups};"
               " name an existing user, or use [server] user\n")
