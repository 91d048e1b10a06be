"""Tests for the ``file`` backend (saslsmtp.checkers.file): Dovecot passwd-file users."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import pytest
import pytest_twisted
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred
from twisted.logger import formatEvent, globalLogPublisher

from saslsmtp import passwords
from saslsmtp.checkers.file import (
    FALLBACK_DUMMY, SECRET_KINDS, FileChecker, coverage_warnings, from_config, mechanism_coverage,
    parse_users, pick_dummy,
)
from saslsmtp.checkers.registry import BackendDeps, build_checker
from saslsmtp.checkers.secrets import ISecretSource
from saslsmtp.config import BackendConfig, FileBackendConfig
from saslsmtp.credentials import PasswordCredentials
from saslsmtp.errors import TemporaryFailure
from saslsmtp.sasl.outcome import Secret
from saslsmtp.threads import SynchronousRunner, ThreadPoolRunner
from tests.test_passwords import ALL_VECTORS, DIGEST_MD5_VECTOR, RFC5802_FIELD, RFC7677_FIELD

ROOT = Path(__file__).resolve().parent.parent

#: A password that must never appear in any log line.
SECRET = "Tr0ub4dor&3-never-logged"


class RecordingRunner:
    """A SynchronousRunner that records every (function, stored password) it runs."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., Any], Any]] = []
        self._inner = SynchronousRunner()

    def run(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred:
        self.calls.append((f, args[0]))
        return self._inner.run(f, *args, **kwargs)


class BrokenRunner:
    """A runner whose pool is gone (e.g. stopped during shutdown)."""

    def run(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred:
        raise RuntimeError("pool stopped")


class ForbiddenRunner:
    """Fails the test if anything is sent to it."""

    def run(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred:
        raise AssertionError("cheap schemes must not use the hash runner")


@pytest.fixture
def captured_logs():
    """Every twisted.logger event emitted during the test."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


@pytest.fixture
def thread_runner():
    """A real bounded ThreadPoolRunner on pytest-twisted's reactor."""
    from twisted.internet import reactor
    runner = ThreadPoolRunner(reactor, "test-hash", 2)
    yield runner
    runner.stop()


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def creds(user: str | bytes, password: str | bytes) -> PasswordCredentials:
    u = user.encode() if isinstance(user, str) else user
    p = password.encode() if isinstance(password, str) else password
    return PasswordCredentials(u, p)


async def outcome(checker: FileChecker, user: str | bytes, password: str | bytes) -> Any:
    """The avatar id, or the exception class the checker failed with (``UnknownUser``, a
    kind of ``UnauthorizedLogin`` only the auth cache tells apart, counts as the latter)."""
    try:
        return await checker.requestAvatarId(creds(user, password))
    except UnauthorizedLogin:
        return UnauthorizedLogin
    except TemporaryFailure as e:
        return type(e)


def vectors_file(tmp_path: Path) -> Path:
    lines = ["# every known vector, password 'test'"]
    lines += [f"user{i}:{field}" for i, field in enumerate(ALL_VECTORS)]
    lines.append(f"testuser1:{DIGEST_MD5_VECTOR}")
    return write(tmp_path / "users", "\n".join(lines) + "\n")


def test_provides_the_interfaces(tmp_path: Path) -> None:
    """FileChecker is an ICredentialsChecker for IUsernamePassword and an ISecretSource."""
    checker = FileChecker(str(tmp_path / "users"), SynchronousRunner())
    assert ICredentialsChecker.providedBy(checker)
    assert ISecretSource.providedBy(checker)
    assert checker.secret_kinds() == SECRET_KINDS


@pytest_twisted.ensureDeferred
async def test_every_scheme_synchronous_runner(tmp_path: Path) -> None:
    """Every vector's user logs in with "test" and is refused "Test" (inline runner)."""
    checker = FileChecker(str(vectors_file(tmp_path)), SynchronousRunner())
    for i in range(len(ALL_VECTORS)):
        assert await outcome(checker, f"user{i}", "test") == f"user{i}".encode(), ALL_VECTORS[i]
        assert await outcome(checker, f"user{i}", "Test") is UnauthorizedLogin, ALL_VECTORS[i]
    assert await outcome(checker, "testuser1", "test") == b"testuser1"
    assert await outcome(checker, "testuser1", "Test") is UnauthorizedLogin


@pytest_twisted.ensureDeferred
async def test_every_scheme_thread_pool_runner(tmp_path: Path, thread_runner: ThreadPoolRunner) -> None:
    """The same through a real thread pool, all attempts in flight at once."""
    from twisted.internet.defer import gatherResults
    checker = FileChecker(str(vectors_file(tmp_path)), thread_runner)
    users = [f"user{i}" for i in range(len(ALL_VECTORS))] + ["testuser1"]
    good = await gatherResults([Deferred.fromCoroutine(outcome(checker, u, "test")) for u in users])
    bad = await gatherResults([Deferred.fromCoroutine(outcome(checker, u, "Test")) for u in users])
    assert good == [u.encode() for u in users]
    assert bad == [UnauthorizedLogin] * len(users)


@pytest_twisted.ensureDeferred
async def test_expensive_schemes_use_the_runner_cheap_ones_do_not(tmp_path: Path) -> None:
    """bcrypt goes through the hash runner; PLAIN and digests are compared inline."""
    bcrypt_field = passwords.make_hash("BLF-CRYPT", "pw", rounds=4)
    path = write(tmp_path / "users", f"a:{{PLAIN}}pw\nb:{{SSHA256}}VA2GfI9My2euT7pt6pqVkvj0jLMJ0dacYGfYTG6aDL+INzNU\n"
                                     f"c:{bcrypt_field}\n")
    inline = FileChecker(str(path), ForbiddenRunner())
    assert await outcome(inline, "a", "pw") == b"a"
    assert await outcome(inline, "b", "test") == b"b"
    runner = RecordingRunner()
    checker = FileChecker(str(path), runner)
    assert await outcome(checker, "c", "pw") == b"c"
    assert len(runner.calls) == 1 and runner.calls[0][1].scheme == "BLF-CRYPT"


@pytest_twisted.ensureDeferred
async def test_comments_blank_lines_extra_fields(tmp_path: Path) -> None:
    """Comments, blank lines, CRLF and the fields after the password are ignored."""
    path = write(tmp_path / "users",
                 "# a comment\n\n   \n  # indented comment\r\n"
                 "alice:{PLAIN}wonderland:1000:1000:Alice:/home/alice:/bin/sh:userdb_quota=1G\r\n"
                 "bob:{PLAIN}builder::::::\n"
                 "carol:{PLAIN}c\n")
    checker = FileChecker(str(path), SynchronousRunner())
    assert await outcome(checker, "alice", "wonderland") == b"alice"
    assert await outcome(checker, "bob", "builder") == b"bob"
    assert await outcome(checker, "carol", "c") == b"carol"
    assert await outcome(checker, "# a comment", "") is UnauthorizedLogin
    assert set(checker.users()) == {"alice", "bob", "carol"}


@pytest_twisted.ensureDeferred
async def test_usernames_are_exact(tmp_path: Path) -> None:
    """User names are compared exactly: case and surrounding spaces matter."""
    checker = FileChecker(str(write(tmp_path / "users", "Alice:{PLAIN}pw\n")), SynchronousRunner())
    assert await outcome(checker, "Alice", "pw") == b"Alice"
    assert await outcome(checker, "alice", "pw") is UnauthorizedLogin
    assert await outcome(checker, "Alice ", "pw") is UnauthorizedLogin


@pytest_twisted.ensureDeferred
async def test_utf8_usernames_and_passwords(tmp_path: Path) -> None:
    """Non-ASCII names and passwords are UTF-8; a non-UTF-8 name is just unknown."""
    field = passwords.make_hash("SSHA512", "pässwörd")
    checker = FileChecker(str(write(tmp_path / "users", f"jürgen:{field}\n")), SynchronousRunner())
    assert await outcome(checker, "jürgen", "pässwörd") == "jürgen".encode()
    assert await outcome(checker, b"j\xfcrgen", "pässwörd") is UnauthorizedLogin


@pytest_twisted.ensureDeferred
async def test_bad_lines_are_logged_and_skipped(tmp_path: Path, captured_logs: list) -> None:
    """Each unusable line is logged as file:line (without its content) and skipped."""
    path = tmp_path / "users"
    path.write_bytes(
        b"good:{PLAIN}pw\n"                          # 1
        + f"{SECRET}\n".encode()                     # 2: no colon (a pasted password?)
        + f":{{PLAIN}}{SECRET}\n".encode()           # 3: empty user
        + b"empty:\n"                                # 4: empty password
        + f"unknown:{{NOPE}}{SECRET}\n".encode()     # 5: unknown scheme
        + f"badb64:{{SHA}}{SECRET}\n".encode()       # 6: not base64
        + b"latin:{PLAIN}\xe9t\xe9\n"                # 7: not UTF-8
        + f"good:{{PLAIN}}{SECRET}\n".encode()       # 8: duplicate
        + b"also:{PLAIN}fine\n")                     # 9
    checker = FileChecker(str(path), SynchronousRunner())
    assert await outcome(checker, "good", "pw") == b"good"
    assert await outcome(checker, "good", SECRET) is UnauthorizedLogin
    assert await outcome(checker, "also", "fine") == b"also"
    assert await outcome(checker, "unknown", SECRET) is UnauthorizedLogin
    warnings = [formatEvent(e) for e in captured_logs if e.get("file") == str(path) and "line" in e]
    assert [w.split(":", 2)[1] for w in warnings] == ["2", "3", "4", "5", "6", "7", "8"]
    assert all(w.startswith(f"{path}:") and w.endswith("line skipped") for w in warnings)
    assert "unknown password scheme {NOPE}" in warnings[3]
    assert "first defined on line 1" in warnings[6]
    for event in captured_logs:
        assert SECRET not in formatEvent(event) and SECRET not in repr(event)


def test_parse_users_reports_problems_by_line() -> None:
    """parse_users is pure: entries and (line, problem) pairs, for --check style reports."""
    parsed = parse_users(b"#c\na:{PLAIN}x\nb\nc:{PLAIN}y:1\n", "CRYPT")
    assert sorted(parsed.users) == ["a", "c"]
    assert parsed.users["c"].line == 4
    assert parsed.problems == ((3, "no ':' (want user:{SCHEME}password)"),)
    assert "x" not in repr(parsed.users["a"])


def test_parse_users_flags_truncated_crypt_hashes() -> None:
    """A crypt hash cut short (``$6$broken``) is a problem on its line, not a user who
    gets 535 forever; so ``--check`` reports it."""
    good = passwords.make_hash("SHA512-CRYPT", "pw", rounds=1000)
    parsed = parse_users(f"ok:{good}\nalice:{{SHA512-CRYPT}}$6$broken\n"
                         f"bob:{{MD5-CRYPT}}$1$abc$\n".encode(), "CRYPT")
    assert sorted(parsed.users) == ["ok"]
    assert [line for line, _ in parsed.problems] == [2, 3]
    assert "not a complete SHA512-CRYPT hash" in parsed.problems[0][1]


def test_mechanism_coverage_counts_users_a_mechanism_cannot_serve() -> None:
    """CRAM-MD5 needs {PLAIN} or {CRAM-MD5}; SCRAM-SHA-256 needs {PLAIN} or its own
    verifier; PLAIN and LOGIN serve every scheme and are not counted."""
    users = parse_users("\n".join([
        "plain:{PLAIN}pw",
        "cram:" + passwords.make_hash("CRAM-MD5", "pw"),
        "scram:" + passwords.make_hash("SCRAM-SHA-256", "pw"),
        "crypt:" + passwords.make_hash("SHA512-CRYPT", "pw", rounds=1000),
        "bcrypt:" + passwords.make_hash("BLF-CRYPT", "pw", rounds=4),
    ]).encode()).users
    coverage = mechanism_coverage(users, ["PLAIN", "cram-md5", "SCRAM-SHA-256", "SCRAM-SHA-1-PLUS"])
    assert [(c.mechanism, c.unusable, c.total) for c in coverage] == [
        ("CRAM-MD5", 3, 5), ("SCRAM-SHA-256", 3, 5), ("SCRAM-SHA-1-PLUS", 4, 5)]
    assert coverage_warnings(users, ["CRAM-MD5", "LOGIN"]) == [
        "CRAM-MD5 announced but 3 of 5 users have hashes it cannot use"
        " (those users cannot log in with CRAM-MD5)"]
    assert coverage_warnings({k: v for k, v in users.items() if k == "plain"}, ["CRAM-MD5"]) == []


def test_check_reports_malformed_hashes_and_warns_about_coverage(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--check`` (tap.check_users_files): a truncated hash is a problem with its line
    number; users a announced CRAM-MD5 cannot serve are a warning."""
    from saslsmtp.config import ConfigError
    from saslsmtp.service import check_users_files, load
    from tests.support import write_config
    users = write(tmp_path / "users", "bob:{PLAIN}pw\nalice:{SHA512-CRYPT}$6$broken\n"
                  "carol:" + passwords.make_hash("SHA512-CRYPT", "pw", rounds=1000) + "\n")
    config = write_config(tmp_path, f'[backends.users]\ntype = "file"\npath = "{users}"\n',
                          mechanisms=["PLAIN", "CRAM-MD5"])
    with pytest.raises(ConfigError) as info:
        check_users_files(load(str(config)))
    assert f"{users}:2: backends.users: not a complete SHA512-CRYPT hash" in str(info.value)
    assert (f"{users}: warning: CRAM-MD5 announced but 1 of 2 users have hashes it cannot use"
            in capsys.readouterr().err)
    # served by an AUTH script (it keeps its own secrets): no warning about the users file
    (tmp_path / "cram.py").write_text('MECHANISMS = ["CRAM-MD5"]\n'
                                      "def auth(arguments, context):\n    return None\n")
    users.write_text("bob:{PLAIN}pw\ncarol:" + passwords.make_hash("SHA512-CRYPT", "pw", rounds=1000)
                     + "\n")
    scripted = config.read_text().replace("[auth]\n", '[auth]\nscript = "cram.py"\n', 1)
    config.write_text(scripted)
    check_users_files(load(str(config)))
    assert "CRAM-MD5" not in capsys.readouterr().err


def test_check_warns_when_sender_policy_login_meets_logins_that_are_no_address(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``sender_policy = "login"`` lets a login send only as itself; a users file whose
    names are not addresses (``saslsmtp-passwd alice``) would get 553 at every MAIL with no
    word at --check.  Now it warns, naming a few of them; address logins say nothing."""
    from saslsmtp.service import check_users_files, load
    from tests.support import write_config
    users = write(tmp_path / "users", "alice:{PLAIN}pw\nbob@example.test:{PLAIN}pw\n"
                  "carol:{PLAIN}pw\ndave:{PLAIN}pw\nerin:{PLAIN}pw\n")
    config = write_config(tmp_path, f'[backends.users]\ntype = "file"\npath = "{users}"\n'
                          '[submission]\nsender_policy = "login"\n')
    check_users_files(load(str(config)))
    assert capsys.readouterr().err == (
        f'{users}: warning: sender_policy = "login" lets a login send only as itself, and 4 of'
        ' 5 users (alice, carol, dave and 1 more) are no address: every MAIL of theirs gets'
        ' 553 (use sender_policy = "map" for them)\n')
    users.write_text("bob@example.test:{PLAIN}pw\n")
    check_users_files(load(str(config)))
    assert capsys.readouterr().err == ""


@pytest_twisted.ensureDeferred
async def test_secret_lookup_logs_why_a_one_way_hash_cannot_serve(tmp_path: Path,
                                                                   captured_logs: list) -> None:
    """A CRAM-MD5/SCRAM login of a user with a one-way hash fails like an unknown user
    (``None``); the log says why, naming the line and scheme, never the hash."""
    stored = passwords.make_hash("SHA512-CRYPT", SECRET, rounds=1000)
    path = write(tmp_path / "users", f"plain:{{PLAIN}}{SECRET}\ncrypt:{stored}\n")
    checker = FileChecker(str(path), SynchronousRunner())
    assert await checker.lookup_secret("crypt", ("cram-md5", "plaintext")) is None
    lines = [formatEvent(e) for e in captured_logs if "cannot log in" in formatEvent(e)]
    assert lines == [f"{path}:2: user 'crypt' cannot log in with this mechanism: its"
                     " {SHA512-CRYPT} hash cannot serve it (it needs one of: cram-md5, plaintext)"]
    assert await checker.lookup_secret("plain", ("cram-md5", "plaintext")) == Secret("plaintext", SECRET)
    for event in captured_logs:
        assert SECRET not in formatEvent(event) and stored[20:] not in formatEvent(event)


def test_missing_libcrypt_is_a_clear_startup_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without libcrypt the file backend refuses to start, saying what to install."""
    import ctypes
    from saslsmtp import libcrypt

    def no_library(name: str, *args: Any, **kwargs: Any) -> Any:
        raise OSError(f"{name}: cannot open shared object file")
    monkeypatch.setattr(ctypes, "CDLL", no_library)
    libcrypt._load.cache_clear()
    try:
        with pytest.raises(libcrypt.LibcryptMissing, match="libcrypt.so.1.*libcrypt1"):
            FileChecker(str(write(tmp_path / "users", "a:{PLAIN}x\n")), SynchronousRunner())
    finally:
        monkeypatch.undo()
        libcrypt._load.cache_clear()
    assert libcrypt.crypt(b"x", b"ab") == b"abiQ6Ep3EYTHc"


@pytest_twisted.ensureDeferred
async def test_default_scheme_for_bare_hashes(tmp_path: Path) -> None:
    """A bare hash uses default_scheme: CRYPT by default, or what the config says."""
    path = write(tmp_path / "users", "des://EsnG9FLTKjo\n")
    assert await outcome(FileChecker(str(path), SynchronousRunner()), "des", "test") == b"des"
    plain = write(tmp_path / "plain", "p:secret\n")
    checker = FileChecker(str(plain), SynchronousRunner(), default_scheme="PLAIN")
    assert await outcome(checker, "p", "secret") == b"p"
    with pytest.raises(ValueError, match="default_scheme"):
        FileChecker(str(plain), SynchronousRunner(), default_scheme="NOPE")


@pytest_twisted.ensureDeferred
async def test_reload_on_change(tmp_path: Path) -> None:
    """Edits are seen on the next lookup: new size, same-size rewrite (mtime), rename (inode)."""
    path = write(tmp_path / "users", "a:{PLAIN}one\n")
    checker = FileChecker(str(path), SynchronousRunner())
    assert await outcome(checker, "a", "one") == b"a"
    write(path, "a:{PLAIN}three\n")                          # different size
    assert await outcome(checker, "a", "one") is UnauthorizedLogin
    assert await outcome(checker, "a", "three") == b"a"
    st = os.stat(path)
    write(path, "a:{PLAIN}seven\n")                          # same size ...
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # ... later mtime
    assert await outcome(checker, "a", "seven") == b"a"
    st = os.stat(path)
    other = write(tmp_path / "users.new", "a:{PLAIN}eight\n")  # atomic replace: new inode,
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))      # same size and mtime
    os.replace(other, path)
    assert await outcome(checker, "a", "eight") == b"a"


@pytest_twisted.ensureDeferred
async def test_a_changed_secret_is_served_on_the_next_lookup(tmp_path: Path) -> None:
    """The decoded secrets kept per user go with the file version they came from."""
    path = write(tmp_path / "users", "a:{PLAIN}one\n")
    checker = FileChecker(str(path), SynchronousRunner())
    assert await checker.lookup_secret("a", ("plaintext",)) == Secret("plaintext", "one")
    assert await checker.lookup_secret("a", ("plaintext",)) == Secret("plaintext", "one")
    write(path, "a:{PLAIN}three\n")
    assert await checker.lookup_secret("a", ("plaintext",)) == Secret("plaintext", "three")


@pytest_twisted.ensureDeferred
async def test_unchanged_file_is_not_reread(tmp_path: Path) -> None:
    """Only a stat per lookup while the file is unchanged."""
    path = write(tmp_path / "users", "a:{PLAIN}pw\n")
    reads: list[str] = []

    def read(p: str) -> bytes:
        reads.append(p)
        return Path(p).read_bytes()

    checker = FileChecker(str(path), SynchronousRunner(), read=read)
    for _ in range(5):
        assert await outcome(checker, "a", "pw") == b"a"
    assert reads == [str(path)]


@pytest_twisted.ensureDeferred
async def test_missing_or_unreadable_file_is_a_temporary_failure(tmp_path: Path) -> None:
    """No file (or it vanished after loading) -> TemporaryFailure; back again -> works."""
    path = tmp_path / "users"
    checker = FileChecker(str(path), SynchronousRunner())
    assert await outcome(checker, "a", "pw") is TemporaryFailure
    with pytest.raises(TemporaryFailure):
        await checker.lookup_secret("a", ("plaintext",))
    write(path, "a:{PLAIN}pw\n")
    assert await outcome(checker, "a", "pw") == b"a"
    path.unlink()
    assert await outcome(checker, "a", "pw") is TemporaryFailure
    path.mkdir()                                             # a directory cannot be read
    assert await outcome(checker, "a", "pw") is TemporaryFailure
    path.rmdir()
    write(path, "a:{PLAIN}pw\n")
    assert await outcome(checker, "a", "pw") == b"a"


@pytest_twisted.ensureDeferred
async def test_unknown_user_costs_a_typical_hash(tmp_path: Path) -> None:
    """An unknown user is verified, through the runner, against the most common cost
    profile in the file; the result is thrown away even if the password matches it."""
    sha = [passwords.make_hash("SHA512-CRYPT", f"pw{i}", rounds=5000) for i in range(3)]
    bcrypt_field = passwords.make_hash("BLF-CRYPT", "bpw", rounds=4)
    path = write(tmp_path / "users", f"b:{bcrypt_field}\ns0:{sha[0]}\ns1:{sha[1]}\ns2:{sha[2]}\n")
    runner = RecordingRunner()
    checker = FileChecker(str(path), runner)
    assert await outcome(checker, "s1", "wrong") is UnauthorizedLogin
    assert await outcome(checker, "nobody", "wrong") is UnauthorizedLogin
    assert await outcome(checker, "nobody", "pw0") is UnauthorizedLogin   # the dummy's password
    (f1, known), (f2, dummy), (f3, dummy2) = runner.calls
    assert f1 is f2 is f3
    assert dummy is dummy2 and dummy is checker.users()["s0"].password
    assert passwords.cost_key(dummy) == passwords.cost_key(known) == "crypt6:rounds=5000"


def test_pick_dummy() -> None:
    """The dummy follows the majority cost; an empty file falls back to SHA512-CRYPT."""
    assert pick_dummy({}).raw == passwords.parse_password(FALLBACK_DUMMY).raw
    assert passwords.is_expensive(pick_dummy({}))
    parsed = parse_users(b"a:{PLAIN}x\nb:$2y$05$11ipvo5dR6CwkzwmhwM26OXgzXwhV2PyPuLV.Qi31ILcRcThQpEiW\n"
                         b"c:{BLF-CRYPT}$2y$05$11ipvo5dR6CwkzwmhwM26OXgzXwhV2PyPuLV.Qi31ILcRcThQpEiW\n")
    assert pick_dummy(parsed.users) is parsed.users["b"].password


@pytest_twisted.ensureDeferred
async def test_unknown_user_in_empty_file_still_hashes(tmp_path: Path) -> None:
    """With no users at all, an unknown user still costs a SHA512-CRYPT verification."""
    runner = RecordingRunner()
    checker = FileChecker(str(write(tmp_path / "users", "# nobody yet\n")), runner)
    assert await outcome(checker, "nobody", "x") is UnauthorizedLogin
    assert len(runner.calls) == 1 and runner.calls[0][1].scheme == "SHA512-CRYPT"


@pytest_twisted.ensureDeferred
async def test_runner_failure_is_temporary(tmp_path: Path, captured_logs: list) -> None:
    """If the hash pool cannot run the work, that is a TemporaryFailure, not a rejection."""
    field = passwords.make_hash("SHA256-CRYPT", SECRET, rounds=1000)
    checker = FileChecker(str(write(tmp_path / "users", f"a:{field}\n")), BrokenRunner())
    assert await outcome(checker, "a", SECRET) is TemporaryFailure
    for event in captured_logs:
        assert SECRET not in formatEvent(event) and SECRET not in repr(event)


@pytest_twisted.ensureDeferred
async def test_bcrypt_over_72_bytes_is_rejected_not_an_error(tmp_path: Path) -> None:
    """A >72-byte password against bcrypt is a plain 535, not a temporary failure."""
    field = passwords.make_hash("BLF-CRYPT", "a" * 72, rounds=4)
    checker = FileChecker(str(write(tmp_path / "users", f"a:{field}\n")), SynchronousRunner())
    assert await outcome(checker, "a", "a" * 72) == b"a"
    assert await outcome(checker, "a", "a" * 73) is UnauthorizedLogin


@pytest_twisted.ensureDeferred
async def test_stock_twisted_credentials_work(tmp_path: Path) -> None:
    """Twisted's own UsernamePassword (no session) works too."""
    checker = FileChecker(str(write(tmp_path / "users", "a:{PLAIN}pw\n")), SynchronousRunner())
    assert await checker.requestAvatarId(UsernamePassword(b"a", b"pw")) == b"a"


@pytest_twisted.ensureDeferred
async def test_secret_lookup(tmp_path: Path) -> None:
    """lookup_secret: the first wanted kind the user's field can supply, else None."""
    cram = passwords.make_hash("CRAM-MD5", "test")
    path = write(tmp_path / "users",
                 f"plain:{{PLAIN}}test\ncram:{cram}\nscram1:{RFC5802_FIELD}\n"
                 f"scram256:{RFC7677_FIELD}\nhashed:{passwords.make_hash('SSHA', 'test')}\n")
    checker = FileChecker(str(path), ForbiddenRunner())
    all_kinds = ("scram-sha-256", "scram-sha-1", "cram-md5", "plaintext")
    assert await checker.lookup_secret("plain", all_kinds) == Secret("plaintext", "test")
    assert await checker.lookup_secret("cram", ("plaintext", "cram-md5")) == \
        Secret("cram-md5", passwords.cram_md5_context("test"))
    secret = await checker.lookup_secret("scram1", all_kinds)
    assert secret.kind == "scram-sha-1" and secret.value[0] == 4096
    secret = await checker.lookup_secret("scram256", all_kinds)
    assert secret.kind == "scram-sha-256" and len(secret.value[3]) == 32
    assert await checker.lookup_secret("scram256", ("scram-sha-1",)) is None
    assert await checker.lookup_secret("plain", ("cram-md5",)) is None
    assert await checker.lookup_secret("hashed", all_kinds) is None
    assert await checker.lookup_secret("nobody", all_kinds) is None
    assert "test" not in repr(await checker.lookup_secret("plain", all_kinds))


@pytest_twisted.ensureDeferred
async def test_nothing_logged_contains_the_password(tmp_path: Path, captured_logs: list,
                                                    thread_runner: ThreadPoolRunner) -> None:
    """Loads, reloads, bad lines, successes and failures: no log event holds the password."""
    field = passwords.make_hash("SHA512-CRYPT", SECRET, rounds=1000)
    path = write(tmp_path / "users", f"a:{field}\np:{{PLAIN}}{SECRET}\nbad:{{XX}}{SECRET}\n{SECRET}\n")
    checker = FileChecker(str(path), thread_runner)
    assert await outcome(checker, "a", SECRET) == b"a"
    assert await outcome(checker, "a", SECRET + "x") is UnauthorizedLogin
    assert await outcome(checker, "p", SECRET) == b"p"
    assert await outcome(checker, "nobody", SECRET) is UnauthorizedLogin
    assert SECRET not in repr(checker) and SECRET not in repr(checker.users())
    write(path, f"a:{{SHA}}{SECRET}\n")
    assert await outcome(checker, "a", SECRET) is UnauthorizedLogin
    path.unlink()
    assert await outcome(checker, "a", SECRET) is TemporaryFailure
    assert captured_logs, "expected load and problem log lines"
    for event in captured_logs:
        assert SECRET not in formatEvent(event) and SECRET not in repr(event)


def test_from_config_uses_the_shared_hash_runner(tmp_path: Path) -> None:
    """from_config / build_checker wire path, default_scheme and deps.hash_runner."""
    runner = SynchronousRunner()
    deps = BackendDeps(reactor=None, hash_runner=runner, make_runner=lambda n, m: runner)
    (tmp_path / "users").write_text("")  # options check that the file exists
    options = FileBackendConfig(path=str(tmp_path / "users"), default_scheme="SHA512-CRYPT")
    checker = from_config("users", options, deps)
    assert isinstance(checker, FileChecker)
    assert (checker.path, checker.default_scheme, checker.name) == (options.path, "SHA512-CRYPT", "users")
    assert checker._runner is runner
    built = build_checker(BackendConfig(name="users", type="file", options=options), deps)
    assert isinstance(built, FileChecker)


@pytest_twisted.ensureDeferred
async def test_shipped_users_file() -> None:
    """etc/users parses cleanly and ships only the demo user (demo/demo-password)."""
    path = ROOT / "etc" / "users"
    parsed = parse_users(path.read_bytes())
    assert parsed.problems == ()
    assert set(parsed.users) == {"demo"}
    assert parsed.users["demo"].password.scheme == "SHA512-CRYPT"
    checker = FileChecker(str(path), SynchronousRunner())
    assert await outcome(checker, "demo", "demo-password") == b"demo"
    assert await outcome(checker, "demo", "demo") is UnauthorizedLogin


# ---- the whole SMTP path: smtplib against a real saslsmtp on loopback -----------------

def smtp_users_file(tmp_path: Path) -> Path:
    """Users of several expensive and cheap schemes, cheap costs to stay fast."""
    lines = [
        f"crypt:{passwords.make_hash('SHA512-CRYPT', 'pw-crypt', rounds=1000)}",
        f"bcrypt:{passwords.make_hash('BLF-CRYPT', 'pw-bcrypt', rounds=4)}",
        f"argon:{passwords.make_hash('ARGON2ID', 'pw-argon', rounds=1)}",
        f"scram:{passwords.make_hash('SCRAM-SHA-256', 'pw-scram')}",
        "plain:{PLAIN}pw-plain",
    ]
    return write(tmp_path / "users", "\n".join(lines) + "\n")


@pytest_twisted.ensureDeferred
async def test_smtp_plain_and_login_against_the_file(tmp_path: Path, captured_logs: list) -> None:
    """AUTH PLAIN and LOGIN over a real socket: 235 for each scheme, 535 for wrong or unknown."""
    from tests.support import smtp_login, start_server
    users = smtp_users_file(tmp_path)
    server = await start_server(tmp_path, f'[backends.users]\ntype = "file"\npath = "{users}"\n')
    try:
        for user in ("crypt", "bcrypt", "argon", "scram", "plain"):
            code, _ = await smtp_login(server.port, user, f"pw-{user}", mechanism="PLAIN")
            assert code == 235, user
        code, _ = await smtp_login(server.port, "bcrypt", "pw-bcrypt", mechanism="LOGIN")
        assert code == 235
        code, _ = await smtp_login(server.port, "crypt", "pw-bcrypt", mechanism="PLAIN")
        assert code == 535
        code, _ = await smtp_login(server.port, "nobody", "pw-crypt", mechanism="LOGIN")
        assert code == 535
    finally:
        await server.stop()
    for event in captured_logs:
        text = formatEvent(event) + repr(event)
        assert "pw-crypt" not in text and "pw-bcrypt" not in text


@pytest_twisted.ensureDeferred
async def test_smtp_sees_edits_and_missing_file(tmp_path: Path) -> None:
    """A user added while running logs in at once; a deleted users file answers 454."""
    from tests.support import smtp_login, start_server
    users = write(tmp_path / "users", "a:{PLAIN}first\n")
    server = await start_server(tmp_path, f'[backends.users]\ntype = "file"\npath = "{users}"\n')
    try:
        assert (await smtp_login(server.port, "a", "first"))[0] == 235
        write(users, "a:{PLAIN}first\n" + f"b:{passwords.make_hash('SHA256-CRYPT', 'second', rounds=1000)}\n")
        assert (await smtp_login(server.port, "b", "second"))[0] == 235
        users.unlink()
        code, text = await smtp_login(server.port, "a", "first")
        assert code == 454 and text.startswith(b"4.7.0")
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_smtp_demo_user_of_the_shipped_users_file(tmp_path: Path) -> None:
    """etc/users through the server: demo / demo-password is accepted."""
    from tests.support import smtp_login, start_server
    users = ROOT / "etc" / "users"
    server = await start_server(tmp_path, f'[backends.users]\ntype = "file"\npath = "{users}"\n')
    try:
        assert (await smtp_login(server.port, "demo", "demo-password"))[0] == 235
        assert (await smtp_login(server.port, "demo", "wrong"))[0] == 535
    finally:
        await server.stop()
