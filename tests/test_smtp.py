"""Exact-byte transcripts of ``SubmissionESMTP`` over StringTransport.

Each row of the README's reply table, the defects of stock Twisted ESMTP this protocol
avoids (docs/twisted-notes.md), pipelining with a pending step, STARTTLS injection and
hostile input.  The tests fire
the Deferreds and advance the Clock themselves.
"""

from __future__ import annotations

import base64

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from zope.interface import implementer

from saslsmtp.checkers.chain import BackendChain
from saslsmtp.errors import TemporaryFailure
from saslsmtp.replies import REPLIES
from saslsmtp.testing import MemoryDelivery, SMTPHarness

OK = REPLIES["auth_ok"].to_bytes()
INVALID = REPLIES["auth_invalid"].to_bytes()
TEMPFAIL = REPLIES["auth_tempfail"].to_bytes()

# RFC 4616 section 4 and RFC 4954 section 4 examples.
RFC4616_TIM = b"AHRpbQB0YW5zdGFhZnRhbnN0YWFm"  # \0tim\0tanstaaftanstaaf
RFC4616_URSEL = b"VXJzZWwAS3VydAB4aXBqM3BsbXE="  # Ursel\0Kurt\0xipj3plmq
RFC4954_TEST = b"dGVzdAB0ZXN0ADEyMzQ="  # test\0test\01234

USERS = {"tim": "tanstaaftanstaaf", "test": "1234", "Kurt": "xipj3plmq"}
EHLO = b"EHLO client.example\r\n"


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def harness(**kw) -> SMTPHarness:
    h = SMTPHarness(users=USERS, **kw)
    h.send(EHLO)
    return h


@implementer(ICredentialsChecker)
class PendingChecker:
    """A checker whose answers the test fires by hand."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self) -> None:
        self.calls: list[tuple[object, defer.Deferred]] = []

    def requestAvatarId(self, credentials):
        d: defer.Deferred = defer.Deferred()
        self.calls.append((credentials, d))
        return d


def test_greeting_and_ehlo_exact() -> None:
    """The banner and the EHLO keywords, AUTH last."""
    h = SMTPHarness(users=USERS, hostname="mx.example.test")
    assert h.greeting == b"220 mx.example.test ESMTP saslsmtp\r\n"
    assert h.send(EHLO) == (
        b"250-mx.example.test\r\n250-PIPELINING\r\n250-SIZE 26214400\r\n250-8BITMIME\r\n"
        b"250-ENHANCEDSTATUSCODES\r\n250-SMTPUTF8\r\n250 AUTH PLAIN LOGIN\r\n")


def test_rfc4616_plain_success() -> None:
    """RFC 4616's tim/tanstaaftanstaaf vector logs in: 235 2.7.0."""
    h = harness()
    assert h.send(b"AUTH PLAIN " + RFC4616_TIM + b"\r\n") == OK
    assert h.realm.logins == ["tim"]


def test_rfc4954_plain_authzid_equal_to_user() -> None:
    """RFC 4954's example has authzid == authcid ("test"): accepted."""
    assert harness().send(b"AUTH PLAIN " + RFC4954_TEST + b"\r\n") == OK


def test_rfc4616_plain_other_authzid_refused() -> None:
    """Ursel acting as Kurt is refused even with Kurt's right password."""
    h = harness()
    assert h.send(b"AUTH PLAIN " + RFC4616_URSEL + b"\r\n") == (
        b"535 5.7.8 Not authorized to requested authorization identity\r\n")
    assert h.realm.logins == []


def test_plain_without_initial_response_gets_empty_challenge() -> None:
    """`AUTH PLAIN` -> `334 ` (with the space), then the response."""
    h = harness()
    assert h.send(b"AUTH PLAIN\r\n") == b"334 \r\n"
    assert h.send(RFC4616_TIM + b"\r\n") == OK


def test_wrong_password() -> None:
    """Wrong credentials: 535 5.7.8."""
    h = harness()
    assert h.send(b"AUTH PLAIN " + b64(b"\0tim\0wrong") + b"\r\n") == INVALID


def test_login_prompts_and_initial_response() -> None:
    """LOGIN prompts Username:/Password:, and skips the first with an initial response."""
    h = harness()
    assert h.send(b"AUTH LOGIN\r\n") == b"334 VXNlcm5hbWU6\r\n"
    assert h.send(b64(b"tim") + b"\r\n") == b"334 UGFzc3dvcmQ6\r\n"
    assert h.send(b64(b"tanstaaftanstaaf") + b"\r\n") == OK
    h2 = harness()
    assert h2.send(b"AUTH LOGIN " + b64(b"tim") + b"\r\n") == b"334 UGFzc3dvcmQ6\r\n"
    assert h2.send(b64(b"nope") + b"\r\n") == INVALID


def test_login_empty_password_line() -> None:
    """An empty line is an empty response (here: an empty, wrong password)."""
    h = harness()
    h.send(b"AUTH LOGIN " + b64(b"tim") + b"\r\n")
    assert h.send(b"\r\n") == INVALID


