"""No password, AUTH argument or response line reaches a log, even on errors.

Runs every kind of AUTH outcome with one canary password and searches every captured
log event (repr, formatted text and traceback).  The session-wide check in conftest.py
does the same for the whole suite.
"""

from __future__ import annotations

import base64

import pytest
import pytest_twisted
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.internet import defer
from twisted.logger import globalLogPublisher
from zope.interface import implementer

from saslsmtp.errors import TemporaryFailure
from saslsmtp.script import Reply
from saslsmtp.testing import SMTPHarness
from tests.conftest import event_text

CANARY = "log-canary-Pw-1"
PLAIN_BLOB = base64.b64encode(f"\0canary\0{CANARY}".encode())


@implementer(ICredentialsChecker)
class Exploding:
    """A backend with a bug: the exception message even contains the credentials repr."""

    credentialInterfaces = (IUsernamePassword,)

    def requestAvatarId(self, credentials):
        raise RuntimeError(f"bug while checking {credentials!r}")


@implementer(ICredentialsChecker)
class Down:
    credentialInterfaces = (IUsernamePassword,)

    def requestAvatarId(self, credentials):
        return defer.fail(TemporaryFailure("backend down"))


@pytest.fixture
def events() -> list[str]:
    captured: list[str] = []

    def observe(event: dict) -> None:
        captured.append(event_text(event))
    globalLogPublisher.addObserver(observe)
    yield captured
    globalLogPublisher.removeObserver(observe)


def test_no_secret_in_any_log_event(events: list[str]) -> None:
    runs = [
        SMTPHarness(users={"canary": CANARY}),
        SMTPHarness(users={"canary": "other"}),
        SMTPHarness(backends={"bad": Exploding()}),
        SMTPHarness(backends={"down": Down()}),
    ]
    for h in runs:
        h.send(b"EHLO c\r\n")
        h.send(b"AUTH PLAIN " + PLAIN_BLOB + b"\r\n")
        h.send(b"AUTH LOGIN " + base64.b64encode(b"canary") + b"\r\n")
        h.send(base64.b64encode(CANARY.encode()) + b"\r\n")

    def script(arguments, context):
        if arguments.get("password") == CANARY:
            raise ValueError("script bug")
        return Reply(b"x")

    h = SMTPHarness(script=script, mechanism_names=("PLAIN", "X-CANARY"))
    h.send(b"EHLO c\r\nAUTH PLAIN " + PLAIN_BLOB + b"\r\n")
    h.send(b"AUTH X-CANARY " + base64.b64encode(CANARY.encode()) + b"\r\n")
    h.send(base64.b64encode(CANARY.encode()) + b"\r\n")
    assert len(events) >= 5  # the runs did log (failures, tracebacks, logins)
    assert any("Traceback" in e for e in events)
    for needle in (CANARY, PLAIN_BLOB.decode(), base64.b64encode(CANARY.encode()).decode()):
        assert not [e for e in events if needle in e], needle


# ---- secrets inside exception messages: scrubbed, the rest of the traceback kept -----------

SCRIPT_SECRET = "Script-Raised-Secret-9"

RAISING_SCRIPT = '''
from saslsmtp.script import Accept, Reply

MECHANISMS = {"X-PIN": {"plaintext": False}}


def auth(arguments, context):
    if arguments["mechanism"] == "X-PIN":
        if arguments["state"] == 0:
            return Reply(b"PIN?")
        return Accept(username="pin%d" % int(arguments["response"]))  # bytes: ValueError
    password = arguments["password"]
    if arguments["username"] == "int":
        return Accept() if int(password) else None  # ValueError quoting the password
    raise LookupError(f"no hash for {arguments['username']} and {password!r}")
'''


