"""The AUTH engine (saslsmtp.auth): one Session per exchange, every request answered by
the right collaborator, failures as outcomes, the failure policy."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from saslsmtp.auth import AuthExchange, FailurePolicy, LoggedIn, failure_outcome
from saslsmtp.errors import AuthRejected, TemporaryFailure
from saslsmtp.limits.limiter import Limiter
from saslsmtp.limits.session import GATE_REFUSAL, ConnectionLimits
from saslsmtp.limits.settings import parse_limits
from saslsmtp.limits.store import MemoryStore
from saslsmtp.mechanisms import builtin_mechanisms
from saslsmtp.replies import REPLIES, auth_reply
from saslsmtp.sasl.mechanism import MechanismSpec
from saslsmtp.sasl.outcome import (TOKEN_VERDICT, Accept, Defer, Lookup, Reject, Reply, Secret,
                                   Session, TokenVerdict, ValidateToken, Verify)
from saslsmtp.testing import MemoryRealm, SMTPHarness
from saslsmtp.tlsinfo import TLSFacts

PLAIN_TIM = base64.b64encode(b"\0tim\0tanstaaftanstaaf")


@implementer(ICredentialsChecker)
class RecordingChecker:
    """Accepts anyone and keeps the credentials it was given."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self) -> None:
        self.seen: list[Any] = []

    def requestAvatarId(self, credentials: Any) -> "defer.Deferred[bytes]":
        self.seen.append(credentials)
        return defer.succeed(credentials.username)


class Scripted:
    """A mechanism that returns the outcomes it is given, one per step, and records
    what ``resume`` got."""

    def __init__(self, session: Session, outcomes: list[Any]) -> None:
        self.session = session
        self.outcomes = outcomes
        self.resumed: list[Any] = []

    def start(self, initial: bytes | None) -> Any:
        return self.outcomes.pop(0)

    def receive(self, response: bytes) -> Any:
        return self.outcomes.pop(0)

    def resume(self, secret: Secret | None) -> Any:
        self.resumed.append(secret)
        return self.outcomes.pop(0)


@pytest.fixture
def logged() -> Any:
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def exchange(outcomes: list[Any], **kwargs: Any) -> tuple[AuthExchange, list[Scripted]]:
    made: list[Scripted] = []

    def factory(session: Session) -> Scripted:
        made.append(Scripted(session, outcomes))
        return made[-1]
    harness = SMTPHarness(users={"tim": "tanstaaftanstaaf"})
    ex = AuthExchange(MechanismSpec("X-TEST", factory), Session(mechanism="X-TEST"),
                      portal=harness.portal, **kwargs)
    return ex, made


def result(d: "Any | defer.Deferred[Any]") -> Any:
    if not isinstance(d, defer.Deferred):
        return d  # the step finished at once
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the step did not finish"
    return box[0]


def test_one_session_per_exchange() -> None:
    """The Session is built once per AUTH: the mechanism, the password checker and the
    resolver all get that same object (no second build of the TLS channel-binding facts)."""
    checker = RecordingChecker()
    seen: list[Session] = []

    def resolver(request: Any, session: Session) -> "defer.Deferred[Any]":
        seen.append(session)
        return defer.succeed(Secret("plaintext", "tanstaaftanstaaf"))

    h = SMTPHarness(checkers=[checker], resolver=resolver,
                    mechanism_names=["PLAIN", "CRAM-MD5"])
    built: list[Session] = []
    original = h.protocol.session

    def counting(mechanism: str = "") -> Session:
        built.append(original(mechanism))
        return built[-1]
    h.protocol.session = counting  # type: ignore[method-assign]
    h.send(b"EHLO client.example\r\n")
    assert h.send(b"AUTH PLAIN " + PLAIN_TIM + b"\r\n") == b"235 2.7.0 Authentication successful\r\n"
    assert len(built) == 1
    assert checker.seen[0].session is built[0]
    assert built[0].mechanism == "PLAIN"

    h2 = SMTPHarness(users={"tim": "tanstaaftanstaaf"}, resolver=resolver,
                     mechanism_names=["CRAM-MD5"])
    h2.protocol.session = counting  # type: ignore[method-assign]
    h2.send(b"EHLO client.example\r\n")
    assert h2.send(b"AUTH CRAM-MD5\r\n").startswith(b"334 ")
    h2.send(base64.b64encode(b"tim 0123456789abcdef0123456789abcdef") + b"\r\n")
    assert len(built) == 2
    assert seen == [built[1]]


