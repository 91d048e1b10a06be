#!/usr/bin/env python3
"""STARTTLS + AUTH PLAIN: saslsmtp against aiosmtpd, same certificate, same run.

For each scenario (certificate kind, with or without a resuming client) both servers are
started with one freshly made certificate, and ``smtp_auth_load.py --starttls`` (plus
``--tls-resume`` for the resumed scenarios) runs against each in turn at concurrency C,
alternating which goes first; each figure is the median of ``--repeat`` runs by
handshakes/s. Reported: handshakes/s, server CPU ms per session (utime+stime from
/proc), session p50/p99, how many handshakes resumed, and saslsmtp/aiosmtpd ratios.

    python3 benchmarks/tls.py                                   # RSA 2048, ECDSA P-256, resumed
    python3 benchmarks/tls.py --scenario rsa2048 -d 3 --repeat 1 --no-save   # quick look

saslsmtp runs as the real daemon (twistd, ``[tls]`` with the certificate, ``require_tls``);
aiosmtpd is ``aiosmtpd_tls_peer.py`` (the standard library's default server context,
STARTTLS and AUTH over TLS required). Results: ``results/<date>-tls.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import ssl
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import (REPO, RESULTS, BenchError, Server, bench_toml, free_port,  # noqa: E402
                 process_cpu_s, toml_string)

LOADGEN = HERE / "smtp_auth_load.py"
TLS_PEER = HERE / "aiosmtpd_tls_peer.py"
TARGET_RATIO = 1.1  # saslsmtp >= 1.1 x aiosmtpd's handshakes/s, RSA 2048, full handshakes
USER, PASSWORD = "bench", "benchpass"

#: scenario -> (certificate kind, resuming client)
SCENARIOS: dict[str, tuple[str, bool]] = {
    "rsa2048": ("rsa2048", False),
    "ecdsa-p256": ("ecdsa-p256", False),
    "rsa2048-resumed": ("rsa2048", True),
    "ecdsa-p256-resumed": ("ecdsa-p256", True),
}
DEFAULT_SCENARIOS = ("rsa2048", "ecdsa-p256", "rsa2048-resumed")


def make_certificate(kind: str, folder: Path) -> tuple[Path, Path]:
    """A self-signed server certificate (SHA-256) of ``kind``: (cert path, key path)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import NameOID

    key: Any
    if kind == "rsa2048":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif kind == "ecdsa-p256":
        key = ec.generate_private_key(ec.SECP256R1())
    else:
        raise ValueError(f"unknown certificate kind {kind!r}")
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench.test")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("bench.test")]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / f"{kind}-cert.pem", folder / f"{kind}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def saslsmtp_config(port: int, folder: Path, cert: Path, key: Path, log_format: str,
                    require_tls: bool = True) -> Path:
    """The daemon's config: STARTTLS with ``cert``, PLAIN/LOGIN only over TLS (unless
    ``require_tls`` is false: then also in plaintext, for a profile without TLS)."""
    (folder / "users").write_text(f"{USER}:{{PLAIN}}{PASSWORD}\n")
    config = folder / "saslsmtp.toml"
    config.write_text(bench_toml(
        f"tcp:{port}:interface=127.0.0.1", mechanisms=("PLAIN", "LOGIN"),
        require_tls=require_tls, server=f"log_format = {toml_string(log_format)}\n",
        tls=f"\n[tls]\ncertificate = {toml_string(str(cert))}\n"
            f"private_key = {toml_string(str(key))}\n",
        origin="benchmarks/tls.py"))
    return config


def servers(kind: str, folder: Path, args: argparse.Namespace) -> list[Server]:
    """saslsmtp and aiosmtpd, both serving ``kind``'s certificate."""
    cert, key = make_certificate(kind, folder)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    port = free_port()
    config = saslsmtp_config(port, folder, cert, key, args.log_format)
    log = args.saslsmtp_log or str(folder / "saslsmtp.log")
    saslsmtp = Server(
        "saslsmtp", [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                     "-n", "--pidfile=", f"--logfile={log}", "saslsmtp", "--config", str(config)],
        port, folder, env, "twistd saslsmtp, [tls] STARTTLS, require_tls, file backend")
    port = free_port()
    aiosmtpd = Server(
        "aiosmtpd", [sys.executable, str(TLS_PEER), str(port), "--cert", str(cert),
                     "--key", str(key), "--user", USER, "--password", PASSWORD],
        port, folder, None, "aiosmtpd 1.4.6, stdlib ssl default server context, "
                            "require_starttls, auth_require_tls")
    return [saslsmtp, aiosmtpd]


@dataclass
class Run:
    """One generator run against one server."""

    server: str
    scenario: str
    ok: bool
    problem: str
    handshakes_per_s: float
    cpu_ms_per_session: float | None
    session_p50: float | None
    session_p99: float | None
    resumed: int
    offered: int
    sessions: int
    client_cpu_pct: float | None
    loadgen: dict[str, Any] = field(repr=False)


