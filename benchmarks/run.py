#!/usr/bin/env python3
"""Benchmark saslsmtp against its peers, in the same run, with the same load generator.

The peers: aiosmtpd (``aiosmtpd_peer.py``), a real Postfix smtpd doing SASL through
Dovecot (``postfix_peer.py``, needs root) and the generator's null server
(``null_smtp_server.py``, the floor).  For every scenario point (mechanism x
concurrency) it runs ``smtp_auth_load.py --json`` against each server in turn
(alternating the order), and reports handshakes/s, session and AUTH latency p50/p99, and
the server's CPU per session (utime+stime from /proc/PID/stat before/after the run, of
every process of the server, divided by the sessions it served), with the ratios
saslsmtp/aiosmtpd, saslsmtp/postfix and saslsmtp CPU / null CPU.

    python3 benchmarks/run.py                       # saslsmtp, aiosmtpd: PLAIN at C = 1, 16, 64
    python3 benchmarks/run.py --servers all --mech PLAIN --mech LOGIN -c 16 -d 10
    python3 benchmarks/run.py --servers all --mode mail
    python3 benchmarks/run.py --servers all --starttls --cert ecdsa-p256
    python3 benchmarks/run.py --saslsmtp-config my.toml   # a prepared config (other backends)

Every server listens on a free loopback port, is started here and always stopped at the
end (also on errors and Ctrl-C). Results: benchmarks/results/<date>-<label>.json and .md,
and benchmarks/results/latest.md; the markdown table also goes to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # also when run with runpy
import c_loadgen  # noqa: E402
REPO = HERE.parent
LOADGEN = HERE / "smtp_auth_load.py"
PEER = HERE / "aiosmtpd_peer.py"
NULL_SERVER = HERE / "null_smtp_server.py"
RESULTS = HERE / "results"
POSTFIX_PEER = HERE / "postfix_peer.py"
SERVERS = ("saslsmtp", "aiosmtpd", "postfix", "null")
DEFAULT_SERVERS = "saslsmtp,aiosmtpd"
#: Mechanisms each server can serve (aiosmtpd has only PLAIN and LOGIN built in).
SERVER_MECHS = {"aiosmtpd": ("PLAIN", "LOGIN")}
#: Servers that cannot do STARTTLS (every one can now).
NO_STARTTLS: tuple[str, ...] = ()
CLK_TCK = os.sysconf("SC_CLK_TCK")
TARGET_CONCURRENCY = 16  # our target: saslsmtp >= aiosmtpd at concurrency 16


class BenchError(Exception):
    """The benchmark cannot go on (a server did not start, the generator failed...)."""


# --------------------------------------------------------------------------
# Server processes
# --------------------------------------------------------------------------

def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: Which /proc/PID/stat times count as the server's CPU (indexes into the fields after
#: "pid (comm) ", so fields[0] is field 3, state): utime, stime, cutime, cstime (fields
#: 14-17).  ``CPU_PARTS`` narrows it to the user or the kernel part (limits_cpu --cpu-part).
CPU_PARTS = {"all": (11, 12, 13, 14), "user": (11, 13), "system": (12, 14)}
CPU_FIELDS = CPU_PARTS["all"]


def process_cpu_s(pid: int) -> float:
    """utime+stime (+ waited-for children) of ``pid`` in seconds, from /proc/PID/stat."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # the process is gone
        return float("nan")
    fields = raw[raw.rindex(")") + 2:].split()  # fields after "pid (comm) "
    return sum(int(fields[i]) for i in CPU_FIELDS) / CLK_TCK


def process_family(pid: int) -> list[int]:
    """``pid`` and its children (a saslsmtp master's workers)."""
    out = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


@dataclass
class Server:
    """One server under test, running as a child process."""

    name: str
    argv: list[str]
    port: int
    cwd: Path
    env: dict[str, str] | None = None
    description: str = ""
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    family: bool = False  # count the children too (saslsmtp's master and its workers)

    def start(self, timeout: float = 30.0) -> None:
        """Start the process and wait until it sends a 220 greeting."""
        self.log_path = self.cwd / f"{self.name}.stderr"
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            self.argv, cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        last_error = "no attempt"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited with status {self.proc.returncode} "
                                 f"before accepting connections:\n{self.output_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2.0) as s:
                    s.settimeout(5.0)
                    greeting = s.recv(512)
                    if greeting.startswith(b"220"):
                        s.sendall(b"QUIT\r\n")
                        with contextlib.suppress(OSError):
                            s.recv(512)
                        return
                    last_error = f"greeting {greeting[:80]!r}"
            except OSError as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            time.sleep(0.1)
        raise BenchError(f"{self.name} did not greet on 127.0.0.1:{self.port} within "
                         f"{timeout:.0f} s ({last_error}):\n{self.output_tail()}\n"
                         "(for saslsmtp, --saslsmtp-log FILE keeps twistd's log)")

    @property
    def pid(self) -> int:
        """The server's process id."""
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.proc is not None and self.proc.poll() is None

    def cpu_s(self) -> float:
        """CPU seconds of the server process so far (all its threads, waited-for children;
        with ``family``, its live children too)."""
        if not self.family:
            return process_cpu_s(self.pid)
        return sum(v for v in map(process_cpu_s, process_family(self.pid)) if v == v)

    def settle(self) -> float:
        """Nothing to wait for: these servers store mail before their 250."""
        return 0.0

    def output_tail(self, lines: int = 30) -> str:
        """The end of the process's stdout/stderr."""
        if self.log_path is None or not self.log_path.exists():
            return "(no output)"
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:]) or "(no output)"

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s; idempotent."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


