"""A connection waiting for a shared store's admission, byte for byte over a
StringTransport: the protocol holds its input (no Deferred) until the verdict, then
greets or refuses; a client that leaves, a kick and an error meanwhile are handled.

The store here answers when the test says so (a ``MemoryStore`` behind Deferreds), as
Redis answers a reactor turn or more after the connection was accepted.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from saslsmtp.engine_settings import EngineSettings
from saslsmtp.limits.limiter import Limiter
from saslsmtp.limits.settings import parse_limits
from saslsmtp.limits.store import MemoryStore
from saslsmtp.mechanisms import builtin_mechanisms
from saslsmtp.protocol import SubmissionESMTP
from saslsmtp.replies import REPLIES

GREETING = b"220 mail.example.test ESMTP saslsmtp\r\n"
EHLO_REPLY = (b"250-mail.example.test\r\n250-PIPELINING\r\n250-SIZE 26214400\r\n250-8BITMIME\r\n"
              b"250-ENHANCEDSTATUSCODES\r\n250-SMTPUTF8\r\n250 AUTH PLAIN\r\n")
REFUSED = b"421 4.7.0 Too many connections from 192.0.2.20\r\n"
KICKED = b"421 4.7.0 Session closed by the administrator, closing connection\r\n"
LOCAL_ERROR = b"451 4.3.0 Local error in processing; try again later\r\n"


class LaterStore:
    """A store that answers each slot request when ``answer()`` is called."""

    def __init__(self, clock: Clock) -> None:
        self.memory = MemoryStore(clock)
        self.waiting: list[Callable[[], None]] = []

    def acquire(self, key: str, limit: int, holder: str) -> "defer.Deferred[bool]":
        d: defer.Deferred[bool] = defer.Deferred()
        self.waiting.append(lambda: self.memory.acquire(key, limit, holder).chainDeferred(d))
        return d

    def release(self, key: str, holder: str) -> "defer.Deferred[None]":
        return self.memory.release(key, holder)

    def answer(self) -> None:
        self.waiting.pop(0)()


def connect(limiter: Limiter, clock: Clock) -> tuple[SubmissionESMTP, StringTransport]:
    transport = StringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 587),
                                peerAddress=IPv4Address("TCP", "192.0.2.20", 54321))
    protocol = SubmissionESMTP(portal=None, settings=EngineSettings(
        hostname="mail.example.test", require_tls=False, mechanisms=("PLAIN",)),
        mechanisms=builtin_mechanisms(("PLAIN",)), clock=clock, limiter=limiter)
    protocol.makeConnection(transport)
    return protocol, transport


def setup() -> tuple[LaterStore, Limiter, Clock]:
    clock = Clock()
    store = LaterStore(clock)
    settings = parse_limits({"connections_per_ip": 1}, lambda key, message: None)
    return store, Limiter(settings, store, clock), clock  # type: ignore[arg-type]


def test_lines_sent_before_the_verdict_wait_for_the_greeting() -> None:
    store, limiter, clock = setup()
    protocol, transport = connect(limiter, clock)
    protocol.dataReceived(b"EHLO client.example\r\n")
    assert transport.value() == b"" and protocol.busy
    store.answer()
    assert transport.value() == GREETING + EHLO_REPLY
    assert not protocol.busy


def test_a_late_refusal_answers_nothing_the_client_sent_meanwhile() -> None:
    store, limiter, clock = setup()
    first, _ = connect(limiter, clock)
    store.answer()
    second, transport = connect(limiter, clock)
    second.dataReceived(b"EHLO client.example\r\n")
    store.answer()
    assert transport.value() == REFUSED
    assert second.leaving
    first.connectionLost(None)
    assert store.memory.held("conn:192.0.2.20") == 0


def test_a_client_gone_before_the_verdict_gives_its_seat_back() -> None:
    store, limiter, clock = setup()
    protocol, transport = connect(limiter, clock)
    transport.loseConnection()
    protocol.connectionLost(None)
    store.answer()  # the seat comes after all: given back at once
    assert transport.value() == b""
    assert store.memory.held("conn:192.0.2.20") == 0
    again, transport = connect(limiter, clock)
    store.answer()
    assert transport.value() == GREETING


def test_a_kick_before_the_verdict_closes_without_a_greeting() -> None:
    store, limiter, clock = setup()
    protocol, transport = connect(limiter, clock)
    protocol.end(REPLIES["kicked"])
    assert transport.value() == KICKED
    store.answer()
    assert transport.value() == KICKED  # no greeting after the 421
    protocol.connectionLost(None)
    assert store.memory.held("conn:192.0.2.20") == 0


def test_an_error_greeting_after_the_verdict_gets_the_local_error_reply(
        monkeypatch: Any) -> None:
    store, limiter, clock = setup()
    protocol, transport = connect(limiter, clock)

    def broken() -> None:
        raise RuntimeError("greeting failed")
    monkeypatch.setattr(protocol, "greet", broken)
    flushed: list[Any] = []
    from twisted.logger import globalLogPublisher
    globalLogPublisher.addObserver(flushed.append)
    try:
        store.answer()
    finally:
        globalLogPublisher.removeObserver(flushed.append)
    assert transport.value() == LOCAL_ERROR
    assert [e for e in flushed if e.get("log_failure") is not None]
    assert not protocol.busy
