"""saslsmtp as a library: mechanisms, an AUTH script and checkers for your own Twisted server.

The stable public surface (``__all__``, listed in docs/library.md; a test fails if a name
disappears).  Everything here builds what the daemon builds from its TOML file, from
keyword arguments instead, and checks it by the same rules::

    users = embed.file_checker(reactor, path="users.passwd")
    script = embed.auth_script("auth.py", clock=reactor, backends={"users": users})
    chal = embed.challengers(["PLAIN", "CRAM-MD5", "X-WHO"], script=script, secrets=[users])
    server = twisted.mail.smtp.ESMTP(chal)       # or twisted.mail.imap4.IMAP4Server(chal)
    server.portal = embed.portal(realm, [users])

Nothing here imports the global reactor: the reactor (or a clock) is always passed in.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, cast

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.portal import IRealm, Portal

from saslsmtp.adapter import ExchangeChecker, MechanismAdapter, challengers as _challengers
from saslsmtp.auth import Resolver
from saslsmtp.checkers.chain import BackendChain, TrustedIdentityChecker
from saslsmtp.checkers.registry import BACKEND_TYPES, BackendDeps, checker_from_options
from saslsmtp.checkers.secrets import ISecretSource, ITokenValidator
from saslsmtp.config import ConfigError
from saslsmtp.engine_settings import not_one_name
from saslsmtp.mechanisms import builtin_mechanisms
from saslsmtp.options import OptionProblem, OptionsError
from saslsmtp.resolver import secret_resolver
from saslsmtp.sasl import scram
from saslsmtp.sasl.mechanism import Mechanism, MechanismSpec
from saslsmtp.sasl.outcome import Session
from saslsmtp.script import (AuthScript, Backends, ScriptPasswordChecker, ScriptRunner,
                             load_script, scripted_spec)
from saslsmtp.threads import BlockingRunner, ThreadPoolRunner

from saslsmtp import checkers as kinds  # the builders' return types: kinds.KIND.Class

if TYPE_CHECKING:  # at run time a kind's module is imported when one is built, or when
    # typing.get_type_hints resolves kinds.KIND (saslsmtp.checkers imports it on access)
    import saslsmtp.checkers.dovecot
    import saslsmtp.checkers.file
    import saslsmtp.checkers.http
    import saslsmtp.checkers.ldap
    import saslsmtp.checkers.ldaptwisted
    import saslsmtp.checkers.oauth2
    import saslsmtp.checkers.smtp

__all__ = [
    "STOCK_MECHANISMS", "challengers", "portal", "exchange_checkers", "submission_auth",
    "SubmissionAuth", "Resolver", "auth_script", "script_password_checker",
    "checker", "file_checker", "ldap_checker", "smtp_checker", "http_checker",
    "dovecot_checker", "oauth2_checker", "thread_pool", "OptionsError", "ConfigError",
    "MechanismAdapter", "ScriptRunner", "ISecretSource", "ITokenValidator", "mechanism",
    "scram_keys",
]

#: The built-in mechanisms a stock Twisted protocol can run.  The others need what only
#: ``SubmissionESMTP`` gives a mechanism: TLS facts (OAUTHBEARER, XOAUTH2 and the -PLUS
#: variants) or the client certificate (EXTERNAL).
STOCK_MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-1", "SCRAM-SHA-256")


def _mechanism_items(mechanisms: Iterable[str | MechanismSpec]) -> list[str | MechanismSpec]:
    """``mechanisms`` as a list, each a name or a ``MechanismSpec``: one string is not a
    list of names (it would be read letter by letter: "P is not built in")."""
    not_one_name(mechanisms, "mechanisms")
    items = list(mechanisms)
    for item in items:
        if not isinstance(item, (str, MechanismSpec)):
            raise TypeError("mechanisms: each item must be a name (str) or a MechanismSpec,"
                            f" not {type(item).__name__}")
    return items


def _providing(items: Iterable[Any], what: str, fits: Callable[[Any], bool], needs: str,
               example: str, wrong_item: type[Exception] = ValueError) -> list[Any]:
    """``items`` as a list of objects that ``fits``: one object passed where a list was
    meant is a ``TypeError``, an item that does not fit ``wrong_item``; both name the
    argument."""
    if fits(items) or isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise TypeError(f"{what} must be a list ({what}=[{example}]), not"
                        f" {type(items).__name__}")
    given = list(items)
    for item in given:
        if not fits(item):
            raise wrong_item(f"{what}: every item must be a checker that provides {needs}"
                             f" ({example}), not {type(item).__name__}")
    return given


def _is_checker(item: Any) -> bool:
    """What ``Portal`` needs of a checker (it does not ask for ``@implementer``)."""
    return hasattr(item, "credentialInterfaces") and callable(
        getattr(item, "requestAvatarId", None))


def challengers(mechanisms: Iterable[str | MechanismSpec], *, script: ScriptRunner | None = None,
                secrets: Iterable[Any] = (), hostname: str = "localhost",
                pool: BlockingRunner | None = None) -> dict[bytes, Callable[[], MechanismAdapter]]:
    """The ``chal`` argument of ``twisted.mail.smtp.ESMTP`` and ``imap4.IMAP4Server``.

    ``mechanisms``: names (announced in this order) or your own ``MechanismSpec``s.  A name
    is a built-in from ``STOCK_MECHANISMS``, or served by ``script``, as in the daemon: every
    name that is not built in, and a built-in only when the script's ``MECHANISMS`` names
    it.  ``secrets``: checkers that can hand out stored secrets (``file_checker``): CRAM-MD5
    and SCRAM need one.  ``hostname`` goes into the CRAM-MD5 challenge.  ``pool`` runs
    SCRAM's PBKDF2 for ``{PLAIN}`` entries (that step is then asynchronous, which a stock
    protocol cannot wait for in the middle of an exchange: store SCRAM secrets instead).
    Anything that cannot work raises ``ValueError`` naming the mechanism; arguments of
    the wrong type (one string for the list, one checker for ``secrets``) ``TypeError``.
    """
    specs: list[MechanismSpec] = []
    items = _mechanism_items(mechanisms)
    names = [m.name if isinstance(m, MechanismSpec) else m.upper() for m in items]
    builtins = builtin_mechanisms(names)
    sources = _providing(secrets, "secrets", ISecretSource.providedBy, "ISecretSource",
                         "file_checker(...)")
    declared = script.script.mechanisms if script is not None else None
    for item in items:
        if isinstance(item, MechanismSpec):
            specs.append(item)
            continue
        name = item.upper()
        scripted = script is not None and (
            name in declared if declared is not None else name not in builtins)
        if scripted:
            specs.append(scripted_spec(name, script))  # type: ignore[arg-type]
            continue
        if name not in builtins:
            raise ValueError(f"{name} is not built in and no script serves it"
                             + (f" (its MECHANISMS: {', '.join(sorted(declared))})"
                                if declared is not None else ""))
        if name not in STOCK_MECHANISMS:
            raise ValueError(f"{name} cannot run in a stock Twisted protocol (it needs TLS facts"
                             " or a client certificate): use SubmissionESMTP")
        spec = builtins[name]
        kinds = set(spec.secret_kinds)
        if kinds and not any(kinds & set(s.secret_kinds()) for s in sources):
            raise ValueError(f"{name} needs a stored secret: pass secrets=[file_checker(...)]")
        specs.append(spec)
    return _challengers(specs, hostname, resolver=secret_resolver(sources) if sources else None,
                        blocking=pool)


def portal(realm: IRealm, checkers: Iterable[ICredentialsChecker] = (), *,
           script: ScriptRunner | None = None) -> Portal:
    """A ``Portal`` for ``realm`` that serves every exchange ``challengers`` can end in.

    Password checkers (``IUsernamePassword``: ours or Twisted's) are asked in order, the
    first that accepts wins (like ``auth.backends``); other checkers are added as they are.
    With ``script``, PLAIN and LOGIN (and IMAP's ``LOGIN`` command) are decided by the
    script's ``auth()`` instead, as in the daemon: give it the checkers as ``backends``.
    Added: ``TrustedIdentityChecker`` (a mechanism or the script accepted someone) and
    ``ExchangeChecker`` (an exchange failed, or its last step was asynchronous).
    """
    given: list[Any] = _providing(
        checkers, "checkers", _is_checker, "ICredentialsChecker", "file_checker(...)", TypeError)
    passwords = [c for c in given if IUsernamePassword in tuple(c.credentialInterfaces)]
    others = [c for c in given if IUsernamePassword not in tuple(c.credentialInterfaces)]
    if script is not None and passwords:
        raise ValueError("with script=, PLAIN and LOGIN go to the script: pass the password"
                         " checkers to auth_script(backends=...) instead")
    chain: list[Any] = []
    if script is not None:
        chain.append(ScriptPasswordChecker(script))
    elif passwords:
        chain.append(passwords[0] if len(passwords) == 1 else BackendChain(
            [(getattr(c, "name", str(i)), c) for i, c in enumerate(passwords)]))
    return Portal(realm, [*chain, *others, *exchange_checkers()])


def exchange_checkers() -> list[ICredentialsChecker]:
    """What a mechanism's outcome logs in with, for a ``Portal`` of your own (``portal``
    adds them): ``TrustedIdentityChecker`` (a mechanism or the script accepted someone:
    your realm still gets the login) and ``ExchangeChecker`` (a stock protocol's exchange
    failed, or its last step was asynchronous).  Without them a stock protocol answers
    such a login with a 451 and logs ``UnhandledCredentials: No checker for ...``."""
    return [TrustedIdentityChecker(), ExchangeChecker()]


@dataclass(frozen=True)
class SubmissionAuth:
    """What ``SubmissionESMTP`` needs for AUTH, checked by ``submission_auth``: pass each
    field to the keyword of the same name, and ``names`` as ``EngineSettings.mechanisms``."""

    mechanisms: Mapping[str, MechanismSpec]
    resolver: Resolver
    blocking: BlockingRunner | None = None

    @property
    def names(self) -> tuple[str, ...]:
        """The mechanisms in the order given: what EHLO announces."""
        return tuple(self.mechanisms)


def mechanism(name: str, session: Session | None = None) -> Mechanism:
    """A fresh built-in mechanism (``PLAIN``, ``CRAM-MD5``, ``SCRAM-SHA-256`` ...) for one
    exchange, to drive yourself in any protocol: ``start``, ``receive`` and ``resume``
    return outcomes (``saslsmtp.sasl.outcome``); answer a ``Verify`` by checking the
    password, a ``Lookup`` with ``resume(Secret(kind, value))`` or ``resume(None)`` (no
    such user).  ``session``: what the mechanism may know of the connection (its
    ``hostname`` goes into CRAM-MD5's challenge).  ``ValueError`` for a name that is not
    built in."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a mechanism name (str), not {type(name).__name__}")
    if session is not None and not isinstance(session, Session):
        raise TypeError(f"session must be a Session, not {type(session).__name__}")
    spec = builtin_mechanisms([name.upper()]).get(name.upper())
    if spec is None:
        raise ValueError(f"{name} is not built in (built in:"
                         f" {', '.join(sorted(builtin_mechanisms()))})")
    return cast(Mechanism, spec.factory(session if session is not None else Session()))


def scram_keys(password: str, mechanism: str = "SCRAM-SHA-256", *, salt: bytes | None = None,
               iterations: int = scram.DEFAULT_ITERATIONS) -> tuple[int, bytes, bytes, bytes]:
    """What to store for SCRAM instead of the password: ``(iterations, salt, stored_key,
    server_key)``, the value of ``Secret("scram-sha-256", ...)`` (``"scram-sha-1"`` for
    SCRAM-SHA-1) that a ``Lookup`` is answered with.  ``salt``: 16 random bytes unless
    given.  PBKDF2 takes about a millisecond at 4096 iterations: compute it when the
    password is set, not at login."""
    base = mechanism.upper().removesuffix("-PLUS") if isinstance(mechanism, str) else mechanism
    if base not in scram.HASHES:
        raise ValueError(f"mechanism must be one of {', '.join(scram.HASHES)}, not {mechanism!r}")
    if not isinstance(password, str):
        raise TypeError(f"password must be a str, not {type(password).__name__}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be a positive int, not {iterations!r}")
    if salt is None:
        salt = os.urandom(16)
    elif not isinstance(salt, bytes) or not salt:
        raise TypeError("salt must be non-empty bytes")
    return scram.derive_keys(scram.HASHES[base][0], password, salt, iterations).as_tuple()


def submission_auth(mechanisms: Iterable[str | MechanismSpec], *,
                    script: ScriptRunner | None = None, secrets: Iterable[Any] = (),
                    tokens: Iterable[Any] = (), pool: BlockingRunner | None = None
                    ) -> SubmissionAuth:
    """The mechanisms, secret and token resolver of ``saslsmtp.protocol.SubmissionESMTP``.

    As ``challengers``, but every built-in works (``SubmissionESMTP`` gives a mechanism the
    connection's TLS facts and client certificate): names are built-ins, served by
    ``script`` (every name that is not built in; a built-in when its ``MECHANISMS`` names
    it, with the TLS needs it declares) or your own ``MechanismSpec``s.  ``secrets``:
    checkers with stored secrets (``file_checker``) for CRAM-MD5 and SCRAM; ``tokens``:
    token validators (``oauth2_checker``) for OAUTHBEARER and XOAUTH2; ``pool`` runs
    SCRAM's PBKDF2 for ``{PLAIN}`` entries.  ``ValueError`` names a mechanism that could
    never succeed.  PLAIN and LOGIN go to the portal's password checkers, or to the
    script when you pass ``script=`` to ``SubmissionESMTP`` too.
    """
    items = _mechanism_items(mechanisms)
    names = [m.name if isinstance(m, MechanismSpec) else m.upper() for m in items]
    builtins = builtin_mechanisms(names)
    sources = _providing(secrets, "secrets", ISecretSource.providedBy, "ISecretSource",
                         "file_checker(...)")
    validators = _providing(tokens, "tokens", ITokenValidator.providedBy, "ITokenValidator",
                            "oauth2_checker(...)")
    declared = script.script.mechanisms if script is not None else None
    specs: dict[str, MechanismSpec] = {}
    for item, name in zip(items, names):
        if isinstance(item, MechanismSpec):
            specs[name] = item
            continue
        if script is not None and (name in declared if declared is not None
                                   else name not in builtins):
            specs[name] = script.script.spec(name, script, builtins.get(name))
            continue
        if name not in builtins:
            raise ValueError(f"{name} is not built in and no script serves it"
                             + (f" (its MECHANISMS: {', '.join(sorted(declared))})"
                                if declared is not None else ""))
        spec = builtins[name]
        kinds = set(spec.secret_kinds)
        if kinds and not any(kinds & set(s.secret_kinds()) for s in sources):
            raise ValueError(f"{name} needs a stored secret: pass secrets=[file_checker(...)]")
        if spec.token_validator and not validators:
            raise ValueError(f"{name} needs a token validator: pass tokens=[oauth2_checker(...)]")
        specs[name] = spec
    return SubmissionAuth(specs, secret_resolver(sources, validators), pool)


def auth_script(script: str | Callable[..., Any], *, clock: Any, timeout: float = 10.0,
                backends: Mapping[str, ICredentialsChecker] | None = None) -> ScriptRunner:
    """Load an AUTH script (a path, or an ``auth(arguments, context)`` callable) once.

    Call it once per server, as the daemon does at start: the module is imported here, so
    its globals are shared by every connection.  ``clock`` bounds each call to ``timeout``
    seconds; ``backends`` are what ``arguments["backends"].verify(name, ...)`` can ask.
    A path that cannot be loaded raises ``ConfigError`` (file, line, message); a
    ``timeout`` that is not a positive number is a ``ValueError`` (the daemon's
    ``auth.script_timeout`` rule: with 0 every call would answer 454), and a ``script``
    that is neither a path nor a callable a ``TypeError``.
    """
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (
            0 < timeout < math.inf):
        raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
    if not callable(getattr(clock, "callLater", None)):
        raise TypeError("clock must provide callLater (the reactor, or a task.Clock in"
                        f" tests), not {type(clock).__name__}")
    if not callable(script) and not isinstance(script, (str, os.PathLike)):
        raise TypeError("script must be a path to an AUTH script or an"
                        f" auth(arguments, context) callable, not {type(script).__name__}")
    loaded = (AuthScript(getattr(script, "__name__", "<auth>"), script, None)
              if callable(script) else load_script(str(script)))
    return ScriptRunner(loaded, clock, timeout, Backends(dict(backends or {})))


def script_password_checker(script: ScriptRunner) -> ScriptPasswordChecker:
    """PLAIN and LOGIN decided by the script, as an ``ICredentialsChecker`` for any portal.

    Credentials may carry ``str`` or UTF-8 ``bytes``; bytes that are not UTF-8 fail with
    ``UnauthorizedLogin``, any other type with ``TypeError`` (in the Deferred)."""
    return ScriptPasswordChecker(script)


def thread_pool(reactor: Any, name: str, max_threads: int = 4) -> ThreadPoolRunner:
    """A bounded, named thread pool for blocking work (hashing, ldap3), stopped when the
    reactor shuts down (or call ``stop()``).  ``max_threads`` below 1 is a ``ValueError``
    (the daemon's ``auth.hash_threads`` rule): a pool without threads never runs the work,
    and every login waiting on it would hang."""
    if isinstance(max_threads, bool) or not isinstance(max_threads, int) or max_threads < 1:
        raise ValueError(f"max_threads must be an int of at least 1, not {max_threads!r}")
    runner = ThreadPoolRunner(reactor, name, max_threads)
    _at_shutdown(reactor, runner.stop)
    return runner


def _at_shutdown(reactor: Any, stop: Callable[[], Any]) -> None:
    trigger = getattr(reactor, "addSystemEventTrigger", None)
    if trigger is not None:
        trigger("before", "shutdown", stop)


def checker(kind: str, reactor: Any, *, name: str | None = None,
            pool: BlockingRunner | None = None, **options: Any) -> ICredentialsChecker:
    """A backend checker of ``kind`` (``file``, ``ldap``, ``smtp``, ``http``, ``dovecot``,
    ``oauth2``) from the same options as its ``[backends.NAME]`` table, checked by the same
    rules: ``OptionsError`` (its ``key`` names the option) when they are wrong.

    ``reactor`` is used for time, connections and threads.  ``pool`` runs its blocking
    work (password hashing, ldap3); by default the checker gets its own bounded pool.
    Pools and connections it owns are stopped when the reactor shuts down.
    """
    if kind not in BACKEND_TYPES:
        raise OptionsError([OptionProblem("type", f"unknown backend type {kind!r} (known:"
                                                  f" {', '.join(BACKEND_TYPES)})")])
    label = name or kind
    owned: list[BlockingRunner] = []

    def make_runner(runner_name: str, max_threads: int) -> BlockingRunner:
        if pool is not None:
            return pool
        owned.append(thread_pool(reactor, runner_name, max_threads))
        return owned[-1]

    deps = BackendDeps(reactor, pool or _LazyRunner(lambda: make_runner(f"hash-{label}", 4)),
                       make_runner)
    made = checker_from_options(kind, label, deps, **options)
    stop = getattr(made, "stop", None)
    if callable(stop):
        _at_shutdown(reactor, stop)
    return made


class _LazyRunner:
    """A hashing pool made on first use (an LDAP checker never hashes)."""

    def __init__(self, make: Callable[[], BlockingRunner]) -> None:
        self._make = make
        self._runner: BlockingRunner | None = None

    def run(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self._runner is None:
            self._runner = self._make()
        return self._runner.run(f, *args, **kwargs)


# The per-kind builders return their concrete class, so that what docs/library.md shows
# (``stop()``, ``validate_token()``, ``lookup_secret()``) type-checks in the caller's code.


def file_checker(reactor: Any, *, name: str = "file", pool: BlockingRunner | None = None,
                 **options: Any) -> kinds.file.FileChecker:
    """A Dovecot passwd-file (``path``, ``default_scheme``); also a secret source."""
    return cast("kinds.file.FileChecker",
                checker("file", reactor, name=name, pool=pool, **options))


def ldap_checker(reactor: Any, *, name: str = "ldap", pool: BlockingRunner | None = None,
                 **options: Any) -> kinds.ldaptwisted.TwistedLdapChecker | kinds.ldap.LdapChecker:
    """Binds as the user (``url``, ``user_dn`` or ``search_base`` + ``search_filter``, ...);
    an ``LdapChecker`` (ldap3 in a pool) with ``client="ldap3"``."""
    return cast("kinds.ldaptwisted.TwistedLdapChecker | kinds.ldap.LdapChecker",
                checker("ldap", reactor, name=name, pool=pool, **options))


def smtp_checker(reactor: Any, *, name: str = "smtp",
                 **options: Any) -> kinds.smtp.SmtpForwardChecker:
    """Forwards the password to another SMTP server's AUTH (``host``, ``port``, ...)."""
    return cast("kinds.smtp.SmtpForwardChecker", checker("smtp", reactor, name=name, **options))


def http_checker(reactor: Any, *, name: str = "http", **options: Any) -> kinds.http.HttpChecker:
    """POSTs the credentials to an HTTP API (``url``, ``timeout``, ``headers``, ...)."""
    return cast("kinds.http.HttpChecker", checker("http", reactor, name=name, **options))


def dovecot_checker(reactor: Any, *, name: str = "dovecot",
                    **options: Any) -> kinds.dovecot.DovecotChecker:
    """Asks Dovecot's auth socket (``socket``, ``timeout``, ``service``)."""
    return cast("kinds.dovecot.DovecotChecker",
                checker("dovecot", reactor, name=name, **options))


def oauth2_checker(reactor: Any, *, name: str = "oauth2", **options: Any
                   ) -> kinds.oauth2.JwtValidator | kinds.oauth2.IntrospectionValidator:
    """Validates bearer tokens (for ``SubmissionESMTP``'s OAUTHBEARER and XOAUTH2): a
    ``JwtValidator`` (``jwks_file``, ``jwks_url``) or an ``IntrospectionValidator``."""
    return cast("kinds.oauth2.JwtValidator | kinds.oauth2.IntrospectionValidator",
                checker("oauth2", reactor, name=name, **options))
