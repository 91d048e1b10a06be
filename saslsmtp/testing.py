"""Test helpers for users of saslsmtp: drive ``SubmissionESMTP`` without sockets.

Example (pytest)::

    from saslsmtp.testing import SMTPHarness

    def test_login():
        h = SMTPHarness(users={"alice": "secret"})
        h.send(b"EHLO client.example\\r\\n")
        assert h.send(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\\r\\n") == (
            b"235 2.7.0 Authentication successful\\r\\n")

Everything is injected: a ``task.Clock`` (advance it for failure delays and script
timeouts), any cred checkers, mechanisms (built-in or scripted), a resolver for
``Lookup``, and an in-memory realm that keeps delivered messages.  The in-memory
``users`` also hand out their passwords as plaintext secrets, so CRAM-MD5 and SCRAM log
in against them as against a users file's ``{PLAIN}`` entries.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any, Iterable, Mapping

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ISSLTransport, ITLSTransport
from twisted.internet.testing import StringTransport
from twisted.mail import smtp
from twisted.mail.interfaces import IMessageDelivery
from zope.interface import alsoProvides, implementer

from saslsmtp.checkers.chain import BackendChain, TrustedIdentityChecker
from saslsmtp.checkers.secrets import ISecretSource, ITokenValidator
from saslsmtp.credentials import AvatarId
from saslsmtp.engine_settings import not_one_name
from saslsmtp.mechanisms import builtin_mechanisms
from saslsmtp.octets import as_bytes
from saslsmtp.resolver import secret_resolver
from saslsmtp.sasl.mechanism import MechanismSpec
from saslsmtp.sasl.outcome import Secret, Session
from saslsmtp.protocol import EngineSettings, SubmissionESMTP

__all__ = ["SMTPHarness", "MemoryRealm", "MemoryDelivery", "MemoryMessage", "MemoryUsers",
           "TLSStringTransport"]


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    """A StringTransport that can "start TLS": it records the call and then provides
    ``ISSLTransport``, as a real TCP transport does after the handshake."""

    tls_started_with: Any = None

    def startTLS(self, contextFactory: Any, normal: bool = True) -> None:
        self.tls_started_with = contextFactory
        alsoProvides(self, ISSLTransport)

    # The rest of ITCPTransport (which ITLSTransport extends): the server never calls
    # these, a real transport has them, and declaring the interface means having them.
    def loseWriteConnection(self) -> None:
        self.loseConnection()

    def getTcpNoDelay(self) -> bool:
        return False

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    def getTcpKeepAlive(self) -> bool:
        return False

    def setTcpKeepAlive(self, enabled: bool) -> None:
        pass


@implementer(smtp.IMessage)
class MemoryMessage:
    """A message kept in memory; ``data`` once complete."""

    def __init__(self, store: list[bytes]) -> None:
        self._store = store
        self._lines: list[bytes] = []

    def lineReceived(self, line: bytes) -> None:
        self._lines.append(line)

    def eomReceived(self) -> "defer.Deferred[None]":
        self._store.append(b"\r\n".join(self._lines) + b"\r\n")
        return defer.succeed(None)

    def connectionLost(self) -> None:
        self._lines = []


@implementer(IMessageDelivery)
class MemoryDelivery:
    """Avatar for tests: one shared message per transaction."""

    def __init__(self, username: str, store: list[bytes]) -> None:
        self.username = username
        self._store = store
        self._message: MemoryMessage | None = None

    def receivedHeader(self, helo: Any, origin: Any, recipients: Any) -> None:
        return None

    def validateFrom(self, helo: Any, origin: smtp.Address) -> smtp.Address:
        self._message = None
        return origin

    def validateTo(self, user: smtp.User) -> Any:
        def message() -> MemoryMessage:
            if self._message is None:
                self._message = MemoryMessage(self._store)
            return self._message
        return message


@implementer(ICredentialsChecker, ISecretSource)
class MemoryUsers:
    """The harness's ``users``: checks passwords and, like a users file's ``{PLAIN}``
    entries, hands them out as plaintext secrets, so the challenge mechanisms (CRAM-MD5,
    SCRAM) can be tested without a file."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, users: Mapping[str, str]) -> None:
        self._users = dict(users)

    def requestAvatarId(self, credentials: Any) -> "defer.Deferred[AvatarId]":
        username = as_bytes(credentials.username).decode("utf-8", "replace")
        password = self._users.get(username)
        if password is not None and credentials.checkPassword(password.encode("utf-8")):
            return defer.succeed(username.encode("utf-8"))
        return defer.fail(UnauthorizedLogin())

    def secret_kinds(self) -> frozenset[str]:
        return frozenset({"plaintext"})

    def lookup_secret(self, username: str, kinds: tuple[str, ...],
                      session: Session | None = None) -> "defer.Deferred[Secret | None]":
        password = self._users.get(username)
        if password is None or "plaintext" not in kinds:
            return defer.succeed(None)
        return defer.succeed(Secret("plaintext", password))


