"""Nothing blocks the reactor: while 16 clients log in against an expensive hash
(bcrypt cost 10, ~60 ms each; SHA512-CRYPT at its default 100000 rounds, ~30 ms each), an
unrelated connection's EHLO or NOOP still answers fast.

The daemon runs as a real process; the load comes from benchmarks/smtp_auth_load.py in
another process; these tests measure round trips on their own connection."""

from __future__ import annotations

import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import bcrypt
import pytest

from saslsmtp.passwords import make_hash
from tests.support import ROOT, free_port, start_daemon, wait_for, write_config

LOAD = ROOT / "benchmarks" / "smtp_auth_load.py"


@pytest.fixture
def bcrypt_daemon(tmp_path: Path):
    users = tmp_path / "users"
    hashed = bcrypt.hashpw(b"slow-password", bcrypt.gensalt(10)).decode()
    users.write_text(f"slow:{{BLF-CRYPT}}{hashed}\n")
    port = free_port()
    config = write_config(tmp_path, f'[backends.users]\ntype = "file"\npath = "{users}"\n',
                          listen=[f"tcp:{port}:interface=127.0.0.1"])
    daemon = start_daemon(config, port, tmp_path / "daemon.log")
    yield daemon
    daemon.stop()


def ehlo_round_trips(port: int, seconds: float, command: bytes = b"EHLO probe.example") -> list[float]:
    """``command`` latencies (ms) on one connection, one every 20 ms for ``seconds``."""
    out = []
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.recv(200)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            start = time.perf_counter()
            s.sendall(command + b"\r\n")
            reply = b""
            while not reply.endswith(b"\r\n") or b"250 " not in reply:
                data = s.recv(4096)
                assert data, f"the server closed the probe connection: {reply!r}"
                reply += data
            out.append((time.perf_counter() - start) * 1000)
            time.sleep(0.02)
    return out


def probe_under_load(daemon, load_args: list[str], command: bytes) -> tuple[list[float], dict]:
    """Run the load generator with ``load_args`` against ``daemon``; once its sessions are
    ending in the daemon's log (the hash pool busy from then on), ``command``'s round
    trips for 2.5 s, which must end while the load still runs; then the load's result."""
    load = subprocess.Popen(
        [sys.executable, str(LOAD), "--host", "127.0.0.1", "--port", str(daemon.port),
         "--mech", "PLAIN", *load_args, "--concurrency", "16", "--duration", "5",
         "--warmup", "0.5", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: daemon.log_text().count("session end") >= 8, what="the load's sessions")
        assert load.poll() is None, "the load ended before the probe began"
        latencies = ehlo_round_trips(daemon.port, 2.5, command)
        assert load.poll() is None, "the load ended before the probe did"
        out, _ = load.communicate(timeout=60)
    finally:
        if load.poll() is None:
            load.kill()
    return latencies, json.loads(out)


@pytest.mark.alone
def test_ehlo_stays_fast_during_expensive_logins(bcrypt_daemon) -> None:
    latencies, result = probe_under_load(
        bcrypt_daemon, ["--user", "slow", "--password", "slow-password"], b"EHLO probe.example")
    logins = result.get("ok") or result.get("counts", {}).get("ok", 0)
    assert logins > 20, result  # the hash pool was really busy
    p50 = statistics.median(latencies)
    p99 = sorted(latencies)[int(len(latencies) * 0.99) - 1]
    print(f"EHLO during bcrypt load: n={len(latencies)} p50={p50:.1f} ms p99={p99:.1f} ms;"
          f" logins={logins}")
    assert p99 < 100.0, latencies


@pytest.fixture
def sha512_crypt_daemon(tmp_path: Path):
    users = tmp_path / "users"
    # saslsmtp-passwd's default cost: unknown users are checked against a dummy like these
    users.write_text("".join(f"user{i}:{make_hash('SHA512-CRYPT', f'pw{i}')}\n" for i in range(3)))
    port = free_port()
    config = write_config(tmp_path, f'[backends.users]\ntype = "file"\npath = "{users}"\n',
                          listen=[f"tcp:{port}:interface=127.0.0.1"], max_failures=1000)
    # The probe sends ~125 NOOPs: more than the default junk_command_limit allows.
    config.write_text(config.read_text().replace("[server]\n", "[server]\njunk_command_limit = 1000\n", 1))
    daemon = start_daemon(config, port, tmp_path / "daemon.log")
    yield daemon
    daemon.stop()


@pytest.mark.alone
def test_noop_stays_fast_while_16_connections_guess_unknown_users(sha512_crypt_daemon) -> None:
    """16 connections guessing passwords of unknown users, each guess verified against a
    default-cost SHA512-CRYPT dummy: an unrelated NOOP still answers within 20 ms (p95).
    Hashing in Python (libpass) held the GIL ~40 ms per guess: NOOP p95 was ~450 ms."""
    latencies, result = probe_under_load(
        sha512_crypt_daemon, ["--user", "mallory", "--password", "guess", "--expect-fail"], b"NOOP")
    guesses = result["expected_auth_failures"].get("535", 0) or result["ok"]
    assert guesses > 40, result  # the hash pool was really busy
    p50 = statistics.median(latencies)
    p95 = sorted(latencies)[int(len(latencies) * 0.95) - 1]
    print(f"NOOP during SHA512-CRYPT guessing: n={len(latencies)} p50={p50:.1f} ms"
          f" p95={p95:.1f} ms; guesses/s={result['handshakes_per_s']}")
    assert p95 < 20.0, sorted(latencies)[-10:]
