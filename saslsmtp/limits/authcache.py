"""The auth cache: reuse a successful password check for ``ttl`` seconds.

Keyed by (backend chain id, username); an entry holds HMAC-SHA256 of the password that
succeeded, under a key random to this process (never the password, never a bare hash
that could be brute-forced offline).  The rules, as Dovecot's auth cache:

* a different password always goes to the backend (the user may have changed it);
* a backend rejection of a cached user drops the entry (an old password stops working at
  once once someone tries the new one... or a wrong one);
* negative entries only for users the backends do not know (``UnknownUser``), for
  ``negative_ttl`` seconds; a wrong password is never cached;
* ``stale_if_error``: when the backends fail temporarily, a success that has been stale
  for at most this many seconds (RFC 5861's meaning) still accepts, and says so in the log
  once per outage (a warning at the first stale success, ``debug`` for the next ones, an
  info line with their count at the backends' next verdict), as backend outages are;
* bounded LRU (``size`` entries); ``flush(user=None)`` empties it or drops one user;
* a backend that knows when its data changed (a users file) is not outrun: an entry made
  under another ``generation()`` of the checker (the file's signature) is not reused, so an
  edited password, a removed user or a user just added counts at the next login.

* a backend whose verdict depends on the session says so with ``cache_scope(credentials)``
  (a users file's ``allow_nets``: whether this client is in them); entries are kept per
  scope, so a success from an allowed network is never reused for a client outside them.

``CachingChecker`` puts it in front of any ``ICredentialsChecker`` for
``IUsernamePassword`` (normally the ``BackendChain``).  Otherwise the cache ignores the
session: a backend that decides by client address without a ``cache_scope`` (an HTTP
API) sees only the first login of a ttl.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from saslsmtp.errors import UnknownUser
from saslsmtp.events import NO_METRICS
from saslsmtp.limits.settings import AuthCacheSettings

__all__ = ["AuthCache", "CachingChecker", "UnknownUser"]

log = Logger()


@dataclass
class _Entry:
    fingerprint: bytes | None  # None: a negative entry (unknown user)
    avatar_id: Any
    stored: float
    generation: object = None  # the checker's data when it was stored (a users file's signature)


def _bytes(value: bytes | str) -> bytes:
    return value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value


class AuthCache:
    """The LRU of verified (chain, user, password HMAC) triples; see the module docstring."""

    def __init__(self, settings: AuthCacheSettings, clock: IReactorTime,
                 secret: bytes | None = None) -> None:
        self.settings = settings
        self.clock = clock
        self._secret = secret if secret is not None else os.urandom(32)
        self._entries: OrderedDict[tuple[str, bytes], _Entry] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.stale_hits = 0
        self.metrics: Any = NO_METRICS  # set by the service: cache_lookup(hit), cache_stale_hit()

    def __len__(self) -> int:
        return len(self._entries)

    def fingerprint(self, password: bytes | str) -> bytes:
        return hmac.new(self._secret, _bytes(password), hashlib.sha256).digest()

    def _get(self, chain: str, username: bytes, generation: object = None) -> _Entry | None:
        key = (chain, username)
        entry = self._entries.get(key)
        if entry is None:
            return None
        age = self.clock.seconds() - entry.stored
        keep = (self.settings.negative_ttl if entry.fingerprint is None
                else self.settings.ttl + self.settings.stale_if_error)
        if age >= keep or entry.generation != generation:
            del self._entries[key]
            return None
        return entry

    def lookup(self, chain: str, username: bytes | str,
               password: bytes | str, generation: object = None) -> tuple[str, Any] | None:
        """("accept", avatar id) for a fresh success with this very password, ("unknown",
        None) for a fresh negative entry, else ``None`` (ask the backend).  An entry
        stored under another ``generation`` of the backends' data is dropped."""
        user = _bytes(username)
        entry = self._get(chain, user, generation)
        if entry is not None:
            age = self.clock.seconds() - entry.stored
            if entry.fingerprint is None:
                self._entries.move_to_end((chain, user))
                self.hits += 1
                self.metrics.cache_lookup(True)
                return ("unknown", None)
            if age < self.settings.ttl and hmac.compare_digest(entry.fingerprint,
                                                               self.fingerprint(password)):
                self._entries.move_to_end((chain, user))
                self.hits += 1
                self.metrics.cache_lookup(True)
                return ("accept", entry.avatar_id)
        self.misses += 1
        self.metrics.cache_lookup(False)
        return None

    def stale(self, chain: str, username: bytes | str, password: bytes | str,
              generation: object = None) -> Any | None:
        """The avatar id of a success with this password still inside ``stale_if_error``
        (under the same ``generation``: a users file that cannot be read keeps no one in)."""
        if self.settings.stale_if_error <= 0:
            return None
        entry = self._get(chain, _bytes(username), generation)
        if entry is None or entry.fingerprint is None:
            return None
        if not hmac.compare_digest(entry.fingerprint, self.fingerprint(password)):
            return None
        self.stale_hits += 1
        self.metrics.cache_stale_hit()
        return entry.avatar_id

    def _put(self, chain: str, username: bytes, entry: _Entry) -> None:
        key = (chain, username)
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.settings.size:
            self._entries.popitem(last=False)

    def remember_success(self, chain: str, username: bytes | str, password: bytes | str,
                         avatar_id: Any, generation: object = None) -> None:
        self._put(chain, _bytes(username), _Entry(self.fingerprint(password), avatar_id,
                                                  self.clock.seconds(), generation))

    def remember_unknown(self, chain: str, username: bytes | str,
                         generation: object = None) -> None:
        if self.settings.negative_ttl > 0:
            self._put(chain, _bytes(username),
                      _Entry(None, None, self.clock.seconds(), generation))

    def drop(self, chain: str, username: bytes | str) -> None:
        self._entries.pop((chain, _bytes(username)), None)

    def flush(self, user: bytes | str | None = None) -> int:
        """Forget everything, or every entry of ``user`` (all chains, any case: a
        flush must not leave ``Alice`` cached when ``alice`` was asked); return how many."""
        if user is None:
            count = len(self._entries)
            self._entries.clear()
            return count
        name = _bytes(user).decode("utf-8", "surrogateescape").casefold()
        keys = [k for k in self._entries
                if k[1].decode("utf-8", "surrogateescape").casefold() == name]
        for k in keys:
            del self._entries[k]
        return len(keys)


