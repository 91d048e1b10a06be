#!/usr/bin/env python3
"""Fair hashing under attack: one address hammers a bcrypt user over 16 connections
(limits off), while another address logs in and a third sends NOOPs.  Reports the p95 of
the legitimate AUTH round trip and of the NOOP round trip, with the fair pool (what the
daemon runs) and, for comparison, with a plain FIFO thread pool, in one run.

    python3 benchmarks/fairness.py            # prints a markdown table
    python3 benchmarks/fairness.py --write    # also benchmarks/results/<date>-fairness.md

``measure(port)`` is what tests/test_limits_fairness.py asserts on.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
ATTACKER, USER, PINGER = "127.0.8.1", "127.0.8.2", "127.0.8.3"
PASSWORD = "fair-share-password"

#: Runs the daemon with the hashing pool replaced by the plain FIFO ThreadPoolRunner.
FIFO = ("import saslsmtp.service as s, saslsmtp.threads as t; "
        "s.FairThreadPoolRunner = lambda reactor, name, n, **kw: t.ThreadPoolRunner(reactor, name, n); "
        "from twisted.scripts.twistd import run; run()")
FAIR = "from twisted.scripts.twistd import run; run()"


def _reply(f: object) -> bytes:
    while True:
        line = f.readline()  # type: ignore[attr-defined]
        if not line or line[3:4] != b"-":
            return line


def _session(port: int, source: str) -> tuple[socket.socket, object]:
    s = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
    f = s.makefile("rb")
    _reply(f)
    s.sendall(b"EHLO bench.example\r\n")
    _reply(f)
    return s, f


def _plain(user: str, password: str) -> bytes:
    return b"AUTH PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode()) + b"\r\n"


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]


def measure(port: int, *, connections: int = 16, logins: int = 30, noops: int = 100
            ) -> dict[str, float]:
    """Hammer, then time ``logins`` AUTHs of "good" and ``noops`` NOOPs; ms figures."""
    stop = threading.Event()
    attempts = [0]

    def hammer() -> None:
        s, f = _session(port, ATTACKER)
        try:
            i = 0
            while not stop.is_set():
                s.sendall(_plain("victim", f"guess-{threading.get_ident()}-{i}"))
                if not _reply(f):
                    return
                attempts[0] += 1
                i += 1
        except OSError:
            pass
        finally:
            s.close()

    noop_ms: list[float] = []

    def pinger() -> None:
        s, f = _session(port, PINGER)
        try:
            for _ in range(noops):
                started = time.perf_counter()
                s.sendall(b"NOOP\r\n")
                _reply(f)
                noop_ms.append(1000 * (time.perf_counter() - started))
                time.sleep(0.02)
        finally:
            s.close()

    hammers = [threading.Thread(target=hammer, daemon=True) for _ in range(connections)]
    for t in hammers:
        t.start()
    time.sleep(1.0)  # let the queue fill
    ping = threading.Thread(target=pinger, daemon=True)
    ping.start()
    login_ms = []
    try:
        for _ in range(logins):
            s, f = _session(port, USER)
            started = time.perf_counter()
            s.sendall(_plain("good", PASSWORD))
            line = _reply(f)
            login_ms.append(1000 * (time.perf_counter() - started))
            assert line.startswith(b"235"), line
            s.close()
        ping.join(60)
    finally:
        stop.set()
        for t in hammers:
            t.join(10)
    return {"login_p95_ms": p95(login_ms), "login_p50_ms": sorted(login_ms)[len(login_ms) // 2],
            "noop_p95_ms": p95(noop_ms), "attacker_checks": attempts[0]}


def write_config(folder: Path, port: int) -> Path:
    sys.path.insert(0, str(REPO))
    from saslsmtp.passwords import make_hash
    users = folder / "users"
    users.write_text(f"victim:{make_hash('BLF-CRYPT', 'unguessable', rounds=10)}\n"
                     f"good:{make_hash('BLF-CRYPT', PASSWORD, rounds=8)}\n")
    config = folder / "saslsmtp.toml"
    config.write_text(f"""[server]
listen = ["tcp:{port}:interface=127.0.0.1"]

[auth]
mechanisms = ["PLAIN"]
require_tls = false
backends = ["users"]
failure_delay = 0
max_failures = 100000

[backends.users]
type = "file"
path = "{users}"

[delivery]
type = "maildir"
path = "{folder / 'mail'}"
""")
    return config


def start(config: Path, port: int, program: str, log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-c", program, "-n", "--pidfile=",
                                    "--logfile=-", "saslsmtp", "--config", str(config)],
                                   stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.recv(100)
                return process
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(log.read_text())


def run_variant(program: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="saslsmtp-fairness-") as tmp:
        folder = Path(tmp)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        process = start(write_config(folder, port), port, program, folder / "daemon.log")
        try:
            return measure(port)
        finally:
            process.terminate()
            process.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    rows = {"FIFO pool (before)": run_variant(FIFO), "fair pool (now)": run_variant(FAIR)}
    now = dt.datetime.now(dt.timezone.utc)
    lines = [f"# Fair hashing under a bcrypt hammer ({now:%Y-%m-%d %H:%M} UTC)", "",
             "`python3 benchmarks/fairness.py`: 16 connections from 127.0.8.1 send wrong"
             " passwords for a bcrypt (cost 10) user without pause (limits off,"
             " failure_delay 0); meanwhile 30 logins of another bcrypt user (cost 8: what is"
             " measured is the wait for a thread, not the user's own hash) from 127.0.8.2 and"
             " 100 NOOPs (20 ms apart) from 127.0.8.3. hash_threads = 4, shared 2-core"
             " machine.", "",
             "| pool | login p50 ms | login p95 ms | NOOP p95 ms | attacker checks |",
             "| --- | --- | --- | --- | --- |"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['login_p50_ms']:.0f} | {r['login_p95_ms']:.0f} |"
                     f" {r['noop_p95_ms']:.1f} | {r['attacker_checks']:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        (HERE / "results" / f"{now:%Y%m%d-%H%M%S}-fairness.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
