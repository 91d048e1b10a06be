#!/usr/bin/env python3
"""Idle connections: the daemon's memory per held connection, and login latency meanwhile.

Starts the real daemon (``twistd -n saslsmtp``, a users file with a ``{PLAIN}`` entry,
PLAIN only, no ``[limits]``, idle and unauthenticated deadlines of an hour so no
per-connection timer fires during the run), then

1. runs ``--logins`` sequential AUTH PLAIN sessions with no connection held (the baseline);
2. opens ``--connections`` TCP connections from several loopback source addresses
   (127.0.0.2, 127.0.0.3, ...: each source address has its own ephemeral ports), each
   reads the 220 greeting and (unless ``--no-ehlo``) sends EHLO and reads its reply, then
   stays idle; the daemon's VmRSS (``/proc/PID/status``) is sampled every ``--step``
   connections;
3. while they are all held, runs the same ``--logins`` sequential AUTH PLAIN sessions
   again, then checks that every held connection is still open (no timer fired).

Reported: VmRSS at 0 and at N held connections, per-connection cost
``(RSS at N - RSS at 0) / N``, and the login latency (connect -> 235, and the AUTH
exchange alone) p50/p95/p99 without and with the connections held.  The targets: under
150 MB RSS and a login p95 under 10 ms with 15,000 held.

    flock /tmp/saslsmtp-bench.lock python3 benchmarks/idle_connections.py
    python3 benchmarks/idle_connections.py --connections 2000 --logins 50 --no-save   # quick

Results: ``benchmarks/results/<date>-idle-connections.md`` and ``.json`` (unless ``--no-save``).
Both processes raise their soft ``RLIMIT_NOFILE`` to the hard limit (the daemon does so
itself at startup); the run stops early if the hard limit is too low for N.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import errno
import json
import os
import platform
import resource
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"

sys.path.insert(0, str(HERE))
from run import bench_toml  # noqa: E402
USER, PASSWORD = "bench", "benchpass"
RSS_TARGET_MB = 150.0
P95_TARGET_MS = 10.0


class BenchError(Exception):
    """The benchmark cannot go on."""


# --------------------------------------------------------------------------
# The daemon
# --------------------------------------------------------------------------

def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_nofile() -> int:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


def vm_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon of ``pid`` in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(line.split()[1]) * 1024
    return out


def rss_mb(pid: int) -> float:
    return vm_status(pid)["VmRSS"] / 1e6


@dataclass
class Daemon:
    """``twistd -n saslsmtp`` from ``tree`` in a subprocess, logging to a file."""

    tree: Path
    workdir: Path
    config_text: str
    port: int
    proc: subprocess.Popen | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / "saslsmtp.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 30.0) -> None:
        (self.workdir / "users").write_text(f"{USER}:{{PLAIN}}{PASSWORD}\n")
        (self.workdir / "mail").mkdir(exist_ok=True)
        config = self.workdir / "saslsmtp.toml"
        config.write_text(self.config_text)
        env = dict(os.environ, PYTHONPATH=str(self.tree))
        # Never --logfile=/dev/null: an old checkout's log rotation renamed it once.
        argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
                "--pidfile=", f"--logfile={self.log_path}", "saslsmtp", "--config", str(config)]
        self.proc = subprocess.Popen(argv, cwd=self.workdir, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=raise_nofile)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"saslsmtp exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                    s.settimeout(5)
                    if s.recv(512).startswith(b"220"):
                        s.sendall(b"QUIT\r\n")
                        with contextlib.suppress(OSError):
                            s.recv(512)
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise BenchError(f"saslsmtp did not greet on {self.port}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def daemon_config(port: int, *, backlog: int | None = 1024, extra_server: str = "",
                  extra: str = "") -> str:
    """The daemon's config: users file, PLAIN, no limits, deadlines of an hour."""
    listen = f"tcp:{port}:interface=127.0.0.1" + (f":backlog={backlog}" if backlog else "")
    return bench_toml(listen, server="idle_timeout = 3600.0\nmax_unauthenticated_time = 3600.0\n"
                      + extra_server, extra=extra, origin="benchmarks/idle_connections.py")


