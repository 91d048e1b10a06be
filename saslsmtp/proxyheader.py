"""The PROXY protocol (``haproxy:`` listeners), with a log line when the header is missing.

Twisted's ``HAProxyProtocolWrapper`` closes a connection whose first bytes are not a valid
PROXY v1/v2 header, silently: a client that connects straight to a ``haproxy:`` listener
gets the greeting and is then cut off after its EHLO, and the operator sees nothing.  This
wrapper logs that once per connection, with the peer's address (the proxy's, or the
client that bypassed it), and passes the TLS handshake notification through to the SMTP
protocol (the handshake deadline needs it when STARTTLS runs behind the wrapper).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IHandshakeListener, IStreamServerEndpoint
from twisted.logger import Logger
# The wrapper classes are only exported through the private module (the package exports
# ``proxyEndpoint``, which cannot take another protocol class).
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper, HAProxyWrappingFactory
from zope.interface import implementer

log = Logger(namespace="saslsmtp.smtp")


@implementer(IHandshakeListener)
class LoggingProxyWrapper(HAProxyProtocolWrapper):
    """``HAProxyProtocolWrapper`` that says why it closed a connection."""

    def dataReceived(self, data: bytes) -> None:
        wrapped: Any = self.wrappedProtocol
        if self._proxyInfo is not None:
            wrapped.dataReceived(data)
            return
        super().dataReceived(data)
        if self._proxyInfo is None and self.disconnecting:
            transport: Any = self.transport
            peer = transport.getPeer()
            log.warn("no valid PROXY protocol header from {peer}:{port} on a haproxy: listener;"
                     " closing", peer=getattr(peer, "host", str(peer)),
                     port=getattr(peer, "port", 0))

    def handshakeCompleted(self) -> None:
        wrapped: Any = self.wrappedProtocol
        if IHandshakeListener.providedBy(wrapped):
            wrapped.handshakeCompleted()


class LoggingProxyFactory(HAProxyWrappingFactory):
    protocol = LoggingProxyWrapper  # type: ignore[assignment]  # a subclass


@implementer(IStreamServerEndpoint)
class ProxyEndpoint:
    """``endpoint`` with a PROXY header read before anything else (like Twisted's
    ``proxyEndpoint``), logging connections that lack one."""

    def __init__(self, endpoint: Any) -> None:
        self.endpoint = endpoint

    def listen(self, factory: Any) -> Any:
        return self.endpoint.listen(LoggingProxyFactory(factory))


def proxy_endpoint(endpoint: Any) -> ProxyEndpoint:
    return ProxyEndpoint(endpoint)
