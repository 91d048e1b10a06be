"""The forwarding backends through the full SMTP path: a real saslsmtp on loopback,
Python's smtplib as the client, and a real server behind the backend.

For each of ``type = "smtp"`` (aiosmtpd upstream, and saslsmtp itself as the upstream,
over STARTTLS with a private CA) and ``type = "http"`` (a twisted.web API): right
password -> 235 2.7.0, wrong -> 535 5.7.8, server stopped -> 454 4.7.0, server back ->
235 without restarting saslsmtp, server hanging -> 454 4.7.0 within ``timeout``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel, globalLogPublisher

from saslsmtp.replies import REPLIES
from tests.test_outage import LevelCapture
from tests.support import free_port, reactor_seconds, silent_port, smtp_login, start_server
from tests.tlsutil import issue_cert, make_ca
from tests.upstreams import USERS, AiosmtpdUpstream, AuthAPI, WebServer

OK, INVALID, TEMPFAIL = REPLIES["auth_ok"], REPLIES["auth_invalid"], REPLIES["auth_tempfail"]
HANG_TIMEOUT = 0.5


def expect(result: tuple[int, bytes], reply: Any) -> None:
    """smtplib's (code, text) is exactly ``reply``'s code and enhanced code."""
    code, text = result
    assert code == reply.code, result
    assert text.startswith(reply.enhanced.encode()), result


def smtp_table(port: int, timeout: float = 5.0, ca_file: str | None = None) -> str:
    """``[backends.upstream]``: STARTTLS with ``ca_file`` when given, else plain."""
    tls = f'starttls = true\nca_file = "{ca_file}"\n' if ca_file else "starttls = false\n"
    return (f'[backends.upstream]\ntype = "smtp"\nhost = "127.0.0.1"\nport = {port}\n'
            f"timeout = {timeout}\n{tls}")


def http_table(url: str, timeout: float = 5.0) -> str:
    return (f'[backends.api]\ntype = "http"\nurl = "{url}"\ntimeout = {timeout}\n'
            'headers = { Authorization = "Bearer test-token" }\n')


def subdir(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.mkdir()
    return path


@pytest.fixture
def hanging_port():
    """A loopback port that accepts connections and never answers (TCP and HTTP alike)."""
    with silent_port() as (port, _):
        yield port


async def assert_hang_is_454_within_timeout(tmp_path: Path, table: str) -> None:
    """A saslsmtp whose backend never answers replies 454 4.7.0 about ``timeout`` later."""
    server = await start_server(tmp_path, table)
    try:
        started = reactor_seconds()
        expect(await smtp_login(server.port, "alice", USERS["alice"]), TEMPFAIL)
        elapsed = reactor_seconds() - started
        assert HANG_TIMEOUT <= elapsed < HANG_TIMEOUT + 1.5, elapsed
    finally:
        await server.stop()


# ---- type = "smtp", aiosmtpd upstream -----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_smtp_backend_full_path(tmp_path):
    """aiosmtpd upstream: PLAIN and LOGIN clients -> 235, wrong -> 535 5.7.8 after one
    upstream AUTH, upstream stopped -> 454 4.7.0, back -> 235 (saslsmtp not restarted)."""
    upstream = AiosmtpdUpstream("plain")
    await deferToThread(upstream.start)
    server = await start_server(tmp_path, smtp_table(upstream.port))
    try:
        expect(await smtp_login(server.port, "alice", USERS["alice"]), OK)
        expect(await smtp_login(server.port, "alice", USERS["alice"], mechanism="LOGIN"), OK)
        upstream.reset()
        expect(await smtp_login(server.port, "alice", "wrong"), INVALID)
        assert upstream.recorder.commands == ["PLAIN"]
        await deferToThread(upstream.stop)
        expect(await smtp_login(server.port, "alice", USERS["alice"]), TEMPFAIL)
        await deferToThread(upstream.start)
        expect(await smtp_login(server.port, "alice", USERS["alice"]), OK)
    finally:
        await server.stop()
        await deferToThread(upstream.stop)


@pytest_twisted.ensureDeferred
async def test_smtp_backend_upstream_454_is_454(tmp_path):
    """The upstream's own 454 comes back as 454 4.7.0."""
    upstream = AiosmtpdUpstream("plain")
    await deferToThread(upstream.start)
    upstream.recorder.tempfail = True
    server = await start_server(tmp_path, smtp_table(upstream.port))
    try:
        expect(await smtp_login(server.port, "alice", USERS["alice"]), TEMPFAIL)
    finally:
        await server.stop()
        await deferToThread(upstream.stop)


