"""``type = "http"``: ask an HTTP API whether a username and password are right.

One check = one ``POST`` of JSON ``{"username", "password", "mechanism", "remote_ip"}``
(``mechanism`` and ``remote_ip`` come from the SMTP session; ``null`` when unknown) to
``url``, with the configured extra ``headers`` (e.g. an API token).

Verdicts: ``2xx`` -> the username; ``401`` / ``403`` -> ``UnauthorizedLogin``; any other
status (redirects are not followed: the password goes nowhere else), a connection or TLS
error, or no complete answer within ``timeout`` (request and body) ->
``TemporaryFailure``.

Connections are kept alive in a small pool.  A POST that fails before any answer arrives
(``RequestTransmissionFailed`` / ``ResponseNeverReceived``: typically a kept-alive
connection the server had just closed) is sent once more on a fresh connection, within
the same deadline; Twisted never retries a POST by itself.  The API may therefore see a
request twice when the server dies mid-request.

HTTPS uses ``StrictHTTPSPolicy``: the chain checked against ``ca_file`` (or the system
trust store) and the host name against the certificate's subjectAltName, failing closed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping
from urllib.parse import urlsplit

import treq
from hyperlink import DecodedURL
from OpenSSL import SSL
from treq.client import HTTPClient
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (Agent, HTTPConnectionPool, RequestTransmissionFailed,
                                ResponseNeverReceived, _HTTP11ClientFactory)
from twisted.web.http_headers import Headers
from zope.interface import implementer

from saslsmtp.checkers.outage import OutageLog
from saslsmtp.checkers.tlsclient import (CertificateIdentityError, StrictHTTPSPolicy,
                                         load_trust_root)
from saslsmtp.credentials import AvatarId
from saslsmtp.deadline import DeadlineExceeded, with_deadline
from saslsmtp.errors import TemporaryFailure
from saslsmtp.octets import as_bytes, as_text
from saslsmtp.options import (PATH, OptionProblem, Options, ca_file_problem, http_url_problem,
                              problem_if)
from saslsmtp.redact import url_for_humans

log = Logger()

USER_AGENT = "saslsmtp"
REJECT_STATUSES = frozenset({401, 403})
_STALE = (RequestTransmissionFailed, ResponseNeverReceived)


@dataclass(frozen=True)
class HttpOptions(Options):
    """``[backends.NAME] type = "http"``: POST JSON to an API."""

    url: str = ""
    timeout: float = 5.0
    headers: Mapping[str, str] = field(default_factory=dict)
    ca_file: str | None = field(default=None, metadata=PATH)

    def check(self) -> Iterable[OptionProblem]:
        problems = problem_if(not self.url, "url", "is required") or http_url_problem(
            "url", self.url) or url_problem("url", self.url)
        for key, value in self.headers.items():
            try:
                key.encode("latin-1"), value.encode("latin-1")
            except UnicodeEncodeError:
                problems.append(OptionProblem("headers", f"{key!r}: not Latin-1 text"))
            if any(c in key + value for c in "\r\n\0") or not key:
                problems.append(OptionProblem("headers", f"{key!r}: empty name or a line break"))
        return [*problems, *ca_file_problem("ca_file", self.ca_file),
                *problem_if(self.timeout <= 0, "timeout", "must be positive")]


def url_problem(key: str, url: str) -> list[OptionProblem]:
    """A problem when the http(s) ``url`` has no host, a bad port, credentials, or does
    not parse as treq parses it: otherwise every login would fail with 454 at the first
    request.  The URL is repeated with its password masked (``url_for_humans``)."""
    shown = url_for_humans(url)
    if credentials_in_url(url):
        return [OptionProblem(key, f"{shown!r} is not a usable URL: a user name or password"
                                   " in the URL is never sent (put credentials in headers,"
                                   " e.g. Authorization; write an @ in the path as %40)")]
    try:
        parts = urlsplit(url)
        port = parts.port
        DecodedURL.from_text(url)
    except ValueError as e:  # hyperlink's URLParseError is a ValueError
        return [OptionProblem(key, f"{shown!r} is not a usable URL: {e}")]
    host = parts.hostname or ""
    why = ("no host name" if not host else "a space in the host name"
           if any(c.isspace() for c in host) else "port 0" if port == 0 else None)
    return problem_if(why is not None, key, f"{shown!r} is not a usable URL: {why}")


def credentials_in_url(url: str) -> bool:
    """Whether ``url`` has an ``@`` between ``//`` and its query: ``user:password@host``
    (an ``@`` in the path counts too: a password holding an unescaped ``/`` would put
    its end there).  Neither treq nor Twisted's agent sends such credentials; the
    request fails instead, at every login."""
    start = url.find("//")
    if start < 0:
        return False
    return "@" in url[start + 2:].split("?", 1)[0].split("#", 1)[0]


@implementer(ICredentialsChecker)
class HttpChecker:
    """Checks a username and password with a JSON POST to ``url``.

    ``client`` is anything with treq's ``request(method, url, **kwargs)`` (a
    ``treq.client.HTTPClient``, or ``treq.testing.StubTreq`` in unit tests); ``reactor``
    provides time (the deadline) and is passed to treq so it never uses the global one.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, *, url: str, client: Any, reactor: IReactorTime, timeout: float = 5.0,
                 headers: Mapping[str, str] | None = None, name: str = "http",
                 pool: HTTPConnectionPool | None = None) -> None:
        self.url = url
        self._pool = pool
        self.name = name
        self.timeout = timeout
        self._client = client
        self._reactor = reactor
        header_map: dict[bytes, list[bytes]] = {b"User-Agent": [USER_AGENT.encode("ascii")]}
        for key, value in (headers or {}).items():
            header_map[key.encode("latin-1")] = [value.encode("latin-1")]
        self._headers = header_map
        self.outages = OutageLog(name, reactor.seconds)

    def stop(self) -> "Deferred[None] | None":
        """Close the kept-alive connections (the service calls this on shutdown)."""
        return self._pool.closeCachedConnections() if self._pool is not None else None

    def __repr__(self) -> str:  # the headers may hold an API token: never shown
        return f"<HttpChecker {self.name} {url_for_humans(self.url)}>"

    def requestAvatarId(self, credentials: IUsernamePassword) -> "Deferred[AvatarId]":
        """One verdict from the API (see the module docstring)."""
        username = as_bytes(credentials.username)
        try:
            user_text, password_text = as_text(username), as_text(credentials.password)
        except UnicodeDecodeError:
            return fail(UnauthorizedLogin("credentials are not UTF-8"))
        session = getattr(credentials, "session", None)
        body = {
            "username": user_text,
            "password": password_text,
            "mechanism": getattr(session, "mechanism", "") or None,
            "remote_ip": getattr(session, "remote_ip", "") or None,
        }
        check = with_deadline(Deferred.fromCoroutine(self._ask(body)), self.timeout,
                              self._reactor)

        def settle(result: Any) -> Any:
            if isinstance(result, Failure):
                if result.check(UnauthorizedLogin, TemporaryFailure):
                    return result
                if result.check(DeadlineExceeded):
                    return Failure(TemporaryFailure(
                        f"http backend {self.name}: no answer within {self.timeout:g}s"))
                return Failure(TemporaryFailure(
                    f"http backend {self.name}: {result.value.__class__.__name__}"))
            return username

        return self.outages.watch(check.addBoth(settle))

    async def _ask(self, body: dict[str, Any]) -> None:
        response = await request_retrying_stale(
            self._client, "POST", self.url, f"http backend {self.name}", json=body,
            headers=Headers(self._headers), allow_redirects=False, unbuffered=True,
            reactor=self._reactor)
        await treq.collect(response, _discard)  # drain, so the connection can be reused
        code = response.code
        if 200 <= code < 300:
            return
        if code in REJECT_STATUSES:
            raise UnauthorizedLogin(f"API answered {code}")
        raise TemporaryFailure(f"http backend {self.name}: API answered {code}")


