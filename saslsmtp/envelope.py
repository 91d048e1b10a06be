"""The delivery side of a mail transaction: who is sending, the envelope and the sink.

An avatar that takes mail makes one **envelope** (``Envelope``) per transaction with
``begin_transaction(client)``: ``mail``/``rcpt`` answer MAIL and RCPT (a relay asks its
upstream), ``data`` answers DATA (``354``: its ``sink`` takes the message).  A **message
sink** (``MessageSink``) gets ``write(chunk)`` as the body arrives, ``end()`` -> Deferred
of the final reply, or ``abort()``; it is an ``IConsumer`` so a sink that cannot keep up
pauses the client's transport.

Stock ``IMessageDelivery`` avatars (``validateFrom``/``validateTo``/``IMessage``) work
through ``StockEnvelope``; ``delivery_error_reply`` turns their errors into replies.
``EnvelopeAvatar`` and ``EnvelopeRealm`` are the base of the daemon's own avatars and
realms (Maildir, relay): they make envelopes, and the portal still gets the interface it
asks for.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

from twisted.cred.portal import IRealm
from twisted.internet import defer
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.mail.interfaces import IMessageDelivery
from twisted.python.failure import Failure
from zope.interface import implementer

from saslsmtp.replies import DEFAULT_ENHANCED, REPLIES, SMTPReply, clean_text
from saslsmtp.utf8address import parsed_path

log = Logger(namespace="saslsmtp.transaction")

_ENHANCED_PREFIX = re.compile(r"^([245]\.\d{1,3}\.\d{1,3}) (.*)$")


@dataclass(frozen=True)
class Client:
    """Who is sending, as an envelope or a sender check sees it."""

    login: str | None
    address: str = ""
    port: int = 0
    helo: str = ""
    session: Callable[[], Any] | None = None  # builds a ``Session`` (for the AUTH script)



class MessageSink(Protocol):
    """Where one message's bytes go (a Maildir file, an upstream DATA phase)."""

    queue_id: str

    def write(self, chunk: bytes) -> None: ...
    def end(self) -> "defer.Deferred[SMTPReply]": ...
    def abort(self) -> None: ...
    def registerProducer(self, producer: Any, streaming: bool) -> None: ...
    def unregisterProducer(self) -> None: ...


class Envelope(Protocol):
    """One transaction at the delivery side (see the module docstring)."""

    @property
    def sink(self) -> MessageSink | None:
        """The message's sink once ``data`` answered ``354``."""

    def mail(self, address: str, params: Sequence[str]) -> SMTPReply | defer.Deferred[SMTPReply]: ...
    def rcpt(self, address: str, params: Sequence[str]) -> SMTPReply | defer.Deferred[SMTPReply]: ...
    def data(self) -> SMTPReply | defer.Deferred[SMTPReply]: ...
    def abort(self) -> None: ...



# ---------------------------------------------------------------------------
# Stock Twisted avatars (IMessageDelivery / IMessage), for embedding and tests
# ---------------------------------------------------------------------------


class StockEnvelope:
    """An ``IMessageDelivery`` avatar as an ``Envelope``: ``validateFrom``,
    ``validateTo`` and one ``IMessage`` per distinct factory."""

    def __init__(self, avatar: Any, helo: tuple) -> None:
        self.avatar = avatar
        self.helo = helo
        self.origin: smtp.Address | None = None
        self.factories: list[Callable[[], Any]] = []
        self.sink: LinesSink | None = None

    def mail(self, address: str, params: Sequence[str]) -> "defer.Deferred[SMTPReply]":
        # the transaction parsed it (UTF-8 only with SMTPUTF8): a UTF8Address then
        origin = parsed_path(address.encode("utf-8"), True)

        def ok(accepted: Any) -> SMTPReply:
            self.origin = accepted or origin
            return REPLIES["sender_ok"]
        d = defer.maybeDeferred(self.avatar.validateFrom, self.helo, origin)
        return d.addCallbacks(ok, lambda f: delivery_error_reply(f, REPLIES["sender_rejected"]))

    def rcpt(self, address: str, params: Sequence[str]) -> "defer.Deferred[SMTPReply]":
        dest = parsed_path(address.encode("utf-8"), True)
        user = smtp.User(dest, self.helo, None, self.origin)
        user.dest = dest  # User copies an Address into the plain class: keep UTF8Address

        def ok(factory: Callable[[], Any]) -> SMTPReply:
            self.factories.append(factory)
            return REPLIES["rcpt_ok"]
        d = defer.maybeDeferred(self.avatar.validateTo, user)
        return d.addCallbacks(ok, lambda f: delivery_error_reply(f, REPLIES["rcpt_rejected"]))

    def data(self) -> SMTPReply:
        messages: list[Any] = []
        for factory in self.factories:
            message = factory()
            if not any(message is m for m in messages):
                messages.append(message)
        self.sink = LinesSink(messages)
        return REPLIES["data_start"]

    def abort(self) -> None:
        if self.sink is not None:
            self.sink.abort()


@implementer(IMessageDelivery)
class EnvelopeAvatar:
    """An authenticated user's avatar that makes one envelope per transaction
    (``begin_transaction``).  The portal asks for ``IMessageDelivery``, so its methods
    are here, but the server never calls them: a stock client of this avatar can send
    nowhere (every recipient is refused)."""

    def __init__(self, username: str) -> None:
        self.username = username

    def begin_transaction(self, client: Client) -> Envelope:
        raise NotImplementedError

    def receivedHeader(self, helo: Any, origin: Any, recipients: Any) -> None:
        return None

    def validateFrom(self, helo: Any, origin: smtp.Address) -> smtp.Address:
        return origin

    def validateTo(self, user: smtp.User) -> Callable[[], Any]:
        raise smtp.SMTPBadRcpt(user)


@implementer(IRealm)
class EnvelopeRealm:
    """A realm whose avatars are ``EnvelopeAvatar``s: ``avatar(username)`` makes one."""

    def avatar(self, username: str) -> EnvelopeAvatar:
        raise NotImplementedError

    def requestAvatar(self, avatarId: bytes | tuple[()], mind: Any, *interfaces: Any) -> tuple:
        if IMessageDelivery not in interfaces:
            raise NotImplementedError(f"{type(self).__name__} only provides IMessageDelivery")
        name = avatarId.decode("utf-8", "replace") if isinstance(avatarId, bytes) else str(avatarId)
        return IMessageDelivery, self.avatar(name), lambda: None


class LinesSink:
    """Feeds ``IMessage.lineReceived`` one line at a time from chunks (a partial line is
    the only thing buffered, and the body reader bounds line lengths)."""

    queue_id = "-"

    def __init__(self, messages: list[Any]) -> None:
        self.messages = messages
        self._partial = b""

    def write(self, chunk: bytes) -> None:
        lines = (self._partial + chunk).split(b"\r\n")
        self._partial = lines.pop()
        for line in lines:
            for message in self.messages:
                message.lineReceived(line)

    def end(self) -> "defer.Deferred[SMTPReply]":
        messages, self.messages = self.messages, []
        d = defer.DeferredList([defer.maybeDeferred(m.eomReceived) for m in messages],
                               fireOnOneErrback=True, consumeErrors=True)
        return d.addCallback(lambda _: REPLIES["message_accepted"])

    def abort(self) -> None:
        messages, self.messages = self.messages, []
        for message in messages:
            message.connectionLost()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass



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
