"""The benchmark driver's own behaviour (not its figures)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Runs benchmarks/run.py with ``aiosmtpd`` made unimportable, as on a machine where
#: saslsmtp was installed without its test extra.
WITHOUT_AIOSMTPD = """
import runpy, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "aiosmtpd":
            raise ModuleNotFoundError(name)
        return None
sys.meta_path.insert(0, Block())
sys.argv = ["benchmarks/run.py", "--duration", "1"]
runpy.run_path("benchmarks/run.py", run_name="__main__")
"""


def test_missing_test_extra_is_a_message_not_a_traceback() -> None:
    """Without the test extra the driver says what to install and exits 2."""
    done = subprocess.run([sys.executable, "-c", WITHOUT_AIOSMTPD], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "missing Python packages: aiosmtpd" in done.stderr
    assert "pip install -e '.[test]'" in done.stderr


@pytest.mark.parametrize("generator", ["python", "c"])
def test_workers_benchmark_measures_the_master_and_its_workers(generator) -> None:
    """benchmarks/workers.py's one run: the real daemon with two workers serves the
    generator (smtp_auth_load.py, or smtp_load.c built with cc) without errors, and the
    CPU read covers the master and both workers."""
    import argparse
    if generator == "c":
        from tests.conftest import require_binary
        require_binary(os.environ.get("CC", "cc"), "gcc")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import workers as bench
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    result = bench.one_run(2, argparse.Namespace(scheme="plain", concurrency=4, duration=1.0,
                                                 warmup=0.2, generator=generator))
    assert result["generator"] == generator
    assert result["status"] == 0 and result["errors"] == 0
    assert result["processes"] == 3
    assert result["sessions"] > 0 and result["handshakes_per_s"] > 0
    assert result["server_cpu_s"] > 0
    # every session's end line is counted, per worker, from the log the workers share
    # (one more session than the generator's: the start-up probe that waits for a 220)
    assert len(result["sessions_per_worker"]) <= 2
    assert sum(result["sessions_per_worker"]) == result["sessions"] + result["sessions_warmup"] + 1


def load_bench_module(name: str):
    """Import a module of benchmarks/ (not a package) by name."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_servers_all_names_every_peer() -> None:
    """`--servers all` is saslsmtp, aiosmtpd, postfix and null; the default stays two."""
    run = load_bench_module("run")
    assert run.parse_args(["--servers", "all"]).servers == ["saslsmtp", "aiosmtpd", "postfix",
                                                            "null"]
    assert run.parse_args([]).servers == ["saslsmtp", "aiosmtpd"]


@pytest.mark.parametrize("tls", [[], ["--starttls", "--cert", "ecdsa-p256"]],
                         ids=["plaintext", "starttls"])
