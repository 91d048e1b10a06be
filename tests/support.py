"""Running a real saslsmtp on loopback inside a pytest-twisted test.

In-process (fast, same reactor)::

    @pytest_twisted.ensureDeferred
    async def test_something(tmp_path):
        server = await start_server(tmp_path, BACKEND_TOML, mechanisms=["PLAIN", "LOGIN"])
        try:
            code, reply = await smtp_login(server.port, "alice", "secret")   # smtplib in a thread
        finally:
            await server.stop()

As a real daemon (``twistd -n saslsmtp``) in a subprocess: ``start_daemon(...)``, or
``with workers_daemon(config, log, workers) as proc:`` for a master and its workers.

``write_config`` makes the TOML: listen on 127.0.0.1 (port 0 in-process, a free port for
daemons), delivery into ``tmp_path/mail``, ``failure_delay = 0`` unless given, plus
whatever backend tables and extra sections the caller passes.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from twisted.internet import threads
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.base import DelayedCall
from twisted.internet.task import Clock

from saslsmtp.service import SubmissionFactory, listener, load, wire
from saslsmtp.threads import SynchronousRunner

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reactor_seconds() -> float:
    """Now, on the clock a server's deadlines run on.

    Twisted's reactor schedules ``callLater`` on wall-clock time (``time.time``). A test
    that checks from outside that a deadline was not early must measure on that clock:
    timed with ``time.monotonic``, a wall-clock correction during the wait (3 ms was
    seen on this CI's VM) makes a 1 s deadline look 0.997 s long."""
    return time.time()


def toml_list(items: Sequence[str]) -> str:
    return "[" + ", ".join(f'"{i}"' for i in items) + "]"


def write_config(tmp_path: Path, backends_toml: str = "", *, mechanisms: Sequence[str] = ("PLAIN", "LOGIN"),
                 backends: Sequence[str] | None = None, listen: Sequence[str] | None = None,
                 require_tls: bool = False, failure_delay: float = 0.0, max_failures: int = 3,
                 script: str | None = None, tls: tuple[str, str] | None = None,
                 extra_auth: str = "", extra: str = "", hostname: str = "mx.example.test") -> Path:
    """Write a saslsmtp.toml into ``tmp_path`` and return its path.

    ``backends`` defaults to every ``[backends.NAME]`` found in ``backends_toml``.
    """
    if backends is None:
        backends = [line.strip()[len("[backends."):-1] for line in backends_toml.splitlines()
                    if line.strip().startswith("[backends.")]
    listen = listen or ["tcp:0:interface=127.0.0.1"]
    parts = [
        "[server]",
        f'hostname = "{hostname}"',
        f"listen = {toml_list(listen)}",
        "",
        "[auth]",
        f"mechanisms = {toml_list(mechanisms)}",
        f"require_tls = {'true' if require_tls else 'false'}",
        f"backends = {toml_list(backends)}",
        f"failure_delay = {failure_delay}",
        f"max_failures = {max_failures}",
    ]
    if script:
        parts.append(f'script = "{script}"')
    if extra_auth:
        parts.append(extra_auth)
    if tls:
        parts += ["", "[tls]", f'certificate = "{tls[0]}"', f'private_key = "{tls[1]}"']
    parts += ["", "[delivery]", 'type = "maildir"', f'path = "{tmp_path / "mail"}"', "",
              backends_toml, extra]
    path = tmp_path / "saslsmtp.toml"
    path.write_text("\n".join(parts) + "\n")
    return path


def alice_config(tmp_path: Path, server: str = "") -> tuple[Path, int]:
    """A daemon config for one user (alice / wonderland, PLAIN, a users file) on a free
    loopback port, with ``server`` (TOML lines) added to ``[server]``: (config, port)."""
    (tmp_path / "users").write_text("alice:{PLAIN}wonderland\n")
    port = free_port()
    config = write_config(tmp_path, f'[backends.users]\ntype = "file"\npath = "{tmp_path / "users"}"\n',
                          mechanisms=["PLAIN"], listen=[f"tcp:{port}:interface=127.0.0.1"])
    config.write_text(config.read_text().replace("[server]\n", "[server]\n" + server, 1))
    return config, port


@dataclass
class RunningServer:
    """A saslsmtp listening on 127.0.0.1:``port`` in this process."""

    port: int
    wiring: Any
    factory: SubmissionFactory
    listening: Any
    maildir: Path

    async def stop(self) -> None:
        for p in list(self.factory.connections):
            p.transport.abortConnection()
        await self.listening.stopListening()
        for checker in self.wiring.checkers.values():
            stop = getattr(checker, "stop", None)
            if callable(stop):
                result = stop()
                if hasattr(result, "addCallback"):
                    await result
        for runner in self.wiring.runners:
            runner.stop()

    def messages(self) -> list[bytes]:
        new = self.maildir / "new"
        return [p.read_bytes() for p in sorted(new.iterdir())] if new.exists() else []


class SortedClock(Clock):
    """A ``Clock`` whose ``callLater`` puts the new call in its place (bisect) instead of
    sorting every pending call again: tests that hold thousands of connections, two
    timers each, spent most of their time in those sorts.  ``advance`` still sorts
    first, as ``Clock`` does (a call that was reset or delayed may have moved)."""

    def callLater(self, delay: float, callable: Any, *args: object, **kw: object) -> DelayedCall:
        call = DelayedCall(self.seconds() + delay, callable, args, kw, self.calls.remove,
                           lambda c: None, self.seconds)
        bisect.insort(self.calls, call, key=DelayedCall.getTime)
        return call


def clocked_factory(tmp_path: Path) -> tuple[SubmissionFactory, Clock]:
    """The daemon's own factory for a configuration with one user (demo, password pw), on
    a ``Clock`` and with password checks run inline: sessions over ``StringTransport``
    then run to the end without a reactor."""
    (tmp_path / "users").write_text("demo:{PLAIN}pw\n")
    config = load(str(write_config(
        tmp_path, f'[backends.users]\ntype = "file"\npath = "{tmp_path / "users"}"\n')))
    clock = SortedClock()
    wiring = wire(config, clock)
    wiring.blocking = SynchronousRunner()
    return SubmissionFactory(wiring, clock), clock


async def start_server(tmp_path: Path, backends_toml: str = "", **kwargs: Any) -> RunningServer:
    """Parse a config like the daemon does and listen on a free loopback port."""
    from twisted.internet import reactor
    path = write_config(tmp_path, backends_toml, **kwargs)
    config = load(str(path))
    wiring = wire(config, reactor)
    for runner in wiring.runners:
        runner.start()
    factory = SubmissionFactory(wiring, reactor)
    endpoint, wrapped = listener(config.server.listen[0], config, reactor, factory, wiring.tls_context)
    listening = await endpoint.listen(wrapped)
    return RunningServer(listening.getHost().port, wiring, factory, listening,
                         Path(config.delivery.path))


@contextlib.contextmanager
def silent_port() -> Iterator[tuple[int, list[Protocol]]]:
    """A loopback port of this reactor that accepts TCP connections and never says a
    word (a hanging upstream, for timeouts), and the connections it accepted; on leaving,
    it stops listening and drops them."""
    from twisted.internet import reactor
    connections: list[Protocol] = []

    class Silent(Protocol):
        def connectionMade(self) -> None:
            connections.append(self)

    port = reactor.listenTCP(0, Factory.forProtocol(Silent), interface="127.0.0.1")
    try:
        yield port.getHost().port, connections
    finally:
        port.stopListening()
        for p in connections:
            p.transport.abortConnection()


def _smtplib_login(port: int, user: str, password: str, mechanism: str | None,
                   starttls: bool, timeout: float) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=timeout) as s:
        s.ehlo("client.example")
        if starttls:
            import ssl
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            s.starttls(context=ctx)
            s.ehlo("client.example")
        if mechanism:
            s.user, s.password = user, password
            auth_object = getattr(s, "auth_" + mechanism.lower().replace("-", "_"))
            try:
                return s.auth(mechanism, auth_object, initial_response_ok=True)
            except smtplib.SMTPAuthenticationError as e:
                return e.smtp_code, e.smtp_error
        try:
            return s.login(user, password)
        except smtplib.SMTPAuthenticationError as e:
            return e.smtp_code, e.smtp_error


