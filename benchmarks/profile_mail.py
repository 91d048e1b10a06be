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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-c", "--concurrency", type=int, default=16)
    p.add_argument("-d", "--duration", type=float, default=5.0)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "saslsmtp-mail.prof")
    p.add_argument("--stats", type=Path, help="only print this saved profile")
    args = p.parse_args()
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
