"""``type = "oauth2"``: validate OAuth 2.0 bearer tokens for OAUTHBEARER and XOAUTH2.

The backend provides ``ITokenValidator``: ``validate_token(ValidateToken)`` fires with a
``TokenVerdict`` (or ``None``: no opinion).  Two modes, one per backend:

* **JWT** (``jwks_file`` or ``jwks_url``): the token is a JWS-signed JWT (RFC 7519,
  RFC 9068); its signature is checked with joserfc against the key set (the key named by
  ``kid``; without ``kid``, each key of a fitting type), only with ``algorithms`` (never
  ``none``, never HMAC); then the claims (below).  A token that is no JWT, or whose
  (not yet verified) ``iss`` is not ``issuer``, gets no opinion (``None``): the next
  ``oauth2`` backend may judge it (several IdPs, or JWTs beside opaque tokens); when
  none has an opinion the token is invalid.  A ``jwks_url`` is fetched with treq on
  first use and cached for ``jwks_cache_time``; a token naming an unknown ``kid``
  triggers one refetch (at most every ``jwks_min_refresh`` seconds: a stream of forged
  kids cannot hammer the IdP).  A ``jwks_file`` is read at startup and re-read when a
  token names an unknown ``kid`` and the file has changed.
* **Introspection** (``introspection_url``, RFC 7662): one POST
  ``token=...&token_type_hint=access_token`` per login, authenticated with HTTP Basic
  ``client_id``/``client_secret`` (RFC 6749 2.3.1: both form-urlencoded first); the
  answer must be ``200`` JSON with ``"active": true``; then the same claims.

Claims (``ClaimPolicy``): ``exp`` (required for JWTs), ``nbf`` and ``iat`` within
``leeway`` seconds; ``iss`` equal to ``issuer`` and ``aud`` containing one of
``audience`` when configured (both required for JWTs by the config); every ``scope``
configured present in ``scope`` (space-separated) or ``scp``; and ``username_claim``
(default ``sub``) a non-empty string that equals the username the client asked for,
when it asked for one.  Verdicts: all good -> ``TokenVerdict(ok=True, subject=<claim>)``;
missing scope -> ``ok=False, status="insufficient_scope"``; anything else wrong with
the token -> ``ok=False, status="invalid_token"`` (the mechanism sends its error round,
then 535).

The key set or the introspection endpoint unreachable, a non-200 answer, a malformed
answer, or no answer within ``timeout`` -> ``TemporaryFailure`` (454).  A ``jwks_url``
that cannot be refreshed while older keys are known keeps using the older keys; a token
naming a ``kid`` not among them is then ``TemporaryFailure`` too (the IdP may have
rotated its key meanwhile), until a fetch works again (at most one per ``min_refresh``).

Tokens are never logged, and never part of an exception message or repr.

It is also an ``ICredentialsChecker`` that refuses every password (``UnauthorizedLogin``),
so it may be listed in ``auth.backends`` (needed when OAUTHBEARER/XOAUTH2 are the only
mechanisms); token validators are found among all ``[backends.*]`` whether listed there
or not.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence
from urllib.parse import quote_plus, urlencode

from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jwk import JWKRegistry, KeySet
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from zope.interface import implementer

from saslsmtp.checkers.outage import OutageLog
from saslsmtp.checkers.secrets import ITokenValidator
from saslsmtp.credentials import AvatarId
from saslsmtp.deadline import DeadlineExceeded, with_deadline
from saslsmtp.errors import TemporaryFailure
from saslsmtp.options import (PATH, OptionProblem, Options, OptionsError, ca_file_problem,
                              file_problem, finite_number, http_url_problem, problem_if,
                              url_port_problem)
from saslsmtp.redact import url_for_humans
from saslsmtp.sasl.oauth import TokenVerdict, ValidateToken

log = Logger(namespace="saslsmtp.oauth2")

USER_AGENT = "saslsmtp"
MAX_BODY = 1 << 20  # a JWKS or introspection answer larger than 1 MiB is refused
MAX_TOKEN = 16384  # a longer "token" is not worth parsing

#: JWS ``alg`` -> the JWK ``kty`` able to verify it.
KEY_TYPES = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}


def _key_type(alg: str) -> str | None:
    return KEY_TYPES.get(alg[:2])


# --------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------

#: JWS algorithms a token may use: asymmetric only (a JWKS is public, so an HMAC "key"
#: from it would let anyone sign), never "none".  The default leaves out "EdDSA"
#: (deprecated by RFC 9864 for "Ed25519"; joserfc warns on each use).
ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
              "ES256", "ES384", "ES512", "Ed25519", "EdDSA")
DEFAULT_ALGORITHMS = ALGORITHMS[:-1]


@dataclass(frozen=True)
class OAuth2Options(Options):
    """``[backends.NAME] type = "oauth2"``: validate bearer tokens (OAUTHBEARER, XOAUTH2) as
    JWTs against a JWKS (``jwks_file`` or ``jwks_url``) or at an RFC 7662
    ``introspection_url``."""

    jwks_file: str | None = field(default=None, metadata=PATH)
    jwks_url: str | None = None
    introspection_url: str | None = None
    client_id: str | None = None
    client_secret: str | None = field(default=None, repr=False)  # a secret: not in repr
    issuer: str | None = None
    audience: tuple[str, ...] = ()
    username_claim: str = "sub"
    scope: tuple[str, ...] = ()  # scopes the token must carry (all of them)
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    leeway: float = 60.0
    timeout: float = 5.0
    jwks_cache_time: float = 3600.0
    jwks_min_refresh: float = 30.0
    ca_file: str | None = field(default=None, metadata=PATH)

    def check(self) -> Iterable[OptionProblem]:
        sources = [k for k in ("jwks_file", "jwks_url", "introspection_url") if getattr(self, k)]
        problems = problem_if(len(sources) != 1, "", "needs exactly one of jwks_file, jwks_url"
                              " or introspection_url")
        problems += file_problem("jwks_file", self.jwks_file) or jwks_file_problem(
            "jwks_file", self.jwks_file)
        for key in ("jwks_url", "introspection_url"):
            url = getattr(self, key)
            problems += (http_url_problem(key, url) or credentials_problem(key, url)
                         or url_port_problem(key, url))
        if (self.client_id is None) != (self.client_secret is None):
            problems.append(OptionProblem(
                "client_secret" if self.client_id is not None else "client_id",
                "client_id and client_secret go together"))
        problems += problem_if(self.client_id is not None and not self.introspection_url,
                               "client_id", "is only used with introspection_url")
        if self.jwks_file or self.jwks_url:  # a JWT for another app of the same IdP must fail
            problems += problem_if(not self.issuer, "issuer",
                                   "is required with jwks_file / jwks_url")
            problems += problem_if(not self.audience, "audience",
                                   "is required with jwks_file / jwks_url")
        problems += problem_if(not self.username_claim, "username_claim", "must not be empty")
        problems += problem_if(not self.algorithms, "algorithms",
                               "must name at least one algorithm")
        problems += [OptionProblem("algorithms", f"{alg!r} is not allowed (choose from"
                                   f" {', '.join(ALGORITHMS)})")
                     for alg in self.algorithms if alg not in ALGORITHMS]
        problems += problem_if(self.leeway < 0, "leeway", "must not be negative")
        for key in ("jwks_cache_time", "jwks_min_refresh"):
            problems += problem_if(getattr(self, key) < 0, key, "must not be negative")
        problems += problem_if(self.timeout <= 0, "timeout", "must be positive")
        return problems + ca_file_problem("ca_file", self.ca_file)


# --------------------------------------------------------------------------
# Claims: pure
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ClaimPolicy:
    """What the claims of a valid token must say (see the module docstring)."""

    issuer: str | None = None
    audience: tuple[str, ...] = ()
    username_claim: str = "sub"
    scope: tuple[str, ...] = ()
    leeway: float = 60.0
    require_exp: bool = True

    def refuse(self, status: str = "invalid_token", subject: str | None = None) -> TokenVerdict:
        """A negative verdict carrying the scope to ask for, when one is configured."""
        return TokenVerdict(False, subject, status, " ".join(self.scope) or None)

    def judge(self, claims: Mapping[str, Any], username: str, now: float) -> tuple[TokenVerdict, str]:
        """(verdict, reason for the log) for ``claims`` presented for ``username``."""
        exp = claims.get("exp")
        if exp is None:
            if self.require_exp:
                return self.refuse(), "no exp claim"
        elif not finite_number(exp):
            return self.refuse(), "exp is not a number"
        elif exp + self.leeway <= now:
            return self.refuse(), "expired"
        for name, what in (("nbf", "not yet valid"), ("iat", "issued in the future")):
            value = claims.get(name)
            if value is None:
                continue
            if not finite_number(value):
                return self.refuse(), f"{name} is not a number"
            if value - self.leeway > now:
                return self.refuse(), what
        if self.issuer is not None and claims.get("iss") != self.issuer:
            return self.refuse(), "wrong issuer"
        if self.audience:
            aud = claims.get("aud")
            audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
            if not any(a in audiences for a in self.audience):
                return self.refuse(), "wrong audience"
        subject = claims.get(self.username_claim)
        if not isinstance(subject, str) or not subject:
            return self.refuse(), f"no {self.username_claim} claim"
        if username and subject != username:
            return self.refuse(subject=subject), f"{self.username_claim} is not the requested user"
        if self.scope:
            granted = _scopes(claims)
            missing = [s for s in self.scope if s not in granted]
            if missing:
                return self.refuse("insufficient_scope", subject), "missing scope " + " ".join(missing)
        return TokenVerdict(True, subject), "ok"




def _scopes(claims: Mapping[str, Any]) -> set[str]:
    """Scopes granted: ``scope`` (RFC 9068 / RFC 7662, space-separated) or ``scp`` (a list
    or string, Azure AD / Okta)."""
    granted: set[str] = set()
    for name in ("scope", "scp"):
        value = claims.get(name)
        if isinstance(value, str):
            granted.update(value.split())
        elif isinstance(value, list):
            granted.update(v for v in value if isinstance(v, str))
    return granted


# --------------------------------------------------------------------------
# Key sets
# --------------------------------------------------------------------------


class KeySetError(Exception):
    """A JWKS document that cannot be used."""


def parse_jwks(data: bytes, origin: str, *, quiet: bool = False) -> KeySet:
    """The verification keys of a JWKS document (``{"keys": [...]}``).

    Keys marked ``"use": "enc"``, symmetric keys and keys joserfc cannot import are
    skipped (logged, unless ``quiet``); a document without any usable key is an error.
    """
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise KeySetError(f"{origin}: not JSON") from None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise KeySetError(f"{origin}: not a JWKS (no \"keys\" array)")
    warn = _silent if quiet else log.warn
    keys = []
    for index, entry in enumerate(document["keys"]):
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        if entry.get("kty") not in ("RSA", "EC", "OKP"):
            warn("{origin}: key {index} skipped (kty {kty!r} is not RSA, EC or OKP)",
                 origin=origin, index=index, kty=entry.get("kty"))
            continue
        public = {k: v for k, v in entry.items() if k not in ("d", "p", "q", "dp", "dq", "qi")}
        try:
            keys.append(JWKRegistry.import_key(public))
        except (JoseError, ValueError, TypeError):
            warn("{origin}: key {index} skipped (cannot be imported)", origin=origin, index=index)
    if not keys:
        raise KeySetError(f"{origin}: no usable signature key")
    return KeySet(keys)


def _silent(message: str, **kwargs: Any) -> None:
    """A ``log.warn`` that says nothing (the load-time check; the build logs the skips)."""


def credentials_problem(key: str, url: str | None) -> list[OptionProblem]:
    """A problem when ``url`` holds ``user:password@``: never sent (every login would get
    454), and repeated in the outage warnings; the client's credentials for introspection
    go in ``client_id`` / ``client_secret``.  The URL is shown with the password masked."""
    from saslsmtp.checkers.http import credentials_in_url
    return problem_if(bool(url) and credentials_in_url(url or ""), key,
                      f"{url_for_humans(url or '')!r}: a user name or password in the URL is"
                      " never sent (introspection takes client_id and client_secret; write"
                      " an @ in the path as %40)")


def jwks_file_problem(key: str, path: str | None) -> list[OptionProblem]:
    """A problem when the JWKS file ``path`` is set and unusable (not JSON, no usable
    key, unreadable): found at load (``--check``), with the key's line."""
    if not path:
        return []
    try:
        with open(path, "rb") as f:
            parse_jwks(f.read(MAX_BODY + 1), path, quiet=True)
    except OSError as e:
        return [OptionProblem(key, f"{path}: cannot read: {e.strerror}")]
    except KeySetError as e:
        return [OptionProblem(key, str(e))]
    return []


