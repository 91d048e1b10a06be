"""SMTPUTF8 (RFC 6531) on the submission side: UTF-8 addresses in MAIL and RCPT, the
553 5.6.7 without the MAIL parameter (Postfix's ``strict_smtputf8`` reply), malformed
UTF-8, the sender policy with U-labels and A-labels, the Received header's UTF8SMTPA,
and the Maildir; exact bytes over StringTransport, then smtplib and swaks over TCP."""

from __future__ import annotations

import re
import smtplib
import subprocess
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import threads
from twisted.mail import smtp

from saslsmtp.sendercheck import SenderCheck
from saslsmtp.senders import ALLOWED, SenderMap, SenderPolicy
from saslsmtp.testing import SMTPHarness
from saslsmtp.domains import domain_key
from saslsmtp.utf8address import SMTPUTF8Undeclared, UTF8Address, parsed_path
from tests.conftest import require_binary
from tests.mailsink import MailSink
from tests.support import free_port, start_daemon, start_server, write_config

JOERG = "jörg@exämple.de"
CHINESE = "用户@例子.广告"
USERS = {JOERG: "pw", "tim": "pw"}
OK_MAIL = b"250 2.1.0 Sender OK\r\n"
OK_RCPT = b"250 2.1.5 Recipient OK\r\n"
UNDECLARED = b"553 5.6.7 Must declare SMTPUTF8 to send unicode address\r\n"
BAD_SENDER = b"501 5.1.7 Bad sender address syntax\r\n"
BAD_RCPT = b"501 5.1.3 Bad recipient address syntax\r\n"


def logged_in(user: str = "tim", **kw) -> SMTPHarness:
    h = SMTPHarness(users=USERS, **kw)
    assert h.login(user, "pw").startswith(b"235 ")
    return h


def test_ehlo_announces_smtputf8() -> None:
    """SMTPUTF8 is an EHLO keyword (Postfix's default since 3.0), AUTH still last."""
    out = SMTPHarness(users=USERS).send(b"EHLO client.example\r\n")
    assert b"\r\n250-SMTPUTF8\r\n250 AUTH PLAIN LOGIN\r\n" in out


def test_utf8_envelope_is_accepted_and_stamped() -> None:
    """MAIL FROM:<jörg@exämple.de> SMTPUTF8 and RCPT TO:<用户@例子.广告>: 250s, and the
    stored message begins with a Received header that says UTF8SMTPA (RFC 6531 3.7.3)
    and names the recipient in UTF-8, not escaped or replaced."""
    h = logged_in(JOERG)
    out = h.send(f"MAIL FROM:<{JOERG}> SMTPUTF8\r\nRCPT TO:<{CHINESE}>\r\nDATA\r\n".encode())
    assert out == OK_MAIL + OK_RCPT + b"354 End data with <CR><LF>.<CR><LF>\r\n"
    assert h.send("Subject: grüße\r\n\r\nhallo\r\n.\r\n".encode()) == (
        b"250 2.0.0 OK: queued\r\n")
    [message] = h.realm.messages
    assert message.startswith(f"Received: from client.example ([192.0.2.10])\r\n"
                              f"\tby localhost (saslsmtp) with UTF8SMTPA\r\n"
                              f"\t(authenticated user {JOERG})\r\n\tfor <{CHINESE}>; "
                              .encode())
    assert message.endswith("Subject: grüße\r\n\r\nhallo\r\n".encode())


def test_smtputf8_with_ascii_addresses_still_says_utf8smtpa() -> None:
    """The parameter alone makes the transaction an SMTPUTF8 one (the headers may be
    UTF-8); the next transaction without it is ESMTPA again."""
    h = logged_in()
    h.send(b"MAIL FROM:<tim@example.test> smtputf8\r\nRCPT TO:<a@example.test>\r\nDATA\r\n")
    h.send(b"x\r\n.\r\n")
    h.send(b"MAIL FROM:<tim@example.test>\r\nRCPT TO:<a@example.test>\r\nDATA\r\n")
    h.send(b"x\r\n.\r\n")
    first, second = h.realm.messages
    assert b" with UTF8SMTPA\r\n" in first
    assert b" with ESMTPA\r\n" in second


