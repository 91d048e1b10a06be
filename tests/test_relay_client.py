"""The upstream client over StringTransport: exact bytes both ways, a Clock for time.

``FakeUpstream`` is the endpoint: each connect makes a ``StringTransport``; the test
reads what the client wrote and answers with upstream bytes.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from saslsmtp.relay.client import (RelaySession, TransactionStateError, UpstreamClient,
                                   UpstreamTransaction)
from saslsmtp.relay.verdict import combine
from saslsmtp.replies import REPLIES, SMTPReply

SESSION = RelaySession(login="alice@example.test", client_address="192.0.2.7",
                       client_port=40123, helo="laptop.example")
EHLO_XCLIENT = (b"250-mx.example.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n"
                b"250-8BITMIME\r\n250-AUTH PLAIN\r\n"
                b"250 XCLIENT NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN\r\n")
EHLO_PLAIN = b"250-mx.example.test\r\n250 8BITMIME\r\n"


@implementer(IStreamClientEndpoint)
class FakeUpstream:
    """An endpoint whose connections are StringTransports (or refused, or hanging)."""

    def __init__(self) -> None:
        self.connections: list[tuple[Any, StringTransport]] = []
        self.refuse = False
        self.hang = False

    def connect(self, factory: Any) -> "defer.Deferred[Any]":
        if self.refuse:
            return defer.fail(ConnectionRefusedError())
        if self.hang:
            return defer.Deferred()
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.connections.append((protocol, transport))
        return defer.succeed(protocol)

    @property
    def transport(self) -> StringTransport:
        return self.connections[-1][1]

    def said(self) -> bytes:
        """What the client wrote since the last call."""
        data = self.transport.value()
        self.transport.clear()
        return data

    def answer(self, data: bytes) -> None:
        self.connections[-1][0].dataReceived(data)


def make(lmtp: bool = False, **kwargs: Any) -> tuple[UpstreamClient, FakeUpstream, Clock]:
    clock, upstream = Clock(), FakeUpstream()
    client = UpstreamClient(clock=clock, endpoint=upstream, name="tcp:127.0.0.1:10025",
                            helo="relay.example.test", lmtp=lmtp, timeout=30.0, **kwargs)
    return client, upstream, clock


def result(d: "defer.Deferred[Any]") -> Any:
    """The value a Deferred already fired with (fails the test if it has not)."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def greet(upstream: FakeUpstream, ehlo: bytes = EHLO_PLAIN, verb: bytes = b"EHLO") -> None:
    upstream.answer(b"220 mx.example.test ESMTP\r\n")
    assert upstream.said() == verb + b" relay.example.test\r\n"
    upstream.answer(ehlo)


def test_whole_transaction_exact_bytes():
    """MAIL, RCPT, DATA, a dot-stuffed body, the final dot: every upstream reply is the
    client's reply, byte for byte; the connection then goes to the pool."""
    client, upstream, _ = make()
    tx = client.transaction(SESSION)
    mail = tx.mail_from("alice@example.test", ["SIZE=120", "BODY=8BITMIME", "X-FOO=1"])
    greet(upstream)
    # SIZE not announced (dropped), BODY=8BITMIME kept, unknown parameters dropped
    assert upstream.said() == b"MAIL FROM:<alice@example.test> BODY=8BITMIME\r\n"
    upstream.answer(b"250 2.1.0 Ok\r\n")
    assert result(mail).to_bytes() == b"250 2.1.0 Ok\r\n"
    rcpt = tx.rcpt("bob@example.test")
    assert upstream.said() == b"RCPT TO:<bob@example.test>\r\n"
    upstream.answer(b"250 2.1.5 Ok\r\n")
    assert result(rcpt).to_bytes() == b"250 2.1.5 Ok\r\n"
    data = tx.start_data()
    assert upstream.said() == b"DATA\r\n"
    upstream.answer(b"354 End data with <CR><LF>.<CR><LF>\r\n")
    assert result(data) == REPLIES["data_start"]
    tx.write(b"Subject: hi\r\n\r\n.hidden")
    tx.write(b" dot\r\n")
    end = tx.end()
    assert upstream.said() == b"Subject: hi\r\n\r\n..hidden dot\r\n.\r\n"
    upstream.answer(b"250 2.0.0 Ok: queued as 4ABC\r\n")
    assert result(end).to_bytes() == b"250 2.0.0 Ok: queued as 4ABC\r\n"
    assert client.idle == [upstream.connections[0][0]]


def test_rcpt_rejection_is_the_clients_reply_and_transaction_goes_on():
    """An upstream RCPT rejection reaches the client as-is; the next RCPT still works."""
    client, upstream, _ = make()
    tx = client.transaction(SESSION)
    tx.mail_from("alice@example.test")
    greet(upstream)
    upstream.said()
    upstream.answer(b"250 2.1.0 Ok\r\n")
    bad = tx.rcpt("nobody@example.test")
    upstream.answer(b"554 5.7.1 <nobody@example.test>: Recipient address rejected: Access denied\r\n")
    assert result(bad).to_bytes() == \
        b"554 5.7.1 <nobody@example.test>: Recipient address rejected: Access denied\r\n"
    good = tx.rcpt("bob@example.test")
    upstream.answer(b"250 2.1.5 Ok\r\n")
    assert result(good).code == 250 and tx.accepted == ["bob@example.test"]


def lose(upstream: FakeUpstream, reply: bytes = b"") -> None:
    """The upstream closes the newest connection (after ``reply``, e.g. a 421)."""
    protocol, _ = upstream.connections[-1]
    if reply:
        protocol.dataReceived(reply)
    if not protocol.closed:
        protocol.connectionLost(Failure(ConnectionDone()))


