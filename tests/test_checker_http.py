"""The ``http`` backend: unit tests over ``treq.testing.StubTreq``, then a real
twisted.web server on a free loopback port (plain HTTP and HTTPS with a private CA).

The real server's resource checks the JSON it gets, answers 200/401/403/500, records
every request (body and headers) and can hang.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionClosed
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from saslsmtp.checkers.http import HttpChecker, HttpOptions, from_config
from saslsmtp.checkers.registry import BackendDeps
from saslsmtp.credentials import PasswordCredentials
from saslsmtp.errors import TemporaryFailure
from saslsmtp.sasl.outcome import Session
from saslsmtp.threads import SynchronousRunner
from tests.stalehttp import ForgetfulFactory
from tests.tlsutil import issue_cert, make_ca, twisted_server_options
from tests.upstreams import BLOCKED, USERS, AuthAPI, WebServer as Server

TOKEN = "Bearer t0ken-for-the-api"


def creds(username: str, password: str, mechanism: str = "PLAIN",
          remote_ip: str = "192.0.2.7") -> PasswordCredentials:
    """Credentials as the SMTP engine builds them (UTF-8 bytes + session)."""
    return PasswordCredentials(username.encode(), password.encode(),
                               Session(remote_ip=remote_ip, mechanism=mechanism))


# ---- unit tests over StubTreq (no sockets, a Clock) -------------------------------------


class Status(Resource):
    """Answers every POST with a fixed status (or never, for ``None``)."""

    isLeaf = True

    def __init__(self, code: int | None) -> None:
        super().__init__()
        self.code = code
        self.bodies: list[bytes] = []

    def render_POST(self, request: Any) -> bytes | int:
        self.bodies.append(request.content.read())
        if self.code is None:
            return NOT_DONE_YET
        request.setResponseCode(self.code)
        if 300 <= self.code < 400:
            request.setHeader(b"Location", b"http://elsewhere.test/steal")
        return b"body"


def stub_checker(code: int | None, **kw: Any) -> tuple[HttpChecker, StubTreq, Status, Clock]:
    """A checker over a StubTreq whose resource answers ``code``."""
    resource = Status(code)
    stub = StubTreq(resource)
    clock = Clock()
    return (HttpChecker(url="http://api.test/auth", client=stub, reactor=clock, **kw),
            stub, resource, clock)


def verdict(d: Deferred) -> Any:
    """The result or Failure a fired Deferred holds (fails if it has not fired)."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the check has not finished"
    return out[0]


@pytest.mark.parametrize("code", [200, 201, 204])
def test_stub_2xx_accepts(code):
    """Any 2xx -> the username, as bytes."""
    c, stub, _, _ = stub_checker(code)
    d = c.requestAvatarId(creds("alice", "pw"))
    stub.flush()
    assert verdict(d) == b"alice"


@pytest.mark.parametrize("code", [401, 403])
def test_stub_401_403_reject(code):
    """401 and 403 -> UnauthorizedLogin."""
    c, stub, _, _ = stub_checker(code)
    d = c.requestAvatarId(creds("alice", "pw"))
    stub.flush()
    assert verdict(d).check(UnauthorizedLogin)


@pytest.mark.parametrize("code", [302, 307, 400, 404, 429, 500, 502, 503])
def test_stub_other_statuses_are_temporary(code):
    """Redirects (not followed), other 4xx and 5xx -> TemporaryFailure."""
    c, stub, resource, _ = stub_checker(code)
    d = c.requestAvatarId(creds("alice", "pw"))
    stub.flush()
    failure = verdict(d)
    assert failure.check(TemporaryFailure) and not failure.check(UnauthorizedLogin)
    assert str(code) in str(failure.value)
    assert len(resource.bodies) == 1  # a redirect was not followed