def measure(server: Server, scenario: str, resume: bool, args: argparse.Namespace) -> Run:
    """The generator once against ``server``, its CPU read around the run."""
    argv = [sys.executable, str(LOADGEN), "--port", str(server.port), "--mech", "PLAIN",
            "--user", USER, "--password", PASSWORD, "--starttls",
            "--concurrency", str(args.concurrency), "--duration", str(args.duration),
            "--warmup", str(args.warmup), "--json"]
    if resume:
        argv.append("--tls-resume")
    if not server.alive():
        raise BenchError(f"{server.name} is no longer running:\n{server.output_tail()}")
    before = process_cpu_s(server.pid)
    try:
        done = subprocess.run(argv, capture_output=True, text=True,
                              timeout=args.warmup + args.duration + 90)
    except subprocess.TimeoutExpired:
        raise BenchError(f"load generator hung against {server.name}") from None
    used = process_cpu_s(server.pid) - before
    try:
        result = json.loads(done.stdout)
    except json.JSONDecodeError:
        raise BenchError(f"load generator failed against {server.name} (status "
                         f"{done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}") from None
    served = result["sessions_measured"] + result["sessions_warmup"] + result["sessions_cancelled"]
    problem = "" if done.returncode == 0 else f"generator status {done.returncode}: " + json.dumps(
        {k: result[k] for k in ("auth_failures", "unexpected_replies", "protocol_errors",
                                "connection_errors", "timeouts") if result.get(k)})
    session = result["latency_ms"]["session"]
    return Run(server.name, scenario, done.returncode == 0 and server.alive(), problem,
               result["handshakes_per_s"],
               round(1000.0 * used / served, 4) if served else None,
               session["p50"], session["p99"], result.get("tls_resumed", 0),
               result.get("tls_offered", 0), result["sessions_measured"],
               result.get("client_cpu_pct_of_one_core"), result)


