"""The ``type = "ldap"`` backend: bind to a directory as the user.

Two clients, one set of options (``LdapOptions``) and one set of verdicts and messages:

* ``client = "twisted"`` (the default): ``ldaptwisted.TwistedDirectory`` and
  ``TwistedLdapChecker``, on the reactor with no thread (``ldapclient`` for a connection,
  ``ldapwire`` for the bytes).  Measured in the daemon against ldap3 (benchmarks/README.md,
  "LDAP: the Twisted-native client"): ldap3 cost about 0.55 ms (DN template) and 1.05 ms
  (search-then-bind) of CPU per login over the users-file floor, mostly pyasn1 encoding,
  thread hand-offs and GIL contention with the reactor; the Twisted client about 0.06 and
  0.1 ms per login on its own (benchmarks/ldap_checker_cpu.py --client twisted).
* ``client = "ldap3"``: ``Directory`` and ``LdapChecker`` below, ldap3 in a bounded thread
  pool; kept for what only ldap3 does.  What follows describes it; the Twisted client
  follows the same rules (its module docstring says where it differs: pools and waiting).

This module also holds what both share: the options and their checks (filters are parsed
at startup by ``ldapwire.compile_filter``), the RFC 4514/4515 escaping, ``Endpoint``,
``Bound``, ``finish_login`` (logging and avatar id) and ``from_config``.

Theory of operation (ldap3 client)
----------------------------------

``LdapChecker`` (the ``ICredentialsChecker``) does the cheap checks on the reactor thread
(the username must be UTF-8 and non-empty, the password non-empty: an empty simple bind is an
*unauthenticated* bind that servers accept) and hands everything else to ``Directory.verify``
in a dedicated bounded runner (``deps.make_runner("ldap-<name>", threads)``).  No ldap3 call
ever runs on the reactor thread or in the reactor's default pool.

``Directory`` (blocking, thread-safe) finds the user's DN, either from the ``user_dn``
template (the username escaped as an RFC 4514 attribute value) or by a search with the
``search_filter`` (the username escaped per RFC 4515) over a kept-open service connection
(``search_dn``/``search_password``, or anonymous); zero or several matches reject.  It then
binds as that DN, checks ``require_filter`` and reads ``identity_attribute`` (one
base-scope search of the user's own entry, on the connection the user just bound).
With ``identity_attribute`` (say ``uid``) the session identity is that attribute's one
value, what the directory calls the user, not what the user typed (a mail address,
another case); without it, the name as typed.

Connections are kept open and reused (``ldappool.IdlePool``, ``pool_size`` idle ones per
server and kind), as Dovecot's ``auth_bind = yes`` does: a login re-binds as the user on
an idle connection (no connect, no unbind), which halves ldap3's CPU per login and spares
the directory a TCP (and TLS) handshake.  User-bind connections and service connections
live in separate pools: the service account's searches never run on a connection a user
bound, or failed to bind, on (a failed bind leaves a connection anonymous, RFC 4511
4.2.1); a user connection is searched only right after a successful bind in the same
login.  The user's password is dropped from the connection object after each bind.  A
pooled connection that breaks (the server restarted or dropped it) is closed with every
idle one of its pool and the login goes on over a new connection; one that times out
marks its server down (next server, or a 454), it is not retried there.

Failures are translated once: invalidCredentials (49) on the *user's* bind, no entry, an
ambiguous search, an unmatched ``require_filter`` and an entry without exactly one
``identity_attribute`` value reject (``UnauthorizedLogin``);
everything else (refused, timed out, busy, unavailable, unwilling, a failed service bind,
a TLS error) is a ``TemporaryFailure`` whose message names the server and the error,
never the password.

Several ``url`` values mean failover, in order: a server that failed at the transport
level (refused, reset, timed out, TLS) or answered busy/unavailable is tried last for
``DOWN_SECONDS``, then first again.  ``timeout`` bounds the TCP connect and every request
(StartTLS and the TLS handshake included) per server.  A broken pooled connection is
replaced within the login, so a restarted server is used again at once, without
restarting saslsmtp.  A login that
waited longer than ``timeout`` for a free runner thread fails at once, so a hung directory
does not build a queue of ever later 454s.

``threads`` defaults to 4: ldap3 is pure Python (with reused connections about 0.3 ms of
CPU per DN-template login and 0.7 ms per search-then-bind login here, mostly pyasn1
building and encoding requests), and on a fast directory more threads only add GIL
contention with the reactor thread (measured on 2 cores, 32 concurrent logins: EHLO p99
17/30/47/92 ms with 2/4/8/16 threads at the same 500-600 logins/s).  A slow or distant
directory may want more.  ``pool_size`` defaults to ``threads``, the most connections of a
kind ever busy at once: a login that finds no idle connection opens one, and only
``pool_size`` are kept.

ldap3's own ``ServerPool`` is not used: it keeps a reference to every ``Connection`` ever
made with it, and when every server is down it sleeps ``POOLING_LOOP_TIMEOUT`` (10 s)
before giving up.  Nor is its ``REUSABLE`` strategy (its own pool of connections and worker
threads): every connection in it is bound as one identity, it cannot re-bind per login,
and its threads would be a second pool beside the bounded runner.  ldap3's asynchronous
strategies still block in their own threads; the runner plus ``IdlePool`` is simpler.
"""

