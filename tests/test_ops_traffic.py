"""The protocol reports its events: a real ``twistd -n saslsmtp`` (one process, and a
master with two workers) gets known traffic, then ``/metrics`` is scraped and parsed with
prometheus_client's parser and every counter is checked, and the log has one
``session end`` line per session."""

from __future__ import annotations

import base64
import re
import signal
import socket
import ssl
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import free_port, wait_for, workers_daemon, write_config
from tests.test_reload import write_cert
from tests.test_workers import Session

SCRIPT = '''
from saslsmtp.script import Accept, Defer, Reject, Verdict

async def auth(arguments, context):
    user = arguments["username"]
    if user == "temp":
        return Defer("try later")
    if user == "boom":
        raise RuntimeError("a script bug")
    verdict = await arguments["backends"].verify("users", user, arguments["password"])
    if verdict is Verdict.ACCEPT:
        return Accept()
    return Defer() if verdict is Verdict.TEMPORARY else Reject()
'''

MESSAGE = b"Subject: counted\r\n\r\nhello\r\n"  # 3 lines, 29 octets with their CRLFs


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def plain(user: str, password: str) -> bytes:
    return b"AUTH PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode())


def client_tls() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def send_message(session: Session) -> bytes:
    assert session.send(b"MAIL FROM:<alice@example.test>").startswith(b"250 ")
    assert session.send(b"RCPT TO:<bob@example.test>").startswith(b"250 ")
    assert session.send(b"DATA").startswith(b"354 ")
    session.sock.sendall(MESSAGE)
    return session.send(b".")


