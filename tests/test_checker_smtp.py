"""The ``smtp`` backend against a real, foreign SMTP server: aiosmtpd on loopback.

aiosmtpd runs in its own thread (its ``Controller``) with an authenticator that records
every call; a subclass of its ``SMTP`` also counts the AUTH *commands* it receives, so
"exactly one AUTH attempt per check" is measured at the upstream, not assumed.
Certificates come from ``tests.tlsutil`` (a private CA, a cert for the wrong host, a
trusted cert without subjectAltName).
"""

from __future__ import annotations

import base64
import time
from typing import Any

import pytest
import pytest_twisted
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import ssl as tssl
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher, formatEvent

from saslsmtp.checkers.registry import BackendDeps
from saslsmtp.checkers.smtp import SmtpForwardChecker, SmtpOptions, _capabilities, from_config
from saslsmtp.checkers.tlsclient import load_trust_root
from saslsmtp.credentials import PasswordCredentials
from saslsmtp.errors import TemporaryFailure
from saslsmtp.sasl.outcome import Session
from saslsmtp.threads import SynchronousRunner
from tests.support import silent_port
from tests.tlsutil import issue_cert, make_ca
from tests.upstreams import USERS_BYTES, AiosmtpdUpstream as Upstream

USERS = USERS_BYTES
WRONG = b"wrong battery"


def creds(username: bytes, password: bytes) -> PasswordCredentials:
    """Credentials as the SMTP engine builds them."""
    return PasswordCredentials(username, password,
                               Session(remote_ip="192.0.2.7", mechanism="PLAIN"))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: Any) -> dict[str, Any]:
    """A CA; certificates for 127.0.0.1+localhost, for the wrong host, without SAN;
    and a second CA nobody trusts."""
    tmp = tmp_path_factory.mktemp("pki")
    ca = make_ca(tmp)
    other = make_ca(tmp, "untrusted CA")
    return {
        "ca": ca,
        "good": issue_cert(ca, tmp, names=["localhost", "127.0.0.1"]),
        "wrong": issue_cert(ca, tmp, names=["wrong.example"]),
        "nosan": issue_cert(ca, tmp, names=["127.0.0.1"], san=False),
        "untrusted": issue_cert(other, tmp, names=["localhost", "127.0.0.1"]),
    }


def _upstream(request: Any, *args: Any, **kwargs: Any) -> Upstream:
    up = Upstream(*args, **kwargs)
    up.start()
    request.addfinalizer(up.stop)
    return up


@pytest.fixture(scope="module")
def plain_upstream(request: Any) -> Upstream:
    """aiosmtpd offering AUTH PLAIN LOGIN without TLS."""
    return _upstream(request, "plain")


@pytest.fixture(scope="module")
def login_only_upstream(request: Any) -> Upstream:
    """aiosmtpd offering only AUTH LOGIN."""
    return _upstream(request, "plain", exclude=("PLAIN",))


@pytest.fixture(scope="module")
def starttls_upstream(request: Any, pki: dict[str, Any]) -> Upstream:
    """aiosmtpd requiring STARTTLS (cert for 127.0.0.1 and localhost) before AUTH."""
    return _upstream(request, "starttls", cert=pki["good"])


@pytest.fixture
def fresh(plain_upstream: Upstream, login_only_upstream: Upstream,
          starttls_upstream: Upstream) -> None:
    """Each test starts with empty AUTH records."""
    for up in (plain_upstream, login_only_upstream, starttls_upstream):
        up.reset()


def deps() -> BackendDeps:
    """Backend dependencies with the test reactor."""
    from twisted.internet import reactor
    return BackendDeps(reactor=reactor, hash_runner=SynchronousRunner(),
                       make_runner=lambda name, n: SynchronousRunner())


def checker(port: int, **options: Any) -> SmtpForwardChecker:
    """A checker built from config options, as the daemon builds it."""
    options.setdefault("starttls", False)
    options.setdefault("timeout", 5.0)
    return from_config("upstream", SmtpOptions(host="127.0.0.1", port=port, **options),
                       deps())


# ---- plain upstream: verdicts and one attempt per check -----------------------------


