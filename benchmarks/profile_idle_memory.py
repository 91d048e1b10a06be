#!/usr/bin/env python3
"""Where an idle connection's memory goes: a tracemalloc diff over N real connections.

Builds the daemon's service in this process (``saslsmtp.daemon.make_service``, the same
config as ``idle_connections.py``), starts it on the real reactor, opens ``-n`` loopback
connections that read the greeting and send EHLO (driven with ``reactor.iterate()`` from
non-blocking client sockets in this process), and prints the Python heap growth per
connection grouped by allocating line, by file, and the count of live objects by type.
The client sockets' own objects are taken out (they are allocated before tracing starts).

    python3 benchmarks/profile_idle_memory.py -n 2000
    python3 benchmarks/profile_idle_memory.py -n 2000 --frames 4   # deeper tracebacks
"""

from __future__ import annotations

import argparse
import gc
import socket
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from idle_connections import daemon_config, free_port, raise_nofile  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=2000)
    parser.add_argument("--frames", type=int, default=1)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--no-ehlo", action="store_true")
    args = parser.parse_args()
    raise_nofile()

    from twisted.internet import reactor  # noqa: the profile runs the real reactor

    from saslsmtp.daemon import make_service
    from saslsmtp.service import load

    tmp = Path(tempfile.mkdtemp(prefix="saslsmtp-profile-"))
    (tmp / "users").write_text("bench:{PLAIN}benchpass\n")
    (tmp / "mail").mkdir()
    port = free_port()
    (tmp / "saslsmtp.toml").write_text(daemon_config(port))
    import os
    os.chdir(tmp)
    top = make_service(load(str(tmp / "saslsmtp.toml")), reactor)
    top.privilegedStartService()
    top.startService()

    def spin(seconds: float = 0.05) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            reactor.iterate(0.001)  # type: ignore[attr-defined]

    def hold(count: int, clients: list[socket.socket]) -> None:
        batch = []
        for i in range(count):
            s = socket.socket()
            s.bind((f"127.0.0.{2 + i % 8}", 0))
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            batch.append(s)
            if len(batch) == 200 or i == count - 1:
                pending = list(batch)
                while pending:
                    spin(0.01)
                    left = []
                    for c in pending:
                        try:
                            data = c.recv(4096)
                        except BlockingIOError:
                            left.append(c)
                            continue
                        if data.startswith(b"220") and not args.no_ehlo:
                            c.send(b"EHLO idle.client.test\r\n")
                    pending = left
                clients.extend(batch)
                batch = []
        spin(0.3)

    warm: list[socket.socket] = []
    hold(200, warm)  # warm-up: first-use caches, import-time objects
    for s in warm:
        s.close()
    spin(0.5)
    gc.collect()
    sockets: list[socket.socket] = [socket.socket() for _ in range(args.n)]  # allocated untraced
    for s in sockets:
        s.close()
    before_types = Counter(type(o).__name__ for o in gc.get_objects())
    tracemalloc.start(args.frames)
    first = tracemalloc.take_snapshot()
    clients: list[socket.socket] = []
    hold(args.n, clients)
    gc.collect()
    second = tracemalloc.take_snapshot()
    tracemalloc.stop()
    after_types = Counter(type(o).__name__ for o in gc.get_objects())
    skip = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, __file__)]
    first, second = first.filter_traces(skip), second.filter_traces(skip)
    n = args.n
    total = sum(s.size_diff for s in second.compare_to(first, "filename"))
    print(f"{n} connections held; Python heap growth {total / n:.0f} bytes per connection\n")
    print("by file:")
    for stat in second.compare_to(first, "filename")[:12]:
        print(f"  {stat.size_diff / n:8.0f} B/conn  {stat.count_diff / n:6.2f} blocks/conn  "
              f"{stat.traceback[0].filename}")
    print("\nby line:" if args.frames == 1 else "\nby traceback:")
    key = "lineno" if args.frames == 1 else "traceback"
    for stat in second.compare_to(first, key)[:args.top]:
        frames = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in stat.traceback)
        print(f"  {stat.size_diff / n:8.0f} B/conn  {stat.count_diff / n:6.2f} blocks/conn  {frames}")
    print("\nlive objects by type (per connection):")
    grown = Counter({k: after_types[k] - before_types.get(k, 0) for k in after_types})
    for name, count in grown.most_common(20):
        if count > 0:
            print(f"  {count / n:6.2f}  {name}")
    for s in clients:
        s.close()
    spin(0.5)


if __name__ == "__main__":
    main()