# --------------------------------------------------------------------------
# saslsmtp configuration
# --------------------------------------------------------------------------

def toml_string(value: str) -> str:
    """A TOML basic string."""
    return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes


MAILDIR = '[delivery]\ntype = "maildir"\npath = "mail"\n'


def bench_toml(listen: str, *, mechanisms: Sequence[str] = ("PLAIN",),
               backends: Sequence[str] = ("bench",), require_tls: bool = False,
               server: str = "", tls: str = "", auth: str = "", delivery: str = MAILDIR,
               extra: str = "", origin: str = "benchmarks") -> str:
    """The saslsmtp config every benchmark starts from: one listener, the ``bench`` users
    file (``users`` beside the config), no failure delay, a Maildir; ``server``, ``tls``,
    ``auth``, ``delivery`` and ``extra`` are TOML lines a script adds or replaces."""
    return f"""# generated by {origin}
[server]
hostname = "saslsmtp.bench.test"
listen = [{toml_string(listen)}]
{server}{tls}
[auth]
mechanisms = [{", ".join(toml_string(m) for m in mechanisms)}]
require_tls = {"true" if require_tls else "false"}
backends = [{", ".join(toml_string(b) for b in backends)}]
failure_delay = 0
{auth}
[backends.bench]
type = "file"
path = "users"

{delivery}{extra}"""


def generated_config(port: int, workdir: Path, args: argparse.Namespace) -> Path:
    """Write the benchmark's saslsmtp config (and users file) into ``workdir``."""
    users = workdir / "users"
    lines = [f"{args.user}:{{PLAIN}}{args.password}", *args.users_line]
    users.write_text("\n".join(lines) + "\n")
    mechanisms = list(dict.fromkeys(m.upper() for m in (args.auth_mechanisms or ["PLAIN", "LOGIN"])))
    for mech in args.mech:
        if mech not in mechanisms:
            mechanisms.append(mech)
    backends = args.auth_backends or ["bench"]
    auth_extra = "".join(f"{item}\n" for item in args.auth_option)
    text = bench_toml(f"tcp:{port}:interface=127.0.0.1", mechanisms=mechanisms,
                      backends=backends, auth=auth_extra, origin="benchmarks/run.py")
    if args.tls_files:
        cert, key = args.tls_files
        text += f"""
[tls]
certificate = {toml_string(str(cert))}
private_key = {toml_string(str(key))}
"""
    for fragment in args.config_fragment:
        text += f"\n# from {fragment}\n" + Path(fragment).read_text()
    config = workdir / "saslsmtp.toml"
    config.write_text(text)
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BenchError(f"generated config is not valid TOML ({exc}):\n{text}") from None
    return config


def port_of_config(path: Path) -> int:
    """The port of the first plain ``tcp:`` listener in a prepared saslsmtp config."""
    data = tomllib.loads(path.read_text())
    for endpoint in data.get("server", {}).get("listen", []):
        match = re.match(r"^tcp:(\d+)(:|$)", endpoint)
        if match:
            return int(match.group(1))
    raise BenchError(f"{path}: no tcp:PORT listener in [server] listen; use --saslsmtp-port")


def saslsmtp_server(workdir: Path, args: argparse.Namespace) -> Server:
    """The saslsmtp daemon under twistd (or, for developing this harness, a stand-in)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if args.stand_in == "null":
        port = free_port()
        argv = [sys.executable, str(NULL_SERVER), "--port", str(port),
                "--user", args.user, "--password", args.password]
        return Server("saslsmtp", argv, port, workdir, env,
                      "STAND-IN: benchmarks/null_smtp_server.py, not saslsmtp")
    if args.stand_in == "aiosmtpd":
        port = free_port()
        argv = [sys.executable, str(PEER), str(port), "--user", args.user,
                "--password", args.password]
        return Server("saslsmtp", argv, port, workdir, env,
                      "STAND-IN: a second aiosmtpd peer, not saslsmtp")
    if args.saslsmtp_config:
        config = Path(args.saslsmtp_config).resolve()
        port = args.saslsmtp_port or port_of_config(config)
        description = f"twistd saslsmtp, prepared config {config}"
    else:
        port = free_port()
        config = generated_config(port, workdir, args)
        description = "twistd saslsmtp, file backend ({PLAIN} entry), failure_delay=0"
        if args.tls_files:
            description += ", [tls] (STARTTLS offered, require_tls = false)"
    # twistd itself, in this interpreter, so the PID we watch is the server's
    # (`python -m twisted` would be `twist`, not `twistd`).
    argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "-n", "--pidfile=", f"--logfile={args.saslsmtp_log}", "saslsmtp", "--config", str(config)]
    workers = getattr(args, "saslsmtp_workers", None)
    if workers is not None:
        argv += ["--workers", str(workers)]
        description += f", --workers {workers} (CPU: the master and its workers)"
    return Server("saslsmtp", argv, port, workdir, env, description, family=workers is not None)


def aiosmtpd_server(workdir: Path, args: argparse.Namespace) -> Server:
    """The aiosmtpd peer with the equivalent one-user authenticator."""
    port = free_port()
    argv = [sys.executable, str(PEER), str(port), "--user", args.user,
            "--password", args.password]
    description = "aiosmtpd 1.4.6, one-user authenticator, auth_require_tls=False"
    if args.mode == "mail" and not args.peer_discard:
        argv += ["--maildir", str(workdir / "aiosmtpd-mail")]
        description += ", mail stored durably in a Maildir (fsync, like saslsmtp)"
    elif args.mode == "mail":
        description += ", mail DISCARDED (saslsmtp stores it)"
    if args.tls_files:
        cert, key = args.tls_files
        argv += ["--tls-cert", str(cert), "--tls-key", str(key)]
        description += ", STARTTLS offered (not required)"
    return Server("aiosmtpd", argv, port, workdir, None, description)


def null_server(workdir: Path, args: argparse.Namespace) -> Server:
    """The generator's calibration server: the floor of what a session can cost."""
    port = free_port()
    argv = [sys.executable, str(NULL_SERVER), "--port", str(port), "--user", args.user,
            "--password", args.password]
    description = ("null_smtp_server.py: asyncio.Protocol, checks the password, discards "
                   "mail")
    if args.tls_files:
        cert, key = args.tls_files
        argv += ["--tls-cert", str(cert), "--tls-key", str(key)]
        description += ", STARTTLS offered"
    return Server("null", argv, port, workdir, None, description)


