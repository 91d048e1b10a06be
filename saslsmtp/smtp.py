"""``SubmissionESMTP``: the SMTP submission protocol with an asynchronous AUTH engine.

Theory of operation
-------------------
Stock ``twisted.mail.smtp.ESMTP`` runs SASL synchronously and processes pipelined
lines while a Deferred is pending (TWISTED.md 1.11-1.12).  This protocol keeps the
stock class for its plumbing (portal, TLS context, timeouts) and replaces the command
handling:

* **One line at a time.**  Every command whose answer may come later (AUTH steps,
  MAIL/RCPT validation, end of DATA, the failure delay) marks the connection *busy*:
  the transport is paused and further lines queue.  The queue is drained only after
  the reply for the current step has been written, so pipelined commands are answered
  in order.
* **AUTH** drives a mechanism object (``saslsmtp.sasl``, or a scripted one) step by
  step.  Each step returns an outcome, possibly through a Deferred: ``Reply`` -> 334;
  ``Verify`` -> ``portal.login(PasswordCredentials)``; ``Accept`` ->
  ``portal.login(AuthenticatedIdentity)`` (one login path); ``Lookup`` and other
  requests -> the injected resolver, then ``mechanism.resume``; ``Reject``/``Defer``
  -> their replies.  Failures are delayed by ``failure_delay`` and counted.
* **STARTTLS** discards whatever plaintext followed it in the same read, then resets
  the session (RFC 3207 4.2).
* Every reply comes from ``saslsmtp.replies.REPLIES`` and carries its enhanced code.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, task
from twisted.internet.interfaces import ISSLTransport, ITLSTransport
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.mail.interfaces import IMessageDelivery, IMessageDeliveryFactory
from twisted.python.failure import Failure

from saslsmtp.credentials import AuthenticatedIdentity, PasswordCredentials
from saslsmtp.errors import TemporaryFailure
from saslsmtp.replies import REPLIES, Reply
from saslsmtp.sasl.codec import DecodeError, decode_response
from saslsmtp.sasl.mechanism import MechanismSpec
from saslsmtp.sasl.outcome import Accept, Defer, Reject, Secret, Session, Verify
from saslsmtp.sasl.outcome import Reply as Challenge
from saslsmtp.tlsinfo import tls_facts

log = Logger(namespace="saslsmtp.smtp")

AUTH_LINE_LIMIT = 12288  # RFC 4954 section 4
COMMAND_LINE_LIMIT = 2048  # RFC 5321 says 512; MAIL with AUTH= may add 500; be generous
READ_LIMIT = 16384  # longest partial line buffered before it is refused
MAX_ERRORS = 20  # protocol errors per connection before 421
OVERLONG = b"<a line longer than READ_LIMIT>"  # a marker, compared by identity

_ADDRESS = re.compile(rb"^\s*<([^<>\s]*)>(.*)$")
_PARAM = re.compile(rb"^([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e]+))?$")
_HELO_ARG = re.compile(rb"^[\x21-\x7e]{1,255}$")

# Default enhanced codes for replies that reach sendCode from stock code paths.
_DEFAULT_ENHANCED = {2: "2.0.0", 4: "4.0.0", 5: "5.0.0"}


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


Resolver = Callable[[Any, Session], "defer.Deferred[Any]"]


def _no_resolver(request: Any, session: Session) -> "defer.Deferred[Any]":
    return defer.fail(TemporaryFailure(f"no resolver for {type(request).__name__}"))


_ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")


def _as_reply(base: Reply, code: int | None, enhanced: str | None, reason: str | None) -> Reply:
    """A reply from a script/mechanism result: the code stays in the class of ``base``
    (4xx for Defer, 5xx for Reject), the enhanced code matches it, and CR/LF or
    non-ASCII in the reason cannot break the framing."""
    text = base.text if reason is None else (_clean_text(reason) or base.text)
    if not isinstance(code, int) or code // 100 != base.code // 100 or not 400 <= code <= 599:
        code = base.code
    if not isinstance(enhanced, str) or not _ENHANCED.match(enhanced) or enhanced[0] != str(code)[0]:
        enhanced = base.enhanced if code == base.code else _DEFAULT_ENHANCED[code // 100]
    return Reply(code, enhanced, text)


def _clean_text(text: str | bytes) -> str:
    """Reply text that cannot break the SMTP framing: printable ASCII, one line."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    cleaned = "".join(c if " " <= c <= "~" else " " for c in text)
    return " ".join(cleaned.split())[:400]