def traffic(port: int, tls_port: int, mail: Path) -> None:
    """Logins ok / bad / temp / script error / aborted, one message stored and one that
    cannot be, a STARTTLS that completes and one that never does, one session on the
    implicit-TLS listener."""
    ok = Session(port)
    assert ok.send(b"EHLO client.example").startswith(b"250")
    assert ok.send(plain("alice", "wonderland")).startswith(b"235 ")
    assert send_message(ok).startswith(b"250 ")
    (mail / "tmp").rename(mail / "tmp.away")
    (mail / "tmp").write_text("not a folder: the next delivery fails")
    assert send_message(ok).startswith(b"451 ")
    (mail / "tmp").unlink()
    (mail / "tmp.away").rename(mail / "tmp")
    assert ok.send(b"QUIT").startswith(b"221 ")
    ok.close()

    other = Session(port)
    other.send(b"EHLO client.example")
    assert other.send(plain("alice", "wrong")).startswith(b"535 ")
    assert other.send(plain("temp", "x")).startswith(b"454 ")
    assert other.send(plain("boom", "x")).startswith(b"454 ")
    assert other.send(b"AUTH PLAIN").startswith(b"334")
    assert other.send(b"*").startswith(b"501 ")
    assert other.send(b"QUIT").startswith(b"221 ")
    other.close()

    secure = Session(port)
    secure.send(b"EHLO client.example")
    assert secure.send(b"STARTTLS").startswith(b"220 ")
    secure.sock = client_tls().wrap_socket(secure.sock, server_hostname="mx.example.test")
    assert secure.send(b"EHLO client.example").startswith(b"250")
    assert secure.send(b"QUIT").startswith(b"221 ")
    secure.close()

    broken = Session(port)
    broken.send(b"EHLO client.example")
    assert broken.send(b"STARTTLS").startswith(b"220 ")
    broken.sock.sendall(b"this is not a TLS ClientHello\r\n" * 4)
    try:
        broken.sock.recv(100)
    except OSError:
        pass
    broken.close()

    raw = socket.create_connection(("127.0.0.1", tls_port), timeout=10)
    implicit = client_tls().wrap_socket(raw, server_hostname="mx.example.test")
    assert implicit.recv(100).startswith(b"220 ")
    implicit.sendall(b"QUIT\r\n")
    assert implicit.recv(100).startswith(b"221 ")
    implicit.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_metrics_count_known_traffic(tmp_path: Path, workers: int) -> None:
    """After the known traffic every counter has its value, summed over the workers;
    no label names a user or an address; each session wrote one end line."""
    (tmp_path / "users").write_text("alice:{PLAIN}wonderland\n")
    (tmp_path / "auth.py").write_text(SCRIPT)
    cert, key = write_cert(tmp_path, 7)
    port, tls_port, metrics_port = free_port(), free_port(), free_port()
    listener, tls_listener = f"tcp:{port}:interface=127.0.0.1", f"ssl:{tls_port}:interface=127.0.0.1"
    config = write_config(
        tmp_path, f'[backends.users]\ntype = "file"\npath = "{tmp_path / "users"}"\n',
        mechanisms=["PLAIN"], listen=[listener, tls_listener], script="auth.py", tls=(str(cert), str(key)),
        extra=f'[metrics]\nlisten = "tcp:{metrics_port}:interface=127.0.0.1"\n')
    log = tmp_path / "daemon.log"
    with workers_daemon(config, log, workers, "--workers", str(workers)) as proc:
        traffic(port, tls_port, tmp_path / "mail")

        def settled() -> dict | None:
            s = scrape(metrics_port)
            return s if s.get(("saslsmtp_sessions", (("listener", listener),))) == 0 and s.get(
                ("saslsmtp_sessions", (("listener", tls_listener),))) == 0 and s.get(
                ("saslsmtp_tls_handshake_failures_total", ())) == 1 else None
        s = wait_for(settled, what="every session closed and counted")
        expected = {
            ("saslsmtp_connections_total", (("listener", listener),)): 4,
            ("saslsmtp_connections_total", (("listener", tls_listener),)): 1,
            ("saslsmtp_auth_total", (("mechanism", "PLAIN"), ("result", "success"))): 1,
            ("saslsmtp_auth_total", (("mechanism", "PLAIN"), ("result", "failure"))): 1,
            ("saslsmtp_auth_total", (("mechanism", "PLAIN"), ("result", "tempfail"))): 2,
            ("saslsmtp_auth_total", (("mechanism", "PLAIN"), ("result", "aborted"))): 1,
            ("saslsmtp_backend_requests_total", (("backend", "users"), ("result", "accept"))): 1,
            ("saslsmtp_backend_requests_total", (("backend", "users"), ("result", "reject"))): 1,
            ("saslsmtp_auth_duration_seconds_count", (("backend", "users"),)): 2,
            ("saslsmtp_script_errors_total", ()): 1,
            ("saslsmtp_tls_handshakes_total", ()): 2,
            ("saslsmtp_tls_handshake_failures_total", ()): 1,
            ("saslsmtp_messages_total", ()): 1,
            ("saslsmtp_message_bytes_total", ()): len(MESSAGE),
            ("saslsmtp_delivery_failures_total", ()): 1,
            ("saslsmtp_auth_cache_hits_total", ()): 0,
            ("saslsmtp_auth_cache_misses_total", ()): 0,
            ("saslsmtp_redis_unavailable_total", ()): 0,
            ("saslsmtp_sessions", (("listener", listener),)): 0,
            ("saslsmtp_sessions", (("listener", tls_listener),)): 0,
        }
        assert {key: s.get(key) for key in expected} == expected
        assert not any(name == "saslsmtp_limit_rejections_total" for name, _ in s)  # none yet
        label_values = {value for _, labels in s for _, value in labels}
        assert not label_values & {"alice", "temp", "boom", "127.0.0.1"}

        text = log.read_text()
        ends = re.findall(r"session end client=(\S+) user=(\S+) mechanism=(\S+) tls=(\S+)"
                          r" messages=(\d+) bytes=(\d+) duration=[\d.]+s", text)
        assert sorted(ends) == sorted([
            ("127.0.0.1", "alice", "PLAIN", "none", "1", str(len(MESSAGE))),
            ("127.0.0.1", "-", "-", "none", "0", "0"),
            ("127.0.0.1", "-", "-", "TLSv1.3", "0", "0"),
            ("127.0.0.1", "-", "-", "none", "0", "0"),
            ("127.0.0.1", "-", "-", "TLSv1.3", "0", "0"),
        ]), text
        assert "AUTH PLAIN tempfail ip=127.0.0.1" in text
        assert "AUTH PLAIN aborted ip=127.0.0.1" in text
        assert "wonderland" not in text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
