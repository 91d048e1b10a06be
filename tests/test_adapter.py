"""Our mechanisms as ``IChallengeResponse`` inside stock ``twisted.mail.smtp.ESMTP``.

Modelled on Twisted's own ESMTPAuthenticationTests: StringTransport, a real Portal, the
transcript checked byte for byte (stock replies have no enhanced codes; that is stock
Twisted's wire, not ours)."""

from __future__ import annotations

import base64

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet.testing import StringTransport
from twisted.mail import smtp

from saslsmtp.adapter import FailedExchangeChecker, challengers
from saslsmtp.checkers.chain import TrustedIdentityChecker
from saslsmtp.mechanisms import builtin_mechanisms
from saslsmtp.script import Accept, Reject, Reply, ScriptRunner, AuthScript, Backends, scripted_spec
from saslsmtp.testing import MemoryRealm


def stock_server(extra_specs: dict | None = None) -> tuple[smtp.ESMTP, StringTransport, MemoryRealm]:
    db = InMemoryUsernamePasswordDatabaseDontUse(tim=b"tanstaaftanstaaf")
    realm = MemoryRealm()
    specs = {k: v for k, v in builtin_mechanisms().items() if k in ("PLAIN", "LOGIN")}
    specs.update(extra_specs or {})
    server = smtp.ESMTP(challengers(specs, "mx.example.test"))
    server.portal = Portal(realm, [db, TrustedIdentityChecker(), FailedExchangeChecker()])
    server.host = b"mx.example.test"
    transport = StringTransport()
    server.makeConnection(transport)
    server.dataReceived(b"EHLO client\r\n")
    transport.clear()
    return server, transport, realm


def test_plain_in_stock_esmtp() -> None:
    """AUTH PLAIN with an initial response: stock ESMTP logs in through our adapter."""
    server, transport, realm = stock_server()
    server.dataReceived(b"AUTH PLAIN AHRpbQB0YW5zdGFhZnRhbnN0YWFm\r\n")
    assert transport.value() == b"235 Authentication successful.\r\n"
    assert realm.logins == ["tim"]


def test_plain_authzid_refused_in_stock_esmtp() -> None:
    """RFC 4616's Ursel-as-Kurt is refused (stock PLAINCredentials would have ignored it)."""
    server, transport, realm = stock_server()
    server.dataReceived(b"AUTH PLAIN VXJzZWwAdGltAHRhbnN0YWFmdGFuc3RhYWY=\r\n")
    assert transport.value() == b"535 Authentication failed\r\n"
    assert realm.logins == []


def test_malformed_plain_does_not_crash_stock_esmtp() -> None:
    """Stock PLAINCredentials raised on this; the adapter turns it into a 535."""
    server, transport, _ = stock_server()
    server.dataReceived(b"AUTH PLAIN " + base64.b64encode(b"alice\0pw") + b"\r\n")
    assert transport.value() == b"535 Authentication failed\r\n"
    assert not transport.disconnecting


def test_login_prompts_in_stock_esmtp() -> None:
    server, transport, realm = stock_server()
    server.dataReceived(b"AUTH LOGIN\r\n")
    assert transport.value() == b"334 VXNlcm5hbWU6\r\n"
    transport.clear()
    server.dataReceived(base64.b64encode(b"tim") + b"\r\n")
    assert transport.value() == b"334 UGFzc3dvcmQ6\r\n"
    transport.clear()
    server.dataReceived(base64.b64encode(b"tanstaaftanstaaf") + b"\r\n")
    assert transport.value() == b"235 Authentication successful.\r\n"


