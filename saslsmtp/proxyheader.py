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
``smtpd_upstream_proxy_timeout``); a connection without a valid header is closed and
logged, naming the peer (the proxy's address, or the client that bypassed it; an IPv4
peer of a dual-stack socket as its IPv4 address, as ``saslsmtp.peer`` writes clients):
the first at once, the others on that listener within a minute in one line counting
them (``repeats.PacedWarning``), so a scanner or a misconfigured check cannot fill the
log; ``saslsmtp_proxy_refusals_total`` counts each by reason.  A
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

import socket
from dataclasses import dataclass
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

from saslsmtp.peer import ipv4_of
from saslsmtp.proxytrust import REFUSAL_LOG_INTERVAL, Trusted, believed, peer_host, refusal_log
from saslsmtp.repeats import PacedWarning

log = Logger(namespace="saslsmtp.smtp")

PROXY_HEADER_TIMEOUT = 5.0  # seconds from the connect to the end of the header
LOCAL_START_DELAY = 0.1  # seconds a header naming the proxy's own connection waits for its reset
_V2_FIXED = 16  # a v2 header's signature, version/command, family and length


@dataclass(frozen=True)
class NoHeader:
    """A connection closed without a valid header: its peer (as the logs write it) and
    why, as ``reason`` (``saslsmtp_proxy_refusals_total``'s label: ``timeout``,
    ``not_proxy``, ``invalid_v1``, ``invalid_v2``) and in words for the log."""

    peer: str
    port: int
    reason: str
    why: str


def shown(host: str) -> str:
    """A peer's address as the logs write it (``::ffff:a.b.c.d`` as ``a.b.c.d``)."""
    return ipv4_of(host) if host[:7].lower() == "::ffff:" else host


def no_header_log(clock: Any, name: str, timeout: float,
                  interval: float = REFUSAL_LOG_INTERVAL) -> PacedWarning[NoHeader]:
    """The log of listener ``name``'s connections without a valid header: the first
    one's line at once, then at most one line per ``interval`` counting the others."""

    def first(what: NoHeader) -> None:
        if what.reason == "timeout":
            log.warn("no PROXY protocol header within {timeout:g} s from {peer}:{port} on"
                     " {listener} ({got}); closing", timeout=timeout, peer=what.peer,
                     port=what.port, listener=name, got=what.why, reason=what.reason)
        else:
            log.warn("no valid PROXY protocol header from {peer}:{port} on {listener}"
                     " ({why}); closing", peer=what.peer, port=what.port, listener=name,
                     why=what.why, reason=what.reason)

    def more(count: int, what: NoHeader) -> None:
        why = what.why + f" within {timeout:g} s" if what.reason == "timeout" else what.why
        log.warn("closed {count} more connections without a valid PROXY protocol header on"
                 " {listener} in {seconds:.0f} s (the last from {peer}:{port}: {why})",
                 count=count, listener=name, seconds=interval, peer=what.peer,
                 port=what.port, why=why)

    return PacedWarning(clock, first, more, interval)


class _V1Parser(V1Parser):
    """Twisted's v1 parser, also taking ``PROXY UNKNOWN`` with nothing after it (the
    specification's own example of the proxy's own connection; Twisted wants a space),
    and refusing a header whose addresses are not IP addresses of its family or whose
    ports are not numbers (Twisted raised ``ValueError`` for a port, a traceback in the
    log, and took any word as an address)."""

    @classmethod
    def parse(cls, line: bytes) -> Any:
        if line == cls.PROXYSTR + b" " + cls.UNKNOWN_PROTO:
            line += b" "
        try:
            info = super().parse(line)
        except ValueError:
            raise InvalidProxyHeader() from None
        if info.source is not None:
            version = 4 if line.startswith(cls.PROXYSTR + b" " + cls.TCP4_PROTO) else 6
            if not (_is_ip(info.source, version) and _is_ip(info.destination, version)):
                raise InvalidProxyHeader()
        return info


_FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}


