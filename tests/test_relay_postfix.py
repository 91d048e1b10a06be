"""The upstream client against a real Postfix (tests/postfix.py: own config and queue,
a loopback high port, every message held): XCLIENT shows up as ``sasl_username=`` in
Postfix's log, a Postfix RCPT refusal reaches our client unchanged, and a reused pooled
connection carries the next session's identity."""

from __future__ import annotations

import re

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from saslsmtp.relay.client import RelaySession, UpstreamClient
from saslsmtp.relay.options import UpstreamDelivery
from saslsmtp.replies import REPLIES
from tests.postfix import PostfixServer, running_postfix


@pytest.fixture(scope="module")
def postfix():
    yield from running_postfix()


def client_for(server: PostfixServer, **options) -> UpstreamClient:
    table = dict(type="smtp", endpoint=f"tcp:127.0.0.1:{server.port}", timeout=15.0,
                 xclient=True)
    table.update(options)
    return UpstreamClient.from_options(UpstreamDelivery(**table), reactor=reactor,
                                       helo="relay.example.test")


async def relay(client: UpstreamClient, session: RelaySession, rcpts: list[str],
                subject: str) -> list[bytes]:
    tx = client.transaction(session)
    replies = [(await tx.mail_from("alice@example.test", ["BODY=8BITMIME"])).to_bytes()]
    if not replies[0].startswith(b"250 "):
        return replies
    for rcpt in rcpts:
        replies.append((await tx.rcpt(rcpt)).to_bytes())
    start = await tx.start_data()
    replies.append(start.to_bytes())
    if start.code == 354:
        tx.write(f"Subject: {subject}\r\nMessage-ID: <{subject}@example.test>\r\n\r\n"
                 f".dot line\r\nbody\r\n".encode())
        replies.append((await tx.end()).to_bytes())
    else:
        tx.abort()
    return replies


async def abandoned_transactions(client: UpstreamClient, count: int) -> RelaySession:
    """``count`` transactions of one session, each MAIL and RCPT accepted and then
    abandoned (our client said RSET or QUIT: the connection goes back idle); the session."""
    session = RelaySession(login="alice@example.test", client_address="127.0.0.9",
                           client_port=40000, helo="pc")
    for n in range(count):
        tx = client.transaction(session)
        mail = await tx.mail_from("alice@example.test")
        assert mail.to_bytes() == b"250 2.1.0 Ok\r\n", (n, mail)
        assert (await tx.rcpt("bob@example.test")).code == 250
        tx.abort()
    return session


@pytest_twisted.ensureDeferred
async def test_xclient_login_in_log_and_rcpt_refusal_passed_through(postfix):
    """Postfix logs the XCLIENT LOGIN as ``sasl_username=``, its client as the XCLIENT
    ADDR/HELO; its RCPT refusal is our client's reply byte for byte; the message is held."""
    client = client_for(postfix)
    session = RelaySession(login="alice@example.test", client_address="127.0.0.9",
                           client_port=40404, helo="alice-laptop")
    replies = await relay(client, session, ["reject@example.test", "bob@example.test"],
                          "first")
    assert replies[0] == b"250 2.1.0 Ok\r\n"
    assert replies[1] == (b"554 5.7.1 <reject@example.test>: Recipient address rejected:"
                          b" test policy\r\n")
    assert replies[2] == b"250 2.1.5 Ok\r\n"
    assert replies[3] == b"354 End data with <CR><LF>.<CR><LF>\r\n"
    assert replies[4].startswith(b"250 2.0.0 Ok: queued as ")
    queue_id = replies[4].split()[-1].decode()
    log = await deferToThread(postfix.wait_for_log, f"{queue_id}: client=")
    assert (f"{queue_id}: client=unknown[127.0.0.9]:40404, sasl_method=XCLIENT,"
            f" sasl_username=alice@example.test") in log, log
    assert ("NOQUEUE: reject: RCPT from unknown[127.0.0.9]:40404: 554 5.7.1"
            " <reject@example.test>: Recipient address rejected: test policy;"
            " from=<alice@example.test> to=<reject@example.test> proto=ESMTP"
            " helo=<alice-laptop>") in log, log
    await deferToThread(postfix.wait_for_log, f"{queue_id}: hold:")
    assert queue_id in await deferToThread(postfix.held)

    # the same pooled connection, another user: RSET, XCLIENT again, EHLO
    bob = RelaySession(login="bob@example.test", client_address="127.0.0.10",
                       client_port=50505, helo="bob-pc")
    replies = await relay(client, bob, ["carol@example.test"], "second")
    assert replies[-1].startswith(b"250 2.0.0 Ok: queued as ")
    queue_id = replies[-1].split()[-1].decode()
    log = await deferToThread(postfix.wait_for_log, f"{queue_id}: client=")
    assert f"{queue_id}: client=unknown[127.0.0.10]:50505, sasl_method=XCLIENT," \
           f" sasl_username=bob@example.test" in log, log
    assert client.connections_made == 1
    client.close()