def test_a_utf8_login_is_utf8_only_in_an_smtputf8_message() -> None:
    """The Received header names a UTF-8 login as it is in an SMTPUTF8 message (RFC
    6532 headers), and with ``?`` for its non-ASCII characters in any other."""
    h = logged_in(JOERG)
    for params in (b" SMTPUTF8", b""):
        h.send(b"MAIL FROM:<tim@example.test>" + params + b"\r\nRCPT TO:<a@example.test>\r\n"
               b"DATA\r\nx\r\n.\r\n")
    utf8, ascii_ = h.realm.messages
    assert f" with UTF8SMTPA\r\n\t(authenticated user {JOERG})\r\n".encode() in utf8
    assert b" with ESMTPA\r\n\t(authenticated user j?rg@ex?mple.de)\r\n" in ascii_
    assert ascii_.isascii()


def test_without_the_parameter_utf8_is_553_5_6_7() -> None:
    """RFC 6531 3.4: a UTF-8 sender, or a UTF-8 recipient in a transaction whose MAIL
    did not say SMTPUTF8: 553 5.6.7 with Postfix's text; RSET forgets the parameter."""
    h = logged_in()
    assert h.send(f"MAIL FROM:<{JOERG}>\r\n".encode()) == UNDECLARED
    assert h.send(b"MAIL FROM:<tim@example.test>\r\n") == OK_MAIL
    assert h.send(f"RCPT TO:<{CHINESE}>\r\n".encode()) == UNDECLARED
    assert h.send(b"RSET\r\nMAIL FROM:<tim@example.test> SMTPUTF8\r\n") == (
        b"250 2.0.0 Reset state\r\n" + OK_MAIL)
    assert h.send(f"RCPT TO:<{CHINESE}>\r\n".encode()) == OK_RCPT
    assert h.send(b"RSET\r\nMAIL FROM:<tim@example.test>\r\n") == (
        b"250 2.0.0 Reset state\r\n" + OK_MAIL)
    assert h.send(f"RCPT TO:<{CHINESE}>\r\n".encode()) == UNDECLARED


@pytest.mark.parametrize("address", [
    b"a\xff@example.test",            # not UTF-8 at all
    b"j\xc3@example.test",            # a truncated sequence
    b"\xc0\xafx@example.test",        # an overlong "/"
    b"\xed\xa0\x80@example.test",     # a UTF-16 surrogate
    "jörg".encode(),                  # no domain
    "jö..rg@exämple.de".encode(),     # an empty atom
    "jörg@exämple..de".encode(),      # an empty label
    "jörg@-exämple.de".encode(),      # a label starting with a hyphen
    "jörg@ex\u200bämple.de".encode(),  # a zero-width space (format character)
    "j\u3000rg@exämple.de".encode(),  # an ideographic space
    "jörg@@exämple.de".encode(),
    "@relay.example:jörg@exämple.de".encode(),  # a source route
])
def test_malformed_utf8_addresses_are_501(address: bytes) -> None:
    """Octets that are not UTF-8, or UTF-8 that is no RFC 6531 mailbox: 501 5.1.7 at
    MAIL, 501 5.1.3 at RCPT (with SMTPUTF8 given; without it too)."""
    h = logged_in()
    assert h.send(b"MAIL FROM:<" + address + b"> SMTPUTF8\r\n") == BAD_SENDER
    assert h.send(b"MAIL FROM:<tim@example.test> SMTPUTF8\r\n") == OK_MAIL
    assert h.send(b"RCPT TO:<" + address + b">\r\n") == BAD_RCPT
    assert h.send(b"RCPT TO:<a@example.test>\r\n") == OK_RCPT


