"""A new user's first hour, as the README tells it: the shipped ``etc/saslsmtp.toml`` and
``etc/users`` copied as they are (only the port changed, the challenge mechanisms
added to ``auth.mechanisms`` and ``failure_delay`` shortened for the wrong passwords), users added with ``saslsmtp-passwd``, the real daemon, and
every client a user has: swaks, msmtp, curl, gsasl and smtplib, each with PLAIN, LOGIN,
CRAM-MD5 and SCRAM-SHA-256 where the client has the mechanism.  A right password logs in
(and the message lands in the Maildir the demo names), a wrong one is refused."""

from __future__ import annotations

import io
import re
import shutil
import smtplib
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from saslsmtp import passwd
from tests.conftest import require_binary
from tests.support import ROOT, Daemon, free_port, start_daemon

MECHANISMS = '["PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256"]'
#: user -> (password, the mechanisms tried with it: what its stored entry is for)
USERS = {
    "demo": ("demo-password", ("PLAIN", "LOGIN")),  # etc/users' SHA512-CRYPT entry
    "cram": ("cram-pw-4K", ("CRAM-MD5",)),
    "s256": ("s256-pw-7Z", ("LOGIN", "SCRAM-SHA-256")),
    "plain": ("plain-pw-2Q", ("PLAIN", "CRAM-MD5", "SCRAM-SHA-256")),
}
SCHEMES = {"cram": "CRAM-MD5", "s256": "SCRAM-SHA-256", "plain": "PLAIN"}
MESSAGE = b"From: demo@example.test\r\nTo: someone@example.test\r\nSubject: hi\r\n\r\nhello\r\n"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, Path]]:
    """The demo's layout (``etc/`` beside ``var/mail``), users added the documented way."""
    root = tmp_path_factory.mktemp("newuser")
    (root / "etc").mkdir()
    config = root / "etc" / "saslsmtp.toml"
    text = (ROOT / "etc" / "saslsmtp.toml").read_text()
    port = free_port()
    text, listens = re.subn(r'(?m)^listen = \["tcp:2525:', f'listen = ["tcp:{port}:', text)
    text, mechs = re.subn(r'(?m)^mechanisms = \["PLAIN", "LOGIN"\]', f"mechanisms = {MECHANISMS}",
                          text)
    text, delays = re.subn(r"(?m)^failure_delay = 1.0", "failure_delay = 0.05", text)
    assert listens == mechs == delays == 1, "etc/saslsmtp.toml no longer has the demo's lines"
    config.write_text(text)
    shutil.copy(ROOT / "etc" / "users", root / "etc" / "users")
    for user, scheme in SCHEMES.items():  # saslsmtp-passwd --scheme S USER >> etc/users
        out, err = io.StringIO(), io.StringIO()
        assert passwd.main(["--scheme", scheme, user], stdin=io.StringIO(USERS[user][0] + "\n"),
                           stdout=out, stderr=err) == 0, err.getvalue()
        with open(root / "etc" / "users", "a") as users:
            users.write(out.getvalue())
    daemon = start_daemon(config, port, root / "daemon.log")
    try:
        yield daemon, root
    finally:
        daemon.stop()


def cases(client_mechanisms: tuple[str, ...]) -> list[tuple[str, str]]:
    """(mechanism, user) for every mechanism the client has and every user it serves."""
    return [(m, u) for m in client_mechanisms for u, (_, served) in USERS.items() if m in served]


