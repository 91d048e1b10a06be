"""STARTTLS command injection (CVE-2011-0411 and its kin) over a real socket and a real
TLS handshake: what a client pipelines behind STARTTLS in plaintext never runs after the
handshake, whether STARTTLS is answered at once or waits behind a pending AUTH; the
session starts over (EHLO again, no login); STARTTLS inside TLS is 503.

``tests/test_smtp.py`` has the same over a string transport; here the bytes cross
loopback in one segment and Python's ``ssl`` does the handshake.
"""

from __future__ import annotations

import base64
import socket
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import threads
from twisted.logger import formatEvent, globalLogPublisher

from tests.support import RunningServer, start_server
from tests.test_tls_context import LineClient, client_context
from tests.tlsutil import issue_cert, make_ca

GOOD = b"AUTH PLAIN " + base64.b64encode(b"\0alice\0wonderland")
BAD = b"AUTH PLAIN " + base64.b64encode(b"\0alice\0not-the-password")


async def server(tmp_path: Path, listen: str = "tcp:0:interface=127.0.0.1", **options: Any) -> RunningServer:
    cert = issue_cert(make_ca(tmp_path), tmp_path)
    (tmp_path / "users").write_text("alice:{PLAIN}wonderland\n")
    return await start_server(tmp_path, f'[backends.users]\ntype = "file"\npath = "{tmp_path / "users"}"\n',
                              listen=[listen], tls=(cert.chain_path, cert.key_path),
                              mechanisms=["PLAIN"], **options)


def injected(port: int, plaintext: bytes, replies_before_tls: int) -> dict[str, Any]:
    """Send ``plaintext`` (holding STARTTLS and what follows it) in one segment, read
    ``replies_before_tls`` replies, shake hands, then talk in TLS.  What the client saw."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        client = LineClient(raw)
        assert client.reply().startswith(b"220 ")
        raw.sendall(plaintext)
        before = [client.reply() for _ in range(replies_before_tls)]
        leftover = client.buffer  # nothing may follow the 220 in plaintext
        client.sock = client_context().wrap_socket(raw)
        client.buffer = b""
        seen = {"before": before, "leftover": leftover,
                "mail_first": client.command(b"MAIL FROM:<alice@example.test>"),
                "ehlo": client.command(b"EHLO client.example"),
                "mail": client.command(b"MAIL FROM:<alice@example.test>"),
                "starttls": client.command(b"STARTTLS"),
                "auth": client.command(GOOD)}
        assert client.command(b"QUIT").startswith(b"221 ")
        return seen
    finally:
        raw.close()


def auth_lines(events: list[dict]) -> list[str]:
    return [text for text in map(formatEvent, events) if text.startswith("auth ")]


@pytest.mark.parametrize("plaintext, replies, auth_before", [
    # STARTTLS answered at once; a login, a transaction and a second STARTTLS behind it
    (b"EHLO client.example\r\nSTARTTLS\r\n" + GOOD + b"\r\nMAIL FROM:<a@example.test>\r\n"
     b"RCPT TO:<b@example.test>\r\nSTARTTLS\r\n", 2, []),
    # STARTTLS queued behind an AUTH that is answered later (failure_delay): still the
    # end of the plaintext, the good AUTH behind it never runs
    (b"EHLO client.example\r\n" + BAD + b"\r\nSTARTTLS\r\n" + GOOD + b"\r\nNOOP\r\n", 3,
     ['auth failed: client=127.0.0.1 mechanism=PLAIN user="alice" reason="invalid credentials"']),
    # a partial line after STARTTLS, finished in TLS, is no command either
    (b"EHLO client.example\r\nSTARTTLS\r\n" + GOOD[:9], 2, []),
], ids=["answered-at-once", "behind-a-pending-auth", "partial-line"])
@pytest_twisted.ensureDeferred
async def test_plaintext_behind_starttls_never_runs(tmp_path: Path, plaintext: bytes, replies: int,
                                                   auth_before: list[str]) -> None:
    """After the handshake the first reply is to the first TLS command (EHLO first, and
    no login from the plaintext AUTH); the client's own AUTH then works once."""
    running = await server(tmp_path, require_tls=False, failure_delay=0.3)
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        seen = await threads.deferToThread(injected, running.port, plaintext, replies)
    finally:
        globalLogPublisher.removeObserver(events.append)
        await running.stop()
    assert seen["before"][-1] == b"220 2.0.0 Ready to start TLS"
    if auth_before:
        assert seen["before"][1] == b"535 5.7.8 Authentication credentials invalid"
    assert seen["leftover"] == b""
    assert seen["mail_first"] == b"503 5.5.1 Send EHLO/HELO first"
    assert seen["ehlo"].startswith(b"250-") and b"STARTTLS" not in seen["ehlo"]
    assert seen["mail"] == b"530 5.7.0 Authentication required"  # the plaintext AUTH did not run
    assert seen["starttls"] == b"503 5.5.1 TLS already active"
    assert seen["auth"] == b"235 2.7.0 Authentication successful"
    assert auth_lines(events) == auth_before + [
        'auth succeeded: client=127.0.0.1 mechanism=PLAIN user="alice"']


def implicit_starttls(port: int) -> bytes:
    context = client_context()
    with context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10)) as sock:
        client = LineClient(sock)
        assert client.reply().startswith(b"220 ")
        ehlo = client.command(b"EHLO client.example")
        assert b"STARTTLS" not in ehlo
        return client.command(b"STARTTLS")


@pytest_twisted.ensureDeferred
async def test_starttls_on_an_ssl_listener_is_503(tmp_path: Path) -> None:
    """Implicit TLS: STARTTLS is not announced and is answered 503."""
    running = await server(tmp_path, listen="ssl:0:interface=127.0.0.1", require_tls=True)
    try:
        assert await threads.deferToThread(implicit_starttls, running.port) == (
            b"503 5.5.1 TLS already active")
    finally:
        await running.stop()