@pytest_twisted.ensureDeferred
async def test_a_script_raising_with_the_secret_logs_its_traceback_without_it(tmp_path) -> None:
    """A script whose exception quotes the password (``int(password)``, an f-string) or
    the client's response (``int(response)``): the client gets 454, the log keeps the
    script's file and line, the exception type and words with the secret replaced by
    ``<redacted>``; it printed the password before."""
    import smtplib
    from twisted.internet.threads import deferToThread
    from tests.support import smtp_login, start_server
    (tmp_path / "auth.py").write_text(RAISING_SCRIPT)
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    server = await start_server(tmp_path, mechanisms=["PLAIN", "LOGIN", "X-PIN"],
                                script=str(tmp_path / "auth.py"))

    def pin() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=15) as s:
            s.ehlo("client.example")
            s.docmd("AUTH", "X-PIN")
            return s.docmd(base64.b64encode(SCRIPT_SECRET.encode()).decode())

    try:
        codes = [(await smtp_login(server.port, user, SCRIPT_SECRET, mechanism=mechanism))[0]
                 for user, mechanism in (("int", "PLAIN"), ("alice", "LOGIN"))]
        codes.append((await deferToThread(pin))[0])
    finally:
        await server.stop()
        globalLogPublisher.removeObserver(events.append)
    assert codes == [454, 454, 454]
    tracebacks = [event_text(e) for e in events if "AUTH script" in event_text(e)]
    for words in ("ValueError: invalid literal for int() with base 10: '<redacted>'",
                  "LookupError: no hash for alice and '<redacted>'",
                  "ValueError: invalid literal for int() with base 10: b'<redacted>'"):
        assert [t for t in tracebacks if words in t and str(tmp_path / "auth.py") in t], words
    texts = [event_text(e) for e in events]
    for needle in (SCRIPT_SECRET, base64.b64encode(SCRIPT_SECRET.encode()).decode()):
        assert not [t for t in texts if needle in t], needle


@implementer(ICredentialsChecker)
class Quoting:
    """A third-party checker whose errors quote the password it was given."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, temporary: bool) -> None:
        self.temporary = temporary

    def requestAvatarId(self, credentials):
        password = credentials.password.decode()
        if self.temporary:
            return defer.fail(TemporaryFailure(f"cannot check {password!r} now"))
        raise KeyError(password)


def test_a_checker_quoting_the_password_is_logged_without_it(events: list[str]) -> None:
    """A plugged-in checker that puts the password in its TemporaryFailure or in an
    unexpected exception, asked by the backend chain or by a script's
    ``backends.verify``: logged with the password replaced, the words kept."""
    async def script(arguments, context):
        await arguments["backends"].verify("raising", arguments["username"],
                                           arguments["password"])
        return None

    blob = base64.b64encode(f"\0alice\0{SCRIPT_SECRET}".encode())
    chain = SMTPHarness(backends={"down": Quoting(True), "raising": Quoting(False)})
    scripted = SMTPHarness(backends={"raising": Quoting(False)}, script=script)
    for h, reply in ((chain, b"454 "), (scripted, b"535 ")):
        h.send(b"EHLO c\r\n")
        assert h.send(b"AUTH PLAIN " + blob + b"\r\n").startswith(reply)
    assert len([e for e in events if "failed temporarily: cannot check '<redacted>' now" in e]) == 1
    assert len([e for e in events if "KeyError: '<redacted>'" in e]) == 2
    assert not [e for e in events if SCRIPT_SECRET in e]


TOKEN_SECRET = "eyJhbGciOiJFUzI1NiJ9.Token-Secret-10.c2ln"


class QuotingValidator:
    """A plugged-in token validator whose errors quote the token."""

    def __init__(self, temporary: bool) -> None:
        self.temporary = temporary

    def validate_token(self, request):
        if self.temporary:
            return defer.fail(TemporaryFailure(f"introspection refused {request.token}"))
        raise ValueError(f"cannot parse {request.token!r}")


@pytest.mark.parametrize("temporary, words", [
    (True, "AUTH temporary failure: introspection refused <redacted>"),
    (False, "ValueError: cannot parse '<redacted>'"),
])
def test_a_token_validator_quoting_the_token_is_logged_without_it(events: list[str], temporary,
                                                                   words) -> None:
    """XOAUTH2 through the resolver to a validator whose TemporaryFailure or unexpected
    error quotes the bearer token: 454, and the line (or traceback) is logged with the
    token replaced."""
    from saslsmtp.resolver import secret_resolver
    h = SMTPHarness(mechanism_names=["XOAUTH2"], tls=True,
                    resolver=secret_resolver([], [QuotingValidator(temporary)]))
    h.send(b"EHLO c\r\n")
    blob = base64.b64encode(f"user=alice\x01auth=Bearer {TOKEN_SECRET}\x01\x01".encode())
    assert h.send(b"AUTH XOAUTH2 " + blob + b"\r\n").startswith(b"454 4.7.0")
    assert [e for e in events if words in e], events
    assert not [e for e in events if "Token-Secret-10" in e]