def test_cancel_with_star() -> None:
    """`*` cancels: 501 5.7.0, and the next command works."""
    h = harness()
    h.send(b"AUTH LOGIN\r\n")
    assert h.send(b"*\r\n") == b"501 5.7.0 Authentication aborted\r\n"
    assert h.send(b"NOOP\r\n") == b"250 2.0.0 OK\r\n"


def test_bad_base64_initial_and_continuation() -> None:
    """Stock defect 3: lenient base64.  Strict decoding answers 501 5.5.2."""
    h = harness()
    assert h.send(b"AUTH PLAIN AHVzZXIAcHc=!!!\r\n") == b"501 5.5.2 Cannot decode response\r\n"
    h.send(b"AUTH LOGIN\r\n")
    assert h.send(b"dGVzd=A\r\n") == b"501 5.5.2 Cannot decode response\r\n"
    assert h.send(b"NOOP\r\n") == b"250 2.0.0 OK\r\n"


def test_bad_base64_is_an_aborted_exchange_initial_or_continuation(monkeypatch) -> None:
    """Bad base64 as the initial response counts and logs as ``aborted``, as it does
    on a continuation line (docs/operations.md: a broken exchange)."""
    from saslsmtp.events import SessionEvents
    from tests.test_events import Recorder, captured
    lines, metrics = captured(monkeypatch), Recorder()
    h = harness()
    h.protocol.events = SessionEvents(metrics)
    assert h.send(b"AUTH PLAIN !!!\r\n") == b"501 5.5.2 Cannot decode response\r\n"
    h.send(b"AUTH LOGIN\r\n")
    assert h.send(b"dGVzd=A\r\n") == b"501 5.5.2 Cannot decode response\r\n"
    assert metrics.calls == [("auth_finished", "PLAIN", "aborted"),
                             ("auth_finished", "LOGIN", "aborted")]
    assert lines == ["AUTH PLAIN aborted ip=192.0.2.10", "AUTH LOGIN aborted ip=192.0.2.10"]


def test_equals_is_empty_initial_response() -> None:
    """`=` is a present, empty initial response: for PLAIN a malformed message."""
    h = harness()
    assert h.send(b"AUTH PLAIN =\r\n") == b"535 5.7.8 Malformed PLAIN response\r\n"


def test_bare_auth_is_a_syntax_error() -> None:
    """Stock defect 1: a bare AUTH raised IndexError and dropped the connection."""
    h = harness()
    assert h.send(b"AUTH\r\n") == b"501 5.5.4 Syntax: AUTH mechanism [initial-response]\r\n"
    assert not h.transport.disconnecting


def test_malformed_plain_blob() -> None:
    """Stock defect 2: malformed PLAIN raised IllegalClientResponse; now a 535 reply."""
    h = harness()
    assert h.send(b"AUTH PLAIN " + b64(b"alice\0pw") + b"\r\n") == (
        b"535 5.7.8 Malformed PLAIN response\r\n")
    assert not h.transport.disconnecting


def test_backend_error_is_454_not_451() -> None:
    """Stock defect 5: a non-UnauthorizedLogin failure answered 451; RFC 4954 wants 454 4.7.0."""
    checker = PendingChecker()
    h = SMTPHarness(checkers=[BackendChain([("p", checker)])])
    h.send(EHLO)
    assert h.send(b"AUTH PLAIN " + RFC4616_TIM + b"\r\n") == b""
    checker.calls[0][1].errback(TemporaryFailure("ldap down"))
    assert h.take() == TEMPFAIL


def test_unexpected_exception_is_454() -> None:
    """A checker bug (any exception) is a temporary failure too, never a dropped connection."""
    checker = PendingChecker()
    h = SMTPHarness(checkers=[checker])
    h.send(EHLO)
    h.send(b"AUTH PLAIN " + RFC4616_TIM + b"\r\n")
    checker.calls[0][1].errback(ZeroDivisionError())
    assert h.take() == TEMPFAIL
    assert h.send(b"NOOP\r\n") == b"250 2.0.0 OK\r\n"


def test_async_step_with_initial_response_sends_nothing_until_decided() -> None:
    """Stock defect 4: IChallengeResponse could not wait.  The reply waits for the checker."""
    checker = PendingChecker()
    h = SMTPHarness(checkers=[checker])
    h.send(EHLO)
    assert h.send(b"AUTH PLAIN " + RFC4616_TIM + b"\r\n") == b""
    # input pipelined behind the pending step stops the reading until it is answered
    assert h.transport.producerState == "producing"
    assert h.send(b"NOOP\r\n") == b""
    assert h.transport.producerState == "paused"
    checker.calls[0][1].callback(b"tim")
    assert h.take() == OK + b"250 2.0.0 OK\r\n"
    assert h.transport.producerState == "producing"


def test_unknown_mechanism() -> None:
    assert harness().send(b"AUTH FOO\r\n") == b"504 5.5.4 Unrecognized authentication type\r\n"


def test_auth_after_success() -> None:
    h = harness()
    h.send(b"AUTH PLAIN " + RFC4616_TIM + b"\r\n")
    assert h.send(b"AUTH PLAIN " + RFC4616_TIM + b"\r\n") == b"503 5.5.1 Already authenticated\r\n"


