"""``ConnectionAdmission``: the abuse limits at one connection's events, on the wire.

``saslsmtp.limits.session.ConnectionLimits`` counts; this is what the protocol does with
its verdicts: a refused client gets ``421 4.7.0`` instead of the greeting, an
authenticated sender over ``messages_per_user``/``recipients_per_user`` gets the 452 for
its MAIL or RCPT, and each message answered 2xx counts.  Behind a ``haproxy:`` listener
the session starts only once the PROXY header is read (``saslsmtp.proxyheader``), so the
admission judges the real client there too.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

from twisted.internet import defer
from twisted.python.failure import Failure

from saslsmtp.limits.session import ConnectionLimits, refusal_line
from saslsmtp.peer import Peer
from saslsmtp.replies import SMTPReply


class LimitedConnection(Protocol):
    """What the admission needs of its connection (``SubmissionESMTP``)."""

    transport: Any
    peer: Peer
    authenticated: bool

    @property
    def auth_user(self) -> str | None: ...
    @property
    def leaving(self) -> bool: ...
    def greet(self) -> None: ...
    def write(self, data: bytes) -> None: ...
    def close(self) -> None: ...
    def hold(self) -> None: ...
    def settled(self, failure: Failure | None = None) -> None: ...
    def busy_until(self, d: "defer.Deferred[Any]",
                   then: "Callable[[Any], Any] | None" = None) -> None: ...


class ConnectionAdmission:
    """One connection's ``ConnectionLimits``, asked at connect, MAIL, RCPT, message."""

    def __init__(self, connection: LimitedConnection, limits: ConnectionLimits) -> None:
        self.connection = connection
        self.limits = limits

    def connected(self) -> None:
        """Admit the client (its greeting follows the verdict).  Without a connection
        limit there is nothing to ask: no Deferred, no pause, the greeting at once."""
        if not self.limits.limiter.counts_connections:
            self.connection.greet()
        else:
            self._admit()

    def _admit(self) -> None:
        """Ask the limits whether this client may stay: 421 4.7.0 and close if not.
        A shared store (Redis) answers later: the connection holds its input until
        then, with no Deferred in between (every connection over Redis waits here)."""
        connection = self.connection
        try:
            verdict = self.limits.admit_then(connection.peer.ip, self._answered)
        except Exception:
            connection.busy_until(defer.fail())  # the protocol's internal-error reply
            return
        if verdict is None:
            connection.hold()
        else:  # the memory store answered at once: no busy round
            self._decided(verdict)

    def _answered(self, verdict: Any) -> None:
        """A shared store's verdict (never after the connection was lost: ``release``
        stops it); a connection already closing (kicked, shut down) is not greeted."""
        connection = self.connection
        failure = None
        try:
            if not connection.leaving:
                self._decided(verdict)
        except Exception:
            failure = Failure()  # the protocol's internal-error reply
        connection.settled(failure)

    def _decided(self, verdict: Any) -> None:
        if not verdict.allowed:
            self.connection.write(refusal_line(verdict))
            self.connection.close()
        else:
            self.connection.greet()

    def mail(self, step: Callable[[], Any]) -> Any:
        """MAIL: ``step()`` (the transaction's answer), after ``messages_per_user``."""
        if not self.connection.authenticated:
            return step()
        verdict = self.limits.mail_allowed(self.connection.auth_user)
        return _when(verdict, lambda v: _limited(v) or step())

    def rcpt(self, step: Callable[[], Any]) -> Any:
        """RCPT: ``step()``, after ``recipients_per_user``."""
        if not self.connection.authenticated:
            return step()
        verdict = self.limits.recipient_allowed(self.connection.auth_user)
        return _when(verdict, lambda v: _limited(v) or step())

    def message_accepted(self) -> None:
        """A message got its 2xx (stored, or the upstream took it): messages_per_user."""
        if self.connection.authenticated:
            self.limits.message_accepted(self.connection.auth_user)


def _when(verdict: "defer.Deferred[Any]", then: Callable[[Any], Any]) -> Any:
    """``then(verdict)`` at once when the verdict is already there (no limit set, or the
    memory store): the answer needs no Deferred and no busy round; else later."""
    if verdict.called and not verdict.paused:
        result = verdict.result
        if not isinstance(result, (Failure, defer.Deferred)):
            return then(result)
    return verdict.addCallback(then)


def _limited(verdict: Any) -> SMTPReply | None:
    """The reply for a refusing limits ``Verdict`` (452 4.7.1), or ``None``."""
    return None if verdict.allowed else SMTPReply(verdict.code, verdict.enhanced, verdict.text)

