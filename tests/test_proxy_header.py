"""A ``haproxy:`` listener logs a connection that comes without a PROXY header (one line,
with the peer's address) instead of closing it silently; real listener on loopback."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.logger import globalLogPublisher

from saslsmtp.service import SubmissionFactory, listener, load, wire
from tests.support import write_config


@pytest.fixture
def logged():
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def _talk(port: int, first: bytes) -> bytes:
    """Connect, read the greeting, send ``first``, read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        got = b""
        if not first.startswith(b"PROXY"):
            got = s.recv(4096)
        s.sendall(first)
        try:
            while data := s.recv(4096):
                got += data
                if first.startswith(b"PROXY") and got.endswith(b"\r\n") and b"250 " in got:
                    s.sendall(b"QUIT\r\n")
        except ConnectionResetError:
            pass
        return got


async def _serve(tmp_path: Path, first: bytes) -> bytes:
    (tmp_path / "users").write_text("alice:{PLAIN}secret\n")
    listen = "haproxy:tcp:0:interface=127.0.0.1"
    path = write_config(tmp_path, f'[backends.users]\ntype = "file"\npath = "{tmp_path / "users"}"\n',
                        listen=[listen])
    config = load(str(path))
    wiring = wire(config, reactor)
    factory = SubmissionFactory(wiring, reactor)
    endpoint, wrapped = listener(listen, config, reactor, factory, None)
    port = await endpoint.listen(wrapped)
    try:
        return await threads.deferToThread(_talk, port.getHost().port, first)
    finally:
        await port.stopListening()


def _proxy_lines(events: list[dict]) -> list[str]:
    from twisted.logger import formatEvent
    return [formatEvent(e) for e in events if "PROXY protocol header" in formatEvent(e)]


@pytest_twisted.ensureDeferred
async def test_connection_without_proxy_header_is_logged(tmp_path: Path, logged: list[dict]) -> None:
    """EHLO straight to a haproxy: listener: closed, and one log line names the peer."""
    got = await _serve(tmp_path, b"EHLO client.example\r\n")
    assert got.startswith(b"220 ") and b"250" not in got
    lines = _proxy_lines(logged)
    assert len(lines) == 1 and "127.0.0.1:" in lines[0], lines


@pytest_twisted.ensureDeferred
async def test_connection_with_proxy_header_is_served_quietly(tmp_path: Path, logged: list[dict]) -> None:
    """A valid PROXY v1 header: the session runs and nothing is logged about the header."""
    got = await _serve(tmp_path, b"PROXY TCP4 198.51.100.7 192.0.2.1 40000 25\r\nEHLO c.example\r\n")
    assert got.startswith(b"220 ") and b"250-" in got
    assert _proxy_lines(logged) == []


def _proxied_starttls_then_pause(port: int, pause: float) -> bytes:
    """PROXY header, EHLO, STARTTLS, handshake, then ``pause`` seconds of silence, EHLO."""
    import ssl
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(b"PROXY TCP4 198.51.100.7 192.0.2.1 40000 25\r\nEHLO c.example\r\nSTARTTLS\r\n")
        got = b""
        while b"220 2.0.0" not in got:
            got += raw.recv(4096)
        with ctx.wrap_socket(raw) as tls:
            import time
            time.sleep(pause)
            tls.sendall(b"EHLO c.example\r\n")
            return tls.recv(4096)


@pytest_twisted.ensureDeferred
async def test_starttls_behind_proxy_header_finishes_its_handshake(tmp_path: Path) -> None:
    """The wrapper passes the TLS handshake notification on: a client that completed the
    handshake and then thinks for longer than ``tls_handshake_timeout`` is still served."""
    from tests.tlsutil import issue_cert, make_ca
    ca = make_ca(tmp_path)
    cert = issue_cert(ca, tmp_path, names=["localhost", "127.0.0.1"])
    (tmp_path / "users").write_text("alice:{PLAIN}secret\n")
    listen = "haproxy:tcp:0:interface=127.0.0.1"
    path = write_config(tmp_path, f'[backends.users]\ntype = "file"\npath = "{tmp_path / "users"}"\n',
                        listen=[listen], tls=(cert.chain_path, cert.key_path))
    path.write_text(path.read_text().replace("[server]\n", "[server]\ntls_handshake_timeout = 0.5\n", 1))
    config = load(str(path))
    wiring = wire(config, reactor)
    factory = SubmissionFactory(wiring, reactor)
    endpoint, wrapped = listener(listen, config, reactor, factory, wiring.tls_context)
    port = await endpoint.listen(wrapped)
    try:
        got = await threads.deferToThread(_proxied_starttls_then_pause, port.getHost().port, 1.5)
    finally:
        for p in list(factory.connections):
            p.transport.abortConnection()
        await port.stopListening()
    assert got.startswith(b"250-")