@contextlib.contextmanager
def running(daemon: Daemon) -> Iterator[Daemon]:
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()


# --------------------------------------------------------------------------
# Held connections
# --------------------------------------------------------------------------

class Held:
    """Non-blocking client connections that greet (and EHLO) and then stay open."""

    def __init__(self, port: int, sources: int, ehlo: bool) -> None:
        self.port = port
        self.sources = [f"127.0.0.{2 + i}" for i in range(sources)]
        self.ehlo = ehlo
        self.sockets: list[socket.socket] = []
        self.selector = selectors.DefaultSelector()

    def open(self, count: int, in_flight: int = 256, timeout: float = 60.0) -> None:
        """Open ``count`` more connections, at most ``in_flight`` unfinished at a time;
        each is done once it read the 220 (and the EHLO reply)."""
        pending: dict[socket.socket, list[Any]] = {}  # sock -> [state, buffer]
        started = 0
        deadline = time.monotonic() + timeout
        while started < count or pending:
            while started < count and len(pending) < in_flight:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setsockopt(socket.IPPROTO_IP, 24, 1)  # IP_BIND_ADDRESS_NO_PORT
                s.bind((self.sources[(len(self.sockets) + started) % len(self.sources)], 0))
                s.setblocking(False)
                err = s.connect_ex(("127.0.0.1", self.port))
                if err not in (0, errno.EINPROGRESS):
                    s.close()
                    raise BenchError(f"connect: {os.strerror(err)}")
                pending[s] = ["greeting", b""]
                self.selector.register(s, selectors.EVENT_READ)
                started += 1
            if time.monotonic() > deadline:
                raise BenchError(f"{len(pending)} connections did not greet within {timeout} s")
            for key, _ in self.selector.select(timeout=1.0):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                state = pending.get(s)
                if state is None:
                    continue
                try:
                    data = s.recv(4096)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    raise BenchError(f"held connection failed while greeting: {exc}") from None
                if not data:
                    raise BenchError("the daemon closed a connection while greeting")
                state[1] += data
                if state[0] == "greeting" and state[1].endswith(b"\r\n"):
                    if not state[1].startswith(b"220 "):
                        raise BenchError(f"greeting {state[1][:80]!r}")
                    if self.ehlo:
                        state[:] = ["ehlo", b""]
                        s.send(b"EHLO idle.client.test\r\n")
                        continue
                    self._done(s, pending)
                elif state[0] == "ehlo" and b"\r\n250 " in b"\r\n" + state[1] and state[1].endswith(b"\r\n"):
                    self._done(s, pending)

    def _done(self, s: socket.socket, pending: dict) -> None:
        del pending[s]
        self.selector.unregister(s)
        self.sockets.append(s)

    def still_open(self) -> tuple[int, int]:
        """(open, closed or sent something): a non-blocking peek at every held socket."""
        alive = closed = 0
        for s in self.sockets:
            try:
                data = s.recv(1, socket.MSG_PEEK)
            except BlockingIOError:
                alive += 1
                continue
            except OSError:
                closed += 1
                continue
            closed += 1  # b"" (closed) or data (a 421): a timer fired
            del data
        return alive, closed

    def close(self) -> None:
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.close()
        self.sockets = []
        self.selector.close()


# --------------------------------------------------------------------------
# Logins
# --------------------------------------------------------------------------

def _reply(sock: socket.socket, buf: bytearray) -> bytes:
    """One complete (possibly multi-line) reply."""
    while True:
        lines = bytes(buf).split(b"\r\n")
        for i, line in enumerate(lines[:-1]):
            if len(line) >= 4 and line[3:4] == b" ":
                end = sum(len(x) + 2 for x in lines[:i + 1])
                reply = bytes(buf[:end])
                del buf[:end]
                return reply
        data = sock.recv(4096)
        if not data:
            raise BenchError("connection closed while waiting for a reply")
        buf += data


