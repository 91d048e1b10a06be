"""The AUTH engine: one ``AuthExchange`` per AUTH command, and the failure policy.

Theory of operation
-------------------
The protocol builds the connection's ``Session`` once per exchange and hands it over with
the ``MechanismSpec``.  Each step (``start``, then ``receive`` for every client line) runs
the mechanism and acts on its outcome until it reaches a verdict for the protocol:

* ``Reply``          -> returned: the protocol sends ``334``;
* ``Verify``         -> the password script when one is configured (its outcome is acted
  on in turn), else ``portal.login(PasswordCredentials)``;
* ``Accept``         -> ``portal.login(AuthenticatedIdentity)`` (every success ends in the
  portal and the realm's avatar) -> ``LoggedIn``;
* ``Lookup`` / ``ValidateToken`` -> the injected resolver (with the ``Session``: a users
  file's ``allow_nets`` depends on the client); a plaintext secret for a mechanism that
  ``PreparesSecret`` goes through the blocking runner; then ``resume``.  A secret with a
  ``refusal`` (the backend refuses the user whatever the password) is remembered: the
  mechanism answers the refusal's reply once the password is proved (logged here with
  the backend's reason), and an ``Accept`` after it is answered the same way;
* ``Reject`` / ``Defer`` -> returned as they are.

A failed step or login becomes an outcome too (``failure_outcome``): ``UnauthorizedLogin``
-> ``Reject`` (an ``AuthRejected`` says which), ``TemporaryFailure`` -> its ``Defer``,
anything else -> ``Defer()`` and a log line.  So the protocol sees exactly one of
``Reply``, ``LoggedIn``, ``Reject`` or ``Defer`` per step and owns every reply.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Protocol, Union, assert_never

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.logger import Logger
from twisted.mail.interfaces import IMessageDelivery, IMessageDeliveryFactory
from twisted.python.failure import Failure

from saslsmtp.credentials import AuthenticatedIdentity, PasswordCredentials
from saslsmtp.errors import TemporaryFailure, failure_outcome
from saslsmtp.limits.fairpool import client_key_set
from saslsmtp.redact import scrubbed_failure
from saslsmtp.sasl.mechanism import AnyMechanism, MechanismSpec, prepares_secret
from saslsmtp.sasl.outcome import (Accept, Defer, Lookup, Outcome, Refusal, Reject, Reply,
                                   Secret, Session, ValidateToken, Verify)
from saslsmtp.settled import is_deferred, result_now

log = Logger(namespace="saslsmtp.auth")

SecretRequest = Union[Lookup, ValidateToken]
# No quoted parts in aliases other modules name in their signatures: a quoted part is
# evaluated in the *naming* module by ``typing.get_type_hints`` (``SubmissionESMTP``'s
# ``resolver``), where ``Secret`` is not imported.
Resolver = Callable[[SecretRequest, Session], defer.Deferred[Secret | None]]
"""Answers ``Lookup`` and ``ValidateToken`` from the backends (``saslsmtp.service``)."""


class AuthGuard(Protocol):
    """The abuse limits of one exchange (``saslsmtp.limits.session.AuthAttempt``): asked
    once the username is known, told the verdict the moment it is known."""

    client_key: str

    def admit(self, username: str, password: str | bytes | None = None
              ) -> "Defer | None | defer.Deferred[Defer | None]": ...

    def judged(self, ok: bool | None, username: str | None = None, reason: str | None = None,
               counted: bool = True) -> "defer.Deferred[None] | None": ...

    def abandon(self) -> None: ...


class PasswordScript(Protocol):
    """Decides ``Verify`` itself (the AUTH script): fires with ``Accept``, ``Reject`` or
    ``Defer``."""

    def verify_password(self, request: Verify, session: Session) -> "defer.Deferred[Outcome]": ...


def no_resolver(request: SecretRequest, session: Session) -> "defer.Deferred[Secret | None]":
    """The resolver when no backend can answer: every request is a temporary failure."""
    return defer.fail(TemporaryFailure(f"no resolver for {type(request).__name__}"))


async def _awaited(step: Awaitable[Outcome]) -> Outcome:
    """The outcome of an awaitable step that is no Deferred (a coroutine)."""
    return await step


@dataclass(frozen=True)
class LoggedIn:
    """The exchange succeeded: the realm's ``avatar`` (an ``IMessageDelivery``), its
    ``logout``, who logged in with which mechanism, and the text for 235 (or ``None``)."""

    username: str
    mechanism: str
    avatar: Any
    logout: Callable[[], None]
    text: str | None = None


StepResult = Union[Reply, LoggedIn, Reject, Defer]
"""What one step of an exchange ends in, for the protocol to answer."""

TOO_LONG = Reject("Authentication exchange too long")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1: never in a login name


class AuthExchange:
    """One AUTH exchange of ``spec``'s mechanism over ``session`` (built once, here used
    by the mechanism, the password checkers, the script and the resolver alike)."""

    def __init__(self, spec: MechanismSpec, session: Session, *, portal: Any,
                 resolver: Resolver = no_resolver, script: PasswordScript | None = None,
                 blocking: Any = None, max_steps: int = 16,
                 guard: AuthGuard | None = None) -> None:
        self.spec = spec
        self.guard = guard
        self.session = session
        self.portal = portal
        self.resolver = resolver
        self.script = script
        self.blocking = blocking  # BlockingRunner for expensive secret preparation (PBKDF2)
        self.max_steps = max_steps
        self.challenges = 0
        self.cancelled = False
        self.running = False  # a step (maybe a credential check) is in progress
        self.refusal: Refusal | None = None  # a looked-up secret's: answered, not Accept
        self.mechanism: AnyMechanism = spec.factory(session)

    def start(self, initial: bytes | None) -> "StepResult | defer.Deferred[StepResult]":
        """The first step; ``initial`` is the decoded initial response or ``None``.
        A step that finished at once (the usual case) is its result, not a Deferred."""
        mechanism = self.mechanism
        return self._step(lambda: mechanism.start(initial))

    def receive(self, response: bytes) -> "StepResult | defer.Deferred[StepResult]":
        """The step for one decoded client line."""
        mechanism = self.mechanism
        return self._step(lambda: mechanism.receive(response))

    def cancel(self) -> bool:
        """The exchange ended early (the connection went away, the client aborted): a
        login that still completes is logged out at once.

        ``True`` when a step is still running under the limits' guard: its verdict must
        still count (the hang-up trick), so the caller must let the step's Deferred run
        to its end instead of cancelling it."""
        self.cancelled = True
        if self.guard is None:
            return False
        if not self.running:
            self.guard.abandon()
            return False
        return True  # a check still running keeps its place until its verdict counts

    def _step(self, call: Callable[[], Any]) -> "StepResult | defer.Deferred[StepResult]":
        self.running = True
        result: Any
        try:
            outcome = result_now(call())  # a scripted mechanism may answer later
            if is_deferred(outcome):
                result = outcome.addCallback(self._act)
            elif isinstance(outcome, Failure):
                result = outcome
            else:
                result = result_now(self._act(outcome))
        except Exception:
            result = Failure()
        if isinstance(result, Failure):
            result = self._failed(result)
        if is_deferred(result):
            return self._later(result)
        self.running = False
        if self.guard is None:
            return result
        judged = result_now(self._judge(result))
        if is_deferred(judged):  # the address's penalty wait
            return self._shielded(judged)
        return self._failed(judged) if isinstance(judged, Failure) else judged

    def _later(self, d: "defer.Deferred[Any]") -> "defer.Deferred[StepResult]":
        """A step still waiting (a thread, a network backend, a timer, a shared limits
        store).  With limits, a verdict is counted even if the client hangs up before it
        is known: ``cancel`` says so, and the protocol then does not cancel ``d`` (no
        shielding Deferred for every AUTH over a shared store)."""
        if self.guard is None:
            return d.addErrback(self._failed)
        return d.addBoth(self._judge_later)

    def _judge_later(self, result: Any) -> "StepResult | defer.Deferred[StepResult]":
        """A late step's end, in one callback (every AUTH over a Redis store takes
        this path): the step is over, a failure becomes its reply, the guard judges."""
        self.running = False
        if isinstance(result, Failure):
            result = self._failed(result)
        return self._judge(result)

    @staticmethod
    def _shielded(d: "defer.Deferred[StepResult]") -> "defer.Deferred[StepResult]":
        """``d``'s result, in a Deferred whose cancellation leaves ``d`` running."""
        shielded: defer.Deferred[StepResult] = defer.Deferred(lambda _: None)
        d.addBoth(lambda result: None if shielded.called else shielded.callback(result))
        return shielded

    def _judge(self, result: StepResult) -> "StepResult | defer.Deferred[StepResult]":
        """Tell the guard the verdict now; answer after its penalty delay."""
        assert self.guard is not None
        if isinstance(result, Reply):
            return result
        ok = True if isinstance(result, LoggedIn) else False if isinstance(result, Reject) else None
        username = result.username if isinstance(result, LoggedIn) else None

        def answer(_: Any) -> StepResult:
            if self.cancelled and isinstance(result, LoggedIn):
                result.logout()
                return Defer()
            return result
        # A mechanism may say why it failed, for the log line (EXTERNAL: which part of
        # the certificate was missing); one whose credential is the verified client
        # certificate guesses no secret, so its failures do not count toward the limits.
        reason = getattr(self.mechanism, "failure_reason", None) if ok is False else None
        waiting = self.guard.judged(ok, username, reason if isinstance(reason, str) else None,
                                    counted=not self.spec.client_certificate)
        return answer(None) if waiting is None else waiting.addCallback(answer)

    def _admitted(self, username: str, password: str | None,
                  then: Callable[[], Any]) -> Any:
        """``then()`` unless the guard refuses ``username`` before anything is checked."""
        if self.guard is None:
            return then()
        refusal = result_now(self.guard.admit(username, password))
        if is_deferred(refusal):  # a shared store (Redis) answers later
            return refusal.addCallback(lambda refusal: refusal if refusal is not None else then())
        if isinstance(refusal, Failure):
            return refusal
        return refusal if refusal is not None else then()

    def _act(self, outcome: Outcome) -> "StepResult | defer.Deferred[StepResult]":
        match outcome:
            case Reply():
                self.challenges += 1
                if self.challenges > self.max_steps:
                    log.warn("AUTH {mechanism} exceeded {n} steps", mechanism=self.spec.name,
                             n=self.max_steps)
                    return TOO_LONG
                return outcome
            case Reject() | Defer():
                if self.refusal is not None and outcome is self.refusal.reply:
                    self._log_refusal(self.refusal)
                return outcome
            case Accept():
                if self.refusal is not None:  # a mechanism that did not answer it itself
                    self._log_refusal(self.refusal)
                    return self.refusal.reply
                return self._accepted(outcome)
            case Verify():
                return self._admitted(outcome.username, outcome.password,
                                      lambda: self._verify(outcome))
            case Lookup() | ValidateToken():
                return self._admitted(outcome.username, None, lambda: self._resolve(outcome))
            case _:
                if inspect.isawaitable(outcome):  # an ``async def`` step (AsyncMechanism):
                    # Deferreds were taken before, a coroutine is awaited here (only here:
                    # the usual outcomes never pay for the check)
                    return defer.ensureDeferred(_awaited(outcome)).addCallback(self._act)
                assert_never(outcome)

    def _verify(self, request: Verify) -> "defer.Deferred[StepResult]":
        if self.script is not None:
            with client_key_set(self._client_key()):
                return self.script.verify_password(request, self.session).addCallback(self._act)
        credentials = PasswordCredentials.from_request(request, self.session)
        return self._login(credentials, request.username, None, request.password)

    def _client_key(self) -> str:
        return self.guard.client_key if self.guard is not None else ""

    def _accepted(self, accept: Accept) -> "StepResult | defer.Deferred[StepResult]":
        username = accept.username
        if username in (None, "", b""):
            log.error("AUTH {mechanism}: Accept without a username", mechanism=self.spec.name)
            return Defer()
        if not isinstance(username, (str, bytes)):
            log.error("AUTH {mechanism}: Accept(username=...) must be a string, not {kind}",
                      mechanism=self.spec.name, kind=type(username).__name__)
            return Defer()
        text = username.decode("utf-8", "replace") if isinstance(username, bytes) else str(username)
        if _CONTROL.search(text):
            return self._unusable(text)
        identity = AuthenticatedIdentity(text.encode("utf-8"), self.spec.name)
        return self._login(identity, text, accept.reason)

    def _resolve(self, request: SecretRequest) -> "StepResult | defer.Deferred[StepResult]":
        mechanism = self.mechanism
        key = self._client_key()
        with client_key_set(key):
            d: defer.Deferred[Any] = self.resolver(request, self.session)
        if prepares_secret(mechanism) and self.blocking is not None:
            # Only deriving keys from a plaintext is expensive (PBKDF2): that goes to a thread.
            def prepare(secret: Any) -> Any:
                if not (isinstance(secret, Secret) and secret.kind == "plaintext"):
                    return secret
                with client_key_set(key):  # the fair pool's key for this client
                    return self.blocking.run(mechanism.prepare_secret, secret)
            d.addCallback(prepare)
        d.addCallback(self._note_refusal)
        secret = result_now(d)  # a users file has answered already: no more hops
        if is_deferred(secret):  # waiting (a thread, the network)
            secret.addCallback(mechanism.resume)
            return secret.addCallback(self._act)
        if isinstance(secret, Failure):
            return defer.fail(secret)
        outcome: Any = result_now(mechanism.resume(secret))
        if is_deferred(outcome):
            return outcome.addCallback(self._act)
        return self._act(outcome)

    def _note_refusal(self, secret: Any) -> Any:
        if isinstance(secret, Secret) and secret.refusal is not None:
            self.refusal = secret.refusal
        return secret

    def _log_refusal(self, refusal: Refusal) -> None:
        """The password was proved and the backend's rule refused the login (what a
        password checker logs itself on the PLAIN path)."""
        log.info("{why} ({mechanism})", why=refusal.why, mechanism=self.spec.name)

    def _login(self, credentials: Any, username: str, text: str | None,
               password: Any = None) -> "defer.Deferred[StepResult]":
        with client_key_set(self._client_key()):
            d = self.portal.login(credentials, None, IMessageDelivery, IMessageDeliveryFactory)

        def logged_in(login: tuple) -> StepResult:
            interface, avatar, logout = login
            if self.cancelled:
                logout()
                return Defer()
            delivery = avatar if interface is IMessageDelivery else avatar.getMessageDelivery()
            # The identity is what the checker decided (the realm's avatar id: Dovecot's
            # canonical user=, LDAP's identity_attribute, the script's Accept), not what
            # the client typed; a foreign realm's avatar without one keeps the login name.
            identity = getattr(delivery, "username", None) or username
            if not isinstance(identity, str) or _CONTROL.search(identity):
                logout()  # (a backend's or realm's name: checked as a script's is)
                return self._unusable(identity)
            return LoggedIn(identity, self.spec.name, delivery, logout, text)
        if password is None:
            return d.addCallback(logged_in)

        def scrubbed(failure: Failure) -> Failure:
            # A checker of the application's own that fails may quote ``password`` in its
            # message: the log line gets it redacted (the backend chain does so for
            # ours).  Beside ``logged_in``, so a login that works pays no extra call.
            if failure.check(UnauthorizedLogin):
                return failure
            return scrubbed_failure(failure, [password])
        return d.addCallbacks(logged_in, scrubbed)

    def _unusable(self, identity: object) -> Defer:
        """A login name goes into log lines, Received headers and sender checks as it
        is: one that is not a string, or has control characters, is refused (454)."""
        log.error("AUTH {mechanism}: refusing the identity {identity!r}: not a string"
                  " without control characters", mechanism=self.spec.name, identity=identity)
        return Defer()

    def _failed(self, failure: Failure) -> StepResult:
        if failure.check(defer.CancelledError) and self.cancelled:
            return Defer()
        return failure_outcome(failure)




@dataclass
class FailurePolicy:
    """Counts failed exchanges of one connection: each one is answered after ``delay``
    seconds, and the ``limit``-th closes the connection (421)."""

    limit: int
    delay: float
    failures: int = 0

    def failed(self) -> bool:
        """Count one failure; ``True`` when it is the last one this connection gets."""
        self.failures += 1
        return self.failures >= self.limit

    def succeeded(self) -> None:
        self.failures = 0
