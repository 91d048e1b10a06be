"""A Twisted LDAP client connection: requests written on the reactor, answers matched by ID.

``LdapProtocol`` is one kept-open connection (TCP, ``ldaps://`` TLS, or TCP upgraded by
StartTLS).  Each request gets the next message ID and a Deferred; ``dataReceived`` splits
the stream into LDAPMessages (``ldapwire.message_end``), decodes them and fires the
request they answer.  Several requests may be in flight on one connection (a search
connection pipelines), except that a bind must be the only one: it changes who the
connection is (RFC 4511 4.2.1), so callers keep one bind per connection at a time.

Every request is bounded by ``timeout`` on the injected clock.  A request that times out
fails with ``LdapTimeout`` and aborts the whole connection (an answer that comes later
would belong to nobody, and a server that hangs once is not trusted with the next login);
the other requests on it fail with ``LdapConnectionLost``.  So does everything in flight
when the server closes the connection or sends a Notice of Disconnection.  ``closed`` is
true from then on and pools drop the connection.  TCP_NODELAY is set: a login is a
request and an answer of a few dozen bytes each, which Nagle's algorithm would delay.

``connect`` opens one connection on an endpoint from the injected ``endpoint_factory``
(by default ``HostnameEndpoint``, wrapped in TLS for ``ldaps://``), does StartTLS if asked
(the ExtendedRequest, then ``transport.startTLS``), all within ``timeout``.  Certificate
and host name checks are ``tlsclient.StrictClientTLS``'s (the chain, then service_identity
against the subjectAltName); a failed check fails the handshake and the request that was
waiting with ``LdapConnectionLost`` naming the reason.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from saslsmtp.checkers import ldapwire
from saslsmtp.checkers.ldapwire import Entry, Result
from saslsmtp.checkers.quiet import QuietFactory

MAX_MESSAGE_ID = 2 ** 31 - 1


class LdapError(Exception):
    """A connection-level failure (internal): the request got no answer."""

    timed_out = False


class LdapTimeout(LdapError):
    """No answer within ``timeout``; the connection is aborted."""

    timed_out = True


class LdapConnectionLost(LdapError):
    """The connection closed (or was closed) before the answer came."""


def describe_failure(reason: Failure | BaseException) -> str:
    """A log-safe one-line description of a connection failure (never holds a password:
    requests are never part of it)."""
    error = reason.value if isinstance(reason, Failure) else reason
    if type(error).__name__ == "Error" and type(error).__module__.startswith("OpenSSL"):
        return f"TLS error: {error}"[:300]
    text = str(error).strip() or type(error).__name__
    return f"{type(error).__name__}: {text}"[:300]


class _Request:
    """One request in flight: its Deferred, its deadline, and a search's entries so far."""

    __slots__ = ("deferred", "deadline", "entries")

    def __init__(self, deferred: "Deferred[Any]", deadline: float) -> None:
        self.deferred = deferred
        self.deadline = deadline
        self.entries: list[Entry] = []


