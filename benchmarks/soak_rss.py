#!/usr/bin/env python3
"""Real-socket soak: does the daemon's resident memory grow with the number of sessions?

Starts the real daemon (``twistd -n saslsmtp`` from ``--tree``, logging to a file, with a
``[tls]`` certificate made here, a plain listener offering STARTTLS and a ``haproxy:tcp:``
listener), drives ``--sessions`` short sessions against it from ``--clients`` client
processes, each a fresh TCP connection from one of 8 loopback source addresses, in a fixed
mix of kinds:

==================  ===============================================================
``auth_ok``         EHLO, AUTH PLAIN (right password), QUIT
``auth_fail``       EHLO, AUTH PLAIN (wrong password, 535), QUIT
``starttls_auth``   EHLO, STARTTLS, TLS handshake, EHLO, AUTH PLAIN, QUIT
``tls_abort``       EHLO, STARTTLS, then half a ClientHello, or a whole one and part
                    of the server's answer read, then a reset (RST)
``proxy``           a PROXY v1 header with one of 1,000 client addresses, EHLO, AUTH, QUIT
``garbage``         pipelined junk (unknown verbs, NUL, 8-bit, overlong, bare LF), then
                    either read until the daemon closes or reset at once
``data_reset``      EHLO, AUTH, MAIL, RCPT, DATA, 8 KB of body, then a reset mid-DATA
``connect_reset``   connect, reset before reading the greeting
==================  ===============================================================

The daemon's ``VmRSS`` (``/proc/PID/status``, not tracemalloc: OpenSSL's and the kernel
interface's allocations are outside the Python heap), its open descriptors and its
threads are sampled every ``--step`` sessions.  Reported: the series, and the growth after
``--warm-up`` sessions (last sample minus the first one after the warm-up, per session,
and the least-squares slope over those samples, in bytes per session).

    flock /tmp/saslsmtp-bench.lock python3 benchmarks/soak_rss.py --sessions 200000
    python3 benchmarks/soak_rss.py --tree /tmp/old --label old   # another checkout, same mix
    python3 benchmarks/soak_rss.py --sessions 20000 --no-save   # quick

Results: ``benchmarks/results/<date>-soak-rss-<label>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import json
import multiprocessing
import os
import platform
import random
import socket
import ssl
import statistics
import struct
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from idle_connections import (  # noqa: E402
    PASSWORD, RESULTS, USER, BenchError, Daemon, daemon_config, free_port, git_commit, running,
    vm_status)

GOOD = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode())
BAD = base64.b64encode(f"\0{USER}\0wrong".encode())
KINDS = ("auth_ok", "auth_fail", "starttls_auth", "tls_abort", "proxy", "garbage",
         "data_reset", "connect_reset")
SOURCES = [f"127.0.0.{2 + i}" for i in range(8)]
TIMEOUT = 10.0
LIMITS = """
[limits]
store = "memory"
connections_per_ip = 1000
connection_rate_per_ip = "1000000/1m"
auth_failures_per_ip = "1000000/1m"
auth_failures_per_user = "1000000/1m"
messages_per_user = "1000000/1m"
recipients_per_user = "1000000/1m"

