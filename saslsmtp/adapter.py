"""Twisted glue: any saslsmtp mechanism as an ``IChallengeResponse`` for stock protocols.

Stock ``twisted.mail.smtp.ESMTP`` and ``twisted.mail.imap4.IMAP4Server`` drive mechanisms
through the synchronous ``getChallenge`` / ``setResponse`` / ``moreChallenges`` trio, then
pass the mechanism object itself to ``portal.login``.  ``MechanismAdapter`` runs one of our
mechanisms that way, and becomes the credentials its outcome calls for:

* ``Verify``  -> provides ``IUsernamePassword`` (any password checker serves it);
* ``Accept``  -> provides ``IAuthenticatedIdentity`` (``TrustedIdentityChecker``);
* ``Reject``/``Defer`` -> provides ``IFailedExchange``;
* a step still running when the protocol wants the next challenge -> provides
  ``IPendingExchange``.

``ExchangeChecker`` turns the last two into a login: it waits for a pending step (an
``async`` script step, a secret looked up over the network) and maps the outcome to an
avatar id, ``AuthRejected`` or ``TemporaryFailure``.  Because ``portal.login`` may take its
time, an asynchronous *last* step works; an asynchronous step that wants to send another
challenge cannot (the stock protocol has already decided there are no more challenges),
and fails with a ``TemporaryFailure`` saying so.  ``SubmissionESMTP`` has no such limit.

``Lookup``/``ValidateToken`` are answered by an injected ``resolver`` (CRAM-MD5 and SCRAM
read the stored secret from a passwd-file that way); without one they defer.

A stock challenger factory takes no arguments, so the ``Session`` of an exchange knows the
server's host name and the mechanism, not the client address or TLS; every exchange gets a
fresh ``Session`` (and so a fresh script ``context``).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, assert_never

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.internet import defer
from twisted.logger import Logger
from twisted.mail.interfaces import IChallengeResponse
from twisted.python.failure import Failure
from zope.interface import Interface, alsoProvides, implementer

from saslsmtp.credentials import AvatarId, IAuthenticatedIdentity, same_password
from saslsmtp.errors import AuthRejected, TemporaryFailure, failure_outcome
from saslsmtp.sasl.mechanism import MechanismSpec, prepares_secret
from saslsmtp.sasl.outcome import (Accept, Defer, Lookup, Outcome, Refusal, Reject, Reply,
                                   Secret, Session, ValidateToken, Verify)

__all__ = ["MechanismAdapter", "ExchangeChecker", "FailedExchangeChecker", "IFailedExchange",
           "IPendingExchange", "challengers"]

log = Logger(namespace="saslsmtp.adapter")

# no quoted parts: ``get_type_hints`` would evaluate them in a module that names this alias
Resolver = Callable[[Any, Session], defer.Deferred[Secret | None]]

#: The outcome of an asynchronous step that wants another round trip.
CANNOT_WAIT = Defer("This mechanism needs an asynchronous server")


class IFailedExchange(Interface):
    """Credentials of an exchange that ended in Reject or Defer."""


class IPendingExchange(Interface):
    """Credentials of an exchange whose last step had not finished yet."""


@implementer(IChallengeResponse)
class MechanismAdapter:
    """One exchange of ``spec``'s mechanism, driven the stock Twisted way."""

    def __init__(self, spec: MechanismSpec, session: Session | None = None, *,
                 resolver: Resolver | None = None, blocking: Any = None) -> None:
        self.spec = spec
        self.session = session or Session(mechanism=spec.name)
        self.resolver = resolver
        self.blocking = blocking  # BlockingRunner for SCRAM's PBKDF2 (makes that step async)
        self.username: bytes = b""
        self.password: bytes = b""
        self.failure: Reject | Defer | None = None
        self.pending: "defer.Deferred[Any] | None" = None
        self._mechanism = spec.factory(self.session)
        self._outcome: Any = None
        self._refusal: Refusal | None = None  # a looked-up secret's (saslsmtp.auth does the same)
        self._advance(lambda: self._mechanism.start(None))

    # the steps -----------------------------------------------------------

    def _advance(self, step: Callable[[], Any]) -> None:
        """Run one step (and any secret lookups it asks for); settle now if it finished."""
        d = defer.maybeDeferred(step)
        d.addCallback(self._follow)
        d.addErrback(_failure_outcome)
        box: list[Any] = []

        def keep(outcome: Any) -> Any:
            box.append(outcome)
            return outcome
        d.addCallback(keep)
        if box:
            self._outcome = box[0]
            self._become(box[0])
        else:
            self._outcome = None
            self.pending = d
            alsoProvides(self, IPendingExchange)

    def _follow(self, outcome: Any) -> Any:
        if isinstance(outcome, (Lookup, ValidateToken)):
            if self.resolver is None:
                return Defer("No secret source for this mechanism")
            mechanism = self._mechanism
            d: defer.Deferred[Any] = defer.maybeDeferred(self.resolver, outcome, self.session)
            if prepares_secret(mechanism) and self.blocking is not None:
                d.addCallback(lambda secret: self.blocking.run(mechanism.prepare_secret, secret)
                              if isinstance(secret, Secret) and secret.kind == "plaintext"
                              else secret)
            d.addCallback(self._note_refusal)
            d.addCallback(mechanism.resume)
            return d.addCallback(self._follow)
        if isinstance(outcome, Accept) and self._refusal is not None:
            return self._refusal.reply  # a mechanism that did not answer the refusal itself
        if not isinstance(outcome, (Reply, Accept, Reject, Defer, Verify)):
            log.error("mechanism {name} returned {kind}", name=self.spec.name,
                      kind=type(outcome).__name__)
            return Defer("Mechanism error")
        return outcome

    def _note_refusal(self, secret: Any) -> Any:
        if isinstance(secret, Secret) and secret.refusal is not None:
            self._refusal = secret.refusal
        return secret

    # IChallengeResponse -------------------------------------------------

    def getChallenge(self) -> bytes:
        outcome = self._outcome
        return outcome.payload_bytes() if isinstance(outcome, Reply) else b""

    def setResponse(self, response: bytes) -> None:
        if not isinstance(self._outcome, Reply):
            return
        mechanism = self._mechanism
        self._advance(lambda: mechanism.receive(response))

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
                self.username = _name_bytes(outcome.username)
                alsoProvides(self, IAuthenticatedIdentity)
            case Accept():
                self._fail(Defer("Mechanism accepted nobody"))
            case Reject() | Defer():
                self._fail(outcome)
            case Lookup() | ValidateToken():  # _follow resolves these; kept for exhaustiveness
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