def test_stub_body_fields_from_session():
    """The JSON carries username, password, mechanism and remote_ip from the session."""
    c, stub, resource, _ = stub_checker(200)
    stub.flush()
    verdict(c.requestAvatarId(creds("b\u00f6b", "p\u00e4ss", "LOGIN", "2001:db8::1")))
    assert json.loads(resource.bodies[0]) == {
        "username": "b\u00f6b", "password": "p\u00e4ss", "mechanism": "LOGIN",
        "remote_ip": "2001:db8::1"}


def test_stub_plain_twisted_credentials_send_nulls():
    """Credentials without a session (stock UsernamePassword): mechanism/remote_ip null."""
    c, stub, resource, _ = stub_checker(200)
    d = c.requestAvatarId(UsernamePassword(b"alice", b"pw"))
    stub.flush()
    assert verdict(d) == b"alice"
    assert json.loads(resource.bodies[0]) == {"username": "alice", "password": "pw",
                                              "mechanism": None, "remote_ip": None}


def test_stub_non_utf8_password_rejected_without_request():
    """A password that is not UTF-8 cannot be put in JSON: reject, send nothing."""
    c, stub, resource, _ = stub_checker(200)
    d = c.requestAvatarId(PasswordCredentials(b"alice", b"\xff\xfe"))
    assert verdict(d).check(UnauthorizedLogin)
    assert resource.bodies == []


def test_stub_timeout_is_temporary():
    """No answer within ``timeout`` (Clock-driven) -> TemporaryFailure."""
    c, stub, _, clock = stub_checker(None, timeout=3.0)
    d = c.requestAvatarId(creds("alice", "pw"))
    stub.flush()
    clock.advance(2.9)
    assert not d.called
    clock.advance(0.2)
    failure = verdict(d)
    assert failure.check(TemporaryFailure) and "3s" in str(failure.value)


def test_stub_timer_cancelled_after_verdict():
    """The deadline is cancelled once the verdict is known (nothing left on the clock)."""
    c, stub, _, clock = stub_checker(200, timeout=3.0)
    d = c.requestAvatarId(creds("alice", "pw"))
    stub.flush()
    assert verdict(d) == b"alice"
    assert clock.getDelayedCalls() == []


def test_repr_hides_headers():
    """The checker's repr shows neither the headers (API tokens) nor anything secret."""
    c, _, _, _ = stub_checker(200, headers={"Authorization": TOKEN})
    assert TOKEN not in repr(c) and "t0ken" not in repr(c)


# ---- a real twisted.web server on loopback ---------------------------------------------


@pytest.fixture
def api():
    """A fresh AuthAPI on a free loopback port."""
    server = Server(AuthAPI())
    server.start()
    yield server
    pytest_twisted.blockon(Deferred.fromCoroutine(server.stop()))


def deps() -> BackendDeps:
    """Backend dependencies with the test reactor."""
    from twisted.internet import reactor
    return BackendDeps(reactor=reactor, hash_runner=SynchronousRunner(),
                       make_runner=lambda name, n: SynchronousRunner())


def checker(url: str, **options: Any) -> HttpChecker:
    """A checker built from config options, as the daemon builds it."""
    options.setdefault("timeout", 5.0)
    return from_config("api", HttpOptions(url=url, **options), deps())