@pytest.mark.parametrize("closing", [b"", b"421 4.4.2 mx.example.test Error: timeout exceeded\r\n"])
def test_a_connection_lost_before_any_accepted_rcpt_sends_mail_again(closing):
    """The upstream closes (a restart, its idle timeout's 421) after accepting MAIL and
    before any RCPT: the upstream's transaction died with it and our client was promised
    nothing that depends on it, so the next RCPT goes out on a new connection after
    the client's MAIL again (XCLIENT and its EHLO first), and the client sees a 250."""
    client, upstream, _ = make(xclient=True, auth_param=True)
    tx = client.transaction(SESSION)
    mail = tx.mail_from("alice@example.test", ["SIZE=120", "BODY=8BITMIME"])
    greet(upstream, EHLO_XCLIENT)
    xclient = (b"XCLIENT NAME=[UNAVAILABLE] ADDR=192.0.2.7 PORT=40123 HELO=laptop.example"
               b" LOGIN=alice@example.test\r\n")
    assert upstream.said() == xclient
    upstream.answer(b"220 2.0.0 Ok\r\n")
    assert upstream.said() == b"EHLO laptop.example\r\n"
    upstream.answer(EHLO_XCLIENT)
    mail_line = b"MAIL FROM:<alice@example.test> SIZE=120 BODY=8BITMIME AUTH=alice@example.test\r\n"
    assert upstream.said() == mail_line
    upstream.answer(b"250 2.1.0 Ok\r\n")
    assert result(mail).code == 250
    refused = tx.rcpt("nobody@example.test")  # refused: still nothing accepted upstream
    upstream.answer(b"550 5.1.1 <nobody@example.test>: Recipient address rejected\r\n")
    assert result(refused).code == 550
    upstream.said()
    lose(upstream, closing)
    rcpt = tx.rcpt("bob@example.test")
    assert len(upstream.connections) == 2
    greet(upstream, EHLO_XCLIENT)
    assert upstream.said() == xclient
    upstream.answer(b"220 2.0.0 Ok\r\n")
    assert upstream.said() == b"EHLO laptop.example\r\n"
    upstream.answer(EHLO_XCLIENT)
    assert upstream.said() == mail_line
    upstream.answer(b"250 2.1.0 Ok\r\n")
    assert upstream.said() == b"RCPT TO:<bob@example.test>\r\n"
    upstream.answer(b"250 2.1.5 Ok\r\n")
    assert result(rcpt).to_bytes() == b"250 2.1.5 Ok\r\n"
    assert tx.accepted == ["bob@example.test"] and tx.replayed
    data = tx.start_data()
    assert upstream.said() == b"DATA\r\n"
    upstream.answer(b"354 go ahead\r\n")
    assert result(data).code == 354


def mail_accepted(client, upstream) -> Any:
    """A transaction whose ``MAIL FROM:<a@example.test>`` the upstream accepted (on a
    connection greeted now; what was said is left for the test to read)."""
    tx = client.transaction(SESSION)
    tx.mail_from("a@example.test")
    greet(upstream)
    upstream.answer(b"250 2.1.0 Ok\r\n")
    return tx


def test_mail_is_sent_again_only_once_and_never_after_an_accepted_rcpt():
    """A second loss in the same transaction is the client's 451 (no reconnect loop);
    so is a loss after the upstream accepted a recipient: a new upstream session could
    refuse a recipient our client already has a 250 for, and the message would reach
    fewer recipients than the client was told.  Every later RCPT and DATA get the 451
    until RSET; the next transaction starts afresh."""
    client, upstream, _ = make()
    tx = mail_accepted(client, upstream)
    lose(upstream)
    rcpt = tx.rcpt("b@example.test")
    greet(upstream)
    assert upstream.said() == b"MAIL FROM:<a@example.test>\r\n"
    upstream.answer(b"250 2.1.0 Ok\r\n")
    assert upstream.said() == b"RCPT TO:<b@example.test>\r\n"
    lose(upstream)
    assert result(rcpt) == REPLIES["upstream_lost"] and len(upstream.connections) == 2
    assert tx.state == "done"

    tx = mail_accepted(client, upstream)
    first = tx.rcpt("b@example.test")
    upstream.said()
    upstream.answer(b"250 2.1.5 Ok\r\n")
    assert result(first).code == 250
    lose(upstream)
    assert result(tx.rcpt("c@example.test")) == REPLIES["upstream_lost"]
    assert len(upstream.connections) == 3 and upstream.said() == b""

    tx = mail_accepted(client, upstream)  # a 421 that answers the RCPT is its verdict
    rcpt = tx.rcpt("b@example.test")
    upstream.answer(b"421 4.7.0 mx.example.test Error: too many errors\r\n")
    assert result(rcpt).to_bytes() == b"451 4.7.0 mx.example.test Error: too many errors\r\n"
    assert len(upstream.connections) == 4 and tx.state == "done"


def test_a_replayed_mail_the_upstream_refuses_is_a_temporary_reply():
    """The new connection's upstream refuses the MAIL it accepted before (a policy that
    changed meanwhile): our client's MAIL stands, so its RCPT gets a 4xx with the
    upstream's text, and its retry will hear the upstream's verdict at MAIL."""
    client, upstream, _ = make()
    tx = mail_accepted(client, upstream)
    lose(upstream)
    rcpt = tx.rcpt("b@example.test")
    greet(upstream)
    upstream.said()
    upstream.answer(b"553 5.7.1 <a@example.test>: Sender address rejected\r\n")
    assert result(rcpt).to_bytes() == b"451 4.7.1 <a@example.test>: Sender address rejected\r\n"
    assert tx.state == "done" and upstream.said() == b"QUIT\r\n"


def into_data(tx: Any, upstream: Any) -> None:
    """RCPT TO:<b@example.test> and DATA, both accepted; what was said is read."""
    tx.rcpt("b@example.test")
    upstream.answer(b"250 2.1.5 Ok\r\n")
    tx.start_data()
    upstream.answer(b"354 go ahead\r\n")
    upstream.said()


