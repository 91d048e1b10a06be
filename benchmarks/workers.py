#!/usr/bin/env python3
"""saslsmtp with ``workers = 2`` against ``workers = 1``, in one run, same generator.

    python3 benchmarks/workers.py                        # AUTH PLAIN, concurrency 64
    python3 benchmarks/workers.py --generator both       # C generator, then Python, in turn
    python3 benchmarks/workers.py --scheme sha512-crypt  # hashed passwords (libcrypt)
    python3 benchmarks/workers.py -c 16 --duration 10 --repeat 3
    python3 benchmarks/workers.py --code /tmp/old   # another commit's code (git archive)
    python3 benchmarks/workers.py --generator python --generator-processes 2

For each repeat it starts the real daemon (``twistd -n saslsmtp --workers N``) with
N = 1 and N = 2 (alternating which goes first), runs the load generator against it
(fresh TCP session per handshake: EHLO, AUTH PLAIN, QUIT) and reads the CPU all the
server's processes used (the master and its workers, from /proc) and their context
switches.  The generator is ``smtp_load.c`` (C, epoll; built with ``cc`` on first use,
``c_loadgen.py``) when it compiles, else ``smtp_auth_load.py``: the Python one costs
about as much CPU per session as the server, and on a 2-core machine it takes the core
a second worker would use.  The median repeat by handshakes/s is reported per
generator: handshakes/s, session and AUTH p50/p99, the ratio workers=2 / workers=1, and
how the sessions spread over the workers (their ``session end`` lines in the log file
and its rotated pieces).  Results go to benchmarks/results/<date>-workers-<label>.md
and .json, and the table to stdout.
"""

from __future__ import annotations

import argparse
import datetime as dt
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import c_loadgen  # noqa: E402
from run import (LOADGEN, REPO, RESULTS, BenchError, Server, bench_toml, free_port,  # noqa: E402
                 git_commit, process_cpu_s, process_family)

USER, PASSWORD = "bench", "benchpass"


def users_line(scheme: str) -> str:
    if scheme == "plain":
        return f"{USER}:{{PLAIN}}{PASSWORD}"
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt  # the system libcrypt, as saslsmtp-passwd would hash it
    return f"{USER}:{{SHA512-CRYPT}}{crypt.crypt(PASSWORD, crypt.mksalt(crypt.METHOD_SHA512, rounds=5000))}"


def write_config(workdir: Path, port: int, scheme: str) -> Path:
    (workdir / "users").write_text(users_line(scheme) + "\n")
    config = workdir / "saslsmtp.toml"
    config.write_text(bench_toml(f"tcp:{port}:interface=127.0.0.1",
                                 origin="benchmarks/workers.py"))
    return config


def cpu_of(pids: list[int]) -> float:
    return sum(v for v in (process_cpu_s(p) for p in pids) if v == v)


def switches_of(pids: list[int]) -> int:
    """Voluntary + involuntary context switches of ``pids`` (all their threads) so far."""
    total = 0
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                status = (task / "status").read_text()
            except OSError:
                continue
            total += sum(int(v) for v in re.findall(r"_ctxt_switches:\s+(\d+)", status))
    return total


def sessions_per_worker(log: Path) -> list[int]:
    """Sessions each worker ended (``session end`` lines, ``worker=PID`` in text logs), over
    the log file and its rotated pieces, largest first."""
    counts: collections.Counter[str] = collections.Counter()
    for piece in log.parent.glob(log.name + "*"):
        for line in piece.read_text(errors="replace").splitlines():
            if "session end" in line:
                m = re.search(r"worker=(\d+)", line)
                counts[m.group(1) if m else "-"] += 1
    return sorted(counts.values(), reverse=True)


def generator_command(generator: str, port: int, args: argparse.Namespace) -> list[str]:
    """argv of the load: the C generator (``smtp_load.c``) or ``smtp_auth_load.py``."""
    if generator == "c":
        return c_loadgen.command(port, USER, PASSWORD, args.concurrency, args.duration,
                                 args.warmup)
    load = [sys.executable, str(LOADGEN), "--port", str(port), "--mech", "PLAIN",
            "--user", USER, "--password", PASSWORD, "--concurrency", str(args.concurrency),
            "--duration", str(args.duration), "--warmup", str(args.warmup), "--json"]
    if getattr(args, "generator_processes", 1) > 1:
        load += ["--processes", str(args.generator_processes)]
    return load


