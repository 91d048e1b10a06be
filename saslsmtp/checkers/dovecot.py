"""``type = "dovecot"``: ask a Dovecot auth server over its auth client protocol.

Theory of operation (Dovecot's auth client protocol, as documented by Dovecot):

* ``DovecotAuthClientProtocol`` (in ``dovecotwire``) is the wire: escaping, the
  handshake, ``AUTH``/``CONT``/``OK``/``FAIL`` and ``CANCEL``, any number of requests in
  flight on one connection, matched by id.
* ``DovecotChecker`` is the policy: one persistent connection, opened lazily by the first
  request and again by the first request after it died.  Requests that arrive while the
  connection or its handshake is under way wait for it.  Every request is bounded by
  ``timeout`` as a whole (connect, handshake, answer), plus ``penalty_allowance`` when the
  client address has failed recently: Dovecot's auth penalty then delays its answer by up
  to 15 s on purpose, and that must end in the ``FAIL`` (535), not in a 454 the client
  retries.  A request that times out is cancelled alone (``CANCEL``); the connection and
  the other requests on it stay.  Only a server that has said nothing at all for
  ``hung_after`` seconds while requests were waiting is dropped as hung, so the next
  request starts afresh.  ``OK`` accepts (with Dovecot's ``user=``, the canonical user
  name, as the identity), ``FAIL`` rejects, ``FAIL`` with ``code=temp_fail`` (or the old
  ``temp`` flag), a dead socket, a timeout or a protocol error is a ``TemporaryFailure``.

Passwords only ever travel inside ``resp=``; they are never logged nor put in exceptions.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterable

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.endpoints import clientFromString, quoteStringArgument
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from saslsmtp.checkers.dovecotwire import (AUTH_CLIENT_MAX_LINE_LENGTH, CLIENT_VERSION,
                                           MAX_REQUEST_ID, TEMPORARY_FAIL_CODES,
                                           DovecotAuthClientProtocol, Handshake,
                                           ProtocolError, ServerReply, parse_params,
                                           tab_escape, tab_unescape)
from saslsmtp.checkers.outage import OutageLog
from saslsmtp.checkers.quiet import connect_protocol
from saslsmtp.credentials import AvatarId
from saslsmtp.errors import TemporaryFailure
from saslsmtp.options import PATH, OptionProblem, Options, problem_if
from saslsmtp.sasl.outcome import Session

__all__ = ["AUTH_CLIENT_MAX_LINE_LENGTH", "CLIENT_VERSION", "DOVECOT_FAILURE_DELAY",
           "DOVECOT_PENALTY_MAX", "MAX_REQUEST_ID", "PENALTY_ALLOWANCE", "PENALTY_MEMORY",
           "PENALTY_MEMORY_SIZE", "TEMPORARY_FAIL_CODES", "DovecotAuthClientProtocol",
           "DovecotChecker", "DovecotOptions", "Handshake", "ProtocolError", "ServerReply",
           "endpoint_description", "from_config", "parse_params", "tab_escape",
           "tab_unescape"]

log = Logger(namespace="saslsmtp.checkers.dovecot")

DOVECOT_PENALTY_MAX = 15.0
"""Dovecot's auth penalty: a failure from an address delays that address's next requests
by 2 s, doubling per failure, at most this long (AUTH_PENALTY_MAX_SECS)."""
DOVECOT_FAILURE_DELAY = 2.0
"""Dovecot's default ``auth_failure_delay``: every FAIL waits this long on top."""
PENALTY_ALLOWANCE = DOVECOT_PENALTY_MAX + DOVECOT_FAILURE_DELAY
"""Extra seconds a request from a recently failed address may take."""
PENALTY_MEMORY = 3600.0
"""How long an address that failed is remembered (Dovecot's anvil keeps penalties an hour)."""
PENALTY_MEMORY_SIZE = 65536
"""At most this many addresses are remembered (the oldest are forgotten first)."""

# --------------------------------------------------------------------------
# The checker
# --------------------------------------------------------------------------


