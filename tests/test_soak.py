"""Memory stays flat over many short sessions (bounded soak, traced with tracemalloc).

Mixed sessions, as a fuzzer makes them (greeting only, unknown commands, a failed and a
successful AUTH PLAIN, a LOGIN aborted with ``*``, garbage with NUL and bare LF, DATA
without a transaction), are driven over ``StringTransport`` through the daemon's own
factory.  After a warm-up, the Python heap must not grow between the first and second
half of the run: a per-connection leak of a few dozen bytes would show as megabytes.

Failed logins from ever new client addresses (what a real server sees; the real-socket
soak ``benchmarks/soak_rss.py --unique-addresses`` found it) must not leave a record per
address behind when no limit needs it, and records that are needed expire with time.
"""

from __future__ import annotations

import base64
import gc
import tracemalloc
from pathlib import Path

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from saslsmtp.limits.limiter import Limiter
from saslsmtp.limits.penalty import PENALTY_FORGET
from saslsmtp.limits.settings import LimitsSettings, parse_rate
from saslsmtp.limits.store import MemoryStore
from tests.support import clocked_factory

GOOD = base64.b64encode(b"\0demo\0pw")
BAD = base64.b64encode(b"\0demo\0wrong")
SESSIONS = [
    [b"QUIT\r\n"],
    [b"EHLO x\r\nNOOP\r\nFOO bar\r\nRSET\r\nQUIT\r\n"],
    [b"EHLO x\r\nAUTH PLAIN " + BAD + b"\r\n", b"AUTH PLAIN " + GOOD + b"\r\n",
     b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nRSET\r\n"],
    [b"EHLO x\r\nAUTH LOGIN\r\n", b"*\r\nAUTH PLAIN !!\r\nSTARTTLS\r\n"],
    [b"\x00\xff\xfe garbage\nbare LF\r\n"],
    [b"HELO x\r\nDATA\r\nMAIL FROM:<a>\r\n" + b"A" * 3000],
]
WARM_UP, HALF = 1500, 3000
ADDRESSES = 1000


def heap(*also_left_out: str) -> int:
    """The traced Python heap, in bytes, after a full collection, less what is not the
    sessions' (and whatever files ``also_left_out`` names)."""
    gc.collect()
    # not counted: log events kept by the suite's password-leak fixture (conftest.py)
    # and by Twisted's bounded history buffer, tracemalloc's own bookkeeping, and the
    # hash table of the limits' LRU of parsed addresses (one block that CPython resizes
    # up and down as entries are evicted; the first test checks its 4,096-entry bound)
    snapshot = tracemalloc.take_snapshot()
    left_out = ["*/tests/conftest.py", "*/saslsmtp/limits/settings.py", *also_left_out,
                "*/twisted/logger/*", tracemalloc.__file__]
    traced = snapshot.filter_traces([tracemalloc.Filter(False, name) for name in left_out])
    return sum(stat.size for stat in traced.statistics("filename"))


def test_memory_is_flat_over_many_short_sessions(tmp_path: Path) -> None:
    """Heap growth from session 1,500 to 4,500 vs 4,500 to 7,500: the second half adds
    less than 4 bytes per session (what was measured: under 1; the big soak's figures
    are in the report)."""
    factory, clock = clocked_factory(tmp_path)

    def session(n: int) -> None:
        # 1,000 client addresses in turn: every per-address structure is bounded (the
        # limits' address LRU holds 4,096), so a growth seen here is per connection
        a = n % ADDRESSES
        peer = IPv4Address("TCP", f"10.0.{a // 256}.{a % 256}", 1024 + n % 60000)
        protocol = factory.buildProtocol(peer)
        transport = StringTransport(peerAddress=peer)
        protocol.makeConnection(transport)
        for chunk in SESSIONS[n % len(SESSIONS)]:
            protocol.dataReceived(chunk)
            clock.advance(0.05)
        transport.loseConnection()
        protocol.connectionLost(Failure(ConnectionDone()))
        clock.advance(2)

    # Tracing starts before the warm-up: bounded caches (the limits' LRU of parsed
    # addresses, 4,096 entries) evict entries made during the warm-up later, and a free
    # of an untraced block would not balance its replacement.
    from saslsmtp.limits.settings import _classify
    _classify.cache_clear()  # entries made by earlier tests would be freed untraced
    tracemalloc.start(1)
    try:
        for n in range(WARM_UP):
            session(n)
        start = heap()
        for n in range(WARM_UP, WARM_UP + HALF):
            session(n)
        middle = heap()
        for n in range(WARM_UP + HALF, WARM_UP + 2 * HALF):
            session(n)
        end = heap()
    finally:
        tracemalloc.stop()
    assert not factory.connections and not clock.getDelayedCalls()
    assert (end - middle) / HALF < 4, (start, middle, end)
    assert _classify.cache_info().currsize <= _classify.cache_info().maxsize == 4096


# Not counted by the test of failed logins, besides what ``heap`` leaves out: the limits'
# LRU of parsed addresses (4,096 entries: its keys are made here, its values by
# ipaddress), which grows until it is full; the warm-up would have to fill it first.
LEFT_OUT_TOO = ("*/ipaddress.py", __file__)


def test_failed_logins_from_ever_new_addresses_leave_nothing_behind(tmp_path: Path) -> None:
    """No ``[limits]``: after a warm-up, 2,000 sessions, each from a new address with a
    failed AUTH PLAIN, grow the heap by less than 20 bytes each (a failure record per
    address, kept for an hour and up to 100,000 addresses, cost ~640 bytes each before)."""
    factory, clock = clocked_factory(tmp_path)

    def session(n: int) -> None:
        peer = IPv4Address("TCP", f"10.{n // 65536 % 256}.{n // 256 % 256}.{n % 256}", 1024 + n % 60000)
        protocol = factory.buildProtocol(peer)
        transport = StringTransport(peerAddress=peer)
        protocol.makeConnection(transport)
        protocol.dataReceived(b"EHLO x\r\nAUTH PLAIN " + BAD + b"\r\n")
        clock.advance(0.05)
        assert b"535 5.7.8" in transport.value()
        protocol.dataReceived(b"QUIT\r\n")
        transport.loseConnection()
        protocol.connectionLost(Failure(ConnectionDone()))
        clock.advance(0.05)

    from saslsmtp.limits.settings import _classify
    _classify.cache_clear()
    tracemalloc.start(1)
    try:
        for n in range(300):
            session(n)
        start = heap(*LEFT_OUT_TOO)
        for n in range(300, 2300):
            session(n)
        end = heap(*LEFT_OUT_TOO)
    finally:
        tracemalloc.stop()
    assert not factory.connections and not clock.getDelayedCalls()
    # under 20: one resized table elsewhere in the suite's process (9 KB seen) is not a leak
    assert (end - start) / 2000 < 20, (start, end)


def test_failure_records_expire_with_time() -> None:
    """With a failure limit the per-address records are needed, for an hour: failures from
    2,000 new addresses an hour later drop the 2,000 old records instead of adding to them."""
    clock = Clock()
    limiter = Limiter(LimitsSettings(auth_failures_per_ip=parse_rate("100/1m")),
                      MemoryStore(clock), clock)

    def fail(address: str) -> None:
        gate = limiter.auth_gate(address, "alice")
        gate.addCallback(lambda g: limiter.auth_verdict(g, False, "alice", b"wrong"))
        clock.advance(0.01)

    for n in range(2000):
        fail(f"10.1.{n // 256}.{n % 256}")
    assert len(limiter.penalties.records) == 2000
    clock.advance(PENALTY_FORGET + 1)
    for n in range(2000):
        fail(f"10.2.{n // 256}.{n % 256}")
    assert len(limiter.penalties.records) <= 2000 + 8