def postfix_server(workdir: Path, args: argparse.Namespace) -> Any:
    """The Postfix + Dovecot peer (benchmarks/postfix_peer.py), in its own folders."""
    sys.path.insert(0, str(HERE))
    try:
        import postfix_peer
    finally:
        sys.path.remove(str(HERE))
    problem = postfix_peer.unusable()
    if problem:
        raise BenchError(f"the postfix peer cannot run here: {problem}")
    cert, key = args.tls_files or (None, None)
    return postfix_peer.PostfixPeer(args.user, args.password, cert=cert, key=key)


def make_certificate(workdir: Path, kind: str) -> tuple[Path, Path]:
    """A fresh self-signed certificate for 127.0.0.1/localhost: RSA 2048 or ECDSA P-256.

    Every server gets the same one, so their handshakes cost the same on the client side.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import NameOID
    import ipaddress
    key = (rsa.generate_private_key(public_exponent=65537, key_size=2048) if kind == "rsa2048"
           else ec.generate_private_key(ec.SECP256R1()))
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = workdir / f"bench-{kind}.crt", workdir / f"bench-{kind}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


@contextlib.contextmanager
def running(servers: list[Server], timeout: float = 30.0) -> Iterator[None]:
    """Start every server (each has ``timeout`` seconds to greet); stop them all on the
    way out, whatever happens."""
    try:
        for server in servers:
            server.start(timeout)
        yield
    finally:
        for server in servers:
            server.stop()


# --------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------

@dataclass
class Measurement:
    """One load-generator run against one server."""

    server: str
    mech: str
    mode: str
    concurrency: int
    repeat: int
    ok: bool
    problem: str
    handshakes_per_s: float | None
    session_ms: dict[str, Any]
    auth_ms: dict[str, Any]
    sessions: int
    errors: int
    server_cpu_s: float
    server_cpu_ms_per_session: float | None
    client_cpu_pct: float | None
    loadgen: dict[str, Any] = field(repr=False)
    starttls: bool = False
    settle_s: float = 0.0  # waited after the run for queued mail to be delivered (Postfix)
    cpu_runs: list[float | None] = field(default_factory=list)  # every repeat's, in a point


def python_generator(server: Server, mech: str, concurrency: int,
                     args: argparse.Namespace) -> list[str]:
    """argv of smtp_auth_load.py for one run against ``server``."""
    argv = [sys.executable, str(LOADGEN), "--host", "127.0.0.1", "--port", str(server.port),
            "--mech", mech, "--mode", args.mode, "--user", args.user,
            "--password", args.load_password or args.password,
            "--concurrency", str(concurrency), "--duration", str(args.duration),
            "--warmup", str(args.warmup), "--json"]
    if args.expect_fail:
        argv.append("--expect-fail")
    if args.starttls:
        argv.append("--starttls")
    processes = getattr(args, "generator_processes", 1)  # callers other than run.py: one
    if processes > 1:
        argv += ["--processes", str(processes)]
    return argv


def measure(server: Server, mech: str, concurrency: int, repeat: int,
            args: argparse.Namespace) -> Measurement:
    """Run the load generator once against ``server`` and read its CPU around the run."""
    if getattr(args, "generator", "python") == "c":  # callers other than run.py: Python
        try:
            argv = c_loadgen.command(server.port, args.user, args.load_password or args.password,
                                     concurrency, args.duration, args.warmup,
                                     mail=args.mode == "mail")
        except c_loadgen.NoCompiler as e:
            raise BenchError(str(e)) from None
    else:
        argv = python_generator(server, mech, concurrency, args)
    if not server.alive():
        raise BenchError(f"{server.name} is no longer running:\n{server.output_tail()}")
    cpu_before = server.cpu_s()
    hard = args.warmup + args.duration + 60
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=hard + 30)
    except subprocess.TimeoutExpired:
        raise BenchError(f"load generator hung against {server.name}") from None
    settle_s = server.settle()  # Postfix: let the queue drain, its delivery CPU counts too
    cpu_used = server.cpu_s() - cpu_before
    try:
        result = json.loads(done.stdout)
    except json.JSONDecodeError:
        raise BenchError(f"load generator failed against {server.name} (status "
                         f"{done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}") from None
    served = (result["sessions_measured"] + result["sessions_warmup"]
              + result.get("sessions_cancelled", 0))
    problem = ""
    if done.returncode != 0:
        problem = f"load generator status {done.returncode}: {result['errors']} errors"
        details = {k: result[k] for k in ("auth_failures", "unexpected_replies", "protocol_errors",
                                          "connection_errors", "timeouts") if result.get(k)}
        if details:
            problem += f" {json.dumps(details)}"
    if not server.alive():
        problem = (problem + "; " if problem else "") + "server died during the run"
    left = server.queued() if hasattr(server, "queued") else 0
    if left:
        problem = (problem + "; " if problem else "") + f"{left} messages still queued"
    return Measurement(
        server=server.name, mech=mech, mode=args.mode, concurrency=concurrency,
        repeat=repeat, ok=done.returncode == 0 and server.alive() and not left,
        problem=problem,
        handshakes_per_s=result["handshakes_per_s"],
        session_ms=result["latency_ms"]["session"], auth_ms=result["latency_ms"]["auth"],
        sessions=result["sessions_measured"], errors=result["errors"],
        server_cpu_s=round(cpu_used, 3),
        server_cpu_ms_per_session=(round(1000.0 * cpu_used / served, 4)
                                   if served and cpu_used == cpu_used else None),
        client_cpu_pct=result.get("client_cpu_pct_of_one_core"),
        loadgen=result, starttls=args.starttls, settle_s=round(settle_s, 3),
    )


def median_run(runs: list[Measurement]) -> Measurement:
    """The repeat with the median handshakes/s (the lower middle for even counts), with
    the median of the repeats' CPU per session (which varies independently of it)."""
    ordered = sorted(runs, key=lambda m: m.handshakes_per_s or 0.0)
    middle = ordered[(len(ordered) - 1) // 2]
    cpus = [m.server_cpu_ms_per_session for m in runs if m.server_cpu_ms_per_session is not None]
    if not cpus:
        return middle
    return replace(middle, server_cpu_ms_per_session=statistics.median_low(cpus),
                   cpu_runs=[m.server_cpu_ms_per_session for m in runs])


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------

def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is zero."""
    if a is None or b is None or b == 0 or a != a or b != b:
        return None
    return a / b


def fmt(value: float | None, digits: int = 2) -> str:
    """A number for the table, '-' when missing."""
    if value is None or value != value:
        return "-"
    return f"{value:,.{digits}f}"


def scenario(m: Measurement, meta: dict[str, Any]) -> str:
    """A point's scenario: mechanism, mode, STARTTLS, wrong password."""
    parts = [m.mech]
    if m.mode == "mail":
        parts.append("+ 2 KB mail")
    if m.starttls:
        parts.append("STARTTLS")
    if meta["expect_fail"]:
        parts.append("wrong password")
    return " ".join(parts)


def point_ratios(point: dict[str, Measurement]) -> dict[str, float | None]:
    """The headline ratios of one point: saslsmtp over each peer."""
    def hs(name: str) -> float | None:
        m = point.get(name)
        return None if m is None else m.handshakes_per_s

    def cpu(name: str) -> float | None:
        m = point.get(name)
        return None if m is None else m.server_cpu_ms_per_session
    return {
        "hs_saslsmtp_over_aiosmtpd": ratio(hs("saslsmtp"), hs("aiosmtpd")),
        "hs_saslsmtp_over_postfix": ratio(hs("saslsmtp"), hs("postfix")),
        "cpu_saslsmtp_over_null": ratio(cpu("saslsmtp"), cpu("null")),
        "cpu_saslsmtp_over_aiosmtpd": ratio(cpu("saslsmtp"), cpu("aiosmtpd")),
        "cpu_saslsmtp_over_postfix": ratio(cpu("saslsmtp"), cpu("postfix")),
    }


def markdown(points: list[dict[str, Measurement]], meta: dict[str, Any]) -> str:
    """The summary table (hs/s and CPU per server, ratios), the latency table, verdicts."""
    names = [name for name in SERVERS if name in meta["servers_run"]]
    out = [f"# saslsmtp vs {', '.join(n for n in names if n != 'saslsmtp') or 'nothing'}"
           f" — {meta['started']}", ""]
    for name in names:
        out.append(f"- {name}: {meta['servers'][name]}")
    wrong = ", wrong password (535 expected)" if meta["expect_fail"] else ""
    tls = f", STARTTLS ({meta['cert']} certificate)" if meta["starttls"] else ""
    generator = "smtp_load.c" if meta.get("generator") == "c" else "smtp_auth_load.py"
    if meta.get("generator_processes", 1) > 1:
        generator += f" x {meta['generator_processes']} processes"
    out.append(f"- load: {generator}, mode {meta['mode']}{tls}{wrong}, "
               f"{meta['warmup_s']} s warm-up + "
               f"{meta['duration_s']} s per point, median of {meta['repeat']} run(s), servers "
               f"measured in alternating order; {meta['cpus']} CPUs shared by servers and "
               "generator")
    out.append("- CPU = server CPU ms per session (every process of the server: for postfix, "
               "all Postfix and Dovecot processes, delivery included); s/a, s/p = saslsmtp "
               "hs/s over aiosmtpd's, postfix's; s/null = saslsmtp CPU over the null server's")
    for skipped in meta.get("skipped", []):
        out.append(f"- not measured: {skipped}")
    out.append("")
    header = ["scenario", "C", *(f"hs/s {n}" for n in names), *(f"CPU {n}" for n in names)]
    want = [("aiosmtpd", "s/a hs/s", "hs_saslsmtp_over_aiosmtpd"),
            ("postfix", "s/p hs/s", "hs_saslsmtp_over_postfix"),
            ("null", "s/null CPU", "cpu_saslsmtp_over_null")]
    extra = [(title, key) for peer, title, key in want if "saslsmtp" in names and peer in names]
    header += [title for title, _ in extra]
    out.append("| " + " | ".join(header) + " |")
    out.append("|" + " --- |" * len(header))
    notes: list[str] = []
    for point in points:
        any_m = next(iter(point.values()))
        r = point_ratios(point)
        cells = [scenario(any_m, meta), str(any_m.concurrency)]
        cells += [fmt(point[n].handshakes_per_s, 0) if n in point else "-" for n in names]
        cells += [fmt(point[n].server_cpu_ms_per_session, 3) if n in point else "-"
                  for n in names]
        cells += [fmt(r[key]) for _, key in extra]
        out.append("| " + " | ".join(cells) + " |")
        for m in point.values():
            if not m.ok:
                notes.append(f"- {m.server} {scenario(m, meta)} C={m.concurrency}: {m.problem}")
    out.append("")
    out.append("Latency in ms (session = connect … 221, AUTH = the AUTH exchange alone), "
               "p50 / p99, and the generator's CPU (% of one core):")
    out.append("")
    header = ["scenario", "C", *(f"session {n}" for n in names), *(f"AUTH {n}" for n in names),
              *(f"gen % {n}" for n in names)]
    out.append("| " + " | ".join(header) + " |")
    out.append("|" + " --- |" * len(header))
    for point in points:
        any_m = next(iter(point.values()))

        def lat(name: str, key: str) -> str:
            m = point.get(name)
            if m is None:
                return "-"
            d = m.session_ms if key == "session" else m.auth_ms
            return f"{fmt(d.get('p50'))} / {fmt(d.get('p99'))}"
        cells = [scenario(any_m, meta), str(any_m.concurrency)]
        cells += [lat(n, "session") for n in names] + [lat(n, "auth") for n in names]
        cells += [fmt(point[n].client_cpu_pct, 0) if n in point else "-" for n in names]
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    for point in points:
        s, a = point.get("saslsmtp"), point.get("aiosmtpd")
        if s and a and s.concurrency == TARGET_CONCURRENCY:
            rr = ratio(s.handshakes_per_s, a.handshakes_per_s)
            met = rr is not None and rr >= 1.0 and s.ok and a.ok
            target = (s.mech == "PLAIN" and s.mode == "auth" and not meta["expect_fail"]
                      and not s.starttls)
            verdict = ("met" if met else "NOT met") if target else ("yes" if met else "no")
            out.append(f"- {'target' if target else 'comparison'}: saslsmtp >= aiosmtpd at "
                       f"concurrency {TARGET_CONCURRENCY}, {scenario(s, meta)} {s.mode}: "
                       f"**{verdict}** (ratio {fmt(rr)})")
    if notes:
        out.append("")
        out.append("Errors:")
        out.extend(notes)
    if any(m.client_cpu_pct and m.client_cpu_pct >= 90 for p in points for m in p.values()):
        out.append("")
        out.append("Note: the load generator used >= 90 % of a core on some points; there it, "
                   "not the server, limits handshakes/s — compare CPU ms/session instead.")
    if meta["stand_in"]:
        out.append("")
        out.append(f"**Harness check only: the 'saslsmtp' column is a {meta['stand_in']} "
                   "stand-in, not saslsmtp.**")
    return "\n".join(out) + "\n"


def git_commit() -> str | None:
    """The checkout's HEAD commit (and '+dirty' when saslsmtp/ has uncommitted changes)."""
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--",
                                "saslsmtp", "twisted"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) or None


