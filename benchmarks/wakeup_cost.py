#!/usr/bin/env python3
"""What one small message costs the sender when it wakes a sleeping peer: loopback TCP
and a UNIX socket pair, the peer free to run on the other CPU or pinned to the sender's.

    python3 benchmarks/wakeup_cost.py             # 20,000 round trips per case
    python3 benchmarks/wakeup_cost.py -n 5000

A forked echo peer reads a 40-byte message and sends it back; the sender sends, then
blocks until the echo arrives, so the peer is asleep at every send.  Prints the
sender's CPU per round trip (``time.process_time``), the wall time per round trip and
the time inside ``send()`` alone.  On a virtual machine, waking a process that sleeps on
another (idle) vCPU is far dearer than waking it on the sender's own CPU: that cost is
charged to whoever sends, which is why a server's CPU per session rises when its client
(the C load generator) or its Redis sleeps between messages.
"""

from __future__ import annotations

import argparse
import os
import socket
import time


def pair(kind: str) -> tuple[socket.socket, socket.socket]:
    if kind == "unix":
        return socket.socketpair()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    for s in (a, b):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return a, b


def measure(kind: str, same_cpu: bool, n: int) -> str:
    a, b = pair(kind)
    pid = os.fork()
    if pid == 0:  # the peer: echo until EOF
        a.close()
        if same_cpu:
            os.sched_setaffinity(0, {0})
        while data := b.recv(100):
            b.send(data)
        os._exit(0)
    b.close()
    if same_cpu:
        os.sched_setaffinity(0, {0})
    message = b"x" * 40
    cpu0, wall0, in_send = time.process_time(), time.perf_counter(), 0.0
    for _ in range(n):
        t = time.perf_counter()
        a.send(message)
        in_send += time.perf_counter() - t
        a.recv(100)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    a.close()
    os.waitpid(pid, 0)
    if same_cpu:
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    where = "same CPU " if same_cpu else "any CPU  "
    return (f"{kind:4} {where} sender CPU {1e6 * cpu / n:6.1f} us   wall {1e6 * wall / n:6.1f} us"
            f"   send() {1e6 * in_send / n:5.1f} us   per round trip")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=20_000, help="round trips per case")
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs")
    for kind in ("tcp", "unix"):
        for same_cpu in (False, True):
            print(measure(kind, same_cpu, args.n))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
