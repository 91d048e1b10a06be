"""One upstream SMTP/LMTP connection: the line protocol, replies in order, flow control.

``UpstreamConnection`` sends command lines and matches the upstream's replies to them
first in, first out; every wait has its own timeout on the injected clock and fails with
``UpstreamError``, whose ``reply`` is what our client gets (``451 4.4.2`` for a timeout or
a lost connection, ``451 4.4.1`` for a TLS failure, ``451 4.5.0`` for a protocol error).
A protocol error is a line that is not an SMTP reply, a reply the command cannot have
(``wire.Expected``: a ``354`` to MAIL, a ``250`` to DATA), a reply nothing asked for, or
one that arrived before its command was sent; each drops the connection (it can never go
back to the pool) with one warning naming the upstream, the reply and the command.  A
``421`` drops it too: the upstream is closing, and our client gets its text as ``451``.
It is the producer registered on its own transport, so the upstream's backpressure
reaches our client's transport during DATA.  ``parse_capabilities`` reads the EHLO
keywords.  The handshake and the pool are in ``client``; one message is ``transaction``.
"""

from __future__ import annotations

from dataclasses import dataclass
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
from saslsmtp.relay.wire import (END_OF_DATA, MAX_LINE, Expected, ProtocolViolation,
                                 ReplyParser, UpstreamReply, pass_on, shown)
from saslsmtp.replies import REPLIES, SMTPReply

# the namespace operators filter on stays the one of the relay client
log = Logger(namespace="saslsmtp.relay.client")


class UpstreamError(Exception):
    """Why a conversation with the upstream ended; ``reply`` is what our client gets.

    ``closing``: the upstream said ``421``; ``warn``: the upstream broke the protocol,
    or never answered the final dot (a second copy may follow): logged as a warning, an
    operator should look at it."""

    def __init__(self, reply: SMTPReply, why: str, *, closing: bool = False,
                 warn: bool = False) -> None:
        super().__init__(why)
        self.reply = reply
        self.closing = closing
        self.warn = warn


@dataclass(frozen=True)
class _Waiting:
    """One reply waited for: what answers it, and in which read its command was sent."""

    deferred: "Deferred[UpstreamReply]"
    expected: Expected
    sent_in_read: int | None



