"""TCP listeners whose connections send a reply at once when nothing is queued before it.

Twisted's TCP transport queues every ``write`` and registers the socket for writability;
the bytes leave on the reactor's next turn, after which the socket is unregistered again:
two ``epoll_ctl`` calls and one more turn of the loop for every reply.  An SMTP server's
writes are short replies to a line it has just read, and the socket's send buffer is
almost always empty, so trying ``send()`` first (what asyncio's transports do) sends the
reply in the same turn.  Whatever the kernel does not take goes to Twisted's ordinary
queue, and while anything is queued every later write queues behind it, so the order of
the bytes never changes.  A failed ``send`` leaves the data queued, and the queued path
reports the lost connection as usual.

Closing gets the same treatment.  ``loseConnection`` in Twisted registers the socket for
writability even when nothing is queued, and the next turn finds the queue empty, sends
zero bytes and only then closes: three ``epoll_ctl`` calls, an empty ``send`` and one
more event per connection.  When everything written has been sent, the connection here
stops reading and closes on the reactor's next turn (``callLater(0)``, so the protocol's
``connectionLost`` still never runs inside its own ``loseConnection`` call); after
STARTTLS the same happens once the TLS layer has shut down and closes the connection.  Anything
written in between is sent first, as Twisted would; reading, producers, half-close and
aborting are Twisted's.  The socket is closed without a ``shutdown()`` first: accepted
sockets are close-on-exec and never shared with another process, so ``close()`` alone
sends the FIN (Twisted's own comment says the ``shutdown`` is only "to be safe").

STARTTLS keeps the gain: the TLS layer Twisted puts on the connection sends its records
through ``_SendNowBypass``; implicit TLS (``ssl:`` listeners, TLS around the factory)
writes through the connection itself.

``send_now_reactor(reactor)`` is what the listeners are built with: a reactor whose
``listenTCP`` and ``adoptStreamPort`` (TCP families) make these ports, everything else
being the reactor's own.  A reactor that is not a POSIX one (a test's ``MemoryReactor``)
is returned unchanged.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import _newtls, abstract, main, posixbase, tcp
from twisted.python import failure


def _write_now(transport: Any, data: bytes) -> None:
    """Send ``data`` now if nothing is queued, and queue what the kernel did not take."""
    if (data and not transport.dataBuffer and not transport._tempDataBuffer
            and transport.connected and not transport.disconnecting
            and not transport._writeDisconnecting and not transport._writeDisconnected):
        try:
            sent = transport.socket.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            sent = 0  # a broken connection: the queued path finds and reports it
        if sent == len(data):
            return
        data = data[sent:]
    abstract.FileDescriptor.write(transport, data)


_DONE = failure.Failure(main.CONNECTION_DONE)  # built once, as Twisted's reactor does


def _close_soon(transport: Any) -> bool:
    """``loseConnection`` when everything written has been sent: stop reading and close
    on the reactor's next turn; ``False`` (nothing done) when something is queued or a
    producer, half-close or earlier close is in the way."""
    if not (transport.connected and not transport.disconnecting
            and transport.producer is None and not transport._writeDisconnected
            and not transport.dataBuffer and not transport._tempDataBuffer):
        return False
    transport.stopReading()
    transport.disconnecting = True
    transport.reactor.callLater(0, _close_sent, transport)
    return True


def _close_sent(transport: Any) -> None:
    """The turn after ``_close_soon``: close, unless the connection is gone already
    (aborted) or something was written since (then Twisted's path sends it first)."""
    if transport.disconnected or getattr(transport, "_aborting", False):
        return
    if transport.dataBuffer or transport._tempDataBuffer:
        transport.startWriting()  # doWrite sends it, then closes (disconnecting is set)
        return
    transport.reactor.removeReader(transport)
    transport.reactor.removeWriter(transport)
    transport.connectionLost(_DONE)


class _SendNowBypass(abstract.FileDescriptor):
    """What the STARTTLS layer writes its records through and closes the connection
    with once TLS has shut down (called with the connection as ``self``, as Twisted's
    own bypass calls ``FileDescriptor``'s methods)."""

    def write(self, data: bytes) -> None:
        _write_now(self, data)

    def loseConnection(self) -> None:
        if not _close_soon(self):
            abstract.FileDescriptor.loseConnection(self)


class SendNowServer(tcp.Server):
    """A server connection whose writes try ``send()`` before queueing."""

    _shouldShutdown = False  # close() alone: see the module's docstring

    def write(self, data: bytes) -> None:
        if self.TLS:  # STARTTLS: through the TLS layer, which writes via the bypass
            super().write(data)
        else:
            _write_now(self, data)

    def writeSequence(self, iovec: Any) -> None:
        if self.TLS:
            super().writeSequence(iovec)
        else:
            _write_now(self, b"".join(iovec))

    def startTLS(self, ctx: Any, normal: bool = True) -> None:
        _newtls.startTLS(self, ctx, normal, _SendNowBypass)

    def loseConnection(self) -> None:
        if self.TLS or not _close_soon(self):
            super().loseConnection()  # STARTTLS: the TLS layer closes through the bypass


def all_sent(transport: Any) -> bool:
    """Nothing of what was written to ``transport`` waits in its queue: a plain
    ``SendNowServer`` whose last write the kernel took whole.  After ``loseConnection``
    such a connection closes on the reactor's next turn, whatever the client does.
    False for anything else (TLS, PROXY wrappers, other transports): not known."""
    return (type(transport) is SendNowServer and not transport.TLS
            and not transport.dataBuffer and not transport._tempDataBuffer)


class SendNowPort(tcp.Port):
    """A TCP port whose connections are ``SendNowServer``s."""

    transport = SendNowServer


class _SendNowReactor:
    """The reactor, except that TCP listeners are ``SendNowPort``s."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)

    def listenTCP(self, port: int, factory: Any, backlog: int = 50,
                  interface: str = "") -> SendNowPort:
        listening = SendNowPort(port, factory, backlog, interface, self._reactor)
        listening.startListening()
        return listening

    def adoptStreamPort(self, fd: int, family: socket.AddressFamily, factory: Any) -> Any:
        if family not in (socket.AF_INET, socket.AF_INET6):
            return self._reactor.adoptStreamPort(fd, family, factory)
        listening = SendNowPort._fromListeningDescriptor(self._reactor, fd, family, factory)
        listening.startListening()
        return listening


def send_now_reactor(reactor: Any) -> Any:
    """``reactor`` for building listeners: TCP ports make ``SendNowServer`` connections."""
    if isinstance(reactor, posixbase.PosixReactorBase):
        return _SendNowReactor(reactor)
    return reactor
