"""The ``file`` backend: a Dovecot passwd-file of users and password hashes.

Format (one user a line, as Dovecot's passwd-file)::

    # comment
    user:{SCHEME}hash[:uid:gid:gecos:home:shell:extra_fields]

Blank lines and lines starting with ``#`` are ignored; only the first two fields are
used.  A bare hash (no ``{SCHEME}``) uses ``default_scheme`` (Dovecot's default:
``CRYPT``).  User names are compared exactly, as Dovecot does by default.

* **Reloading**: every lookup does a cheap ``os.stat``; when the device, inode, size or
  mtime changed, the file is read again (synchronously: it is small) and parsed.  A line
  that cannot be used is logged with file and line number (never its content) and
  skipped; the first of two lines for the same user wins.  A file that cannot be read is
  a ``TemporaryFailure`` (454), even if it was read before: a deleted file must not
  keep its users alive.
* **Hashing** runs through the injected ``BlockingRunner`` (the shared bounded pool);
  only cheap schemes (PLAIN and single digests) are compared inline.
* **Unknown users** cost what a typical user costs: the password is verified against a
  *dummy*, the stored hash of the first entry whose scheme and cost parameters
  (``passwords.cost_key``) are the most common in the file, and the result is thrown
  away.  So an unknown user goes through the same scheme, the same parameters and the
  same runner as most known users; with an empty file, a fixed SHA512-CRYPT hash is used.
  (In a file that mixes costs, users of a rarer cost remain distinguishable by timing;
  keep one scheme per file.)
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from saslsmtp import libcrypt, passwords
from saslsmtp.checkers.secrets import ISecretSource
from saslsmtp.credentials import AvatarId
from saslsmtp.errors import TemporaryFailure, UnknownUser
from saslsmtp.options import PATH, OptionProblem, Options, file_problem
from saslsmtp.mechanisms import builtin_mechanisms
from saslsmtp.octets import config_lines
from saslsmtp.passwords import PasswordError, StoredPassword
from saslsmtp.sasl.outcome import Secret
from saslsmtp.threads import BlockingRunner

log = Logger()

#: Every kind a passwd-file can hold ({PLAIN}, {CRAM-MD5}, {SCRAM-SHA-1}, {SCRAM-SHA-256}).
SECRET_KINDS = frozenset({"plaintext", "cram-md5", "scram-sha-1", "scram-sha-256"})

#: Dummy for an empty file: SHA512-CRYPT, 100000 rounds (saslsmtp-passwd's default),
#: of a random password nobody knows.
FALLBACK_DUMMY = ("{SHA512-CRYPT}$6$rounds=100000$96Clan1Hld9/kGjp$jpITHQKSWj4H5tTbvlMaiFv6j/2ZP2w"
                  "yg0vOPLcJGtOAAwdfggQ1GVHdBHmrK3WrhwLH73b1mZzCbOfm7zcFN.")


@dataclass(frozen=True)
class UserEntry:
    """One usable line: the user name, its parsed password, and where it came from."""

    username: str
    password: StoredPassword = field(repr=False)
    line: int


@dataclass(frozen=True)
class ParsedUsers:
    """The usable entries of a users file, and ``(line, problem)`` for every skipped line."""

    users: Mapping[str, UserEntry]
    problems: tuple[tuple[int, str], ...]


def parse_users(data: bytes, default_scheme: str = "CRYPT") -> ParsedUsers:
    """Parse passwd-file bytes.  Problems name the line, never its content."""
    users: dict[str, UserEntry] = {}
    problems: list[tuple[int, str]] = []
    for number, line in config_lines(data, problems):
        user, sep, rest = line.partition(":")
        if not sep:
            problems.append((number, "no ':' (want user:{SCHEME}password)"))
            continue
        if not user:
            problems.append((number, "empty user name"))
            continue
        secret = rest.split(":", 1)[0]
        if not secret:
            problems.append((number, "empty password field"))
            continue
        try:
            stored = passwords.parse_password(secret, default_scheme)
        except PasswordError as e:
            problems.append((number, str(e)))
            continue
        if user in users:
            problems.append((number, f"duplicate user (first defined on line {users[user].line})"))
            continue
        users[user] = UserEntry(user, stored, number)
    return ParsedUsers(users, tuple(problems))


def pick_dummy(users: Mapping[str, UserEntry]) -> StoredPassword:
    """The stored password an unknown user is verified against (see the module doc)."""
    if not users:
        return passwords.parse_password(FALLBACK_DUMMY)
    keys = {name: passwords.cost_key(entry.password) for name, entry in users.items()}
    common, _ = Counter(keys.values()).most_common(1)[0]
    first = min((e for n, e in users.items() if keys[n] == common), key=lambda e: e.line)
    return first.password


@dataclass(frozen=True)
class Coverage:
    """How many of ``total`` users an announced challenge mechanism cannot serve, because
    their stored hash is one-way (the mechanism needs a plaintext, CRAM-MD5 context or
    SCRAM verifier)."""

    mechanism: str
    unusable: int
    total: int

    def warning(self) -> str:
        """The startup warning, e.g. ``CRAM-MD5 announced but 3 of 5 users ...``."""
        return (f"{self.mechanism} announced but {self.unusable} of {self.total} users have"
                f" hashes it cannot use (those users cannot log in with {self.mechanism})")


def mechanism_coverage(users: Mapping[str, UserEntry], mechanisms: Iterable[str]) -> list[Coverage]:
    """For each announced mechanism that works from stored secrets (CRAM-MD5, SCRAM-*),
    how many entries it cannot serve; mechanisms that take a password (PLAIN, LOGIN) are
    left out, they work with every scheme."""
    out = []
    specs = builtin_mechanisms()
    for name in mechanisms:
        spec = specs.get(name.upper())
        kinds = set(spec.secret_kinds) if spec is not None else set()
        if not kinds:
            continue
        unusable = sum(1 for entry in users.values()
                       if not kinds & passwords.stored_secrets(entry.password).keys())
        out.append(Coverage(name.upper(), unusable, len(users)))
    return out


def coverage_warnings(users: Mapping[str, UserEntry], mechanisms: Iterable[str]) -> list[str]:
    """The warnings for ``mechanism_coverage`` entries with at least one unusable user."""
    return [c.warning() for c in mechanism_coverage(users, mechanisms) if c.unusable]


def _verify(stored: StoredPassword, password: bytes, username: str | None) -> bool:
    return passwords.verify_password(stored, password, username=username)


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@implementer(ICredentialsChecker, ISecretSource)
class FileChecker:
    """Checks usernames and passwords against a Dovecot passwd-file.

    ``hash_runner`` runs expensive verifications; ``stat`` and ``read`` are
    injectable for tests (defaults: ``os.stat`` and reading the whole file).
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, path: str, hash_runner: BlockingRunner, default_scheme: str = "CRYPT",
                 *, name: str = "file", stat: Callable[[str], Any] = os.stat,
                 read: Callable[[str], bytes] = _read_bytes) -> None:
        try:
            passwords.parse_password("{%s}x" % default_scheme)
        except passwords.UnknownScheme:
            raise ValueError(f"unknown default_scheme {default_scheme!r}") from None
        except PasswordError:
            pass  # the scheme exists; "x" is just not valid data for it
        libcrypt.require()  # at startup: the crypt(3) schemes and the fallback dummy need it
        self.path = path
        self.name = name
        self.default_scheme = default_scheme
        self._runner = hash_runner
        self._stat = stat
        self._read = read
        self._signature: tuple[int, int, int, int] | None = None
        self._unreadable = False
        self._users: Mapping[str, UserEntry] = {}
        self._secrets: dict[str, Mapping[str, object]] = {}  # per user, until the file changes
        self._dummy = passwords.parse_password(FALLBACK_DUMMY)

    def __repr__(self) -> str:
        return f"<FileChecker {self.name} path={self.path!r}>"

    # ---- the file ------------------------------------------------------------------

    def users(self) -> Mapping[str, UserEntry]:
        """The current entries, re-reading the file if it changed since the last call.

        Fails with ``TemporaryFailure`` if the file cannot be stat'ed or read.
        """
        try:
            st = self._stat(self.path)
            signature = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            if signature == self._signature:
                return self._users
            data = self._read(self.path)
        except OSError as e:
            why = f"users file {self.path} cannot be read: {e.strerror or type(e).__name__}"
            if not self._unreadable:  # once per outage, not once per login
                log.error("backend {name}: {why}; logins get 454", name=self.name, why=why)
            self._signature, self._unreadable = None, True
            raise TemporaryFailure(why) from None
        self._unreadable = False
        parsed = parse_users(data, self.default_scheme)
        for line, problem in parsed.problems:
            log.warn("{file}:{line}: {problem}; line skipped", file=self.path, line=line,
                     problem=problem)
        self._users = parsed.users
        self._secrets = {}
        self._dummy = pick_dummy(parsed.users)
        self._signature = signature
        log.info("backend {name}: loaded {count} users from {file}", name=self.name,
                 count=len(parsed.users), file=self.path)
        return self._users

    def generation(self) -> object:
        """What the file's verdicts depend on, for the auth cache: the signature of the
        file as it is now (re-read if it changed), ``None`` when it cannot be read.  A
        success cached under another generation is not reused: an edited password, a
        removed user or a deleted file takes effect at the next login, cache or not."""
        try:
            self.users()
        except TemporaryFailure:
            return None
        return self._signature

    # ---- ICredentialsChecker ---------------------------------------------------------

    def requestAvatarId(self, credentials: IUsernamePassword) -> "Deferred[AvatarId]":
        """Verify the password; fire with the username bytes, or fail with
        ``UnauthorizedLogin`` (wrong password, unknown user) / ``TemporaryFailure``."""
        try:
            users = self.users()
        except TemporaryFailure:
            return fail()
        raw_name = credentials.username
        if isinstance(raw_name, str):
            raw_name = raw_name.encode("utf-8")
        try:
            username: str | None = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            username = None
        entry = users.get(username) if username is not None else None
        stored = entry.password if entry is not None else self._dummy
        password = credentials.password
        if isinstance(password, str):
            password = password.encode("utf-8")
        def decide(ok: bool) -> AvatarId:
            if entry is None:  # same hash paid as for a known user; the cache may remember it
                raise UnknownUser("unknown user")
            if not ok:
                raise UnauthorizedLogin("wrong password")
            return raw_name

        def trouble(f: Failure) -> Failure:
            if f.check(UnauthorizedLogin):
                return f
            if f.check(PasswordError) and entry is not None:
                log.error("{file}:{line}: stored password unusable: {why}", file=self.path,
                          line=entry.line, why=str(f.value))
                return Failure(UnauthorizedLogin("stored password unusable"))
            log.error("backend {name}: password verification failed: {why}", name=self.name,
                      why=type(f.value).__name__)
            return Failure(TemporaryFailure("password verification failed"))

        if not stored.expensive:  # {PLAIN} and the like: decided here, no callback hops
            try:
                return succeed(decide(_verify(stored, password, username)))
            except Exception:
                return fail(trouble(Failure()))
        d = maybeDeferred(self._runner.run, _verify, stored, password, username)
        decided: Deferred[AvatarId] = d.addCallback(decide)
        return decided.addErrback(trouble)

    # ---- ISecretSource ---------------------------------------------------------------

    def secret_kinds(self) -> frozenset[str]:
        """All kinds a passwd-file can hold (the file may change at any time)."""
        return SECRET_KINDS

    def lookup_secret(self, username: str, kinds: tuple[str, ...]) -> "Deferred[Secret | None]":
        """The user's stored secret of the first wanted kind it has, or ``None``."""
        try:
            users = self.users()
        except TemporaryFailure:
            return fail()
        entry = users.get(username)
        if entry is None:
            return succeed(None)
        available = self._secrets.get(username)
        if available is None:  # decoded once per user and file version (SCRAM: base64)
            available = self._secrets[username] = passwords.stored_secrets(entry.password)
        for kind in kinds:
            if kind in available:
                return succeed(Secret(kind, available[kind]))
        log.warn("{file}:{line}: user {user!r} cannot log in with this mechanism: its"
                 " {{{scheme}}} hash cannot serve it (it needs one of: {kinds})",
                 file=self.path, line=entry.line, user=username, scheme=entry.password.scheme,
                 kinds=", ".join(kinds))
        return succeed(None)


@dataclass(frozen=True)
class FileOptions(Options):
    """``[backends.NAME] type = "file"``: the passwd-file and the scheme of bare hashes."""

    path: str = field(default="", metadata=PATH)
    default_scheme: str = "CRYPT"

    def check(self) -> Iterable[OptionProblem]:
        if not self.path:
            return [OptionProblem("path", "is required")]
        return file_problem("path", self.path) + _scheme_problem(self.default_scheme)


def _scheme_problem(scheme: str) -> list[OptionProblem]:
    try:
        passwords.parse_password("{%s}x" % scheme)
    except passwords.UnknownScheme:
        return [OptionProblem("default_scheme", f"unknown scheme {scheme!r}")]
    except PasswordError:
        pass  # the scheme exists; "x" is just not valid data for it
    return []


def from_config(name: str, options: FileOptions, deps: Any) -> FileChecker:
    """Build the checker for a ``[backends.NAME]`` table of ``type = "file"``."""
    return FileChecker(options.path, deps.hash_runner, options.default_scheme, name=name)
