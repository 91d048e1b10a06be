#!/usr/bin/env python3
"""saslsmtp's LDAP backend against Postfix + Dovecot (``passdb ldap``, ``auth_bind = yes``),
on the SAME slapd, in one run, with the same load generator.

    python3 benchmarks/ldap_peers.py                      # both modes, C=16, 3 repeats
    python3 benchmarks/ldap_peers.py --mode template -d 3 --repeat 1   # quick look

It starts one real slapd (tests/slapd.py: mdb, seeded users, stats log), then for each
lookup mode:

* ``template``: saslsmtp ``user_dn = "uid={username},ou=people,..."``; Dovecot
  ``auth_bind_userdn = uid=%u,ou=people,...`` (a bind, no search);
* ``search``: saslsmtp ``search_base``/``search_filter``/``search_dn``; Dovecot
  ``base``/``pass_filter``/``dn``/``dnpass`` (a search as the reader, then a bind as the user);

it starts saslsmtp (the real daemon: ``twistd -n saslsmtp``, the ldap backend only, no
auth cache, ``failure_delay = 0``) and a private Postfix (tests/postfix.py: its own folder,
a free loopback port) whose smtpd authenticates through a private Dovecot auth server
(tests/dovecot.py, ``passdb { driver = ldap }``, ``auth_bind = yes``, no auth cache,
``auth_failure_delay = 0``), and runs ``smtp_auth_load.py`` (AUTH PLAIN as alice, one
fresh TCP session per handshake) at concurrency C against each in turn, alternating
which goes first, ``--repeat`` times; the median repeat by handshakes/s is reported.

Per run it reads, before and after, the CPU (utime+stime, with waited-for children) of
the server side: the saslsmtp process; for the peer, every process of the Postfix master's
tree and of the Dovecot master's tree; and slapd's.  During each run a probe client sends
``EHLO`` on one already-open connection every ``--probe-interval`` seconds and times the
reply: EHLO p50/p99 under load.  Results: benchmarks/results/<date>-ldap-peers.md and .json,
the table on stdout.  Needs root (``postfix start``), slapd, ldap-utils, postfix,
dovecot-core and dovecot-ldap.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

import c_loadgen  # noqa: E402
from run import LOADGEN, RESULTS, BenchError, Server, free_port, git_commit  # noqa: E402

from tests.dovecot import DovecotServer  # noqa: E402
from tests.postfix import PostfixServer  # noqa: E402
from tests.slapd import (ALICE, PEOPLE, READER_DN, READER_PASSWORD, SlapdServer,  # noqa: E402
                         slapd_or_skip)

CLK_TCK = os.sysconf("SC_CLK_TCK")
MODES = ("template", "search")
SEARCH_FILTER = "(&(objectClass=inetOrgPerson)(uid={username}))"
DOVECOT_LDAP_MODULE = "/usr/lib/dovecot/modules/auth/libauthdb_ldap.so"
TARGET_RATIO = 1.2
EHLO_P99_TARGET_MS = 50.0


# --------------------------------------------------------------------------
# CPU accounting
# --------------------------------------------------------------------------

def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()


def tree(root: int) -> list[int]:
    """``root`` and all its descendants now alive."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def tree_cpu_s(roots: list[int]) -> float:
    """CPU seconds of every process in the trees under ``roots``: utime+stime of the live
    ones plus cutime+cstime (their exited, waited-for children: Postfix's smtpd processes
    that reached ``max_use``).  Live processes are in no one's cutime, so nothing counts twice."""
    total = 0
    for root in roots:
        for pid in tree(root):
            fields = _stat(pid)
            if fields is not None:
                total += sum(int(fields[i]) for i in (11, 12, 13, 14))
    return total / CLK_TCK


# --------------------------------------------------------------------------
# The servers
# --------------------------------------------------------------------------

def saslsmtp_backend(mode: str, slapd: SlapdServer, args: argparse.Namespace) -> str:
    """The ``[backends.directory]`` table for ``mode``."""
    lines = ["[backends.directory]", 'type = "ldap"', f'url = "{slapd.url}"',
             f"threads = {args.threads}", "timeout = 5.0"]
    if args.pool_size:
        lines.append(f"pool_size = {args.pool_size}")
    if mode == "template":
        lines.append(f'user_dn = "uid={{username}},{PEOPLE}"')
    else:
        lines += [f'search_base = "{PEOPLE}"', f'search_filter = "{SEARCH_FILTER}"',
                  f'search_dn = "{READER_DN}"', f'search_password = "{READER_PASSWORD}"']
    return "\n".join(lines) + "\n"


