"""Build the abuse controls from the parsed ``[limits]`` and ``[auth.cache]`` settings.

::

    controls = build_controls(limits_settings, cache_settings, reactor)
    checker = controls.wrap_checker(BackendChain(...), chain_id="users,directory")
    ...                        # give controls.limiter to every protocol instance
    await controls.stop()      # on service stop (closes Redis)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.internet.defer import Deferred, maybeDeferred, succeed

from saslsmtp.limits.authcache import AuthCache, CachingChecker
from saslsmtp.limits.limiter import Limiter
from saslsmtp.limits.settings import AuthCacheSettings, LimitsSettings
from saslsmtp.limits.store import MemoryStore, RateStore


@dataclass
class AbuseControls:
    """The limiter (always present; every limit off by default), its store, and the
    auth cache (``None`` unless ``ttl > 0``)."""

    limiter: Limiter
    store: RateStore
    cache: AuthCache | None

    def wrap_checker(self, checker: ICredentialsChecker, chain_id: str) -> Any:
        """``checker`` behind the auth cache, or unchanged when the cache is off."""
        if self.cache is None:
            return checker
        return CachingChecker(checker, self.cache, chain_id)

    def stop(self) -> "Deferred[Any]":
        close = getattr(self.store, "close", None)
        return maybeDeferred(close) if close is not None else succeed(None)


def make_store(settings: LimitsSettings, reactor: Any) -> RateStore:
    """``MemoryStore`` for ``"memory"``, else a ``RedisStore`` for the URL."""
    if settings.store == "memory":
        return MemoryStore(reactor)
    from saslsmtp.limits.redisstore import RedisStore
    return RedisStore(settings.store, reactor)


def build_controls(limits: LimitsSettings, cache: AuthCacheSettings, reactor: Any,
                   store: RateStore | None = None) -> AbuseControls:
    """Everything the protocol and the checker chain need; ``store`` may be injected."""
    store = store if store is not None else make_store(limits, reactor)
    return AbuseControls(Limiter(limits, store, reactor), store,
                         AuthCache(cache, reactor) if cache.enabled else None)