def test_auth_inside_transaction() -> None:
    """AUTH between MAIL and the end of the transaction: 503 (RFC 4954 section 4).

    Reaching MAIL needs an authenticated session on a submission listener, so this runs
    with require_auth off (a relay-style listener)."""
    h = harness(require_auth=False)
    h.protocol.avatar = MemoryDelivery("anonymous", h.realm.messages)
    assert h.send(b"MAIL FROM:<a@example.test>\r\n") == b"250 2.1.0 Sender OK\r\n"
    assert h.send(b"AUTH PLAIN " + RFC4616_TIM + b"\r\n") == (
        b"503 5.5.1 AUTH not permitted during a mail transaction\r\n")


def test_auth_before_ehlo() -> None:
    h = SMTPHarness(users=USERS)
    assert h.send(b"AUTH PLAIN " + RFC4616_TIM + b"\r\n") == b"503 5.5.1 Send EHLO first\r\n"


def test_auth_line_too_long() -> None:
    """A continuation line over 12288 octets: 500 5.5.6, the exchange ends."""
    h = harness()
    h.send(b"AUTH LOGIN\r\n")
    assert h.send(b"A" * 12292 + b"\r\n") == (
        b"500 5.5.6 Authentication Exchange line is too long\r\n")
    assert h.send(b"NOOP\r\n") == b"250 2.0.0 OK\r\n"


def test_auth_line_at_limit_is_accepted() -> None:
    """12288 octets of base64 is within the limit (decoded and judged, not refused)."""
    h = harness()
    h.send(b"AUTH LOGIN\r\n")
    assert h.send(b"QUFB" * 3072 + b"\r\n") == b"334 UGFzc3dvcmQ6\r\n"


def test_require_tls_hides_and_refuses_plaintext() -> None:
    """Before TLS under require_tls: no AUTH line, and PLAIN gets 538 5.7.11."""
    h = SMTPHarness(users=USERS, require_tls=True)
    assert b"AUTH" not in h.send(EHLO)
    assert h.send(b"AUTH PLAIN " + RFC4616_TIM + b"\r\n") == (
        b"538 5.7.11 Encryption required for requested authentication mechanism\r\n")


def test_require_tls_allows_after_implicit_tls() -> None:
    """On an implicit-TLS connection PLAIN is offered and works."""
    h = SMTPHarness(users=USERS, require_tls=True, tls=True)
    assert b"250 AUTH PLAIN LOGIN\r\n" in h.send(EHLO)
    assert h.send(b"AUTH PLAIN " + RFC4616_TIM + b"\r\n") == OK


def test_mail_without_auth() -> None:
    assert harness().send(b"MAIL FROM:<a@example.test>\r\n") == b"530 5.7.0 Authentication required\r\n"


