"""``saslsmtp.embed`` in stock Twisted protocols, over a string transport.

Stock ``twisted.mail.smtp.ESMTP`` and ``twisted.mail.imap4.IMAP4Server`` with our PLAIN,
LOGIN, CRAM-MD5 (secrets from a passwd-file) and a scripted mechanism; transcripts are
checked byte for byte (their replies are stock Twisted's wire, not ours)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from twisted.cred.portal import IRealm
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.mail import imap4, smtp
from zope.interface import implementer

from saslsmtp import embed
from saslsmtp.errors import AuthRejected
from saslsmtp.options import OptionsError
from saslsmtp.script import Accept, Defer, Reject, Reply
from saslsmtp.testing import MemoryRealm

USERS = "alice:{PLAIN}alice-secret\nbob:{SHA256-CRYPT}$5$rounds=5000$salt$x\n"


def who(arguments: Any, context: dict) -> Any:
    """X-WHO: the server asks "who?", the answer "alice" is accepted, "slow" is asynchronous."""
    if arguments["state"] == 0:
        return Reply(b"who?")
    name = arguments["response"].decode()
    if name == "slow":
        return context.setdefault("later", defer.Deferred())
    return Accept(username=name) if name == "alice" else Reject("Not you")


@pytest.fixture
def users(tmp_path: Path) -> Any:
    path = tmp_path / "users.passwd"
    path.write_text(USERS)
    return embed.file_checker(Clock(), path=str(path))


def chal(users: Any, script_fn: Any = who) -> dict:
    script = embed.auth_script(script_fn, clock=Clock())
    return embed.challengers(["PLAIN", "LOGIN", "CRAM-MD5", "X-WHO"], script=script,
                             secrets=[users], hostname="mx.example.test")


def esmtp(users: Any, script_fn: Any = who) -> tuple[smtp.ESMTP, StringTransport, MemoryRealm]:
    realm = MemoryRealm()
    server = smtp.ESMTP(chal(users, script_fn))
    server.host = b"mx.example.test"
    server.portal = embed.portal(realm, [users])
    transport = StringTransport()
    server.makeConnection(transport)
    server.dataReceived(b"EHLO client\r\n")
    transport.clear()
    return server, transport, realm


def say(server: Any, transport: StringTransport, line: bytes) -> bytes:
    server.dataReceived(line + b"\r\n")
    value = transport.value()
    transport.clear()
    return value


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def test_ehlo_announces_the_chosen_mechanisms(users: Any) -> None:
    """The mechanisms are announced in the order given."""
    server, transport, _ = esmtp(users)
    assert b"250 AUTH PLAIN LOGIN CRAM-MD5 X-WHO\r\n" in say(server, transport, b"EHLO client")


def test_plain_login_against_the_passwd_file(users: Any) -> None:
    server, transport, realm = esmtp(users)
    assert say(server, transport, b"AUTH PLAIN " + b64(b"\0alice\0alice-secret")) == \
        b"235 Authentication successful.\r\n"
    assert realm.logins == ["alice"]


def test_wrong_password_malformed_plain_and_authzid_are_refused(users: Any) -> None:
    """A wrong password, malformed PLAIN (stock PLAINCredentials crashed on it) and an
    authzid other than the user (stock ignored it) are all 535; the connection stays."""
    for message in (b"\0alice\0wrong", b"alice\0pw", b"bob\0alice\0alice-secret"):
        server, transport, realm = esmtp(users)
        assert say(server, transport, b"AUTH PLAIN " + b64(message)) == \
            b"535 Authentication failed\r\n"
        assert realm.logins == [] and not transport.disconnecting


def test_cram_md5_reads_the_secret_from_the_passwd_file(users: Any) -> None:
    server, transport, realm = esmtp(users)
    reply = say(server, transport, b"AUTH CRAM-MD5")
    challenge = base64.b64decode(reply[4:])
    assert challenge.startswith(b"<") and challenge.endswith(b"@mx.example.test>")
    digest = hmac.new(b"alice-secret", challenge, hashlib.md5).hexdigest()
    assert say(server, transport, b64(b"alice " + digest.encode())) == \
        b"235 Authentication successful.\r\n"
    assert realm.logins == ["alice"]


def test_cram_md5_wrong_digest(users: Any) -> None:
    server, transport, realm = esmtp(users)
    say(server, transport, b"AUTH CRAM-MD5")
    assert say(server, transport, b64(b"alice " + b"0" * 32)) == b"535 Authentication failed\r\n"


def test_an_asynchronous_last_step_is_waited_for(users: Any) -> None:
    """The script's last step returns an unfired Deferred: portal.login waits for it."""
    context: dict = {}

    def slow(arguments: Any, ctx: dict) -> Any:
        if arguments["state"] == 0:
            return Reply(b"who?")
        return context.setdefault("d", defer.Deferred())
    server, transport, realm = esmtp(users, slow)
    say(server, transport, b"AUTH X-WHO")
    assert say(server, transport, b64(b"alice")) == b""
    context["d"].callback(Accept(username="alice"))
    assert transport.value() == b"235 Authentication successful.\r\n"
    assert realm.logins == ["alice"]


