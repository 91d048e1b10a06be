"""The real daemon in front of real upstreams: swaks -> saslsmtp -> Postfix (XCLIENT:
Postfix logs the login as ``sasl_username=``; its RCPT restriction is swaks' RCPT reply)
and saslsmtp -> Dovecot LMTP into a real mailbox."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.conftest import require_binary
from tests.daemonclient import SMTPClient
from tests.dovecot_lmtp import running_lmtp
from tests.postfix import running_postfix
from tests.support import free_port
from tests.test_wire_relay import PASSWORD, USER, daemon_config, run_daemon  # noqa: F401

SWAKS = "/usr/bin/swaks"


@pytest.fixture(scope="module")
def postfix():
    yield from running_postfix()


def swaks(port: int, to: str, subject: str, *more: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SWAKS, "--server", f"127.0.0.1:{port}", "--ehlo", "alice-laptop",
                           "--from", USER, "--to", to, "--auth", "PLAIN", "--auth-user", USER,
                           "--auth-password", PASSWORD, "--header", f"Subject: {subject}",
                           "--header", f"Message-ID: <{subject}@example.test>", *more],
                          capture_output=True, text=True, timeout=60)


def test_swaks_through_saslsmtp_into_postfix_with_xclient(tmp_path, run_daemon, postfix):
    """The message reaches Postfix's (held) queue; Postfix logs our client's address and
    HELO and ``sasl_username=<login>`` from XCLIENT; the 250 swaks sees is Postfix's,
    with Postfix's queue id.  A recipient Postfix's smtpd_recipient_restrictions refuse
    is refused to swaks at RCPT with Postfix's own reply."""
    require_binary(SWAKS, "swaks")
    port = free_port()
    delivery = ('[delivery]\ntype = "smtp"\n'
                f'endpoint = "tcp:127.0.0.1:{postfix.port}"\nxclient = true\ntimeout = 20.0\n')
    daemon = run_daemon(daemon_config(tmp_path, port, delivery), port)
    done = swaks(port, "bob@example.test", "via-postfix")
    assert done.returncode == 0, done.stdout + done.stderr
    match = re.search(r"<-  250 2\.0\.0 Ok: queued as (\w+)", done.stdout)
    assert match, done.stdout
    queue_id = match.group(1)
    log = postfix.wait_for_log(f"{queue_id}: client=")
    assert re.search(rf"{queue_id}: client=unknown\[127\.0\.0\.1\]:\d+, sasl_method=XCLIENT,"
                     rf" sasl_username={re.escape(USER)}", log), log
    postfix.wait_for_log(f"{queue_id}: hold:")
    assert queue_id in postfix.held()
    assert re.search(rf"message [0-9A-F]+ accepted: from=<{USER}> recipients=1 size=\d+"
                     rf" user={USER} reply=250 Ok: queued as {queue_id}", daemon.log_text())

    refused = swaks(port, "reject@example.test", "refused")
    assert ("<** 554 5.7.1 <reject@example.test>: Recipient address rejected: test policy"
            in refused.stdout), refused.stdout
    log = postfix.wait_for_log("<reject@example.test>: Recipient address rejected")
    assert "helo=<alice-laptop>" in log

    # 300 KB: Postfix's socket buffer fills and pauses our client mid-DATA; after the 250
    # the session reads on (it used to hang until idle_timeout: swaks never got its 221)
    body = tmp_path / "large.txt"
    body.write_text(("x" * 76 + "\r\n") * 4000)
    large = swaks(port, "bob@example.test", "large", "--body", f"@{body}")
    assert large.returncode == 0, large.stdout + large.stderr
    assert re.search(r"<-  250 2\.0\.0 Ok: queued as \w+", large.stdout), large.stdout
    assert "<-  221 " in large.stdout, large.stdout


@pytest.fixture(scope="module")
def dovecot():
    yield from running_lmtp()


def test_saslsmtp_to_dovecot_lmtp_into_a_mailbox(tmp_path, run_daemon, dovecot):
    """``type = "lmtp"`` over the UNIX socket: the message lands in alice's real Maildir
    (our Received header first, dots un-stuffed); an unknown user is refused at RCPT
    with Dovecot's reply; the client's 250 is Dovecot's."""
    port = free_port()
    delivery = f'[delivery]\ntype = "lmtp"\nendpoint = "unix:{dovecot.lmtp_socket}"\n'
    run_daemon(daemon_config(tmp_path, port, delivery), port)
    before = len(dovecot.mailbox("alice"))
    client = SMTPClient(port)
    assert client.login(USER, PASSWORD).startswith(b"235 ")
    assert client.command(f"MAIL FROM:<{USER}>").startswith(b"250 ")
    refused = client.command("RCPT TO:<nobody>")
    assert refused.startswith(b"550 5.1.1 "), refused
    assert client.command("RCPT TO:<alice>").startswith(b"250 ")
    assert client.command("DATA").startswith(b"354 ")
    client.stream([b"Subject: lmtp\r\nMessage-ID: <lmtp@example.test>\r\n\r\n..dot\r\nend\r\n"])
    final = client.command(".")
    assert final.startswith(b"250 2.0.0 <alice> ") and final.endswith(b" Saved\r\n"), final
    client.close()
    messages = dovecot.mailbox("alice")
    assert len(messages) == before + 1
    [mine] = [m for m in messages if b"<lmtp@example.test>" in m]
    assert b"\nReceived: from client.example ([127.0.0.1])\n\tby mx.example.test (saslsmtp)" in mine
    assert mine.endswith(b"Message-ID: <lmtp@example.test>\n\n.dot\nend\n")
