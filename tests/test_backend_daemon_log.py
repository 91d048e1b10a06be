"""What the network backends write in a running daemon's log (``twistd -n saslsmtp``, its
real log file), while real clients log in through them: the ``http`` backend against a
twisted.web API, the ``oauth2`` backend fetching its JWKS over HTTP, the ``smtp`` backend
against aiosmtpd, ``dovecot`` against a real Dovecot and ``ldap`` against a real slapd.

An operator's log says what happened to logins, not that Twisted made another connection:
Twisted's ``Starting factory <twisted.web.client._HTTP11ClientFactory ...>`` (or
``<...connectProtocol.<locals>.OneShotFactory ...>``) and ``Stopping factory`` lines came
for every connection a backend opened, two per login with the ``smtp`` backend.
"""

from __future__ import annotations

import base64
import smtplib
import ssl
from pathlib import Path
from typing import Any, Iterator

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread
from twisted.web.resource import Resource

from tests.dovecot import HASHED_USER, DovecotServer, running_dovecot
from tests.slapd import ALICE, PEOPLE, SlapdServer, running_slapd
from tests.support import free_port, start_daemon, wait_for, write_config
from tests.test_checker_oauth2 import AUDIENCE, ISSUER, USER, IdP, claims, ec_key, signed
from tests.tlsutil import issue_cert, make_ca
from tests.upstreams import USERS, AiosmtpdUpstream, AuthAPI, WebServer

PASSWORD = USERS["alice"]


def logins(port: int, ca_file: str, token: str, rounds: int) -> list[tuple[int, bytes]]:
    """``rounds`` times: a new connection, STARTTLS, AUTH PLAIN (the http backend), a new
    connection, STARTTLS, AUTH OAUTHBEARER (the oauth2 backend); the AUTH replies."""
    replies = []
    context = ssl.create_default_context(cafile=ca_file)
    bearer = base64.b64encode(f"n,a={USER},\x01auth=Bearer {token}\x01\x01".encode()).decode()
    plain = base64.b64encode(f"\0alice\0{PASSWORD}".encode()).decode()
    for _ in range(rounds):
        for argument in ("PLAIN " + plain, "OAUTHBEARER " + bearer):
            with smtplib.SMTP("127.0.0.1", port, timeout=15) as client:
                client.starttls(context=context)
                client.ehlo("client.example")
                replies.append(client.docmd("AUTH", argument))
    return replies


@pytest_twisted.ensureDeferred
async def test_http_and_jwks_connections_do_not_log_twisted_factory_lines(tmp_path: Path) -> None:
    """Three rounds of PLAIN over the http backend and OAUTHBEARER over a JWKS fetched by
    URL, each backend connection closed by the server in between: every login succeeds,
    and the daemon's log holds no ``Starting factory`` / ``Stopping factory`` line (nor
    the password)."""
    pair = ec_key()
    root = Resource()
    root.putChild(b"auth", AuthAPI())
    root.putChild(b"jwks", IdP(pair))
    web = WebServer(root)
    web.start()
    ca = make_ca(tmp_path)
    cert = issue_cert(ca, tmp_path)
    port = free_port()
    base = f"http://127.0.0.1:{web.port}"
    config = write_config(
        tmp_path,
        f'[backends.api]\ntype = "http"\nurl = "{base}/auth"\ntimeout = 5.0\n\n'
        f'[backends.idp]\ntype = "oauth2"\njwks_url = "{base}/jwks"\nissuer = "{ISSUER}"\n'
        f'audience = "{AUDIENCE}"\njwks_cache_time = 1\njwks_min_refresh = 1\n',
        backends=["api"], mechanisms=["PLAIN", "OAUTHBEARER"],
        listen=[f"tcp:{port}:interface=127.0.0.1"], tls=(cert.chain_path, cert.key_path))
    daemon = await deferToThread(start_daemon, config, port, tmp_path / "daemon.log")
    try:
        token = signed(pair, claims())
        replies: list[Any] = []
        for _ in range(3):
            replies += await deferToThread(logins, port, ca.cert_path, token, 1)
            # the backends' kept-alive connections end: the next round opens new ones
            await web.stop()
            web.start()
        assert [code for code, _ in replies] == [235] * 6, replies
        assert web.connections >= 4  # a fresh API connection each round, and the JWKS
        await deferToThread(wait_for, lambda: "auth succeeded" in daemon.log_text(), 10,
                            "the login lines")
    finally:
        daemon.stop()
        await web.stop()
    text = daemon.log_text()
    assert text.count("auth succeeded") == 6, text
    assert "Starting factory" not in text and "Stopping factory" not in text, text
    assert "_HTTP11ClientFactory" not in text, text
    assert PASSWORD not in text


