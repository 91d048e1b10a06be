"""The mail transaction of one connection: MAIL, RCPT, DATA and the Received header.

``MailTransaction`` knows nothing about lines on the wire or about AUTH: the protocol
hands it parsed arguments, the avatar and the body's bytes, and sends what it answers.
An answer is an ``SMTPReply``, a ``ProtocolError`` (a reply the protocol counts towards
its error limit), or a Deferred that fires with an ``SMTPReply``.

Where mail goes is the avatar's business: one ``Envelope`` per transaction and a
``MessageSink`` for the body (``saslsmtp.envelope``; stock ``IMessageDelivery`` avatars
through ``StockEnvelope``).  The body is read by ``saslsmtp.body.BodyReader`` on whole
buffers (end-of-data search and dot-unstuffing), so memory per connection does not depend
on line lengths.
"""

from __future__ import annotations

import functools
import re
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence, Union

from twisted.internet import defer
from twisted.mail import smtp
from twisted.python.failure import Failure

from saslsmtp.events import NoSessionEvents, SessionEvents
from saslsmtp.body import LINE_LIMIT, BodyReader
from saslsmtp.envelope import (Client, Envelope, MessageSink, StockEnvelope,
                               delivery_error_reply)
from saslsmtp.logs import LoggedName
from saslsmtp.replies import REPLIES, SMTPReply, clean_text
from saslsmtp.sessionlogger import Logger
from saslsmtp.utf8address import SMTPUTF8Undeclared, parsed_path
from saslsmtp.utf8address import parsed_address as parsed_address  # its old home

log = Logger(namespace="saslsmtp.transaction")

_ADDRESS = re.compile(rb"^\s*<([^<>\s]*)>(.*)$")
_PARAM = re.compile(rb"^([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e]+))?$")


@dataclass(frozen=True)
class ProtocolError:
    """A client mistake: the protocol sends ``reply`` and counts it."""

    reply: SMTPReply


Answer = Union[SMTPReply, ProtocolError, defer.Deferred[SMTPReply]]


@dataclass(frozen=True)
class Stamp:
    """What the Received header says about the connection (RFC 5321 4.4, RFC 3848)."""

    helo: str
    peer_ip: str
    hostname: str
    tls: bool
    user: str | None  # the authenticated user, or None
    smtputf8: bool = False  # the transaction's MAIL said SMTPUTF8 (RFC 6531 3.7.3)


@dataclass(frozen=True)
class BodyOutcome:
    """What the protocol does after a read of body bytes: nothing yet (``answer`` None),
    or send ``answer`` and read ``rest`` as commands."""

    answer: Answer | None = None
    rest: bytes = b""


# no quoted parts: ``get_type_hints`` would evaluate them in a module that names this alias
SenderCheck = Callable[[Client, str, Sequence[str]], defer.Deferred[SMTPReply | None]]


