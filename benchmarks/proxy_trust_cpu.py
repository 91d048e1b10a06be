#!/usr/bin/env python3
"""CPU per ``haproxy:`` connection, with and without ``server.proxy_trusted_networks``.

In process, no sockets: the listener's factory builds the wrapper for a peer, the wrapper
gets a ``StringTransport`` and a PROXY v1 header followed by EHLO, and the SMTP side is a
protocol that does nothing, so the figure is the PROXY layer's own work per connection.
Cases: the key unset; set (three networks) with the proxy's address in the lookup cache
(one HAProxy host, the usual case); set with a new peer address every connection (a cache
miss each time); and an untrusted peer (refused: no wrapper is built).  Prints
microseconds per connection, best of five runs.

    python3 benchmarks/proxy_trust_cpu.py
    python3 benchmarks/proxy_trust_cpu.py --connections 50000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet.address import IPv4Address  # noqa: E402
from twisted.internet.protocol import Factory, Protocol  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402
from twisted.logger import globalLogBeginner  # noqa: E402

from saslsmtp.proxyheader import HeaderFirstFactory  # noqa: E402

HEADER = b"PROXY TCP4 198.51.100.7 192.0.2.1 40000 587\r\nEHLO c.example\r\n"
NETWORKS = ("10.0.0.2", "10.0.0.3", "192.168.0.0/16")


def run(trusted: tuple[str, ...] | None, peer: Callable[[int], str], n: int) -> float:
    """Microseconds per connection for ``n`` connections from ``peer(i)``."""
    factory = HeaderFirstFactory(Factory.forProtocol(Protocol), Clock(), 5.0,
                                 trusted=lambda: trusted)
    start = time.perf_counter()
    for i in range(n):
        host = peer(i)
        wrapper: Any = factory.buildProtocol(IPv4Address("TCP", host, 40000))
        if wrapper is None:
            continue
        wrapper.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", host, 40000)))
        wrapper.dataReceived(HEADER)
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--connections", type=int, default=20000)
    args = p.parse_args()
    globalLogBeginner.beginLoggingTo([lambda event: None], redirectStandardIO=False)
    cases = {
        "unset (every peer believed)": (None, lambda i: "10.0.0.2"),
        "set, proxy address cached": (NETWORKS, lambda i: "10.0.0.2"),
        "set, a new peer each time": (NETWORKS, lambda i: f"192.168.{i // 250 % 250}.{i % 250 + 1}"),
        "set, untrusted peer (refused)": (NETWORKS, lambda i: "203.0.113.9"),
    }
    for name, (trusted, peer) in cases.items():
        best = min(run(trusted, peer, args.connections) for _ in range(5))
        print(f"{name:32s} {best:7.2f} us/connection")


if __name__ == "__main__":
    main()
