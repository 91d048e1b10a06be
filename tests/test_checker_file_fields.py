"""Dovecot passwd-file extra fields in the ``file`` backend: ``nologin`` (with ``reason``),
``allow_nets`` (IPv4, IPv6, ``local``), ``nopassword``, the ones saslsmtp cannot check, the
ones it ignores (and says so at ``--check``), and the auth cache, which must not reuse a
success from an allowed network for a client outside it (through the real daemon)."""

from __future__ import annotations

import re
import smtplib
import subprocess
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import threads
from twisted.logger import formatEvent

from saslsmtp import passwords
from saslsmtp.checkers.chain import BackendChain
from saslsmtp.checkers.file import Access, FileChecker, load_warnings, parse_users
from saslsmtp.credentials import PasswordCredentials
from saslsmtp.errors import AuthRejected, UnknownUser
from saslsmtp.limits.authcache import AuthCache, CachingChecker
from saslsmtp.limits.settings import AuthCacheSettings
from saslsmtp.sasl.outcome import Reject, Session
from saslsmtp.threads import SynchronousRunner
from tests.conftest import require_binary
from tests.support import ROOT, free_port, start_daemon, twistd_command, write_config
from tests.test_checker_file import captured_logs  # noqa: F401  (a fixture)

#: Never in a log line (the suite-wide check also looks for the known passwords).
SECRET = "Fi3lds-are-not-logged"


def creds(user: str, password: str, remote_ip: str = "192.0.2.10") -> PasswordCredentials:
    return PasswordCredentials(user.encode(), password.encode(), Session(remote_ip=remote_ip))


async def verdict(checker: Any, user: str, password: str, remote_ip: str = "192.0.2.10") -> Any:
    """The avatar id, or the failure: ``AuthRejected`` as its ``Reject``, any other
    ``UnauthorizedLogin`` as that class."""
    try:
        return await checker.requestAvatarId(creds(user, password, remote_ip))
    except AuthRejected as e:
        return e.outcome
    except UnauthorizedLogin:
        return UnauthorizedLogin


def users_file(tmp_path: Path, text: str) -> FileChecker:
    path = tmp_path / "users"
    path.write_text(text, encoding="utf-8")
    return FileChecker(str(path), SynchronousRunner())


# ---- parsing --------------------------------------------------------------------------


def test_extra_fields_are_dovecots_eighth_field_on() -> None:
    """As Dovecot's db-passwd-file.c: uid, gid, gecos, home and shell come first; what
    follows (colons kept) is split on spaces.  Dovecot's own documented example parses."""
    parsed = parse_users(b"user:{plain}password::::::allow_nets=192.168.0.0/24\n"
                         b"a:{PLAIN}x:1000:1000:A:/home/a:/bin/sh:nologin reason=Moved:to-b\n"
                         b"b:{PLAIN}x:nologin:allow_nets=1.2.3.4:gecos:/home/b\n")
    assert parsed.problems == ()
    assert parsed.users["user"].access.allow_nets is not None
    assert parsed.users["user"].access.network_allows("192.168.0.77")
    assert not parsed.users["user"].access.network_allows("192.168.1.1")
    a = parsed.users["a"].access
    assert (a.nologin, a.reason) == (True, "Moved:to-b")
    assert parsed.users["b"].access == Access()  # nologin in the uid field is no extra field


def test_unknown_fields_are_ignored_and_listed_once() -> None:
    parsed = parse_users(b"a:{PLAIN}x::::::userdb_mail=maildir:~/M nodelay\n"
                         b"b:{PLAIN}x::::::userdb_mail=mbox:~/m\n"
                         b"c:{PLAIN}x::::::userdb_mail=x userdb_quota_rule=*:storage=1G\n")
    assert set(parsed.users) == {"a", "b", "c"} and parsed.problems == ()
    assert dict(parsed.ignored) == {"userdb_mail": (1, 2, 3), "nodelay": (1,),
                                    "userdb_quota_rule": (3,)}
    assert load_warnings(parsed, ["PLAIN"]) == [
        "extra fields ignored (saslsmtp does not use them): nodelay (line 1),"
        " userdb_mail (line 1 and 2 more), userdb_quota_rule (line 3)"]