def saslsmtp_server(mode: str, slapd: SlapdServer, workdir: Path,
                    args: argparse.Namespace) -> Server:
    """The real daemon, ldap backend only (``mode`` "file": a users file with alice's
    ``{PLAIN}`` password instead, the daemon's floor), no auth cache, no failure delay."""
    port = free_port()
    (workdir / "mail").mkdir(parents=True, exist_ok=True)
    if mode == "file":
        (workdir / "users").write_text(f"{ALICE.uid}:{{PLAIN}}{ALICE.password}\n")
        backend = '[backends.directory]\ntype = "file"\npath = "users"\n'
    else:
        backend = saslsmtp_backend(mode, slapd, args)
    config = workdir / "saslsmtp.toml"
    config.write_text(f"""# generated by benchmarks/ldap_peers.py
[server]
hostname = "saslsmtp.bench.test"
listen = ["tcp:{port}:interface=127.0.0.1"]

[auth]
mechanisms = ["PLAIN", "LOGIN"]
require_tls = false
backends = ["directory"]
failure_delay = 0

{backend}
[delivery]
type = "maildir"
path = "mail"
""")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
            "--pidfile=", f"--logfile={workdir / 'twistd.log'}", "saslsmtp",
            "--config", str(config), "--workers", str(args.workers)]
    return Server(f"saslsmtp-{mode}", argv, port, workdir, env,
                  f"twistd saslsmtp, ldap backend ({mode}), threads {args.threads}")


def wait_ready(server: Server, workers: int, timeout: float = 30.0) -> None:
    """Wait until every worker logged "saslsmtp ready" (the master greets before they do)."""
    log = server.cwd / "twistd.log"
    deadline = time.monotonic() + timeout
    while log.read_text(errors="replace").count("saslsmtp ready") < workers:
        if time.monotonic() > deadline:
            raise BenchError(f"{workers} workers did not all start:\n{server.output_tail()}")
        time.sleep(0.1)


class LdapDovecot(DovecotServer):
    """tests/dovecot.py's private auth-only Dovecot, with ``passdb { driver = ldap }``."""

    def __init__(self, root: Path, mode: str, slapd: SlapdServer) -> None:
        self.mode = mode
        self.slapd = slapd
        super().__init__(root)

    def _write_files(self) -> None:
        super()._write_files()
        ldap_conf = self.root / "dovecot-ldap.conf.ext"
        common = [f"uris = {self.slapd.url}", "ldap_version = 3", "auth_bind = yes",
                  f"base = {PEOPLE}", "scope = subtree", "deref = never"]
        if self.mode == "template":
            common.append(f"auth_bind_userdn = uid=%u,{PEOPLE}")
        else:
            common += [f"dn = {READER_DN}", f"dnpass = {READER_PASSWORD}",
                       "pass_filter = " + SEARCH_FILTER.replace("{username}", "%u"),
                       "pass_attrs = uid=user"]
        ldap_conf.write_text("\n".join(common) + "\n")
        ldap_conf.chmod(0o644)
        text = self.config_path.read_text()
        passwd = text[text.index("passdb {"):text.index("userdb {")]
        text = text.replace(passwd, f"passdb {{\n  driver = ldap\n  args = {ldap_conf}\n}}\n")
        text += "auth_cache_size = 0\n"
        self.config_path.write_text(text)


class SaslPostfix(PostfixServer):
    """tests/postfix.py's private Postfix with SMTP AUTH through Dovecot's auth socket."""

    def __init__(self, root: Path, dovecot: DovecotServer) -> None:
        super().__init__(root)
        with (self.etc / "main.cf").open("a") as main_cf:
            main_cf.write(f"""\
# benchmarks/ldap_peers.py: AUTH through the private Dovecot
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = dovecot
smtpd_sasl_path = inet:127.0.0.1:{dovecot.port}
smtpd_sasl_security_options = noanonymous
smtpd_tls_security_level = none
smtpd_tls_auth_only = no
smtpd_peername_lookup = no
""")

    def master_pid(self) -> int:
        return int((self.root / "queue" / "pid" / "master.pid").read_text().split()[0])


# --------------------------------------------------------------------------
# The EHLO probe
# --------------------------------------------------------------------------