@pytest_twisted.ensureDeferred
async def test_smtp_backend_broken_upstream_is_454_not_535(tmp_path):
    """An upstream whose own password check is failing answers AUTH with a 5xx that
    judges nothing (aiosmtpd: ``500 Error: (ConnectionError) ...``): every login, right
    password or wrong, gets 454 4.7.0 (a 535 would tell users their password is wrong
    and count against them); the outage is one warning, its end one info line."""
    upstream = AiosmtpdUpstream("plain")
    await deferToThread(upstream.start)
    server = await start_server(tmp_path, smtp_table(upstream.port))
    capture = LevelCapture()
    globalLogPublisher.addObserver(capture)
    try:
        upstream.recorder.broken = True
        for password in (USERS["alice"], "wrong", USERS["alice"]):
            expect(await smtp_login(server.port, "alice", password), TEMPFAIL)
        assert upstream.recorder.commands == ["PLAIN"] * 3
        upstream.recorder.broken = False
        expect(await smtp_login(server.port, "alice", USERS["alice"]), OK)
    finally:
        globalLogPublisher.removeObserver(capture)
        await server.stop()
        await deferToThread(upstream.stop)
    [warned] = capture.at(LogLevel.warn)
    assert warned.startswith("backend upstream unreachable: upstream 127.0.0.1:"), warned
    assert "AUTH answered 500" in warned, warned
    assert any(line.startswith("backend upstream reachable again after ")
               for line in capture.at(LogLevel.info))


@pytest.mark.alone
@pytest_twisted.ensureDeferred
async def test_smtp_backend_hanging_upstream(tmp_path, hanging_port):
    """Upstream accepts TCP and says nothing: 454 4.7.0 within the backend timeout."""
    await assert_hang_is_454_within_timeout(tmp_path, smtp_table(hanging_port, HANG_TIMEOUT))


# ---- type = "smtp", saslsmtp itself as the upstream ---------------------------------------


@pytest_twisted.ensureDeferred
async def test_smtp_backend_with_saslsmtp_upstream_over_starttls(tmp_path):
    """saslsmtp B forwards to saslsmtp A (file backend, require_tls, STARTTLS with a
    certificate from a private CA): 235 / 535 5.7.8 / 454 4.7.0 when A is down / 235
    when A is back on its port.  A certificate for the wrong host -> 454."""
    ca = make_ca(tmp_path)
    good = issue_cert(ca, tmp_path, names=["localhost", "127.0.0.1"])
    users = tmp_path / "users"
    users.write_text(f"alice:{{PLAIN}}{USERS['alice']}\n")
    a_port = free_port()
    a_table = f'[backends.users]\ntype = "file"\npath = "{users}"\n'
    a_options: dict[str, Any] = dict(listen=[f"tcp:{a_port}:interface=127.0.0.1"],
                                     require_tls=True, tls=(good.chain_path, good.key_path))
    a = await start_server(subdir(tmp_path, "a"), a_table, **a_options)
    b = await start_server(subdir(tmp_path, "b"), smtp_table(a_port, ca_file=ca.cert_path))
    try:
        expect(await smtp_login(b.port, "alice", USERS["alice"]), OK)
        expect(await smtp_login(b.port, "alice", "wrong"), INVALID)
        expect(await smtp_login(b.port, "mallory", "wrong"), INVALID)
        await a.stop()
        expect(await smtp_login(b.port, "alice", USERS["alice"]), TEMPFAIL)
        a = await start_server(subdir(tmp_path, "a2"), a_table, **a_options)
        expect(await smtp_login(b.port, "alice", USERS["alice"]), OK)
    finally:
        await b.stop()
        await a.stop()
    wrong = issue_cert(ca, tmp_path, names=["wrong.example"])
    a_options["tls"] = (wrong.chain_path, wrong.key_path)
    a = await start_server(subdir(tmp_path, "a3"), a_table, **a_options)
    b = await start_server(subdir(tmp_path, "b2"), smtp_table(a_port, ca_file=ca.cert_path))
    try:
        expect(await smtp_login(b.port, "alice", USERS["alice"]), TEMPFAIL)
    finally:
        await b.stop()
        await a.stop()