def test_an_asynchronous_step_that_wants_another_challenge_fails_honestly(users: Any) -> None:
    """A stock protocol cannot send a challenge after an asynchronous step: the login fails
    with a TemporaryFailure carrying that reason (stock ESMTP answers 451 and logs it)."""
    from saslsmtp.adapter import ExchangeChecker
    from saslsmtp.errors import TemporaryFailure
    context: dict = {}

    def chatty(arguments: Any, ctx: dict) -> Any:
        if arguments["state"] == 0:
            return Reply(b"who?")
        return context.setdefault("d", defer.Deferred())
    script = embed.auth_script(chatty, clock=Clock())
    adapter = embed.challengers(["X-WHO"], script=script)[b"X-WHO"]()
    adapter.setResponse(b"alice")
    assert not adapter.moreChallenges()
    failures: list = []
    ExchangeChecker().requestAvatarId(adapter).addErrback(failures.append)
    context["d"].callback(Reply(b"and your code?"))
    assert failures[0].check(TemporaryFailure)
    assert failures[0].value.outcome == Defer("This mechanism needs an asynchronous server")
    assert "cannot send" in str(failures[0].value)


def test_a_stock_protocol_reports_a_temporary_failure_as_451(users: Any) -> None:
    """Documented limit: stock ESMTP has no 454 for a backend that is down; it answers 451
    and logs the TemporaryFailure with its traceback."""
    from twisted.logger import globalLogPublisher
    from saslsmtp.errors import TemporaryFailure
    events: list = []
    globalLogPublisher.addObserver(events.append)
    try:
        server, transport, realm = esmtp(users, lambda a, c: Reply(b"x") if a["state"] == 0
                                         else Defer("Backend down"))
        say(server, transport, b"AUTH X-WHO")
        assert say(server, transport, b64(b"alice")) == \
            b"451 Requested action aborted: local error in processing\r\n"
    finally:
        globalLogPublisher.removeObserver(events.append)
    failures = [e.get("log_failure") or e["failure"] for e in events
                if "log_failure" in e or "failure" in e]
    assert [f.check(TemporaryFailure) for f in failures] == [TemporaryFailure]
    assert failures[0].value.outcome == Defer("Backend down")


def test_each_exchange_gets_its_own_session_and_context(users: Any) -> None:
    """Two exchanges never share a script context (stock factories take no connection)."""
    factory = chal(users)[b"X-WHO"]
    first, second = factory(), factory()
    assert first.session is not second.session
    assert first.session.context is not second.session.context


def test_challengers_refuse_what_cannot_work(users: Any) -> None:
    with pytest.raises(ValueError, match="X-NOPE is not built in"):
        embed.challengers(["X-NOPE"])
    with pytest.raises(ValueError, match="CRAM-MD5 needs a stored secret"):
        embed.challengers(["CRAM-MD5"])
    with pytest.raises(ValueError, match="EXTERNAL cannot run in a stock"):
        embed.challengers(["EXTERNAL"])


# IMAP4Server ---------------------------------------------------------------------


@implementer(IRealm)
class Accounts:
    """IMAP accounts in memory; ``logins`` records who logged in."""

    def __init__(self) -> None:
        self.logins: list[str] = []

    def requestAvatar(self, avatar_id: bytes, mind: Any, *interfaces: Any) -> tuple:
        self.logins.append(avatar_id.decode())
        return imap4.IAccount, imap4.MemoryAccount(avatar_id.decode()), lambda: None


