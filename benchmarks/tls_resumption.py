#!/usr/bin/env python3
"""How often a resuming client resumes, with one worker and with several.

Each worker makes its own OpenSSL context, so its own session-ticket key and session
cache: a client's ticket resumes only on the worker that issued it (docs/tls.md,
"Session resumption").  This measures what that costs: clients that, like Python's
``ssl`` given ``session=`` and most OpenSSL-based MTAs and mail clients, offer the
session of their previous connection, over STARTTLS, sequentially and ``-c`` at a time.

    python3 benchmarks/tls_resumption.py                      # workers 1 and 2, TLS 1.3
    python3 benchmarks/tls_resumption.py --tls12 --sessions 400

Reported per worker count: sessions, resumed, the rate, and how the sessions were
spread over the workers (the ``session end`` lines of each worker; one process names none).
"""

from __future__ import annotations

import argparse
import re
import socket
import ssl
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import REPO, Server, bench_toml, free_port, toml_string  # noqa: E402
from tls import make_certificate  # noqa: E402

resumed = [0, 0]  # (resumed, full sessions), counted by every client thread
lock = threading.Lock()


def session(port: int, context: ssl.SSLContext, offered: ssl.SSLSession | None) -> ssl.SSLSession:
    """STARTTLS offering ``offered``, EHLO (the TLS 1.3 ticket arrives meanwhile), QUIT:
    the session to offer next time (``resumed`` counts whether this one resumed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        reader = raw.makefile("rb")
        reader.readline()
        raw.sendall(b"EHLO client.example\r\n")
        while reader.readline()[3:4] == b"-":
            pass
        raw.sendall(b"STARTTLS\r\n")
        reader.readline()
        with context.wrap_socket(raw, session=offered) as tls:
            tls_reader = tls.makefile("rb")
            tls.sendall(b"EHLO client.example\r\n")
            while tls_reader.readline()[3:4] == b"-":
                pass
            tls.sendall(b"QUIT\r\n")
            tls_reader.readline()
            with lock:
                resumed[0 if tls.session_reused else 1] += 1
            return tls.session



def client(port: int, context: ssl.SSLContext, count: int) -> None:
    """``count`` sessions in a row, each offering the previous one's session."""
    offered = None
    for _ in range(count):
        offered = session(port, context, offered)


def measure(workers: int, args: argparse.Namespace, folder: Path) -> dict[str, object]:
    cert, key = make_certificate("ecdsa-p256", folder)
    (folder / "users").write_text("bench:{PLAIN}benchpass\n")
    port = free_port()
    config = folder / "saslsmtp.toml"
    config.write_text(bench_toml(f"tcp:{port}:interface=127.0.0.1", require_tls=True,
                                 server=f"workers = {workers}\n",
                                 tls=f"[tls]\ncertificate = {toml_string(str(cert))}\n"
                                     f"private_key = {toml_string(str(key))}\n",
                                 origin="benchmarks/tls_resumption.py"))
    server = Server("saslsmtp", [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                                 "-n", "--pidfile=", "--logfile=-", "saslsmtp", "--config", str(config)],
                    port, folder, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, family=True)
    server.start()
    try:
        assert server.log_path is not None
        deadline = time.monotonic() + 30
        while server.log_path.read_text().count("saslsmtp ready") < workers:
            assert time.monotonic() < deadline, server.output_tail()
            time.sleep(0.1)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        if args.tls12:
            context.maximum_version = ssl.TLSVersion.TLSv1_2
        resumed[:] = [0, 0]
        per_client = args.sessions // args.concurrency
        clients = [threading.Thread(target=client, args=(port, context, per_client))
                   for _ in range(args.concurrency)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join()
        time.sleep(0.5)  # the last session-end lines
        log = server.log_path.read_text()
    finally:
        server.stop()
    spread = Counter(re.findall(r"worker=(\d+)\] session end", log))
    total = sum(resumed)
    return {"workers": workers, "sessions": total, "resumed": resumed[0],
            "rate": resumed[0] / total if total else 0.0, "spread": sorted(spread.values())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("-c", "--concurrency", type=int, default=1)
    parser.add_argument("--tls12", action="store_true", help="TLS 1.2 (ticket) instead of 1.3")
    args = parser.parse_args()
    for workers in args.workers:
        with tempfile.TemporaryDirectory(prefix="tls-resumption-") as folder:
            result = measure(workers, args, Path(folder))
        print(f"workers={result['workers']} sessions={result['sessions']} "
              f"resumed={result['resumed']} rate={result['rate']:.2f} "
              f"spread={result['spread']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