@pytest.mark.parametrize("line,problem", [
    (b"a:{PLAIN}x::::::allow_nets=10.0.0.0/8,nonsense", "allow_nets: 'nonsense' is not an address"),
    (b"a:{PLAIN}x::::::allow_nets=", "allow_nets is empty: nobody could log in"),
    (b"a:::::::nopassword", "nopassword without allow_nets"),
    (b"a:::::::allow_nets=10.0.0.0/8", "empty password field"),
])
def test_field_problems_skip_the_line(line: bytes, problem: str) -> None:
    """What would let nobody in, or anybody, is a problem of its line (``--check`` fails,
    the daemon logs and skips it: that user cannot log in)."""
    parsed = parse_users(line + b"\n")
    assert parsed.users == {}
    assert len(parsed.problems) == 1 and parsed.problems[0][0] == 1
    assert problem in parsed.problems[0][1]


def test_nopassword_and_uncheckable_fields_are_warned_about() -> None:
    parsed = parse_users(b"np:::::::nopassword allow_nets=10.0.0.0/8\n"
                         b"np2:{PLAIN}::::::nopassword allow_nets=10.0.0.0/8\n"
                         b"pw:{PLAIN}x::::::nopassword allow_nets=10.0.0.0/8\n"
                         b"f:{PLAIN}x::::::fail\n")
    assert parsed.problems == ()
    assert parsed.users["np"].password is None and parsed.users["np"].access.nopassword
    assert parsed.users["np2"].password is None
    assert parsed.users["pw"].password is not None and not parsed.users["pw"].access.nopassword
    assert parsed.warnings == (
        (1, "user 'np' logs in with any password (nopassword) from allow_nets"),
        (2, "user 'np2' logs in with any password (nopassword) from allow_nets"),
        (3, "user 'pw': nopassword ignored: the password field is not empty (the password is checked)"),
        (4, "user 'f' is refused: saslsmtp cannot check fail"))


@pytest.mark.parametrize("nets,inside,outside", [
    ("127.0.0.0/8,192.168.0.0/16,1.2.3.4", ["127.9.9.9", "1.2.3.4", "::ffff:192.168.3.4"],
     ["1.2.3.5", "10.0.0.1", "::1", ""]),
    ("::1,2001:db8:abcd::0:0/80", ["::1", "2001:db8:abcd::1:2", "2001:db8:abcd:0:0:ffff:1:2"],
     ["::2", "2001:db8:abcd:1::1", "127.0.0.1", ""]),
    ("10.0.0.1/8,local", ["10.200.0.1", ""], ["11.0.0.1"]),
    ("::ffff:10.0.0.0/104", ["10.1.2.3", "::ffff:10.1.2.3"], ["11.0.0.1"]),
    ("fe80::/10", ["fe80::1%eth0"], ["fec0::1", "not-an-ip"]),
])
def test_allow_nets_matching(nets: str, inside: list[str], outside: list[str]) -> None:
    """Networks or addresses between commas, host bits allowed, IPv4-mapped IPv6 as
    IPv4 (Dovecot's rules); ``local`` is a connection without an IP address."""
    access = parse_users(f"a:{{PLAIN}}x::::::allow_nets={nets}\n".encode()).users["a"].access
    for ip in inside:
        assert access.network_allows(ip), ip
    for ip in outside:
        assert not access.network_allows(ip), ip


# ---- verdicts ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_nologin_answers_like_a_wrong_password_unless_it_has_a_reason(
        tmp_path: Path, captured_logs: list) -> None:
    """nologin: refused after the password; without a reason the refusal is the wrong
    password's (nothing tells the password was right); with one, 525 5.7.13 and the
    reason, but only to the right password (a guesser learns nothing)."""
    checker = users_file(tmp_path, f"quiet:{{PLAIN}}{SECRET}::::::nologin\n"
                                   f"told:{{PLAIN}}{SECRET}::::::nologin=y reason=Moved-to-mx2\n")
    assert await verdict(checker, "quiet", SECRET) is UnauthorizedLogin
    assert await verdict(checker, "quiet", "guess") is UnauthorizedLogin
    assert await verdict(checker, "told", SECRET) == Reject("Moved-to-mx2", 525, "5.7.13")
    assert await verdict(checker, "told", "guess") is UnauthorizedLogin
    refusals = [formatEvent(e) for e in captured_logs if "refused" in formatEvent(e)]
    assert refusals == [f"{checker.path}:1: user 'quiet' refused: nologin",
                        f"{checker.path}:2: user 'told' refused: nologin"]
    assert not any(SECRET in formatEvent(e) for e in captured_logs)