@pytest_twisted.ensureDeferred
async def test_right_password_accepted_with_one_plain_attempt(plain_upstream, fresh):
    """235 upstream -> the username, after exactly one AUTH PLAIN."""
    result = await checker(plain_upstream.port).requestAvatarId(creds(b"alice", USERS[b"alice"]))
    assert result == b"alice"
    assert plain_upstream.recorder.commands == ["PLAIN"]
    assert plain_upstream.recorder.calls == [("PLAIN", b"alice")]


@pytest_twisted.ensureDeferred
async def test_wrong_password_rejected_after_exactly_one_attempt(plain_upstream, fresh):
    """535 upstream -> UnauthorizedLogin; the upstream saw ONE AUTH (Twisted's stock
    PLAIN client would have sent a second one with another authzid)."""
    with pytest.raises(UnauthorizedLogin):
        await checker(plain_upstream.port).requestAvatarId(creds(b"alice", WRONG))
    assert plain_upstream.recorder.commands == ["PLAIN"]
    assert plain_upstream.recorder.calls == [("PLAIN", b"alice")]


@pytest_twisted.ensureDeferred
async def test_unknown_user_rejected(plain_upstream, fresh):
    """An unknown user is a plain 535 too."""
    with pytest.raises(UnauthorizedLogin):
        await checker(plain_upstream.port).requestAvatarId(creds(b"mallory", WRONG))
    assert len(plain_upstream.recorder.commands) == 1


@pytest_twisted.ensureDeferred
async def test_utf8_credentials_pass_through_unchanged(plain_upstream, fresh):
    """UTF-8 usernames and passwords reach the upstream byte for byte."""
    user = b"b\xc3\xb6b"
    assert await checker(plain_upstream.port).requestAvatarId(creds(user, USERS[user])) == user


@pytest_twisted.ensureDeferred
async def test_upstream_454_is_temporary_and_not_retried(plain_upstream, fresh):
    """454 4.7.0 upstream -> TemporaryFailure, still one AUTH."""
    plain_upstream.recorder.tempfail = True
    with pytest.raises(TemporaryFailure):
        await checker(plain_upstream.port).requestAvatarId(creds(b"alice", USERS[b"alice"]))
    assert plain_upstream.recorder.commands == ["PLAIN"]


@pytest_twisted.ensureDeferred
async def test_empty_password_rejected_without_contacting_upstream(plain_upstream, fresh):
    """No SMTP server accepts an empty password: reject at once, no connection."""
    with pytest.raises(UnauthorizedLogin):
        await checker(plain_upstream.port).requestAvatarId(creds(b"alice", b""))
    assert plain_upstream.recorder.commands == []


@pytest_twisted.ensureDeferred
async def test_login_used_when_plain_not_offered(login_only_upstream, fresh):
    """Only LOGIN offered -> AUTH LOGIN; right and wrong passwords, one attempt each."""
    c = checker(login_only_upstream.port)
    assert await c.requestAvatarId(creds(b"alice", USERS[b"alice"])) == b"alice"
    with pytest.raises(UnauthorizedLogin):
        await c.requestAvatarId(creds(b"alice", WRONG))
    assert login_only_upstream.recorder.commands == ["LOGIN", "LOGIN"]
    assert login_only_upstream.recorder.calls == [("LOGIN", b"alice"), ("LOGIN", b"alice")]


@pytest_twisted.ensureDeferred
async def test_starttls_configured_but_not_offered_is_temporary(plain_upstream, fresh):
    """starttls = true against a server without STARTTLS: fail closed, no AUTH sent."""
    c = checker(plain_upstream.port, starttls=True)
    with pytest.raises(TemporaryFailure, match="STARTTLS"):
        await c.requestAvatarId(creds(b"alice", USERS[b"alice"]))
    assert plain_upstream.recorder.commands == []


# ---- TLS ------------------------------------------------------------------------------


@pytest.mark.parametrize("tls_hostname", [None, "localhost"])
@pytest_twisted.ensureDeferred
async def test_starttls_with_private_ca(starttls_upstream, pki, fresh, tls_hostname):
    """STARTTLS, cert checked against ca_file and the IP (host) or the DNS name
    (tls_hostname); right -> accept, wrong -> reject, one AUTH each."""
    c = checker(starttls_upstream.port, starttls=True, ca_file=pki["ca"].cert_path,
                tls_hostname=tls_hostname)
    assert await c.requestAvatarId(creds(b"alice", USERS[b"alice"])) == b"alice"
    with pytest.raises(UnauthorizedLogin):
        await c.requestAvatarId(creds(b"alice", WRONG))
    assert starttls_upstream.recorder.commands == ["PLAIN", "PLAIN"]


