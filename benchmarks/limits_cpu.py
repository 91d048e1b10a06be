#!/usr/bin/env python3
"""What the abuse limits cost: server CPU per AUTH PLAIN session with the limits off, all
on in memory, and all on in Redis, side by side in one run (same load generator, the
variants interleaved repeat by repeat so machine noise hits them alike; --unix adds
Redis over its UNIX socket).

    python3 benchmarks/limits_cpu.py                 # concurrency 16, 3 x 8 s per variant
    python3 benchmarks/limits_cpu.py --duration 5 --repeats 5
    python3 benchmarks/limits_cpu.py --generator c   # the C load generator (smtp_load.c)
    python3 benchmarks/limits_cpu.py --redis-batch   # redis-server cannot preempt the daemon
    python3 benchmarks/limits_cpu.py --split         # + Redis with only the connection limits,
                                                     #   and with only the AUTH limits
    python3 benchmarks/limits_cpu.py --cpu-part user # only user time (or: system)

Uses benchmarks/run.py's server and measurement code and a throwaway redis-server on a
free loopback port.  Writes benchmarks/results/<date>-limits-cpu.md (and prints it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run as bench  # noqa: E402  (benchmarks/run.py)

ALL_LIMITS = """[limits]
store = {store}
connections_per_ip = 1000
connection_rate_per_ip = "1000000/1m"
auth_failures_per_ip = "1000/1m"
auth_failures_per_user = "1000/1m"
messages_per_user = "1000000/1h"
recipients_per_user = "1000000/1h"
auth_penalty_max = 15
"""


def limits_only(prefixes: tuple[str, ...]) -> str:
    """``ALL_LIMITS`` with only ``store`` and the keys that start with ``prefixes``."""
    return "\n".join(line for line in ALL_LIMITS.splitlines()
                     if line.startswith(("[limits]", "store", *prefixes))) + "\n"


#: --split: which part of Redis's cost each wait is (the admission; the AUTH gate)
SPLIT = {"redis-conn": limits_only(("connection",)),
         "redis-auth": limits_only(("auth_",))}


def _batch_scheduling() -> None:
    """In the child before exec: SCHED_BATCH, so a waking redis-server does not preempt
    a running process (it waits for a CPU to fall idle or for its next time slice)."""
    os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))


def start_redis(folder: Path, batch: bool = False) -> tuple[subprocess.Popen, int]:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = bench.free_port()
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no", "--dir", str(folder),
                                "--unixsocket", str(folder / "redis.sock"),
                                "--unixsocketperm", "700"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               preexec_fn=_batch_scheduling if batch else None)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return process, port
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise bench.BenchError("redis-server did not start")


def preemptions(pid: int) -> int:
    """Times the server was switched out while it could have run (``nonvoluntary_ctxt_
    switches``): another busy process on its CPU, such as a redis-server waking up."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("nonvoluntary_ctxt_switches:"):
                return int(line.split()[1])
    return 0


def namespace(args: argparse.Namespace, fragment: Path | None) -> argparse.Namespace:
    return argparse.Namespace(
        user="bench", password="bench-password", users_line=[], auth_mechanisms=None,
        mech=["PLAIN"], auth_backends=None, auth_option=[],
        config_fragment=[str(fragment)] if fragment else [], stand_in=None,
        saslsmtp_config=None, saslsmtp_port=None, saslsmtp_log=os.devnull, mode="auth",
        load_password=None, duration=args.duration, warmup=args.warmup, expect_fail=False,
        tls_files=None, starttls=False, generator=args.generator)