def test_full_submission_and_received_header() -> None:
    """After AUTH a message is accepted, with a Received header naming the user (ESMTPA)."""
    h = harness()
    h.send(b"AUTH PLAIN " + RFC4616_TIM + b"\r\n")
    out = h.send(b"MAIL FROM:<tim@example.test> SIZE=100 BODY=8BITMIME\r\n"
                 b"RCPT TO:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
    assert out == (b"250 2.1.0 Sender OK\r\n250 2.1.5 Recipient OK\r\n250 2.1.5 Recipient OK\r\n"
                   b"354 End data with <CR><LF>.<CR><LF>\r\n")
    assert h.send(b"Subject: t\r\n\r\n..leading dot\r\n.\r\n") == b"250 2.0.0 OK: queued\r\n"
    [message] = h.realm.messages
    assert b"with ESMTPA\r\n\t(authenticated user tim)" in message
    assert message.endswith(b"Subject: t\r\n\r\n.leading dot\r\n")


def test_received_header_keeps_its_comments_whatever_the_helo_and_login() -> None:
    """A HELO name with "(" or ")" would open or close a comment of the Received header
    (hiding "by ... with ESMTPA (authenticated user ...)" in one), a login ending in "\\"
    would escape the ")" that closes its comment: the HELO's are "?", the login's "\\" a
    quoted-pair (RFC 5322 3.2.2)."""
    h = SMTPHarness(users={"back\\slash\\": "pw"})
    h.send(b"EHLO h(x)y\\z\r\n")
    assert h.send(b"AUTH PLAIN " + base64.b64encode(b"\0back\\slash\\\0pw") + b"\r\n") == (
        b"235 2.7.0 Authentication successful\r\n")
    h.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
    assert h.send(b"Subject: t\r\n\r\nbody\r\n.\r\n") == b"250 2.0.0 OK: queued\r\n"
    [message] = h.realm.messages
    assert message.startswith(b"Received: from h?x?y?z ([192.0.2.10])\r\n\tby ")
    assert b"with ESMTPA\r\n\t(authenticated user back\\\\slash\\\\)\r\n\tfor <b@example.test>; " in message


def test_size_enforced() -> None:
    """SIZE= over the limit: 552 at MAIL; a body over the limit: 552 at the end of DATA."""
    h = harness(max_message_size=1000)
    h.send(b"AUTH PLAIN " + RFC4616_TIM + b"\r\n")
    assert h.send(b"MAIL FROM:<t@example.test> SIZE=5000\r\n") == (
        b"552 5.3.4 Message size exceeds fixed maximum message size\r\n")
    h.send(b"MAIL FROM:<t@example.test>\r\nRCPT TO:<a@example.test>\r\nDATA\r\n")
    assert h.send((b"x" * 100 + b"\r\n") * 20 + b".\r\n") == (
        b"552 5.3.4 Message size exceeds fixed maximum message size\r\n")
    assert h.realm.messages == []


def test_pipelined_auth_and_mail_in_one_packet_with_pending_step() -> None:
    """AUTH PLAIN with IR, MAIL, RCPT, DATA in one packet while the checker is pending:
    nothing is answered out of order; everything follows once the checker says yes."""
    checker = PendingChecker()
    h = SMTPHarness(checkers=[checker])
    h.send(EHLO)
    out = h.send(b"AUTH PLAIN " + RFC4616_TIM + b"\r\nMAIL FROM:<tim@example.test>\r\n"
                 b"RCPT TO:<a@example.test>\r\nDATA\r\n")
    assert out == b""
    checker.calls[0][1].callback(b"tim")
    assert h.take() == (OK + b"250 2.1.0 Sender OK\r\n250 2.1.5 Recipient OK\r\n"
                        b"354 End data with <CR><LF>.<CR><LF>\r\n")


def test_pipelined_after_failed_auth_is_not_taken_as_auth_data() -> None:
    """A pipelined NOOP after a failing AUTH gets its own 250 after the 535."""
    checker = PendingChecker()
    h = SMTPHarness(checkers=[checker])
    h.send(EHLO)
    assert h.send(b"AUTH PLAIN " + RFC4616_TIM + b"\r\nNOOP\r\n") == b""
    checker.calls[0][1].errback(UnauthorizedLogin())
    assert h.take() == INVALID + b"250 2.0.0 OK\r\n"


def test_pipelined_quit_after_data_waits_for_250() -> None:
    """`.` then QUIT in one packet: the 250 comes before the 221."""
    h = harness()
    h.send(b"AUTH PLAIN " + RFC4616_TIM + b"\r\n")
    out = h.send(b"MAIL FROM:<t@example.test>\r\nRCPT TO:<a@example.test>\r\nDATA\r\n"
                 b"hello\r\n.\r\nQUIT\r\n")
    assert out.endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n250 2.0.0 OK: queued\r\n"
                        b"221 2.0.0 Bye\r\n")


def test_failure_delay_uses_the_clock() -> None:
    """The 535 waits failure_delay seconds on the injected clock; lines queue meanwhile."""
    h = harness(failure_delay=2.0)
    assert h.send(b"AUTH PLAIN " + b64(b"\0tim\0bad") + b"\r\nNOOP\r\n") == b""
    h.clock.advance(1.9)
    assert h.take() == b""
    h.clock.advance(0.2)
    assert h.take() == INVALID + b"250 2.0.0 OK\r\n"


def test_max_failures_closes_with_421(monkeypatch) -> None:
    """The third failure: 535, then 421 4.7.0 and the connection closes.  Each failure's
    line says that it counts this connection (beside auth_failures_per_ip's "3/1m", a
    bare "1 of 3" at every new connection read as a limit that never moves)."""
    from twisted.logger import LogPublisher, formatEvent

    import saslsmtp.smtpauth
    lines: list[str] = []
    monkeypatch.setattr(saslsmtp.smtpauth.log, "observer",
                        LogPublisher(lambda event: lines.append(formatEvent(event))))
    h = harness(max_failures=3)
    bad = b"AUTH PLAIN " + b64(b"\0tim\0bad") + b"\r\n"
    assert h.send(bad) == INVALID
    assert h.send(bad) == INVALID
    assert h.send(bad) == INVALID + (
        b"421 4.7.0 Too many failed authentication attempts, closing connection\r\n")
    assert h.transport.disconnecting
    ip = h.protocol.peer_ip
    assert lines == [f"AUTH failed ip={ip} ({n} of max_failures=3 on this connection)"
                     for n in (1, 2, 3)]


def test_starttls_injection_is_discarded() -> None:
    """Plaintext pipelined after STARTTLS is thrown away; the session resets after TLS."""
    h = SMTPHarness(users=USERS, starttls=True, require_tls=True)
    ehlo = h.send(EHLO)
    assert ehlo.endswith(b"250 STARTTLS\r\n") and b"AUTH" not in ehlo
    out = h.send(b"STARTTLS\r\nAUTH PLAIN " + RFC4616_TIM + b"\r\nMAIL FROM:<x@y>\r\n")
    assert out == b"220 2.0.0 Ready to start TLS\r\n"
    assert h.transport.tls_started_with is not None
    assert h.realm.logins == []
    # After the handshake: EHLO again is required, and AUTH is now offered.
    assert h.send(b"AUTH PLAIN " + RFC4616_TIM + b"\r\n") == b"503 5.5.1 Send EHLO first\r\n"
    ehlo = h.send(EHLO)
    assert b"STARTTLS" not in ehlo and b"250 AUTH PLAIN LOGIN\r\n" in ehlo
    assert h.send(b"AUTH PLAIN " + RFC4616_TIM + b"\r\n") == OK