def test_null_server_alone_is_measured_with_its_cpu(tmp_path, tls) -> None:
    """One short run against the null server, in plaintext and with STARTTLS (a generated
    certificate): no errors, a row with its CPU per session."""
    done = subprocess.run(
        [sys.executable, "benchmarks/run.py", "--servers", "null", "-c", "2", "-d", "0.5",
         "--warmup", "0", "--results-dir", str(tmp_path), "--label", "t", *tls],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    import json
    [saved] = tmp_path.glob("*-t.json")
    [point] = json.loads(saved.read_text())["points"]
    assert point["null"]["errors"] == 0 and point["null"]["sessions"] > 0
    assert point["null"]["server_cpu_ms_per_session"] > 0
    assert ("| PLAIN STARTTLS | 2 |" if tls else "| PLAIN | 2 |") in done.stdout


BURN_IN_GRANDCHILD = """
import subprocess, sys, time
subprocess.run([sys.executable, "-c",
                "import time\\nend = time.process_time() + 0.3\\nwhile time.process_time() < end: pass"])
print("done", flush=True)
time.sleep(30)
"""


def test_tree_cpu_counts_children_that_exited() -> None:
    """The Postfix peer's CPU read counts a process tree's exited, reaped children."""
    peer = load_bench_module("postfix_peer")
    child = subprocess.Popen([sys.executable, "-c", BURN_IN_GRANDCHILD], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "done\n"
        assert peer.tree_cpu_s([child.pid]) >= 0.3
        assert peer.descendants([child.pid]) == [child.pid]
    finally:
        child.kill()
        child.wait()


#: User time in a loop, then kernel time in stat() calls, then a pause: fixed figures.  Each
#: loop counts its own part (``process_time`` would count the start's kernel time as user).
BURN_USER_THEN_KERNEL = """
import os, sys, time
start = os.times()
while os.times().user - start.user < 0.3: pass
start = os.times()
while os.times().system - start.system < 0.3:
    for _ in range(1000): os.stat("/")
print("done", flush=True)
time.sleep(30)
"""


def test_cpu_part_counts_user_or_kernel_time_only() -> None:
    """``limits_cpu --cpu-part``: the server's user time and its kernel time, apart; the two
    add up to what every other benchmark counts."""
    bench = load_bench_module("run")
    child = subprocess.Popen([sys.executable, "-c", BURN_USER_THEN_KERNEL],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "done\n"
        parts = {}
        for part, fields in bench.CPU_PARTS.items():
            bench.CPU_FIELDS = fields
            parts[part] = bench.process_cpu_s(child.pid)
        assert parts["user"] >= 0.3 and parts["system"] >= 0.3, parts
        assert parts["user"] + parts["system"] == pytest.approx(parts["all"]), parts
    finally:
        bench.CPU_FIELDS = bench.CPU_PARTS["all"]
        child.kill()
        child.wait()


def test_postfix_peer_serves_auth_plain_and_delivers() -> None:
    """The Postfix peer (Postfix smtpd + Dovecot SASL) accepts the bench user with AUTH
    PLAIN, refuses a wrong password, delivers a message into its Maildir, and its CPU
    read covers Postfix's and Dovecot's processes."""
    import os
    import smtplib
    from tests.conftest import require, require_binary
    require_binary("/usr/sbin/postfix", "postfix")
    require_binary("/usr/sbin/dovecot", "dovecot-core")
    require(os.geteuid() == 0, "postfix -c DIR start needs root")
    peer = load_bench_module("postfix_peer").PostfixPeer("bench", "benchpass")
    try:
        peer.start()
        with smtplib.SMTP("127.0.0.1", peer.port, timeout=10) as smtp:
            smtp.ehlo("test.example")
            with pytest.raises(smtplib.SMTPAuthenticationError):
                smtp.login("bench", "wrong")
        with smtplib.SMTP("127.0.0.1", peer.port, timeout=10) as smtp:
            smtp.ehlo("test.example")
            assert "CRAM-MD5" in smtp.esmtp_features["auth"].upper()
            assert "SCRAM-SHA-256" in smtp.esmtp_features["auth"].upper()
            smtp.user, smtp.password = "bench", "benchpass"
            code, _ = smtp.auth("PLAIN", smtp.auth_plain, initial_response_ok=True)
            assert code == 235
            smtp.sendmail("a@example.com", ["b@example.com"], b"Subject: t\r\n\r\nhello\r\n")
        peer.settle(timeout=15)
        assert peer.delivered() == 1
        peer.cpu_s()
        assert {"master", "smtpd", "cleanup", "virtual", "dovecot", "auth"} <= peer.seen
    finally:
        peer.stop()
    assert not peer.root.exists()


def test_c_generator_counts_sessions_and_wrong_passwords(tmp_path) -> None:
    """smtp_load.c, built with cc, against the null server: sessions and no error with the
    right password; with a wrong one no session succeeds, the 535 is reported and the exit
    status is 1."""
    import json
    from tests.conftest import require_binary
    require_binary(os.environ.get("CC", "cc"), "gcc")
    c_loadgen = load_bench_module("c_loadgen")
    binary = c_loadgen.build(tmp_path / "smtp_load")
    run_module = load_bench_module("run")
    port = run_module.free_port()
    server = run_module.Server("null", [sys.executable, str(ROOT / "benchmarks/null_smtp_server.py"),
                                        "--port", str(port)], port, tmp_path)
    server.start()  # waits for its 220
    try:
        def run(password: str) -> tuple[subprocess.CompletedProcess, dict]:
            done = subprocess.run([str(binary), "--port", str(port), "-c", "4", "-d", "0.5",
                                   "-w", "0.1", "--password", password],
                                  capture_output=True, text=True, timeout=30)
            return done, json.loads(done.stdout)
        done, good = run("benchpass")
        assert done.returncode == 0, done.stderr
        assert good["errors"] == 0 and good["ok"] == good["sessions_measured"] > 0
        assert good["sessions_warmup"] > 0 and good["handshakes_per_s"] > 0
        assert 0 < good["latency_ms"]["session"]["p50"] <= good["latency_ms"]["session"]["p99"]
        done, bad = run("wrong")
        assert done.returncode == 1
        assert bad["ok"] == 0 and bad["errors"] > 0
        assert "error at auth: unexpected reply: 535" in done.stderr
    finally:
        server.stop()


def test_c_generator_mail_sessions_land_in_the_maildir(tmp_path) -> None:
    """smtp_load.c --mail against the real daemon: every session that ended (warm-up
    included) stored the Python generator's message, as the generator sends it (dot-
    unstuffed, LF line ends in the Maildir) after the daemon's Received header; a file
    that is not a message ending CRLF.CRLF is a usage error."""
    import json
    from tests.conftest import require_binary
    from tests.support import free_port, start_daemon, write_config
    require_binary(os.environ.get("CC", "cc"), "gcc")
    c_loadgen = load_bench_module("c_loadgen")
    binary = c_loadgen.build(tmp_path / "smtp_load")
    message = c_loadgen.message_file()
    (tmp_path / "users").write_text("bench:{PLAIN}benchpass\n")
    port = free_port()
    config = write_config(tmp_path, f'[backends.users]\ntype = "file"\npath = "{tmp_path / "users"}"\n',
                          mechanisms=["PLAIN"], listen=[f"tcp:{port}:interface=127.0.0.1"])
    daemon = start_daemon(config, port, tmp_path / "daemon.log")
    try:
        done = subprocess.run([str(binary), "--port", str(port), "-c", "4", "-d", "0.5",
                               "-w", "0.1", "--mail", str(message)],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        assert result["config"]["mode"] == "mail" and result["errors"] == 0
        assert result["config"]["message_bytes"] == message.stat().st_size
        stored = sorted((tmp_path / "mail" / "new").iterdir())
        assert len(stored) == result["ok"] + result["sessions_warmup"] > 0
        sent = message.read_bytes()[:-3].replace(b"\r\n..", b"\r\n.")  # without the "."
        body = stored[0].read_bytes()
        assert body.startswith(b"Received: ") and body.endswith(sent.replace(b"\r\n", b"\n"))
        bad = tmp_path / "truncated.eml"
        bad.write_bytes(sent)  # no terminating dot
        done = subprocess.run([str(binary), "--port", str(port), "--mail", str(bad)],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 2
        assert "not a readable message ending CRLF.CRLF" in done.stderr
    finally:
        daemon.stop()


def test_ab_runs_two_checkouts_in_turns(tmp_path) -> None:
    """benchmarks/ab.py: each daemon imports its own checkout, each round measures both,
    and the report has one row per round and the medians."""
    ab = load_bench_module("ab")
    own, load = ab.parse_args([str(ROOT), str(ROOT), "--rounds", "2"])
    (tmp_path / "d").mkdir()
    server = ab.daemon("old", own.old, tmp_path / "d", load)
    assert server.env["PYTHONPATH"] == str(ROOT) and server.name == "old"
    done = subprocess.run(
        [sys.executable, "benchmarks/ab.py", str(ROOT), "--rounds", "2", "-d", "0.5",
         "--warmup", "0", "-c", "2", "--results-dir", str(tmp_path), "--label", "t"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[0] for r in rows[2:]] == ["| 1", "| 2", "| median"]
    assert "C = 2" in done.stdout
    [saved] = tmp_path.glob("*-ab-t.md")
    assert saved.read_text() + "\n" == done.stdout


def test_ab_refuses_a_folder_that_is_not_a_checkout(tmp_path) -> None:
    done = subprocess.run([sys.executable, "benchmarks/ab.py", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"{tmp_path}: not a saslsmtp checkout" in done.stderr
    assert "Traceback" not in done.stderr


def test_ab_instructions_counts_what_each_daemon_executes_per_session(tmp_path) -> None:
    """benchmarks/ab_instructions.py: both daemons under callgrind, a counted load each,
    a plausible instruction count per session for each (one checkout against itself:
    about the same), the report saved as printed."""
    from tests.conftest import require_binary
    require_binary("valgrind", "valgrind")
    require_binary("callgrind_control", "valgrind")
    done = subprocess.run(
        [sys.executable, "benchmarks/ab_instructions.py", str(ROOT), "--count", "30",
         "--repeats", "1", "--warmup-sessions", "10", "--results-dir", str(tmp_path),
         "--label", "t"],
        cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr
    rows = [line.split(" | ") for line in done.stdout.splitlines() if line.startswith("| ")]
    assert [r[0] for r in rows[2:]] == ["| 1", "| median"]
    old, new = (int(v.replace(",", "")) for v in rows[2][1:3])
    assert 100_000 < old < 20_000_000 and 100_000 < new < 20_000_000, rows[2]
    assert abs(new - old) / old < 0.15, rows[2]
    [saved] = tmp_path.glob("*-ab-instructions-t.md")
    assert saved.read_text() + "\n" == done.stdout


def test_ab_instructions_without_valgrind_says_so(tmp_path) -> None:
    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "git").symlink_to("/usr/bin/git")
    done = subprocess.run(
        [sys.executable, "benchmarks/ab_instructions.py", str(ROOT)], cwd=ROOT,
        capture_output=True, text=True, timeout=60, env={**os.environ, "PATH": str(bare)})
    assert done.returncode == 1
    assert "valgrind and callgrind_control not found" in done.stderr
    assert "Traceback" not in done.stderr
