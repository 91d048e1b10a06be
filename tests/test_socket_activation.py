"""Socket activation: saslsmtp serves the sockets systemd passes (``systemd:`` listeners),
with one process and with workers, under the real ``systemd-socket-activate``; and a
client that connects while the daemon restarts on a socket held across the restart
(what a ``.socket`` unit does) is served by the new process, not refused."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Sequence

import pytest

from tests.activate import activated_command
from tests.conftest import require_binary
from tests.support import (ROOT, _smtplib_login, alive, alice_config, free_port, kill_leftovers,
                           twistd_command, wait_for, worker_pids, write_config)
from tests.tlsutil import issue_cert, make_ca

LOGGED_IN = (235, b"2.7.0 Authentication successful")


def listening_on(config: Path, *listen: str, tls: bool = False) -> Path:
    """``config`` (alice_config's) listening on ``listen`` instead, with a [tls] section."""
    text = re.sub(r'listen = \[.*\]', "listen = [" + ", ".join(f'"{d}"' for d in listen) + "]",
                  config.read_text())
    if tls:
        ca = make_ca(config.parent)
        issued = issue_cert(ca, config.parent)
        text = text.replace("[auth]", f'[tls]\ncertificate = "{issued.chain_path}"\n'
                                      f'private_key = "{issued.key_path}"\n\n[auth]', 1)
    config.write_text(text)
    return config


def socket_activate(config: Path, log: Path, addresses: Sequence[int], names: Sequence[str],
                    *extra: str) -> subprocess.Popen:
    """``systemd-socket-activate`` listening on 127.0.0.1:each port, execing twistd at the
    first connection (it keeps its pid: the one to stop)."""
    binary = require_binary("systemd-socket-activate", "systemd")
    command = [binary, *(f"--listen=127.0.0.1:{port}" for port in addresses),
               f"--fdname={':'.join(names)}", f"--setenv=PYTHONPATH={ROOT}",
               *twistd_command(config, *extra)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, cwd=config.parent, stdout=out, stderr=subprocess.STDOUT)
    wait_for(lambda: log.read_text().count("Listening on") == len(addresses)
             or proc.poll() is not None, what="systemd-socket-activate to listen")
    assert proc.poll() is None, log.read_text()
    return proc


def listen_line(config: Path) -> str:
    """``FILE:LINE: server.listen``, as a problem with the key names it."""
    lines = config.read_text().splitlines()
    return f"{config}:{1 + next(i for i, line in enumerate(lines) if line.startswith('listen'))}: server.listen"


def listen_variables(pid: int) -> list[str]:
    """The LISTEN_* variables in the environment process ``pid`` was started with."""
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return [e.decode() for e in entries if e.startswith(b"LISTEN_")]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_login_through_systemd_socket_activate(tmp_path: Path, workers: int) -> None:
    """The first connection starts the daemon on the passed socket (queued meanwhile)
    and logs in; every worker serves it, and none was started with LISTEN_FDS."""
    config, port = alice_config(tmp_path, f"workers = {workers}\n")
    listening_on(config, "systemd:name=submission")
    log = tmp_path / "daemon.log"
    proc = socket_activate(config, log, [port], ["submission"])
    try:
        assert _smtplib_login(port, "alice", "wonderland", "PLAIN", False, 30) == LOGGED_IN
        wait_for(lambda: log.read_text().count("saslsmtp ready") == workers, what="ready")
        for _ in range(3):  # each worker in turn, likely
            assert _smtplib_login(port, "alice", "wonderland", "PLAIN", False, 30) == LOGGED_IN
        workers_seen = worker_pids(log)
        assert len(workers_seen) == (workers if workers > 1 else 0)
        for pid in workers_seen.values():
            assert listen_variables(pid) == [], f"worker {pid} saw the LISTEN_* variables"
        assert f"LISTEN_PID={proc.pid}" in listen_variables(proc.pid)  # systemd's, as a check
        # a reload checks the configuration again, with the sockets taken at the start
        proc.send_signal(signal.SIGHUP)
        done = "reloaded " if workers == 1 else "reload: configuration valid"
        wait_for(lambda: done in log.read_text() or "reload refused" in log.read_text(),
                 what="the reload")
        assert "reload refused" not in log.read_text() and "warning" not in log.read_text()
        assert _smtplib_login(port, "alice", "wonderland", "PLAIN", False, 30) == LOGGED_IN
        proc.terminate()
        assert proc.wait(30) == 0, log.read_text()
        assert not [pid for pid in workers_seen.values() if alive(pid)]
    finally:
        kill_leftovers(proc, log)


def proxied_greeting(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 587\r\n")
        greeting = s.recv(200)
        blob = base64.b64encode(b"\0alice\0wonderland")
        s.sendall(b"EHLO proxied.example\r\nAUTH PLAIN " + blob + b"\r\nQUIT\r\n")
        out = b""
        while not out.endswith(b"221 2.0.0 Bye\r\n"):
            chunk = s.recv(4096)
            assert chunk, out
            out += chunk
        return greeting + out


def implicit_tls_greeting(port: int) -> bytes:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw) as s:
            return s.recv(200)


@pytest.mark.parametrize("workers", [1, 2])
def test_haproxy_and_implicit_tls_on_passed_sockets(tmp_path: Path, workers: int) -> None:
    """``haproxy:systemd:...`` reads the PROXY header first, ``systemd:...:ssl=yes`` is
    TLS from the first byte, as on tcp: and ssl: listeners."""
    config, submission = alice_config(tmp_path, f"workers = {workers}\n")
    listening_on(config, "haproxy:systemd:name=submission", "systemd:name=submissions:ssl=yes",
                 tls=True)
    submissions = free_port()
    log = tmp_path / "daemon.log"
    proc = socket_activate(config, log, [submission, submissions], ["submission", "submissions"])
    try:
        out = proxied_greeting(submission)
        assert out.startswith(b"220 ") and b"235 2.7.0" in out, out
        wait_for(lambda: log.read_text().count("saslsmtp ready") == workers, what="ready")
        assert 'client=203.0.113.7 mechanism=PLAIN user="alice"' in log.read_text()
        assert implicit_tls_greeting(submissions).startswith(b"220 ")
    finally:
        kill_leftovers(proc, log)


@pytest.fixture
def held_socket() -> Iterator[socket.socket]:
    """The listening socket a .socket unit holds while its service restarts."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield sock
    sock.close()


def start_on(sock: socket.socket, config: Path, log: Path, names: Sequence[str],
             *extra: str) -> subprocess.Popen:
    """The daemon started as systemd starts it, on ``sock`` (kept open here)."""
    command, fds = activated_command(twistd_command(config, *extra), [sock], names)
    with open(log, "ab") as out:
        return subprocess.Popen(command, pass_fds=fds, cwd=config.parent, stdout=out,
                                stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def started(log: Path, workers: int, times: int) -> bool:
    """The daemon logging to ``log`` has finished its ``times``-th start: every process
    ready and, with workers, the master's own line."""
    text = log.read_text()
    return text.count("saslsmtp ready") == times * workers and (
        workers == 1 or text.count(f"started {workers} workers") == times)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_client_that_connects_during_a_restart_is_served(tmp_path: Path, held_socket: socket.socket,
                                                          workers: int) -> None:
    """The point of socket activation: the daemon stops, a client connects (the kernel
    queues it in the held socket's backlog: no ECONNREFUSED), the daemon starts again on
    the same socket and the waiting client gets its greeting and logs in."""
    config, _ = alice_config(tmp_path, f"workers = {workers}\n")
    listening_on(config, "systemd:name=submission")
    port = held_socket.getsockname()[1]
    log = tmp_path / "daemon.log"
    first = start_on(held_socket, config, log, ["submission"])
    try:
        wait_for(lambda: started(log, workers, 1) or first.poll() is not None,
                 what="the first start")
        assert _smtplib_login(port, "alice", "wonderland", "PLAIN", False, 30) == LOGGED_IN
        first.send_signal(signal.SIGTERM)
        assert first.wait(30) == 0, log.read_text()
    finally:
        kill_leftovers(first, log)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as waiting:
        # connected while nothing runs: queued, not refused
        second = start_on(held_socket, config, log, ["submission"])
        try:
            assert waiting.recv(200).startswith(b"220 "), log.read_text()
            waiting.sendall(b"EHLO waiting.example\r\nAUTH PLAIN "
                            + base64.b64encode(b"\0alice\0wonderland") + b"\r\nQUIT\r\n")
            out = b""
            while not out.endswith(b"221 2.0.0 Bye\r\n"):
                chunk = waiting.recv(4096)
                assert chunk, out
                out += chunk
            assert b"235 2.7.0 Authentication successful\r\n" in out, out
            # every worker ready is not yet the master's start: a SIGTERM before its
            # "started" line interrupts the start (exit 1), as it should
            wait_for(lambda: started(log, workers, 2), what="the second start")
            second.send_signal(signal.SIGTERM)
            assert second.wait(30) == 0, log.read_text()
        finally:
            kill_leftovers(second, log)


def run_activated(config: Path, sockets: Sequence[socket.socket], names: Sequence[str],
                  *extra: str) -> tuple[int, str]:
    """twistd saslsmtp with ``extra`` (``--check``), started as systemd starts it with
    ``sockets`` (none: no LISTEN_* at all): (exit status, output).  A start that serves
    is stopped once ready, with exit status 0."""
    command = twistd_command(config, *extra)
    fds: list[int] = []
    if sockets:
        command, fds = activated_command(command, sockets, names)
    log = config.parent / f"run-{len(list(config.parent.glob('run-*')))}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, pass_fds=fds, cwd=config.parent, stdout=out,
                                stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        wait_for(lambda: proc.poll() is not None or "saslsmtp ready" in log.read_text(),
                 timeout=60, what="the end or the start")
        if proc.poll() is None:
            proc.terminate()
        return proc.wait(30), log.read_text()
    finally:
        kill_leftovers(proc, log)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_start_without_passed_sockets_stops_in_one_line(tmp_path: Path, workers: int) -> None:
    """Started by hand (no LISTEN_FDS): one line, exit status 1, never ready.  --check
    (ExecStartPre, to which systemd passes no sockets) checks the entry's syntax only
    and says OK: it cannot know what the start will get."""
    config, _ = alice_config(tmp_path, f"workers = {workers}\n")
    listening_on(config, "systemd:name=submission")
    assert run_activated(config, [], [], "--check") == (0, f"{config}: OK\n")
    status, out = run_activated(config, [], [])
    assert status == 1, out
    lines = [line for line in out.splitlines() if "saslsmtp: " in line]
    assert lines and all(line.endswith(
        "saslsmtp: cannot listen on systemd:name=submission: systemd passed no sockets to this"
        " process (no LISTEN_FDS for it): start the .socket unit (systemctl start"
        " saslsmtp.socket), or use a tcp: listener instead") for line in lines), out
    assert "saslsmtp ready" not in out and "Traceback" not in out


@pytest.mark.parametrize("workers", [1, 2])
def test_check_and_start_refuse_a_name_systemd_did_not_pass(tmp_path: Path, held_socket: socket.socket,
                                                            workers: int) -> None:
    """With the sockets, --check (run as the start is) and the start say the same line."""
    config, _ = alice_config(tmp_path, f"workers = {workers}\n")
    listening_on(config, "systemd:name=submission")
    port = held_socket.getsockname()[1]
    problem = (f"{listen_line(config)}: 'systemd:name=submission': systemd passed no socket"
               f" named 'submission' (it passed other (fd 3, port {port}); ListenStream= and"
               " FileDescriptorName= in the .socket unit make them)")
    for extra in (("--check",), ()):
        status, out = run_activated(config, [held_socket], ["other"], *extra)
        assert status == 1 and problem in out.splitlines(), out
        assert "saslsmtp ready" not in out and "Traceback" not in out


def test_check_and_start_refuse_a_datagram_socket(tmp_path: Path) -> None:
    config, _ = alice_config(tmp_path)
    listening_on(config, "systemd:index=0")
    with socket.socket(type=socket.SOCK_DGRAM) as dgram:
        dgram.bind(("127.0.0.1", 0))
        problem = (f"{listen_line(config)}: 'systemd:index=0': fd 3 is a SOCK_DGRAM socket,"
                   " not a stream one (ListenStream= in the .socket unit)")
        for extra in (("--check",), ()):
            status, out = run_activated(config, [dgram], [], *extra)
            assert status == 1 and problem in out.splitlines(), out


def test_a_systemd_metrics_listener_is_refused_in_words(tmp_path: Path,
                                                       held_socket: socket.socket) -> None:
    """``[metrics] listen`` binds its own port: a ``systemd:`` entry there is refused at
    its line, with the sockets passed or not, in words (it was Twisted's
    ``_SystemdParser._parseServer() missing 1 required positional argument``)."""
    config, _ = alice_config(tmp_path)
    listening_on(config, "systemd:name=saslsmtp")
    config.write_text(config.read_text() + '\n[metrics]\nlisten = "systemd:name=metrics"\n')
    line = next(n for n, text in enumerate(config.read_text().splitlines(), 1)
                if text.startswith("listen = \"systemd:name=metrics"))
    problem = (f"{config}:{line}: metrics.listen: 'systemd:name=metrics': socket activation is"
               " for server.listen entries only; [metrics] listen binds its own port (like"
               ' "tcp:9125:interface=127.0.0.1")')
    for sockets, names, extra in (([], [], ("--check",)), ([held_socket], ["saslsmtp"], ())):
        status, out = run_activated(config, sockets, names, *extra)
        assert status == 1 and problem in out.splitlines(), out
        assert "saslsmtp ready" not in out and "Traceback" not in out and "_Systemd" not in out


def test_a_passed_socket_nobody_names_is_a_warning(tmp_path: Path, held_socket: socket.socket) -> None:
    """--check and the start warn about it; the start serves the other one."""
    config, _ = alice_config(tmp_path)
    listening_on(config, "systemd:port=" + str(held_socket.getsockname()[1]))
    with socket.socket() as spare:
        spare.bind(("127.0.0.1", 0))
        spare.listen()
        warning = (f"{listen_line(config)}: warning: systemd passed spare (fd 4, port"
                   f" {spare.getsockname()[1]}), which no server.listen entry names:"
                   " connections to it wait unanswered (add systemd:name=... to server.listen"
                   " or remove it from the .socket unit)")
        status, out = run_activated(config, [held_socket, spare], ["saslsmtp", "spare"], "--check")
        assert status == 0 and warning in out.splitlines(), out
        status, out = run_activated(config, [held_socket, spare], ["saslsmtp", "spare"])
        assert status == 0 and warning in out.splitlines() and "saslsmtp ready" in out, out


def test_the_documented_check_under_the_sockets_runs(tmp_path: Path) -> None:
    """docs/operations.md's ``systemd-socket-activate ... --check`` recipe, run as written
    (free loopback ports for 587 and 465, this test's configuration): the tool execs its
    command only at the first connection, so the recipe must make one; before, it gave
    the bare command, which waited there for a client that never came."""
    require_binary("systemd-socket-activate", "systemd")
    text = (ROOT / "docs" / "operations.md").read_text()
    assert "runs its command only when a client connects" in text
    block = text.split("runs its command only when a client connects", 1)[1]
    block = block.split("```sh\n", 1)[1].split("```", 1)[0]
    assert "systemd-socket-activate" in block and "/dev/tcp/" in block, block
    port, tls_port = free_port(), free_port()
    (tmp_path / "users").write_text("demo:{PLAIN}pw\n")
    config = write_config(tmp_path, '[backends.users]\ntype = "file"\npath = "users"\n',
                          listen=[f"systemd:name=saslsmtp:port={port}"])
    script = "\n".join(line.strip() for line in block.replace("\\\n", " ").splitlines())
    script = (script.replace("-l 587", f"-l 127.0.0.1:{port}")
              .replace("-l 465", f"-l 127.0.0.1:{tls_port}")
              .replace("/587", f"/{port}")
              .replace("/etc/saslsmtp/saslsmtp.toml", str(config)))
    shell = subprocess.Popen(["bash", "-c", script + "\nexit $?"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                             start_new_session=True,
                             env=dict(os.environ, PYTHONPATH=str(ROOT),
                                      PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}"))
    try:
        stdout, stderr = shell.communicate(timeout=60)
    finally:  # a recipe that waits would leave systemd-socket-activate behind
        try:
            os.killpg(shell.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shell.wait()
    done = subprocess.CompletedProcess(shell.args, shell.returncode, stdout, stderr)
    # the check saw the sockets: the one on tls_port is named by no entry
    assert f"systemd passed saslsmtp (fd 4, port {tls_port})" in done.stderr, done.stderr
    assert f"{config}: OK" in done.stdout and done.returncode == 0, (done.stdout, done.stderr)


def test_ipv4_clients_of_a_dual_stack_socket_are_seen_as_ipv4(tmp_path: Path) -> None:
    """saslsmtp.socket's ``ListenStream=587`` is ``[::]:587``, IPv4 too: the kernel gives
    an IPv4 client the address ``::ffff:a.b.c.d``.  saslsmtp used it as it came: the
    fail2ban line said ``client=::ffff:7f00:1`` (a ban of that in ip6tables never stops
    the IPv4 client), ``who`` and the session line ``[::ffff:127.0.0.1]``, where Postfix
    and Dovecot say 127.0.0.1.  The client is its IPv4 address everywhere."""
    from saslsmtp import ctl
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # as systemd binds [::]
        sock.bind(("::", 0))
        sock.listen(16)
        port = sock.getsockname()[1]
        control = tmp_path / "ctl.sock"
        config, _ = alice_config(tmp_path, f'control_socket = "{control}"\n')
        listening_on(config, "systemd:name=saslsmtp")
        log = tmp_path / "daemon.log"
        proc = start_on(sock, config, log, ["saslsmtp"])
        try:
            wait_for(lambda: "saslsmtp ready" in log.read_text() or proc.poll() is not None,
                     what="the daemon")
            assert _smtplib_login(port, "alice", "wrong", "PLAIN", False, 30)[0] == 535
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                assert s.recv(200).startswith(b"220 ")
                out = io.StringIO()
                assert ctl.main(["--config", str(config), "who", "--json"], stdout=out,
                                stderr=io.StringIO()) == 0
                [seen] = json.loads(out.getvalue())
                assert seen["client"] == "127.0.0.1", seen
            wait_for(lambda: "session end" in log.read_text(), what="the session line")
            text = log.read_text()
            assert 'auth failed: client=127.0.0.1 mechanism=PLAIN user="alice"' in text, text
            assert "session end client=127.0.0.1 " in text and "::ffff" not in text, text
        finally:
            kill_leftovers(proc, log)
