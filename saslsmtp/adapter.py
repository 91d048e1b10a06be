"""Twisted glue: any saslsmtp mechanism as an ``IChallengeResponse`` for stock ESMTP.

Stock ``twisted.mail.smtp.ESMTP`` (and IMAP4) drive mechanisms through the synchronous
``getChallenge`` / ``setResponse`` / ``moreChallenges`` trio, then pass the mechanism
object itself to ``portal.login``.  ``MechanismAdapter`` runs one of our mechanisms that
way, and becomes the credentials its outcome calls for:

* ``Verify``  -> provides ``IUsernamePassword`` (any password checker serves it);
* ``Accept``  -> provides ``IAuthenticatedIdentity`` (``TrustedIdentityChecker``);
* ``Reject``/``Defer`` -> provides ``IFailedExchange`` (``FailedExchangeChecker`` turns it
  into ``UnauthorizedLogin`` / ``TemporaryFailure``).

So a scripted mechanism also ends in ``portal.login``, like every other success.  The
stock protocol cannot wait: a step that returns an unfired Deferred (an async script,
a ``Lookup``) fails the exchange with ``TemporaryFailure``; ``SubmissionESMTP`` has no
such limit.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, assert_never

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.internet import defer
from twisted.mail.interfaces import IChallengeResponse
from zope.interface import Interface, alsoProvides, implementer

from saslsmtp.credentials import AvatarId, IAuthenticatedIdentity, same_password
from saslsmtp.errors import AuthRejected, TemporaryFailure
from saslsmtp.sasl.mechanism import MechanismSpec
from saslsmtp.sasl.outcome import (Accept, Defer, Lookup, Outcome, Reject, Reply, Session,
                                   ValidateToken, Verify)


class IFailedExchange(Interface):
    """Credentials of an exchange that ended in Reject or Defer."""


@implementer(IChallengeResponse)
class MechanismAdapter:
    """One exchange of ``spec``'s mechanism, driven the stock Twisted way."""

    def __init__(self, spec: MechanismSpec, session: Session | None = None) -> None:
        self.spec = spec
        self.session = session or Session(mechanism=spec.name)
        self._mechanism = spec.factory(self.session)
        self._outcome: Any = self._settle(lambda: self._mechanism.start(None))
        self.username: bytes = b""
        self.password: bytes = b""
        self.failure: Reject | Defer | None = None
        self._become(self._outcome)  # a first step may already end the exchange

    def _settle(self, step: Callable[[], Any]) -> Any:
        try:
            result = step()
        except Exception:
            return Defer("Mechanism error")
        if isinstance(result, defer.Deferred):
            box: list[Any] = []
            result.addBoth(box.append)
            if not box:
                result.cancel()
                return Defer("This mechanism needs an asynchronous server")
            result = box[0]
            if not isinstance(result, (Reply, Accept, Reject, Defer, Verify, Lookup, ValidateToken)):
                return Defer("Mechanism error")
        return result

    # IChallengeResponse -------------------------------------------------

    def getChallenge(self) -> bytes:
        outcome = self._outcome
        return outcome.payload_bytes() if isinstance(outcome, Reply) else b""

    def setResponse(self, response: bytes) -> None:
        if not isinstance(self._outcome, Reply):
            return
        self._outcome = self._settle(lambda: self._mechanism.receive(response))
        self._become(self._outcome)

    def moreChallenges(self) -> bool:
        return isinstance(self._outcome, Reply)

    # credentials ---------------------------------------------------------

    def _become(self, outcome: Outcome) -> None:
        match outcome:
            case Reply():
                pass  # the exchange goes on
            case Verify():
                self.username = outcome.username.encode("utf-8")
                self.password = outcome.password.encode("utf-8")
                alsoProvides(self, IUsernamePassword)
            case Accept() if outcome.username:
                name = outcome.username
                self.username = name if isinstance(name, bytes) else name.encode("utf-8")
                alsoProvides(self, IAuthenticatedIdentity)
            case Accept():
                self._fail(Defer("Mechanism accepted nobody"))
            case Reject() | Defer():
                self._fail(outcome)
            case Lookup() | ValidateToken():
                self._fail(Defer("Mechanism needs a server that can look up secrets"))
            case _:
                assert_never(outcome)

    def _fail(self, outcome: Reject | Defer) -> None:
        self.failure = outcome
        alsoProvides(self, IFailedExchange)

    def checkPassword(self, password: bytes | str) -> bool:
        """For ``IUsernamePassword`` checkers holding plaintext passwords."""
        return same_password(self.password, password)

    def __repr__(self) -> str:
        return f"<MechanismAdapter {self.spec.name} username={self.username!r}>"


@implementer(ICredentialsChecker)
class FailedExchangeChecker:
    """Turns an exchange that ended in Reject/Defer into the matching login failure."""

    credentialInterfaces = (IFailedExchange,)

    def requestAvatarId(self, credentials: MechanismAdapter) -> "defer.Deferred[AvatarId]":
        result = credentials.failure
        if isinstance(result, Reject):
            return defer.fail(AuthRejected(result))
        return defer.fail(TemporaryFailure("the exchange deferred", result))


def challengers(specs: Mapping[str, MechanismSpec], hostname: str = "localhost") -> dict[bytes, Callable[[], MechanismAdapter]]:
    """``ESMTP(chal=...)`` factories: upper-case name bytes -> zero-argument factory."""
    return {name.encode("ascii"): functools.partial(
        MechanismAdapter, spec, Session(hostname=hostname, mechanism=name))
        for name, spec in specs.items()}