# ---- type = "http" ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_http_backend_full_path(tmp_path):
    """twisted.web API: 235 / 535 5.7.8 (401 and 403) / 454 4.7.0 (500, API stopped) /
    235 when the API is back, with the token header and the session's mechanism."""
    api = WebServer(AuthAPI())
    api.start()
    server = await start_server(tmp_path, http_table(api.url))
    try:
        expect(await smtp_login(server.port, "alice", USERS["alice"]), OK)
        expect(await smtp_login(server.port, "alice", USERS["alice"], mechanism="LOGIN"), OK)
        expect(await smtp_login(server.port, "alice", "wrong"), INVALID)
        expect(await smtp_login(server.port, "blocked", "x"), INVALID)
        first = api.resource.requests[0]
        assert first["headers"]["authorization"] == "Bearer test-token"
        body = json.loads(first["raw"])
        assert body["mechanism"] == "PLAIN" and body["remote_ip"] == "127.0.0.1"
        assert json.loads(api.resource.requests[1]["raw"])["mechanism"] == "LOGIN"
        api.resource.mode = "500"
        expect(await smtp_login(server.port, "alice", USERS["alice"]), TEMPFAIL)
        api.resource.mode = "normal"
        await api.stop()
        expect(await smtp_login(server.port, "alice", USERS["alice"]), TEMPFAIL)
        api.start()
        expect(await smtp_login(server.port, "alice", USERS["alice"]), OK)
    finally:
        await server.stop()
        await api.stop()


@pytest.mark.alone
@pytest_twisted.ensureDeferred
async def test_http_backend_hanging_api(tmp_path):
    """The API never answers: 454 4.7.0 within the backend timeout."""
    api = WebServer(AuthAPI())
    api.resource.mode = "hang"
    api.start()
    try:
        await assert_hang_is_454_within_timeout(tmp_path, http_table(api.url, HANG_TIMEOUT))
    finally:
        await api.stop()


@pytest_twisted.ensureDeferred
async def test_chain_falls_through_from_smtp_to_http(tmp_path):
    """Both backends in one chain (``auth.backends = ["upstream", "api"]``): the
    upstream's 235 wins without asking the API; after the upstream's 535 the API is
    asked; with the upstream down and the API rejecting, the answer is 454 (a
    temporary failure outranks a rejection)."""
    upstream = AiosmtpdUpstream("plain")
    await deferToThread(upstream.start)
    api = WebServer(AuthAPI())
    api.start()
    table = smtp_table(upstream.port) + "\n" + http_table(api.url)
    server = await start_server(tmp_path, table, backends=["upstream", "api"])
    try:
        expect(await smtp_login(server.port, "alice", USERS["alice"]), OK)
        assert len(api.resource.requests) == 0  # the first backend accepted
        expect(await smtp_login(server.port, "alice", "wrong"), INVALID)
        assert len(api.resource.requests) == 1  # asked after the upstream's 535
        await deferToThread(upstream.stop)
        expect(await smtp_login(server.port, "alice", "wrong"), TEMPFAIL)
    finally:
        await server.stop()
        await api.stop()
        await deferToThread(upstream.stop)


SCRIPT = '''
from saslsmtp.script import Accept, Defer, Reject, Verdict

async def auth(arguments, context):
    """user@api -> the http backend "api"; anyone else -> the smtp backend "upstream"."""
    user, _, realm = arguments["username"].partition("@")
    name = "api" if realm == "api" else "upstream"
    verdict = await arguments["backends"].verify(name, user, arguments["password"])
    if verdict == Verdict.ACCEPT:
        return Accept()
    if verdict == Verdict.TEMPORARY:
        return Defer()
    return Reject()
'''


@pytest_twisted.ensureDeferred
async def test_script_uses_both_backends_by_name(tmp_path):
    """An AUTH script calls "upstream" (smtp) and "api" (http) by name and maps their
    verdicts to 235 / 535 / 454; the API still gets the connection's remote_ip."""
    upstream = AiosmtpdUpstream("plain")
    await deferToThread(upstream.start)
    api = WebServer(AuthAPI())
    api.start()
    script = tmp_path / "auth.py"
    script.write_text(SCRIPT)
    table = smtp_table(upstream.port) + "\n" + http_table(api.url)
    server = await start_server(tmp_path, table, script=str(script))
    try:
        expect(await smtp_login(server.port, "alice", USERS["alice"]), OK)
        assert upstream.recorder.commands == ["PLAIN"] and api.resource.requests == []
        expect(await smtp_login(server.port, "alice@api", USERS["alice"]), OK)
        body = json.loads(api.resource.requests[0]["raw"])
        assert body["username"] == "alice" and body["remote_ip"] == "127.0.0.1"
        expect(await smtp_login(server.port, "alice@api", "wrong"), INVALID)
        await api.stop()
        expect(await smtp_login(server.port, "alice@api", USERS["alice"]), TEMPFAIL)
        expect(await smtp_login(server.port, "alice", "wrong"), INVALID)
        assert upstream.recorder.commands == ["PLAIN", "PLAIN"]
    finally:
        await server.stop()
        await api.stop()
        await deferToThread(upstream.stop)
