"""Blocking SMTP clients for the abuse-limit tests: raw sockets, a chosen source address
on loopback (127.0.0.x), AUTH PLAIN, and the daemons they talk to."""

from __future__ import annotations

import base64
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support import Daemon, free_port, start_daemon, write_config

PASSWORD = "right-horse-battery"


def users_toml(tmp_path: Path, users: dict[str, str]) -> str:
    path = tmp_path / "users"
    path.write_text("".join(f"{u}:{p if p.startswith('{') else '{PLAIN}' + p}\n"
                            for u, p in users.items()))
    return f'[backends.users]\ntype = "file"\npath = "{path}"\n'


def daemon(tmp_path: Path, name: str, limits: str, backends: str, *, listen: str = "tcp",
           failure_delay: float = 0.0, extra: str = "", port: int | None = None) -> Daemon:
    """One ``twistd -n saslsmtp`` with ``[limits]`` ``limits`` on a free port."""
    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    port = port or free_port()
    config = write_config(folder, backends, listen=[f"{listen}:{port}:interface=127.0.0.1"],
                          failure_delay=failure_delay, max_failures=100,
                          extra="[limits]\n" + limits + "\n" + extra)
    if listen == "haproxy:ssl":  # says nothing before a PROXY header and a TLS handshake
        return _start_silent(config, port, folder / "daemon.log")
    return start_daemon(config, port, folder / "daemon.log")


def _start_silent(config: Path, port: int, log: Path) -> Daemon:
    """Start a daemon whose listener never greets a bare connection: wait for its log."""
    import os
    import subprocess

    from tests.support import ROOT, twistd_command
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open(log, "wb") as out:
        process = subprocess.Popen(twistd_command(config), cwd=config.parent, stdout=out,
                                   stderr=subprocess.STDOUT, env=env)
    daemon = Daemon(process, port, log)
    try:
        wait_for_log(daemon, "saslsmtp ready", timeout=20)
    except AssertionError:
        daemon.stop()
        raise
    return daemon


@dataclass
class Answer:
    code: int
    line: bytes


def read_reply(f: any) -> bytes:  # type: ignore[valid-type]
    """The last line of a (multi-line) reply, or b"" once the server closed."""
    while True:
        line = f.readline()
        if not line or line[3:4] != b"-":
            return line


def connect(port: int, source: str = "127.0.0.1", timeout: float = 20.0) -> tuple[socket.socket, any, bytes]:  # type: ignore[valid-type]
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))
    f = s.makefile("rb")
    return s, f, read_reply(f)


def plain(user: str, password: str) -> bytes:
    return base64.b64encode(f"\0{user}\0{password}".encode())


def auth_plain(port: int, user: str, password: str, source: str = "127.0.0.1", *,
               hang_up_after: float | None = None) -> Answer | None:
    """One connection, EHLO, ``AUTH PLAIN``: the final AUTH reply (or the banner / EHLO
    reply if those refused); with ``hang_up_after``, close that long after sending AUTH
    and return ``None``."""
    s, f, banner = connect(port, source)
    try:
        if not banner.startswith(b"220"):
            return Answer(int(banner[:3] or b"0"), banner)
        s.sendall(b"EHLO client.example\r\n")
        ehlo = read_reply(f)
        if not ehlo.startswith(b"250"):
            return Answer(int(ehlo[:3] or b"0"), ehlo)
        s.sendall(b"AUTH PLAIN " + plain(user, password) + b"\r\n")
        if hang_up_after is not None:
            time.sleep(hang_up_after)
            return None
        line = f.readline()
        try:
            s.sendall(b"QUIT\r\n")
        except OSError:
            pass
        return Answer(int(line[:3] or b"0"), line)
    finally:
        f.close()
        s.close()


def wait_for_log(daemon: Daemon, text: str, count: int = 1, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = daemon.log_text()
        if log.count(text) >= count:
            return log
        time.sleep(0.05)
    raise AssertionError(f"{text!r} x{count} not in log:\n{daemon.log_text()[-3000:]}")