@pytest_twisted.ensureDeferred
async def test_a_reason_has_dovecots_variables_filled_in(tmp_path: Path) -> None:
    """Dovecot expands %-variables in extra fields, so a file it shares says
    ``reason=%u_moved`` or ``100%%``: the client reads the text Dovecot's clients read,
    for PLAIN (the checker) and the secret mechanisms (the lookup) alike.  An unknown
    variable is a load warning and the reason is shown as written."""
    checker = users_file(tmp_path, f"bob@example.org:{{PLAIN}}{SECRET}::::::nologin"
                                   " reason=%n_of_%{domain}:_mailbox_100%%_full,_from_%r\n"
                                   f"ann:{{PLAIN}}{SECRET}::::::nologin reason=50%_off\n")
    told = Reject("bob_of_example.org:_mailbox_100%_full,_from_192.0.2.10", 525, "5.7.13")
    assert await verdict(checker, "bob@example.org", SECRET) == told
    secret = await checker.lookup_secret("bob@example.org", ("plaintext",),
                                         Session(remote_ip="192.0.2.10"))
    assert secret.refusal.reply == told
    assert await verdict(checker, "ann", SECRET) == Reject("50%_off", 525, "5.7.13")
    parsed = parse_users((tmp_path / "users").read_bytes())
    assert parsed.warnings == ((2, "user 'ann': reason: unknown variable %_ (known: %u, %n, %d,"
                                   " %s, %r, %l; write %% for a %); it is shown as written"),)


@pytest_twisted.ensureDeferred
async def test_allow_nets_refuses_other_clients_like_a_wrong_password(
        tmp_path: Path, captured_logs: list) -> None:
    checker = users_file(tmp_path, f"a:{{PLAIN}}{SECRET}::::::allow_nets=192.0.2.0/24,2001:db8::/32\n"
                                   f"l:{{PLAIN}}{SECRET}::::::allow_nets=local\n")
    assert await verdict(checker, "a", SECRET, "192.0.2.99") == b"a"
    assert await verdict(checker, "a", SECRET, "2001:db8::5") == b"a"
    assert await verdict(checker, "a", SECRET, "198.51.100.1") is UnauthorizedLogin
    assert await verdict(checker, "a", "guess", "192.0.2.99") is UnauthorizedLogin
    assert await verdict(checker, "l", SECRET, "") == b"l"
    assert await verdict(checker, "l", SECRET, "127.0.0.1") is UnauthorizedLogin
    # stock Twisted credentials carry no session: only ``local`` lets them in
    from twisted.cred.credentials import UsernamePassword
    assert await checker.requestAvatarId(UsernamePassword(b"l", SECRET.encode())) == b"l"
    with pytest.raises(UnauthorizedLogin):
        await checker.requestAvatarId(UsernamePassword(b"a", SECRET.encode()))
    assert (f"{checker.path}:1: user 'a' refused: client 198.51.100.1 not in allow_nets"
            in [formatEvent(e) for e in captured_logs])


@pytest_twisted.ensureDeferred
async def test_nopassword_takes_any_password_from_its_networks_only(
        tmp_path: Path, captured_logs: list) -> None:
    """nopassword (only with allow_nets): any password from inside, refused outside; the
    load warns naming the user; an unknown user is still unknown."""
    checker = users_file(tmp_path, "scanner:::::::nopassword allow_nets=192.0.2.0/24\n"
                                   "other:{PLAIN}pw\n")
    assert await verdict(checker, "scanner", "anything", "192.0.2.7") == b"scanner"
    assert await verdict(checker, "scanner", "", "192.0.2.7") == b"scanner"
    assert await verdict(checker, "scanner", "anything", "203.0.113.1") is UnauthorizedLogin
    with pytest.raises(UnknownUser):
        await checker.requestAvatarId(creds("nobody", "x", "192.0.2.7"))
    warnings = [formatEvent(e) for e in captured_logs if e.get("log_level").name == "warn"]
    assert warnings == [f"{checker.path}:1: user 'scanner' logs in with any password"
                        " (nopassword) from allow_nets"]


