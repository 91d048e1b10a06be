"""The backend chain: the first backend that accepts wins.

None accepts and at least one failed temporarily -> ``TemporaryFailure`` (454 4.7.0);
every one rejected -> ``UnauthorizedLogin`` (535 5.7.8).
"""

from __future__ import annotations

from typing import Generator, Sequence

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred
from twisted.logger import Logger
from zope.interface import implementer

from saslsmtp.credentials import AuthenticatedIdentity, AvatarId, IAuthenticatedIdentity
from saslsmtp.errors import TemporaryFailure, UnknownUser

log = Logger()


@implementer(ICredentialsChecker)
class BackendChain:
    """Tries named checkers in order for ``IUsernamePassword`` credentials."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, backends: Sequence[tuple[str, ICredentialsChecker]]) -> None:
        self.backends = list(backends)

    @inlineCallbacks
    def requestAvatarId(self, credentials: IUsernamePassword
                        ) -> Generator[Deferred[AvatarId], AvatarId, AvatarId]:
        temporary = False
        unknown = bool(self.backends)  # every backend said "no such user" (auth cache)
        for name, checker in self.backends:
            try:
                avatar_id = yield maybeDeferred(checker.requestAvatarId, credentials)
            except UnknownUser:
                continue
            except UnauthorizedLogin:
                unknown = False
                continue
            except TemporaryFailure as e:
                unknown = False
                # a backend with an OutageLog reports its outages itself (warn once, then
                # recovery); this per-login line is for the others
                level = log.debug if hasattr(checker, "outages") else log.info
                level("backend {name} failed temporarily: {why}", name=name, why=str(e))
                temporary = True
                continue
            except Exception:
                log.failure("backend {name} raised an unexpected error", name=name)
                unknown = False
                temporary = True
                continue
            return avatar_id
        if temporary:
            raise TemporaryFailure("no backend accepted and at least one failed temporarily")
        if unknown:
            raise UnknownUser("no backend knows the user")
        raise UnauthorizedLogin("no backend accepted the credentials")


@implementer(ICredentialsChecker)
class TrustedIdentityChecker:
    """Turns an ``AuthenticatedIdentity`` (an exchange that proved itself) into an avatar id."""

    credentialInterfaces = (IAuthenticatedIdentity,)

    def requestAvatarId(self, credentials: AuthenticatedIdentity) -> "Deferred[AvatarId]":
        return maybeDeferred(lambda: credentials.username)
