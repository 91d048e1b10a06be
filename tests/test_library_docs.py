"""docs/library.md stays true: every example in it runs, on public names only.

Examples are marked ``<!-- example: NAME -->`` before their code block and written to a
temporary folder under that name.  The three servers run as programs (the way a reader
would run them) on loopback, against real clients: smtplib and swaks for stock ESMTP and
SubmissionESMTP, imaplib and curl for IMAP4Server.  The web example serves HTTP Basic auth
against a real slapd.  The own-portal example, the token mechanism and the testing example
are pytest tests themselves, and so is the example that drives mechanisms without a server."""

from __future__ import annotations

import base64
import imaplib
import os
import re
import select
import smtplib
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import pytest_twisted

from tests.conftest import require_binary
from tests.support import terminate

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "library.md").read_text()


def examples() -> dict[str, str]:
    """name -> code of every marked example."""
    found = re.findall(r"<!-- example: (\S+) -->\n```\w*\n(.*?)```", DOC, re.S)
    return dict(found)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Every example written to a file, as a reader would save it."""
    for name, code in examples().items():
        (tmp_path / name).write_text(code)
    return tmp_path


def run_tests_in(path: Path) -> int:
    """Exec an example that defines ``test_*`` functions and call each; how many ran."""
    namespace: dict[str, Any] = {"__name__": path.stem}
    exec(compile(path.read_text(), str(path), "exec"), namespace)
    tests = [f for name, f in namespace.items() if name.startswith("test_") and callable(f)]
    for test in tests:
        test()
    return len(tests)


class Program:
    """One example server started as ``python NAME 0 users.passwd auth_password.py``."""

    def __init__(self, folder: Path, name: str) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.process = subprocess.Popen(
            [sys.executable, name, "0", "users.passwd", "auth_password.py"], cwd=folder,
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0)
        self.output: list[str] = []
        line = self.wait_for("listening on ")
        self.port = int(line.split()[-1])

    def wait_for(self, text: str, timeout: float = 20.0) -> str:
        """The first output line containing ``text`` (reading on as needed)."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for line in self.output[seen:]:
                if text in line:
                    return line
            seen = len(self.output)
            left = deadline - time.monotonic()
            assert left > 0, f"{text!r} not printed; output: {self.output}"
            ready, _, _ = select.select([self.process.stdout], [], [], left)
            if ready:
                raw = self.process.stdout.readline()  # type: ignore[union-attr]
                assert raw, f"the program exited; output: {self.output}"
                self.output.append(raw.decode(errors="replace").rstrip("\n"))

    def stop(self) -> None:
        terminate(self.process)
        rest = self.process.stdout.read()  # type: ignore[union-attr]
        self.output += rest.decode(errors="replace").splitlines()
        self.process.stdout.close()  # type: ignore[union-attr]


@pytest.fixture
def esmtp_program(folder: Path) -> Iterator[Program]:
    program = Program(folder, "esmtp_server.py")
    yield program
    program.stop()
    assert not [line for line in program.output if "Traceback" in line or "secret" in line]


@pytest.fixture
def imap_program(folder: Path) -> Iterator[Program]:
    program = Program(folder, "imap_server.py")
    yield program
    program.stop()
    assert not [line for line in program.output if "Traceback" in line or "secret" in line]


@pytest.fixture
def submission_program(folder: Path) -> Iterator[Program]:
    program = Program(folder, "submission_server.py")
    yield program
    program.stop()
    assert not [line for line in program.output if "Traceback" in line or "secret" in line]


def test_examples_are_marked() -> None:
    """Each example this module runs is in the page (a renamed one fails here, not silently)."""
    assert set(examples()) == {"esmtp_server.py", "users.passwd", "auth_password.py",
                               "own_portal.py", "token_mechanism.py", "imap_server.py",
                               "web_site.py", "submission_server.py", "test_auth_password.py",
                               "sasl_steps.py"}


