"""Failure types shared by checkers, the AUTH script and the SMTP engine.

The rule (ARCHITECTURE.md): bad credentials are ``UnauthorizedLogin`` (535 5.7.8),
anything else a checker raises is a temporary failure (454 4.7.0).  Both may carry
an explicit reply (the AUTH script's ``Reject``/``Defer`` options).
"""

from __future__ import annotations

from twisted.cred.error import UnauthorizedLogin

from saslsmtp.replies import Reply


class AuthRejected(UnauthorizedLogin):
    """Credentials refused, with an optional explicit reply (default 535 5.7.8)."""

    def __init__(self, reply: Reply | None = None, disconnect: bool = False) -> None:
        super().__init__("authentication rejected")
        self.reply = reply
        self.disconnect = disconnect


class UnknownUser(UnauthorizedLogin):
    """A checker's way to say "no such user" rather than "wrong password" (still a 535),
    so the auth cache may remember the name for ``negative_ttl``."""


class TemporaryFailure(Exception):
    """A backend could not decide now (down, timeout, busy): 454 4.7.0 by default.

    ``message`` is for the log only and must never contain a password.
    """

    def __init__(self, message: str = "temporary failure", reply: Reply | None = None,
                 disconnect: bool = False) -> None:
        super().__init__(message)
        self.reply = reply
        self.disconnect = disconnect