def test_an_8bit_message_never_reaches_an_upstream_without_8bitmime():
    """BODY=8BITMIME to an upstream whose EHLO lacks 8BITMIME: the parameter is not
    sent; 7-bit chunks go out as they come, and at the first 8-bit octet the connection
    is dropped before that chunk is written (no final dot: the upstream keeps nothing)
    and the final reply is 554 5.6.3."""
    client, upstream, _ = make()
    tx = client.transaction(SESSION)
    tx.mail_from("a@example.test", ["BODY=8BITMIME"])
    greet(upstream, b"250-mx.example.test\r\n250 PIPELINING\r\n")
    assert upstream.said() == b"MAIL FROM:<a@example.test>\r\n"
    upstream.answer(b"250 2.1.0 Ok\r\n")
    into_data(tx, upstream)
    tx.write(b"Subject: caf")
    tx.write("\u00e9\r\n\r\nbody\r\n".encode())
    tx.write(b"more\r\n")
    assert upstream.said() == b"Subject: caf" and upstream.transport.disconnecting
    assert result(tx.end()).to_bytes() == (b"554 5.6.3 Message has 8-bit content and the"
                                           b" upstream server does not support 8BITMIME\r\n")
    assert upstream.said() == b"" and tx.state == "done" and client.idle == []


NO_SMTPUTF8 = b"250-mx.example.test\r\n250-8BITMIME\r\n250 PIPELINING\r\n"


def test_a_utf8_sender_never_reaches_an_upstream_without_smtputf8():
    """SMTPUTF8 with a UTF-8 sender, the upstream's EHLO without SMTPUTF8: 553 5.6.7 from
    us and nothing sent (RFC 6531 3.4); the transaction may start again."""
    client, upstream, _ = make()
    tx = client.transaction(SESSION)
    mail = tx.mail_from("j\u00f6rg@ex\u00e4mple.test", ["SMTPUTF8"])
    greet(upstream, NO_SMTPUTF8)
    assert result(mail).to_bytes() == (b"553 5.6.7 The upstream server does not support"
                                       b" SMTPUTF8 for this address\r\n")
    assert upstream.said() == b"" and tx.state == "new"
    again = tx.mail_from("a@example.test", ["SMTPUTF8"])
    assert upstream.said() == b"MAIL FROM:<a@example.test>\r\n"
    upstream.answer(b"250 2.1.0 Ok\r\n")
    assert result(again).code == 250


def test_utf8_recipients_and_headers_never_reach_an_upstream_without_smtputf8():
    """An all-ASCII sender goes on without SMTPUTF8; a UTF-8 recipient is refused with
    553 5.6.7 (not sent), an ASCII one is; UTF-8 in the header section drops the
    connection before that chunk (no final dot) with 554 5.6.7."""
    client, upstream, _ = make()
    tx = client.transaction(SESSION)
    tx.mail_from("a@example.test", ["SMTPUTF8", "BODY=8BITMIME"])
    greet(upstream, NO_SMTPUTF8)
    assert upstream.said() == b"MAIL FROM:<a@example.test> BODY=8BITMIME\r\n"
    upstream.answer(b"250 2.1.0 Ok\r\n")
    refused = tx.rcpt("\u7528\u6237@\u4f8b\u5b50.test")
    assert result(refused).to_bytes()[:10] == b"553 5.6.7 " and upstream.said() == b""
    tx.rcpt("b@example.test")
    assert upstream.said() == b"RCPT TO:<b@example.test>\r\n"
    upstream.answer(b"250 2.1.5 Ok\r\n")
    tx.start_data()
    upstream.answer(b"354 go ahead\r\n")
    upstream.said()
    tx.write(b"Received: x\r\nSubject: ok\r\n")
    tx.write("From: J\u00f6rg <a@example.test>\r\n\r\nbody\r\n".encode())
    assert upstream.said() == b"Received: x\r\nSubject: ok\r\n"
    assert upstream.transport.disconnecting
    assert result(tx.end()).to_bytes() == (b"554 5.6.7 Message has UTF-8 header fields and the"
                                           b" upstream server does not support SMTPUTF8\r\n")
    assert tx.state == "done" and client.idle == []


def test_smtputf8_with_ascii_headers_and_an_8bit_body_passes():
    """Declared SMTPUTF8, ASCII envelope and header section (the empty line split across
    chunks), 8-bit body with BODY=8BITMIME: the upstream without SMTPUTF8 gets it all."""
    client, upstream, _ = make()
    tx = client.transaction(SESSION)
    tx.mail_from("a@example.test", ["SMTPUTF8", "BODY=8BITMIME"])
    greet(upstream, NO_SMTPUTF8)
    upstream.said()
    upstream.answer(b"250 2.1.0 Ok\r\n")
    into_data(tx, upstream)
    body = "Subject: hi\r\n\r".encode(), "\ncaf\u00e9\r\n".encode()
    for chunk in body:
        tx.write(chunk)
    end = tx.end()
    assert upstream.said() == b"".join(body) + b".\r\n"
    upstream.answer(b"250 2.0.0 Ok: queued\r\n")
    assert result(end).code == 250


def test_smtputf8_goes_on_to_an_upstream_that_announces_it():
    client, upstream, _ = make()
    tx = client.transaction(SESSION)
    mail = tx.mail_from("j\u00f6rg@example.test", ["SMTPUTF8"])
    greet(upstream, b"250-mx.example.test\r\n250 SMTPUTF8\r\n")
    assert upstream.said() == "MAIL FROM:<j\u00f6rg@example.test> SMTPUTF8\r\n".encode()
    upstream.answer(b"250 2.1.0 Ok\r\n")
    assert result(mail).code == 250


