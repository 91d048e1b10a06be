"""The relay as the SMTP server's delivery: a cred realm whose avatars forward each
transaction to the upstream through one ``UpstreamTransaction``.

``RelayEnvelope`` passes MAIL, RCPT and DATA on as the client sends them (their replies
are the upstream's); ``RelaySink`` streams the body and answers the final dot with the
upstream's verdict.  Every message gets our own queue id for the log line, so a message
can be followed from our log into the upstream's (whose id is in its reply text).
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Any, Sequence

from twisted.internet import defer

from saslsmtp.envelope import EnvelopeAvatar, EnvelopeRealm
from saslsmtp.relay.client import RelaySession, UpstreamClient, UpstreamTransaction
from saslsmtp.replies import REPLIES, SMTPReply

_counter = itertools.count(1)


def queue_id() -> str:
    """Our id for one relayed message: unique in this process and across restarts."""
    return f"{int(time.time()):X}{os.getpid():X}{next(_counter):05X}"


class RelaySink:
    """The body of one message, streamed to the upstream (``UpstreamTransaction`` is
    the ``IConsumer``: a slow upstream pauses our client)."""

    def __init__(self, transaction: UpstreamTransaction) -> None:
        self.transaction = transaction
        self.queue_id = queue_id()

    def write(self, chunk: bytes) -> None:
        if self.transaction.state == "data":
            self.transaction.write(chunk)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self.transaction.state == "data":
            self.transaction.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.transaction.unregisterProducer()

    def end(self) -> "defer.Deferred[SMTPReply]":
        if self.transaction.state != "data":
            return defer.succeed(REPLIES["upstream_lost"])
        return self.transaction.end()

    def abort(self) -> None:
        self.transaction.abort()


class RelayEnvelope:
    """One transaction, forwarded command by command (see the module docstring)."""

    def __init__(self, transaction: UpstreamTransaction) -> None:
        self.transaction = transaction
        self.sink: RelaySink | None = None

    def mail(self, address: str, params: Sequence[str]) -> "defer.Deferred[SMTPReply]":
        return self.transaction.mail_from(address, params)

    def rcpt(self, address: str, params: Sequence[str]) -> "defer.Deferred[SMTPReply]":
        if self.transaction.state != "mail":  # the upstream connection was lost
            return defer.succeed(REPLIES["upstream_lost"])
        return self.transaction.rcpt(address, params)

    def data(self) -> "defer.Deferred[SMTPReply]":
        if self.transaction.state != "mail":
            return defer.succeed(REPLIES["upstream_lost"])

        def started(reply: SMTPReply) -> SMTPReply:
            if reply.code == 354 and self.transaction.state == "data":
                self.sink = RelaySink(self.transaction)
            else:
                self.transaction.abort()
            return reply
        return self.transaction.start_data().addCallback(started)

    def abort(self) -> None:
        self.transaction.abort()


class RelayDelivery(EnvelopeAvatar):
    """The avatar of an authenticated user when mail goes on to an upstream."""

    def __init__(self, username: str, client: UpstreamClient) -> None:
        super().__init__(username)
        self.client = client

    def begin_transaction(self, client: Any) -> RelayEnvelope:
        """``client``: a ``saslsmtp.envelope.Client`` (login, address, port, HELO)."""
        session = RelaySession(client.login or self.username, client.address or None,
                               client.port or None, client.helo or None)
        return RelayEnvelope(self.client.transaction(session))


class RelayRealm(EnvelopeRealm):
    """Gives each authenticated user a ``RelayDelivery`` through ``client``."""

    def __init__(self, client: UpstreamClient) -> None:
        self.client = client

    def avatar(self, username: str) -> RelayDelivery:
        return RelayDelivery(username, self.client)
