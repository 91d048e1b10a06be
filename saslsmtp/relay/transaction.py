"""One message to the upstream: the ``UpstreamTransaction`` the SMTP server drives
command by command (``UpstreamClient.transaction`` makes it).

**MAIL and RCPT are forwarded as our client sends them**, one at a time, and the
upstream's reply *is* our client's reply (passed on through ``wire.pass_on``): an
upstream RCPT rejection (a Postfix ``smtpd_recipient_restrictions`` hit, an unknown
Dovecot user) reaches the client at RCPT, where it belongs, and no message is accepted
that the upstream would refuse for its envelope.  The cost is one upstream round trip per
command, on a pooled connection.

**DATA streams.**  After the upstream's ``354`` the server feeds the message with
``write(chunk)``; chunks are dot-stuffed and written to the upstream transport, whose
own buffer is the only copy.  The transaction is an ``IConsumer``: the server registers
its client transport as the producer, and when the upstream transport's buffer is full
(Twisted calls ``pauseProducing`` on the upstream connection) the client transport is
paused too, so memory stays bounded by the two socket buffers whatever the message size.
``end()`` sends the final dot and returns the upstream's verdict.

**Verdicts.**  Every public method returns a ``Deferred`` that fires with a
``saslsmtp.replies.SMTPReply`` and never fails for anything the network can do: refused or
impossible connections and TLS failures give ``451 4.4.1``, a command, the connection or
a stalled DATA phase running past ``timeout`` (the reply to the final dot: past
``final_timeout``) give ``451 4.4.2``, a lost connection ``451 4.4.2``, a protocol error
(a reply that is not SMTP, or one the command cannot have: ``354`` to MAIL, ``250`` to
DATA) ``451 4.5.0``, and the connection is dropped.
``421`` from the upstream becomes ``451`` with its text (our session goes on) and drops
the connection too.  A connection lost (or closed by an unasked ``421``) after MAIL and
before the upstream accepted any RCPT is replaced once: the client's MAIL goes out again
on a new connection and the RCPT follows (the upstream's transaction died with the old
one, and our client was promised nothing that depends on it); after an accepted RCPT it
is not.

**8BITMIME.**  A client's ``BODY=8BITMIME`` goes on only to an upstream that announced
``8BITMIME``; to one that did not, its message streams while it is 7-bit, and at the
first 8-bit octet the connection is dropped (no final dot) and the final reply is
``554 5.6.3`` (RFC 6152; saslsmtp does not convert to 7 bit).

**SMTPUTF8.**  A client's ``SMTPUTF8`` goes on only to an upstream that announced it.  To
one that did not (RFC 6531 3.4, as Postfix's SMTP client): a UTF-8 sender or recipient is
refused with ``553 5.6.7`` by us, and nothing of it is sent; an all-ASCII envelope goes on
without the parameter, and a message whose header section has an 8-bit octet is dropped
before that octet (no final dot), its final reply ``554 5.6.7``.  A message that only
declared ``SMTPUTF8`` arrives unchanged.

**LMTP** (RFC 2033) answers the final dot once per accepted recipient; ``verdict.combine``
makes the one reply our client gets: all accepted -> the first ``250``; all failed ->
the first failure, a temporary one preferred; some delivered, some not -> a ``5xx`` that
names both (a ``4xx`` would make the client deliver it again to those who have it, on
every retry; a ``250`` would lose the others).  The split is logged as a warning.

**XCLIENT** (Postfix): with ``xclient = true`` and ``XCLIENT`` in the upstream's EHLO,
each transaction first sends ``XCLIENT`` with the attributes the upstream listed among
``NAME ADDR PORT HELO LOGIN`` (values xtext-encoded, ``[UNAVAILABLE]`` when unknown;
``NAME`` always is: we do no reverse lookups, and a stale name must not stay), expects
``220`` and says EHLO again with the client's HELO name (the name Postfix then logs and
checks).  A pooled connection whose last XCLIENT carried the same attributes skips it.
Otherwise ``trace_header`` (if set) is written right below the message's first header
field (the SMTP server's Received header: trace fields stay at the top, RFC 5321 4.4).
``auth_param`` adds ``AUTH=<login>`` (RFC 4954 5) to MAIL when the upstream announces AUTH.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence, cast

from twisted.internet import defer
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IConsumer, IProducer, IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from saslsmtp.relay.connection import UpstreamConnection, UpstreamError
from saslsmtp.relay.verdict import combine
from saslsmtp.relay.wire import (DATA, END_OF_DATA, MAIL, RCPT, XCLIENT, DotStuffer,
                                 FirstField, UpstreamReply, pass_on, xtext)
from saslsmtp.replies import REPLIES, SMTPReply

if TYPE_CHECKING:
    from saslsmtp.relay.client import UpstreamClient

# the namespace operators filter on stays the one of the relay client
log = Logger(namespace="saslsmtp.relay.client")

XCLIENT_ATTRIBUTES = ("NAME", "ADDR", "PORT", "HELO", "LOGIN")
_HELO_FIELD = re.compile(r"[^A-Za-z0-9.:_\[\]-]")  # what a trace header's helo= may carry
_LOGIN_FIELD = re.compile(r'[\s;="\\]')  # what would end login= or start another field
#: MAIL parameter -> the EHLO keyword the upstream must announce for us to forward it
MAIL_PARAMETERS = {"SIZE": "SIZE", "BODY": "8BITMIME", "SMTPUTF8": "SMTPUTF8",
                   "RET": "DSN", "ENVID": "DSN"}
RCPT_PARAMETERS = {"NOTIFY": "DSN", "ORCPT": "DSN"}


class TransactionStateError(Exception):
    """A method was called out of order (a bug in the caller, not a network event)."""


@dataclass(frozen=True)
class RelaySession:
    """What the upstream may learn about our client (XCLIENT, AUTH=, trace header)."""

    login: str | None
    client_address: str | None = None
    client_port: int | None = None
    helo: str | None = None



def _forwardable(params: Sequence[str], allowed: dict[str, str],
                 capabilities: dict[str, list[str]]) -> list[str]:
    """The ESMTP parameters the upstream announced the extension for; others dropped."""
    out = []
    for param in params:
        keyword = param.split("=", 1)[0].upper()
        if allowed.get(keyword) in capabilities and "\r" not in param and "\n" not in param:
            out.append(param)
    return out


@implementer(IConsumer, IPushProducer)
class UpstreamTransaction:
    """One message to the upstream, driven by the SMTP server (see the module docstring).

    Order: ``mail_from`` -> ``rcpt``... -> ``start_data`` -> ``write``... -> ``end``;
    ``abort`` at any time (idempotent).  Each step's Deferred fires with the ``SMTPReply``
    for our client.  A MAIL refused by the upstream leaves the transaction where it
    started (``mail_from`` may be called again).
    """

    def __init__(self, client: UpstreamClient, session: RelaySession) -> None:
        self.client = client
        self.session = session
        self.state = "new"     # new -> mail -> data -> done
        self.connection: UpstreamConnection | None = None
        self.accepted: list[str] = []
        self.stuffer = DotStuffer()
        self.producer: IPushProducer | None = None
        self._holding = False  # we paused the producer (the upstream's buffer is full)
        self.xclient_used = False
        self._stall: Any = None
        self._trace: bytes | None = None  # the trace header, until its place has come
        self._first_field = FirstField()
        self._mail: tuple[str, tuple[str, ...]] | None = None  # the client's MAIL, once accepted
        self.replayed = False  # MAIL was sent again on a new connection (at most once)
        self.eight_bit = False  # the client's MAIL said BODY=8BITMIME
        self._seven_bit_only = False  # ... and the upstream did not announce 8BITMIME
        self.smtputf8 = False  # the client's MAIL said SMTPUTF8
        self._ascii_headers = False  # ... and the upstream did not announce SMTPUTF8
        self._header_tail = b""  # the last octets of the header section seen so far

    def __repr__(self) -> str:
        return f"<UpstreamTransaction {self.client.name} {self.state}>"

    # ---- MAIL, RCPT ----------------------------------------------------------------

    def mail_from(self, address: str, params: Sequence[str] = ()) -> "Deferred[SMTPReply]":
        """``MAIL FROM:<address> params`` upstream (a connection is taken first)."""
        self._require("new")
        self.state = "busy"
        return ensureDeferred(self._mail_from(address, params))

    async def _mail_from(self, address: str, params: Sequence[str]) -> SMTPReply:
        try:
            if self.connection is None:
                connection = await self.client.acquire()
                if self.state != "busy":  # aborted while connecting: keep it for others
                    self.client.release(connection)
                    return REPLIES["upstream_lost"]
                self.connection = connection
                await self._xclient()
            smtputf8 = any(p.upper() == "SMTPUTF8" for p in params)
            if smtputf8 and not address.isascii() and not self._utf8_upstream():
                self.state = "new"
                return self._no_smtputf8(address)
            reply = await self.connection.command(self._mail_line(address, params), MAIL)
        except UpstreamError as e:
            aborted = self.state != "busy"
            self._drop()
            if not aborted:
                self.state = "new"  # a later mail_from tries a fresh connection
            return e.reply
        self.state = "mail" if reply.positive else "new"
        if reply.positive:
            self._mail = (address, tuple(params))
            self.eight_bit = any(p.upper() == "BODY=8BITMIME" for p in params)
            self.smtputf8 = smtputf8
        return pass_on(reply)

    def _utf8_upstream(self) -> bool:
        return self.connection is not None and "SMTPUTF8" in self.connection.capabilities

    def _no_smtputf8(self, address: str) -> SMTPReply:
        """RFC 6531 3.4: a UTF-8 address is not sent to an upstream without SMTPUTF8."""
        log.warn("upstream {name} does not announce SMTPUTF8: UTF-8 address {address}"
                 " refused", name=self.client.name, address=address)
        return REPLIES["upstream_no_smtputf8"]

    def _mail_line(self, address: str, params: Sequence[str]) -> bytes:
        """``MAIL FROM:<address>`` with what this connection's upstream announced."""
        connection = self.connection
        assert connection is not None
        words = [f"MAIL FROM:<{address}>"]
        words += _forwardable(params, MAIL_PARAMETERS, connection.capabilities)
        if self.client.auth_param and "AUTH" in connection.capabilities:
            login = self.session.login
            words.append(f"AUTH={xtext(login) if login else '<>'}")
        return " ".join(words).encode("utf-8")

    async def _xclient(self) -> None:
        """XCLIENT when configured and announced; then EHLO again (see the module doc)."""
        connection = self.connection
        assert connection is not None
        if not self.client.xclient:
            return
        if "XCLIENT" not in connection.capabilities:
            if connection.xclient_sent is not None:  # it speaks for another client now
                raise UpstreamError(REPLIES["upstream_unavailable"], "XCLIENT no longer offered")
            return
        offered = connection.capabilities["XCLIENT"]
        session = self.session
        address = session.client_address
        if address and ":" in address:
            address = "IPV6:" + address
        values = {"NAME": None, "ADDR": address, "PORT": str(session.client_port)
                  if session.client_port is not None else None,
                  "HELO": session.helo, "LOGIN": session.login}
        attributes = tuple(f"{name}={xtext(value) if value else '[UNAVAILABLE]'}"
                           for name, value in values.items() if name in offered)
        if not attributes:
            return
        if connection.xclient_sent == attributes:
            self.xclient_used = True
            return
        reply = await connection.command(("XCLIENT " + " ".join(attributes)).encode(), XCLIENT)
        if reply.code != 220:
            log.warn("upstream {name} refused XCLIENT: {status}", name=self.client.name,
                     status=reply.status())
            raise UpstreamError(REPLIES["upstream_unavailable"], "XCLIENT refused")
        # as in XCLIENT_README: EHLO again, with the client's own name (Postfix logs
        # and checks the EHLO name that follows, not the XCLIENT HELO attribute)
        await self.client.hello(connection, session.helo)
        connection.xclient_sent = attributes
        self.xclient_used = True

    def rcpt(self, address: str, params: Sequence[str] = ()) -> "Deferred[SMTPReply]":
        """``RCPT TO:<address> params`` upstream; its reply is the client's."""
        self._require("mail")
        self.state = "busy"
        return ensureDeferred(self._rcpt(address, params))

    async def _rcpt(self, address: str, params: Sequence[str]) -> SMTPReply:
        if self.smtputf8 and not address.isascii() and not self._utf8_upstream():
            self.state = "mail"
            return self._no_smtputf8(address)
        connection = self.connection
        closed = connection is None or connection.closed or connection.error is not None
        try:
            try:
                reply = await self._send_rcpt(address, params)
            except UpstreamError as e:
                if not self._may_replay(e, closed):
                    raise
                refused = await self._replay_mail(e)
                if refused is not None:
                    self.state = "done"
                    self._release()  # its refusal makes it say QUIT (see release)
                    return refused
                reply = await self._send_rcpt(address, params)
        except UpstreamError as e:
            self._drop()
            return e.reply
        self.state = "mail"
        if reply.positive:
            self.accepted.append(address)
        return pass_on(reply)

    def _send_rcpt(self, address: str, params: Sequence[str]) -> "Deferred[UpstreamReply]":
        connection = self.connection
        if connection is None:  # aborted meanwhile
            raise UpstreamError(REPLIES["upstream_lost"], "transaction aborted")
        words = [f"RCPT TO:<{address}>"]
        words += _forwardable(params, RCPT_PARAMETERS, connection.capabilities)
        return connection.command(" ".join(words).encode("utf-8"), RCPT)

    def _may_replay(self, error: UpstreamError, closed_before: bool) -> bool:
        """The connection was lost (or closed with a ``421`` nobody asked for) after the
        upstream accepted MAIL and before it accepted any RCPT: the upstream's
        transaction died with it and nothing our client was told depends on it, so MAIL
        may be sent again, once, on a new connection.  After an accepted RCPT it may
        not: a second upstream session could refuse a recipient our client already has
        a ``250`` for.  A ``421`` that answers the RCPT itself is the upstream's verdict
        on it (shutting down, too many errors): passed on, not retried."""
        lost = closed_before or error.reply == REPLIES["upstream_lost"]
        return (lost and not self.accepted and not self.replayed and self._mail is not None
                and self.state == "busy")

    async def _replay_mail(self, error: UpstreamError) -> SMTPReply | None:
        """A new connection (XCLIENT again), and the client's MAIL on it; ``None`` when
        the upstream accepted it, else the reply for our client (always temporary: its
        MAIL had been accepted, a later try will hear the upstream's verdict at MAIL)."""
        assert self._mail is not None
        self.replayed = True
        log.info("upstream {name}: {why} after MAIL FROM and before any accepted RCPT;"
                 " MAIL FROM sent again on a new connection", name=self.client.name,
                 why=str(error))
        old, self.connection = self.connection, None
        if old is not None:
            old.downstream = None
        connection = await self.client.acquire()
        if self.state != "busy":  # aborted while connecting: keep it for others
            self.client.release(connection)
            return REPLIES["upstream_lost"]
        self.connection = connection
        self.xclient_used = False
        await self._xclient()
        reply = await connection.command(self._mail_line(*self._mail), MAIL)
        if reply.positive:
            return None
        passed = pass_on(reply)
        if passed.code < 500:
            return passed
        return SMTPReply(451, "4" + (passed.enhanced or "5.0.0")[1:], passed.text, passed.rfc)

    # ---- DATA ----------------------------------------------------------------------

    def start_data(self) -> "Deferred[SMTPReply]":
        """``DATA`` upstream: ``354`` means go on with ``write``; anything else is the
        final reply for this message (the transaction is then over: call ``abort``)."""
        self._require("mail")
        if not self.accepted:
            return defer.succeed(REPLIES["need_rcpt"])
        self.state = "busy"
        return ensureDeferred(self._start_data())

    async def _start_data(self) -> SMTPReply:
        assert self.connection is not None
        try:
            reply = await self.connection.command(b"DATA", DATA)
        except UpstreamError as e:
            self._drop()
            return e.reply
        if reply.code != 354:
            self.state = "mail"
            return pass_on(reply)
        self.state = "data"
        self.connection.downstream = self
        self._seven_bit_only = self.eight_bit and "8BITMIME" not in self.connection.capabilities
        self._ascii_headers = self.smtputf8 and "SMTPUTF8" not in self.connection.capabilities
        self._header_tail = b""
        if self.client.trace_header and not self.xclient_used:
            # below the first header field, our Received header: RFC 5321 4.4 (and
            # RFC 5322 3.6) keep the trace fields at the top of the message
            self._trace = self._trace_line()
        return REPLIES["data_start"]

    def _trace_line(self) -> bytes:
        s = self.session
        # the HELO is the client's own word: no ";" or "=" that would add a field
        helo = _HELO_FIELD.sub("?", s.helo) if s.helo else "-"
        # a login name may have a space or ";" too (a users file, an HTTP API allow one)
        login = _LOGIN_FIELD.sub("?", s.login) if s.login else "-"
        text = (f"{self.client.trace_header}: login={login};"
                f" client=[{s.client_address or 'unknown'}]:{s.client_port or 0};"
                f" helo={helo}")
        return "".join(c if 32 <= ord(c) < 127 else "?" for c in text)[:998].encode() + b"\r\n"

    def write(self, data: bytes) -> None:
        """Message bytes (un-stuffed, CRLF line ends), any chunking; sent as they come."""
        if self.state != "data":
            raise TransactionStateError(f"write() in state {self.state}")
        self._send(data)

    def _send(self, data: bytes) -> None:
        connection = self.connection
        assert connection is not None
        if connection.closed or connection.error is not None:
            self.stuffer.octets += len(data)  # discarded: end() reports the loss
            return
        if self._seven_bit_only and not data.isascii():
            # RFC 6152: no 8-bit octet to a server that did not announce 8BITMIME, and
            # saslsmtp does not convert to 7bit: no final dot, the upstream forgets it
            self.stuffer.octets += len(data)
            connection.fail(UpstreamError(
                REPLIES["upstream_no_8bitmime"], "message with 8-bit content (BODY=8BITMIME)"
                " refused: the upstream does not announce 8BITMIME", warn=True))
            return
        if self._ascii_headers and not self._headers_ascii(data):
            # RFC 6531 3.4: UTF-8 in the header section needs SMTPUTF8 upstream
            self.stuffer.octets += len(data)
            connection.fail(UpstreamError(
                REPLIES["upstream_no_smtputf8_header"], "message with UTF-8 header fields"
                " (SMTPUTF8) refused: the upstream does not announce SMTPUTF8", warn=True))
            return
        if self._trace is not None:
            at = self._first_field.find(data)
            if at is not None:
                trace, self._trace = self._trace, None
                connection.transport.write(self.stuffer.feed(data[:at]) +
                                           self.stuffer.feed(trace) +
                                           self.stuffer.feed(data[at:]))
                return
        connection.transport.write(self.stuffer.feed(data))

    def _headers_ascii(self, data: bytes) -> bool:
        """Whether the part of ``data`` in the header section (up to the first empty
        line, which may straddle chunks) is ASCII; past it, nothing is checked again."""
        seen = self._header_tail + data
        end = seen.find(b"\r\n\r\n")
        if end >= 0:
            self._ascii_headers = False  # the body may be anything 8BITMIME allows
            return seen[:end].isascii()
        self._header_tail = seen[-3:]
        return data.isascii()

    def _flush_trace(self) -> None:
        """The message ended inside its first field (or was empty): the header last."""
        trace, self._trace = self._trace, None
        if trace is not None:
            started = self.stuffer.octets > 0
            self._send((b"" if not started or self._first_field.at_line_end else b"\r\n")
                       + trace)

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        """Our client's transport: paused while the upstream cannot take more."""
        if not streaming:
            raise ValueError("only push producers (a transport) are supported")
        self.producer = cast(IPushProducer, producer)  # streaming: a push producer
        if self.connection is not None and self.connection.paused:
            self.pauseProducing()

    def unregisterProducer(self) -> None:
        self._let_go()

    def _let_go(self) -> None:
        """Forget our client's transport, resuming it first if the upstream had paused
        it: once forgotten nothing would resume it, and the session would never read
        its next command (the upstream's buffer passes 64 KiB in any larger message)."""
        producer, self.producer = self.producer, None
        if producer is not None and self._holding:
            producer.resumeProducing()
        self._holding = False

    # the upstream connection forwards its transport's flow control here
    def pauseProducing(self) -> None:
        if self._stall is None and self.state == "data":
            self._stall = self.client.clock.callLater(self.client.timeout, self._stalled)
        if self.producer is not None:
            self._holding = True
            self.producer.pauseProducing()

    def resumeProducing(self) -> None:
        if self._stall is not None and self._stall.active():
            self._stall.cancel()
        self._stall = None
        if self.producer is not None:
            self._holding = False
            self.producer.resumeProducing()

    def stopProducing(self) -> None:  # pragma: no cover - IPushProducer completeness
        self.abort()

    def _stalled(self) -> None:
        self._stall = None
        if self.connection is not None:
            self.connection.fail(UpstreamError(
                REPLIES["upstream_timeout"],
                f"DATA stalled: the upstream read nothing for {self.client.timeout:g}s"))

    def end(self) -> "Deferred[SMTPReply]":
        """The final dot; fires with the upstream's verdict (LMTP: combined)."""
        self._require("data")
        self.state = "busy"
        return ensureDeferred(self._end())

    async def _end(self) -> SMTPReply:
        connection = self.connection
        assert connection is not None
        self._flush_trace()
        if self._stall is not None and self._stall.active():
            self._stall.cancel()
        self._stall = None
        # RFC 5321 4.5.3.2.6: the end of data may take 10 minutes (content filters,
        # milters); giving up sooner makes the client retry a message the upstream
        # may still queue: a second copy
        waits = [connection.expect(END_OF_DATA, self.client.final_timeout)
                 for _ in (self.accepted if self.client.lmtp else [0])]
        if not connection.closed and connection.error is None:
            connection.transport.write(self.stuffer.end())
        replies: list[SMTPReply] = []
        try:
            for wait in waits:
                replies.append(pass_on(await wait))
        except UpstreamError as e:
            for wait in waits:
                wait.addErrback(lambda _: None)
            self._drop()
            if not replies:
                return e.reply
            log.warn("upstream {name}: LMTP answered {n} of {m} recipients before {why}",
                     name=self.client.name, n=len(replies), m=len(waits), why=str(e))
            return self._verdict(replies + [e.reply] * (len(waits) - len(replies)))
        self.state = "done"
        self._release()
        return self._verdict(replies)

    def _verdict(self, replies: list[SMTPReply]) -> SMTPReply:
        if not self.client.lmtp:
            return replies[0]
        verdict = combine(self.accepted, replies)
        if verdict.partial:
            log.warn("upstream {name}: LMTP delivered to {delivered} but not to {failed};"
                     " answering {code} {enhanced}", name=self.client.name,
                     delivered=", ".join(verdict.delivered), failed=", ".join(verdict.failed),
                     code=verdict.reply.code, enhanced=verdict.reply.enhanced)
        return verdict.reply

    # ---- the end ---------------------------------------------------------------------

    def abort(self) -> None:
        """RSET, QUIT or a lost client: forget the message.  Before DATA the connection
        goes back to the pool (RSET on reuse); during DATA it is dropped (a message
        cannot be taken back)."""
        if self.state == "done":
            return
        if self.state in ("data", "busy"):
            self._drop()
        else:
            self._release()
        self.state = "done"

    def _release(self) -> None:
        if self.connection is not None:
            self.client.release(self.connection)
            self.connection = None
        self._let_go()

    def _drop(self) -> None:
        self.state = "done"
        if self._stall is not None and self._stall.active():
            self._stall.cancel()
        self._stall = None
        if self.connection is not None:
            connection, self.connection = self.connection, None
            connection.downstream = None
            if not connection.closed:
                connection.fail(UpstreamError(REPLIES["upstream_lost"], "transaction aborted"))
        self._let_go()

    def _require(self, state: str) -> None:
        if self.state != state:
            raise TransactionStateError(f"expected state {state}, not {self.state}")
