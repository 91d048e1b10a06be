#!/usr/bin/env python3
"""The C load generator (``smtp_load.c``): built on first use, and its command line.

    python3 benchmarks/c_loadgen.py --port 2525 -c 64 -d 8    # build if needed, then run it

``build()`` compiles ``smtp_load.c`` with ``cc -O2`` (``$CC`` if set) into
``benchmarks/build/`` and compiles again only when the source is newer than the binary.
Without a compiler it raises ``NoCompiler``, whose message says what to install.
``command()`` is the argv of one AUTH PLAIN run (with ``mail=True``, each session also
sends the Python generator's ~2 KB message, written once to ``benchmarks/build/``); its
JSON has the keys that
``smtp_auth_load.py --json`` gives for the same run (handshakes_per_s, latency_ms,
sessions_measured, sessions_warmup, errors, client_cpu_pct_of_one_core), plus
``client_cpu_ms_per_session``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "smtp_load.c"
BUILD = HERE / "build"
BINARY = BUILD / "smtp_load"
SENDER = "bench-sender@example.com"  # smtp_auth_load.py's defaults, which the peers accept
RCPT = "bench-rcpt@example.com"


class NoCompiler(Exception):
    """No C compiler, or the source does not compile: the Python generator must do."""


def build(binary: Path = BINARY) -> Path:
    """The compiled generator, (re)built when missing or older than its source."""
    if binary.exists() and binary.stat().st_mtime >= SOURCE.stat().st_mtime:
        return binary
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise NoCompiler(f"no C compiler ({cc}) to build {SOURCE.name}: install one"
                         " (Debian: apt-get install gcc) or use the Python generator")
    binary.parent.mkdir(exist_ok=True)
    partial = binary.with_suffix(".tmp")
    done = subprocess.run([cc, "-O2", "-Wall", "-o", str(partial), str(SOURCE)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise NoCompiler(f"{cc} could not build {SOURCE.name}:\n{done.stderr.strip()}")
    partial.replace(binary)
    return binary


def message_file(sender: str = SENDER, rcpt: str = RCPT, size: int = 2048) -> Path:
    """The message a mail session sends: ``smtp_auth_load.py``'s (same size, headers and
    dot-stuffing; its Message-ID's sequence number is 0 in every message)."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    from smtp_auth_load import build_message  # the Python generator's own
    data = build_message(size, sender, rcpt).replace(b"@@SEQ@@", b"0")
    BUILD.mkdir(exist_ok=True)
    path = BUILD / f"message-{size}.eml"
    if not path.exists() or path.read_bytes() != data:
        path.write_bytes(data)
    return path


def command(port: int, user: str, password: str, concurrency: int, duration: float,
            warmup: float, mail: bool = False) -> list[str]:
    """argv of one AUTH PLAIN run against 127.0.0.1:``port`` (JSON on stdout); with
    ``mail``, every session also sends one message before its QUIT."""
    argv = [str(build()), "--port", str(port), "--user", user, "--password", password,
            "--concurrency", str(concurrency), "--duration", str(duration),
            "--warmup", str(warmup)]
    if mail:
        argv += ["--mail", str(message_file()), "--sender", SENDER, "--rcpt", RCPT]
    return argv


if __name__ == "__main__":
    try:
        binary = build()
    except NoCompiler as e:
        sys.exit(f"c_loadgen: {e}")
    os.execv(binary, [str(binary), *sys.argv[1:]])
