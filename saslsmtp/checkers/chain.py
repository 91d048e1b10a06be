"""The backend chain: the first backend that accepts wins.

None accepts and at least one failed temporarily -> ``TemporaryFailure`` (454 4.7.0);
every one rejected -> the first ``AuthRejected`` a backend gave (its own reply: a users
file's ``nologin`` with a ``reason``), else ``UnauthorizedLogin`` (535 5.7.8).
"""

from __future__ import annotations

import contextvars
from typing import Any, Sequence

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from saslsmtp.credentials import AuthenticatedIdentity, AvatarId, IAuthenticatedIdentity
from saslsmtp.errors import AuthRejected, TemporaryFailure, UnknownUser
from saslsmtp.redact import scrub, scrubbed_failure

log = Logger()


@implementer(ICredentialsChecker)
class BackendChain:
    """Tries named checkers in order for ``IUsernamePassword`` credentials."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, backends: Sequence[tuple[str, ICredentialsChecker]]) -> None:
        self.backends = list(backends)

    def generation(self) -> object:
        """The backends' ``generation()`` (those that have one: the users files), for the
        auth cache; ``None`` when no backend can say when its data changed."""
        versions = [getattr(checker, "generation", None) for _, checker in self.backends]
        found = tuple(version() for version in versions if callable(version))
        return found or None

    def cache_scope(self, credentials: IUsernamePassword) -> object:
        """The backends' ``cache_scope(credentials)`` (a users file's ``allow_nets``
        verdict for this client), for the auth cache; ``None`` when no backend's verdict
        depends on more than the user, the password and its data."""
        scopes = [getattr(checker, "cache_scope", None) for _, checker in self.backends]
        found = tuple(scope(credentials) for scope in scopes if callable(scope))
        return found if any(part is not None for part in found) else None

    def requestAvatarId(self, credentials: IUsernamePassword) -> "Deferred[AvatarId]":
        # Plain callbacks, not inlineCallbacks: a backend that answers at once (a users
        # file entry) costs no generator and no extra Deferred per login.
        return _ChainAttempt(self.backends, credentials).next()


class _ChainAttempt:
    """One walk down the chain for one set of credentials."""

    def __init__(self, backends: Sequence[tuple[str, ICredentialsChecker]],
                 credentials: IUsernamePassword) -> None:
        self.backends = backends
        self.credentials = credentials
        self.index = 0
        self.temporary = False
        self.unknown = bool(backends)  # every backend said "no such user" (auth cache)
        self.rejected: AuthRejected | None = None  # the first backend's own refusal
        # A later backend is asked from a callback, maybe after a thread's answer: it runs
        # in the caller's context (the fair hashing pool's client key lives there).
        self.context = contextvars.copy_context()
        self._entered = False

    def next(self) -> "Deferred[AvatarId]":
        if self._entered:
            return self._ask_next()
        self._entered = True
        try:
            return self.context.run(self._ask_next)
        finally:
            self._entered = False

    def _ask_next(self) -> "Deferred[AvatarId]":
        if self.index >= len(self.backends):
            return fail(self._verdict())
        name, checker = self.backends[self.index]
        self.index += 1
        d: Deferred[AvatarId] = maybeDeferred(checker.requestAvatarId, self.credentials)
        return d.addErrback(self._failed, name, checker)

    def _failed(self, failure: Failure, name: str, checker: ICredentialsChecker) -> Any:
        if failure.check(UnknownUser):
            return self.next()
        self.unknown = False
        if failure.check(UnauthorizedLogin):
            if self.rejected is None and isinstance(failure.value, AuthRejected):
                self.rejected = failure.value
            return self.next()
        self.temporary = True
        # any checker may be plugged in here: whatever its messages say, not the password
        secrets = [self.credentials.password]
        if failure.check(TemporaryFailure):
            # a backend with an OutageLog reports its outages itself (warn once, then
            # recovery); this per-login line is for the others
            level = log.debug if hasattr(checker, "outages") else log.info
            level("backend {name} failed temporarily: {why}", name=name,
                  why=scrub(str(failure.value), secrets))
        else:
            log.failure("backend {name} raised an unexpected error",
                        scrubbed_failure(failure, secrets), name=name)
        return self.next()

    def _verdict(self) -> Exception:
        if self.temporary:
            return TemporaryFailure("no backend accepted and at least one failed temporarily")
        if self.rejected is not None:
            return self.rejected
        if self.unknown:
            return UnknownUser("no backend knows the user")
        return UnauthorizedLogin("no backend accepted the credentials")


@implementer(ICredentialsChecker)
class TrustedIdentityChecker:
    """Turns an ``AuthenticatedIdentity`` (an exchange that proved itself) into an avatar id."""

    credentialInterfaces = (IAuthenticatedIdentity,)

    def requestAvatarId(self, credentials: AuthenticatedIdentity) -> "Deferred[AvatarId]":
        return maybeDeferred(lambda: credentials.username)