@implementer(IPushProducer)
class UpstreamConnection(LineOnlyReceiver):
    """One upstream connection: commands out, replies in (FIFO), flow control up.

    ``command(line, expected)`` / ``expect(expected)`` return Deferreds of the
    ``UpstreamReply`` (one ``expected`` allows, never a ``421``) that fail with
    ``UpstreamError``; each has its own ``timeout`` on the injected ``clock``.
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
        self.pending: list[_Waiting] = []
        self._reads = 0            # dataReceived calls so far
        self._reading = False      # inside one: a command sent now is not answered by it
        self.capabilities: dict[str, list[str]] = {}
        self.closed = False
        self.error: UpstreamError | None = None
        self.paused = False
        self.downstream: IPushProducer | None = None
        self.on_lost: Callable[["UpstreamConnection"], None] | None = None
        self.xclient_sent: tuple[str, ...] | None = None
        self.tls = False
        self.idle = False          # in the pool: its loss is no news
        self.quitting = False      # we said QUIT: its loss is expected
        self.refusals = 0          # 4yz/5yz replies since the last message it accepted
        self.transactions = 0      # transactions it was handed to (the pool's reuse limit)
        self.handshaking = False   # the client logs how the handshake ended (its outage log)

    def __repr__(self) -> str:
        return f"<UpstreamConnection {self.name}{' closed' if self.closed else ''}>"

    # ---- commands ----------------------------------------------------------------

    def expect(self, expected: Expected, timeout: float | None = None
               ) -> "Deferred[UpstreamReply]":
        """The next reply (the greeting, the end of data, one more LMTP verdict); it must
        be one ``expected`` allows, or the connection is dropped (``UpstreamError``).
        ``timeout`` (default: the connection's) bounds the wait."""
        if self.closed or self.error is not None:
            return defer.fail(self.error or UpstreamError(REPLIES["upstream_lost"], "closed"))
        wait = self.timeout if timeout is None else timeout
        d: Deferred[UpstreamReply] = Deferred(lambda _: self.fail(UpstreamError(
            REPLIES["upstream_timeout"], f"no reply to {expected.command} within {wait:g}s"
                                         + after_the_dot(expected), warn=expected is END_OF_DATA)))
        self.pending.append(_Waiting(d, expected, self._reads if self._reading else None))
        d.addTimeout(wait, self.clock)
        d.addErrback(self._explain)
        return d

    def _explain(self, failure: Failure) -> Failure:
        if failure.check(defer.TimeoutError, CancelledError):
            return Failure(self.error or UpstreamError(REPLIES["upstream_timeout"], "timeout"))
        return failure

    def command(self, line: bytes, expected: Expected) -> "Deferred[UpstreamReply]":
        """Send one command line and wait for its reply (see ``expect``)."""
        d = self.expect(expected)
        if not self.closed and self.error is None:
            self.sendLine(line)
        return d

    def fail(self, error: UpstreamError) -> None:
        """The connection is unusable: drop it; every waiting reply fails with ``error``."""
        if self.error is None:
            self.error = error
            if not self.handshaking:
                (log.warn if error.warn else log.info)("upstream {name}: {why}",
                                                       name=self.name, why=str(error))
        if self.transport is not None and not self.closed:
            self.transport.abortConnection()
        self._fail_pending()

    def _fail_pending(self) -> None:
        pending, self.pending = self.pending, []
        error = self.error or UpstreamError(REPLIES["upstream_lost"], "connection lost")
        for waiting in pending:
            if not waiting.deferred.called:
                waiting.deferred.errback(error)

    # ---- wire --------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)

    def dataReceived(self, data: bytes) -> None:
        self._reads += 1
        self._reading = True
        try:
            super().dataReceived(data)
        finally:
            self._reading = False

    def lineReceived(self, line: bytes) -> None:
        if self.closed or self.error is not None:
            return
        while self.pending and self.pending[0].deferred.called:  # timed out already
            self.pending.pop(0)
        waiting = self.pending[0] if self.pending else None
        try:
            reply = self.parser.line(line)
        except ProtocolViolation as e:
            self._protocol_error(f"{self._answered(waiting, shown(line))} ({e})")
            return
        if reply is None:
            return
        if reply.code == 421:  # the upstream is closing: this connection is over
            if waiting is None and self.idle:
                # a pooled connection's idle timeout (Postfix: "421 4.4.2 ... Error:
                # timeout exceeded") or the upstream's shutdown: no news, as its close
                self.error = UpstreamError(pass_on(reply), "closed while idle", closing=True)
            self.fail(UpstreamError(pass_on(reply), "closing: " + self._answered(
                waiting, reply.excerpt()), closing=True))
        elif waiting is None or not waiting.expected.allows(reply.code):
            self._protocol_error(self._answered(waiting, reply.excerpt()))
        elif waiting.sent_in_read == self._reads:
            # the upstream answered before it could have read the command: a stray
            # reply, and every later one would be taken for the next command's
            self._protocol_error(self._answered(waiting, reply.excerpt()) + " before it was sent")
        else:
            self.pending.pop(0)
            if reply.code >= 400:
                self.refusals += 1
            elif waiting.expected is END_OF_DATA:
                self.refusals = 0  # (Postfix forgets a session's errors once it delivers)
            waiting.deferred.callback(reply)

    @staticmethod
    def _answered(waiting: _Waiting | None, what: str) -> str:
        """``MAIL FROM answered "354 go ahead"``: for the log line."""
        if waiting is None:
            return f"{what} while nothing was asked"
        return f"{waiting.expected.command} answered {what}"

    def _protocol_error(self, why: str) -> None:
        self.fail(UpstreamError(REPLIES["upstream_error"], f"protocol error: {why}", warn=True))

    def lineLengthExceeded(self, line: bytes) -> None:
        waiting = self.pending[0] if self.pending else None
        self._protocol_error(self._answered(waiting, f"a line over {MAX_LINE} octets"))

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.closed = True
        if self.error is None:
            if reason.check(CertificateIdentityError):
                why = f"TLS certificate refused: {reason.value}"
                self.error = UpstreamError(REPLIES["upstream_unavailable"], why)
            elif reason.check(SSL.Error):
                self.error = UpstreamError(REPLIES["upstream_unavailable"],
                                           tls_failure(reason.value))
            elif not self.quitting and (self.pending or not self.idle):
                # a transaction holds it (waiting, between commands or streaming DATA);
                # after our QUIT (a full pool, shutdown) nothing is lost with it
                waited = self.pending[0].expected if self.pending else None
                what = (f" waiting for the reply to {waited.command}{after_the_dot(waited)}"
                        if waited is not None else " during DATA" if self.downstream else "")
                self.error = UpstreamError(REPLIES["upstream_lost"], f"connection lost{what}",
                                           warn=waited is END_OF_DATA)
            if self.error is not None and not self.handshaking:
                (log.warn if self.error.warn else log.info)("upstream {name}: {why}",
                                                            name=self.name, why=str(self.error))
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


def after_the_dot(expected: Expected) -> str:
    """What a reply to the final dot that never came means (the log line's end)."""
    if expected is not END_OF_DATA:
        return ""
    return ("; the upstream may have accepted the message: the client's retry may deliver"
            " a second copy")


def tls_failure(error: SSL.Error) -> str:
    """``TLS handshake failed: certificate verify failed (...)``: OpenSSL's reasons, for
    the log (a wrong ``ca_file`` and a server that refused our TLS version read alike
    without them)."""
    reasons: list[str] = []
    for entry in (error.args[0] if error.args and isinstance(error.args[0], list) else []):
        reason = entry[-1] if isinstance(entry, tuple) and entry else entry
        if isinstance(reason, str) and reason and reason not in reasons:
            reasons.append(reason)
    why = "TLS handshake failed" + (": " + "; ".join(reasons) if reasons else "")
    if "certificate verify failed" in reasons:
        why += (" (the upstream's certificate chain does not verify against ca_file, or"
                " the system's CAs when ca_file is not set)")
    return why


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

