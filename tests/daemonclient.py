"""A plain-socket SMTP client for daemon tests that stream big messages, and the
daemon's memory as the kernel reports it (sampled while a test runs)."""

from __future__ import annotations

import base64
import socket
import threading
import time
from pathlib import Path
from typing import Iterable


class SMTPClient:
    """Commands and replies over one socket; ``stream`` writes a body as it goes."""

    def __init__(self, port: int, timeout: float = 120.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buffer = b""
        self.greeting = self.reply()

    def reply(self) -> bytes:
        """One whole reply (every line of a multi-line one)."""
        lines = []
        while True:
            while b"\r\n" not in self.buffer:
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionError(f"closed after {b''.join(lines)!r}")
                self.buffer += data
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            lines.append(line + b"\r\n")
            if line[3:4] != b"-":
                return b"".join(lines)

    def command(self, line: str | bytes) -> bytes:
        self.sock.sendall((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    def login(self, user: str, password: str) -> bytes:
        self.command("EHLO client.example")
        blob = base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode()).decode()
        return self.command("AUTH PLAIN " + blob)

    def stream(self, chunks: Iterable[bytes]) -> int:
        """Send body chunks (already dot-stuffed); the final dot is the caller's."""
        total = 0
        for chunk in chunks:
            self.sock.sendall(chunk)
            total += len(chunk)
        return total

    def close(self) -> None:
        try:
            self.sock.sendall(b"QUIT\r\n")
        except OSError:
            pass
        self.sock.close()


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(line.split()[1]) * 1024
    return out


class RSSSampler:
    """The highest VmRSS of ``pid`` seen every ``interval`` seconds while running."""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, memory(self.pid)["VmRSS"])
            except (OSError, KeyError):
                return
            time.sleep(self.interval)

    def __enter__(self) -> "RSSSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, memory(self.pid)["VmRSS"])
