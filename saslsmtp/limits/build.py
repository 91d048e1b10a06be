"""Build the abuse controls from the parsed ``[limits]`` and ``[auth.cache]`` settings.

::

    controls = build_controls(limits_settings, cache_settings, reactor)
    checker = controls.wrap_checker(BackendChain(...), chain_id="users,directory")
    ...                        # give controls.limiter to every protocol instance
    await controls.stop()      # on service stop (closes Redis)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from twisted.cred.checkers import ICredentialsChecker
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger

from saslsmtp.events import NO_METRICS
from saslsmtp.limits.authcache import AuthCache, CachingChecker
from saslsmtp.limits.limiter import Limiter
# Imported now, not when the store is built: that happens at service start, after the
# daemon may have dropped privileges to a user who cannot read the packages.
from saslsmtp.limits.redisstore import RedisStore
from saslsmtp.limits.settings import AuthCacheSettings, LimitsSettings, Rate
from saslsmtp.limits.store import ALLOW, MemoryStore, RateResult, RateStore

log = Logger()

#: The limits counted in the store, by the key prefix of their counters.
COUNTER_PREFIXES = {"connection_rate_per_ip": "connrate:", "auth_failures_per_ip": "authfail:ip:",
                    "auth_failures_per_user": "authfail:user:", "messages_per_user": "msg:",
                    "recipients_per_user": "rcpt:"}


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

    def carry_over(self, old: "AbuseControls") -> None:
        """A reload replaces ``old`` by these: keep the counters and what the limiter
        knows of the clients (see ``docs/limits.md``, "Reload").

        Both in memory: this process's counters and connection slots are kept (the old
        sessions give their slots back to the same store).  A limit whose rate changed
        keeps the events each counter holds, counted against the new rate from now on;
        a limit turned off loses its counters.  A Redis store keeps its counters in
        Redis by itself."""
        self.limiter.carry_over(old.limiter)
        if not (isinstance(old.store, MemoryStore) and isinstance(self.store, MemoryStore)):
            return
        before, after = old.limiter.settings, self.limiter.settings
        for name, prefix in COUNTER_PREFIXES.items():
            was, now = getattr(before, name), getattr(after, name)
            if was is None or now is None:
                old.store.rescale(prefix, 0.0)  # off now (or before): nothing to keep
            elif was != now:
                old.store.rescale(prefix, now.interval / was.interval)
        self.store = self.limiter.store = old.store


def make_store(settings: LimitsSettings, reactor: Any) -> RateStore:
    """``MemoryStore`` for ``"memory"``, else a ``RedisStore`` for the URL."""
    if settings.store == "memory":
        return MemoryStore(reactor)
    return RedisStore(settings.store, reactor)


class LateStore:
    """A store built when the service starts, not when the configuration is wired: a
    ``RedisStore`` connects as it is built, and wiring also happens for ``--check``, in
    the master process and for a reload that may be refused.  It has a runner's
    ``start``/``stop`` (the service starts and stops ``Wiring.runners``); before
    ``start`` and after ``stop`` every call allows (fail open)."""

    def __init__(self, make: Callable[[], RateStore]) -> None:
        self._make = make
        self.store: RateStore | None = None
        self.metrics: Any = NO_METRICS  # handed on to the store it builds (redis_down)

    #: The calls of every session: once the store is built they are its own bound
    #: methods, set on this instance, so that a session does not pay for a hop here.
    _DIRECT = ("admit_then", "reserve_then", "release_soon", "unreserve")

    def start(self) -> None:
        if self.store is None:
            self.store = self._make()
            if hasattr(self.store, "metrics"):
                self.store.metrics = self.metrics
            for name in self._DIRECT:
                if hasattr(self.store, name):
                    setattr(self, name, getattr(self.store, name))

    def stop(self) -> "Deferred[Any]":
        for name in self._DIRECT:  # the forwarders again, which allow once stopped
            self.__dict__.pop(name, None)
        store, self.store = self.store, None
        close = getattr(store, "close", None)
        if close is None:
            return succeed(None)
        return maybeDeferred(close).addErrback(lambda f: log.failure("limits: closing the store", f))

    close = stop

    @property
    def unavailable(self) -> int:
        """Calls allowed blind because the store could not answer (metrics)."""
        return int(getattr(self.store, "unavailable", 0))

    def hit(self, key: str, rate: Rate, cost: int = 1) -> "Deferred[RateResult]":
        return self.store.hit(key, rate, cost) if self.store is not None else succeed(ALLOW)

    def peek(self, key: str, rate: Rate) -> "Deferred[RateResult]":
        return self.store.peek(key, rate) if self.store is not None else succeed(ALLOW)

    def acquire(self, key: str, limit: int, holder: str) -> "Deferred[bool]":
        return self.store.acquire(key, limit, holder) if self.store is not None else succeed(True)

    def release(self, key: str, holder: str) -> "Deferred[None]":
        return self.store.release(key, holder) if self.store is not None else succeed(None)

    def peek_many(self, items: list[tuple[str, Rate]]) -> "Deferred[list[RateResult]]":
        if self.store is None:
            return succeed([ALLOW] * len(items))
        return self.store.peek_many(items)  # type: ignore[attr-defined]

    def admit(self, rate_key: str, rate: Rate | None, slot_key: str, limit: int | None,
              holder: str) -> "Deferred[tuple[bool, bool]]":
        if self.store is None:
            return succeed((True, True))
        return self.store.admit(rate_key, rate, slot_key, limit, holder)  # type: ignore[attr-defined]

    def admit_then(self, rate_key: str, rate: Rate | None, slot_key: str, limit: int | None,
                   holder: str, then: Callable[[int], object]) -> None:
        if self.store is None:
            then(2)
        else:
            self.store.admit_then(rate_key, rate, slot_key, limit, holder, then)  # type: ignore[attr-defined]

    def release_soon(self, key: str, holder: str) -> None:
        if self.store is not None:
            self.store.release_soon(key, holder)  # type: ignore[attr-defined]

    def reserve_then(self, flights: tuple[str, ...], rates: tuple[Rate, ...], token: str,
                     ttl: float, then: Callable[[int], object]) -> None:
        if self.store is None:
            then(0)
        else:
            self.store.reserve_then(flights, rates, token, ttl, then)  # type: ignore[attr-defined]

    def reserve(self, counters: list[tuple[str, Rate]], flights: list[str], token: str,
                ttl: float) -> "Deferred[int]":
        if self.store is None:
            return succeed(0)
        return self.store.reserve(counters, flights, token, ttl)  # type: ignore[attr-defined]

    def land(self, flights: list[str], token: str,
             counters: list[tuple[str, Rate]]) -> "Deferred[None]":
        if self.store is None:
            return succeed(None)
        return self.store.land(flights, token, counters)  # type: ignore[attr-defined]

    def unreserve(self, flights: list[str], token: str) -> None:
        if self.store is not None:
            self.store.unreserve(flights, token)  # type: ignore[attr-defined]


def service_controls(limits: LimitsSettings, cache: AuthCacheSettings, reactor: Any
                     ) -> tuple[AbuseControls, LateStore | None]:
    """``build_controls`` for the daemon: a Redis store is a ``LateStore`` (returned as
    well, to start and stop with the thread pools); the memory store is ready at once."""
    if limits.store == "memory":
        return build_controls(limits, cache, reactor), None
    late = LateStore(lambda: make_store(limits, reactor))
    return build_controls(limits, cache, reactor, store=late), late


def build_controls(limits: LimitsSettings, cache: AuthCacheSettings, reactor: Any,
                   store: RateStore | None = None) -> AbuseControls:
    """Everything the protocol and the checker chain need; ``store`` may be injected."""
    store = store if store is not None else make_store(limits, reactor)
    return AbuseControls(Limiter(limits, store, reactor), store,
                         AuthCache(cache, reactor) if cache.enabled else None)
