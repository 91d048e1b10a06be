"""The SMTP server relaying to an upstream that breaks the protocol, over string
transports on both sides: the exact bytes our client gets, what reaches the upstream,
the log line, and what becomes of the upstream connection.

A reply the command cannot have (``354`` to MAIL, a 3xx to RCPT, ``250`` to DATA, ``354``
to the final dot), a line that is not an SMTP reply, a reply nobody asked for, or one
that came before its command was sent: our client gets ``451 4.5.0`` (try again later),
the upstream connection is dropped and never pooled, no message byte goes after a DATA
the upstream did not answer with ``354``, and one warning names the upstream, the command
and the reply.  The next transaction opens a fresh connection and goes through.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from saslsmtp.relay.delivery import RelayRealm
from saslsmtp.replies import REPLIES
from saslsmtp.testing import SMTPHarness
from tests.test_relay_client import greet, make

USER, PASSWORD = "alice@example.test", "wonderland"
UPSTREAM = "tcp:127.0.0.1:10025"
PROTOCOL_ERROR = b"451 4.5.0 Upstream protocol error, try again later\r\n"
GOOD = {"MAIL": b"250 2.1.0 Ok\r\n", "RCPT": b"250 2.1.5 Ok\r\n",
        "DATA": b"354 End data with <CR><LF>.<CR><LF>\r\n",
        "DOT": b"250 2.0.0 Ok: queued as 4ABC\r\n"}
#: as our client sends it, dot-stuffed, and as the upstream must get it
BODY = b"Subject: hi\r\n\r\n..dot line\r\n..\r\n...\r\nend\r\n"


@pytest.fixture
def warnings() -> Any:
    """The relay client's warnings, formatted as an operator reads them."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield lambda: [formatEvent(e) for e in events if e.get("log_level") == LogLevel.warn
                   and e.get("log_namespace") == "saslsmtp.relay.client"]
    globalLogPublisher.removeObserver(events.append)


STEPS = ("MAIL", "RCPT", "DATA", "DOT")


class Relayed:
    """Our client's session (``smtp``, an ``SMTPHarness``) in front of ``upstream``."""

    def __init__(self, **options: Any) -> None:
        self.client, self.upstream, self.clock = make(**options)
        self.smtp = SMTPHarness(users={USER: PASSWORD}, realm=RelayRealm(self.client),
                                clock=self.clock)
        assert self.smtp.login(USER, PASSWORD).startswith(b"235 ")

    def walk(self, replies: dict[str, bytes], *, until: str = "DOT",
             new_connection: bool = True) -> list[bytes]:
        """One message, up to step ``until``; the upstream answers each step from
        ``replies`` (else the good reply).  Returns our client's reply to each step, up
        to the first that is not the good one."""
        smtp, upstream = self.smtp, self.upstream
        answers = {**GOOD, **replies}
        assert smtp.send(b"MAIL FROM:<alice@example.test>\r\n") == b""
        if new_connection:
            greet(upstream)
        else:
            assert upstream.said() == b"RSET\r\n"
            upstream.answer(b"250 2.0.0 Ok\r\n")
        out = []
        for step, command in zip(STEPS, (b"MAIL FROM:<alice@example.test>\r\n",
                                         b"RCPT TO:<bob@example.test>\r\n", b"DATA\r\n")):
            if step != "MAIL":
                assert smtp.send(command) == b""
            assert upstream.said() == command
            upstream.answer(answers[step])
            out.append(smtp.take())
            if out[-1] != CLIENT_SEES[step] or step == until:
                return out
        assert smtp.send(BODY + b".\r\n") == b""
        sent = upstream.said()
        assert re.match(rb"Received: from client\.example \(\[192\.0\.2\.10\]\)\r\n\tby"
                        rb" localhost \(saslsmtp\) with ESMTPA\r\n\t\(authenticated"
                        rb" user alice@example\.test\)\r\n\tfor <bob@example\.test>;"
                        rb" [^\r\n]+\r\n" + re.escape(BODY) + rb"\.\r\n$", sent), sent
        upstream.answer(answers["DOT"])
        out.append(smtp.take())
        return out


#: what our client sees when the upstream gives the good reply
CLIENT_SEES = {**GOOD, "DATA": REPLIES["data_start"].to_bytes()}

