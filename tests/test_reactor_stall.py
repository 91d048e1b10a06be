"""Nothing blocks the reactor: while 16 clients log in against an expensive hash
(bcrypt cost 10, ~60 ms each), an unrelated connection's EHLO still answers fast.

The daemon runs as a real process; the load comes from benchmarks/smtp_auth_load.py in
another process; this test measures EHLO round trips on its own connection."""

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

from tests.support import ROOT, free_port, start_daemon, write_config

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


def ehlo_round_trips(port: int, seconds: float) -> list[float]:
    """EHLO latencies (ms) on one connection, one every 20 ms for ``seconds``."""
    out = []
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.recv(200)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            start = time.perf_counter()
            s.sendall(b"EHLO probe.example\r\n")
            reply = b""
            while not reply.endswith(b"\r\n") or b"250 " not in reply:
                reply += s.recv(4096)
            out.append((time.perf_counter() - start) * 1000)
            time.sleep(0.02)
    return out


def test_ehlo_stays_fast_during_expensive_logins(bcrypt_daemon) -> None:
    load = subprocess.Popen(
        [sys.executable, str(LOAD), "--host", "127.0.0.1", "--port", str(bcrypt_daemon.port),
         "--mech", "PLAIN", "--user", "slow", "--password", "slow-password",
         "--concurrency", "16", "--duration", "4", "--warmup", "0.5", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)  # let the hash pool fill up
        latencies = ehlo_round_trips(bcrypt_daemon.port, 2.5)
        out, err = load.communicate(timeout=60)
    finally:
        if load.poll() is None:
            load.kill()
    result = json.loads(out)
    logins = result.get("ok") or result.get("counts", {}).get("ok", 0)
    assert logins > 20, out[:2000]  # the hash pool was really busy
    p50 = statistics.median(latencies)
    p99 = sorted(latencies)[int(len(latencies) * 0.99) - 1]
    print(f"EHLO during bcrypt load: n={len(latencies)} p50={p50:.1f} ms p99={p99:.1f} ms;"
          f" logins={logins}")
    assert p99 < 100.0, latencies