def test_starttls_partial_line_is_discarded() -> None:
    """A partial plaintext line after STARTTLS does not survive into the TLS session."""
    h = SMTPHarness(users=USERS, starttls=True)
    h.send(EHLO)
    h.send(b"STARTTLS\r\nNOO")
    assert h.send(b"P\r\n") == b"500 5.5.2 Command not recognized\r\n"


def test_non_ascii_verb() -> None:
    """Stock Twisted crashed on a non-ASCII verb; here it is an unknown command."""
    h = harness()
    assert h.send("ÄUTH PLAIN\r\n".encode("utf-8")) == b"500 5.5.2 Command not recognized\r\n"
    assert not h.transport.disconnecting


def test_nul_bytes_in_command() -> None:
    assert harness().send(b"NO\0OP\r\n") == b"500 5.5.2 NUL characters are not allowed\r\n"


def test_bare_lf_commands_are_taken_as_crlf() -> None:
    """A command line ending in a bare LF is served as if it ended in CRLF (Postfix 3.9's
    ``smtpd_forbid_bare_newline = normalize``): sloppy clients (scripts, netcat) work."""
    h = SMTPHarness(users=USERS)
    assert h.send(b"EHLO client.example\nAUTH PLAIN " + RFC4616_TIM + b"\nNOOP\r\n").endswith(
        b"250 AUTH PLAIN LOGIN\r\n" + OK + b"250 2.0.0 OK\r\n")
    assert h.send(b"MAIL FROM:<tim@example.test>\nRCPT TO:<a@example.test>\nDATA\n") == (
        b"250 2.1.0 Sender OK\r\n250 2.1.5 Recipient OK\r\n354 End data with <CR><LF>.<CR><LF>\r\n")
    assert h.send(b"Subject: sloppy\n\nbody\r\n.\r\nQUIT\n") == (
        b"250 2.0.0 OK: queued\r\n221 2.0.0 Bye\r\n")
    assert h.realm.messages[0].endswith(b"\r\nSubject: sloppy\r\n\r\nbody\r\n")


def smuggle(h: SMTPHarness, body: bytes) -> bytes:
    """MAIL, RCPT, DATA, then ``body``; what the server answered to the body."""
    assert h.send(b"MAIL FROM:<tim@example.test>\r\nRCPT TO:<a@example.test>\r\nDATA\r\n") == (
        b"250 2.1.0 Sender OK\r\n250 2.1.5 Recipient OK\r\n354 End data with <CR><LF>.<CR><LF>\r\n")
    return h.send(body)


def test_smuggled_end_of_data_is_message_text() -> None:
    """SMTP smuggling: ``LF . LF``, ``LF . CRLF``, ``CR . CRLF`` and ``CR . CR`` followed by
    a second transaction are the text of ONE message, answered once at the real final
    dot; it is stored with CRLF line ends only and no stray CR (a space), so no server
    after us can find a second message in it either."""
    second = b"MAIL FROM:<ceo@example.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\nforged\r\n"
    h = harness()
    h.send(b"AUTH PLAIN " + RFC4616_TIM + b"\r\n")
    for ending, stored in [(b"\n.\n", b"\r\n\r\n"), (b"\n.\r\n", b"\r\n\r\n"),
                           (b"\r\n\r.\r\n", b"\r\n .\r\n"), (b"\r.\r", b" . ")]:
        assert smuggle(h, b"Subject: hi\r\n\r\nlegit" + ending + second + b".\r\n") == (
            b"250 2.0.0 OK: queued\r\n")
        message = h.realm.messages.pop()
        assert message.endswith(b"\r\nSubject: hi\r\n\r\nlegit" + stored + second)
        assert message.count(b"\n") == message.count(b"\r\n") == message.count(b"\r")
    assert h.realm.messages == []


def test_early_talker_after_a_refused_data_is_not_read_as_commands() -> None:
    """A body sent right behind a DATA that is refused (RFC 2920: DATA ends a pipelined
    group) must not run as commands (here: RSET, a whole transaction, QUIT): DATA's own
    reply, then 421 4.5.0 and close, as Postfix's ``smtpd_forbid_unauth_pipelining``."""
    h = harness()
    h.send(b"AUTH PLAIN " + RFC4616_TIM + b"\r\n")
    out = h.send(b"MAIL FROM:<tim@example.test>\r\nDATA\r\nRSET\r\n"
                 b"MAIL FROM:<x@example.test>\r\nRCPT TO:<a@example.test>\r\nDATA\r\nbody\r\n"
                 b".\r\nQUIT\r\n")
    assert out == (b"250 2.1.0 Sender OK\r\n503 5.5.1 Need RCPT command first\r\n"
                   b"421 4.5.0 Error: SMTP protocol synchronization, closing connection\r\n")
    assert h.transport.disconnecting and h.realm.messages == []


