#!/usr/bin/env python3
"""Where the mail path's CPU goes: the real daemon (``twistd saslsmtp``, the config
``run.py --mode mail`` generates, Maildir delivery) under cProfile while the load
generator sends AUTH + a ~2 KB message per session.

    flock /tmp/saslsmtp-bench.lock python3 benchmarks/profile_mail.py            # C=16, 5 s
    flock /tmp/saslsmtp-bench.lock python3 benchmarks/profile_mail.py -c 16 -d 8 --top 40
    python3 benchmarks/profile_mail.py --stats /tmp/mail.prof   # print a saved profile again

cProfile sees the reactor thread only (the Maildir's write/fsync/rename run in the
delivery thread pool); the server's whole CPU (all threads, from ``/proc``) is printed
next to it, per session.  cProfile slows small functions more than big ones, so read the
ranking, not the absolute times.  Prints the top functions by own time and by
cumulative time, and saves the raw profile (``--out``) for ``pstats``/snakeviz.

    flock /tmp/saslsmtp-bench.lock python3 benchmarks/profile_mail.py --py-spy -d 8

``--py-spy`` runs the daemon without cProfile and samples every thread with ``py-spy
record --format raw --threads`` instead (needs py-spy): the CPU per session of each thread
(``/proc/PID/task``: the reactor thread and the delivery threads, user and system) and
the samples split into the parts of a session (``BUCKETS``: a sample counts for the
first bucket whose frame is on its stack, innermost first).

    flock /tmp/saslsmtp-bench.lock python3 benchmarks/profile_mail.py --perf -d 6

``--perf`` records the daemon's kernel and C stacks with ``perf record -g`` (root, perf
installed) and prints the share of the process's CPU under a few kernel entry points
(``PERF_SYMBOLS``): the Maildir's syscalls, the sockets' and epoll's, and the futex calls
of the GIL hand-offs between the reactor and the delivery thread.  py-spy counts a thread
blocked in ``fsync`` as busy; perf counts CPU only.

    flock /tmp/saslsmtp-bench.lock python3 benchmarks/profile_mail.py --batches -d 5

``--batches`` times the Maildir's group commit inside the daemon (``BATCH_TIMING``
wraps ``GroupCommit`` and its passes before twistd starts): messages per batch, how long
the oldest message of a batch waited for it to start, the batch job's wall time split by
pass and its thread's CPU, and how long each message waited from its final dot to the
batch's answer on the reactor (the part of the session the 250 waits for).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pstats
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run as bench  # noqa: E402  (benchmarks/run.py: config, server, CPU reading)

SERVE = """
import cProfile, signal, sys
profile = cProfile.Profile()
from twisted.scripts.twistd import run
sys.argv = ["twistd"] + sys.argv[2:]
profile.enable()
try:
    run()
finally:
    profile.disable()
    profile.dump_stats(sys.argv_out)
"""


def print_stats(path: Path, top: int) -> None:
    stats = pstats.Stats(str(path))
    stats.strip_dirs()
    print(f"\n## top {top} by own time (tottime)\n")
    stats.sort_stats("tottime").print_stats(top)
    print(f"\n## top {top} by cumulative time\n")
    stats.sort_stats("cumulative").print_stats(top)


BATCH_TIMING = """
import atexit, json, statistics, sys, time
from saslsmtp import delivery
stats = {"batches": [], "waits": [], "passes": {}}

def timed(name, f):
    def step(*args):
        t = time.perf_counter()
        try:
            return f(*args)
        finally:
            stats["passes"][name] = stats["passes"].get(name, 0.0) + time.perf_counter() - t
    return step

delivery._PASSES = tuple(timed(f.__name__, f) for f in delivery._PASSES)
delivery.Maildir.sync_new = timed("sync_new", delivery.Maildir.sync_new)
submit, commit, done = (delivery.GroupCommit.submit, delivery.GroupCommit._commit,
                        delivery.GroupCommit._done)

def submit_(self, sink, data):
    sink._submitted = time.perf_counter()
    return submit(self, sink, data)

def commit_(self, jobs):
    t, c = time.perf_counter(), time.thread_time()
    try:
        return commit(self, jobs)
    finally:
        stats["batches"].append((len(jobs), t - min(j.sink._submitted for j in jobs),
                                 time.perf_counter() - t, time.thread_time() - c))

def done_(self, results, jobs):
    now = time.perf_counter()
    stats["waits"].extend(now - j.sink._submitted for j in jobs)
    return done(self, results, jobs)