def login(port: int, source: str = "127.0.0.1") -> tuple[float, float]:
    """One AUTH PLAIN session; (connect -> 235, AUTH exchange alone) in seconds."""
    token = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = bytearray()
        if not _reply(s, buf).startswith(b"220"):
            raise BenchError("no greeting")
        s.sendall(b"EHLO login.client.test\r\n")
        if not _reply(s, buf).startswith(b"250"):
            raise BenchError("EHLO refused")
        t1 = time.perf_counter()
        s.sendall(f"AUTH PLAIN {token}\r\n".encode())
        answer = _reply(s, buf)
        t2 = time.perf_counter()
        if not answer.startswith(b"235"):
            raise BenchError(f"AUTH answered {answer!r}")
        s.sendall(b"QUIT\r\n")
        with contextlib.suppress(OSError, BenchError):
            _reply(s, buf)
    return t2 - t0, t2 - t1


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def latency_stats(samples: list[tuple[float, float]]) -> dict[str, Any]:
    def ms(values: list[float]) -> dict[str, float]:
        return {f"p{p}": round(percentile(values, p) * 1000, 3) for p in (50, 95, 99)} | {
            "max": round(max(values) * 1000, 3), "mean": round(statistics.fmean(values) * 1000, 3)}
    return {"count": len(samples), "login_ms": ms([a for a, _ in samples]),
            "auth_ms": ms([b for _, b in samples])}


def logins(port: int, count: int) -> dict[str, Any]:
    for _ in range(5):  # warm-up, not counted
        login(port)
    return latency_stats([login(port) for _ in range(count)])


# --------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------

def settle(pid: int, seconds: float = 1.0) -> float:
    time.sleep(seconds)
    return rss_mb(pid)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    limit = raise_nofile()
    if limit < args.connections + 100:
        raise BenchError(f"RLIMIT_NOFILE {limit} is too low for {args.connections} connections")
    tree = Path(args.tree).resolve()
    with tempfile.TemporaryDirectory(prefix="saslsmtp-idle-") as tmp:
        port = free_port()
        config = daemon_config(port)
        if args.old_config:  # a checkout before max_unauthenticated_time
            config = config.replace("max_unauthenticated_time = 3600.0\n", "")
        daemon = Daemon(tree, Path(tmp), config, port)
        with running(daemon):
            baseline = logins(port, args.logins)
            rss0 = settle(daemon.pid)
            status0 = vm_status(daemon.pid)
            held = Held(port, args.sources, not args.no_ehlo)
            series = [(0, rss0)]
            t0 = time.monotonic()
            try:
                while len(held.sockets) < args.connections:
                    held.open(min(args.step, args.connections - len(held.sockets)))
                    series.append((len(held.sockets), rss_mb(daemon.pid)))
                    print(f"  {len(held.sockets):>6} held: VmRSS {series[-1][1]:.1f} MB", flush=True)
                open_s = time.monotonic() - t0
                rss_n = settle(daemon.pid)
                status_n = vm_status(daemon.pid)
                loaded = logins(port, args.logins)
                alive, closed = held.still_open()
                rss_after = rss_mb(daemon.pid)
            finally:
                held.close()
            rss_released = settle(daemon.pid, 2.0)
    n = args.connections
    return {
        "connections": n, "sources": args.sources, "ehlo": not args.no_ehlo,
        "open_seconds": round(open_s, 2),
        "rss_mb": {"at_0": round(rss0, 2), f"at_{n}": round(rss_n, 2),
                   "after_logins": round(rss_after, 2), "after_close": round(rss_released, 2)},
        "status_at_0": status0, f"status_at_{n}": status_n,
        "per_connection_bytes": round((rss_n - rss0) * 1e6 / n),
        "series_mb": [[c, round(r, 2)] for c, r in series],
        "held_still_open": alive, "held_closed": closed,
        "logins_idle": baseline, "logins_held": loaded,
        "targets": {"rss_mb": RSS_TARGET_MB, "login_p95_ms": P95_TARGET_MS},
        "pass": rss_n < RSS_TARGET_MB and loaded["login_ms"]["p95"] < P95_TARGET_MS and closed == 0,
    }


