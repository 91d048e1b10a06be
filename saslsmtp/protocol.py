"""``SubmissionESMTP``: the SMTP submission protocol (framing, commands, STARTTLS, replies).

Theory of operation
-------------------
Stock ``twisted.mail.smtp.ESMTP`` runs SASL synchronously and processes pipelined
lines while a Deferred is pending.  This protocol keeps the stock class as its base
(cred portal, ``TimeoutMixin``) but does its own framing and command handling, and
hands the two other jobs to their own objects:

* **One line at a time.**  Every command whose answer may come later (AUTH steps,
  MAIL/RCPT validation, end of DATA, the failure delay) marks the connection *busy*:
  the transport is paused and further lines queue.  The queue is drained only after
  the reply for the current step has been written, so pipelined commands are answered
  in order.
* **AUTH** is one ``saslsmtp.auth.AuthExchange`` per command, built with the one
  ``Session`` of that exchange; each step ends in ``Reply`` (334), ``LoggedIn`` (235),
  ``Reject`` (535 after the failure delay, counted) or ``Defer`` (454).  This module is
  the only place that turns those outcomes into replies (``saslsmtp.replies.auth_reply``).
* **MAIL, RCPT, DATA** go to ``saslsmtp.transaction.MailTransaction``.
* **STARTTLS** discards whatever plaintext followed it in the same read, then resets
  the session (RFC 3207 4.2).
* Every reply comes from ``saslsmtp.replies`` and carries its enhanced code.

Per-connection hooks: ``connectionMade``/``connectionLost``; ``_start_exchange`` (before
any credentials are checked); ``_auth_answer`` (after every AUTH verdict); ``_answer``
(every MAIL/RCPT/DATA verdict); delivery itself is the realm's avatar.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, assert_never

from twisted.internet import defer, task
from twisted.internet.interfaces import ISSLTransport, ITLSTransport
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.python.failure import Failure

from saslsmtp.auth import (AuthExchange, FailurePolicy, LoggedIn, PasswordScript, Resolver,
                           StepResult, no_resolver)
from saslsmtp.replies import (DEFAULT_ENHANCED, REPLIES, SMTPReply, auth_reply,
                              auth_success_reply)
from saslsmtp.sasl.codec import DecodeError, decode_response
from saslsmtp.sasl.mechanism import MechanismSpec
from saslsmtp.sasl.outcome import Defer, Reject, Reply, Session
from saslsmtp.tlsinfo import tls_facts
from saslsmtp.transaction import MailTransaction, ProtocolError, Stamp

log = Logger(namespace="saslsmtp.smtp")

AUTH_LINE_LIMIT = 12288  # RFC 4954 section 4
COMMAND_LINE_LIMIT = 2048  # RFC 5321 says 512; MAIL with AUTH= may add 500; be generous
READ_LIMIT = 16384  # longest partial line buffered before it is refused
MAX_ERRORS = 20  # protocol errors per connection before 421
OVERLONG = b"<a line longer than READ_LIMIT>"  # a marker, compared by identity

_HELO_ARG = re.compile(rb"^[\x21-\x7e]{1,255}$")
_ENHANCED_TEXT = re.compile(r"^[245]\.\d{1,3}\.\d{1,3} ")


@dataclass(frozen=True)
class EngineSettings:
    """Per-listener behaviour of ``SubmissionESMTP`` (built from ``saslsmtp.config``)."""

    hostname: str = "localhost"
    mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN")
    require_tls: bool = True
    require_auth: bool = True
    failure_delay: float = 1.0
    max_failures: int = 3
    max_steps: int = 16
    max_message_size: int = 26214400
    max_recipients: int = 100
    idle_timeout: float = 300.0


class SubmissionESMTP(smtp.ESMTP):
    """The submission protocol.  One instance per connection; see the module docstring.

    Collaborators are injected: ``portal`` (cred portal whose realm returns an
    ``IMessageDelivery`` avatar), ``mechanisms`` (name -> ``MechanismSpec``),
    ``tls_context`` (server TLS options or ``None``), ``clock`` (``IReactorTime``),
    ``resolver`` (answers ``Lookup``/``ValidateToken``), ``script`` (decides ``Verify``
    when an AUTH script is configured), ``blocking`` (runner for expensive steps).
    """

    transport: Any  # a TCP or TLS transport; StringTransport in tests

    def __init__(self, *, portal: Any, settings: EngineSettings,
                 mechanisms: Mapping[str, MechanismSpec], clock: Any,
                 tls_context: Any = None, resolver: Resolver = no_resolver,
                 script: PasswordScript | None = None,
                 blocking: Any = None, client_identity: str = "cn") -> None:
        smtp.ESMTP.__init__(self, chal={}, contextFactory=tls_context)
        self.portal = portal
        self.settings = settings
        self.host = settings.hostname.encode("ascii")
        self.mechanism_specs = mechanisms
        self.clock = clock
        self.callLater = clock.callLater  # type: ignore[method-assign]  # TimeoutMixin's clock
        self.timeout = settings.idle_timeout  # type: ignore[assignment]
        self.tls_context = tls_context
        self.resolver = resolver
        self.script = script
        self.blocking = blocking
        self.client_identity = client_identity
        self.context: dict = {}  # the AUTH script's per-connection context
        # reading
        self._partial = b""  # bytes of a line not yet ended
        self._skip_to_eol = False
        self._discard_chunk = False
        self._queue: list[bytes] = []
        self._busy = False
        self._paused = False
        self._pending: defer.Deferred | None = None
        self._lost = False
        # the connection
        self._peer = ("", 0)
        self._local = ("", 0)
        self._tls = False
        self._can_starttls = False
        self._ehlo_done = False
        self._helo_name = ""
        self._errors = 0
        # AUTH and the mail transaction
        self._exchange: AuthExchange | None = None
        self._failures = FailurePolicy(settings.max_failures, settings.failure_delay)
        self.login: LoggedIn | None = None
        self.avatar: Any = None  # the IMessageDelivery of the logged-in user
        self.transaction = MailTransaction(settings.max_message_size, settings.max_recipients)

    @property
    def auth_user(self) -> str | None:
        return self.login.username if self.login else None

    @property
    def auth_mechanism(self) -> str | None:
        return self.login.mechanism if self.login else None

    # ------------------------------------------------------------------
    # Connection life cycle
    # ------------------------------------------------------------------

    def connectionMade(self) -> None:
        self._read_addresses()
        self._tls = ISSLTransport.providedBy(self.transport)
        self._can_starttls = (not self._tls and self.tls_context is not None
                              and ITLSTransport.providedBy(self.transport))
        self._write(b"220 " + self.host + b" ESMTP saslsmtp\r\n")
        self.setTimeout(self.timeout)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._lost = True
        self.setTimeout(None)
        if self._exchange is not None:
            self._exchange.cancel()
            self._exchange = None
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()
        self.transaction.abort()
        self._queue = []
        self._drop_authentication()

    def timeoutConnection(self) -> None:
        self._send(REPLIES["timeout"])
        self.transport.loseConnection()

    def _read_addresses(self) -> None:
        self._peer = _address(self.transport.getPeer())
        self._local = _address(self.transport.getHost())

    def _helo_pair(self) -> tuple:
        """The (HELO name, peer IP) pair stock ``smtp.User`` and avatars expect."""
        return (self._helo_name.encode("ascii") or None, self._peer[0])

    # ------------------------------------------------------------------
    # Reading: framing, line limits, the busy queue
    # ------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """Split into CRLF lines; refuse bare LF, bound the buffer, stop after STARTTLS."""
        if self._lost:
            return
        if self._skip_to_eol:  # the rest of a line already refused as too long
            end = data.find(b"\n")
            if end < 0:
                return
            data = data[end + 1:]
            self._skip_to_eol = False
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        self._discard_chunk = False
        for line in lines:
            if self._lost or self.transport.disconnecting or self._discard_chunk:
                break
            if not line.endswith(b"\r"):
                self._send(REPLIES["bare_lf"])
                self.transport.loseConnection()
                return
            self.lineReceived(line[:-1])
        if self._discard_chunk:
            self._partial = b""
            self._discard_chunk = False
            return
        if len(self._partial) > READ_LIMIT and not self._lost:
            self._partial = b""
            self._skip_to_eol = True
            self.lineReceived(OVERLONG)  # queued like a line, so replies stay in order

    def lineReceived(self, line: bytes) -> None:
        if self._busy:
            self._queue.append(line)
            return
        self.resetTimeout()
        if self.transaction.receiving:
            if line is OVERLONG:
                self.transaction.overlong_line()
            else:
                answer = self.transaction.line(line)
                if answer is not None:
                    self._answer(answer)
        elif self._exchange is not None:
            self._auth_line(line)
        elif line is OVERLONG:
            self._error(REPLIES["line_too_long"])
        else:
            self._command_line(line)

    def _busy_until(self, d: "defer.Deferred[Any]") -> None:
        """Be busy until ``d`` (whose callbacks write the reply) has fired, then replay
        queued lines.  The drain runs last, after the reply."""
        self._busy = True
        self._pending = d
        d.addErrback(self._internal_error)
        d.addBoth(self._settled)
        if self._busy and not self.transport.disconnecting:
            self._paused = True
            self.transport.pauseProducing()

    def _internal_error(self, failure: Failure) -> None:
        if self._lost:
            return None
        log.failure("unexpected error while answering", failure=failure)
        if self._exchange is not None:
            self._exchange = None
            self._send(REPLIES["auth_tempfail"])
        else:
            self._send(REPLIES["local_error"])
        return None

    def _settled(self, _: Any) -> None:
        self._pending = None
        self._busy = False
        if self._lost or self.transport.disconnecting:
            return None
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()
        while self._queue and not self._busy and not self._lost and not self.transport.disconnecting:
            self.lineReceived(self._queue.pop(0))
        return None

    # ------------------------------------------------------------------
    # Writing
    # ------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if not self._lost and not self.transport.disconnecting:
            self.transport.write(data)

    def _send(self, reply: SMTPReply) -> None:
        self._write(reply.to_bytes())

    def send_reply(self, reply: SMTPReply) -> None:
        """Write ``reply`` now (for the factory's shutdown notice)."""
        self._send(reply)

    def sendCode(self, code: int, message: bytes = b"") -> None:
        """Stock code paths: add the enhanced code the reply class implies."""
        text = message.decode("ascii", "replace") if isinstance(message, bytes) else message
        enhanced = None
        if not _ENHANCED_TEXT.match(text) and code not in (220, 334, 354):
            enhanced = DEFAULT_ENHANCED.get(code // 100)
        self._send(SMTPReply(code, enhanced, text))

    def _error(self, reply: SMTPReply) -> None:
        """A protocol error reply; too many of them close the connection."""
        self._send(reply)
        self._errors += 1
        if self._errors >= MAX_ERRORS:
            self._send(REPLIES["auth_too_many_failures"].with_text("Too many errors, closing connection"))
            self.transport.loseConnection()

    def _answer(self, answer: Any) -> None:
        """Send what the mail transaction answered, now or when its Deferred fires."""
        if isinstance(answer, defer.Deferred):
            self._busy_until(answer.addCallback(self._answer))
        elif isinstance(answer, ProtocolError):
            self._error(answer.reply)
        else:
            self._send(answer)

    # ------------------------------------------------------------------
    # Commands
    # ------------------------------------------------------------------

    def _command_line(self, line: bytes) -> None:
        if len(line) > COMMAND_LINE_LIMIT and not line[:5].upper().startswith(b"AUTH "):
            return self._error(REPLIES["line_too_long"])
        if len(line) > AUTH_LINE_LIMIT:
            return self._error(REPLIES["auth_line_too_long"])
        if b"\0" in line:
            return self._error(REPLIES["bad_syntax"].with_text("NUL characters are not allowed"))
        parts = line.strip().split(None, 1)
        if not parts:
            return self._error(REPLIES["bad_syntax"])
        verb = parts[0].upper()
        arg = parts[1] if len(parts) > 1 else b""
        handler = self._COMMANDS.get(verb)
        if handler is None:
            return self._error(REPLIES["unknown_command"])
        handler(self, arg)

    def do_EHLO(self, arg: bytes) -> None:
        name = arg.strip()
        if not _HELO_ARG.match(name):
            return self._error(REPLIES["ehlo_syntax"])
        self._greeted(name)
        lines = [self.host.decode("ascii"), "PIPELINING", f"SIZE {self.settings.max_message_size}",
                 "8BITMIME", "ENHANCEDSTATUSCODES"]
        if self._can_starttls:
            lines.append("STARTTLS")
        mechs = self.offered_mechanisms()
        if mechs and self.login is None:
            lines.append("AUTH " + " ".join(mechs))
        self._send(SMTPReply(250, None, "\n".join(lines)))

    def do_HELO(self, arg: bytes) -> None:
        name = arg.strip()
        if not _HELO_ARG.match(name):
            return self._error(REPLIES["helo_syntax"])
        self._greeted(name)
        self._send(SMTPReply(250, None, self.host.decode("ascii")))

    def _greeted(self, name: bytes) -> None:
        # Behind haproxy: the PROXY header is parsed after connectionMade, so read again.
        self._read_addresses()
        self._helo_name = name.decode("ascii")
        self._ehlo_done = True
        self.transaction.reset()

    def do_NOOP(self, arg: bytes) -> None:
        self._send(REPLIES["noop"])

    def do_RSET(self, arg: bytes) -> None:
        self.transaction.reset()
        self._send(REPLIES["reset"])

    def do_VRFY(self, arg: bytes) -> None:
        self._send(REPLIES["vrfy"])

    def do_HELP(self, arg: bytes) -> None:
        self._send(SMTPReply(214, "2.0.0", "See RFC 5321 and RFC 4954"))

    def do_QUIT(self, arg: bytes) -> None:
        self._send(REPLIES["bye"])
        self.transport.loseConnection()

    def do_STARTTLS(self, arg: bytes) -> None:
        if arg.strip():
            return self._error(REPLIES["starttls_args"])
        if self._tls:
            return self._error(REPLIES["starttls_already"])
        if not self._can_starttls:
            return self._error(REPLIES["starttls_unavailable"])
        self._send(REPLIES["starttls_go"])
        # Nothing sent in plaintext after STARTTLS may count (CVE-2011-0411 style injection).
        self._discard_chunk = True
        self._partial = b""
        self._queue = []
        self.transport.startTLS(self.tls_context)
        self._tls = True
        self._can_starttls = False
        # RFC 3207 4.2: forget everything learned before TLS.
        self._ehlo_done = False
        self._helo_name = ""
        self.transaction.reset()
        self._drop_authentication()

    def do_MAIL(self, arg: bytes) -> None:
        if not self._ehlo_done:
            return self._error(REPLIES["bad_sequence"].with_text("Send EHLO/HELO first"))
        self._answer(self.transaction.mail(arg, self.avatar, self._helo_pair(),
                                           self.settings.require_auth))

    def do_RCPT(self, arg: bytes) -> None:
        self._answer(self.transaction.rcpt(arg, self.avatar, self._helo_pair(), self))

    def do_DATA(self, arg: bytes) -> None:
        stamp = Stamp(self._helo_name, self._peer[0], self.settings.hostname, self._tls,
                      self.auth_user if self.authenticated else None)
        self._answer(self.transaction.data(arg, stamp))

    # ------------------------------------------------------------------
    # AUTH
    # ------------------------------------------------------------------

    def offered_mechanisms(self) -> list[str]:
        """Mechanisms announced now: configured ones, minus those TLS policy hides."""
        specs = self.mechanism_specs
        return [name for name in self.settings.mechanisms
                if name in specs and self._allowed(specs[name])]

    def _allowed(self, spec: MechanismSpec) -> bool:
        if self._tls:
            return True
        if spec.needs_tls:
            return False
        return not (spec.plaintext and self.settings.require_tls)

    def session(self, mechanism: str = "") -> Session:
        """The connection as mechanisms, checkers and scripts see it (built once per
        exchange: reading the TLS channel bindings is not free)."""
        bindings: Mapping[str, bytes] = {}
        certificate = None
        if self._tls:
            bindings, certificate = tls_facts(self.transport, self.client_identity)
        return Session(remote_ip=self._peer[0], remote_port=self._peer[1],
                       local_ip=self._local[0], local_port=self._local[1],
                       helo=self._helo_name, tls=self._tls, hostname=self.settings.hostname,
                       mechanism=mechanism, context=self.context,
                       channel_bindings=bindings, client_certificate=certificate)

    def do_AUTH(self, arg: bytes) -> None:
        if self.login is not None:
            return self._error(REPLIES["auth_already"])
        if not self._ehlo_done:
            return self._error(REPLIES["auth_need_ehlo"])
        if self.transaction.open:
            return self._error(REPLIES["auth_in_transaction"])
        parts = arg.split()
        if not parts or len(parts) > 2:
            return self._error(REPLIES["auth_no_mechanism"])
        try:
            name = parts[0].decode("ascii").upper()
        except UnicodeDecodeError:
            return self._error(REPLIES["auth_unknown_mech"])
        spec = self.mechanism_specs.get(name) if name in self.settings.mechanisms else None
        if spec is None:
            return self._error(REPLIES["auth_unknown_mech"])
        if not self._allowed(spec):
            return self._error(REPLIES["auth_encryption_required"])
        initial: bytes | None = None
        if len(parts) == 2:
            if not spec.client_first:
                return self._error(REPLIES["auth_unexpected_ir"])
            try:
                initial = decode_response(parts[1], initial=True)
            except DecodeError:
                return self._error(REPLIES["auth_bad_base64"])
        exchange = self._start_exchange(spec)
        if exchange is not None:
            self._busy_until(exchange.start(initial).addCallback(self._auth_answer))

    def _start_exchange(self, spec: MechanismSpec) -> AuthExchange | None:
        """A new exchange with this connection's one ``Session`` for it."""
        try:
            exchange = AuthExchange(spec, self.session(spec.name), portal=self.portal,
                                    resolver=self.resolver, script=self.script,
                                    blocking=self.blocking, max_steps=self.settings.max_steps)
        except Exception:
            log.failure("could not start mechanism {mechanism}", mechanism=spec.name)
            self._send(REPLIES["auth_tempfail"])
            return None
        self._exchange = exchange
        return exchange

    def _auth_line(self, line: bytes) -> None:
        if line is OVERLONG or len(line) > AUTH_LINE_LIMIT:
            self._exchange = None
            return self._error(REPLIES["auth_line_too_long"])
        if line == b"*":
            self._exchange = None
            return self._send(REPLIES["auth_aborted"])
        try:
            response = decode_response(line)
        except DecodeError:
            self._exchange = None
            return self._error(REPLIES["auth_bad_base64"])
        assert self._exchange is not None
        self._busy_until(self._exchange.receive(response).addCallback(self._auth_answer))

    def _auth_answer(self, result: StepResult) -> "defer.Deferred[None] | None":
        """Answer one AUTH step: the single place an AUTH outcome becomes a reply."""
        if self._lost:
            if isinstance(result, LoggedIn):
                result.logout()
            return None
        match result:
            case Reply():
                self._write(b"334 " + base64.b64encode(result.payload_bytes()) + b"\r\n")
                return None
            case LoggedIn():
                self._exchange = None
                self._logged_in(result)
                return None
            case Reject():
                self._exchange = None
                return self._rejected(result)
            case Defer():
                self._exchange = None
                self._send(auth_reply(result))
                if result.disconnect:
                    self.transport.loseConnection()
                return None
            case _:
                assert_never(result)

    def _logged_in(self, login: LoggedIn) -> None:
        self.login = login
        self.avatar = login.avatar
        self.authenticated = True
        self._failures.succeeded()
        log.info("AUTH {mechanism} ok user={user} ip={ip}", mechanism=login.mechanism,
                 user=login.username, ip=self._peer[0])
        self._send(auth_success_reply(login.text))

    def _rejected(self, reject: Reject) -> "defer.Deferred[None] | None":
        """A permanent failure: counted, answered after ``failure_delay``."""
        last = self._failures.failed()
        log.info("AUTH failed ip={ip} ({n} of {max})", ip=self._peer[0],
                 n=self._failures.failures, max=self._failures.limit)

        def answer(_: Any = None) -> None:
            self._send(auth_reply(reject))
            if last:
                self._send(REPLIES["auth_too_many_failures"])
            if last or reject.disconnect:
                self.transport.loseConnection()

        if self._failures.delay > 0:
            return task.deferLater(self.clock, self._failures.delay, answer)
        answer()
        return None

    def _drop_authentication(self) -> None:
        login, self.login = self.login, None
        self.avatar = None
        self.authenticated = False
        if login is not None:
            try:
                login.logout()
            except Exception:
                log.failure("realm logout failed")

    _COMMANDS: dict[bytes, Callable[["SubmissionESMTP", bytes], None]] = {}


SubmissionESMTP._COMMANDS = {
    verb.encode("ascii"): getattr(SubmissionESMTP, "do_" + verb)
    for verb in ("EHLO", "HELO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "VRFY", "HELP",
                 "QUIT", "STARTTLS", "AUTH")
}


def _address(addr: Any) -> tuple[str, int]:
    """(host, port) of a transport address; UNIX and test addresses have neither."""
    return (str(getattr(addr, "host", "") or ""), int(getattr(addr, "port", 0) or 0))
