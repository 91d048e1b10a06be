#!/usr/bin/env python3
"""Profile a server's STARTTLS + AUTH PLAIN sessions under load (cProfile).

Starts saslsmtp (twistd) or the aiosmtpd TLS peer under cProfile with a fresh
certificate, the same way ``tls.py`` does, runs ``smtp_auth_load.py --starttls`` against
it, stops it (SIGTERM, so the profile is written) and prints the top functions by own
time and by cumulative time.  The profile's clock is the process's CPU time, not the
wall clock: on a shared machine a ``send()`` that wakes the client would otherwise
count the time the server waited for a CPU::

    flock /tmp/saslsmtp-bench.lock python3 benchmarks/profile_tls.py            # saslsmtp, RSA
    flock /tmp/saslsmtp-bench.lock python3 benchmarks/profile_tls.py --server aiosmtpd
    python3 benchmarks/profile_tls.py --cert ecdsa-p256 --resume -d 5 --save out.prof

cProfile inflates Python-level calls against C work (OpenSSL's handshake), so read it for
where the Python time goes, and compare CPU per session with ``tls.py``.
"""

from __future__ import annotations

import argparse
import io
import os
import pstats
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import REPO, Server, free_port, process_cpu_s  # noqa: E402
from tls import (LOADGEN, PASSWORD, TLS_PEER, USER, make_certificate,  # noqa: E402
                 saslsmtp_config)


#: Runs a script (argv[1], its arguments after it) under cProfile on the CPU-time clock and
#: writes the profile to $PROFILE_OUT when the script returns or exits.
CPU_PROFILE = """
import cProfile, os, runpy, sys, time
profile = cProfile.Profile(time.process_time)
sys.argv = sys.argv[1:]
profile.enable()
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit:
    pass
finally:
    profile.disable()
    profile.dump_stats(os.environ["PROFILE_OUT"])
"""
TWISTD = "from twisted.scripts.twistd import run; run()"


def profiled_server(name: str, kind: str, folder: Path, profile: Path,
                    plaintext: bool = False) -> Server:
    """The server ``name`` serving a fresh ``kind`` certificate, profiled into ``profile``."""
    cert, key = make_certificate(kind, folder)
    port = free_port()
    env = dict(os.environ, PROFILE_OUT=str(profile))
    if name == "aiosmtpd":
        argv = [sys.executable, "-c", CPU_PROFILE, str(TLS_PEER), str(port),
                "--cert", str(cert), "--key", str(key), "--user", USER, "--password", PASSWORD]
        return Server(name, argv, port, folder, env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    config = saslsmtp_config(port, folder, cert, key, "text", require_tls=not plaintext)
    twistd = folder / "twistd_main.py"
    twistd.write_text(TWISTD + "\n")
    argv = [sys.executable, "-c", CPU_PROFILE, str(twistd),
            "-n", "--pidfile=", f"--logfile={folder / 'saslsmtp.log'}",
            "saslsmtp", "--config", str(config)]
    return Server(name, argv, port, folder, env)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--server", choices=("saslsmtp", "aiosmtpd"), default="saslsmtp")
    p.add_argument("--cert", choices=("rsa2048", "ecdsa-p256"), default="rsa2048")
    p.add_argument("--resume", action="store_true", help="a resuming client (--tls-resume)")
    p.add_argument("--plaintext", action="store_true",
                   help="saslsmtp without STARTTLS (require_tls = false): the baseline that "
                        "shows what TLS adds")
    p.add_argument("--concurrency", "-c", type=int, default=16)
    p.add_argument("--duration", "-d", type=float, default=5.0)
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--save", type=Path, default=None, help="keep the raw profile here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="saslsmtp-profile-tls-") as tmp:
        folder = Path(tmp)
        profile = args.save.resolve() if args.save else folder / "server.prof"
        if args.plaintext and args.server != "saslsmtp":
            p.error("--plaintext profiles saslsmtp only")
        server = profiled_server(args.server, args.cert, folder, profile, args.plaintext)
        server.start()
        try:
            before = process_cpu_s(server.pid)
            load = [sys.executable, str(LOADGEN), "--port", str(server.port),
                    "--user", USER, "--password", PASSWORD, "-c", str(args.concurrency),
                    "-d", str(args.duration)]
            if not args.plaintext:
                load.append("--starttls")
            if args.resume:
                load.append("--tls-resume")
            done = subprocess.run(load, capture_output=True, text=True,
                                  timeout=args.duration + 90)
            used = process_cpu_s(server.pid) - before
            print(done.stdout)
        finally:
            server.stop()
        sessions = next((int(line.split("ok ")[1].split()[0]) for line in done.stdout.splitlines()
                         if "handshakes/s" in line), 0)
        if sessions:
            print(f"server CPU (profiled, so inflated): {1000 * used / sessions:.3f} ms/session\n")
        if not profile.exists():
            print(f"no profile written:\n{server.output_tail()}", file=sys.stderr)
            return 2
        out = io.StringIO()
        stats = pstats.Stats(str(profile), stream=out)
        stats.sort_stats("tottime").print_stats(args.top)
        stats.sort_stats("cumulative").print_stats(args.top)
        print(out.getvalue())
    return 0 if done.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