class MailTransaction:
    """MAIL FROM, RCPT TO and the message body, for one transaction at a time.

    ``sender_check(client, address, params)`` (optional) fires with ``None`` to allow a
    MAIL FROM address or with the refusal to send."""

    events: SessionEvents = NoSessionEvents()  # the connection's (messages accepted, failed)
    on_accepted: Callable[[], None] | None = None  # each message answered 2xx (error count, limits)

    def __init__(self, max_message_size: int, max_recipients: int,
                 sender_check: SenderCheck | None = None,
                 line_limit: int = LINE_LIMIT) -> None:
        self.max_message_size = max_message_size
        self.max_recipients = max_recipients
        self.sender_check = sender_check
        self.line_limit = line_limit
        self.sender: smtp.Address | None = None
        self.smtputf8 = False  # this transaction's MAIL said SMTPUTF8 (RFC 6531)
        self.recipients: list[str] = []
        self.receiving = False  # between 354 and the final dot
        self.envelope: Envelope | None = None
        self._sink: MessageSink | None = None
        self._body: BodyReader | None = None
        self._refusal: SMTPReply | None = None
        self._client: Client | None = None

    @property
    def open(self) -> bool:
        """A MAIL command was accepted and the transaction has not ended."""
        return self.sender is not None

    def reset(self) -> None:
        """Forget the transaction (RSET, EHLO, STARTTLS, end of DATA)."""
        self.abort()
        self.sender = None
        self.smtputf8 = False
        self.recipients = []
        self.receiving = False
        self._body = None
        self._refusal = None

    def abort(self) -> None:
        """Drop the message being written and the envelope (connection lost, reset)."""
        sink, self._sink = self._sink, None
        envelope, self.envelope = self.envelope, None
        for thing in (sink, envelope):
            if thing is not None:
                try:
                    thing.abort()
                except Exception:
                    log.failure("message cleanup failed")

    # MAIL ----------------------------------------------------------------

    def mail(self, arg: bytes, avatar: Any, helo: tuple, require_auth: bool,
             client: Client | None = None) -> Answer:
        """``MAIL FROM:<address> [SIZE=n] [BODY=...] [SMTPUTF8] [AUTH=...]``: the sender
        check, then the avatar's envelope (``None`` before AUTH) answers.  A UTF-8 address
        needs ``SMTPUTF8`` (``saslsmtp.utf8address``)."""
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
        smtputf8 = bool(params) and b"SMTPUTF8" in [p.upper() for p in params]
        try:
            # (the common all-ASCII path straight to the cache of parsed addresses)
            origin = (parsed_address(address) if address.isascii()
                      else parsed_path(address, smtputf8))
        except smtp.AddressError:  # also 8-bit that is not UTF-8
            return ProtocolError(REPLIES["sender_syntax"])
        except SMTPUTF8Undeclared:
            return ProtocolError(REPLIES["smtputf8_required"])
        if avatar is None:
            return ProtocolError(REPLIES["auth_required"])
        client = client or Client(getattr(avatar, "username", None), helo[1] or "",
                                  0, (helo[0] or b"").decode("ascii", "replace"))
        text_params = [p.decode("ascii", "replace") for p in params]
        text_address = address.decode("utf-8")  # valid UTF-8: parsed_path said so
        if self.sender_check is None:
            return self._mail_envelope(None, avatar, helo, client, origin, text_address,
                                       text_params, smtputf8)
        d = defer.maybeDeferred(self.sender_check, client, text_address, text_params)
        return d.addCallback(self._mail_envelope, avatar, helo, client, origin,
                             text_address, text_params, smtputf8)

    def _mail_envelope(self, refusal: SMTPReply | None, avatar: Any, helo: tuple,
                       client: Client, origin: smtp.Address, address: str,
                       params: list[str], smtputf8: bool) -> Any:
        if refusal is not None:
            return refusal
        begin = getattr(avatar, "begin_transaction", None)
        envelope: Envelope = begin(client) if begin is not None else StockEnvelope(avatar, helo)
        self.envelope = envelope
        d = call(envelope.mail, address, params)

        def answered(reply: SMTPReply) -> SMTPReply:
            if self.envelope is not envelope:  # reset or lost while waiting
                envelope.abort()
                return reply
            if reply.code // 100 == 2:
                self.sender = origin
                self.smtputf8 = smtputf8
                self._client = client
            else:
                self.envelope = None
                envelope.abort()
            return reply
        return then(d, answered, self._envelope_failed)

    def _envelope_failed(self, failure: Failure) -> SMTPReply:
        if failure.check(defer.CancelledError):
            return failure  # type: ignore[return-value]  # the connection went away
        self.abort()
        self.sender = None
        return delivery_error_reply(failure, REPLIES["local_error"])

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
        elif key == b"SMTPUTF8":  # RFC 6531 3.4: a keyword without a value
            if value is not None:
                return REPLIES["bad_param"].with_text("SMTPUTF8 takes no value")
        elif key != b"AUTH":  # RFC 4954 section 5: AUTH= parsed and ignored is compliant
            return REPLIES["bad_param"]
        return None

    # RCPT ----------------------------------------------------------------

    def rcpt(self, arg: bytes, avatar: Any, helo: tuple, protocol: Any) -> Answer:
        """``RCPT TO:<address>``; the envelope answers (a relay: its upstream)."""
        if self.sender is None or self.envelope is None:
            return ProtocolError(REPLIES["need_mail"])
        if not arg[:3].upper() == b"TO:":
            return ProtocolError(REPLIES["rcpt_syntax"])
        parsed = _ADDRESS.match(arg[3:])
        if not parsed or parsed.group(2).strip():
            return ProtocolError(REPLIES["rcpt_syntax"])
        if not parsed.group(1):
            return ProtocolError(REPLIES["recipient_syntax"])
        if len(self.recipients) >= self.max_recipients:
            return REPLIES["too_many_rcpts"]
        try:
            path = parsed.group(1)
            if path.isascii():
                parsed_address(path)
            else:
                parsed_path(path, self.smtputf8)
        except smtp.AddressError:  # also 8-bit that is not UTF-8
            return ProtocolError(REPLIES["recipient_syntax"])
        except SMTPUTF8Undeclared:
            return ProtocolError(REPLIES["smtputf8_required"])
        address = parsed.group(1).decode("utf-8")  # forwarded as the client sent it
        envelope = self.envelope
        d = call(envelope.rcpt, address, [])

        def answered(reply: SMTPReply) -> SMTPReply:
            if reply.code // 100 == 2 and self.envelope is envelope:
                self.recipients.append(address)
            return reply
        return then(d, answered, lambda f: delivery_error_reply(f, REPLIES["rcpt_rejected"]))

    # DATA ----------------------------------------------------------------

    def data(self, arg: bytes, stamp: Stamp, producer: Any = None) -> Answer:
        """``DATA``: the envelope opens its sink (``354``); the Received header goes first.
        ``producer`` (the client's transport) is paused while the sink cannot keep up."""
        if self.sender is None or self.envelope is None:
            return ProtocolError(REPLIES["need_mail"])
        if not self.recipients:
            return ProtocolError(REPLIES["need_rcpt"])
        if arg.strip():
            return ProtocolError(REPLIES["data_args"])
        envelope = self.envelope
        if self.smtputf8:  # the Received header says so (RFC 6531 3.7.3)
            stamp = replace(stamp, smtputf8=True)
        d = call(envelope.data)

        def answered(reply: SMTPReply) -> SMTPReply:
            if self.envelope is not envelope:
                return reply
            if reply.code != 354 or envelope.sink is None:
                self.reset()  # the envelope is over: a new MAIL starts again
                return reply
            self._sink = envelope.sink
            self._body = BodyReader(self.line_limit)
            self._refusal = None
            self.receiving = True
            if producer is not None:
                self._sink.registerProducer(producer, True)
            self._sink.write(received_header(stamp, self.recipients) + b"\r\n")
            return reply

        def failed(failure: Failure) -> SMTPReply:
            if failure.check(defer.CancelledError):
                return failure  # type: ignore[return-value]
            log.failure("could not open message", failure=failure)
            self.reset()
            return REPLIES["local_error"]
        return then(d, answered, failed)

    def body(self, data: bytes) -> BodyOutcome:
        """Bytes of the message body as they arrive (see ``BodyReader``)."""
        reader, sink = self._body, self._sink
        assert reader is not None and self.receiving
        chunk = reader.feed(data)
        if self._refusal is None:
            if reader.overlong:
                self._refuse(REPLIES["message_line_too_long"])
            elif reader.size > self.max_message_size:
                self._refuse(REPLIES["message_too_big"])
            elif chunk.data and sink is not None:
                sink.write(chunk.data)
        if not chunk.done:
            return BodyOutcome()
        return BodyOutcome(self._end_of_data(reader.size), chunk.rest)

    def _refuse(self, reply: SMTPReply) -> None:
        """Stop writing: the rest is read to the final dot and then refused."""
        self._refusal = reply
        sink, self._sink = self._sink, None
        if sink is not None:
            sink.unregisterProducer()
            sink.abort()

    def _end_of_data(self, size: int) -> Answer:
        self.receiving = False
        self._body = None
        if self._refusal is not None:
            refusal = self._refusal
            self.reset()
            return refusal
        sink = self._sink
        assert sink is not None
        sink.unregisterProducer()
        sender, count, client = self.sender, len(self.recipients), self._client
        d = defer.maybeDeferred(sink.end)

        def ended(reply: SMTPReply) -> SMTPReply:
            if self._sink is sink:
                self._sink = None
                self.reset()
            if reply.code // 100 == 2:
                self.events.message_accepted(size)
                if self.on_accepted is not None:
                    self.on_accepted()
                log.info("message {id} accepted: from=<{sender}> recipients={count}"
                         " size={size} user={user} reply={reply}", id=sink.queue_id,
                         sender=str(sender), count=count, size=size,
                         user=_logged(client.login if client else None),
                         reply=f"{reply.code} {one_line(reply.text)}")
            else:
                if reply.code // 100 == 4:
                    self.events.delivery_failed()
                log.info("message {id} not accepted: from=<{sender}> recipients={count}"
                         " size={size} user={user} reply={reply}", id=sink.queue_id,
                         sender=str(sender), count=count, size=size,
                         user=_logged(client.login if client else None),
                         reply=f"{reply.code} {one_line(reply.text)}")
            return reply
        return d.addCallbacks(ended, self._not_stored)

    def _not_stored(self, failure: Failure) -> SMTPReply:
        if isinstance(failure.value, defer.FirstError):
            failure = failure.value.subFailure
        if isinstance(failure.value, OSError):  # unwritable or full disk: one line, no traceback
            error = failure.value
            why = error.strerror or type(error).__name__
            if error.filename2:  # a rename into new/: what failed is the move, not tmp/
                log.error("message not stored: cannot rename {path} to {destination}: {why}",
                          path=error.filename, destination=error.filename2, why=why)
            else:
                log.error("message not stored: {path}: {why}", path=error.filename or "?",
                          why=why)
            self.events.delivery_failed()
            self.reset()
            return REPLIES["local_error"]
        if not failure.check(defer.CancelledError):
            log.failure("message delivery failed", failure=failure)
            self.events.delivery_failed()
        self.reset()
        return delivery_error_reply(failure, REPLIES["local_error"])


