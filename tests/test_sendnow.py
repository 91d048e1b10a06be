"""Listeners whose connections send at once when nothing is queued (saslsmtp.sendnow)."""

from __future__ import annotations

import socket
from typing import Any

import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.testing import MemoryReactor

from saslsmtp.sendnow import SendNowServer, all_sent, send_now_reactor

BIG = bytes(range(256)) * 40_000  # 10 MB: more than any socket buffer takes at once


class Writer(protocol.Protocol):
    """Writes what the test says on connect and records what was queued after each write."""

    def __init__(self, chunks: list[bytes], queued: list[int], done: defer.Deferred) -> None:
        self.chunks, self.queued, self.done = chunks, queued, done

    def connectionMade(self) -> None:
        for chunk in self.chunks:
            self.transport.write(chunk)
            t: Any = self.transport
            queued = len(t.dataBuffer) - t.offset + t._tempDataLen
            assert all_sent(t) is (queued == 0)
            self.queued.append(queued)
        self.transport.loseConnection()

    def connectionLost(self, reason: Any) -> None:
        self.done.callback(type(self.transport))


def _read_all(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port)) as client:
        parts = []
        while True:
            part = client.recv(1 << 16)
            if not part:
                return b"".join(parts)
            parts.append(part)


async def _serve(chunks: list[bytes]) -> tuple[bytes, list[int], Any]:
    queued: list[int] = []
    done: defer.Deferred = defer.Deferred()
    factory = protocol.Factory.forProtocol(lambda: Writer(chunks, queued, done))
    port = send_now_reactor(reactor).listenTCP(0, factory, interface="127.0.0.1")
    try:
        from twisted.internet.threads import deferToThread
        received = await deferToThread(_read_all, port.getHost().port)
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
