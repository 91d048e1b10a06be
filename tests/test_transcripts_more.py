"""Exact-byte transcripts over a string transport for the mail transaction's refusals:
the recipient limit, nested MAIL, MAIL parameters, and commands out of order."""

from __future__ import annotations

import pytest

from saslsmtp.testing import SMTPHarness

USERS = {"alice": "secret"}


def logged_in(**overrides: object) -> SMTPHarness:
    """A connection where alice has authenticated."""
    h = SMTPHarness(users=USERS, **overrides)
    assert h.login("alice", "secret") == b"235 2.7.0 Authentication successful\r\n"
    return h


def test_recipient_limit_answers_452_and_keeps_the_accepted_ones() -> None:
    """RCPTs beyond ``max_recipients`` get 452 4.5.3 (the client may retry them in
    another transaction); the accepted ones still receive the message."""
    h = logged_in(max_recipients=2)
    assert h.send(b"MAIL FROM:<alice@example.test>\r\n") == b"250 2.1.0 Sender OK\r\n"
    assert h.send(b"RCPT TO:<x@example.test>\r\n") == b"250 2.1.5 Recipient OK\r\n"
    assert h.send(b"RCPT TO:<y@example.test>\r\n") == b"250 2.1.5 Recipient OK\r\n"
    assert h.send(b"RCPT TO:<z@example.test>\r\n") == b"452 4.5.3 Too many recipients\r\n"
    assert h.send(b"RCPT TO:<w@example.test>\r\n") == b"452 4.5.3 Too many recipients\r\n"
    assert h.send(b"DATA\r\n") == b"354 End data with <CR><LF>.<CR><LF>\r\n"
    assert h.send(b"Subject: hi\r\n\r\nbody\r\n.\r\n") == b"250 2.0.0 OK: queued\r\n"
    [message] = h.realm.messages
    assert b"for <" not in message  # two recipients: the Received header names none
    assert message.endswith(b"Subject: hi\r\n\r\nbody\r\n")


def test_recipient_limit_is_per_transaction() -> None:
    """After the message (or RSET) the count starts again."""
    h = logged_in(max_recipients=1)
    h.send(b"MAIL FROM:<alice@example.test>\r\n")
    assert h.send(b"RCPT TO:<x@example.test>\r\n") == b"250 2.1.5 Recipient OK\r\n"
    assert h.send(b"RCPT TO:<y@example.test>\r\n") == b"452 4.5.3 Too many recipients\r\n"
    assert h.send(b"RSET\r\n") == b"250 2.0.0 Reset state\r\n"
    h.send(b"MAIL FROM:<alice@example.test>\r\n")
    assert h.send(b"RCPT TO:<y@example.test>\r\n") == b"250 2.1.5 Recipient OK\r\n"


def test_recipient_limit_in_one_pipelined_burst() -> None:
    """A pipelined MAIL + RCPTs + DATA gets one reply per command, in order."""
    h = logged_in(max_recipients=1)
    out = h.send(b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<x@example.test>\r\n"
                 b"RCPT TO:<y@example.test>\r\nDATA\r\n")
    assert out == (b"250 2.1.0 Sender OK\r\n"
                   b"250 2.1.5 Recipient OK\r\n"
                   b"452 4.5.3 Too many recipients\r\n"
                   b"354 End data with <CR><LF>.<CR><LF>\r\n")


def test_nested_mail_is_503_and_keeps_the_first_sender() -> None:
    """A second MAIL inside a transaction is refused; the first one stands."""
    h = logged_in()
    assert h.send(b"MAIL FROM:<alice@example.test>\r\n") == b"250 2.1.0 Sender OK\r\n"
    assert h.send(b"MAIL FROM:<other@example.test>\r\n") == b"503 5.5.1 Nested MAIL command\r\n"
    assert h.send(b"RCPT TO:<x@example.test>\r\n") == b"250 2.1.5 Recipient OK\r\n"
    h.send(b"DATA\r\n")
    assert h.send(b"hello\r\n.\r\n") == b"250 2.0.0 OK: queued\r\n"
    assert h.send(b"MAIL FROM:<other@example.test>\r\n") == b"250 2.1.0 Sender OK\r\n"


def test_accepted_mail_parameters() -> None:
    """SIZE within the limit, BODY=7BIT/8BITMIME and AUTH= (RFC 4954 section 5) are
    accepted, in any case."""
    h = logged_in(max_message_size=1000)
    assert h.send(b"MAIL FROM:<alice@example.test> size=1000 body=7bit AUTH=<>\r\n") == (
        b"250 2.1.0 Sender OK\r\n")
    h.send(b"RSET\r\n")
    assert h.send(b"MAIL FROM:<> BODY=8BITMIME\r\n") == b"250 2.1.0 Sender OK\r\n"