def _is_ip(addr: Any, version: int) -> bool:
    """Is the parsed ``addr`` an IP address of ``version`` with a port in range?
    (``inet_pton``: a tenth of ``ipaddress``'s cost, on every connection.)"""
    try:
        socket.inet_pton(_FAMILIES[version], addr.host)
    except (OSError, ValueError):  # not an address of that family; not even ASCII
        return False
    return 0 <= addr.port <= 65535


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
            if isinstance(self._parser, V1Parser):
                self._refuse("invalid_v1", "an invalid v1 header")
            elif self._parser is not None or self._head.startswith(V2Parser.PREFIX):
                self._refuse("invalid_v2", "an invalid v2 header")
            else:
                self._refuse("not_proxy", "not a PROXY header")
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
        self._refuse("timeout", got)

    def _refuse(self, reason: str, why: str) -> None:
        """Close a connection without a valid header: logged (paced) and counted."""
        transport: Any = self.transport
        peer = transport.getPeer()
        host = getattr(peer, "host", None)
        self.factory.missing.occurred(NoHeader(
            shown(host) if isinstance(host, str) else str(peer), getattr(peer, "port", 0),
            reason, why))
        self.factory.count(reason)
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
    """The wrapper's factory: one per listener, named ``name`` in the logs and the
    metrics (``metrics``: a ``saslsmtp.metrics.Metrics``, or ``None``)."""

    protocol = HeaderFirstWrapper  # type: ignore[assignment]  # a subclass
    noisy = False  # the listening port already logs its start

    def __init__(self, wrappedFactory: Any, clock: IReactorTime,
                 timeout: float = PROXY_HEADER_TIMEOUT,
                 trusted: Callable[[], Trusted] = lambda: None,
                 name: str = "a haproxy: listener", metrics: Any = None) -> None:
        super().__init__(wrappedFactory)
        self.clock = clock
        self.timeout = timeout
        self.trusted = trusted
        self.name = name
        self.metrics = metrics
        self.refusals = refusal_log(clock, name)
        self.missing = no_header_log(clock, name, timeout)

    def buildProtocol(self, addr: Any) -> Any:
        """``None`` (Twisted closes the socket at once) for a peer whose header is not to
        be believed; the wrapper otherwise."""
        host = peer_host(addr)
        if not believed(host, self.trusted()):
            self.refusals.occurred((shown(host) if host else "?", getattr(addr, "port", 0)))
            self.count("untrusted")
            return None
        return super().buildProtocol(addr)

    def count(self, reason: str) -> None:
        """One connection refused for ``reason``, in ``saslsmtp_proxy_refusals_total``."""
        if self.metrics is not None:
            self.metrics.proxy_refused(self.name, reason)

    def doStop(self) -> None:
        self.refusals.stop()
        self.missing.stop()
        super().doStop()


@implementer(IStreamServerEndpoint)
class ProxyEndpoint:
    """``endpoint`` with a PROXY header read before anything else (like Twisted's
    ``proxyEndpoint``), logging connections that lack one; ``trusted()`` is
    ``proxy_trusted_networks`` as configured now (``proxytrust.configured``);
    ``metrics`` counts the refused ones (``metered``)."""

    def __init__(self, endpoint: Any, clock: IReactorTime,
                 timeout: float = PROXY_HEADER_TIMEOUT,
                 trusted: Callable[[], Trusted] = lambda: None,
                 name: str = "a haproxy: listener", metrics: Any = None) -> None:
        self.endpoint = endpoint
        self.clock = clock
        self.timeout = timeout
        self.trusted = trusted
        self.name = name
        self.metrics = metrics

    def listen(self, factory: Any) -> Any:
        return self.endpoint.listen(HeaderFirstFactory(factory, self.clock, self.timeout,
                                                       self.trusted, self.name, self.metrics))


def proxy_endpoint(endpoint: Any, clock: IReactorTime,
                   timeout: float = PROXY_HEADER_TIMEOUT,
                   trusted: Callable[[], Trusted] = lambda: None,
                   name: str = "a haproxy: listener", metrics: Any = None) -> ProxyEndpoint:
    return ProxyEndpoint(endpoint, clock, timeout, trusted, name, metrics)


def metered(factory: Any) -> Any:
    """The ``Metrics`` the SMTP factory ``factory`` (or the shared factory it wraps,
    ``serving.ListenerFactory``) counts into, or ``None`` (no ``[metrics]``, or a
    library factory without them)."""
    shared = factory
    while not hasattr(shared, "metrics") and hasattr(shared, "factory"):
        shared = shared.factory
    return getattr(shared, "metrics", None)