def versions() -> dict[str, str]:
    """Versions of the interpreter and the servers' frameworks."""
    found = {"python": platform.python_version()}
    from importlib import metadata
    for dist in ("twisted", "aiosmtpd", "saslsmtp", "cryptography"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[dist] = metadata.version(dist)
    for name, argv in (("postfix", ["/usr/sbin/postconf", "-dh", "mail_version"]),
                       ("dovecot", ["/usr/sbin/dovecot", "--version"])):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            found[name] = subprocess.run(argv, capture_output=True, text=True,
                                         timeout=10).stdout.strip()
    return found


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

def concurrency_list(text: str) -> list[int]:
    """'1,16,64' -> [1, 16, 64]."""
    try:
        values = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}")
    if not values or any(v < 1 or v > 1024 for v in values):
        raise argparse.ArgumentTypeError("concurrency values must be 1..1024")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    load = p.add_argument_group("load")
    load.add_argument("--mech", action="append", type=str.upper,
                      choices=("PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256"),
                      help="mechanism to measure (repeatable; default PLAIN)")
    load.add_argument("--concurrency", "-c", type=concurrency_list, default=[1, 16, 64],
                      help="comma-separated concurrency levels (default 1,16,64)")
    load.add_argument("--duration", "-d", type=float, default=5.0,
                      help="measured seconds per point and server (default 5)")
    load.add_argument("--warmup", type=float, default=1.0,
                      help="uncounted warm-up seconds before each run (default 1)")
    load.add_argument("--generator", choices=("python", "c"), default="python",
                      help="python: smtp_auth_load.py (every scenario); c: smtp_load.c, built"
                           " with cc on first use, AUTH PLAIN (and --mode mail) without"
                           " STARTTLS only, a sixth of the Python generator's CPU per session")
    load.add_argument("--generator-processes", type=int, default=1, metavar="N",
                      help="with --generator python, N generator processes share the"
                           " concurrency (smtp_auth_load.py --processes N; results merged)")
    load.add_argument("--mode", choices=("auth", "mail"), default="auth",
                      help="auth: AUTH then QUIT; mail: also send a ~2 KB message")
    load.add_argument("--peer-discard", action="store_true",
                      help="with --mode mail, let aiosmtpd discard mail instead of storing it "
                           "in a Maildir like saslsmtp")
    load.add_argument("--repeat", type=int, default=1,
                      help="runs per point and server; the median run is reported (default 1)")
    load.add_argument("--user", default="bench", help="username (both servers accept it)")
    load.add_argument("--password", default="benchpass", help="its password")
    load.add_argument("--load-password", default=None,
                      help="password the generator sends (default --password), with "
                           "--expect-fail for wrong-password load")
    load.add_argument("--expect-fail", action="store_true",
                      help="535 is the expected AUTH outcome (wrong-password load)")
    load.add_argument("--servers", default=DEFAULT_SERVERS,
                      help="comma-separated subset of saslsmtp,aiosmtpd,postfix,null, or 'all' "
                           f"(default {DEFAULT_SERVERS}; postfix needs root)")
    load.add_argument("--starttls", action="store_true",
                      help="every session does STARTTLS before AUTH (every server offers it "
                           "with the --cert certificate)")
    load.add_argument("--cert", choices=("rsa2048", "ecdsa-p256"), default="rsa2048",
                      help="certificate made for --starttls, the same for every server "
                           "(default rsa2048)")

    conf = p.add_argument_group("saslsmtp configuration")
    conf.add_argument("--saslsmtp-config", metavar="FILE",
                      help="use this prepared config instead of the generated one; it must "
                           "accept --user/--password with --mech and listen on loopback")
    conf.add_argument("--saslsmtp-port", type=int,
                      help="port of --saslsmtp-config (default: its first tcp: listener)")
    conf.add_argument("--saslsmtp-workers", type=int, metavar="N",
                      help="twistd saslsmtp --workers N: a master and N worker processes "
                           "sharing the listener (0: one per CPU), as Postfix runs several "
                           "smtpd processes; CPU counts them all (default: the config's 1)")
    conf.add_argument("--saslsmtp-log", default="/dev/null", metavar="FILE",
                      help="twistd --logfile (default /dev/null; a file costs the server CPU)")
    conf.add_argument("--auth-mechanisms", nargs="+", metavar="MECH",
                      help="[auth] mechanisms of the generated config (default PLAIN LOGIN "
                           "plus every --mech)")
    conf.add_argument("--auth-backends", nargs="+", metavar="NAME",
                      help="[auth] backends (default: bench, the generated users file)")
    conf.add_argument("--auth-option", action="append", default=[], metavar="KEY=TOML",
                      help="extra raw [auth] line, e.g. 'hash_threads = 8' (repeatable)")
    conf.add_argument("--users-line", action="append", default=[], metavar="LINE",
                      help="extra line for the generated users file (repeatable)")
    conf.add_argument("--config-fragment", action="append", default=[], metavar="FILE",
                      help="TOML appended to the generated config, e.g. a [backends.ldap] "
                           "table to name in --auth-backends (repeatable)")

    outp = p.add_argument_group("output")
    outp.add_argument("--label", help="results file label (default: <mechs>-<mode>)")
    outp.add_argument("--results-dir", default=str(RESULTS), help="default benchmarks/results")
    outp.add_argument("--no-save", action="store_true", help="print only, write no files")
    outp.add_argument("--table-from", metavar="JSON",
                      help="measure nothing: rebuild the markdown of a saved run from its "
                           "JSON (every repeat is kept there), print it and write it beside it")
    # Developing the harness while the daemon does not run yet: replace saslsmtp.
    p.add_argument("--stand-in", choices=("null", "aiosmtpd"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.mech = list(dict.fromkeys(args.mech or ["PLAIN"]))
    if args.servers.strip() == "all":
        args.servers = ",".join(SERVERS)
    args.servers = list(dict.fromkeys(s.strip() for s in args.servers.split(",") if s.strip()))
    if not args.servers or any(s not in SERVERS for s in args.servers):
        p.error("--servers takes 'all' or a comma-separated subset of " + ",".join(SERVERS))
    args.tls_files = None  # (certificate, key) once made, with --starttls
    if args.repeat < 1 or args.duration <= 0 or args.warmup < 0:
        p.error("--repeat >= 1, --duration > 0 and --warmup >= 0 please")
    if args.generator == "c" and (args.mech != ["PLAIN"] or args.starttls or args.expect_fail):
        p.error("--generator c does AUTH PLAIN (and --mode mail) only: no other --mech,"
                " --starttls or --expect-fail")
    if args.generator_processes < 1 or (args.generator_processes > 1 and args.generator == "c"):
        p.error("--generator-processes takes N >= 1, with the Python generator only")
    if args.saslsmtp_config and (args.config_fragment or args.users_line or args.auth_option
                                 or args.auth_backends or args.auth_mechanisms):
        p.error("--saslsmtp-config replaces the generated config; the options changing "
                "the generated config cannot be combined with it")
    return args


def table_from(path: Path) -> int:
    """Rebuild a saved run's markdown from its JSON's runs (medians taken again)."""
    data = json.loads(path.read_text())
    meta = data["meta"]
    meta.setdefault("servers_run", [n for n in SERVERS if meta["servers"].get(n, "not run")
                                    != "not run"])
    meta.setdefault("starttls", False)
    names = {f.name for f in Measurement.__dataclass_fields__.values()}
    grouped: dict[tuple[str, int], dict[str, list[Measurement]]] = {}
    for raw in data["runs"]:
        fields = {k: v for k, v in raw.items() if k in names}
        fields.update(session_ms=raw["session_ms"], auth_ms=raw["auth_ms"],
                      client_cpu_pct=raw.get("client_cpu_pct_of_one_core"),
                      loadgen=raw.get("loadgen", {}))
        fields.pop("cpu_runs", None)
        m = Measurement(**fields)
        grouped.setdefault((m.mech, m.concurrency), {}).setdefault(m.server, []).append(m)
    points = [{name: median_run(rs) for name, rs in by_server.items()}
              for by_server in grouped.values()]
    table = markdown(points, meta)
    print(table)
    path.with_suffix(".md").write_text(table)
    return 0


def run(args: argparse.Namespace) -> int:
    """Run every point against every server; print and save the results."""
    started = dt.datetime.now().astimezone()
    with tempfile.TemporaryDirectory(prefix="saslsmtp-bench-") as tmp:
        workdir = Path(tmp)
        if args.starttls:
            args.tls_files = make_certificate(workdir, args.cert)
        builders = {"saslsmtp": saslsmtp_server, "aiosmtpd": aiosmtpd_server,
                    "postfix": postfix_server, "null": null_server}
        skipped = [f"{name}: no STARTTLS" for name in args.servers
                   if args.starttls and name in NO_STARTTLS]
        wanted = [name for name in args.servers if not (args.starttls and name in NO_STARTTLS)]
        servers = [builders[name](workdir, args) for name in wanted]
        skipped += [f"{name} {mech}: not supported" for mech in args.mech
                    for name in wanted if mech not in SERVER_MECHS.get(name, (mech,))]
        points: list[dict[str, Measurement]] = []
        all_runs: list[Measurement] = []
        with running(servers):
            print(f"servers up: " + ", ".join(f"{s.name} 127.0.0.1:{s.port} (pid {s.pid})"
                                             for s in servers), file=sys.stderr)
            index = 0
            for mech in args.mech:
                for concurrency in args.concurrency:
                    runs: dict[str, list[Measurement]] = {s.name: [] for s in servers}
                    for repeat in range(args.repeat):
                        order = servers if index % 2 == 0 else list(reversed(servers))
                        index += 1
                        for server in order:
                            if mech not in SERVER_MECHS.get(server.name, (mech,)):
                                continue
                            m = measure(server, mech, concurrency, repeat, args)
                            runs[server.name].append(m)
                            all_runs.append(m)
                            print(f"  {m.server:9s} {mech:13s} C={concurrency:<3d} "
                                  f"{fmt(m.handshakes_per_s, 0):>7s} hs/s  p50 "
                                  f"{fmt(m.session_ms.get('p50'))} p99 "
                                  f"{fmt(m.session_ms.get('p99'))} ms  CPU "
                                  f"{fmt(m.server_cpu_ms_per_session, 3)} ms/session"
                                  + ("" if m.ok else f"  !! {m.problem}"),
                                  file=sys.stderr, flush=True)
                    points.append({name: median_run(rs) for name, rs in runs.items() if rs})
        server_desc = {s.name: s.description for s in servers}
        counted = {s.name: sorted(s.seen) for s in servers if hasattr(s, "seen")}
    for name in SERVERS:
        server_desc.setdefault(name, "not run")
    meta = {
        "started": started.isoformat(timespec="seconds"),
        "mode": args.mode, "duration_s": args.duration, "warmup_s": args.warmup,
        "repeat": args.repeat, "mechs": args.mech, "concurrency": args.concurrency,
        "expect_fail": args.expect_fail, "servers": server_desc, "generator": args.generator,
        "generator_processes": args.generator_processes,
        "servers_run": [s.name for s in servers], "skipped": skipped,
        "starttls": args.starttls, "cert": args.cert if args.starttls else None,
        "server_cpu": ("utime+stime+cutime+cstime from /proc/PID/stat before/after each run; "
                       "saslsmtp, aiosmtpd, null: the server process; postfix: every process "
                       "under the Postfix master and the Dovecot master, read after the queue "
                       "drained"),
        "processes_counted": counted,
        "stand_in": args.stand_in, "cpus": os.cpu_count(),
        "loadavg_at_end": os.getloadavg(), "commit": git_commit(), "versions": versions(),
        "platform": platform.platform(),
        "saslsmtp_config": args.saslsmtp_config,
    }
    table = markdown(points, meta)
    print(table)
    if not args.no_save:
        results = Path(args.results_dir)
        results.mkdir(parents=True, exist_ok=True)
        label = args.label or "-".join([*(m.lower() for m in args.mech), args.mode,
                                        *(["starttls", args.cert] if args.starttls else []),
                                        *(["all"] if set(args.servers) == set(SERVERS)
                                          else [])])
        if args.stand_in:
            label += f"-standin-{args.stand_in}"
        label = re.sub(r"[^A-Za-z0-9._-]+", "-", label)
        stem = f"{started.strftime('%Y%m%d-%H%M%S')}-{label}"
        payload = {
            "meta": meta,
            "points": [
                {"mech": next(iter(p.values())).mech,
                 "concurrency": next(iter(p.values())).concurrency,
                 **{name: summary(m) for name, m in p.items()},
                 "ratios_saslsmtp_over_aiosmtpd": ratios(p),
                 "ratios": {k: None if v is None else round(v, 3)
                            for k, v in point_ratios(p).items()}}
                for p in points],
            "runs": [dict(summary(m), loadgen=m.loadgen) for m in all_runs],
        }
        (results / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
        (results / f"{stem}.md").write_text(table)
        (results / "latest.md").write_text(table)
        print(f"saved {results / (stem + '.json')} and .md, and latest.md", file=sys.stderr)
    failed = [m for m in all_runs if not m.ok]
    return 1 if failed else 0


def summary(m: Measurement) -> dict[str, Any]:
    """The figures of one measurement, without the generator's full output."""
    return {
        "server": m.server, "mech": m.mech, "mode": m.mode, "concurrency": m.concurrency,
        "repeat": m.repeat, "ok": m.ok, "problem": m.problem,
        "handshakes_per_s": m.handshakes_per_s, "session_ms": m.session_ms,
        "auth_ms": m.auth_ms, "sessions": m.sessions, "errors": m.errors,
        "server_cpu_s": m.server_cpu_s, "server_cpu_ms_per_session": m.server_cpu_ms_per_session,
        "client_cpu_pct_of_one_core": m.client_cpu_pct, "starttls": m.starttls,
        "settle_s": m.settle_s,
        **({"server_cpu_ms_per_session_of_each_repeat": m.cpu_runs} if m.cpu_runs else {}),
    }


def ratios(point: dict[str, Measurement]) -> dict[str, float | None] | None:
    """saslsmtp / aiosmtpd for throughput, latency and CPU per session."""
    s, a = point.get("saslsmtp"), point.get("aiosmtpd")
    if s is None or a is None:
        return None
    def r(x: float | None, y: float | None) -> float | None:
        value = ratio(x, y)
        return None if value is None else round(value, 3)
    return {
        "handshakes_per_s": r(s.handshakes_per_s, a.handshakes_per_s),
        "session_p50": r(s.session_ms.get("p50"), a.session_ms.get("p50")),
        "session_p99": r(s.session_ms.get("p99"), a.session_ms.get("p99")),
        "auth_p50": r(s.auth_ms.get("p50"), a.auth_ms.get("p50")),
        "auth_p99": r(s.auth_ms.get("p99"), a.auth_ms.get("p99")),
        "server_cpu_ms_per_session": r(s.server_cpu_ms_per_session, a.server_cpu_ms_per_session),
    }


def missing_modules(servers: list[str]) -> list[str]:
    """The modules the servers under test need, that this interpreter cannot import."""
    import importlib.util
    wanted = [*(["twisted", "saslsmtp"] if "saslsmtp" in servers else []),
              *(["aiosmtpd"] if "aiosmtpd" in servers else [])]
    missing = []
    for name in wanted:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def main(argv: list[str] | None = None) -> int:
    """Entry point: SIGTERM/SIGHUP unwind like Ctrl-C so the servers are stopped."""
    def _raise(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise)
    args = parse_args(argv)
    missing = missing_modules(args.servers)
    if missing:
        print(f"benchmarks/run.py: missing Python packages: {', '.join(missing)}; install "
              "saslsmtp with its test extra first: pip install -e '.[test]' "
              "--config-settings editable_mode=compat", file=sys.stderr)
        return 2
    try:
        return table_from(Path(args.table_from)) if args.table_from else run(args)
    except BenchError as exc:
        print(f"benchmarks/run.py: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("benchmarks/run.py: interrupted; servers stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
