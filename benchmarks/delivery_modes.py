#!/usr/bin/env python3
"""Mail throughput by delivery mode, in one run, with the same load generator.

Each point is ``smtp_auth_load.py --mode mail`` (fresh connection, EHLO, AUTH PLAIN,
MAIL, RCPT, DATA with ~2 KB, QUIT) at the same concurrency against:

* ``maildir``: saslsmtp storing into its Maildir (fsync + rename before the 250);
* ``relay-aiosmtpd``: saslsmtp relaying (``[delivery] type = "smtp"``) to an aiosmtpd
  upstream in its own process (``aiosmtpd_peer.py --no-auth``, mail discarded);
* ``relay-postfix``: saslsmtp relaying to a private Postfix with XCLIENT (tests/postfix.py:
  own config and queue, loopback, every message held in the queue);
* ``postfix-direct``: the load generator talking to that Postfix itself, without AUTH.

    python3 benchmarks/delivery_modes.py --concurrency 16 --duration 5

Results: benchmarks/results/<date>-delivery-modes.md and .json (and stdout).  The
Postfix points need root (``postfix -c DIR start``); they are left out otherwise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from run import (LOADGEN, PEER, RESULTS, BenchError, Server, bench_toml, free_port,  # noqa: E402
                 git_commit, process_cpu_s)

USER, PASSWORD = "bench", "benchpass"


def saslsmtp(workdir: Path, delivery: str, name: str, tree: Path = REPO) -> Server:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    (workdir / "users").write_text(f"{USER}:{{PLAIN}}{PASSWORD}\n")
    (workdir / "saslsmtp.toml").write_text(bench_toml(
        f"tcp:{port}:interface=127.0.0.1", delivery=delivery + "\n",
        origin="benchmarks/delivery_modes.py"))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), env.get("PYTHONPATH")]))
    argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
            "--pidfile=", "--logfile=saslsmtp.log", "saslsmtp", "--config",
            str(workdir / "saslsmtp.toml")]
    return Server(name, argv, port, workdir, env, delivery.replace("\n", " "))


def load(port: int, mech: str, args: argparse.Namespace, pids: list[int]) -> dict:
    import subprocess
    argv = [sys.executable, str(LOADGEN), "--port", str(port), "--mech", mech, "--mode",
            "mail", "--user", USER, "--password", PASSWORD, "--rcpt", "bench@example.test",
            "--sender", "bench@example.test", "--concurrency", str(args.concurrency),
            "--duration", str(args.duration), "--warmup", str(args.warmup), "--json"]
    before = [process_cpu_s(pid) for pid in pids]
    done = subprocess.run(argv, capture_output=True, text=True,
                          timeout=args.duration + args.warmup + 120)
    cpu = sum(process_cpu_s(pid) - b for pid, b in zip(pids, before))
    try:
        result = json.loads(done.stdout)
    except json.JSONDecodeError:
        raise BenchError(f"load generator failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")
    served = result["sessions_measured"] + result["sessions_warmup"]
    result["server_cpu_ms_per_message"] = round(1000 * cpu / served, 3) if served else None
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--baseline", type=Path, default=None,
                   help="another saslsmtp source tree (e.g. `git archive` of an older commit):"
                        " its Maildir delivery is measured too, as maildir-baseline")
    p.add_argument("--only", action="append", default=[],
                   help="run only these targets (repeatable)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="saslsmtp-delivery-bench-"))
    servers: list[Server] = []
    postfix = None
    rows = []
    try:
        from tests.postfix import PostfixServer, usable
        if usable() is None:
            postfix = PostfixServer()
            postfix.start()
        upstream_port = free_port()
        upstream = Server("aiosmtpd", [sys.executable, str(PEER), str(upstream_port),
                                       "--no-auth"], upstream_port, work, None, "aiosmtpd peer")
        upstream.start()
        servers.append(upstream)
        targets = [("maildir", saslsmtp(work / "maildir", '[delivery]\ntype = "maildir"\n'
                                        'path = "mail"', "saslsmtp")),
                   ("relay-aiosmtpd", saslsmtp(
                       work / "relay-aiosmtpd", '[delivery]\ntype = "smtp"\nendpoint = '
                       f'"tcp:127.0.0.1:{upstream.port}"\npool_size = 16', "saslsmtp"))]
        if args.baseline is not None:
            targets.insert(1, ("maildir-baseline", saslsmtp(
                work / "maildir-baseline", '[delivery]\ntype = "maildir"\npath = "mail"',
                "saslsmtp", args.baseline.resolve())))
        if postfix is not None:
            targets.append(("relay-postfix", saslsmtp(
                work / "relay-postfix", '[delivery]\ntype = "smtp"\nendpoint = '
                f'"tcp:127.0.0.1:{postfix.port}"\nxclient = true\npool_size = 16',
                "saslsmtp")))
        if args.only:
            targets = [(name, server) for name, server in targets if name in args.only]
        for name, server in targets:
            server.start()
            servers.append(server)
            pids = [server.pid] + ([upstream.pid] if name == "relay-aiosmtpd" else [])
            result = load(server.port, "PLAIN", args, pids)
            rows.append((name, result))
            server.stop()
        if postfix is not None and (not args.only or "postfix-direct" in args.only):
            rows.append(("postfix-direct", load(postfix.port, "NONE", args, [])))
    finally:
        for server in servers:
            server.stop()
        if postfix is not None:
            postfix.cleanup()
    stamp = dt.datetime.now(dt.timezone.utc)
    lines = [f"# Mail throughput by delivery mode — {stamp.isoformat(timespec='seconds')}", "",
             f"- commit {git_commit()}; smtp_auth_load.py --mode mail (~2 KB message, one"
             f" message per connection), concurrency {args.concurrency}, {args.warmup:g} s"
             f" warm-up + {args.duration:g} s; 2 CPUs shared by everything",
             "- maildir: fsync + rename before the 250; relay-*: the 250 is the upstream's;"
             " aiosmtpd discards; Postfix holds every message in its queue (its own fsync)",
             "- CPU = saslsmtp (plus the aiosmtpd upstream for relay-aiosmtpd) ms per message;"
             " Postfix's processes are not counted",
             *([f"- maildir-baseline: saslsmtp from {args.baseline}"] if args.baseline else []),
             "",
             "| target | AUTH | messages/s | session p50 / p99 ms | errors | CPU ms/msg |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, r in rows:
        lat = r["latency_ms"]["session"]
        lines.append(f"| {name} | {'none' if name == 'postfix-direct' else 'PLAIN'} |"
                     f" {r['handshakes_per_s']:,.0f} | {lat['p50']} / {lat['p99']} |"
                     f" {r['errors']} | {r['server_cpu_ms_per_message'] if name != 'postfix-direct' else '-'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    base = RESULTS / f"{stamp:%Y%m%d-%H%M%S}-delivery-modes"
    base.with_suffix(".md").write_text(text)
    base.with_suffix(".json").write_text(json.dumps(dict(rows), indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