def test_early_talker_refused_later_by_the_envelope_is_not_read_as_commands() -> None:
    """The same when the refusal comes later (a relay's upstream answering DATA): the
    body lines that queued meanwhile are dropped with the connection."""
    h = harness()
    h.send(b"AUTH PLAIN " + RFC4616_TIM + b"\r\n")
    h.send(b"MAIL FROM:<tim@example.test>\r\nRCPT TO:<a@example.test>\r\n")
    pending: defer.Deferred = defer.Deferred()
    h.protocol.transaction.envelope.data = lambda: pending
    assert h.send(b"DATA\r\nRSET\r\nNOOP\r\n") == b""
    pending.callback(REPLIES["upstream_unavailable"])
    assert h.take() == (b"451 4.4.1 Upstream server unavailable, try again later\r\n"
                        b"421 4.5.0 Error: SMTP protocol synchronization, closing connection\r\n")
    assert h.transport.disconnecting


def test_a_refused_data_without_early_input_keeps_the_session() -> None:
    """A client that waited for DATA's reply is not out of sync: it goes on."""
    h = harness()
    h.send(b"AUTH PLAIN " + RFC4616_TIM + b"\r\n")
    h.send(b"MAIL FROM:<tim@example.test>\r\n")
    assert h.send(b"DATA\r\n") == b"503 5.5.1 Need RCPT command first\r\n"
    assert h.send(b"RSET\r\n") == b"250 2.0.0 Reset state\r\n"
    assert not h.transport.disconnecting


def test_early_talker_after_a_354_is_the_body() -> None:
    """A body sent before the 354 of a DATA that is accepted is the message (nothing
    lost), then the commands after its final dot are answered in order."""
    h = harness()
    h.send(b"AUTH PLAIN " + RFC4616_TIM + b"\r\n")
    out = h.send(b"MAIL FROM:<tim@example.test>\r\nRCPT TO:<a@example.test>\r\nDATA\r\n"
                 b"Subject: eager\r\n\r\nRSET\r\n.\r\nNOOP\r\n")
    assert out.endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n250 2.0.0 OK: queued\r\n"
                        b"250 2.0.0 OK\r\n")
    assert h.realm.messages[0].endswith(b"\r\nSubject: eager\r\n\r\nRSET\r\n")


def test_a_message_header_or_http_request_as_a_command_closes() -> None:
    """A body that arrives as commands (its DATA was refused before it was sent) starts
    with a header; a browser sends HTTP: 421 4.7.0 and close at once, before any of it
    can run as SMTP (Postfix's ``smtpd_forbidden_commands``)."""
    for line in (b"Subject: hello", b"From:<ceo@example.test>", b"X-Mailer : x",
                 b"GET / HTTP/1.1", b"post /form HTTP/1.0", b"CONNECT mx:25 HTTP/1.1"):
        h = harness()
        assert h.send(line + b"\r\nMAIL FROM:<x@example.test>\r\nNOOP\r\n") == (
            b"421 4.7.0 Not an SMTP command, closing connection\r\n"), line
        assert h.transport.disconnecting
    h = harness()
    assert h.send(b"Hello Bob,\r\nNOOP\r\n") == (
        b"500 5.5.2 Command not recognized\r\n250 2.0.0 OK\r\n")


def test_bdat_is_not_implemented_and_its_chunk_is_skipped() -> None:
    """CHUNKING is not announced: BDAT gets 502 5.5.1, and its chunk (here two command
    lines, cut across reads) is read and dropped instead of run; then the session goes on."""
    h = harness()
    assert h.send(b"BDAT 18 LAST\r\nRSET\r\nQUIT\r\nNO") == (
        b"502 5.5.1 BDAT not implemented; use DATA\r\n")
    assert h.send(b"OP\r\nNOOP\r\n") == b"250 2.0.0 OK\r\n"
    assert not h.transport.disconnecting
    assert h.send(b"BDAT 0 LAST\r\nBDAT\r\nBDAT x\r\nNOOP\r\n") == (
        b"502 5.5.1 BDAT not implemented; use DATA\r\n" * 3 + b"250 2.0.0 OK\r\n")


def test_commands_after_quit_are_not_answered() -> None:
    """QUIT ends the session: what was pipelined after it gets no reply and runs nothing."""
    h = harness()
    assert h.send(b"QUIT\r\nAUTH PLAIN " + RFC4616_TIM + b"\r\nNOOP\r\n") == (
        b"221 2.0.0 Bye\r\n")
    assert h.send(b"NOOP\r\n") == b""
    assert h.transport.disconnecting and h.realm.logins == []


def test_error_count_starts_again_after_a_delivered_message() -> None:
    """Like Postfix's ``smtpd_hard_error_limit``: 20 errors *without delivering mail*.
    A long session with a few errors per message is not cut off."""
    h = harness()
    h.send(b"AUTH PLAIN " + RFC4616_TIM + b"\r\n")
    for _ in range(3):
        assert h.send(b"RCPT TO:<bad>\r\n" * 15) == b"503 5.5.1 Need MAIL command first\r\n" * 15
        smuggle(h, b"hi\r\n.\r\n")
    out = h.send(b"RCPT TO:<bad>\r\n" * 20)
    assert out.endswith(b"503 5.5.1 Need MAIL command first\r\n"
                        b"421 4.7.0 Too many errors, closing connection\r\n")
    assert len(h.realm.messages) == 3