from __future__ import annotations

import contextlib
import re
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator
from urllib.parse import urlsplit

import ldap3
from ldap3.core.exceptions import LDAPException
from ldap3.core.tls import Tls
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from saslsmtp.checkers.ldappool import IdlePool
from saslsmtp.checkers.ldapservers import DOWN_SECONDS, Servers
from saslsmtp.checkers.ldapwire import FilterError, compile_filter
from saslsmtp.checkers.outage import OutageLog
from saslsmtp.credentials import AvatarId
from saslsmtp.errors import TemporaryFailure
from saslsmtp.octets import as_bytes, as_text
from saslsmtp.options import PATH, OptionProblem, Options, ca_file_problem, problem_if
from saslsmtp.redact import url_for_humans
from saslsmtp.threads import BlockingRunner

log = Logger()

INVALID_CREDENTIALS = 49
SIZE_LIMIT_EXCEEDED = 4
# Answers after which another server may do better.
FAILOVER_RESULTS = frozenset({51, 52})  # busy, unavailable

_DN_SPECIALS = frozenset('"+,;<>\\=')
_FILTER_SPECIALS = frozenset("*()\\\x00")
_PLAIN_DN_VALUE = re.compile(r'[^"+,;<>\\=\x00-\x1f\x7f# ][^"+,;<>\\=\x00-\x1f\x7f]*(?<! )\Z')


def escape_dn_value(value: str) -> str:
    """Escape ``value`` as an RFC 4514 attribute value (section 2.4).

    ``"+,;<>\\=`` get a backslash, a leading ``#`` or space and a trailing space too;
    NUL and other control characters become ``\\XX`` hex pairs.  (ldap3's
    ``escape_rdn`` writes a backslash before a raw NUL, which RFC 4514 does not allow,
    and fails on an empty string.)
    """
    if _PLAIN_DN_VALUE.match(value):  # the common case: nothing to escape
        return value
    out = []
    last = len(value) - 1
    for i, ch in enumerate(value):
        if ch in _DN_SPECIALS:
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ch == "\x7f":
            out.append("".join(f"\\{b:02x}" for b in ch.encode("utf-8")))
        elif (i == 0 and ch in "# ") or (i == last and ch == " "):
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def escape_filter_value(value: str) -> str:
    """Escape ``value`` for an RFC 4515 filter assertion value.

    ``*()\\`` and NUL must be ``\\XX`` hex pairs (what ldap3's ``escape_filter_chars``
    does); other control characters get the same treatment here, so a filter never
    carries raw control bytes into logs.  Non-ASCII stays UTF-8, as RFC 4515 allows.
    """
    return "".join(f"\\{ord(ch):02x}" if ch in _FILTER_SPECIALS or ord(ch) < 0x20
                   or ch == "\x7f" else ch for ch in value)