@pytest.mark.parametrize("cert, match", [("wrong", "TLS"), ("untrusted", "TLS"),
                                         ("nosan", "subjectAltName")])
@pytest_twisted.ensureDeferred
async def test_starttls_bad_certificate_refused(request, pki, cert, match):
    """A trusted certificate for another host name, or one from a CA not in ca_file
    (the handshake fails), or a CA-signed one with CN=127.0.0.1 but no subjectAltName
    (docs/twisted-notes.md section 2: Twisted's own verifier lets that one through):
    TemporaryFailure, no AUTH sent."""
    up = _upstream(request, "starttls", cert=pki[cert])
    c = checker(up.port, starttls=True, ca_file=pki["ca"].cert_path)
    with pytest.raises(TemporaryFailure, match=match):
        await c.requestAvatarId(creds(b"alice", USERS[b"alice"]))
    assert up.recorder.commands == []


@pytest_twisted.ensureDeferred
async def test_starttls_wrong_tls_hostname_refused(starttls_upstream, pki, fresh):
    """The good certificate, but tls_hostname names another host: refused."""
    c = checker(starttls_upstream.port, starttls=True, ca_file=pki["ca"].cert_path,
                tls_hostname="mail.example.net")
    with pytest.raises(TemporaryFailure, match="TLS"):
        await c.requestAvatarId(creds(b"alice", USERS[b"alice"]))
    assert starttls_upstream.recorder.commands == []


@pytest_twisted.ensureDeferred
async def test_post_handshake_check_refuses_san_less_certificate(request, pki):
    """Defence in depth: even with Twisted's fail-open TLS options (which accept the
    SAN-less certificate during the handshake), the checker inspects the peer
    certificate after the handshake and never sends AUTH."""
    from twisted.internet import reactor

    up = _upstream(request, "starttls", cert=pki["nosan"])
    lenient = tssl.optionsForClientTLS("127.0.0.1",
                                       trustRoot=load_trust_root(pki["ca"].cert_path))
    c = SmtpForwardChecker(reactor=reactor, endpoint=HostnameEndpoint(reactor, "127.0.0.1",
                                                                      up.port),
                           upstream="test", tls_creator=lenient, starttls=True,
                           implicit_tls=False, tls_hostname="127.0.0.1", timeout=5)
    with pytest.raises(TemporaryFailure, match="subjectAltName"):
        await c.requestAvatarId(creds(b"alice", USERS[b"alice"]))
    assert up.recorder.commands == []


@pytest_twisted.ensureDeferred
async def test_control_twisted_alone_accepts_the_san_less_certificate(request, pki):
    """Control for the SAN-less tests above: plain ``optionsForClientTLS`` completes a TLS
    session with the SAN-less certificate (the trap is real with these test certs)."""
    from twisted.internet import reactor

    up = _upstream(request, "implicit", cert=pki["nosan"])
    lenient = tssl.optionsForClientTLS("127.0.0.1",
                                       trustRoot=load_trust_root(pki["ca"].cert_path))
    greeting: Deferred[bytes] = Deferred()

    class Greeting(Protocol):
        def dataReceived(self, data: bytes) -> None:
            if not greeting.called:
                greeting.callback(data)
            self.transport.loseConnection()

        def connectionLost(self, reason: Any = None) -> None:
            if not greeting.called:
                greeting.errback(reason)

    from twisted.internet.endpoints import wrapClientTLS
    await connectProtocol(wrapClientTLS(lenient, HostnameEndpoint(reactor, "127.0.0.1",
                                                                  up.port)), Greeting())
    assert (await greeting).startswith(b"220 ")


@pytest_twisted.ensureDeferred
async def test_implicit_tls(request, pki):
    """tls = true (port 465 style): right -> accept, wrong -> reject, one AUTH each."""
    up = _upstream(request, "implicit", cert=pki["good"])
    c = checker(up.port, tls=True, ca_file=pki["ca"].cert_path)
    assert await c.requestAvatarId(creds(b"alice", USERS[b"alice"])) == b"alice"
    with pytest.raises(UnauthorizedLogin):
        await c.requestAvatarId(creds(b"alice", WRONG))
    assert up.recorder.commands == ["PLAIN", "PLAIN"]