def test_start_data_without_accepted_recipient_is_refused_locally():
    """No recipient accepted: 503 5.5.1 without asking the upstream."""
    client, upstream, _ = make()
    tx = client.transaction(SESSION)
    tx.mail_from("a@example.test")
    greet(upstream)
    upstream.said()
    upstream.answer(b"250 2.1.0 Ok\r\n")
    assert result(tx.start_data()) == REPLIES["need_rcpt"]
    assert upstream.said() == b""


def test_xclient_then_ehlo_again_and_auth_param():
    """XCLIENT carries NAME (unknown), ADDR, PORT, HELO and LOGIN (xtext) when announced;
    the upstream's 220 is followed by a fresh EHLO; MAIL carries AUTH=<login> when
    configured."""
    client, upstream, _ = make(xclient=True, auth_param=True)
    session = RelaySession(login="b\u00f6b+x", client_address="2001:db8::7",
                           client_port=5000, helo="my laptop")
    tx = client.transaction(session)
    mail = tx.mail_from("bob@example.test", ["SIZE=1000"])
    greet(upstream, EHLO_XCLIENT)
    assert upstream.said() == (b"XCLIENT NAME=[UNAVAILABLE] ADDR=IPV6:2001:db8::7 PORT=5000"
                               b" HELO=my+20laptop LOGIN=b+C3+B6b+2Bx\r\n")
    upstream.answer(b"220 mx.example.test ESMTP\r\n")
    # "my laptop" is no EHLO argument: our own name instead
    assert upstream.said() == b"EHLO relay.example.test\r\n"
    upstream.answer(EHLO_XCLIENT)
    assert upstream.said() == b"MAIL FROM:<bob@example.test> SIZE=1000 AUTH=b+C3+B6b+2Bx\r\n"
    upstream.answer(b"250 2.1.0 Ok\r\n")
    assert result(mail).code == 250 and tx.xclient_used


def test_a_connection_that_stopped_offering_xclient_is_not_reused():
    """Postfix offers XCLIENT only to its authorized hosts, and after one the client it
    sees is ours, so its next EHLO has no XCLIENT: that connection could not carry the
    next session's identity, and is closed instead of pooled."""
    client, upstream, _ = make(xclient=True)
    tx = client.transaction(RelaySession(login="alice", client_address="192.0.2.7",
                                         client_port=1, helo="pc-alice"))
    mail = tx.mail_from("alice@example.test")
    greet(upstream, EHLO_XCLIENT)
    assert upstream.said().startswith(b"XCLIENT ")
    upstream.answer(b"220 mx.example.test ESMTP\r\n")
    assert upstream.said() == b"EHLO pc-alice\r\n"
    upstream.answer(EHLO_PLAIN)  # no XCLIENT any more
    assert upstream.said().startswith(b"MAIL FROM:<alice@example.test>")
    upstream.answer(b"250 2.1.0 Ok\r\n")
    assert result(mail).code == 250
    tx.rcpt("bob@example.test")
    upstream.answer(b"250 2.1.5 Ok\r\n")
    tx.start_data()
    upstream.answer(b"354 go\r\n")
    tx.write(b"Subject: x\r\n\r\nbody\r\n")
    end = tx.end()
    upstream.said()
    upstream.answer(b"250 2.0.0 Ok: queued as 1\r\n")
    assert result(end).code == 250
    assert client.idle == [] and upstream.said() == b"QUIT\r\n"


def test_xclient_unknown_values_and_refusal():
    """Missing session facts are ``[UNAVAILABLE]``; a refused XCLIENT is a 4xx for the
    client and the connection is dropped (its identity would be wrong)."""
    client, upstream, _ = make(xclient=True)
    tx = client.transaction(RelaySession(login=None))
    mail = tx.mail_from("x@example.test")
    greet(upstream, EHLO_XCLIENT)
    assert upstream.said() == (b"XCLIENT NAME=[UNAVAILABLE] ADDR=[UNAVAILABLE] PORT=[UNAVAILABLE]"
                               b" HELO=[UNAVAILABLE] LOGIN=[UNAVAILABLE]\r\n")
    upstream.answer(b"550 5.7.0 Error: insufficient authorization\r\n")
    assert result(mail) == REPLIES["upstream_unavailable"]
    assert upstream.transport.disconnecting


def test_trace_header_without_xclient():
    """Without XCLIENT the configured trace header goes right below the message's first
    header field (the server's Received header, folded over three lines, cut anywhere):
    RFC 5321 4.4 keeps the trace fields at the top."""
    client, upstream, _ = make(xclient=True, trace_header="X-Authenticated-User")
    tx = client.transaction(SESSION)
    tx.mail_from("alice@example.test")
    greet(upstream)  # no XCLIENT announced
    upstream.said()
    upstream.answer(b"250 2.1.0 Ok\r\n")
    tx.rcpt("bob@example.test")
    upstream.answer(b"250 2.1.5 Ok\r\n")
    tx.start_data()
    upstream.said()
    upstream.answer(b"354 go\r\n")
    tx.write(b"Received: from laptop.example ([192.0.2.7])\r\n\tby mx.example.test")
    tx.write(b" (saslsmtp) with ESMTPA\r\n")
    tx.write(b"\t(authenticated user alice@example.test); Mon, 30 Nov 2026 08:00:00 +0000\r")
    tx.write(b"\n.Subject: x\r\n\r\nbody\r\n")
    tx.end()
    assert upstream.said() == (b"Received: from laptop.example ([192.0.2.7])\r\n"
                               b"\tby mx.example.test (saslsmtp) with ESMTPA\r\n"
                               b"\t(authenticated user alice@example.test);"
                               b" Mon, 30 Nov 2026 08:00:00 +0000\r\n"
                               b"X-Authenticated-User: login=alice@example.test;"
                               b" client=[192.0.2.7]:40123; helo=laptop.example\r\n"
                               b"..Subject: x\r\n\r\nbody\r\n.\r\n")


