#!/usr/bin/env python3
"""Relay throughput on loopback: messages/s through ``saslsmtp.relay`` to a null upstream.

Starts ``null_smtp_server.py`` (another process: it accepts every MAIL, RCPT and DATA
and discards the message) and relays ``--messages`` messages of ``--size`` octets with
``--concurrency`` transactions at a time through one ``UpstreamClient`` (pool size =
concurrency), as the SMTP server would drive it: MAIL, RCPT, DATA, the body in 64 KiB
writes, the final dot.  Prints messages/s, MB/s and this process's CPU per message
(the relay's own cost: the generator is the relay).

    python3 benchmarks/relay_throughput.py [--messages 2000] [--size 10240] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=2000)
    p.add_argument("--size", type=int, default=10240)
    p.add_argument("--concurrency", type=int, default=16)
    args = p.parse_args()

    from twisted.internet import defer, reactor, task

    from saslsmtp.relay.client import RelaySession, UpstreamClient
    from saslsmtp.relay.options import UpstreamDelivery

    port = free_port()
    upstream = subprocess.Popen([sys.executable, str(HERE / "null_smtp_server.py"),
                                 "--port", str(port)], stdout=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    client = UpstreamClient.from_options(
        UpstreamDelivery(endpoint=f"tcp:127.0.0.1:{port}", pool_size=args.concurrency,
                         timeout=30.0), reactor=reactor, helo="relay.bench")
    session = RelaySession(login="bench", client_address="127.0.0.1", client_port=1,
                           helo="bench")
    line = b"x" * 78 + b"\r\n"
    body = b"Subject: bench\r\n\r\n" + line * (args.size // len(line))
    left = [args.messages]
    failures: list[bytes] = []
    out: dict[str, float] = {}

    async def one() -> None:
        tx = client.transaction(session)
        for step in (lambda: tx.mail_from("bench@example.test"),
                     lambda: tx.rcpt("sink@example.test"), tx.start_data):
            reply = await step()
            if reply.code >= 400:
                failures.append(reply.to_bytes())
                tx.abort()
                return
        for i in range(0, len(body), 65536):
            tx.write(body[i:i + 65536])
        reply = await tx.end()
        if reply.code != 250:
            failures.append(reply.to_bytes())

    async def worker() -> None:
        while left[0] > 0:
            left[0] -= 1
            await one()

    async def run() -> None:
        await one()  # warm-up: first connection
        start, cpu0 = time.monotonic(), cpu()
        await defer.gatherResults([defer.ensureDeferred(worker())
                                   for _ in range(args.concurrency)])
        out["elapsed"], out["cpu"] = time.monotonic() - start, cpu() - cpu0
        client.close()

    try:
        task.react(lambda _: defer.ensureDeferred(run()))
    except SystemExit:
        pass
    finally:
        upstream.kill()
        upstream.wait()
    n, elapsed = args.messages, out["elapsed"]
    print(f"relay to a null upstream, loopback, C={args.concurrency}, {n} messages of"
          f" {len(body)} octets: {n / elapsed:,.0f} messages/s,"
          f" {n * len(body) / elapsed / 1e6:.1f} MB/s, relay CPU {out['cpu'] / n * 1e3:.3f}"
          f" ms/message; {client.connections_made} upstream connections;"
          f" failures: {len(failures)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