@pytest.mark.parametrize("cert", ["wrong", "nosan"])
@pytest_twisted.ensureDeferred
async def test_implicit_tls_bad_identity_refused(request, pki, cert):
    """Implicit TLS with a wrong-host or SAN-less certificate: refused, no AUTH."""
    up = _upstream(request, "implicit", cert=pki[cert])
    c = checker(up.port, tls=True, ca_file=pki["ca"].cert_path)
    with pytest.raises(TemporaryFailure, match="TLS"):
        await c.requestAvatarId(creds(b"alice", USERS[b"alice"]))
    assert up.recorder.commands == []


@pytest_twisted.ensureDeferred
async def test_endpoint_string(starttls_upstream, pki, fresh):
    """``endpoint`` (a client endpoint string) instead of host/port; the certificate is
    still checked against tls_hostname."""
    c = from_config("upstream", SmtpOptions(
        endpoint=f"tcp:host=127.0.0.1:port={starttls_upstream.port}", starttls=True,
        ca_file=pki["ca"].cert_path, tls_hostname="localhost", timeout=5.0), deps())
    assert await c.requestAvatarId(creds(b"alice", USERS[b"alice"])) == b"alice"


# ---- availability: stopped, back, hanging ---------------------------------------------


@pytest_twisted.ensureDeferred
async def test_upstream_stopped_then_back(request):
    """Upstream down -> TemporaryFailure (refused); started again -> the same checker
    accepts again."""
    up = _upstream(request, "plain")
    c = checker(up.port)
    assert await c.requestAvatarId(creds(b"alice", USERS[b"alice"])) == b"alice"
    await deferToThread(up.stop)
    with pytest.raises(TemporaryFailure, match="connect"):
        await c.requestAvatarId(creds(b"alice", USERS[b"alice"]))
    await deferToThread(up.start)
    assert await c.requestAvatarId(creds(b"alice", USERS[b"alice"])) == b"alice"


@pytest.fixture
def hanging_port():
    """A loopback port that accepts TCP connections and never says anything."""
    with silent_port() as (port, connections):
        yield port, connections


@pytest.mark.alone
@pytest_twisted.ensureDeferred
async def test_hanging_upstream_times_out(hanging_port):
    """Accepts TCP, never greets: TemporaryFailure after ``timeout`` (measured), and the
    connection is dropped."""
    port, connections = hanging_port
    c = checker(port, timeout=0.5)
    started = time.monotonic()
    with pytest.raises(TemporaryFailure, match="0.5s"):
        await c.requestAvatarId(creds(b"alice", USERS[b"alice"]))
    elapsed = time.monotonic() - started
    assert 0.45 <= elapsed < 1.5, elapsed
    assert len(connections) == 1


@pytest_twisted.ensureDeferred
async def test_deadline_timer_cancelled_on_verdict(plain_upstream, fresh):
    """The whole-check timer is cancelled as soon as the verdict is known."""
    from twisted.internet import reactor

    created: list[Any] = []

    class RecordingClock:
        def callLater(self, *a: Any, **kw: Any) -> Any:
            call = reactor.callLater(*a, **kw)
            created.append(call)
            return call

        def __getattr__(self, name: str) -> Any:
            return getattr(reactor, name)

    c = from_config("upstream", SmtpOptions(host="127.0.0.1", port=plain_upstream.port,
                                                  starttls=False, timeout=30.0),
                    BackendDeps(RecordingClock(), SynchronousRunner(),
                                lambda n, m: SynchronousRunner()))
    started = reactor.seconds()
    assert await c.requestAvatarId(creds(b"alice", USERS[b"alice"])) == b"alice"
    deadline = [d for d in created if 25 < d.getTime() - started < 35]  # the 30 s timer
    assert len(deadline) == 1 and not deadline[0].active()