@pytest.mark.parametrize("body, sent", [
    (b"", b"X-T: login=a; client=[unknown]:0; helo=-\r\n.\r\n"),
    (b"Subject: only", b"Subject: only\r\nX-T: login=a; client=[unknown]:0; helo=-\r\n.\r\n"),
    (b"\r\nbody", b"X-T: login=a; client=[unknown]:0; helo=-\r\n\r\nbody\r\n.\r\n"),
])
def test_trace_header_of_a_message_that_ends_in_its_first_field(body, sent):
    """An empty message, one field without a line end, no header section at all: the
    trace header still goes out once, as a whole line."""
    client, upstream, _ = make(trace_header="X-T")
    tx = client.transaction(RelaySession(login="a"))
    tx.mail_from("a@example.test")
    greet(upstream)
    upstream.answer(b"250 2.1.0 Ok\r\n")
    tx.rcpt("b@example.test")
    upstream.answer(b"250 2.1.5 Ok\r\n")
    tx.start_data()
    upstream.answer(b"354 go\r\n")
    upstream.said()
    tx.write(body)
    tx.end()
    assert upstream.said() == sent


def test_a_helo_cannot_add_a_field_to_the_trace_header():
    """The client's HELO is its own word: ``laptop;login=root`` must not read as a
    second ``login=`` to a parser of the header."""
    client, _, _ = make(trace_header="X-Authenticated-User")
    tx = client.transaction(RelaySession(login="alice@example.test", client_address="192.0.2.7",
                                         client_port=1, helo="laptop;login=root"))
    assert tx._trace_line() == (b"X-Authenticated-User: login=alice@example.test;"
                                b" client=[192.0.2.7]:1; helo=laptop?login?root\r\n")


def test_a_login_name_cannot_add_a_field_to_the_trace_header():
    """A login name with a space, ";", "=" or a quote (a users file or an HTTP API may
    accept one) must not read as a second ``client=`` or ``login=``."""
    client, _, _ = make(trace_header="X-Authenticated-User")
    tx = client.transaction(RelaySession(login='bob; client=[10.0.0.1]:25 "x\\', client_address="192.0.2.7",
                                         client_port=1, helo="laptop"))
    assert tx._trace_line() == (b"X-Authenticated-User: login=bob??client?[10.0.0.1]:25??x?;"
                                b" client=[192.0.2.7]:1; helo=laptop\r\n")


def lmtp_transaction(recipients: list[tuple[str, bytes]]) -> tuple[UpstreamTransaction, FakeUpstream]:
    client, upstream, _ = make(lmtp=True)
    tx = client.transaction(SESSION)
    tx.mail_from("alice@example.test")
    greet(upstream, b"250-lmtp.example.test\r\n250 ENHANCEDSTATUSCODES\r\n", verb=b"LHLO")
    upstream.said()
    upstream.answer(b"250 2.1.0 OK\r\n")
    for address, reply in recipients:
        tx.rcpt(address)
        upstream.answer(reply)
    tx.start_data()
    upstream.said()
    upstream.answer(b"354 OK\r\n")
    tx.write(b"Subject: x\r\n\r\nhi\r\n")
    return tx, upstream


@pytest.mark.parametrize("finals, expected", [
    ([b"250 2.0.0 <a> delivered", b"250 2.0.0 <b> delivered"], b"250 2.0.0 <a> delivered\r\n"),
    ([b"552 5.2.2 <a> quota", b"452 4.2.2 <b> quota"], b"452 4.2.2 <b> quota\r\n"),
    ([b"550 5.1.1 <a> gone", b"552 5.2.2 <b> quota"], b"550 5.1.1 <a> gone\r\n"),
    ([b"250 2.0.0 <a> ok", b"452 4.2.2 <b> quota"],
     b"554-5.2.2 <b> quota\r\n554-5.2.2 Not delivered to: b@x.test\r\n"
     b"554 5.2.2 Delivered to 1 of 2 recipients (do not resend to them): a@x.test\r\n"),
    ([b"451 4.3.0 <a> try later", b"250 2.0.0 <b> ok"],
     b"554-5.3.0 <a> try later\r\n554-5.3.0 Not delivered to: a@x.test\r\n"
     b"554 5.3.0 Delivered to 1 of 2 recipients (do not resend to them): b@x.test\r\n"),
    ([b"250 2.0.0 <a> ok", b"550 5.1.1 <b> gone"],
     b"550-5.1.1 <b> gone\r\n550-5.1.1 Not delivered to: b@x.test\r\n"
     b"550 5.1.1 Delivered to 1 of 2 recipients (do not resend to them): a@x.test\r\n"),
])
def test_lmtp_one_reply_per_accepted_recipient(finals, expected):
    """LMTP: one final reply per *accepted* recipient (the refused one gets none); all
    good -> 250; all failed -> a temporary one first, else the first permanent one; some
    delivered -> a permanent failure naming who got it (a 4xx would make the client
    deliver it again to them)."""
    tx, upstream = lmtp_transaction([("a@x.test", b"250 2.1.5 OK\r\n"),
                                     ("gone@x.test", b"550 5.1.1 no such user\r\n"),
                                     ("b@x.test", b"250 2.1.5 OK\r\n")])
    assert tx.accepted == ["a@x.test", "b@x.test"]
    end = tx.end()
    assert upstream.said().endswith(b"hi\r\n.\r\n")
    upstream.answer(finals[0] + b"\r\n")
    assert not end.called  # still waiting for the second recipient's verdict
    upstream.answer(finals[1] + b"\r\n")
    assert result(end).to_bytes() == expected


