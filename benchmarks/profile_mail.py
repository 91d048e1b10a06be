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
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

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


def serve_argv(config: Path, out: Path) -> list[str]:
    """twistd under cProfile, in this interpreter (the profile is written when it stops)."""
    code = SERVE.replace("sys.argv_out", repr(str(out)))
    return [sys.executable, "-c", code, "-", "-n", "--pidfile=", "--logfile=/dev/null",
            "saslsmtp", "--config", str(config)]


def print_stats(path: Path, top: int) -> None:
    stats = pstats.Stats(str(path))
    stats.strip_dirs()
    print(f"\n## top {top} by own time (tottime)\n")
    stats.sort_stats("tottime").print_stats(top)
    print(f"\n## top {top} by cumulative time\n")
    stats.sort_stats("cumulative").print_stats(top)


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
    bargs = bench.parse_args(["--mode", "mail", "--no-save"])
    raw = Path(tempfile.gettempdir()) / "saslsmtp-mail-spy.txt"
    with tempfile.TemporaryDirectory(prefix="saslsmtp-profile-") as tmp:
        workdir = Path(tmp)
        port = bench.free_port()
        config = bench.generated_config(port, workdir, bargs)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(bench.REPO), env.get("PYTHONPATH")]))
        argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
                "--pidfile=", "--logfile=/dev/null", "saslsmtp", "--config", str(config)]
        server = bench.Server("saslsmtp", argv, port, workdir, env, "twistd saslsmtp")
        with bench.running([server]):
            gen = [sys.executable, str(bench.LOADGEN), "--host", "127.0.0.1", "--port", str(port),
                   "--mech", "PLAIN", "--mode", "mail", "--user", bargs.user,
                   "--password", bargs.password, "--concurrency", str(args.concurrency),
                   "--duration", str(args.duration), "--warmup", "0", "--json"]
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
    args = p.parse_args()
    if args.py_spy:
        return spy(args)
    if args.stats:
        print_stats(args.stats, args.top)
        return 0
    bargs = bench.parse_args(["--mode", "mail", "--no-save"])
    with tempfile.TemporaryDirectory(prefix="saslsmtp-profile-") as tmp:
        workdir = Path(tmp)
        port = bench.free_port()
        config = bench.generated_config(port, workdir, bargs)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(bench.REPO), env.get("PYTHONPATH")]))
        server = bench.Server("saslsmtp", serve_argv(config, args.out.resolve()), port, workdir,
                              env, "twistd saslsmtp under cProfile")
        with bench.running([server]):
            gen = [sys.executable, str(bench.LOADGEN), "--host", "127.0.0.1", "--port", str(port),
                   "--mech", "PLAIN", "--mode", "mail", "--user", bargs.user,
                   "--password", bargs.password, "--concurrency", str(args.concurrency),
                   "--duration", str(args.duration), "--warmup", "0.5", "--json"]
            before = bench.process_cpu_s(server.pid)
            done = subprocess.run(gen, capture_output=True, text=True, timeout=args.duration + 120)
            used = bench.process_cpu_s(server.pid) - before
            result = json.loads(done.stdout)
            served = result["sessions_measured"] + result["sessions_warmup"]
            stored = len(os.listdir(workdir / "mail" / "new"))
            assert server.proc is not None
            server.proc.send_signal(signal.SIGTERM)  # an orderly stop writes the profile
            server.proc.wait(timeout=30)
        print(f"sessions {served}, errors {result['errors']}, {result['handshakes_per_s']:.0f} hs/s"
              f" (under cProfile), server CPU {1000 * used / max(served, 1):.3f} ms/session"
              f" (all threads, profiler included), messages in new/: {stored}")
    print_stats(args.out, args.top)
    return 0 if done.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