# ---- secrets ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_no_password_in_logs_errors_or_transcript(plain_upstream, request, pki, fresh):
    """Neither the password nor any base64 carrying it appears in log events, exception
    messages or reprs, for accept, reject, temporary failure and TLS refusal."""
    password = USERS[b"alice"]
    secrets = [password, base64.b64encode(b"\0alice\0" + password),
               base64.b64encode(password), base64.b64encode(b"alice\0alice\0" + password)]
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    texts: list[str] = []
    try:
        c = checker(plain_upstream.port)
        await c.requestAvatarId(creds(b"alice", password))
        with pytest.raises(UnauthorizedLogin) as e1:
            await c.requestAvatarId(creds(b"alice", password + b"x"))
        plain_upstream.recorder.tempfail = True
        with pytest.raises(TemporaryFailure) as e2:
            await c.requestAvatarId(creds(b"alice", password))
        bad = _upstream(request, "starttls", cert=pki["nosan"])
        with pytest.raises(TemporaryFailure) as e3:
            await checker(bad.port, starttls=True, ca_file=pki["ca"].cert_path
                          ).requestAvatarId(creds(b"alice", password))
        texts += [str(e.value) + repr(e.value) for e in (e1, e2, e3)] + [repr(c)]
    finally:
        globalLogPublisher.removeObserver(events.append)
    texts += [formatEvent(e) + repr(e) for e in events]
    joined = "\n".join(texts).encode("utf-8", "replace")
    for secret in secrets:
        assert secret not in joined