@implementer(IRealm)
class MemoryRealm:
    """Keeps every delivered message in ``messages``; logins in ``logins``."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.logins: list[str] = []
        self.logouts = 0

    def requestAvatar(self, avatarId: AvatarId, mind: Any, *interfaces: Any) -> tuple[Any, ...]:
        name = avatarId.decode("utf-8") if isinstance(avatarId, bytes) else str(avatarId)
        self.logins.append(name)

        def logout() -> None:
            self.logouts += 1
        return IMessageDelivery, MemoryDelivery(name, self.messages), logout


class SMTPHarness:
    """One ``SubmissionESMTP`` connection over a string transport.

    ``send(data)`` feeds client bytes and returns what the server wrote since.

    * ``users`` (name -> password) become an in-memory backend named ``"users"``
      (``MemoryUsers``: CRAM-MD5 and SCRAM use its passwords too);
      ``backends`` adds named checkers (fakes or real ones); the password mechanisms
      use them in order, like ``auth.backends``.  ``checkers`` replaces the portal's
      password checkers entirely.
    * ``resolver``: answers the challenge mechanisms' ``Lookup`` and the token
      mechanisms' ``ValidateToken``; by default the named backends that provide
      ``ISecretSource`` / ``ITokenValidator`` (``users`` included).  Without one, a
      built-in that nothing could serve (CRAM-MD5 with only a password checker) is a
      ``ValueError``, as it would stop the daemon.
    * ``script``: a path to an AUTH script (or an ``auth`` callable): PLAIN/LOGIN then
      go to it, and every name in ``mechanism_names`` that is not built in is served by it.
    * ``settings`` / keyword overrides: ``EngineSettings`` fields (by default
      ``require_tls=False`` and ``failure_delay=0`` for brevity).
    * ``clock``: a ``task.Clock`` (created if omitted) for failure delays and timeouts.

    One harness is one server start: a script given as a path is imported here, once, as
    the daemon imports it at start (and at a reload).  ``connect()`` opens another
    connection to the same server (shared module globals, a fresh ``context``); a second
    ``SMTPHarness(script=path)`` is a restart, with a freshly imported module.

    * ``realm``: where mail goes (default ``MemoryRealm``); ``sender_check``: MAIL FROM's.
    """

    def __init__(self, *, users: Mapping[str, str] | None = None,
                 backends: Mapping[str, ICredentialsChecker] | None = None,
                 checkers: Iterable[ICredentialsChecker] | None = None,
                 script: Any = None, script_timeout: float = 10.0,
                 mechanisms: Mapping[str, MechanismSpec] | None = None,
                 mechanism_names: Iterable[str] | None = None,
                 settings: EngineSettings | None = None,
                 resolver: Any = None, tls: bool = False, starttls: bool = False,
                 clock: task.Clock | None = None, peer: str = "192.0.2.10",
                 realm: Any = None, sender_check: Any = None, **overrides: Any) -> None:
        from saslsmtp.script import (AuthScript, Backends, ScriptPasswordChecker, ScriptRunner,
                                     load_script)
        self.script_runner: ScriptRunner | None = None
        self.clock = clock or task.Clock()
        self.realm = realm or MemoryRealm()
        named: dict[str, ICredentialsChecker] = {}
        if users is not None:
            named["users"] = MemoryUsers(users)
        named.update(backends or {})
        self.backends = named
        not_one_name(mechanism_names, "mechanism_names")
        names = tuple(m.upper() for m in mechanism_names) if mechanism_names is not None else None
        specs = dict(mechanisms) if mechanisms is not None else builtin_mechanisms(names or ())
        password_checker: ICredentialsChecker = BackendChain(list(named.items()))
        if script is not None:
            loaded = (script if isinstance(script, AuthScript) else
                      AuthScript("<test>", script, None) if callable(script) else load_script(str(script)))
            self.script_runner = ScriptRunner(loaded, self.clock, script_timeout, Backends(named))
            password_checker = ScriptPasswordChecker(self.script_runner)
            declared = loaded.mechanisms  # as the daemon: a built-in only when declared
            for name in names or ():
                if name in specs and (declared is None or name not in declared):
                    continue
                if declared is not None and name not in declared:
                    raise ValueError(f"{name} is not built in and {loaded.path} does not serve"
                                     f" it (its MECHANISMS: {', '.join(sorted(declared))})")
                specs[name] = loaded.spec(name, self.script_runner, specs.get(name))
        unknown = [name for name in names or () if name not in specs]
        if unknown:  # it would silently not be offered: the test would see 504, not why
            raise ValueError(f"{', '.join(unknown)}: not built in and no script serves it"
                             " (pass script= or mechanisms=)")
        if resolver is None:
            resolver = _backend_resolver(named, specs, names or ())
        if checkers is None:
            checkers = [password_checker]
        self.portal = Portal(self.realm, [*checkers, TrustedIdentityChecker()])
        self.mechanisms = specs
        base = settings or EngineSettings(require_tls=False, failure_delay=0.0)
        if names is not None:
            base = replace(base, mechanisms=names)
        elif settings is None:
            base = replace(base, mechanisms=tuple(mechanisms) if mechanisms is not None
                           else ("PLAIN", "LOGIN"))
        self.settings = replace(base, **overrides)
        self._connection = dict(tls=tls, starttls=starttls, peer=peer, resolver=resolver,
                                sender_check=sender_check)
        self._open()

    def _open(self) -> None:
        """A new connection (transport and protocol) to this harness's server."""
        tls, starttls = self._connection["tls"], self._connection["starttls"]
        transport_class = TLSStringTransport if starttls else StringTransport
        self.transport = transport_class(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 587),
            peerAddress=IPv4Address("TCP", self._connection["peer"], 54321))
        if tls:
            alsoProvides(self.transport, ISSLTransport)
        kwargs: dict[str, Any] = {}
        if self._connection["resolver"] is not None:
            kwargs["resolver"] = self._connection["resolver"]
        self.protocol = SubmissionESMTP(
            portal=self.portal, settings=self.settings, mechanisms=self.mechanisms,
            clock=self.clock, tls_context=object() if starttls else None,
            script=self.script_runner, sender_check=self._connection["sender_check"], **kwargs)
        self.protocol.makeConnection(self.transport)
        if tls:
            self.protocol.handshakeCompleted()  # a string transport has no handshake
        self.greeting = self.take()

    def connect(self, peer: str | None = None) -> "SMTPHarness":
        """Another connection to the same server: the same portal, backends, realm, clock
        and AUTH script (imported once, so its module globals are shared, as in the
        daemon); a new transport, protocol and script ``context``."""
        other = copy.copy(self)
        other._connection = dict(self._connection, peer=peer or self._connection["peer"])
        other._open()
        return other

    @property
    def tls_started_with(self) -> Any:
        """The context STARTTLS started TLS with on this connection (``None`` before, and
        without ``starttls=True``): ``transport`` is only a ``TLSStringTransport`` then."""
        return getattr(self.transport, "tls_started_with", None)

    def take(self) -> bytes:
        """What the server wrote since the last call."""
        value = self.transport.value()
        self.transport.clear()
        return value

    def send(self, data: bytes) -> bytes:
        """Feed ``data`` as if the client sent it; return the server's output."""
        self.protocol.dataReceived(data)
        return self.take()

    def login(self, username: str, password: str) -> bytes:
        """EHLO + AUTH PLAIN with an initial response; returns the AUTH reply."""
        import base64
        self.send(b"EHLO client.example\r\n")
        blob = base64.b64encode(b"\0" + username.encode() + b"\0" + password.encode())
        return self.send(b"AUTH PLAIN " + blob + b"\r\n")

    def close(self) -> None:
        """Drop the connection (runs ``connectionLost``)."""
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure
        self.protocol.connectionLost(Failure(ConnectionDone()))


def _backend_resolver(named: Mapping[str, Any], specs: Mapping[str, MechanismSpec],
                      names: Iterable[str]) -> Any:
    """The daemon's resolver over the harness's backends: stored secrets from those that
    provide ``ISecretSource``, token verdicts from the ``ITokenValidator``s.  A built-in
    in ``names`` that neither could ever serve is a ``ValueError`` (the daemon refuses to
    start with it) rather than a 454 at every attempt."""
    sources = [b for b in named.values() if ISecretSource.providedBy(b)]
    validators = [b for b in named.values() if ITokenValidator.providedBy(b)]
    for name in names:
        spec = specs.get(name)
        if spec is None:
            continue
        kinds = set(spec.secret_kinds)
        if kinds and not any(kinds & set(s.secret_kinds()) for s in sources):
            raise ValueError(f"{name} needs a stored secret: pass users= (or backends= with a"
                             " file checker), or resolver=")
        if spec.token_validator and not validators:
            raise ValueError(f"{name} needs a token validator: pass backends= with an"
                             " oauth2 checker, or resolver=")
    return secret_resolver(sources, validators)