@pytest.mark.parametrize("address", [
    JOERG, CHINESE, '"jö..@rg"@exämple.de', '"j\\\\ö"@exämple.de', "jörg@[192.0.2.1]",
    "jörg@xn--exmple-cua.de", "a.b+c@bücher.example", "δοκιμή@παράδειγμα.δοκιμή",
])
def test_rfc_6531_mailboxes_are_taken(address: str) -> None:
    """Dot-atoms and quoted local parts with non-ASCII characters, U-label, A-label and
    address-literal domains."""
    h = logged_in()
    assert h.send(f"MAIL FROM:<{address}> SMTPUTF8\r\n".encode()) == OK_MAIL
    assert h.send(f"RCPT TO:<{address}>\r\n".encode()) == OK_RCPT


def test_smtputf8_takes_no_value() -> None:
    """``SMTPUTF8=yes``: 555 5.5.4, as Postfix answers it (an unsupported option)."""
    h = logged_in()
    assert h.send(b"MAIL FROM:<tim@example.test> SMTPUTF8=yes\r\n") == (
        b"555 5.5.4 SMTPUTF8 takes no value\r\n")
    assert h.send(b"RCPT TO:<a@example.test>\r\n") == b"503 5.5.1 Need MAIL command first\r\n"


def test_parsed_path_outcomes() -> None:
    """ASCII goes to Twisted's parser; UTF-8 gives a ``UTF8Address`` whose ``str`` is
    the text; UTF-8 without the parameter raises ``SMTPUTF8Undeclared``."""
    ascii_ = parsed_path(b"tim@example.test", False)
    assert type(ascii_) is smtp.Address and str(ascii_) == "tim@example.test"
    utf8 = parsed_path(JOERG.encode(), True)
    assert isinstance(utf8, UTF8Address)
    assert (str(utf8), utf8.local, utf8.domain) == (JOERG, "jörg".encode(), "exämple.de".encode())
    with pytest.raises(SMTPUTF8Undeclared):
        parsed_path(JOERG.encode(), False)
    with pytest.raises(smtp.AddressError):
        parsed_path(b"j\xf6rg@example.test", True)


def test_domain_key_is_the_a_label_form() -> None:
    """U-labels in any case and the A-labels are one domain; IDNA 2008, so ß is not ss;
    a domain IDNA refuses compares by its lower case."""
    assert domain_key("EXÄMPLE.de") == domain_key("exämple.de") == "xn--exmple-cua.de"
    assert domain_key("XN--EXMPLE-CUA.DE") == "xn--exmple-cua.de"
    assert domain_key("例子.广告") == "xn--fsqu00a.xn--4rr70v"
    assert domain_key("straße.de") == "xn--strae-oqa.de" != domain_key("strasse.de")
    assert domain_key("Example.TEST") == "example.test"
    assert domain_key("a..B") == "a..b"


def test_sender_policy_login_with_utf8_and_labels() -> None:
    """``login``: a UTF-8 login may send as itself with the domain in any case, as
    U-labels or A-labels; the local part stays exact."""
    policy = SenderPolicy("login")
    assert policy.check(JOERG, JOERG) == ALLOWED
    assert policy.check(JOERG, "jörg@EXÄMPLE.DE") == ALLOWED
    assert policy.check(JOERG, "jörg@xn--exmple-cua.de") == ALLOWED
    assert policy.check("jörg@xn--exmple-cua.de", JOERG) == ALLOWED
    assert not policy.check(JOERG, "Jörg@exämple.de").allowed
    assert not policy.check(JOERG, "jo\u0308rg@exämple.de").allowed  # decomposed ö
    assert not policy.check("x@strasse.de", "x@straße.de").allowed


def test_sender_map_with_utf8_entries(tmp_path: Path) -> None:
    """A map line may list UTF-8 addresses and @domains in either label form."""
    path = tmp_path / "senders"
    path.write_text(f"alice: {JOERG}, @例子.广告\nbob: @xn--exmple-cua.de\n", encoding="utf-8")
    policy = SenderPolicy("map", sender_map=SenderMap(str(path)))
    assert policy.check("alice", "jörg@xn--exmple-cua.de") == ALLOWED
    assert policy.check("alice", "用户@xn--fsqu00a.xn--4rr70v") == ALLOWED
    assert policy.check("bob", "wer@EXÄMPLE.de") == ALLOWED
    assert not policy.check("bob", "wer@example.de").allowed