class EchoingUpstream(Protocol):
    """An upstream that repeats what it got in its answer to the credentials: the AUTH
    PLAIN line, or the LOGIN password line, after ``reply`` (a code and a prefix)."""

    reply = b"250 2.0.0 "
    login = False

    def connectionMade(self) -> None:
        self.buffer = b""
        self.transport.write(b"220 echo ESMTP\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            self.transport.write(self.answer(line) + b"\r\n")

    def answer(self, line: bytes) -> bytes:
        if line.startswith(b"EHLO"):
            return b"250-echo\r\n250 AUTH " + (b"LOGIN" if self.login else b"PLAIN LOGIN")
        if line == b"AUTH LOGIN":
            self.prompts = 1
            return b"334 VXNlcm5hbWU6"
        if line.startswith(b"AUTH PLAIN "):
            return self.reply + line
        if getattr(self, "prompts", 0) == 1:
            self.prompts = 2
            return b"334 UGFzc3dvcmQ6"
        if getattr(self, "prompts", 0) == 2:
            self.prompts = 0
            return self.reply + line
        return b"221 2.0.0 bye" if line == b"QUIT" else b"502 5.5.2 what?"


@pytest.mark.parametrize("reply, login, status", [
    (b"250 2.0.0 ", False, "S: 250 2.0.0 (text not logged: it may echo the credentials)"),
    (b"334 ", False, "S: 334 (text not logged: it may echo the credentials)"),
    (b"250 2.0.0 you said ", True, "S: 250 2.0.0 (text not logged: it may echo the credentials)"),
])
@pytest_twisted.ensureDeferred
async def test_an_upstream_echoing_the_credentials_is_not_logged(tmp_path, reply, login,
                                                               status):
    """An upstream answering the credentials with the line it got (``250 2.0.0 AUTH
    PLAIN AGFsaWNl...``, ``334 <the blob>``, the LOGIN password line): the client gets its
    454, and the transcript logged for it keeps those replies' codes, not their text
    (which carried the base64 of the password into the debug log)."""
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory
    from tests.conftest import event_text
    from tests.support import smtp_login, start_server
    password = "Echoed-Upstream-Secret-8"
    forms = [password, base64.b64encode(password.encode()).decode(),
             base64.b64encode(b"\0alice\0" + password.encode()).decode().rstrip("=")]
    upstream_class = type("Echo", (EchoingUpstream,), {"reply": reply, "login": login})
    port = reactor.listenTCP(0, Factory.forProtocol(upstream_class), interface="127.0.0.1")
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    server = await start_server(
        tmp_path, f'[backends.up]\ntype = "smtp"\nhost = "127.0.0.1"\n'
                  f'port = {port.getHost().port}\nstarttls = false\ntimeout = 5\n')
    try:
        code, _ = await smtp_login(server.port, "alice", password, mechanism="LOGIN" if login
                                   else "PLAIN")
    finally:
        await server.stop()
        await port.stopListening()
        globalLogPublisher.removeObserver(events.append)
    assert code == 454
    texts = [event_text(e) for e in events]
    transcripts = [t for t in texts if "transcript:" in t]
    assert any(status in t and "<redacted>" in t for t in transcripts), transcripts
    assert not [(f, t) for t in texts for f in forms if f in t]


def test_transcript_redacts_auth_payloads():
    """The probe's transcript shows the AUTH command but never its payload."""
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from saslsmtp.checkers.smtp import AuthProbe

    probe = AuthProbe(b"alice", b"s3cret!", clock=Clock(), tls_creator=None, starttls=False,
                      implicit_tls=False, tls_hostname="x", helo="client.test", upstream="t")
    transport = StringTransport()
    probe.makeConnection(transport)
    verdicts: list[Any] = []
    probe.result.addErrback(verdicts.append)
    for line in (b"220 hi", b"250-hi", b"250 AUTH LOGIN", b"334 VXNlcm5hbWU6",
                 b"334 UGFzc3dvcmQ6", b"535 5.7.8 no"):
        probe.dataReceived(line + b"\r\n")
    sent = transport.value()
    assert verdicts and verdicts[0].check(UnauthorizedLogin)
    assert base64.b64encode(b"s3cret!") in sent  # it was really sent...
    transcript = "\n".join(probe.transcript)
    assert "s3cret" not in transcript and base64.b64encode(b"s3cret!").decode() not in transcript
    assert "C: <redacted>" in transcript  # ...and redacted in the record
    assert sent.endswith(b"QUIT\r\n")
    assert "s3cret" not in repr(probe)


def test_ehlo_capabilities_parsing():
    """EHLO keywords are case-insensitive; the pre-RFC ``AUTH=`` form counts too."""
    caps = _capabilities([b"PIPELINING", b"auth plain Login", b"AUTH=CRAM-MD5", b"starttls"])
    assert caps["AUTH"] == ["PLAIN", "LOGIN", "CRAM-MD5"]
    assert "STARTTLS" in caps


def test_malformed_reply_is_temporary():
    """A reply that is not ``NNN[ -]text`` ends the check with TemporaryFailure."""
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from saslsmtp.checkers.smtp import AuthProbe

    probe = AuthProbe(b"a", b"b", clock=Clock(), tls_creator=None, starttls=False,
                      implicit_tls=False, tls_hostname="x", helo=None, upstream="t")
    probe.makeConnection(StringTransport())
    probe.dataReceived(b"hello there\r\n")
    failures: list[Any] = []
    probe.result.addErrback(failures.append)
    assert failures and failures[0].check(TemporaryFailure)


def test_config_options_and_missing_ca_file(tmp_path):
    """The smtp table parses into SmtpOptions; a missing ca_file names its key."""
    from saslsmtp.config import ConfigError, parse_config
    table = ('[auth]\nbackends = ["up"]\n[backends.up]\ntype = "smtp"\nhost = "mx.test"\n'
             'port = 465\ntls = true\ntls_hostname = "smtp.example.test"\ntimeout = 3\n')
    config = parse_config(table, str(tmp_path / "saslsmtp.toml"))
    options = config.backends["up"].options
    assert (options.host, options.port, options.tls, options.tls_hostname, options.timeout) \
        == ("mx.test", 465, True, "smtp.example.test", 3.0)
    with pytest.raises(ConfigError) as e:
        parse_config(table + 'ca_file = "nope.pem"\n', str(tmp_path / "saslsmtp.toml"))
    assert "backends.up.ca_file" in str(e.value)


@pytest_twisted.ensureDeferred
async def test_outage_warned_once_and_recovery_logged(plain_upstream: Upstream,
                                                      fresh: None) -> None:
    """Nothing listening: one warn for several failed checks; the upstream back (here: the
    checker pointed at a live one, as a restarted server would be): one info line."""
    from twisted.logger import LogLevel
    from tests.test_outage import LevelCapture
    from tests.upstreams import free_port

    c = checker(free_port())
    capture = LevelCapture()
    globalLogPublisher.addObserver(capture)
    try:
        for _ in range(3):
            with pytest.raises(TemporaryFailure, match="cannot connect"):
                await c.requestAvatarId(PasswordCredentials(b"alice", b"pw"))
        c._endpoint = checker(plain_upstream.port)._endpoint
        with pytest.raises(UnauthorizedLogin):  # a verdict: reachable again
            await c.requestAvatarId(PasswordCredentials(b"alice", b"wrong"))
    finally:
        globalLogPublisher.removeObserver(capture)
    [warned] = capture.at(LogLevel.warn)
    assert warned.startswith("backend upstream unreachable: upstream 127.0.0.1:")
    [recovered] = capture.at(LogLevel.info)
    assert recovered.startswith("backend upstream reachable again after ")
