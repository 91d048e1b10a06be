"""Per-check cost of the limit stores: MemoryStore in-process, RedisStore against a
redis-server on loopback (started here on a free port unless --redis URL is given).

    python benchmarks/limits_store.py [--redis redis://127.0.0.1:6379/0] [-n 20000]

Prints wall time and this process's CPU time per check.  RedisStore is measured one
check at a time (latency: what one SMTP command waits) and with 64 checks in flight
(what a busy worker pays in CPU per check).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, task  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402

from saslsmtp.limits.limiter import Limiter  # noqa: E402
from saslsmtp.limits.settings import Rate, parse_limits  # noqa: E402
from saslsmtp.limits.store import MemoryStore  # noqa: E402


def timed(label: str, n: int, fn) -> None:
    wall, cpu = time.perf_counter(), time.process_time()
    fn(n)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"{label:48s} {wall / n * 1e6:8.2f} us wall  {cpu / n * 1e6:8.2f} us CPU  per check")


def memory(n: int) -> None:
    clock = Clock()
    store = MemoryStore(clock)
    rate = Rate(1000000, 3600.0)
    keys = [f"connrate:192.0.2.{i % 250}" for i in range(n)]
    timed("MemoryStore.hit", n, lambda n: [store.hit(k, rate) for k in keys])
    timed("MemoryStore.peek", n, lambda n: [store.peek(k, rate) for k in keys])
    settings = parse_limits({"connections_per_ip": 1000000, "connection_rate_per_ip": "1000000/1h",
                             "auth_failures_per_ip": "1000000/1h",
                             "auth_failures_per_user": "1000000/1h"}, lambda k, m: None)
    limiter = Limiter(settings, MemoryStore(clock), clock)

    def sessions(n: int) -> None:
        for i in range(n):
            ip = f"192.0.2.{i % 250}"
            limiter.connection_made(ip).addCallback(lambda a: a.release())
            limiter.auth_gate(ip, "alice").addCallback(
                lambda g: limiter.auth_verdict(g, True, "alice", b"pw"))
    timed("Limiter: connect+release+auth gate+verdict", n, sessions)


def start_redis() -> tuple[subprocess.Popen, str, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not installed (Debian package redis-server)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    directory = tempfile.mkdtemp(prefix="limits-bench-")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir",
                             directory, "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, f"redis://127.0.0.1:{port}/0", directory


async def redis(reactor, url: str, n: int) -> None:
    from saslsmtp.limits.redisstore import RedisStore
    store = RedisStore(url, reactor)
    while not store.connected:
        await task.deferLater(reactor, 0.01, lambda: None)
    rate = Rate(1000000, 3600.0)
    await store.hit("warm", rate)

    async def one_at_a_time() -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        for i in range(n):
            await store.hit(f"connrate:192.0.2.{i % 250}", rate)
        report("RedisStore.hit, 1 in flight", n, wall, cpu)

    async def in_flight(width: int) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        for start in range(0, n, width):
            await defer.gatherResults([store.hit(f"connrate:192.0.2.{i % 250}", rate)
                                       for i in range(start, min(n, start + width))])
        report(f"RedisStore.hit, {width} in flight", n, wall, cpu)

    def report(label, count, wall, cpu):
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        print(f"{label:48s} {wall / count * 1e6:8.2f} us wall  {cpu / count * 1e6:8.2f} us CPU"
              "  per check")
    async def sessions(width: int) -> None:
        """What one AUTH PLAIN session asks of the store with every limit on (connect,
        AUTH gate, success verdict, release), ``width`` sessions at a time."""
        settings = parse_limits({"connections_per_ip": 1000000,
                                 "connection_rate_per_ip": "1000000/1h",
                                 "auth_failures_per_ip": "1000000/1h",
                                 "auth_failures_per_user": "1000000/1h"}, lambda k, m: None)
        limiter = Limiter(settings, store, reactor)

        async def one(i: int) -> None:
            ip = f"192.0.2.{i % 250}"
            admission = await limiter.connection_made(ip)
            gate = await limiter.auth_gate(ip, f"user{i % 50}")
            await limiter.auth_verdict(gate, True, f"user{i % 50}", b"pw")
            admission.release()
        wall, cpu = time.perf_counter(), time.process_time()
        for start in range(0, n, width):
            await defer.gatherResults([defer.ensureDeferred(one(i))
                                       for i in range(start, min(n, start + width))])
        report(f"Limiter session over Redis, {width} at a time", n, wall, cpu)
    await one_at_a_time()
    await in_flight(64)
    await sessions(16)
    assert store.unavailable == 0, "Redis calls failed during the benchmark"
    await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", help="an existing Redis (default: start one)")
    parser.add_argument("-n", type=int, default=20000)
    args = parser.parse_args()
    memory(max(args.n, 100000))
    proc = directory = None
    url = args.redis
    if url is None:
        proc, url, directory = start_redis()
    try:
        task.react(lambda reactor: defer.ensureDeferred(redis(reactor, url, args.n)))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
