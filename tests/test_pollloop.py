"""``pollloop.lean_dispatch``: a real ``EPollReactor`` (a fresh instance, never the
installed one) dispatches its events without a log context and handles failures as
``callWithLogger`` did; any other reactor is left alone."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from twisted.internet import epollreactor  # the daemon's reactor on Linux, where it runs
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.python.failure import Failure

from saslsmtp.pollloop import lean_dispatch


class Reader:
    """A selectable reading one end of a socket pair, recording what happens to it."""

    def __init__(self, sock: socket.socket, name: str, *, read_fails: bool = False,
                 lost_fails: bool = False) -> None:
        self.sock = sock
        self.name = name
        self.read_fails = read_fails
        self.lost_fails = lost_fails
        self.read: list[bytes] = []
        self.lost: list[Failure] = []

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return self.name

    def doRead(self) -> Any:
        data = self.sock.recv(100)
        if self.read_fails:
            raise ValueError("doRead failed")
        self.read.append(data)
        return None if data else ConnectionResetError("closed")

    def doWrite(self) -> None:
        return None

    def connectionLost(self, reason: Failure) -> None:
        self.lost.append(reason)
        if self.lost_fails:
            raise RuntimeError("connectionLost failed")


@pytest.fixture
def reactor() -> Any:
    made = epollreactor.EPollReactor()
    yield made
    made._poller.close()


def pair() -> tuple[socket.socket, socket.socket]:
    left, right = socket.socketpair()
    left.setblocking(False)
    return left, right


def test_events_reach_the_selectables(reactor: Any) -> None:
    assert lean_dispatch(reactor) is True
    (a, a_peer), (b, b_peer) = pair(), pair()
    first, second = Reader(a, "first"), Reader(b, "second")
    reactor.addReader(first)
    reactor.addReader(second)
    a_peer.sendall(b"EHLO x\r\n")
    b_peer.sendall(b"QUIT\r\n")
    reactor.doIteration(1.0)
    assert (first.read, second.read) == ([b"EHLO x\r\n"], [b"QUIT\r\n"])
    reactor.doIteration(0)  # nothing more to read: nothing is called
    assert (first.read, second.read) == ([b"EHLO x\r\n"], [b"QUIT\r\n"])
    for s in (a, a_peer, b, b_peer):
        s.close()


def test_a_failing_read_is_logged_and_disconnects_as_before(reactor: Any) -> None:
    lean_dispatch(reactor)
    sock, peer = pair()
    reader = Reader(sock, "broken", read_fails=True)
    reactor.addReader(reader)
    peer.sendall(b"x")
    with capturedLogs() as events:
        reactor.doIteration(1.0)
    assert [f.type for f in reader.lost] == [ValueError]
    assert reader not in reactor.getReaders()
    # Twisted's own legacy log.err, inside _doReadOrWrite
    assert [e["failure"].type for e in events if "failure" in e] == [ValueError]
    sock.close()
    peer.close()


def test_a_failure_past_the_handler_is_logged_and_the_loop_goes_on(reactor: Any) -> None:
    """``connectionLost`` raising (after the peer closed): logged, naming the connection,
    and the other socket's event of the same poll is still handled."""
    lean_dispatch(reactor)
    (a, a_peer), (b, b_peer) = pair(), pair()
    failing = Reader(a, "SubmissionESMTP,7,192.0.2.7", lost_fails=True)
    other = Reader(b, "other")
    reactor.addReader(failing)
    reactor.addReader(other)
    a_peer.close()  # EOF: doRead reports the connection lost
    b_peer.sendall(b"NOOP\r\n")
    with capturedLogs() as events:
        reactor.doIteration(1.0)
    assert len(failing.lost) == 1 and other.read == [b"NOOP\r\n"]
    logged = [e for e in events if e.get("log_failure") is not None
              and e["log_failure"].check(RuntimeError)]
    assert [e["connection"] for e in logged] == ["SubmissionESMTP,7,192.0.2.7"]
    a.close()
    b.close()
    b_peer.close()


def test_other_reactors_are_left_alone() -> None:
    memory = MemoryReactorClock()
    assert lean_dispatch(memory) is False
    assert "doIteration" not in vars(memory)


def test_a_subclass_is_left_alone() -> None:
    """Only Twisted's own class: a subclass may dispatch its own way."""

    class Custom(epollreactor.EPollReactor):
        pass

    custom = Custom()
    try:
        assert lean_dispatch(custom) is False
        assert "doIteration" not in vars(custom)
    finally:
        custom._poller.close()