def median_run(runs: list[Run]) -> Run:
    """The run with the median handshakes/s (the lower middle for an even count)."""
    ordered = sorted(runs, key=lambda r: r.handshakes_per_s)
    return ordered[(len(ordered) - 1) // 2]


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None."""
    return None if a is None or not b else a / b


def fmt(value: float | None, digits: int = 2) -> str:
    """A table cell."""
    return "-" if value is None else f"{value:,.{digits}f}"


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The results table and the verdict."""
    out = [f"# STARTTLS + AUTH PLAIN: saslsmtp vs aiosmtpd — {meta['started']}", "",
           f"- saslsmtp: {meta['servers']['saslsmtp']}",
           f"- aiosmtpd: {meta['servers']['aiosmtpd']}",
           f"- load: smtp_auth_load.py --starttls [--tls-resume], concurrency "
           f"{meta['concurrency']}, {meta['warmup_s']} s warm-up + {meta['duration_s']} s, "
           f"median of {meta['repeat']} by hs/s, servers alternately first; "
           f"{meta['cpus']} CPUs shared by both servers and the generator",
           f"- client OpenSSL: {meta['client_openssl']}; saslsmtp's (pyOpenSSL): "
           f"{meta['server_openssl']}",
           "- CPU = server process CPU ms per session; resumed = handshakes that resumed "
           "/ offered a session; ratio = saslsmtp / aiosmtpd", "",
           "| scenario | hs/s saslsmtp | hs/s aiosmtpd | hs/s ratio | CPU ms saslsmtp "
           "| CPU ms aiosmtpd | CPU ratio | p50/p99 ms saslsmtp | p50/p99 ms aiosmtpd "
           "| resumed saslsmtp | resumed aiosmtpd | gen CPU % s/a |",
           "|" + " --- |" * 12]
    notes = []
    for row in rows:
        s, a = row["saslsmtp"], row["aiosmtpd"]
        resumed = (lambda r: f"{r.resumed}/{r.offered}" if r.offered else "-")
        out.append(
            f"| {row['scenario']} | {fmt(s.handshakes_per_s, 0)} | {fmt(a.handshakes_per_s, 0)} "
            f"| {fmt(ratio(s.handshakes_per_s, a.handshakes_per_s))} "
            f"| {fmt(s.cpu_ms_per_session, 3)} | {fmt(a.cpu_ms_per_session, 3)} "
            f"| {fmt(ratio(s.cpu_ms_per_session, a.cpu_ms_per_session))} "
            f"| {fmt(s.session_p50)} / {fmt(s.session_p99)} "
            f"| {fmt(a.session_p50)} / {fmt(a.session_p99)} "
            f"| {resumed(s)} | {resumed(a)} "
            f"| {fmt(s.client_cpu_pct, 0)} / {fmt(a.client_cpu_pct, 0)} |")
        for r in (s, a):
            if not r.ok:
                notes.append(f"- {r.server} {r.scenario}: {r.problem}")
    out.append("")
    for row in rows:
        if row["scenario"] == "rsa2048":
            s, a = row["saslsmtp"], row["aiosmtpd"]
            r = ratio(s.handshakes_per_s, a.handshakes_per_s)
            met = r is not None and r >= TARGET_RATIO and s.ok and a.ok
            out.append(f"- target: saslsmtp >= {TARGET_RATIO} x aiosmtpd hs/s, RSA 2048, "
                       f"C={meta['concurrency']}: **{'met' if met else 'NOT met'}** "
                       f"(ratio {fmt(r)})")
    if notes:
        out += ["", "Problems:", *notes]
    return "\n".join(out) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenario", action="append", choices=sorted(SCENARIOS),
                   help=f"repeatable; default {', '.join(DEFAULT_SCENARIOS)}")
    p.add_argument("--concurrency", "-c", type=int, default=16)
    p.add_argument("--duration", "-d", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="saslsmtp's log format (its log goes to a file either way)")
    p.add_argument("--saslsmtp-log", default=None, metavar="FILE",
                   help="saslsmtp's log file (default: one in the temporary folder)")
    p.add_argument("--label", default="tls")
    p.add_argument("--no-save", action="store_true", help="print only, write no results file")
    args = p.parse_args(argv)
    args.scenario = args.scenario or list(DEFAULT_SCENARIOS)
    if args.repeat < 1 or args.concurrency < 1 or args.duration <= 0:
        p.error("--repeat, --concurrency and --duration must be positive")
    return args


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every scenario, grouped by certificate so each pair of servers starts once."""
    from OpenSSL import SSL
    started = dt.datetime.now()
    meta: dict[str, Any] = {
        "started": started.strftime("%Y-%m-%d %H:%M:%S"), "concurrency": args.concurrency,
        "duration_s": args.duration, "warmup_s": args.warmup, "repeat": args.repeat,
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "client_openssl": ssl.OPENSSL_VERSION,
        "server_openssl": SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode(),
        "servers": {}}
    rows: list[dict[str, Any]] = []
    kinds = list(dict.fromkeys(SCENARIOS[s][0] for s in args.scenario))
    turn = 0
    for kind in kinds:
        with tempfile.TemporaryDirectory(prefix="saslsmtp-tls-bench-") as tmp:
            pair = servers(kind, Path(tmp), args)
            meta["servers"] = {s.name: s.description for s in pair}
            try:
                for server in pair:
                    server.start()
                for scenario in (s for s in args.scenario if SCENARIOS[s][0] == kind):
                    resume = SCENARIOS[scenario][1]
                    runs: dict[str, list[Run]] = {s.name: [] for s in pair}
                    for _ in range(args.repeat):
                        order = pair if turn % 2 == 0 else pair[::-1]
                        turn += 1
                        for server in order:
                            r = measure(server, scenario, resume, args)
                            runs[server.name].append(r)
                            print(f"  {scenario:<20} {server.name:<9} {r.handshakes_per_s:8.1f} hs/s"
                                  f"  {fmt(r.cpu_ms_per_session, 3)} ms CPU"
                                  f"{f'  resumed {r.resumed}/{r.offered}' if resume else ''}"
                                  f"{'' if r.ok else '  ' + r.problem}", file=sys.stderr)
                    rows.append({"scenario": scenario, "runs": runs,
                                 **{name: median_run(rs) for name, rs in runs.items()}})
            finally:
                for server in pair:
                    server.stop()
    return rows, meta


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Run, print the table, save the results; servers are stopped on every way out."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    args = parse_args(argv)
    try:
        rows, meta = run(args)
    except BenchError as exc:
        print(f"tls.py: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tls.py: interrupted; servers stopped", file=sys.stderr)
        return 130
    text = markdown(rows, meta)
    print(text)
    if not args.no_save:
        RESULTS.mkdir(exist_ok=True)
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        base = RESULTS / f"{stamp}-{args.label}"
        base.with_suffix(".md").write_text(text)
        data = {"meta": meta, "scenarios": [
            {"scenario": row["scenario"],
             "median": {name: {k: v for k, v in asdict(row[name]).items() if k != "loadgen"}
                        for name in ("saslsmtp", "aiosmtpd")},
             "ratios": {"handshakes_per_s": ratio(row["saslsmtp"].handshakes_per_s,
                                                  row["aiosmtpd"].handshakes_per_s),
                        "cpu_ms_per_session": ratio(row["saslsmtp"].cpu_ms_per_session,
                                                    row["aiosmtpd"].cpu_ms_per_session)},
             "runs": {name: [asdict(r) for r in rs] for name, rs in row["runs"].items()}}
            for row in rows]}
        base.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
        print(f"saved {base}.md and .json", file=sys.stderr)
    bad = any(not row[name].ok for row in rows for name in ("saslsmtp", "aiosmtpd"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
