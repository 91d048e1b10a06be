"""``saslsmtp-ctl who`` and ``kick`` against a real ``twistd -n saslsmtp`` with two workers
and real smtplib clients holding sessions open on both (which worker accepts is made
certain with SIGSTOP: a stopped worker cannot accept, so the other one must); the
deprecated ``[auth.cache] control_socket`` key; and the reply a kicked client reads."""

from __future__ import annotations

import json
import os
import signal
import smtplib
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.support import (ROOT, alice_config, free_port, twistd_command, worker_pids,
                           workers_daemon, write_config)

PASSWORDS = {"alice": "wonderland", "bob": "tanstaaftanstaaf"}
KICKED = (421, b"4.7.0 Session closed by the administrator, closing connection")


def run_ctl(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``saslsmtp-ctl --config CONFIG ARGS`` in its own process, as an operator runs it."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "saslsmtp.ctl", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=30, env=env)


def who(config: Path) -> list[dict[str, Any]]:
    out = run_ctl(config, "who", "--json")
    assert out.returncode == 0 and out.stderr == "", out
    listed: list[dict[str, Any]] = json.loads(out.stdout)
    return listed


class Steer:
    """Opens smtplib sessions on the worker of one's choice: the other is stopped while
    the connection is accepted (the greeting proves which process took it)."""

    def __init__(self, port: int, pids: dict[int, int]) -> None:
        self.port = port
        self.pids = pids
        self.opened: list[smtplib.SMTP] = []

    def open(self, slot: int, user: str | None) -> smtplib.SMTP:
        other = self.pids[1 - slot]
        os.kill(other, signal.SIGSTOP)
        try:
            client = smtplib.SMTP("127.0.0.1", self.port, timeout=10)  # reads the greeting
        finally:
            os.kill(other, signal.SIGCONT)
        self.opened.append(client)
        client.ehlo("client.example")
        if user is not None:
            client.login(user, PASSWORDS[user])
        return client

    def close(self) -> None:
        for client in self.opened:
            try:
                client.close()
            except OSError:
                pass


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[tuple[Path, int, dict[int, int], Path]]:
    """A daemon with two workers, a users file (alice, bob), the auth cache and
    ``[server] control_socket``: (config, port, slot -> pid, control socket)."""
    (tmp_path / "users").write_text("".join(f"{u}:{{PLAIN}}{p}\n" for u, p in PASSWORDS.items()))
    port = free_port()
    control = tmp_path / "control.sock"
    config = write_config(tmp_path, f'[backends.users]\ntype = "file"\npath = "{tmp_path / "users"}"\n',
                          mechanisms=["PLAIN"], listen=[f"tcp:{port}:interface=127.0.0.1"],
                          extra="[auth.cache]\nttl = 300\n")
    config.write_text(config.read_text().replace(
        "[server]\n", f'[server]\ncontrol_socket = "{control}"\n', 1))
    log = tmp_path / "daemon.log"
    with workers_daemon(config, log, 2, "--workers", "2") as proc:
        yield config, port, worker_pids(log), control
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()


def maildir(tmp_path: Path, sub: str) -> list[bytes]:
    folder = tmp_path / "mail" / sub
    return [p.read_bytes() for p in sorted(folder.iterdir())] if folder.is_dir() else []


def test_who_and_kick_across_two_workers(tmp_path: Path,
                                         two_workers: tuple[Path, int, dict[int, int], Path]) -> None:
    """Sessions on both workers: ``who`` lists each with its worker's pid, user,
    mechanism and listener; ``kick alice`` closes exactly alice's three sessions (one in
    the middle of DATA, whose message is not delivered) with the 421 and leaves bob's
    and the anonymous one serving; ``kick --client`` closes the rest."""
    config, port, pids, control = two_workers
    steer = Steer(port, pids)
    try:
        alice0, bob0, anonymous = steer.open(0, "alice"), steer.open(0, "bob"), steer.open(0, None)
        alice1, bob1, sending = steer.open(1, "alice"), steer.open(1, "bob"), steer.open(1, "alice")
        sending.mail("alice@example.test")
        sending.rcpt("someone@example.test")
        sending.putcmd("data")
        assert sending.getreply()[0] == 354
        sending.send(b"Subject: stolen\r\n\r\nfirst half\r\n")

        listed = who(config)
        by_worker = {pid: sorted((s["user"] or "-", s["mechanism"] or "-") for s in listed
                                 if s["pid"] == pid) for pid in pids.values()}
        assert by_worker == {
            pids[0]: [("-", "-"), ("alice", "PLAIN"), ("bob", "PLAIN")],
            pids[1]: [("alice", "PLAIN"), ("alice", "PLAIN"), ("bob", "PLAIN")]}
        assert {(s["client"], s["listener"], s["tls"], s["messages"]) for s in listed} == {
            ("127.0.0.1", f"tcp:{port}:interface=127.0.0.1", None, 0)}
        ports = {client.sock.getsockname()[1] for client in steer.opened}
        assert {s["port"] for s in listed} == ports
        now = time.time()
        assert all(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 120)) <= s["since"]
                   <= time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + 1)) for s in listed)
        table = run_ctl(config, "who", "--user", "BOB")
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        assert lines[0].split() == ["PID", "CLIENT", "LISTENER", "USER", "MECHANISM", "TLS",
                                    "SINCE", "MESSAGES"]
        assert sorted(line.split()[0] for line in lines[1:]) == sorted(str(p) for p in pids.values())
        assert all(line.split()[3] == "bob" for line in lines[1:])
        for password in PASSWORDS.values():
            assert password not in table.stdout and password not in json.dumps(listed)

        kicked = run_ctl(config, "kick", "alice")
        assert kicked.returncode == 0, kicked.stderr
        assert kicked.stdout == ("kicked user alice: 3 sessions closed in 2 processes;"
                                 " auth cache: 2 entries dropped\n")
        for client in (alice0, alice1, sending):
            assert client.getreply() == KICKED
            with pytest.raises(smtplib.SMTPServerDisconnected):
                client.getreply()  # closed: nothing more comes
        try:
            sending.send(b"second half\r\n.\r\n")  # too late: the connection is gone
        except (OSError, smtplib.SMTPServerDisconnected):
            pass
        assert maildir(tmp_path, "new") == [] and maildir(tmp_path, "tmp") == []

        assert bob0.noop()[0] == 250 and anonymous.noop()[0] == 250
        assert bob1.sendmail("bob@example.test", ["someone@example.test"],
                             b"Subject: fine\r\n\r\nfrom bob\r\n") == {}
        assert [m.count(b"from bob") for m in maildir(tmp_path, "new")] == [1]
        assert sorted((s["user"] or "-", s["messages"]) for s in who(config)) == [
            ("-", 0), ("bob", 0), ("bob", 1)]

        # a kick is no ban: alice may log in again (the password is checked anew)
        again = steer.open(1, "alice")
        assert again.noop()[0] == 250

        rest = run_ctl(config, "kick", "--client", "127.0.0.0/8")
        assert rest.returncode == 0, rest.stderr
        assert rest.stdout == "kicked client 127.0.0.0/8: 4 sessions closed in 2 processes\n"
        for client in (bob0, bob1, anonymous, again):
            assert client.getreply() == KICKED
        assert who(config) == []
    finally:
        steer.close()