def test_lmtp_connection_lost_after_some_verdicts():
    """The connection dies after one recipient's 250: the other's fate is unknown, the
    first has it; a 4xx would make the client send the first a second copy, so a 554
    that names both (with the loss as the reason)."""
    tx, upstream = lmtp_transaction([("a@x.test", b"250 2.1.5 OK\r\n"),
                                     ("b@x.test", b"250 2.1.5 OK\r\n")])
    end = tx.end()
    upstream.answer(b"250 2.0.0 <a> delivered\r\n")
    upstream.connections[-1][0].connectionLost(Failure(ConnectionDone()))
    assert result(end).to_bytes() == (
        b"554-5.4.2 Upstream connection lost, try again later\r\n"
        b"554-5.4.2 Not delivered to: b@x.test\r\n"
        b"554 5.4.2 Delivered to 1 of 2 recipients (do not resend to them): a@x.test\r\n")


def test_lmtp_partial_reply_lists_are_bounded():
    """100 recipients, one failed: the list of those delivered stays one short line."""
    recipients = [f"user{i:03}@example.test" for i in range(100)]
    replies = [SMTPReply(250, "2.0.0", "ok")] * 99 + [SMTPReply(552, "5.2.2", "full")]
    verdict = combine(recipients, replies)
    lines = verdict.reply.to_bytes().split(b"\r\n")[:-1]
    assert lines[1] == b"552-5.2.2 Not delivered to: user099@example.test"
    assert lines[2].startswith(b"552 5.2.2 Delivered to 99 of 100 recipients (do not resend"
                               b" to them): user000@example.test, user001@example.test, ")
    assert lines[2].endswith(b"user006@example.test and 92 more") and len(lines[2]) < 300, lines[2]
    assert verdict.delivered == tuple(recipients[:99]) and verdict.failed == ("user099@example.test",)


def test_refused_connection_is_451_4_4_1():
    """Nobody listening: the client gets 451 4.4.1 at MAIL; a later MAIL may retry."""
    client, upstream, _ = make()
    upstream.refuse = True
    tx = client.transaction(SESSION)
    assert result(tx.mail_from("a@example.test")) == REPLIES["upstream_unavailable"]
    assert REPLIES["upstream_unavailable"].to_bytes() == \
        b"451 4.4.1 Upstream server unavailable, try again later\r\n"
    upstream.refuse = False
    again = tx.mail_from("a@example.test")
    greet(upstream)
    upstream.answer(b"250 2.1.0 Ok\r\n")
    assert result(again).code == 250


def test_connect_timeout():
    """A connection attempt that never completes gives 451 4.4.2 after ``timeout``."""
    client, upstream, clock = make()
    upstream.hang = True
    mail = client.transaction(SESSION).mail_from("a@example.test")
    clock.advance(29.9)
    assert not mail.called
    clock.advance(0.2)
    assert result(mail) == REPLIES["upstream_timeout"]


@pytest.mark.parametrize("greeting, ehlo", [
    (b"554 5.3.2 go away\r\n", None),                   # a relay host refused
    (b"220 lmtp.example.test LMTP\r\n", b"500 5.5.1 Unknown command\r\n"),  # LMTP, not SMTP
])
def test_an_upstream_that_will_not_talk_is_a_451_for_the_client(greeting: bytes,
                                                                 ehlo: bytes | None) -> None:
    """A refused greeting or EHLO says nothing about the client's message: 451 4.4.1
    (try again later), never the upstream's 5xx as if the mail were refused."""
    client, upstream, _ = make()
    mail = client.transaction(SESSION).mail_from("a@example.test")
    upstream.answer(greeting)
    if ehlo is not None:
        assert upstream.said() == b"EHLO relay.example.test\r\n"
        upstream.answer(ehlo)
    assert result(mail) == REPLIES["upstream_unavailable"]


def test_silent_greeting_times_out():
    """Connected, but no greeting within ``timeout``: 451 4.4.2 and the connection dropped."""
    client, upstream, clock = make()
    mail = client.transaction(SESSION).mail_from("a@example.test")
    clock.advance(30.1)
    assert result(mail) == REPLIES["upstream_timeout"]
    assert upstream.transport.disconnecting


def test_command_timeout_at_rcpt():
    """A RCPT without an answer within ``timeout``: 451 4.4.2, connection dropped."""
    client, upstream, clock = make()
    tx = mail_accepted(client, upstream)
    rcpt = tx.rcpt("b@example.test")
    clock.advance(31)
    assert result(rcpt) == REPLIES["upstream_timeout"]
    assert upstream.transport.disconnecting and client.idle == []


def in_data(client: UpstreamClient, upstream: FakeUpstream) -> UpstreamTransaction:
    """A transaction from a@ to b@example.test on a new connection, walked up to the
    upstream's 354: where the tests of the DATA phase start."""
    tx = mail_accepted(client, upstream)
    tx.rcpt("b@example.test")
    upstream.answer(b"250 2.1.5 Ok\r\n")
    tx.start_data()
    upstream.answer(b"354 go\r\n")
    return tx