@implementer(ICredentialsChecker)
class DovecotChecker:
    """Verifies a username and password with ``AUTH PLAIN`` on one shared connection.

    ``endpoint`` is an ``IStreamClientEndpoint`` to Dovecot's auth-client listener
    (UNIX or TCP); ``reactor`` supplies time; ``timeout`` bounds each check as a whole,
    ``penalty_allowance`` more for a client address that failed in the last hour (Dovecot's
    penalty); ``hung_after`` (default: the longest a check may take, plus ``timeout``) is
    how long a server may stay silent while it owes answers before the connection is
    dropped.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, *, reactor: Any, endpoint: IStreamClientEndpoint, timeout: float = 5.0,
                 service: str = "smtp", name: str = "dovecot", where: str = "",
                 pid: int | None = None, penalty_allowance: float = PENALTY_ALLOWANCE,
                 hung_after: float | None = None) -> None:
        self.reactor = reactor
        self.endpoint = endpoint
        self.timeout = timeout
        self.penalty_allowance = penalty_allowance
        self.hung_after = (2 * timeout + penalty_allowance) if hung_after is None else hung_after
        self._failed_at: OrderedDict[str, float] = OrderedDict()
        self.service = service
        self.name = name
        self.where = where or repr(endpoint)
        self.pid = pid
        self.connection_attempts = 0
        self._protocol: DovecotAuthClientProtocol | None = None
        self._attempt: Deferred | None = None
        self._waiters: list[Deferred] = []
        # one warning when logins start failing, one line when they work again (not a
        # warning per login, nor per reconnection, while Dovecot is down or not Dovecot)
        self.outages = OutageLog(name, reactor.seconds)

    def __repr__(self) -> str:
        return f"<DovecotChecker {self.name} {self.where}>"

    # ---- ICredentialsChecker -------------------------------------------------

    def requestAvatarId(self, credentials: IUsernamePassword) -> Deferred[AvatarId]:
        """Fires with the username Dovecot confirmed; see the module docstring for failures."""
        username = _as_bytes(credentials.username)
        password = _as_bytes(credentials.password)
        if b"\0" in username or b"\0" in password:
            # cannot be expressed in PLAIN, so cannot be right
            d: Deferred[AvatarId] = Deferred()
            d.errback(UnauthorizedLogin("NUL in the username or password"))
            return d
        session = getattr(credentials, "session", None) or Session()
        limit = self.time_limit(session.remote_ip)
        d = Deferred.fromCoroutine(self._check(username, password, session))
        d.addTimeout(limit, self.reactor)
        d.addErrback(self._translate, limit)
        return self.outages.watch(d)

    def time_limit(self, remote_ip: str | None) -> float:
        """Seconds a check from ``remote_ip`` may take: ``timeout``, plus the penalty
        allowance if Dovecot may be penalizing that address (it failed within the hour)."""
        if remote_ip is None or self.penalty_allowance <= 0:
            return self.timeout
        failed = self._failed_at.get(remote_ip)
        if failed is None:
            return self.timeout
        if self.reactor.seconds() - failed > PENALTY_MEMORY:
            del self._failed_at[remote_ip]
            return self.timeout
        return self.timeout + self.penalty_allowance

    def _remember_failure(self, remote_ip: str | None) -> None:
        if remote_ip is None:
            return
        self._failed_at.pop(remote_ip, None)
        self._failed_at[remote_ip] = self.reactor.seconds()
        while len(self._failed_at) > PENALTY_MEMORY_SIZE:
            self._failed_at.popitem(last=False)

    async def _check(self, username: bytes, password: bytes, session: Session) -> AvatarId:
        protocol = await self._connection()
        reply = await protocol.authenticate("PLAIN", self._params(session),
                                            b"\0" + username + b"\0" + password)
        if reply.ok:
            # user= is the canonical name (auth_username_format, passdb); not original_user=
            return reply.params.get("user") or username
        if reply.temporary:
            code = (reply.params.get("code") or b"temp").decode("latin-1", "replace")
            raise TemporaryFailure(f"Dovecot failed temporarily ({code})")
        self._remember_failure(session.remote_ip)
        raise UnauthorizedLogin("Dovecot refused the credentials")

    def _params(self, session: Session) -> list[tuple[str, str | None]]:
        """Postfix's AUTH parameters: service, nologin, lip, rip, secured."""
        params: list[tuple[str, str | None]] = [("service", self.service), ("nologin", None)]
        if session.local_ip:
            params.append(("lip", session.local_ip))
        if session.remote_ip:
            params.append(("rip", session.remote_ip))
        if session.tls:
            params.append(("secured", None))
        return params

    def _translate(self, failure: Failure, limit: float) -> Failure:
        if failure.check(UnauthorizedLogin, TemporaryFailure):
            return failure
        if failure.check(TimeoutError):
            return Failure(TemporaryFailure(
                f"no answer from Dovecot at {self.where} within {limit:g}s"))
        if failure.check(CancelledError):
            return Failure(TemporaryFailure("the Dovecot check was cancelled"))
        log.failure("unexpected error in the Dovecot backend {name}", failure, name=self.name)
        return Failure(TemporaryFailure("unexpected error in the Dovecot backend"))

    # ---- the shared connection ---------------------------------------------------

    def _connection(self) -> Deferred[DovecotAuthClientProtocol]:
        """The ready protocol now, or a Deferred for the connection being made."""
        if self._protocol is not None and self._protocol.usable:
            return succeed(self._protocol)
        self._protocol = None
        waiter: Deferred[DovecotAuthClientProtocol] = Deferred(self._waiters.remove)
        self._waiters.append(waiter)
        if self._attempt is None:
            self._connect()
        return waiter

    def _connect(self) -> None:
        self.connection_attempts += 1
        protocol = DovecotAuthClientProtocol(self.pid, clock=self.reactor,
                                             hung_after=self.hung_after)
        # set before adding callbacks: they may run at once (and clear it)
        self._attempt = attempt = connect_protocol(self.endpoint, protocol)
        attempt.addCallback(lambda _: protocol.handshake)
        attempt.addTimeout(self.timeout, self.reactor)
        attempt.addCallbacks(lambda server: self._connected(protocol, server), self._failed)

    def _connected(self, protocol: DovecotAuthClientProtocol, server: Handshake) -> None:
        self._attempt = None
        if "PLAIN" not in server.mechanisms:
            protocol.tcp_transport.loseConnection()
            return self._failed(Failure(TemporaryFailure(
                "Dovecot does not offer PLAIN (add plain to auth_mechanisms)")))
        log.info("connected to Dovecot auth at {where} (protocol {major}.{minor})",
                 where=self.where, major=server.version[0], minor=server.version[1])
        self._protocol = protocol
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(protocol)

    def _failed(self, failure: Failure) -> None:
        self._attempt = None
        if failure.check(TemporaryFailure):
            why = str(failure.value)
        elif failure.check(TimeoutError, CancelledError):
            why = f"no connection and handshake within {self.timeout:g}s"
        else:
            why = failure.getErrorMessage() or failure.type.__name__
        # the waiting logins fail with it: the outage log warns once for the outage
        log.debug("cannot use Dovecot auth at {where}: {why}", where=self.where, why=why)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(TemporaryFailure(f"Dovecot auth at {self.where} unavailable: {why}"))

    def stop(self) -> None:
        """Drop the connection (the service is stopping); a later request would reconnect."""
        protocol, self._protocol = self._protocol, None
        if protocol is not None and protocol.connected_now:
            protocol.tcp_transport.loseConnection()
        if self._attempt is not None:
            self._attempt.cancel()