delivery.GroupCommit.submit, delivery.GroupCommit._commit = submit_, commit_
delivery.GroupCommit._done = done_
atexit.register(lambda: open(OUT, "w").write(json.dumps(stats)))
from twisted.scripts.twistd import run
sys.argv = ["twistd"] + sys.argv[2:]
run()
"""


def print_batches(path: Path, served: int) -> None:
    """The group commit's timing, from what BATCH_TIMING saved."""
    import statistics
    stats = json.loads(path.read_text())
    batches = stats["batches"]
    if not batches:
        print("no batch committed")
        return
    ms = [1000 * b[2] for b in batches]
    messages = sum(b[0] for b in batches)
    waits = [1000 * w for w in stats["waits"]]
    print(f"{len(batches)} batches, {messages} messages ({served} sessions), "
          f"{messages / len(batches):.2f} per batch (max {max(b[0] for b in batches)})\n")
    print("| | median | mean |\n| --- | --- | --- |")
    print(f"| oldest message's wait for its batch to start, ms | "
          f"{statistics.median(1000 * b[1] for b in batches):.2f} | "
          f"{statistics.mean(1000 * b[1] for b in batches):.2f} |")
    print(f"| batch job, wall ms | {statistics.median(ms):.2f} | {statistics.mean(ms):.2f} |")
    print(f"| final dot -> 250 released on the reactor, ms | {statistics.median(waits):.2f} | "
          f"{statistics.mean(waits):.2f} |")
    print("\n| per batch | ms |\n| --- | --- |")
    for name, total in stats["passes"].items():
        print(f"| {name} | {1000 * total / len(batches):.2f} |")
    print(f"| batch thread's CPU | {1000 * sum(b[3] for b in batches) / len(batches):.2f} |")
    print(f"\nbatch thread CPU per message: {1000 * sum(b[3] for b in batches) / messages:.3f} ms")


@contextlib.contextmanager
def mail_daemon(args: argparse.Namespace, *, code: str = "from twisted.scripts.twistd import run; run()",
                code_args: tuple[str, ...] = (), what: str = "twistd saslsmtp",
                warmup: str = "0") -> Iterator[tuple[Any, list[str]]]:
    """The daemon as run.py runs it (mail mode, its own Maildir, started with ``code``),
    and the generator's command line for ``args``' concurrency and duration."""
    bargs = bench.parse_args(["--mode", "mail", "--no-save"])
    with tempfile.TemporaryDirectory(prefix="saslsmtp-profile-") as tmp:
        workdir = Path(tmp)
        port = bench.free_port()
        config = bench.generated_config(port, workdir, bargs)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(bench.REPO), env.get("PYTHONPATH")]))
        argv = [sys.executable, "-c", code, *code_args, "-n", "--pidfile=",
                "--logfile=/dev/null", "saslsmtp", "--config", str(config)]
        server = bench.Server("saslsmtp", argv, port, workdir, env, what)
        with bench.running([server]):
            yield server, [sys.executable, str(bench.LOADGEN), "--host", "127.0.0.1", "--port",
                           str(port), "--mech", "PLAIN", "--mode", "mail", "--user", bargs.user,
                           "--password", bargs.password, "--concurrency", str(args.concurrency),
                           "--duration", str(args.duration), "--warmup", warmup, "--json"]


def load_then_stop(server: Any, gen: list[str], args: argparse.Namespace
                   ) -> tuple[subprocess.CompletedProcess, dict[str, Any], int, float]:
    """Run the generator against ``server``, then stop it in order (SIGTERM: a profile or
    timings are written at exit): the run, its JSON, sessions served, server CPU seconds."""
    before = bench.process_cpu_s(server.pid)
    done = subprocess.run(gen, capture_output=True, text=True, timeout=args.duration + 120)
    used = bench.process_cpu_s(server.pid) - before
    result = json.loads(done.stdout)
    served = result["sessions_measured"] + result["sessions_warmup"]
    assert server.proc is not None
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(timeout=30)
    return done, result, served, used


def batches(args: argparse.Namespace) -> int:
    """The daemon with its group commit timed (BATCH_TIMING), under the generator's load."""
    out = Path(tempfile.gettempdir()) / "saslsmtp-mail-batches.json"
    out.unlink(missing_ok=True)
    with mail_daemon(args, code=BATCH_TIMING.replace("OUT", repr(str(out))), code_args=("-",),
                     what="twistd saslsmtp, batches timed", warmup="0.5") as (server, gen):
        done, result, served, used = load_then_stop(server, gen, args)  # the stop writes the timings
    print(f"sessions {served}, errors {result['errors']}, {result['handshakes_per_s']:.0f} hs/s,"
          f" session p50 {result['latency_ms']['session']['p50']} ms, server CPU"
          f" {1000 * used / max(served, 1):.3f} ms/session\n")
    print_batches(out, served)
    return 0 if done.returncode == 0 else 1


