"""The PROXY protocol (``haproxy:`` listeners): the header first, then the SMTP session.

Twisted's ``HAProxyProtocolWrapper`` starts the wrapped protocol as soon as the TCP
connection is made, before the header has arrived: the greeting goes out while the
client's address is still the proxy's, so the connection limits could only judge the
client at its first command, and a refused client got a 220 and then a 421.  It also
closes a connection whose first bytes are not a header silently, and gives up on a header
that arrives in pieces shorter than 16 bytes.

``HeaderFirstWrapper`` does what Postfix's ``smtpd_upstream_proxy_protocol`` does: it reads
the whole header (v1 or v2, in as many pieces as it comes) before the SMTP protocol's
``connectionMade``, so the session starts with the real client's address (greeting,
admission, logs); it waits at most ``PROXY_HEADER_TIMEOUT`` seconds for it (Postfix's
``smtpd_upstream_proxy_timeout``); a connection without a valid header is closed with one
log line naming the peer (the proxy's address, or the client that bypassed it).  A
health check that connects and leaves without a header (HAProxy's plain ``check``) starts
no session and logs nothing.  So does the check of a ``send-proxy-v2 check`` server line:
HAProxy sends a header for itself (v2 ``LOCAL``: no client address; v1: the check's own
connection) and resets the connection some microseconds later; the session of a header
naming the proxy's own connection therefore starts ``LOCAL_START_DELAY`` after it (or at
the first byte after it), and not at all when the connection is gone by then.  TLS
handshake notifications are passed through to the SMTP protocol (the handshake deadline
needs them when STARTTLS runs behind the wrapper).  A peer outside
``server.proxy_trusted_networks`` is closed at the accept (``saslsmtp.proxytrust``): no
protocol is built, nothing is read or sent.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, IReactorTime, IStreamServerEndpoint
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
# The wrapper and parser classes are only exported through the private modules (the
# package exports ``proxyEndpoint``, which cannot take another protocol class).
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper, HAProxyWrappingFactory
from zope.interface import directlyProvides, implementer, providedBy

from saslsmtp.proxytrust import RefusalLog, Trusted, believed, peer_host

log = Logger(namespace="saslsmtp.smtp")

PROXY_HEADER_TIMEOUT = 5.0  # seconds from the connect to the end of the header
LOCAL_START_DELAY = 0.1  # seconds a header naming the proxy's own connection waits for its reset
_V2_FIXED = 16  # a v2 header's signature, version/command, family and length


class _V1Parser(V1Parser):
    """Twisted's v1 parser, also taking ``PROXY UNKNOWN`` with nothing after it (the
    specification's own example of the proxy's own connection; Twisted wants a space)."""

    @classmethod
    def parse(cls, line: bytes) -> Any:
        if line == cls.PROXYSTR + b" " + cls.UNKNOWN_PROTO:
            line += b" "
        return super().parse(line)


def _own_connection(info: Any, transport: Any) -> bool:
    """Does the header name the proxy's own connection rather than a client's?  v2's
    ``LOCAL`` and v1's ``UNKNOWN`` name no address; HAProxy's v1 checks name the very
    connection they come on (its source port included), which no relayed client can."""
    if info.source is None:
        return True
    peer = transport.getPeer()
    return (getattr(info.source, "host", None), getattr(info.source, "port", None)) == (
        getattr(peer, "host", ""), getattr(peer, "port", -1))


def _parser_for(head: bytes) -> V1Parser | V2Parser | Literal[True] | None:
    """The parser for a header starting with ``head``: ``True`` while too few bytes have
    come to tell, ``None`` when they cannot start a PROXY header."""
    if head.startswith(V1Parser.PROXYSTR):
        return _V1Parser()
    if head.startswith(V2Parser.PREFIX):
        if len(head) < _V2_FIXED:
            return True
        return V2Parser() if head[12] & 0xF0 == 0x20 else None
    if V1Parser.PROXYSTR.startswith(head) or V2Parser.PREFIX.startswith(head):
        return True
    return None


@implementer(IHandshakeListener)
class HeaderFirstWrapper(HAProxyProtocolWrapper):
    """``HAProxyProtocolWrapper`` that starts the SMTP session only after the header."""

    factory: "HeaderFirstFactory"
    _started = False
    _head = b""
    _deadline: IDelayedCall | None = None

    def makeConnection(self, transport: Any) -> None:
        """Register and wait for the header; the wrapped protocol is not made yet."""
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        self._deadline = self.factory.clock.callLater(self.factory.timeout, self._timed_out)

    def dataReceived(self, data: bytes) -> None:
        wrapped: Any = self.wrappedProtocol
        if self._started:
            wrapped.dataReceived(data)
            return
        if self.disconnecting:
            return
        if self._proxyInfo is not None:  # a LOCAL header, then bytes before its start
            self._start()
            wrapped.dataReceived(data)
            return
        try:
            parser = self._parser
            if parser is None:
                self._head += data
                found = _parser_for(self._head)
                if found is True:
                    return
                if found is None:
                    raise InvalidProxyHeader()
                self._parser = parser = found
                data, self._head = self._head, b""
            info, remaining = parser.feed(data)
        except InvalidProxyHeader:
            self._refuse("no valid PROXY protocol header from {peer}:{port} on a haproxy:"
                         " listener; closing")
            return
        if info is None:
            return
        self._proxyInfo = info
        if not remaining and _own_connection(info, self.transport):  # a check?
            self._cancel_deadline()
            self._deadline = self.factory.clock.callLater(LOCAL_START_DELAY, self._start)
            return
        self._start()
        if remaining and not self.disconnecting:
            wrapped.dataReceived(remaining)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _start(self) -> None:
        self._started = True
        self._cancel_deadline()
        self.wrappedProtocol.makeConnection(self)  # type: ignore[arg-type]  # the transport

    def _timed_out(self) -> None:
        self._deadline = None
        if self._started or self.disconnecting:
            return
        got = "part of a header" if self._head or self._parser is not None else "nothing"
        self._refuse("no PROXY protocol header within {timeout:g} s from {peer}:{port} on a"
                     " haproxy: listener ({got}); closing", timeout=self.factory.timeout, got=got)

    def _refuse(self, text: str, **fields: Any) -> None:
        transport: Any = self.transport
        peer = transport.getPeer()
        log.warn(text, peer=getattr(peer, "host", str(peer)), port=getattr(peer, "port", 0),
                 **fields)
        self.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_deadline()
        if self._started:
            super().connectionLost(reason)
        else:  # no session was started: nothing to tell it, but its factory counted it
            self.factory.unregisterProtocol(self)
            forget = getattr(getattr(self.wrappedProtocol, "factory", None), "forget", None)
            if forget is not None:  # saslsmtp_sessions went up at the accept
                forget(self.wrappedProtocol)

    def handshakeCompleted(self) -> None:
        wrapped: Any = self.wrappedProtocol
        if IHandshakeListener.providedBy(wrapped):
            wrapped.handshakeCompleted()


class HeaderFirstFactory(HAProxyWrappingFactory):
    protocol = HeaderFirstWrapper  # type: ignore[assignment]  # a subclass
    noisy = False  # the listening port already logs its start

    def __init__(self, wrappedFactory: Any, clock: IReactorTime,
                 timeout: float = PROXY_HEADER_TIMEOUT,
                 trusted: Callable[[], Trusted] = lambda: None,
                 name: str = "a haproxy: listener") -> None:
        super().__init__(wrappedFactory)
        self.clock = clock
        self.timeout = timeout
        self.trusted = trusted
        self.refusals = RefusalLog(clock, name)

    def buildProtocol(self, addr: Any) -> Any:
        """``None`` (Twisted closes the socket at once) for a peer whose header is not to
        be believed; the wrapper otherwise."""
        host = peer_host(addr)
        if not believed(host, self.trusted()):
            self.refusals.refused(host or "?", getattr(addr, "port", 0))
            return None
        return super().buildProtocol(addr)

    def doStop(self) -> None:
        self.refusals.stop()
        super().doStop()


@implementer(IStreamServerEndpoint)
class ProxyEndpoint:
    """``endpoint`` with a PROXY header read before anything else (like Twisted's
    ``proxyEndpoint``), logging connections that lack one; ``trusted()`` is
    ``proxy_trusted_networks`` as configured now (``proxytrust.configured``)."""

    def __init__(self, endpoint: Any, clock: IReactorTime,
                 timeout: float = PROXY_HEADER_TIMEOUT,
                 trusted: Callable[[], Trusted] = lambda: None,
                 name: str = "a haproxy: listener") -> None:
        self.endpoint = endpoint
        self.clock = clock
        self.timeout = timeout
        self.trusted = trusted
        self.name = name

    def listen(self, factory: Any) -> Any:
        return self.endpoint.listen(HeaderFirstFactory(factory, self.clock, self.timeout,
                                                       self.trusted, self.name))


def proxy_endpoint(endpoint: Any, clock: IReactorTime,
                   timeout: float = PROXY_HEADER_TIMEOUT,
                   trusted: Callable[[], Trusted] = lambda: None,
                   name: str = "a haproxy: listener") -> ProxyEndpoint:
    return ProxyEndpoint(endpoint, clock, timeout, trusted, name)