def _name_bytes(name: str | bytes) -> bytes:
    return name if isinstance(name, bytes) else name.encode("utf-8")


def _failure_outcome(failure: Failure) -> Reject | Defer:
    """A step that raised: the engine's rule (``saslsmtp.errors.failure_outcome``), a
    mechanism bug answered as ``Defer("Mechanism error")``."""
    return failure_outcome(failure, MECHANISM_ERROR)


MECHANISM_ERROR = Defer("Mechanism error")


@implementer(ICredentialsChecker)
class ExchangeChecker:
    """Turns a failed or pending exchange into the matching login result: a ``Reject``
    -> ``AuthRejected`` (an ``UnauthorizedLogin``), a ``Defer`` -> ``TemporaryFailure``, a
    pending step's ``Accept`` -> the username it names."""

    credentialInterfaces = (IFailedExchange, IPendingExchange)

    def requestAvatarId(self, credentials: MechanismAdapter) -> "defer.Deferred[AvatarId]":
        if credentials.pending is not None and credentials.failure is None:
            pending, credentials.pending = credentials.pending, None
            return pending.addCallback(_avatar_id)
        return defer.maybeDeferred(_avatar_id, credentials.failure or Defer())


#: The earlier name of ``ExchangeChecker``.
FailedExchangeChecker = ExchangeChecker


def _avatar_id(outcome: Any) -> bytes:
    match outcome:
        case Accept() if outcome.username:
            return _name_bytes(outcome.username)
        case Reject():
            raise AuthRejected(outcome)
        case Defer():
            raise TemporaryFailure("the exchange deferred", outcome)
        case Reply():
            raise TemporaryFailure("an asynchronous step asked for another challenge, which a"
                                   " stock Twisted protocol cannot send", CANNOT_WAIT)
        case _:
            raise TemporaryFailure(f"an asynchronous step ended in {type(outcome).__name__},"
                                   " which a stock Twisted protocol cannot act on", CANNOT_WAIT)


def challengers(specs: Mapping[str, MechanismSpec] | Iterable[MechanismSpec],
                hostname: str = "localhost", *, resolver: Resolver | None = None,
                blocking: Any = None) -> dict[bytes, Callable[[], MechanismAdapter]]:
    """``ESMTP(chal=...)`` / ``IMAP4Server(chal=...)`` factories: upper-case name bytes ->
    zero-argument factory making one adapter (with a fresh ``Session``) per exchange."""
    items = specs.values() if isinstance(specs, Mapping) else specs

    def factory(spec: MechanismSpec) -> Callable[[], MechanismAdapter]:
        def make() -> MechanismAdapter:
            return MechanismAdapter(spec, Session(hostname=hostname, mechanism=spec.name),
                                    resolver=resolver, blocking=blocking)
        return make
    return {spec.name.upper().encode("ascii"): factory(spec) for spec in items}