def imap(users: Any) -> tuple[imap4.IMAP4Server, StringTransport, Accounts]:
    realm = Accounts()
    server = imap4.IMAP4Server(chal=chal(users))
    server.portal = embed.portal(realm, [users])
    transport = StringTransport()
    server.makeConnection(transport)
    transport.clear()
    return server, transport, realm


def test_imap_capability_lists_the_mechanisms(users: Any) -> None:
    server, transport, _ = imap(users)
    assert b" AUTH=PLAIN AUTH=LOGIN AUTH=CRAM-MD5 AUTH=X-WHO" in say(server, transport, b"a1 CAPABILITY")


def test_imap_authenticate_plain(users: Any) -> None:
    server, transport, realm = imap(users)
    assert say(server, transport, b"a1 AUTHENTICATE PLAIN") == b"+\r\n"
    assert say(server, transport, b64(b"\0alice\0alice-secret")) == \
        b"a1 OK Authentication successful\r\n"
    assert realm.logins == ["alice"]


def test_imap_authenticate_refusals(users: Any) -> None:
    """Wrong password, malformed PLAIN and a foreign authzid: NO, the session goes on."""
    for message in (b"\0alice\0wrong", b"alice\0pw", b"bob\0alice\0alice-secret"):
        server, transport, realm = imap(users)
        say(server, transport, b"a1 AUTHENTICATE PLAIN")
        assert say(server, transport, b64(message)) == \
            b"a1 NO Authentication failed: unauthorized\r\n"
        assert realm.logins == []
        assert say(server, transport, b"a2 NOOP") == b"a2 OK NOOP No operation performed\r\n"


def test_imap_authenticate_login_and_login_command(users: Any) -> None:
    server, transport, realm = imap(users)
    assert say(server, transport, b"a1 AUTHENTICATE LOGIN") == b"+ VXNlcm5hbWU6\r\n"
    assert say(server, transport, b64(b"alice")) == b"+ UGFzc3dvcmQ6\r\n"
    assert say(server, transport, b64(b"alice-secret")) == b"a1 OK Authentication successful\r\n"
    server, transport, realm = imap(users)
    assert say(server, transport, b"a1 LOGIN alice alice-secret") == b"a1 OK LOGIN succeeded\r\n"


def test_imap_authenticate_cram_md5(users: Any) -> None:
    server, transport, realm = imap(users)
    reply = say(server, transport, b"a1 AUTHENTICATE CRAM-MD5")
    challenge = base64.b64decode(reply[2:])
    digest = hmac.new(b"alice-secret", challenge, hashlib.md5).hexdigest()
    assert say(server, transport, b64(b"alice " + digest.encode())) == \
        b"a1 OK Authentication successful\r\n"
    assert realm.logins == ["alice"]


@pytest.mark.parametrize("connect, command, challenge, accepted, refused", [
    pytest.param(esmtp, b"AUTH X-WHO", b"334 ", b"235 Authentication successful.\r\n",
                 b"535 Authentication failed\r\n", id="esmtp"),
    pytest.param(imap, b"a1 AUTHENTICATE X-WHO", b"+ ", b"a1 OK Authentication successful\r\n",
                 b"a1 NO Authentication failed: unauthorized\r\n", id="imap"),
])
def test_scripted_mechanism_ends_in_the_portal(users: Any, connect: Any, command: bytes,
                                               challenge: bytes, accepted: bytes,
                                               refused: bytes) -> None:
    """The same script behind either stock protocol: its challenge goes out on that
    protocol's wire, alice reaches the realm, eve is refused."""
    server, transport, realm = connect(users)
    assert say(server, transport, command) == challenge + b64(b"who?") + b"\r\n"
    assert say(server, transport, b64(b"alice")) == accepted
    assert realm.logins == ["alice"]
    server, transport, realm = connect(users)
    say(server, transport, command)
    assert say(server, transport, b64(b"eve")) == refused


def test_imap_reports_a_temporary_failure_as_bad(users: Any) -> None:
    """Documented limit: stock IMAP4Server has no "try later" for a backend that is down."""
    realm = Accounts()
    script = embed.auth_script(lambda a, c: Reply(b"x") if a["state"] == 0 else Defer(),
                               clock=Clock())
    server = imap4.IMAP4Server(chal=embed.challengers(["X-WHO"], script=script))
    server.portal = embed.portal(realm, [users])
    transport = StringTransport()
    server.makeConnection(transport)
    transport.clear()
    say(server, transport, b"a1 AUTHENTICATE X-WHO")
    assert say(server, transport, b64(b"alice")) == \
        b"a1 BAD Server error: login failed unexpectedly\r\n"
    assert realm.logins == []


