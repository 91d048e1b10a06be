"""The dovecot backend through the whole SMTP path: smtplib against an in-process saslsmtp
whose only backend is a real Dovecot (tests/dovecot.py), over its UNIX socket and TCP.

Replies (the README's wire table): 235 2.7.0 on success, 535 5.7.8 on wrong credentials,
454 4.7.0 while Dovecot is down or hung, 235 again once it is back, without restarting
saslsmtp.  The AUTH script can use the same backend by name.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import AsyncIterator, Iterator

import pytest
import pytest_twisted

from tests.dovecot import (HASHED_USER, PLAIN_USER, DovecotServer, require_dovecot,
                           running_dovecot)
from tests.support import RunningServer, smtp_login, start_server

TIMEOUT = 1.0
MARGIN = 0.6  # on top of TIMEOUT: smtplib in a thread, the EHLO round trip
OK = (235, b"2.7.0 Authentication successful")
INVALID = (535, b"5.7.8 Authentication credentials invalid")
TEMPFAIL = (454, b"4.7.0 Temporary authentication failure")


def backend(server: DovecotServer, transport: str, timeout: float = TIMEOUT) -> str:
    """A ``[backends.dovecot]`` table for the UNIX socket or the TCP listener."""
    socket = server.unix_socket if transport == "unix" else server.tcp
    return (f'[backends.dovecot]\ntype = "dovecot"\nsocket = "{socket}"\n'
            f"timeout = {timeout}\n")


@pytest.fixture(scope="module")
def dovecot() -> Iterator[DovecotServer]:
    """One real Dovecot for the tests that leave it running."""
    yield from running_dovecot()


@pytest.fixture
def own_dovecot() -> Iterator[DovecotServer]:
    """A real Dovecot for one test that stops or pauses it."""
    yield from running_dovecot()


@pytest_twisted.async_yield_fixture(params=["unix", "tcp"])
async def saslsmtp(request: pytest.FixtureRequest, dovecot: DovecotServer,
                   tmp_path: Path) -> AsyncIterator[RunningServer]:
    """saslsmtp whose only backend is the module's Dovecot, once per transport."""
    server = await start_server(tmp_path, backend(dovecot, request.param))
    yield server
    await server.stop()


@pytest_twisted.ensureDeferred
async def test_right_password_235(saslsmtp: RunningServer) -> None:
    """PLAIN and LOGIN with the {PLAIN} user and the SHA512-CRYPT user: 235 2.7.0."""
    assert await smtp_login(saslsmtp.port, *PLAIN_USER, mechanism="PLAIN") == OK
    assert await smtp_login(saslsmtp.port, *PLAIN_USER, mechanism="LOGIN") == OK
    assert await smtp_login(saslsmtp.port, *HASHED_USER, mechanism="PLAIN") == OK


@pytest_twisted.ensureDeferred
async def test_wrong_password_and_unknown_user_535(saslsmtp: RunningServer) -> None:
    """A wrong password and an unknown user both get 535 5.7.8."""
    assert await smtp_login(saslsmtp.port, PLAIN_USER[0], "not it") == INVALID
    assert await smtp_login(saslsmtp.port, "mallory", "whatever") == INVALID


@pytest.mark.parametrize("transport", ["unix", "tcp"])
@pytest_twisted.ensureDeferred
async def test_down_454_then_back_235(own_dovecot: DovecotServer, transport: str,
                                      tmp_path: Path) -> None:
    """Dovecot stopped: 454 4.7.0; started again: 235 from the same saslsmtp."""
    server = await start_server(tmp_path, backend(own_dovecot, transport))
    try:
        assert await smtp_login(server.port, *PLAIN_USER) == OK
        own_dovecot.stop()
        assert await smtp_login(server.port, *PLAIN_USER) == TEMPFAIL
        own_dovecot.start()
        assert await smtp_login(server.port, *PLAIN_USER) == OK
    finally:
        await server.stop()