def test_final_dot_timeout_and_lost_connection_mid_data():
    """The verdict after the dot is waited for ``final_timeout`` (600 s by default, RFC
    5321 4.5.3.2.6), not the commands' ``timeout``: a content filter may take minutes,
    and a 451 while the upstream still works makes the client's retry a second copy.
    None by then: 451 4.4.2.  A connection lost during DATA: the rest of the message is
    discarded and ``end`` answers 451 4.4.2."""
    client, upstream, clock = make()
    assert (client.timeout, client.final_timeout) == (30.0, 600.0)
    tx = in_data(client, upstream)
    end = tx.end()
    clock.advance(30.5)
    assert not end.called  # the command timeout does not apply
    upstream.answer(b"250 2.0.0 Ok: queued as LATE\r\n")
    assert result(end).to_bytes() == b"250 2.0.0 Ok: queued as LATE\r\n"
    tx = client.transaction(SESSION)
    tx.mail_from("a@example.test")
    upstream.answer(b"250 2.0.0 Ok\r\n")  # RSET on the pooled connection
    upstream.answer(b"250 2.1.0 Ok\r\n")
    tx.rcpt("b@example.test")
    upstream.answer(b"250 2.1.5 Ok\r\n")
    tx.start_data()
    upstream.answer(b"354 go\r\n")
    end = tx.end()
    clock.advance(599.5)
    assert not end.called
    clock.advance(1)
    assert result(end) == REPLIES["upstream_timeout"]
    assert upstream.transport.disconnecting  # a late verdict must not reach another message

    short, short_upstream, short_clock = make(final_timeout=45.0)
    end = in_data(short, short_upstream).end()
    short_clock.advance(45.5)
    assert result(end) == REPLIES["upstream_timeout"]

    tx = in_data(client, upstream)
    upstream.said()
    upstream.connections[-1][0].connectionLost(Failure(ConnectionRefusedError()))
    tx.write(b"more\r\n")
    assert upstream.said() == b""
    assert result(tx.end()) == REPLIES["upstream_lost"]