# a Portal of your own -------------------------------------------------------------


def test_own_portal_needs_the_exchange_checkers(users: Any) -> None:
    """A Portal with only the application's checkers cannot log in a mechanism's Accept:
    stock ESMTP's 451 (as docs/library.md says); with ``exchange_checkers()`` it can."""
    from twisted.cred.portal import Portal
    script = embed.auth_script(who, clock=Clock())
    for extra, reply in (([], b"451 Requested action aborted: local error in processing\r\n"),
                         (embed.exchange_checkers(), b"235 Authentication successful.\r\n")):
        realm = MemoryRealm()
        server = smtp.ESMTP(embed.challengers(["X-WHO"], script=script))
        server.portal = Portal(realm, [users, *extra])
        transport = StringTransport()
        server.makeConnection(transport)
        server.dataReceived(b"EHLO client\r\n")
        say(server, transport, b"AUTH X-WHO")
        assert say(server, transport, b64(b"alice")) == reply
        assert realm.logins == (["alice"] if extra else [])


# SubmissionESMTP from public names ------------------------------------------------------

OTP_SCRIPT = """
from saslsmtp.script import Accept, Reject, Reply

MECHANISMS = {"X-OTP": {"plaintext": False}}


def auth(arguments, context):
    if arguments["response"] is None:
        return Reply(b"Code:")
    return Accept(username="alice") if arguments["response"] == b"123456" else Reject()
"""


def submission(auth: Any, checkers: list, **settings: Any
               ) -> tuple[Any, StringTransport, MemoryRealm]:
    """A SubmissionESMTP connection built the way docs/library.md shows."""
    from saslsmtp.protocol import EngineSettings, SubmissionESMTP
    realm = MemoryRealm()
    server = SubmissionESMTP(
        portal=embed.portal(realm, checkers), clock=Clock(),
        settings=EngineSettings(hostname="mx.example.test", mechanisms=auth.names,
                                failure_delay=0.0, **settings),
        mechanisms=auth.mechanisms, resolver=auth.resolver, blocking=auth.blocking)
    transport = StringTransport()
    server.makeConnection(transport)
    transport.clear()
    return server, transport, realm


def test_submission_auth_cram_md5_reads_the_passwd_file(users: Any) -> None:
    """Every step over the wire, byte for byte: the resolver hands CRAM-MD5 the stored
    secret, and our replies (enhanced codes) are SubmissionESMTP's."""
    auth = embed.submission_auth(["CRAM-MD5", "PLAIN"], secrets=[users])
    assert auth.names == ("CRAM-MD5", "PLAIN")
    server, transport, realm = submission(auth, checkers=[users], require_tls=False)
    assert say(server, transport, b"EHLO client.example") == (
        b"250-mx.example.test\r\n250-PIPELINING\r\n250-SIZE 26214400\r\n250-8BITMIME\r\n"
        b"250-ENHANCEDSTATUSCODES\r\n250-SMTPUTF8\r\n250 AUTH CRAM-MD5 PLAIN\r\n")
    reply = say(server, transport, b"AUTH CRAM-MD5")
    assert reply.startswith(b"334 ")
    challenge = base64.b64decode(reply[4:])
    digest = hmac.new(b"alice-secret", challenge, hashlib.md5).hexdigest()
    assert say(server, transport, b64(b"alice " + digest.encode())) == \
        b"235 2.7.0 Authentication successful\r\n"
    assert realm.logins == ["alice"]


@pytest.mark.parametrize("offered, missing", [
    (("PLAIN", "X-NOPE"), "X-NOPE"),      # a mechanism that does not exist
    (("plain",), "plain"),                 # names are upper case, as submission_auth gives them
    (("PLAIN", "CRAM-MD5"), "CRAM-MD5"),   # a built-in submission_auth was not asked for
])
def test_submission_esmtp_refuses_a_mechanism_it_has_no_spec_for(users: Any, offered: tuple,
                                                                  missing: str) -> None:
    """``EngineSettings.mechanisms`` naming a mechanism ``mechanisms=`` does not serve is a
    ``ValueError`` naming it when the protocol is built; it was left out of EHLO without a
    word, so the embedder's typo looked like a client that never asks for it."""
    from saslsmtp.protocol import EngineSettings, SubmissionESMTP
    auth = embed.submission_auth(["PLAIN"])
    with pytest.raises(ValueError, match=f"without a MechanismSpec: {missing} "):
        SubmissionESMTP(portal=embed.portal(MemoryRealm(), [users]), clock=Clock(),
                        settings=EngineSettings(mechanisms=offered), mechanisms=auth.mechanisms)