#: (bucket, frame-name fragments); a sample goes to the innermost frame that matches one.
BUCKETS: list[tuple[str, tuple[str, ...]]] = [
    ("log lines (formatting, writing)", ("emit (saslsmtp/sessionlogger.py", "info (twisted/logger",
                                         "failure (twisted/logger")),
    ("delivery: fsync (files)", ("_sync (saslsmtp/delivery.py", "_sync_files (saslsmtp/delivery.py")),
    ("delivery: fsync new/", ("sync_new (saslsmtp/delivery.py",)),
    ("delivery: rename", ("_publish (saslsmtp/delivery.py", "rename_new (saslsmtp/delivery.py")),
    ("delivery: create + write", ("_write_rest (saslsmtp/delivery.py", "_write (saslsmtp/delivery.py",
                                  "_write_files (saslsmtp/delivery.py")),
    ("delivery: rest of the batch job", ("_commit (saslsmtp/delivery.py",)),
    ("thread pool (hand-off, worker loop)", ("_worker (twisted/python/threadpool.py",
                                             "inContext (twisted/python/threadpool.py",
                                             "work (twisted/_threads/_threadworker.py")),
    ("250: batch done -> reply", ("_done (saslsmtp/delivery.py",)),
    ("body bytes (BodyReader, sink.write)", ("_body_bytes (saslsmtp/protocol.py",)),
    ("DATA (envelope, sink, Received)", ("do_DATA (saslsmtp/protocol.py",)),
    ("MAIL", ("do_MAIL (saslsmtp/protocol.py",)),
    ("RCPT", ("do_RCPT (saslsmtp/protocol.py",)),
    ("AUTH", ("do_AUTH (saslsmtp/protocol.py", "line (saslsmtp/smtpauth.py")),
    ("EHLO, QUIT, other commands", ("_command_line (saslsmtp/protocol.py",)),
    ("reply writes (doWrite, send)", ("doWrite (twisted/internet/abstract.py",)),
    ("connection setup (accept, buildProtocol, greeting)", ("doRead (twisted/internet/tcp.py:14",
                                                            "connectionMade (")),
    ("connection teardown", ("connectionLost (", "_closeWriteConnection", "readConnectionLost")),
    ("reading (recv, line framing)", ("doRead (twisted/internet/tcp.py", "feed (saslsmtp/lines.py")),
    ("reactor (poll, timers, thread calls)", ("mainLoop (twisted/internet/base.py",)),
]


#: kernel and libc symbols whose inclusive share --perf prints (label, symbol)
PERF_SYMBOLS = [
    ("futex (GIL hand-offs, thread pool queue)", "__x64_sys_futex"),
    ("  of which waking a waiter", "futex_wake"),
    ("send (replies)", "__x64_sys_sendto"),
    ("recv", "__x64_sys_recvfrom"),
    ("epoll_wait", "__x64_sys_epoll_wait"),
    ("epoll_ctl (start/stop writing)", "__x64_sys_epoll_ctl"),
    ("open (create in tmp/, new/ for its fsync)", "__x64_sys_openat"),
    ("  of which ext4 inode allocation", "__ext4_new_inode"),
    ("fsync (files and new/)", "__x64_sys_fsync"),
    ("sync_file_range (write-out started)", "__x64_sys_sync_file_range"),
    ("write (message files, log)", "__x64_sys_write"),
    ("rename", "__x64_sys_rename"),
    ("close", "__x64_sys_close"),
    ("accept", "__x64_sys_accept4"),
    ("shutdown", "__x64_sys_shutdown"),
]


def perf(args: argparse.Namespace) -> int:
    """The daemon under ``perf record -g``: CPU share under each PERF_SYMBOLS entry."""
    data = Path(tempfile.gettempdir()) / "saslsmtp-mail-perf.data"
    with mail_daemon(args) as (server, gen):
        load = subprocess.Popen(gen, stdout=subprocess.PIPE, text=True)
        subprocess.run(["perf", "record", "-g", "-o", str(data), "-p", str(server.pid), "--",
                        "sleep", str(max(1.0, args.duration - 2))], capture_output=True)
        out, _ = load.communicate(timeout=args.duration + 120)
        result = json.loads(out)
    report = subprocess.run(["perf", "report", "-i", str(data), "--children", "--sort", "symbol",
                             "--stdio", "-g", "none"], capture_output=True, text=True).stdout
    shares: dict[str, float] = {}
    for line in report.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[0].endswith("%") and fields[2] in ("[k]", "[.]"):
            shares.setdefault(fields[3], float(fields[0][:-1]))
    print(f"{result['handshakes_per_s']:.0f} hs/s, errors {result['errors']}\n")
    print("| kernel entry (all threads) | % of the daemon's CPU |\n| --- | --- |")
    for label, symbol in PERF_SYMBOLS:
        print(f"| {label} | {shares.get(symbol, 0.0):.1f} |")
    return 0 if load.returncode == 0 else 1