def test_sender_policy_over_the_wire_with_a_utf8_login() -> None:
    """A UTF-8 login under ``login``: its own address with SMTPUTF8 is 250 (A-label
    form too); another is 553 5.7.1 with the non-ASCII characters as ``?``."""
    h = logged_in(JOERG, sender_check=SenderCheck(SenderPolicy("login")))
    assert h.send(f"MAIL FROM:<{JOERG}> SMTPUTF8\r\n".encode()) == OK_MAIL
    assert h.send("RSET\r\nMAIL FROM:<jörg@xn--exmple-cua.de> SMTPUTF8\r\n".encode()) == (
        b"250 2.0.0 Reset state\r\n" + OK_MAIL)
    assert h.send(f"RSET\r\nMAIL FROM:<{CHINESE}> SMTPUTF8\r\n".encode()) == (
        b"250 2.0.0 Reset state\r\n553 5.7.1 <??@??.??>: Sender address rejected: not owned"
        b" by user j?rg@ex?mple.de\r\n")


# -- real clients over TCP ------------------------------------------------------------


def users_and_map(tmp_path: Path) -> str:
    users = tmp_path / "users"
    users.write_text("alice:{PLAIN}wonderland\n")
    senders = tmp_path / "senders"
    senders.write_text(f"alice: {JOERG}, alice@example.test\n", encoding="utf-8")
    return (f'[backends.users]\ntype = "file"\npath = "{users}"\n\n'
            f'[submission]\nsender_policy = "map"\nsender_map = "{senders}"\n')


def smtplib_send(port: int) -> tuple[dict, dict, int]:
    """``send_message`` with UTF-8 addresses (smtplib adds SMTPUTF8 itself), then
    ``sendmail`` with ``mail_options=["SMTPUTF8"]`` and an A-label sender, then a
    sender the map does not grant."""
    msg = EmailMessage()
    msg["From"] = JOERG
    msg["To"] = CHINESE
    msg["Subject"] = "grüße"
    msg.set_content("hallo\n")
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo("client.example")
        assert s.has_extn("smtputf8")
        s.login("alice", "wonderland")
        first = s.send_message(msg)
        second = s.sendmail("jörg@xn--exmple-cua.de", [CHINESE],
                            "Subject: zwei\r\n\r\nzwei\r\n".encode(), mail_options=["SMTPUTF8"])
        code, _ = s.mail("jürgen@exämple.de", ["SMTPUTF8"])
        return first, second, code


@pytest_twisted.ensureDeferred
async def test_smtplib_submits_utf8_into_the_maildir(tmp_path: Path) -> None:
    """smtplib's own SMTPUTF8 support end to end: both messages are accepted and lie in
    the Maildir with the UTF-8 recipient in the Received header; the map refuses a
    sender it does not list (553)."""
    server = await start_server(tmp_path, users_and_map(tmp_path))
    try:
        first, second, code = await threads.deferToThread(smtplib_send, server.port)
        assert (first, second, code) == ({}, {}, 553)
        messages = server.messages()
        assert len(messages) == 2
        for message in messages:
            assert b" with UTF8SMTPA\n\t(authenticated user alice)\n\tfor <" + \
                CHINESE.encode() + b">; " in message
        assert "Subject: grüße\n".encode() in messages[0] + messages[1]
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_swaks_without_smtputf8_gets_553_5_6_7(tmp_path: Path) -> None:
    """swaks (which has no SMTPUTF8 option) sends the UTF-8 sender bare: 553 5.6.7, and
    nothing is stored."""
    swaks = require_binary("swaks")
    server = await start_server(tmp_path, users_and_map(tmp_path))
    try:
        done = await threads.deferToThread(
            subprocess.run, [swaks, "--server", f"127.0.0.1:{server.port}", "--from", JOERG,
                             "--to", CHINESE, "--helo", "swaks.example", "--auth", "PLAIN",
                             "--auth-user", "alice", "--auth-password", "wonderland"],
            capture_output=True, timeout=30)
        out = done.stdout.decode("utf-8", "replace")
        assert "<** 553 5.6.7 Must declare SMTPUTF8 to send unicode address" in out, out
        assert server.messages() == []
    finally:
        await server.stop()