@pytest_twisted.ensureDeferred
async def test_fields_saslsmtp_cannot_check_refuse_the_user(tmp_path: Path) -> None:
    checker = users_file(tmp_path, "a:{PLAIN}pw::::::fail\nb:{PLAIN}pw::::::allow_real_nets=0.0.0.0/0\n"
                                   "c:{PLAIN}pw::::::noauthenticate\nd:{PLAIN}pw::::::nodelay\n")
    for user in "abc":
        assert await verdict(checker, user, "pw") is UnauthorizedLogin, user
    assert await verdict(checker, "d", "pw") == b"d"  # merely ignored


@pytest_twisted.ensureDeferred
async def test_secret_lookups_carry_the_refusal_for_this_client(
        tmp_path: Path, captured_logs: list) -> None:
    """CRAM-MD5 and SCRAM look the secret up with the session: a restricted user's secret
    comes with the refusal the exchange answers once the password is proved (allow_nets:
    by the client's address; nologin: the wrong password's reply, or 525 with a reason);
    a nopassword user has no secret; --check counts only those among the users such a
    mechanism cannot serve."""
    checker = users_file(tmp_path, "a:{PLAIN}pw::::::allow_nets=192.0.2.0/24\n"
                                   "n:{PLAIN}pw::::::nologin\n"
                                   "r:{PLAIN}pw::::::nologin reason=Moved\n"
                                   "p:::::::nopassword allow_nets=192.0.2.0/24\nok:{PLAIN}pw\n")

    async def lookup(user: str, remote_ip: str | None) -> Any:
        session = Session(remote_ip=remote_ip) if remote_ip is not None else None
        return await checker.lookup_secret(user, ("plaintext",), session)
    inside = await lookup("a", "192.0.2.7")
    assert (inside.value, inside.refusal) == ("pw", None)
    outside = await lookup("a", "198.51.100.1")
    assert outside.value == "pw" and outside.refusal.reply == Reject()
    assert outside.refusal.why == (f"{checker.path}:1: user 'a' refused: client 198.51.100.1"
                                   " not in allow_nets")
    assert (await lookup("a", None)).refusal is not None  # no address: not in the nets
    assert (await lookup("n", "192.0.2.7")).refusal.reply == Reject()
    assert (await lookup("r", "192.0.2.7")).refusal.reply == Reject("Moved", 525, "5.7.13")
    assert await lookup("p", "192.0.2.7") is None
    assert (await lookup("ok", "198.51.100.1")).refusal is None
    assert "pw" not in repr(outside)
    assert any("user 'p' cannot log in with this mechanism: it has no password (nopassword)"
               in formatEvent(e) for e in captured_logs)
    assert not any("refused" in formatEvent(e) for e in captured_logs)  # not before the proof
    parsed = parse_users((tmp_path / "users").read_bytes())
    assert load_warnings(parsed, ["PLAIN", "CRAM-MD5"])[-1] == (
        "CRAM-MD5 announced but 1 of 5 users have hashes it cannot use"
        " (those users cannot log in with CRAM-MD5)")


@pytest_twisted.ensureDeferred
async def test_the_chain_keeps_a_backends_own_refusal(tmp_path: Path) -> None:
    """A nologin reason survives the chain when no later backend accepts (it used to be
    flattened into the generic 535); a later backend that accepts still wins."""
    first = users_file(tmp_path, "told:{PLAIN}pw::::::nologin reason=Moved\n")
    (tmp_path / "second").write_text("other:{PLAIN}x\n")
    second = FileChecker(str(tmp_path / "second"), SynchronousRunner())
    chain = BackendChain([("one", first), ("two", second)])
    assert await verdict(chain, "told", "pw") == Reject("Moved", 525, "5.7.13")
    (tmp_path / "second").write_text("told:{PLAIN}pw\n")
    assert await verdict(chain, "told", "pw") == b"told"


