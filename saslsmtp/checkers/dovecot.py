"""``type = "dovecot"``: ask a Dovecot auth server over its auth client protocol.

Theory of operation (Dovecot's auth client protocol, as documented by Dovecot):

* ``DovecotAuthClientProtocol`` is the wire: LF-terminated, TAB-separated lines with
  Dovecot's ``\\001`` escaping.  On connect it sends ``VERSION 1 2`` and ``CPID`` at once,
  then reads the server's ``VERSION``/``MECH``/``SPID``/``CUID``/``COOKIE``/``DONE``.  That
  order works with Dovecot 2.3 (whole handshake sent at once) and 2.4 (the server sends the
  rest only after our ``VERSION``).  ``authenticate()`` sends one ``AUTH`` line with a fresh
  id and returns a Deferred fired by the matching ``OK``/``FAIL``; any number of requests
  are in flight at once, matched by id.
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

import base64
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence, cast

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.endpoints import clientFromString, connectProtocol, quoteStringArgument
from twisted.internet.interfaces import IStreamClientEndpoint, ITCPTransport
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from saslsmtp.credentials import AvatarId
from saslsmtp.errors import TemporaryFailure
from saslsmtp.options import PATH, OptionProblem, Options, problem_if
from saslsmtp.sasl.outcome import Session

log = Logger(namespace="saslsmtp.checkers.dovecot")

AUTH_CLIENT_MAX_LINE_LENGTH = 16384
CLIENT_VERSION = (1, 2)
"""Minor 2: an empty ``resp=`` means an empty initial response (SPECS 4.3)."""
MAX_REQUEST_ID = 2**32 - 1
TEMPORARY_FAIL_CODES = frozenset({"temp_fail", "invalid_base64"})
"""``FAIL`` codes that say nothing about the credentials (``invalid_base64`` is our bug)."""
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
# Escaping (Dovecot's str_tabescape / str_tabunescape)
# --------------------------------------------------------------------------

_ESCAPES = {0x01: b"\x011", 0x00: b"\x010", 0x09: b"\x01t", 0x0D: b"\x01r", 0x0A: b"\x01n"}
_UNESCAPES = {ord("0"): 0x00, ord("1"): 0x01, ord("t"): 0x09, ord("r"): 0x0D, ord("n"): 0x0A}


def tab_escape(value: bytes | str) -> bytes:
    """Escape one field: ``\\001`` first, then NUL, TAB, CR and LF as ``\\001`` + a letter."""
    raw = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    if not any(b in _ESCAPES for b in raw):
        return raw
    return b"".join(_ESCAPES.get(b, bytes((b,))) for b in raw)


def tab_unescape(field_: bytes) -> bytes:
    """Undo ``tab_escape``; an unknown escape letter stands for itself (as Dovecot does)."""
    if b"\x01" not in field_:
        return field_
    out = bytearray()
    i = 0
    while i < len(field_):
        b = field_[i]
        if b == 0x01 and i + 1 < len(field_):
            nxt = field_[i + 1]
            out.append(_UNESCAPES.get(nxt, nxt))
            i += 2
        else:
            out.append(b)
            i += 1
    return bytes(out)


def parse_params(fields: Sequence[bytes]) -> dict[str, bytes | None]:
    """``name=value`` fields -> {name: unescaped value}; bare flags -> {name: None}."""
    params: dict[str, bytes | None] = {}
    for f in fields:
        name, sep, value = f.partition(b"=")
        params[name.decode("latin-1")] = tab_unescape(value) if sep else None
    return params


# --------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerReply:
    """The server's final answer to one ``AUTH``: ``OK`` or ``FAIL`` and its parameters."""

    command: str
    request_id: int
    params: Mapping[str, bytes | None] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True for ``OK``."""
        return self.command == "OK"

    @property
    def temporary(self) -> bool:
        """A ``FAIL`` that says nothing about the credentials (``code=temp_fail``, ``temp``)."""
        code = (self.params.get("code") or b"").decode("latin-1")
        return not self.ok and (code in TEMPORARY_FAIL_CODES or "temp" in self.params)


@dataclass(frozen=True)
class Handshake:
    """What the server announced before ``DONE``."""

    version: tuple[int, int]
    mechanisms: Mapping[str, tuple[str, ...]]
    spid: str = ""
    cuid: str = ""
    cookie: str = ""


class ProtocolError(TemporaryFailure):
    """The server said something the auth client protocol does not allow."""


@dataclass
class _Pending:
    deferred: Deferred
    unsent_response: bytes | None  # sent on the first CONT when there was no resp=
    lines_at_send: int


# --------------------------------------------------------------------------
# The wire
# --------------------------------------------------------------------------


class DovecotAuthClientProtocol(LineOnlyReceiver):
    """The client side of Dovecot's auth protocol on one connection.

    ``handshake`` fires with a ``Handshake`` at ``DONE`` (or fails with
    ``TemporaryFailure``); then ``authenticate()`` may be called any number of times,
    concurrently.  A lost connection fails every pending request with ``TemporaryFailure``.
    """

    delimiter = b"\n"
    MAX_LENGTH = AUTH_CLIENT_MAX_LINE_LENGTH

    def __init__(self, pid: int | None = None, *, clock: Any = None,
                 hung_after: float | None = None) -> None:
        self.pid = os.getpid() if pid is None else pid
        self.clock = clock
        self.hung_after = hung_after
        self.handshake: Deferred[Handshake] = Deferred(self._cancel_handshake)
        self.server: Handshake | None = None
        self.lines_received = 0
        self.quiet_since = 0.0  # the last line, or the first request sent after a quiet spell
        self.connected_now = False
        self._version: tuple[int, int] | None = None
        self._mechanisms: dict[str, tuple[str, ...]] = {}
        self._info: dict[str, str] = {}
        self._pending: dict[int, _Pending] = {}
        self._next_id = 1
        self._closed_reason: str | None = None

    # ---- state -----------------------------------------------------------

    @property
    def tcp_transport(self) -> ITCPTransport:
        """The TCP or UNIX transport; set by ``makeConnection`` before any call here."""
        return cast(ITCPTransport, self.transport)

    @property
    def usable(self) -> bool:
        """Connected, handshake done, not closing."""
        return (self.connected_now and self.server is not None and self._closed_reason is None
                and not getattr(self.transport, "disconnecting", False))

    # ---- connection events -------------------------------------------------

    def connectionMade(self) -> None:
        self.connected_now = True
        major, minor = CLIENT_VERSION
        self.tcp_transport.write(b"VERSION\t%d\t%d\nCPID\t%d\n" % (major, minor, self.pid))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected_now = False
        why = self._closed_reason or "connection to the Dovecot auth server lost"
        if not self.handshake.called:
            self.handshake.errback(TemporaryFailure(f"{why} during the handshake"))
        pending, self._pending = self._pending, {}
        for request in pending.values():
            request.deferred.errback(TemporaryFailure(why))

    def _fatal(self, why: str) -> None:
        """Protocol violation: log, remember why, drop the connection (pending requests fail)."""
        log.error("Dovecot auth protocol error: {why}", why=why)
        self._closed_reason = f"Dovecot auth protocol error: {why}"
        if not self.handshake.called:
            self.handshake.errback(ProtocolError(self._closed_reason))
        self.tcp_transport.abortConnection()

    def _cancel_handshake(self, d: Deferred) -> None:
        self._closed_reason = "no complete handshake from the Dovecot auth server in time"
        d.errback(TemporaryFailure(self._closed_reason))
        self.tcp_transport.abortConnection()

    def lineLengthExceeded(self, line: bytes) -> None:
        self._fatal(f"line longer than {self.MAX_LENGTH} bytes")

    # ---- incoming lines --------------------------------------------------------

    def _now(self) -> float:
        return float(self.clock.seconds()) if self.clock is not None else 0.0

    def lineReceived(self, line: bytes) -> None:
        self.lines_received += 1
        self.quiet_since = self._now()
        if self._closed_reason is not None:  # dropping the connection: ignore the rest
            return
        fields = line.split(b"\t")
        command = fields[0].decode("latin-1")
        if self.server is None:
            self._handshake_line(command, fields[1:])
        else:
            self._reply_line(command, fields[1:])

    def _handshake_line(self, command: str, args: list[bytes]) -> None:
        if self.handshake.called:  # failed or cancelled: ignore the rest
            return
        if command == "VERSION":
            try:
                version = (int(args[0]), int(args[1]))
            except (IndexError, ValueError):
                return self._fatal("malformed VERSION line")
            if version[0] != CLIENT_VERSION[0]:
                return self._fatal(f"server speaks protocol version {version[0]}, "
                                   f"this client {CLIENT_VERSION[0]}")
            self._version = version
        elif self._version is None:
            self._fatal(f"{command or 'an empty line'} before VERSION")
        elif command == "MECH":
            if not args or not args[0]:
                return self._fatal("MECH without a name")
            self._mechanisms[args[0].decode("latin-1").upper()] = tuple(
                a.decode("latin-1") for a in args[1:])
        elif command == "SPID" and not self._mechanisms:
            # Postfix's rule: an auth-master or auth-userdb socket says SPID and no MECH.
            self._fatal("SPID before any MECH: this is not an auth-client socket "
                        "(auth-master or auth-userdb?)")
        elif command in ("SPID", "CUID", "COOKIE"):
            self._info[command] = args[0].decode("latin-1") if args else ""
        elif command == "DONE":
            self.server = Handshake(self._version, dict(self._mechanisms),
                                    spid=self._info.get("SPID", ""),
                                    cuid=self._info.get("CUID", ""),
                                    cookie=self._info.get("COOKIE", ""))
            self.handshake.callback(self.server)
        # anything else: unknown handshake lines are ignored (forward compatibility)

    def _reply_line(self, command: str, args: list[bytes]) -> None:
        if command not in ("OK", "FAIL", "CONT"):
            log.debug("ignoring Dovecot auth line {command}", command=command)
            return
        try:
            request_id = int(args[0])
        except (IndexError, ValueError):
            return self._fatal(f"{command} without a valid request id")
        request = self._pending.get(request_id)
        if request is None:  # e.g. the answer to a request we cancelled
            log.debug("ignoring {command} for unknown request {id}", command=command,
                      id=request_id)
            return
        if command == "CONT":
            return self._continue(request_id, request, args[1:])
        del self._pending[request_id]
        request.deferred.callback(ServerReply(command, request_id, parse_params(args[1:])))

    def _continue(self, request_id: int, request: _Pending, args: list[bytes]) -> None:
        challenge = args[0] if args else b""
        if request.unsent_response is not None and challenge == b"":
            data, request.unsent_response = request.unsent_response, None
            self.tcp_transport.write(b"CONT\t%d\t%s\n" % (request_id, base64.b64encode(data)))
            return
        # PLAIN has no second round: give up on this request, keep the connection.
        log.warn("unexpected CONT from the Dovecot auth server for request {id}",
                 id=request_id)
        del self._pending[request_id]
        self.tcp_transport.write(b"CANCEL\t%d\n" % request_id)
        request.deferred.errback(ProtocolError("unexpected CONT from the Dovecot auth server"))

    # ---- requests ----------------------------------------------------------------

    def _allocate_id(self) -> int:
        for _ in range(len(self._pending) + 1):
            request_id = self._next_id
            self._next_id = 1 if self._next_id >= MAX_REQUEST_ID else self._next_id + 1
            if request_id not in self._pending:
                return request_id
        raise TemporaryFailure("no free request id")  # pragma: no cover - 2**32 in flight

    def authenticate(self, mechanism: str, params: Sequence[tuple[str, str | bytes | None]],
                     response: bytes | None, *, initial: bool = True) -> Deferred[ServerReply]:
        """Send ``AUTH``; the Deferred fires with the ``ServerReply`` (``OK`` or ``FAIL``).

        ``params`` are ``(name, value)`` pairs (value ``None`` for a flag), sent in order.
        ``response`` goes as ``resp=`` (always last) when ``initial``, else on the first
        empty ``CONT``.  Cancelling the Deferred sends ``CANCEL``; if nothing at all has come
        from the server since the request went out, the connection is then dropped as hung.
        """
        if not self.usable:
            raise TemporaryFailure("the Dovecot auth connection is not ready")
        request_id = self._allocate_id()
        fields = [b"AUTH", b"%d" % request_id, tab_escape(mechanism)]
        for name, value in params:
            fields.append(tab_escape(name) if value is None
                          else tab_escape(name) + b"=" + tab_escape(value))
        if initial and response is not None:
            fields.append(b"resp=" + base64.b64encode(response))
        deferred: Deferred[ServerReply] = Deferred(lambda d: self._cancel(request_id, d))
        if not self._pending:
            self.quiet_since = self._now()  # nothing was owed before: silence counts from now
        self._pending[request_id] = _Pending(deferred, None if initial else response,
                                             self.lines_received)
        self.tcp_transport.write(b"\t".join(fields) + b"\n")
        return deferred

    def _cancel(self, request_id: int, deferred: Deferred) -> None:
        """This request alone gives up: ``CANCEL`` it, keep the connection for the others,
        unless the server has been silent for ``hung_after`` while answers were owed."""
        request = self._pending.pop(request_id, None)
        if request is None or not self.connected_now:
            return
        self.tcp_transport.write(b"CANCEL\t%d\n" % request_id)
        silent = self._now() - self.quiet_since
        if (self.lines_received == request.lines_at_send and self.hung_after is not None
                and silent >= self.hung_after):
            log.warn("Dovecot auth server silent for {silent:.0f}s with requests waiting: "
                     "dropping the connection", silent=silent)
            self._closed_reason = "the Dovecot auth server stopped answering"
            self.tcp_transport.abortConnection()


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
        return d

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
        self._attempt = attempt = connectProtocol(self.endpoint, protocol)
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
        log.warn("cannot use Dovecot auth at {where}: {why}", where=self.where, why=why)
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


@dataclass(frozen=True)
class DovecotOptions(Options):
    """``[backends.NAME] type = "dovecot"``: where Dovecot's auth socket is, and how long
    to wait for it."""

    socket: str = field(default="", metadata=PATH)  # a UNIX socket path, or "tcp:HOST:PORT"
    timeout: float = 5.0
    service: str = "smtp"

    def check(self) -> Iterable[OptionProblem]:
        problems = problem_if(self.timeout <= 0, "timeout", "must be positive")
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