@pytest.mark.parametrize(("params", "reply"), [
    (b"SIZE=abc", b"555 5.5.4 SIZE needs a number\r\n"),
    (b"SIZE", b"555 5.5.4 SIZE needs a number\r\n"),
    (b"SIZE=1001", b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"),
    (b"BODY=BINARYMIME", b"555 5.5.4 BODY must be 7BIT or 8BITMIME\r\n"),
    (b"BODY", b"555 5.5.4 BODY must be 7BIT or 8BITMIME\r\n"),
    (b"SMTPUTF8", b"555 5.5.4 Unsupported MAIL/RCPT parameter\r\n"),
    (b"=x", b"555 5.5.4 Unsupported MAIL/RCPT parameter\r\n"),
    (b"SIZE=10 RET=HDRS", b"555 5.5.4 Unsupported MAIL/RCPT parameter\r\n"),
])
def test_bad_mail_parameters(params: bytes, reply: bytes) -> None:
    """A MAIL parameter we do not support, or one with a bad value, refuses the MAIL
    (no transaction is open afterwards)."""
    h = logged_in(max_message_size=1000)
    assert h.send(b"MAIL FROM:<alice@example.test> " + params + b"\r\n") == reply
    assert h.send(b"RCPT TO:<x@example.test>\r\n") == b"503 5.5.1 Need MAIL command first\r\n"


@pytest.mark.parametrize("line", [
    b"MAIL FROM:alice@example.test",
    b"MAIL TO:<alice@example.test>",
    b"MAIL",
    b"MAIL FROM:<a@@>",
])
def test_mail_syntax_errors(line: bytes) -> None:
    """A MAIL without ``FROM:<address>`` gets the syntax reply."""
    h = logged_in()
    assert h.send(line + b"\r\n") == b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n"


@pytest.mark.parametrize("line", [
    b"RCPT TO:<>",
    b"RCPT FROM:<x@example.test>",
    b"RCPT TO:x@example.test",
])
def test_rcpt_syntax_errors(line: bytes) -> None:
    """A RCPT without a non-empty ``TO:<address>`` gets the syntax reply."""
    h = logged_in()
    h.send(b"MAIL FROM:<alice@example.test>\r\n")
    assert h.send(line + b"\r\n") == b"501 5.5.4 Syntax: RCPT TO:<address>\r\n"


def test_commands_out_of_order() -> None:
    """RCPT before MAIL, DATA before RCPT and DATA with an argument are refused."""
    h = logged_in()
    assert h.send(b"RCPT TO:<x@example.test>\r\n") == b"503 5.5.1 Need MAIL command first\r\n"
    assert h.send(b"DATA\r\n") == b"503 5.5.1 Need MAIL command first\r\n"
    h.send(b"MAIL FROM:<alice@example.test>\r\n")
    assert h.send(b"DATA\r\n") == b"503 5.5.1 Need RCPT command first\r\n"
    h.send(b"RCPT TO:<x@example.test>\r\n")
    assert h.send(b"DATA now\r\n") == b"501 5.5.4 Syntax: DATA\r\n"
    assert h.send(b"DATA\r\n") == b"354 End data with <CR><LF>.<CR><LF>\r\n"


def test_mail_before_auth_is_530() -> None:
    """Submission needs AUTH first, whatever the MAIL looks like."""
    h = SMTPHarness(users=USERS)
    h.send(b"EHLO client.example\r\n")
    assert h.send(b"MAIL FROM:<alice@example.test>\r\n") == (
        b"530 5.7.0 Authentication required\r\n")


def test_oversized_message_is_552_at_the_dot_and_not_stored() -> None:
    """A body over ``max_message_size`` is read to the end, refused with 552, not stored;
    the connection can send the next message."""
    h = logged_in(max_message_size=200)
    h.send(b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<x@example.test>\r\nDATA\r\n")
    assert h.send(b"x" * 100 + b"\r\n" + b"y" * 100 + b"\r\n") == b""
    assert h.send(b".\r\n") == b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"
    assert h.realm.messages == []
    assert h.send(b"MAIL FROM:<alice@example.test>\r\n") == b"250 2.1.0 Sender OK\r\n"


def test_dot_stuffing_is_undone() -> None:
    """A body line starting with a dot arrives with one dot fewer (RFC 5321 4.5.2)."""
    h = logged_in()
    h.send(b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<x@example.test>\r\nDATA\r\n")
    assert h.send(b"..leading dot\r\n...\r\n.\r\n") == b"250 2.0.0 OK: queued\r\n"
    [message] = h.realm.messages
    assert message.endswith(b"\r\n.leading dot\r\n..\r\n")
    assert b"for <x@example.test>" in message
