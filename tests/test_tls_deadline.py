"""A TLS handshake that never finishes is dropped after ``tls_handshake_timeout``, even
with a long ``idle_timeout``: a bare connect to an ``ssl:`` listener, STARTTLS followed by
silence, and half a ClientHello (real listeners on loopback).  A dropped one holds
nothing: its ``connections_per_ip`` slot serves the next client."""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor, threads

from saslsmtp.service import SubmissionFactory, listener, load, wire
from tests.support import write_config
from tests.tlsutil import issue_cert, make_ca

DEADLINE = 1.0
SLACK = 3.0  # the test's allowance on a loaded machine; idle_timeout is far longer


async def _listen(tmp_path: Path, listen: str, extra: str = ""):
    ca = make_ca(tmp_path)
    cert = issue_cert(ca, tmp_path, names=["localhost", "127.0.0.1"])
    (tmp_path / "users").write_text("alice:{PLAIN}secret\n")
    path = write_config(tmp_path, f'[backends.users]\ntype = "file"\npath = "{tmp_path / "users"}"\n',
                        listen=[listen], tls=(cert.chain_path, cert.key_path), extra=extra)
    path.write_text(path.read_text().replace(
        "[server]\n", f"[server]\nidle_timeout = 120.0\ntls_handshake_timeout = {DEADLINE}\n", 1))
    config = load(str(path))
    wiring = wire(config, reactor)
    factory = SubmissionFactory(wiring, reactor)
    endpoint, wrapped = listener(listen, config, reactor, factory, wiring.tls_context)
    port = await endpoint.listen(wrapped)
    return port, factory


def _seconds_until_closed(port: int, before_silence: list[bytes], expect: bytes = b"") -> float:
    """Connect, send ``before_silence`` (waiting for ``expect`` after the last one), then
    say nothing: seconds until the server closes (or 60 if it does not)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        got = b""
        for chunk in before_silence:
            s.sendall(chunk)
        while expect and not got.endswith(expect):
            got += s.recv(4096)
        start = time.monotonic()
        try:
            while s.recv(4096):
                pass
        except (ConnectionResetError, socket.timeout):
            pass
        return time.monotonic() - start


def _half_client_hello() -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_side=False)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = outgoing.read()
    return hello[:len(hello) // 2]


async def _closed_after(tmp_path: Path, listen: str, chunks: list[bytes], expect: bytes = b"") -> float:
    port, factory = await _listen(tmp_path, listen)
    try:
        return await threads.deferToThread(_seconds_until_closed, port.getHost().port, chunks, expect)
    finally:
        for p in list(factory.connections):
            p.transport.abortConnection()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_bare_connect_to_ssl_listener(tmp_path: Path) -> None:
    """A client that connects to an ssl: listener and sends nothing."""
    assert await _closed_after(tmp_path, "ssl:0:interface=127.0.0.1", []) < DEADLINE + SLACK


@pytest.mark.alone
@pytest_twisted.ensureDeferred
async def test_half_a_client_hello(tmp_path: Path) -> None:
    """A client that stops in the middle of its ClientHello."""
    elapsed = await _closed_after(tmp_path, "ssl:0:interface=127.0.0.1", [_half_client_hello()])
    assert elapsed < DEADLINE + SLACK


@pytest.mark.alone
@pytest_twisted.ensureDeferred
async def test_starttls_then_silence(tmp_path: Path) -> None:
    """A client that says STARTTLS, gets 220 and never starts the handshake."""
    elapsed = await _closed_after(tmp_path, "tcp:0:interface=127.0.0.1",
                                  [b"EHLO client.example\r\n", b"STARTTLS\r\n"],
                                  expect=b"220 2.0.0 Ready to start TLS\r\n")
    assert elapsed < DEADLINE + SLACK


def _greeting_over_tls(port: int) -> bytes:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10)) as s:
        return s.recv(4096)


def _slot_held_then_freed(port: int) -> tuple[bytes, float, bytes]:
    """A silent connection holds the slot: a TLS client meanwhile gets its greeting; the
    silent one is dropped (seconds); a TLS client after that gets its greeting."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as silent:
        meanwhile = _greeting_over_tls(port)
        start = time.monotonic()
        try:
            while silent.recv(4096):
                pass
        except (ConnectionResetError, socket.timeout):
            pass
        elapsed = time.monotonic() - start
    return meanwhile, elapsed, _greeting_over_tls(port)


@pytest.mark.alone
@pytest_twisted.ensureDeferred
async def test_a_dropped_handshake_frees_its_connection_slot(tmp_path: Path) -> None:
    """``connections_per_ip = 1``: a client that never starts its handshake holds the one
    slot of 127.0.0.1 (another client is refused meanwhile) until the deadline drops it;
    then nothing of it is left and the next client is greeted."""
    port, factory = await _listen(tmp_path, "ssl:0:interface=127.0.0.1",
                                  extra="[limits]\nconnections_per_ip = 1\n")
    try:
        meanwhile, elapsed, after = await threads.deferToThread(
            _slot_held_then_freed, port.getHost().port)
    finally:
        for p in list(factory.connections):
            p.transport.abortConnection()
        await port.stopListening()
    assert meanwhile.startswith(b"421 4.7.0 Too many connections from 127.0.0.1"), meanwhile
    assert elapsed < DEADLINE + SLACK
    assert after.startswith(b"220 "), after
