"""The upstream client: connecting, the greeting, STARTTLS or implicit TLS, EHLO, and a
small pool of idle connections; ``transaction()`` gives one ``UpstreamTransaction`` per
message.  The line protocol is ``connection``, the per-message exchange (MAIL, RCPT,
DATA, XCLIENT, LMTP verdicts) ``transaction``; their public names are importable from
here too.

**Pool.**  After a transaction the connection is kept idle (up to ``pool_size``); the
next transaction sends ``RSET`` first and falls back to a new connection if that fails.
A connection the upstream refused something on since its last accepted message is
closed instead: Postfix holds those errors against the connection, whoever comes next.
So is one that carried ``reuse_limit`` transactions (``[delivery] reuse_limit``, 100 by
default): Postfix counts every RSET as a junk command, and past its limit as an error
that ends in a ``421`` to a MAIL.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import CancelledError
from twisted.internet.endpoints import (HostnameEndpoint, TCP4ClientEndpoint,
                                        TCP6ClientEndpoint, UNIXClientEndpoint, wrapClientTLS)
from twisted.internet.interfaces import (IOpenSSLClientConnectionCreator, IReactorTime,
                                         IStreamClientEndpoint)
from twisted.internet.protocol import Factory

from saslsmtp.checkers.tlsclient import (CertificateIdentityError, StrictClientTLS,
                                         load_trust_root, verify_peer_identity)
from saslsmtp.relay.connection import UpstreamConnection, UpstreamError, parse_capabilities
from saslsmtp.relay.options import REUSE_LIMIT, UpstreamDelivery
from saslsmtp.relay.outage import UpstreamOutage
from saslsmtp.relay.wire import EHLO, GREETING, LHLO, QUIT, RSET, STARTTLS
from saslsmtp.relay.transaction import (MAIL_PARAMETERS, RCPT_PARAMETERS, XCLIENT_ATTRIBUTES,
                                        RelaySession, TransactionStateError,
                                        UpstreamTransaction)
from saslsmtp.replies import REPLIES

__all__ = ["MAIL_PARAMETERS", "RCPT_PARAMETERS", "XCLIENT_ATTRIBUTES", "RelaySession",
           "TransactionStateError", "UpstreamClient", "UpstreamConnection", "UpstreamError",
           "UpstreamTransaction", "endpoint_for", "parse_capabilities"]

_HELO_NAME = re.compile(r"^[A-Za-z0-9.:\[\]_-]{1,255}$")


class _OneConnection(Factory):
    """``connectProtocol``'s factory without its two info lines ("Starting factory",
    "Stopping factory") for every connection to the upstream."""

    noisy = False

    def __init__(self, protocol: UpstreamConnection) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> UpstreamConnection:
        return self._protocol


class UpstreamClient:
    """Makes ``UpstreamTransaction`` objects for one upstream (``from_options`` builds
    it from ``[delivery]``); keeps up to ``pool_size`` idle connections."""

    def __init__(self, *, clock: IReactorTime, endpoint: IStreamClientEndpoint,
                 name: str, helo: str, lmtp: bool = False, timeout: float = 60.0,
                 final_timeout: float = 600.0, pool_size: int = 4, starttls: bool = False, implicit_tls: bool = False,
                 tls_creator: IOpenSSLClientConnectionCreator | None = None,
                 tls_hostname: str | None = None, xclient: bool = False,
                 trace_header: str = "", auth_param: bool = False,
                 reuse_limit: int = REUSE_LIMIT) -> None:
        if (starttls or implicit_tls) and (tls_creator is None or tls_hostname is None):
            raise ValueError("TLS needs a tls_creator and a tls_hostname")
        self.clock = clock
        self.endpoint = endpoint
        self.name = name
        self.helo = helo
        self.lmtp = lmtp
        self.timeout = timeout              # connect, each command, a stalled DATA
        self.final_timeout = final_timeout  # the reply to the final dot
        self.pool_size = pool_size
        self.starttls = starttls and not implicit_tls
        self.implicit_tls = implicit_tls
        self.tls_creator = tls_creator
        self.tls_hostname = tls_hostname
        self.xclient = xclient
        self.trace_header = trace_header
        self.auth_param = auth_param
        self.reuse_limit = reuse_limit
        self.idle: list[UpstreamConnection] = []
        self.connections_made = 0
        self.outage = UpstreamOutage(name, clock.seconds)

    @classmethod
    def from_options(cls, options: UpstreamDelivery, *, reactor: Any,
                     helo: str) -> "UpstreamClient":
        """The client for ``[delivery]`` (``helo``: our name, ``[server] hostname``)."""
        host = options.host
        hostname = options.tls_hostname or host
        creator = None
        if options.tls or options.starttls:
            assert hostname is not None
            creator = StrictClientTLS(hostname, load_trust_root(options.ca_file))
        endpoint = endpoint_for(options.endpoint, reactor, options.timeout)
        if options.tls:
            assert creator is not None
            endpoint = wrapClientTLS(creator, endpoint)
        return cls(clock=reactor, endpoint=endpoint, name=options.endpoint,
                   helo=options.helo or helo, lmtp=options.lmtp, timeout=options.timeout,
                   final_timeout=options.final_timeout, pool_size=options.pool_size, starttls=options.starttls,
                   implicit_tls=options.tls, tls_creator=creator, tls_hostname=hostname,
                   xclient=options.xclient, trace_header=options.trace_header,
                   auth_param=options.auth_param, reuse_limit=options.reuse_limit)

    def transaction(self, session: RelaySession) -> "UpstreamTransaction":
        """A new transaction for one message of ``session``'s client."""
        return UpstreamTransaction(self, session)

    # ---- connections -------------------------------------------------------------

    async def acquire(self) -> UpstreamConnection:
        """An idle connection that answered RSET, else a new one after its handshake."""
        while self.idle:
            connection = self.idle.pop()
            connection.idle = False
            if connection.closed:
                continue
            try:
                reply = await connection.command(b"RSET", RSET)
            except UpstreamError:
                continue
            if reply.code == 250:
                connection.transactions += 1
                return connection
            connection.fail(UpstreamError(REPLIES["upstream_error"], f"RSET {reply.status()}"))
        connection = await self.connect()
        connection.transactions += 1
        return connection

    async def connect(self) -> UpstreamConnection:
        """A new connection, greeted, (STARTTLS,) EHLO'd; fails with ``UpstreamError``.
        Its failure, or its success after failures, goes to the outage log (``outage``)."""
        try:
            connection = await self._handshake()
        except UpstreamError as e:
            self.outage.down(str(e))
            raise
        self.outage.up()
        return connection

    async def _handshake(self) -> UpstreamConnection:
        connection = UpstreamConnection(clock=self.clock, timeout=self.timeout, name=self.name)
        connection.handshaking = True  # its failures are logged by ``connect``
        connecting = self.endpoint.connect(_OneConnection(connection))
        connecting.addTimeout(self.timeout, self.clock)
        try:
            await connecting
        except (defer.TimeoutError, CancelledError):
            raise UpstreamError(REPLIES["upstream_timeout"],
                                f"no connection within {self.timeout:g}s") from None
        except Exception as e:
            raise UpstreamError(REPLIES["upstream_unavailable"],
                                f"cannot connect: {e.__class__.__name__}") from None
        self.connections_made += 1
        try:
            greeting = await connection.expect(GREETING)
            if greeting.code != 220:  # our client did nothing wrong: always a 451
                raise UpstreamError(REPLIES["upstream_unavailable"] if greeting.code >= 400
                                    else REPLIES["upstream_error"],
                                    f"greeting {greeting.status()}")
            if self.implicit_tls:
                self._verify(connection)
            await self.hello(connection)
            if self.starttls:
                if "STARTTLS" not in connection.capabilities:
                    raise UpstreamError(REPLIES["upstream_unavailable"],
                                        "STARTTLS is configured but not offered")
                reply = await connection.command(b"STARTTLS", STARTTLS)
                if reply.code != 220:
                    raise UpstreamError(REPLIES["upstream_unavailable"],
                                        f"STARTTLS answered {reply.status()}")
                connection.transport.startTLS(self.tls_creator)
                await self.hello(connection)  # queued until the handshake is done
                self._verify(connection)
        except UpstreamError as e:
            connection.fail(e)
            if e.closing:  # a 421 greeting or EHLO: the upstream will not talk now
                raise UpstreamError(REPLIES["upstream_unavailable"], str(e)) from None
            raise
        connection.handshaking = False
        return connection

    def _verify(self, connection: UpstreamConnection) -> None:
        assert self.tls_hostname is not None
        try:
            verify_peer_identity(connection.transport, self.tls_hostname)
        except CertificateIdentityError as e:
            raise UpstreamError(REPLIES["upstream_unavailable"],
                                f"TLS certificate refused: {e}") from None
        connection.tls = True

    async def hello(self, connection: UpstreamConnection, name: str | None = None) -> None:
        """EHLO (LHLO for LMTP) with ``name`` if it is a plain ASCII word, else our own;
        keeps the capabilities."""
        verb = b"LHLO " if self.lmtp else b"EHLO "
        if not name or not _HELO_NAME.match(name):
            name = self.helo
        reply = await connection.command(verb + name.encode("ascii", "replace"),
                                         LHLO if self.lmtp else EHLO)
        if reply.code != 250:  # (an SMTP server asked for LMTP, or the reverse, says 500)
            raise UpstreamError(REPLIES["upstream_unavailable"] if reply.code >= 400 else
                                REPLIES["upstream_error"], f"{verb.decode().strip()} "
                                f"answered {reply.status()}")
        connection.capabilities = parse_capabilities(reply.lines[1:])

    def release(self, connection: UpstreamConnection) -> None:
        """Keep ``connection`` for the next transaction, or say QUIT if the pool is full."""
        connection.downstream = None
        if connection.closed or connection.error is not None:
            return
        if connection.xclient_sent is not None and "XCLIENT" not in connection.capabilities:
            # Postfix offers XCLIENT only to smtpd_authorized_xclient_hosts, and after one
            # the client it sees is ours: the next session could not say who it is
            self._quit(connection)
            return
        if connection.refusals:
            # Postfix counts a connection's errors until it delivers a message, XCLIENT
            # or not: past smtpd_soft_error_limit every reply waits error_sleep_time, at
            # smtpd_hard_error_limit it says 421.  The next client starts from zero.
            self._quit(connection)
            return
        if connection.transactions >= self.reuse_limit:
            # each reuse costs an RSET, which Postfix (and saslsmtp) count as a junk
            # command: past smtpd_junk_command_limit (100) without a delivered message
            # each one is an error, and at smtpd_hard_error_limit the next command,
            # a MAIL, is answered 421
            self._quit(connection)
            return
        if len(self.idle) < self.pool_size:
            connection.on_lost = self._forget
            connection.idle = True
            self.idle.append(connection)
            return
        self._quit(connection)

    def _forget(self, connection: UpstreamConnection) -> None:
        if connection in self.idle:
            self.idle.remove(connection)

    def _quit(self, connection: UpstreamConnection) -> None:
        def close(_: object) -> None:
            if not connection.closed:
                connection.transport.loseConnection()

        connection.quitting = True
        connection.command(b"QUIT", QUIT).addBoth(close)

    def close(self) -> None:
        """Say QUIT on every idle connection (at shutdown)."""
        idle, self.idle = self.idle, []
        for connection in idle:
            connection.on_lost = None
            if not connection.closed:
                self._quit(connection)


def endpoint_for(endpoint: str, reactor: Any, timeout: float) -> IStreamClientEndpoint:
    """``tcp:HOST:PORT`` (IPv6 in brackets) or ``unix:/PATH`` -> a client endpoint."""
    kind, _, rest = endpoint.partition(":")
    if kind == "unix":
        return UNIXClientEndpoint(reactor, rest, timeout=int(timeout))
    host, _, port = rest.rpartition(":")
    host = host.strip("[]")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return HostnameEndpoint(reactor, host, int(port), timeout=timeout)
    if address.version == 6:
        return TCP6ClientEndpoint(reactor, host, int(port), timeout=timeout)
    return TCP4ClientEndpoint(reactor, host, int(port), timeout=timeout)