def client(argv: list[str], stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run(argv, input=stdin, capture_output=True, timeout=60)


def delivered_to(root: Path, user: str) -> int:
    """How many messages in the demo's Maildir name ``user`` as the authenticated user."""
    new = root / "var" / "mail" / "new"
    return sum(f"(authenticated user {user})".encode() in path.read_bytes()
               for path in (new.iterdir() if new.is_dir() else []))


def test_the_readme_demo_command(demo: tuple[Daemon, Path]) -> None:
    """The README's swaks line (port aside) logs in, sends, and the message is in
    ``var/mail/new/`` with the Received line the README shows."""
    daemon, root = demo
    swaks = require_binary("swaks")
    before = delivered_to(root, "demo")
    done = client([swaks, "--server", f"127.0.0.1:{daemon.port}", "--auth", "PLAIN",
                   "--auth-user", "demo", "--auth-password", "demo-password",
                   "--from", "demo@example.test", "--to", "someone@example.test"])
    out = done.stdout.decode(errors="replace")
    assert done.returncode == 0 and "235 2.7.0 Authentication successful" in out, out
    assert delivered_to(root, "demo") == before + 1
    received = next(p.read_text() for p in (root / "var" / "mail" / "new").iterdir())
    assert "with ESMTPA\n\t(authenticated user demo)" in received


@pytest.mark.parametrize("mechanism, user", cases(("PLAIN", "LOGIN", "CRAM-MD5")))
def test_swaks(demo: tuple[Daemon, Path], mechanism: str, user: str) -> None:
    daemon, root = demo
    swaks = require_binary("swaks")
    argv = [swaks, "--server", f"127.0.0.1:{daemon.port}", "--auth", mechanism,
            "--auth-user", user, "--from", "a@example.test", "--to", "b@example.test",
            "--auth-password"]
    ok = client([*argv, USERS[user][0]])
    assert ok.returncode == 0, ok.stdout.decode(errors="replace")
    assert b"235 2.7.0 Authentication successful" in ok.stdout
    bad = client([*argv, "wrong-password"])
    assert bad.returncode != 0 and b"535 5.7.8 Authentication credentials invalid" in bad.stdout


@pytest.mark.parametrize("mechanism, user", cases(("PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256")))
def test_msmtp(demo: tuple[Daemon, Path], mechanism: str, user: str) -> None:
    daemon, root = demo
    msmtp = require_binary("msmtp")
    before = delivered_to(root, user)

    def send(password: str) -> subprocess.CompletedProcess:
        return client([msmtp, "--file=/dev/null", "--host=127.0.0.1", f"--port={daemon.port}",
                       "--tls=off", f"--auth={mechanism.lower()}", f"--user={user}",
                       f"--passwordeval=printf %s {password}", "--from=a@example.test",
                       "b@example.test"], MESSAGE)
    ok = send(USERS[user][0])
    assert ok.returncode == 0, ok.stderr.decode(errors="replace")
    assert delivered_to(root, user) == before + 1
    bad = send("wrong-password")
    assert bad.returncode == 77, bad.stderr  # EX_NOPERM: "authentication failed"
    assert b"535 5.7.8 Authentication credentials invalid" in bad.stderr


@pytest.mark.parametrize("mechanism, user", cases(("PLAIN", "LOGIN", "CRAM-MD5")))
def test_curl(demo: tuple[Daemon, Path], mechanism: str, user: str) -> None:
    """curl's ``--login-options AUTH=...`` (Debian's curl has no SCRAM: no GNU SASL)."""
    daemon, root = demo
    curl = require_binary("curl")
    message = root / "message.eml"
    message.write_bytes(MESSAGE)
    before = delivered_to(root, user)

    def send(password: str) -> subprocess.CompletedProcess:
        return client([curl, "-sS", f"smtp://127.0.0.1:{daemon.port}", "--user",
                       f"{user}:{password}", "--login-options", f"AUTH={mechanism}",
                       "--mail-from", "a@example.test", "--mail-rcpt", "b@example.test",
                       "-T", str(message)])
    ok = send(USERS[user][0])
    assert ok.returncode == 0, ok.stderr.decode(errors="replace")
    assert delivered_to(root, user) == before + 1
    assert send("wrong-password").returncode == 67  # CURLE_LOGIN_DENIED


@pytest.mark.parametrize("mechanism, user", cases(("PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256")))
def test_gsasl(demo: tuple[Daemon, Path], mechanism: str, user: str) -> None:
    daemon, _ = demo
    gsasl = require_binary("gsasl")

    def login(password: str) -> tuple[int, str]:
        done = client([gsasl, "--smtp", "-m", mechanism, "-a", user, "-p", password,
                       "--quiet", "127.0.0.1", str(daemon.port)])
        return done.returncode, done.stdout.decode(errors="replace")
    status, out = login(USERS[user][0])
    assert status == 0 and "235 2.7.0 Authentication successful" in out, out
    status, out = login("wrong-password")
    assert status == 1 and "535 5.7.8 Authentication credentials invalid" in out, out


@pytest.mark.parametrize("mechanism, user", cases(("PLAIN", "LOGIN", "CRAM-MD5")))
def test_smtplib(demo: tuple[Daemon, Path], mechanism: str, user: str) -> None:
    daemon, root = demo
    before = delivered_to(root, user)
    method = {"PLAIN": "auth_plain", "LOGIN": "auth_login", "CRAM-MD5": "auth_cram_md5"}[mechanism]
    for password, expected in ((USERS[user][0], 235), ("wrong-password", 535)):
        with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as smtp:
            smtp.ehlo()
            smtp.user, smtp.password = user, password
            try:
                code, _ = smtp.auth(mechanism, getattr(smtp, method))
            except smtplib.SMTPAuthenticationError as e:
                code = e.smtp_code
            assert code == expected
            if code == 235:
                assert smtp.sendmail("a@example.test", ["b@example.test"], MESSAGE) == {}
    assert delivered_to(root, user) == before + 1
