"""The closed vocabulary of one AUTH step: frozen values shared by built-in mechanisms,
the AUTH script and the engine.

Every step of a mechanism returns one ``Outcome``:

* a **decision** the engine answers directly: ``Reply`` (334 challenge), ``Accept``,
  ``Reject``, ``Defer``;
* a **request** the engine answers with the backends: ``Verify`` (a password),
  ``Lookup`` (a stored secret, then ``resume``), ``ValidateToken`` (a bearer token, then
  ``resume`` with a ``TokenVerdict``).

The engine matches on this union exhaustively (``typing.assert_never``), so a new kind
of step is a type error until every consumer handles it.  ``Accept``, ``Reject``,
``Defer`` and ``Reply`` are also exactly what an AUTH script returns
(``saslsmtp.script`` re-exports them), so there is one result convention.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Union

from saslsmtp.sasl.heard import Heard

__all__ = ["Reply", "Accept", "Reject", "Defer", "Verify", "Lookup", "Secret", "Refusal",
           "ValidateToken", "TOKEN_VERDICT", "TokenVerdict", "Decision", "Request", "Outcome",
           "Session", "MechanismStateError"]


@dataclass(frozen=True)
class Reply:
    """Send ``334 base64(payload)``; the next client line continues the exchange."""

    payload: bytes | str = b""

    def payload_bytes(self) -> bytes:
        p = self.payload
        return p.encode("utf-8") if isinstance(p, str) else bytes(p)


@dataclass(frozen=True)
class Accept:
    """Success: ``235 2.7.0 <reason>``; ``username`` is the authenticated identity."""

    username: str | bytes | None = None
    reason: str | None = None


@dataclass(frozen=True)
class Reject:
    """Permanent failure: ``535 5.7.8 <reason>`` unless told otherwise."""

    reason: str | None = None
    code: int = 535
    enhanced: str | None = "5.7.8"
    disconnect: bool = False


@dataclass(frozen=True)
class Defer:
    """Temporary failure: ``454 4.7.0 <reason>`` unless told otherwise."""

    reason: str | None = None
    code: int = 454
    enhanced: str | None = "4.7.0"
    disconnect: bool = False


@dataclass(frozen=True, repr=False)
class Verify:
    """Ask the backends whether ``password`` is right for ``username``."""

    username: str
    password: str
    authzid: str = ""

    def __repr__(self) -> str:
        return f"Verify(username={self.username!r}, password=***, authzid={self.authzid!r})"


@dataclass(frozen=True)
class Lookup:
    """Ask the backends for a stored secret of ``username`` in one of ``kinds``
    (e.g. ``"plaintext"``, ``"cram-md5"``, ``"scram-sha-256"``); then ``resume``."""

    username: str
    kinds: tuple[str, ...]


@dataclass(frozen=True)
class Refusal:
    """A login the backend refuses even to the right password (a users file's
    ``nologin``, ``allow_nets`` ...: Dovecot checks them after the password): ``reply``
    is the answer in place of the success, ``why`` the log line's reason (names the user
    and the rule, never a secret)."""

    reply: Reject
    why: str


@dataclass(frozen=True, repr=False)
class Secret:
    """A stored secret handed back to ``resume``: its ``kind`` and ``value``.

    ``refusal``: the backend refuses this user for this client whatever the password; a
    mechanism answers ``refusal.reply`` at the step where the password has been proved,
    where it would have gone on to success (so a wrong password and a refused login look
    the same up to that step, and only the right password learns a ``reason``).  The
    engine also answers it to an ``Accept`` that follows such a secret."""

    kind: str
    value: object
    refusal: Refusal | None = None

    def __repr__(self) -> str:
        refused = "" if self.refusal is None else f", refusal={self.refusal!r}"
        return f"Secret(kind={self.kind!r}, value=***{refused})"


@dataclass(frozen=True, repr=False)
class ValidateToken:
    """Ask the token validators about bearer ``token``; ``username`` is the identity the
    client asked for ("" if none), ``host``/``port`` what the client says it connected to.
    The answer comes back through ``resume(Secret(TOKEN_VERDICT, TokenVerdict(...)))``,
    or ``resume(None)`` when no validator has an opinion."""

    token: str
    username: str
    mechanism: str
    host: str | None = None
    port: int | None = None

    def __repr__(self) -> str:
        return (
            f"ValidateToken(token=***, username={self.username!r}, mechanism={self.mechanism!r},"
            f" host={self.host!r}, port={self.port!r})"
        )


TOKEN_VERDICT = "token-verdict"  # the Secret kind that carries a TokenVerdict


@dataclass(frozen=True)
class TokenVerdict:
    """What the validator found, as ``Secret(TOKEN_VERDICT, verdict).value``.

    ``ok``: the token is valid and the validator accepts it for the requested
    username; ``subject``: the identity the token names (its configured claim);
    ``status``: the OAuth error code when not ok (``invalid_token``,
    ``insufficient_scope``, ``invalid_request``); ``scope``: the scope to ask for.
    """

    ok: bool
    subject: str | None = None
    status: str = "invalid_token"
    scope: str | None = None


Decision = Union[Reply, Accept, Reject, Defer]
"""Step results the engine answers without asking anyone."""

Request = Union[Verify, Lookup, ValidateToken]
"""Step results the engine answers by asking the backends."""

Outcome = Union[Reply, Accept, Reject, Defer, Verify, Lookup, ValidateToken]
"""Everything one mechanism step may return (``Decision`` or ``Request``)."""


@dataclass(frozen=True)
class Session:
    """What a mechanism may know about the connection.

    ``channel_bindings`` maps a channel-binding type (``"tls-unique"``,
    ``"tls-exporter"``, ``"tls-server-end-point"``) to its data when TLS is up;
    ``client_certificate`` is the verified TLS client certificate identity fields;
    ``client_certificate_error`` says why the certificate the client sent did not verify
    (``"certificate has expired"``), ``None`` when it did or none was sent.
    """

    remote_ip: str = ""
    remote_port: int = 0
    local_ip: str = ""
    local_port: int = 0
    helo: str = ""
    tls: bool = False
    hostname: str = "localhost"
    mechanism: str = ""
    channel_bindings: Mapping[str, bytes] = field(default_factory=dict, repr=False)
    client_certificate: Mapping[str, object] | None = None
    client_certificate_error: str | None = None
    # The AUTH script's per-connection ``context`` dict (mutable, shared by every
    # exchange of one connection; a new connection starts with an empty one).
    context: dict[str, object] = field(default_factory=dict, compare=False, repr=False)
    # What the client said in the connection's last few AUTH exchanges, kept beside
    # ``context`` (same lifetime) so that what a script kept of it is never logged.
    heard: Heard = field(default_factory=Heard, compare=False, repr=False)


class MechanismStateError(RuntimeError):
    """A mechanism was driven out of order (a bug in the caller, not the client)."""