@pytest_twisted.ensureDeferred
async def test_the_auth_cache_keeps_allow_nets(tmp_path: Path) -> None:
    """The cache reuses a success per user and password; with allow_nets the client's
    address decides too: a success from inside is never an entry for a client outside."""
    from twisted.internet.task import Clock
    checker = users_file(tmp_path, f"a:{{PLAIN}}{SECRET}::::::allow_nets=192.0.2.0/24\n")
    cache = AuthCache(AuthCacheSettings(ttl=300.0), Clock())
    cached = CachingChecker(BackendChain([("users", checker)]), cache, "users")
    assert await verdict(cached, "a", SECRET, "192.0.2.1") == b"a"
    assert await verdict(cached, "a", SECRET, "192.0.2.2") == b"a"
    assert cache.hits == 1
    assert await verdict(cached, "a", SECRET, "203.0.113.9") is UnauthorizedLogin
    assert await verdict(cached, "a", SECRET, "203.0.113.9") is UnauthorizedLogin
    assert await verdict(cached, "a", SECRET, "192.0.2.1") == b"a"


# ---- the real daemon --------------------------------------------------------------------


def login_from(source: str, port: int, user: str, password: str) -> tuple[int, bytes]:
    """AUTH PLAIN with smtplib from the loopback address ``source`` (127.0.0.0/8 is all
    this machine's; ``::1`` goes to the IPv6 listener): the daemon sees that address as
    the client's."""
    server = "::1" if ":" in source else "127.0.0.1"
    with smtplib.SMTP(server, port, timeout=15, source_address=(source, 0)) as s:
        s.ehlo("client.example")
        try:
            return s.login(user, password)
        except smtplib.SMTPAuthenticationError as e:
            return e.smtp_code, e.smtp_error


@pytest.fixture
def fields_daemon(tmp_path: Path):
    """``twistd saslsmtp`` with the auth cache on, a users file of restricted users."""
    yes = passwords.make_hash("YESCRYPT", SECRET)
    (tmp_path / "users").write_text(
        f"alice:{{PLAIN}}{SECRET}::::::allow_nets=127.0.0.2/32,::1 userdb_mail=maildir:~/M\n"
        f"bob:{{PLAIN}}{SECRET}::::::nologin reason=Mailbox-moved-to-mx2.example.org\n"
        f"carol:{{PLAIN}}{SECRET}::::::nologin\n"
        f"dave:{yes}\n"
        "printer:::::::nopassword allow_nets=127.0.0.3\n"
        f"eve:{{PLAIN}}{SECRET}::::::allow_nets=127.0.0.0/8\n")
    port, port6 = free_port(), free_port()
    config = write_config(tmp_path, f'[backends.users]\ntype = "file"\npath = "{tmp_path / "users"}"\n',
                          listen=[f"tcp:{port}:interface=127.0.0.1",
                                  f"tcp6:{port6}:interface=\\\\:\\\\:1"],
                          extra="[auth.cache]\nttl = 300\n")
    daemon = start_daemon(config, port, tmp_path / "daemon.log")
    daemon.port6 = port6  # type: ignore[attr-defined]
    yield daemon, config
    daemon.stop()


