"""The ``ldap`` backend's Twisted-native client (``client = "twisted"``, the default).

The same logins as the ldap3 client (saslsmtp/checkers/ldap.py: DN template or
search-then-bind, ``require_filter``, ``identity_attribute``, failover, ``timeout``, TLS, the
same verdicts and messages), with no thread: requests are written on the reactor
(``ldapclient.LdapProtocol``) over kept-open connections and answered by message ID.

Why: ldap3 costs about 0.55 ms of CPU per DN-template login and 1.05 ms per
search-then-bind login in the daemon (pyasn1 encoding, thread hand-offs, GIL contention
with the reactor); this client encodes the few requests itself (``ldapwire``) and costs a
few tens of microseconds (benchmarks/README.md, "LDAP: the Twisted-native client").

Connections, per server:

* user connections: ``ldappool.ConnectionPool`` of ``pool_size`` (default 16,
  ``DEFAULT_POOL_SIZE``).
  A login re-binds on one (Dovecot's ``auth_bind = yes``); only one bind is ever in flight
  on a connection (a bind changes the connection's identity, RFC 4511 4.2.1), so at most
  ``pool_size`` binds run at once per server and further logins wait their turn (a login
  that waited longer than ``timeout`` fails at once).  A user connection is searched only
  right after a successful bind in the same login (``require_filter``,
  ``identity_attribute``).
* one service connection, bound as ``search_dn`` (or anonymous) once: every
  ``search_filter`` search is pipelined on it, whatever the number of logins.  A user never
  binds on it.  Unused for ``MAX_IDLE_SECONDS`` (60), it is closed and a new one opened
  (servers and firewalls drop idle connections, sometimes without a word), as user
  connections are.

A pooled connection that broke (server restarted) is dropped and the login goes on over a
new one; one that timed out is aborted and its server marked down for ``DOWN_SECONDS``
(tried last), as with ldap3.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, ensureDeferred, fail
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.ssl import CertificateOptions
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from saslsmtp.checkers import ldapwire
from saslsmtp.checkers.ldap import (FAILOVER_RESULTS, INVALID_CREDENTIALS, SIZE_LIMIT_EXCEEDED,
                                    Bound, Endpoint, LdapOptions, escape_dn_value,
                                    finish_login, screened)
from saslsmtp.checkers.ldapclient import LdapError, LdapProtocol, connect, describe_failure
from saslsmtp.checkers.ldappool import MAX_IDLE_SECONDS, ConnectionPool, PoolWaitTooLong
from saslsmtp.checkers.ldapservers import Servers
from saslsmtp.checkers.outage import OutageLog
from saslsmtp.checkers.tlsclient import StrictClientTLS, load_trust_root
from saslsmtp.credentials import AvatarId
from saslsmtp.errors import TemporaryFailure
from saslsmtp.octets import as_bytes

log = Logger()



#: User connections per server when ``pool_size`` is not set.  Measured against slapd at
#: 16 concurrent logins (benchmarks/ldap_peers.py, DN template, one run each): pool 1, 2,
#: 4, 8, 16 gave 0.92, 1.11, 1.18, 1.22, 1.22x Dovecot's logins/s and 0.152, 0.145, 0.118,
#: 0.116, 0.089 ms of slapd CPU per login: a login that waits for a connection costs the
#: directory more (one operation per wake-up) and the client a turn; an idle connection
#: costs slapd only a descriptor.
DEFAULT_POOL_SIZE = 16

class _Transport(Exception):
    """This server did not answer usefully; another one might (internal)."""


def tls_options(options: LdapOptions, host: str) -> Any:
    """Twisted client TLS options: the chain checked against ``ca_file`` (or the system
    store), the name against ``host``'s subjectAltName unless ``verify_hostname = false``.

    ``StrictClientTLS``, not Twisted's ``optionsForClientTLS``: that one logs a critical
    traceback for a certificate without subjectAltName at every connection, and the
    login then only sees "connection closed".  Here the handshake fails with the reason,
    which the unreachable message names (so nothing is logged per connection)."""
    trust = load_trust_root(options.ca_file)
    if options.verify_hostname:
        return StrictClientTLS(host, trust, warn=False)
    return CertificateOptions(trustRoot=trust, raiseMinimumTo=None)


def _close(conn: LdapProtocol) -> None:
    conn.unbind_and_close()


class TwistedDirectory:
    """Finds the DN, binds as the user, checks ``require_filter``: all on the reactor.

    ``verify(username, password)`` returns a coroutine answering ``Bound`` or raising
    ``UnauthorizedLogin``/``TemporaryFailure``.  ``endpoint_factory(endpoint)`` gives the
    ``IStreamClientEndpoint`` for a server (tests inject in-memory ones); by default a
    ``HostnameEndpoint`` (TLS-wrapped for ``ldaps://``).
    """

    def __init__(self, options: LdapOptions, reactor: Any, *,
                 endpoint_factory: Callable[[Endpoint], IStreamClientEndpoint] | None = None,
                 clock: IReactorTime | None = None) -> None:
        self.options = options
        self.endpoints = tuple(Endpoint.parse(u) for u in options.url)
        if not self.endpoints:
            raise ValueError("ldap backend needs at least one url")
        self._reactor = reactor
        self._clock: IReactorTime = clock or reactor
        self._endpoint_factory = endpoint_factory or self._default_endpoint
        seconds = self._clock.seconds
        self._servers = Servers(self.endpoints, seconds)
        size = DEFAULT_POOL_SIZE if options.pool_size is None else max(1, options.pool_size)
        self._user_pools = {e: ConnectionPool(size, partial(self._connect, e), _close,
                                              clock=seconds, max_wait=options.timeout)
                            for e in self.endpoints}
        self._service: dict[Endpoint, LdapProtocol] = {}
        self._service_used: dict[Endpoint, float] = {}  # when each last sent a search
        self._service_waiting: dict[Endpoint, list[Deferred[Any]]] = {}
        self._start_tls = {e: tls_options(options, e.host)
                           for e in self.endpoints if options.start_tls and not e.ssl}
        self._template = options.user_dn
        if options.search_base:
            assert options.search_filter
            self._search_filter = ldapwire.compile_filter(options.search_filter, True)
            self._search_base = options.search_base.encode("utf-8")
            self._find = ldapwire.SearchShape.of(ldapwire.SCOPE_SUBTREE, 2,
                                                 (ldapwire.NO_ATTRIBUTES,))
        self._own_filter = ldapwire.compile_filter(options.require_filter or "(objectClass=*)")
        self._own = ldapwire.SearchShape.of(
            ldapwire.SCOPE_BASE, 0, (options.identity_attribute or ldapwire.NO_ATTRIBUTES,))
        self._closed = False

    def _default_endpoint(self, endpoint: Endpoint) -> IStreamClientEndpoint:
        tcp = HostnameEndpoint(self._reactor, endpoint.host, endpoint.port,
                               timeout=self.options.timeout)
        if endpoint.ssl:
            return wrapClientTLS(tls_options(self.options, endpoint.host), tcp)
        return tcp

    def _connect(self, endpoint: Endpoint) -> "Deferred[LdapProtocol]":
        """A new connection (StartTLS done if configured); ``_Transport`` on failure."""
        def failed(reason: Failure) -> Failure:
            return Failure(_Transport(describe_failure(reason)))
        d = connect(self._endpoint_factory(endpoint), self._clock, self.options.timeout,
                    self._start_tls.get(endpoint))
        return d.addErrback(failed)

    # ---- the one public operation ----------------------------------------

    async def verify(self, username: str, password: bytes) -> Bound:
        """The user's entry if ``password`` binds as it; raise ``UnauthorizedLogin``
        (wrong credentials) or ``TemporaryFailure`` (anything else)."""
        if not password:  # an empty simple bind is an anonymous bind: never send it
            raise UnauthorizedLogin("empty password")
        if self._template:
            dn = self._template.replace("{username}", escape_dn_value(username))
        else:
            dn = await self._search_dn(username)
        conn, endpoint = await self._bind_user(dn, password)
        pool = self._user_pools[endpoint]
        if not (self.options.require_filter or self.options.identity_attribute):
            pool.release(conn)
            return Bound(dn, None)
        keep = False
        try:
            try:
                identity = await self._read_own_entry(conn, endpoint, dn)
            except UnauthorizedLogin:
                keep = True  # a verdict: the connection is fine
                raise
            keep = True
        finally:
            if keep:
                pool.release(conn)
            else:
                pool.discard(conn)
        return Bound(dn, identity)

    def close(self) -> None:
        """Close the idle connections, and any given back later (at shutdown)."""
        self._closed = True
        for pool in self._user_pools.values():
            pool.shut()
        service, self._service = self._service, {}
        for conn in service.values():
            conn.unbind_and_close()

    # ---- binding as the user ------------------------------------------------

    async def _bind_user(self, dn: str, password: bytes) -> tuple[LdapProtocol, Endpoint]:
        """A connection bound as ``dn`` (lent from its server's pool), failing over.  A
        wrong password raises ``UnauthorizedLogin`` and gives the (now anonymous)
        connection back to the pool."""
        raw_dn = dn.encode("utf-8")
        walk = self._servers.walk()
        for endpoint in walk:
            pool = self._user_pools[endpoint]
            for attempt in (1, 2):
                try:
                    conn, reused = await pool.acquire()
                except _Transport as e:
                    walk.failed(endpoint, e)
                    break
                except PoolWaitTooLong as e:
                    raise TemporaryFailure(f"{endpoint}: {e}: directory slow or pool_size "
                                           "too small") from None
                try:
                    result = await conn.bind(raw_dn, password)
                except LdapError as e:
                    pool.discard(conn)
                    if reused and not e.timed_out and attempt == 1:
                        pool.clear()  # the others are probably stale too: a new one
                        continue
                    walk.failed(endpoint, e)
                    break
                code = result.code
                if code == 0:
                    self._servers.mark(endpoint, up=True)
                    return conn, endpoint
                if code == INVALID_CREDENTIALS:
                    self._servers.mark(endpoint, up=True)
                    pool.release(conn)
                    raise UnauthorizedLogin("invalid credentials")
                pool.discard(conn)
                if code in FAILOVER_RESULTS:
                    walk.failed(endpoint, f"bind answered {code} {result.description}")
                    break
                raise TemporaryFailure(f"{endpoint}: bind answered {code} {result.description}")
        raise walk.exhausted()

    # ---- search-then-bind -------------------------------------------------

    async def _service_connection(self) -> tuple[LdapProtocol, Endpoint, bool]:
        """The shared service connection (reused=True) or a new one, failing over."""
        now = self._clock.seconds()
        walk = self._servers.walk()
        for endpoint in walk:
            conn = self._service.get(endpoint)
            if conn is not None and not conn.closed:
                if now - self._service_used[endpoint] <= MAX_IDLE_SECONDS:
                    self._service_used[endpoint] = now
                    return conn, endpoint, True
                del self._service[endpoint]  # idle too long: servers drop such ones silently
                conn.unbind_and_close()
            try:
                conn = await self._shared_service(endpoint)
            except _Transport as e:
                walk.failed(endpoint, e)
                continue
            self._servers.mark(endpoint, up=True)
            return conn, endpoint, False
        raise walk.exhausted()

    def _shared_service(self, endpoint: Endpoint) -> "Deferred[LdapProtocol]":
        """Connect and bind the service connection once, however many logins wait for it."""
        waiting = self._service_waiting.get(endpoint)
        d: Deferred[LdapProtocol] = Deferred()
        if waiting is not None:
            waiting.append(d)
            return d
        waiting = self._service_waiting[endpoint] = [d]

        def done(result: Any) -> None:
            del self._service_waiting[endpoint]
            if isinstance(result, LdapProtocol):
                if self._closed:
                    result.unbind_and_close()
                else:
                    self._service[endpoint] = result
                    self._service_used[endpoint] = self._clock.seconds()
            for w in waiting:
                if isinstance(result, LdapProtocol):
                    w.callback(result)
                else:
                    w.errback(result)
        ensureDeferred(self._open_service(endpoint)).addBoth(done)
        return d

    async def _open_service(self, endpoint: Endpoint) -> LdapProtocol:
        conn = await self._connect(endpoint)
        if self.options.search_dn is None:
            return conn
        assert self.options.search_password is not None
        try:
            result = await conn.bind(self.options.search_dn.encode("utf-8"),
                                     as_bytes(self.options.search_password))
        except LdapError as e:
            conn.abort()
            raise _Transport(str(e)) from None
        if result.code == 0:
            return conn
        conn.unbind_and_close()
        if result.code == INVALID_CREDENTIALS:
            raise TemporaryFailure(
                f"{endpoint}: service account bind as {self.options.search_dn!r} refused "
                "(invalidCredentials): check search_dn and search_password")
        if result.code in FAILOVER_RESULTS:
            raise _Transport(f"bind answered {result.code} {result.description}")
        raise TemporaryFailure(f"{endpoint}: bind answered {result.code} {result.description}")

    def _drop_service(self, endpoint: Endpoint, conn: LdapProtocol) -> None:
        if self._service.get(endpoint) is conn:
            del self._service[endpoint]
        conn.abort()

    async def _search_dn(self, username: str) -> str:
        """The one DN that ``search_filter`` finds for ``username``; reject 0 or >1."""
        request = self._find.request(self._search_base,
                                     self._search_filter.encode(username.encode("utf-8")))
        for attempt in (1, 2):
            conn, endpoint, reused = await self._service_connection()
            try:
                result, entries = await conn.search(request)
            except LdapError as e:
                self._drop_service(endpoint, conn)
                if e.timed_out:
                    self._servers.mark(endpoint, up=False)
                if attempt == 1 and reused and (not e.timed_out or self._servers.any_up(endpoint)):
                    continue  # stale connection (server restarted): once more, on a fresh one
                raise TemporaryFailure(f"{endpoint}: search failed: {e}") from None
            code = result.code
            if code not in (0, SIZE_LIMIT_EXCEEDED):
                self._drop_service(endpoint, conn)
                if code in FAILOVER_RESULTS:
                    self._servers.mark(endpoint, up=False)
                raise TemporaryFailure(f"{endpoint}: search answered {code} "
                                       f"{result.description}")
            if code == SIZE_LIMIT_EXCEEDED or len(entries) > 1:
                raise UnauthorizedLogin("search_filter matches more than one entry")
            if not entries:
                raise UnauthorizedLogin("no entry matches search_filter")
            return entries[0].dn
        raise AssertionError("unreachable")  # pragma: no cover

    # ---- require_filter ---------------------------------------------------

    async def _read_own_entry(self, conn: LdapProtocol, endpoint: Endpoint,
                              dn: str) -> str | None:
        """On the user's own connection, one base-scope search of the user's entry: reject
        unless it matches ``require_filter``; return the ``identity_attribute`` value."""
        attribute = self.options.identity_attribute
        try:
            result, entries = await conn.search(
                self._own.request(dn.encode("utf-8"), self._own_filter.encode()))
        except LdapError as e:
            raise TemporaryFailure(f"{endpoint}: search of the user's entry failed: "
                                   f"{e}") from None
        if result.code != 0:
            raise TemporaryFailure(f"{endpoint}: search of the user's entry {dn!r} answered "
                                   f"{result.code} {result.description}")
        if not entries:
            raise UnauthorizedLogin("entry does not match require_filter")
        if attribute is None:
            return None
        found = [v for k, vs in entries[0].attributes.items()
                 if k.lower() == attribute.lower() for v in vs]
        try:
            values = [v.decode("utf-8") for v in found]
        except UnicodeDecodeError:
            values = []
        if len(values) != 1 or not values[0]:
            log.warn("ldap {dn!r}: identity_attribute {attribute} has {count} values, not one:"
                     " login refused", dn=dn, attribute=attribute, count=len(found))
            raise UnauthorizedLogin(f"entry has no single {attribute} value")
        return values[0]


@implementer(ICredentialsChecker)
class TwistedLdapChecker:
    """``ICredentialsChecker`` for ``IUsernamePassword`` with the Twisted-native client.

    The cheap checks and the logging are ``LdapChecker``'s (``finish_login``); the
    directory work is ``TwistedDirectory.verify``, on the reactor.  ``stop()`` closes the
    connections (the service that owns the checker calls it at shutdown).
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, name: str, directory: TwistedDirectory) -> None:
        self.name = name
        self.directory = directory
        self.outages = OutageLog(name, directory._clock.seconds)

    def requestAvatarId(self, credentials: Any) -> "Deferred[AvatarId]":
        """Fire with the username bytes, or fail with UnauthorizedLogin / TemporaryFailure."""
        try:
            raw_username, username, password = screened(self.name, credentials)
        except UnauthorizedLogin as e:
            return fail(e)
        d = ensureDeferred(self.directory.verify(username, password))
        return self.outages.watch(finish_login(d, self.name, username, raw_username,
                                               log_bound=False))

    def stop(self) -> None:
        """Close the connections."""
        self.directory.close()

    def __repr__(self) -> str:
        return f"<LdapChecker {self.name} {', '.join(map(str, self.directory.endpoints))}>"

