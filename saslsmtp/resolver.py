"""The resolver: answers a mechanism's ``Lookup`` and ``ValidateToken`` from the backends.

Kept apart from ``saslsmtp.service`` so that ``saslsmtp.embed`` can build one without
importing the daemon's wiring (its limits import ``txredisapi``, which installs the
global reactor).
"""

from __future__ import annotations

import contextvars
import inspect
from typing import Any, Callable, Sequence, assert_never

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.python.failure import Failure

from saslsmtp.auth import Resolver, SecretRequest
from saslsmtp.errors import TemporaryFailure
from saslsmtp.redact import scrub, scrubbed_failure
from saslsmtp.sasl.outcome import TOKEN_VERDICT, Lookup, Secret, Session, ValidateToken
from saslsmtp.settled import is_deferred, result_now

__all__ = ["secret_resolver"]


def secret_resolver(sources: Sequence[Any], validators: Sequence[Any] = ()) -> Resolver:
    """Answer ``Lookup`` from the first backend with a secret of a wanted kind (asked
    with the exchange's ``Session``: what a users file refuses depends on the client), and
    ``ValidateToken`` from the first token validator that has an opinion (a validator's
    error is logged by the engine: the token is taken out of its message first)."""

    lookups = [_lookup_of(source) for source in sources]

    def resolve(request: SecretRequest, session: Session) -> "defer.Deferred[Secret | None]":
        match request:
            case Lookup():
                return _first_answer(
                    lookups, lambda lookup: lookup(request.username, request.kinds, session),
                    lambda secret: secret)
            case ValidateToken():
                if not validators:
                    return defer.fail(TemporaryFailure("no oauth2 backend is configured"))
                return _first_answer(validators, lambda v: v.validate_token(request),
                                     lambda verdict: Secret(TOKEN_VERDICT, verdict)
                                     ).addErrback(_without_secret, request.token)
            case _:
                assert_never(request)

    return resolve


SecretLookup = Callable[[str, tuple[str, ...], Session], Any]


def _lookup_of(source: Any) -> SecretLookup:
    """``source.lookup_secret`` asked with the session (the client's address: a users
    file's ``allow_nets``), or without it for a source written before it took one."""
    method = source.lookup_secret
    try:
        parameters = inspect.signature(method).parameters
    except (TypeError, ValueError):  # no signature to read: ask as the interface says
        return lambda username, kinds, session: method(username, kinds, session=session)
    if "session" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return lambda username, kinds, session: method(username, kinds, session=session)
    return lambda username, kinds, session: method(username, kinds)


def _without_secret(failure: Failure, secret: str) -> Failure:
    """``failure`` with ``secret`` out of the message the engine logs: a
    ``TemporaryFailure``'s text (its outcome kept), an unexpected error's traceback."""
    if failure.check(TemporaryFailure):
        text = str(failure.value)
        clean = scrub(text, [secret])
        if clean == text:
            return failure
        return Failure(TemporaryFailure(clean, failure.value.outcome))
    if failure.check(UnauthorizedLogin, defer.CancelledError):  # answered, not logged
        return failure
    return scrubbed_failure(failure, [secret])


def _first_answer(items: Sequence[Any], ask: Callable[[Any], Any],
                  wrap: Callable[[Any], Any]) -> "defer.Deferred[Any]":
    """``wrap`` of the first answer of ``ask(item)`` that is not ``None``, asking in
    order; ``None`` if none has one.  Answers already there cost no callback hop."""

    # the next item is asked from a callback: in the caller's context (the fair hashing
    # pool's client key lives there), as inlineCallbacks would
    context = contextvars.copy_context()

    def answered(got: Any, index: int) -> Any:
        return wrap(got) if got is not None else context.run(from_index, index + 1)

    def from_index(index: int) -> "defer.Deferred[Any]":
        while index < len(items):
            try:
                answer = result_now(ask(items[index]))
            except Exception:
                return defer.fail()
            if is_deferred(answer):
                return answer.addCallback(answered, index)
            if isinstance(answer, Failure):
                return defer.fail(answer)
            if answer is not None:
                return defer.succeed(wrap(answer))
            index += 1
        return defer.succeed(None)

    return from_index(0)