@dataclass(frozen=True)
class Endpoint:
    """One server from ``url``: ``ldap://host[:389]`` or ``ldaps://host[:636]``."""

    host: str
    port: int
    ssl: bool

    @classmethod
    def parse(cls, url: str) -> "Endpoint":
        """Parse an LDAP URL; ``ValueError`` if it is not ``ldap[s]://host[:port][/]``."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        try:
            port = parts.port
        except ValueError:  # not a number, or out of range
            port = -1
        shown = url_for_humans(url)  # the message goes to --check and the log
        if "@" in url:
            raise ValueError(f"not an ldap:// or ldaps:// server URL: {shown!r} (a user name or"
                             " password in the URL is not used: the service account goes in"
                             " search_dn and search_password)")
        if scheme not in ("ldap", "ldaps") or not parts.hostname or parts.path not in ("", "/") \
                or parts.query or parts.fragment or parts.username or port in (-1, 0):
            raise ValueError(f"not an ldap:// or ldaps:// server URL: {shown!r}")
        return cls(parts.hostname, port or (636 if scheme == "ldaps" else 389),
                   scheme == "ldaps")

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'ldaps' if self.ssl else 'ldap'}://{host}:{self.port}"


_ATTRIBUTE = re.compile(r"^[A-Za-z][A-Za-z0-9-]*$")


@dataclass(frozen=True)
class LdapOptions(Options):
    """``[backends.NAME] type = "ldap"``: bind as the user (DN template or search-then-bind)."""

    url: tuple[str, ...] = ()
    user_dn: str | None = None
    search_base: str | None = None
    search_filter: str | None = None
    search_dn: str | None = None
    search_password: str | None = field(default=None, repr=False)  # a secret: not in repr
    require_filter: str | None = None
    identity_attribute: str | None = None  # the session identity: this attribute's value
    start_tls: bool = False
    ca_file: str | None = field(default=None, metadata=PATH)
    verify_hostname: bool = True
    timeout: float = 5.0
    threads: int = 4  # measured: more threads only add GIL contention (module docstring)
    pool_size: int | None = None  # idle connections kept per server and kind; None: threads
    client: str = "twisted"  # "twisted": on the reactor (ldaptwisted.py); "ldap3": threads

    def check(self) -> Iterable[OptionProblem]:
        problems = problem_if(not self.url, "url", "is required")
        for url in self.url:
            try:
                endpoint = Endpoint.parse(url)
            except ValueError as e:
                problems.append(OptionProblem("url", str(e)))
                continue
            if self.start_tls and endpoint.ssl:
                problems.append(OptionProblem(
                    "start_tls", f"cannot be used with {url!r} (ldaps:// is TLS already)"))
        problems += problem_if(bool(self.user_dn) == bool(self.search_base), "",
                               "needs exactly one of user_dn (DN template) or search_base"
                               " (search-then-bind)")
        problems += problem_if(bool(self.user_dn) and "{username}" not in (self.user_dn or ""),
                               "user_dn", "must contain {username}")
        problems += problem_if(bool(self.search_base) and "{username}" not in (
            self.search_filter or ""), "search_filter", "must be set and contain {username}")
        problems += problem_if(self.timeout <= 0, "timeout", "must be positive")
        problems += problem_if(self.threads < 1, "threads", "must be at least 1")
        problems += problem_if(self.pool_size is not None and self.pool_size < 1, "pool_size",
                               "must be at least 1")
        if (self.search_dn is None) != (self.search_password is None):
            problems.append(OptionProblem("search_password" if self.search_dn else "search_dn",
                                          "search_dn and search_password go together"))
        problems += problem_if(self.search_dn is not None and not self.search_base,
                               "search_dn", "is only used with search_base (search-then-bind)")
        problems += ca_file_problem("ca_file", self.ca_file)
        problems += problem_if(self.require_filter is not None and not (
            (self.require_filter or "").startswith("(") and (self.require_filter or "").endswith(
                ")")), "require_filter", "must be an LDAP filter in parentheses")
        problems += problem_if(self.client not in ("twisted", "ldap3"), "client",
                               'must be "twisted" or "ldap3"')
        for key, text, placeholder in (("search_filter", self.search_filter, True),
                                       ("require_filter", self.require_filter, False)):
            if text and text.startswith("(") and text.endswith(")"):
                try:
                    compile_filter(text, placeholder)
                except FilterError as e:
                    problems.append(OptionProblem(key, f"is not an LDAP filter: {e}"))
        problems += problem_if(self.identity_attribute is not None and not _ATTRIBUTE.match(
            self.identity_attribute or ""), "identity_attribute",
            "must be an attribute name (a letter, then letters, digits and -)")
        return problems


class VerifyingTls(Tls):
    """ldap3 ``Tls`` with the standard library's certificate and hostname checks.

    ldap3 turns ``check_hostname`` off and matches names itself with
    ``ssl.match_hostname`` (gone in Python 3.12); this uses ``SSLContext.check_hostname``
    and SNI instead.  The chain is always verified (``ca_file`` or the system store);
    ``verify_hostname = false`` only skips the name check.
    """

    def __init__(self, ca_file: str | None, verify_hostname: bool) -> None:
        super().__init__(validate=ssl.CERT_REQUIRED, ca_certs_file=ca_file)
        self._verify_hostname = verify_hostname

    def wrap_socket(self, connection: Any, do_handshake: bool = False) -> None:
        """Wrap ``connection.socket`` in TLS (the handshake is bounded by the socket timeout)."""
        context = ssl.create_default_context(cafile=self.ca_certs_file)
        context.check_hostname = self._verify_hostname
        context.hostname_checks_common_name = False  # a subjectAltName, as with Twisted
        context.verify_mode = ssl.CERT_REQUIRED
        connection.socket = context.wrap_socket(
            connection.socket, server_side=False, do_handshake_on_connect=do_handshake,
            server_hostname=connection.server.host)


class _Transport(Exception):
    """This server did not answer usefully; another one might (internal)."""


class GarbledAnswer(LDAPException):
    """The server's bytes are not LDAP: ldap3's decoder raised (``KeyError``,
    ``IndexError``...) on them.  A transport failure like any other (454, the next server),
    not a traceback at every login."""


#: What ldap3's BER decoder raises on bytes that are not LDAP (a port that speaks SMTP or
#: HTTP, a broken proxy).
_DECODER_ERRORS = (KeyError, IndexError, ValueError, TypeError, AttributeError)


@contextlib.contextmanager
def _decoding() -> Iterator[None]:
    """Around an ldap3 call that reads an answer: ``GarbledAnswer`` for undecodable bytes."""
    try:
        yield
    except _DECODER_ERRORS as e:
        raise GarbledAnswer(f"the answer is not LDAP ({type(e).__name__} in ldap3's decoder)"
                            ) from None


def _describe(error: BaseException) -> str:
    """A log-safe one-line description of an ldap3/socket error (never holds a password)."""
    text = str(error).strip() or type(error).__name__
    return f"{type(error).__name__}: {text}"[:300]


def _result(conn: Any) -> tuple[int, str]:
    result = conn.result or {}
    return int(result.get("result", -1)), str(result.get("description", "no result"))


def close_quietly(conn: Any) -> None:
    """Unbind and close an ldap3 connection, whatever state it is in."""
    try:
        conn.unbind()
    except Exception:
        pass
    try:
        if not conn.closed:
            conn.strategy.close()
    except Exception:
        pass


class _Stale(Exception):
    """A pooled connection failed before answering (internal): ``timed_out`` says how."""

    def __init__(self, description: str, timed_out: bool) -> None:
        super().__init__(description)
        self.timed_out = timed_out


class Directory:
    """The blocking half: find the DN, bind as the user, check ``require_filter``.

    Thread-safe: a connection is only ever used by the thread that took it from a pool.
    Only ever called from the backend's runner threads.  ``connection_factory`` and
    ``server_factory`` default to ldap3's classes (tests may wrap them to watch calls).

    Each server has two ``IdlePool`` objects of ``pool_size`` connections: one for user binds
    (a login re-binds on an idle one; it is only searched right after a successful bind
    in the same login, for ``require_filter``/``identity_attribute``) and one bound as the
    service account (or anonymous) for ``search_filter``; a user never binds on it.
    """

    def __init__(self, options: LdapOptions, *,
                 clock: Callable[[], float] = time.monotonic,
                 connection_factory: Callable[..., Any] = ldap3.Connection,
                 server_factory: Callable[..., Any] = ldap3.Server) -> None:
        self.options = options
        self.endpoints = tuple(Endpoint.parse(u) for u in options.url)
        if not self.endpoints:
            raise ValueError("ldap backend needs at least one url")
        self._connection_factory = connection_factory
        self._server_factory = server_factory
        uses_tls = options.start_tls or any(e.ssl for e in self.endpoints)
        self._tls = VerifyingTls(options.ca_file, options.verify_hostname) if uses_tls else None
        self._servers = Servers(self.endpoints, clock, threading.Lock())
        size = max(1, options.threads if options.pool_size is None else options.pool_size)
        self._user_pools = {e: IdlePool(size, close_quietly, clock=clock)
                            for e in self.endpoints}
        self._service_pools = {e: IdlePool(size, close_quietly, clock=clock)
                               for e in self.endpoints}

    # ---- the one public operation ----------------------------------------

    def verify(self, username: str, password: bytes) -> "Bound":
        """The user's entry if ``password`` binds as it; raise ``UnauthorizedLogin``
        (wrong credentials) or ``TemporaryFailure`` (anything else)."""
        if not password:  # an empty simple bind is an anonymous bind: never send it
            raise UnauthorizedLogin("empty password")
        if self.options.user_dn:
            dn = self.options.user_dn.replace("{username}", escape_dn_value(username))
        else:
            dn = self._search_dn(username)
        conn, endpoint = self._bind_user(dn, password)
        keep = False
        try:
            identity = None
            if self.options.require_filter or self.options.identity_attribute:
                try:
                    identity = self._read_own_entry(conn, endpoint, dn)
                except UnauthorizedLogin:
                    keep = True  # a verdict: the connection is fine
                    raise
            keep = True
        finally:
            if keep:
                self._user_pools[endpoint].give(conn)
            else:
                close_quietly(conn)
        return Bound(dn, identity)

    def close(self) -> None:
        """Close the idle connections, and any given back later (at shutdown)."""
        for pool in (*self._user_pools.values(), *self._service_pools.values()):
            pool.shut()

    # ---- servers and connections -----------------------------------------

    def _bind_user(self, dn: str, password: bytes) -> tuple[Any, Endpoint]:
        """A connection bound as ``dn``: a re-bind on an idle pooled connection, else a new
        connection; failing over between servers.  A wrong password raises
        ``UnauthorizedLogin`` and gives the (now anonymous) connection back to the pool."""
        walk = self._servers.walk()
        for endpoint in walk:
            pool = self._user_pools[endpoint]
            conn = pool.take()
            if conn is not None:
                try:
                    self._bind_pooled(conn, endpoint, dn, password)
                    return conn, endpoint
                except _Stale as e:
                    pool.clear()  # the others are probably stale too
                    if e.timed_out:  # hung, not restarted: the next server, not a new connection
                        walk.failed(endpoint, e)
                        continue
                except _Transport as e:  # busy or unavailable: the next server
                    walk.failed(endpoint, e)
                    continue
            try:
                conn = self._connect(endpoint, dn, password, user=True)
            except _Transport as e:
                walk.failed(endpoint, e)
                continue
            except UnauthorizedLogin:
                self._servers.mark(endpoint, up=True)  # a verdict (_connect pooled the connection)
                raise
            self._servers.mark(endpoint, up=True)
            return conn, endpoint
        raise walk.exhausted()

    def _bind_pooled(self, conn: Any, endpoint: Endpoint, dn: str, password: bytes) -> None:
        """Re-bind an idle user connection as ``dn``; ``_Stale`` if it broke on the way
        (the caller tries a new connection), the bind's verdict otherwise."""
        try:
            self._bind(conn, endpoint, dn, password, user=True)
        except (LDAPException, OSError) as e:
            close_quietly(conn)
            raise _Stale(_describe(e), isinstance(e, TimeoutError)) from None
        except UnauthorizedLogin:
            self._user_pools[endpoint].give(conn)
            raise
        except BaseException:
            close_quietly(conn)
            raise

    def _connect(self, endpoint: Endpoint, dn: str | None, password: bytes | None,
                 user: bool) -> Any:
        """Connect, StartTLS if configured, bind; raise ``_Transport`` to try the next one."""
        timeout = self.options.timeout
        server = self._server_factory(
            endpoint.host, port=endpoint.port, use_ssl=endpoint.ssl, tls=self._tls,
            get_info=ldap3.NONE, connect_timeout=timeout)
        conn = self._connection_factory(
            server, authentication=ldap3.ANONYMOUS,
            client_strategy=ldap3.SYNC, auto_bind=ldap3.AUTO_BIND_NONE, read_only=True,
            receive_timeout=None, raise_exceptions=False, auto_referrals=False)
        try:
            # ldap3 packs receive_timeout with struct 'LL', so a float one fails.  Without
            # it the socket keeps connect_timeout (socket.settimeout) for every later recv
            # and send, TLS handshakes included: one bound for every step.
            conn.open(read_server_info=False)
            if self.options.start_tls and not endpoint.ssl:
                with _decoding():
                    conn.start_tls(read_server_info=False)
            if dn is not None:
                assert password is not None
                self._bind(conn, endpoint, dn, password, user)
        except (LDAPException, OSError) as e:
            close_quietly(conn)
            raise _Transport(_describe(e)) from None
        except UnauthorizedLogin:
            if user:  # anonymous now, and fine for the next user's bind
                self._user_pools[endpoint].give(conn)
            else:
                close_quietly(conn)
            raise
        except BaseException:
            close_quietly(conn)
            raise
        return conn

    def _bind(self, conn: Any, endpoint: Endpoint, dn: str, password: bytes,
              user: bool) -> None:
        """One simple bind as ``dn`` on the open ``conn``; raise on anything but success.

        The password is dropped from the connection object right after the bind (ldap3
        keeps it in ``password`` and, decoded, in ``request``): a pooled connection does not
        carry the last user's password around."""
        if conn.closed:  # ldap3's bind() would silently reconnect, without StartTLS
            raise OSError("connection closed by the server")
        conn.user, conn.password, conn.authentication = dn, password, ldap3.SIMPLE
        try:
            with _decoding():
                bound = conn.bind(read_server_info=False)
        finally:
            conn.password = conn.request = None
        if bound:
            return
        code, description = _result(conn)
        if code == INVALID_CREDENTIALS and user:
            raise UnauthorizedLogin("invalid credentials")
        if code == INVALID_CREDENTIALS:
            raise TemporaryFailure(f"{endpoint}: service account bind as {dn!r} refused "
                                   "(invalidCredentials): check search_dn and search_password")
        if code in FAILOVER_RESULTS:
            raise _Transport(f"bind answered {code} {description}")
        if code == -1 and conn.closed:  # no answer: the connection broke under the bind
            raise OSError(conn.last_error or "connection closed during the bind")
        raise TemporaryFailure(f"{endpoint}: bind answered {code} {description}")

    # ---- search-then-bind -------------------------------------------------

    def _service_connection(self) -> tuple[Any, Endpoint, bool]:
        """An idle service connection (reused=True) or a new one, failing over."""
        search_password = (None if self.options.search_password is None
                           else as_bytes(self.options.search_password))
        walk = self._servers.walk()
        for endpoint in walk:
            conn = self._service_pools[endpoint].take()
            if conn is not None:
                return conn, endpoint, True
            try:
                conn = self._connect(endpoint, self.options.search_dn, search_password,
                                     user=False)
            except _Transport as e:
                walk.failed(endpoint, e)
                continue
            self._servers.mark(endpoint, up=True)
            return conn, endpoint, False
        raise walk.exhausted()

    def _search_dn(self, username: str) -> str:
        """The one DN that ``search_filter`` finds for ``username``; reject 0 or >1."""
        assert self.options.search_base and self.options.search_filter
        query = self.options.search_filter.replace("{username}", escape_filter_value(username))
        for attempt in (1, 2):
            conn, endpoint, reused = self._service_connection()
            pool = self._service_pools[endpoint]
            try:
                with _decoding():
                    conn.search(self.options.search_base, query, search_scope=ldap3.SUBTREE,
                                attributes=[ldap3.NO_ATTRIBUTES], size_limit=2,
                                dereference_aliases=ldap3.DEREF_NEVER)
            except (LDAPException, OSError) as e:
                close_quietly(conn)
                pool.clear()
                timed_out = isinstance(e, TimeoutError)
                if timed_out:
                    self._servers.mark(endpoint, up=False)
                if attempt == 1 and reused and (not timed_out or self._servers.any_up(endpoint)):
                    continue  # stale connection (server restarted): once more, on a fresh one
                raise TemporaryFailure(f"{endpoint}: search failed: {_describe(e)}") from None
            code, description = _result(conn)
            entries = [r["dn"] for r in conn.response or ()
                       if r.get("type") == "searchResEntry"]
            if code not in (0, SIZE_LIMIT_EXCEEDED):
                close_quietly(conn)
                if code in FAILOVER_RESULTS:
                    self._servers.mark(endpoint, up=False)
                raise TemporaryFailure(f"{endpoint}: search answered {code} {description}")
            pool.give(conn)
            if code == SIZE_LIMIT_EXCEEDED or len(entries) > 1:
                raise UnauthorizedLogin("search_filter matches more than one entry")
            if not entries:
                raise UnauthorizedLogin("no entry matches search_filter")
            return entries[0]
        raise AssertionError("unreachable")  # pragma: no cover

    # ---- require_filter ---------------------------------------------------

    def _read_own_entry(self, conn: Any, endpoint: Endpoint, dn: str) -> str | None:
        """On the user's own connection, one base-scope search of the user's entry: reject
        unless it matches ``require_filter``; return the ``identity_attribute`` value.

        The identity must be exactly one non-empty value: an entry without one (or with
        several) cannot say who the user is, so the login is rejected (and logged)."""
        attribute = self.options.identity_attribute
        try:
            with _decoding():
                conn.search(dn, self.options.require_filter or "(objectClass=*)",
                            search_scope=ldap3.BASE,
                            attributes=[attribute or ldap3.NO_ATTRIBUTES],
                            dereference_aliases=ldap3.DEREF_NEVER)
        except (LDAPException, OSError) as e:
            raise TemporaryFailure(f"{endpoint}: search of the user's entry failed: "
                                   f"{_describe(e)}") from None
        code, description = _result(conn)
        if code != 0:
            raise TemporaryFailure(
                f"{endpoint}: search of the user's entry {dn!r} answered {code} {description}")
        entries = [r for r in conn.response or () if r.get("type") == "searchResEntry"]
        if not entries:
            raise UnauthorizedLogin("entry does not match require_filter")
        if attribute is None:
            return None
        values = [v for k, v in (entries[0].get("attributes") or {}).items()
                  if k.lower() == attribute.lower()]
        found = values[0] if values else []
        found = [found] if isinstance(found, str) else list(found)
        if len(found) != 1 or not isinstance(found[0], str) or not found[0]:
            log.warn("ldap {dn!r}: identity_attribute {attribute} has {count} values, not one:"
                     " login refused", dn=dn, attribute=attribute, count=len(found))
            raise UnauthorizedLogin(f"entry has no single {attribute} value")
        return found[0]


