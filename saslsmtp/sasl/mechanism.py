"""What every mechanism provides, and the spec the engine needs to offer it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Awaitable, Callable, Protocol, TypeGuard, Union, runtime_checkable

from saslsmtp.sasl.outcome import MechanismStateError, Outcome, Reply, Secret, Session

__all__ = ["Mechanism", "AsyncMechanism", "AnyMechanism", "PreparesSecret", "prepares_secret",
           "MechanismSpec", "NoLookup", "ClientFirst", "SingleMessage"]


class Mechanism(Protocol):
    """One AUTH exchange.  See the theory of operation in ``saslsmtp.sasl``."""

    def start(self, initial: bytes | None) -> Outcome: ...

    def receive(self, response: bytes) -> Outcome: ...

    def resume(self, secret: Secret | None) -> Outcome: ...


class AsyncMechanism(Protocol):
    """A mechanism whose steps complete later (the AUTH script's custom mechanisms): each
    call returns an awaitable (a Deferred) of the outcome."""

    def start(self, initial: bytes | None) -> Awaitable[Outcome]: ...

    def receive(self, response: bytes) -> Awaitable[Outcome]: ...

    def resume(self, secret: Secret | None) -> Awaitable[Outcome]: ...


AnyMechanism = Union[Mechanism, AsyncMechanism]


@runtime_checkable
class PreparesSecret(Protocol):
    """A mechanism whose use of a looked-up secret has an expensive, pure first step
    (SCRAM's PBKDF2 from a plaintext): the engine runs ``prepare_secret`` in a thread
    before ``resume``."""

    def prepare_secret(self, secret: Secret | None) -> Secret | None: ...


def prepares_secret(mechanism: object) -> TypeGuard[PreparesSecret]:
    """``isinstance(mechanism, PreparesSecret)``, without ``typing``'s runtime protocol
    check (which walks the protocol's attributes on every call, per AUTH step)."""
    return callable(getattr(mechanism, "prepare_secret", None))


@dataclass(frozen=True)
class MechanismSpec:
    """How the engine offers a mechanism, and what a configuration must provide for it.

    ``factory(session)``: a fresh mechanism for one exchange.
    ``plaintext``: the password crosses the wire (hidden before TLS under require_tls).
    ``client_first``: an initial response is allowed (server-first ones answer 501).
    ``needs_tls``: never offered without TLS (OAUTHBEARER, the -PLUS variants, EXTERNAL).

    What it needs (read by the startup checks):
    ``password``: it ends in ``Verify`` (needs password backends or the AUTH script);
    ``secret_kinds``: it sends ``Lookup`` for one of these stored-secret kinds;
    ``token_validator``: it sends ``ValidateToken``;
    ``client_certificate``: it needs verified TLS client certificates.
    """

    name: str
    factory: Callable[[Session], AnyMechanism]
    plaintext: bool = False
    client_first: bool = True
    needs_tls: bool = False
    password: bool = False
    secret_kinds: tuple[str, ...] = ()
    token_validator: bool = False
    client_certificate: bool = False


class NoLookup:
    """Mixin for mechanisms that never return ``Lookup``."""

    def resume(self, secret: Secret | None) -> Outcome:
        raise MechanismStateError(f"{type(self).__name__} never asked for a secret")


class ClientFirst:
    """The start of a client-first mechanism: the first client message comes as the
    AUTH command's initial response, or after an empty challenge (RFC 4954), and goes
    to ``_first``; until it comes the stage is ``first_stage``."""

    name = ""
    first_stage = "waiting"
    _stage: str

    def start(self, initial: bytes | None) -> Outcome:
        if self._stage != "new":
            raise MechanismStateError(f"{self.name} already started")
        if initial is None:
            self._stage = self.first_stage
            return Reply(b"")
        return self._first(initial)

    def _first(self, message: bytes) -> Outcome:
        raise NotImplementedError


class SingleMessage(ClientFirst, NoLookup):
    """A client-first mechanism of one client message (PLAIN, EXTERNAL); subclasses
    judge the message in ``_first``."""

    def __init__(self, session: Session | None = None) -> None:
        self._stage = "new"

    def receive(self, response: bytes) -> Outcome:
        if self._stage != "waiting":
            raise MechanismStateError(f"{self.name} is not waiting for a response (stage {self._stage})")
        return self._first(response)
