"""Tests for saslsmtp.passwd, the ``saslsmtp-passwd`` command."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from saslsmtp import passwords
from saslsmtp.checkers.file import parse_users
from saslsmtp.passwd import DEFAULT_SCHEME, main

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "correct horse battery staple"

#: Cheap costs so the whole file stays fast.
FAST = {"BLF-CRYPT": "4", "ARGON2ID": "1", "ARGON2I": "1", "SHA512-CRYPT": "1000",
        "SHA256-CRYPT": "1000", "PBKDF2": "1000", "YESCRYPT": "1", "SCRYPT": "6"}

#: Schemes Dovecot knows only as {CRYPT}: saslsmtp-passwd writes them so.
MADE_AS = {"YESCRYPT": "{CRYPT}$y$", "SCRYPT": "{CRYPT}$7$"}


class TTY(io.StringIO):
    """A fake terminal: isatty() is true, and nothing should be read from it."""

    def isatty(self) -> bool:
        return True

    def readline(self, *args: object) -> str:  # type: ignore[override]
        raise AssertionError("a terminal password must come from getpass")


def run(argv: list[str], stdin: io.StringIO | None = None, getpass=None) -> tuple[int, str, str]:
    """main() with injected streams: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = main(argv, stdin=stdin if stdin is not None else io.StringIO(PASSWORD + "\n"),
                stdout=out, stderr=err, getpass=getpass)
    return code, out.getvalue(), err.getvalue()


def the_field(output: str, user: str) -> str:
    """The one printed line must be USER:{SCHEME}..., parseable as a users file."""
    assert output.endswith("\n") and output.count("\n") == 1
    parsed = parse_users(output.encode())
    assert parsed.problems == ()
    assert list(parsed.users) == [user]
    prefix = user + ":"
    assert output.startswith(prefix)
    return output[len(prefix):].rstrip("\n")


def test_default_scheme_from_stdin() -> None:
    """No --scheme: SHA512-CRYPT with 100000 rounds; the line verifies the password."""
    code, out, err = run(["alice"])
    assert (code, err) == (0, "")
    field = the_field(out, "alice")
    assert DEFAULT_SCHEME == "SHA512-CRYPT"
    assert field.startswith("{SHA512-CRYPT}$6$rounds=100000$")
    assert passwords.verify_password(field, PASSWORD) is True
    assert passwords.verify_password(field, PASSWORD + "!") is False


@pytest.mark.parametrize("scheme", passwords.MAKE_SCHEMES)
def test_every_scheme(scheme: str) -> None:
    """Each listed scheme prints a line that passwords.py verifies (lower-case name ok)."""
    argv = ["--scheme", scheme.lower(), "bob@example.test"]
    if scheme in FAST:
        argv[2:2] = ["--rounds", FAST[scheme]]
    code, out, err = run(argv)
    assert code == 0, err
    field = the_field(out, "bob@example.test")
    assert field.upper().startswith(MADE_AS.get(scheme, "{" + scheme + "}").upper())
    assert passwords.verify_password(field, PASSWORD, username="bob@example.test") is True
    assert passwords.verify_password(field, "wrong", username="bob@example.test") is False


def test_rounds_are_used() -> None:
    """--rounds sets the crypt rounds / SCRAM iterations / bcrypt cost."""
    assert "$rounds=2000$" in run(["-s", "SHA256-CRYPT", "-r", "2000", "u"])[1]
    assert run(["-s", "SCRAM-SHA-256", "-r", "5000", "u"])[1].startswith("u:{SCRAM-SHA-256}5000,")
    assert "$2b$05$" in run(["-s", "BLF-CRYPT", "-r", "5", "u"])[1]
    code, out, err = run(["-r", "0", "u"])
    assert (code, out) == (2, "") and "--rounds" in err


def test_terminal_asks_twice() -> None:
    """On a terminal the password comes from getpass, twice, and must match."""
    prompts: list[str] = []

    def fake_getpass(prompt: str) -> str:
        prompts.append(prompt)
        return "s3cret-pw"

    code, out, err = run(["-s", "SSHA256", "carol"], stdin=TTY(), getpass=fake_getpass)
    assert code == 0 and len(prompts) == 2
    assert passwords.verify_password(the_field(out, "carol"), "s3cret-pw") is True