def thread_cpu(pid: int) -> dict[int, tuple[str, float, float]]:
    """tid -> (name, user s, system s) of every thread of ``pid``."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            raw = (task / "stat").read_text()
        except OSError:
            continue
        name = raw[raw.index("(") + 1:raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2:].split()
        out[int(task.name)] = (name, int(fields[11]) / bench.CLK_TCK, int(fields[12]) / bench.CLK_TCK)
    return out


def bucket_samples(raw: Path) -> tuple[int, dict[str, int]]:
    """Samples per bucket (``BUCKETS``) from py-spy's collapsed stacks."""
    counts: dict[str, int] = {name: 0 for name, _ in BUCKETS}
    counts["other"] = 0
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        for frame in reversed(stack.split(";")):
            hit = next((name for name, keys in BUCKETS if any(k in frame for k in keys)), None)
            if hit is not None:
                counts[hit] += n
                break
        else:
            counts["other"] += n
    return total, counts


def spy(args: argparse.Namespace) -> int:
    """The daemon as run.py runs it, sampled by py-spy, with CPU per thread."""
    raw = Path(tempfile.gettempdir()) / "saslsmtp-mail-spy.txt"
    with mail_daemon(args) as (server, gen):
        load = subprocess.Popen(gen, stdout=subprocess.PIPE, text=True)
        before = thread_cpu(server.pid)
        sampler = subprocess.Popen(
            ["py-spy", "record", "--pid", str(server.pid), "--format", "raw", "--output",
             str(raw), "--duration", str(max(1, int(args.duration) - 1)), "--rate", "200",
             "--threads", "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out, _ = load.communicate(timeout=args.duration + 120)
        after = thread_cpu(server.pid)
        sampler.wait(timeout=60)
        result = json.loads(out)
        served = result["sessions_measured"] + result["sessions_warmup"]
        print(f"sessions {served}, errors {result['errors']}, {result['handshakes_per_s']:.0f} hs/s"
              f" (py-spy sampling at 200 Hz)\n")
        print("| thread | user ms/session | system ms/session |\n| --- | --- | --- |")
        groups: dict[str, list[float]] = {}
        for tid, (name, user, system) in after.items():
            b_user, b_system = before.get(tid, (name, 0.0, 0.0))[1:]
            label = "reactor" if tid == server.pid else "delivery and other threads"
            acc = groups.setdefault(label, [0.0, 0.0])
            acc[0] += user - b_user
            acc[1] += system - b_system
        for label, (user, system) in groups.items():
            print(f"| {label} | {1000 * user / served:.3f} | {1000 * system / served:.3f} |")
        total, counts = bucket_samples(raw)
        print(f"\n{total} samples (threads on CPU; GIL waits and idle excluded)\n")
        print("| part of the session | % of samples |\n| --- | --- |")
        for name, n in sorted(counts.items(), key=lambda kv: -kv[1]):
            print(f"| {name} | {100 * n / max(total, 1):.1f} |")
    return 0 if load.returncode == 0 else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-c", "--concurrency", type=int, default=16)
    p.add_argument("-d", "--duration", type=float, default=5.0)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "saslsmtp-mail.prof")
    p.add_argument("--stats", type=Path, help="only print this saved profile")
    p.add_argument("--py-spy", action="store_true", help="sample all threads with py-spy instead")
    p.add_argument("--batches", action="store_true", help="time the group commit's batches instead")
    p.add_argument("--perf", action="store_true", help="perf record -g the daemon instead (root)")
    args = p.parse_args()
    if args.perf:
        return perf(args)
    if args.py_spy:
        return spy(args)
    if args.batches:
        return batches(args)
    if args.stats:
        print_stats(args.stats, args.top)
        return 0
    code = SERVE.replace("sys.argv_out", repr(str(args.out.resolve())))
    with mail_daemon(args, code=code, code_args=("-",), what="twistd saslsmtp under cProfile",
                     warmup="0.5") as (server, gen):
        done, result, served, used = load_then_stop(server, gen, args)  # the stop writes the profile
        stored = len(os.listdir(server.cwd / "mail" / "new"))
    print(f"sessions {served}, errors {result['errors']}, {result['handshakes_per_s']:.0f} hs/s"
          f" (under cProfile), server CPU {1000 * used / max(served, 1):.3f} ms/session"
          f" (all threads, profiler included), messages in new/: {stored}")
    print_stats(args.out, args.top)
    return 0 if done.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
