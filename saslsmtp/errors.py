"""Failure types shared by checkers, the AUTH script and the AUTH engine.

The rule: bad credentials are ``UnauthorizedLogin`` (an ``AuthRejected`` may say how,
with a ``Reject``); anything else a checker raises is a ``TemporaryFailure`` (which may
carry a ``Defer``).  They carry outcomes, never SMTP replies: only the protocol layer
turns an outcome into a reply (``saslsmtp.replies.auth_reply``).
"""

from __future__ import annotations

from twisted.cred.error import UnauthorizedLogin
from twisted.logger import Logger
from twisted.python.failure import Failure

from saslsmtp.sasl.outcome import Defer, Reject

__all__ = ["AuthRejected", "UnknownUser", "TemporaryFailure", "failure_outcome"]

_log = Logger(namespace="saslsmtp.auth")


class AuthRejected(UnauthorizedLogin):
    """Credentials refused, as ``outcome`` says (by default ``Reject()``: 535 5.7.8)."""

    def __init__(self, outcome: Reject | None = None) -> None:
        super().__init__("authentication rejected")
        self.outcome = outcome or Reject()


class UnknownUser(UnauthorizedLogin):
    """A checker's way to say "no such user" rather than "wrong password" (still a 535),
    so the auth cache may remember the name for ``negative_ttl``."""


class TemporaryFailure(Exception):
    """A backend could not decide now (down, timeout, busy); ``outcome`` is what the
    client hears (by default ``Defer()``: 454 4.7.0).

    ``message`` is for the log only and must never contain a password.
    """

    def __init__(self, message: str = "temporary failure", outcome: Defer | None = None) -> None:
        super().__init__(message)
        self.outcome = outcome or Defer()


def failure_outcome(failure: Failure, unexpected: Defer = Defer()) -> Reject | Defer:
    """The outcome of a failed step or login: bad credentials -> ``Reject``, anything else
    -> ``Defer`` (logged; an unexpected error with its traceback, answered ``unexpected``)."""
    exc = failure.value
    if isinstance(exc, AuthRejected):
        return exc.outcome
    if isinstance(exc, UnauthorizedLogin):
        return Reject()
    if isinstance(exc, TemporaryFailure):
        _log.info("AUTH temporary failure: {why}", why=str(exc))
        return exc.outcome
    _log.failure("AUTH step failed unexpectedly", failure=failure)
    return unexpected