class LdapProtocol(Protocol):
    """One LDAP connection; see the module docstring.  Reactor thread only."""

    def __init__(self, clock: IReactorTime, timeout: float) -> None:
        self._clock = clock
        self._timeout = timeout
        self._buffer = b""
        self._pending: dict[int, _Request] = {}
        self._next_id = 0
        self.closed = False
        self._why: str = "connection closed by the server"
        self._explained = False  # _why set by us (timeout, notice, protocol error)
        self._timer: Any = None  # the one timer: the oldest request's deadline, or later
        self._socket: Any = None  # plain TCP: the socket, written to directly

    # ---- requests --------------------------------------------------------------

    def bind(self, dn: bytes, password: bytes) -> "Deferred[Result]":
        """A simple bind as ``dn``: fires with its ``Result`` (any code)."""
        return self._send(ldapwire.bind_request(dn, password))

    def search(self, request: bytes) -> "Deferred[tuple[Result, list[Entry]]]":
        """A SearchRequest (``ldapwire.SearchShape.request``): fires with the done
        ``Result`` and the entries that came before it."""
        return self._send(request, search=True)

    def start_tls(self, options: Any) -> "Deferred[None]":
        """The StartTLS ExtendedRequest, then TLS on this transport (``options``: an
        ``IOpenSSLClientConnectionCreator``).  Fails with the ``Result`` code in an
        ``StartTlsRefused`` if the server says no."""
        def answered(result: Result) -> None:
            if result.code != 0:
                raise StartTlsRefused(result)
            self._socket = None  # from now on every byte goes through TLS
            self.transport.startTLS(options)  # type: ignore[union-attr]
        return self._send(ldapwire.START_TLS_REQUEST).addCallback(answered)

    def unbind_and_close(self) -> None:
        """Say goodbye (UnbindRequest) and close; pending requests fail."""
        if self.closed:
            return
        self.closed = True
        transport: Any = self.transport
        try:
            transport.write(ldapwire.message(self._take_id(), ldapwire.UNBIND_REQUEST))
            transport.loseConnection()
        except Exception:  # the transport may already be half gone
            pass

    def abort(self) -> None:
        """Close at once (after a timeout); pending requests fail."""
        self.closed = True
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def _take_id(self) -> int:
        self._next_id = self._next_id % MAX_MESSAGE_ID + 1
        return self._next_id

    def _send(self, op: bytes, search: bool = False) -> "Deferred[Any]":
        if self.closed:
            return fail(LdapConnectionLost(self._why))
        message_id = self._take_id()
        d: Deferred[Any] = Deferred()
        self._pending[message_id] = _Request(d, self._clock.seconds() + self._timeout)
        if self._timer is None:
            self._timer = self._clock.callLater(self._timeout, self._check_deadlines)
        self._write(ldapwire.message(message_id, op))
        return d

    def _write(self, data: bytes) -> None:
        """Send ``data`` now: on plain TCP straight into the socket (saves the reactor
        round trip and two epoll changes that ``transport.write`` costs per request,
        about 10 us here); whatever the socket does not take goes to the transport,
        which sends it when it can (and from then on, everything goes that way)."""
        sock = self._socket
        if sock is not None:
            try:
                sent = sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:  # broken: the transport notices and closes
                sent = 0
            if sent == len(data):
                return
            self._socket = None
            data = data[sent:]
        self.transport.write(data)  # type: ignore[union-attr]

    def _check_deadlines(self) -> None:
        """The timer: time out the oldest request if it is due, else wait for it.
        Requests are answered long before ``timeout``, so this runs about once per
        ``timeout`` per busy connection instead of a timer per request."""
        self._timer = None
        if not self._pending:
            return
        message_id, request = next(iter(self._pending.items()))
        now = self._clock.seconds()
        if request.deadline > now:
            self._timer = self._clock.callLater(request.deadline - now, self._check_deadlines)
            return
        del self._pending[message_id]
        self._why = f"another request timed out after {self._timeout} s"
        self._explained = True
        request.deferred.errback(LdapTimeout(f"no answer within {self._timeout} s"))
        self.abort()

    # ---- answers ---------------------------------------------------------------

    def connectionMade(self) -> None:
        transport: Any = self.transport
        if type(transport).__module__ == "twisted.internet.tcp":  # not TLS: direct writes
            self._socket = transport.getHandle()
        while transport is not None and not hasattr(transport, "setTcpNoDelay"):
            transport = getattr(transport, "transport", None)
        if transport is not None:
            try:
                transport.setTcpNoDelay(True)
            except OSError:
                pass

    def dataReceived(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        start = 0
        try:
            while True:
                end = ldapwire.message_end(buffer, start)
                if end < 0:
                    break
                self._answer(buffer[start:end])
                start = end
        except ldapwire.ProtocolError as e:
            self._why = f"protocol error: {e}"
            self._explained = True
            self.abort()
            return
        self._buffer = buffer[start:]

    def _answer(self, data: bytes) -> None:
        message_id, op, value = ldapwire.decode(data)
        if message_id == 0:  # unsolicited: a Notice of Disconnection (RFC 4511 4.4.1)
            if isinstance(value, Result):
                self._why = f"server disconnected: {value.description} {value.message}"
                self._explained = True
            self.abort()
            return
        request = self._pending.get(message_id)
        if request is None:
            return  # an answer to a request given up on (cannot happen: we abort)
        if op == ldapwire.SEARCH_ENTRY:
            assert isinstance(value, Entry)
            request.entries.append(value)
            return
        if op == ldapwire.SEARCH_REFERENCE:
            return
        del self._pending[message_id]
        if op == ldapwire.SEARCH_DONE:
            request.deferred.callback((value, request.entries))
        else:
            request.deferred.callback(value)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.closed = True
        if not self._explained and not reason.check(ConnectionDone):
            self._why = describe_failure(reason)
        self._socket = None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        pending, self._pending = self._pending, {}
        for request in pending.values():
            request.deferred.errback(LdapConnectionLost(self._why))


class StartTlsRefused(Exception):
    """The server answered the StartTLS request with an error ``result``."""

    def __init__(self, result: Result) -> None:
        super().__init__(f"StartTLS answered {result.code} {result.description}")
        self.result = result


def connect(endpoint: IStreamClientEndpoint, clock: IReactorTime, timeout: float,
            start_tls: Any | None = None) -> "Deferred[LdapProtocol]":
    """A new ``LdapProtocol`` on ``endpoint``, after StartTLS with ``start_tls`` options
    (``None``: no StartTLS); the TCP connect is bounded by ``timeout``, and so is StartTLS."""
    factory = QuietFactory.forProtocol(lambda: LdapProtocol(clock, timeout))
    d: Deferred[Any] = endpoint.connect(factory)
    d.addTimeout(timeout, clock)
    if start_tls is None:
        return d

    def upgrade(protocol: LdapProtocol) -> "Deferred[LdapProtocol]":
        def failed(reason: Failure) -> Failure:
            protocol.abort()
            return reason
        return protocol.start_tls(start_tls).addCallbacks(lambda _: protocol, failed)
    return d.addCallback(upgrade)