def paired_ratio(base: list[float], values: list[float]) -> float:
    """The median of ``values[i] / base[i] - 1``: each repeat against the base's run in the
    same round, so that a slow minute of the machine cancels out."""
    return statistics.median(v / b - 1 for b, v in zip(base, values))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--generator", choices=("python", "c"), default="python",
                        help="load generator: smtp_auth_load.py, or smtp_load.c (built on"
                             " first use), which leaves the machine most of a core")
    parser.add_argument("--redis-batch", action="store_true",
                        help="run redis-server with SCHED_BATCH (no wake-up preemption of"
                             " the daemon): how much of Redis's cost is its competing for CPU")
    parser.add_argument("--split", action="store_true",
                        help="also Redis with only the connection limits (redis-conn) and with"
                             " only the AUTH limits (redis-auth): the cost of each wait")
    parser.add_argument("--unix", action="store_true",
                        help="also Redis over its UNIX socket (variant redis-unix)")
    parser.add_argument("--cpu-part", choices=sorted(bench.CPU_PARTS), default="all",
                        help="count only the server's user time (Python) or only its system"
                             " time (the kernel: sockets, epoll) as its CPU")
    args = parser.parse_args()
    bench.CPU_FIELDS = bench.CPU_PARTS[args.cpu_part]
    with tempfile.TemporaryDirectory(prefix="saslsmtp-limits-cpu-") as tmp:
        root = Path(tmp)
        redis, redis_port = start_redis(root, batch=args.redis_batch)
        servers = {}
        try:
            stores = [("off", None), ("memory", '"memory"'),
                      ("redis", f'"redis://127.0.0.1:{redis_port}/0"')]
            if args.unix:
                stores.append(("redis-unix", f'"unix://{root / "redis.sock"}"'))
            redis_url = f'"redis://127.0.0.1:{redis_port}/0"'
            if args.split:
                stores += [(name, redis_url) for name in SPLIT]
            for name, store in stores:
                folder = root / name
                folder.mkdir()
                fragment = None
                if store is not None:
                    fragment = folder / "limits.toml"
                    fragment.write_text(SPLIT.get(name, ALL_LIMITS).format(store=store))
                server = bench.saslsmtp_server(folder, namespace(args, fragment))
                server.name = f"limits-{name}"
                servers[name] = (server, namespace(args, fragment))
            with bench.running([s for s, _ in servers.values()]):
                time.sleep(1.0)  # the Redis store connects when the service starts
                runs: dict[str, list[bench.Measurement]] = {name: [] for name in servers}
                switched: dict[str, list[float]] = {name: [] for name in servers}
                for repeat in range(args.repeats):
                    shift = repeat % len(servers)
                    order = list(servers)[shift:] + list(servers)[:shift]
                    for name in order:
                        server, ns = servers[name]
                        before = preemptions(server.pid)
                        m = bench.measure(server, "PLAIN", args.concurrency, repeat, ns)
                        if not m.ok:
                            raise bench.BenchError(f"{name}: {m.problem}")
                        if m.server_cpu_ms_per_session is None:
                            raise bench.BenchError(f"{name}: no CPU figure (nothing served,"
                                                   " or the server's /proc entry is gone)")
                        runs[name].append(m)
                        switched[name].append((preemptions(server.pid) - before)
                                              / max(m.sessions, 1))
                        print(f"{name:7} repeat {repeat}: {m.server_cpu_ms_per_session} ms CPU"
                              f"/session, {m.handshakes_per_s:.0f} sessions/s", file=sys.stderr)
        finally:
            redis.kill()
            redis.wait()
    cpu = {name: statistics.median(m.server_cpu_ms_per_session or 0.0 for m in ms)
           for name, ms in runs.items()}  # (never None: refused above)
    rate = {name: statistics.median(m.handshakes_per_s or 0.0 for m in ms)
            for name, ms in runs.items()}
    p99 = {name: statistics.median(m.auth_ms.get("p99") or 0 for m in ms)
           for name, ms in runs.items()}
    loadgen = {name: statistics.median(m.client_cpu_pct or 0 for m in ms)
               for name, ms in runs.items()}
    per_repeat = {name: [m.server_cpu_ms_per_session or 0.0 for m in ms]
                  for name, ms in runs.items()}
    paired = {name: paired_ratio(per_repeat["off"], values)
              for name, values in per_repeat.items()}
    now = dt.datetime.now(dt.timezone.utc)
    lines = [
        f"# Abuse limits: server CPU per AUTH PLAIN session ({now:%Y-%m-%d %H:%M} UTC)", "",
        f"`python3 benchmarks/limits_cpu.py --concurrency {args.concurrency} --duration"
        f" {args.duration:g} --repeats {args.repeats}{' --unix' if args.unix else ''}"
        f"{' --generator c' if args.generator == 'c' else ''}"
        f"{' --redis-batch' if args.redis_batch else ''}{' --split' if args.split else ''}"
        f"{f' --cpu-part {args.cpu_part}' if args.cpu_part != 'all' else ''}`:"
        " twistd saslsmtp, file backend"
        " ({PLAIN} entry), failure_delay 0, EHLO + AUTH PLAIN + QUIT per session; the"
        " variants interleaved, median of the repeats. \"All on\": every [limits]"
        " key set (connections, connection rate, AUTH failures per address and per user,"
        " messages, recipients, penalty), high enough never to refuse; loopback is not"
        " trusted, so every check runs.", "",
        f"Machine: {os.cpu_count()} CPUs, shared with other work while measuring. Load:"
        f" {'smtp_load.c' if args.generator == 'c' else 'smtp_auth_load.py'}.", "",
        *([f"CPU counted: the server's {args.cpu_part} time only"
           f" ({'utime' if args.cpu_part == 'user' else 'stime'} in /proc/PID/stat).", ""]
          if args.cpu_part != "all" else []),
        "| limits | CPU ms/session | vs off | vs off, paired | sessions/s | AUTH p99 ms"
        " | preempted/session | generator CPU % |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in runs:
        lines.append(f"| {name} | {cpu[name]:.3f} | {100 * (cpu[name] / cpu['off'] - 1):+.1f}% |"
                     f" {100 * paired[name]:+.1f}% | {rate[name]:.0f} | {p99[name]:.1f} |"
                     f" {statistics.median(switched[name]):.2f} | {loadgen[name]:.0f} |")
    if args.split:
        lines += ["", "redis-conn: only connections_per_ip and connection_rate_per_ip (the"
                  " admission before the greeting); redis-auth: only auth_failures_per_ip,"
                  " auth_failures_per_user and auth_penalty_max (the gate before the"
                  " credentials)."]
    lines += ["", "\"vs off\": the ratio of the medians; \"vs off, paired\": the median, over the"
              " repeats, of each repeat's ratio to the off run of the same round (seconds"
              " apart, where one variant's repeats are minutes apart: on a machine whose"
              " speed drifts, the paired figure is the steadier one; `limits_pool.py` pools"
              " several runs)."]
    lines += ["", "\"preempted\": the server's involuntary context switches per session (another"
              " process, such as redis-server, took its CPU); \"generator CPU\": the load"
              " generator's share of one core.", "", "Every repeat (CPU ms/session):", ""]
    for name, ms in runs.items():
        lines.append(f"- {name}: " + ", ".join(f"{m.server_cpu_ms_per_session:.3f}" for m in ms))
    text = "\n".join(lines) + "\n"
    out = bench.RESULTS / f"{now:%Y%m%d-%H%M%S}-limits-cpu.md"
    out.write_text(text)
    print(text)
    print(f"written: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