def _as_bytes(value: bytes | str) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------


def endpoint_description(socket: str, timeout: float) -> str:
    """``socket`` (a UNIX path, ``unix:PATH`` or ``tcp:HOST:PORT``) -> an endpoint string."""
    connect_timeout = max(1, int(timeout + 0.999))
    if socket.startswith("tcp:"):
        rest = socket[4:]
        if rest.startswith("["):  # tcp:[::1]:PORT
            host, sep, port = rest[1:].partition("]:")
        else:
            host, sep, port = rest.partition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{socket!r} is not tcp:HOST:PORT (IPv6 as [ADDRESS])")
        return (f"tcp:host={quoteStringArgument(host)}:port={int(port)}"
                f":timeout={connect_timeout}")
    path = socket[5:] if socket.startswith("unix:") else socket
    if not path:
        raise ValueError("empty UNIX socket path")
    return f"unix:path={quoteStringArgument(path)}:timeout={connect_timeout}"


_SERVICE = re.compile(r"\A[A-Za-z0-9._-]{1,64}\Z")


@dataclass(frozen=True)
class DovecotOptions(Options):
    """``[backends.NAME] type = "dovecot"``: where Dovecot's auth socket is, and how long
    to wait for it."""

    socket: str = field(default="", metadata=PATH)  # a UNIX socket path, or "tcp:HOST:PORT"
    timeout: float = 5.0
    service: str = "smtp"

    def check(self) -> Iterable[OptionProblem]:
        problems = [*problem_if(self.timeout <= 0, "timeout", "must be positive"),
                    *problem_if(not _SERVICE.match(self.service), "service",
                                f"{self.service!r} is not a service name (letters, digits, '-',"
                                " '_' and '.': it is sent as one field of Dovecot's protocol)")]
        if not self.socket:
            return problems + [OptionProblem("socket", "is required")]
        try:
            endpoint_description(self.socket, max(self.timeout, 1.0))
        except ValueError as e:
            problems.append(OptionProblem("socket", str(e)))
        return problems


def from_config(name: str, options: DovecotOptions, deps: Any) -> DovecotChecker:
    """The checker for one ``[backends.NAME]`` table of ``type = "dovecot"``."""
    endpoint = clientFromString(deps.reactor, endpoint_description(options.socket,
                                                                   options.timeout))
    return DovecotChecker(reactor=deps.reactor, endpoint=endpoint, timeout=options.timeout,
                          service=options.service, name=name, where=options.socket)
