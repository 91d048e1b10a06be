"""Several recipients through the real daemon into a real Dovecot LMTP whose quota
refuses some of them after the final dot (tests/dovecot_lmtp.py, with the quota plugin):
``full`` is over quota for good (``552 5.2.2``), ``busy`` for now (``452 4.2.2``,
``quota_full_tempfail``), ``alice`` and ``bob`` have no limit.  Dovecot accepts all four
at RCPT (``lmtp_rcpt_check_quota = no``, its default) and answers once per recipient.

Our client gets one reply: ``250`` only when every recipient has the message, the
temporary failure when nobody has it (a retry is safe), and a permanent failure naming
who got it and who did not when some did (a retry would deliver it twice)."""

from __future__ import annotations

import os
import re

import pytest

from tests.daemonclient import SMTPClient
from tests.conftest import require_binary
from tests.dovecot import require_dovecot
from tests.dovecot_lmtp import LMTP, DovecotLmtpServer
from tests.support import free_port
from tests.test_wire_relay import PASSWORD, USER, daemon_config, run_daemon  # noqa: F401

BIG = b"x" * 76 + b"\r\n"  # 40 of these lines are over the 1 KiB quota of full and busy


class QuotaLmtpServer(DovecotLmtpServer):
    """Dovecot LMTP with the quota plugin and per-user limits from a passwd-file userdb."""

    def _write_files(self) -> None:
        super()._write_files()
        uid = "65534" if os.geteuid() == 0 else str(os.geteuid())
        users = {"alice": "", "bob": "", "full": "userdb_quota_rule=*:storage=1K",
                 "busy": "userdb_quota_rule=*:storage=1K userdb_quota_full_tempfail=yes"}
        self.passwd_path.write_text("".join(
            f"{user}:{{PLAIN}}x:{uid}:{uid}::{self.mail_root}/{user}::{extra}\n"
            for user, extra in users.items()))
        config = re.sub(r"userdb \{.*?\}", f"userdb {{\n  driver = passwd-file\n"
                        f"  args = {self.passwd_path}\n}}", self.config_path.read_text(),
                        flags=re.S)
        self.config_path.write_text(config + "mail_plugins = $mail_plugins quota\n"
                                    "plugin {\n  quota = maildir:User quota\n}\n")


@pytest.fixture(scope="module")
def dovecot():
    require_dovecot()
    require_binary(LMTP, "dovecot-lmtpd")
    server = QuotaLmtpServer()
    server.start()
    yield server
    server.cleanup()


@pytest.fixture
def relay(tmp_path, run_daemon, dovecot):
    port = free_port()
    delivery = f'[delivery]\ntype = "lmtp"\nendpoint = "unix:{dovecot.lmtp_socket}"\n'
    daemon = run_daemon(daemon_config(tmp_path, port, delivery), port)
    client = SMTPClient(port)
    assert client.login(USER, PASSWORD).startswith(b"235 ")
    yield client, daemon
    client.close()


def send(client: SMTPClient, recipients: list[str], message_id: str) -> bytes:
    """One message to ``recipients`` (each must be accepted at RCPT); the final reply."""
    assert client.command(f"MAIL FROM:<{USER}>").startswith(b"250 ")
    for rcpt in recipients:
        assert client.command(f"RCPT TO:<{rcpt}>") == b"250 2.1.5 OK\r\n", rcpt
    assert client.command("DATA").startswith(b"354 ")
    client.stream([f"Message-ID: <{message_id}>\r\nSubject: quota\r\n\r\n".encode(),
                   BIG * 40])
    return client.command(".")


def copies(dovecot: DovecotLmtpServer, user: str, message_id: str) -> int:
    return sum(f"<{message_id}>".encode() in m for m in dovecot.mailbox(user))


def test_all_recipients_delivered_is_250(relay, dovecot):
    client, _ = relay
    final = send(client, ["alice", "bob"], "both@example.test")
    assert re.fullmatch(rb"250 2\.0\.0 <alice> \S+ Saved\r\n", final), final
    assert copies(dovecot, "alice", "both@example.test") == 1
    assert copies(dovecot, "bob", "both@example.test") == 1


def test_one_permanent_failure_among_deliveries_names_both(relay, dovecot):
    """alice gets it, full does not: Dovecot's 552 with who did and who did not."""
    client, daemon = relay
    final = send(client, ["alice", "full", "bob"], "perm@example.test")
    assert final == (b"552-5.2.2 <full> Quota exceeded (mailbox for user is full)\r\n"
                     b"552-5.2.2 Not delivered to: full\r\n"
                     b"552 5.2.2 Delivered to 2 of 3 recipients (do not resend to them):"
                     b" alice, bob\r\n")
    assert copies(dovecot, "alice", "perm@example.test") == 1
    assert copies(dovecot, "full", "perm@example.test") == 0
    log = daemon.log_text()
    assert "LMTP delivered to alice, bob but not to full; answering 552 5.2.2" in log
    # one log line, whatever the number of reply lines
    assert re.search(r"message \w+ not accepted: from=<alice@example\.test> recipients=3"
                     r" size=\d+ user=alice@example\.test reply=552 <full> Quota exceeded"
                     r" \(mailbox for user is full\) / Not delivered to: full / Delivered to 2"
                     r" of 3 recipients \(do not resend to them\): alice, bob\n", log), log


def test_one_temporary_failure_among_deliveries_is_permanent(relay, dovecot):
    """alice gets it, busy's mailbox is full for now: not a 4xx, which would make the
    client send alice a copy on every retry, but a 554 in the failure's class 5 code;
    the session goes on (the next message is delivered)."""
    client, daemon = relay
    final = send(client, ["alice", "busy"], "temp@example.test")
    assert final == (b"554-5.2.2 <busy> Quota exceeded (mailbox for user is full)\r\n"
                     b"554-5.2.2 Not delivered to: busy\r\n"
                     b"554 5.2.2 Delivered to 1 of 2 recipients (do not resend to them):"
                     b" alice\r\n")
    assert copies(dovecot, "alice", "temp@example.test") == 1
    assert copies(dovecot, "busy", "temp@example.test") == 0
    assert send(client, ["bob"], "after@example.test").startswith(b"250 2.0.0 <bob> ")


def test_nobody_delivered_prefers_the_temporary_failure(relay, dovecot):
    """full and busy both refuse: nobody has it, so the 452 (a retry is safe)."""
    client, _ = relay
    final = send(client, ["full", "busy"], "none@example.test")
    assert final == b"452 4.2.2 <busy> Quota exceeded (mailbox for user is full)\r\n"