def default_generator() -> str:
    """``c`` when smtp_load.c compiles here, else ``python`` (and why, on stderr)."""
    try:
        c_loadgen.build()
    except c_loadgen.NoCompiler as e:
        print(f"workers.py: using the Python generator: {e}", file=sys.stderr)
        return "python"
    return "c"


def one_run(workers: int, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="saslsmtp-workers-bench-") as tmp:
        workdir = Path(tmp)
        port = free_port()
        config = write_config(workdir, port, args.scheme)
        log = workdir / "twistd.log"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            filter(None, [str(getattr(args, "code", None) or REPO), os.environ.get("PYTHONPATH")])))
        argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
                "--pidfile=", f"--logfile={log}", "saslsmtp", "--config", str(config),
                "--workers", str(workers)]
        server = Server(f"saslsmtp-workers-{workers}", argv, port, workdir, env)
        try:
            server.start()
            deadline = time.monotonic() + 30
            while log.read_text(errors="replace").count("saslsmtp ready") < workers:
                if time.monotonic() > deadline:
                    raise BenchError(f"{workers} workers did not all start:\n{server.output_tail()}")
                time.sleep(0.1)
            pids = process_family(server.pid)
            cpu_before = cpu_of(pids)
            switches_before = switches_of(pids)
            master_before = cpu_of([server.pid])
            load = generator_command(getattr(args, "generator", "python"), port, args)
            done = subprocess.run(load, capture_output=True, text=True,
                                  timeout=args.warmup + args.duration + 90)
            cpu_used = cpu_of(pids) - cpu_before
            switches_after = switches_of(pids)
            master_used = cpu_of([server.pid]) - master_before
            result = json.loads(done.stdout)
        finally:
            server.stop()
        spread = sessions_per_worker(log)
        served = result["sessions_measured"] + result["sessions_warmup"]
        return {
            "workers": workers, "processes": len(pids), "status": done.returncode,
            "errors": result["errors"], "handshakes_per_s": result["handshakes_per_s"],
            "session_ms": result["latency_ms"]["session"], "auth_ms": result["latency_ms"]["auth"],
            "sessions": result["sessions_measured"],
            "sessions_warmup": result["sessions_warmup"],
            "server_cpu_ms_per_session": round(1000 * cpu_used / served, 3) if served else None,
            "server_cpu_s": round(cpu_used, 2),
            "master_cpu_ms_per_session": round(1000 * master_used / served, 3)
            if served and workers > 1 else None,
            "sessions_per_worker": spread,
            "generator": getattr(args, "generator", "python"),
            "generator_cpu_pct": result.get("client_cpu_pct_of_one_core"),
            "generator_cpu_ms_per_session": round(1000 * result["client_cpu_s"] / served, 4)
            if served and result.get("client_cpu_s") is not None else None,
            "ctx_switches_per_session": round((switches_after - switches_before) / served, 2)
            if served else None,
        }


