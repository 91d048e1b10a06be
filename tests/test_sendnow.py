"""Listeners whose connections send at once when nothing is queued (saslsmtp.sendnow)."""

from __future__ import annotations

import socket
import threading
from typing import Any

import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.testing import MemoryReactor

from saslsmtp.sendnow import SendNowServer, all_sent, send_now_reactor

BIG = bytes(range(256)) * 40_000  # 10 MB: more than any socket buffer takes at once


class Writer(protocol.Protocol):
    """Writes what the test says on connect and records what was queued after each write."""

    def __init__(self, chunks: list[bytes], queued: list[int], done: defer.Deferred,
                 closed: threading.Event) -> None:
        self.chunks, self.queued, self.done, self.closed = chunks, queued, done, closed

    def connectionMade(self) -> None:
        for chunk in self.chunks:
            self.transport.write(chunk)
            t: Any = self.transport
            queued = len(t.dataBuffer) - t.offset + t._tempDataLen
            assert all_sent(t) is (queued == 0)
            self.queued.append(queued)
        self.transport.loseConnection()
        self.closed.set()

    def connectionLost(self, reason: Any) -> None:
        self.done.callback(type(self.transport))


def _read_all(port: int, reset: bool, closed: threading.Event) -> bytes:
    """Every byte until EOF; with ``reset``, until the server resets the connection.

    Nothing is read until the server has written and closed: with a small receive buffer
    nobody drains meanwhile, what the kernel takes at once does not depend on how fast
    this thread happens to read on a loaded machine."""
    with socket.socket() as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        client.connect(("127.0.0.1", port))
        if not closed.wait(30):
            raise TimeoutError("the server never closed")
        parts = []
        while True:
            try:
                part = client.recv(1 << 16)
            except ConnectionResetError:
                if not reset:
                    raise
                part = b""
            if not part:
                return b"".join(parts)
            parts.append(part)


async def _serve(chunks: list[bytes]) -> tuple[bytes, list[int], Any]:
    queued: list[int] = []
    done: defer.Deferred = defer.Deferred()
    closed = threading.Event()  # the client reads only once the server has closed
    factory = protocol.Factory.forProtocol(lambda: Writer(chunks, queued, done, closed))
    port = send_now_reactor(reactor).listenTCP(0, factory, interface="127.0.0.1")
    try:
        from twisted.internet.threads import deferToThread
        received = await deferToThread(_read_all, port.getHost().port, False, closed)
        kind = await done
    finally:
        await port.stopListening()
    return received, queued, kind


@pytest_twisted.ensureDeferred
async def test_a_short_reply_leaves_without_being_queued() -> None:
    """The reply goes out inside write(): nothing is left queued for the next turn."""
    received, queued, kind = await _serve([b"220 hello\r\n", b"250 ok\r\n"])
    assert kind is SendNowServer
    assert received == b"220 hello\r\n250 ok\r\n"
    assert queued == [0, 0]


@pytest_twisted.ensureDeferred
async def test_what_the_kernel_does_not_take_is_queued_and_order_is_kept() -> None:
    """A write bigger than the socket buffer is partly sent and partly queued; a short write
    after it queues behind it, so the client reads every byte in order."""
    received, queued, _ = await _serve([BIG, b"250 after\r\n"])
    assert received == BIG + b"250 after\r\n"
    assert 0 < queued[0] < len(BIG)
    assert queued[1] == queued[0] + len(b"250 after\r\n")


class Closer(protocol.Protocol):
    """Writes ``before``, closes, then does ``after`` in the same turn; records how the
    connection ended, how often, and whether closing registered it for writability."""

    def __init__(self, before: bytes, after: str, done: defer.Deferred,
                 closed: threading.Event) -> None:
        self.before, self.after, self.done, self.closed = before, after, done, closed
        self.lost: list[type] = []
        self.writing_after_close: bool | None = None

    def connectionMade(self) -> None:
        self.transport.write(self.before)
        self.transport.loseConnection()
        self.writing_after_close = self.transport in reactor.getWriters()
        if self.after == "write":
            self.transport.write(b"250 after close\r\n")
        elif self.after == "abort":
            self.transport.abortConnection()
        self.closed.set()

    def connectionLost(self, reason: Any) -> None:
        self.lost.append(reason.type)
        if len(self.lost) == 1:
            # a turn later, after anything already due (a second connectionLost would be)
            reactor.callLater(0, self.done.callback, self)


async def _close(before: bytes, after: str) -> tuple[bytes, Closer]:
    done: defer.Deferred = defer.Deferred()
    closed = threading.Event()  # the client reads only once the server has closed
    factory = protocol.Factory.forProtocol(lambda: Closer(before, after, done, closed))
    port = send_now_reactor(reactor).listenTCP(0, factory, interface="127.0.0.1")
    try:
        from twisted.internet.threads import deferToThread
        received = await deferToThread(
            _read_all, port.getHost().port, after == "abort", closed)
        closer = await done
    finally:
        await port.stopListening()
    return received, closer


