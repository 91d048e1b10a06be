"""The upstream client against aiosmtpd (a foreign SMTP server) on loopback: a refused
recipient, a dead or dying upstream, concurrency, STARTTLS, and a 50 MB message
streamed with bounded memory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread

from saslsmtp.relay.client import RelaySession, UpstreamClient, UpstreamTransaction
from saslsmtp.relay.options import UpstreamDelivery
from saslsmtp.replies import REPLIES
from tests.mailsink import MailSink, running_sink
from tests.support import ROOT, free_port
from tests.tlsutil import issue_cert, make_ca, server_ssl_context

SESSION = RelaySession(login="alice@example.test", client_address="127.0.0.1",
                       client_port=40000, helo="laptop")


def client_for(port: int, **options: Any) -> UpstreamClient:
    table = dict(type="smtp", endpoint=f"tcp:127.0.0.1:{port}", timeout=10.0)
    table.update(options)
    return UpstreamClient.from_options(UpstreamDelivery(**table), reactor=reactor,
                                       helo="relay.example.test")


def message(n: int, size: int = 0) -> bytes:
    body = b"".join(b"line %d of message %d\r\n" % (i, n) for i in range(max(1, size // 24)))
    return (b"From: alice@example.test\r\nTo: bob@example.test\r\n"
            b"Message-ID: <m%d@example.test>\r\nSubject: test %d\r\n\r\n.leading dot\r\n"
            % (n, n)) + body


async def send(client: UpstreamClient, n: int, rcpts: tuple[str, ...] = ("bob@example.test",)
               ) -> list[bytes]:
    """One whole transaction; the reply bytes of every step."""
    tx = client.transaction(SESSION)
    replies = [(await tx.mail_from("alice@example.test")).to_bytes()]
    if not replies[0].startswith(b"250"):
        return replies
    for rcpt in rcpts:
        replies.append((await tx.rcpt(rcpt)).to_bytes())
    start = await tx.start_data()
    replies.append(start.to_bytes())
    if start.code != 354:
        tx.abort()
        return replies
    tx.write(message(n))
    replies.append((await tx.end()).to_bytes())
    return replies


@pytest.fixture
def sink():
    yield from running_sink()


@pytest_twisted.ensureDeferred
async def test_delivery_and_rcpt_rejection_pass_through(sink):
    """The upstream's RCPT refusal is the client's reply; the message arrives once,
    dot-stuffing undone by the upstream, for the accepted recipient only."""
    client = client_for(sink.port)
    replies = await send(client, 1, ("reject-me@example.test", "bob@example.test"))
    assert replies == [b"250 2.0.0 OK\r\n",
                       b"550 5.1.1 <reject-me@example.test>: Recipient address rejected:"
                       b" User unknown\r\n",
                       b"250 2.1.5 OK\r\n",
                       b"354 End data with <CR><LF>.<CR><LF>\r\n",
                       b"250 2.0.0 OK: queued\r\n"]
    [got] = sink.messages
    assert got.rcpt_tos == ("bob@example.test",)
    assert got.content == message(1)
    client.close()


@pytest_twisted.ensureDeferred
async def test_upstream_down_is_451():
    """Nothing listening: 451 4.4.1 at MAIL."""
    client = client_for(free_port())
    tx = client.transaction(SESSION)
    assert await tx.mail_from("alice@example.test") == REPLIES["upstream_unavailable"]


@pytest_twisted.ensureDeferred
async def test_100_messages_over_16_concurrent_transactions_arrive_once(sink):
    """16 transactions at a time, 100 messages: each arrives exactly once, every client
    reply is 250, and the pool kept connections for reuse."""
    client = client_for(sink.port, pool_size=16)
    pending = list(range(100))
    results: dict[int, list[bytes]] = {}

    async def worker() -> None:
        while pending:
            n = pending.pop()
            results[n] = await send(client, n)

    await defer.gatherResults([defer.ensureDeferred(worker()) for _ in range(16)])
    assert all(r[-1] == b"250 2.0.0 OK: queued\r\n" for r in results.values())
    ids = sorted(m.message_id for m in sink.messages)
    assert ids == sorted(f"<m{n}@example.test>" for n in range(100))
    assert client.connections_made <= 16 and len(client.idle) == client.connections_made
    client.close()


@pytest_twisted.ensureDeferred
async def test_starttls_verified_and_wrong_name_refused(tmp_path):
    """STARTTLS with a private CA: delivered.  A certificate for another name: 451 4.4.1,
    and no MAIL goes out (fail closed)."""
    ca = make_ca(tmp_path)
    good = issue_cert(ca, tmp_path, names=("127.0.0.1",))
    other = issue_cert(ca, tmp_path, names=("mx.elsewhere.test",))
    for cert, ok in ((good, True), (other, False)):
        server = MailSink(free_port(), tls_context=server_ssl_context(cert))
        await deferToThread(server.start)
        try:
            client = client_for(server.port, starttls=True, ca_file=ca.cert_path)
            replies = await send(client, 7)
            if ok:
                assert replies[-1] == b"250 2.0.0 OK: queued\r\n"
                assert len(server.messages) == 1
                assert client.idle[0].tls
            else:
                assert replies == [REPLIES["upstream_unavailable"].to_bytes()]
                assert server.messages == []
            client.close()
        finally:
            await deferToThread(server.stop)


@pytest_twisted.ensureDeferred
async def test_implicit_tls_verified_and_untrusted_ca_refused(tmp_path):
    """``tls = true``: TLS from the first byte, verified against ``ca_file``; a
    certificate from another CA fails the handshake: 451 4.4.1, nothing delivered."""
    ca, other_ca = make_ca(tmp_path, "relay CA"), make_ca(tmp_path, "other CA")
    server = MailSink(free_port(), implicit_tls=server_ssl_context(
        issue_cert(ca, tmp_path, names=("127.0.0.1",))))
    await deferToThread(server.start)
    try:
        for trusted, ok in ((ca, True), (other_ca, False)):
            client = client_for(server.port, tls=True, ca_file=trusted.cert_path)
            replies = await send(client, 8)
            if ok:
                assert replies[-1] == b"250 2.0.0 OK: queued\r\n"
            else:
                assert replies == [REPLIES["upstream_unavailable"].to_bytes()]
            client.close()
        assert len(server.messages) == 1
    finally:
        await deferToThread(server.stop)


class Pump:
    """A client-side push producer: writes ``total`` octets in 64 KiB chunks into the
    transaction, stopping while paused, as a client transport would."""

    def __init__(self, tx: UpstreamTransaction, total: int) -> None:
        self.tx = tx
        self.left = total
        self.paused = False
        self.pauses = 0
        self.done: defer.Deferred[None] = defer.Deferred()
        self.chunk = (b"x" * 78 + b"\r\n") * 820  # 65,600 octets of 80-octet lines
        self.at: tuple[int, Any] | None = None  # (octets left, callable): a hook mid-way

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False
        reactor.callLater(0, self.pump)

    def stopProducing(self) -> None:
        self.left = 0

    def pump(self) -> None:
        for _ in range(4):
            if self.paused or self.done.called:
                return
            if self.left <= 0:
                self.done.callback(None)
                return
            self.tx.write(self.chunk[:self.left])
            self.left -= len(self.chunk)
            if self.at is not None and self.left <= self.at[0]:
                self.at, hook = None, self.at[1]
                hook()
        reactor.callLater(0, self.pump)


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def sink_process(tmp_path: Path) -> tuple[subprocess.Popen[str], int, Path]:
    port, log = free_port(), tmp_path / "sink.log"
    process = subprocess.Popen([sys.executable, "-m", "tests.mailsink", str(port), str(log)],
                               cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "ready"
    return process, port, log


async def start_message(client: UpstreamClient) -> UpstreamTransaction:
    tx = client.transaction(SESSION)
    assert (await tx.mail_from("alice@example.test")).code == 250
    assert (await tx.rcpt("bob@example.test")).code == 250
    assert (await tx.start_data()).code == 354
    tx.write(b"Message-ID: <big@example.test>\r\n\r\n")
    return tx


@pytest_twisted.ensureDeferred
async def test_50_mb_message_streams_with_bounded_memory(tmp_path):
    """50 MB through the relay to an upstream in another process: our RSS grows by less
    than 20 MB (the message is never held), the upstream pauses us, and it gets it all."""
    process, port, log = await deferToThread(sink_process, tmp_path)
    try:
        client = client_for(port, timeout=60.0)
        tx = await start_message(client)
        total = 50 * 1024 * 1024
        pump = Pump(tx, total)
        tx.registerProducer(pump, True)
        before = rss()
        started = time.monotonic()
        pump.pump()
        await pump.done.addTimeout(120, reactor)
        reply = await tx.end()
        elapsed = time.monotonic() - started
        growth = rss() - before
        assert reply.to_bytes() == b"250 2.0.0 OK: queued\r\n"
        assert growth < 20 * 1024 * 1024, growth
        assert pump.pauses > 0
        logged = log.read_text().split()
        assert logged[3] == "<big@example.test>"
        assert int(logged[2]) == total + len(b"Message-ID: <big@example.test>\r\n\r\n")
        print(f"50 MB relayed in {elapsed:.2f}s ({total / elapsed / 1e6:.0f} MB/s), RSS"
              f" growth {growth / 1e6:.1f} MB, {pump.pauses} pauses")
        client.close()
    finally:
        process.kill()
        process.wait()


@pytest_twisted.ensureDeferred
async def test_upstream_killed_mid_data_is_451(tmp_path):
    """The upstream process dies while the message streams: the client's data is still
    read to its end (not paused forever) and the final reply is 451 4.4.2."""
    process, port, _ = await deferToThread(sink_process, tmp_path)
    try:
        client = client_for(port)
        tx = await start_message(client)
        pump = Pump(tx, 40 * 1024 * 1024)
        pump.at = (30 * 1024 * 1024, lambda: os.kill(process.pid, signal.SIGKILL))
        tx.registerProducer(pump, True)
        pump.pump()
        await pump.done.addTimeout(30, reactor)
        assert pump.at is None  # the upstream was killed 10 MB into the message
        assert await tx.end() == REPLIES["upstream_lost"]
    finally:
        process.kill()
        process.wait()


@pytest_twisted.ensureDeferred
async def test_a_wrong_ca_file_is_named_in_the_log(tmp_path):
    """STARTTLS to an upstream whose certificate another CA issued: the client's 451
    4.4.1, and a log line that says why (OpenSSL's reason and what to check), not only
    "TLS handshake failed", which a server refusing our TLS version also gives."""
    from twisted.logger import formatEvent, globalLogPublisher

    ca, other_ca = make_ca(tmp_path, "relay CA"), make_ca(tmp_path, "other CA")
    server = MailSink(free_port(), tls_context=server_ssl_context(
        issue_cert(ca, tmp_path, names=("127.0.0.1",))))
    await deferToThread(server.start)
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        client = client_for(server.port, starttls=True, ca_file=other_ca.cert_path)
        assert await send(client, 9) == [REPLIES["upstream_unavailable"].to_bytes()]
        client.close()
    finally:
        globalLogPublisher.removeObserver(events.append)
        await deferToThread(server.stop)
    lines = [(e["log_level"].name, formatEvent(e)) for e in events
             if e.get("log_namespace") == "saslsmtp.relay.client"]
    assert lines == [("warn", f"upstream tcp:127.0.0.1:{server.port} unreachable: TLS handshake"
                      " failed: certificate verify failed (the upstream's certificate chain does"
                      " not verify against ca_file, or the system's CAs when ca_file is not"
                      " set); messages get 451 until it answers again")], lines
    assert server.messages == []


def relay_lines(events: list[dict]) -> list[tuple[str, str]]:
    """The relay client's log lines: (level, text) as an operator reads them."""
    from twisted.logger import formatEvent
    return [(e["log_level"].name, formatEvent(e)) for e in events
            if e.get("log_namespace") == "saslsmtp.relay.client"]


@pytest_twisted.ensureDeferred
async def test_an_upstream_outage_is_one_warning_and_its_end_one_line(tmp_path):
    """aiosmtpd stopped, then started again: each attempt meanwhile logged "cannot
    connect" at info, which alerting on warnings never saw.  Now the first failure after
    a success is a warning, the repeats within a minute info, the first after that a
    warning counting them, and the first connection that works one info line with how
    long it lasted."""
    from twisted.logger import globalLogPublisher

    from saslsmtp.relay.outage import UpstreamOutage
    server = MailSink(free_port())
    await deferToThread(server.start)
    running = [server]  # stopped at the end, whatever happens
    now = [1000.0]
    client = client_for(server.port, pool_size=0)  # a new connection for every message
    client.outage = UpstreamOutage(client.name, lambda: now[0])  # the minute, without waiting
    name = client.name
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        assert (await send(client, 1))[-1].startswith(b"250 ")
        await deferToThread(running.pop().stop)
        for step in (0, 10, 20, 61, 65):  # seconds into the outage
            now[0] = 1000.0 + step
            assert await send(client, 2) == [REPLIES["upstream_unavailable"].to_bytes()]
        again = MailSink(server.port)  # (aiosmtpd's controller cannot start twice)
        await deferToThread(again.start)
        running.append(again)
        now[0] = 1075.25
        assert (await send(client, 3))[-1].startswith(b"250 ")
        assert (await send(client, 4))[-1].startswith(b"250 ")
    finally:
        globalLogPublisher.removeObserver(events.append)
        client.close()
        for sink in running:
            await deferToThread(sink.stop)
    why = "cannot connect: ConnectionRefusedError"
    assert relay_lines(events) == [
        ("warn", f"upstream {name} unreachable: {why}; messages get 451 until it answers again"),
        ("info", f"upstream {name} still unreachable: {why}"),
        ("info", f"upstream {name} still unreachable: {why}"),
        ("warn", f"upstream {name} still unreachable after 61 s: {why}"
                 " (3 failed attempts since the last warning)"),
        ("info", f"upstream {name} still unreachable: {why}"),
        ("info", f"upstream {name} reachable again after 75.2 s"),
    ]
    assert [m.content for m in server.messages + again.messages] == [message(1), message(3),
                                                                      message(4)]


class SilentAtTheDot:
    """aiosmtpd's handler for an upstream that takes the message and never answers the
    final dot (a content filter that hangs), or closes the connection then (``close``)."""

    def __init__(self, close: bool) -> None:
        self.close = close

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        import asyncio
        if self.close:
            server.transport.abort()
        await asyncio.Event().wait()  # until the server stops (its tasks are cancelled)
        return "250 2.0.0 OK: queued"


@pytest.mark.parametrize("close", [False, True], ids=["timeout", "lost"])
@pytest_twisted.ensureDeferred
async def test_no_reply_to_the_final_dot_is_a_warning(tmp_path, close):
    """No reply to the final dot within final_timeout, or the connection lost while
    waiting for it: the client's retry may deliver a second copy, which an operator
    should hear of; each was an info line like any other timeout or loss."""
    from aiosmtpd.controller import Controller
    from twisted.logger import globalLogPublisher

    port = free_port()
    controller = Controller(SilentAtTheDot(close), hostname="127.0.0.1", port=port,
                            ready_timeout=5)
    await deferToThread(controller.start)
    client = client_for(port, final_timeout=0.5 if not close else 30.0)
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        reply = REPLIES["upstream_lost" if close else "upstream_timeout"]
        assert (await send(client, 1))[-1] == reply.to_bytes()
    finally:
        globalLogPublisher.removeObserver(events.append)
        client.close()
        await deferToThread(controller.stop)
    what = ("connection lost waiting for the reply to end of data" if close
            else "no reply to end of data within 0.5s")
    assert relay_lines(events) == [
        ("warn", f"upstream {client.name}: {what}; the upstream may have accepted the"
                 " message: the client's retry may deliver a second copy")]