@pytest.mark.alone
@pytest.mark.parametrize("transport", ["unix", "tcp"])
@pytest_twisted.ensureDeferred
async def test_hung_454_within_timeout(own_dovecot: DovecotServer, transport: str,
                                       tmp_path: Path) -> None:
    """A SIGSTOPped Dovecot: 454 4.7.0 after the backend timeout; 235 once it continues."""
    server = await start_server(tmp_path, backend(own_dovecot, transport))
    try:
        assert await smtp_login(server.port, *PLAIN_USER) == OK
        own_dovecot.pause()
        started = time.monotonic()
        assert await smtp_login(server.port, *PLAIN_USER) == TEMPFAIL
        elapsed = time.monotonic() - started
        assert TIMEOUT * 0.95 <= elapsed < TIMEOUT + MARGIN, elapsed
        own_dovecot.resume()
        assert await smtp_login(server.port, *PLAIN_USER) == OK
    finally:
        own_dovecot.resume()
        await server.stop()


SCRIPT = '''\
from saslsmtp.script import Accept, Defer, Reject, Verdict


async def auth(arguments, context):
    """Only users whose name starts with "a" may try; Dovecot decides."""
    if not arguments["username"].startswith("a"):
        return Reject(reason="not you")
    verdict = await arguments["backends"].verify("dovecot", arguments["username"],
                                                 arguments["password"])
    if verdict == Verdict.ACCEPT:
        return Accept()
    if verdict == Verdict.TEMPORARY:
        return Defer(reason="dovecot unavailable")
    return Reject()
'''


@pytest_twisted.ensureDeferred
async def test_script_uses_the_backend_by_name(dovecot: DovecotServer, tmp_path: Path) -> None:
    """An AUTH script calls the dovecot backend by name and gets accept/reject back."""
    script = tmp_path / "auth.py"
    script.write_text(SCRIPT)
    server = await start_server(tmp_path, backend(dovecot, "unix"), script=str(script))
    try:
        assert await smtp_login(server.port, *PLAIN_USER) == OK
        assert await smtp_login(server.port, PLAIN_USER[0], "not it") == INVALID
        assert await smtp_login(server.port, *HASHED_USER) == (535, b"5.7.8 not you")
    finally:
        await server.stop()


def _send_as(port: int, user: str, password: str) -> None:
    import smtplib
    with smtplib.SMTP("127.0.0.1", port, timeout=15) as client:
        client.login(user, password)
        client.sendmail("a@example.test", ["b@example.test"], b"Subject: hi\r\n\r\nbody\r\n")


@pytest_twisted.ensureDeferred
async def test_identity_is_dovecots_canonical_user(dovecot: DovecotServer, tmp_path: Path) -> None:
    """Logging in as ``ALICE``: Dovecot answers ``OK user=alice original_user=ALICE``; the
    session's identity (Received header) is ``alice``, the canonical user."""
    from twisted.internet import threads
    server = await start_server(tmp_path, backend(dovecot, "unix"))
    try:
        await threads.deferToThread(_send_as, server.port, PLAIN_USER[0].upper(), PLAIN_USER[1])
        message, = (server.maildir / "new").iterdir()
        text = message.read_text()
        assert f"(authenticated user {PLAIN_USER[0]})" in text, text[:400]
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_stock_penalty_second_wrong_password_is_535_not_454(tmp_path: Path) -> None:
    """Stock Dovecot (auth penalty on, auth_failure_delay 2 s) and the default timeout
    (5 s): the second wrong password from one address waits out Dovecot's penalty and gets
    535 (a client would retry a 454 forever); a right password still gets 235."""
    require_dovecot()
    stock = DovecotServer(stock_penalty=True)
    stock.start()
    socket = stock.unix_socket
    server = await start_server(tmp_path, f'[backends.dovecot]\ntype = "dovecot"\nsocket = "{socket}"\n')
    try:
        assert await smtp_login(server.port, PLAIN_USER[0], "wrong 1", timeout=60) == INVALID
        started = time.monotonic()
        assert await smtp_login(server.port, PLAIN_USER[0], "wrong 2", timeout=60) == INVALID
        assert time.monotonic() - started > 5.0  # past the plain timeout: the penalty applied
        assert await smtp_login(server.port, *PLAIN_USER) == OK
    finally:
        await server.stop()
        stock.cleanup()
