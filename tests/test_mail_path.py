"""The mail path's fast answers: MAIL and RCPT are answered at once (no Deferred, no busy
round) when the limits' verdict is already there, and still later when it is not."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from twisted.internet import defer

from saslsmtp.admission import ConnectionAdmission
from saslsmtp.limits.verdicts import ALLOWED, Verdict
from saslsmtp.replies import REPLIES, SMTPReply

DENIED = Verdict(False, 452, "4.7.1", "Too many messages, try again later", "messages_per_user")


class Limits:
    """ConnectionLimits' MAIL/RCPT questions, answering with the Deferred given."""

    def __init__(self, verdict: "defer.Deferred[Verdict]") -> None:
        self.verdict = verdict

    def mail_allowed(self, user: str | None) -> "defer.Deferred[Verdict]":
        return self.verdict

    def recipient_allowed(self, user: str | None) -> "defer.Deferred[Verdict]":
        return self.verdict


def admission(verdict: "defer.Deferred[Verdict]") -> ConnectionAdmission:
    connection = SimpleNamespace(authenticated=True, auth_user="tim")
    return ConnectionAdmission(connection, Limits(verdict))  # type: ignore[arg-type]


def test_a_verdict_already_there_answers_at_once() -> None:
    """No limit set (or the memory store): the transaction's own answer comes back as a
    plain value for MAIL and for RCPT, and a refusal as the 452 itself."""
    ok = REPLIES["sender_ok"]
    assert admission(defer.succeed(ALLOWED)).mail(lambda: ok) is ok
    assert admission(defer.succeed(ALLOWED)).rcpt(lambda: ok) is ok
    refused = admission(defer.succeed(DENIED)).mail(lambda: ok)
    assert refused == SMTPReply(452, "4.7.1", "Too many messages, try again later")


def test_a_verdict_still_pending_answers_later() -> None:
    """A store that answers later (Redis): a Deferred that fires with the answer; the
    transaction is asked only once the verdict allows."""
    pending: "defer.Deferred[Verdict]" = defer.Deferred()
    asked: list[int] = []

    def step() -> SMTPReply:
        asked.append(1)
        return REPLIES["rcpt_ok"]
    answer = admission(pending).rcpt(step)
    assert isinstance(answer, defer.Deferred) and asked == []
    pending.callback(ALLOWED)
    assert asked == [1]
    assert answer.result is REPLIES["rcpt_ok"]


def test_a_failed_verdict_stays_a_failure() -> None:
    """A verdict that failed is not answered at once: the Deferred carries the error on
    (the protocol's error path answers it)."""
    failed: "defer.Deferred[Verdict]" = defer.fail(RuntimeError("store broke"))
    answer = admission(failed).mail(lambda: REPLIES["sender_ok"])
    assert isinstance(answer, defer.Deferred)
    errors: list[Any] = []
    answer.addErrback(errors.append)
    assert errors and errors[0].check(RuntimeError)


def test_a_repeated_address_is_parsed_once_and_a_bad_one_refused_every_time() -> None:
    """MAIL/RCPT addresses come from a bounded cache of ``smtp.Address``: the same
    address parsed again is the same (equal) object; an address Twisted refuses is refused
    on every try, never remembered as good."""
    from twisted.mail import smtp

    from saslsmtp.transaction import parsed_address

    first = parsed_address(b"tim@example.test")
    assert parsed_address(b"tim@example.test") is first
    assert str(first) == "tim@example.test"
    assert str(parsed_address(b"")) == ""
    for _ in range(2):
        try:
            parsed_address(b"a@b@example.test")
        except smtp.AddressError:
            pass
        else:
            raise AssertionError("a bad address was accepted")


def test_the_received_header_is_the_same_with_its_connection_part_reused() -> None:
    """The Received header's connection part is built once per stamp; two messages of
    one connection get the same header but for the recipient line."""
    from saslsmtp.transaction import Stamp, received_header

    stamp = Stamp("client.example", "192.0.2.10", "mx.example.test", True, "tim(x)")
    one = received_header(stamp, ["a@example.test"])
    two = received_header(Stamp("client.example", "192.0.2.10", "mx.example.test", True,
                                "tim(x)"), ["a@example.test", "b@example.test"])
    assert one.startswith(b"Received: from client.example ([192.0.2.10])\r\n\tby mx.example.test"
                          b" (saslsmtp) with ESMTPSA\r\n\t(authenticated user timx)\r\n\t"
                          b"for <a@example.test>; ")
    assert two.startswith(b"Received: from client.example ([192.0.2.10])\r\n\tby mx.example.test"
                          b" (saslsmtp) with ESMTPSA\r\n\t(authenticated user timx); ")


def test_the_received_header_tags_an_ipv6_client_as_rfc_5321_address_literals_do() -> None:
    """RFC 5321 4.1.3 / 4.4: an IPv6 address literal is "[IPv6:...]", as Postfix writes it;
    a bare "[::1]" is no address literal at all."""
    from saslsmtp.transaction import Stamp, received_header

    header = received_header(Stamp("client.example", "2001:db8::7", "mx.example.test", False,
                                   None), ["a@example.test"])
    assert header.startswith(b"Received: from client.example ([IPv6:2001:db8::7])\r\n\tby"
                             b" mx.example.test (saslsmtp) with ESMTP\r\n\tfor <a@example.test>; ")
