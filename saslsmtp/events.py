"""What a session and the parts around it report: counted events and the session-end line.

The protocol, the AUTH command, the mail transaction and the script runner each make one
call per event (``events.auth_finished(mechanism, result)``) and know nothing of
Prometheus or of the log format:

* ``SessionEvents`` belongs to one connection.  It counts into ``metrics`` (a
  ``saslsmtp.metrics.Metrics`` or ``NO_METRICS``), remembers what the session did (who
  logged in, with which mechanism, the TLS version, messages and octets accepted) and
  writes the one ``session end`` line when the connection is lost.
* ``NO_METRICS`` has every ``Metrics`` event method and does nothing: process-wide parts
  (the script runner, the limits, the auth cache, the Redis store) hold it until
  ``serving.instrument`` gives them the process's ``Metrics``.
* ``NoSessionEvents`` is the default of a protocol built without a factory (tests): it
  counts nothing and logs nothing.
"""

from __future__ import annotations

from typing import Any

from saslsmtp.sessionlogger import Logger

from saslsmtp.logs import SessionSummary, session_ended

log = Logger(namespace="saslsmtp.session")


class NullMetrics:
    """The ``Metrics`` event methods, doing nothing (metrics are off)."""

    def connection_opened(self, listener: str) -> None: ...
    def session_closed(self, listener: str) -> None: ...
    def auth_finished(self, mechanism: str, result: str) -> None: ...
    def backend_finished(self, backend: str, result: str, seconds: float) -> None: ...
    def cache_lookup(self, hit: bool) -> None: ...
    def cache_stale_hit(self) -> None: ...
    def limit_rejected(self, limit: str) -> None: ...
    def script_error(self) -> None: ...
    def tls_handshake(self, ok: bool) -> None: ...
    def message_accepted(self, size: int) -> None: ...
    def delivery_failed(self) -> None: ...
    def redis_down(self) -> None: ...
    def proxy_refused(self, listener: str, reason: str) -> None: ...
    def reloaded(self, ok: bool) -> None: ...
    def tls_certificate(self, path: str | None, not_after: float | None) -> None: ...


NO_METRICS = NullMetrics()


def tls_version(transport: Any) -> str | None:
    """``TLSv1.3`` (or the like) of a TLS transport after its handshake, else ``None``."""
    get = getattr(transport, "getHandle", None)
    handle = get() if callable(get) else None
    name = getattr(handle, "get_protocol_version_name", None)
    try:
        return str(name()) if callable(name) else None
    except Exception:
        return None


class SessionEvents:
    """One connection's events (see the module docstring).  ``clock`` is an
    ``IReactorTime``: the session's duration is measured on it."""

    def __init__(self, metrics: Any = NO_METRICS, clock: Any = None) -> None:
        self.metrics = metrics if metrics is not None else NO_METRICS
        self.clock = clock
        self.started = clock.seconds() if clock is not None else 0.0
        self.user: str | None = None
        self.mechanism: str | None = None
        self.tls: str | None = None  # the negotiated version, once the handshake is done
        self.messages = 0
        self.bytes = 0
        self.done = False

    def auth_finished(self, mechanism: str, result: str, user: str | None = None,
                      client: str = "") -> None:
        """An AUTH exchange ended: ``success`` (``user`` is who logged in), ``failure``
        (535), ``tempfail`` (454), ``aborted`` (``*``, a broken exchange, the connection
        lost mid-exchange) or ``limited`` (refused by a limit before any check).
        Success and failure have their own log lines (``saslsmtp.smtpauth``); the other
        two are logged here."""
        self.metrics.auth_finished(mechanism, result)
        if result == "success":
            self.user, self.mechanism = user, mechanism
        elif result in ("tempfail", "aborted"):
            log.info("AUTH {mechanism} {result} ip={ip}", mechanism=mechanism, result=result,
                     ip=client or "-")

    def login_forgotten(self) -> None:
        """STARTTLS made the server forget the login (RFC 3207 4.2): the session-end line
        names only a login that still held when the session ended (the ``auth succeeded``
        line keeps the record of the one before TLS)."""
        self.user = self.mechanism = None

    def tls_established(self, transport: Any) -> None:
        """The TLS handshake completed (STARTTLS or an ``ssl:`` listener)."""
        self.tls = tls_version(transport) or "TLS"
        self.metrics.tls_handshake(True)

    def message_accepted(self, size: int) -> None:
        """A message was stored or relayed (the 250 after DATA); ``size`` in octets."""
        self.messages += 1
        self.bytes += size
        self.metrics.message_accepted(size)

    def delivery_failed(self) -> None:
        """A complete message could not be stored or relayed."""
        self.metrics.delivery_failed()

    def ended(self, client: str, tls_started: bool) -> None:
        """The connection is gone: a TLS handshake it started and never finished counts
        as failed, and the session-end line is written (once)."""
        if self.done:
            return
        self.done = True
        if tls_started and self.tls is None:
            self.metrics.tls_handshake(False)
        duration = self.clock.seconds() - self.started if self.clock is not None else 0.0
        session_ended(log, SessionSummary(client or "-", self.user, self.mechanism, self.tls,
                                          self.messages, self.bytes, duration))


class NoSessionEvents(SessionEvents):
    """Counts nothing, remembers nothing and logs nothing (a protocol or a transaction
    built without a factory)."""

    def __init__(self) -> None:
        super().__init__(NO_METRICS, None)

    def auth_finished(self, mechanism: str, result: str, user: str | None = None,
                      client: str = "") -> None:
        pass

    def tls_established(self, transport: Any) -> None:
        pass

    def message_accepted(self, size: int) -> None:
        pass

    def delivery_failed(self) -> None:
        pass

    def ended(self, client: str, tls_started: bool) -> None:
        pass
