"""A throwaway redis-server on 127.0.0.1 for the tests: free port, own dir, no persistence."""

from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import require_binary
from tests.support import free_port, terminate


@dataclass
class RedisServer:
    """``start()``/``stop()`` may be called repeatedly; the port stays the same."""

    binary: str
    directory: Path
    port: int
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        log = open(self.directory / "redis.log", "ab")
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
             str(self.directory), "--save", "", "--appendonly", "no", "--daemonize", "no",
             "--protected-mode", "yes", "--unixsocket", str(self.directory / "redis.sock"),
             "--unixsocketperm", "700"], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError((self.directory / "redis.log").read_text())
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on {self.port}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            terminate(self.process)
        self.process = None

    def command(self, *args: str, password: str | None = None) -> bytes:
        """One raw command over a plain socket (for checks behind the store's back)."""
        commands = [("AUTH", password)] if password else []
        commands.append(args)
        payload = b"".join(f"*{len(c)}\r\n".encode() + b"".join(
            f"${len(a.encode())}\r\n{a}\r\n".encode() for a in c) for c in commands)
        reply, ends = b"", [0]
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(payload)
            while len(ends) <= len(commands):  # one complete reply per command
                end = _reply_end(reply, ends[-1])
                if end is not None:
                    ends.append(end)
                    continue
                chunk = s.recv(65536)
                if not chunk:
                    raise ConnectionError(f"redis-server closed the connection after {reply!r}")
                reply += chunk
        return reply[ends[1]:] if password else reply


def _reply_end(data: bytes, start: int) -> int | None:
    """Where the RESP reply that begins at ``start`` ends, or None if it is not all there."""
    line = data.find(b"\r\n", start)
    if line < 0:
        return None
    kind, value, end = data[start:start + 1], data[start + 1:line], line + 2
    if kind in (b"+", b"-", b":"):
        return end
    if kind == b"$":
        size = int(value)
        return end if size < 0 else (end + size + 2 if len(data) >= end + size + 2 else None)
    if kind == b"*":
        for _ in range(int(value)):  # a null array (-1) has no elements
            next_end = _reply_end(data, end)
            if next_end is None:
                return None
            end = next_end
        return end
    raise ValueError(f"not a RESP reply: {data[start:]!r}")


def start_redis(directory: Path) -> RedisServer:
    binary = require_binary("redis-server", "redis-server")
    directory.mkdir(parents=True, exist_ok=True)
    server = RedisServer(binary, directory, free_port())
    server.start()
    return server


def tls_redis(tmp_path: Path, names: list[str], san: bool = True) -> tuple[subprocess.Popen, int, str]:
    """redis-server with TLS only, its certificate (by a new CA) for ``names``, with or
    without a subjectAltName: (process, port, CA file)."""
    from tests.tlsutil import issue_cert, make_ca
    binary = require_binary("redis-server", "redis-server")
    ca = make_ca(tmp_path)
    cert = issue_cert(ca, tmp_path, names=names, san=san)
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--dir",
         str(tmp_path), "--save", "", "--tls-cert-file", cert.cert_path, "--tls-key-file",
         cert.key_path, "--tls-ca-cert-file", ca.cert_path, "--tls-auth-clients", "no",
         "--logfile", str(tmp_path / "redis.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, port, ca.cert_path