class Producer:
    """Records the flow-control calls our client's transport would get."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def pauseProducing(self) -> None:
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.calls.append("resume")

    def stopProducing(self) -> None:
        self.calls.append("stop")


def data_phase(clock_timeout: float = 30.0):
    client, upstream, clock = make()
    tx = in_data(client, upstream)
    producer = Producer()
    tx.registerProducer(producer, True)
    return client, upstream, clock, tx, producer


def test_backpressure_reaches_the_client_transport():
    """The upstream transport pausing its producer pauses our client's transport, and
    resuming resumes it: the message is never buffered beyond the socket buffers."""
    _, upstream, _, tx, producer = data_phase()
    connection = upstream.connections[-1][0]
    assert upstream.transport.producer is connection and upstream.transport.streaming
    connection.pauseProducing()
    connection.resumeProducing()
    assert producer.calls == ["pause", "resume"]


def test_the_client_is_resumed_when_the_transaction_lets_go_of_it():
    """The upstream's buffer was full at the final dot (any message past 64 KiB): when
    the transaction ends it resumes our client's transport before forgetting it, or the
    session would never read its QUIT."""
    _, upstream, _, tx, producer = data_phase()
    upstream.connections[-1][0].pauseProducing()
    end = tx.end()
    tx.unregisterProducer()
    assert producer.calls == ["pause", "resume"]
    upstream.answer(b"250 2.0.0 Ok: queued\r\n")
    assert result(end).code == 250
    assert producer.calls == ["pause", "resume"]  # once


def test_stalled_data_phase_times_out():
    """An upstream that reads nothing for ``timeout`` during DATA is dropped; the client
    is resumed (its data is discarded) and gets 451 4.4.2 at the dot."""
    _, upstream, clock, tx, producer = data_phase()
    upstream.connections[-1][0].pauseProducing()
    clock.advance(30.5)
    assert upstream.transport.disconnecting
    upstream.connections[-1][0].connectionLost(Failure(ConnectionRefusedError()))
    assert producer.calls == ["pause", "resume"]
    tx.write(b"rest\r\n")
    assert result(tx.end()) == REPLIES["upstream_timeout"]


def test_pool_reuses_with_rset_and_replaces_dead_connections():
    """The second transaction reuses the idle connection after RSET; a connection whose
    RSET fails is dropped and a new one made."""
    client, upstream, _ = make()
    for round_ in range(3):
        tx = client.transaction(SESSION)
        mail = tx.mail_from("a@example.test")
        if round_ == 0:
            greet(upstream)
        elif round_ == 1:
            assert upstream.said() == b"RSET\r\n"
            upstream.answer(b"250 2.0.0 Ok\r\n")
        else:
            assert upstream.said() == b"RSET\r\n"
            upstream.answer(b"421 4.4.2 timeout\r\n")  # unsolicited close, as on idle timeout
            greet(upstream)
        assert upstream.said() == b"MAIL FROM:<a@example.test>\r\n"
        upstream.answer(b"250 2.1.0 Ok\r\n")
        assert result(mail).code == 250
        tx.abort()
    assert len(upstream.connections) == 2 and client.connections_made == 2


def test_a_connection_carries_at_most_reuse_limit_transactions():
    """After ``reuse_limit`` transactions (100 by default: 99 RSETs, below the junk
    command limits of Postfix and saslsmtp) a connection says QUIT instead of going
    back to the pool; the next transaction opens a new one."""
    assert make()[0].reuse_limit == 100
    client, upstream, _ = make(reuse_limit=3)
    for round_ in range(4):
        tx = client.transaction(SESSION)
        mail = tx.mail_from("a@example.test")
        if round_ in (0, 3):
            greet(upstream)
        else:
            assert upstream.said() == b"RSET\r\n"
            upstream.answer(b"250 2.0.0 Ok\r\n")
        assert upstream.said() == b"MAIL FROM:<a@example.test>\r\n"
        upstream.answer(b"250 2.1.0 Ok\r\n")
        assert result(mail).code == 250
        tx.abort()
        if round_ == 2:
            assert upstream.said() == b"QUIT\r\n" and client.idle == []
    assert client.connections_made == 2


def test_pool_size_bounds_idle_connections():
    """Beyond ``pool_size`` idle connections, a finished one says QUIT."""
    client, upstream, _ = make(pool_size=0)
    tx = mail_accepted(client, upstream)
    upstream.said()
    tx.abort()
    assert upstream.said() == b"QUIT\r\n" and client.idle == []


def test_abort_during_data_drops_the_connection_and_order_is_enforced():
    """A message cannot be taken back: abort during DATA drops the connection.  Calls
    out of order are a caller bug and raise."""
    _, upstream, _, tx, _ = data_phase()
    with pytest.raises(TransactionStateError):
        tx.rcpt("late@example.test")
    tx.abort()
    tx.abort()
    assert upstream.transport.disconnecting
    with pytest.raises(TransactionStateError):
        tx.write(b"x")


def test_malformed_and_multiline_replies():
    """A multi-line RCPT reply is passed on whole; garbage is 451 4.4.0 and a drop."""
    client, upstream, _ = make()
    tx = mail_accepted(client, upstream)
    rcpt = tx.rcpt("b@example.test")
    upstream.answer(b"550-5.1.1 first line\r\n550 5.1.1 second line\r\n")
    assert result(rcpt).to_bytes() == b"550-5.1.1 first line\r\n550 5.1.1 second line\r\n"
    rcpt = tx.rcpt("c@example.test")
    upstream.answer(b"HTTP/1.1 400 Bad Request\r\n")
    assert result(rcpt) == REPLIES["upstream_error"]
    assert upstream.transport.disconnecting


def test_starttls_required_but_not_offered():
    """``starttls`` configured and not announced: 451 4.4.1, nothing sent in clear."""
    client, upstream, _ = make(starttls=True, tls_creator=object(), tls_hostname="mx")
    mail = client.transaction(SESSION).mail_from("a@example.test")
    greet(upstream)
    assert result(mail) == REPLIES["upstream_unavailable"]
    assert upstream.said() == b""


def test_abort_while_connecting_or_waiting_for_mail():
    """``abort`` while MAIL waits for a connection: the connection, once made, goes to
    the pool unused.  ``abort`` while MAIL waits for its reply: the connection is dropped
    and the transaction stays finished."""
    client, upstream, _ = make()
    tx = client.transaction(SESSION)
    mail = tx.mail_from("a@example.test")
    tx.abort()
    greet(upstream)  # the handshake completes after the abort
    assert result(mail) == REPLIES["upstream_lost"]
    assert upstream.said() == b"" and client.idle == [upstream.connections[0][0]]
    assert tx.state == "done"

    tx = client.transaction(SESSION)
    mail = tx.mail_from("a@example.test")
    assert upstream.said() == b"RSET\r\n"
    upstream.answer(b"250 2.0.0 Ok\r\n")
    assert upstream.said() == b"MAIL FROM:<a@example.test>\r\n"
    tx.abort()
    assert result(mail) == REPLIES["upstream_lost"]
    assert tx.state == "done" and upstream.transport.disconnecting and client.idle == []


def test_a_connection_lost_while_in_use_is_logged_once_and_not_when_idle():
    """The upstream closing while a transaction holds the connection (streaming DATA,
    or between two commands) is one log line naming the upstream; closing a pooled
    idle connection (its idle timeout) or after our QUIT is not news."""
    from twisted.internet.error import ConnectionDone
    from twisted.logger import formatEvent, globalLogPublisher

    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        client, upstream, _ = make(pool_size=1)
        tx = in_data(client, upstream)
        upstream.connections[-1][0].connectionLost(Failure(ConnectionDone()))
        tx.write(b"rest\r\n")
        assert result(tx.end()) == REPLIES["upstream_lost"]

        tx = client.transaction(SESSION)
        tx.mail_from("a@example.test")
        greet(upstream)
        upstream.answer(b"250 2.1.0 Ok\r\n")
        first = tx.rcpt("b@example.test")
        upstream.answer(b"250 2.1.5 Ok\r\n")
        assert result(first).code == 250
        upstream.connections[-1][0].connectionLost(Failure(ConnectionDone()))
        assert result(tx.rcpt("c@example.test")) == REPLIES["upstream_lost"]

        both = [in_data(client, upstream), in_data(client, upstream)]
        for tx, (protocol, transport) in zip(both, upstream.connections[-2:]):
            end = tx.end()  # the first goes to the pool, the second says QUIT (pool_size=1)
            protocol.dataReceived(b"250 2.0.0 Ok: queued\r\n")
            assert result(end).code == 250
        assert client.idle == [upstream.connections[-2][0]]
        assert upstream.said().endswith(b".\r\nQUIT\r\n")
        upstream.answer(b"221 2.0.0 Bye\r\n")
        for protocol, _ in upstream.connections[-2:]:
            protocol.connectionLost(Failure(ConnectionDone()))
        assert client.idle == []
    finally:
        globalLogPublisher.removeObserver(events.append)
    lines = [formatEvent(e) for e in events if e.get("log_namespace") == "saslsmtp.relay.client"]
    assert lines == ["upstream tcp:127.0.0.1:10025: connection lost during DATA",
                     "upstream tcp:127.0.0.1:10025: connection lost"]


def test_a_connection_lost_before_the_reply_to_our_quit_is_not_logged():
    """At shutdown ``close()`` says QUIT on every pooled connection and the process ends
    before the 221 arrives (the daemon logged "connection lost waiting for the reply to
    QUIT" for each at every stop, though nothing was lost); the same for a QUIT after a
    transaction whose connection is not pooled."""
    from twisted.internet.error import ConnectionDone
    from twisted.logger import globalLogPublisher

    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        client, upstream, _ = make(pool_size=1)
        both = [in_data(client, upstream), in_data(client, upstream)]
        for tx, (protocol, _transport) in zip(both, upstream.connections[-2:]):
            end = tx.end()  # the first goes to the pool, the second says QUIT (pool_size=1)
            protocol.dataReceived(b"250 2.0.0 Ok: queued\r\n")
            assert result(end).code == 250
        client.close()
        assert upstream.said().endswith(b"QUIT\r\n")
        for protocol, _transport in upstream.connections[-2:]:
            protocol.connectionLost(Failure(ConnectionDone()))
        assert client.idle == []
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert [e for e in events if e.get("log_namespace") == "saslsmtp.relay.client"] == []