def test_verify_reaches_the_checker_as_text_and_bytes() -> None:
    """A Verify becomes PasswordCredentials once: bytes for IUsernamePassword, and the
    mechanism's own text in ``request`` (nothing decoded twice)."""
    checker = RecordingChecker()
    h = SMTPHarness(checkers=[checker])
    h.send(b"EHLO client.example\r\n")
    blob = base64.b64encode("\0j\u00f6rg\0p\u00e4ss".encode())
    assert h.send(b"AUTH PLAIN " + blob + b"\r\n").startswith(b"235 ")
    credentials = checker.seen[0]
    assert credentials.request == Verify("j\u00f6rg", "p\u00e4ss", "")
    assert (credentials.username, credentials.password) == ("j\u00f6rg".encode(), "p\u00e4ss".encode())
    assert h.protocol.auth_user == "j\u00f6rg"


def test_lookup_goes_to_the_resolver_then_resume() -> None:
    """Lookup and ValidateToken are answered by the resolver; its answer is resumed."""
    asked: list[Any] = []
    verdict = Secret(TOKEN_VERDICT, TokenVerdict(True, "tim"))

    def resolver(request: Any, session: Session) -> "defer.Deferred[Any]":
        asked.append(request)
        return defer.succeed(verdict)
    request = ValidateToken("tok", "tim", "X-TEST")
    ex, made = exchange([request, Accept("tim")], resolver=resolver)
    out = result(ex.start(None))
    assert isinstance(out, LoggedIn) and out.username == "tim" and out.mechanism == "X-TEST"
    assert asked == [request] and made[0].resumed == [verdict]

    ex, made = exchange([Lookup("tim", ("plaintext",)), Reject()], resolver=resolver)
    assert result(ex.start(None)) == Reject()


def test_accept_logs_in_through_the_portal_with_its_reason() -> None:
    """Accept -> portal.login -> LoggedIn carrying the reason for 235 (no side channel)."""
    ex, _ = exchange([Accept("tim", "Welcome back")])
    out = result(ex.start(None))
    assert isinstance(out, LoggedIn)
    assert (out.username, out.text) == ("tim", "Welcome back")


def test_accept_without_username_defers() -> None:
    ex, _ = exchange([Accept()])
    assert result(ex.start(None)) == Defer()


def test_step_limit() -> None:
    """More challenges than ``max_steps`` end the exchange with a Reject."""
    ex, _ = exchange([Reply(b"1"), Reply(b"2"), Reply(b"3")], max_steps=2)
    assert result(ex.start(None)) == Reply(b"1")
    assert result(ex.receive(b"")) == Reply(b"2")
    assert result(ex.receive(b"")) == Reject("Authentication exchange too long")


def test_script_decides_verify() -> None:
    """With a password script, Verify goes to it; its Accept logs in, its Reject and
    Defer come back unchanged."""
    class Script:
        def __init__(self, answer: Any) -> None:
            self.answer = answer
            self.asked: list[Verify] = []

        def verify_password(self, request: Verify, session: Session) -> "defer.Deferred[Any]":
            self.asked.append(request)
            return defer.succeed(self.answer)

    for answer in (Reject("no", 550, "5.7.1"), Defer("later", disconnect=True)):
        script = Script(answer)
        ex, _ = exchange([Verify("tim", "pw")], script=script)
        assert result(ex.start(None)) == answer
        assert script.asked == [Verify("tim", "pw")]
    ex, _ = exchange([Verify("tim", "pw")], script=Script(Accept("tim", "hi")))
    out = result(ex.start(None))
    assert isinstance(out, LoggedIn) and out.text == "hi"


@pytest.mark.parametrize("error, expected", [
    (AuthRejected(Reject("Go away", 550, "5.7.1", disconnect=True)), Reject("Go away", 550, "5.7.1", True)),
    (AuthRejected(), Reject()),
    (UnauthorizedLogin("wrong password"), Reject()),
    (TemporaryFailure("ldap down"), Defer()),
    (TemporaryFailure("script", Defer("Later", 421, "4.3.0")), Defer("Later", 421, "4.3.0")),
    (ValueError("a bug"), Defer()),
])
def test_failure_outcome(error: Exception, expected: Any, logged: list[dict]) -> None:
    """Errors carry outcomes; a bare error maps to the default outcome of its kind, and
    only an unexpected one is logged with its traceback."""
    assert failure_outcome(Failure(error)) == expected
    tracebacks = [e for e in logged if "log_failure" in e]
    assert len(tracebacks) == (1 if isinstance(error, ValueError) else 0)


def test_lost_connection_logs_out_a_late_login() -> None:
    """A login that completes after the connection went away is logged out at once."""
    realm = MemoryRealm()
    d: defer.Deferred[Any] = defer.Deferred()

    class SlowPortal:
        def login(self, *args: Any) -> "defer.Deferred[Any]":
            return d
    ex = AuthExchange(builtin_mechanisms()["PLAIN"], Session(), portal=SlowPortal())
    step = ex.start(b"\0tim\0pw")
    ex.cancel()
    d.callback(realm.requestAvatar(b"tim", None))
    assert result(step) == Defer()
    assert realm.logouts == 1


