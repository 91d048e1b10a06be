#!/usr/bin/env python3
"""The C generator (``smtp_load.c``) against the Python one (``smtp_auth_load.py``).

    flock /tmp/saslsmtp-bench.lock python3 benchmarks/generators.py [-c 16] [-d 5] [--repeat 3]

Both drive AUTH PLAIN sessions against the same server, in turn (the order alternating
every repeat): the null server (``null_smtp_server.py``) and the real daemon
(``workers = 1``, the generated bench config).  For each it reports handshakes/s, errors,
the generator's CPU per session (getrusage, warm-up sessions included) and the server's
(/proc).  Then one short run of each with a wrong password, which must count errors.
Results go to benchmarks/results/<date>-generators.md and .json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import c_loadgen  # noqa: E402
from run import (LOADGEN, NULL_SERVER, REPO, RESULTS, Server, bench_toml,  # noqa: E402
                 free_port, git_commit)

USER, PASSWORD = "bench", "benchpass"


def start_server(kind: str, workdir: Path) -> Server:
    port = free_port()
    if kind == "null":
        argv = [sys.executable, str(NULL_SERVER), "--port", str(port)]
        server = Server("null", argv, port, workdir)
    else:
        (workdir / "users").write_text(f"{USER}:{{PLAIN}}{PASSWORD}\n")
        config = workdir / "saslsmtp.toml"
        config.write_text(bench_toml(f"tcp:{port}:interface=127.0.0.1",
                                     origin="benchmarks/generators.py"))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
                "--pidfile=", "--logfile=twistd.log", "saslsmtp", "--config", str(config)]
        server = Server("saslsmtp", argv, port, workdir, env)
    server.start()
    return server


def load(generator: str, port: int, args: argparse.Namespace, password: str = PASSWORD,
         duration: float | None = None) -> dict[str, Any]:
    duration = duration or args.duration
    if generator == "c":
        argv = c_loadgen.command(port, USER, password, args.concurrency, duration, args.warmup)
    else:
        argv = [sys.executable, str(LOADGEN), "--port", str(port), "--mech", "PLAIN",
                "--user", USER, "--password", password, "--concurrency", str(args.concurrency),
                "--duration", str(duration), "--warmup", str(args.warmup), "--json"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 90)
    result = json.loads(done.stdout)
    result["status"] = done.returncode
    return result


def one(server: Server, generator: str, args: argparse.Namespace) -> dict[str, Any]:
    before = server.cpu_s()
    r = load(generator, server.port, args)
    served = r["sessions_measured"] + r["sessions_warmup"]
    return {"server": server.name, "generator": generator, "status": r["status"],
            "handshakes_per_s": r["handshakes_per_s"], "errors": r["errors"],
            "session_p50_ms": r["latency_ms"]["session"]["p50"],
            "session_p99_ms": r["latency_ms"]["session"]["p99"],
            "generator_cpu_ms_per_session": round(1000 * r["client_cpu_s"] / served, 4),
            "generator_cpu_pct": r["client_cpu_pct_of_one_core"],
            "server_cpu_ms_per_session": round(1000 * (server.cpu_s() - before) / served, 4)}


def median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return sorted(runs, key=lambda r: r["handshakes_per_s"])[(len(runs) - 1) // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--concurrency", type=int, default=16)
    parser.add_argument("-d", "--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    c_loadgen.build()
    runs, wrong = [], []
    for kind in ("null", "saslsmtp"):
        with tempfile.TemporaryDirectory(prefix="saslsmtp-generators-") as tmp:
            server = start_server(kind, Path(tmp))
            try:
                for i in range(args.repeat):
                    for generator in (("c", "python") if i % 2 == 0 else ("python", "c")):
                        runs.append(one(server, generator, args))
                        print(json.dumps(runs[-1]), file=sys.stderr)
                if kind == "saslsmtp":
                    for generator in ("c", "python"):
                        r = load(generator, server.port, args, password="wrong", duration=1.0)
                        wrong.append({"generator": generator, "status": r["status"],
                                      "ok": r["ok"], "errors": r["errors"]})
            finally:
                server.stop()
    lines = [f"# C and Python load generators — {dt.datetime.now(dt.timezone.utc):%Y-%m-%dT%H:%MZ}",
             "", f"AUTH PLAIN, C = {args.concurrency}, {args.warmup} s warm-up + {args.duration} s,"
             f" median of {args.repeat} runs by handshakes/s (generators in turn); commit"
             f" {git_commit()}; {os.cpu_count()} CPUs shared with other work.", "",
             "| server | generator | handshakes/s | session p50 / p99 ms | generator CPU ms/session"
             " | generator CPU % | server CPU ms/session | errors |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for kind in ("null", "saslsmtp"):
        for generator in ("c", "python"):
            r = median([x for x in runs if x["server"] == kind and x["generator"] == generator])
            lines.append(f"| {kind} | {generator} | {r['handshakes_per_s']:.0f} |"
                         f" {r['session_p50_ms']:.1f} / {r['session_p99_ms']:.1f} |"
                         f" {r['generator_cpu_ms_per_session']:.3f} | {r['generator_cpu_pct']} |"
                         f" {r['server_cpu_ms_per_session']:.3f} | {r['errors']} |")
    lines += ["", "Wrong password against saslsmtp (1 s): "
              + "; ".join(f"{w['generator']}: {w['ok']} ok, {w['errors']} errors, exit status"
                          f" {w['status']}" for w in wrong), ""]
    text = "\n".join(lines)
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"{dt.datetime.now():%Y%m%d-%H%M%S}-generators"
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps({"runs": runs, "wrong_password": wrong},
                                                    indent=2) + "\n")
    print(text)
    bad = [r for r in runs if r["errors"] or r["status"]]
    missed = [w for w in wrong if not w["errors"] or w["ok"]]
    return 1 if bad or missed else 0


if __name__ == "__main__":
    sys.exit(main())