async def smtp_login(port: int, user: str, password: str, *, mechanism: str | None = "PLAIN",
                     starttls: bool = False, timeout: float = 15.0) -> tuple[int, bytes]:
    """Log in with Python's smtplib (in a thread, so the reactor keeps serving);
    return the final (code, text) of the AUTH exchange."""
    return await threads.deferToThread(_smtplib_login, port, user, password, mechanism,
                                       starttls, timeout)


def terminate(process: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if ``process`` has not exited ``timeout`` seconds later: a
    server a test started never outlives it."""
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


@dataclass
class Daemon:
    """``twistd -n saslsmtp`` in a subprocess."""

    process: subprocess.Popen
    port: int
    log: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            terminate(self.process)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def run_each(commands: Sequence[Sequence[str]], timeout: float = 30.0, *, cwd: str | Path = "/",
             env: dict[str, str] | None = None, at_once: int = 8) -> list[tuple[int | None, str]]:
    """Run ``commands`` (each to its end: exit status, or ``None`` when it was still
    running ``timeout`` seconds after its own start and was stopped; stdout and stderr
    together), ``at_once`` at a time: a sweep of a dozen cases must not start dozens of
    interpreters at once on a machine other tests share, where the last would then
    miss their timeout."""
    from concurrent.futures import ThreadPoolExecutor

    def one(command: Sequence[str]) -> tuple[int | None, str]:
        proc = subprocess.Popen(list(command), cwd=cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
            return proc.returncode, out
        except subprocess.TimeoutExpired:
            terminate(proc)
            out, _ = proc.communicate()
            return None, out
    with ThreadPoolExecutor(at_once) as pool:
        return list(pool.map(one, commands))


def haproxy_checking(folder: Path, front: int, backend: int, send: str = "send-proxy-v2",
                     smtpchk: bool = False) -> subprocess.Popen:
    """A real HAProxy on 127.0.0.1 as the README's recipe has it: ``front`` to ``backend``
    with ``send`` (``send-proxy-v2`` or ``send-proxy``) and a check every 50 ms, with
    ``option smtpchk`` (a session per check) or without (a LOCAL header, a reset)."""
    from tests.conftest import require_binary
    binary = require_binary("haproxy", "haproxy")
    config = folder / "haproxy.cfg"
    config.write_text(
        "global\n    maxconn 64\n\n"
        "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 30s\n"
        "    timeout server 30s\n    timeout check 5s\n\n"
        f"frontend submission\n    bind 127.0.0.1:{front}\n    default_backend saslsmtp\n\n"
        "backend saslsmtp\n" + ("    option smtpchk EHLO haproxy.example\n" if smtpchk else "")
        + f"    server mx1 127.0.0.1:{backend} {send} check inter 50ms rise 1\n")
    with open(folder / "haproxy.log", "wb") as log:
        return subprocess.Popen([binary, "-db", "-f", str(config)], stdout=log,
                                stderr=subprocess.STDOUT)


def check_here(config: Path) -> tuple[int, str]:
    """``twistd saslsmtp --config CONFIG --check`` run in this process: the plugin's own
    options and checks, its exit status and what it printed (stdout and stderr).  A
    sweep of refused configurations then starts an interpreter only for each case's
    real start, which needs one; the check's own exit status through twistd is pinned
    by tests/test_daemon.py."""
    import io

    from saslsmtp.tap import Options
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            Options().parseOptions(["--config", str(config), "--check"])
        except SystemExit as e:
            return (e.code if isinstance(e.code, int) else 1), out.getvalue()
    return 0, out.getvalue()


def twistd_command(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
            "--pidfile=", "--logfile=-", "saslsmtp", "--config", str(config), *extra]


def _greeted(s: socket.socket) -> None:
    """Read the greeting; a haproxy: listener says nothing before a PROXY header, so
    when nothing comes, send one (PROXY UNKNOWN: the connection's own address)."""
    try:
        s.recv(100)
    except socket.timeout:
        s.sendall(b"PROXY UNKNOWN\r\n")
        s.recv(100)


def start_daemon(config: Path, port: int, log: Path, timeout: float = 20.0) -> Daemon:
    """Start the daemon (blocking: call from a fixture) and wait until it accepts."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log, "wb") as out:
        proc = subprocess.Popen(twistd_command(config), cwd=config.parent, stdout=out,
                                stderr=subprocess.STDOUT, env=env)
    daemon = Daemon(proc, port, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"saslsmtp exited with {proc.returncode}:\n{daemon.log_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                _greeted(s)
                return daemon
        except OSError:
            time.sleep(0.1)
    daemon.stop()
    raise RuntimeError(f"saslsmtp did not listen on {port}:\n{daemon.log_text()}")


def wait_for(predicate, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def worker_pids(log: Path) -> dict[int, int]:
    """slot -> pid of the newest worker started in each slot, from the master's log."""
    pids: dict[int, int] = {}
    for m in re.finditer(r"worker (\d+) started \(pid (\d+)\)", log.read_text(errors="replace")):
        pids[int(m.group(1))] = int(m.group(2))
    return pids


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie, or is a zombie whose other threads
    are still ending.  A process with threads (the pools start theirs with the service)
    shows its first thread as a zombie while another thread is still on its way out and
    still holds the open files, the listening socket too; the process is gone only when
    that thread is.  A process reaped between opening its status file and reading it
    fails the read with ESRCH: gone, too."""
    try:
        with open(f"/proc/{pid}/status") as f:
            if "State:\tZ" not in f.read():
                return True
        return len(os.listdir(f"/proc/{pid}/task")) > 1
    except (FileNotFoundError, ProcessLookupError):
        return False


@contextlib.contextmanager
def workers_daemon(config: Path, log: Path, workers: int, *extra: str) -> Iterator[subprocess.Popen]:
    """``twistd -n saslsmtp`` with ``extra`` arguments (e.g. ``--workers N``), its output
    in ``log``, once ``workers`` processes have said "saslsmtp ready".  However the test
    ends, nothing is left running: the master is killed if it is still up, and so is any
    worker it started (a test that stops it cleanly asserts that itself)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open(log, "wb") as out:
        proc = subprocess.Popen(twistd_command(config, *extra), cwd=config.parent, stdout=out,
                                stderr=subprocess.STDOUT, env=env)
    try:
        wait_for(lambda: log.read_text().count("saslsmtp ready") == workers
                 or proc.poll() is not None, what="the daemon")
        assert proc.poll() is None, log.read_text()
        yield proc
    finally:
        kill_leftovers(proc, log)


def kill_leftovers(master: subprocess.Popen, log: Path) -> None:
    """After a test, whatever happened: kill the master if it still runs, and every
    worker its log says it started that is still alive."""
    if master.poll() is None:
        master.kill()
        master.wait(10)
    for pid in worker_pids(log).values():
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
