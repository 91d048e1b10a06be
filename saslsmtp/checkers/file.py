"""The ``file`` backend: a Dovecot passwd-file of users and password hashes.

Format (one user a line, as Dovecot's passwd-file)::

    # comment
    user:{SCHEME}hash[:uid:gid:gecos:home:shell:extra_fields]

Blank lines and lines starting with ``#`` are ignored.  A bare hash (no ``{SCHEME}``)
uses ``default_scheme`` (Dovecot's default: ``CRYPT``).  User names are compared
exactly, as Dovecot does by default.  uid, gid, gecos, home and shell are not used.

* **Extra fields** (everything after the shell field, ``key=value`` separated by spaces,
  as Dovecot's ``db-passwd-file.c`` reads them): ``nologin`` (with ``reason=``),
  ``allow_nets=`` and ``nopassword`` are honoured (``Access``); ``fail``,
  ``noauthenticate`` and ``allow_real_nets`` restrict a login in ways saslsmtp cannot
  check, so their user is refused; every other key (``userdb_*``, ``proxy``, ``nodelay``
  ...) is ignored and listed by ``ignored_fields_warning`` (``--check``).  Dovecot checks
  them after the password, and so does this backend: a refused login costs what any
  login costs and, unless the line gives a ``reason``, answers what a wrong password
  answers.  For CRAM-MD5 and SCRAM (``lookup_secret``, asked with the session) the secret
  comes with a ``Secret.refusal`` that the exchange answers once the password is proved;
  a ``nopassword`` user has no secret for them and cannot use them.

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

import hashlib
import ipaddress
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
from saslsmtp.checkers.fieldvars import FieldTemplate
from saslsmtp.checkers.secrets import ISecretSource
from saslsmtp.credentials import AvatarId
from saslsmtp.errors import AuthRejected, TemporaryFailure, UnknownUser
from saslsmtp.options import PATH, OptionProblem, Options, file_problem
from saslsmtp.mechanisms import builtin_mechanisms
from saslsmtp.octets import config_lines
from saslsmtp.passwords import PasswordError, StoredPassword
from saslsmtp.sasl.outcome import Refusal, Reject, Secret, Session
from saslsmtp.threads import BlockingRunner

log = Logger()

#: Every kind a passwd-file can hold ({PLAIN}, {CRAM-MD5}, {SCRAM-SHA-1}, {SCRAM-SHA-256}).
SECRET_KINDS = frozenset({"plaintext", "cram-md5", "scram-sha-1", "scram-sha-256"})

#: Dummy for an empty file: SHA512-CRYPT, 100000 rounds (saslsmtp-passwd's default),
#: of a random password nobody knows.
FALLBACK_DUMMY = ("{SHA512-CRYPT}$6$rounds=100000$96Clan1Hld9/kGjp$jpITHQKSWj4H5tTbvlMaiFv6j/2ZP2w"
                  "yg0vOPLcJGtOAAwdfggQ1GVHdBHmrK3WrhwLH73b1mZzCbOfm7zcFN.")


#: Extra fields that restrict a login in a way saslsmtp cannot check: their user is refused.
UNCHECKABLE_FIELDS = frozenset({"fail", "noauthenticate", "allow_real_nets"})
#: Extra fields this backend reads (``Access``).
HONOURED_FIELDS = frozenset({"nologin", "reason", "allow_nets", "nopassword"})

@dataclass(frozen=True)
class Access:
    """What a line's extra fields say about who may log in, after the password (Dovecot's
    passdb extra fields).  ``allow_nets`` ``None``: from anywhere; ``local``: from a
    connection without an IP address (Dovecot's keyword)."""

    nologin: bool = False
    reason: str | None = None
    allow_nets: tuple[Any, ...] | None = None
    local: bool = False
    nopassword: bool = False
    uncheckable: tuple[str, ...] = ()  # fields in UNCHECKABLE_FIELDS: refused

    @property
    def restricted(self) -> bool:
        """Whether a login needs more than the password."""
        return self.nologin or self.allow_nets is not None or self.nopassword or bool(self.uncheckable)

    def network_allows(self, remote_ip: str) -> bool:
        """Whether ``remote_ip`` (``""``: no IP address) is in ``allow_nets``; an IPv6-mapped
        IPv4 address is matched as the IPv4 address, as Dovecot does."""
        if self.allow_nets is None:
            return True
        if not remote_ip:
            return self.local
        try:
            address = ipaddress.ip_address(remote_ip.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in net for net in self.allow_nets)


NO_RESTRICTION = Access()

#: A login the extra fields refuse answers this, unless a ``nologin`` gives a ``reason``.
WRONG_PASSWORD = Reject()


@dataclass(frozen=True)
class UserEntry:
    """One usable line: the user name, its parsed password (``None``: ``nopassword``),
    where it came from, and what its extra fields restrict."""

    username: str
    password: StoredPassword | None = field(repr=False)
    line: int
    access: Access = NO_RESTRICTION


@dataclass(frozen=True)
class ParsedUsers:
    """The usable entries of a users file, ``(line, problem)`` for every skipped line,
    ``(line, warning)`` for a usable line that may surprise (``nopassword``), and the
    extra fields that were ignored, each with the lines that have it."""

    users: Mapping[str, UserEntry]
    problems: tuple[tuple[int, str], ...]
    warnings: tuple[tuple[int, str], ...] = ()
    ignored: Mapping[str, tuple[int, ...]] = field(default_factory=dict)


def _networks(value: str) -> tuple[tuple[Any, ...], bool]:
    """``allow_nets``' networks (commas or spaces between them) and whether ``local`` is
    one; ``ValueError`` names an entry that is neither an address nor a network."""
    nets: list[Any] = []
    local = False
    for item in value.replace(",", " ").split():
        if item == "local":
            local = True
            continue
        try:
            net = ipaddress.ip_network(item, strict=False)  # host bits allowed, as Dovecot
        except ValueError:
            raise ValueError(f"allow_nets: {item!r} is not an address or network") from None
        if isinstance(net, ipaddress.IPv6Network) and net.network_address.ipv4_mapped is not None \
                and net.prefixlen >= 96:
            net = ipaddress.ip_network(f"{net.network_address.ipv4_mapped}/{net.prefixlen - 96}")
        nets.append(net)
    if not nets and not local:
        raise ValueError("allow_nets is empty: nobody could log in")
    return tuple(nets), local


def _extra_fields(text: str) -> tuple[dict[str, str], list[str]]:
    """``key=value`` pairs of the extra fields (a key without ``=`` has the value ``""``)
    and the keys nobody reads here."""
    found: dict[str, str] = {}
    ignored: list[str] = []
    for item in text.split():
        key, _, value = item.partition("=")
        found.setdefault(key, value)
        if key not in HONOURED_FIELDS and key not in UNCHECKABLE_FIELDS and key not in ignored:
            ignored.append(key)
    return found, ignored


def _access(fields: dict[str, str]) -> Access:
    nets, local = _networks(fields["allow_nets"]) if "allow_nets" in fields else (None, False)
    return Access(nologin="nologin" in fields, reason=fields.get("reason") or None,
                  allow_nets=nets, local=local, nopassword="nopassword" in fields,
                  uncheckable=tuple(sorted(UNCHECKABLE_FIELDS & fields.keys())))


def _reason_text(reason: str, user: str, remote_ip: str, local_ip: str) -> str:
    """``reason`` with Dovecot's variables filled in; as written when one is unknown
    (a load warning said so)."""
    try:
        return FieldTemplate.parse(reason).expand(user, remote_ip, local_ip)
    except ValueError:
        return reason


def _has_password(users: Mapping[str, UserEntry]) -> bool:
    return any(entry.password is not None for entry in users.values())


def salt_key_of(stored: StoredPassword) -> bytes:
    """``FileChecker.salt_key`` made from ``stored`` (the dummy's password)."""
    return hashlib.sha256(b"saslsmtp scram salt key\0" + stored.scheme.encode("utf-8")
                          + b"\0" + stored.raw).digest()


def salt_key_source(checkers: Iterable[Any]) -> Callable[[], bytes | None] | None:
    """The first users file's ``salt_key`` among ``checkers`` (for ``builtin_mechanisms``),
    or ``None``."""
    return next((c.salt_key for c in checkers if isinstance(c, FileChecker)), None)


def _empty_password(secret: str) -> bool:
    """An empty password field, or a ``{SCHEME}`` with no data (what ``nopassword`` wants)."""
    return not secret or (secret.startswith("{") and secret.endswith("}") and "}" not in secret[:-1])


def parse_users(data: bytes, default_scheme: str = "CRYPT") -> ParsedUsers:
    """Parse passwd-file bytes.  Problems name the line, never its content."""
    users: dict[str, UserEntry] = {}
    problems: list[tuple[int, str]] = []
    warnings: list[tuple[int, str]] = []
    ignored: dict[str, list[int]] = {}
    for number, line in config_lines(data, problems):
        user, sep, rest = line.partition(":")
        if not sep:
            problems.append((number, "no ':' (want user:{SCHEME}password)"))
            continue
        if not user:
            problems.append((number, "empty user name"))
            continue
        columns = rest.split(":")
        secret = columns[0]
        fields, unused = _extra_fields(":".join(columns[6:]))  # after uid:gid:gecos:home:shell
        try:
            access = _access(fields)
        except ValueError as e:
            problems.append((number, str(e)))
            continue
        stored: StoredPassword | None = None
        if access.nopassword and access.allow_nets is None:
            problems.append((number, f"user {user!r}: nopassword without allow_nets would let"
                                     " anyone who knows the name send mail (add allow_nets=)"))
            continue
        if access.nopassword and not _empty_password(secret):
            # Dovecot: "nopassword set but password is non-empty", and it checks the password
            warnings.append((number, f"user {user!r}: nopassword ignored: the password field"
                                     " is not empty (the password is checked)"))
            access = Access(access.nologin, access.reason, access.allow_nets, access.local,
                            False, access.uncheckable)
        if not access.nopassword:
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
        if access.reason:
            try:
                FieldTemplate.parse(access.reason)  # Dovecot's %u, %%...: filled in at the refusal
            except ValueError as e:
                warnings.append((number, f"user {user!r}: reason: {e}; it is shown as written"))
        if access.nopassword:
            warnings.append((number, f"user {user!r} logs in with any password (nopassword)"
                                     " from allow_nets"))
        if access.uncheckable:
            warnings.append((number, f"user {user!r} is refused: saslsmtp cannot check"
                                     f" {', '.join(access.uncheckable)}"))
        for key in unused:
            ignored.setdefault(key, []).append(number)
        users[user] = UserEntry(user, stored, number, access)
    return ParsedUsers(users, tuple(problems), tuple(warnings),
                       {key: tuple(lines) for key, lines in ignored.items()})


def ignored_fields_warning(parsed: ParsedUsers) -> str | None:
    """One line naming every extra field the file has that this backend ignores (with
    its first line and how many lines have it), or ``None``."""
    if not parsed.ignored:
        return None
    named = ", ".join(f"{key} (line {lines[0]}" + (f" and {len(lines) - 1} more)" if len(lines) > 1 else ")")
                      for key, lines in sorted(parsed.ignored.items()))
    return f"extra fields ignored (saslsmtp does not use them): {named}"


def load_warnings(parsed: ParsedUsers, mechanisms: Iterable[str]) -> list[str]:
    """Everything ``--check`` says about a users file that works but may surprise: each
    line's warning, the ignored extra fields, announced mechanisms some users cannot use."""
    out = [f"line {line}: {warning}" for line, warning in parsed.warnings]
    ignored = ignored_fields_warning(parsed)
    if ignored:
        out.append(ignored)
    return out + coverage_warnings(parsed.users, mechanisms)


def pick_dummy(users: Mapping[str, UserEntry]) -> StoredPassword:
    """The stored password an unknown user is verified against (see the module doc)."""
    users = {name: entry for name, entry in users.items() if entry.password is not None}
    if not users:
        return passwords.parse_password(FALLBACK_DUMMY)
    keys = {name: passwords.cost_key(entry.password) for name, entry in users.items()
            if entry.password is not None}
    common, _ = Counter(keys.values()).most_common(1)[0]
    first = min((e for n, e in users.items() if keys[n] == common), key=lambda e: e.line)
    assert first.password is not None  # (entries without one were left out above)
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
                       if entry.password is None or entry.access.nopassword
                       or not kinds & passwords.stored_secrets(entry.password).keys())
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
        self._salt_key: bytes | None = None

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
        for line, warning in parsed.warnings:
            log.warn("{file}:{line}: {warning}", file=self.path, line=line, warning=warning)
        ignored = ignored_fields_warning(parsed)
        if ignored:
            log.info("{file}: {ignored}", file=self.path, ignored=ignored)
        self._users = parsed.users
        self._secrets = {}
        self._dummy = pick_dummy(parsed.users)
        self._salt_key = salt_key_of(self._dummy) if _has_password(parsed.users) else None
        self._signature = signature
        log.info("backend {name}: loaded {count} users from {file}", name=self.name,
                 count=len(parsed.users), file=self.path)
        return self._users

    def salt_key(self) -> bytes | None:
        """The key SCRAM derives salts with (an unknown user's, a ``{PLAIN}`` entry's),
        ``None`` until the file was read or when no line has a password.  Made from the
        stored password an unknown user is checked against: every worker and the server
        after a restart derive the same salts, and nobody without the file can compute
        them (a per-process key let an unknown user's salt change from one connection to
        the next while a stored SCRAM verifier's stayed: a way to tell them apart).
        It changes only when that line's password does.  No I/O: read after the lookup,
        maybe in a thread."""
        return self._salt_key

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
        # nopassword: any password, but the dummy's hash is paid all the same
        stored = entry.password if entry is not None and entry.password is not None else self._dummy
        password = credentials.password
        if isinstance(password, str):
            password = password.encode("utf-8")
        def decide(ok: bool) -> AvatarId:
            if entry is None:  # same hash paid as for a known user; the cache may remember it
                raise UnknownUser("unknown user")
            if not (ok or entry.access.nopassword):
                raise UnauthorizedLogin("wrong password")
            if entry.access.restricted:
                session = getattr(credentials, "session", None)
                refusal = self._refusal(entry, session)
                if refusal is not None:
                    log.info("{why}", why=refusal.why, file=self.path, line=entry.line,
                             user=entry.username)
                    if refusal.reply is not WRONG_PASSWORD:  # nologin's reason
                        raise AuthRejected(refusal.reply)
                    raise UnauthorizedLogin("refused by the users file's extra fields")
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

    def _refusal(self, entry: UserEntry, session: Session | None) -> Refusal | None:
        """What the extra fields say to ``entry``'s right password from ``session``'s
        client (no session or no IP address: ``local``): refused logins answer like a
        wrong password (535 5.7.8), except ``nologin`` with a ``reason``, which the user is
        meant to read (525 5.7.13 User Account Disabled, with the reason, its Dovecot
        variables filled in)."""
        access = entry.access
        remote_ip = getattr(session, "remote_ip", "") or ""
        if access.uncheckable:
            why = f"{', '.join(access.uncheckable)} cannot be checked here"
        elif access.nologin:
            why = "nologin"
        elif not access.network_allows(remote_ip):
            why = f"client {remote_ip or '(no IP address)'} not in allow_nets"
        else:
            return None
        reply = WRONG_PASSWORD
        if access.nologin and access.reason and not access.uncheckable:
            reason = _reason_text(access.reason, entry.username, remote_ip,
                                  getattr(session, "local_ip", "") or "")
            reply = Reject(reason, code=525, enhanced="5.7.13")
        return Refusal(reply, f"{self.path}:{entry.line}: user {entry.username!r} refused: {why}")

    def cache_scope(self, credentials: IUsernamePassword) -> object:
        """What this file's verdict for ``credentials`` depends on besides the user, the
        password and the file (``generation``): for a user with ``allow_nets``, whether the
        client's address is in them.  The auth cache keys its entries with it, so a
        success from an allowed network is never reused for a client outside them."""
        try:
            users = self.users()
        except TemporaryFailure:
            return None
        raw = credentials.username
        name = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        entry = users.get(name)
        if entry is None or entry.access.allow_nets is None:
            return None
        session = getattr(credentials, "session", None)
        return ("allow_nets", entry.access.network_allows(getattr(session, "remote_ip", "") or ""))

    # ---- ISecretSource ---------------------------------------------------------------

    def secret_kinds(self) -> frozenset[str]:
        """All kinds a passwd-file can hold (the file may change at any time)."""
        return SECRET_KINDS

    def lookup_secret(self, username: str, kinds: tuple[str, ...],
                      session: Session | None = None) -> "Deferred[Secret | None]":
        """The user's stored secret of the first wanted kind it has, or ``None``; for a
        user the extra fields refuse to ``session``'s client (``None``: no IP address, as
        Dovecot's ``local``), with the ``Refusal`` the exchange answers once the password
        is proved.  A ``nopassword`` user has no secret."""
        try:
            users = self.users()
        except TemporaryFailure:
            return fail()
        entry = users.get(username)
        if entry is None:
            return succeed(None)
        if entry.password is None or entry.access.nopassword:
            log.warn("{file}:{line}: user {user!r} cannot log in with this mechanism: it has"
                     " no password (nopassword), so no secret to prove one with; PLAIN and"
                     " LOGIN serve it", file=self.path, line=entry.line, user=username)
            return succeed(None)
        refusal = None
        if entry.access.restricted:
            refusal = self._refusal(entry, session)
        available = self._secrets.get(username)
        if available is None:  # decoded once per user and file version (SCRAM: base64)
            available = self._secrets[username] = passwords.stored_secrets(entry.password)
        for kind in kinds:
            if kind in available:
                return succeed(Secret(kind, available[kind], refusal))
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
