"""The abuse limits wired into real daemons (``twistd -n saslsmtp``) on loopback: a brute
force cut across two processes sharing one Redis, the hang-up trick, per-user failures
from 50 addresses, connection limits, Redis going away and coming back.

Clients pick their source address in 127.0.0.0/8 so each "client" is its own address.
Every wrong password is distinct: repeats of one failed pair count once by design.
"""

from __future__ import annotations

import base64
import contextlib
import re
import smtplib
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from scramp import ScramClient

from tests.conftest import require_binary
from tests.limitsnet import (PASSWORD, auth_plain, connect, daemon, read_reply, users_toml,
                             wait_for_log)
from tests.redis import start_redis
from tests.support import ROOT, Daemon, free_port, start_daemon, write_config
from tests.tlsutil import issue_cert, make_ca

FILTER = ROOT / "etc" / "fail2ban" / "filter.d" / "saslsmtp.conf"


def wait_for_redis_clients(redis, count: int, timeout: float = 10.0) -> None:
    """Both daemons hold a Redis connection (so the first failure is counted)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if redis.command("CLIENT", "LIST").count(b"cmd=") >= count + 1:
            return
        time.sleep(0.05)
    raise AssertionError(redis.command("CLIENT", "LIST"))


def failures_logged(log: str, client: str, reason: str = "invalid credentials") -> int:
    return len(re.findall(rf'auth failed: client={re.escape(client)} mechanism=\S+ user="[^"]*"'
                          rf' reason="{reason}"', log))


@contextlib.contextmanager
def released(server: Daemon, held: list[tuple[socket.socket, Any]]) -> Iterator[None]:
    """However a test that holds connections open ends: each of ``held`` (a socket and
    its file) is closed, and the daemon stopped."""
    try:
        yield
    finally:
        for s, f in held:
            f.close()
            s.close()
        server.stop()


@pytest.mark.alone
def test_brute_force_cut_in_total_across_two_processes_sharing_redis(tmp_path: Path) -> None:
    """Two daemons on different ports, one Redis: the sixth failure from one address is
    refused (454) whichever process it reaches; a second address logs in meanwhile; after
    the 3 s window the first address logs in again."""
    redis = start_redis(tmp_path / "redis")
    backends = users_toml(tmp_path, {"alice": PASSWORD, "bob": PASSWORD})
    limits = f'store = "{redis.url}"\nauth_failures_per_ip = "5/3s"\n'
    one = daemon(tmp_path, "one", limits, backends)
    two = daemon(tmp_path, "two", limits, backends)
    try:
        wait_for_redis_clients(redis, 2)
        codes = []
        for i in range(8):
            answer = auth_plain((one, two)[i % 2].port, "alice", f"guess-{i}", "127.0.0.11")
            codes.append(answer.code)
            if i == 5:
                started = time.monotonic()
                other = auth_plain(two.port, "bob", PASSWORD, "127.0.0.12")
                other_took = time.monotonic() - started
        assert codes == [535] * 5 + [454] * 3, codes
        assert other.code == 235 and other_took < 1.0
        logs = one.log_text() + two.log_text()
        assert failures_logged(logs, "127.0.0.11") == 5
        assert failures_logged(logs, "127.0.0.11", "too many failures") == 3
        assert failures_logged(one.log_text(), "127.0.0.11") in (2, 3)  # both processes counted
        time.sleep(3.2)
        assert auth_plain(one.port, "alice", PASSWORD, "127.0.0.11").code == 235
    finally:
        one.stop()
        two.stop()
        redis.stop()


def test_hanging_up_gets_no_more_guesses_through(tmp_path: Path) -> None:
    """A client that hangs up 100 ms after each AUTH (so never waits for the 1 s
    failure delay) gets exactly as many guesses checked as one that waits for its 535:
    a failure counts when the credentials are found wrong, not when the reply is sent.
    The hash (bcrypt, cost 12: about 270 ms) outlasts the 100 ms, so the client is gone
    before its verdict is known."""
    from saslsmtp.passwords import make_hash
    backends = users_toml(tmp_path, {"alice": make_hash("BLF-CRYPT", PASSWORD, rounds=12)})
    server = daemon(tmp_path, "d", 'auth_failures_per_ip = "5/1m"\n', backends,
                    failure_delay=1.0)
    try:
        started = time.monotonic()
        for i in range(10):
            auth_plain(server.port, "alice", f"hang-{i}", "127.0.0.21", hang_up_after=0.1)
        hung_took = time.monotonic() - started
        log = wait_for_log(server, "client=127.0.0.21", 10)
        started = time.monotonic()
        waited = [auth_plain(server.port, "alice", f"wait-{i}", "127.0.0.22").code
                  for i in range(10)]
        wait_took = time.monotonic() - started
        log = server.log_text()
        hung, patient = failures_logged(log, "127.0.0.21"), failures_logged(log, "127.0.0.22")
        print(f"\nhang-up client: {hung} guesses checked of 10 in {hung_took:.2f} s;"
              f" waiting client: {patient} of 10 in {wait_took:.2f} s")
        assert waited == [535] * 5 + [454] * 5
        assert hung == patient == 5
        assert failures_logged(log, "127.0.0.21", "too many failures") == 5
    finally:
        server.stop()


def test_penalty_delays_every_verdict_of_an_address_with_failures(tmp_path: Path) -> None:
    """With auth_penalty_max, after a failure even the right password waits (2 s), so the
    timing of an answer says nothing; another address is answered at once."""
    backends = users_toml(tmp_path, {"alice": PASSWORD})
    server = daemon(tmp_path, "d", "auth_penalty_max = 4\n", backends)
    try:
        assert auth_plain(server.port, "alice", "wrong", "127.0.0.31").code == 535
        started = time.monotonic()
        assert auth_plain(server.port, "alice", PASSWORD, "127.0.0.31").code == 235
        penalised = time.monotonic() - started
        started = time.monotonic()
        assert auth_plain(server.port, "alice", PASSWORD, "127.0.0.32").code == 235
        fresh = time.monotonic() - started
        assert penalised >= 2.0 and fresh < 1.0, (penalised, fresh)
    finally:
        server.stop()


def test_one_user_from_fifty_addresses_is_cut_but_trusted_network_logs_in(tmp_path: Path) -> None:
    """Password spraying one username from 50 addresses: cut at the configured count in
    total; the owner's right password still works from a trusted network (and, the
    trade-off, is refused from an untrusted one until the window rolls)."""
    backends = users_toml(tmp_path, {"victim": PASSWORD})
    limits = ('auth_failures_per_user = "10/1m"\nauth_failures_per_ip = "5/1m"\n'
              'trusted_networks = ["127.0.9.0/24"]\n')
    server = daemon(tmp_path, "d", limits, backends)
    try:
        codes = [auth_plain(server.port, "victim", f"spray-{i}", f"127.0.1.{i + 1}").code
                 for i in range(50)]
        assert codes == [535] * 10 + [454] * 40, codes
        assert auth_plain(server.port, "victim", PASSWORD, "127.0.9.9").code == 235
        assert auth_plain(server.port, "Victim", PASSWORD, "127.0.2.1").code == 454
    finally:
        server.stop()


def test_connection_limits_421_and_trusted_networks_are_exempt(tmp_path: Path) -> None:
    """200 connections held from one address: the 201st gets 421 4.7.0 and is closed; a
    trusted address holds 210; closing one frees a seat."""
    backends = users_toml(tmp_path, {"alice": PASSWORD})
    limits = 'connections_per_ip = 200\ntrusted_networks = ["127.0.0.42/32"]\n'
    server = daemon(tmp_path, "d", limits, backends)
    held = []
    with released(server, held):
        for _ in range(200):
            s, f, banner = connect(server.port, "127.0.0.41")
            assert banner.startswith(b"220 "), banner
            held.append((s, f))
        s, f, banner = connect(server.port, "127.0.0.41")
        assert banner == b"421 4.7.0 Too many connections from 127.0.0.41\r\n"
        assert f.readline() == b""  # closed
        f.close()
        s.close()
        for _ in range(210):
            s, f, banner = connect(server.port, "127.0.0.42")
            assert banner.startswith(b"220 "), banner
            held.append((s, f))
        s, f = held.pop(0)
        f.close()
        s.close()
        deadline = time.monotonic() + 10
        while True:  # the seat is free once the daemon has seen that close
            s, f, banner = connect(server.port, "127.0.0.41")
            if banner.startswith(b"220 "):
                held.append((s, f))
                break
            f.close()
            s.close()
            assert banner == b"421 4.7.0 Too many connections from 127.0.0.41\r\n", banner
            assert time.monotonic() < deadline, "closing a connection freed no seat"
            time.sleep(0.05)


def test_connection_rate_421(tmp_path: Path) -> None:
    """connection_rate_per_ip = 5/1m: the sixth new connection in the window is refused
    with 421 4.7.0 and closed; a trusted address is not counted."""
    backends = users_toml(tmp_path, {"alice": PASSWORD})
    limits = 'connection_rate_per_ip = "5/1m"\ntrusted_networks = ["127.0.0.52/32"]\n'
    server = daemon(tmp_path, "d", limits, backends)
    try:
        banners = []
        for source in ["127.0.0.51"] * 7 + ["127.0.0.52"] * 7:
            s, f, banner = connect(server.port, source)
            banners.append(banner[:9])
            f.close()
            s.close()
        assert banners == [b"220 mx.ex"] * 5 + [b"421 4.7.0"] * 2 + [b"220 mx.ex"] * 7
        assert "connection_rate_per_ip reached for 127.0.0.51" in server.log_text()
    finally:
        server.stop()


def test_redis_stopped_mid_run_fails_open_then_limits_resume(tmp_path: Path) -> None:
    """Redis stops: logins keep working and wrong passwords get 535 past the limit (fail
    open), one warning line for many calls; Redis restarts: the limits apply again."""
    redis = start_redis(tmp_path / "redis")
    backends = users_toml(tmp_path, {"alice": PASSWORD})
    limits = f'store = "{redis.url}"\nauth_failures_per_ip = "3/1m"\n'
    server = daemon(tmp_path, "d", limits, backends)
    try:
        wait_for_redis_clients(redis, 1)
        redis.stop()
        codes = [auth_plain(server.port, "alice", f"down-{i}", "127.0.0.61").code
                 for i in range(6)]
        assert auth_plain(server.port, "alice", PASSWORD, "127.0.0.61").code == 235
        assert codes == [535] * 6
        log = server.log_text()
        assert log.count("unavailable") == 1, log[-3000:]
        assert "Traceback" not in log
        redis.start()
        deadline = time.monotonic() + 30
        while "answering again" not in server.log_text():
            assert time.monotonic() < deadline, server.log_text()[-3000:]
            auth_plain(server.port, "alice", PASSWORD, "127.0.0.62")
            time.sleep(0.5)
        codes = [auth_plain(server.port, "alice", f"up-{i}", "127.0.0.63").code
                 for i in range(5)]
        assert codes == [535] * 3 + [454] * 2
    finally:
        server.stop()
        redis.stop()


# ---- fail2ban over the daemon's own log ------------------------------------------------

def _session(port: int, source: str) -> smtplib.SMTP:
    """An SMTP session after STARTTLS (XOAUTH2 is offered only over TLS)."""
    import ssl
    s = smtplib.SMTP("127.0.0.1", port, timeout=20, source_address=(source, 0))
    s.ehlo("client.example")
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    s.starttls(context=context)
    s.ehlo("client.example")
    return s


def _smtplib_auth(port: int, source: str, mechanism: str, user: str, password: str) -> int:
    with _session(port, source) as s:
        s.user, s.password = user, password
        method = getattr(s, "auth_" + mechanism.lower().replace("-", "_"))
        try:
            return s.auth(mechanism, method, initial_response_ok=False)[0]
        except smtplib.SMTPAuthenticationError as e:
            return e.smtp_code


def _scram(port: int, source: str, user: str, password: str) -> int:
    client = ScramClient(["SCRAM-SHA-256"], user, password)
    with _session(port, source) as s:
        code, text = s.docmd("AUTH", "SCRAM-SHA-256 "
                             + base64.b64encode(client.get_client_first().encode()).decode())
        assert code == 334, text
        client.set_server_first(base64.b64decode(text).decode())
        code, text = s.docmd(base64.b64encode(client.get_client_final().encode()).decode())
        while code == 334:
            code, text = s.docmd("")
        return code


def _xoauth2(port: int, source: str, user: str, token: str) -> int:
    with _session(port, source) as s:
        blob = base64.b64encode(f"user={user}\x01auth=Bearer {token}\x01\x01".encode()).decode()
        code, _ = s.docmd("AUTH", "XOAUTH2 " + blob)
        while code == 334:
            code, _ = s.docmd("")
        return code


def test_fail2ban_regex_matches_every_failed_auth_in_the_real_log(tmp_path: Path) -> None:
    """The daemon's own log (twistd text format), after failed and successful AUTHs with
    PLAIN, LOGIN, CRAM-MD5, SCRAM-SHA-256 and XOAUTH2: the shipped filter finds exactly
    the failing addresses, once per failure, and no successful one."""
    from saslsmtp.passwords import make_hash
    from tests.test_checker_oauth2 import AUDIENCE, ISSUER, claims, ec_key, jwks, signed
    binary = require_binary("fail2ban-regex", "fail2ban")
    signer = ec_key("limits-key")
    (tmp_path / "jwks.json").write_bytes(jwks(signer))
    user = "alice@example.test"
    users = tmp_path / "users"
    users.write_text(f"{user}:{{PLAIN}}{PASSWORD}\n"
                     f"scram:{make_hash('SCRAM-SHA-256', PASSWORD)}\n")
    backends = (f'[backends.users]\ntype = "file"\npath = "{users}"\n\n'
                f'[backends.idp]\ntype = "oauth2"\njwks_file = "{tmp_path / "jwks.json"}"\n'
                f'issuer = "{ISSUER}"\naudience = "{AUDIENCE}"\n')
    folder = tmp_path / "d"
    folder.mkdir()
    port = free_port()
    cert = issue_cert(make_ca(tmp_path), tmp_path, names=["127.0.0.1"])
    config = write_config(folder, backends, backends=["users"],
                          tls=(cert.chain_path, cert.key_path),
                          mechanisms=["PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256", "XOAUTH2"],
                          listen=[f"tcp:{port}:interface=127.0.0.1"], max_failures=100)
    server = start_daemon(config, port, folder / "daemon.log")
    good, expired = signed(signer, claims()), signed(signer, claims(time.time() - 7200))
    attempts = [  # (source, attempt, expected code)
        ("127.0.3.1", lambda a: auth_plain(port, user, "nope-1", a).code, 535),
        ("127.0.3.2", lambda a: _smtplib_auth(port, a, "LOGIN", user, "nope-2"), 535),
        ("127.0.3.3", lambda a: _smtplib_auth(port, a, "CRAM-MD5", user, "nope-3"), 535),
        ("127.0.3.4", lambda a: _scram(port, a, "scram", "nope-4"), 535),
        ("127.0.3.5", lambda a: _xoauth2(port, a, user, expired), 535),
        ("127.0.3.6", lambda a: auth_plain(port, "nobody", "nope-6", a).code, 535),
        ("127.0.4.1", lambda a: auth_plain(port, user, PASSWORD, a).code, 235),
        ("127.0.4.2", lambda a: _smtplib_auth(port, a, "LOGIN", user, PASSWORD), 235),
        ("127.0.4.3", lambda a: _smtplib_auth(port, a, "CRAM-MD5", user, PASSWORD), 235),
        ("127.0.4.4", lambda a: _scram(port, a, "scram", PASSWORD), 235),
        ("127.0.4.5", lambda a: _xoauth2(port, a, user, good), 235),
    ]
    try:
        codes = [attempt(source) for source, attempt, _ in attempts]
        assert codes == [expected for _, _, expected in attempts]
        wait_for_log(server, "auth failed:", 6)
        wait_for_log(server, "auth succeeded:", 5)
    finally:
        server.stop()
    run = subprocess.run([binary, "-o", "ip", str(folder / "daemon.log"), str(FILTER)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [f"127.0.3.{i}" for i in range(1, 7)]


# ---- two hosts behind HAProxy (PROXY v2) -------------------------------------------------

def start_haproxy(folder: Path, port: int, backends: list[int]) -> subprocess.Popen:
    """haproxy in the foreground: round robin over ``backends``, each sent PROXY v2."""
    binary = require_binary("haproxy", "haproxy")
    servers = "".join(f"    server s{i} 127.0.0.1:{p} send-proxy-v2\n"
                      for i, p in enumerate(backends))
    config = folder / "haproxy.cfg"
    config.write_text(
        "global\n    maxconn 512\n\n"
        "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 30s\n"
        "    timeout server 30s\n\n"
        f"frontend submission\n    bind 127.0.0.1:{port}\n    default_backend saslsmtp\n\n"
        f"backend saslsmtp\n    balance roundrobin\n{servers}")
    log = open(folder / "haproxy.log", "wb")
    process = subprocess.Popen([binary, "-db", "-f", str(config)], stdout=log,
                               stderr=subprocess.STDOUT)
    log.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            connect(port)[0].close()
            return process
        except OSError:
            assert process.poll() is None, (folder / "haproxy.log").read_text()
            time.sleep(0.05)
    process.kill()
    raise AssertionError((folder / "haproxy.log").read_text())


def test_brute_force_cut_in_total_behind_haproxy_proxy_v2(tmp_path: Path) -> None:
    """The same two daemons sharing Redis, behind a real HAProxy sending PROXY v2: the
    counters see the client's own address (not HAProxy's), so the brute force is cut at
    five failures in total while another address logs in; after the window it logs in."""
    redis = start_redis(tmp_path / "redis")
    backends = users_toml(tmp_path, {"alice": PASSWORD, "bob": PASSWORD})
    limits = f'store = "{redis.url}"\nauth_failures_per_ip = "5/3s"\n'
    one = daemon(tmp_path, "one", limits, backends, listen="haproxy:tcp")
    two = daemon(tmp_path, "two", limits, backends, listen="haproxy:tcp")
    front = free_port()
    proxy = start_haproxy(tmp_path, front, [one.port, two.port])
    try:
        wait_for_redis_clients(redis, 2)
        codes = [auth_plain(front, "alice", f"proxied-{i}", "127.0.5.1").code for i in range(8)]
        other = auth_plain(front, "bob", PASSWORD, "127.0.5.2")
        assert codes == [535] * 5 + [454] * 3, codes
        assert other.code == 235
        logs = one.log_text() + two.log_text()
        assert failures_logged(logs, "127.0.5.1") == 5
        assert failures_logged(one.log_text(), "127.0.5.1") in (2, 3)  # both hosts served
        time.sleep(3.2)
        assert auth_plain(front, "alice", PASSWORD, "127.0.5.1").code == 235
    finally:
        proxy.terminate()
        proxy.wait(10)
        one.stop()
        two.stop()
        redis.stop()


# ---- the script's rate() on both stores ------------------------------------------------

PIN_SCRIPT = '''
from saslsmtp.script import Accept, Defer, Reject, Reply

MECHANISMS = {"X-PIN"}

async def auth(arguments, context):
    if arguments["state"] == 0:
        return Reply(b"PIN?")
    if not await arguments["rate"]("x-pin", arguments["remote_ip"], 3, 60):
        return Defer("Too many PIN attempts")
    user, _, pin = arguments["response"].decode().partition(":")
    return Accept(username=user) if pin == "4711" else Reject()
'''


def _pin(port: int, source: str, pin: str) -> int:
    s, f, banner = connect(port, source)
    try:
        s.sendall(b"EHLO client.example\r\nAUTH X-PIN\r\n")
        line = f.readline()
        while line[3:4] == b"-" or line.startswith(b"250 "):
            line = f.readline()
        assert line.startswith(b"334 "), line
        s.sendall(base64.b64encode(f"alice:{pin}".encode()) + b"\r\n")
        return int(f.readline()[:3])
    finally:
        f.close()
        s.close()


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_script_rate_limits_a_custom_mechanism(tmp_path: Path, store: str) -> None:
    """An AUTH script serving X-PIN allows three tries per address a minute with
    ``arguments["rate"]``, on either store; another address is unaffected."""
    redis = start_redis(tmp_path / "redis") if store == "redis" else None
    script = tmp_path / "pin.py"
    script.write_text(PIN_SCRIPT)
    folder = tmp_path / "d"
    folder.mkdir()
    port = free_port()
    config = write_config(folder, "", backends=[], mechanisms=["X-PIN"], script=str(script),
                          listen=[f"tcp:{port}:interface=127.0.0.1"], max_failures=100,
                          extra=f'[limits]\nstore = "{redis.url if redis else "memory"}"\n')
    server = start_daemon(config, port, folder / "daemon.log")
    try:
        if redis is not None:
            wait_for_redis_clients(redis, 1)
        codes = [_pin(port, "127.0.6.1", pin) for pin in ("0000", "1111", "4711", "4711")]
        assert codes == [535, 535, 235, 454]
        assert _pin(port, "127.0.6.2", "4711") == 235
        if redis is not None:
            assert redis.command("KEYS", "saslsmtp:script:*").count(b"127.0.6.") == 2
    finally:
        server.stop()
        if redis is not None:
            redis.stop()


def test_connection_limit_counts_the_address_in_the_proxy_header(tmp_path: Path) -> None:
    """On a haproxy: listener the client is the PROXY header's address, and the session
    starts only once the header is read: the third connection claiming 203.0.113.9 gets
    421 4.7.0 instead of the greeting (no 220 first) and is closed, while another claimed
    address is greeted."""
    backends = users_toml(tmp_path, {"alice": PASSWORD})
    server = daemon(tmp_path, "d", "connections_per_ip = 2\n", backends, listen="haproxy:tcp")
    held = []

    def proxied(client: str) -> bytes:
        s = socket.create_connection(("127.0.0.1", server.port), timeout=20)
        f = s.makefile("rb")
        held.append((s, f))
        s.sendall(f"PROXY TCP4 {client} 127.0.0.1 40000 587\r\n".encode())
        return read_reply(f)

    with released(server, held):
        assert proxied("203.0.113.9").startswith(b"220 ")
        assert proxied("203.0.113.9").startswith(b"220 ")
        assert proxied("203.0.113.9") == b"421 4.7.0 Too many connections from 203.0.113.9\r\n"
        assert held[-1][1].readline() == b""
        assert proxied("203.0.113.10").startswith(b"220 ")


def test_messages_and_recipients_per_user_452(tmp_path: Path) -> None:
    """recipients_per_user = 3/1m: the fourth RCPT of a user gets 452 4.7.1;
    messages_per_user = 2/1m: after two accepted messages, MAIL gets 452 4.7.1."""
    backends = users_toml(tmp_path, {"alice": PASSWORD, "bob": PASSWORD})
    limits = 'messages_per_user = "2/1m"\nrecipients_per_user = "3/1m"\n'
    server = daemon(tmp_path, "d", limits, backends)
    try:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=20) as s:
            s.login("alice", PASSWORD)
            assert s.mail("alice@example.test")[0] == 250
            replies = [s.rcpt(f"r{i}@example.test") for i in range(4)]
            assert [code for code, _ in replies] == [250, 250, 250, 452]
            assert replies[3][1] == b"4.7.1 Too many recipients, try again later"
        with smtplib.SMTP("127.0.0.1", server.port, timeout=20) as s:
            s.login("bob", PASSWORD)
            for i in range(2):
                assert s.sendmail("bob@example.test", ["x@example.test"],
                                  f"Subject: {i}\r\n\r\nhi\r\n") == {}
            assert s.mail("bob@example.test") == (
                452, b"4.7.1 Too many messages, try again later")
    finally:
        server.stop()


def test_connection_limit_behind_proxy_with_implicit_tls(tmp_path: Path) -> None:
    """haproxy:ssl: the TLS layer sits on the PROXY wrapper; the limit still counts the
    header's address (not the proxy's): the second connection claiming one address gets
    421 4.7.0 instead of the greeting once the handshake is done, another address is
    greeted."""
    import ssl
    cert = issue_cert(make_ca(tmp_path), tmp_path, names=["127.0.0.1"])
    backends = users_toml(tmp_path, {"alice": PASSWORD})
    server = daemon(tmp_path, "d", "connections_per_ip = 1\n", backends, listen="haproxy:ssl",
                    extra=f'[tls]\ncertificate = "{cert.chain_path}"\n'
                          f'private_key = "{cert.key_path}"\n')
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    held = []

    def proxied(client: str) -> bytes:
        raw = socket.create_connection(("127.0.0.1", server.port), timeout=20)
        raw.sendall(f"PROXY TCP4 {client} 127.0.0.1 40000 465\r\n".encode())
        s = context.wrap_socket(raw)
        f = s.makefile("rb")
        held.append((s, f))
        return read_reply(f)

    with released(server, held):
        assert proxied("203.0.113.20").startswith(b"220 ")
        assert proxied("203.0.113.20") == b"421 4.7.0 Too many connections from 203.0.113.20\r\n"
        assert proxied("203.0.113.21").startswith(b"220 ")
