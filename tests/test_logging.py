"""No password, AUTH argument or response line reaches a log, even on errors.

Runs every kind of AUTH outcome with one canary password and searches every captured
log event (repr, formatted text and traceback).  The session-wide check in conftest.py
does the same for the whole suite.
"""

from __future__ import annotations

import base64

import pytest
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