def relaying_daemon(tmp_path: Path, sink: MailSink) -> tuple[int, Any]:
    """The daemon with the users and sender map, relaying to ``sink``: (port, daemon)."""
    port = free_port()
    config = write_config(tmp_path, users_and_map(tmp_path),
                          listen=[f"tcp:{port}:interface=127.0.0.1"])
    config.write_text(re.sub(r'\[delivery\]\ntype = "maildir"\npath = "[^"]*"\n',
                             f'[delivery]\ntype = "smtp"\nendpoint = "tcp:127.0.0.1:{sink.port}"\n',
                             config.read_text()))
    return port, start_daemon(config, port, tmp_path / "daemon.log")


def test_relay_to_an_smtputf8_upstream_keeps_the_utf8_envelope(tmp_path: Path) -> None:
    """Through the daemon's relay to aiosmtpd announcing SMTPUTF8: the upstream gets
    MAIL with the SMTPUTF8 parameter, the UTF-8 sender and recipient as the client sent
    them, and the message under our UTF8SMTPA Received header."""
    sink = MailSink(free_port(), smtputf8=True)
    sink.start()
    port, daemon = relaying_daemon(tmp_path, sink)
    try:
        assert smtplib_send(port) == ({}, {}, 553)
        first, second = sink.messages
        assert (first.mail_from, first.rcpt_tos, first.mail_options) == (
            JOERG, (CHINESE,), ("SMTPUTF8", "BODY=8BITMIME"))  # smtplib adds both
        assert second.mail_from == "jörg@xn--exmple-cua.de"
        assert first.content.startswith(b"Received: from client.example ([127.0.0.1])\r\n\tby"
                                        b" mx.example.test (saslsmtp) with UTF8SMTPA\r\n")
        assert "Subject: grüße".encode() in first.content
    finally:
        daemon.stop()
        sink.stop()


def test_relay_to_an_upstream_without_smtputf8_refuses_what_needs_it(tmp_path: Path) -> None:
    """Through the daemon's relay to aiosmtpd without SMTPUTF8 (RFC 6531 3.4): a UTF-8
    sender gets our 553 5.6.7 at MAIL, a UTF-8 recipient ours at RCPT, and a message with
    an ASCII envelope but a UTF-8 header field 554 5.6.7 at the dot; the upstream gets
    nothing of those.  An ASCII envelope and header section that only declared SMTPUTF8
    arrives, without the parameter."""
    sink = MailSink(free_port(), smtputf8=False)
    sink.start()
    port, daemon = relaying_daemon(tmp_path, sink)

    def session() -> list[tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            s.ehlo("client.example")
            s.login("alice", "wonderland")
            said = [s.mail(JOERG, ["SMTPUTF8"])]
            s.rset()
            said += [s.mail("alice@example.test", ["SMTPUTF8"]), s.rcpt(CHINESE),
                     s.rcpt("bob@example.test"), s.data("From: Jörg <alice@example.test>\r\n"
                                                        "\r\nhallo\r\n".encode())]
            said += [s.mail("alice@example.test", ["SMTPUTF8"]), s.rcpt("bob@example.test"),
                     s.data(b"Subject: plain\r\n\r\nhallo\r\n")]
            return said

    try:
        said = session()
        assert [code for code, _ in said] == [553, 250, 553, 250, 554, 250, 250, 250], said
        assert said[0][1].startswith(b"5.6.7 ") and said[2][1].startswith(b"5.6.7 ")
        assert said[4][1].startswith(b"5.6.7 Message has UTF-8 header fields"), said[4]
        (only,) = sink.messages
        assert (only.mail_from, only.rcpt_tos, only.mail_options) == (
            "alice@example.test", ("bob@example.test",), ())
        assert only.content.endswith(b"\r\nSubject: plain\r\n\r\nhallo\r\n")
    finally:
        daemon.stop()
        sink.stop()