@dataclass(frozen=True)
class Bound:
    """A successful bind: the user's ``dn`` and, with ``identity_attribute``, the
    ``identity`` the directory gives the user (``None`` otherwise)."""

    dn: str
    identity: str | None = None


def finish_login(d: "Deferred[Bound]", name: str, username: str,
                 raw_username: bytes, log_bound: bool = True) -> "Deferred[AvatarId]":
    """Log a login's verdict (never the password) and give the avatar id: the typed name,
    or the ``identity_attribute`` value; anything unexpected becomes a logged 454.
    ``log_bound = False`` skips the debug line per accepted login (the Twisted client:
    emitting it costs about a tenth of that client's CPU per login, debug level or not)."""

    def accepted(bound: Bound) -> bytes:
        if log_bound:
            log.debug("ldap backend {name}: {username!r} bound as {dn!r} (identity "
                      "{identity!r})", name=name, username=username, dn=bound.dn,
                      identity=bound.identity)
        return raw_username if bound.identity is None else as_bytes(bound.identity)

    def failed(reason: Failure) -> Failure:
        if reason.check(UnauthorizedLogin):
            log.info("ldap backend {name}: {username!r} rejected: {why}",
                     name=name, username=username, why=str(reason.value))
            return reason
        if reason.check(TemporaryFailure):
            return reason
        # Our bug, or a client error that escaped: temporary, logged without locals.
        log.failure("ldap backend {name}: unexpected error", reason, name=name)
        return Failure(TemporaryFailure(f"ldap backend {name}: unexpected "
                                        f"{type(reason.value).__name__}"))

    return d.addCallbacks(accepted, failed)


