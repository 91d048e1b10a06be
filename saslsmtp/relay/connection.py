"""One upstream SMTP/LMTP connection: the line protocol, replies in order, flow control.

``UpstreamConnection`` sends command lines and matches the upstream's replies to them
first in, first out; every wait has its own timeout on the injected clock and fails with
``UpstreamError``, whose ``reply`` is what our client gets (``451 4.4.2`` for a timeout or
a lost connection, ``451 4.4.1`` for a TLS failure, ``451 4.4.0`` for a reply that is not
SMTP).  It is the producer registered on its own transport, so the upstream's
backpressure reaches our client's transport during DATA.  ``parse_capabilities`` reads
the EHLO keywords.  The handshake and the pool are in ``client``; one message is
``transaction``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from saslsmtp.checkers.tlsclient import CertificateIdentityError
from saslsmtp.relay.wire import MAX_LINE, ProtocolViolation, ReplyParser, UpstreamReply, pass_on
from saslsmtp.replies import REPLIES, SMTPReply

# the namespace operators filter on stays the one of the relay client
log = Logger(namespace="saslsmtp.relay.client")


class UpstreamError(Exception):
    """Why a conversation with the upstream ended; ``reply`` is what our client gets."""

    def __init__(self, reply: SMTPReply, why: str) -> None:
        super().__init__(why)
        self.reply = reply



@implementer(IPushProducer)
class UpstreamConnection(LineOnlyReceiver):
    """One upstream connection: commands out, replies in (FIFO), flow control up.

    ``command(line)`` / ``expect()`` return Deferreds of ``UpstreamReply`` that fail
    with ``UpstreamError``; each has its own ``timeout`` on the injected ``clock``.
    It is the producer registered on its own transport: ``pauseProducing`` means the
    upstream is not reading fast enough, and is passed to ``downstream`` (our client's
    transport, during DATA).
    """

    delimiter = b"\r\n"
    MAX_LENGTH = MAX_LINE + 8
    transport: Any  # a TCP, UNIX or TLS transport once connected

    def __init__(self, *, clock: IReactorTime, timeout: float, name: str) -> None:
        self.clock = clock
        self.timeout = timeout
        self.name = name
        self.parser = ReplyParser()
        self.pending: list[Deferred[UpstreamReply]] = []
        self.capabilities: dict[str, list[str]] = {}
        self.closed = False
        self.error: UpstreamError | None = None
        self.paused = False
        self.downstream: IPushProducer | None = None
        self.on_lost: Callable[["UpstreamConnection"], None] | None = None
        self.xclient_sent: tuple[str, ...] | None = None
        self.tls = False

    def __repr__(self) -> str:
        return f"<UpstreamConnection {self.name}{' closed' if self.closed else ''}>"

    # ---- commands ----------------------------------------------------------------

    def expect(self) -> "Deferred[UpstreamReply]":
        """The next reply (the greeting, or one more LMTP verdict)."""
        if self.closed:
            return defer.fail(self.error or UpstreamError(REPLIES["upstream_lost"], "closed"))
        d: Deferred[UpstreamReply] = Deferred(lambda _: self.fail(UpstreamError(
            REPLIES["upstream_timeout"], f"no reply within {self.timeout:g}s")))
        self.pending.append(d)
        d.addTimeout(self.timeout, self.clock)
        d.addErrback(self._explain)
        return d

    def _explain(self, failure: Failure) -> Failure:
        if failure.check(defer.TimeoutError, CancelledError):
            return Failure(self.error or UpstreamError(REPLIES["upstream_timeout"], "timeout"))
        return failure

    def command(self, line: bytes) -> "Deferred[UpstreamReply]":
        """Send one command line and wait for its reply."""
        d = self.expect()
        if not self.closed:
            self.sendLine(line)
        return d

    def fail(self, error: UpstreamError) -> None:
        """The connection is unusable: drop it; every waiting reply fails with ``error``."""
        if self.error is None:
            self.error = error
            log.info("upstream {name}: {why}", name=self.name, why=str(error))
        if self.transport is not None and not self.closed:
            self.transport.abortConnection()
        self._fail_pending()

    def _fail_pending(self) -> None:
        pending, self.pending = self.pending, []
        error = self.error or UpstreamError(REPLIES["upstream_lost"], "connection lost")
        for d in pending:
            if not d.called:
                d.errback(error)

    # ---- wire --------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)

    def lineReceived(self, line: bytes) -> None:
        if self.closed or self.error is not None:
            return
        try:
            reply = self.parser.line(line)
        except ProtocolViolation as e:
            self.fail(UpstreamError(REPLIES["upstream_error"], str(e)))
            return
        if reply is None:
            return
        while self.pending and self.pending[0].called:  # timed out already
            self.pending.pop(0)
        if not self.pending:
            self.fail(UpstreamError(REPLIES["upstream_error"] if reply.code != 421
                                    else pass_on(reply), f"unexpected reply {reply.status()}"))
            return
        self.pending.pop(0).callback(reply)

    def lineLengthExceeded(self, line: bytes) -> None:
        self.fail(UpstreamError(REPLIES["upstream_error"], "reply line too long"))

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.closed = True
        if self.error is None:
            if reason.check(CertificateIdentityError):
                why = f"TLS certificate refused: {reason.value}"
                self.error = UpstreamError(REPLIES["upstream_unavailable"], why)
            elif reason.check(SSL.Error):
                self.error = UpstreamError(REPLIES["upstream_unavailable"],
                                           "TLS handshake failed")
            elif self.pending:
                self.error = UpstreamError(REPLIES["upstream_lost"], "connection lost")
            if self.error is not None:
                log.info("upstream {name}: {why}", name=self.name, why=str(self.error))
        self._fail_pending()
        if self.paused and self.downstream is not None:
            self.downstream.resumeProducing()  # let our client finish; end() says 451
        if self.on_lost is not None:
            self.on_lost(self)

    # ---- IPushProducer: the upstream transport tells us to slow down -------------

    def pauseProducing(self) -> None:
        self.paused = True
        if self.downstream is not None:
            self.downstream.pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        if self.downstream is not None:
            self.downstream.resumeProducing()

    def stopProducing(self) -> None:
        """The transport is going away; ``connectionLost`` resumes our client."""


def parse_capabilities(lines: Sequence[bytes]) -> dict[str, list[str]]:
    """EHLO keywords (upper case) -> their parameters (upper case)."""
    capabilities: dict[str, list[str]] = {}
    for raw in lines:
        words = raw.decode("ascii", "replace").upper().split()
        if words:
            keyword = words[0]
            if keyword.startswith("AUTH="):
                keyword, words = "AUTH", ["AUTH", keyword[5:]] + words[1:]
            capabilities.setdefault(keyword, []).extend(words[1:])
    return capabilities

