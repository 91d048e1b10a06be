#!/usr/bin/env python3
"""Where ``workers = N`` spends its CPU: each server process profiled separately under load.

    flock /tmp/saslsmtp-bench.lock python3 benchmarks/profile_workers.py            # workers = 2
    flock /tmp/saslsmtp-bench.lock python3 benchmarks/profile_workers.py --workers 1
    python3 benchmarks/profile_workers.py --log-format json --top 25

Starts the real daemon (``twistd -n saslsmtp --workers N --logfile=...``, the config of
``benchmarks/workers.py``), runs ``smtp_auth_load.py`` (AUTH PLAIN, fresh session per
handshake) and meanwhile samples the master and every worker with py-spy
(``pip install py-spy``; ``--nonblocking``, so the processes are not paused).  It prints,
per process: CPU ms per session (from /proc), the sessions it served (its ``session
end`` log lines), its hottest functions by own samples and by inclusive samples, and the
inclusive share of a few watched functions (logging, accepting, metrics).  Raw collapsed
stacks are kept in benchmarks/results/ with ``--keep``.

``--accepts`` counts instead (with ``perf stat``, no py-spy) each worker's accept4()
calls that got a connection and those that found the queue already emptied by the other
worker (EAGAIN: the thundering herd of one shared listening socket), and its epoll_wait
calls.  ``--metrics-cost`` times the metric updates of one session (connection, backend,
AUTH, close) in one process and in multi-process mode (files under
``PROMETHEUS_MULTIPROC_DIR``), without a server.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import LOADGEN, REPO, RESULTS, BenchError, Server, free_port  # noqa: E402
from workers import PASSWORD, USER, cpu_of, family, write_config  # noqa: E402

_WORKER = re.compile(r"worker=(\d+)|\"worker_pid\": (\d+)")
WATCH = ("Port.doRead", "socket.accept", "FilteringLogObserver.__call__", "FdLineWriter.write",
         "RelayObserver.__call__", "Logger.emit", "Metrics.")

METRICS_COST = """
import os, sys, tempfile, time
if sys.argv[1] == "multi":
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp()
from prometheus_client import CollectorRegistry
from saslsmtp.metrics import Metrics
m = Metrics(None if sys.argv[1] == "multi" else CollectorRegistry(), ["PLAIN"])
def session():
    m.connection_opened("tcp:2525")
    m.backend_finished("users", "accept", 0.0003)
    m.auth_finished("PLAIN", "success")
    m.session_closed("tcp:2525")
for _ in range(2000):
    session()
t = time.process_time()
for _ in range(20000):
    session()
print((time.process_time() - t) / 20000 * 1e6)
"""


def metrics_cost() -> str:
    """Microseconds of CPU for one session's metric updates, one process vs multi-process."""
    env = {**__import__("os").environ, "PYTHONPATH": str(REPO)}
    cost = {mode: min(float(subprocess.run([sys.executable, "-c", METRICS_COST, mode], env=env,
                                           capture_output=True, text=True, check=True).stdout)
                      for _ in range(3)) for mode in ("single", "multi")}
    return (f"metric updates per session (4 events): one process {cost['single']:.1f} us CPU,"
            f" multi-process files {cost['multi']:.1f} us CPU")