def one_line(text: str) -> str:
    """A multi-line reply's text for a log line: its lines joined by `` / `` (a log line
    is one line for grep, fail2ban and log shippers)."""
    return text.replace("\n", " / ")


def call(f: Callable[..., Any], *args: Any) -> Any:
    """``f(*args)``: its value (a reply or a Deferred), or the ``Failure`` it raised."""
    try:
        return f(*args)
    except Exception:
        return Failure()


def then(result: Any, callback: Callable[[Any], Any], errback: Callable[[Failure], Any]) -> Any:
    """Like ``addCallbacks``, but a value that is already there is answered at once: a
    synchronous envelope (the Maildir) costs no Deferred and no busy round."""
    if isinstance(result, defer.Deferred):
        return result.addCallbacks(callback, errback)
    if isinstance(result, Failure):
        return errback(result)
    return callback(result)


def received_header(stamp: Stamp, recipients: Sequence[str]) -> bytes:
    """The Received header (RFC 5321 4.4, RFC 3848 ESMTPSA/ESMTPA, RFC 6531 3.7.3
    UTF8SMTPSA/UTF8SMTPA/UTF8SMTPS/UTF8SMTP for a transaction that said SMTPUTF8)."""
    rcpt = f"\r\n\tfor <{recipients[0]}>" if len(recipients) == 1 else ""
    return f"{_received_from(stamp)}{rcpt}; {_date()}".encode("utf-8")