async def until(predicate: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    """Let the reactor run until ``predicate()`` is true; fail after ``timeout`` seconds."""
    from twisted.internet import reactor
    from twisted.internet.task import deferLater
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await deferLater(reactor, 0.01, lambda: None)


@pytest_twisted.ensureDeferred
async def test_real_right_wrong_blocked(api):
    """200 -> accept, 401 -> reject, 403 -> reject; the API got valid JSON each time."""
    c = checker(api.url)
    assert await c.requestAvatarId(creds("alice", USERS["alice"])) == b"alice"
    assert await c.requestAvatarId(creds("b\u00f6b", USERS["b\u00f6b"])) == "b\u00f6b".encode()
    with pytest.raises(UnauthorizedLogin):
        await c.requestAvatarId(creds("alice", "wrong"))
    with pytest.raises(UnauthorizedLogin):
        await c.requestAvatarId(creds(BLOCKED, "anything"))
    assert len(api.resource.requests) == 4  # one request per check, no retries
    body = json.loads(api.resource.requests[0]["raw"])
    assert body == {"username": "alice", "password": USERS["alice"], "mechanism": "PLAIN",
                    "remote_ip": "192.0.2.7"}


@pytest_twisted.ensureDeferred
async def test_real_extra_headers_sent(api):
    """Configured headers (an API token) go with the request, beside the JSON type."""
    c = checker(api.url, headers={"Authorization": TOKEN, "X-Api-Client": "saslsmtp-test"})
    assert await c.requestAvatarId(creds("alice", USERS["alice"])) == b"alice"
    headers = api.resource.requests[0]["headers"]
    assert headers["authorization"] == TOKEN
    assert headers["x-api-client"] == "saslsmtp-test"
    assert headers["content-type"].startswith("application/json")
    assert headers["user-agent"] == "saslsmtp"


@pytest_twisted.ensureDeferred
async def test_real_500_is_temporary(api):
    """The API answering 500 -> TemporaryFailure, one request."""
    api.resource.mode = "500"
    with pytest.raises(TemporaryFailure, match="500"):
        await checker(api.url).requestAvatarId(creds("alice", USERS["alice"]))
    assert len(api.resource.requests) == 1


@pytest.mark.alone
@pytest_twisted.ensureDeferred
async def test_real_hang_times_out(api):
    """The API never answers: TemporaryFailure after ``timeout`` (measured); the
    request is abandoned (its connection closed)."""
    api.resource.mode = "hang"
    c = checker(api.url, timeout=0.5)
    started = time.monotonic()
    check = c.requestAvatarId(creds("alice", USERS["alice"]))
    await until(lambda: api.resource.hanging, "the request at the API")
    # asked for while the connection is still open: after its close it would never fire
    gone: Deferred = api.resource.hanging[0].notifyFinish()
    with pytest.raises(TemporaryFailure, match="0.5s"):
        await check
    elapsed = time.monotonic() - started
    assert 0.45 <= elapsed < 1.5, elapsed
    assert len(api.resource.requests) == 1  # a timeout is not retried
    from twisted.internet import reactor
    with pytest.raises(ConnectionClosed):
        await gone.addTimeout(5, reactor)  # the server saw the client go away


@pytest_twisted.ensureDeferred
async def test_real_stopped_then_back(api):
    """Server down -> TemporaryFailure; up again on the same port -> the same checker
    accepts again (kept-alive connections from before are not a problem)."""
    c = checker(api.url)
    assert await c.requestAvatarId(creds("alice", USERS["alice"])) == b"alice"
    await api.stop()
    with pytest.raises(TemporaryFailure):
        await c.requestAvatarId(creds("alice", USERS["alice"]))
    api.start()
    assert await c.requestAvatarId(creds("alice", USERS["alice"])) == b"alice"
    assert await c.requestAvatarId(creds("alice", USERS["alice"])) == b"alice"


@pytest_twisted.ensureDeferred
async def test_stale_kept_alive_connection_retried_once():
    """A POST on a kept-alive connection that the server drops unanswered is sent once
    more on a fresh connection (Twisted itself never retries a POST)."""
    from twisted.internet import reactor
    factory = ForgetfulFactory()
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        c = checker(f"http://127.0.0.1:{port.getHost().port}/auth")
        assert await c.requestAvatarId(creds("alice", "x")) == b"alice"
        assert await c.requestAvatarId(creds("alice", "x")) == b"alice"
        assert (factory.connections, factory.requests) == (2, 3)
    finally:
        await port.stopListening()


# ---- HTTPS --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: Any) -> dict[str, Any]:
    """A CA and certificates: good (127.0.0.1 + localhost), wrong host, no SAN,
    and one from a CA nobody trusts."""
    tmp = tmp_path_factory.mktemp("pki")
    ca = make_ca(tmp)
    other = make_ca(tmp, "untrusted CA")
    return {"ca": ca,
            "good": issue_cert(ca, tmp, names=["localhost", "127.0.0.1"]),
            "wrong": issue_cert(ca, tmp, names=["wrong.example"]),
            "nosan": issue_cert(ca, tmp, names=["127.0.0.1"], san=False),
            "untrusted": issue_cert(other, tmp, names=["localhost", "127.0.0.1"])}


def https_server(request: Any, cert: Any) -> Server:
    server = Server(AuthAPI(), twisted_server_options(cert))
    server.start()
    request.addfinalizer(lambda: pytest_twisted.blockon(Deferred.fromCoroutine(server.stop())))
    return server


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
@pytest_twisted.ensureDeferred
async def test_https_with_private_ca(request, pki, host):
    """https:// verified against ca_file (IP SAN or DNS SAN): right and wrong passwords."""
    server = https_server(request, pki["good"])
    c = checker(f"https://{host}:{server.port}/auth", ca_file=pki["ca"].cert_path)
    assert await c.requestAvatarId(creds("alice", USERS["alice"])) == b"alice"
    with pytest.raises(UnauthorizedLogin):
        await c.requestAvatarId(creds("alice", "wrong"))


@pytest.mark.parametrize("cert", ["wrong", "nosan", "untrusted"])
@pytest_twisted.ensureDeferred
async def test_https_bad_certificate_refused(request, pki, cert):
    """A certificate for another host, without subjectAltName, or from an untrusted CA:
    TemporaryFailure, and the password never reaches the server."""
    server = https_server(request, pki[cert])
    c = checker(server.url, ca_file=pki["ca"].cert_path)
    with pytest.raises(TemporaryFailure, match="TLS"):
        await c.requestAvatarId(creds("alice", USERS["alice"]))
    assert server.resource.requests == []
    assert server.connections == 1  # a TLS failure is not retried


@pytest_twisted.ensureDeferred
async def test_no_password_or_token_in_logs_or_errors(api):
    """Neither the password nor the API token appears in log events, exception
    messages or reprs (accept, reject, 500, timeout, refused connection)."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    texts: list[str] = []
    password = USERS["alice"]
    try:
        c = checker(api.url, headers={"Authorization": TOKEN}, timeout=0.3)
        await c.requestAvatarId(creds("alice", password))
        for mode, error in (("normal", UnauthorizedLogin), ("500", TemporaryFailure),
                            ("hang", TemporaryFailure)):
            api.resource.mode = mode
            with pytest.raises(error) as e:
                await c.requestAvatarId(creds("alice", password + ("x" if mode == "normal"
                                                                    else "")))
            texts.append(str(e.value) + repr(e.value))
        await api.stop()
        with pytest.raises(TemporaryFailure) as e:
            await c.requestAvatarId(creds("alice", password))
        texts.append(str(e.value) + repr(e.value) + repr(c))
    finally:
        globalLogPublisher.removeObserver(events.append)
    joined = "\n".join(texts + [formatEvent(e) + repr(e) for e in events])
    assert password not in joined and TOKEN not in joined and "t0ken" not in joined


@pytest_twisted.ensureDeferred
async def test_stop_closes_kept_alive_connections(api):
    """``stop()`` (called by the service on shutdown) closes the pooled connections."""
    c = checker(api.url)
    assert await c.requestAvatarId(creds("alice", USERS["alice"])) == b"alice"
    assert len(api.factory.protocols) == 1  # kept alive
    await c.stop()
    await until(lambda: not api.factory.protocols, "the server to see the connection close")


def test_config_missing_ca_file_is_a_config_error(tmp_path):
    """A ca_file that does not exist is reported with its key (so ``--check`` finds it)."""
    from saslsmtp.config import ConfigError, parse_config
    text = ('[auth]\nbackends = ["api"]\n[backends.api]\ntype = "http"\n'
            'url = "https://127.0.0.1/auth"\nca_file = "missing-ca.pem"\n')
    with pytest.raises(ConfigError) as e:
        parse_config(text, str(tmp_path / "saslsmtp.toml"))
    assert "backends.api.ca_file" in str(e.value)


@pytest_twisted.ensureDeferred
async def test_outage_warned_once_and_recovery_logged(api):
    """The API stopped: one warn for several failed logins; back: one info line with the
    outage's length (and no password anywhere)."""
    from twisted.logger import LogLevel, globalLogPublisher
    from tests.test_outage import LevelCapture

    c = checker(api.url)
    capture = LevelCapture()
    globalLogPublisher.addObserver(capture)
    try:
        assert await c.requestAvatarId(creds("alice", USERS["alice"])) == b"alice"
        await api.stop()
        for _ in range(3):
            with pytest.raises(TemporaryFailure):
                await c.requestAvatarId(creds("alice", USERS["alice"]))
        api.start()
        assert await c.requestAvatarId(creds("alice", USERS["alice"])) == b"alice"
    finally:
        globalLogPublisher.removeObserver(capture)
    [warned] = capture.at(LogLevel.warn)
    assert warned.startswith("backend api unreachable: ")
    [recovered] = capture.at(LogLevel.info)
    assert recovered.startswith("backend api reachable again after ")
    assert USERS["alice"] not in repr(capture.events)


# ---- credentials in the URL: refused at load, never repeated ------------------------------

URL_SECRET = "Url-Api-Secret-4"


def twistd_check(config: Any) -> Any:
    """``twistd -n saslsmtp --config CONFIG --check`` as an operator runs it."""
    import os
    import subprocess
    from tests.support import ROOT, twistd_command
    return subprocess.run(twistd_command(config, "--check"), capture_output=True, text=True,
                          timeout=30, cwd=config.parent, env=dict(os.environ, PYTHONPATH=str(ROOT)))


@pytest.mark.parametrize("url, shown", [
    (f"http://api:{URL_SECRET}@127.0.0.1:8080/auth", "'http://api:***@127.0.0.1:8080/auth'"),
    (f"https://{URL_SECRET}@127.0.0.1/auth", "'https://***@127.0.0.1/auth'"),
    # an unescaped / in the password: a URL parser would take its start for the port
    (f"http://api:x/{URL_SECRET}@127.0.0.1/auth", "'http://api:***@127.0.0.1/auth'"),
    (f"http://api:{URL_SECRET}@127.0.0.1:80:x/auth", "'http://api:***@127.0.0.1:80:x/auth'"),
])
def test_credentials_in_the_url_are_refused_without_repeating_them(tmp_path, url, shown):
    """``user:password@`` in ``url`` is never sent (Twisted's agent fails the request, so
    every login got 454 while --check said OK): --check refuses it, says where
    credentials go, and shows the URL with the password masked."""
    from tests.support import write_config
    config = write_config(tmp_path, f'[backends.api]\ntype = "http"\nurl = "{url}"\n')
    out = twistd_check(config)
    assert out.returncode == 1, out.stdout
    assert (f"backends.api.url: {shown} is not a usable URL: a user name or password in the"
            " URL is never sent (put credentials in headers") in out.stderr
    assert URL_SECRET not in out.stdout + out.stderr


def test_repr_masks_a_password_in_the_url():
    """A checker built in Python around the options' check keeps the URL's password out
    of its repr (what a traceback or a debugger shows)."""
    c = HttpChecker(url=f"http://api:{URL_SECRET}@127.0.0.1/auth", client=StubTreq(Resource()),
                    reactor=Clock())
    assert URL_SECRET not in repr(c) and "http://api:***@127.0.0.1/auth" in repr(c)