def test_scripted_mechanism_in_stock_esmtp_goes_through_portal() -> None:
    """A scripted two-step mechanism as IChallengeResponse; Accept -> portal.login."""
    def auth(arguments, context):
        if arguments["state"] == 0:
            return Reply(b"who?")
        return Accept(username=arguments["response"].decode()) if arguments["response"] == b"tim" else Reject()

    from twisted.internet.task import Clock
    runner = ScriptRunner(AuthScript("<test>", auth, None), Clock(), 10.0, Backends({}))
    server, transport, realm = stock_server({"X-WHO": scripted_spec("X-WHO", runner)})
    server.dataReceived(b"AUTH X-WHO\r\n")
    assert transport.value() == b"334 " + base64.b64encode(b"who?") + b"\r\n"
    transport.clear()
    server.dataReceived(base64.b64encode(b"tim") + b"\r\n")
    assert transport.value() == b"235 Authentication successful.\r\n"
    assert realm.logins == ["tim"]
    server2, transport2, realm2 = stock_server({"X-WHO": scripted_spec("X-WHO", runner)})
    server2.dataReceived(b"AUTH X-WHO\r\n" + base64.b64encode(b"eve") + b"\r\n")
    assert transport2.value().endswith(b"535 Authentication failed\r\n")
    assert realm2.logins == []


def test_failed_exchange_carries_its_outcome() -> None:
    """FailedExchangeChecker raises errors that carry the exchange's Reject or Defer (no
    SMTP reply is made here: only SubmissionESMTP turns outcomes into replies)."""
    from saslsmtp.adapter import MechanismAdapter
    from saslsmtp.errors import AuthRejected, TemporaryFailure
    from saslsmtp.sasl.outcome import Defer

    plain = builtin_mechanisms()["PLAIN"]
    for message, error, outcome in [
        (b"\0tim", AuthRejected, Reject("Malformed PLAIN response")),
        (b"a\0tim\0pw", AuthRejected, Reject("Not authorized to requested authorization identity")),
    ]:
        adapter = MechanismAdapter(plain)
        adapter.setResponse(message)
        failures: list = []
        FailedExchangeChecker().requestAvatarId(adapter).addErrback(failures.append)
        assert isinstance(failures[0].value, error)
        assert failures[0].value.outcome == outcome
    deferred = MechanismAdapter(plain)
    deferred.failure = Defer("Backend busy", 421, "4.3.0")
    failures = []
    FailedExchangeChecker().requestAvatarId(deferred).addErrback(failures.append)
    assert isinstance(failures[0].value, TemporaryFailure)
    assert failures[0].value.outcome == Defer("Backend busy", 421, "4.3.0")


def test_a_refused_secret_is_answered_in_stock_protocols_too() -> None:
    """Through the stock-protocol adapter: CRAM-MD5 answers a secret's refusal (a users
    file's nologin) after the right digest, and a mechanism that accepts whatever secret
    it gets is answered the refusal all the same (the adapter's own check)."""
    from twisted.internet import defer
    from saslsmtp.adapter import IFailedExchange, MechanismAdapter
    from saslsmtp.sasl.cram_md5 import digest_from_password
    from saslsmtp.sasl.mechanism import MechanismSpec
    from saslsmtp.sasl.outcome import Lookup, Refusal, Secret

    moved = Reject("Moved", 525, "5.7.13")

    def resolver(request, session):
        return defer.succeed(Secret("plaintext", "pw", Refusal(moved, "users:1: user 'tim' refused: nologin")))

    cram = MechanismAdapter(builtin_mechanisms(("CRAM-MD5",))["CRAM-MD5"], resolver=resolver)
    cram.setResponse(b"tim " + digest_from_password("pw", cram.getChallenge()).encode())
    assert IFailedExchange.providedBy(cram) and cram.failure is moved

    class Careless:
        def __init__(self, session): ...
        def start(self, initial): return Lookup("tim", ("plaintext",))
        def resume(self, secret): return Accept("tim")
        def receive(self, response): raise AssertionError("no second step")
    careless = MechanismAdapter(MechanismSpec("X-CARELESS", Careless), resolver=resolver)
    assert IFailedExchange.providedBy(careless) and careless.failure is moved