# (step, the upstream's reply, how the warning shows it)
WRONG_FOR_THE_COMMAND = [
    ("MAIL", b"354 go ahead\r\n", 'MAIL FROM answered "354 go ahead"'),
    ("MAIL", b"334 VXNlcm5hbWU6\r\n", 'MAIL FROM answered "334 VXNlcm5hbWU6"'),
    ("MAIL", b"221 2.0.0 Bye\r\n", 'MAIL FROM answered "221 2.0.0 Bye"'),
    ("RCPT", b"354 go ahead\r\n", 'RCPT TO answered "354 go ahead"'),
    ("RCPT", b"220 mx.example.test ESMTP\r\n", 'RCPT TO answered "220 mx.example.test ESMTP"'),
    ("DATA", b"250 2.0.0 Ok\r\n", 'DATA answered "250 2.0.0 Ok"'),
    ("DATA", b"334 \r\n", 'DATA answered "334 "'),
    ("DOT", b"354 more please\r\n", 'end of data answered "354 more please"'),
]
MALFORMED = [
    ("MAIL", b"HTTP/1.1 400 Bad Request\r\n",
     'MAIL FROM answered "HTTP/1.1 400 Bad Request" (not an SMTP reply line)'),
    ("RCPT", b"25O Ok\r\n", 'RCPT TO answered "25O Ok" (not an SMTP reply line)'),
    ("RCPT", b"250Ok\r\n", 'RCPT TO answered "250Ok" (not an SMTP reply line)'),
    ("RCPT", b"199 early\r\n", 'RCPT TO answered "199 early" (not an SMTP reply line)'),
    ("DATA", b"\r\n", 'DATA answered "" (not an SMTP reply line)'),
    ("DATA", b"354-go\r\n250 Ok\r\n",
     'DATA answered "250 Ok" (multi-line reply changes its code)'),
    ("DOT", b"2\xff0 \x00ok\r\n", 'end of data answered "2?0 ?ok" (not an SMTP reply line)'),
]


@pytest.mark.parametrize("step, reply, shown", WRONG_FOR_THE_COMMAND + MALFORMED)
def test_a_reply_wrong_for_the_command_is_451_4_5_0_and_the_connection_is_dropped(
        step: str, reply: bytes, shown: str, warnings: Any) -> None:
    """Our client gets ``451 4.5.0``, never the upstream's reply; the connection is
    aborted and never pooled; nothing more is written to it (after a DATA that was not
    answered ``354``, no message byte); one warning; the client's retry goes through
    on a new connection."""
    relayed = Relayed()
    upstream = relayed.upstream
    before = [CLIENT_SEES[s] for s in STEPS[:STEPS.index(step)]]
    assert relayed.walk({step: reply}) == before + [PROTOCOL_ERROR]
    assert upstream.transport.disconnecting and upstream.said() == b""
    assert relayed.client.idle == []
    assert warnings() == [f"upstream {UPSTREAM}: protocol error: {shown}"]

    assert relayed.smtp.send(b"RSET\r\n") == b"250 2.0.0 Reset state\r\n"
    assert relayed.walk({}) == [CLIENT_SEES[s] for s in STEPS]
    assert len(upstream.connections) == 2
    assert relayed.client.idle == [upstream.connections[1][0]]


@pytest.mark.parametrize("step", STEPS)
def test_421_is_451_with_the_upstream_text_and_the_connection_is_never_pooled(
        step: str, warnings: Any) -> None:
    """An upstream that says ``421`` is closing: our client gets ``451`` with the
    upstream's enhanced code and text, and the connection is dropped at once, even
    where the transaction would otherwise hand it back to the pool (a refused DATA, the
    end of data).  A 421 is no protocol error: no warning."""
    relayed = Relayed()
    replies = relayed.walk({step: b"421 4.3.2 mx.example.test Service shutting down\r\n"})
    assert replies[-1] == b"451 4.3.2 mx.example.test Service shutting down\r\n"
    assert relayed.upstream.transport.disconnecting and relayed.client.idle == []
    assert relayed.smtp.send(b"RSET\r\n") == b"250 2.0.0 Reset state\r\n"
    assert relayed.walk({}) == [CLIENT_SEES[s] for s in STEPS]
    assert len(relayed.upstream.connections) == 2 and warnings() == []


def test_an_unsolicited_421_mid_data_is_451_at_the_dot() -> None:
    """``421`` while the message streams (an upstream timing out): the connection is
    dropped, the rest of our client's message is read and discarded, and the final
    dot gets the 451 with the upstream's text."""
    relayed = Relayed()
    smtp, upstream = relayed.smtp, relayed.upstream
    assert relayed.walk({}, until="DATA")[-1] == CLIENT_SEES["DATA"]
    assert smtp.send(b"Subject: x\r\n\r\nfirst\r\n") == b""
    upstream.said()
    upstream.answer(b"421 4.4.2 mx.example.test Error: timeout exceeded\r\n")
    assert upstream.transport.disconnecting
    assert smtp.send(b"second\r\n.\r\n") == \
        b"451 4.4.2 mx.example.test Error: timeout exceeded\r\n"
    assert upstream.said() == b"" and relayed.client.idle == []