class SubmissionESMTP(smtp.ESMTP):
    """The submission protocol.  One instance per connection; see the module docstring.

    Collaborators are injected: ``portal`` (cred portal whose realm returns an
    ``IMessageDelivery`` avatar), ``mechanisms`` (name -> ``MechanismSpec``),
    ``tls_context`` (server TLS options or ``None``), ``clock`` (``IReactorTime``),
    ``resolver`` (answers ``Lookup`` and other mechanism requests).
    """

    def __init__(self, *, portal: Any, settings: EngineSettings,
                 mechanisms: Mapping[str, MechanismSpec], clock: Any,
                 tls_context: Any = None, resolver: Resolver = _no_resolver,
                 blocking: Any = None, client_identity: str = "cn") -> None:
        smtp.ESMTP.__init__(self, chal={}, contextFactory=tls_context)
        self.portal = portal
        self.settings = settings
        self.host = settings.hostname.encode("ascii")
        self.mechanism_specs = mechanisms
        self.clock = clock
        self.callLater = clock.callLater  # TimeoutMixin uses it
        self.timeout = settings.idle_timeout
        self.resolver = resolver
        self.blocking = blocking  # BlockingRunner for expensive mechanism steps (PBKDF2)
        self.client_identity = client_identity
        self.context: dict = {}  # the AUTH script's per-connection context
        self._busy = False
        self._queue: list[bytes] = []
        self._lost = False
        self._pending: defer.Deferred | None = None
        self._discard_chunk = False
        self._skip_to_eol = False
        self._tls = False
        self._errors = 0
        self._failures = 0
        self._ehlo_done = False
        self._helo_name = ""
        self._peer = ("", 0)
        self._local = ("", 0)
        self._avatar: Any = None
        self._logout: Callable[[], None] | None = None
        self.auth_user: str | None = None
        self.auth_mechanism: str | None = None
        self._mechanism: Any = None
        self._spec: MechanismSpec | None = None
        self._steps = 0
        self._reset_transaction()

    # ------------------------------------------------------------------
    # Connection life cycle
    # ------------------------------------------------------------------

    def connectionMade(self) -> None:
        self._peer = _address(self.transport.getPeer())
        self._local = _address(self.transport.getHost())
        self._helo = (None, self._peer[0])
        self.canStartTLS = ITLSTransport.providedBy(self.transport) and self.ctx is not None
        self._tls = ISSLTransport.providedBy(self.transport)
        if self._tls:
            self.canStartTLS = False
        self._write(b"220 " + self.host + b" ESMTP saslsmtp\r\n")
        self.setTimeout(self.timeout)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._lost = True
        self.setTimeout(None)
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()
        self._abort_messages()
        self._mechanism = None
        self._queue = []
        self._logout_now()

    def timeoutConnection(self) -> None:
        self._send(REPLIES["timeout"])
        self.transport.loseConnection()

    def _logout_now(self) -> None:
        logout, self._logout = self._logout, None
        if logout is not None:
            try:
                logout()
            except Exception:
                log.failure("realm logout failed")

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
        data = self._buffer + data
        lines = data.split(b"\n")
        self._buffer = lines.pop()
        self._discard_chunk = False
        for line in lines:
            if self._lost or self.transport.disconnecting or self._discard_chunk:
                break
            if not line.endswith(b"\r"):
                self._bare_lf()
                return
            self.lineReceived(line[:-1])
        if self._discard_chunk:
            self._buffer = b""
            self._discard_chunk = False
            return
        if len(self._buffer) > READ_LIMIT and not self._lost:
            self._buffer = b""
            self._skip_to_eol = True
            self.lineReceived(OVERLONG)  # queued like a line, so replies stay in order

    def lineReceived(self, line: bytes) -> None:
        if self._busy:
            self._queue.append(line)
            return
        self.resetTimeout()
        if line is OVERLONG:
            if self.mode == smtp.DATA:
                self._data_oversized_line()
            else:
                self._line_too_long()
        elif self.mode == smtp.DATA:
            self._data_line(line)
        elif self.mode == smtp.AUTH:
            self._auth_line(line)
        else:
            self._command_line(line)

    def _wait(self, d: "defer.Deferred[Any]") -> None:
        """Be busy until ``d`` (whose callbacks write the reply) has fired, then replay
        queued lines.  The drain runs last, after the reply (TWISTED.md 1.13)."""
        self._busy = True
        self._pending = d
        d.addErrback(self._internal_error)
        d.addBoth(self._settled)
        if self._busy and not self.transport.disconnecting:
            self._paused = True
            self.transport.pauseProducing()

    _paused = False

    def _internal_error(self, failure: Failure) -> None:
        if self._lost:
            return None
        log.failure("unexpected error while answering", failure=failure)
        if self.mode == smtp.AUTH:
            self._end_exchange()
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

    def _send(self, reply: Reply) -> None:
        self._write(reply.to_bytes())

    def sendCode(self, code: int, message: bytes = b"") -> None:
        """Stock code paths: add the enhanced code the reply class implies."""
        text = message.decode("ascii", "replace") if isinstance(message, bytes) else message
        enhanced = None
        if not re.match(r"^[245]\.\d{1,3}\.\d{1,3} ", text) and code not in (220, 334, 354):
            enhanced = _DEFAULT_ENHANCED.get(code // 100)
        self._send(Reply(code, enhanced, text))

    def _error(self, reply: Reply) -> None:
        """A protocol error reply; too many of them close the connection."""
        self._send(reply)
        self._errors += 1
        if self._errors >= MAX_ERRORS:
            self._send(REPLIES["auth_too_many_failures"].with_text("Too many errors, closing connection"))
            self.transport.loseConnection()

    def _bare_lf(self) -> None:
        self._send(REPLIES["bare_lf"])
        self.transport.loseConnection()

    def _line_too_long(self) -> None:
        if self.mode == smtp.AUTH:
            self._end_exchange()
            self._error(REPLIES["auth_line_too_long"])
        else:
            self._error(REPLIES["line_too_long"])

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
        if self.canStartTLS and not self._tls:
            lines.append("STARTTLS")
        mechs = self.offered_mechanisms()
        if mechs and not self.authenticated:
            lines.append("AUTH " + " ".join(mechs))
        self._send(Reply(250, None, "\n".join(lines)))

    def do_HELO(self, arg: bytes) -> None:
        name = arg.strip()
        if not _HELO_ARG.match(name):
            return self._error(REPLIES["helo_syntax"])
        self._greeted(name)
        self._send(Reply(250, None, self.host.decode("ascii")))

    def _greeted(self, name: bytes) -> None:
        # Behind haproxy: the PROXY header is parsed after connectionMade, so read again.
        self._peer = _address(self.transport.getPeer())
        self._local = _address(self.transport.getHost())
        self._helo_name = name.decode("ascii")
        self._helo = (name, self._peer[0])
        self._ehlo_done = True
        self._reset_transaction()

    def do_NOOP(self, arg: bytes) -> None:
        self._send(REPLIES["noop"])

    def do_RSET(self, arg: bytes) -> None:
        self._reset_transaction()
        self._send(REPLIES["reset"])

    def do_VRFY(self, arg: bytes) -> None:
        self._send(REPLIES["vrfy"])

    def do_HELP(self, arg: bytes) -> None:
        self._send(Reply(214, "2.0.0", "See RFC 5321 and RFC 4954"))

    def do_QUIT(self, arg: bytes) -> None:
        self._send(REPLIES["bye"])
        self.transport.loseConnection()

    def do_STARTTLS(self, arg: bytes) -> None:
        if arg.strip():
            return self._error(REPLIES["starttls_args"])
        if self._tls:
            return self._error(REPLIES["starttls_already"])
        if not self.canStartTLS:
            return self._error(REPLIES["starttls_unavailable"])
        self._send(REPLIES["starttls_go"])
        # Nothing sent in plaintext after STARTTLS may count (CVE-2011-0411 style injection).
        self._discard_chunk = True
        self._buffer = b""
        self._queue = []
        self.transport.startTLS(self.ctx)
        self._tls = True
        self.canStartTLS = False
        # RFC 3207 4.2: forget everything learned before TLS.
        self._ehlo_done = False
        self._helo = (None, self._peer[0])
        self._helo_name = ""
        self._reset_transaction()
        if self.authenticated:
            self._drop_authentication()

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
        """The connection as mechanisms, checkers and scripts see it."""
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
        if self.authenticated:
            return self._error(REPLIES["auth_already"])
        if not self._ehlo_done:
            return self._error(REPLIES["auth_need_ehlo"])
        if self._from is not None:
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
        try:
            mechanism = spec.factory(self.session(name))
        except Exception:
            log.failure("could not start mechanism {mechanism}", mechanism=name)
            return self._send(REPLIES["auth_tempfail"])
        self._mechanism = mechanism
        self._spec = spec
        self._steps = 0
        self.mode = smtp.AUTH
        self._step(lambda: mechanism.start(initial))

    def _auth_line(self, line: bytes) -> None:
        if len(line) > AUTH_LINE_LIMIT:
            self._end_exchange()
            return self._error(REPLIES["auth_line_too_long"])
        if line == b"*":
            self._end_exchange()
            return self._send(REPLIES["auth_aborted"])
        try:
            response = decode_response(line)
        except DecodeError:
            self._end_exchange()
            return self._error(REPLIES["auth_bad_base64"])
        mechanism = self._mechanism
        self._step(lambda: mechanism.receive(response))

    def _step(self, call: Callable[[], Any]) -> None:
        """Run one mechanism step (sync or Deferred) and act on its outcome."""
        d = defer.maybeDeferred(call)
        d.addCallback(self._outcome)
        d.addErrback(self._login_failed)
        self._wait(d)

    def _outcome(self, outcome: Any) -> "defer.Deferred[Any] | None":
        name = self._spec.name if self._spec else ""
        if isinstance(outcome, Challenge):
            self._steps += 1
            if self._steps > self.settings.max_steps:
                log.warn("AUTH {mechanism} exceeded {n} steps", mechanism=name,
                         n=self.settings.max_steps)
                return self._fail(Reject("Authentication exchange too long"))
            self._write(b"334 " + base64.b64encode(outcome.payload_bytes()) + b"\r\n")
            return None
        if isinstance(outcome, Verify):
            credentials = PasswordCredentials(outcome.username.encode("utf-8"),
                                              outcome.password.encode("utf-8"),
                                              self.session(name), outcome.authzid.encode("utf-8"))
            return self._login(credentials)
        if isinstance(outcome, Accept):
            if outcome.username in (None, "", b""):
                log.error("AUTH {mechanism}: Accept without a username", mechanism=name)
                return self._defer(Defer())
            username = outcome.username
            identity = AuthenticatedIdentity(
                username if isinstance(username, bytes) else username.encode("utf-8"),
                name, outcome.reason)
            return self._login(identity)
        if isinstance(outcome, Reject):
            return self._fail(outcome)
        if isinstance(outcome, Defer):
            return self._defer(outcome)
        # Lookup, token validation, ...: ask the resolver, then resume the mechanism.
        mechanism = self._mechanism
        d = self.resolver(outcome, self.session(name))
        prepare = getattr(mechanism, "prepare_secret", None)
        if prepare is not None and self.blocking is not None:
            # Only deriving keys from a plaintext is expensive (PBKDF2): that goes to a thread.
            d.addCallback(lambda secret: self.blocking.run(prepare, secret)
                          if isinstance(secret, Secret) and secret.kind == "plaintext" else secret)
        d.addCallback(lambda secret: mechanism.resume(secret))
        d.addCallback(self._outcome)
        return d

    def _login(self, credentials: Any) -> "defer.Deferred[Any]":
        d = self.portal.login(credentials, None, IMessageDelivery, IMessageDeliveryFactory)
        return d.addCallback(self._logged_in, credentials)

    def _logged_in(self, login: tuple, credentials: Any) -> None:
        interface, avatar, logout = login
        mechanism = self._spec.name if self._spec else ""
        self._end_exchange()
        if self._lost:
            logout()
            return None
        self._avatar = avatar if interface is IMessageDelivery else avatar.getMessageDelivery()
        self._logout = logout
        self.authenticated = True
        username = getattr(self._avatar, "username", None) or getattr(credentials, "username", b"")
        self.auth_user = username.decode("utf-8", "replace") if isinstance(username, bytes) else str(username)
        self.auth_mechanism = mechanism
        self._failures = 0
        log.info("AUTH {mechanism} ok user={user} ip={ip}", mechanism=self.auth_mechanism,
                 user=self.auth_user, ip=self._peer[0])
        text = getattr(credentials, "success_text", None)
        self._send(REPLIES["auth_ok"].with_text(_clean_text(text) if text else None))
        return None

    def _login_failed(self, failure: Failure) -> "defer.Deferred[Any] | None":
        """Map a failed step or login: bad credentials -> 535, anything else -> 454."""
        if self._lost:
            return None
        exc = failure.value
        reply = getattr(exc, "reply", None)
        disconnect = getattr(exc, "disconnect", False)
        if failure.check(UnauthorizedLogin):
            base = reply or REPLIES["auth_invalid"]
            return self._fail(Reject(base.text, base.code, base.enhanced, disconnect))
        if failure.check(TemporaryFailure):
            log.info("AUTH temporary failure: {why}", why=str(exc))
        else:
            log.failure("AUTH step failed unexpectedly", failure=failure)
        base = reply or REPLIES["auth_tempfail"]
        return self._defer(Defer(base.text, base.code, base.enhanced, disconnect))

    def _fail(self, result: Reject) -> "defer.Deferred[Any] | None":
        """A permanent failure: counted, sent after ``failure_delay``."""
        self._end_exchange()
        self._failures += 1
        reply = _as_reply(REPLIES["auth_invalid"], result.code, result.enhanced, result.reason)
        last = self._failures >= self.settings.max_failures
        log.info("AUTH failed ip={ip} ({n} of {max})", ip=self._peer[0], n=self._failures,
                 max=self.settings.max_failures)

        def answer(_: Any = None) -> None:
            self._send(reply)
            if last:
                self._send(REPLIES["auth_too_many_failures"])
            if last or result.disconnect:
                self.transport.loseConnection()

        if self.settings.failure_delay > 0:
            return task.deferLater(self.clock, self.settings.failure_delay, answer)
        answer()
        return None

    def _defer(self, result: Defer) -> None:
        self._end_exchange()
        self._send(_as_reply(REPLIES["auth_tempfail"], result.code, result.enhanced, result.reason))
        if result.disconnect:
            self.transport.loseConnection()
        return None

    def _end_exchange(self) -> None:
        self._mechanism = None
        self._spec = None
        if self.mode == smtp.AUTH:
            self.mode = smtp.COMMAND

    def _drop_authentication(self) -> None:
        self._logout_now()
        self.authenticated = False
        self._avatar = None
        self.auth_user = None
        self.auth_mechanism = None

    # ------------------------------------------------------------------
    # Mail transaction
    # ------------------------------------------------------------------

    def _reset_transaction(self) -> None:
        self._abort_messages()
        self._from: smtp.Address | None = None
        self._recipients: list[tuple[str, Callable[[], Any]]] = []
        self._messages: list[Any] = []
        self._size = 0
        self._refusal: Reply | None = None

    def do_MAIL(self, arg: bytes) -> None:
        if not self._ehlo_done:
            return self._error(REPLIES["bad_sequence"].with_text("Send EHLO/HELO first"))
        if self._from is not None:
            return self._error(REPLIES["nested_mail"])
        if self.settings.require_auth and not self.authenticated:
            return self._error(REPLIES["auth_required"])
        if not arg[:5].upper() == b"FROM:":
            return self._error(REPLIES["mail_syntax"])
        parsed = _ADDRESS.match(arg[5:])
        if not parsed:
            return self._error(REPLIES["mail_syntax"])
        address, params = parsed.group(1), parsed.group(2).split()
        for param in params:
            m = _PARAM.match(param)
            if not m:
                return self._error(REPLIES["bad_param"])
            key, value = m.group(1).upper(), m.group(2)
            if key == b"SIZE":
                if not value or not value.isdigit():
                    return self._error(REPLIES["bad_param"].with_text("SIZE needs a number"))
                if int(value) > self.settings.max_message_size:
                    return self._error(REPLIES["message_too_big_announced"])
            elif key == b"BODY":
                if value is None or value.upper() not in (b"7BIT", b"8BITMIME"):
                    return self._error(REPLIES["bad_param"].with_text("BODY must be 7BIT or 8BITMIME"))
            elif key == b"AUTH":
                pass  # RFC 4954 section 5: parsed and ignored is compliant
            else:
                return self._error(REPLIES["bad_param"])
        try:
            origin = smtp.Address(address) if address else smtp.Address(b"")
        except smtp.AddressError:
            return self._error(REPLIES["mail_syntax"])
        avatar = self._avatar
        if avatar is None:
            return self._error(REPLIES["auth_required"])
        d = defer.maybeDeferred(avatar.validateFrom, self._helo, origin)
        self._wait(d.addCallbacks(lambda o: self._mail_ok(o or origin), self._mail_failed))

    def _mail_ok(self, origin: smtp.Address) -> None:
        self._from = origin
        self._send(REPLIES["sender_ok"])

    def _mail_failed(self, failure: Failure) -> None:
        if self._lost:
            return
        self._send(_smtp_error_reply(failure, REPLIES["sender_rejected"]))

    def do_RCPT(self, arg: bytes) -> None:
        if self._from is None:
            return self._error(REPLIES["need_mail"])
        if not arg[:3].upper() == b"TO:":
            return self._error(REPLIES["rcpt_syntax"])
        parsed = _ADDRESS.match(arg[3:])
        if not parsed or not parsed.group(1) or parsed.group(2).strip():
            return self._error(REPLIES["rcpt_syntax"])
        if len(self._recipients) >= self.settings.max_recipients:
            return self._send(REPLIES["too_many_rcpts"])
        try:
            user = smtp.User(parsed.group(1), self._helo, self, self._from)
        except smtp.AddressError:
            return self._error(REPLIES["rcpt_syntax"])
        d = defer.maybeDeferred(self._avatar.validateTo, user)
        self._wait(d.addCallbacks(lambda f: self._rcpt_ok(str(user.dest), f), self._rcpt_failed))

    def _rcpt_ok(self, address: str, factory: Callable[[], Any]) -> None:
        self._recipients.append((address, factory))
        self._send(REPLIES["rcpt_ok"])

    def _rcpt_failed(self, failure: Failure) -> None:
        if self._lost:
            return
        self._send(_smtp_error_reply(failure, REPLIES["rcpt_rejected"]))

    def do_DATA(self, arg: bytes) -> None:
        if self._from is None:
            return self._error(REPLIES["need_mail"])
        if not self._recipients:
            return self._error(REPLIES["need_rcpt"])
        if arg.strip():
            return self._error(REPLIES["data_args"])
        messages: list[Any] = []
        try:
            for _address, factory in self._recipients:
                message = factory()
                if not any(message is m for m in messages):
                    messages.append(message)
        except Exception:
            log.failure("could not open message")
            return self._send(REPLIES["local_error"])
        self._messages = messages
        self._size = 0
        self._refusal = None
        self.mode = smtp.DATA
        self._send(REPLIES["data_start"])
        self._deliver_line(self.received_header())

    def received_header(self) -> bytes:
        """The Received header (RFC 5321 4.4, RFC 3848 ESMTPSA/ESMTPA)."""
        protocol = "ESMTP"
        if self._tls:
            protocol += "S"
        if self.authenticated:
            protocol += "A"
        helo = _clean_text(self._helo_name) or "unknown"
        user = _clean_text(self.auth_user or "").replace("(", "").replace(")", "")
        auth = f"\r\n\t(authenticated user {user})" if self.authenticated else ""
        recipients = self._recipients
        rcpt = f"\r\n\tfor <{recipients[0][0]}>" if len(recipients) == 1 else ""
        date = smtp.rfc822date().decode("ascii")
        return (f"Received: from {helo} ([{self._peer[0]}])\r\n\tby {self.settings.hostname}"
                f" (saslsmtp) with {protocol}{auth}{rcpt}; {date}").encode("utf-8")

    def _deliver_line(self, line: bytes) -> None:
        for message in self._messages:
            message.lineReceived(line)

    def _data_line(self, line: bytes) -> None:
        if line == b".":
            return self._end_of_data()
        if line[:1] == b".":
            line = line[1:]
        self._size += len(line) + 2
        if self._size > self.settings.max_message_size and self._refusal is None:
            self._refusal = REPLIES["message_too_big"]
        if self._refusal is None:
            self._deliver_line(line)

    def _data_oversized_line(self) -> None:
        # A line too long to buffer is not a line an MTA can relay (RFC 5321 4.5.3.1.6).
        if self._refusal is None:
            self._refusal = REPLIES["message_line_too_long"]

    def _end_of_data(self) -> None:
        self.mode = smtp.COMMAND
        messages, self._messages = self._messages, []
        if self._refusal is not None:
            refusal = self._refusal
            for m in messages:
                m.connectionLost()
            self._reset_transaction()
            return self._send(refusal)
        d = defer.DeferredList([defer.maybeDeferred(m.eomReceived) for m in messages],
                               fireOnOneErrback=True, consumeErrors=True)
        self._wait(d.addCallbacks(self._message_stored, self._message_failed))

    def _message_stored(self, _: Any) -> None:
        self._reset_transaction()
        self._send(REPLIES["message_accepted"])

    def _message_failed(self, failure: Failure) -> None:
        if self._lost:
            return
        if isinstance(failure.value, defer.FirstError):
            failure = failure.value.subFailure
        log.failure("message delivery failed", failure=failure)
        self._reset_transaction()
        self._send(_smtp_error_reply(failure, REPLIES["local_error"]))

    def _abort_messages(self) -> None:
        for message in getattr(self, "_messages", []):
            try:
                message.connectionLost()
            except Exception:
                log.failure("message cleanup failed")
        self._messages = []

    _COMMANDS: dict[bytes, Callable[["SubmissionESMTP", bytes], None]] = {}


SubmissionESMTP._COMMANDS = {
    verb.encode("ascii"): getattr(SubmissionESMTP, "do_" + verb)
    for verb in ("EHLO", "HELO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "VRFY", "HELP",
                 "QUIT", "STARTTLS", "AUTH")
}


def _address(addr: Any) -> tuple[str, int]:
    """(host, port) of a transport address; UNIX and test addresses have neither."""
    return (str(getattr(addr, "host", "") or ""), int(getattr(addr, "port", 0) or 0))


def _smtp_error_reply(failure: Failure, default: Reply) -> Reply:
    """The reply for an error from ``validateFrom``/``validateTo``/``eomReceived``."""
    exc = failure.value
    if isinstance(exc, smtp.SMTPServerError) and isinstance(exc.code, int):
        resp = exc.resp.decode("utf-8", "replace") if isinstance(exc.resp, bytes) else str(exc.resp)
        enhanced = _DEFAULT_ENHANCED.get(exc.code // 100)
        match = re.match(r"^([245]\.\d{1,3}\.\d{1,3}) (.*)$", resp)
        if match:
            enhanced, resp = match.group(1), match.group(2)
        return Reply(exc.code, enhanced, _clean_text(resp))
    if not isinstance(exc, smtp.SMTPServerError):
        log.failure("unexpected error in delivery", failure=failure)
        return REPLIES["local_error"]
    return default