class EhloProbe(threading.Thread):
    """One SMTP connection; ``EHLO`` every ``interval`` until stopped; round trips kept."""

    def __init__(self, port: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.interval = interval
        self.latencies: list[float] = []
        self.error: str | None = None
        self._stop_event = threading.Event()
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")
        self._reply()  # the greeting

    def _reply(self) -> bytes:
        while True:
            line = self.file.readline()
            if not line:
                raise EOFError("probe connection closed")
            if line[3:4] != b"-":
                return line

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                started = time.perf_counter()
                self.sock.sendall(b"EHLO probe.bench.test\r\n")
                line = self._reply()
                self.latencies.append(time.perf_counter() - started)
                if not line.startswith(b"250 "):
                    raise ValueError(f"EHLO answered {line!r}")
                self._stop_event.wait(self.interval)
        except (OSError, EOFError, ValueError) as e:
            self.error = f"{type(e).__name__}: {e}"

    def finish(self) -> dict[str, Any]:
        self._stop_event.set()
        self.join(15)
        try:
            self.sock.sendall(b"QUIT\r\n")
        except OSError:
            pass
        self.sock.close()
        ordered = sorted(self.latencies)

        def pct(p: float) -> float | None:
            if not ordered:
                return None
            return round(1000 * ordered[min(len(ordered) - 1, int(len(ordered) * p))], 2)
        return {"n": len(ordered), "p50": pct(0.50), "p99": pct(0.99),
                "max": round(1000 * ordered[-1], 2) if ordered else None, "error": self.error}


# --------------------------------------------------------------------------
# One measurement
# --------------------------------------------------------------------------

def measure(name: str, port: int, cpu_roots: list[int], slapd_pid: int,
            args: argparse.Namespace) -> dict[str, Any]:
    """One generator run against ``port``: hs/s, CPU per login (server, slapd), EHLO."""
    if args.generator == "c":
        try:
            argv = c_loadgen.command(port, ALICE.uid, ALICE.password, args.concurrency,
                                     args.duration, args.warmup)
        except c_loadgen.NoCompiler as e:
            raise BenchError(str(e)) from None
    else:
        argv = [sys.executable, str(LOADGEN), "--port", str(port), "--mech", "PLAIN",
                "--user", ALICE.uid, "--password", ALICE.password,
                "--concurrency", str(args.concurrency), "--duration", str(args.duration),
                "--warmup", str(args.warmup), "--json"]
    probe = EhloProbe(port, args.probe_interval)
    server_before, slapd_before = tree_cpu_s(cpu_roots), tree_cpu_s([slapd_pid])
    probe.start()
    try:
        done = subprocess.run(argv, capture_output=True, text=True,
                              timeout=args.warmup + args.duration + 90)
    finally:
        ehlo = probe.finish()
    server_cpu, slapd_cpu = (tree_cpu_s(cpu_roots) - server_before,
                             tree_cpu_s([slapd_pid]) - slapd_before)
    try:
        result = json.loads(done.stdout)
    except json.JSONDecodeError:
        raise BenchError(f"load generator failed against {name} ({done.returncode}):\n"
                         f"{done.stdout[-2000:]}{done.stderr[-2000:]}") from None
    served = (result["sessions_measured"] + result["sessions_warmup"]
              + result.get("sessions_cancelled", 0))
    problem = ""
    if done.returncode != 0:
        problem = f"generator status {done.returncode}, {result['errors']} errors: " + \
            json.dumps({k: result[k] for k in ("auth_failures", "unexpected_replies",
                                                "protocol_errors", "connection_errors",
                                                "timeouts") if result.get(k)})
    if ehlo["error"]:
        problem = (problem + "; " if problem else "") + f"EHLO probe: {ehlo['error']}"
    return {
        "server": name, "ok": not problem, "problem": problem,
        "handshakes_per_s": result["handshakes_per_s"], "sessions": served,
        "errors": result["errors"],
        "session_ms": result["latency_ms"]["session"], "auth_ms": result["latency_ms"]["auth"],
        "server_cpu_ms_per_login": round(1000 * server_cpu / served, 3) if served else None,
        "slapd_cpu_ms_per_login": round(1000 * slapd_cpu / served, 3) if served else None,
        "ehlo_ms": ehlo, "generator_cpu_pct": result.get("client_cpu_pct_of_one_core"),
    }


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The repeat with the median handshakes/s (the lower middle for even counts)."""
    ordered = sorted(runs, key=lambda r: r["handshakes_per_s"] or 0.0)
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["all_handshakes_per_s"] = [r["handshakes_per_s"] for r in runs]
    return chosen


def run_mode(mode: str, slapd: SlapdServer, work: Path,
             args: argparse.Namespace) -> dict[str, Any]:
    """Start saslsmtp and Postfix+Dovecot for ``mode``; measure both ``--repeat`` times."""
    for name in ("saslsmtp", "dovecot", "postfix", "file"):
        (work / f"{name}-{mode}").mkdir()
    saslsmtp = saslsmtp_server(mode, slapd, work / f"saslsmtp-{mode}", args)
    floor = saslsmtp_server("file", slapd, work / f"file-{mode}", args) \
        if args.file_baseline else None
    dovecot = LdapDovecot(work / f"dovecot-{mode}", mode, slapd)
    postfix: SaslPostfix | None = None
    runs: dict[str, list[dict[str, Any]]] = {"saslsmtp": [], "postfix+dovecot": []}
    if floor is not None:
        runs["saslsmtp-file"] = []
    try:
        saslsmtp.start()
        wait_ready(saslsmtp, args.workers)
        if floor is not None:
            floor.start()
            wait_ready(floor, args.workers)
        dovecot.start()
        postfix = SaslPostfix(work / f"postfix-{mode}", dovecot)
        postfix.start()
        assert dovecot.process is not None
        targets = {
            "saslsmtp": (saslsmtp.port, [saslsmtp.pid]),
            "postfix+dovecot": (postfix.port, [postfix.master_pid(), dovecot.process.pid]),
        }
        if floor is not None:
            targets["saslsmtp-file"] = (floor.port, [floor.pid])
        assert slapd.process is not None
        for repeat in range(args.repeat):
            order = list(targets) if repeat % 2 == 0 else list(reversed(targets))
            for name in order:
                port, roots = targets[name]
                result = measure(name, port, roots, slapd.process.pid, args)
                result["repeat"] = repeat + 1
                runs[name].append(result)
                print(f"  {mode:8} {name:16} run {repeat + 1}: "
                      f"{result['handshakes_per_s']:8.1f} hs/s  server "
                      f"{result['server_cpu_ms_per_login']} ms  slapd "
                      f"{result['slapd_cpu_ms_per_login']} ms  EHLO p99 "
                      f"{result['ehlo_ms']['p99']} ms {result['problem']}", flush=True)
    finally:
        saslsmtp.stop()
        if floor is not None:
            floor.stop()
        if postfix is not None:
            postfix.stop()
        dovecot.stop()
    return {name: {"median": median_run(r), "runs": r} for name, r in runs.items()}


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------

def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def verdicts(results: dict[str, Any]) -> dict[str, dict[str, bool | None]]:
    """Per mode: the targets (hs/s >= 1.2x, slapd CPU <= the peer's, EHLO p99 < 50 ms)."""
    out = {}
    for mode, pair in results.items():
        ours, peer = pair["saslsmtp"]["median"], pair["postfix+dovecot"]["median"]
        out[mode] = {
            "hs_ratio_at_least_1.2": (ratio(ours["handshakes_per_s"],
                                            peer["handshakes_per_s"]) or 0) >= TARGET_RATIO,
            "slapd_cpu_not_higher": ours["slapd_cpu_ms_per_login"]
            <= peer["slapd_cpu_ms_per_login"],
            "ehlo_p99_under_50ms": (ours["ehlo_ms"]["p99"] or 1e9) < EHLO_P99_TARGET_MS,
            "no_errors": ours["ok"] and peer["ok"],
        }
    return out


def markdown(results: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [f"# saslsmtp ldap backend vs Postfix + Dovecot (passdb ldap, auth_bind) — "
             f"{meta['date']}", "",
             f"- commit {meta['commit']}; {meta['cpus']} CPUs shared by slapd, both servers, "
             "the generator and the probe; one slapd for everything",
             f"- load: {'smtp_load.c' if meta.get('generator') == 'c' else 'smtp_auth_load.py'}"
             f" AUTH PLAIN as alice, C={meta['concurrency']}, "
             f"{meta['warmup']} s warm-up + {meta['duration']} s, median of {meta['repeat']} "
             "by hs/s, servers alternately; EHLO probe every "
             f"{meta['probe_interval'] * 1000:.0f} ms on one open connection",
             f"- saslsmtp: twistd, workers {meta['workers']}, ldap backend only, threads "
             f"{meta['threads']} per process, pool_size "
             f"{meta['pool_size'] or 'default'}, no auth cache, failure_delay 0",
             "- Postfix + Dovecot: private instances (tests/postfix.py, tests/dovecot.py), "
             "smtpd_sasl_type = dovecot, passdb ldap, auth_bind = yes, auth_cache_size = 0",
             "- CPU = ms per login: server (saslsmtp process; Postfix + Dovecot: every process "
             "of both) and slapd",
             "- saslsmtp-file (if present): the same daemon with a users file ({PLAIN}) "
             "instead of LDAP: the per-session floor the LDAP backend adds to", "",
             "| mode | server | hs/s (runs) | ratio | server CPU ms | slapd CPU ms | "
             "session p50/p99 ms | EHLO p50/p99 ms | gen CPU % |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for mode, pair in results.items():
        peer_hs = pair["postfix+dovecot"]["median"]["handshakes_per_s"]
        for name in pair:
            m = pair[name]["median"]
            runs = ", ".join(f"{h:,.0f}" for h in m["all_handshakes_per_s"])
            lines.append(
                f"| {mode} | {name} | {m['handshakes_per_s']:,.0f} ({runs}) | "
                f"{ratio(m['handshakes_per_s'], peer_hs)} | {m['server_cpu_ms_per_login']} | "
                f"{m['slapd_cpu_ms_per_login']} | {m['session_ms']['p50']} / "
                f"{m['session_ms']['p99']} | {m['ehlo_ms']['p50']} / {m['ehlo_ms']['p99']} | "
                f"{m['generator_cpu_pct']} |")
    lines.append("")
    for mode, verdict in meta["verdicts"].items():
        lines.append(f"- {mode}: " + ", ".join(f"{k} **{'yes' if v else 'NO'}**"
                                               for k, v in verdict.items()))
    problems = [f"{mode} {name} run {r['repeat']}: {r['problem']}"
                for mode, pair in results.items() for name, v in pair.items()
                for r in v["runs"] if r["problem"]]
    if problems:
        lines += ["", "Problems:", *[f"- {p}" for p in problems]]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", action="append", choices=MODES,
                   help="lookup mode (repeatable; default both)")
    p.add_argument("--concurrency", "-c", type=int, default=16)
    p.add_argument("--generator", choices=("python", "c"), default="python",
                   help="smtp_auth_load.py, or smtp_load.c (built with cc on first use), which"
                        " leaves the servers most of the machine")
    p.add_argument("--duration", "-d", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=4, help="saslsmtp backend threads")
    p.add_argument("--workers", type=int, default=1,
                   help="saslsmtp worker processes (server.workers; CPU: all of them)")
    p.add_argument("--pool-size", type=int, default=0,
                   help="saslsmtp pool_size (0: the backend's default)")
    p.add_argument("--file-baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure saslsmtp with a users file (the daemon's floor)")
    p.add_argument("--probe-interval", type=float, default=0.01)
    p.add_argument("--no-save", action="store_true", help="only print the table")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [what for what, ok in (
        ("root (postfix start)", os.geteuid() == 0),
        ("postfix", shutil.which("postfix") or os.path.exists("/usr/sbin/postfix")),
        ("dovecot-core", os.path.exists("/usr/sbin/dovecot")),
        ("dovecot-ldap (apt-get install dovecot-ldap)", os.path.exists(DOVECOT_LDAP_MODULE)))
        if not ok]
    if missing:
        print("ldap_peers.py needs: " + ", ".join(missing), file=sys.stderr)
        return 2
    module_dir, schema_dir = slapd_or_skip()
    modes = args.mode or list(MODES)
    started = dt.datetime.now(dt.timezone.utc)
    with tempfile.TemporaryDirectory(prefix="saslsmtp-ldap-peers-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)  # Dovecot's and Postfix's unprivileged users read below it
        slapd = SlapdServer(root=work / "slapd", module_dir=module_dir, schema_dir=schema_dir)
        slapd.root.mkdir()
        results: dict[str, Any] = {}
        try:
            slapd.start()
            for mode in modes:
                results[mode] = run_mode(mode, slapd, work, args)
        except BenchError as e:
            print(f"ldap_peers.py: {e}", file=sys.stderr)
            return 2
        finally:
            slapd.stop()
    meta = {"date": started.isoformat(timespec="seconds"), "commit": git_commit(),
            "cpus": os.cpu_count(), "concurrency": args.concurrency, "duration": args.duration,
            "warmup": args.warmup, "repeat": args.repeat, "threads": args.threads,
            "workers": args.workers, "pool_size": args.pool_size, "probe_interval": args.probe_interval,
            "generator": args.generator}
    meta["verdicts"] = verdicts(results)
    text = markdown(results, meta)
    print(text)
    if not args.no_save:
        RESULTS.mkdir(exist_ok=True)
        stem = RESULTS / f"{started:%Y%m%d-%H%M%S}-ldap-peers"
        stem.with_suffix(".md").write_text(text)
        stem.with_suffix(".json").write_text(json.dumps(
            {"meta": meta, "results": results}, indent=1) + "\n")
        print(f"saved {stem}.md and .json")
    ok = all(all(v for v in verdict.values()) for verdict in meta["verdicts"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