_NOT_IN_HELO = str.maketrans("()\\", "???")


@functools.lru_cache(maxsize=256)
def _received_from(stamp: Stamp) -> str:
    """The part of the Received header that depends on the connection only (one per
    session, the same for each of its messages)."""
    protocol = (("UTF8SMTP" if stamp.smtputf8 else "ESMTP") + ("S" if stamp.tls else "")
                + ("A" if stamp.user is not None else ""))
    # "(", ")" and "\\" would open, close or escape a comment (RFC 5322 3.2.2): in the
    # HELO name they could hide the rest of the header in one, or end a comment early
    helo = clean_text(stamp.helo).translate(_NOT_IN_HELO) or "unknown"
    auth = ""
    if stamp.user is not None:
        # a UTF-8 login stays UTF-8 where the header may be (RFC 6532: an SMTPUTF8
        # message); elsewhere its non-ASCII characters become "?"
        user = (_utf8_text(stamp.user) if stamp.smtputf8 else
                clean_text("".join(c if c.isascii() else "?" for c in stamp.user)))
        user = user.replace("(", "").replace(")", "").replace("\\", "\\\\")  # a quoted-pair
        auth = f"\r\n\t(authenticated user {user})"
    # an IPv6 address literal carries its tag (RFC 5321 4.1.3: "[IPv6:2001:db8::1]")
    literal = f"IPv6:{stamp.peer_ip}" if ":" in stamp.peer_ip else stamp.peer_ip
    return (f"Received: from {helo} ([{literal}])\r\n\tby {stamp.hostname}"
            f" (saslsmtp) with {protocol}{auth}")


def _logged(login: str | None) -> LoggedName | None:
    return LoggedName(login) if login is not None else None


def _utf8_text(text: str) -> str:
    """``clean_text`` that keeps printable non-ASCII characters: one line, no controls."""
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())[:400]


_last_date: tuple[int, str] = (-1, "")


def _date() -> str:
    """The RFC 5322 date of this second (made once a second, not once per message)."""
    global _last_date
    now = time.time()
    if int(now) != _last_date[0]:
        _last_date = (int(now), smtp.rfc822date(time.localtime(now)).decode("ascii"))
    return _last_date[1]