def screened(name: str, credentials: Any) -> tuple[bytes, str, bytes]:
    """(the username as sent, as text, the password) of a login worth a bind, or
    ``UnauthorizedLogin``: the username must be UTF-8 and non-empty, the password
    non-empty (an empty simple bind is an *unauthenticated* bind that servers accept).
    The same for both clients, on the reactor thread."""
    raw_username = as_bytes(credentials.username)
    password = as_bytes(credentials.password)
    try:
        username = as_text(raw_username)
    except UnicodeDecodeError:
        raise UnauthorizedLogin("username is not UTF-8") from None
    if not username:
        raise UnauthorizedLogin("empty username")
    if not password:
        log.info("ldap backend {name}: {username!r} rejected: empty password (no bind sent)",
                 name=name, username=username)
        raise UnauthorizedLogin("empty password")
    return raw_username, username, password


@implementer(ICredentialsChecker)
class LdapChecker:
    """``ICredentialsChecker`` for ``IUsernamePassword``: an LDAP bind as the user.

    ``directory.verify`` runs in ``runner`` (the backend's own bounded pool); this object
    only does the cheap checks and the logging, on the reactor thread.  A login that waited
    longer than ``timeout`` for a free thread fails at once (454) instead of starting: with
    a hung directory every login is answered within about twice ``timeout``.  ``stop()`` closes
    the idle connections and stops the runner: the service that owns the checker
    calls it at shutdown (it waits for in-flight LDAP calls, each bounded by ``timeout``).
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, name: str, directory: Directory, runner: BlockingRunner, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.directory = directory
        self.runner = runner
        self._clock = clock
        self.outages = OutageLog(name, clock)

    def requestAvatarId(self, credentials: Any) -> "Deferred[AvatarId]":
        """Fire with the username bytes, or fail with UnauthorizedLogin / TemporaryFailure."""
        try:
            raw_username, username, password = screened(self.name, credentials)
        except UnauthorizedLogin as e:
            return fail(e)
        d = self.runner.run(self._verify, username, password, self._clock())
        return self.outages.watch(finish_login(d, self.name, username, raw_username))

    def _verify(self, username: str, password: bytes, queued_at: float) -> Bound:
        """In a runner thread: give up at once if the login waited longer than ``timeout``
        for a free thread (a hung directory must not build a queue of minute-long 454s)."""
        waited = self._clock() - queued_at
        if waited > self.directory.options.timeout:
            raise TemporaryFailure(f"waited {waited:.1f} s for a free LDAP thread (timeout "
                                   f"{self.directory.options.timeout} s): directory slow or "
                                   "threads too few")
        return self.directory.verify(username, password)

    def stop(self) -> None:
        """Stop the runner (waits for in-flight calls) and close idle connections."""
        stop = getattr(self.runner, "stop", None)
        if stop is not None:
            stop()
        self.directory.close()

    def __repr__(self) -> str:
        return f"<LdapChecker {self.name} {', '.join(map(str, self.directory.endpoints))}>"


def from_config(name: str, options: LdapOptions, deps: Any) -> Any:
    """Build the checker for ``[backends.<name>]``: the Twisted-native client on
    ``deps.reactor`` (``client = "twisted"``), or ldap3 in its own runner ``ldap-<name>``."""
    if options.client == "twisted":
        from saslsmtp.checkers.ldaptwisted import TwistedDirectory, TwistedLdapChecker
        return TwistedLdapChecker(name, TwistedDirectory(options, deps.reactor))
    runner = deps.make_runner(f"ldap-{name}", max(1, options.threads))
    return LdapChecker(name, Directory(options), runner)