[auth.cache]
ttl = 300
"""


# --------------------------------------------------------------------------
# The sessions (run in the client processes)
# --------------------------------------------------------------------------

UNIQUE = False  # each session from its own source address (set in the client processes)


def source(n: int) -> str:
    """Session ``n``'s loopback source address: one of 8, or with ``UNIQUE`` its own
    (127.1.0.1 onwards: 16.5 million before one repeats)."""
    if not UNIQUE:
        return SOURCES[n % len(SOURCES)]
    return f"127.{1 + n // 65536 % 254}.{n // 256 % 256}.{1 + n % 254}"


class Conn:
    """A blocking client socket with SMTP reply reading."""

    def __init__(self, port: int, n: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT,
                                             source_address=(source(n), 0))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()

    def reply(self) -> bytes:
        while True:
            start = 0
            while True:
                end = self.buf.find(b"\r\n", start)
                if end < 0:
                    break
                line = self.buf[start:end]
                if len(line) < 4 or line[3:4] != b"-":
                    out = bytes(self.buf[:end + 2])
                    del self.buf[:end + 2]
                    return out
                start = end + 2
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed by the daemon")
            self.buf += data

    def command(self, line: bytes, expect: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        answer = self.reply()
        if not answer.startswith(expect):
            raise ValueError(f"{line[:12]!r} answered {answer[:60]!r}")
        return answer

    def reset(self) -> None:
        """Close with a RST (SO_LINGER 0)."""
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def _login_and_quit(c: Conn, token: bytes = GOOD, expect: bytes = b"235") -> None:
    c.command(b"EHLO soak.client.test", b"250")
    c.command(b"AUTH PLAIN " + token, expect)
    c.command(b"QUIT", b"221")


@contextlib.contextmanager
def greeted(port: int, n: int, *, reset: bool = False, proxy_line: bytes = b"") -> Iterator[Conn]:
    """A connection past the 220 (after ``proxy_line``, a PROXY header), closed afterwards,
    or reset (SO_LINGER 0) with ``reset``."""
    c = Conn(port, n)
    try:
        if proxy_line:
            c.sock.sendall(proxy_line)
        c.reply()
        yield c
    finally:
        c.reset() if reset else c.close()


def auth_ok(port: int, proxy_port: int, n: int, rng: random.Random) -> None:
    with greeted(port, n) as c:
        _login_and_quit(c)


def auth_fail(port: int, proxy_port: int, n: int, rng: random.Random) -> None:
    with greeted(port, n) as c:
        _login_and_quit(c, BAD, b"535")


def _client_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


CLIENT_TLS: ssl.SSLContext | None = None


def _starttls(c: Conn) -> ssl.SSLContext:
    c.command(b"EHLO soak.client.test", b"250")
    c.command(b"STARTTLS", b"220")
    assert CLIENT_TLS is not None
    return CLIENT_TLS


def starttls_auth(port: int, proxy_port: int, n: int, rng: random.Random) -> None:
    with greeted(port, n) as c:
        c.sock = _starttls(c).wrap_socket(c.sock, server_hostname="saslsmtp.bench.test")
        _login_and_quit(c)


def tls_abort(port: int, proxy_port: int, n: int, rng: random.Random) -> None:
    with greeted(port, n, reset=True) as c:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = _starttls(c).wrap_bio(incoming, outgoing, server_hostname="saslsmtp.bench.test")
        with contextlib.suppress(ssl.SSLWantReadError):
            tls.do_handshake()
        hello = outgoing.read()
        if n % 2:
            c.sock.sendall(hello[:len(hello) // 2])  # half a ClientHello
        else:
            c.sock.sendall(hello)  # a whole one, and part of the server's answer read
            c.sock.recv(200)


def proxy(port: int, proxy_port: int, n: int, rng: random.Random) -> None:
    a = n % 1000
    client = f"10.{n // 65536 % 256}.{n // 256 % 256}.{n % 256}" if UNIQUE else f"10.9.{a // 256}.{a % 256}"
    header = f"PROXY TCP4 {client} 192.0.2.1 {1024 + n % 60000} 587\r\n".encode()
    with greeted(proxy_port, n, proxy_line=header) as c:
        _login_and_quit(c)


def garbage(port: int, proxy_port: int, n: int, rng: random.Random) -> None:
    with greeted(port, n, reset=bool(n % 2)) as c:  # odd: gone before the replies are read
        parts = [b"EHLO x\r\n", b"FOO bar\r\n", b"\x00\xff\xfe junk\r\n", b"NOOP\r\n",
                 b"MAIL FROM:<a@b>\r\n", b"AUTH PLAIN !!\r\n", b"AUTH LOGIN\r\n*\r\n",
                 bytes(rng.getrandbits(8) for _ in range(rng.randrange(10, 200))) + b"\r\n",
                 b"A" * rng.choice((100, 3000, 20000)) + b"\r\n", b"RCPT TO:<x>\r\n"]
        rng.shuffle(parts)
        payload = b"".join(parts[:rng.randrange(2, len(parts))])
        if n % 3 == 0:
            payload += b"bare LF\n"
        c.sock.sendall(payload)
        if n % 2:
            return
        c.sock.sendall(b"QUIT\r\n")
        with contextlib.suppress(OSError):
            while c.sock.recv(65536):
                pass


def data_reset(port: int, proxy_port: int, n: int, rng: random.Random) -> None:
    with greeted(port, n, reset=True) as c:
        c.command(b"EHLO soak.client.test", b"250")
        c.command(b"AUTH PLAIN " + GOOD, b"235")
        c.command(b"MAIL FROM:<bench@example.test>", b"250")
        c.command(b"RCPT TO:<rcpt@example.test>", b"250")
        c.command(b"DATA", b"354")
        c.sock.sendall(b"Subject: soak\r\n\r\n" + b"x" * 78 + b"\r\n" * 100)


def connect_reset(port: int, proxy_port: int, n: int, rng: random.Random) -> None:
    Conn(port, n).reset()


SESSION: dict[str, Callable[[int, int, int, random.Random], None]] = {
    "auth_ok": auth_ok, "auth_fail": auth_fail, "starttls_auth": starttls_auth,
    "tls_abort": tls_abort, "proxy": proxy, "garbage": garbage, "data_reset": data_reset,
    "connect_reset": connect_reset}


def run_chunk(job: tuple[int, int, int, int, tuple[str, ...], bool]) -> dict[str, Any]:
    """Sessions ``first`` ... ``stop - 1``; counts and errors."""
    global CLIENT_TLS, UNIQUE
    port, proxy_port, first, stop, kinds, UNIQUE = job
    if CLIENT_TLS is None:
        CLIENT_TLS = _client_context()
    rng = random.Random(first)
    done: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    samples: list[str] = []
    for n in range(first, stop):
        kind = kinds[n % len(kinds)]
        try:
            SESSION[kind](port, proxy_port, n, rng)
            done[kind] += 1
        except (OSError, ValueError, ssl.SSLError) as exc:
            if kind in ("tls_abort", "garbage", "connect_reset", "data_reset") and isinstance(
                    exc, (ConnectionError, ssl.SSLError)):
                done[kind] += 1  # the daemon closing first is fine for these
                continue
            errors[kind] += 1
            if len(samples) < 3:
                samples.append(f"{kind}: {type(exc).__name__}: {exc}")
    return {"done": dict(done), "errors": dict(errors), "samples": samples}


# --------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------

def make_certificate(workdir: Path) -> tuple[Path, Path]:
    """A self-signed certificate for the daemon (cryptography)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "saslsmtp.bench.test")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("saslsmtp.bench.test")]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = workdir / "cert.pem", workdir / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def sample(pid: int) -> dict[str, int]:
    status = vm_status(pid)
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    threads = len(os.listdir(f"/proc/{pid}/task"))
    return {"rss": status["VmRSS"], "anon": status.get("RssAnon", 0), "fds": fds, "threads": threads}