def test_no_server_running_once_it_stopped(tmp_path: Path) -> None:
    """While the server runs ``who`` answers; once it stopped (SIGTERM: its sockets are
    removed): exit 1 and one line."""
    config, _ = alice_config(tmp_path, f'control_socket = "{tmp_path / "control.sock"}"\n')
    log = tmp_path / "daemon.log"
    with workers_daemon(config, log, 2, "--workers", "2") as proc:
        assert run_ctl(config, "who").stdout == "no open sessions\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
    out = run_ctl(config, "who")
    assert (out.returncode, out.stdout) == (1, "")
    assert out.stderr == (f"saslsmtp-ctl: no saslsmtp server is running (nothing answers on"
                          f" {tmp_path / 'control.sock'})\n")


def test_the_old_auth_cache_key_still_works_with_a_warning(tmp_path: Path) -> None:
    """``[auth.cache] control_socket`` (before ``[server] control_socket``): ``--check``
    passes with one warning naming the new key, and ``who`` reaches the server through
    it; both keys set is a problem."""
    config, port = alice_config(tmp_path)
    old = tmp_path / "cache.sock"
    config.write_text(config.read_text() + f'\n[auth.cache]\nttl = 300\ncontrol_socket = "{old}"\n')
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    check = subprocess.run(twistd_command(config, "--check"), capture_output=True, text=True,
                           timeout=30, cwd=tmp_path, env=env)
    assert check.returncode == 0, check.stderr
    line = config.read_text().splitlines().index(f'control_socket = "{old}"') + 1
    warnings = [w for w in (check.stdout + check.stderr).splitlines() if "control_socket" in w]
    assert warnings == [f"{config}:{line}: auth.cache.control_socket: warning: is deprecated:"
                        " move it to [server] control_socket (the same socket, which also"
                        " serves saslsmtp-ctl who and kick)"]
    log = tmp_path / "daemon.log"
    with workers_daemon(config, log, 1) as proc:
        client = smtplib.SMTP("127.0.0.1", port, timeout=10)
        try:
            client.login("alice", "wonderland")
            listed = who(config)
            assert [(s["user"], s["mechanism"]) for s in listed] == [("alice", "PLAIN")]
            assert run_ctl(config, "kick", "alice").stdout == (
                "kicked user alice: 1 session closed in 1 process; auth cache: 1 entry dropped\n")
            assert client.getreply() == KICKED
        finally:
            client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()

    config.write_text(config.read_text().replace(
        "[server]\n", f'[server]\ncontrol_socket = "{tmp_path / "control.sock"}"\n', 1))
    both = subprocess.run(twistd_command(config, "--check"), capture_output=True, text=True,
                          timeout=30, cwd=tmp_path, env=env)
    assert both.returncode == 1
    assert "auth.cache.control_socket: is replaced by [server] control_socket, which is set" \
           " too: remove this one" in both.stderr


