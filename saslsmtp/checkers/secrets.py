"""Stored-secret lookups for challenge mechanisms (CRAM-MD5, SCRAM).

A backend that can hand out what a challenge mechanism needs provides
``ISecretSource`` beside ``ICredentialsChecker``.  Kinds and their ``Secret.value``:

* ``"plaintext"``: the password, ``str``;
* ``"cram-md5"``: Dovecot's ``{CRAM-MD5}`` context, 64 hex characters, ``str``;
* ``"scram-sha-1"`` / ``"scram-sha-256"``: ``(iterations: int, salt: bytes,
  stored_key: bytes, server_key: bytes)``.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from zope.interface import Interface

from saslsmtp.sasl.outcome import Secret, Session, TokenVerdict, ValidateToken


class ISecretSource(Interface):
    """A backend that can return stored secrets."""

    def secret_kinds() -> frozenset[str]:
        """The kinds this backend can ever supply (for startup checks)."""

    def lookup_secret(username: str, kinds: tuple[str, ...],
                      session: Session | None = None) -> "Deferred[Secret | None]":
        """The user's first stored secret whose kind is in ``kinds`` (in that order of
        preference); ``None`` if the user is unknown or has none of those kinds;
        fails with ``TemporaryFailure`` if the store cannot be read now.

        ``session`` is the connection asking (``remote_ip`` ...; ``None``: unknown).  A
        store whose rules refuse this user for this client whatever the password (a
        users file's ``nologin``, ``allow_nets``) still returns the secret, with a
        ``Secret.refusal`` the exchange answers once the password is proved.  (A source
        whose ``lookup_secret`` takes no ``session`` is asked without one.)"""


class ITokenValidator(Interface):
    """A backend that validates OAuth 2.0 bearer tokens (OAUTHBEARER, XOAUTH2)."""

    def validate_token(request: ValidateToken) -> "Deferred[TokenVerdict | None]":
        """Judge ``request``; fire with a ``TokenVerdict``, or ``None`` when the token is not this
        validator's to judge (the next one is asked; none -> invalid_token); fail with
        ``TemporaryFailure`` when the authorization server or key set cannot be reached."""
