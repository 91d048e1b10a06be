"""The SMTP-forwarding backend's client (``AuthProbe``) over a string transport: every
way an upstream can answer, and the verdict each one gives."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from saslsmtp.checkers.smtp import MAX_REPLY_LINES, QUIT_GRACE, AuthProbe
from saslsmtp.errors import TemporaryFailure


class Upstream:
    """One probe for alice/pw connected to a string transport."""

    def __init__(self, *, helo: str | None = "client.example", starttls: bool = False,
                 tls_creator: Any = None, host: Any = None) -> None:
        self.clock = Clock()
        self.probe = AuthProbe(b"alice", b"pw", clock=self.clock, tls_creator=tls_creator,
                               starttls=starttls, implicit_tls=False, tls_hostname="up.example",
                               helo=helo, upstream="up.example:587")
        self.transport = StringTransport(hostAddress=host)
        self.probe.makeConnection(self.transport)
        self.outcome: list[Any] = []
        self.probe.result.addBoth(self.outcome.append)

    def say(self, data: bytes) -> bytes:
        """Feed upstream bytes; return what the probe sent since."""
        self.probe.dataReceived(data)
        sent = self.transport.value()
        self.transport.clear()
        return sent

    def verdict(self) -> Any:
        [value] = self.outcome
        return value


def temporary(u: Upstream, why: str) -> None:
    failure = u.verdict()
    assert failure.check(TemporaryFailure), failure
    assert why in str(failure.value), str(failure.value)
    failure.trap(TemporaryFailure)


def to_auth(u: Upstream, ehlo: bytes = b"250-up.example\r\n250 AUTH PLAIN LOGIN\r\n") -> bytes:
    assert u.say(b"220 up.example ESMTP\r\n") == b"EHLO client.example\r\n"
    return u.say(ehlo)


def test_plain_success_then_quit() -> None:
    """235 -> the username, then a polite QUIT; the 221 ends the connection."""
    u = Upstream()
    assert to_auth(u) == b"AUTH PLAIN AGFsaWNlAHB3\r\n"
    assert u.say(b"235 2.7.0 ok\r\n") == b"QUIT\r\n"
    assert u.verdict() == b"alice"
    u.say(b"221 bye\r\n")
    assert u.transport.disconnecting
    assert "C: AUTH PLAIN <redacted>" in u.probe.transcript


def test_login_when_only_login_is_offered_old_style() -> None:
    """``AUTH=LOGIN`` (pre-RFC 4954 servers) is understood; the prompts are answered in
    order and never appear in the transcript."""
    u = Upstream()
    assert to_auth(u, b"250-up.example\r\n250-\r\n250 AUTH=LOGIN\r\n") == b"AUTH LOGIN\r\n"
    assert u.say(b"334 VXNlcm5hbWU6\r\n") == b"YWxpY2U=\r\n"
    assert u.say(b"334 UGFzc3dvcmQ6\r\n") == b"cHc=\r\n"
    u.say(b"235 ok\r\n")
    assert u.verdict() == b"alice"
    assert "C: <redacted>" in u.probe.transcript and "C: cHc=" not in u.probe.transcript


@pytest.mark.parametrize("after", [b"535 5.7.8 no\r\n", b"550 5.7.1 blocked\r\n"])
def test_refusal_during_login_prompts(after: bytes) -> None:
    """A 5xx to the username prompt is a refusal (535), not an outage."""
    u = Upstream()
    to_auth(u, b"250-up.example\r\n250 AUTH LOGIN\r\n")
    u.say(after)
    failure = u.verdict()
    assert failure.check(UnauthorizedLogin)
    failure.trap(UnauthorizedLogin)


def test_refusal_at_the_password_prompt() -> None:
    """A 4xx to the password is a temporary verdict (the upstream said so)."""
    u = Upstream()
    to_auth(u, b"250-up.example\r\n250 AUTH LOGIN\r\n")
    u.say(b"334 VXNlcm5hbWU6\r\n")
    u.say(b"454 4.7.0 try later\r\n")
    temporary(u, "AUTH answered 454 4.7.0")


@pytest.mark.parametrize(("reply", "why"), [
    (b"334 more?\r\n", "unexpected 334 challenge after the credentials"),
    (b"250 huh\r\n", "unexpected 250 during AUTH"),
    (b"454 4.7.0 later\r\n", "AUTH answered 454 4.7.0"),
])
def test_odd_answers_to_the_credentials(reply: bytes, why: str) -> None:
    u = Upstream()
    to_auth(u)
    u.say(reply)
    temporary(u, why)


@pytest.mark.parametrize("reply", [
    b"500 Error: (ConnectionError) user database unreachable\r\n",  # aiosmtpd, check raised
    b"502 5.5.1 Command not implemented\r\n",
    b"503 5.5.1 Error: authentication not enabled\r\n",  # Postfix, SASL off
    b"504 5.5.4 Unrecognized authentication type\r\n",
    b"538 5.7.11 Encryption required for requested authentication mechanism\r\n",
    b"554 5.3.0 internal error\r\n",
])
def test_a_5xx_that_judges_nothing_is_temporary(reply: bytes) -> None:
    """An upstream that cannot judge the password (its own check broken, AUTH not
    enabled, a mechanism or TLS mismatch) fails every user alike: 454, not 535."""
    u = Upstream()
    to_auth(u)
    u.say(reply)
    temporary(u, "AUTH answered " + reply[:3].decode())


@pytest.mark.parametrize("reply", [
    b"535 5.7.8 Authentication credentials invalid\r\n",
    b"535 Incorrect authentication data\r\n",  # Exim, no enhanced codes
    b"534 5.7.9 Application-specific password required\r\n",
    b"535 5.7.139 Authentication unsuccessful\r\n",
    b"554 5.7.1 account disabled\r\n",
])
def test_a_5xx_about_the_credentials_is_a_refusal(reply: bytes) -> None:
    u = Upstream()
    to_auth(u)
    u.say(reply)
    failure = u.verdict()
    assert failure.check(UnauthorizedLogin), failure
    failure.trap(UnauthorizedLogin)


@pytest.mark.parametrize(("ehlo", "why"), [
    (b"250 up.example\r\n", "AUTH is not offered"),
    (b"250-up\r\n250 AUTH CRAM-MD5 GSSAPI\r\n", "neither PLAIN nor LOGIN is offered"),
    (b"502 no EHLO\r\n", "EHLO answered 502"),
    (b"250-a\r\n251 b\r\n", "malformed reply"),
    (b"hello\r\n", "malformed reply"),
    (b"250-x\r\n" * (MAX_REPLY_LINES + 1), "reply has too many lines"),
    (b"250 " + b"x" * 5000 + b"\r\n", "reply line too long"),
])
def test_unusable_ehlo_replies(ehlo: bytes, why: str) -> None:
    """What the upstream says after EHLO can make AUTH impossible: temporary failure,
    and the connection is dropped (no QUIT: the state is unknown)."""
    u = Upstream()
    to_auth(u, ehlo)
    temporary(u, why)
    assert u.transport.disconnecting


def test_bad_greeting() -> None:
    u = Upstream()
    u.say(b"554 go away\r\n")
    temporary(u, "greeting 554")


def test_starttls_configured_but_not_offered() -> None:
    """Credentials never go in clear when STARTTLS is configured."""
    u = Upstream(starttls=True, tls_creator=object())
    sent = to_auth(u)
    assert b"AUTH" not in sent and b"AGFsaWNlAHB3" not in sent, sent
    temporary(u, "STARTTLS is configured but not offered")


def test_starttls_refused() -> None:
    u = Upstream(starttls=True, tls_creator=object())
    assert to_auth(u, b"250-up\r\n250 STARTTLS\r\n") == b"STARTTLS\r\n"
    u.say(b"454 4.7.0 TLS not available\r\n")
    temporary(u, "STARTTLS answered 454")


def test_starttls_without_a_context_fails_closed() -> None:
    """A probe asked for STARTTLS without a TLS context never sends credentials."""
    u = Upstream(starttls=True, tls_creator=None)
    to_auth(u, b"250-up\r\n250 STARTTLS\r\n")
    assert u.say(b"220 go ahead\r\n") == b""
    temporary(u, "STARTTLS without a TLS context")


def test_no_answer_to_quit_drops_the_connection() -> None:
    """After the verdict, QUIT gets ``QUIT_GRACE`` seconds, then the line is dropped."""
    u = Upstream()
    to_auth(u)
    u.say(b"235 ok\r\n")
    assert not u.transport.disconnecting
    u.clock.advance(QUIT_GRACE)
    assert u.transport.disconnecting
    assert u.say(b"221 late\r\n") == b""  # ignored once done


@pytest.mark.parametrize(("host", "ehlo"), [
    (IPv4Address("TCP", "192.0.2.7", 40000), b"EHLO [192.0.2.7]\r\n"),
    (IPv6Address("TCP", "2001:db8::7", 40000), b"EHLO [IPv6:2001:db8::7]\r\n"),
])
def test_ehlo_name_defaults_to_the_local_address_literal(host: Any, ehlo: bytes) -> None:
    """Without ``helo`` the probe introduces itself with its address literal."""
    u = Upstream(helo=None, host=host)
    assert u.say(b"220 up\r\n") == ehlo