def median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ordered = sorted(runs, key=lambda r: r["handshakes_per_s"] or 0.0)
    return ordered[(len(ordered) - 1) // 2]


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split(" ", 3)[:3].__str__()


def section(runs: list[dict[str, Any]], generator: str) -> tuple[list[str], float | None]:
    """The markdown of one generator's runs, and its handshakes/s ratio (2 / 1)."""
    best = {n: median([r for r in runs if r["workers"] == n]) for n in (1, 2)}
    one, two = best[1], best[2]
    ratio = two["handshakes_per_s"] / one["handshakes_per_s"] if one["handshakes_per_s"] else None
    name = GENERATORS[generator]
    lines = [f"## Generator: {name}", "",
             "| workers | handshakes/s | session p50 / p99 ms | AUTH p50 / p99 ms |"
             " server CPU ms/session (master) | generator CPU % (ms/session) |"
             " sessions per worker | errors |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in (one, two):
        master = r.get("master_cpu_ms_per_session")
        lines.append(f"| {r['workers']} | {r['handshakes_per_s']:.1f} |"
                     f" {r['session_ms']['p50']:.1f} / {r['session_ms']['p99']:.1f} |"
                     f" {r['auth_ms']['p50']:.1f} / {r['auth_ms']['p99']:.1f} |"
                     f" {r['server_cpu_ms_per_session']} ({'-' if master is None else master}) |"
                     f" {r['generator_cpu_pct']} ({r.get('generator_cpu_ms_per_session')}) |"
                     f" {r.get('sessions_per_worker')} | {r['errors']} |")
    lines += ["", f"**handshakes/s ratio (2 / 1) with the {generator} generator: {ratio:.2f}**"
              if ratio else "", "", "Every run:", "",
              "| workers | handshakes/s | session p99 ms | server CPU ms/session |"
              " context switches/session | status |", "| --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        lines.append(f"| {r['workers']} | {r['handshakes_per_s']:.1f} | {r['session_ms']['p99']:.1f} |"
                     f" {r['server_cpu_ms_per_session']} | {r.get('ctx_switches_per_session')} |"
                     f" {r['status']} |")
    return lines + [""], ratio


GENERATORS = {"c": "C (smtp_load.c, epoll)", "python": "Python (smtp_auth_load.py, asyncio)"}


def markdown(runs: list[dict[str, Any]], meta: dict[str, Any]) -> tuple[str, dict[str, float | None]]:
    lines = [f"# workers = 2 vs workers = 1 — {meta['date']}", "",
             f"- AUTH PLAIN, concurrency {meta['concurrency']}, {meta['warmup']} s warm-up +"
             f" {meta['duration']} s per run, {meta['repeat']} runs each (alternating order),"
             f" median run by handshakes/s; users file scheme: {meta['scheme']}.",
             f"- {meta['cpus']} CPUs; load average before: {meta['loadavg_before']}, after:"
             f" {meta['loadavg_after']}; commit {meta['commit']}; code served:"
             f" {meta['code']}; generator(s): {', '.join(GENERATORS[g] for g in meta['generators'])}"
             f" (Python generator processes: {meta['generator_processes']}).", ""]
    ratios = {}
    for generator in meta["generators"]:
        text, ratios[generator] = section([r for r in runs if r["generator"] == generator], generator)
        lines += text
    return "\n".join(lines), ratios


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--concurrency", type=int, default=64)
    parser.add_argument("-d", "--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--scheme", choices=("plain", "sha512-crypt"), default="plain")
    parser.add_argument("--label", default="plain-c64")
    parser.add_argument("--code", type=Path, help="serve the saslsmtp package found in this directory")
    parser.add_argument("--generator", choices=("c", "python", "both"),
                        help="load generator: c (smtp_load.c, built with cc on first use),"
                             " python (smtp_auth_load.py), or both in turn (default: c if it"
                             " compiles, else python)")
    parser.add_argument("--generator-processes", type=int, default=1,
                        help="smtp_auth_load.py --processes (generator processes sharing the concurrency)")
    args = parser.parse_args(argv)
    if args.generator is None:
        args.generator = default_generator()
    generators = ["c", "python"] if args.generator == "both" else [args.generator]
    if "c" in generators:
        try:
            c_loadgen.build()
        except c_loadgen.NoCompiler as e:
            print(f"benchmark failed: {e}", file=sys.stderr)
            return 2
    meta = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
            "concurrency": args.concurrency, "duration": args.duration, "warmup": args.warmup,
            "repeat": args.repeat, "scheme": args.scheme, "cpus": os.cpu_count(),
            "loadavg_before": loadavg(), "commit": git_commit(),
            "code": str(args.code or "this checkout"), "generators": generators,
            "generator_processes": args.generator_processes}
    runs = []
    try:
        for i in range(args.repeat):
            for generator in (generators if i % 2 == 0 else generators[::-1]):
                args.generator = generator
                for workers in ((1, 2) if i % 2 == 0 else (2, 1)):
                    runs.append(one_run(workers, args))
                    print(json.dumps({k: runs[-1][k] for k in ("generator", "workers",
                                                               "handshakes_per_s", "errors")}),
                          file=sys.stderr)
    except BenchError as e:
        print(f"benchmark failed: {e}", file=sys.stderr)
        return 2
    meta["loadavg_after"] = loadavg()
    text, ratios = markdown(runs, meta)
    meta["ratios"] = ratios
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}-workers-{args.label}"
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=2) + "\n")
    print(text)
    return 0 if all(r["status"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