@pytest_twisted.ensureDeferred
async def test_daemon_allow_nets_with_the_auth_cache(fields_daemon) -> None:
    """Through the real daemon with [auth.cache] on: alice's success from 127.0.0.2 (in
    her allow_nets) is cached, and her same password from 127.0.0.1 is still 535; back
    on 127.0.0.2 she is in again.  The refusal is logged with the client's address."""
    daemon, _ = fields_daemon

    def run(source: str, user: str, password: str) -> Any:
        return threads.deferToThread(login_from, source, daemon.port, user, password)
    assert (await run("127.0.0.2", "alice", SECRET))[0] == 235
    assert (await run("127.0.0.2", "alice", SECRET))[0] == 235   # from the cache
    assert await run("127.0.0.1", "alice", SECRET) == (535, b"5.7.8 Authentication credentials invalid")
    assert (await run("127.0.0.2", "alice", SECRET))[0] == 235
    assert await run("127.0.0.1", "alice", SECRET) == (535, b"5.7.8 Authentication credentials invalid")
    # IPv6: ::1 is in alice's allow_nets, not in eve's 127.0.0.0/8 (whose success is cached)
    six = daemon.port6
    assert (await threads.deferToThread(login_from, "::1", six, "alice", SECRET))[0] == 235
    assert (await run("127.0.0.1", "eve", SECRET))[0] == 235
    assert (await threads.deferToThread(login_from, "::1", six, "eve", SECRET))[0] == 535
    log = daemon.log_text()
    assert "user 'alice' refused: client 127.0.0.1 not in allow_nets" in log
    assert "user 'eve' refused: client ::1 not in allow_nets" in log
    assert SECRET not in log


@pytest_twisted.ensureDeferred
async def test_daemon_nologin_nopassword_and_yescrypt(fields_daemon) -> None:
    """nologin with a reason: 525 5.7.13 and the reason for the right password, the
    wrong password's 535 otherwise; nologin without one: always the 535; nopassword from
    its address only; a yescrypt ({CRYPT}$y$) user logs in."""
    daemon, _ = fields_daemon

    def run(source: str, user: str, password: str) -> Any:
        return threads.deferToThread(login_from, source, daemon.port, user, password)
    invalid = (535, b"5.7.8 Authentication credentials invalid")
    assert await run("127.0.0.1", "bob", SECRET) == (525, b"5.7.13 Mailbox-moved-to-mx2.example.org")
    assert await run("127.0.0.1", "bob", "guess") == invalid
    assert await run("127.0.0.1", "carol", SECRET) == invalid
    assert await run("127.0.0.1", "carol", "guess") == invalid
    assert (await run("127.0.0.3", "printer", "whatever"))[0] == 235
    assert await run("127.0.0.1", "printer", "whatever") == invalid
    assert (await run("127.0.0.1", "dave", SECRET))[0] == 235
    assert await run("127.0.0.1", "dave", SECRET + "x") == invalid
    log = daemon.log_text()
    assert "user 'printer' logs in with any password (nopassword) from allow_nets" in log
    assert SECRET not in log