def saslsmtp_imports(code: str) -> set[tuple[str, str]]:
    """``(module, name)`` for every ``from saslsmtp... import name`` in ``code``, and
    ``(module, "")`` for every ``import saslsmtp...``."""
    import ast
    found: set[tuple[str, str]] = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("saslsmtp"):
            found |= {(node.module or "", alias.name) for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {(alias.name, "") for alias in node.names
                      if alias.name.startswith("saslsmtp")}
    return found


def test_examples_import_public_names_only() -> None:
    """A reader copying an example uses only what the page promises to keep: the public
    names (``from saslsmtp import embed`` is the module itself)."""
    from tests.test_public_api import PUBLIC
    public = {(module, name) for module, names in PUBLIC.items() for name in names}
    public |= {("saslsmtp", "embed"), ("saslsmtp", "testing")}
    for name, code in examples().items():
        if name.endswith(".py"):
            assert saslsmtp_imports(code) <= public, name


def test_submission_esmtp_keywords_are_the_real_ones() -> None:
    """The keywords the table gives ``SubmissionESMTP`` exist, with those defaults."""
    import inspect
    from saslsmtp.protocol import SubmissionESMTP
    row = re.search(r"`saslsmtp\.protocol\.SubmissionESMTP\(\*, (.*?)\)`", DOC)
    assert row
    real = inspect.signature(SubmissionESMTP).parameters
    for documented in row.group(1).split(", "):
        name, _, default = documented.partition("=")
        assert name in real and real[name].kind is inspect.Parameter.KEYWORD_ONLY
        if default not in ("", "..."):
            assert repr(real[name].default) == default.replace('"', "'"), name


def documented_signatures() -> dict[str, list[str]]:
    """``name -> parameter names`` of every ``saslsmtp.embed.NAME(...)`` in the table."""
    found = re.findall(r"^\| `saslsmtp\.embed\.(\w+)\((.*?)\)` \|", DOC, re.M)
    return {name: [p.strip().lstrip("*").split("=")[0] for p in params.split(",")
                   if p.strip() not in ("", "*")]
            for name, params in found}


def test_documented_signatures_are_the_real_ones() -> None:
    """The table names each parameter as the code does (keyword callers use the names)."""
    import inspect
    from saslsmtp import embed
    documented = documented_signatures()
    assert {"challengers", "portal", "auth_script", "checker", "thread_pool"} <= set(documented)
    real = {name: list(inspect.signature(getattr(embed, name)).parameters)
            for name in documented}
    assert documented == real


def test_own_portal_example(folder: Path) -> None:
    """A Portal of the application's own, with its own checker and exchange_checkers()."""
    assert run_tests_in(folder / "own_portal.py") == 1


def test_token_mechanism_example(folder: Path) -> None:
    """A mechanism written in Python, in stock ESMTP."""
    assert run_tests_in(folder / "token_mechanism.py") == 1


def test_sasl_steps_example(folder: Path) -> None:
    """Built-in mechanisms driven step by step against a store of one's own: PLAIN,
    CRAM-MD5 and SCRAM-SHA-256 against stored keys, and the store behind challengers."""
    assert run_tests_in(folder / "sasl_steps.py") == 2


def test_testing_example(folder: Path) -> None:
    """The saslsmtp.testing example, with the page's AUTH script."""
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        assert run_tests_in(folder / "test_auth_password.py") == 1
    finally:
        os.chdir(cwd)


# stock ESMTP, as a program ----------------------------------------------------------


def password_steps(username: str, password: str) -> Any:
    """An smtplib/imaplib authobject for X-PASSWORD: answers Username: and Password:."""
    def answer(challenge: bytes | None = None) -> str:
        if challenge in (None, b""):
            return ""
        return username if challenge.startswith(b"Username") else password
    return answer


def smtp_session(port: int) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", port, timeout=20)
    client.ehlo("client.example")
    return client


def test_esmtp_program_with_smtplib(esmtp_program: Program) -> None:
    """PLAIN and CRAM-MD5 against the passwd-file, X-PASSWORD through the script (carol's
    SHA512-CRYPT check is an asynchronous last step), a wrong password, and a message."""
    port = esmtp_program.port
    with smtp_session(port) as client:
        assert "AUTH PLAIN CRAM-MD5 X-PASSWORD" in client.ehlo_resp.decode().replace("\n", " ") \
            or client.esmtp_features["auth"] == "PLAIN CRAM-MD5 X-PASSWORD"
        client.user, client.password = "alice", "alice-secret"
        assert client.auth("PLAIN", client.auth_plain)[0] == 235
        client.sendmail("alice@example.test", ["bob@example.test"], "Subject: hi\r\n\r\nhello\r\n")
    with smtp_session(port) as client:
        client.user, client.password = "alice", "alice-secret"
        assert client.auth("CRAM-MD5", client.auth_cram_md5)[0] == 235
    with smtp_session(port) as client:
        code, _ = client.auth("X-PASSWORD", password_steps("carol", "carol-secret"),
                              initial_response_ok=False)
        assert code == 235
    with smtp_session(port) as client:
        client.user, client.password = "alice", "wrong"
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            client.auth("PLAIN", client.auth_plain)
        assert refused.value.smtp_code == 535
    with smtp_session(port) as client:
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.auth("X-PASSWORD", password_steps("carol", "wrong"), initial_response_ok=False)
    esmtp_program.wait_for("message of ")
    esmtp_program.wait_for("logged in: carol")
    logins = [line for line in esmtp_program.output if line.startswith("logged in:")]
    assert logins == ["logged in: alice", "logged in: alice", "logged in: carol"]


@pytest.mark.parametrize("mechanism", ["PLAIN", "CRAM-MD5"])
def test_esmtp_program_with_swaks(esmtp_program: Program, mechanism: str) -> None:
    swaks = require_binary("swaks")
    base = [swaks, "--server", f"127.0.0.1:{esmtp_program.port}", "--from", "alice@example.test",
            "--to", "bob@example.test", "--auth", mechanism, "--auth-user", "alice"]
    ok = subprocess.run(base + ["--auth-password", "alice-secret"], capture_output=True,
                        text=True, timeout=30)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "235 Authentication successful." in ok.stdout
    bad = subprocess.run(base + ["--auth-password", "wrong"], capture_output=True, text=True,
                         timeout=30)
    assert "535 Authentication failed" in bad.stdout
    assert bad.returncode != 0


# SubmissionESMTP, as a program ---------------------------------------------------------


def test_submission_program_with_smtplib(submission_program: Program) -> None:
    """PLAIN and CRAM-MD5 against the passwd-file (secrets through the resolver), the
    scripted X-PASSWORD, refusals with enhanced codes, and a message to the avatar."""
    port = submission_program.port
    with smtp_session(port) as client:
        assert client.esmtp_features["auth"].split() == ["PLAIN", "CRAM-MD5", "X-PASSWORD"]
        client.user, client.password = "alice", "alice-secret"
        assert client.auth("CRAM-MD5", client.auth_cram_md5) == (
            235, b"2.7.0 Authentication successful")
        client.sendmail("alice@example.test", ["bob@example.test"], "Subject: hi\r\n\r\nhello\r\n")
    with smtp_session(port) as client:
        code, _ = client.auth("X-PASSWORD", password_steps("carol", "carol-secret"),
                              initial_response_ok=False)
        assert code == 235
    with smtp_session(port) as client:
        client.user, client.password = "alice", "wrong"
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            client.auth("PLAIN", client.auth_plain)
        assert (refused.value.smtp_code, refused.value.smtp_error) == (
            535, b"5.7.8 Authentication credentials invalid")
    submission_program.wait_for("message of ")
    submission_program.wait_for("logged in: carol")
    logins = [line for line in submission_program.output if line.startswith("logged in:")]
    assert logins == ["logged in: alice", "logged in: carol"]


def test_submission_program_with_swaks(submission_program: Program) -> None:
    swaks = require_binary("swaks")
    done = subprocess.run([swaks, "--server", f"127.0.0.1:{submission_program.port}",
                           "--from", "alice@example.test", "--to", "bob@example.test",
                           "--auth", "PLAIN", "--auth-user", "alice",
                           "--auth-password", "alice-secret"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "235 2.7.0 Authentication successful" in done.stdout
    submission_program.wait_for("message of ")


# IMAP4Server, as a program -----------------------------------------------------------


def imap_session(port: int) -> imaplib.IMAP4:
    return imaplib.IMAP4("127.0.0.1", port, timeout=20)


def test_imap_program_with_imaplib(imap_program: Program) -> None:
    """AUTHENTICATE PLAIN, CRAM-MD5 and X-PASSWORD, the LOGIN command, and refusals."""
    port = imap_program.port
    with imap_session(port) as client:
        assert {"AUTH=PLAIN", "AUTH=LOGIN", "AUTH=CRAM-MD5", "AUTH=X-PASSWORD"} <= set(
            client.capabilities)
        assert client.authenticate("PLAIN", lambda _: b"\0alice\0alice-secret")[0] == "OK"
        assert client.list() == ("OK", [None])
    with imap_session(port) as client:
        assert client.login_cram_md5("alice", "alice-secret")[0] == "OK"
    with imap_session(port) as client:
        assert client.login("alice", "alice-secret")[0] == "OK"
    with imap_session(port) as client:
        steps = password_steps("carol", "carol-secret")
        assert client.authenticate("X-PASSWORD", lambda c: steps(c).encode())[0] == "OK"
    with imap_session(port) as client:
        with pytest.raises(imaplib.IMAP4.error, match="unauthorized"):
            client.authenticate("PLAIN", lambda _: b"\0alice\0wrong")
        with pytest.raises(imaplib.IMAP4.error, match="unauthorized"):
            client.authenticate("PLAIN", lambda _: b"bob\0alice\0alice-secret")
    imap_program.wait_for("logged in: carol")
    logins = [line for line in imap_program.output if line.startswith("logged in:")]
    assert logins == ["logged in: alice"] * 3 + ["logged in: carol"]


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
def test_imap_program_with_curl(imap_program: Program, mechanism: str) -> None:
    """``curl imap://.../ --login-options AUTH=...`` logs in (and lists the account's
    mailboxes: none); a wrong password is curl's "login denied" (exit 67)."""
    curl = require_binary("curl")
    base = [curl, "-sS", "--max-time", "20", f"imap://127.0.0.1:{imap_program.port}/",
            "--login-options", f"AUTH={mechanism}"]
    ok = subprocess.run(base + ["-u", "alice:alice-secret"], capture_output=True, text=True,
                        timeout=30)
    assert ok.returncode == 0, ok.stderr
    assert imap_program.wait_for("logged in: alice")
    bad = subprocess.run(base + ["-u", "alice:wrong"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 67, bad.stderr


# a checker in any portal: twisted.web + LDAP ------------------------------------------


def stop_checkers(site: Any) -> None:
    """Stop the LDAP checker's pool now (a program would leave it to reactor shutdown)."""
    for checker in set(site.resource._portal.checkers.values()):
        checker.stop()


@pytest.fixture(scope="module")
def slapd() -> Iterator[Any]:
    from tests.slapd import running_slapd
    yield from running_slapd()


@pytest_twisted.ensureDeferred
async def test_web_site_with_ldap_basic_auth(folder: Path, slapd: Any) -> None:
    """HTTP Basic auth against the real directory: 200 for alice, 401 for a wrong password
    and without credentials."""
    import treq
    from twisted.internet import reactor
    from tests.slapd import ALICE
    namespace: dict[str, Any] = {}
    exec(compile((folder / "web_site.py").read_text(), "web_site.py", "exec"), namespace)
    site = namespace["make_site"](reactor, slapd.url)
    listening = reactor.listenTCP(0, site, interface="127.0.0.1")
    try:
        url = f"http://127.0.0.1:{listening.getHost().port}/"
        ok = await treq.get(url, auth=(ALICE.uid, ALICE.password))
        assert ok.code == 200
        assert await ok.text() == "hello alice\n"
        wrong = await treq.get(url, auth=(ALICE.uid, "wrong"))
        assert wrong.code == 401
        await wrong.text()
        anonymous = await treq.get(url)
        assert anonymous.code == 401
        await anonymous.text()
    finally:
        await listening.stopListening()
        stop_checkers(site)


@pytest_twisted.ensureDeferred
async def test_web_site_with_the_directory_down(folder: Path) -> None:
    """A directory nobody answers on is not a wrong password: 500, not 401 (the docs say
    HTTPAuthSessionWrapper has no "try later")."""
    import treq
    from twisted.internet import reactor
    from tests.slapd import free_port
    namespace: dict[str, Any] = {}
    exec(compile((folder / "web_site.py").read_text(), "web_site.py", "exec"), namespace)
    site = namespace["make_site"](reactor, f"ldap://127.0.0.1:{free_port()}")
    listening = reactor.listenTCP(0, site, interface="127.0.0.1")
    try:
        down = await treq.get(f"http://127.0.0.1:{listening.getHost().port}/",
                              auth=("alice", "alice-pw"))
        assert down.code == 500
        await down.text()
    finally:
        await listening.stopListening()
        stop_checkers(site)