def test_terminal_mismatch_fails() -> None:
    """Two different answers: exit 1, nothing on stdout."""
    answers = iter(["one", "two"])
    code, out, err = run(["carol"], stdin=TTY(), getpass=lambda prompt: next(answers))
    assert (code, out) == (1, "")
    assert "do not match" in err and "one" not in err and "two" not in err


def test_stdin_line_endings_are_stripped() -> None:
    """Only the first line counts; its CRLF is not part of the password."""
    code, out, _ = run(["-s", "SSHA", "dave"], stdin=io.StringIO("pw one\r\nsecond line\n"))
    field = the_field(out, "dave")
    assert passwords.verify_password(field, "pw one") is True


@pytest.mark.parametrize("stdin", ["", "\n"])
def test_missing_or_empty_password_fails(stdin: str) -> None:
    """EOF or an empty line: exit 1 with a message, nothing on stdout."""
    code, out, err = run(["erin"], stdin=io.StringIO(stdin))
    assert (code, out) == (1, "") and err


@pytest.mark.parametrize("user", ["", "a:b", "a\nb", "#comment"])
def test_bad_user_names(user: str) -> None:
    """A name that would break the users file is a usage error (exit 2)."""
    code, out, err = run([user])
    assert (code, out) == (2, "") and err.startswith("saslsmtp-passwd: ")


def test_help_lists_every_scheme() -> None:
    """--help exits 0 and names every scheme and the default."""
    code, out, _ = run(["--help"])
    assert code == 0
    for scheme in passwords.MAKE_SCHEMES:
        assert f"  {scheme} " in out
    assert "default SHA512-CRYPT" in out
    assert "{CRYPT}$y$ yescrypt" in out and "{CRYPT}$7$ scrypt" in out


def test_yescrypt_line_is_one_dovecot_and_mkpasswd_read() -> None:
    """``saslsmtp-passwd --scheme YESCRYPT`` writes ``{CRYPT}$y$...`` at libcrypt's default
    cost (mkpasswd's ``j9T``), which ``doveadm pw -t`` verifies."""
    from tests.conftest import require_binary
    doveadm = require_binary("doveadm", "dovecot-core")
    code, out, err = run(["--scheme", "yescrypt", "carol"])
    assert (code, err) == (0, "")
    field = the_field(out, "carol")
    assert field.startswith("{CRYPT}$y$j9T$")
    result = subprocess.run([doveadm, "pw", "-t", field, "-p", PASSWORD],
                            capture_output=True, text=True, timeout=30)
    assert "(verified)" in result.stdout, result.stderr
    assert parse_users(out.encode()).users["carol"].password.canonical == "CRYPT"


def test_unknown_scheme_is_a_usage_error() -> None:
    """An unknown --scheme exits 2 and says which ones exist."""
    code, out, err = run(["--scheme", "ROT13", "u"])
    assert (code, out) == (2, "")
    assert "ROT13" in err and "ARGON2ID" in err


def test_missing_user_is_a_usage_error() -> None:
    """USER is required."""
    code, out, err = run([])
    assert (code, out) == (2, "") and "USER" in err


def test_plain_with_colon_switches_to_b64() -> None:
    """A PLAIN password with ':' is written as {PLAIN.B64} so the line stays parseable."""
    code, out, err = run(["-s", "PLAIN", "frank"], stdin=io.StringIO("a:b\n"))
    assert code == 0 and "PLAIN.B64" in err
    field = the_field(out, "frank")
    assert field.startswith("{PLAIN.B64}") and passwords.verify_password(field, "a:b")


def test_bcrypt_too_long_password_fails_cleanly() -> None:
    """bcrypt's 72-byte limit is a clear error that does not echo the password."""
    long_pw = "x" * 73
    code, out, err = run(["-s", "BLF-CRYPT", "-r", "4", "gina"], stdin=io.StringIO(long_pw + "\n"))
    assert (code, out) == (1, "")
    assert "72 bytes" in err and long_pw not in err