def test_submission_auth_keeps_what_the_script_declares(users: Any, tmp_path: Path) -> None:
    """A scripted mechanism declared ``plaintext: False`` is offered before TLS under
    require_tls, PLAIN is not (as in the daemon; ``challengers`` has no TLS to honour)."""
    path = tmp_path / "otp.py"
    path.write_text(OTP_SCRIPT)
    script = embed.auth_script(str(path), clock=Clock())
    auth = embed.submission_auth(["PLAIN", "X-OTP"], script=script)
    assert not auth.mechanisms["X-OTP"].plaintext and auth.mechanisms["PLAIN"].plaintext
    server, transport, realm = submission(auth, checkers=[users], require_tls=True)
    assert say(server, transport, b"EHLO client.example").endswith(b"250 AUTH X-OTP\r\n")
    assert say(server, transport, b"AUTH X-OTP") == b"334 Q29kZTo=\r\n"
    assert say(server, transport, b64(b"123456")) == b"235 2.7.0 Authentication successful\r\n"
    assert realm.logins == ["alice"]


def test_submission_auth_refuses_what_cannot_work(users: Any) -> None:
    """A ValueError naming the mechanism, at build time, instead of a 454 at every AUTH."""
    script = embed.auth_script(who, clock=Clock())
    cases = [
        ((["CRAM-MD5"],), {}, "CRAM-MD5 needs a stored secret"),
        ((["OAUTHBEARER"],), {}, "OAUTHBEARER needs a token validator"),
        ((["X-NOPE"],), {}, "X-NOPE is not built in and no script serves it"),
        ((["PLAIN"],), {"secrets": [object()]}, "secrets: every item must be"),
        ((["PLAIN"],), {"tokens": [users]}, "tokens: every item must be"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            embed.submission_auth(*args, **kwargs)
    built = embed.submission_auth(["EXTERNAL", "SCRAM-SHA-256-PLUS", "X-WHO"], script=script,
                                  secrets=[users])
    assert built.names == ("EXTERNAL", "SCRAM-SHA-256-PLUS", "X-WHO")


# the script as a checker in any portal ----------------------------------------------


def password_script(arguments: Any, context: dict) -> Any:
    """alice / pw, text; the script sees str whatever the credentials carried."""
    assert isinstance(arguments["username"], str) and isinstance(arguments["password"], str)
    ok = (arguments["username"], arguments["password"]) == ("alice", "pw\u00e9")
    return Accept() if ok else Reject()


def login(portal: Any, credentials: Any) -> Any:
    """``portal.login``'s result, or its Failure, at once (everything here is synchronous)."""
    from twisted.mail.interfaces import IMessageDelivery
    results: list = []
    portal.login(credentials, None, IMessageDelivery).addBoth(results.append)
    assert len(results) == 1
    return results[0]


@pytest.mark.parametrize("username, password", [
    ("alice", "pw\u00e9"), (b"alice", "pw\u00e9".encode())], ids=["str", "bytes"])
def test_script_password_checker_takes_text_or_utf8(username: Any, password: Any) -> None:
    """``UsernamePassword("alice", "pw")``, as users build it, logs in like bytes do
    (requestAvatarId raised AttributeError: a 451 and a traceback in a stock protocol)."""
    from twisted.cred.credentials import UsernamePassword
    from twisted.cred.portal import Portal
    realm = MemoryRealm()
    script = embed.auth_script(password_script, clock=Clock())
    portal = Portal(realm, [embed.script_password_checker(script)])
    interface, avatar, logout = login(portal, UsernamePassword(username, password))
    assert realm.logins == ["alice"]
    refused = login(portal, UsernamePassword(username, "wrong"))
    assert refused.check(AuthRejected) and realm.logins == ["alice"]


def test_script_password_checker_refuses_what_is_not_text() -> None:
    """Bytes that are not UTF-8 are a wrong password (never "replaced" into another
    password); a value that is neither str nor bytes fails the Deferred with TypeError."""
    from twisted.cred.credentials import UsernamePassword
    from twisted.cred.error import UnauthorizedLogin
    checker = embed.script_password_checker(embed.auth_script(password_script, clock=Clock()))
    failures: list = []
    checker.requestAvatarId(UsernamePassword(b"alice", b"pw\xe9")).addErrback(failures.append)
    checker.requestAvatarId(UsernamePassword(None, "pw")).addErrback(failures.append)
    assert [type(f.value) for f in failures] == [UnauthorizedLogin, TypeError]
    assert str(failures[1].value) == "credentials.username must be str or bytes, not NoneType"


# checkers from keyword arguments ----------------------------------------------------


@pytest.mark.parametrize("kind, options, key", [
    ("file", {}, "path"),
    ("file", {"path": "/nonexistent/users"}, "path"),
    ("file", {"path": "x", "colour": "red"}, "colour"),
    ("file", {"path": __file__, "default_scheme": "NOPE"}, "default_scheme"),
    ("ldap", {"url": "ldap://127.0.0.1", "user_dn": "uid=x"}, "user_dn"),
    ("ldap", {"url": 5, "user_dn": "uid={username}"}, "url"),
    ("http", {"url": "ftp://x"}, "url"),
    ("smtp", {"endpoint": "bogus:x"}, "endpoint"),
    ("smtp", {"endpoint": "tcp:h"}, "endpoint"),
    ("oauth2", {"jwks_file": __file__, "issuer": "i", "audience": "a"}, "jwks_file"),
    ("nosuch", {}, "type"),
])
def test_checker_options_are_checked_like_the_file(kind: str, options: dict, key: str) -> None:
    """The same rules as ``[backends.NAME]``: OptionsError naming the key."""
    with pytest.raises(OptionsError) as caught:
        embed.checker(kind, Clock(), **options)
    assert key in {p.key for p in caught.value.problems}


def test_portal_refuses_a_script_and_password_checkers(users: Any) -> None:
    script = embed.auth_script(who, clock=Clock())
    with pytest.raises(ValueError, match="go to the script"):
        embed.portal(MemoryRealm(), [users], script=script)


class RecordingPool:
    """A BlockingRunner that runs inline and records what it ran."""

    def __init__(self) -> None:
        self.calls = 0

    def run(self, f: Any, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return defer.maybeDeferred(f, *args, **kwargs)


class ShutdownRecorder(Clock):
    """A clock that records system event triggers, as a reactor would run them."""

    def __init__(self) -> None:
        super().__init__()
        self.triggers: list[tuple[str, str, Any]] = []

    def addSystemEventTrigger(self, phase: str, event: str, f: Any) -> None:
        self.triggers.append((phase, event, f))


def test_injected_pool_runs_the_hashing(tmp_path: Path) -> None:
    """An expensive hash goes to the pool given (never the reactor thread); a cheap one not."""
    from twisted.cred.credentials import UsernamePassword
    from saslsmtp.passwords import make_hash
    path = tmp_path / "users.passwd"
    path.write_text("alice:{PLAIN}alice-secret\n"
                    f"carol:{make_hash('SHA256-CRYPT', 'carol-secret', rounds=1000)}\n")
    pool = RecordingPool()
    users = embed.file_checker(Clock(), path=str(path), pool=pool)
    results: list = []
    users.requestAvatarId(UsernamePassword(b"alice", b"alice-secret")).addCallback(results.append)
    assert (results, pool.calls) == ([b"alice"], 0)
    users.requestAvatarId(UsernamePassword(b"carol", b"carol-secret")).addCallback(results.append)
    assert (results, pool.calls) == ([b"alice", b"carol"], 1)


def test_pools_and_connections_stop_at_reactor_shutdown(tmp_path: Path) -> None:
    """The LDAP checker's own pool and connections are stopped before the reactor shuts
    down (ldap3's thread pool, or the Twisted client's connections); a pool made by
    thread_pool too."""
    reactor = ShutdownRecorder()
    native = embed.ldap_checker(reactor, url="ldap://127.0.0.1:1",
                                user_dn="uid={username},dc=example,dc=test")
    directory = embed.ldap_checker(reactor, url="ldap://127.0.0.1:1", client="ldap3",
                                   user_dn="uid={username},dc=example,dc=test", threads=2)
    stops = [f for phase, event, f in reactor.triggers if (phase, event) == ("before", "shutdown")]
    assert native.stop in stops and not hasattr(native, "runner")
    assert directory.stop in stops
    assert directory.runner.stop in stops and directory.runner.pool.max == 2
    pool = embed.thread_pool(reactor, "mine", 3)
    assert reactor.triggers[-1] == ("before", "shutdown", pool.stop)


# the global reactor ---------------------------------------------------------------------

#: Every builder, with a clock or a memory reactor, in a fresh interpreter.  (Stock
#: ``twisted.mail.smtp`` and ``saslsmtp.testing`` import the global reactor themselves,
#: so neither is imported here.)
NO_REACTOR = """
    import sys
    from twisted.internet.task import Clock
    from twisted.internet.testing import MemoryReactorClock
    from saslsmtp import embed

    reactor = MemoryReactorClock()
    users = embed.file_checker(reactor, path=sys.argv[1])
    script = embed.auth_script(lambda arguments, context: None, clock=Clock(),
                               backends={"users": users})
    embed.challengers(["PLAIN", "CRAM-MD5", "SCRAM-SHA-256", "X-WHO"], script=script,
                      secrets=[users])
    embed.portal(object(), [users])
    embed.portal(object(), script=script)
    embed.exchange_checkers()
    embed.submission_auth(["PLAIN", "CRAM-MD5", "EXTERNAL", "X-WHO"], script=script,
                          secrets=[users])
    embed.script_password_checker(script)
    embed.thread_pool(reactor, "mine")
    embed.smtp_checker(reactor, host="127.0.0.1", port=25)
    embed.ldap_checker(reactor, url="ldap://127.0.0.1:1", user_dn="uid={username},dc=x")
    embed.http_checker(reactor, url="http://127.0.0.1:1/auth")
    embed.dovecot_checker(reactor, socket="/nonexistent/auth")
    embed.oauth2_checker(reactor, introspection_url="https://127.0.0.1:1/introspect")
    import inspect, typing  # resolving the annotations imports each kind's module
    for name in embed.__all__:
        if inspect.isfunction(getattr(embed, name)):
            typing.get_type_hints(getattr(embed, name))
    print(sorted({"twisted.internet.reactor", "txredisapi", "saslsmtp.service"} & set(sys.modules)))
"""


def test_embedding_never_imports_the_global_reactor(tmp_path: Path) -> None:
    """The module docstring's promise: the reactor is always passed in.  Importing the
    global one (txredisapi does, through the daemon's wiring) would install the default
    reactor before the embedder chose theirs."""
    path = tmp_path / "users.passwd"
    path.write_text(USERS)
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(NO_REACTOR), str(path)],
                          capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "[]\n"


@pytest.mark.parametrize("max_threads", [0, -1, 1.5, True])
def test_thread_pool_refuses_a_pool_that_cannot_run(max_threads: Any) -> None:
    """``thread_pool(..., max_threads=0)`` was accepted and every job handed to it waited
    forever (a login hanging on its hash); it is the daemon's ``hash_threads`` rule now."""
    with pytest.raises(ValueError, match=r"^max_threads must be an int of at least 1, not "):
        embed.thread_pool(Clock(), "hashing", max_threads=max_threads)


@pytest.mark.parametrize("timeout", [0, -1.0, float("inf"), float("nan"), "10", None])
def test_auth_script_refuses_a_timeout_every_call_would_miss(timeout: Any) -> None:
    """A ``timeout`` of 0 (or none that is a number) made every script call answer 454;
    it is the daemon's ``script_timeout`` rule now."""
    with pytest.raises(ValueError, match=r"^timeout must be a positive number of seconds"):
        embed.auth_script(lambda arguments, context: None, clock=Clock(), timeout=timeout)


def test_auth_script_names_a_script_that_is_no_script() -> None:
    """A ``script`` that is neither a path nor a callable said "42: cannot read: No such
    file or directory"; now a TypeError says what it wants."""
    with pytest.raises(TypeError, match=r"^script must be a path to an AUTH script or an"
                                        r" auth\(arguments, context\) callable, not int$"):
        embed.auth_script(42, clock=Clock())  # type: ignore[arg-type]
    runner = embed.auth_script(Path(__file__).parent.parent / "etc" / "auth_totp.py",
                               clock=Clock())
    assert runner.script.mechanisms is not None and "X-PASSWORD-TOTP" in runner.script.mechanisms
