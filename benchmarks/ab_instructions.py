#!/usr/bin/env python3
"""A/B in instructions: two checkouts of saslsmtp under valgrind's callgrind, the same
config and a counted load, reporting the instructions (Ir) the daemon executes per
session.

CPU time on a shared VM drifts by tens of percent between rounds seconds apart, so
``ab.py`` needs many rounds to see a change of a few percent, and two of its runs can
disagree on the sign.  The instructions a session makes the daemon execute move little
(within about 1 % between repeats): a change on the hot path shows as what it is.  They are not
CPU time: the kernel's work (sockets, epoll) is not counted, nor cache misses or
preemption, so a share of instructions is not a share of CPU.  Use it to judge a change,
and ``ab.py`` or ``limits_cpu.py`` for what the change costs in CPU.

    python3 benchmarks/ab_instructions.py OLD [NEW] [--count 400] [--repeats 3]
        [--old-config-fragment F] [run.py's options, e.g. --config-fragment F]

``NEW`` defaults to this checkout.  ``--old-config-fragment`` gives the old daemon its own
fragment (``""``: none), which compares one checkout with and without a feature.  Each
repeat, per daemon (order alternating): 100 sessions to warm up (``--warmup-sessions``),
instrumentation on and the counters zeroed (``callgrind_control -i on``, ``-z``),
``--count`` sessions at concurrency 16, a dump (``-d``), instrumentation off; the dump's
total over the sessions.  The daemons start and warm up uninstrumented (several times
faster); measured, valgrind runs Python 50-100 times slower: about 40 s per 1,000
sessions.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import ab  # noqa: E402  (benchmarks/ab.py)
import run as bench  # noqa: E402  (benchmarks/run.py)

START_TIMEOUT = 300.0  # seconds for a daemon to greet under valgrind
LOAD_TIMEOUT = 1800.0


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, argparse.Namespace,
                                                 argparse.Namespace]:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Other options are run.py's configuration options (-c is 16).")
    ab.add_checkout_arguments(p, "results file label")
    p.add_argument("--count", type=int, default=400, help="sessions measured per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup-sessions", type=int, default=100,
                   help="sessions run before the counters are zeroed, each repeat")
    p.add_argument("--old-config-fragment", default=None,
                   help="the old daemon's own config fragment ('' for none)")
    own, rest = p.parse_known_args(argv)
    ab.check_checkouts(p, own)
    if own.count < 1 or own.repeats < 1 or own.warmup_sessions < 0:
        p.error("--count and --repeats must be 1 or more, --warmup-sessions 0 or more")
    load = bench.parse_args(rest + ["-c", "16"])
    if own.old_config_fragment is None:
        old_load = load
    else:
        kept = [a for i, a in enumerate(rest) if a != "--config-fragment"
                and (i == 0 or rest[i - 1] != "--config-fragment")]
        fragment = ["--config-fragment", own.old_config_fragment] if own.old_config_fragment else []
        old_load = bench.parse_args(kept + fragment + ["-c", "16"])
    return own, load, old_load


def missing_tools() -> list[str]:
    return [tool for tool in ("valgrind", "callgrind_control") if shutil.which(tool) is None]


def under_callgrind(server: bench.Server, dumps: Path) -> None:
    """Run ``server`` under callgrind, its dumps in ``dumps`` (one folder per daemon)."""
    dumps.mkdir()
    server.argv[0:0] = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                        f"--callgrind-out-file={dumps}/callgrind.%p"]


def total_instructions(dump: Path) -> int:
    """The ``totals:`` (or ``summary:``) line of a callgrind dump: instructions executed."""
    for line in dump.read_text(errors="replace").splitlines():
        if line.startswith(("totals:", "summary:")):
            return int(line.split()[1])
    raise bench.BenchError(f"{dump}: no totals line")


def run_load(server: bench.Server, load: argparse.Namespace, count: int) -> None:
    argv = [sys.executable, str(HERE / "smtp_auth_load.py"), "--port", str(server.port),
            "--user", load.user, "--password", load.password, "-c", "16", "--count", str(count),
            "--json"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=LOAD_TIMEOUT)
    try:
        errors = json.loads(done.stdout)["errors"]
    except (json.JSONDecodeError, KeyError):
        raise bench.BenchError(f"{server.name}: load generator said {done.stderr.strip()[-300:]!r}")
    if done.returncode != 0 or errors:
        raise bench.BenchError(f"{server.name}: {errors} of {count} sessions failed")


def control(*argv: str) -> None:
    subprocess.run(["callgrind_control", *argv], capture_output=True, check=True, timeout=120)


def measure(server: bench.Server, load: argparse.Namespace, count: int, warmup: int,
            dumps: Path) -> float:
    """Instructions per session: warm up, zero the counters, ``count`` sessions, dump."""
    assert server.proc is not None
    pid = str(server.proc.pid)
    if warmup:
        run_load(server, load, warmup)
    control("-i", "on", pid)  # instrumented from here only: the start and warm-up run faster
    control("-z", pid)
    run_load(server, load, count)
    before = set(dumps.iterdir())
    control("-d", pid)
    control("-i", "off", pid)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        new = sorted(set(dumps.iterdir()) - before, key=lambda p: p.stat().st_mtime)
        if new:
            time.sleep(0.5)  # written whole
            return total_instructions(new[-1]) / count
        time.sleep(0.2)
    raise bench.BenchError(f"{server.name}: no callgrind dump after 60 s")


def report(own: argparse.Namespace, load: argparse.Namespace, old_load: argparse.Namespace,
           started: dt.datetime, servers: list[bench.Server], ir: dict[str, list[float]]) -> str:
    old, new = ir["old"], ir["new"]
    m_old, m_new = statistics.median(old), statistics.median(new)

    def fragments(args: argparse.Namespace) -> str:
        return ", ".join(f"`{f}`" for f in args.config_fragment) or "none"
    lines = [
        f"# A/B in instructions: {servers[1].description} against {servers[0].description}",
        "",
        f"{started:%Y-%m-%d %H:%M %Z}, `benchmarks/ab_instructions.py`: AUTH PLAIN, C = 16, "
        f"{own.count} sessions per repeat after {own.warmup_sessions} to warm up, each daemon "
        "under valgrind's callgrind, instructions executed by the daemon per session "
        f"(the kernel's work not counted). Config fragments: old {fragments(old_load)}, "
        f"new {fragments(load)}.",
        "",
        "| repeat | old Ir/session | new Ir/session | new vs old |",
        "| --- | --- | --- | --- |",
    ]
    for i, (o, n) in enumerate(zip(old, new), 1):
        lines.append(f"| {i} | {o:,.0f} | {n:,.0f} | {100.0 * (n - o) / o:+.2f}% |")
    lines += [f"| median | {m_old:,.0f} | {m_new:,.0f} | **{100.0 * (m_new - m_old) / m_old:+.2f}%** |",
              ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    own, load, old_load = parse_args(argv)
    missing = missing_tools()
    if missing:
        print(f"ab_instructions.py: {' and '.join(missing)} not found (Debian: apt-get install"
              " valgrind)", file=sys.stderr)
        return 1
    started = dt.datetime.now().astimezone()
    ir: dict[str, list[float]] = {"old": [], "new": []}
    try:
        with tempfile.TemporaryDirectory(prefix="saslsmtp-ab-instructions-") as tmp:
            servers = [ab.daemon("old", own.old.resolve(), Path(tmp), old_load),
                       ab.daemon("new", own.new.resolve(), Path(tmp), load)]
            dumps = {s.name: Path(tmp) / f"{s.name}-dumps" for s in servers}
            for server in servers:
                under_callgrind(server, dumps[server.name])
            with bench.running(servers, timeout=START_TIMEOUT):
                for index in range(own.repeats):
                    for server in servers if index % 2 == 0 else servers[::-1]:
                        ir[server.name].append(measure(server, load, own.count, own.warmup_sessions,
                                                      dumps[server.name]))
                    print(f"repeat {index + 1}/{own.repeats}: old {ir['old'][-1]:,.0f},"
                          f" new {ir['new'][-1]:,.0f} instructions per session",
                          file=sys.stderr, flush=True)
    except (bench.BenchError, subprocess.SubprocessError) as e:
        print(f"ab_instructions.py: {e}", file=sys.stderr)
        return 1
    ab.publish(report(own, load, old_load, started, servers, ir),
               None if own.no_save else load.results_dir, started,
               "ab-instructions" + ("-" + own.label if own.label else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
