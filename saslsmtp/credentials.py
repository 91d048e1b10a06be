"""Credentials that carry the SMTP session with them, so backends can see it.

``PasswordCredentials`` provides Twisted's ``IUsernamePassword``; any stock checker
works with it.  Our backends also read ``credentials.session`` (remote IP, TLS,
mechanism) when they need it, e.g. the HTTP and Dovecot backends.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Union

from twisted.cred.credentials import IUsernamePassword
from zope.interface import Interface, implementer

from saslsmtp.sasl.outcome import Session, Verify

AvatarId = Union[bytes, tuple[()]]
"""What a Twisted checker's Deferred fires with (``ICredentialsChecker`` declares it).

Our checkers always give the username's ``bytes``; ``()`` is Twisted's anonymous id,
which they never produce.  Annotating with the interface's own type keeps every
``@implementer(ICredentialsChecker)`` class checkable against the interface.
"""

def same_password(presented: bytes, stored: bytes | str) -> bool:
    """``IUsernamePassword.checkPassword`` for plaintext stores, in constant time."""
    if isinstance(stored, str):
        stored = stored.encode("utf-8")
    return hmac.compare_digest(presented, stored)


@implementer(IUsernamePassword)
class PasswordCredentials:
    """A username and password from PLAIN or LOGIN, plus the session they came from.

    ``username`` and ``password`` are UTF-8 bytes, as ``IUsernamePassword`` wants;
    ``request`` is the mechanism's ``Verify`` (the same values as text) when the AUTH
    engine made them.  ``repr()`` never shows the password.
    """

    def __init__(self, username: bytes, password: bytes, session: Session | None = None,
                 authzid: bytes = b"", request: Verify | None = None) -> None:
        self.username = username
        self.password = password
        self.authzid = authzid
        self.session = session or Session()
        self.request = request

    @classmethod
    def from_request(cls, request: Verify, session: Session) -> "PasswordCredentials":
        """The credentials of a mechanism's ``Verify``: encoded once, at the
        ``IUsernamePassword`` boundary, with the text kept in ``request``."""
        return cls(request.username.encode("utf-8"), request.password.encode("utf-8"), session,
                   request.authzid.encode("utf-8"), request)

    def checkPassword(self, password: bytes | str) -> bool:
        """Constant-time comparison against a plaintext stored password."""
        return same_password(self.password, password)

    def __repr__(self) -> str:
        return f"<PasswordCredentials username={self.username!r} password=***>"


class IAuthenticatedIdentity(Interface):
    """Credentials whose exchange has already proven the identity (a script's Accept,
    a SCRAM proof); the portal's trusting checker only turns them into an avatar id."""


@implementer(IAuthenticatedIdentity)
@dataclass(frozen=True)
class AuthenticatedIdentity:
    """The identity an exchange proved itself (``Accept``), for the trusting checker."""

    username: bytes
    mechanism: str = ""
