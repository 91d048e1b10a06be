"""``ConnectionGuards``: the time and volume bounds of one SMTP connection.

A client that never authenticates, never finishes its TLS handshake, sends nothing but
junk or never reads its replies must still cost a bounded amount, and every way out goes
through one ``close()``.  ``SubmissionESMTP`` owns one ``ConnectionGuards`` and tells it
what happened (connected, handshake done, authenticated, a junk verb, an error, lost):

* the connection is a streaming producer for its transport: when replies pile up unread
  (the transport's write buffer is full) lines wait in the reader, and a client that
  keeps sending anyway is flooding (421, see ``saslsmtp.lines``);
* junk commands (NOOP, RSET, VRFY, HELP, unknown verbs) are counted like Postfix's
  ``smtpd_junk_command_limit``, protocol errors up to ``MAX_ERRORS``;
* an unauthenticated session ends after ``max_unauthenticated_time`` whatever it sends;
  a TLS handshake (``ssl:`` listener or STARTTLS) must finish within
  ``tls_handshake_timeout``;
* ``close()`` unregisters the producer (or the transport would wait for it forever) and
  aborts a connection whose last replies are not read within ``CLOSE_GRACE`` (no timer
  when the kernel has already taken every byte: such a connection closes at once).
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

from twisted.logger import Logger

from saslsmtp.engine_settings import EngineSettings
from saslsmtp.replies import REPLIES, SMTPReply
from saslsmtp.sendnow import all_sent

log = Logger(namespace="saslsmtp.smtp")

MAX_ERRORS = 20  # protocol errors per connection before 421
JUNK_VERBS = frozenset({b"NOOP", b"RSET", b"VRFY", b"HELP"})  # and unknown verbs
CLOSE_GRACE = 10.0  # seconds a closing connection may take to flush its last replies


class GuardedConnection(Protocol):
    """What the guards need of their connection (``SubmissionESMTP``)."""

    transport: Any
    lost: bool

    @property
    def peer_ip(self) -> str: ...
    def send(self, reply: SMTPReply) -> None: ...


class ConnectionGuards:
    """Deadlines, counters and the one way to close, for one connection."""

    __slots__ = ("connection", "call_later", "junk_command_limit", "max_unauthenticated_time",
                 "tls_handshake_timeout", "junk", "errors", "_producing", "_session_deadline",
                 "_handshake_deadline", "_abort_deadline")  # one per connection: no __dict__

    def __init__(self, connection: GuardedConnection, call_later: Callable[..., Any],
                 settings: EngineSettings) -> None:
        self.connection = connection
        self.call_later = call_later
        self.junk_command_limit = settings.junk_command_limit
        self.max_unauthenticated_time = settings.max_unauthenticated_time
        self.tls_handshake_timeout = settings.tls_handshake_timeout
        self.junk = 0
        self.errors = 0
        self._producing = False  # the connection is registered as its transport's producer
        self._session_deadline: Any = None  # max_unauthenticated_time
        self._handshake_deadline: Any = None  # tls_handshake_timeout
        self._abort_deadline: Any = None  # CLOSE_GRACE after close()

    # ---- life cycle ------------------------------------------------------

    def connected(self, tls: bool, require_auth: bool) -> None:
        """The connection is made: register it as producer, start the deadlines."""
        if tls:
            self.expect_handshake()
        self.connection.transport.registerProducer(self.connection, True)
        self._producing = True
        if require_auth:
            self._session_deadline = self.call_later(self.max_unauthenticated_time,
                                                     self._unauthenticated_too_long)

    def lost(self) -> None:
        """The connection is gone: no deadline may fire any more."""
        calls = (self._session_deadline, self._handshake_deadline, self._abort_deadline)
        self._session_deadline = self._handshake_deadline = self._abort_deadline = None
        for call in calls:
            _cancel(call)

    @property
    def closing(self) -> bool:
        """``close()`` was called (the last replies may still be going out)."""
        return self._abort_deadline is not None

    def close(self) -> None:
        """End the connection once the replies written so far are out; one whose replies
        are never read is aborted after ``CLOSE_GRACE``."""
        transport = self.connection.transport
        if self._producing:
            self._producing = False
            transport.unregisterProducer()
        if self.connection.lost or self._abort_deadline is not None:
            return
        transport.loseConnection()
        if all_sent(transport):  # the usual case: closed on the next turn, no timer needed
            self._abort_deadline = _CLOSED
        else:
            self._abort_deadline = self.call_later(CLOSE_GRACE, self._abort)

    def _abort(self) -> None:
        self._abort_deadline = None
        if not self.connection.lost:
            self.connection.transport.abortConnection()

    def _end(self, text: str) -> None:
        """421 with ``text``, then close."""
        self.connection.send(REPLIES["auth_too_many_failures"].with_text(text))
        self.close()

    # ---- the unauthenticated session -------------------------------------

    def authenticated(self) -> None:
        """AUTH succeeded: ``max_unauthenticated_time`` no longer applies."""
        call, self._session_deadline = self._session_deadline, None
        _cancel(call)

    def login_forgotten(self, require_auth: bool) -> None:
        """STARTTLS after AUTH forgot the login (RFC 3207): the session is unauthenticated
        again, so ``max_unauthenticated_time`` applies again, counted from now."""
        if require_auth and self._session_deadline is None and not self.connection.lost:
            self._session_deadline = self.call_later(self.max_unauthenticated_time,
                                                     self._unauthenticated_too_long)

    def _unauthenticated_too_long(self) -> None:
        self._session_deadline = None
        if not self.connection.lost:
            self.connection.send(
                REPLIES["timeout"].with_text("Session time limit exceeded, closing connection"))
            self.close()

    # ---- the TLS handshake -----------------------------------------------

    def expect_handshake(self) -> None:
        """A TLS handshake starts (``ssl:`` listener or STARTTLS): start its deadline."""
        if self._handshake_deadline is None:
            self._handshake_deadline = self.call_later(self.tls_handshake_timeout,
                                                       self._handshake_too_slow)

    @property
    def handshake_pending(self) -> bool:
        return self._handshake_deadline is not None

    def handshake_done(self) -> None:
        call, self._handshake_deadline = self._handshake_deadline, None
        _cancel(call)

    def _handshake_too_slow(self) -> None:
        self._handshake_deadline = None
        if not self.connection.lost:
            log.info("TLS handshake with {peer} not finished after {seconds} s; closing",
                     peer=self.connection.peer_ip, seconds=self.tls_handshake_timeout)
            self.connection.transport.abortConnection()

    # ---- counted misbehaviour --------------------------------------------

    def junk_over_limit(self) -> bool:
        """Count a junk command; past ``junk_command_limit``: 421 and close."""
        self.junk += 1
        if self.junk <= self.junk_command_limit:
            return False
        self._end("Too many junk commands, closing connection")
        return True

    def error(self) -> None:
        """Count a protocol error (its reply is sent); at ``MAX_ERRORS``: 421 and close."""
        self.errors += 1
        if self.errors >= MAX_ERRORS:
            self._end("Too many errors, closing connection")

    def flooded(self) -> None:
        """The client kept sending without reading the replies (``saslsmtp.lines``)."""
        log.info("{peer} pipelined too much without reading the replies; closing",
                 peer=self.connection.peer_ip)
        self._end("Too much pipelined input without reading replies, closing connection")


class _Closed:
    """The abort deadline of a connection that needs none (everything was sent)."""

    def active(self) -> bool:
        return False


_CLOSED = _Closed()


def _cancel(call: Any) -> None:
    if call is not None and call.active():
        call.cancel()