@pytest.fixture
def dovecot() -> Iterator[DovecotServer]:
    """A real Dovecot this test restarts."""
    yield from running_dovecot()


@pytest.fixture
def slapd() -> Iterator[SlapdServer]:
    """A seeded slapd this test restarts."""
    yield from running_slapd()


def plain_logins(port: int, accounts: list[tuple[str, str]]) -> list[tuple[int, bytes]]:
    """One connection and one AUTH PLAIN per account; the AUTH replies."""
    replies = []
    for user, password in accounts:
        with smtplib.SMTP("127.0.0.1", port, timeout=15) as client:
            client.ehlo("client.example")
            replies.append(client.docmd(
                "AUTH", "PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode()).decode()))
    return replies


@pytest_twisted.ensureDeferred
async def test_smtp_dovecot_and_ldap_connections_do_not_log_twisted_factory_lines(
        tmp_path: Path, dovecot: DovecotServer, slapd: SlapdServer) -> None:
    """A chain of the three: the smtp upstream answers 454 (so each login also goes on to
    Dovecot, then to the directory), bob is Dovecot's and alice the directory's.  Dovecot
    and slapd are restarted between two rounds: the next logins succeed without
    restarting saslsmtp, over new connections, and the log has no Twisted factory line
    (nor a password)."""
    upstream = AiosmtpdUpstream("plain")
    await deferToThread(upstream.start)
    upstream.recorder.tempfail = True
    port = free_port()
    config = write_config(
        tmp_path,
        f'[backends.up]\ntype = "smtp"\nhost = "127.0.0.1"\nport = {upstream.port}\n'
        'starttls = false\ntimeout = 5.0\n\n'
        f'[backends.dovecot]\ntype = "dovecot"\nsocket = "{dovecot.unix_socket}"\n'
        'timeout = 5.0\n\n'
        f'[backends.directory]\ntype = "ldap"\nurl = "{slapd.url}"\n'
        f'user_dn = "uid={{username}},{PEOPLE}"\ntimeout = 5.0\n',
        listen=[f"tcp:{port}:interface=127.0.0.1"])
    daemon = await deferToThread(start_daemon, config, port, tmp_path / "daemon.log")
    accounts = [HASHED_USER, (ALICE.uid, ALICE.password)]
    try:
        first = await deferToThread(plain_logins, port, accounts)
        await deferToThread(dovecot.restart)
        await deferToThread(slapd.stop)
        await deferToThread(slapd.start)
        second = await deferToThread(plain_logins, port, accounts)
        assert [code for code, _ in first + second] == [235] * 4, first + second
        await deferToThread(wait_for, lambda: daemon.log_text().count("auth succeeded") == 4,
                            10, "the login lines")
    finally:
        daemon.stop()
        await deferToThread(upstream.stop)
    text = daemon.log_text()
    assert len(upstream.recorder.calls) == 4  # one upstream connection per login
    assert "Starting factory" not in text and "Stopping factory" not in text, text
    for password in (HASHED_USER[1], ALICE.password):
        assert password not in text