def _no_generation() -> object:
    return None


@implementer(ICredentialsChecker)
class CachingChecker:
    """``ICredentialsChecker`` for ``IUsernamePassword`` in front of ``inner``; ``chain_id``
    names the backend list (e.g. ``"users,directory"``) so two chains never share entries."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, inner: ICredentialsChecker, cache: AuthCache, chain_id: str) -> None:
        self.inner = inner
        self.cache = cache
        self.chain_id = chain_id
        # the inner checker's data version (BackendChain, FileChecker), when it has one
        found = getattr(inner, "generation", None)
        self._generation: Callable[[], object] = found if callable(found) else _no_generation
        # what else the inner checker's verdict depends on (the client's address)
        scope = getattr(inner, "cache_scope", None)
        self._scope: Callable[[Any], object] | None = scope if callable(scope) else None
        # since when stale successes are served (the backends failing), and how many
        self._stale_since: float | None = None
        self._stale_served = 0

    def requestAvatarId(self, credentials: IUsernamePassword) -> "Deferred[Any]":
        username, password = credentials.username, credentials.password
        generation = self._generation()
        if self._scope is not None:
            scope = self._scope(credentials)
            if scope is not None:  # a success under another scope is not reused
                generation = (generation, scope)
        cached = self.cache.lookup(self.chain_id, username, password, generation)
        if cached is not None:
            kind, avatar_id = cached
            if kind == "accept":
                return succeed(avatar_id)
            return fail(UnknownUser("unknown user (cached)"))
        d: Deferred[Any] = maybeDeferred(self.inner.requestAvatarId, credentials)

        def accepted(avatar_id: Any) -> Any:
            if self._stale_since is not None:
                self._answered_again()
            self.cache.remember_success(self.chain_id, username, password, avatar_id,
                                        generation)
            return avatar_id

        def refused(f: Failure) -> Any:
            if f.check(UnauthorizedLogin) and self._stale_since is not None:
                self._answered_again()
            if f.check(UnknownUser):
                self.cache.drop(self.chain_id, username)
                self.cache.remember_unknown(self.chain_id, username, generation)
                return f
            if f.check(UnauthorizedLogin):
                self.cache.drop(self.chain_id, username)
                return f
            stale = self.cache.stale(self.chain_id, username, password, generation)
            if stale is not None:
                self._served_stale(username, type(f.value).__name__)
                return stale
            return f

        return d.addCallbacks(accepted, refused)

    def _served_stale(self, username: bytes | str, why: str) -> None:
        """One warning per outage, not one per login (a busy server logs thousands)."""
        user = _bytes(username).decode("utf-8", "backslashreplace")
        if self._stale_since is None:
            self._stale_since = self.cache.clock.seconds()
            self._stale_served = 1
            log.warn("auth cache: backends failed ({why}); accepting stale cached successes up to"
                     " {grace:g} s past their ttl (this very password only) until they answer"
                     " again; first for {user!r}", why=why,
                     grace=self.cache.settings.stale_if_error, user=user)
        else:
            self._stale_served += 1
            log.debug("auth cache: stale cached success accepted for {user!r}", user=user)

    def _answered_again(self) -> None:
        """The backends gave a verdict: the stale period is over."""
        assert self._stale_since is not None
        seconds = self.cache.clock.seconds() - self._stale_since
        log.info("auth cache: backends answer again; {count} logins accepted from stale"
                 " entries over {seconds:.1f} s", count=self._stale_served, seconds=seconds)
        self._stale_since = None
        self._stale_served = 0