async def request_retrying_stale(client: Any, method: str, url: str, what: str,
                                 **kwargs: Any) -> Any:
    """``client.request(method, url, **kwargs)``, sent once more on a fresh connection when
    it failed before any answer (``RequestTransmissionFailed`` / ``ResponseNeverReceived``:
    typically a kept-alive connection the server had just closed, as a restarting server
    does); Twisted retries only idempotent methods, and only when the pool is told to.
    A TLS failure is a ``TemporaryFailure`` saying so (``what`` names the backend)."""
    for attempt in (1, 2):
        try:
            return await client.request(method, url, **kwargs)
        except _STALE as e:
            if any(r.check(SSL.Error, CertificateIdentityError) for r in e.reasons):
                raise TemporaryFailure(f"{what}: TLS handshake failed (certificate refused or"
                                       " not trusted)") from None
            if attempt == 2 or any(r.check(CancelledError) for r in e.reasons):
                raise
            log.debug("{what}: no answer on a kept-alive connection, retrying once", what=what)
    raise AssertionError("not reached")


def _discard(chunk: bytes) -> None:
    """Body chunks are not needed; only the status decides."""


class _QuietClientFactory(_HTTP11ClientFactory):
    """Twisted's factory for one HTTP connection, without its ``Starting factory`` /
    ``Stopping factory`` log lines: a backend opens connections all day."""

    noisy = False


class QuietConnectionPool(HTTPConnectionPool):
    """An ``HTTPConnectionPool`` whose connections log nothing when they open and close
    (``_factory``, the per-connection factory the pool makes, is a private
    attribute of Twisted's: a test on the real log notices if it changes); only
    this pool is changed, not Twisted's class."""

    _factory = _QuietClientFactory


def make_pool(reactor: Any) -> HTTPConnectionPool:
    """A small pool of kept-alive connections (we retry a stale one ourselves) that does
    not log each connection's factory starting and stopping."""
    pool = QuietConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 8
    pool.cachedConnectionTimeout = 30
    pool.retryAutomatically = False  # only ever for idempotent methods; we retry ourselves
    return pool


def make_client(reactor: Any, pool: HTTPConnectionPool, ca_file: str | None,
                timeout: float) -> HTTPClient:
    """A treq client over ``pool`` with the strict HTTPS policy."""
    agent = Agent(reactor, contextFactory=StrictHTTPSPolicy(load_trust_root(ca_file)),
                  pool=pool, connectTimeout=timeout)
    return HTTPClient(agent)


def from_config(name: str, options: HttpOptions, deps: Any) -> HttpChecker:
    """The checker for ``[backends.NAME] type = "http"``."""
    pool = make_pool(deps.reactor)
    client = make_client(deps.reactor, pool, options.ca_file, options.timeout)
    return HttpChecker(url=options.url, client=client, reactor=deps.reactor,
                       timeout=options.timeout, headers=dict(options.headers), name=name,
                       pool=pool)