def test_pipelined_auth_responses_are_the_exchange() -> None:
    """RFC 4954 forbids pipelining behind AUTH, except an initial response of a
    one-round mechanism.  A client that pipelines its LOGIN responses anyway is read in
    order (as Postfix does), and a command pipelined behind a server-first AUTH is taken
    as the response it stands in for (bad base64: 501, the session goes on)."""
    h = harness()
    out = h.send(b"AUTH LOGIN\r\n" + b64(b"tim") + b"\r\n" + b64(b"tanstaaftanstaaf") +
                 b"\r\nMAIL FROM:<tim@example.test>\r\n")
    assert out == (b"334 VXNlcm5hbWU6\r\n334 UGFzc3dvcmQ6\r\n" + OK + b"250 2.1.0 Sender OK\r\n")
    h = harness()
    assert h.send(b"AUTH LOGIN\r\nMAIL FROM:<tim@example.test>\r\nNOOP\r\n") == (
        b"334 VXNlcm5hbWU6\r\n501 5.5.2 Cannot decode response\r\n250 2.0.0 OK\r\n")


def test_nul_and_8bit_in_ehlo_mail_rcpt() -> None:
    """NUL anywhere: 500 5.5.2; 8-bit in EHLO/HELO: 501 5.5.4; UTF-8 in an address of a
    transaction without SMTPUTF8 on its MAIL: 553 5.6.7 (RFC 6531 3.4); octets that are
    not UTF-8 in an address: the RFC 3463 address codes, 5.1.7 sender, 5.1.3 recipient.
    The session stays usable after each."""
    h = SMTPHarness(users=USERS)
    assert h.send(b"EHLO a\0b\r\n") == b"500 5.5.2 NUL characters are not allowed\r\n"
    assert h.send("EHLO caf\u00e9.example\r\n".encode()) == b"501 5.5.4 Syntax: EHLO hostname\r\n"
    assert h.send(b"HELO \xff\r\n") == b"501 5.5.4 Syntax: HELO hostname\r\n"
    h.send(EHLO + b"AUTH PLAIN " + RFC4616_TIM + b"\r\n")
    assert h.send(b"MAIL FROM:<tim\0@example.test>\r\n") == (
        b"500 5.5.2 NUL characters are not allowed\r\n")
    assert h.send("MAIL FROM:<t\u00efm@example.test>\r\n".encode()) == (
        b"553 5.6.7 Must declare SMTPUTF8 to send unicode address\r\n")
    assert h.send(b"MAIL FROM:<t\xefm@example.test>\r\n") == (
        b"501 5.1.7 Bad sender address syntax\r\n")
    assert h.send(b"MAIL FROM:<tim@example.test>\r\n") == b"250 2.1.0 Sender OK\r\n"
    assert h.send("RCPT TO:<\u00e4@example.test>\r\n".encode()) == (
        b"553 5.6.7 Must declare SMTPUTF8 to send unicode address\r\n")
    assert h.send(b"RCPT TO:<a\xff@example.test>\r\n") == (
        b"501 5.1.3 Bad recipient address syntax\r\n")
    assert h.send(b"RCPT TO:<a@example.test>\r\n") == b"250 2.1.5 Recipient OK\r\n"


def test_one_megabyte_line() -> None:
    """A 1 MB line without CRLF: one 500, the buffer is dropped, the session goes on."""
    h = harness()
    out = h.send(b"X" * (1 << 20))
    assert out == b"500 5.5.2 Line too long\r\n"
    assert len(h.protocol.reader.partial) == 0
    assert h.send(b"rest of the long line\r\nNOOP\r\n") == b"250 2.0.0 OK\r\n"


def test_one_megabyte_line_in_many_packets() -> None:
    """The same line arriving in 64 KiB pieces, as over TCP: still exactly one 500."""
    h = harness()
    out = b"".join(h.send(b"X" * 65536) for _ in range(16))
    assert out == b"500 5.5.2 Line too long\r\n"
    assert h.send(b"tail\r\nNOOP\r\n") == b"250 2.0.0 OK\r\n"


def test_oversized_data_line_in_many_packets() -> None:
    """A 1 MB line inside DATA: the message is refused at the final dot."""
    h = harness()
    h.send(b"AUTH PLAIN " + RFC4616_TIM + b"\r\nMAIL FROM:<t@example.test>\r\n"
           b"RCPT TO:<a@example.test>\r\nDATA\r\n")
    out = b"".join(h.send(b"Y" * 65536) for _ in range(16))
    assert out == b""
    assert h.send(b"\r\nlast line\r\n.\r\n") == (
        b"554 5.6.0 Message contains a line longer than 16384 octets\r\n")
    assert h.realm.messages == []


def test_one_megabyte_line_while_a_step_is_pending() -> None:
    """An over-long line pipelined behind a pending AUTH is answered after the 235."""
    checker = PendingChecker()
    h = SMTPHarness(checkers=[checker])
    h.send(EHLO)
    assert h.send(b"AUTH PLAIN " + RFC4616_TIM + b"\r\n" + b"X" * 70000) == b""
    checker.calls[0][1].callback(b"tim")
    assert h.take() == OK + b"500 5.5.2 Line too long\r\n"