def test_check_lists_ignored_fields_and_nopassword(fields_daemon, tmp_path: Path) -> None:
    """``twistd saslsmtp --check`` passes the file, says once which extra fields it
    ignores, and names the nopassword user."""
    _, config = fields_daemon
    import os
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(twistd_command(config, "--check"), cwd=config.parent, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    users = tmp_path / "users"
    assert (f"{users}: warning: extra fields ignored (saslsmtp does not use them):"
            " userdb_mail (line 1)") in result.stderr
    assert result.stderr.count("extra fields ignored") == 1
    assert (f"{users}: warning: line 5: user 'printer' logs in with any password"
            " (nopassword) from allow_nets") in result.stderr
    assert "Traceback" not in result.stdout + result.stderr


# ---- challenge mechanisms through the real daemon, with real clients ----------------------


@pytest.fixture
def challenge_daemon(tmp_path: Path):
    """``twistd saslsmtp`` offering CRAM-MD5 and SCRAM-SHA-256 from a users file whose
    users have extra fields."""
    (tmp_path / "users").write_text(
        f"alice:{{PLAIN}}{SECRET}::::::allow_nets=127.0.0.2\n"
        f"bob:{passwords.make_hash('SCRAM-SHA-256', SECRET)}::::::nologin"
        " reason=Mailbox-moved-to-mx2.example.org\n"
        f"carol:{{PLAIN}}{SECRET}::::::nologin\n"
        "printer:::::::nopassword allow_nets=127.0.0.0/8\n")
    port = free_port()
    config = write_config(tmp_path, f'[backends.users]\ntype = "file"\npath = "{tmp_path / "users"}"\n',
                          mechanisms=["CRAM-MD5", "SCRAM-SHA-256", "PLAIN"],
                          listen=[f"tcp:{port}:interface=127.0.0.1"])
    daemon = start_daemon(config, port, tmp_path / "daemon.log")
    yield daemon
    daemon.stop()


def swaks_cram(port: int, source: str, user: str, password: str) -> tuple[int, str]:
    """swaks' AUTH CRAM-MD5 from the loopback address ``source``: its exit status and
    the server's reply to the response."""
    done = subprocess.run([require_binary("swaks"), "--server", f"127.0.0.1:{port}",
                           "--local-interface", source, "--auth", "CRAM-MD5",
                           "--auth-user", user, "--auth-password", password,
                           "--quit-after", "AUTH"], capture_output=True, text=True, timeout=60)
    replies = [m.group(1) for line in done.stdout.splitlines()
               for m in [re.match(r"<(?:-|\*\*)\s+((?:235|5\d\d) .*)$", line)] if m]
    return done.returncode, replies[-1] if replies else done.stdout


def gsasl_scram(port: int, user: str, password: str) -> tuple[int, str]:
    done = subprocess.run([require_binary("gsasl"), "--smtp", "--no-starttls", "-m", "SCRAM-SHA-256",
                           "-a", user, "-p", password, "--quiet", "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=60)
    return done.returncode, done.stdout


@pytest_twisted.ensureDeferred
async def test_daemon_challenge_mechanisms_apply_the_extra_fields(challenge_daemon) -> None:
    """Real clients against the real daemon: swaks' CRAM-MD5 logs alice in from her
    allow_nets address (127.0.0.2) and gets the wrong password's 535 from 127.0.0.1;
    carol (nologin) gets the 535, bob (nologin with a reason) 525 5.7.13 and the reason
    over gsasl's SCRAM-SHA-256, a wrong password the 535; the nopassword user has no
    secret for CRAM-MD5.  Each refusal is logged with its reason, no password."""
    port = challenge_daemon.port

    def cram(source: str, user: str, password: str) -> Any:
        return threads.deferToThread(swaks_cram, port, source, user, password)
    assert await cram("127.0.0.2", "alice", SECRET) == (0, "235 2.7.0 Authentication successful")
    assert await cram("127.0.0.1", "alice", SECRET) == (28, "535 5.7.8 Authentication credentials invalid")
    assert await cram("127.0.0.2", "carol", SECRET) == (28, "535 5.7.8 Authentication credentials invalid")
    assert (await cram("127.0.0.2", "printer", "anything"))[0] == 28
    status, out = await threads.deferToThread(gsasl_scram, port, "bob", SECRET)
    assert status != 0 and "525 5.7.13 Mailbox-moved-to-mx2.example.org" in out, out
    assert "\n334 dj0" not in out  # no server signature (base64 "v=") for a refused login
    status, out = await threads.deferToThread(gsasl_scram, port, "bob", "guess")
    assert status != 0 and "535 5.7.8" in out and "525" not in out, out
    log = challenge_daemon.log_text()
    assert "user 'alice' refused: client 127.0.0.1 not in allow_nets (CRAM-MD5)" in log
    assert "user 'carol' refused: nologin (CRAM-MD5)" in log
    assert "user 'bob' refused: nologin (SCRAM-SHA-256)" in log
    assert "user 'printer' cannot log in with this mechanism" in log
    assert SECRET not in log


def test_reason_templates_parse_as_dovecot_writes_them() -> None:
    """Short and long names, ``%%``, a name without a domain; a ``%`` at the end, an
    unclosed ``%{`` and a modifier are unknown variables."""
    from saslsmtp.checkers.fieldvars import FieldTemplate
    expand = FieldTemplate.parse("%{user}|%u|%n|%d|%{service}|%l|%%u").expand
    assert expand("bob", "192.0.2.1", "198.51.100.2") == "bob|bob|bob||smtp|198.51.100.2|%u"
    assert FieldTemplate.parse("no variables").expand("x") == "no variables"
    for bad, named in (("100%", "a % at the end"), ("%{user", "'%{' without '}'"),
                       ("%Lu", "%L"), ("%{home}", "%{home}")):
        with pytest.raises(ValueError, match=re.escape(named)):
            FieldTemplate.parse(bad)