def test_hashes_never_echo_the_password() -> None:
    """For hashing schemes the password appears nowhere in the output."""
    for scheme in ("SHA512-CRYPT", "SSHA512", "SCRAM-SHA-256", "CRAM-MD5"):
        code, out, err = run(["-s", scheme, "-r", "4096", "h"])
        assert code == 0 and PASSWORD not in out and PASSWORD not in err


def test_no_arguments_reads_sys_argv(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """main() with no arguments (the console-script entry point) uses sys.argv and sys.stdin."""
    monkeypatch.setattr(sys, "argv", ["saslsmtp-passwd", "--scheme", "SSHA256", "henry"])
    monkeypatch.setattr(sys, "stdin", io.StringIO("from-argv\n"))
    assert main() == 0
    field = the_field(capsys.readouterr().out, "henry")
    assert passwords.verify_password(field, "from-argv") is True


def test_entry_point_is_declared() -> None:
    """setup.cfg declares the console script saslsmtp-passwd = saslsmtp.passwd:main."""
    assert "saslsmtp-passwd = saslsmtp.passwd:main" in (ROOT / "setup.cfg").read_text()


def test_runs_as_a_program() -> None:
    """A real process reading the password from a pipe prints a verifiable line."""
    result = subprocess.run([sys.executable, "-m", "saslsmtp.passwd", "-s", "ARGON2ID", "-r", "1", "ivy"],
                            input="piped pw\n", capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    assert passwords.verify_password(the_field(result.stdout, "ivy"), "piped pw") is True


def test_missing_libcrypt_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the system libcrypt, a crypt(3) scheme fails with what to install, not a
    traceback."""
    from saslsmtp import libcrypt

    def missing() -> None:
        raise libcrypt.LibcryptMissing("libcrypt.so.1 cannot be loaded (package libcrypt1)")
    monkeypatch.setattr(libcrypt, "_load", missing)
    code, out, err = run(["u"])
    assert (code, out) == (1, "")
    assert err == "saslsmtp-passwd: libcrypt.so.1 cannot be loaded (package libcrypt1)\n"


def test_a_password_that_is_not_utf8_is_refused_in_words() -> None:
    """Latin-1 bytes on standard input (an old terminal): one line saying so and exit 1,
    not the codec's "can't encode character '\\udcff' in position 1"."""
    done = subprocess.run([sys.executable, "-m", "saslsmtp.passwd", "--scheme", "PLAIN", "alice"],
                          input=b"p\xe4ss\n", capture_output=True, timeout=30,
                          cwd=Path(__file__).resolve().parent.parent)
    assert (done.returncode, done.stdout) == (1, b"")
    assert done.stderr == (b"saslsmtp-passwd: the password is not valid UTF-8 (set the"
                           b" terminal's or the input's encoding to UTF-8)\n")


def test_a_strict_stream_that_cannot_decode_the_password_says_so() -> None:
    """A standard input decoding strictly (what a UTF-8 locale other than C gives Python)
    raises while reading: the same line, exit 1, no traceback."""
    strict = io.TextIOWrapper(io.BytesIO(b"p\xe4ss\n"), encoding="utf-8", errors="strict")
    err = io.StringIO()
    assert main(["--scheme", "PLAIN", "alice"], stdin=strict, stdout=io.StringIO(),
                stderr=err) == 1
    assert err.getvalue() == ("saslsmtp-passwd: the password is not valid UTF-8 (set the"
                              " terminal's or the input's encoding to UTF-8)\n")


def on_a_terminal(module: str, *args: str, key: bytes) -> tuple[int, str]:
    """Run ``python -m module args`` on a real pseudo-terminal, type ``key`` at the first
    ``Password:`` prompt (waited for, not slept), and return the exit status and
    everything the terminal showed."""
    import os
    import pty
    import select
    import time
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover (the child)
        os.environ["PYTHONPATH"] = str(ROOT)
        os.execv(sys.executable, [sys.executable, "-m", module, *args])
    shown, typed, deadline = b"", False, time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            if not select.select([fd], [], [], deadline - time.monotonic())[0]:
                break
            try:
                data = os.read(fd, 4096)
            except OSError:  # EIO: the child is gone and the terminal closed
                break
            if not data:
                break
            shown += data
            if not typed and b"Password: " in shown:
                os.write(fd, key)
                typed = True
    finally:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    assert typed, f"no prompt shown: {shown!r}"
    return os.waitstatus_to_exitcode(status), shown.decode("utf-8", "replace")


@pytest.mark.parametrize("module, args, eof_status", [
    ("saslsmtp.passwd", ("alice",), 1),
    ("saslsmtp.authtest", ("--config", "/nonexistent/saslsmtp.toml", "alice"), 64),
])
def test_ctrl_c_and_ctrl_d_at_the_prompt_are_one_line(module: str, args: tuple[str, ...],
                                                      eof_status: int) -> None:
    """Ctrl-C or Ctrl-D at a real terminal's password prompt printed a KeyboardInterrupt
    or EOFError traceback.  Now: one line, status 130 (the shell's for SIGINT) or the
    command's missing-password status, and no traceback."""
    name = "saslsmtp-passwd" if module.endswith("passwd") else "saslsmtp-authtest"
    status, shown = on_a_terminal(module, *args, key=b"\x03")
    assert "Traceback" not in shown and status == 130, shown
    assert shown.rstrip().splitlines()[-1] == f"{name}: interrupted"
    status, shown = on_a_terminal(module, *args, key=b"\x04")
    assert "Traceback" not in shown and status == eof_status, shown
    assert shown.rstrip().splitlines()[-1] == f"{name}: no password given"


@pytest.mark.parametrize("argv, line", [
    (["-s", "BLF-CRYPT", "-r", "3", "u"], "--rounds for BLF-CRYPT must be between 4 and 31"),
    (["-s", "BLF-CRYPT", "-r", "32", "u"], "--rounds for BLF-CRYPT must be between 4 and 31"),
    (["-s", "BLF-CRYPT", "-r", "-1", "u"], "--rounds for BLF-CRYPT must be between 4 and 31"),
    (["-r", "999", "u"], "--rounds for SHA512-CRYPT must be between 1000 and 999999999"),
    (["-s", "YESCRYPT", "-r", "12", "u"], "--rounds for YESCRYPT must be between 1 and 11"),
    (["-s", "SCRAM-SHA-256", "-r", "99999999999", "u"],
     "--rounds for SCRAM-SHA-256 must be between 1 and 10000000"),
    (["-s", "ARGON2ID", "-r", str(2 ** 32), "u"],
     f"--rounds for ARGON2ID must be between 1 and {2 ** 32 - 1}"),
], ids=["bcrypt-low", "bcrypt-high", "negative", "crypt", "yescrypt", "scram-overflow",
        "argon2-overflow"])
def test_rounds_out_of_range_is_a_usage_error(argv: list[str], line: str) -> None:
    """Every --rounds the scheme cannot take is a usage error like ``--rounds -1`` (exit
    2, one line, before the password is read): an out-of-range bcrypt cost exited 1, a
    huge SCRAM or Argon2 count printed an OverflowError traceback."""
    done = subprocess.run([sys.executable, "-m", "saslsmtp.passwd", *argv], input=PASSWORD + "\n",
                          capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert (done.returncode, done.stdout, done.stderr) == (2, "", f"saslsmtp-passwd: {line}\n")


def test_every_scheme_with_a_cost_has_its_rounds_range() -> None:
    """The --rounds ranges cover exactly the schemes that have a cost, defaults inside."""
    from saslsmtp.passwd import ROUNDS
    costed = {name: passwords._MAKERS[name].default_rounds for name in passwords.MAKE_SCHEMES
              if name in passwords._MAKERS and passwords._MAKERS[name].default_rounds is not None}
    assert set(ROUNDS) == set(costed)
    assert all(costed[name] in ROUNDS[name] for name in costed)