def git_commit(tree: Path) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def markdown(result: dict[str, Any], meta: dict[str, Any]) -> str:
    n = result["connections"]
    rss = result["rss_mb"]
    idle, held = result["logins_idle"], result["logins_held"]

    def row(name: str, stats: dict[str, Any]) -> str:
        lo, au = stats["login_ms"], stats["auth_ms"]
        return (f"| {name} | {stats['count']} | {lo['p50']:.2f} | {lo['p95']:.2f} | {lo['p99']:.2f} "
                f"| {au['p50']:.2f} | {au['p95']:.2f} | {au['p99']:.2f} |")
    lines = [
        f"# Idle connections: {n:,} held, {meta['date']}, {meta['tree']}",
        "",
        f"commit {meta['commit']}, Python {meta['python']}, {meta['machine']}; "
        f"{result['sources']} source addresses, EHLO {'sent' if result['ehlo'] else 'not sent'}, "
        f"opened in {result['open_seconds']} s",
        "",
        "| daemon VmRSS | MB |",
        "| --- | --- |",
        f"| 0 held (after {idle['count']} logins) | {rss['at_0']:.1f} |",
        f"| {n:,} held | **{rss[f'at_{n}']:.1f}** (target < {RSS_TARGET_MB:.0f}) |",
        f"| after the logins | {rss['after_logins']:.1f} |",
        f"| all closed again | {rss['after_close']:.1f} |",
        "",
        f"Per held connection: **{result['per_connection_bytes']:,} bytes** "
        f"((RSS at {n:,} - RSS at 0) / {n:,}).",
        "",
        "| logins (sequential AUTH PLAIN) | n | connect->235 p50 | p95 | p99 | AUTH p50 | p95 | p99 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        row("no connection held", idle),
        row(f"{n:,} held", held),
        "",
        f"Held connections still open after the logins: {result['held_still_open']:,} "
        f"(closed or answered: {result['held_closed']}). "
        f"Targets met: **{'yes' if result['pass'] else 'NO'}** "
        f"(RSS < {RSS_TARGET_MB:.0f} MB, login p95 < {P95_TARGET_MS:.0f} ms).",
        "",
        "RSS while opening: " + ", ".join(f"{c:,}: {r:.1f}" for c, r in result["series_mb"]),
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", "-n", type=int, default=15000)
    parser.add_argument("--logins", type=int, default=200, help="logins measured, each phase")
    parser.add_argument("--sources", type=int, default=8, help="loopback source addresses")
    parser.add_argument("--step", type=int, default=2500, help="connections between RSS samples")
    parser.add_argument("--no-ehlo", action="store_true", help="hold after the greeting only")
    parser.add_argument("--tree", default=str(REPO), help="the saslsmtp checkout to run")
    parser.add_argument("--old-config", action="store_true",
                        help="leave out keys an older checkout does not know")
    parser.add_argument("--label", default="idle-connections")
    parser.add_argument("--no-save", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = measure(args)
    except BenchError as exc:
        print(f"idle_connections: {exc}", file=sys.stderr)
        return 2
    now = dt.datetime.now(dt.timezone.utc)
    meta = {"date": now.strftime("%Y-%m-%d %H:%M UTC"), "commit": git_commit(Path(args.tree)),
            "tree": str(Path(args.tree).resolve()),
            "python": platform.python_version(), "machine": f"{os.cpu_count()} CPUs, {platform.machine()}",
            "argv": sys.argv[1:]}
    text = markdown(result, meta)
    print(text)
    if not args.no_save:
        RESULTS.mkdir(exist_ok=True)
        stem = RESULTS / f"{now.strftime('%Y%m%d-%H%M%S')}-{args.label}"
        stem.with_suffix(".md").write_text(text)
        stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "result": result}, indent=2) + "\n")
        print(f"saved {stem}.md and .json")
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
