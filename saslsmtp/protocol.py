"""``SubmissionESMTP``: one SMTP submission connection (commands, STARTTLS, replies).

Theory of operation
-------------------
Stock ``twisted.mail.smtp.ESMTP`` runs SASL synchronously and processes pipelined lines
while a Deferred is pending.  This protocol keeps the stock class as its base (cred
portal, ``TimeoutMixin``) but reads, dispatches and answers itself, with one object per
job:

* ``saslsmtp.lines.LineReader``: line framing and the queue of pipelined lines.  Every
  command whose answer may come later marks the connection *busy* (``busy_until``): the
  transport is paused, further lines queue, and the queue is drained only after the
  reply for the current step was written, so pipelined commands are answered in order.
  The admission over a shared limits store waits the same way without a Deferred
  (``hold``, then ``settled``).
* ``saslsmtp.smtpauth.SmtpAuth``: the AUTH command and its replies, driving one
  ``saslsmtp.auth.AuthExchange`` per AUTH.
* ``saslsmtp.transaction.MailTransaction``: MAIL, RCPT, DATA.
* **STARTTLS** discards whatever plaintext followed it in the same read, then resets the
  session (RFC 3207 4.2).
* Input that cannot be commands is never read as commands: a message body sent before a
  refused DATA was answered, a message header or an HTTP request instead of a command
  (421 and close, like Postfix's ``smtpd_forbid_unauth_pipelining`` and
  ``smtpd_forbidden_commands``), the chunk of a BDAT (not announced: 502, skipped).

The connection is a streaming producer for its transport, and its time and volume
bounds (TLS handshake and unauthenticated-session deadlines, junk and error counts,
flooding, ``close()`` with its grace period) are ``saslsmtp.guards.ConnectionGuards``.
What it knows of the client is a ``saslsmtp.peer.Peer``; the abuse limits' verdicts are
applied by ``saslsmtp.admission.ConnectionAdmission``.

Every reply comes from ``saslsmtp.replies`` and carries its enhanced code.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, cast

from twisted.internet import defer
from twisted.internet.interfaces import IHandshakeListener, IPushProducer, ISSLTransport, ITLSTransport
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.python.failure import Failure
from zope.interface import implementer

from saslsmtp.admission import ConnectionAdmission
from saslsmtp.auth import FailurePolicy, PasswordScript, Resolver, no_resolver
from saslsmtp.engine_settings import EngineSettings  # also importable from here
from saslsmtp.events import NoSessionEvents, SessionEvents
from saslsmtp.guards import JUNK_VERBS, ConnectionGuards
from saslsmtp.limits.session import ConnectionLimits
from saslsmtp.lines import OVERLONG, OVERLONG_AUTH, LineReader
from saslsmtp.peer import Peer
from saslsmtp.replies import REPLIES, SMTPReply, ehlo_reply
from saslsmtp.sasl.mechanism import MechanismSpec
from saslsmtp.sasl.outcome import Session
from saslsmtp.smtpauth import AUTH_LINE_LIMIT, SmtpAuth
from saslsmtp.tlsinfo import handshake_error
from saslsmtp.transaction import MailTransaction, ProtocolError, SenderCheck
from saslsmtp.settled import is_deferred

__all__ = ["SubmissionESMTP", "EngineSettings"]

log = Logger(namespace="saslsmtp.smtp")

COMMAND_LINE_LIMIT = 2048  # RFC 5321 says 512; MAIL with AUTH= may add 500; be generous
VERBS = frozenset({b"EHLO", b"HELO", b"MAIL", b"RCPT", b"DATA", b"RSET", b"NOOP", b"VRFY",
                   b"HELP", b"QUIT", b"STARTTLS", b"AUTH"})

_HELO_ARG = re.compile(rb"^[\x21-\x7e]{1,255}$")
# an unknown "command" that is a message header ("Subject: ...", a body sent after a
# refused DATA) or an HTTP request (a browser made to talk to us): nothing that follows
# can be trusted to be SMTP
_NOT_SMTP = re.compile(rb"^\s*(?:(?:CONNECT|DELETE|GET|HEAD|OPTIONS|POST|PUT)\s|[\x21-\x39\x3b-\x7e]+[ \t]*:)",
                       re.IGNORECASE)
_BDAT = re.compile(rb"^(\d{1,20})(?:[ \t]+LAST)?[ \t]*$", re.IGNORECASE)


class _Held:
    """What a connection in ``hold`` waits on instead of a Deferred.  Cancelling it does
    nothing: the answer is stopped by ``ConnectionLimits.release``."""

    __slots__ = ()

    def cancel(self) -> None:
        pass


HELD = _Held()


@implementer(IPushProducer, IHandshakeListener)
class SubmissionESMTP(smtp.ESMTP):
    """The submission protocol.  One instance per connection; see the module docstring.

    Collaborators are injected: ``portal`` (cred portal whose realm returns an
    ``IMessageDelivery`` avatar), ``mechanisms`` (name -> ``MechanismSpec``),
    ``tls_context`` (server TLS options or ``None``), ``clock`` (``IReactorTime``),
    ``resolver`` (answers ``Lookup``/``ValidateToken``), ``script`` (decides ``Verify``
    when an AUTH script is configured), ``blocking`` (runner for expensive steps).
    """

    transport: Any  # a TCP or TLS transport; StringTransport in tests

    # Slots for this class's own state: stock ESMTP's attributes plus these would exceed
    # CPython's shared-key limit (30), giving every connection its own ~1.8 KB __dict__
    # (benchmarks/idle_connections.py).  The stock attributes still live in __dict__.
    __slots__ = ("events", "portal", "settings", "tls_context", "client_identity", "peer",
                 "context", "guards", "reader", "_paused", "_pending", "lost", "tls",
                 "_can_starttls", "_ehlo_done", "limits", "admission", "auth", "avatar",
                 "transaction")

    def __init__(self, *, portal: Any, settings: EngineSettings,
                 mechanisms: Mapping[str, MechanismSpec], clock: Any,
                 tls_context: Any = None, resolver: Resolver = no_resolver,
                 script: PasswordScript | None = None,
                 blocking: Any = None, client_identity: str = "cn",
                 events: SessionEvents | None = None,
                 sender_check: SenderCheck | None = None, limiter: Any = None) -> None:
        smtp.ESMTP.__init__(self, chal={}, contextFactory=tls_context)
        self.events = events if events is not None else NoSessionEvents()  # metrics, session log
        self.portal = portal
        self.settings = settings
        self.host = settings.hostname.encode("ascii")
        call_later = clock.callLater  # one bound method for the idle timer and the guards
        self.callLater = call_later  # type: ignore[method-assign]  # TimeoutMixin's clock
        self.timeout = settings.idle_timeout  # type: ignore[assignment]
        self.tls_context = tls_context
        self.client_identity = client_identity
        self.peer = Peer(settings.hostname, client_identity)  # addresses, HELO name
        self.context = self.peer.context  # the AUTH script's per-connection context
        self.guards = ConnectionGuards(self, call_later, settings)
        self.reader = LineReader(self._line, self._leaving, on_flood=self.guards.flooded)
        self._paused = False
        self._pending: defer.Deferred | _Held | None = None  # what the connection waits on
        self._waited_out = False  # idle_timeout came while the server was answering
        self.lost = False
        self.tls = False
        self._can_starttls = False
        self._ehlo_done = False
        self.limits = ConnectionLimits(limiter) if limiter is not None else None  # abuse limits
        self.admission = ConnectionAdmission(self, self.limits) if self.limits is not None else None
        self.auth = SmtpAuth(
            self, portal=portal, mechanisms=mechanisms, offered=settings.mechanisms,
            require_tls=settings.require_tls, clock=clock,
            failures=FailurePolicy(settings.max_failures, settings.failure_delay),
            max_steps=settings.max_steps, resolver=resolver, script=script, blocking=blocking,
            limits=self.limits)
        self.avatar: Any = None  # the IMessageDelivery mail goes to (set by AUTH)
        self.transaction = MailTransaction(settings.max_message_size, settings.max_recipients,
                                           sender_check)
        self.transaction.events = self.events
        self.transaction.on_accepted = self._message_accepted

    @property
    def auth_user(self) -> str | None:
        """Who logged in on this connection, or ``None``."""
        return self.auth.login.username if self.auth.login else None

    @property
    def peer_ip(self) -> str:
        return self.peer.ip

    # ------------------------------------------------------------------
    # Connection life cycle
    # ------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.peer.read(self.transport)
        self.tls = bool(ISSLTransport.providedBy(self.transport))
        self._can_starttls = (not self.tls and self.tls_context is not None
                              and ITLSTransport.providedBy(self.transport))
        self.guards.connected(self.tls, self.settings.require_auth)
        self.setTimeout(self.timeout)
        if self.admission is not None:
            self.admission.connected()  # greets unless the client is refused
        else:
            self.greet()

    def greet(self) -> None:
        self.write(b"220 " + self.host + b" ESMTP saslsmtp\r\n")

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = True
        self.setTimeout(None)
        if self.guards.handshake_pending:
            why = handshake_error(reason, self.transport)
            if why is not None:  # plaintext on a TLS port, a certificate refused by either side
                log.info("TLS handshake with {peer} failed: {why}", peer=self.peer.ip, why=why)
        self.guards.lost()
        keep = self.auth.end()  # a check under the limits runs on: its verdict counts
        pending, self._pending = self._pending, None
        if pending is not None and not keep:
            pending.cancel()
        self.transaction.abort()
        self.reader.raw = None
        self.reader.clear()
        self._forget_login()
        if self.limits is not None:
            self.limits.release()
        self.events.ended(self.peer.ip, self.tls)

    def timeoutConnection(self) -> None:
        """``idle_timeout`` without a line from the client.  While the server itself is
        answering (a backend, the relay's final reply) the client is not the idle one:
        the timer starts again, and that wait keeps its own bound."""
        if self._pending is not None and not self.lost:
            self._waited_out = True  # the client's idle time starts again at the answer
            self.setTimeout(self.timeout)
            return
        self.send(REPLIES["timeout"])
        self.close()

    def close(self) -> None:
        """End the connection once the replies written so far are out (see
        ``ConnectionGuards.close``)."""
        self.guards.close()

    @property
    def busy(self) -> bool:
        """Inside a step a shutdown lets finish: an AUTH exchange, a message being
        received, or an answer being worked out (a backend, the relay, the Maildir)."""
        return (self.auth.exchange is not None or self.transaction.receiving
                or self._pending is not None)

    def end(self, reply: SMTPReply, *, answer_first: bool = True) -> None:
        """End the session from outside (``saslsmtp-ctl kick``, a shutdown) with
        ``reply`` (a 421 from ``saslsmtp.replies``), as if its client had hung up now.

        A message still arriving (between the 354 and the final dot) is discarded and
        its temporary file removed: an unfinished DATA is no message (RFC 5321
        4.1.1.4).  An answer being worked out (the final dot was read and the message is
        being stored, a backend is checking a password) is sent first, then ``reply``:
        the client learns its message went through and does not send it again.  With
        ``answer_first=False`` (a shutdown whose grace is over) it is not waited for.
        A session still waiting for its admission (``hold``) has no answer to send: it
        gets ``reply`` at once, and no greeting after it.
        A session already closing is left alone.  The one way kick and shutdown close a
        session, so they cannot treat a message differently."""
        pending = self._pending
        if (pending is None or isinstance(pending, _Held) or not answer_first
                or self.transaction.receiving):
            return self._end_now(reply)

        def then(result: Any) -> Any:
            self._end_now(reply)  # after the answer and whatever it let through
            return result
        pending.addBoth(then)

    def _end_now(self, reply: SMTPReply) -> None:
        if self._leaving():
            return
        if self.transaction.receiving:
            self.transaction.abort()  # the partial message: never delivered
        self.send(reply)
        self.close()

    def handshakeCompleted(self) -> None:
        """IHandshakeListener: the TLS handshake finished, its deadline no longer applies."""
        self.guards.handshake_done()
        self.events.tls_established(self.transport)

    # IPushProducer: the transport says when replies pile up unread

    def pauseProducing(self) -> None:
        self.reader.block()

    def resumeProducing(self) -> None:
        if self._leaving():
            self.close()  # closing while paused: the transport waits for its producer
            return
        self.reader.unblock()

    def stopProducing(self) -> None:
        pass

    def session(self, mechanism: str = "") -> Session:
        """The connection as mechanisms, checkers and scripts see it (``Peer.session``)."""
        return self.peer.session(self.transport, self.tls, mechanism)

    def _login_session(self) -> Session:
        """``session`` after AUTH: the mechanism is the one the client logged in with
        (what a script's ``sender()`` sees as ``arguments["mechanism"]``)."""
        login = self.auth.login
        return self.session(login.mechanism if login is not None else "")

    # ------------------------------------------------------------------
    # Reading: one line at a time, busy while an answer is pending
    # ------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.guards.handshake_pending:
            self.handshakeCompleted()  # application data flows only after the handshake
        if self.reader.busy and not self._paused and not self.transport.disconnecting:
            # Pipelined input while an answer is pending: stop reading until it is sent
            # (what already arrived waits in the reader).  Paused only when input
            # arrives, not for every pending answer: that costs two epoll changes.
            self._paused = True
            self.transport.pauseProducing()
        self.reader.feed(data)

    @property
    def leaving(self) -> bool:
        """Already on its way out (the client hung up, a guard or ``end`` is closing it,
        or the transport is disconnecting): no more lines are read, nothing more is
        started, and ``who`` and ``kick`` pass it over."""
        return self._leaving()

    def _leaving(self) -> bool:
        """``leaving`` in one call: the line reader asks it before every line (a bound
        method, made once), and so does the protocol itself."""
        return self.lost or self.guards.closing or bool(self.transport.disconnecting)

    def _line(self, line: bytes) -> None:
        """One line, in order: the body of a message, an AUTH response or a command."""
        self.resetTimeout()
        if self.auth.exchange is not None:
            self.auth.line(OVERLONG if line is OVERLONG_AUTH else line)
        elif line is OVERLONG:
            self.error(REPLIES["line_too_long"])
        elif line is OVERLONG_AUTH:  # as if it had come in one read (_command_line)
            self.error(REPLIES["auth_line_too_long"])
        else:
            self._command_line(line)

    def busy_until(self, d: "defer.Deferred[Any]",
                   then: "Callable[[Any], Any] | None" = None) -> None:
        """Be busy until ``d`` (whose callbacks write the reply) has fired, and
        ``then(result)`` has written it (it may return a Deferred to wait for too), then
        replay queued lines.  The drain runs last, after the reply.  One callback on
        ``d`` for all of it: over a Redis store every session waits here twice."""
        self.reader.hold()
        self._pending = d
        if then is None:
            d.addBoth(self._settled)
        else:
            d.addBoth(self._answered, then)

    def hold(self) -> None:
        """``busy_until`` without a Deferred: busy until ``settled()`` (the admission's
        wait for a shared store, which every session over Redis makes)."""
        self.reader.hold()
        self._pending = HELD

    def settled(self, failure: Failure | None = None) -> None:
        """The end of a ``hold``: a failure gets the internal-error reply, then the
        queued lines are replayed."""
        self._settled(failure)

    def _answered(self, result: Any, then: Callable[[Any], Any]) -> Any:
        if not isinstance(result, Failure):
            try:
                later = then(result)
            except Exception:
                result = Failure()
            else:
                if later is not None and is_deferred(later):
                    return later.addBoth(self._settled)
        return self._settled(result)

    def _internal_error(self, failure: Failure) -> None:
        if self.lost:
            return None
        log.failure("unexpected error while answering", failure=failure)
        if self.auth.exchange is not None:
            self.auth.exchange = None
            self.send(REPLIES["auth_tempfail"])
        else:
            self.send(REPLIES["local_error"])
        return None

    def _settled(self, result: Any) -> None:
        """``busy_until``'s Deferred has fired: a failure gets the internal-error reply,
        then the queued lines are replayed."""
        if isinstance(result, Failure):
            self._internal_error(result)
        self._pending = None
        if self._waited_out:
            self._waited_out = False
            self.resetTimeout()
        if self._leaving():
            self.reader.busy = False
            return None
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()
        self.reader.release()
        return None

    # ------------------------------------------------------------------
    # Writing
    # ------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not self.lost and not self.transport.disconnecting:
            self.transport.write(data)

    def send(self, reply: SMTPReply) -> None:
        self.write(reply.to_bytes())

    def error(self, reply: SMTPReply) -> None:
        """A protocol error reply; too many of them close the connection."""
        self.send(reply)
        self.guards.error()

    def _answer(self, answer: Any) -> None:
        """Send what the mail transaction answered, now or when its Deferred fires."""
        if is_deferred(answer):
            self.busy_until(answer, self._answer)
        elif isinstance(answer, ProtocolError):
            self.error(answer.reply)
        else:
            self.send(answer)

    # ------------------------------------------------------------------
    # Commands
    # ------------------------------------------------------------------

    def _command_line(self, line: bytes) -> None:
        if len(line) > COMMAND_LINE_LIMIT and not line[:5].upper().startswith(b"AUTH "):
            return self.error(REPLIES["line_too_long"])
        if len(line) > AUTH_LINE_LIMIT:
            return self.error(REPLIES["auth_line_too_long"])
        if b"\0" in line:
            return self.error(REPLIES["bad_syntax"].with_text("NUL characters are not allowed"))
        parts = line.strip().split(None, 1)
        if not parts:
            return self.error(REPLIES["bad_syntax"])
        verb = parts[0].upper()
        if (verb in JUNK_VERBS or verb not in VERBS) and self.guards.junk_over_limit():
            return None
        if verb not in VERBS:
            return self._unknown(verb, line, parts[1] if len(parts) > 1 else b"")
        getattr(self, "do_" + verb.decode("ascii"))(parts[1] if len(parts) > 1 else b"")

    def _unknown(self, verb: bytes, line: bytes, arg: bytes) -> None:
        """Not one of our commands: 500, or for what cannot be SMTP, 421 and close."""
        if verb == b"BDAT":
            return self._bdat(arg)
        if _NOT_SMTP.match(line):
            log.info("{peer} sent a message header or an HTTP request as a command; closing",
                     peer=self.peer.ip)
            self.send(REPLIES["not_smtp"])
            return self.close()
        self.error(REPLIES["unknown_command"])

    def _bdat(self, arg: bytes) -> None:
        """BDAT (RFC 3030) without CHUNKING announced: 502, and the chunk that follows the
        command line is read and dropped, so its bytes are not taken for commands."""
        self.error(REPLIES["not_implemented"].with_text("BDAT not implemented; use DATA"))
        size = _BDAT.match(arg.strip())
        if size is None or self._leaving() or not int(size.group(1)):
            return
        left = int(size.group(1))

        def skip(data: bytes) -> bytes | None:
            nonlocal left
            self.resetTimeout()
            if len(data) < left:
                left -= len(data)
                return None
            self.reader.raw = None
            return data[left:]
        self.reader.raw = skip

    def do_EHLO(self, arg: bytes) -> None:
        name = arg.strip()
        if not _HELO_ARG.match(name):
            return self.error(REPLIES["ehlo_syntax"])
        self._greeted(name)
        mechanisms = tuple(self.auth.offered_mechanisms()) if self.auth.login is None else ()
        self.send(ehlo_reply(self.settings.hostname, self.settings.max_message_size,
                             self._can_starttls, mechanisms))

    def do_HELO(self, arg: bytes) -> None:
        name = arg.strip()
        if not _HELO_ARG.match(name):
            return self.error(REPLIES["helo_syntax"])
        self._greeted(name)
        self.send(SMTPReply(250, None, self.host.decode("ascii")))

    def _greeted(self, name: bytes) -> None:
        self.peer.helo = name.decode("ascii")
        self._ehlo_done = True
        self.transaction.reset()

    def do_NOOP(self, arg: bytes) -> None:
        self.send(REPLIES["noop"])

    def do_RSET(self, arg: bytes) -> None:
        self.transaction.reset()
        self.send(REPLIES["reset"])

    def do_VRFY(self, arg: bytes) -> None:
        self.send(REPLIES["vrfy"])

    def do_HELP(self, arg: bytes) -> None:
        self.send(SMTPReply(214, "2.0.0", "See RFC 5321 and RFC 4954"))

    def do_QUIT(self, arg: bytes) -> None:
        self.send(REPLIES["bye"])
        self.close()

    def do_STARTTLS(self, arg: bytes) -> None:
        if arg.strip():
            return self.error(REPLIES["starttls_args"])
        if self.tls:
            return self.error(REPLIES["starttls_already"])
        if not self._can_starttls:
            return self.error(REPLIES["starttls_unavailable"])
        self.send(REPLIES["starttls_go"])
        # Nothing sent in plaintext after STARTTLS may count (CVE-2011-0411 style injection).
        self.reader.discard_pending()
        self.guards.expect_handshake()
        self.transport.startTLS(self.tls_context)
        self.tls = True
        self._can_starttls = False
        # RFC 3207 4.2: forget everything learned before TLS.
        self._ehlo_done = False
        self.peer.helo = ""
        self.transaction.reset()
        if self.authenticated:
            self.guards.login_forgotten(self.settings.require_auth)
            self.events.login_forgotten()
        self._forget_login()

    def do_AUTH(self, arg: bytes) -> None:
        if self.auth.login is not None:
            return self.error(REPLIES["auth_already"])
        if not self._ehlo_done:
            return self.error(REPLIES["auth_need_ehlo"])
        if self.transaction.open:
            return self.error(REPLIES["auth_in_transaction"])
        self.auth.command(arg)

    def authenticated_as(self, avatar: Any) -> None:
        """AUTH succeeded: mail now goes to ``avatar``."""
        self.avatar = avatar
        self.authenticated = True
        self.guards.authenticated()

    def _forget_login(self) -> None:
        self.auth.logout()
        self.avatar = None
        self.authenticated = False

    def do_MAIL(self, arg: bytes) -> None:
        if not self._ehlo_done:
            return self.error(REPLIES["bad_sequence"].with_text("Send EHLO/HELO first"))
        if self.authenticated:
            self.guards.junk = 0  # an accountable client at work (Postfix: after each message)
        client = self.peer.client(self.auth_user if self.authenticated else None,
                                  self._login_session)

        def mail() -> Any:
            return self.transaction.mail(arg, self.avatar, self.peer.helo_pair(),
                                         self.settings.require_auth, client)
        self._answer(self.admission.mail(mail) if self.admission is not None else mail())

    def do_RCPT(self, arg: bytes) -> None:
        def rcpt() -> Any:
            return self.transaction.rcpt(arg, self.avatar, self.peer.helo_pair(), self)
        if self.admission is not None and self.transaction.open:
            return self._answer(self.admission.rcpt(rcpt))
        self._answer(rcpt())

    def do_DATA(self, arg: bytes) -> None:
        stamp = self.peer.stamp(self.tls, self.auth_user if self.authenticated else None)
        answer = self.transaction.data(arg, stamp, self.transport)
        if is_deferred(answer):
            self.busy_until(answer, self._data_answered)
        else:
            self._data_answered(cast("SMTPReply | ProtocolError", answer))

    def _message_accepted(self) -> None:
        """A message was answered 2xx: like Postfix's ``smtpd_hard_error_limit``, the
        error count is of errors made without delivering mail."""
        self.guards.errors = 0
        if self.admission is not None:
            self.admission.message_accepted()

    # ------------------------------------------------------------------
    # The message body: bytes, not lines (saslsmtp.body)
    # ------------------------------------------------------------------

    def _data_answered(self, answer: SMTPReply | ProtocolError) -> None:
        """Send DATA's answer.  After ``354`` every byte goes to the transaction until the
        final dot (a body sent before the 354 too).  After a refusal, input the client
        sent before it (RFC 2920: DATA ends a pipelined group, so that can only be the
        body) must not be read as commands: 421 and close."""
        if isinstance(answer, ProtocolError):
            self.error(answer.reply)
        else:
            if answer.code == 354 and self.transaction.receiving and not self.lost:
                self.reader.raw = self._body_bytes
                return self.send(answer)
            self.send(answer)
        if self.reader.input_waiting() and not self._leaving():
            log.info("{peer} sent more input before the reply to its DATA; closing",
                     peer=self.peer.ip)
            self.send(REPLIES["out_of_sync"])
            self.close()

    def _body_bytes(self, data: bytes) -> bytes | None:
        self.resetTimeout()
        outcome = self.transaction.body(data)
        if outcome.answer is None:
            return None
        self.reader.raw = None
        self._answer(outcome.answer)
        return outcome.rest