def test_failure_policy_counts_to_the_limit() -> None:
    policy = FailurePolicy(limit=2, delay=0.5)
    assert policy.failed() is False
    policy.succeeded()
    assert policy.failed() is False
    assert policy.failed() is True


@pytest.mark.parametrize("outcome, line", [
    (Reject(), b"535 5.7.8 Authentication credentials invalid\r\n"),
    (Defer(), b"454 4.7.0 Temporary authentication failure\r\n"),
    (Reject("Bad\r\nMAIL FROM:<x>"), b"535 5.7.8 Bad MAIL FROM:<x>\r\n"),
    (Reject("No", 454, "4.7.0"), b"535 5.7.8 No\r\n"),  # a Reject stays permanent
    (Defer("Later", 554, "5.7.0"), b"454 4.7.0 Later\r\n"),  # a Defer stays temporary
    (Reject("No", 550, "4.7.1"), b"550 5.0.0 No\r\n"),  # the enhanced code follows the code
    (Defer("Wait", 421, "4.3.2"), b"421 4.3.2 Wait\r\n"),
])
def test_one_outcome_to_reply_mapping(outcome: Any, line: bytes) -> None:
    """``auth_reply`` is the one mapping from a failed exchange to its reply."""
    assert auth_reply(outcome).to_bytes() == line
    assert REPLIES["auth_invalid"].code == 535


def test_scripted_password_login_is_who_the_script_accepted() -> None:
    """PLAIN with a script: the script sees the decoded text, its Accept names the
    identity that logs in (and that the Received header shows), its reason goes with 235."""
    seen: list[dict] = []

    def auth(arguments: Any, context: dict) -> Any:
        seen.append(dict(arguments))
        return Accept(username="carol", reason="Hello carol")
    h = SMTPHarness(script=auth)
    h.send(b"EHLO client.example\r\n")
    assert h.send(b"AUTH PLAIN " + PLAIN_TIM + b"\r\n") == b"235 2.7.0 Hello carol\r\n"
    assert (seen[0]["username"], seen[0]["password"]) == ("tim", "tanstaaftanstaaf")
    assert h.realm.logins == ["carol"] and h.protocol.auth_user == "carol"


def test_tls_facts_read_once_per_exchange(monkeypatch: pytest.MonkeyPatch) -> None:
    """On TLS, the channel bindings and client certificate are read once per AUTH, however
    many hops (mechanism, checker, script) use the Session."""
    import saslsmtp.peer
    calls: list[Any] = []

    def facts(transport: Any, identity: str) -> TLSFacts:
        calls.append(transport)
        return TLSFacts({"tls-unique": b"binding"})
    monkeypatch.setattr(saslsmtp.peer, "tls_facts", facts)
    checker = RecordingChecker()
    h = SMTPHarness(checkers=[checker], tls=True)
    h.send(b"EHLO client.example\r\n")
    assert h.send(b"AUTH PLAIN " + PLAIN_TIM + b"\r\n").startswith(b"235 ")
    assert len(calls) == 1
    assert checker.seen[0].session.channel_bindings == {"tls-unique": b"binding"}


def test_a_check_under_the_limits_runs_on_when_the_client_leaves() -> None:
    """With the limits' guard, ``cancel`` (the connection went away) says the step must
    run on, so the protocol leaves its Deferred alone: the verdict still counts, and the
    next attempt from the address is refused unchecked.  Without a guard nothing needs
    to run on (the protocol cancels the step)."""
    clock = Clock()
    settings = parse_limits({"auth_failures_per_ip": "1/1m"}, lambda key, message: None)
    limits = ConnectionLimits(Limiter(settings, MemoryStore(clock), clock))
    d: defer.Deferred[Any] = defer.Deferred()

    class SlowPortal:
        def login(self, *args: Any) -> "defer.Deferred[Any]":
            return d
    ex = AuthExchange(builtin_mechanisms()["PLAIN"], Session(), portal=SlowPortal(),
                      guard=limits.attempt("192.0.2.7", "PLAIN"))
    step = ex.start(b"\0tim\0wrong")
    assert isinstance(step, defer.Deferred) and not step.called
    assert ex.cancel() is True
    d.errback(UnauthorizedLogin())
    assert result(step) == Reject()
    assert limits.attempt("192.0.2.7", "PLAIN").admit("tim") is GATE_REFUSAL

    unguarded = AuthExchange(builtin_mechanisms()["PLAIN"], Session(), portal=SlowPortal())
    unguarded.start(b"\0tim\0wrong")
    assert unguarded.cancel() is False