def test_an_unusable_server_control_socket_fails_check(tmp_path: Path) -> None:
    """``[server] control_socket`` in a folder that does not exist: ``--check`` names the
    key, its line and the folder, and exits 1."""
    config, _ = alice_config(tmp_path, 'control_socket = "/nonexistent/dir/control.sock"\n')
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(twistd_command(config, "--check"), capture_output=True, text=True,
                         timeout=30, cwd=tmp_path, env=env)
    assert out.returncode == 1
    assert (f"{config.name}:2: server.control_socket: cannot create"
            " /nonexistent/dir/control.sock: the folder /nonexistent/dir does not exist") \
        in out.stderr
    assert "Traceback" not in out.stderr


def test_who_shows_the_real_client_behind_haproxy(tmp_path: Path) -> None:
    """A ``haproxy:`` listener: ``who`` shows the address and port the PROXY header
    names, and ``kick --client`` matches it, not the proxy's own."""
    import socket
    config, port = alice_config(tmp_path, f'control_socket = "{tmp_path / "control.sock"}"\n')
    config.write_text(config.read_text().replace('listen = ["tcp:', 'listen = ["haproxy:tcp:', 1))
    log = tmp_path / "daemon.log"
    with workers_daemon(config, log, 1) as proc:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"PROXY TCP4 203.0.113.7 192.0.2.1 40112 587\r\n")
            assert s.recv(100).startswith(b"220")
            listed = who(config)
            assert [(i["client"], i["port"], i["listener"]) for i in listed] == [
                ("203.0.113.7", 40112, f"haproxy:tcp:{port}:interface=127.0.0.1")]
            assert run_ctl(config, "kick", "--client", "127.0.0.1").stdout == (
                "kicked client 127.0.0.1: 0 sessions closed in 1 process\n")
            assert run_ctl(config, "kick", "--client", "203.0.113.0/24").stdout == (
                "kicked client 203.0.113.0/24: 1 session closed in 1 process\n")
            assert s.recv(200) == b"421 4.7.0 Session closed by the administrator, closing connection\r\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()


def test_who_shows_the_tls_version(tmp_path: Path) -> None:
    """A session after STARTTLS shows its protocol version; a plaintext one shows none."""
    import ssl
    from tests.test_reload import write_cert
    certificate, key = write_cert(tmp_path, 1)
    (tmp_path / "users").write_text("alice:{PLAIN}wonderland\n")
    port = free_port()
    config = write_config(tmp_path, f'[backends.users]\ntype = "file"\npath = "{tmp_path / "users"}"\n',
                          mechanisms=["PLAIN"], listen=[f"tcp:{port}:interface=127.0.0.1"],
                          tls=(str(certificate), str(key)))
    config.write_text(config.read_text().replace(
        "[server]\n", f'[server]\ncontrol_socket = "{tmp_path / "control.sock"}"\n', 1))
    log = tmp_path / "daemon.log"
    context = ssl.create_default_context(cafile=str(certificate))
    context.check_hostname = False
    with workers_daemon(config, log, 1) as proc:
        secure, plain = smtplib.SMTP("127.0.0.1", port, timeout=10), smtplib.SMTP("127.0.0.1", port, timeout=10)
        try:
            secure.starttls(context=context)
            secure.login("alice", "wonderland")
            plain.ehlo()
            listed = sorted((s["tls"] or "-", s["user"] or "-") for s in who(config))
            assert listed == [("-", "-"), (secure.sock.version(), "alice")]
        finally:
            secure.close()
            plain.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
