"""STARTTLS edge cases with real clients and real sockets, and what the operator reads:

* AUTH in plaintext (``require_tls = false``), then STARTTLS: the login is forgotten
  (RFC 3207 4.2) and ``max_unauthenticated_time`` applies again, from the STARTTLS;
  before, the bound stayed cancelled and the session ran until ``idle_timeout``;
* a client that only speaks TLS 1.0 or 1.1 (``openssl s_client -tls1``, swaks
  ``--tls-protocol tlsv1``): the handshake fails with a protocol-version alert and one
  info line ``TLS handshake with IP failed: unsupported protocol``;
* a client whose handshake stops halfway (half a ClientHello after STARTTLS): dropped
  after ``tls_handshake_timeout`` and logged once, never as a failure too.

STARTTLS twice (503) and plaintext pipelined behind STARTTLS are in
``tests/test_tls_starttls.py``.
"""

from __future__ import annotations

import base64
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, threads

from saslsmtp.service import SubmissionFactory, listener, load, wire
from tests.conftest import require_binary
from tests.support import reactor_seconds, write_config
from tests.test_tls_context import LineClient, client_context
from tests.test_tls_deadline import _half_client_hello
from tests.test_tls_failures import LogWatch
from tests.tlsutil import issue_cert, make_ca

GOOD = b"AUTH PLAIN " + base64.b64encode(b"\0alice\0wonderland")
BOUND = 1.0  # max_unauthenticated_time and tls_handshake_timeout in these tests
SLACK = 3.0  # the test's allowance on a loaded machine; idle_timeout is far longer


class Listening:
    """A server listening on loopback with STARTTLS; ``stop()`` drops what is left."""

    def __init__(self, port: Any, factory: SubmissionFactory) -> None:
        self.port, self.factory = port, factory

    @property
    def number(self) -> int:
        return int(self.port.getHost().port)

    async def stop(self) -> None:
        for p in list(self.factory.connections):
            p.transport.abortConnection()
        await self.port.stopListening()


async def listen(tmp_path: Path) -> Listening:
    cert = issue_cert(make_ca(tmp_path), tmp_path)
    (tmp_path / "users").write_text("alice:{PLAIN}wonderland\n")
    path = write_config(tmp_path, f'[backends.users]\ntype = "file"\npath = "{tmp_path / "users"}"\n',
                        mechanisms=["PLAIN"], tls=(cert.chain_path, cert.key_path))
    path.write_text(path.read_text().replace(
        "[server]\n", f"[server]\nidle_timeout = 120.0\nmax_unauthenticated_time = {BOUND}\n"
                      f"tls_handshake_timeout = {BOUND}\n", 1))
    config = load(str(path))
    wiring = wire(config, reactor)
    factory = SubmissionFactory(wiring, reactor)
    endpoint, wrapped = listener(config.server.listen[0], config, reactor, factory, wiring.tls_context)
    return Listening(await endpoint.listen(wrapped), factory)


def auth_then_starttls(port: int) -> tuple[list[bytes], float]:
    """AUTH PLAIN in plaintext, STARTTLS, EHLO, MAIL, then silence: the replies (the
    last one unasked for) and the seconds from the STARTTLS until the server closed."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=60)
    try:
        client = LineClient(raw)
        replies = [client.reply(), client.command(b"EHLO client.example"), client.command(GOOD)]
        started = reactor_seconds()
        replies.append(client.command(b"STARTTLS"))
        client.sock = client_context().wrap_socket(raw)
        replies += [client.command(b"EHLO client.example").split(b"\r\n")[-1],
                    client.command(b"MAIL FROM:<alice@example.test>"), client.reply()]
        while client.sock.recv(4096):
            pass
        return replies, reactor_seconds() - started
    finally:
        raw.close()


@pytest_twisted.ensureDeferred
async def test_starttls_after_auth_makes_the_session_unauthenticated_again(tmp_path: Path) -> None:
    """The login made before TLS is forgotten (MAIL: 530), and the unauthenticated
    session is bounded again: 421 after ``max_unauthenticated_time``, not ``idle_timeout``."""
    server = await listen(tmp_path)
    try:
        replies, seconds = await threads.deferToThread(auth_then_starttls, server.number)
    finally:
        await server.stop()
    assert replies[2:] == [b"235 2.7.0 Authentication successful", b"220 2.0.0 Ready to start TLS",
                           b"250 AUTH PLAIN", b"530 5.7.0 Authentication required",
                           b"421 4.4.2 Session time limit exceeded, closing connection"], replies
    assert BOUND <= seconds < BOUND + SLACK, seconds


@pytest.mark.parametrize("client", ["openssl-tls1", "openssl-tls1_1", "swaks-tlsv1"])
@pytest_twisted.ensureDeferred
async def test_a_tls10_client_is_refused_and_logged_once(tmp_path: Path, client: str) -> None:
    """TLS 1.0 and 1.1 are off: the client gets OpenSSL's protocol-version alert, and the
    log has one info line saying so (no traceback, nothing louder)."""
    if client.startswith("openssl"):
        argv = [require_binary("openssl"), "s_client", "-starttls", "smtp",
                "-" + client.split("-")[1], "-connect"]
    else:
        argv = [require_binary("swaks"), "-tls", "--tls-protocol", "tlsv1",
                "--quit-after", "TLS", "--server"]
    server = await listen(tmp_path)
    try:
        with LogWatch() as watch:
            done = await threads.deferToThread(subprocess.run, argv + [f"127.0.0.1:{server.number}"],
                                               input=b"", capture_output=True, timeout=30)
            await watch.wait_for("session end")
    finally:
        await server.stop()
    said = (done.stdout + done.stderr).decode(errors="replace")
    assert done.returncode != 0 and "alert protocol version" in said, said
    assert watch.lines("TLS handshake") == ["TLS handshake with 127.0.0.1 failed: unsupported protocol"]
    watch.assert_calm()


def starttls_then_half_a_hello(port: int) -> float:
    """STARTTLS, half a ClientHello, silence: seconds from the STARTTLS until the server
    closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as raw:
        client = LineClient(raw)
        client.reply()
        client.command(b"EHLO client.example")
        started = reactor_seconds()  # the deadline starts when the server takes the STARTTLS
        assert client.command(b"STARTTLS") == b"220 2.0.0 Ready to start TLS"
        raw.sendall(_half_client_hello())
        try:
            while raw.recv(4096):
                pass
        except ConnectionResetError:
            pass
        return reactor_seconds() - started


@pytest_twisted.ensureDeferred
async def test_a_handshake_stalled_halfway_is_dropped_and_logged_once(tmp_path: Path) -> None:
    """Half a ClientHello after STARTTLS: closed after ``tls_handshake_timeout``; one line
    says so, and the close is not reported again as a failed handshake."""
    server = await listen(tmp_path)
    try:
        with LogWatch() as watch:
            seconds = await threads.deferToThread(starttls_then_half_a_hello, server.number)
            await watch.wait_for("session end")
    finally:
        await server.stop()
    assert BOUND <= seconds < BOUND + SLACK, seconds
    assert watch.lines("TLS handshake") == [
        f"TLS handshake with 127.0.0.1 not finished after {BOUND} s; closing"]
    watch.assert_calm()