@pytest_twisted.ensureDeferred
async def test_closing_with_nothing_queued_skips_the_writability_round() -> None:
    """Everything was sent: the socket is not registered for writing, and the connection
    is lost once, cleanly, on a later turn."""
    from twisted.internet.error import ConnectionDone
    received, closer = await _close(b"221 bye\r\n", "")
    assert received == b"221 bye\r\n"
    assert closer.writing_after_close is False
    assert closer.lost == [ConnectionDone]


@pytest_twisted.ensureDeferred
async def test_what_is_written_after_close_is_still_sent_first() -> None:
    """As in Twisted: data written after loseConnection leaves before the close."""
    from twisted.internet.error import ConnectionDone
    received, closer = await _close(b"221 bye\r\n", "write")
    assert received == b"221 bye\r\n250 after close\r\n"
    assert closer.lost == [ConnectionDone]


@pytest_twisted.ensureDeferred
async def test_an_abort_after_close_ends_the_connection_once() -> None:
    """abortConnection in the same turn wins, and connectionLost runs only once."""
    from twisted.internet.error import ConnectionAborted
    received, closer = await _close(b"221 bye\r\n", "abort")
    assert received in (b"", b"221 bye\r\n")  # a reset may overtake the reply
    assert closer.lost == [ConnectionAborted]


@pytest_twisted.ensureDeferred
async def test_closing_with_data_queued_is_twisteds() -> None:
    """A queue the kernel has not taken yet is flushed by Twisted's own path, then closed."""
    from twisted.internet.error import ConnectionDone
    received, closer = await _close(BIG, "")
    assert received == BIG
    assert closer.writing_after_close is True
    assert closer.lost == [ConnectionDone]


class TLSCloser(protocol.Protocol):
    """STARTTLS at once, a reply over TLS, then close: TLS shuts down first."""

    def __init__(self, options: Any, done: defer.Deferred) -> None:
        self.options, self.done = options, done
        self.lost: list[type] = []

    def connectionMade(self) -> None:
        self.transport.startTLS(self.options)
        self.transport.write(b"221 bye\r\n")
        self.transport.loseConnection()

    def connectionLost(self, reason: Any) -> None:
        self.lost.append(reason.type)
        if len(self.lost) == 1:
            reactor.callLater(0, self.done.callback, self)


def _read_all_tls(port: int, ca_path: str) -> bytes:
    import ssl
    context = ssl.create_default_context(cafile=ca_path)
    with socket.create_connection(("127.0.0.1", port)) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as client:
            parts = []
            while True:
                try:
                    part = client.recv(1 << 16)
                except ssl.SSLZeroReturnError:
                    part = b""
                if not part:
                    client.unwrap()  # our close_notify: the server's TLS shutdown completes
                    return b"".join(parts)
                parts.append(part)


@pytest_twisted.ensureDeferred
async def test_after_starttls_the_connection_closes_once_tls_has_shut_down(
        tmp_path: Any, monkeypatch: Any) -> None:
    """The TLS layer's close reaches the connection through the bypass: with nothing
    queued it takes the same next-turn close, after the close_notify exchange."""
    from twisted.internet.error import ConnectionDone
    from twisted.internet.threads import deferToThread

    import saslsmtp.sendnow as sendnow
    from tests.tlsutil import issue_cert, make_ca, twisted_server_options

    closed: list[Any] = []
    real = sendnow._close_sent
    monkeypatch.setattr(sendnow, "_close_sent", lambda t: (closed.append(t), real(t)))
    ca = make_ca(tmp_path)
    options = twisted_server_options(issue_cert(ca, tmp_path))
    done: defer.Deferred = defer.Deferred()
    factory = protocol.Factory.forProtocol(lambda: TLSCloser(options, done))
    port = send_now_reactor(reactor).listenTCP(0, factory, interface="127.0.0.1")
    try:
        received = await deferToThread(_read_all_tls, port.getHost().port, ca.cert_path)
        closer = await done
    finally:
        await port.stopListening()
    assert received == b"221 bye\r\n"
    assert closer.lost == [ConnectionDone]
    assert len(closed) == 1 and closed[0].TLS


def test_a_reactor_that_is_not_posix_is_left_alone() -> None:
    """Test reactors keep recording listeners themselves."""
    memory = MemoryReactor()
    assert send_now_reactor(memory) is memory
    from twisted.internet.testing import StringTransport
    assert not all_sent(StringTransport())  # not known: the guards keep their abort timer


@pytest_twisted.ensureDeferred
async def test_the_daemons_tcp_listeners_are_send_now_ports() -> None:
    """``service.listener`` builds plain and PROXY-protocol TCP listeners on these ports."""
    from saslsmtp.sendnow import SendNowPort
    from saslsmtp.service import listener
    factory = protocol.Factory.forProtocol(protocol.Protocol)
    for description in ("tcp:0:interface=127.0.0.1", "haproxy:tcp:0:interface=127.0.0.1"):
        endpoint, wrapped = listener(description, None, reactor, factory)  # type: ignore[arg-type]
        port = await endpoint.listen(wrapped)
        try:
            assert isinstance(port, SendNowPort), (description, port)
        finally:
            await port.stopListening()