def accept_counts(pid: int, seconds: float) -> subprocess.Popen:
    """``perf stat`` counting ``pid``'s accept4 results and epoll_wait calls."""
    return subprocess.Popen(
        ["perf", "stat", "-x,", "-p", str(pid),
         "-e", "syscalls:sys_exit_accept4", "--filter", "ret >= 0",
         "-e", "syscalls:sys_exit_accept4", "--filter", "ret < 0",
         "-e", "syscalls:sys_enter_epoll_wait", "--", "sleep", str(seconds)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def parse_perf(stderr: str) -> dict[str, int]:
    counts = [int(line.split(",")[0]) for line in stderr.splitlines()
              if line and line.split(",")[0].isdigit()]
    return dict(zip(("accepted", "accept_eagain", "epoll_wait"), counts))


def summarise(raw: str, top: int) -> tuple[int, list[tuple[str, int]], list[tuple[str, int]], dict[str, int]]:
    """(samples, [(function, own samples)], [(function, inclusive samples)], {watched: inclusive
    samples}) of py-spy's ``--format raw`` output (``frame;frame;...;leaf count`` per stack)."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    watched: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
        for name in WATCH:
            if any(name in frame for frame in frames):
                watched[name] += n
    return total, own.most_common(top), inclusive.most_common(top), watched


def sessions_per_worker(log: Path) -> dict[int, int]:
    """``session end`` lines per worker pid (text: ``[... worker=PID]``; JSON: ``worker_pid``),
    over the log file and its rotated pieces."""
    counts: collections.Counter[int] = collections.Counter()
    for line in (x for piece in log.parent.glob(log.name + "*")
                 for x in piece.read_text(errors="replace").splitlines()):
        if "session end" in line:
            m = _WORKER.search(line)
            counts[int(m.group(1) or m.group(2)) if m else 0] += 1
    return dict(counts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("-c", "--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    parser.add_argument("--top", type=int, default=18)
    parser.add_argument("--no-profile", action="store_true", help="only CPU and balance, no py-spy")
    parser.add_argument("--keep", action="store_true", help="write the raw stacks to benchmarks/results/")
    parser.add_argument("--accepts", action="store_true", help="count accept4/epoll_wait with perf, no py-spy")
    parser.add_argument("--metrics-cost", action="store_true", help="only time metric updates, no server")
    parser.add_argument("--code", type=Path, help="serve the saslsmtp package found in this directory")
    args = parser.parse_args(argv)
    if args.metrics_cost:
        print(metrics_cost())
        return 0
    if args.accepts:
        args.no_profile = True
    pyspy = shutil.which("py-spy")
    if pyspy is None and not args.no_profile:
        print("py-spy not found (pip install py-spy), or use --no-profile", file=sys.stderr)
        return 2
    report: list[str] = []
    with tempfile.TemporaryDirectory(prefix="saslsmtp-profile-workers-") as tmp:
        workdir = Path(tmp)
        port = free_port()
        config = write_config(workdir, port, "plain")
        if args.log_format == "json":
            config.write_text(config.read_text().replace("[server]\n", '[server]\nlog_format = "json"\n'))
        log = workdir / "twistd.log"
        env = {**__import__("os").environ, "PYTHONPATH": str(args.code or REPO)}
        argv_ = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
                 "--pidfile=", f"--logfile={log}", "saslsmtp", "--config", str(config),
                 "--workers", str(args.workers)]
        server = Server(f"saslsmtp-workers-{args.workers}", argv_, port, workdir, env)
        try:
            server.start()
            deadline = time.monotonic() + 30
            while log.read_text(errors="replace").count("saslsmtp ready") < args.workers:
                if time.monotonic() > deadline:
                    raise BenchError(f"workers did not start:\n{server.output_tail()}")
                time.sleep(0.1)
            pids = family(server.pid)
            before = {p: cpu_of([p]) for p in pids}
            load = subprocess.Popen(
                [sys.executable, str(LOADGEN), "--port", str(port), "--mech", "PLAIN", "--user", USER,
                 "--password", PASSWORD, "--concurrency", str(args.concurrency),
                 "--duration", str(args.duration), "--warmup", "1", "--json"],
                stdout=subprocess.PIPE, text=True)
            spies = {}
            perfs = {}
            if args.accepts:
                time.sleep(1.0)
                perfs = {pid: accept_counts(pid, args.duration - 1) for pid in pids if pid != server.pid}
            if not args.no_profile:
                time.sleep(1.0)  # the warm-up
                for pid in pids:
                    spies[pid] = subprocess.Popen(
                        [pyspy, "record", "--pid", str(pid), "--duration", str(int(args.duration - 1)),
                         "--rate", str(args.rate), "--nonblocking", "--format", "raw",
                         "-o", str(workdir / f"{pid}.raw")],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            out, _ = load.communicate(timeout=args.duration + 90)
            for spy in spies.values():
                spy.wait(timeout=60)
            accepts = {pid: parse_perf(perf.communicate(timeout=60)[1]) for pid, perf in perfs.items()}
            cpu = {p: cpu_of([p]) - before[p] for p in pids}
            result = json.loads(out)
            time.sleep(0.5)
        finally:
            server.stop()
        served = sessions_per_worker(log)
        total_sessions = result["sessions_measured"] + result["sessions_warmup"]
        report += [f"# profile: workers = {args.workers}, AUTH PLAIN, c={args.concurrency},"
                   f" {args.duration:.0f} s, log_format {args.log_format}, code {args.code or 'this checkout'}"
                   f" — {dt.datetime.now(dt.timezone.utc):%Y-%m-%dT%H:%MZ}", "",
                   f"- handshakes/s {result['handshakes_per_s']:.1f}, session p50/p99"
                   f" {result['latency_ms']['session']['p50']:.1f}/{result['latency_ms']['session']['p99']:.1f} ms,"
                   f" errors {result['errors']}, generator CPU {result.get('client_cpu_pct_of_one_core')}%"
                   " of one core",
                   f"- sessions served per process (session end lines): {served}",
                   f"- server CPU ms per session, all processes: {1000 * sum(cpu.values()) / total_sessions:.3f}", ""]
        for pid in pids:
            role = "master" if pid == server.pid and args.workers > 1 else "worker"
            report.append(f"## {role} {pid}: {cpu[pid]:.2f} s CPU,"
                          f" {1000 * cpu[pid] / total_sessions:.3f} ms per session (of all sessions)")
            if pid in accepts:
                report += ["", f"accept4 and epoll_wait calls (perf, after the warm-up): {accepts[pid]}"]
            raw_path = workdir / f"{pid}.raw"
            if raw_path.exists():
                raw = raw_path.read_text()
                samples, own, inclusive, watched = summarise(raw, args.top)
                report += ["", f"{samples} samples (idle excluded). Own:", ""]
                report += [f"    {100 * n / max(samples, 1):5.1f}%  {f}" for f, n in own]
                report += ["", "Inclusive:", ""]
                report += [f"    {100 * n / max(samples, 1):5.1f}%  {f}" for f, n in inclusive]
                report += ["", "Watched (inclusive):", ""]
                report += [f"    {100 * watched[f] / max(samples, 1):5.1f}%  {f}" for f in WATCH]
                if args.keep:
                    RESULTS.mkdir(exist_ok=True)
                    shutil.copy(raw_path, RESULTS / f"{dt.datetime.now():%Y%m%d-%H%M%S}-profile-{role}-{pid}.raw")
            report.append("")
    text = "\n".join(report)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