def test_one_megabyte_auth_line() -> None:
    """A 1 MB continuation line in AUTH mode: 500 5.5.6 and the exchange ends."""
    h = harness()
    h.send(b"AUTH LOGIN\r\n")
    assert h.send(b"A" * (1 << 20)) == b"500 5.5.6 Authentication Exchange line is too long\r\n"
    assert h.send(b"\r\nNOOP\r\n") == b"250 2.0.0 OK\r\n"


def test_one_megabyte_initial_response_in_many_packets() -> None:
    """An AUTH command whose initial response is too big gets RFC 4954's 500 5.5.6
    whether it arrives in one read or, as over the Internet, in many (it got 500 5.5.2
    Line too long once it passed the 16 KiB read buffer); then the session goes on.  A
    response line that happens to begin "AUTH " inside an exchange is one too."""
    for pieces in (1, 16):
        h = harness()
        line = b"AUTH PLAIN " + b"A" * (1 << 20) + b"\r\n"
        size = -(-len(line) // pieces)
        out = b"".join(h.send(line[i:i + size]) for i in range(0, len(line), size))
        assert out == b"500 5.5.6 Authentication Exchange line is too long\r\n", pieces
        assert h.send(b"NOOP\r\n") == b"250 2.0.0 OK\r\n"
    h = harness()
    h.send(b"AUTH LOGIN\r\n")
    assert h.send(b"AUTH " + b"A" * 70000) == (
        b"500 5.5.6 Authentication Exchange line is too long\r\n")
    assert h.send(b"\r\nNOOP\r\n") == b"250 2.0.0 OK\r\n"


def test_disconnect_while_step_pending() -> None:
    """The client leaves while the checker is deciding: nothing is written, the pending
    Deferred is cancelled, and a late answer is harmless."""
    checker = PendingChecker()
    h = SMTPHarness(checkers=[checker])
    h.send(EHLO)
    h.send(b"AUTH PLAIN " + RFC4616_TIM + b"\r\n")
    h.close()
    d = checker.calls[0][1]
    assert d.called  # cancelled
    assert h.take() == b""
    assert h.realm.logins == []


def test_too_many_errors_close_the_connection() -> None:
    """Twenty protocol errors in a row: 421 and close."""
    h = harness()
    out = h.send(b"BOGUS\r\n" * 20)
    assert out.endswith(b"421 4.7.0 Too many errors, closing connection\r\n")
    assert h.transport.disconnecting


def test_noop_vrfy_rset_quit() -> None:
    h = harness()
    assert h.send(b"NOOP\r\nVRFY x\r\nRSET\r\nQUIT\r\n") == (
        b"250 2.0.0 OK\r\n252 2.5.2 Cannot VRFY user, but will accept message and attempt delivery\r\n"
        b"250 2.0.0 Reset state\r\n221 2.0.0 Bye\r\n")


def test_idle_timeout() -> None:
    h = harness(idle_timeout=30.0)
    h.clock.advance(31)
    assert h.take() == b"421 4.4.2 Timeout exceeded, closing connection\r\n"
    assert h.transport.disconnecting


def test_idle_timeout_counts_the_clients_silence_not_the_servers_work() -> None:
    """While the server itself is answering (a slow backend, an upstream's final reply),
    the client is not idle: the idle timeout starts again once the answer went out
    (each such wait has its own bound: the backend's, the relay's ``timeout``)."""
    checker = PendingChecker()
    h = SMTPHarness(checkers=[checker], idle_timeout=30.0)
    h.send(EHLO)
    assert h.send(b"AUTH PLAIN " + RFC4616_TIM + b"\r\n") == b""
    h.clock.pump([15] * 3)
    assert h.take() == b"" and not h.transport.disconnecting
    checker.calls[0][1].callback(b"tim")
    assert h.take().startswith(b"235 ")
    h.clock.advance(29)
    assert h.take() == b""
    h.clock.advance(2)
    assert h.take() == b"421 4.4.2 Timeout exceeded, closing connection\r\n"


def test_every_reply_has_an_enhanced_code() -> None:
    """Every table entry but 354 carries an RFC 3463 code."""
    for name, reply in REPLIES.items():
        if reply.code != 354:
            assert reply.enhanced and reply.enhanced[0] == str(reply.code)[0], name


def test_a_late_rejection_waits_failure_delay_then_answers_the_queued_lines() -> None:
    """A checker that answers later (a network backend), then the 535's failure_delay:
    nothing is written until both are over, then the 535 and the pipelined NOOP's reply,
    in order (the step's Deferred and the delay's, one after the other)."""
    checker = PendingChecker()
    h = SMTPHarness(checkers=[checker], failure_delay=2.0)
    h.send(EHLO)
    assert h.send(b"AUTH PLAIN " + b64(b"\0tim\0bad") + b"\r\nNOOP\r\n") == b""
    checker.calls[0][1].errback(UnauthorizedLogin())
    h.clock.advance(1.9)
    assert h.take() == b""
    h.clock.advance(0.2)
    assert h.take() == INVALID + b"250 2.0.0 OK\r\n"