@pytest_twisted.ensureDeferred
async def test_without_xclient_the_relay_is_the_client(postfix):
    """``xclient = false``: Postfix sees the relay itself; the trace header names the
    login inside the held message instead."""
    client = client_for(postfix, xclient=False, trace_header="X-Authenticated-User")
    session = RelaySession(login="dave@example.test", client_address="127.0.0.11",
                           client_port=1, helo="dave")
    replies = await relay(client, session, ["bob@example.test"], "third")
    queue_id = replies[-1].split()[-1].decode()
    log = await deferToThread(postfix.wait_for_log, f"{queue_id}: client=")
    line = next(l for l in log.splitlines() if f"{queue_id}: client=" in l)
    assert re.search(rf"{queue_id}: client=localhost\[127\.0\.0\.1\]:[0-9]+$", line), line
    headers = await deferToThread(postfix.headers, queue_id)
    assert ("X-Authenticated-User: login=dave@example.test; client=[127.0.0.11]:1;"
            " helo=dave") in headers, headers
    client.close()


@pytest_twisted.ensureDeferred
async def test_one_clients_refusals_do_not_slow_the_next_client_down():
    """Postfix counts the errors of a connection until it delivers a message
    (past ``smtpd_soft_error_limit`` it sleeps ``smtpd_error_sleep_time`` before every
    reply; at ``smtpd_hard_error_limit`` it says 421).  XCLIENT does not reset that count, so a
    pooled connection would carry one client's refused recipient into the next
    client's session.  Here, after one error, every reply costs 5 s: the second client's
    transaction, after the first client's refused recipient, is still answered at once
    (it took 25 s on a pooled connection)."""
    server = PostfixServer(main_settings={"smtpd_soft_error_limit": "1",
                                          "smtpd_error_sleep_time": "5s"})
    try:
        await deferToThread(server.start)
        client = client_for(server, timeout=30.0)
        for n, login in enumerate(("alice@example.test", "bob@example.test")):
            session = RelaySession(login=login, client_address="127.0.0.9",
                                   client_port=40000 + n, helo=f"pc{n}")
            started = reactor.seconds()
            replies = await relay(client, session, ["reject@example.test"], f"err{n}")
            assert replies == [b"250 2.1.0 Ok\r\n", b"554 5.7.1 <reject@example.test>:"
                               b" Recipient address rejected: test policy\r\n",
                               REPLIES["need_rcpt"].to_bytes()]
            assert reactor.seconds() - started < 4, f"transaction {n} was slowed down"
        client.close()
    finally:
        await deferToThread(server.cleanup)


@pytest_twisted.ensureDeferred
async def test_a_pooled_connection_never_reaches_postfixs_junk_command_limit():
    """Every reuse of a pooled connection starts with RSET, which Postfix counts as a
    junk command; only a delivered message resets the count.  Past
    ``smtpd_junk_command_limit`` (100) each RSET is an error, and at
    ``smtpd_hard_error_limit`` (20) Postfix answers the next command, our MAIL, with
    ``421``: the 120th transaction in a row that ended before DATA (its client gave up
    after RCPT) had its MAIL refused (451 4.7.0 for our client).  A connection now
    carries at most 100 transactions; then a new one takes over, and every MAIL is
    answered 250.  (``smtpd_error_sleep_time = 0``: each error past
    ``smtpd_soft_error_limit`` would cost a second; ``in_flow_delay = 0``: so would each
    MAIL once 100 messages were opened and none delivered, Postfix's flow control.)"""
    server = PostfixServer(main_settings={"smtpd_error_sleep_time": "0s",
                                          "in_flow_delay": "0s"})
    try:
        await deferToThread(server.start)
        client = client_for(server)
        session = await abandoned_transactions(client, 130)
        replies = await relay(client, session, ["bob@example.test"], "after-junk")
        assert replies[-1].startswith(b"250 2.0.0 Ok: queued as "), replies
        assert client.connections_made == 2
        client.close()
        assert "too many errors" not in await deferToThread(server.logs)
    finally:
        await deferToThread(server.cleanup)


