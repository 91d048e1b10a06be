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
    (b"SMTPUTF8=yes", b"555 5.5.4 SMTPUTF8 takes no value\r\n"),
    (b"=x", b"555 5.5.4 Unsupported MAIL/RCPT parameter\r\n"),
    (b"SIZE=10 RET=HDRS", b"555 5.5.4 Unsupported MAIL/RCPT parameter\r\n"),
])
def test_bad_mail_parameters(params: bytes, reply: bytes) -> None:
    """A MAIL parameter we do not support, or one with a bad value, refuses the MAIL
    (no transaction is open afterwards)."""
    h = logged_in(max_message_size=1000)
    assert h.send(b"MAIL FROM:<alice@example.test> " + params + b"\r\n") == reply
    assert h.send(b"RCPT TO:<x@example.test>\r\n") == b"503 5.5.1 Need MAIL command first\r\n"


@pytest.mark.parametrize(("line", "reply"), [
    (b"MAIL FROM:alice@example.test", b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n"),
    (b"MAIL TO:<alice@example.test>", b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n"),
    (b"MAIL", b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n"),
    (b"MAIL FROM:<a@@>", b"501 5.1.7 Bad sender address syntax\r\n"),
    (b"MAIL FROM:<a@exa\xc3\xa9mple.test>",
     b"553 5.6.7 Must declare SMTPUTF8 to send unicode address\r\n"),
    (b"MAIL FROM:<a@exa\xe9mple.test> SMTPUTF8", b"501 5.1.7 Bad sender address syntax\r\n"),
])
def test_mail_syntax_errors(line: bytes, reply: bytes) -> None:
    """A MAIL without ``FROM:<address>`` gets the syntax reply (5.5.4, RFC 3463 invalid
    command arguments); an address that is not one, the bad sender address code (5.1.7)."""
    h = logged_in()
    assert h.send(line + b"\r\n") == reply


@pytest.mark.parametrize(("line", "reply"), [
    (b"RCPT TO:<>", b"501 5.1.3 Bad recipient address syntax\r\n"),
    (b"RCPT TO:<x@@example.test>", b"501 5.1.3 Bad recipient address syntax\r\n"),
    (b"RCPT FROM:<x@example.test>", b"501 5.5.4 Syntax: RCPT TO:<address>\r\n"),
    (b"RCPT TO:x@example.test", b"501 5.5.4 Syntax: RCPT TO:<address>\r\n"),
])
def test_rcpt_syntax_errors(line: bytes, reply: bytes) -> None:
    """A RCPT without ``TO:<address>`` gets the syntax reply; an empty or broken
    address, the bad recipient address code (5.1.3)."""
    h = logged_in()
    h.send(b"MAIL FROM:<alice@example.test>\r\n")
    assert h.send(line + b"\r\n") == reply


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


# -- what the avatar (delivery) says -----------------------------------------------------

class Refusing:
    """An ``IMessageDelivery`` whose answers a test chooses; messages may fail at the dot."""

    def __init__(self, sender: Exception | None = None, rcpt: Exception | None = None,
                 store: Exception | None = None, open_fails: bool = False) -> None:
        self.sender, self.rcpt, self.store, self.open_fails = sender, rcpt, store, open_fails
        self.lost = 0

    def receivedHeader(self, helo: object, origin: object, recipients: object) -> None:
        return None

    def validateFrom(self, helo: object, origin: object) -> object:
        if self.sender is not None:
            raise self.sender
        return origin

    def validateTo(self, user: object) -> object:
        if self.rcpt is not None:
            raise self.rcpt
        return self.message

    def message(self) -> "Refusing":
        if self.open_fails:
            raise OSError("disk full")
        return self

    def lineReceived(self, line: bytes) -> None:
        pass

    def eomReceived(self) -> object:
        from twisted.internet import defer
        return defer.fail(self.store) if self.store is not None else defer.succeed(None)

    def connectionLost(self) -> None:
        self.lost += 1


def with_avatar(avatar: Refusing) -> SMTPHarness:
    """A logged-in connection whose realm hands out ``avatar``."""
    from twisted.mail.interfaces import IMessageDelivery

    class Realm:
        def requestAvatar(self, avatar_id: object, mind: object, *interfaces: object) -> tuple:
            return IMessageDelivery, avatar, lambda: None

    h = SMTPHarness(users=USERS)
    h.portal.realm = Realm()
    assert h.login("alice", "secret") == b"235 2.7.0 Authentication successful\r\n"
    return h


def test_sender_refused_by_the_avatar_with_its_own_code() -> None:
    """``validateFrom`` raising an SMTP error answers with its code and text; an
    enhanced code at the start of the text is used as the enhanced status."""
    from twisted.mail import smtp
    h = with_avatar(Refusing(sender=smtp.SMTPBadSender(b"x", 553, "5.7.1 Not your address")))
    assert h.send(b"MAIL FROM:<bob@example.test>\r\n") == b"553 5.7.1 Not your address\r\n"
    h = with_avatar(Refusing(sender=smtp.SMTPBadSender(b"x")))
    assert h.send(b"MAIL FROM:<bob@example.test>\r\n") == b"550 5.0.0 Sender not acceptable\r\n"


def test_recipient_refused_by_the_avatar() -> None:
    """``validateTo`` raising ``SMTPBadRcpt`` answers 550; anything else is a local
    error (451 4.3.0), never a traceback to the client."""
    from twisted.mail import smtp
    h = with_avatar(Refusing(rcpt=smtp.SMTPBadRcpt(b"x")))
    h.send(b"MAIL FROM:<alice@example.test>\r\n")
    assert h.send(b"RCPT TO:<x@example.test>\r\n") == (
        b"550 5.0.0 Cannot receive for specified address\r\n")
    h = with_avatar(Refusing(rcpt=ValueError("bug")))
    h.send(b"MAIL FROM:<alice@example.test>\r\n")
    assert h.send(b"RCPT TO:<x@example.test>\r\n") == (
        b"451 4.3.0 Local error in processing; try again later\r\n")


def test_message_that_cannot_be_opened_is_451() -> None:
    """A message factory that fails at DATA answers 451 instead of 354."""
    h = with_avatar(Refusing(open_fails=True))
    h.send(b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<x@example.test>\r\n")
    assert h.send(b"DATA\r\n") == b"451 4.3.0 Local error in processing; try again later\r\n"


def test_storage_failure_at_the_dot_is_451_and_the_next_message_works() -> None:
    """``eomReceived`` failing answers 451 4.3.0 (the client retries later)."""
    avatar = Refusing(store=OSError("disk full"))
    h = with_avatar(avatar)
    h.send(b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<x@example.test>\r\nDATA\r\n")
    assert h.send(b"hello\r\n.\r\n") == b"451 4.3.0 Local error in processing; try again later\r\n"
    avatar.store = None
    h.send(b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<x@example.test>\r\nDATA\r\n")
    assert h.send(b"hello\r\n.\r\n") == b"250 2.0.0 OK: queued\r\n"


def test_storage_refusal_with_an_smtp_error_keeps_its_code() -> None:
    """An ``SMTPServerError`` from ``eomReceived`` is passed on with its code."""
    from twisted.mail import smtp
    h = with_avatar(Refusing(store=smtp.SMTPServerError(552, "5.2.2 Mailbox full")))
    h.send(b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<x@example.test>\r\nDATA\r\n")
    assert h.send(b"hello\r\n.\r\n") == b"552 5.2.2 Mailbox full\r\n"


def test_connection_lost_during_data_drops_the_message() -> None:
    """A client that disappears mid-message: the half-written message is discarded."""
    avatar = Refusing()
    h = with_avatar(avatar)
    h.send(b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<x@example.test>\r\nDATA\r\nhalf\r\n")
    h.close()
    assert avatar.lost == 1