class FileKeys:
    """A JWKS from a file: read now (errors are config errors), re-read on demand when
    the file changed."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._mtime = self._stat()
        try:
            self._keys = parse_jwks(self._read(), path)
        except OSError as e:
            raise KeySetError(f"{path}: cannot read: {e.strerror}") from None

    def _stat(self) -> float | None:
        try:
            return os.stat(self.path).st_mtime_ns
        except OSError:
            return None

    def _read(self) -> bytes:
        with open(self.path, "rb") as f:
            return f.read(MAX_BODY + 1)

    def current(self) -> "Deferred[KeySet]":
        """The keys as last read."""
        return succeed(self._keys)

    def refresh(self) -> "Deferred[KeySet]":
        """Re-read the file if it changed; keep the old keys if it became unusable."""
        mtime = self._stat()
        if mtime is not None and mtime != self._mtime:
            self._mtime = mtime
            try:
                self._keys = parse_jwks(self._read(), self.path)
                log.info("{path}: key set reloaded", path=self.path)
            except (OSError, KeySetError) as e:
                log.warn("{path}: cannot reload the key set ({why}); keeping the old keys",
                         path=self.path, why=str(e))
        return succeed(self._keys)


class RemoteKeys:
    """A JWKS fetched from ``url`` with treq: cached for ``cache_time`` seconds; refreshed
    at most every ``min_refresh`` seconds on demand; concurrent fetches share one request."""

    def __init__(self, url: str, client: Any, reactor: Any, *, timeout: float = 5.0,
                 cache_time: float = 3600.0, min_refresh: float = 30.0, name: str = "oauth2") -> None:
        self.url = url
        self.shown = url_for_humans(url)  # for log lines
        self._client = client
        self._reactor = reactor
        self.timeout = timeout
        self.cache_time = cache_time
        self.min_refresh = min_refresh
        self.name = name
        self._keys: KeySet | None = None
        self._fetched_at = float("-inf")
        self._attempted_at = float("-inf")
        self._waiting: list[Deferred[KeySet]] | None = None
        self.outages = OutageLog(name, reactor.seconds)
        # the last fetch failed: the keys held may lack one the IdP has rotated in since
        self.outdated = False

    def current(self) -> "Deferred[KeySet]":
        """The cached keys, fetched first when there are none or they are too old."""
        if self._keys is not None and self._reactor.seconds() - self._fetched_at < self.cache_time:
            return succeed(self._keys)
        return self._fetch()

    def refresh(self) -> "Deferred[KeySet]":
        """Fetch again (a token named an unknown kid), unless done very recently."""
        if self._keys is not None and self._reactor.seconds() - self._attempted_at < self.min_refresh:
            return succeed(self._keys)
        return self._fetch()

    def _fetch(self) -> "Deferred[KeySet]":
        result: Deferred[KeySet] = Deferred()
        if self._waiting is not None:
            self._waiting.append(result)
            return result
        self._waiting = [result]
        self._attempted_at = self._reactor.seconds()
        d = with_deadline(Deferred.fromCoroutine(self._get()), self.timeout, self._reactor)

        def done(outcome: Any) -> None:
            waiting, self._waiting = self._waiting or [], None
            if isinstance(outcome, Failure):
                why = _describe(outcome)
                self.outdated = True
                if self._keys is not None:
                    self.outages.down(f"cannot refresh {self.shown} ({why}); keeping the keys"
                                      " fetched before")
                    outcome = self._keys
                else:
                    self.outages.down(f"cannot fetch {self.shown} ({why})")
                    outcome = Failure(TemporaryFailure(
                        f"oauth2 backend {self.name}: key set unavailable ({why})"))
            else:
                self.outages.up()
                self.outdated = False
                self._keys = outcome
                self._fetched_at = self._reactor.seconds()
            for w in waiting:
                w.callback(outcome) if not isinstance(outcome, Failure) else w.errback(outcome)

        d.addBoth(done)
        return result

    async def _get(self) -> KeySet:
        from saslsmtp.checkers.http import request_retrying_stale
        response = await request_retrying_stale(
            self._client, "GET", self.url, f"oauth2 backend {self.name}: key set",
            headers=Headers({b"User-Agent": [USER_AGENT.encode("ascii")],
                             b"Accept": [b"application/json"]}),
            allow_redirects=False, unbuffered=True, reactor=self._reactor)
        body = await _read_body(response)
        if response.code != 200:
            raise KeySetError(f"answered {response.code}")
        return parse_jwks(body, self.shown)


# --------------------------------------------------------------------------
# HTTP helpers
# --------------------------------------------------------------------------


class _TooLarge(Exception):
    pass


async def _read_body(response: Any) -> bytes:
    import treq
    chunks: list[bytes] = []
    size = 0

    def collect(chunk: bytes) -> None:
        nonlocal size
        size += len(chunk)
        if size > MAX_BODY:
            raise _TooLarge(f"answer larger than {MAX_BODY} bytes")
        chunks.append(chunk)

    await treq.collect(response, collect)
    return b"".join(chunks)


def _describe(failure: Failure) -> str:
    if failure.check(KeySetError, _TooLarge, TemporaryFailure, DeadlineExceeded):
        return str(failure.value)
    reasons = getattr(failure.value, "reasons", None)
    if reasons:
        return ", ".join(r.value.__class__.__name__ for r in reasons)
    return failure.value.__class__.__name__


def _bounded(reactor: Any, timeout: float, coroutine: Any, what: str) -> "Deferred[Any]":
    """Run ``coroutine`` within ``timeout`` seconds; failures other than
    ``TemporaryFailure`` become one (with a message free of secrets)."""

    def settle(result: Any) -> Any:
        if isinstance(result, Failure) and not result.check(TemporaryFailure):
            return Failure(TemporaryFailure(f"{what}: {_describe(result)}"))
        return result

    return with_deadline(Deferred.fromCoroutine(coroutine), timeout, reactor).addBoth(settle)


# --------------------------------------------------------------------------
# Validators
# --------------------------------------------------------------------------


@implementer(ICredentialsChecker)
class _TokenValidator:
    """Shared: a token-only backend refuses passwords; verdicts are logged without tokens."""

    credentialInterfaces = (IUsernamePassword,)
    name = "oauth2"
    _pool: Any = None  # the HTTP connection pool, when the validator makes requests

    def stop(self) -> "Deferred[None] | None":
        """Close kept-alive connections (the service calls this on shutdown)."""
        return self._pool.closeCachedConnections() if self._pool is not None else None

    def requestAvatarId(self, credentials: Any) -> "Deferred[AvatarId]":
        """Passwords are not tokens: always ``UnauthorizedLogin``."""
        return fail(UnauthorizedLogin(f"oauth2 backend {self.name} checks bearer tokens only"))

    def _log(self, request: ValidateToken, verdict: TokenVerdict, why: str) -> TokenVerdict:
        if verdict.ok:
            log.debug("oauth2 backend {name}: token accepted for {subject}", name=self.name,
                      subject=verdict.subject)
        else:
            log.info("oauth2 backend {name}: token refused ({why}) for {user!r} via {mechanism}",
                     name=self.name, why=why, user=request.username, mechanism=request.mechanism)
        return verdict

    def _no_opinion(self, request: ValidateToken, why: str) -> None:
        log.info("oauth2 backend {name}: no opinion on the token ({why}) for {user!r} via"
                 " {mechanism}", name=self.name, why=why, user=request.username,
                 mechanism=request.mechanism)


@implementer(ITokenValidator)
class JwtValidator(_TokenValidator):
    """Validates JWT bearer tokens with a key source (``FileKeys`` or ``RemoteKeys``)."""

    def __init__(self, keys: Any, policy: ClaimPolicy, *, algorithms: Sequence[str],
                 clock: Any, name: str = "oauth2", pool: Any = None) -> None:
        self.keys = keys
        self._pool = pool
        self.policy = policy
        self.algorithms = tuple(algorithms)
        self._clock = clock
        self.name = name

    def __repr__(self) -> str:
        return f"<JwtValidator {self.name}>"

    def validate_token(self, request: ValidateToken) -> "Deferred[TokenVerdict | None]":
        """The verdict on ``request.token`` (see the module docstring); ``None`` (no
        opinion) when it is not a JWT or names another ``iss``."""
        return Deferred.fromCoroutine(self._validate(request))

    async def _validate(self, request: ValidateToken) -> TokenVerdict | None:
        token = request.token
        peeked = _peek(token)
        if peeked is None:
            self._no_opinion(request, "not a signed JWT")
            return None
        header, unverified = peeked
        if self.policy.issuer is not None and (
                not isinstance(unverified, dict) or unverified.get("iss") != self.policy.issuer):
            self._no_opinion(request, "another issuer")
            return None
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in self.algorithms or _key_type(alg) is None:
            return self._log(request, self.policy.refuse(), f"algorithm {alg!r} not allowed")
        if kid is not None and not isinstance(kid, str):
            return self._log(request, self.policy.refuse(), "kid is not a string")
        keyset = await self.keys.current()
        candidates = _candidates(keyset, alg, kid)
        if not candidates and kid is not None:
            keyset = await self.keys.refresh()
            candidates = _candidates(keyset, alg, kid)
            if not candidates and getattr(self.keys, "outdated", False):
                # the IdP may have rotated its key while its key set cannot be fetched:
                # this token cannot be judged (454), it is not known to be bad (535)
                raise TemporaryFailure(f"oauth2 backend {self.name}: the token names a key"
                                       " not among those fetched before, and the backend"
                                       " cannot refresh its key set")
        if not candidates:
            return self._log(request, self.policy.refuse(), "no key for this kid/algorithm")
        claims = None
        for key in candidates:
            try:
                claims = jwt.decode(token, key, algorithms=[alg]).claims
                break
            except JoseError:
                continue
            except (ValueError, TypeError):
                break
        if claims is None:
            return self._log(request, self.policy.refuse(), "bad signature")
        if not isinstance(claims, dict):
            return self._log(request, self.policy.refuse(), "claims are not a JSON object")
        verdict, why = self.policy.judge(claims, request.username, self._clock.seconds())
        return self._log(request, verdict, why)


def _peek(token: str) -> tuple[dict[str, Any], Any] | None:
    """(protected header, claims NOT yet verified) of a compact JWS; ``None`` if it is
    not one.  The claims only route the token (``iss``); nothing is trusted before the
    signature is checked."""
    if not token or len(token) > MAX_TOKEN or token.count(".") != 2:
        return None
    try:
        compact = jws.extract_compact(token.encode("ascii"))
    except (JoseError, ValueError, TypeError, UnicodeError):
        return None
    if not isinstance(compact.protected, dict):
        return None
    try:
        claims = json.loads(compact.payload)
    except (ValueError, UnicodeDecodeError):
        claims = None
    return compact.protected, claims


def _candidates(keyset: KeySet, alg: str, kid: str | None) -> list[Any]:
    """Keys that may have signed a token with this ``alg`` and ``kid``."""
    kty = _key_type(alg)
    keys = [k for k in keyset.keys if k.key_type == kty]
    if kid is not None:
        keys = [k for k in keys if k.kid == kid]
    return [k for k in keys if k.get("alg") in (None, alg)]


@implementer(ITokenValidator)
class IntrospectionValidator(_TokenValidator):
    """Asks an RFC 7662 introspection endpoint about each token."""

    def __init__(self, url: str, client: Any, reactor: Any, policy: ClaimPolicy, *,
                 client_id: str | None = None, client_secret: str | None = None,
                 timeout: float = 5.0, name: str = "oauth2", pool: Any = None) -> None:
        self.url = url
        self._client = client
        self._reactor = reactor
        self.policy = policy
        self.timeout = timeout
        self.name = name
        self._pool = pool
        self.outages = OutageLog(name, reactor.seconds)
        headers = {b"User-Agent": [USER_AGENT.encode("ascii")], b"Accept": [b"application/json"],
                   b"Content-Type": [b"application/x-www-form-urlencoded"]}
        if client_id is not None:
            pair = f"{quote_plus(client_id)}:{quote_plus(client_secret or '')}"
            headers[b"Authorization"] = [b"Basic " + base64.b64encode(pair.encode("utf-8"))]
        self._headers = headers

    def __repr__(self) -> str:  # the headers hold the client secret: never shown
        return f"<IntrospectionValidator {self.name} {url_for_humans(self.url)}>"

    def validate_token(self, request: ValidateToken) -> "Deferred[TokenVerdict | None]":
        """The verdict of the introspection endpoint plus the claim policy."""
        if not request.token or len(request.token) > MAX_TOKEN:
            return succeed(self._log(request, self.policy.refuse(), "empty or oversized token"))
        d = self.outages.watch(_bounded(self._reactor, self.timeout, self._ask(request.token),
                                        f"oauth2 backend {self.name}: introspection"))
        return d.addCallback(lambda claims: self._judge(request, claims))

    async def _ask(self, token: str) -> Mapping[str, Any]:
        from saslsmtp.checkers.http import request_retrying_stale
        body = urlencode({"token": token, "token_type_hint": "access_token"}).encode("ascii")
        # introspection only reads: asking again on a fresh connection is safe
        response = await request_retrying_stale(
            self._client, "POST", self.url, f"oauth2 backend {self.name}: introspection",
            data=body, headers=Headers(self._headers), allow_redirects=False, unbuffered=True,
            reactor=self._reactor)
        data = await _read_body(response)
        if response.code in (401, 403):
            log.error("oauth2 backend {name}: the introspection endpoint refused our client"
                      " credentials ({code})", name=self.name, code=response.code)
        if response.code != 200:
            raise TemporaryFailure(f"oauth2 backend {self.name}: introspection answered"
                                   f" {response.code}")
        try:
            claims = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise TemporaryFailure(f"oauth2 backend {self.name}: introspection answer is not JSON") from None
        if not isinstance(claims, dict) or not isinstance(claims.get("active"), bool):
            raise TemporaryFailure(f"oauth2 backend {self.name}: introspection answer has no"
                                   " boolean \"active\"")
        return claims

    def _judge(self, request: ValidateToken, claims: Mapping[str, Any]) -> TokenVerdict:
        if claims.get("active") is not True:
            return self._log(request, self.policy.refuse(), "inactive")
        verdict, why = self.policy.judge(claims, request.username, self._reactor.seconds())
        return self._log(request, verdict, why)


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------


def policy_from(options: OAuth2Options) -> ClaimPolicy:
    """The claim policy of a ``[backends.NAME]`` table."""
    return ClaimPolicy(issuer=options.issuer, audience=tuple(options.audience),
                       username_claim=options.username_claim, scope=tuple(options.scope),
                       leeway=options.leeway, require_exp=options.introspection_url is None)


def from_config(name: str, options: OAuth2Options, deps: Any,
                make_client: Callable[..., Any] | None = None) -> _TokenValidator:
    """The validator for ``[backends.NAME] type = "oauth2"``."""
    from saslsmtp.checkers import http
    reactor = deps.reactor
    policy = policy_from(options)
    if options.jwks_file:
        try:
            keys: Any = FileKeys(options.jwks_file)
        except KeySetError as e:  # changed since the options were checked
            raise OptionsError([OptionProblem("jwks_file", str(e))]) from None
        return JwtValidator(keys, policy, algorithms=options.algorithms, clock=reactor, name=name)
    pool = http.make_pool(reactor)
    client = (make_client or http.make_client)(reactor, pool, options.ca_file, options.timeout)
    if options.jwks_url:
        keys = RemoteKeys(options.jwks_url, client, reactor, timeout=options.timeout,
                          cache_time=options.jwks_cache_time,
                          min_refresh=options.jwks_min_refresh, name=name)
        return JwtValidator(keys, policy, algorithms=options.algorithms, clock=reactor,
                            name=name, pool=pool)
    return IntrospectionValidator(options.introspection_url or "", client, reactor, policy,
                                  client_id=options.client_id, client_secret=options.client_secret,
                                  timeout=options.timeout, name=name, pool=pool)
