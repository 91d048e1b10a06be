"""The mail transaction of one connection: MAIL, RCPT, DATA and the Received header.

``MailTransaction`` knows nothing about lines on the wire or about AUTH: the protocol
hands it parsed arguments and the avatar, and sends what it answers.  An answer is an
``SMTPReply``, a ``ProtocolError`` (a reply the protocol counts towards its error limit),
or a Deferred that fires with an ``SMTPReply`` (the avatar's validation or delivery).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Union

from twisted.internet import defer
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.python.failure import Failure

from saslsmtp.replies import DEFAULT_ENHANCED, REPLIES, SMTPReply, clean_text

log = Logger(namespace="saslsmtp.transaction")

_ADDRESS = re.compile(rb"^\s*<([^<>\s]*)>(.*)$")
_PARAM = re.compile(rb"^([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e]+))?$")
_ENHANCED_PREFIX = re.compile(r"^([245]\.\d{1,3}\.\d{1,3}) (.*)$")


@dataclass(frozen=True)
class ProtocolError:
    """A client mistake: the protocol sends ``reply`` and counts it."""

    reply: SMTPReply


Answer = Union[SMTPReply, ProtocolError, "defer.Deferred[SMTPReply]"]


@dataclass(frozen=True)
class Stamp:
    """What the Received header says about the connection (RFC 5321 4.4, RFC 3848)."""

    helo: str
    peer_ip: str
    hostname: str
    tls: bool
    user: str | None  # the authenticated user, or None


class MailTransaction:
    """MAIL FROM, RCPT TO and the message body, for one transaction at a time."""

    def __init__(self, max_message_size: int, max_recipients: int) -> None:
        self.max_message_size = max_message_size
        self.max_recipients = max_recipients
        self.sender: smtp.Address | None = None
        self.recipients: list[tuple[str, Callable[[], Any]]] = []
        self.receiving = False  # between 354 and the final dot
        self._messages: list[Any] = []
        self._size = 0
        self._refusal: SMTPReply | None = None

    @property
    def open(self) -> bool:
        """A MAIL command was accepted and the transaction has not ended."""
        return self.sender is not None

    def reset(self) -> None:
        """Forget the transaction (RSET, EHLO, STARTTLS, end of DATA)."""
        self.abort()
        self.sender = None
        self.recipients = []
        self.receiving = False
        self._size = 0
        self._refusal = None

    def abort(self) -> None:
        """Drop the messages being written (connection lost, reset)."""
        messages, self._messages = self._messages, []
        for message in messages:
            try:
                message.connectionLost()
            except Exception:
                log.failure("message cleanup failed")

    # MAIL ----------------------------------------------------------------

    def mail(self, arg: bytes, avatar: Any, helo: tuple, require_auth: bool) -> Answer:
        """``MAIL FROM:<address> [SIZE=n] [BODY=...] [AUTH=...]``; the avatar (``None``
        before AUTH) validates."""
        if self.sender is not None:
            return ProtocolError(REPLIES["nested_mail"])
        if require_auth and avatar is None:
            return ProtocolError(REPLIES["auth_required"])
        if not arg[:5].upper() == b"FROM:":
            return ProtocolError(REPLIES["mail_syntax"])
        parsed = _ADDRESS.match(arg[5:])
        if not parsed:
            return ProtocolError(REPLIES["mail_syntax"])
        address, params = parsed.group(1), parsed.group(2).split()
        for param in params:
            refusal = self._mail_parameter(param)
            if refusal is not None:
                return ProtocolError(refusal)
        try:
            origin = smtp.Address(address) if address else smtp.Address(b"")
        except smtp.AddressError:
            return ProtocolError(REPLIES["mail_syntax"])
        if avatar is None:
            return ProtocolError(REPLIES["auth_required"])
        d = defer.maybeDeferred(avatar.validateFrom, helo, origin)
        return d.addCallbacks(lambda accepted: self._mail_ok(accepted or origin),
                              lambda f: delivery_error_reply(f, REPLIES["sender_rejected"]))

    def _mail_parameter(self, param: bytes) -> SMTPReply | None:
        match = _PARAM.match(param)
        if not match:
            return REPLIES["bad_param"]
        key, value = match.group(1).upper(), match.group(2)
        if key == b"SIZE":
            if not value or not value.isdigit():
                return REPLIES["bad_param"].with_text("SIZE needs a number")
            if int(value) > self.max_message_size:
                return REPLIES["message_too_big"]
        elif key == b"BODY":
            if value is None or value.upper() not in (b"7BIT", b"8BITMIME"):
                return REPLIES["bad_param"].with_text("BODY must be 7BIT or 8BITMIME")
        elif key != b"AUTH":  # RFC 4954 section 5: AUTH= parsed and ignored is compliant
            return REPLIES["bad_param"]
        return None

    def _mail_ok(self, origin: smtp.Address) -> SMTPReply:
        self.sender = origin
        return REPLIES["sender_ok"]

    # RCPT ----------------------------------------------------------------

    def rcpt(self, arg: bytes, avatar: Any, helo: tuple, protocol: Any) -> Answer:
        """``RCPT TO:<address>``; the avatar validates and gives the message factory."""
        if self.sender is None:
            return ProtocolError(REPLIES["need_mail"])
        if not arg[:3].upper() == b"TO:":
            return ProtocolError(REPLIES["rcpt_syntax"])
        parsed = _ADDRESS.match(arg[3:])
        if not parsed or not parsed.group(1) or parsed.group(2).strip():
            return ProtocolError(REPLIES["rcpt_syntax"])
        if len(self.recipients) >= self.max_recipients:
            return REPLIES["too_many_rcpts"]
        try:
            user = smtp.User(parsed.group(1), helo, protocol, self.sender)
        except smtp.AddressError:
            return ProtocolError(REPLIES["rcpt_syntax"])
        d = defer.maybeDeferred(avatar.validateTo, user)
        return d.addCallbacks(lambda factory: self._rcpt_ok(str(user.dest), factory),
                              lambda f: delivery_error_reply(f, REPLIES["rcpt_rejected"]))

    def _rcpt_ok(self, address: str, factory: Callable[[], Any]) -> SMTPReply:
        self.recipients.append((address, factory))
        return REPLIES["rcpt_ok"]

    # DATA ----------------------------------------------------------------

    def data(self, arg: bytes, stamp: Stamp) -> SMTPReply | ProtocolError:
        """``DATA``: open one message per distinct factory and write the Received header."""
        if self.sender is None:
            return ProtocolError(REPLIES["need_mail"])
        if not self.recipients:
            return ProtocolError(REPLIES["need_rcpt"])
        if arg.strip():
            return ProtocolError(REPLIES["data_args"])
        messages: list[Any] = []
        try:
            for _address, factory in self.recipients:
                message = factory()
                if not any(message is m for m in messages):
                    messages.append(message)
        except Exception:
            log.failure("could not open message")
            return REPLIES["local_error"]
        self._messages = messages
        self._size = 0
        self._refusal = None
        self.receiving = True
        self._deliver(received_header(stamp, self.recipients))
        return REPLIES["data_start"]

    def line(self, line: bytes) -> SMTPReply | defer.Deferred[SMTPReply] | None:
        """One line of the message body (dot-stuffed); the final dot ends it."""
        if line == b".":
            return self._end_of_data()
        if line[:1] == b".":
            line = line[1:]
        self._size += len(line) + 2
        if self._size > self.max_message_size and self._refusal is None:
            self._refusal = REPLIES["message_too_big"]
        if self._refusal is None:
            self._deliver(line)
        return None

    def overlong_line(self) -> None:
        """A body line too long to buffer is not one an MTA can relay (RFC 5321 4.5.3.1.6)."""
        if self._refusal is None:
            self._refusal = REPLIES["message_line_too_long"]

    def _deliver(self, line: bytes) -> None:
        for message in self._messages:
            message.lineReceived(line)

    def _end_of_data(self) -> SMTPReply | defer.Deferred[SMTPReply]:
        self.receiving = False
        messages, self._messages = self._messages, []
        if self._refusal is not None:
            refusal = self._refusal
            for message in messages:
                message.connectionLost()
            self.reset()
            return refusal
        d = defer.DeferredList([defer.maybeDeferred(m.eomReceived) for m in messages],
                               fireOnOneErrback=True, consumeErrors=True)
        return d.addCallbacks(self._stored, self._not_stored)

    def _stored(self, _: Any) -> SMTPReply:
        self.reset()
        return REPLIES["message_accepted"]

    def _not_stored(self, failure: Failure) -> SMTPReply:
        if isinstance(failure.value, defer.FirstError):
            failure = failure.value.subFailure
        if isinstance(failure.value, OSError):  # unwritable or full disk: one line, no traceback
            error = failure.value
            log.error("message not stored: {path}: {why}", path=error.filename or "?",
                      why=error.strerror or type(error).__name__)
            self.reset()
            return REPLIES["local_error"]
        if not failure.check(defer.CancelledError):
            log.failure("message delivery failed", failure=failure)
        self.reset()
        return delivery_error_reply(failure, REPLIES["local_error"])


def received_header(stamp: Stamp, recipients: list[tuple[str, Any]]) -> bytes:
    """The Received header (RFC 5321 4.4, RFC 3848 ESMTPSA/ESMTPA)."""
    protocol = "ESMTP" + ("S" if stamp.tls else "") + ("A" if stamp.user is not None else "")
    helo = clean_text(stamp.helo) or "unknown"
    auth = ""
    if stamp.user is not None:
        user = clean_text(stamp.user).replace("(", "").replace(")", "")
        auth = f"\r\n\t(authenticated user {user})"
    rcpt = f"\r\n\tfor <{recipients[0][0]}>" if len(recipients) == 1 else ""
    date = smtp.rfc822date().decode("ascii")
    return (f"Received: from {helo} ([{stamp.peer_ip}])\r\n\tby {stamp.hostname}"
            f" (saslsmtp) with {protocol}{auth}{rcpt}; {date}").encode("utf-8")


def delivery_error_reply(failure: Failure, default: SMTPReply) -> SMTPReply:
    """The reply for an error from ``validateFrom``/``validateTo``/``eomReceived``."""
    exc = failure.value
    if isinstance(exc, smtp.SMTPServerError) and isinstance(exc.code, int):
        resp = exc.resp.decode("utf-8", "replace") if isinstance(exc.resp, bytes) else str(exc.resp)
        enhanced = DEFAULT_ENHANCED.get(exc.code // 100)
        match = _ENHANCED_PREFIX.match(resp)
        if match:
            enhanced, resp = match.group(1), match.group(2)
        return SMTPReply(exc.code, enhanced, clean_text(resp))
    if not isinstance(exc, smtp.SMTPServerError):
        if not failure.check(defer.CancelledError):
            log.failure("unexpected error in delivery", failure=failure)
        return REPLIES["local_error"]
    return default