def test_a_stray_second_reply_is_not_taken_for_the_next_command(warnings: Any) -> None:
    """The upstream answers MAIL twice in one segment while our client pipelined MAIL
    and RCPT: the second reply must not become RCPT's (the upstream had not seen RCPT
    yet).  RCPT gets 451 4.5.0 and the connection is dropped."""
    relayed = Relayed()
    smtp, upstream = relayed.smtp, relayed.upstream
    assert smtp.send(b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<bob@example.test>\r\n") == b""
    greet(upstream)
    assert upstream.said() == b"MAIL FROM:<alice@example.test>\r\n"
    upstream.answer(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n")
    assert upstream.said() == b"RCPT TO:<bob@example.test>\r\n"
    assert smtp.take() == b"250 2.1.0 Ok\r\n" + PROTOCOL_ERROR
    assert upstream.transport.disconnecting and relayed.client.idle == []
    assert warnings() == [f'upstream {UPSTREAM}: protocol error: RCPT TO answered'
                          f' "250 2.1.5 Ok" before it was sent']


def test_an_idle_pooled_connection_that_speaks_unasked_is_not_reused(warnings: Any) -> None:
    """A pooled connection that sends a reply nobody asked for is dropped (a warning)
    and the next transaction does not send RSET on it but makes a new connection; a
    421 on an idle connection (the upstream's idle timeout) is no warning."""
    relayed = Relayed()
    upstream = relayed.upstream
    assert relayed.walk({})[-1] == GOOD["DOT"]
    upstream.answer(b"250 2.0.0 Ok\r\n")
    assert upstream.transport.disconnecting
    assert warnings() == [f'upstream {UPSTREAM}: protocol error: "250 2.0.0 Ok" while'
                          f' nothing was asked']
    assert relayed.walk({}, new_connection=True)[-1] == GOOD["DOT"]
    assert len(upstream.connections) == 2
    upstream.answer(b"421 4.4.2 mx.example.test Error: timeout exceeded\r\n")
    assert upstream.transport.disconnecting and len(warnings()) == 1
    assert relayed.walk({}, new_connection=True)[-1] == GOOD["DOT"]
    assert len(upstream.connections) == 3


def test_a_connection_refused_something_since_its_last_message_is_not_pooled() -> None:
    """Postfix holds a connection's errors against it until it delivers a message (see
    tests/test_relay_postfix.py): after a refused MAIL, DATA or message the connection
    says QUIT instead of waiting in the pool, and the next transaction has a new one.
    A message accepted after a refused recipient clears the count: that connection is
    pooled, and the next transaction sends RSET on it before its MAIL."""
    relayed = Relayed()
    upstream, smtp = relayed.upstream, relayed.smtp
    refused_mail = b"553 5.7.1 <alice@example.test>: Sender address rejected\r\n"
    refused_data = b"554 5.5.1 Error: no valid recipients\r\n"
    refused_dot = b"554 5.7.1 Message rejected: spam\r\n"
    for n, (step, refusal) in enumerate((("MAIL", refused_mail), ("DATA", refused_data),
                                         ("DOT", refused_dot))):
        assert relayed.walk({step: refusal})[-1] == refusal
        assert upstream.said() == b"QUIT\r\n" and relayed.client.idle == []
        assert len(upstream.connections) == n + 1

    assert smtp.send(b"MAIL FROM:<alice@example.test>\r\n") == b""
    greet(upstream)
    upstream.said()
    upstream.answer(b"250 2.1.0 Ok\r\n")
    for address, reply in ((b"nobody", b"550 5.1.1 <nobody@example.test>: unknown\r\n"),
                           (b"bob", GOOD["RCPT"])):
        smtp.take()
        smtp.send(b"RCPT TO:<%s@example.test>\r\n" % address)
        upstream.answer(reply)
        assert smtp.take() == reply
    smtp.send(b"DATA\r\n")
    upstream.answer(GOOD["DATA"])
    smtp.send(BODY + b".\r\n")
    upstream.said()
    upstream.answer(GOOD["DOT"])
    assert smtp.take().endswith(GOOD["DOT"])
    assert relayed.client.idle == [upstream.connections[-1][0]]
    assert relayed.walk({}, new_connection=False) == [CLIENT_SEES[s] for s in STEPS]
    assert len(upstream.connections) == 4