@pytest_twisted.ensureDeferred
async def test_postfix_closing_an_idle_pooled_connection_is_no_news():
    """Postfix ends a pooled connection after ``smtpd_timeout`` with ``421 4.4.2 ...
    Error: timeout exceeded``: the connection leaves the pool without a log line (it
    used to log one, "closing: ... while nothing was asked", per idle connection every
    five minutes of quiet), and the next transaction opens a new one."""
    from twisted.logger import globalLogPublisher

    server = PostfixServer(main_settings={"smtpd_timeout": "1s"})
    events: list[dict] = []
    try:
        await deferToThread(server.start)
        client = client_for(server)
        session = RelaySession(login="alice@example.test", client_address="127.0.0.9",
                               client_port=40000, helo="pc")
        assert (await relay(client, session, ["bob@example.test"], "idle-1"))[-1][:4] == b"250 "
        [pooled] = client.idle
        globalLogPublisher.addObserver(events.append)
        deadline = reactor.seconds() + 15
        while client.idle and reactor.seconds() < deadline:
            await deferLater(reactor, 0.05)
        assert client.idle == [] and pooled.closed
        assert pooled.error is not None and pooled.error.reply.code == 451
        assert (await relay(client, session, ["bob@example.test"], "idle-2"))[-1][:4] == b"250 "
        assert client.connections_made == 2
        client.close()
        log = await deferToThread(server.wait_for_log, "timeout after END-OF-MESSAGE")
        assert "timeout after END-OF-MESSAGE from unknown[127.0.0.9]:40000" in log, log
    finally:
        globalLogPublisher.removeObserver(events.append)
        await deferToThread(server.cleanup)
    assert [e for e in events if e.get("log_namespace") == "saslsmtp.relay.client"] == []


@pytest_twisted.ensureDeferred
async def test_postfix_timing_out_between_mail_and_rcpt_costs_the_client_nothing():
    """Our client pauses between MAIL and RCPT longer than Postfix's ``smtpd_timeout``:
    Postfix says ``421 4.4.2 ... Error: timeout exceeded`` and closes.  Nothing had been
    accepted upstream, so the RCPT goes out on a new connection after XCLIENT and the
    client's MAIL again: the client gets Postfix's 250s and the message is queued under
    the client's login.  A pause after an accepted RCPT is the client's 451 (every later
    RCPT and DATA too, until RSET): Postfix forgot the recipient our client has a 250 for."""
    server = PostfixServer(main_settings={"smtpd_timeout": "1s"})
    try:
        await deferToThread(server.start)
        client = client_for(server)
        session = RelaySession(login="alice@example.test", client_address="127.0.0.9",
                               client_port=40001, helo="pc")

        async def closed(tx) -> None:
            connection = tx.connection
            deadline = reactor.seconds() + 15
            while not connection.closed and reactor.seconds() < deadline:
                await deferLater(reactor, 0.05)
            assert connection.closed

        tx = client.transaction(session)
        assert (await tx.mail_from("alice@example.test")).to_bytes() == b"250 2.1.0 Ok\r\n"
        await closed(tx)
        assert (await tx.rcpt("bob@example.test")).to_bytes() == b"250 2.1.5 Ok\r\n"
        assert (await tx.start_data()).code == 354
        tx.write(b"Subject: paused\r\nMessage-ID: <paused@example.test>\r\n\r\nbody\r\n")
        final = await tx.end()
        assert final.to_bytes().startswith(b"250 2.0.0 Ok: queued as "), final
        queue_id = final.text.split()[-1]
        log = await deferToThread(server.wait_for_log, f"{queue_id}: client=")
        assert (f"{queue_id}: client=unknown[127.0.0.9]:40001, sasl_method=XCLIENT,"
                f" sasl_username=alice@example.test") in log, log
        assert client.connections_made == 2

        tx = client.transaction(session)
        assert (await tx.mail_from("alice@example.test")).code == 250
        assert (await tx.rcpt("bob@example.test")).code == 250
        made = client.connections_made
        await closed(tx)
        refused = await tx.rcpt("carol@example.test")  # Postfix's 421, as a 451
        assert refused.to_bytes() == b"451 4.4.2 postfix.test Error: timeout exceeded\r\n"
        assert tx.state == "done" and client.connections_made == made  # nothing sent again
        client.close()
    finally:
        await deferToThread(server.cleanup)


@pytest_twisted.ensureDeferred
async def test_reuse_limit_follows_a_lower_junk_command_limit():
    """An upstream Postfix with ``smtpd_junk_command_limit = 10``: with ``[delivery]
    reuse_limit = 10`` (9 RSETs per connection) 40 transactions in a row that end before
    DATA all get their MAIL answered 250, on 4 connections, and Postfix logs no "too
    many errors" (with the default 100 the 30th MAIL got a 421: 10 junk commands, then
    20 errors)."""
    server = PostfixServer(main_settings={"smtpd_junk_command_limit": "10",
                                          "smtpd_error_sleep_time": "0s",
                                          "in_flow_delay": "0s"})
    try:
        await deferToThread(server.start)
        client = client_for(server, reuse_limit=10)
        assert client.reuse_limit == 10
        await abandoned_transactions(client, 40)
        assert client.connections_made == 4
        client.close()
        assert "too many errors" not in await deferToThread(server.logs)
    finally:
        await deferToThread(server.cleanup)
