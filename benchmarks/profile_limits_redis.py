#!/usr/bin/env python3
"""Where the server's CPU goes with every limit on in Redis: twistd saslsmtp under
cProfile (twistd's own ``--profiler=cprofile``), AUTH PLAIN at concurrency 16, then the
top functions by own time and by cumulative time.

    flock /tmp/saslsmtp-bench.lock python3 benchmarks/profile_limits_redis.py [--store memory|off]
    flock /tmp/saslsmtp-bench.lock python3 benchmarks/profile_limits_redis.py --only redis-auth

Same server, load and limits as benchmarks/limits_cpu.py.
"""

from __future__ import annotations

import argparse
import pstats
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import limits_cpu  # noqa: E402
import run as bench  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", choices=["redis", "memory", "off"], default="redis")
    parser.add_argument("--only", choices=sorted(limits_cpu.SPLIT),
                        help="with --store redis: only the connection or only the AUTH limits")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--top", type=int, default=35)
    parser.add_argument("--save", help="also keep the raw profile here (pstats format)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="saslsmtp-profile-limits-") as tmp:
        root = Path(tmp)
        redis, port = limits_cpu.start_redis(root)
        try:
            store = f'"redis://127.0.0.1:{port}/0"' if args.store == "redis" else '"memory"'
            fragment: Path | None = root / "limits.toml"
            if args.store == "off":  # the baseline: no [limits] at all
                fragment = None
            else:
                limits = limits_cpu.SPLIT[args.only] if args.only else limits_cpu.ALL_LIMITS
                fragment.write_text(limits.format(store=store))
            ns = limits_cpu.namespace(argparse.Namespace(duration=args.duration, warmup=1.0,
                                                         generator="python"),
                                      fragment)
            server = bench.saslsmtp_server(root, ns)
            out = root / "server.prof"
            at = server.argv.index("-n")
            server.argv[at:at] = [f"--profile={out}", "--profiler=cprofile", "--savestats"]
            with bench.running([server]):
                m = bench.measure(server, "PLAIN", 16, 0, ns)
                print(f"{m.server_cpu_ms_per_session} ms CPU/session under the profiler,"
                      f" {m.sessions} sessions", file=sys.stderr)
            if args.save:
                Path(args.save).write_bytes(out.read_bytes())
                Path(args.save + ".sessions").write_text(str(m.sessions))
            stats = pstats.Stats(str(out))
            stats.sort_stats("tottime").print_stats(args.top)
            stats.sort_stats("cumulative").print_stats(args.top)
        finally:
            redis.kill()
            redis.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
