"""An idle connection stays cheap: a per-connection memory budget the suite enforces.

A daemon holding 15,000 idle connections must stay well under 150 MB
(``benchmarks/idle_connections.py`` measures the real thing).  Here 2,000 connections are
made through the daemon's own factory over ``StringTransport``, each greeted and sent an
EHLO, and tracemalloc counts what they hold: the protocol and its helpers (peer, guards,
line reader, AUTH and mail state, limits, session events) and their two timers.  The
transport's own memory (Twisted's, not ours) is left out.
"""

from __future__ import annotations

import gc
import tracemalloc
from pathlib import Path

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from tests.support import clocked_factory

CONNECTIONS = 2000
# Measured (CPython 3.11): 3,724 bytes per connection with the per-connection classes
# slotted; 5,196 before, when the protocol's attributes overflowed CPython's shared-key
# instance dict and every connection carried its own ~1.5 KB dict.
BUDGET = 4400


def test_an_idle_connection_costs_under_the_budget(tmp_path: Path) -> None:
    """2,000 greeted connections (EHLO sent, then idle) hold under ``BUDGET`` bytes each of
    Python heap, timers included; closing them gives it all back (no timer left)."""
    factory, clock = clocked_factory(tmp_path)
    peers = [IPv4Address("TCP", f"10.1.{n // 256}.{n % 256}", 1024 + n) for n in range(CONNECTIONS)]
    transports = [StringTransport(peerAddress=peer) for peer in peers]

    def connect(n: int, transport: StringTransport) -> object:
        protocol = factory.buildProtocol(peers[n])
        protocol.makeConnection(transport)
        protocol.dataReceived(b"EHLO client.example.test\r\n")
        transport.clear()
        return protocol

    for n in range(50):  # warm-up: first-use caches are not per connection
        connect(n, StringTransport(peerAddress=peers[n])).connectionLost(  # type: ignore[attr-defined]
            Failure(ConnectionDone()))
    gc.collect()
    tracemalloc.start(1)
    try:
        before = tracemalloc.take_snapshot()
        held = [connect(n, transports[n]) for n in range(CONNECTIONS)]
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    not_ours = [tracemalloc.Filter(False, "*/twisted/internet/testing.py"),  # the transports
                tracemalloc.Filter(False, __file__),  # the list of protocols
                tracemalloc.Filter(False, tracemalloc.__file__)]
    grown = sum(stat.size_diff for stat in
                after.filter_traces(not_ours).compare_to(before.filter_traces(not_ours), "filename"))
    per_connection = grown / CONNECTIONS
    assert len(factory.connections) == CONNECTIONS
    assert len(clock.getDelayedCalls()) == 2 * CONNECTIONS  # idle timer, unauthenticated deadline
    assert per_connection < BUDGET, f"{per_connection:.0f} bytes per idle connection"
    for protocol in held:
        protocol.connectionLost(Failure(ConnectionDone()))  # type: ignore[attr-defined]
    assert not factory.connections and not clock.getDelayedCalls()
