"""SHA512-CRYPT logins against a real daemon: does hashing starve the reactor?

Starts saslsmtp from a source tree (``--tree``, default: this checkout) with a users file
of default-cost SHA512-CRYPT hashes (100000 rounds), then on loopback:

1. 16 connections guess passwords of an unknown user (each guess is verified against a
   dummy hash of the same cost) while a 17th connection sends NOOP every 20 ms: NOOP
   round-trip p50/p95/max;
2. 16 connections log in as a known user: hashed logins per second.

    python benchmarks/crypt_gil.py [--tree DIR] [--duration 5] [--hash-threads 4]

Run it for the tree before and after a change, on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tests import support  # noqa: E402
from tests.test_reactor_stall import ehlo_round_trips  # noqa: E402

LOAD = HERE / "smtp_auth_load.py"


def load(port: int, user: str, password: str, seconds: float, fail: bool) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(LOAD), "--host", "127.0.0.1", "--port", str(port), "--mech", "PLAIN",
         "--user", user, "--password", password, "--concurrency", "16", "--duration", str(seconds),
         "--warmup", "0.5", "--json", *(["--expect-fail"] if fail else [])],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tree", type=Path, default=HERE.parent)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--hash-threads", type=int, default=4)
    args = p.parse_args()
    support.ROOT = args.tree.resolve()
    env_path = str(support.ROOT)
    hashed = subprocess.run(
        [sys.executable, "-c", "import sys; from saslsmtp.passwords import make_hash;"
         " print(make_hash('SHA512-CRYPT', 'right-password'))"],
        env=dict(os.environ, PYTHONPATH=env_path), capture_output=True, text=True, check=True,
    ).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        users = tmp_path / "users"
        users.write_text(f"alice:{hashed}\n")
        port = support.free_port()
        config = support.write_config(
            tmp_path, f'[backends.users]\ntype = "file"\npath = "{users}"\n',
            listen=[f"tcp:{port}:interface=127.0.0.1"], max_failures=1000,
            extra_auth=f"hash_threads = {args.hash_threads}")
        if "junk_command_limit" in (support.ROOT / "saslsmtp" / "config.py").read_text():
            # the NOOP probe sends more than the default junk_command_limit allows
            config.write_text(config.read_text().replace(
                "[server]\n", "[server]\njunk_command_limit = 100000\n", 1))
        daemon = support.start_daemon(config, port, tmp_path / "daemon.log")
        try:
            guess = load(port, "mallory", "guess", args.duration, True)
            time.sleep(1.0)
            noop = ehlo_round_trips(port, args.duration - 1.5, b"NOOP")
            guessed = json.loads(guess.communicate(timeout=120)[0])
            login = json.loads(load(port, "alice", "right-password", args.duration, False)
                               .communicate(timeout=120)[0])
        finally:
            daemon.stop()
    noop.sort()
    print(json.dumps({
        "tree": str(args.tree), "cpus": os.cpu_count(),
        "noop_ms": {"n": len(noop), "p50": round(statistics.median(noop), 1),
                    "p95": round(noop[int(len(noop) * 0.95) - 1], 1), "max": round(noop[-1], 1)},
        "guesses_per_s": guessed["handshakes_per_s"],
        "logins_per_s": login["handshakes_per_s"], "login_ok": login["ok"],
        "login_auth_ms": login["latency_ms"]["auth"],
    }, indent=1))


if __name__ == "__main__":
    main()