def slope(points: list[tuple[int, int]]) -> float:
    """Least-squares bytes per session."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


def soak(args: argparse.Namespace) -> dict[str, Any]:
    tree = Path(args.tree).resolve()
    kinds = tuple(args.kinds.split(",")) if args.kinds else KINDS
    with tempfile.TemporaryDirectory(prefix="saslsmtp-soak-") as tmp:
        workdir = Path(tmp)
        cert, key = make_certificate(workdir)
        port, proxy_port = free_port(), free_port()
        extra = f'\n[tls]\ncertificate = "{cert}"\nprivate_key = "{key}"\n'
        config = daemon_config(port, extra=extra).replace(
            f'listen = ["tcp:{port}:interface=127.0.0.1:backlog=1024"]',
            f'listen = ["tcp:{port}:interface=127.0.0.1:backlog=1024", '
            f'"haproxy:tcp:{proxy_port}:interface=127.0.0.1:backlog=1024"]')
        if args.old_config:  # a checkout before max_unauthenticated_time
            config = config.replace("max_unauthenticated_time = 3600.0\n", "")
        config = config.replace("idle_timeout = 3600.0", "idle_timeout = 60.0")
        if args.limits:  # every limit on, none reached; the auth cache on
            config += LIMITS
        daemon = Daemon(tree, workdir, config, port)
        series: list[dict[str, Any]] = []
        done: Counter[str] = Counter()
        errors: Counter[str] = Counter()
        samples: list[str] = []
        started = time.monotonic()
        with running(daemon), multiprocessing.get_context("fork").Pool(args.clients) as pool:
            series.append({"sessions": 0, **sample(daemon.pid), "seconds": 0.0})
            n = 0
            while n < args.sessions:
                step = min(args.step, args.sessions - n)
                bounds = [n + step * i // args.clients for i in range(args.clients + 1)]
                jobs = [(port, proxy_port, bounds[i], bounds[i + 1], kinds, args.unique_addresses)
                        for i in range(args.clients)]
                for result in pool.map(run_chunk, jobs):
                    done.update(result["done"])
                    errors.update(result["errors"])
                    samples.extend(result["samples"][:3 - len(samples)] if len(samples) < 3 else [])
                n += step
                time.sleep(0.3)  # closing sessions settle
                point = {"sessions": n, **sample(daemon.pid),
                         "seconds": round(time.monotonic() - started, 1)}
                series.append(point)
                print(f"  {n:>8,} sessions: VmRSS {point['rss'] / 1e6:6.1f} MB, "
                      f"{point['fds']} fds, {point['threads']} threads, "
                      f"errors {sum(errors.values())}", flush=True)
                if daemon.proc is None or daemon.proc.poll() is not None:
                    raise BenchError(f"the daemon died:\n{daemon.log_tail()}")
            log_size = sum(f.stat().st_size for f in workdir.glob("saslsmtp.log*"))  # rotated too
    after = [p for p in series if p["sessions"] >= args.warm_up]
    first, last = after[0], after[-1]
    counted = max(1, last["sessions"] - first["sessions"])
    return {
        "tree": str(tree), "commit": git_commit(tree), "sessions": args.sessions,
        "unique_addresses": args.unique_addresses, "limits": args.limits,
        "clients": args.clients, "kinds": list(kinds), "warm_up": first["sessions"],
        "done": dict(done), "errors": dict(errors), "error_samples": samples,
        "seconds": series[-1]["seconds"], "log_bytes": log_size,
        "rss_mb": {"start": round(series[0]["rss"] / 1e6, 2),
                   "after_warm_up": round(first["rss"] / 1e6, 2),
                   "end": round(last["rss"] / 1e6, 2), "max": round(max(p["rss"] for p in series) / 1e6, 2)},
        "growth_bytes_per_session": round((last["rss"] - first["rss"]) / counted, 2),
        "slope_bytes_per_session": round(slope([(p["sessions"], p["rss"]) for p in after]), 2),
        "anon_slope_bytes_per_session": round(slope([(p["sessions"], p["anon"]) for p in after]), 2),
        "fds": {"start": series[0]["fds"], "end": last["fds"]},
        "series": series,
    }


def markdown(r: dict[str, Any], meta: dict[str, Any]) -> str:
    rss = r["rss_mb"]
    every = max(1, len(r["series"]) // 12)
    shown = r["series"][::every] + ([r["series"][-1]] if (len(r["series"]) - 1) % every else [])
    lines = [
        f"# RSS soak, {r['sessions']:,} real-socket sessions: {meta['label']}, {meta['date']}",
        "",
        f"tree {r['tree']} (commit {r['commit']}), Python {meta['python']}, {meta['machine']}; "
        f"{r['clients']} client processes, {r['seconds']:.0f} s; kinds in turn: {', '.join(r['kinds'])}; "
        f"{'every session from its own address' if r['unique_addresses'] else '8 source addresses, 1,000 PROXY clients'}; "
        f"{'all [limits] on (memory store) and [auth.cache]' if r['limits'] else 'no [limits]'}",
        "",
        "| VmRSS | MB |",
        "| --- | --- |",
        f"| at start | {rss['start']:.1f} |",
        f"| after {r['warm_up']:,} sessions (warm-up) | {rss['after_warm_up']:.1f} |",
        f"| at the end | {rss['end']:.1f} |",
        f"| highest sample | {rss['max']:.1f} |",
        "",
        f"Growth after the warm-up: **{r['growth_bytes_per_session']:.2f} bytes per session** "
        f"(last - first sample); least-squares slope {r['slope_bytes_per_session']:.2f} B/session "
        f"(RssAnon: {r['anon_slope_bytes_per_session']:.2f}). Open descriptors "
        f"{r['fds']['start']} -> {r['fds']['end']}. Daemon log (with rotated files): "
        f"{r['log_bytes'] / 1e6:.1f} MB.",
        "",
        "Sessions completed by kind: " + ", ".join(f"{k} {v:,}" for k, v in sorted(r["done"].items())),
        "",
        "Errors by kind: " + (", ".join(f"{k} {v:,}" for k, v in sorted(r["errors"].items())) or "none")
        + ("" if not r["error_samples"] else " (e.g. " + "; ".join(r["error_samples"]) + ")"),
        "",
        "| sessions | VmRSS MB | RssAnon MB | fds | threads | s |",
        "| --- | --- | --- | --- | --- | --- |",
        *(f"| {p['sessions']:,} | {p['rss'] / 1e6:.1f} | {p['anon'] / 1e6:.1f} | {p['fds']} "
          f"| {p['threads']} | {p['seconds']} |" for p in shown),
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=200000)
    parser.add_argument("--step", type=int, default=10000, help="sessions between samples")
    parser.add_argument("--warm-up", type=int, default=20000)
    parser.add_argument("--clients", type=int, default=3, help="client processes")
    parser.add_argument("--kinds", default="", help="comma-separated subset of " + ",".join(KINDS))
    parser.add_argument("--each-kind", action="store_true",
                        help="one daemon and one soak per kind (--sessions each), one summary")
    parser.add_argument("--unique-addresses", action="store_true",
                        help="every session from its own source address (and PROXY client)")
    parser.add_argument("--limits", action="store_true",
                        help="every [limits] key set (memory store, none reached) and [auth.cache]")
    parser.add_argument("--tree", default=str(REPO))
    parser.add_argument("--old-config", action="store_true",
                        help="leave out keys an older checkout does not know")
    parser.add_argument("--label", default="current")
    parser.add_argument("--no-save", action="store_true")
    return parser.parse_args(argv)


def each_kind_markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    r0 = results[0]
    lines = [
        f"# RSS soak by kind, {r0['sessions']:,} real-socket sessions each: {meta['label']}, "
        f"{meta['date']}",
        "",
        f"tree {r0['tree']} (commit {r0['commit']}), Python {meta['python']}, {meta['machine']}; "
        f"{r0['clients']} client processes; a fresh daemon per kind; growth counted after "
        f"{r0['warm_up']:,} sessions",
        "",
        "| kind | VmRSS start | after warm-up | end | growth B/session | slope B/session | fds | errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        rss = r["rss_mb"]
        lines.append(f"| {r['kinds'][0]} | {rss['start']:.1f} | {rss['after_warm_up']:.1f} | "
                     f"{rss['end']:.1f} | {r['growth_bytes_per_session']:.2f} | "
                     f"{r['slope_bytes_per_session']:.2f} | {r['fds']['start']} -> {r['fds']['end']} | "
                     f"{sum(r['errors'].values())} |")
    return "\n".join(lines + [""])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    now = dt.datetime.now(dt.timezone.utc)
    meta = {"date": now.strftime("%Y-%m-%d %H:%M UTC"), "label": args.label,
            "python": platform.python_version(), "machine": f"{os.cpu_count()} CPUs, {platform.machine()}",
            "argv": sys.argv[1:]}
    try:
        if args.each_kind:
            results = []
            for kind in (args.kinds.split(",") if args.kinds else KINDS):
                print(f"{kind}:", flush=True)
                results.append(soak(argparse.Namespace(**{**vars(args), "kinds": kind})))
            text = each_kind_markdown(results, meta)
            print(text)
            if not args.no_save:
                stem = RESULTS / f"{now.strftime('%Y%m%d-%H%M%S')}-soak-rss-by-kind-{args.label}"
                stem.with_suffix(".md").write_text(text)
                stem.with_suffix(".json").write_text(
                    json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
                print(f"saved {stem}.md and .json")
            return 0 if not any(r["errors"] for r in results) else 1
        result = soak(args)
    except BenchError as exc:
        print(f"soak_rss: {exc}", file=sys.stderr)
        return 2
    text = markdown(result, meta)
    print(text)
    if not args.no_save:
        stem = RESULTS / f"{now.strftime('%Y%m%d-%H%M%S')}-soak-rss-{args.label}"
        stem.with_suffix(".md").write_text(text)
        stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "result": result}, indent=2) + "\n")
        print(f"saved {stem}.md and .json")
    return 0 if not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
