"""The upstream client as an LMTP client of a real Dovecot (tests/dovecot_lmtp.py):
messages land in real Maildirs, an unknown user is refused at RCPT with Dovecot's own
reply, and the per-recipient final replies combine to one 250."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor

from saslsmtp.relay.client import RelaySession, UpstreamClient
from saslsmtp.relay.options import UpstreamDelivery
from tests.dovecot_lmtp import running_lmtp

SESSION = RelaySession(login="alice", client_address="127.0.0.1", client_port=1, helo="x")


@pytest.fixture(scope="module")
def dovecot():
    yield from running_lmtp()


@pytest.mark.parametrize("where", ["unix", "tcp"])
@pytest_twisted.ensureDeferred
async def test_lmtp_delivery_into_real_mailboxes(dovecot, where):
    """Two known users and one unknown: the unknown one gets Dovecot's 550 at RCPT,
    the message (dot-stuffing undone) lands in both Maildirs, the client gets 250."""
    endpoint = f"unix:{dovecot.lmtp_socket}" if where == "unix" else dovecot.tcp
    client = UpstreamClient.from_options(
        UpstreamDelivery(type="lmtp", endpoint=endpoint, timeout=15.0), reactor=reactor,
        helo="relay.example.test")
    before = {u: len(dovecot.mailbox(u)) for u in ("alice", "bob")}
    tx = client.transaction(SESSION)
    assert (await tx.mail_from("alice@example.test")).code == 250
    assert (await tx.rcpt("alice")).code == 250
    refused = await tx.rcpt("nobody")
    assert refused.code == 550 and refused.enhanced == "5.1.1", refused
    assert (await tx.rcpt("bob")).code == 250
    assert (await tx.start_data()).code == 354
    body = f"Subject: via {where}\r\nMessage-ID: <{where}@example.test>\r\n\r\n.dotted\r\nend\r\n"
    tx.write(body.encode())
    final = await tx.end()
    assert final.code == 250 and final.enhanced == "2.0.0", final
    assert final.text.startswith("<alice> ") and final.text.endswith(" Saved")
    for user in ("alice", "bob"):
        messages = dovecot.mailbox(user)
        assert len(messages) == before[user] + 1
        [newest] = [m for m in messages if f"<{where}@example.test>".encode() in m]
        # Dovecot stores LF line ends and adds its own Return-Path and Received
        assert newest.startswith(b"Return-Path: <alice@example.test>\n")
        assert newest.endswith(f"Message-ID: <{where}@example.test>\n\n.dotted\nend\n".encode())
    client.close()


@pytest_twisted.ensureDeferred
async def test_dovecot_restarted_between_mail_and_rcpt():
    """Dovecot restarts (saying ``421 4.3.2 Shutting down``) after accepting our MAIL:
    nothing was accepted for any recipient yet, so the RCPT goes out on a new connection
    after LHLO and MAIL again, and the message lands.  Restarted after an accepted RCPT:
    the next RCPT is a 451 and the transaction is over (a new session could refuse the
    recipient our client has a 250 for); nothing lands from it."""
    from twisted.internet.threads import deferToThread

    from tests.dovecot_lmtp import DovecotLmtpServer, LMTP
    from tests.conftest import require_binary
    from tests.dovecot import require_dovecot

    require_dovecot()
    require_binary(LMTP, "dovecot-lmtpd")
    server = DovecotLmtpServer()
    await deferToThread(server.start)
    try:
        client = UpstreamClient.from_options(
            UpstreamDelivery(type="lmtp", endpoint=f"unix:{server.lmtp_socket}", timeout=15.0),
            reactor=reactor, helo="relay.example.test")

        async def restart(tx) -> None:
            connection = tx.connection
            await deferToThread(server.stop)
            await deferToThread(server.start)
            assert connection.closed

        tx = client.transaction(SESSION)
        assert (await tx.mail_from("carol@example.test")).code == 250
        await restart(tx)
        assert (await tx.rcpt("alice")).code == 250
        assert (await tx.start_data()).code == 354
        tx.write(b"Subject: after a restart\r\nMessage-ID: <restart@example.test>\r\n\r\nhi\r\n")
        final = await tx.end()
        assert final.code == 250, final
        assert client.connections_made == 2
        [landed] = server.mailbox("alice")
        assert landed.startswith(b"Return-Path: <carol@example.test>\n")
        assert landed.endswith(b"Message-ID: <restart@example.test>\n\nhi\n")

        tx = client.transaction(SESSION)
        assert (await tx.mail_from("carol@example.test")).code == 250
        assert (await tx.rcpt("alice")).code == 250
        await restart(tx)
        refused = await tx.rcpt("bob")  # Dovecot said 421 as it stopped: a 451
        assert refused.to_bytes() == b"451 4.3.2 lmtp.example.test Shutting down\r\n"
        assert tx.state == "done" and server.mailbox("bob") == []
        client.close()
    finally:
        await deferToThread(server.cleanup)
